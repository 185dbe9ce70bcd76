"""Gaussian diffusion schedules and the closed-form Gaussian terms of the variational bound.

Everything is computed in float64 (as DiT / improved-DDPM do in numpy) and cast when gathered.
References: Ho et al. 2020 (DDPM, eq. 6-7 posterior), Nichol & Dhariwal 2021 (improved DDPM:
learned-range variance, hybrid loss, cosine schedule, timestep respacing), Peebles & Xie 2023 (DiT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from racedit.diffusion.config import DiffusionConfig


def make_betas(cfg: DiffusionConfig) -> Tensor:
    """(T,) float64 betas: DiT's linear schedule, or improved DDPM's cosine schedule (max beta 0.999).

    Linear, as DiT (and improved DDPM) extend Ho et al.'s schedule to any T: ``beta_start`` and
    ``beta_end`` are the values at T = 1000 and both scale by 1000 / T, so abar_T stays about the same
    (the chain ends near pure noise) whatever the number of steps."""
    T = cfg.num_timesteps
    if cfg.beta_schedule == "linear":
        scale = 1000 / T
        if scale * cfg.beta_end >= 1.0:
            raise ValueError(
                f"diffusion.num_timesteps={T} is too small for the linear schedule: beta_end "
                f"{cfg.beta_end} x 1000/T = {scale * cfg.beta_end:g} must stay below 1 "
                f"(use num_timesteps >= {math.floor(1000 * cfg.beta_end) + 1})"
            )
        return torch.linspace(scale * cfg.beta_start, scale * cfg.beta_end, T, dtype=torch.float64)

    def alpha_bar(s: float) -> float:  # improved DDPM eq. 17, s = 0.008
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass(frozen=True)
class GaussianSchedule:
    """All per-step constants of a (possibly respaced) DDPM, float64, shape (T,)."""

    betas: Tensor
    alphas_cumprod: Tensor  # abar_t
    alphas_cumprod_prev: Tensor  # abar_{t-1}, with abar_{-1} = 1
    posterior_variance: Tensor  # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    posterior_log_variance_clipped: Tensor  # log beta~_t, with beta~_0 replaced by beta~_1 (it is 0)
    posterior_mean_coef1: Tensor  # coefficient of x0 in the posterior mean
    posterior_mean_coef2: Tensor  # coefficient of x_t in the posterior mean

    @classmethod
    def from_betas(cls, betas: Tensor) -> GaussianSchedule:
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, dim=0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        post_logvar = (
            torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(betas) > 1 else post_var.log()
        )
        return cls(
            betas=betas,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_logvar,
            posterior_mean_coef1=betas * acp_prev.sqrt() / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
        )

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def respaced(self, timesteps: list[int]) -> GaussianSchedule:
        """The schedule that visits only ``timesteps`` (increasing), keeping abar at those steps
        (improved DDPM section 4: beta_i = 1 - abar_{t_i} / abar_{t_{i-1}})."""
        return GaussianSchedule.from_betas(respaced_betas(self.alphas_cumprod, timesteps))


def respaced_betas(alphas_cumprod: Tensor, timesteps: list[int]) -> Tensor:
    """(len(timesteps),) float64 betas of the respaced chain."""
    acp = alphas_cumprod.to(torch.float64)[torch.as_tensor(sorted(timesteps))]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    return 1.0 - acp / prev


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """Which of the original steps a respaced sampler visits, as improved DDPM / DiT define it.

    ``"250"`` (DiT's sampling setting): 250 steps evenly strided with a fractional stride over
    [0, T-1], rounded. ``"ddim50"``: the integer stride T/50 from 0 (DDIM's "leading" spacing).
    ``"10,15,20"``: split [0, T) into 3 equal sections and take 10, 15, 20 steps from them.
    Returns the sorted list of kept steps.
    """
    spacing = str(spacing)
    if spacing.startswith("ddim"):
        count = int(spacing[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(
            f"cannot take exactly {count} DDIM steps with an integer stride from {num_timesteps}"
        )
    counts = [int(c) for c in spacing.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    taken: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        if count < 1:
            raise ValueError(f"each section needs at least one step, got {spacing!r}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        taken += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(taken))


# --------------------------------------------------------------------------- VB terms


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Phi(x) used by improved DDPM / DiT (kept for bit-compatible losses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(means, e^{2 log_scales}), elementwise
    (DDPM section 3.3 decoder; the edge bins extend to +-infinity). Nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def gather(arr: Tensor, t: Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """arr (T,) float64, t (B,) integer steps -> (B, 1, ..., 1) with ``ndim`` dims, on t's device."""
    out = arr.to(t.device)[t.long()].to(dtype)
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))
