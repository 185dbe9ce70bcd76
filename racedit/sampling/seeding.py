"""Per-sample random streams: sample i of a run draws all its noise from its own generator, seeded by
(global seed, i). The noise therefore does not depend on batch size, batch order or process count (the
images do not either, unless the model's routing ranks across the batch: ``racedit.moe.inference_batch_dependence``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run with global ``seed`` (NumPy SeedSequence mixing, so
    neighbouring (seed, index) pairs give unrelated streams)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be >= 0, got seed={seed}, index={index}")
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(((int(state[0]) << 32) | int(state[1])) & (2**63 - 1))


def sample_generators(seed: int, first_index: int, count: int) -> list[torch.Generator]:
    """CPU generators of samples first_index .. first_index + count - 1 (CPU so every device gets the
    same noise)."""
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, first_index + i)) for i in range(count)]


def per_sample_randn(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str = "cpu"
) -> Tensor:
    """(len(generators), *shape) float32 standard normal noise, row i from ``generators[i]``."""
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device)
