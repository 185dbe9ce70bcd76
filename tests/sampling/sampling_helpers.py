"""Tiny models and model directories for the sampling tests (no downloads); a uniquely named module,
since several test folders have a conftest.py."""

from pathlib import Path

import torch

import racedit
from racedit.sampling import write_sampling_meta


def make_tiny_model(
    in_channels: int = 4,
    learn_sigma: bool = True,
    seed: int = 0,
    class_dropout_prob: float = 0.1,
    name: str = "DiT-S/2",
    **overrides,
):
    """A zoo model (DiT-S/2 by default) shrunk to 8x8 inputs, 2 blocks, width 64, with random (non-zero)
    weights everywhere: DiT's zero init would make every output 0 and every test of sampling vacuous."""
    torch.manual_seed(seed)
    model = racedit.build_model(
        name,
        input_size=8,
        num_classes=10,
        hidden_size=64,
        depth=2,
        num_heads=2,
        in_channels=in_channels,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        **overrides,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_pixel_model(path: Path, objective: str = "ddpm", in_channels: int = 1) -> Path:
    model = make_tiny_model(in_channels=in_channels)
    racedit.save_model(model, path)
    write_sampling_meta(
        path,
        space="pixel",
        vae=None,
        diffusion={"objective": objective},
        class_names=[f"digit {i}" for i in range(10)],
        image_size=8,
    )
    return path
