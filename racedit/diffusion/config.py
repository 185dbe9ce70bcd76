"""Configuration of the diffusion objective (docs/spec/race-dit.md section 8: both DiT's DDPM and SiT-style flow).

Time conventions (one direction for both objectives, so a checkpoint's timestep embedding always
means "more noise" for larger t):
- ``ddpm``: integer steps t in {0, ..., num_timesteps-1}; ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``;
  the model sees t as is (DiT's convention, ``rescale_timesteps=False``).
- ``flow``: continuous t in [0, 1], **t = 0 is data, t = 1 is noise**; ``x_t = (1-t) x0 + t eps``;
  the regression target is the velocity ``v = dx_t/dt = eps - x0``; the model sees ``t * 1000``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Objective = Literal["ddpm", "flow"]


@dataclass
class DiffusionConfig:
    objective: Objective = "ddpm"
    # --- Gaussian diffusion (DDPM; DiT's recipe) ---------------------------------------------
    num_timesteps: int = 1000  # T
    beta_schedule: Literal["linear", "cosine"] = "linear"  # linear = DiT; cosine = improved DDPM
    beta_start: float = 1e-4  # linear schedule: beta_0 at T = 1000 (scaled by 1000/T, as DiT)
    beta_end: float = 0.02  # linear schedule: beta_{T-1} at T = 1000 (scaled by 1000/T)
    vb_weight: float = 1.0  # hybrid loss = mse + vb_weight * vb (DiT: 1 with T = 1000)
    fixed_variance: Literal["large", "small"] = "large"  # sampling variance when the model has no sigma
    # --- flow matching (SiT-style linear interpolant, velocity prediction) ---------------------
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"  # training distribution of t
    logit_mean: float = 0.0  # logit-normal: t = sigmoid(N(logit_mean, logit_std^2)) (SD3)
    logit_std: float = 1.0
    time_scale: float = 1000.0  # flow: the model is fed t * time_scale

    def __post_init__(self) -> None:
        if self.objective not in ("ddpm", "flow"):
            raise ValueError(f"diffusion.objective must be 'ddpm' or 'flow', got {self.objective!r}")
        if self.num_timesteps < 2:
            raise ValueError(f"diffusion.num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                "diffusion needs 0 < beta_start < beta_end < 1, "
                f"got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if self.vb_weight < 0:
            raise ValueError(f"diffusion.vb_weight must be >= 0, got {self.vb_weight}")
        if self.logit_std <= 0:
            raise ValueError(f"diffusion.logit_std must be > 0, got {self.logit_std}")
        if self.time_scale <= 0:
            raise ValueError(f"diffusion.time_scale must be > 0, got {self.time_scale}")
