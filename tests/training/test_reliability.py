"""What a run may do to an output folder and what a resume may change: a fresh start never lands on
another run's checkpoints, rotation deletes only the run's own, corrupt checkpoints are kept aside,
``--resume auto`` falls back past any checkpoint that fails to load, accepted setting changes are applied,
the export is checked against its manifest, and config mistakes are one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import run_python, tiny_run, write_config

from racedit.cli.train import main
from racedit.config.core import from_dict
from racedit.io import write_manifest
from racedit.training import checkpoint as ckpt
from racedit.training.config import RunConfig
from racedit.training.loop import ResumeError, Trainer


def _train(cfg: dict, resume: str | None = None, overwrite: bool = False) -> Trainer:
    extra = {"overwrite": True} if overwrite else {}
    trainer = Trainer(from_dict(RunConfig, cfg), resume=resume, **extra)
    trainer.run()
    return trainer


def _names(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir())


def _flip(path: Path, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- the output folder


def test_fresh_start_over_checkpoints_is_refused_and_overwrite_moves_them_aside(
    tmp_path: Path, one_thread, capsys
) -> None:
    out = tmp_path / "run"
    cfg = tiny_run(out, train={"max_steps": 4, "checkpoint_every": 2})
    _train(cfg)
    first_id = ckpt.run_id_of(out / "checkpoints" / "step_00000004")
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    # through the command: one stderr line naming the folder and both ways out, exit 2, nothing touched
    config = write_config(tmp_path / "run.yaml", cfg)
    capsys.readouterr()
    assert main(["--config", str(config), "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"{out} already holds 2 checkpoint(s)" in err
    assert "--resume auto" in err and "train.output_dir" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before
    # --overwrite: the old run (checkpoints, final/, metrics) is moved aside whole, and the new run starts
    cfg["train"]["max_steps"] = 2
    _train(cfg, overwrite=True)
    assert "moved 2 checkpoint(s), final, logs/metrics.jsonl of the previous run" in capsys.readouterr().err
    (aside,) = out.glob("old-*")
    assert _names(aside / "checkpoints") == ["step_00000002", "step_00000004"]
    for p, data in before.items():
        assert (aside / p.relative_to(out)).read_bytes() == data  # moved, byte for byte
    assert (aside / "final" / "model.safetensors").is_file()
    assert _names(out / "checkpoints") == ["step_00000002"]
    new_id = ckpt.run_id_of(out / "checkpoints" / "step_00000002")
    assert first_id and new_id and new_id != first_id


def test_rotation_deletes_only_the_runs_own_lineage(tmp_path: Path) -> None:
    from racedit.models import build_model

    model = build_model(
        "DiT-S/2", input_size=8, in_channels=1, num_classes=2, depth=1, hidden_size=32, num_heads=2
    )
    d = tmp_path / "checkpoints"

    def save(step: int, run_id: str, lineage=()) -> None:
        ckpt.save_checkpoint(
            d,
            step,
            model=model,
            ema_model=model,
            optimizer_state={"state": {}, "param_groups": []},
            scheduler_state={"last_epoch": step},
            rng={"torch": torch.get_rng_state()},
            state={"data": {"epoch": 0, "batch": step}},
            config_yaml="{}",
            keep_last=2,
            dist=ckpt.Distributed(),
            run_id=run_id,
            lineage=lineage,
        )

    for step in (10, 11):  # an older run's higher-numbered checkpoints
        save(step, "old-run")
    for step in (1, 2, 3):
        save(step, "new-run")
    # "keep the newest 2 by step" alone would keep 10 and 11 and delete every checkpoint of the new run
    assert _names(d) == ["step_00000002", "step_00000003", "step_00000010", "step_00000011"]
    assert [ckpt.run_id_of(d / n) for n in _names(d)] == ["new-run", "new-run", "old-run", "old-run"]
    # a run continuing checkpoints written before run ids existed (run_id None) rotates those too
    state = json.loads((d / "step_00000003" / "state.json").read_text())
    state.pop("run_id")
    (d / "step_00000003" / "state.json").write_text(json.dumps(state))
    save(4, "continued", lineage={None})
    save(5, "continued", lineage={None})
    assert _names(d) == ["step_00000002", "step_00000004", "step_00000005", "step_00000010", "step_00000011"]


def test_all_corrupt_is_reported_kept_and_refused(tmp_path: Path, one_thread, capsys) -> None:
    out = tmp_path / "run"
    cfg = tiny_run(out, train={"max_steps": 4, "checkpoint_every": 2})
    _train(cfg)
    for name in ("step_00000002", "step_00000004"):
        _flip(out / "checkpoints" / name / "model" / "model.safetensors")
    capsys.readouterr()
    with pytest.raises(
        ResumeError, match=r"2 checkpoint\(s\) found under .*checkpoints, all corrupt"
    ) as info:
        _train(cfg, resume="auto")
    assert "train.output_dir" in str(info.value) and "--overwrite" in str(info.value)
    assert "no checkpoint" not in capsys.readouterr().err
    assert _names(out / "checkpoints") == ["corrupt-step_00000002", "corrupt-step_00000004"]  # kept
    assert (out / "checkpoints" / "corrupt-step_00000004" / "optimizer.pt").is_file()
    # with --overwrite the corrupt ones go aside with the rest and a new run starts
    cfg["train"]["max_steps"] = 2
    _train(cfg, resume="auto", overwrite=True)
    (aside,) = out.glob("old-*")
    assert _names(aside / "checkpoints") == ["corrupt-step_00000002", "corrupt-step_00000004"]
    assert _names(out / "checkpoints") == ["step_00000002"]


def test_resume_auto_falls_back_past_checkpoints_that_verify_but_do_not_load(
    tmp_path: Path, one_thread, capsys
) -> None:
    out = tmp_path / "run"
    cfg = tiny_run(out, train={"max_steps": 3, "checkpoint_every": 1})
    _train(cfg)
    d = out / "checkpoints"
    # step 3: optimizer.pt is not a torch file; step 2: a torch file with the wrong state shapes.
    # Both manifests are rewritten, so the hashes match and only loading can tell.
    (d / "step_00000003" / "optimizer.pt").write_bytes(b"not a torch file" * 64)
    opt = torch.load(d / "step_00000002" / "optimizer.pt", weights_only=True)
    first = next(iter(opt["state"].values()))
    first["exp_avg"] = torch.zeros(3, 3)
    torch.save(opt, d / "step_00000002" / "optimizer.pt")
    for name in ("step_00000003", "step_00000002"):
        write_manifest(d / name)
        ckpt.verify(d / name)
    capsys.readouterr()
    cfg["train"]["max_steps"] = 4
    trainer = _train(cfg, resume="auto")
    log = capsys.readouterr().err
    assert "skipping corrupt checkpoint step_00000003" in log and "optimizer.pt" in log
    assert "skipping corrupt checkpoint step_00000002" in log and "exp_avg" in log
    assert "resumed from" in log and "step_00000001 at step 1" in log
    assert trainer.step == 4
    assert {"corrupt-step_00000002", "corrupt-step_00000003", "step_00000001", "step_00000004"} <= set(
        _names(d)
    )


def test_resume_below_newer_checkpoints_is_refused_unless_overwrite(tmp_path: Path, one_thread) -> None:
    out = tmp_path / "run"
    cfg = tiny_run(out, train={"max_steps": 4, "checkpoint_every": 2})
    _train(cfg)
    older = out / "checkpoints" / "step_00000002"
    with pytest.raises(
        ResumeError, match=r"holds newer checkpoints \(step_00000004\).*--resume auto.*--overwrite"
    ):
        _train(cfg, resume=str(older))
    assert _names(out / "checkpoints") == ["step_00000002", "step_00000004"]
    trainer = _train(cfg, resume=str(older), overwrite=True)  # a branch from step 2; step 4 moved aside
    (aside,) = out.glob("old-*")
    assert _names(aside / "checkpoints") == ["step_00000004"]
    assert _names(out / "checkpoints") == ["step_00000002", "step_00000004"] and trainer.step == 4
    assert ckpt.run_id_of(out / "checkpoints" / "step_00000004") == ckpt.run_id_of(older)  # same lineage


# ----------------------------------------------------------------------------- settings on resume


def test_accepted_changes_on_resume_are_applied_and_logged(tmp_path: Path, one_thread, capsys) -> None:
    out = tmp_path / "run"
    cfg = tiny_run(out, train={"max_steps": 2, "checkpoint_every": 2, "lr": 1e-3, "weight_decay": 0.0})
    _train(cfg)
    capsys.readouterr()
    cfg["train"].update(max_steps=3, lr=5e-3, weight_decay=0.01, ema_decay=0.5)
    cfg["log"]["every"] = 3
    trainer = _train(cfg, resume="auto")
    log = capsys.readouterr().err
    assert "changed on resume: train.lr 0.001 -> 0.005" in log
    assert "changed on resume: train.max_steps 2 -> 3" in log
    assert "changed on resume: train.weight_decay 0.0 -> 0.01" in log
    assert "changed on resume: log.every 1 -> 3" in log
    # applied, not only logged: the optimizer ran step 3 at the new lr and weight decay (the restored
    # optimizer and scheduler state would otherwise bring back 1e-3)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [5e-3] * len(groups)
    assert [g["initial_lr"] for g in groups] == [5e-3] * len(groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01]  # matrices decay, the rest never
    assert trainer.ema.decay == 0.5
    saved = torch.load(out / "checkpoints" / "step_00000003" / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in saved["param_groups"]] == [5e-3] * len(groups)
    records = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in records] == [(1, 1e-3), (2, 1e-3), (3, 5e-3)]


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("model", "depth", 3, r"model\.depth: 2 \(checkpoint\) vs 3 \(now\)"),
        ("diffusion", "time_sampling", "logit_normal", r"diffusion\.time_sampling: 'uniform' \(checkpoint\)"),
        ("data", "held_out_fraction", 0.3, r"data\.held_out_fraction: 0\.2 \(checkpoint\) vs 0\.3 \(now\)"),
        ("train", "global_batch_size", 8, r"train\.global_batch_size: 16 \(checkpoint\) vs 8 \(now\)"),
    ],
)
def test_refused_changes_on_resume_name_the_key(
    tmp_path: Path, one_thread, section, key, value, named
) -> None:
    cfg = tiny_run(tmp_path / "run", train={"max_steps": 1, "checkpoint_every": 1})
    _train(cfg)
    cfg[section][key] = value
    cfg["train"]["max_steps"] = 2
    with pytest.raises(ResumeError, match=rf"refusing to resume from .*step_00000001: {named}"):
        _train(cfg, resume="auto")
    assert _names(tmp_path / "run" / "checkpoints") == ["step_00000001"]


# ----------------------------------------------------------------------------- the export


def test_export_manifest_detects_flipped_bytes(tmp_path: Path, one_thread) -> None:
    import racedit
    from racedit.models.loading import CheckpointError

    cfg = tiny_run(tmp_path / "run", train={"max_steps": 1, "checkpoint_every": 1})
    _train(cfg)
    final = tmp_path / "run" / "final"
    listed = json.loads((final / "manifest.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "sampling.json"} <= set(listed)
    good = racedit.load_model(final)
    _flip(final / "model.safetensors", 8)
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match its sha256.*verify=False"):
        racedit.load_model(final)
    edited = racedit.load_model(final, verify=False)  # files edited on purpose load when asked
    assert any(
        not torch.equal(a, b) for a, b in zip(good.state_dict().values(), edited.state_dict().values())
    )


# ----------------------------------------------------------------------------- config mistakes


def test_invalid_value_is_rejected_at_parse_time(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_run(tmp_path / "run"))
    assert main(["--config", str(config), "--print-config", "train.lr=-1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "racedit-train: error: train.lr must be a finite number > 0, got -0.001"
    assert not (tmp_path / "run").exists()


def test_yaml_exponent_float_is_accepted(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 2e-4\n  output_dir: " + str(tmp_path / "run") + "\n")
    assert main(["--config", str(config), "--print-config"]) == 0
    assert "lr: 0.0002" in capsys.readouterr().out


def test_malformed_yaml_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  lr: 1e-3\n  max_steps: [10\n")
    r = run_python(["train_imagenet.py", "--config", str(config)])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"racedit-train: error: {config}:"), r.stderr
    assert "invalid YAML" in lines[0] and "expected" in lines[0]
    r = run_python(["train_imagenet.py", "--config", str(config), "--debug"])
    assert r.returncode == 2 and "Traceback" in r.stderr
