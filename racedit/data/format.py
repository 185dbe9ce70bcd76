"""On-disk format of a latent dataset: shards of VAE posteriors, an index, a metadata file.

Written by ``racedit-extract extract`` (``racedit/data/extract.py``), read by ``LatentDataset``
(``racedit/data/latents.py``). Everything is JSON or safetensors; nothing is pickled.

An output directory holds::

    plan.json                 settings of the run + their fingerprint (written first; lets a rerun resume)
    files.json                the ordered image list [[relative path, label], ...] the shards are cut from
    shard-00000.safetensors   finished shards; shard k holds files[k * shard_size : (k + 1) * shard_size]
    ...                       minus the images that could not be read
    shard-00000.safetensors.sha256   its SHA-256 (``sha256sum -c`` format), written right after the shard
    index.safetensors         labels (N,) int64, file_index (N,) int64, shard_counts (S,) int64
    report.json               excluded (unreadable or corrupt) images with their error, and counts
    manifest.json             size and SHA-256 of every file above (``racedit.io`` manifest format)
    meta.json                 written last: its presence means the extraction is complete

A shard holds, for its n readable images (dimension 1: 0 = the image, 1 = its horizontal flip)::

    mean        (n, 2, C, h, w) float16   posterior mean of the VAE encoder
    std         (n, 2, C, h, w) float16   posterior standard deviation, exp(logvar / 2)
    labels      (n,)            int64     class index
    file_index  (n,)            int64     position of the image in files.json

and one safetensors metadata entry ``"racedit"``: a JSON object with ``format_version``, ``shard``,
``count``, ``fingerprint`` (of the plan) and ``excluded`` (a list of ``{"path", "error"}``).

Shards are written to a temporary name and renamed (``racedit.io.atomic_write``), so a shard file either
is complete or does not exist: that is what makes extraction resumable after ``kill -9``. Its recorded
hash catches what atomicity cannot (bytes changed later on disk): ``racedit-extract verify`` recomputes
every hash in the manifest, and a resumed extraction redoes a finished shard whose hash differs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from racedit.errors import UserError
from racedit.io import MANIFEST, atomic_write, atomic_write_text, sha256_file, sha256_text

FORMAT_NAME = "racedit-latents"
FORMAT_VERSION = 1

PLAN_FILE = "plan.json"
FILES_FILE = "files.json"
INDEX_FILE = "index.safetensors"
REPORT_FILE = "report.json"
META_FILE = "meta.json"
MANIFEST_FILE = MANIFEST

SHARD_TENSORS = ("mean", "std", "labels", "file_index")

_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "BF16": None}


class LatentFormatError(UserError, ValueError):
    """A latent directory or shard does not match what its metadata promises; the message says the fix."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def hash_name(k: int) -> str:
    """The file holding shard k's SHA-256."""
    return shard_name(k) + ".sha256"


def write_shard_hash(root: Path, k: int) -> str:
    """Hash shard k (just written: read back from the page cache) into its ``.sha256`` file."""
    digest = sha256_file(root / shard_name(k))
    atomic_write_text(root / hash_name(k), f"{digest}  {shard_name(k)}\n")
    return digest


def read_shard_hash(root: Path, k: int) -> str | None:
    """The recorded SHA-256 of shard k, or None when there is no (readable) record."""
    try:
        digest = (root / hash_name(k)).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return digest if len(digest) == 64 else None


def extract_hint(root: str | Path) -> str:
    """The command that (re)creates a latent directory, for error messages."""
    return (
        f"racedit-extract extract --data-dir <ImageFolder root, e.g. imagenet/train> --out {root} "
        "[--vae stabilityai/sd-vae-ft-ema --resolution 256]"
    )


def fingerprint(settings: dict[str, Any]) -> str:
    """Short stable hash of the settings a shard depends on."""
    return sha256_text(json.dumps(settings, sort_keys=True, separators=(",", ":")))[:16]


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    """Write numpy arrays as safetensors atomically; ``metadata`` is stored as one JSON string (stable bytes)."""
    from safetensors.numpy import save_file

    meta = {"racedit": json.dumps(metadata, sort_keys=True, separators=(",", ":"))}
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=meta))


# ---------------------------------------------------------------------------------------------------
# Reading safetensors headers and memory-mapping tensors without loading them
# ---------------------------------------------------------------------------------------------------


