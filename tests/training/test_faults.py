"""Faults: NaN/inf loss stops (or skips) and the last good checkpoint stays intact; bad output dir, missing
dataset and mismatched data shapes fail before any step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_run

from racedit.config.core import ConfigError, from_dict
from racedit.training import checkpoint as ckpt
from racedit.training.config import RunConfig
from racedit.training.loop import NonFiniteLossError, Trainer


class PoisonedTrainer(Trainer):
    """Returns a NaN loss at the given (1-based) steps; otherwise the real loss."""

    def __init__(self, cfg, poison_steps, **kw):
        super().__init__(cfg, **kw)
        self.poison_steps = set(poison_steps)

    def compute_loss(self, x, y):
        loss, terms = super().compute_loss(x, y)
        if self.step + 1 in self.poison_steps:
            loss = loss * float("nan")
        return loss, terms


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, one_thread) -> None:
    cfg = from_dict(RunConfig, tiny_run(tmp_path / "run", train={"max_steps": 6, "checkpoint_every": 2}))
    trainer = PoisonedTrainer(cfg, poison_steps=[4])
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*loss = nan.*step_00000002.*train.nonfinite=skip"):
        trainer.run()
    ckpts = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002"]
    ckpt.verify(ckpts[0])
    weights = load_file(ckpts[0] / "model" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    # the live model was not updated by the poisoned step: it is the model after step 3, all finite
    assert trainer.step == 3
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())
    assert not (tmp_path / "run" / "final").exists()


def test_nan_loss_skipped_when_configured(tmp_path: Path, one_thread) -> None:
    cfg = from_dict(
        RunConfig,
        tiny_run(tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 4, "nonfinite": "skip"}),
    )
    trainer = PoisonedTrainer(cfg, poison_steps=[2])
    before: dict[str, torch.Tensor] = {}

    original = trainer.train_step

    def spy():
        if trainer.step == 1:  # weights after step 1 must equal weights after the skipped step 2
            before.update({k: v.clone() for k, v in trainer.raw_model.state_dict().items() if "tau" not in k})
        out = original()
        if trainer.step == 2:
            assert out is None
            for k, v in before.items():
                if "threshold" not in k:
                    assert torch.equal(trainer.raw_model.state_dict()[k], v), k
        return out

    trainer.train_step = spy
    result = trainer.run()
    assert result.step == 4 and result.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_unwritable_output_dir_fails_before_any_step(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root ignores permissions: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "run"
    cfg = from_dict(RunConfig, tiny_run(out))
    with pytest.raises(PermissionError, match=r"output directory .* is not writable.*train.output_dir"):
        Trainer(cfg).run()


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    cfg = from_dict(
        RunConfig, tiny_run(tmp_path / "run", data={"kind": "latents", "root": str(tmp_path / "nope")})
    )
    with pytest.raises(Exception, match="nope") as info:
        Trainer(cfg).run()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert "racedit-extract" in str(info.value) or "does not exist" in str(info.value)


def test_data_shape_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tiny_run(tmp_path / "run")
    cfg["model"]["in_channels"] = 4
    with pytest.raises(
        ConfigError, match=r"data samples have shape \(C, H, W\) = \(1, 8, 8\).*model.in_channels = 4"
    ):
        Trainer(from_dict(RunConfig, cfg)).run()
    cfg["model"].pop("in_channels")
    cfg["model"]["input_size"] = 32
    with pytest.raises(ConfigError, match=r"model.input_size = 32 \(dataset value: 8\)"):
        Trainer(from_dict(RunConfig, cfg)).run()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sharded_launch_is_refused_before_any_step(tmp_path: Path, monkeypatch) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    cfg = from_dict(RunConfig, tiny_run(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"does not support FSDP.*multi_gpu.yaml"):
        Trainer(cfg).run()
    assert not (tmp_path / "run" / "checkpoints").exists()
