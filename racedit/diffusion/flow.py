"""Flow matching with the linear interpolant and velocity prediction (SiT-style; Lipman et al. 2023,
Liu et al. 2023, Ma et al. 2024).

Convention (stated once, used everywhere): **t = 0 is data, t = 1 is noise**,
``x_t = (1 - t) x0 + t eps``, target ``v = d x_t / d t = eps - x0``; sampling integrates from t = 1
to t = 0. The model is fed ``t * time_scale`` (1000 by default, the range of DDPM steps, so DiT's
timestep embedding needs no change). Learned-sigma channels of a model, if any, are ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from racedit.diffusion.objective import LossOutput, Objective, mean_flat
from racedit.interfaces import ForwardAux


class FlowMatching(Objective):
    kind = "flow"
    samplers = ("euler", "heun", "euler-maruyama")

    def sample_t(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        if self.cfg.time_sampling == "uniform":
            t = torch.rand(batch, generator=generator, device=gen_device)
        else:  # logit-normal (Esser et al. 2024, SD3)
            z = torch.randn(batch, generator=generator, device=gen_device)
            t = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        return t.to(device)

    def interpolate(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t eps; x0, noise (B, C, H, W), t (B,)."""
        t = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - t) * x0 + t * noise

    def per_sample_losses(
        self,
        model: nn.Module,
        x0: Tensor,
        y: Tensor,
        aux: ForwardAux | None = None,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> LossOutput:
        C = x0.shape[1]
        t, noise = self._draws(x0, generator, t, noise)
        x_t = self.interpolate(x0, t, noise)
        target = noise - x0  # velocity (B, C, H, W)
        out = model(x_t, self.model_time(t), y, aux=aux)
        if out.shape[1] not in (C, 2 * C):
            raise ValueError(f"the model outputs {out.shape[1]} channels for {C}-channel data (expected {C})")
        v_hat = out[:, :C]
        mse = mean_flat((target - v_hat.float()) ** 2)
        return LossOutput(loss=mse, terms={"mse": mse}, target=target, t=t, prediction=v_hat)

    def model_time(self, t: Tensor) -> Tensor:
        return t.float() * self.cfg.time_scale

    def normalized_time(self, t_model: float) -> float:
        return float(t_model) / self.cfg.time_scale