class SafetensorsHeader:
    """The parsed header of a safetensors file: tensor dtypes/shapes/offsets and our metadata."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with self.path.open("rb") as fh:
                raw = fh.read(8)
                if len(raw) != 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n > 100 * 2**20 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as err:
            raise LatentFormatError(f"{self.path} is not a readable safetensors file ({err})") from None
        self.data_start = 8 + n
        self.file_size = size
        meta = header.pop("__metadata__", None) or {}
        try:
            self.metadata: dict[str, Any] = json.loads(meta["racedit"]) if "racedit" in meta else {}
        except json.JSONDecodeError as err:
            raise LatentFormatError(f"{self.path}: metadata is not valid JSON ({err})") from None
        self.tensors: dict[str, dict[str, Any]] = header
        for name, info in header.items():
            start, end = info["data_offsets"]
            if self.data_start + end > size:
                raise LatentFormatError(
                    f"{self.path} is truncated: tensor '{name}' ends at byte {self.data_start + end} "
                    f"but the file has {size} bytes"
                )

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.tensors[name]["dtype"]

    def memmap(self, name: str) -> np.ndarray:
        """A read-only ``np.memmap`` of one tensor (an empty array for zero-size tensors)."""
        info = self.tensors[name]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise LatentFormatError(f"{self.path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        shape = tuple(info["shape"])
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype=dtype)
        start = info["data_offsets"][0]
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + start, shape=shape)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LatentFormatError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise LatentFormatError(f"{what} {path} is not valid JSON ({err})") from None


def check_shard_header(
    header: SafetensorsHeader, latent_shape: tuple[int, int, int], count: int | None, fprint: str | None
) -> None:
    """Raise LatentFormatError unless the shard holds ``count`` items of ``latent_shape`` in our layout."""
    p = header.path
    missing = [t for t in SHARD_TENSORS if t not in header.tensors]
    if missing:
        raise LatentFormatError(f"shard {p} lacks tensors {missing}; it was not written by racedit-extract")
    n = header.shape("labels")[0] if header.shape("labels") else -1
    want = {
        "mean": ((n, 2, *latent_shape), "F16"),
        "std": ((n, 2, *latent_shape), "F16"),
        "labels": ((n,), "I64"),
        "file_index": ((n,), "I64"),
    }
    for name, (shape, dtype) in want.items():
        if header.shape(name) != shape or header.dtype(name) != dtype:
            raise LatentFormatError(
                f"shard {p}: tensor '{name}' is {header.dtype(name)} {list(header.shape(name))}, but the "
                f"metadata says {dtype} {list(shape)} (latent shape {list(latent_shape)}); the shard belongs "
                "to another extraction. Re-extract into a fresh directory."
            )
    if count is not None and n != count:
        raise LatentFormatError(
            f"shard {p} holds {n} items but the index says {count}; the directory mixes runs. "
            "Run `racedit-extract verify` and re-extract."
        )
    version = header.metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise LatentFormatError(
            f"shard {p} has format version {version}, this racedit reads {FORMAT_VERSION}"
        )
    if fprint is not None and header.metadata.get("fingerprint") != fprint:
        raise LatentFormatError(
            f"shard {p} was made with other settings (fingerprint {header.metadata.get('fingerprint')} != "
            f"{fprint}); do not mix extraction runs in one directory"
        )


def load_meta(root: str | Path) -> dict[str, Any]:
    """Read ``meta.json`` of a complete extraction, with errors that say how to make one."""
    root = Path(root)
    if not root.is_dir():
        raise LatentFormatError(
            f"latent directory {root} does not exist; create it with:\n  {extract_hint(root)}"
        )
    meta_path = root / META_FILE
    if not meta_path.is_file():
        if (root / PLAN_FILE).is_file():
            done = len(list(root.glob("shard-*.safetensors")))
            plan = read_json(root / PLAN_FILE, "plan file")
            raise LatentFormatError(
                f"extraction in {root} is unfinished ({done} of {plan.get('num_shards', '?')} shards done); "
                "rerun the same `racedit-extract extract ...` command to resume it"
            )
        raise LatentFormatError(
            f"{root} holds no {META_FILE}; it is not a latent directory. Create one with:\n  {extract_hint(root)}"
        )
    meta = read_json(meta_path, "metadata file")
    if meta.get("format") != FORMAT_NAME:
        raise LatentFormatError(f"{meta_path} is not a {FORMAT_NAME} metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LatentFormatError(
            f"{meta_path} has format version {meta.get('format_version')}; this racedit reads version "
            f"{FORMAT_VERSION}. Re-extract with this version."
        )
    return meta


def load_index(root: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = root / INDEX_FILE
    if not path.is_file():
        raise LatentFormatError(f"index {path} is missing; re-run `racedit-extract extract` to rebuild it")
    try:
        index = load_file(str(path))
    except Exception as err:  # SafetensorError and friends: the file is damaged
        raise LatentFormatError(
            f"index {path} is not a readable safetensors file ({err}); rerun the same `racedit-extract "
            "extract` command to rebuild it"
        ) from None
    for key in ("labels", "file_index", "shard_counts"):
        if key not in index:
            raise LatentFormatError(f"index {path} lacks '{key}'")
    return index
