"""Configuration of a run's data (the ``data:`` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Which dataset a run trains on.

    ``kind: digits`` is the embedded demo (scikit-learn's 8x8 handwritten digits, pixel space);
    ``kind: latents`` reads the VAE latent shards in ``root`` written by ``racedit-extract extract``.
    """

    kind: Literal["digits", "latents"] = "digits"
    root: str | None = None  # latents: shard directory (racedit-extract extract --out)
    num_workers: int = 0  # DataLoader worker processes
    image_size: int = 8  # digits: side in pixels (8 = native; larger is a bilinear upscale)
    held_out_fraction: float = 0.2  # digits: stratified share of each class in the "heldout" split
    split_seed: int = 0  # digits: seed of the train/heldout split
    flip: bool | None = None  # random horizontal flip; None = the dataset's default (latents on, digits off)
    sample_posterior: bool = True  # latents: draw mean + std * noise (off: the posterior mean)
    seed: int = 0  # latents: seed of the per-item noise/flip draws (with epoch and index)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be >= 1, got {self.image_size}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"data.held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")
