"""sample.py end to end: grid (latent model + tiny VAE), ADM .npz + JSON, resume after SIGKILL, and the
same file from 1 and 2 processes (torchrun, gloo on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sampling_helpers import make_tiny_model
from test_sampling_io import _tiny_vae_dir

import racedit
from racedit.cli.sample import build_parser, main
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.sampling import generate, write_sampling_meta

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_help_explains_every_flag():
    text = build_parser().format_help()
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    for flag in (
        "--ckpt",
        "--classes",
        "--guidance-interval",
        "--guidance-channels",
        "--out",
        "--quantization",
    ):
        assert flag in text


def test_grid_from_latent_model_with_local_vae(tmp_path):
    vae_dir = _tiny_vae_dir(tmp_path / "vae")
    model_dir = tmp_path / "latent"
    racedit.save_model(make_tiny_model(in_channels=4), model_dir)
    write_sampling_meta(model_dir, space="latent", vae=str(vae_dir), scaling_factor=0.5, image_size=16)
    out = tmp_path / "grids" / "grid.png"  # --out DIR: the grid has a fixed name inside it
    args = ["--ckpt", str(model_dir), "--classes", "3", "7", "--num-per-class", "2", "--steps", "3"]
    assert main([*args, "--sampler", "ddim", "--out", str(out.parent), "--no-progress"]) == 0
    from PIL import Image

    w, h = Image.open(out).size
    assert w > 2 * 96 and h > 2 * 96  # 16 px tiles upscaled to >= 96 px, 2 x 2
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["vae"] == str(vae_dir) and record["sampler"] == "ddim" and record["cfg_scale"] == 4.0
    assert record["classes"] == [3, 7] and record["weights_sha256"]


def test_npz_layout_json_record_and_values(tmp_path, pixel_model_dir):
    npz = tmp_path / "s" / "samples.npz"  # --out DIR: the file names inside are fixed
    args = ["--ckpt", str(pixel_model_dir), "--num-samples", "6", "--out", str(npz.parent), "--steps", "4"]
    assert main([*args, "--chunk-size", "4", "--batch-size", "3", "--seed", "5", "--no-progress"]) == 0
    with np.load(npz) as f:
        assert f.files == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert not npz.with_name("samples.parts").exists()  # merged and cleaned up
    record = json.loads(npz.with_suffix(".json").read_text())
    for key in ("sampler", "steps", "cfg_scale", "guidance_interval", "guidance_channels", "quantization",
                "num_samples", "label_sampling", "diffusion", "weights_sha256", "seed", "vae", "params"):  # fmt: skip
        assert key in record
    assert record["cfg_scale"] == 1.5 and record["num_samples"] == 6 and record["space"] == "pixel"
    # the file holds exactly what generate() gives for these labels and indices
    model = racedit.load_model(pixel_model_dir)
    obj = build_objective(DiffusionConfig(), model.arch.learn_sigma)
    ref = generate(model, labels, objective=obj, sampler="ddpm", steps=4, cfg_scale=1.5, seed=5, batch_size=6)
    assert np.abs(ref.numpy().astype(int) - images.astype(int)).max() <= 1
    # rerunning with other settings into the same file's parts is refused; same settings: nothing to do
    assert main([*args, "--chunk-size", "4", "--seed", "5", "--no-progress"]) == 0


def test_kill_then_resume_keeps_finished_chunks(tmp_path, pixel_model_dir, capsys):
    npz = tmp_path / "k" / "samples.npz"
    parts = tmp_path / "k" / "samples.parts"
    args = ["--ckpt", str(pixel_model_dir), "--num-samples", "30", "--out", str(npz.parent), "--steps", "40"]
    args += ["--chunk-size", "1", "--keep-chunks", "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args], env=ENV, cwd=tmp_path)
    try:
        deadline = time.time() + 600  # a bound on waiting, not a timing check
        while time.time() < deadline and not list(parts.glob("chunk_*.npz")):
            assert proc.poll() is None, "sample.py ended before writing a chunk"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk_*.npz")}
    assert 1 <= len(before) < 30, "the kill must interrupt the run"
    assert not npz.exists()
    assert main(args) == 0
    out = capsys.readouterr().err  # a message, not a result
    assert f"{len(before)} already done, {30 - len(before)} to go" in out
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk_*.npz")}
    assert len(after) == 30 and all(after[name] == mtime for name, mtime in before.items())  # not recomputed
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    model = racedit.load_model(pixel_model_dir)
    obj = build_objective(DiffusionConfig(), True)
    for i in (0, 29):  # one made before the kill, one after
        ref = generate(
            model, labels[i : i + 1], objective=obj, sampler="ddpm", steps=40, cfg_scale=1.5, first_index=i
        )
        assert np.abs(ref[0].numpy().astype(int) - images[i].astype(int)).max() <= 1


def test_one_and_two_processes_give_the_same_file(tmp_path, pixel_model_dir):
    common = ["--ckpt", str(pixel_model_dir), "--num-samples", "10", "--steps", "5", "--chunk-size", "3"]
    common += ["--sampler", "ddim", "--no-progress", "--batch-size", "2"]
    one, two = tmp_path / "one" / "samples.npz", tmp_path / "two" / "samples.npz"
    assert main([*common, "--out", str(one.parent)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run(
        [*cmd, str(ROOT / "sample.py"), *common, "--out", str(two.parent)],
        env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "terminate called" not in res.stderr  # both ranks left the process group cleanly
    assert "over 2 process(es)" in res.stderr
    with np.load(one) as a, np.load(two) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_settings_mismatch_is_refused(tmp_path, pixel_model_dir, capsys):
    base = [
        "--ckpt",
        str(pixel_model_dir),
        "--num-samples",
        "3",
        "--out",
        str(tmp_path / "m"),
        "--steps",
        "2",
        "--no-progress",
    ]
    (tmp_path / "m" / "samples.parts").mkdir(parents=True)
    (tmp_path / "m" / "samples.parts" / "settings.json").write_text(json.dumps({"seed": 99}))
    assert main(base) == 2
    assert "other settings" in capsys.readouterr().err


def test_bad_flag_combinations(pixel_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # --out is a folder, not the grid's file name
        main(["--ckpt", str(pixel_model_dir), "--steps", "2", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out is the output folder" in err and f"--out {tmp_path}" in err
    with pytest.raises(SystemExit):  # the euler sampler does not fit a ddpm model
        main(["--ckpt", str(pixel_model_dir), "--sampler", "euler", "--steps", "2", "--out", str(tmp_path)])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "grid.png").exists()
