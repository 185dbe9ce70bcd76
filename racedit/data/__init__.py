"""Datasets: VAE latent shards (``LatentDataset``, made by ``racedit-extract``) and the demo digits.

``build_dataset(cfg, split)`` is the one entry point the trainer uses. Every dataset yields
``(x float32 (C, H, W), y int)`` and has ``num_classes``, ``class_names``, ``sample_shape`` (C, H, W),
``space`` ("pixel" or "latent"), ``meta`` and ``set_epoch(epoch)``.
"""

from __future__ import annotations

import torch

from racedit.data.config import DataConfig
from racedit.data.digits import DigitsDataset
from racedit.data.format import LatentFormatError, extract_hint
from racedit.data.latents import LatentDataset


def build_dataset(cfg: DataConfig, split: str = "train") -> torch.utils.data.Dataset:
    """The dataset ``cfg`` describes. ``split``: "train", "heldout" (digits only) or "all"."""
    if cfg.kind == "digits":
        if cfg.flip:
            raise ValueError(
                "data.flip=true is not allowed for the digits dataset: a mirrored digit is a different "
                "digit. Leave data.flip unset (null) or false."
            )
        return DigitsDataset(
            split=split,
            image_size=cfg.image_size,
            held_out_fraction=cfg.held_out_fraction,
            split_seed=cfg.split_seed,
        )
    if cfg.kind == "latents":
        if cfg.root is None:
            raise LatentFormatError(
                "data.root is not set; point it at a latent directory made by:\n  " + extract_hint("<dir>")
            )
        if split not in ("train", "all"):
            raise ValueError(
                f"latent datasets have no '{split}' split (only 'train' = 'all'); "
                "extract a separate image folder for held-out data"
            )
        return LatentDataset(
            cfg.root,
            seed=cfg.seed,
            flip=True if cfg.flip is None else cfg.flip,
            sample_posterior=cfg.sample_posterior,
        )
    raise ValueError(f"unknown data.kind {cfg.kind!r}; use 'digits' or 'latents'")


__all__ = ["DataConfig", "DigitsDataset", "LatentDataset", "LatentFormatError", "build_dataset"]
