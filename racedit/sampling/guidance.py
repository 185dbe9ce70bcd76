"""Classifier-free guidance (Ho & Salimans 2022) as DiT applies it, with the options peers lack.

``pred = uncond + s * (cond - uncond)`` on the prediction channels, from one batched forward of
``[x, x]`` with labels ``[y, null]``. Options: all prediction channels (default) or the first k (DiT's
``forward_with_cfg`` guides 3 of the 4 latent channels; ``channels=3`` reproduces its numbers); a
guidance interval [lo, hi] in noise level (0 = data, 1 = noise; Kynkaanniemi et al. 2024) outside
which the conditional prediction is used alone; scale 1 (or outside the interval) runs a single
conditional forward. Learned-sigma channels always come from the conditional pass.

Halves (``halves``): "joint" (default) runs the conditional and unconditional halves as one forward of
2B samples, DiT's ``forward_with_cfg`` protocol, under which published numbers were measured; "separate"
runs two forwards of B. They differ only for routing that ranks across the batch (BL, BE, expert race
with top-K at eval; see ``racedit.moe.layer.inference_batch_dependence``): jointly, the unconditional
copies compete with the conditional ones for the same experts; separately, the conditional half routes
exactly as unguided sampling of the same batch would. With the default threshold routing, or any
per-sample router, both give the same result up to float rounding, and joint is one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Guidance:
    scale: float = 1.0
    interval: tuple[float, float] | None = None  # noise levels [lo, hi] where guidance is applied
    channels: Literal["all"] | int = "all"  # guide all prediction channels, or only the first k
    halves: Literal["joint", "separate"] = "joint"  # one forward of [cond; uncond], or two forwards

    def __post_init__(self) -> None:
        if self.interval is not None:
            lo, hi = self.interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {self.interval}")
        if self.channels != "all" and (not isinstance(self.channels, int) or self.channels < 1):
            raise ValueError(f"guidance channels must be 'all' or a positive int, got {self.channels!r}")
        if self.halves not in ("joint", "separate"):
            raise ValueError(f"guidance halves must be 'joint' or 'separate', got {self.halves!r}")

    def active(self, noise_level: float) -> bool:
        """Whether guidance changes the prediction at this noise level (0 = data, 1 = noise)."""
        if self.scale == 1.0:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo <= noise_level <= hi


def null_label(model: nn.Module) -> int:
    """The label id of the unconditional ("null") class: ``num_classes``; error if the model has none."""
    arch = model.arch
    table = model.y_embedder.embedding_table.num_embeddings
    if table <= arch.num_classes:
        raise ValueError(
            "this model has no null class (it was built with class_dropout_prob=0), so classifier-free "
            "guidance is impossible; sample with --cfg-scale 1"
        )
    return arch.num_classes


def guided_forward(
    model: nn.Module,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    guidance: Guidance,
    noise_level: float,
    pred_channels: int,
) -> Tensor:
    """x (B, C, H, W), t (B,), y (B,) -> model output (B, out, H, W) with guided prediction channels.

    ``pred_channels`` is C (the regression target's channels; channels beyond it are learned sigma)."""
    if not guidance.active(noise_level):
        return model(x, t, y)
    null = torch.full_like(y, null_label(model))
    if guidance.halves == "joint":
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, out, H, W)
        cond, uncond = out.chunk(2)
    else:
        cond, uncond = model(x, t, y), model(x, t, null)  # (B, out, H, W) each
    k = pred_channels if guidance.channels == "all" else min(int(guidance.channels), pred_channels)
    guided = uncond[:, :k] + guidance.scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)
