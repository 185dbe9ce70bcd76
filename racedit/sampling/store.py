"""Resumable sample files: finished chunks on disk, merged into ADM's ``.npz`` at the end.

A run of N samples is cut into chunks of consecutive global indices. Each finished chunk is written
atomically (temp file + rename) as ``<out>.parts/chunk_000012.npz``; a rerun with the same settings
skips the chunks that exist, whatever the number of processes. ``settings.json`` in the parts folder
guards against mixing chunks of different settings. The merge streams chunks into one ``.npz`` with
``arr_0`` uint8 (N, H, W, 3) and ``arr_1`` int64 (N,) labels (guided-diffusion's layout), never
holding all images in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


class SettingsMismatch(RuntimeError):
    """Existing chunks were made with different settings."""


class ChunkStore:
    def __init__(self, npz_path: str | Path, num_samples: int, chunk_size: int):
        if num_samples < 1 or chunk_size < 1:
            raise ValueError(f"num_samples and chunk_size must be >= 1, got {num_samples}, {chunk_size}")
        self.npz_path = Path(npz_path)
        self.dir = self.npz_path.with_name(self.npz_path.name.removesuffix(".npz") + ".parts")
        self.num_samples = num_samples
        self.chunk_size = chunk_size

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def bounds(self, k: int) -> tuple[int, int]:
        """Global sample indices [start, end) of chunk k."""
        return k * self.chunk_size, min((k + 1) * self.chunk_size, self.num_samples)

    def path(self, k: int) -> Path:
        return self.dir / f"chunk_{k:06d}.npz"

    def missing(self) -> list[int]:
        return [k for k in range(self.num_chunks) if not self.path(k).is_file()]

    def prepare(self, settings: dict[str, Any]) -> None:
        """Create the parts folder, or check that its chunks were made with ``settings``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        record = self.dir / "settings.json"
        if record.is_file():
            old = json.loads(record.read_text())
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise SettingsMismatch(
                    f"{self.dir} holds chunks made with other settings (differs in: {', '.join(diff)}). "
                    f"Rerun with the same settings to resume, or delete {self.dir} to start over"
                )
        else:
            _atomic_write_text(record, json.dumps(settings, indent=2, sort_keys=True))

    def save(self, k: int, images: np.ndarray, labels: np.ndarray) -> None:
        start, end = self.bounds(k)
        if images.shape[0] != end - start or labels.shape[0] != end - start:
            raise ValueError(f"chunk {k} needs {end - start} samples, got {images.shape[0]}")
        tmp = self.path(k).with_name(f".{self.path(k).name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, images=images.astype(np.uint8), labels=labels.astype(np.int64))
        os.replace(tmp, self.path(k))

    def merge(self, keep_parts: bool = False) -> Path:
        """Stream every chunk into ``npz_path`` (arr_0 images, arr_1 labels); remove the parts folder."""
        missing = self.missing()
        if missing:
            raise RuntimeError(f"cannot merge: {len(missing)} chunks are missing (first: {missing[0]})")
        with np.load(self.path(0)) as first:
            tile = first["images"].shape[1:]
        tmp = self.npz_path.with_name(f".{self.npz_path.name}.{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, dtype, shape in (
                ("images", np.uint8, (self.num_samples, *tile)),
                ("labels", np.int64, (self.num_samples,)),
            ):
                name = "arr_0.npy" if key == "images" else "arr_1.npy"
                with zf.open(name, "w", force_zip64=True) as fh:
                    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
                    np.lib.format.write_array_header_2_0(fh, header)
                    for k in range(self.num_chunks):
                        with np.load(self.path(k)) as part:
                            arr = np.ascontiguousarray(part[key].astype(dtype))
                        if key == "images" and arr.shape[1:] != tile:
                            raise RuntimeError(
                                f"chunk {k} has images of shape {arr.shape[1:]}, expected {tile}"
                            )
                        fh.write(arr.tobytes())
        os.replace(tmp, self.npz_path)
        if not keep_parts:
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.npz_path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
