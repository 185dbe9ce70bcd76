"""Shared fixtures for fid tests: single-threaded BLAS (the CI box is 2 shared cores) and one random Inception."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

# This folder is named like the package; pytest puts tests/ on sys.path, where `fid` would then resolve to
# this folder as a namespace package. With the repository root on sys.path the real package wins.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True, scope="session")
def _single_thread_blas():
    # Multi-threaded OpenBLAS eigh on an oversubscribed 2-core machine is ~10x slower than one thread.
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="session")
def random_inception():
    from fid.inception import InceptionFeatures

    return InceptionFeatures.random_init(seed=0)


@pytest.fixture(scope="session")
def tiny_images() -> dict[str, np.ndarray]:
    """Two small, different uint8 (N, 16, 16, 3) sets: noise ("ref") and smooth gradients + noise ("samples")."""
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 16)[None, :, None, None] * rng.uniform(0.2, 1.0, (6, 1, 1, 3))
    samples = np.clip(ramp + rng.normal(0, 20, (6, 16, 16, 3)), 0, 255).astype(np.uint8)
    return {"ref": ref, "samples": samples}


@pytest.fixture(autouse=True)
def _no_torch_threads_change():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
