"""``LatentDataset``: VAE latents of an image dataset, read from the shards ``racedit-extract`` writes.

Each item is one fresh sample of the stored posterior, as the fast DiT training codes do::

    flip  ~ Bernoulli(0.5)                      pick the stored latent of the image or of its mirror image
    z     = mean[flip] + std[flip] * noise      noise ~ N(0, I), shape (C, h, w)
    x     = (z - shift_factor) * scaling_factor from meta.json (0.18215 and 0 for SD-VAE; racedit.vae.to_latents)

Randomness is a pure function of ``(seed, epoch, index)``: item ``i`` draws from
``numpy.random.default_rng((seed, epoch, i))``. Hence
- any DataLoader worker, any process of a multi-GPU run (Accelerate shards *indices* across
  processes) and any order of access produce the same sample for the same index;
- resuming a run at (epoch, position) reproduces exactly the samples an uninterrupted run would see.
  The trainer calls ``set_epoch(epoch)`` before iterating each epoch (like ``DistributedSampler``);
  the epoch lives in shared memory, so workers see it even with ``persistent_workers=True``.

Shards are memory-mapped lazily in each process that reads them (workers included), so creating
the dataset costs only the header checks and the memory is the page cache's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from racedit.data.format import (
    LatentFormatError,
    SafetensorsHeader,
    check_shard_header,
    load_index,
    load_meta,
    shard_name,
)
from racedit.vae import to_latents


class LatentDataset(torch.utils.data.Dataset):
    """Latent shards as a map-style dataset of ``(latent float32 (C, h, w), label int)``.

    Attributes: ``num_classes``, ``class_names``, ``sample_shape`` (C, h, w), ``space = "latent"``,
    ``meta`` (the metadata dict: ``vae``, ``scaling_factor``, ``shift_factor``, ``resolution``, ...),
    ``labels`` (N,) int64.

    Args:
        root: directory written by ``racedit-extract extract``.
        seed: seed of the posterior noise and flip draws.
        flip: use the stored horizontal flip with probability 0.5 (off: always the image itself).
        sample_posterior: draw ``mean + std * noise``; off: return the posterior mean.
    """

    space = "latent"

    def __init__(
        self, root: str | Path, *, seed: int = 0, flip: bool = True, sample_posterior: bool = True
    ) -> None:
        self.root = Path(root)
        self.meta: dict[str, Any] = load_meta(self.root)
        index = load_index(self.root)
        self.labels: np.ndarray = index["labels"]  # (N,) int64
        counts = index["shard_counts"]  # (S,)
        if len(counts) != self.meta["num_shards"] or len(self.labels) != self.meta["num_images"]:
            raise LatentFormatError(
                f"{self.root}: the index ({len(counts)} shards, {len(self.labels)} images) does not match "
                f"meta.json ({self.meta['num_shards']} shards, {self.meta['num_images']} images); "
                "run `racedit-extract verify` and re-extract"
            )
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S + 1,)
        self.class_names: list[str] = list(self.meta["class_names"])
        self.num_classes = len(self.class_names)
        self.sample_shape: tuple[int, int, int] = tuple(self.meta["latent_shape"])  # (C, h, w)
        self.scaling_factor = float(self.meta["scaling_factor"])
        self.shift_factor = float(self.meta.get("shift_factor") or 0.0)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self.flip = flip
        self.sample_posterior = sample_posterior
        self._paths = [self.root / shard_name(k) for k in range(len(counts))]
        for k, path in enumerate(self._paths):  # headers only: cheap, catches mixed or stale shards
            if not path.is_file():
                raise LatentFormatError(
                    f"shard {path} is missing; the extraction is incomplete or was moved. Rerun "
                    "`racedit-extract extract` with the original arguments to redo it"
                )
            check_shard_header(
                SafetensorsHeader(path), self.sample_shape, int(counts[k]), self.meta["fingerprint"]
            )
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by DataLoader workers
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._maps_pid = -1

    # ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws ``__getitem__`` returns (call before iterating each epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    def __getstate__(self) -> dict[str, Any]:  # spawn-started workers: never pickle the memory maps
        state = self.__dict__.copy()
        state["_maps"], state["_maps_pid"] = None, -1
        return state

    def _shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._maps is None or self._maps_pid != os.getpid():  # (re)open after fork
            maps = []
            for path in self._paths:
                header = SafetensorsHeader(path)
                maps.append((header.memmap("mean"), header.memmap("std")))  # (n, 2, C, h, w) fp16 each
            self._maps, self._maps_pid = maps, os.getpid()
        return self._maps

    def _locate(self, index: int) -> tuple[int, int, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} latents")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return index, k, index - int(self._offsets[k])

    def moments(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored posterior of item ``index`` (unscaled), float32 (2, C, h, w) each; [1] is the flip."""
        _, k, j = self._locate(index)
        mean, std = self._shards()[k]
        return torch.from_numpy(mean[j].astype(np.float32)), torch.from_numpy(std[j].astype(np.float32))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index, k, j = self._locate(index)
        mean_map, std_map = self._shards()[k]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        flipped = int(rng.random() < 0.5)  # drawn even when flip is off: the noise stays the same
        f = flipped if self.flip else 0
        z = mean_map[j, f].astype(np.float32)  # (C, h, w)
        if self.sample_posterior:
            noise = rng.standard_normal(z.shape, dtype=np.float32)
            z += std_map[j, f].astype(np.float32) * noise
        x = to_latents(z, self.scaling_factor, self.shift_factor)  # what the sampler's decoder inverts
        return torch.from_numpy(x), int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"LatentDataset({str(self.root)!r}: {len(self)} latents {list(self.sample_shape)}, "
            f"{self.num_classes} classes, vae={self.meta.get('vae')}, scaling_factor={self.scaling_factor})"
        )
