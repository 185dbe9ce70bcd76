"""Image sources for evaluation: ADM ``.npz`` files, folders of images, ``sample.py`` output folders.

All sources yield uint8 batches (B, H, W, 3) in a fixed order and have a content hash (the key of the
feature cache). docs/spec/evaluation.md, "Samples": ``arr_0`` uint8 (N, H, W, 3); samples are PNG or raw
uint8, never JPEG (JPEG is accepted, with a warning, only for reference folders such as ImageNet).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from racedit.data.imagefolder import IMAGE_EXTENSIONS, adm_center_crop, is_image_file
from racedit.errors import UserError

LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


class InputError(UserError, ValueError):
    """An input file or folder that cannot be evaluated; the message names it and says what is expected."""


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise InputError(
            f"{path} is not a readable .npz file ({type(err).__name__}: {err}); it is truncated or corrupt: "
            "write it again (sample.py --num-samples, or `racedit-fid ref --npz`)"
        ) from None


# ----------------------------------------------------------------------------- .npz (ADM format)


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


@dataclass
class NpzImages:
    """``arr_0`` of an ADM-format ``.npz``, streamed from the zip member in batches (never fully loaded)."""

    path: Path
    key: str = "arr_0"
    settings: dict[str, Any] | None = None  # a sample.py JSON record found next to the file
    settings_path: Path | None = None
    num_images: int = field(init=False)
    image_shape: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        with _open_zip(self.path) as zf:
            member = f"{self.key}.npy"
            if member not in zf.namelist():
                raise InputError(f"{self.path} has no {self.key!r} array (keys: {_npz_keys(zf)})")
            try:
                with zf.open(member) as f:
                    shape, fortran, dtype = _read_npy_header(f)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                raise InputError(f"{self.path}: the {member} member is unreadable ({err})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise InputError(
                f"{self.path}:{self.key} is {dtype} {shape}; expected uint8 (N, H, W, 3) images in C order "
                f"(ADM's sample format; convert samples with np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8))"
            )
        self.num_images, self.image_shape = int(shape[0]), tuple(int(s) for s in shape[1:])

    def describe(self) -> str:
        return str(self.path)

    def content_hash(self) -> str:
        """SHA-256 of the ``arr_0.npy`` member (header + data): labels and other arrays do not count."""
        h = hashlib.sha256()
        with _open_zip(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches of images ``start:stop``."""
        row = int(np.prod(self.image_shape))
        with _open_zip(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            _read_npy_header(f)
            f.seek(f.tell() + start * row)
            for begin in range(start, stop, batch_size):
                n = min(batch_size, stop - begin)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise InputError(f"{self.path}: truncated {self.key} (ended before image {begin + n})")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.image_shape)


def _npz_keys(zf: zipfile.ZipFile) -> list[str]:
    return [n.removesuffix(".npy") for n in zf.namelist()]


# ----------------------------------------------------------------------------- folders of images


