"""Reading an ImageFolder tree (``root/<class>/<image>``) and ADM's center crop.

The one copy of both: latent extraction and the FID tools (``fid/data.py``) read images with the same
extension list and crop them with the same function.

Any dataset laid out like ImageNet's ``train/`` works: the class names are the sorted names of the
sub-folders of the root, the label of an image is the index of its class folder (torchvision's
``ImageFolder`` convention, so ImageNet's synset folders give the standard 0..999 labels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Extensions torchvision's ImageFolder accepts (compared case-insensitively: see is_image_file).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str | Path) -> bool:
    """Whether a file name has one of ``IMAGE_EXTENSIONS``, in any letter case (``.JPEG`` counts)."""
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class FileList:
    class_names: list[str]
    files: list[tuple[str, int]]  # (path relative to the root, "/"-separated; label)
    ignored: list[str] = field(default_factory=list)  # files skipped for their extension (reported)


def list_image_folder(root: str | Path) -> FileList:
    """Every image under ``root/<class>/`` (recursively), sorted by class then relative path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected <root>/<class name>/<image>)")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise ValueError(
            f"{root} has no class sub-folders; an image-folder dataset looks like "
            f"{root}/<class name>/<image>.jpg (for ImageNet: train/n01440764/...)"
        )
    files: list[tuple[str, int]] = []
    ignored: list[str] = []
    for e in os.scandir(root):
        if e.is_file():
            ignored.append(e.name)
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in filenames:
                rel = Path(dirpath, fname).relative_to(root).as_posix()
                if is_image_file(fname):
                    found.append(rel)
                elif not fname.startswith("."):
                    ignored.append(rel)
        files.extend((rel, label) for rel in sorted(found))
    return FileList(class_names, files, sorted(ignored))


def adm_center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion ``center_crop_arr``; also DiT's and REPA's preprocessing).

    1. Halve the image with a BOX filter while its short side is at least twice ``resolution``
       (cheap, alias-free coarse downsampling);
    2. resize with BICUBIC so the short side equals ``resolution`` (each side rounded);
    3. crop the central ``resolution x resolution`` square (offsets floor((size - resolution) / 2)).

    Returns a uint8 array (resolution, resolution, 3).
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Decode one image fully (a truncated or corrupt file raises here), crop it: uint8 (3, R, R)."""
    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
    arr = adm_center_crop(rgb, resolution)  # (R, R, 3)
    if arr.shape != (resolution, resolution, 3):
        raise ValueError(f"cropped to {arr.shape}, expected ({resolution}, {resolution}, 3)")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, R, R); copy: PIL arrays are read-only


class ImageListDataset(torch.utils.data.Dataset):
    """Items of a file list, decoded and cropped in DataLoader workers; failures come back as errors.

    Item: ``(index, image uint8 (3, R, R) or None, label, error message or "")``.
    """

    def __init__(self, root: str | Path, files: list[tuple[str, int]], resolution: int) -> None:
        self.root = Path(root)
        self.files = files
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, int, str]:
        rel, label = self.files[i]
        try:
            return i, load_image(self.root / rel, self.resolution), label, ""
        except Exception as err:  # any decoder failure means "corrupt": report it, never crash the run
            return i, None, label, f"{type(err).__name__}: {err}"


def collate_items(items: list) -> list:
    return items
