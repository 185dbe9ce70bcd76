"""Timing helpers shared by the benchmark scripts: interleaved repeats, warm-up, medians, machine header."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine_description() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}, "
        f"Python {platform.python_version()}"
    )


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, inner: int = 1
) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """A markdown table with a title line and the machine line."""
    print(f"\n### {title}\n\nmachine: {machine_description()}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