@dataclass
class FolderImages:
    """Images under a folder (recursive, sorted by relative path), optionally ADM-centre-cropped to a size."""

    root: Path
    image_size: int | None = None
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))  # decoding threads
    files: list[Path] = field(init=False)
    num_images: int = field(init=False)
    image_shape: tuple[int, int, int] = field(init=False)
    settings: dict[str, Any] | None = None
    settings_path: Path | None = None
    skipped: list[str] = field(default_factory=list)  # files with an image suffix that PIL cannot identify

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        found = sorted(
            (p for p in self.root.rglob("*") if is_image_file(p.name) and p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        self.files = []
        for p in found:  # header only: a file that is not an image at all is left out, with a warning
            try:
                with Image.open(p):
                    pass
                self.files.append(p)
            except (OSError, SyntaxError, ValueError) as err:
                self.skipped.append(f"{p.relative_to(self.root).as_posix()} ({type(err).__name__})")
        if self.skipped:
            warnings.warn(
                f"{len(self.skipped)} file(s) under {self.root} are not readable images and are left out: "
                f"{', '.join(self.skipped[:5])}{' ...' if len(self.skipped) > 5 else ''}",
                stacklevel=2,
            )
        if not self.files:
            raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.num_images = len(self.files)
        first = self.load(0)
        self.image_shape = tuple(first.shape)

    def describe(self) -> str:
        return f"{self.root} ({self.num_images} images)"

    def load(self, index: int) -> np.ndarray:
        path = self.files[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                arr = adm_center_crop(im, self.image_size) if self.image_size else np.asarray(im)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None
        if index and arr.shape != self.image_shape:
            raise InputError(
                f"{path} is {arr.shape[1]}x{arr.shape[0]} but earlier images are "
                f"{self.image_shape[1]}x{self.image_shape[0]}; pass --image-size to centre-crop all images "
                f"to one size (ADM preprocessing)"
            )
        return np.ascontiguousarray(arr, dtype=np.uint8)

    def content_hash(self) -> str:
        """SHA-256 over (relative path, file bytes) of every image in order, plus the crop size."""
        h = hashlib.sha256(f"image_size={self.image_size}\n".encode())
        for p in self.files:
            h.update(p.relative_to(self.root).as_posix().encode() + b"\0")
            h.update(p.read_bytes())
        return h.hexdigest()

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(max(1, self.workers)) as pool:  # PIL decodes outside the GIL
            for begin in range(start, stop, batch_size):
                yield np.stack(list(pool.map(self.load, range(begin, min(begin + batch_size, stop)))))


@dataclass
class ArrayImages:
    """An in-memory uint8 (N, H, W, 3) array (reference subsets, tests)."""

    array: np.ndarray
    name: str = "<array>"
    settings: dict[str, Any] | None = None
    settings_path: Path | None = None

    def __post_init__(self) -> None:
        a = self.array
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise InputError(f"{self.name}: expected uint8 (N, H, W, 3), got {a.dtype} {a.shape}")
        self.num_images, self.image_shape = a.shape[0], tuple(a.shape[1:])

    def describe(self) -> str:
        return self.name

    def content_hash(self) -> str:
        h = hashlib.sha256(repr((self.array.shape, str(self.array.dtype))).encode())
        h.update(np.ascontiguousarray(self.array).data)
        return h.hexdigest()

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        for begin in range(start, stop, batch_size):
            yield self.array[begin : min(begin + batch_size, stop)]


ImageSource = NpzImages | FolderImages | ArrayImages


# ----------------------------------------------------------------------------- dispatch


def open_images(
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    settings_path: str | os.PathLike | None = None,
    for_reference: bool = False,
) -> ImageSource:
    """An ``.npz`` file, a sample.py output folder (one ``.npz`` + optional JSON record), or an image folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        if p.suffix != ".npz":
            raise InputError(f"{p}: expected an .npz file (arr_0 uint8 (N, H, W, 3)) or a folder")
        src: ImageSource = NpzImages(p)
    else:
        npzs = sorted(x for x in p.glob("*.npz"))
        if len(npzs) > 1:
            raise InputError(
                f"{p} holds several .npz files ({', '.join(x.name for x in npzs)}); pass the one to evaluate"
            )
        if npzs:
            src = NpzImages(npzs[0])
            if settings_path is None:
                settings_path = _find_settings(p, npzs[0])
        else:
            src = FolderImages(p, image_size=image_size)
            lossy = [f for f in src.files if f.suffix.lower() in LOSSY_SUFFIXES]
            if lossy and not for_reference:
                warnings.warn(
                    f"{len(lossy)} samples under {p} are lossy ({lossy[0].suffix}): docs/spec/evaluation.md asks for PNG "
                    f"or raw uint8 samples, JPEG artefacts change FID",
                    stacklevel=2,
                )
    if settings_path is not None:
        src.settings_path = Path(settings_path)
        try:
            src.settings = json.loads(Path(settings_path).read_text())
        except ValueError as err:
            raise InputError(
                f"sampling record {settings_path} is not valid JSON ({err}); pass --settings"
            ) from None
    return src


def _find_settings(folder: Path, npz: Path) -> Path | None:
    """The sample.py JSON record next to the samples: ``<npz stem>.json``, else the only ``*.json`` there."""
    same_stem = npz.with_suffix(".json")
    if same_stem.is_file():
        return same_stem
    jsons = sorted(x for x in folder.glob("*.json") if not x.name.endswith(".fid.json"))
    if len(jsons) == 1:
        return jsons[0]
    if len(jsons) > 1:
        warnings.warn(
            f"{folder} holds several JSON files ({', '.join(x.name for x in jsons)}); none used as the sampling "
            f"record. Pass --settings PATH.",
            stacklevel=3,
        )
    return None
