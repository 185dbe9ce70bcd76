"""The rehearsal: the ImageNet path end to end, as a user types it, on data made here.

image folder (3 classes; JPEG and PNG; RGB, greyscale, RGBA, CMYK; mixed sizes; a corrupt file, a text file)
-> ``racedit-extract extract`` through a tiny AutoencoderKL with a shift factor (killed with SIGKILL once,
rerun) -> ``verify`` -> ``stats`` -> ``train_imagenet.py`` (Race-DiT with a hyper-connection stream,
checkpoints, sample grids through the VAE; SIGKILL, then ``--resume auto``; the export) -> ``sample.py``
from another working directory (a grid, then ``--num-samples``, both into ``--out DIR``) -> ``racedit-fid ref`` of the same image folder and
``racedit-fid eval`` with a stand-in feature network (``--features``; the Inception path is unchanged)
-> ``racedit-fid leaderboard``, which gains an ``ours`` row.

Every command is a subprocess; every artefact is opened and checked for what it must contain.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from racedit.testing import save_tiny_autoencoder

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["apple", "red fox", "zebra"]  # sorted, as the folder listing orders them; one has a space
SCALING, SHIFT = 0.6, 0.5  # the tiny VAE's own config values (not SD-VAE's 0.18215 and 0)
RES = 32  # pixels; the VAE downsamples by 8 -> 4 x 4 x 4 latents
# (file name, mode, width, height, format): every mode and format the loaders must convert
IMAGES = [
    ("a.jpg", "RGB", 48, 40, "JPEG"),
    ("b.png", "RGB", 32, 56, "PNG"),
    ("c.png", "L", 40, 40, "PNG"),
    ("d.png", "RGBA", 64, 36, "PNG"),
    ("e.jpg", "CMYK", 36, 50, "JPEG"),
    ("f.jpg", "L", 70, 33, "JPEG"),
]
STEPS = 24  # training steps
SAMPLER_STEPS = 4
FEATURES = f"{REPO / 'tests' / 'rehearsal_features.py'}:build"

# Over a minute: about 2 CPU-minutes in all (13 subprocesses, each importing torch), so marked slow; CI runs it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    print(f"{time.monotonic() - t0:6.1f} s  {' '.join(Path(a).name if '/' in a else a for a in args[:4])}")
    if ok:
        assert proc.returncode == 0, (
            f"{' '.join(args)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def kill_when(args: list[str], cwd: Path, ready, what: str) -> None:
    """Start a command, SIGKILL it as soon as ``ready()`` holds; it must not have finished by itself."""
    proc = subprocess.Popen(args, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"{what} ended (code {proc.returncode}) before it could be killed: " + (
            proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        )
        assert time.monotonic() < deadline, f"{what}: nothing happened in 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def make_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for fname, mode, w, h, fmt in IMAGES:
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (c + 1) * 7) % 256, (yy * 5 + 80 * c) % 256, np.full_like(xx, 60 * c)], -1)
            arr = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr).convert(mode)
            img.save(root / name / fname, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    (root / "zebra" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG " * 8)
    (root / "apple" / "readme.txt").write_text("not an image")


def make_vae(path: Path) -> None:
    save_tiny_autoencoder(
        path, num_blocks=4, width=8, sample_size=RES, scaling_factor=SCALING, shift_factor=SHIFT
    )


def grid_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_rehearsal(tmp_path: Path):
    ws = tmp_path / "work"  # the user's working directory
    images = ws / "images" / "train"
    make_images(images)
    make_vae(ws / "tinyvae")
    n_images = len(CLASSES) * len(IMAGES)
    py = sys.executable

    # ------------------------------------------------------------------ 1. latents: extract (killed once), verify, stats
    extract = [py, "-m", "racedit.data", "extract", "--data-dir", "images/train", "--out", "latents",
               "--vae", "tinyvae", "--resolution", str(RES), "--shard-size", "4", "--batch-size", "2",
               "--num-workers", "0"]  # fmt: skip
    first_shard = ws / "latents" / "shard-00000.safetensors"
    kill_when(extract + ["--throttle", "1.0"], ws, first_shard.is_file, "racedit-extract extract")
    assert not (ws / "latents" / "meta.json").exists()  # interrupted: not marked complete
    shard0 = first_shard.read_bytes()
    rerun = run(extract, ws)
    assert "4 of its 5 shards to encode" in rerun.stderr  # the finished shard is kept, not redone
    assert first_shard.read_bytes() == shard0

    verify = run([py, "-m", "racedit.data", "verify", "--root", "latents"], ws)
    assert f"OK: {n_images} images in 5 shards, 3 classes, latents [4, 4, 4]" in verify.stdout
    stats = json.loads(run([py, "-m", "racedit.data", "stats", "--root", "latents", "--json"], ws).stdout)
    assert stats["images"] == n_images and stats["scaling_factor"] == SCALING
    assert len(stats["channel_mean"]) == 4 and np.isfinite(stats["channel_std"]).all()
    assert 0 < stats["std"] < 10

    meta = json.loads((ws / "latents" / "meta.json").read_text())
    assert meta["class_names"] == CLASSES and meta["num_classes"] == 3
    assert meta["num_images"] == n_images and meta["class_counts"] == [len(IMAGES)] * 3
    assert meta["num_excluded"] == 1 and meta["latent_shape"] == [4, 4, 4]
    assert meta["scaling_factor"] == SCALING and meta["shift_factor"] == SHIFT  # taken from the VAE config
    report = json.loads((ws / "latents" / "report.json").read_text())
    assert [e["path"] for e in report["excluded"]] == ["zebra/broken.jpg"]
    assert report["ignored_not_images"] == ["apple/readme.txt"]
    index = load_numpy(ws / "latents" / "index.safetensors")
    assert index["labels"].dtype == np.int64 and sorted(set(index["labels"].tolist())) == [0, 1, 2]
    shard = load_numpy(first_shard)
    assert shard["mean"].dtype == np.float16 and shard["mean"].shape == (4, 2, 4, 4, 4)
    assert np.isfinite(shard["mean"]).all() and (shard["std"] > 0).all()
    # content: the stored posterior mean of the CMYK JPEG is the VAE's encoding of its ADM centre crop
    from diffusers import AutoencoderKL

    from racedit.data.imagefolder import adm_center_crop

    files = json.loads((ws / "latents" / "files.json").read_text())["files"]
    k = [rel for rel, _ in files].index("apple/e.jpg")
    pos = int(np.nonzero(index["file_index"] == k)[0][0])
    offsets = np.concatenate([[0], np.cumsum(index["shard_counts"])])
    s = int(np.searchsorted(offsets, pos, side="right")) - 1
    stored = load_numpy(ws / "latents" / f"shard-{s:05d}.safetensors")["mean"][pos - offsets[s], 0]
    vae = AutoencoderKL.from_pretrained(ws / "tinyvae").eval()
    with Image.open(images / "apple" / "e.jpg") as im:
        crop = adm_center_crop(im.convert("RGB"), RES)
    with torch.no_grad():
        x = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        expected = vae.encode(x).latent_dist.mean[0].numpy()
    # stored as float16: half a unit in the last place, 2^-11 relative, plus the same for the scale
    np.testing.assert_allclose(
        stored.astype(np.float32), expected, rtol=2**-10, atol=2**-10 * abs(expected).max()
    )

    # ------------------------------------------------------------------ 2. training: Race-DiT + HC stream, SIGKILL, resume
    (ws / "rehearsal.yaml").write_text(
        "model:\n  name: RaceDiT-S/2-2in8-HCx2\n  hidden_size: 64\n  depth: 2\n  num_heads: 2\n"
        "  moe: {router: race, gating: identity, plr_weight: 0.01, rsl_weight: 1.0e-4}\n"
        "diffusion: {objective: flow}\n"
        "data: {kind: latents, root: latents}\n"
        f"train: {{output_dir: runs/rh, max_steps: {STEPS}, global_batch_size: 6, lr: 1.0e-3, checkpoint_every: 4,"
        " keep_last: 2, ema_decay: 0.9, num_threads: 1}\n"
        f"sample: {{every: 4, classes: [0, 1, 2], per_class: 2, sampler: euler, steps: {SAMPLER_STEPS}}}\n"
        "log: {every: 1, trackers: [], moe_metrics_every: 4}\n"
    )
    train = [py, str(REPO / "train_imagenet.py"), "--config", "rehearsal.yaml"]
    run_dir = ws / "runs" / "rh"
    ckpts = run_dir / "checkpoints"
    kill_when(train, ws, lambda: (ckpts / "step_00000004").is_dir(), "train_imagenet.py")
    assert not (run_dir / "final").exists()
    grid4 = grid_pixels(run_dir / "samples" / "step_00000004.png")  # written before the step-4 checkpoint
    assert grid4.std() > 5  # decoded through the VAE, not a constant image
    resumed = run(train + ["--resume", "auto"], ws)
    assert "resumed from" in resumed.stderr and f"done at step {STEPS}" in resumed.stdout

    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once, across the kill
    for r in rows:  # the Race-DiT loss terms, all finite
        assert np.isfinite([r["loss"], r["loss_diffusion"], r["loss_plr"], r["loss_rsl"]]).all()
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{STEPS - 4:08d}", f"step_{STEPS:08d}"]
    assert list((run_dir / "routing").glob("heatmap_*.png"))
    final_grid = grid_pixels(run_dir / "samples" / "final.png")
    assert final_grid.std() > 5

    final = run_dir / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["num_classes"] == 3 and config["input_size"] == 4 and config["in_channels"] == 4
    assert config["moe"]["router"] == "race" and config["connection"]["kind"] == "hc"
    assert config["connection"]["rate"] == 2
    sampling = json.loads((final / "sampling.json").read_text())
    assert sampling["space"] == "latent" and sampling["class_names"] == CLASSES
    assert sampling["scaling_factor"] == SCALING and sampling["image_size"] == RES
    exported = load_file(final / "model.safetensors")
    ema = load_file(ckpts / f"step_{STEPS:08d}" / "ema" / "model.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)

    # ------------------------------------------------------------------ 3. sampling from another working directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sample = [
        py,
        str(REPO / "sample.py"),
        "--ckpt",
        str(final),
        "--steps",
        str(SAMPLER_STEPS),
        "--no-progress",
    ]
    run(sample + ["--classes", "red fox", "0", "--num-per-class", "2", "--cfg-scale", "2", "--out", "."],
        elsewhere)  # fmt: skip
    grid = grid_pixels(elsewhere / "grid.png")
    assert grid.std() > 5
    record = json.loads((elsewhere / "grid.json").read_text())
    assert record["classes"] == [1, 0] and record["num_per_class"] == 2

    n_eval = 12
    run(sample + ["--num-samples", str(n_eval), "--out", "evals", "--label-sampling", "balanced",
                  "--cfg-scale", "1.5", "--chunk-size", "5", "--batch-size", "4"], elsewhere)  # fmt: skip
    with np.load(elsewhere / "evals" / "samples.npz") as z:
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (n_eval, RES, RES, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2] * 4
    assert arr.std() > 5
    settings = json.loads((elsewhere / "evals" / "samples.json").read_text())
    assert settings["num_samples"] == n_eval and settings["sampler"] == "euler"

    # The latents the model samples are decoded as the VAE defines: x / scaling_factor + shift_factor.
    # Reference: the same samples (sample i has seed (0, i), whatever the batching) decoded by diffusers.
    from racedit.diffusion import DiffusionConfig, build_objective
    from racedit.models import load_model
    from racedit.sampling import generate

    model = load_model(final)
    objective = build_objective(DiffusionConfig(**sampling["diffusion"]), model.arch.learn_sigma)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / SCALING + SHIFT).sample

    reference = generate(model, torch.from_numpy(labels), objective=objective, sampler="euler",
                         steps=SAMPLER_STEPS, cfg_scale=1.5, seed=0, decode=decode, batch_size=4,
                         quantization=settings["quantization"]).numpy()  # fmt: skip
    diff = np.abs(reference.astype(np.int16) - arr.astype(np.int16))
    # Same model, seeds and sampler: only float summation order may differ (the sampling docs bound it at
    # one grey level on under 1% of pixels across batch sizes); a wrong decode moves every pixel.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"decoded samples differ by up to {diff.max()}"

    # ------------------------------------------------------------------ 4. evaluation and the leaderboard
    fid_common = ["--features", FEATURES, "--cache-dir", str(tmp_path / "fid-cache"), "--no-progress"]
    run([py, "-m", "fid", "ref", str(images), "--npz", "ref/ref.npz", "--image-size", str(RES), *fid_common],
        elsewhere)  # fmt: skip
    with np.load(elsewhere / "ref" / "ref.npz") as z:
        ref_images = z["arr_0"]
        mu, sigma, mu_s = z["mu"], z["sigma"], z["mu_s"]
        ref_meta = json.loads(str(z["racedit_meta"]))
    assert ref_images.dtype == np.uint8 and ref_images.shape == (n_images, RES, RES, 3)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu_s.shape == (2023,)
    assert [entry.split(" ")[0] for entry in ref_meta["skipped_unreadable"]] == ["zebra/broken.jpg"]
    assert "rehearsal-stand-in" in ref_meta["network"]

    evaluation = run([py, "-m", "fid", "eval", "evals", "--ref", "ref/ref.npz", "--is-split-size", "6",
                      "--meta", "model=RaceDiT-rehearsal", *fid_common], elsewhere)  # fmt: skip
    assert "not the reference Inception" in evaluation.stderr
    record = json.loads((elsewhere / "evals" / "fid-ref.fid.json").read_text())
    assert record["sample_settings"]["num_samples"] == n_eval  # samples.json found beside samples.npz
    m = record["metrics"]
    assert record["num_samples"] == n_eval and record["evaluator"]["comparable_with_literature"] is False
    assert "rehearsal-stand-in" in record["evaluator"]["network"]
    assert all(np.isfinite(m[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall"))
    # the FID is the Frechet distance of the stand-in features of the samples to the reference statistics
    sys.path.insert(0, str(REPO / "tests"))
    from rehearsal_features import build

    from fid import feature_statistics, frechet_distance

    pool, _ = build().features(torch.from_numpy(arr).permute(0, 3, 1, 2))
    stats = feature_statistics(pool.double().numpy())
    expected_fid = frechet_distance(stats.mu, stats.sigma, mu, sigma)
    assert m["fid"] == pytest.approx(expected_fid, rel=1e-6)  # float64 statistics on both sides
    assert m["fid"] > 0

    run([py, "-m", "fid", "leaderboard", "evals", "--out", "lb", "--include-test-records"], elsewhere)
    with open(elsewhere / "lb" / "leaderboard.csv", newline="") as f:
        board = list(csv.DictReader(f))
    ours = [r for r in board if r["source"] == "ours"]
    assert len(ours) == 1 and ours[0]["model"] == "RaceDiT-rehearsal"
    assert float(ours[0]["fid"]) == pytest.approx(m["fid"]) and "not an FID" in ours[0]["notes"]
    assert any(r["source"] == "published" for r in board)
    assert "RaceDiT-rehearsal" in (elsewhere / "lb" / "leaderboard.md").read_text()
    from fid.leaderboard import gather_rows

    with pytest.warns(UserWarning, match="stand-in"):  # without the flag a test record stays off the board
        assert [r for r in gather_rows([elsewhere / "evals"]) if r["source"] == "ours"] == []
