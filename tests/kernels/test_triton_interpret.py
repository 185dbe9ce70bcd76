"""Triton kernels on CPU under TRITON_INTERPRET=1, each check group in its own subprocess.

The interpreter must be on before the kernels are defined and an out-of-bounds access can crash the
process, so ``interp_checks.py`` runs outside pytest's process; its assertions compare the Triton
layout with the reference exactly (integers, gates, K-th value) and the expert FFN's output and
gradients within dtype tolerance (docs/spec/kernels.md, "Testing without a GPU").
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("interp_checks.py")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.mark.parametrize("group", ["routing", "edges", "ffn", "ffn_bf16", "ffn_autocast", "layer"])
def test_triton_matches_reference_under_interpreter(group: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), group], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"interpreter group {group!r} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert f"OK {group}" in proc.stdout


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path: Path) -> None:
    """The interpreter accepts code the real compiler rejects: lower one variant of each kernel to sm90."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "racedit.kernels.compile_check", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"sm90 compilation failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert "9 kernel variants compile for sm90" in proc.stdout
