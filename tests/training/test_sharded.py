"""FSDP training (train.distributed=fsdp) on two CPU processes (torchrun, gloo): it agrees with DDP, a run
killed with SIGKILL resumes bit for bit, and a checkpoint written by N processes resumes on M."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import run_python, tiny_run, write_config

from racedit.training import checkpoint as ckpt
from racedit.training.sharded import read_full

# Runs the trainer like racedit-train; dumps the full (gathered) live and EMA weights after setup (resume
# checks) and at the end; with KILL_STEP set, every process SIGKILLs itself right after that checkpoint.
SCRIPT = r"""
import os, signal, sys
from pathlib import Path
from safetensors.torch import save_file
from racedit.training import checkpoint as ckpt
from racedit.training.config import load_run_config
from racedit.training.loop import Trainer

config, resume, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
kill_step = int(os.environ.get("KILL_STEP", "0"))
original = ckpt.save_checkpoint

def save_then_die(*args, **kwargs):
    path = original(*args, **kwargs)
    if args[1] == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: a hard crash right after the checkpoint
    return path

ckpt.save_checkpoint = save_then_die

def dump(tr, tag):
    if tr.fsdp:
        from racedit.training.sharded import full_state_dict
        model, ema = full_state_dict(tr.raw_model), full_state_dict(tr.ema.model)  # collective
    else:
        model, ema = tr.raw_model.state_dict(), tr.ema.model.state_dict()
    if tr.rank == 0:
        save_file({k: v.contiguous() for k, v in model.items()}, tr.out / f"{tag}_model.safetensors")
        save_file({k: v.contiguous() for k, v in ema.items()}, tr.out / f"{tag}_ema.safetensors")

class DumpingTrainer(Trainer):
    def setup(self):
        super().setup()
        dump(self, "setup")

tr = DumpingTrainer(load_run_config(config, overrides), None if resume == "none" else resume)
tr.run()
dump(tr, "end")
from racedit.distributed import exit_command, teardown
teardown()
exit_command(0)
"""


def launch(tmp: Path, cfg: dict, procs: int, resume: str = "none", *overrides: str):
    script = tmp / "fsdp_script.py"
    script.write_text(SCRIPT)
    config = write_config(tmp / f"{Path(cfg['train']['output_dir']).name}.yaml", cfg)
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), str(script)]
    return run_python([*args, str(config), resume, *overrides], timeout=400)


def run_cfg(out: Path, distributed: str, **train: object) -> dict:
    # gradient checkpointing, a race threshold (PLR, RSL) and label dropout
    return tiny_run(out, train={"distributed": distributed, "gradient_checkpointing": True, **train})


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def assert_bitwise(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """One uninterrupted 6-step FSDP run on 2 processes (checkpoints at steps 3 and 6)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    r = launch(tmp, run_cfg(tmp / "straight", "fsdp"), 2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return tmp / "straight"


def test_probe(fsdp_run, tmp_path):
    r = launch(tmp_path, run_cfg(tmp_path / "ddp", "ddp"), 2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = losses(fsdp_run), losses(tmp_path / "ddp")
    print("LOSS", a, b)
    for tag in ("end_model", "end_ema"):
        fa, fb = load_file(fsdp_run / f"{tag}.safetensors"), load_file(tmp_path / "ddp" / f"{tag}.safetensors")
        d = max(float((fa[k].double() - fb[k].double()).abs().max()) for k in fa)
        print("DIFF", tag, d, sum(torch.equal(fa[k], fb[k]) for k in fa), len(fa))
