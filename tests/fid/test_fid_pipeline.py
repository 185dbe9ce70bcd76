"""End to end with a seeded random Inception: inputs, reference building, cache, records, leaderboard."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fid.data import NpzImages, open_images
from fid.evaluate import evaluate
from fid.features import extract_features
from fid.leaderboard import gather_rows, write_leaderboard
from fid.reference import build_reference, load_reference
from racedit.cli.fid import main


def test_spatial_features_are_mixed_6d_1x1_branch_in_tf_layout(random_inception, tiny_images):
    captured = {}
    handle = random_inception.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: captured.setdefault("out", o.clone())
    )
    try:
        x = torch.from_numpy(tiny_images["samples"][:2]).permute(0, 3, 1, 2)
        with torch.no_grad():
            pool, spatial = random_inception.features(x)
    finally:
        handle.remove()
    raw = captured["out"]  # (2, 192, 17, 17), post-ReLU
    assert raw.shape == (2, 192, 17, 17) and (raw >= 0).all()
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    nhwc = spatial.reshape(2, 17, 17, 7)
    torch.testing.assert_close(nhwc[1, 3, 5], raw[1, :7, 3, 5], rtol=0, atol=0)  # [n, h, w, c] = [n, c, h, w]
    torch.testing.assert_close(nhwc.permute(0, 3, 1, 2), raw[:, :7], rtol=0, atol=0)


def test_pipeline_deterministic_every_metric_cache_and_records(
    tmp_path, random_inception, tiny_images, capsys
):
    cache = tmp_path / "cache"
    # reference batch built from a PNG folder (ADM format), samples as a sample.py output folder
    ref_dir = tmp_path / "ref_png"
    ref_dir.mkdir()
    for i, im in enumerate(tiny_images["ref"]):
        Image.fromarray(im).save(ref_dir / f"{i:03d}.png")
    ref_npz = build_reference(
        ref_dir,
        tmp_path / "ref.npz",
        random_inception,
        num_ref_images=5,
        seed=1,
        cache_dir=cache,
        progress=False,
    )
    with np.load(ref_npz) as z:
        assert z["arr_0"].shape == (5, 16, 16, 3) and z["arr_0"].dtype == np.uint8
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048) and z["mu"].dtype == np.float64
        assert z["mu_s"].shape == (2023,) and z["sigma_s"].shape == (2023, 2023)
        assert json.loads(str(z["racedit_meta"]))["num_images_statistics"] == 6
        subset = z["arr_0"]
    assert any(np.array_equal(subset[0], im) for im in tiny_images["ref"])  # lossless PNG round trip

    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "samples.npz", arr_0=tiny_images["samples"], arr_1=np.arange(6))
    settings = {"model": {"name": "RaceDiT-B/2-2in8"}, "params_activated": 1.35e8, "sampler": "euler",
                "num_steps": 50, "cfg_scale": 1.5, "train_iterations": 1000}  # fmt: skip
    (run / "samples.json").write_text(json.dumps(settings))

    kw = dict(cache_dir=cache, progress=False, is_split_size=3, pr_chunk=4, kid=True)
    result, record = evaluate(run, ref_npz, random_inception, meta={"train_batch_size": 256}, **kw)
    values = [result.fid, result.sfid, result.inception_score, result.inception_score_std, result.precision,
              result.recall, result.kid, result.kid_std]  # fmt: skip
    assert all(math.isfinite(v) for v in values)
    assert result.fid > 0 and result.sfid > 0 and result.inception_score > 1.0
    assert 0.0 <= result.precision <= 1.0 and 0.0 <= result.recall <= 1.0
    assert result.num_samples == 6 and result.num_ref_images == 5
    assert record["evaluator"]["features_from_cache"] is False
    assert record["evaluator"]["is_num_splits"] == 2 and not record["evaluator"]["comparable_with_literature"]

    # the record: written next to the samples, with the sample.py fields copied
    saved = json.loads((run / "fid-ref.fid.json").read_text())
    assert saved["metrics"]["fid"] == result.fid and saved["extra_metrics"]["kid"] == result.kid
    assert "outside the ADM protocol" in saved["extra_metrics"]["note"]
    r = saved["run"]
    assert (r["model"], r["sampler"], r["sampling_steps"], r["cfg_scale"]) == (
        "RaceDiT-B/2-2in8",
        "euler",
        50,
        1.5,
    )
    assert r["params_activated"] == 1.35e8 and r["train_iterations"] == 1000 and r["train_batch_size"] == 256
    assert saved["sample_settings"] == settings and saved["num_samples"] == 6
    assert saved["reference"]["statistics_from"] == "file" and saved["reference"]["num_images"] == 5
    assert saved["evaluator"]["network"].endswith("random-init-seed-0")

    # second evaluation of the same content, through the command line (a bare .npz this time): features
    # come from the cache, numbers are identical
    out = tmp_path / "evals" / f"fid-{ref_npz.stem}.fid.json"  # --out DIR: the record has a fixed name
    argv = ["eval", str(run / "samples.npz"), "--ref", str(ref_npz), "--random-inception", "0", "--cache-dir",
            str(cache), "--no-progress", "--is-split-size", "3", "--pr-chunk", "4", "--out", str(out.parent)]  # fmt: skip
    assert main(argv) == 0
    assert f"{result.fid:.4f}" in capsys.readouterr().out
    record2 = json.loads(out.read_text())
    assert record2["evaluator"]["features_from_cache"] is True
    assert record2["metrics"] == saved["metrics"] and record2["extra_metrics"] is None

    # a direct extraction (no cache) reproduces the cached features exactly: the pipeline is deterministic
    fresh = extract_features(
        NpzImages(run / "samples.npz"), random_inception, use_cache=False, progress=False
    )
    cached = extract_features(open_images(run), random_inception, cache_dir=cache, progress=False)
    assert cached.from_cache and not fresh.from_cache
    np.testing.assert_array_equal(fresh.pool, cached.pool)
    np.testing.assert_array_equal(fresh.spatial, cached.spatial)

    # the reference's arr_0 features came from the cache primed by build_reference, and match its statistics
    ref = load_reference(ref_npz, random_inception, cache_dir=cache, progress=False)
    assert ref.features.from_cache and ref.stats_source == "file"

    # leaderboard: the random-Inception record is refused; published rows stay, marked published
    with pytest.warns(UserWarning, match="random-init"):
        rows = gather_rows([tmp_path])
    assert rows and all(row["source"] == "published" for row in rows)
    saved["evaluator"]["comparable_with_literature"] = True  # pretend it was the real network
    (tmp_path / "real.fid.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning):
        paths = write_leaderboard([tmp_path], tmp_path / "board")
    md = paths["markdown"].read_text()
    assert "| RaceDiT-B/2-2in8 | ours |" in md and "| DiT-XL/2 | published | 2.27 |" in md
    assert paths["plot"].stat().st_size > 1000
    csv_text = paths["csv"].read_text()
    assert csv_text.count("published") >= 9 and "RaceDiT-B/2-2in8,ours" in csv_text


def test_npz_png_folder_and_array_inputs_agree(tmp_path, tiny_images):
    imgs = tiny_images["samples"][:3]
    np.savez(tmp_path / "a.npz", arr_0=imgs)
    folder = tmp_path / "png"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    a, b = open_images(tmp_path / "a.npz"), open_images(folder)
    np.testing.assert_array_equal(np.concatenate(list(a.batches(0, 3, 2))), imgs)
    np.testing.assert_array_equal(np.concatenate(list(b.batches(1, 3, 1))), imgs[1:])
    np.testing.assert_array_equal(next(iter(a.batches(2, 3, 5))), imgs[2:])  # streaming from an offset
    np.savez(tmp_path / "bad.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        open_images(tmp_path / "bad.npz")
