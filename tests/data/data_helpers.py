"""Helpers of the data tests: a tiny random AutoencoderKL, a small image folder, extraction arguments.

(A uniquely named module: several test folders have a conftest.py, so tests import helpers from here.)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from racedit.testing import save_tiny_autoencoder

RESOLUTION = 32
SHARD_SIZE = 4
BATCH_SIZE = 2
CLASSES = ("cat", "dog", "emu")
PER_CLASS = 6  # readable images per class


def make_tiny_vae(path: Path) -> Path:
    """A randomly initialised AutoencoderKL with SD-VAE's layout (4 latent channels, /8) but 4 channels wide."""
    return save_tiny_autoencoder(path, num_blocks=4, width=4, sample_size=RESOLUTION)


def make_image_folder(root: Path) -> Path:
    """3 classes x 6 random images (JPEG and PNG, varied sizes), plus a corrupt, a truncated and a text file."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            h, w = 32 + 5 * i, 70 - 3 * i  # landscape and portrait, some >= 2x the resolution
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if i % 3 == 2:
                img = img.convert("L")  # greyscale: converted to RGB by the loader
            img.save(root / c / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dog" / "corrupt.jpg").write_bytes(b"this is not a JPEG file")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "emu" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def extract_args(data_dir: Path, out: Path, vae: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--vae",
        str(vae),
        "--resolution",
        str(RESOLUTION),
        "--shard-size",
        str(SHARD_SIZE),
        "--batch-size",
        str(BATCH_SIZE),
        "--num-workers",
        "0",
        *extra,
    ]
