"""Resumable sample files: finished chunks on disk, merged into ADM's ``.npz`` at the end.

A run of N samples is cut into chunks of consecutive global indices. Each finished chunk is written
atomically (``racedit.io.atomic_write``) as ``<out>.parts/chunk_000012.npz``; a rerun with the same settings
skips the chunks that exist, whatever the number of processes. Before a rerun starts, every existing chunk
is read back in full (the zip CRC-32 of each array is checked, and the shapes against the chunk's
bounds): a truncated or corrupt chunk is reported, deleted and sampled again, never merged. ``settings.json`` in the parts folder
guards against mixing chunks of different settings. The merge streams chunks into one ``.npz`` with
``arr_0`` uint8 (N, H, W, 3) and ``arr_1`` int64 (N,) labels (guided-diffusion's layout), never
holding all images in memory.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from racedit.errors import UserError
from racedit.io import atomic_write, atomic_write_text, remove_stale_temporaries


class ChunkStoreError(UserError):
    """The parts folder cannot be used as it is; the message says what to do."""


class SettingsMismatch(ChunkStoreError):
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
        remove_stale_temporaries(self.dir)  # partial chunks of a killed run
        record = self.dir / "settings.json"
        if record.is_file():
            try:
                old = json.loads(record.read_text())
            except ValueError as err:
                raise ChunkStoreError(
                    f"{record} is not valid JSON ({err}); delete {self.dir} to start over"
                ) from None
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise SettingsMismatch(
                    f"{self.dir} holds chunks made with other settings (differs in: {', '.join(diff)}). "
                    f"Rerun with the same settings to resume, or delete {self.dir} to start over"
                )
        else:
            atomic_write_text(record, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def check_chunk(self, k: int) -> str | None:
        """None if chunk ``k`` reads back completely with the right shapes, else what is wrong with it."""
        start, end = self.bounds(k)
        try:
            with np.load(self.path(k)) as part:  # reading an array checks its zip CRC-32
                images, labels = part["images"], part["labels"]
        except Exception as err:  # BadZipFile, EOFError, OSError, ValueError, KeyError: all mean corrupt
            return f"{type(err).__name__}: {err}"
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != end - start:
            return f"images are {images.dtype} {images.shape}, expected uint8 ({end - start}, H, W, 3)"
        if labels.dtype != np.int64 or labels.shape != (end - start,):
            return f"labels are {labels.dtype} {labels.shape}, expected int64 ({end - start},)"
        return None

    def remove_corrupt_chunks(self) -> list[str]:
        """Delete every existing chunk that does not read back (main process, before sampling starts);
        returns one message per chunk deleted, so that the caller reports what is redone."""
        problems = []
        for k in range(self.num_chunks):
            if self.path(k).is_file():
                why = self.check_chunk(k)
                if why is not None:
                    self.path(k).unlink()
                    problems.append(f"{self.path(k)} is corrupt ({why}): deleted, it is sampled again")
        return problems

    def save(self, k: int, images: np.ndarray, labels: np.ndarray) -> None:
        start, end = self.bounds(k)
        if images.shape[0] != end - start or labels.shape[0] != end - start:
            raise ValueError(f"chunk {k} needs {end - start} samples, got {images.shape[0]}")

        def write(tmp: Path) -> None:
            with tmp.open("wb") as fh:
                np.savez(fh, images=images.astype(np.uint8), labels=labels.astype(np.int64))

        atomic_write(self.path(k), write)

    def merge(self, keep_parts: bool = False) -> Path:
        """Stream every chunk into ``npz_path`` (arr_0 images, arr_1 labels); remove the parts folder."""
        missing = self.missing()
        if missing:
            raise ChunkStoreError(f"cannot merge: {len(missing)} chunks are missing (first: {missing[0]})")
        tile = self._read(0, "images").shape[1:]
        atomic_write(self.npz_path, lambda tmp: self._write_merged(tmp, tile))
        if not keep_parts:
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.npz_path

    def _read(self, k: int, key: str) -> np.ndarray:
        try:
            with np.load(self.path(k)) as part:
                return part[key]
        except Exception as err:  # corrupted since the check at the start: delete it so a rerun redoes it
            self.path(k).unlink(missing_ok=True)
            raise ChunkStoreError(
                f"{self.path(k)} is corrupt ({type(err).__name__}: {err}); it was deleted: rerun the same "
                "command to sample it again and merge"
            ) from None

    def _write_merged(self, tmp: Path, tile: tuple[int, ...]) -> None:
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
                        arr = np.ascontiguousarray(self._read(k, key).astype(dtype))
                        if key == "images" and arr.shape[1:] != tile:
                            raise ChunkStoreError(
                                f"{self.path(k)} has images of shape {arr.shape[1:]}, expected {tile}; "
                                f"delete {self.dir} to start over"
                            )
                        fh.write(arr.tobytes())
