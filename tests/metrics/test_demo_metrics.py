"""Demo metrics: the classifier recognises real digits, the report scores real digits high and noise low."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from racedit.data import DataConfig, build_dataset
from racedit.metrics.demo import demo_report, frechet, images_to_input, to_uint8_rgb


def test_uint8_round_trip() -> None:
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    back = images_to_input(to_uint8_rgb(x))
    assert back.shape == (1, 1, 8, 8) and (back - x).abs().max() < 1 / 127.5 + 1e-6


def test_frechet_is_zero_for_identical_sets_and_grows_with_shift() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 4, generator=g)
    # float64 statistics of 4-d features with eigenvalues ~1: round-off ~ d * eps ~ 1e-15
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet(a, a + 1.0) == pytest.approx(4.0, rel=1e-6)


def test_report_scores_real_digits_high_and_noise_low(tmp_path: Path) -> None:
    held = build_dataset(DataConfig(kind="digits"), split="heldout")
    by_class = {c: [held[i][0] for i in range(len(held)) if held[i][1] == c] for c in range(10)}

    def real_sampler(labels: list[int], seed: int) -> np.ndarray:  # a "perfect generator": held-out digits
        return to_uint8_rgb(torch.stack([by_class[c][i % len(by_class[c])] for i, c in enumerate(labels)]))

    def noise_sampler(labels: list[int], seed: int) -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        return to_uint8_rgb(torch.rand(len(labels), 1, 8, 8, generator=g) * 2 - 1)

    good = demo_report(
        DataConfig(kind="digits"),
        real_sampler,
        per_class=10,
        seed=0,
        out_dir=tmp_path / "a",
        log=lambda m: None,
    )
    bad = demo_report(
        DataConfig(kind="digits"),
        noise_sampler,
        per_class=10,
        seed=0,
        out_dir=tmp_path / "b",
        log=lambda m: None,
    )
    assert good["heldout_real"]["accuracy"] > 0.9  # the classifier itself works
    assert good["generated"]["accuracy"] > 0.9 and min(good["generated"]["per_class_accuracy"]) >= 0.6
    assert bad["generated"]["accuracy"] < 0.35
    assert bad["generated"]["frechet_vs_train"] > 5 * good["generated"]["frechet_vs_train"]
    assert "demo metrics" in (tmp_path / "a" / "report.md").read_text()
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert len(saved["generated"]["per_class_accuracy"]) == 10 and "real_fid" in saved
    assert (tmp_path / "a" / "scored_samples.png").is_file()
