"""The one switch between the Triton kernels and the PyTorch reference (docs/spec/kernels.md, design.md).

Callers (the MoE layer, through its routing strategy) use only these functions. Two kinds of work, two
choices of implementation:
- the routing layout (``race_plan``, ``plan_from_mask``) takes a ``RoutingImpl``:
  ``"auto"`` (Triton for CUDA tensors when Triton is importable, the reference otherwise), ``"torch"``
  (the PyTorch reference, ``reference.py``, on any device) or ``"triton"`` (the Triton kernels: CUDA
  tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- the expert computation (``expert_ffn``) takes an ``ExpertImpl``: the same three, or ``"grouped_mm"``
  (``torch._grouped_mm`` GEMMs, ``grouped_mm.py``). It has no routing counterpart, and a routing call
  refuses it; ``MoEConfig.routing_impl`` says which routing kernels a layer with ``impl="grouped_mm"`` uses.
  On CPU ``"auto"`` runs the reference: a one-autograd-node CPU variant (hand-written backward, weight
  gradients filled in place) was measured and dropped, as it ran slower at RaceDiT-S/2's shapes (train
  step 1.23x dense against the reference's 1.17x, `python -m bench.train_step --hidden-size 384 --depth 12
  --input-size 32 --batch-size 8`). Remeasured once freed host memory stayed in the process (which removed
  its page faults), it was still slower there (1.23x against 1.19x over 21 rounds), though faster at the
  demo's shapes (1.31x against 1.35x) and in the layer alone, with less peak memory (README, performance).

Under ``torch.compile`` (``train.compile=true``) these three functions run eagerly, between compiled graphs
(``torch.compiler.disable``): their shapes follow the data (tokens per expert, a threshold's selection), and
traced, every new pattern of empty or one-token experts was one more recompile (dynamo specialises sizes 0
and 1), past the recompile limit within a few steps of a 12-layer Race-DiT. The expert GEMMs gain nothing
from the compiler; the router, the gating and the rest of the block stay compiled.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Literal, get_args

import torch
from torch import Tensor

from racedit.kernels import reference
from racedit.kernels.reference import RoutePlan, Ties

RoutingImpl = Literal["auto", "torch", "triton"]
ExpertImpl = Literal["auto", "torch", "triton", "grouped_mm"]
ROUTING_IMPLS: tuple[str, ...] = get_args(RoutingImpl)
EXPERT_IMPLS: tuple[str, ...] = get_args(ExpertImpl)


def check_routing_impl(impl: str) -> None:
    if impl == "grouped_mm":
        raise ValueError(
            "impl='grouped_mm' selects torch._grouped_mm for the expert GEMMs; it has no routing kernel. "
            f"Route with one of {ROUTING_IMPLS}"
        )
    if impl not in ROUTING_IMPLS:
        raise ValueError(f"routing impl must be one of {ROUTING_IMPLS}, got {impl!r}")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: Tensor, impl: RoutingImpl) -> bool:
    """Whether ``impl`` sends work on ``t``'s device to the Triton kernels (raises on impossible asks)."""
    check_routing_impl(impl)
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(
                "impl='triton' but triton is not installed; use impl='torch' or install triton"
            )
        if not t.is_cuda and not interpreting():
            raise RuntimeError(
                f"impl='triton' got {t.device.type} tensors: Triton runs on CUDA, or on CPU only with "
                "TRITON_INTERPRET=1 set before racedit.kernels is imported; use impl='torch' on CPU"
            )
        return True
    return t.is_cuda and triton_available()


def on_device(t: Tensor):
    """Triton launches on the current CUDA device and stream, not on its tensors' device: make ``t``'s device
    current for the launch (a ``sample.py --device cuda:1`` process never calls ``set_device``)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.compiler.disable  # data-dependent shapes: eager under torch.compile (module docstring)
def plan_from_mask(mask: Tensor, gates: Tensor, impl: RoutingImpl = "auto") -> RoutePlan:
    """Sorted (expert-major) layout of any strategy's selection mask (T, E); gates (T, E) per pair."""
    if use_triton(gates, impl):
        from racedit.kernels.triton_routing import build_plan

        with on_device(gates):
            return build_plan(gates, mask=mask)
    return reference.plan_from_mask(mask, gates)


@torch.compiler.disable  # data-dependent shapes: eager under torch.compile (module docstring)
def race_plan(
    scores: Tensor,
    k_total: int | None = None,
    tau: Tensor | float | None = None,
    ties: Ties = "index",
    impl: RoutingImpl = "auto",
) -> RoutePlan:
    """Expert race over all T*E scores at once, fused with the layout (docs/spec/kernels.md).

    scores (T, E) are the gated router scores G(s): selection and gate values use the same numbers.
    Training: ``k_total`` = K = k*T, exact top-K over the flattened scores (ties: lowest flat index
    t*E+e, or keep all ties); the plan's ``kth`` is the K-th largest score. Inference: ``tau``
    (scalar), select ``scores >= tau`` (compared in fp32). NaN scores raise ValueError (on CUDA the
    exact-K path raises asynchronously, at the next synchronisation, to avoid a host sync).
    """
    if (k_total is None) == (tau is None):
        raise ValueError("race_plan takes exactly one of k_total (training) or tau (inference)")
    if use_triton(scores, impl):
        from racedit.kernels.triton_routing import build_plan

        with on_device(scores):
            return build_plan(scores, k_total=k_total, tau=tau, ties=ties)
    return reference.race_plan(scores, k_total=k_total, tau=tau, ties=ties)


@torch.compiler.disable  # data-dependent shapes: eager under torch.compile (module docstring)
def expert_ffn(
    x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, impl: ExpertImpl = "auto"
) -> Tensor:
    """Gate-weighted sum of the selected experts' outputs per token: x (T, D) -> (T, D).

    w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D); the expert is GELU_tanh(x w1 + b1) w2 + b2.

    Under autocast the experts compute in the autocast dtype whatever the implementation, as a dense MLP's
    ``nn.Linear`` layers do: x is cast first (differentiably; its gradient comes back in its own dtype), and
    every implementation computes in x's dtype. Without the cast the Triton kernels and ``torch._grouped_mm``,
    which autocast does not know, would run in float32 (the block hands the MLP slot LayerNorm's float32
    output), where the reference's per-expert ``addmm`` already ran in bf16.
    """
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert impl must be one of {EXPERT_IMPLS}, got {impl!r}")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if impl == "grouped_mm" and x.is_cuda and x.dtype != torch.bfloat16:
        # torch._grouped_mm takes only bf16 on CUDA; a run that trains with it under bf16 autocast still has
        # float32 forwards (preview grids and sampling without autocast): those run the device's default
        warnings.warn(
            f"impl='grouped_mm' needs bf16 on CUDA; this {x.dtype} forward runs impl='auto' (Triton)",
            stacklevel=2,
        )
        impl = "auto"
    if impl == "grouped_mm":
        from racedit.kernels import grouped_mm

        return grouped_mm.expert_ffn(x, plan, w1, b1, w2, b2)
    if use_triton(x, impl):
        from racedit.kernels import triton_experts

        with on_device(x):
            return triton_experts.expert_ffn(x, plan, w1, b1, w2, b2)
    return reference.expert_ffn(x, plan, w1, b1, w2, b2)
