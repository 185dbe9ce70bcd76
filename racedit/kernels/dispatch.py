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


def race_plan(
    scores: Tensor,
    k_total: int | None = None,
    tau: Tensor | None = None,
    ties: str = "index",
    impl: Impl = "auto",
) -> RoutePlan:
    """Expert race over all T*E scores at once, fused with the layout (kernels.md).

    scores (T, E) are the gated router scores G(s): selection and gate values use the same numbers.
    Training: ``k_total`` = K = k*T, exact top-K over the flattened scores (ties: lowest flat index
    t*E+e, or keep all ties); the plan's ``kth`` is the K-th largest score. Inference: ``tau``
    (scalar tensor), select ``scores >= tau``.
    """
    if (k_total is None) == (tau is None):
        raise ValueError("race_plan takes exactly one of k_total (training) or tau (inference)")
    if tau is not None:
        plan = reference.plan_from_mask(scores >= tau, scores)
        return plan
    from racedit.routing.topk import topk_mask

    mask, kth = topk_mask(scores.reshape(1, -1), k_total, ties)
    plan = reference.plan_from_mask(mask.view_as(scores), scores)
    plan.kth = kth[0]
    return plan


def expert_ffn(
    x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, impl: Impl = "auto"
) -> Tensor:
    """Gate-weighted sum of the selected experts' outputs per token: (T, D) -> (T, D)."""
    return reference.expert_ffn(x, plan, w1, b1, w2, b2)
