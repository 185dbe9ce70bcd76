"""Scalars of a run: averaged over processes (by the caller) and over a logging window, then written to
Accelerate's trackers (TensorBoard by default, W&B optional), ``logs/metrics.jsonl`` and, at the end, a
loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class ScalarWindow:
    """Running means of named scalars since the last ``pop``."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


class JsonlWriter:
    """Append-only JSON lines (one record per logging step)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trim_after(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (a resumed run logs those steps again)."""
    records = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat ``a/b`` keys with TensorBoard-friendly values (numbers, bools, strings)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "/"))
        elif isinstance(v, (int, float, bool, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str = "training loss") -> Path | None:
    """``loss`` (and the diffusion part, when different) against step; None when nothing was logged."""
    points = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*points), label="loss (total)", lw=1.2)
    diff = [
        (r["step"], r["loss_diffusion"]) for r in records if isinstance(r.get("loss_diffusion"), (int, float))
    ]
    if diff and any(abs(a[1] - b[1]) > 1e-12 for a, b in zip(diff, points)):
        ax.plot(*zip(*diff), label="diffusion part", lw=1.0, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over processes)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
