"""Checkpoints: SIGKILL + resume is bitwise exact; a corrupt newest checkpoint is skipped; a different model
config is refused; checkpoints are written atomically and pruned to keep_last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import run_python, tiny_run, write_config

from racedit.config.core import from_dict
from racedit.testing import assert_bitwise
from racedit.training import checkpoint as ckpt
from racedit.training.config import RunConfig

KILLER = """
import os, signal, sys
from racedit.training import checkpoint as ckpt
from racedit.cli.train import main
kill_step = int(sys.argv[1])
original = ckpt.save_checkpoint
def save_then_die(*args, **kwargs):
    path = original(*args, **kwargs)
    if args[1] == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a hard crash right after the checkpoint
    return path
ckpt.save_checkpoint = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def _state(step_dir: Path) -> dict[str, object]:
    return {
        "model": load_file(step_dir / "model" / "model.safetensors"),
        "ema": load_file(step_dir / "ema" / "model.safetensors"),
        "optimizer": torch.load(step_dir / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(step_dir / "scheduler.pt", weights_only=True),
        "rng": torch.load(step_dir / "rng" / "rank_00000.pt", weights_only=True),
    }


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_sigkill_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    # grad_accum 2 and label dropout and a race threshold: everything that draws randomness or keeps state.
    extra = {"train": {"grad_accum": 2}}
    straight = write_config(tmp_path / "a.yaml", tiny_run(tmp_path / "a", **extra))
    killed = write_config(tmp_path / "b.yaml", tiny_run(tmp_path / "b", **extra))
    r = run_python(["train_imagenet.py", "--config", str(straight)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_python(["-c", KILLER, "3", "--config", str(killed)])
    assert r.returncode == -9, f"expected SIGKILL, got {r.returncode}: {r.stderr[-2000:]}"
    assert ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")[0].name == "step_00000003"
    assert not (tmp_path / "b" / "final").exists()
    r = run_python(["train_imagenet.py", "--config", str(killed), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr + r.stdout
    a = _state(tmp_path / "a" / "checkpoints" / "step_00000006")
    b = _state(tmp_path / "b" / "checkpoints" / "step_00000006")
    assert_bitwise(a, b, "checkpoint")
    # tau moved (the race threshold is part of the state that must match) and the EMA differs from the weights
    taus = [k for k in a["model"] if k.endswith("threshold.tau")]
    assert taus and all(float(a["model"][k]) != 0.0 for k in taus)
    assert any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"] if "weight" in k)
    # the logged losses of the resumed steps are the uninterrupted run's
    la = [json.loads(x) for x in (tmp_path / "a" / "logs" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == [1, 2, 3, 4, 5, 6]
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]


def _run_in_process(cfg_dict: dict, resume: str | None = None):
    from racedit.training.loop import train

    return train(from_dict(RunConfig, cfg_dict), resume=resume)


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path, one_thread, capsys) -> None:
    cfg = tiny_run(tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 2})
    _run_in_process(cfg)
    ckpts = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000004", "step_00000002"]
    # flip bytes in the middle of the newest model file: same size, different content
    f = ckpts[0] / "model" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointCorrupt, match="content hash differs"):
        ckpt.verify(ckpts[0])
    # a truncated newest one too; the trainer resumes from step 2 and says so
    f.write_bytes(bytes(data[:100]))
    cfg["train"]["max_steps"] = 3
    result = _run_in_process(cfg, resume="auto")
    out = capsys.readouterr()
    assert "skipping corrupt checkpoint step_00000004" in out.out + out.err and "falling back" in out.err
    assert "resumed from" in out.out + out.err and "step_00000002" in out.out + out.err
    assert result.step == 3
    # the corrupt one is kept for inspection under another name, no longer a candidate
    assert (
        tmp_path / "run" / "checkpoints" / "corrupt-step_00000004" / "model" / "model.safetensors"
    ).is_file()


def test_resume_refuses_a_different_model(tmp_path: Path, one_thread) -> None:
    from racedit.training.loop import ResumeError

    cfg = tiny_run(tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2})
    _run_in_process(cfg)
    cfg["model"]["moe"]["router"] = "token"
    cfg["train"]["max_steps"] = 4
    with pytest.raises(ResumeError, match=r"moe\.router: 'race' \(checkpoint\) vs 'token' \(now\)"):
        _run_in_process(cfg, resume="auto")


def test_checkpoints_are_atomic_pruned_and_safe_to_load(tmp_path: Path, one_thread) -> None:
    cfg = tiny_run(tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 1, "keep_last": 2})
    result = _run_in_process(cfg)
    d = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["step_00000003", "step_00000004"]  # no temporaries left
    newest = d / "step_00000004"
    ckpt.verify(newest)
    for f in newest.rglob("*.pt"):  # the non-tensor parts load with weights_only=True
        torch.load(f, weights_only=True)
    saved = yaml.safe_load((newest / "config.yaml").read_text())
    assert saved["model_resolved"]["input_size"] == 8 and saved["model_resolved"]["in_channels"] == 1
    assert json.loads((newest / "state.json").read_text())["step"] == 4
    # the final export is the EMA model, loadable by racedit.load_model, with sampling.json beside it
    import racedit

    model = racedit.load_model(result.export_dir)
    ema = load_file(newest / "ema" / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    meta = json.loads((result.export_dir / "sampling.json").read_text())
    assert meta["space"] == "pixel" and meta["diffusion"]["objective"] == "flow"
    # a training checkpoint directory loads as its EMA model too
    assert torch.equal(racedit.load_model(newest).pos_embed, model.pos_embed)
