"""AdamW with its implementation chosen per device: one fused kernel, multi-tensor ``foreach``, or the
per-parameter loop. All three compute the same update (``torch.optim.AdamW``'s math; they differ only in
rounding order, tested in tests/training/test_optim.py); they differ a lot in speed, because a MoE model
has many more parameter tensors than the dense model whose FLOPs it matches.

``train.optimizer_impl: auto`` takes the implementation measured fastest for the device type
(``MEASURED_FASTEST``, from ``python -m bench.optimizer``, which times the three side by side on the real
parameter sets of DiT-S/2 and RaceDiT-S/2-2in8); a device type without a measurement gets ``foreach``
where PyTorch has multi-tensor kernels for it, else the loop. The trainer logs the choice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

AdamWImpl = Literal["auto", "fused", "foreach", "for-loop"]
ADAMW_IMPLS: tuple[str, ...] = ("auto", "fused", "foreach", "for-loop")

# device type -> fastest implementation measured by ``python -m bench.optimizer``.
# CPU (2-core Xeon, torch 2.14, one thread): fused 0.30x the loop's time on RaceDiT-S/2-2in8's parameters
# (0.34x on DiT-S/2's), foreach 1.05-1.09x (it batches kernel launches, which a CPU does not need). CUDA: fused is
# PyTorch's own recommendation and the fastest in its benchmarks; not measured by us yet (bench/gpu.py).
MEASURED_FASTEST: dict[str, str] = {"cpu": "fused", "cuda": "fused"}


def resolve_adamw_impl(impl: str, device: torch.device | str) -> str:
    """The concrete implementation ("fused" | "foreach" | "for-loop") that ``impl`` means on ``device``."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"optimizer implementation must be one of {ADAMW_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    kind = torch.device(device).type
    if kind in MEASURED_FASTEST:
        return MEASURED_FASTEST[kind]
    from torch.optim.optimizer import _get_foreach_kernels_supported_devices

    return "foreach" if kind in _get_foreach_kernels_supported_devices() else "for-loop"


def build_adamw(
    param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    impl: str = "auto",
    device: torch.device | str = "cpu",
) -> tuple[torch.optim.AdamW, str]:
    """``torch.optim.AdamW`` with the implementation ``impl`` resolves to on ``device``; returns it and the
    resolved name (for the run log). Exactly one of fused/foreach is set, so PyTorch never picks silently."""
    chosen = resolve_adamw_impl(impl, device)
    flags = {"fused": chosen == "fused", "foreach": chosen == "foreach"}
    optimizer = torch.optim.AdamW(
        param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flags
    )
    return optimizer, chosen


def keep_impl(optimizer: torch.optim.Optimizer, chosen: str) -> None:
    """Re-apply ``chosen`` after ``optimizer.load_state_dict``: a state dict carries the fused/foreach flags
    of the run that saved it, and loading it would otherwise switch this run's implementation silently."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = chosen == "fused", chosen == "foreach"


__all__ = ["ADAMW_IMPLS", "MEASURED_FASTEST", "AdamWImpl", "build_adamw", "keep_impl", "resolve_adamw_impl"]
