"""File helpers every part of racedit shares: content hashes, atomic files and directories, manifests.

One copy of each: checkpoints, the exported model, latent shards, sample chunks and feature caches all
call these, so "written atomically" and "checked by hash" mean the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # temporary files are "<name>.tmp-<pid>"; see remove_stale_temporaries
MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode())


def _fsync_dir(path: Path) -> None:
    try:  # make a rename durable; some file systems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, fsync it, then rename it over ``path``.

    A process killed at any moment leaves the old file (or none) or the complete new one, plus possibly
    a ``<name>.tmp-<pid>`` file that :func:`remove_stale_temporaries` deletes.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """Atomic JSON write; ``indent=None`` for big files (compact)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; when the body returns, it replaces ``path`` atomically.

    An existing ``path`` is moved aside first and deleted only after the new one is in place, so at every
    moment one complete directory exists under ``path`` or under ``<path>.old-<pid>``. When the body
    raises, the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    _fsync_dir(path.parent)


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete ``*.tmp-<pid>`` files and directories left under ``root`` by a killed process."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if TMP_MARK in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------
# Manifests: {"files": {relative path: {"size": n, "sha256": hex}}}
# ---------------------------------------------------------------------------------------------------


def write_manifest(directory: str | Path, name: str = MANIFEST) -> dict[str, Any]:
    """Hash every file under ``directory`` (except the manifest) into ``directory/name``."""
    directory = Path(directory)
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != name:
            rel = f.relative_to(directory).as_posix()
            files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"files": files}
    atomic_write_json(directory / name, manifest)
    return manifest


def check_manifest(directory: str | Path, name: str = MANIFEST) -> list[str]:
    """Problems found checking ``directory`` against its manifest: missing files, size or hash mismatches.

    An empty list means every listed file is present with the recorded bytes. A missing or unreadable
    manifest is itself a problem.
    """
    directory = Path(directory)
    mpath = directory / name
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"{mpath}: no manifest"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{mpath}: unreadable manifest ({err})"]
    problems = []
    for rel, info in files.items():
        f = directory / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != info["size"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, manifest says {info['size']}")
        elif sha256_file(f) != info["sha256"]:
            problems.append(f"{f}: content hash differs from the manifest")
    return problems
