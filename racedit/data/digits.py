"""``DigitsDataset``: the embedded demo dataset, scikit-learn's 1,797 handwritten digits (8x8, 10 classes).

The images ship inside scikit-learn (``sklearn.datasets.load_digits`` reads a file of the installed
package), so the README's first command trains with no download. They are used in pixel space, no
VAE: one channel, grey levels 0..16 mapped linearly to [-1, 1] (``x / 8 - 1``), optionally resized to
``image_size`` (bilinear; the values stay in [-1, 1] because bilinear weights are convex).

No random horizontal flip: a mirrored digit is a different (or no) digit, so flipping would
teach the model wrong images of its class. ``build_dataset`` refuses ``flip: true`` for digits.

Splits are deterministic and stratified: for each class, a fixed-seed permutation of its images
puts ``round(held_out_fraction * n_class)`` of them in ``"heldout"`` (for demo metrics, e.g. a small
classifier's accuracy on real digits) and the rest in ``"train"``; ``"all"`` is both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "heldout", "all")


def digits_split_indices(labels: np.ndarray, split: str, held_out_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``split`` in a per-class (stratified) fixed-seed split of ``labels``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return np.arange(len(labels))
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(
            f"held_out_fraction must be in (0, 1) for the '{split}' split, got {held_out_fraction}"
        )
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        held.append(rng.permutation(members)[: int(round(held_out_fraction * len(members)))])
    held_mask = np.zeros(len(labels), dtype=bool)
    held_mask[np.concatenate(held)] = True
    return np.flatnonzero(held_mask if split == "heldout" else ~held_mask)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits as ``(image float32 (1, S, S) in [-1, 1], label int)``.

    Attributes: ``num_classes = 10``, ``class_names = ["0", ..., "9"]``, ``sample_shape = (1, S, S)``,
    ``space = "pixel"``, ``labels`` (N,) int64, ``indices`` (positions in the full 1,797-image set),
    ``meta`` (source, split, sizes).
    """

    space = "pixel"

    def __init__(
        self,
        split: str = "train",
        image_size: int = 8,
        held_out_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        from sklearn.datasets import load_digits

        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        digits = load_digits()
        images = torch.from_numpy(
            digits.images.astype(np.float32) / 8.0 - 1.0
        )  # (1797, 8, 8), 0..16 -> -1..1
        labels = digits.target.astype(np.int64)  # (1797,)
        self.indices = digits_split_indices(labels, split, held_out_fraction, split_seed)
        x = images[torch.from_numpy(self.indices)].unsqueeze(1)  # (N, 1, 8, 8)
        if image_size != 8:
            x = F.interpolate(
                x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
            )
        self.images = x.clamp_(-1.0, 1.0).contiguous()  # (N, 1, S, S)
        self.labels = labels[self.indices]
        self.num_classes = 10
        self.class_names = [str(d) for d in range(10)]
        self.sample_shape: tuple[int, int, int] = (1, image_size, image_size)
        self.split = split
        self.meta: dict[str, Any] = {
            "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 8x8)",
            "split": split,
            "held_out_fraction": held_out_fraction,
            "split_seed": split_seed,
            "image_size": image_size,
            "value_range": [-1.0, 1.0],
            "flip": False,
        }

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def set_epoch(self, epoch: int) -> None:
        """No per-epoch randomness; present so the trainer treats every dataset alike."""

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, {len(self)} images {list(self.sample_shape)})"
