"""A labelled image grid: each tile with its class name underneath, tiny images upscaled (nearest)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MIN_TILE = 96  # tiles smaller than this (e.g. 8x8 digits) are upscaled by an integer factor


def _caption(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        name = class_names[label]
        return name if name == str(label) else f"{label} {name}"  # digits: "3", not "3 3"
    return "null" if class_names is not None and label == len(class_names) else str(label)


def save_grid(
    images: Tensor | np.ndarray,
    labels: Sequence[int] | Tensor,
    class_names: Sequence[str] | None,
    path: str | Path,
    nrow: int | None = None,
) -> Path:
    """Write a PNG grid of ``images`` uint8 (N, H, W, 3), tile i captioned with ``labels[i]`` and its name.

    ``nrow``: tiles per row (default: about square). Tiles narrower than ``MIN_TILE`` pixels are
    upscaled by an integer factor with nearest-neighbour, so 8x8 digits stay crisp."""
    arr = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"save_grid expects uint8 images (N, H, W, 3), got {arr.dtype} {arr.shape}")
    labels = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    if len(labels) != arr.shape[0]:
        raise ValueError(f"{arr.shape[0]} images but {len(labels)} labels")
    n, H, W = arr.shape[:3]
    if n == 0:
        raise ValueError("no images to put in a grid")
    scale = max(1, math.ceil(MIN_TILE / max(H, W)))
    th, tw = H * scale, W * scale
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 2
    canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (tw + pad), pad + r * (th + text_h + pad)
        tile = Image.fromarray(arr[i])
        if scale > 1:
            tile = tile.resize((tw, th), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        text = _caption(labels[i], class_names)
        while len(text) > 1 and probe.textbbox((0, 0), text, font=font)[2] > tw:
            text = text[:-2] + "…"
        draw.text((x0, y0 + th + 1), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
