"""Samples drawn while a model trains: the labelled grids, the time budget's cost probe, the demo report.

``Preview(sample_cfg, objective, dataset, num_classes, device)`` holds what every such sample needs: the
run's ``sample:`` settings (sampler, steps, guidance, seeds, batch size), the objective, and the decoder
from the model's space to images (identity for pixel data; for latent data the VAE the dataset was
encoded with, loaded on first use, so a run whose grids are off never needs it). Sampling forks the RNG:
the training streams are untouched, and the same step gives the same grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from racedit.config.core import ConfigError
from racedit.sampling.generate import generate
from racedit.sampling.grid import save_grid
from racedit.vae import DEFAULT_SCALING, DEFAULT_VAE, VAEError, decoder, load_vae


class Preview:
    """Samples of a training run's model with the run's ``sample:`` settings (a ``SampleConfig``)."""

    def __init__(self, sample_cfg: Any, objective: Any, dataset: Any, num_classes: int, device: torch.device):
        self.cfg = sample_cfg
        self.objective = objective
        self.dataset = dataset
        self.num_classes = num_classes
        self.device = device
        self.decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # loaded by decoder() on first use

    def class_names(self) -> list[str] | None:
        names = getattr(self.dataset, "class_names", None)
        return list(names) if names is not None else None

    def caption_names(self) -> list[str] | None:
        """Names for grid captions; None when a name is just the label (digits), so tiles read "3", not "3 3"."""
        names = self.class_names()
        return None if names is None or names == [str(i) for i in range(len(names))] else names

    def decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Model space -> images in [-1, 1]: None (identity) for pixel data, else the dataset's VAE with the
        scale and shift the latents were stored with; raises ``VAEError`` when the VAE cannot be loaded."""
        if getattr(self.dataset, "space", "pixel") == "pixel":
            return None
        if self.decode is None:
            meta = getattr(self.dataset, "meta", {}) or {}
            vae = load_vae(
                meta.get("vae", DEFAULT_VAE), device=self.device, subfolder=meta.get("vae_subfolder")
            )
            shift = meta.get("shift_factor")  # None: the VAE config's
            self.decode = decoder(vae, float(meta.get("scaling_factor", DEFAULT_SCALING)), shift)
        return self.decode

    def images(
        self, model: torch.nn.Module, labels: list[int], seed: int, steps: int | None = None
    ) -> torch.Tensor:
        """uint8 (N, H, W, 3) samples of ``labels`` with fixed per-sample seeds (training RNG untouched);
        ``steps`` overrides ``sample.steps`` (the time budget's cost probe)."""
        sc = self.cfg
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return generate(
                model,
                labels,
                objective=self.objective,
                sampler=sc.sampler or self.objective.samplers[0],
                steps=steps or sc.steps,
                cfg_scale=sc.cfg_scale,
                guidance_halves=sc.cfg_halves,
                seed=seed,
                decode=self.decoder(),
                batch_size=sc.batch_size,
            )

    def grid_labels(self) -> list[int]:
        """``sample.classes``, each repeated ``sample.per_class`` times; a class the data lacks is an error."""
        sc, n = self.cfg, self.num_classes
        bad = [c for c in sc.classes if not 0 <= c < n]
        if bad:
            raise ConfigError(f"sample.classes {bad} are not classes of this dataset (0..{n - 1})")
        return [c for c in sc.classes for _ in range(sc.per_class)]

    def write_grid(
        self, model: torch.nn.Module, path: Path, log: Callable[[str], None], write: bool = True
    ) -> Path | None:
        """A labelled grid (one row per class when ``sample.per_class`` > 1) at ``path``; None, with a line
        through ``log``, when the VAE is unavailable (training goes on without its grids). ``write=False``
        samples the same images and writes nothing (the other processes of a sharded model's lockstep)."""
        labels = self.grid_labels()
        try:
            images = self.images(model, labels, self.cfg.seed)
        except VAEError as err:  # e.g. the VAE weights are missing offline
            log(f"sample grid skipped: {err}")
            return None
        if not write:
            return None
        nrow = self.cfg.per_class if self.cfg.per_class > 1 else None
        return save_grid(images, labels, self.caption_names(), path, nrow=nrow)
