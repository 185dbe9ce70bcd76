"""PyTorch reference of the MoE routing layout and expert computation (kernels.md).

These functions define the semantics; the Triton kernels in this package must agree with them
(integers exactly, floats within dtype tolerance). They run on any device.

Layout ("plan") of a routing decision over T tokens and E experts with K selected pairs:
- ``counts`` (E,) int64: pairs per expert; ``offsets`` (E+1,) int64: exclusive prefix sum;
- ``sorted_token`` (K,) int64: token of each pair, grouped by expert, tokens ascending in a group;
- ``sorted_expert`` (K,) int64: expert of each pair (derivable from offsets; kept for gathers);
- ``sorted_gate`` (K,) float: gate value G(s) of each pair (differentiable w.r.t. the scores);
- ``slot`` (T, E) int64: position of pair (t, e) in the sorted layout, -1 when not routed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RoutePlan:
    counts: Tensor  # (E,) int64
    offsets: Tensor  # (E+1,) int64
    sorted_token: Tensor  # (K,) int64
    sorted_expert: Tensor  # (K,) int64
    sorted_gate: Tensor  # (K,) float, carries the gradient to the gates
    slot: Tensor  # (T, E) int64, -1 = not routed
    kth: Tensor | None = None  # scalar: K-th largest score (expert race, training), feeds the threshold EMA

    @property
    def num_tokens(self) -> int:
        return self.slot.shape[0]

    @property
    def num_experts(self) -> int:
        return self.slot.shape[1]

    def mask(self) -> Tensor:
        """(T, E) bool selection mask."""
        return self.slot >= 0


def plan_from_mask(mask: Tensor, gates: Tensor) -> RoutePlan:
    """Sorted layout of a (T, E) boolean selection; ``gates`` (T, E) are gathered per selected pair."""
    if mask.shape != gates.shape or mask.ndim != 2:
        raise ValueError(f"mask {tuple(mask.shape)} and gates {tuple(gates.shape)} must both be (T, E)")
    T, E = mask.shape
    # Expert-major order: transpose so that nonzero() enumerates (e, t) with t ascending inside e.
    expert, token = mask.t().nonzero(as_tuple=True)
    counts = torch.bincount(expert, minlength=E)
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    slot = torch.full((T, E), -1, dtype=torch.long, device=mask.device)
    slot[token, expert] = torch.arange(token.numel(), device=mask.device)
    return RoutePlan(
        counts=counts,
        offsets=offsets,
        sorted_token=token,
        sorted_expert=expert,
        sorted_gate=gates[token, expert],
        slot=slot,
    )


def expert_ffn(x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``out[t] = sum_e gate[t,e] * (GELU_tanh(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e])`` over selected pairs.

    x (T, D); w1 (E, D, H); b1 (E, H); w2 (E, H, D); b2 (E, D) -> (T, D). A per-expert loop over the
    contiguous groups of the plan: only selected pairs are computed. Deterministic (index_add in
    pair order is replaced by a sum over each token's slots).
    """
    T, D = x.shape
    rows = x.index_select(0, plan.sorted_token)  # (K, D) gathered inputs, expert-major
    outs = []
    offsets = plan.offsets.tolist()
    for e in range(w1.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        h = F.gelu(rows[lo:hi] @ w1[e] + b1[e], approximate="tanh")
        outs.append(h @ w2[e] + b2[e])
    if not outs:
        return x.new_zeros(T, D) + 0 * (w1.sum() + w2.sum() + b1.sum() + b2.sum())
    y = torch.cat(outs) * plan.sorted_gate.to(x.dtype).unsqueeze(1)  # (K, D)
    return combine(y, plan)


def combine(y: Tensor, plan: RoutePlan) -> Tensor:
    """``out[t] = sum_e y[slot[t, e]]`` over routed pairs; y (K, D) in plan order -> (T, D).

    Deterministic: a padded gather + sum, no atomics (the Triton combine does the same)."""
    slot = plan.slot  # (T, E)
    padded = torch.cat([y, y.new_zeros(1, y.shape[1])])  # row K is the zero row for unrouted pairs
    idx = torch.where(slot >= 0, slot, torch.full_like(slot, y.shape[0]))
    return padded[idx].sum(dim=1)  # (T, E, D) -> (T, D)
