"""One evaluation: samples + reference batch -> FID, sFID, IS, precision/recall (+ KID, CMMD, CLIP score),
and its record."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from fid.clip import ClipEmbedder


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
    cmmd: float | None = None  # CLIP-MMD against the reference batch's images (fid.cmmd)
    clip_score: float | None = None  # 100 * max(cos(image, prompt of its class), 0), mean (fid.clip)


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
    clip: ClipEmbedder | None = None,
    cmmd: bool = False,
    clip_score: bool = False,
    class_names: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
    record_path: str | os.PathLike | None = None,
    write: bool = True,
) -> tuple[EvalResult, dict[str, Any]] | None:
    """Evaluate samples against an ADM-format reference batch; writes the JSON record (process 0).

    ``cmmd`` / ``clip_score`` need ``clip`` (``fid.clip.ClipEmbedder``); CMMD compares with the reference
    batch's images (``arr_0``), the CLIP score needs the samples' labels (``arr_1``) and ``class_names``
    (default: the ImageNet-1k names). The CLIP embeddings are computed by process 0.
    Returns (result, record) on process 0 and None on the others.
    """
    if (cmmd or clip_score) and clip is None:
        raise ValueError("cmmd / clip_score need a CLIP model: clip=fid.clip.ClipEmbedder.from_pretrained()")
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
    clip_record = None
    if cmmd or clip_score:
        clip_record = _clip_metrics(
            result, src, feats.content_hash, reference, ref, clip, cmmd, clip_score, class_names,
            batch_size=batch_size, device=device, cache_dir=cache_dir, use_cache=use_cache, progress=progress,
        )  # fmt: skip
    skip = ("kid", "kid_std") + tuple(k for k in ("cmmd", "clip_score") if getattr(result, k) is None)
    metrics = {k: v for k, v in asdict(result).items() if k not in skip}
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
            "clip": clip_record,
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


def _clip_metrics(
    result: EvalResult,
    src: ImageSource,
    content_hash: str,
    reference_path: str | os.PathLike,
    ref: Reference,
    clip: ClipEmbedder,
    want_cmmd: bool,
    want_clip_score: bool,
    class_names: Sequence[str] | None,
    *,
    batch_size: int,
    device: Any,
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    progress: bool,
) -> dict[str, Any]:
    """Fills ``result.cmmd`` / ``result.clip_score``; returns the record's description of how."""
    from fid.clip import PROMPT_TEMPLATE, clip_score_of_samples, embed_source, sample_labels
    from fid.cmmd import SCALE, SIGMA
    from fid.cmmd import cmmd as cmmd_fn
    from fid.data import NpzImages

    labels = sample_labels(src) if want_clip_score else None  # fail before any embedding on a bad input
    clip.to(device if device is not None else default_device())
    kw = {"batch_size": batch_size, "cache_dir": cache_dir, "use_cache": use_cache, "progress": progress}
    gen, gen_cached = embed_source(src, clip, content_hash=content_hash, desc="CLIP samples", **kw)
    record: dict[str, Any] = {**clip.identity, "samples_from_cache": gen_cached}
    if want_cmmd:
        ref_images = NpzImages(Path(reference_path))
        real, real_cached = embed_source(
            ref_images, clip, content_hash=ref.features.content_hash, desc="CLIP reference", **kw
        )
        result.cmmd = cmmd_fn(real, gen)
        record["cmmd"] = {
            "kernel": f"Gaussian RBF, sigma {SIGMA:g}",
            "scale": SCALE,
            "estimator": "minimum-variance (biased): means over all pairs, diagonal included",
            "real_images": f"reference arr_0 ({real.shape[0]} images)",
            "reference_from_cache": real_cached,
        }
    if want_clip_score:
        from racedit.sampling.classes import imagenet_class_names

        names = list(class_names) if class_names is not None else list(imagenet_class_names())
        result.clip_score = clip_score_of_samples(clip, gen, labels, names)
        record["clip_score"] = {
            "prompt_template": PROMPT_TEMPLATE,
            "class_names": "ImageNet-1k (racedit/assets/imagenet_classes.txt)"
            if class_names is None
            else "given",
            "score": "mean over samples of 100 * max(cos(image, prompt of its label), 0)",
        }
    return record
