"""The interface every training objective implements, and what its loss returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from racedit.diffusion.config import DiffusionConfig
from racedit.interfaces import ForwardAux


@dataclass
class LossOutput:
    """``loss``: scalar (batch mean) from ``training_loss``, (B,) from ``per_sample_losses``.
    ``terms``: named parts of the loss, same reduction as ``loss`` ("mse", and "vb" for learned sigma).
    ``target``: (B, C, H, W) the regression target (epsilon for ddpm, velocity for flow; never sigma).
    ``t``: (B,) the objective's own time of each sample (integer steps for ddpm, [0, 1] for flow)."""

    loss: Tensor
    terms: dict[str, Tensor]
    target: Tensor
    t: Tensor
    prediction: Tensor | None = None  # (B, C, H, W) the model's prediction of ``target``

    def mean(self) -> LossOutput:
        return LossOutput(
            loss=self.loss.mean(),
            terms={k: v.mean() for k, v in self.terms.items()},
            target=self.target,
            t=self.t,
            prediction=self.prediction,
        )


def mean_flat(x: Tensor) -> Tensor:
    """(B, ...) -> (B,) mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class Objective(ABC):
    """A diffusion training objective and the time conventions samplers need.

    ``kind``: "ddpm" or "flow". ``samplers``: names of the samplers that fit it (first is default).
    """

    kind: str
    samplers: tuple[str, ...]

    def __init__(self, cfg: DiffusionConfig, learn_sigma: bool):
        self.cfg = cfg
        self.learn_sigma = learn_sigma

    # ------------------------------------------------------------------ training

    @abstractmethod
    def sample_t(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """(B,) training times in the objective's own units."""

    @abstractmethod
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
        """Losses per sample, (B,): for logging the loss by timestep, or weighting. ``t`` and ``noise``
        default to fresh draws (from ``generator`` when given)."""

    def training_loss(
        self,
        model: nn.Module,
        x0: Tensor,
        y: Tensor,
        aux: ForwardAux | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The batch-mean loss of ``model`` on clean data ``x0`` (B, C, H, W) with labels ``y`` (B,)."""
        return self.per_sample_losses(model, x0, y, aux=aux, generator=generator).mean()

    # ------------------------------------------------------------------ sampling conventions

    @abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """Objective time -> the float timesteps the model is fed."""

    @abstractmethod
    def normalized_time(self, t_model: float) -> float:
        """A model timestep -> noise level in [0, 1] (0 = data, 1 = noise); guidance intervals use it."""

    def prediction(self, out: Tensor, channels: int) -> Tensor:
        """The regression-target part of a model output (drops learned-sigma channels)."""
        return out[:, :channels]

    # ------------------------------------------------------------------ helpers

    def _draws(
        self, x0: Tensor, generator: torch.Generator | None, t: Tensor | None, noise: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The training times (B,) and noise like x0, each drawn fresh unless given (t first, then noise)."""
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = self._randn_like(x0, generator)
        return t, noise

    @staticmethod
    def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
        if generator is None:
            return torch.randn_like(x)
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)

    def describe(self) -> str:
        return f"{self.kind} objective ({'learned' if self.learn_sigma else 'fixed'} sigma)"
