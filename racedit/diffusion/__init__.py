"""Diffusion objectives: DiT's Gaussian diffusion (DDPM, learned sigma, hybrid loss) and flow matching.

``build_objective(cfg, learn_sigma)`` returns an ``Objective``; ``objective.training_loss(model, x0, y)``
returns a ``LossOutput`` whose ``target`` is what the per-layer regularization predicts.
"""

from racedit.diffusion.config import DiffusionConfig
from racedit.diffusion.flow import FlowMatching
from racedit.diffusion.gaussian import GaussianDiffusion
from racedit.diffusion.objective import LossOutput, Objective, mean_flat
from racedit.diffusion.schedule import GaussianSchedule, make_betas, space_timesteps


def build_objective(cfg: DiffusionConfig | None = None, learn_sigma: bool = True) -> Objective:
    """The objective a ``DiffusionConfig`` names, for a model with (``learn_sigma``) or without sigma
    channels. Flow matching ignores sigma channels."""
    cfg = cfg if cfg is not None else DiffusionConfig()
    if cfg.objective == "ddpm":
        return GaussianDiffusion(cfg, learn_sigma)
    if cfg.objective == "flow":
        return FlowMatching(cfg, learn_sigma)
    raise ValueError(f"unknown diffusion objective {cfg.objective!r}; expected 'ddpm' or 'flow'")


__all__ = [
    "DiffusionConfig",
    "FlowMatching",
    "GaussianDiffusion",
    "GaussianSchedule",
    "LossOutput",
    "Objective",
    "build_objective",
    "make_betas",
    "mean_flat",
    "space_timesteps",
]
