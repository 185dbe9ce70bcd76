"""Reference batches: ADM's ``VIRTUAL_imagenet256_labeled.npz`` format, read or built from a folder.

Format (ADM's reference batch): ``arr_0`` uint8 (N_ref, H, W, 3) reference images (10,000 for
ImageNet; their features serve precision/recall and KID), ``mu``/``sigma`` (pool_3 statistics, 2048)
and ``mu_s``/``sigma_s`` (spatial statistics, 2023) in float64, computed over the whole reference set.
A batch built here adds ``racedit_meta`` (a JSON string: source, counts, network) which ADM ignores.
As in ADM, a file without ``mu`` gets its statistics from the features of its ``arr_0``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fid.data import ArrayImages, FolderImages, NpzImages, open_images
from fid.features import Features, extract_features, process_rank
from fid.inception import InceptionFeatures
from fid.metrics import Statistics, feature_statistics

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class Reference:
    """A loaded reference batch: statistics for FID/sFID and features of its images for P/R and KID."""

    path: Path
    stats: Statistics  # pool_3, D = 2048
    stats_spatial: Statistics  # mixed_6/conv, D = 2023
    features: Features  # of arr_0
    stats_source: str  # "file" (mu/sigma stored) or "arr_0" (computed from the images' features)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.features.pool.shape[0])


def load_reference(
    path: str | os.PathLike,
    model: InceptionFeatures,
    **extract_kwargs: Any,
) -> Reference:
    """Read an ADM-format reference ``.npz`` and compute (or load from the cache) its images' features."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(
            f"reference {p} is a folder: build a reference batch first with "
            f"`racedit-fid ref {p} --out ref.npz` (ADM's .npz format), then pass --ref ref.npz"
        )
    with zipfile.ZipFile(p) as zf:
        keys = {n.removesuffix(".npy") for n in zf.namelist()}
    images = NpzImages(p)
    feats = extract_features(images, model, desc="reference", **extract_kwargs)
    meta: dict[str, Any] = {}
    with np.load(p) as z:
        if "racedit_meta" in keys:
            meta = json.loads(str(z["racedit_meta"]))
        if set(STAT_KEYS) <= keys:
            stats = Statistics(z["mu"].astype(np.float64), z["sigma"].astype(np.float64))
            stats_s = Statistics(z["mu_s"].astype(np.float64), z["sigma_s"].astype(np.float64))
            source = "file"
        else:
            stats, stats_s, source = (
                feature_statistics(feats.pool),
                feature_statistics(feats.spatial),
                "arr_0",
            )
    if stats.mu.shape != (2048,) or stats_s.mu.shape != (2023,):
        raise ValueError(
            f"{p}: statistics have shapes mu {stats.mu.shape}, mu_s {stats_s.mu.shape}; expected (2048,) and "
            f"(2023,) (pool_3 and mixed_6/conv[..., :7] of the 2015-12-05 Inception)"
        )
    return Reference(p, stats, stats_s, feats, source, meta)


def build_reference(
    source_path: str | os.PathLike,
    out: str | os.PathLike,
    model: InceptionFeatures,
    *,
    num_ref_images: int = 10000,
    seed: int = 0,
    image_size: int | None = None,
    **extract_kwargs: Any,
) -> Path:
    """Statistics over every image of a folder (or .npz) plus a seeded subset of ``num_ref_images``
    images as ``arr_0``, saved in ADM's reference format at ``out``. Returns ``out``.
    """
    src = open_images(source_path, image_size=image_size, for_reference=True)
    feats = extract_features(src, model, desc="reference statistics", **extract_kwargs)
    stats, stats_s = feature_statistics(feats.pool), feature_statistics(feats.spatial)
    n = src.num_images
    if n <= num_ref_images:
        idx = np.arange(n)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n, num_ref_images, replace=False))
    subset = _gather_subset(src, idx)  # (N_ref, H, W, 3) uint8
    meta = {
        "source": str(Path(source_path).resolve()),
        "source_content_hash": feats.content_hash,
        "num_images_statistics": int(n),
        "num_images_arr_0": int(len(idx)),
        "subset_seed": seed,
        "image_size": image_size,
        "network": model.identity,
        "skipped_unreadable": list(getattr(src, "skipped", [])),
    }
    out = Path(out)
    if process_rank() != 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        arr_0=subset,
        mu=stats.mu,
        sigma=stats.sigma,
        mu_s=stats_s.mu,
        sigma_s=stats_s.sigma,
        racedit_meta=np.array(json.dumps(meta)),
    )
    # The subset's features are already known: prime the cache so the first evaluation skips them.
    sub_feats = Features(feats.pool[idx], feats.spatial[idx], "")
    _prime_cache(NpzImages(out), model, sub_feats, extract_kwargs)
    return out


def _gather_subset(src, idx: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Images ``idx`` (sorted) of a source, read in one pass."""
    if isinstance(src, ArrayImages):
        return src.array[idx]
    if isinstance(src, FolderImages):
        return np.stack([src.load(int(i)) for i in idx])
    out, wanted = [], set(idx.tolist())
    for b0, batch in zip(range(0, src.num_images, batch_size), src.batches(0, src.num_images, batch_size)):
        out.extend(batch[i - b0] for i in range(b0, b0 + len(batch)) if i in wanted)
    return np.stack(out)


def _prime_cache(images: NpzImages, model: InceptionFeatures, feats: Features, extract_kwargs: dict) -> None:
    from fid.features import _atomic_save, cache_key, default_cache_dir, memoized_content_hash

    if not extract_kwargs.get("use_cache", True):
        return
    cache_dir = Path(extract_kwargs.get("cache_dir") or default_cache_dir())
    key = cache_key(memoized_content_hash(images, cache_dir), model)
    _atomic_save(cache_dir / f"{key}.npz", pool=feats.pool, spatial=feats.spatial)
