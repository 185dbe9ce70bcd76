"""Tiny random models for tests and examples on CPU; nothing is downloaded.

``tiny_autoencoder`` is a diffusers ``AutoencoderKL`` with SD-VAE's layout (3 image channels, 4 latent
channels, downsampling 2**(num_blocks - 1)) at a few channels of width, seeded so every test that asks
for the same shape gets the same weights. Tests save it with ``save_pretrained`` and hand the folder to
the real loading code (``racedit.vae.load_vae``), which stays the same as for the real SD-VAE.

``assert_bitwise`` compares two nested states (tensors, dicts, lists, plain values) bit for bit: what the
resume and sharded-checkpoint tests assert about models, optimizers and RNG states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_autoencoder(num_blocks: int = 4, width: int = 4, seed: int = 0, **config: Any):
    """A random ``AutoencoderKL``: ``num_blocks`` encoder/decoder blocks of ``width`` channels (groups of 2
    channels per norm group); extra keyword arguments go to its config (``scaling_factor``, ``shift_factor``,
    ``sample_size``...)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=(width,) * num_blocks,
        layers_per_block=1,
        norm_num_groups=width // 2,
        **config,
    )


def save_tiny_autoencoder(path: str | Path, **kwargs: Any) -> Path:
    """``tiny_autoencoder(**kwargs).save_pretrained(path)``; returns ``path``."""
    tiny_autoencoder(**kwargs).save_pretrained(path)
    return Path(path)


def assert_bitwise(a: object, b: object, where: str = "") -> None:
    """Assert that two nested states are equal bit for bit: tensors by dtype, shape and value, dicts by keys
    then values, sequences item by item, anything else by ``==``; ``where`` names the path in messages."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b or {})}"
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
