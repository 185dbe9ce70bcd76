"""One evaluation: samples + reference batch -> FID, sFID, IS, precision/recall (+ KID), and its record."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fid.data import ImageSource, open_images
from fid.features import default_device, extract_features, process_rank
from fid.inception import InceptionFeatures
from fid.metrics import (
    feature_statistics,
    fid_from_statistics,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from fid.record import build_record, default_record_path, write_record
from fid.reference import Reference, load_reference


@dataclass
class EvalResult:
    """ADM's five numbers (+ KID when asked). IS std is over the splits."""

    fid: float
    sfid: float
    inception_score: float
    inception_score_std: float
    precision: float
    recall: float
    num_samples: int
    num_ref_images: int
    kid: float | None = None
    kid_std: float | None = None


def compute_metrics(
    pool: np.ndarray,
    spatial: np.ndarray,
    reference: Reference,
    model: InceptionFeatures,
    *,
    is_split_size: int = 5000,
    pr_k: int = 3,
    pr_chunk: int = 10000,
    pr_precision: str = "adm",
    kid: bool = False,
    device: Any = None,
) -> EvalResult:
    """Metrics from sample features (pool (N, 2048), spatial (N, 2023)) against a loaded reference."""
    fid = fid_from_statistics(feature_statistics(pool), reference.stats)
    sfid = fid_from_statistics(feature_statistics(spatial), reference.stats_spatial)
    is_mean, is_std = inception_score(model.unbiased_logits(_t(pool)), split_size=is_split_size)
    prec, rec = precision_recall(
        reference.features.pool, pool, k=pr_k, chunk=pr_chunk, precision=pr_precision, device=device
    )
    result = EvalResult(fid, sfid, is_mean, is_std, prec, rec, int(pool.shape[0]), reference.num_images)
    if kid:
        result.kid, result.kid_std = kernel_inception_distance(reference.features.pool, pool)
    return result


def _t(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def evaluate(
    samples: str | os.PathLike | ImageSource,
    reference: str | os.PathLike,
    model: InceptionFeatures,
    *,
    batch_size: int = 64,
    device: Any = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    image_size: int | None = None,
    settings_path: str | os.PathLike | None = None,
    is_split_size: int = 5000,
    pr_k: int = 3,
    pr_chunk: int = 10000,
    pr_precision: str = "adm",
    kid: bool = False,
    meta: dict[str, Any] | None = None,
    record_path: str | os.PathLike | None = None,
    write: bool = True,
) -> tuple[EvalResult, dict[str, Any]] | None:
    """Evaluate samples against an ADM-format reference batch; writes the JSON record (process 0).

    Returns (result, record) on process 0 and None on the others.
    """
    src = samples if not isinstance(samples, str | os.PathLike) else None
    if src is None:
        src = open_images(samples, image_size=image_size, settings_path=settings_path)
    extract = {"batch_size": batch_size, "device": device, "cache_dir": cache_dir, "use_cache": use_cache}
    ref = load_reference(reference, model, progress=progress, **extract)
    feats = extract_features(src, model, progress=progress, desc="samples", **extract)
    if process_rank() != 0:
        return None
    result = compute_metrics(
        feats.pool,
        feats.spatial,
        ref,
        model,
        is_split_size=is_split_size,
        pr_k=pr_k,
        pr_chunk=pr_chunk,
        pr_precision=pr_precision,
        kid=kid,
        device=device if device is not None else default_device(),
    )
    metrics = {k: v for k, v in asdict(result).items() if k not in ("kid", "kid_std")}
    extra = None
    if kid:
        extra = {
            "kid": result.kid,
            "kid_std": result.kid_std,
            "note": "KID is outside the ADM protocol: polynomial kernel (x.y/2048+1)^3, 100 subsets of "
            "min(1000, N) drawn with seed 0, samples vs the reference batch's images",
        }
    record = build_record(
        metrics=metrics,
        extra_metrics=extra,
        samples={
            "path": src.describe(),
            "content_hash": feats.content_hash,
            "num_images": src.num_images,
            "image_shape": list(src.image_shape),
            "settings_path": str(src.settings_path) if src.settings_path else None,
        },
        reference={
            "path": str(Path(reference).resolve()),
            "name": Path(reference).name,
            "arr_0_content_hash": ref.features.content_hash,
            "num_images": ref.num_images,
            "statistics_from": ref.stats_source,
            "meta": ref.meta,
        },
        evaluator={
            "network": model.identity,
            "inception_weights_sha256": model.weights_id if model.is_reference_network else None,
            "comparable_with_literature": model.is_reference_network,
            "features_from_cache": feats.from_cache,
            "is_split_size": is_split_size,
            "is_num_splits": -(-src.num_images // is_split_size),
            "pr_k": pr_k,
            "pr_distance_precision": pr_precision,
        },
        settings=src.settings,
        meta=meta,
    )
    if write:
        if record_path is None:
            if isinstance(samples, str | os.PathLike):
                record_path = default_record_path(samples, reference)
            else:
                raise ValueError("record_path is required when samples are not a path")
        write_record(record, record_path)
        record["record_path"] = str(record_path)
    return result, record
