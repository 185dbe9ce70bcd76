"""Tiny run configs and subprocess helpers shared by the training tests (imported as ``train_helpers``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_run(out: Path, **sections: Any) -> dict[str, Any]:
    """A run config dict: a 2-block, 32-wide Race-DiT (race, PLR, RSL) on the digits, flow matching."""
    cfg: dict[str, Any] = {
        "model": {
            "name": "RaceDiT-S/2-2in8",
            "hidden_size": 32,
            "depth": 2,
            "num_heads": 2,
            "moe": {"plr_weight": 0.01, "rsl_weight": 1e-4},
        },
        "diffusion": {"objective": "flow"},
        "data": {"kind": "digits"},
        "train": {
            "output_dir": str(out),
            "max_steps": 6,
            "global_batch_size": 16,
            "lr": 1e-3,
            "ema_decay": 0.9,
            "checkpoint_every": 3,
            "keep_last": 5,
        },
        "sample": {"every": 0, "classes": [0, 1], "steps": 2, "final_grid": False},
        "log": {
            "every": 1,
            "trackers": [],
            "progress": False,
            "loss_curve": False,
            "moe_metrics_every": 1000,
        },
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_python(args: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kw
    )
