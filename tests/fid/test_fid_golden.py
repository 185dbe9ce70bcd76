"""Opt-in: reproduce ADM's golden numbers (docs/spec/evaluation.md, "Golden numbers").

Needs ADM's sample batch, its reference batch and the Inception weights; skipped when any is absent:
  RACEDIT_FID_GOLDEN_SAMPLES=/path/admnet_guided_upsampled_imagenet256.npz
  RACEDIT_FID_GOLDEN_REF=/path/VIRTUAL_imagenet256_labeled.npz
  weights: RACEDIT_INCEPTION_WEIGHTS or $TORCH_HOME/hub/checkpoints/ (see `racedit-fid weights`)
Takes minutes on a GPU (60,000 images through Inception), hours on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fid.weights import InceptionWeightsError, resolve_inception_weights

GOLDEN = {"inception_score": 215.84, "fid": 3.9426, "sfid": 6.1404, "precision": 0.8265, "recall": 0.5309}
TOLERANCE = {"fid": 0.01, "sfid": 0.05, "inception_score": 1.0, "precision": 0.005, "recall": 0.005}


def _inputs():
    samples, ref = os.environ.get("RACEDIT_FID_GOLDEN_SAMPLES"), os.environ.get("RACEDIT_FID_GOLDEN_REF")
    if not samples or not ref or not Path(samples).is_file() or not Path(ref).is_file():
        pytest.skip("set RACEDIT_FID_GOLDEN_SAMPLES and RACEDIT_FID_GOLDEN_REF to ADM's .npz files")
    try:
        resolve_inception_weights()
    except InceptionWeightsError as e:
        pytest.skip(f"Inception weights unavailable: {str(e).splitlines()[0]}")
    return samples, ref


@pytest.mark.golden
@pytest.mark.slow
def test_adm_golden_numbers(tmp_path):
    samples, ref = _inputs()
    from fid.evaluate import evaluate
    from fid.inception import InceptionFeatures

    model = InceptionFeatures.from_weights()
    result, _ = evaluate(samples, ref, model, record_path=tmp_path / "golden.fid.json", batch_size=100)
    assert result.num_samples == 50000
    for name, want in GOLDEN.items():
        got = getattr(result, name)
        assert abs(got - want) <= TOLERANCE[name], (
            f"{name}: {got:.4f} vs ADM {want} (tolerance {TOLERANCE[name]})"
        )
