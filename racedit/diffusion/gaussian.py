"""DiT's Gaussian diffusion objective: epsilon prediction with learned-range sigma and the hybrid loss.

Hybrid loss (improved DDPM section 3.1, as DiT trains): ``L = mse(eps, eps_hat) + vb_weight * L_vb``
where ``L_vb`` is the per-step term of the variational bound (KL between the true posterior
q(x_{t-1}|x_t,x0) and the model's p(x_{t-1}|x_t), in bits per dimension; at t = 0 the discretised
Gaussian decoder NLL) computed with the mean **detached** (a stop-gradient on eps_hat), so the VB
term trains only the sigma channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from racedit.diffusion.config import DiffusionConfig
from racedit.diffusion.objective import LossOutput, Objective, mean_flat
from racedit.diffusion.schedule import (
    GaussianSchedule,
    discretized_gaussian_log_likelihood,
    gather,
    make_betas,
    normal_kl,
)
from racedit.interfaces import ForwardAux


class GaussianDiffusion(Objective):
    kind = "ddpm"
    samplers = ("ddpm", "ddim", "dpm++")

    def __init__(self, cfg: DiffusionConfig, learn_sigma: bool):
        super().__init__(cfg, learn_sigma)
        self.schedule = GaussianSchedule.from_betas(make_betas(cfg))

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    # ------------------------------------------------------------------ forward process

    def sample_t(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; all (B, C, H, W), t (B,)."""
        acp = gather(self.schedule.alphas_cumprod, t, x0.ndim, x0.dtype)
        return acp.sqrt() * x0 + (1.0 - acp).sqrt() * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        acp = gather(self.schedule.alphas_cumprod, t, x_t.ndim, x_t.dtype)
        return (x_t - (1.0 - acp).sqrt() * eps) / acp.sqrt()

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0) (DDPM eq. 6-7)."""
        s, n = self.schedule, x_t.ndim
        mean = (
            gather(s.posterior_mean_coef1, t, n, x_t.dtype) * x0
            + gather(s.posterior_mean_coef2, t, n, x_t.dtype) * x_t
        )
        return mean, gather(s.posterior_log_variance_clipped, t, n, x_t.dtype)

    def model_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """Learned-range log-variance: interpolate log beta~_t and log beta_t by frac = (v + 1) / 2."""
        min_log = gather(self.schedule.posterior_log_variance_clipped, t, v.ndim, v.dtype)
        max_log = gather(self.schedule.betas.log(), t, v.ndim, v.dtype)
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def vb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, v: Tensor) -> Tensor:
        """(B,) the VB term in bits/dim for model prediction ``eps`` and variance output ``v``."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        model_mean, _ = self.q_posterior(self.predict_x0(x_t, t, eps), x_t, t)
        model_logvar = self.model_log_variance(v, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ loss

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
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.model_time(t), y, aux=aux)  # (B, C or 2C, H, W)
        expected = 2 * C if self.learn_sigma else C
        if out.shape[1] != expected:
            raise ValueError(
                f"the model outputs {out.shape[1]} channels for {C}-channel data; the ddpm objective with "
                f"learn_sigma={self.learn_sigma} expects {expected} (set model.learn_sigma to match)"
            )
        eps_hat = out[:, :C]
        terms = {"mse": mean_flat((noise - eps_hat.float()) ** 2)}
        loss = terms["mse"]
        if self.learn_sigma:
            # Stop-gradient on the mean: the VB term only trains the sigma channels (improved DDPM 3.1).
            terms["vb"] = self.vb_terms(
                x0.float(), x_t.float(), t, eps_hat.detach().float(), out[:, C:].float()
            )
            loss = loss + self.cfg.vb_weight * terms["vb"]
        return LossOutput(loss=loss, terms=terms, target=noise, t=t, prediction=eps_hat)

    # ------------------------------------------------------------------ sampling conventions

    def model_time(self, t: Tensor) -> Tensor:
        return t.float()

    def normalized_time(self, t_model: float) -> float:
        return float(t_model) / self.num_timesteps
