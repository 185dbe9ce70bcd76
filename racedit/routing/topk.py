"""Exact top-K selection, the primitive every routing strategy is built from.

``topk_mask(values (G, N), k)`` selects, independently in each of G rows, exactly ``k`` of the N
entries: the largest, ties broken by the lowest index (a stable descending sort keeps index order
among equal values; -0.0 and +0.0 are equal). ``ties="all"`` instead keeps every entry >= the
k-th value (the literal ``s >= T_K`` reading), so a row may select more than k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from racedit.kernels.reference import NAN_MESSAGE, Ties, check_ties


def topk_mask(values: Tensor, k: int, ties: Ties = "index") -> tuple[Tensor, Tensor]:
    """values (G, N) float -> (mask (G, N) bool, kth (G,) the k-th largest value of each row)."""
    if values.ndim != 2:
        raise ValueError(f"topk_mask expects (groups, candidates), got shape {tuple(values.shape)}")
    G, N = values.shape
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, {N}] for {N} candidates, got {k}")
    check_ties(ties)
    if torch.isnan(values).any():
        raise ValueError(NAN_MESSAGE)
    sorted_vals, order = torch.sort(values.detach(), dim=-1, descending=True, stable=True)
    kth = sorted_vals[:, k - 1]  # (G,)
    if ties == "all":
        return values.detach() >= kth[:, None], kth
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask, kth
