"""Exponential moving average of a model's weights and floating buffers, kept in fp32.

``ema <- decay * ema + (1 - decay) * live`` for every parameter and every floating-point buffer.
Integer buffers (e.g. a threshold's update counter) are copied.

The routing thresholds ``tau`` are floating buffers, so the EMA model's tau is the EMA of the live tau at
the same decay as its weights. This is the threshold that matches the EMA router: tau tracks the K-th
router score, a function of the router weights, and the EMA weights are the live weights averaged over
~1/(1 - decay) steps, so to first order their K-th score is the same average of the live tau. Copying
the live tau instead would pair weights that lag by ~1/(1 - decay) steps (10^4 at 0.9999) with the
threshold of the current weights. One exception: a threshold the EMA model has never seen set (its
``updates`` counter is 0) takes the live value at once instead of averaging up from its placeholder 0,
which would make an early EMA model route far too many experts.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from racedit.training.sharded import local


class EMA:
    """Holds an fp32 copy of ``model`` (eval mode, no gradients) and updates it in place."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step ``step`` (0-based)."""
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        live_params = dict(model.named_parameters())
        ema_f, live_f = [], []
        for name, p in self.model.named_parameters():  # sharded (FSDP): the local shards, no DTensor ops
            ema_f.append(local(p))
            live_f.append(local(live_params[name]).float())  # no_grad: nothing to detach from
        live_buffers = dict(model.named_buffers())
        unset = {  # threshold module -> whether the EMA model has not received its threshold yet (on device)
            name.removesuffix("updates"): b == 0
            for name, b in self.model.named_buffers()
            if name.endswith("threshold.updates")
        }
        for name, b in self.model.named_buffers():
            src = live_buffers[name].detach()
            module = name.removesuffix("tau")
            if b.is_floating_point() and name.endswith("tau") and module in unset:
                # the live value where unset, else the EMA; chosen on the device (no host sync per layer)
                live = src.float()
                b.copy_(torch.where(unset[module], live, torch.lerp(b, live, 1.0 - decay)))
            elif b.is_floating_point():
                ema_f.append(b)
                live_f.append(src.float())
            else:
                b.copy_(src)
        torch._foreach_lerp_(ema_f, live_f, 1.0 - decay)  # e + (1 - decay) * (p - e)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
