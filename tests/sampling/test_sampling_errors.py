"""sample.py as a hostile user meets it: bad numbers refused at parse time, broken checkpoints reported in
one line (a traceback only with --debug), a VAE path that works from any directory, and a corrupt chunk
of an evaluation run (--num-samples) redone on resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sampling_helpers import make_tiny_model, save_pixel_model
from test_sampling_io import _tiny_vae_dir

import racedit
from racedit.cli.sample import main
from racedit.sampling import write_sampling_meta

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--steps", "0"], "--steps"),  # used to sample 50 steps without a word
        (["--steps", "-1"], "--steps"),
        (["--cfg-scale", "nan"], "--cfg-scale"),
        (["--cfg-scale", "-2"], "--cfg-scale"),
        (["--cfg-scale", "inf"], "--cfg-scale"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seed", "-1"], "--seed"),
        (["--shift", "0"], "--shift"),
        (["--sde-norm", "-1"], "--sde-norm"),
        (["--guidance-interval", "0.8", "0.2"], "--guidance-interval"),
        (["--guidance-interval", "0", "1.5"], "--guidance-interval"),
        (["--guidance-channels", "0"], "--guidance-channels"),
        (["--scaling-factor", "0"], "--scaling-factor"),
        (["--num-samples", "0"], "--num-samples"),
        (["--chunk-size", "-5"], "--chunk-size"),
    ],
)
def test_numeric_flags_are_checked_when_parsed(flags, named, pixel_model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--ckpt", str(pixel_model_dir), *flags, "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err


def _broken_copies(model_dir: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint, the file the one-line message must name)."""
    cases = {"missing checkpoint": (tmp_path / "no-such-model", "no-such-model")}
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])  # truncated
    cases["corrupt safetensors"] = (corrupt, str(corrupt))
    garbage = tmp_path / "garbage"
    shutil.copytree(model_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    cases["garbage safetensors"] = (garbage, str(garbage))
    bad_config = tmp_path / "badconfig"
    shutil.copytree(model_dir, bad_config)
    (bad_config / "config.json").write_text('{"hidden_size": 64,')
    cases["bad config.json"] = (bad_config, str(bad_config / "config.json"))
    no_weights = tmp_path / "noweights"
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    cases["missing weights"] = (no_weights, "model.safetensors")
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"not a torch file")
    cases["corrupt .pt"] = (bad_pt, str(bad_pt))
    return cases


def test_every_checkpoint_failure_is_one_line(pixel_model_dir, tmp_path, capsys):
    for name, (ckpt, mentioned) in _broken_copies(pixel_model_dir, tmp_path).items():
        rc = main(["--ckpt", str(ckpt), "--out", str(tmp_path / "g"), "--steps", "2", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, name
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert err.startswith("racedit-sample: error:") and mentioned in err, (name, err)


def test_script_entry_point_one_line_and_debug_traceback(tmp_path, capsys):
    args = ["--ckpt", str(tmp_path / "missing"), "--no-progress"]
    plain = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *args], env=ENV, capture_output=True, text=True, timeout=600
    )  # the script goes through the shared entry point: one line, exit code 2
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert main([*args, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_vae_path_stored_absolute_works_from_another_directory(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _tiny_vae_dir(work / "tinyvae")
    model_dir = work / "model"
    racedit.save_model(make_tiny_model(in_channels=4), model_dir)
    monkeypatch.chdir(work)
    write_sampling_meta("model", space="latent", vae="tinyvae", scaling_factor=0.5, image_size=16)
    stored = json.loads((model_dir / "sampling.json").read_text())["vae"]
    assert stored == str((work / "tinyvae").resolve())
    monkeypatch.chdir(elsewhere)  # where "tinyvae" means nothing
    out = elsewhere / "grid.png"
    args = ["--ckpt", str(model_dir), "--classes", "1", "--num-per-class", "1", "--steps", "2"]
    assert main([*args, "--out", str(elsewhere), "--no-progress"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["vae"] == stored and record["vae_hub_id"] is None and record["shift_factor"] == 0.0


def test_truncated_chunk_is_redone_on_resume(tmp_path, pixel_model_dir, capsys):
    npz = tmp_path / "r" / "samples.npz"
    args = ["--ckpt", str(pixel_model_dir), "--num-samples", "6", "--out", str(npz.parent), "--steps", "3"]
    args += ["--chunk-size", "2", "--keep-chunks", "--no-progress"]
    assert main(args) == 0
    reference = npz.read_bytes()
    chunk = tmp_path / "r" / "samples.parts" / "chunk_000001.npz"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])  # as a full disk or an interrupted copy leaves it
    npz.unlink()  # the run is unfinished again: the resume must merge
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "chunk_000001.npz is corrupt" in captured.err and "sampled again" in captured.err
    assert "2 already done, 1 to go" in captured.err
    assert npz.read_bytes() == reference  # the same file as the uninterrupted run
    flipped = bytearray(chunk.read_bytes())
    flipped[300] ^= 0xFF  # a byte of the stored images (they span bytes ~170..550): caught by the zip CRC
    chunk.write_bytes(bytes(flipped))
    npz.unlink()
    assert main(args) == 0
    assert "chunk_000001.npz is corrupt" in capsys.readouterr().err
    assert npz.read_bytes() == reference
    with np.load(npz) as f:
        assert f["arr_0"].shape == (6, 8, 8, 3)


def test_changed_export_is_refused_unless_no_verify(tmp_path, capsys):
    """An export's manifest.json catches changed weights; --no-verify loads files edited on purpose."""
    from racedit.io import write_manifest

    d = save_pixel_model(tmp_path / "m")
    write_manifest(d)
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # 8 flipped bytes inside the last tensor
    weights.write_bytes(bytes(data))
    args = [
        "--ckpt",
        str(d),
        "--classes",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "g"),
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "manifest" in err[0]
    assert main([*args, "--no-verify"]) == 0 and (tmp_path / "g" / "grid.png").is_file()
