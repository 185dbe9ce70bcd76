"""Feature extraction: batches through Inception with a progress bar, several processes, a disk cache.

With several processes (``accelerate launch -m fid eval ...``) each process takes a contiguous range
of the images; the features are gathered in the original order (IS splits depend on it). The cache
stores pool and spatial features under a key made of the input's content hash and the network's
identity, so evaluating the same samples again skips the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fid.data import ImageSource
from fid.inception import InceptionFeatures, strict_fp32
from racedit.distributed import process_state
from racedit.progress import progress as progress_bar

FEATURES_VERSION = 1  # bump when the way features are computed changes (invalidates the cache)
CACHE_ENV_VAR = "RACEDIT_FID_CACHE"


def default_cache_dir() -> Path:
    """``$RACEDIT_FID_CACHE``, else ``$XDG_CACHE_HOME/racedit/fid`` (``~/.cache/racedit/fid``)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "racedit" / "fid"


@dataclass
class Features:
    """Inception features of one image set, in input order. pool (N, 2048), spatial (N, 2023), float32."""

    pool: np.ndarray
    spatial: np.ndarray
    content_hash: str
    from_cache: bool = False


def process_rank() -> int:
    """This process's rank under a launcher (0 when single-process)."""
    return process_state().process_index


def default_device() -> torch.device:
    """This process's GPU under a launcher, else cuda when present, else cpu."""
    return process_state().device


def cache_key(content_hash: str, model: InceptionFeatures) -> str:
    blob = json.dumps({"content": content_hash, "net": model.identity, "version": FEATURES_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def _extract_range(
    source: ImageSource,
    model: InceptionFeatures,
    start: int,
    stop: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    pools, spatials = [], []
    total = (stop - start + batch_size - 1) // batch_size
    with strict_fp32():
        for batch in progress_bar(
            source.batches(start, stop, batch_size),
            total=total,
            desc=desc,
            disable=not progress,
            unit="batch",
        ):
            x = torch.tensor(batch, device=device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8, copied
            pool, spatial = model.features(x)
            pools.append(pool)
            spatials.append(spatial)
    if not pools:
        empty = torch.empty(0, device=device)
        return empty.reshape(0, 2048), empty.reshape(0, 2023)
    return torch.cat(pools), torch.cat(spatials)


def extract_features(
    source: ImageSource,
    model: InceptionFeatures,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    desc: str = "features",
    content_hash: str | None = None,
) -> Features:
    """Features of every image of ``source`` (all processes get the full, ordered result).

    The cache file is ``<cache_dir>/<key>.npz`` with ``pool`` and ``spatial``; written by process 0.
    """
    state = process_state()
    cache_dir = Path(cache_dir or default_cache_dir())
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device)
    content_hash = content_hash or memoized_content_hash(source, cache_dir if use_cache else None)
    cache_path = Path(cache_dir) / f"{cache_key(content_hash, model)}.npz"
    if use_cache and cache_path.is_file():
        with np.load(cache_path) as z:
            if z["pool"].shape[0] == source.num_images:
                return Features(z["pool"], z["spatial"], content_hash, from_cache=True)

    n = source.num_images
    rank, world = state.process_index, state.num_processes
    start, stop = n * rank // world, n * (rank + 1) // world
    pool, spatial = _extract_range(
        source,
        model,
        start,
        stop,
        batch_size,
        device,
        progress and rank == 0,
        f"{desc} [{source.describe()}]",
    )
    if world > 1:
        from accelerate.utils import gather, pad_across_processes

        counts = gather(torch.tensor([pool.shape[0]], device=device)).tolist()
        pool = gather(pad_across_processes(pool, dim=0))
        spatial = gather(pad_across_processes(spatial, dim=0))
        width = max(counts)
        keep = torch.cat([torch.arange(r * width, r * width + c) for r, c in enumerate(counts)]).to(device)
        pool, spatial = pool[keep], spatial[keep]
    result = Features(pool.cpu().numpy(), spatial.cpu().numpy(), content_hash)
    if use_cache and rank == 0:
        _atomic_save(cache_path, pool=result.pool, spatial=result.spatial)
    state.wait_for_everyone()
    return result


def memoized_content_hash(source: ImageSource, cache_dir: str | os.PathLike | None = None) -> str:
    """``source.content_hash()``, remembered for .npz files by (path, size, mtime) in the cache folder:
    re-hashing 50k 256px images (10 GB) on every evaluation would cost more than reading the cache.
    """
    from fid.data import NpzImages

    if not isinstance(source, NpzImages) or cache_dir is None:
        return source.content_hash()
    st = source.path.stat()
    key = f"{source.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{source.key}"
    memo_path = Path(cache_dir) / "content-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = source.content_hash()
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0))
        os.replace(tmp, memo_path)
    return memo[key]


def _atomic_save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
