"""Per-process micro-batches in a reproducible order, with a position that a checkpoint can store.

Epoch ``e`` visits the dataset in the permutation drawn from ``seed`` and ``e`` alone; the tail that does
not fill a global micro-batch (micro-batch x processes) is dropped, and process ``r`` takes every
``world``-th index from ``r``. The position is ``(epoch, batch)``: resuming re-creates the epoch's order and
starts at micro-batch ``batch``, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class BatchStream:
    """Endless iterator of ``(x, y)`` micro-batches for one process."""

    def __init__(
        self,
        dataset: Dataset,
        micro_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = self.num_samples // (micro_batch * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global micro-batch "
                f"({micro_batch} x {world_size} processes); lower train.global_batch_size or raise train.grad_accum"
            )
        self.epoch = 0
        self.batch = 0  # micro-batches of this epoch already handed out
        self._it: Any = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._it = None

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This process's sample indices of ``epoch``, in visiting order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        perm = perm[: self.batches_per_epoch * self.micro_batch * self.world_size]
        return perm[self.rank :: self.world_size]

    def _open(self) -> None:
        if hasattr(self.dataset, "set_epoch"):  # per-epoch noise / flips of latent datasets
            self.dataset.set_epoch(self.epoch)
        indices = self.epoch_indices(self.epoch)[self.batch * self.micro_batch :].tolist()
        loader = DataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=indices,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=True,
            # A private generator: opening an epoch must not draw from the global RNG, or a resumed run
            # (which opens its epoch at a different step) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
        )
        self._it = iter(loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._open()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.batch = self.epoch + 1, 0
            self._open()
            batch = next(self._it)
        self.batch += 1
        x, y = batch[0], batch[1]
        return x, torch.as_tensor(y, dtype=torch.long)
