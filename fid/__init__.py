"""ADM-protocol evaluation: FID, sFID, Inception Score, precision/recall (+ KID), reference batches,
provenance records and the leaderboard. Spec: docs/spec/evaluation.md. Command: ``python -m fid`` / ``racedit-fid``.

Public functions for external checks: :func:`frechet_distance` (float64, eigen-based trace term),
:func:`inception_score`, :func:`precision_recall`, :func:`kernel_inception_distance`, :func:`cmmd`
(CLIP-MMD on given embeddings; the CLIP model itself is in ``fid.clip``, optional extra ``racedit[clip]``).
"""

from fid.cmmd import cmmd
from fid.metrics import (
    Statistics,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from fid.record import METRIC_VERSION
from fid.weights import InceptionWeightsError, resolve_inception_weights

__all__ = [
    "METRIC_VERSION",
    "InceptionWeightsError",
    "Statistics",
    "cmmd",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
    "resolve_inception_weights",
]
