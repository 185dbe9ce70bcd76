"""Timing helpers shared by the benchmark scripts: interleaved repeats, warm-up, medians, machine header."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm


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


def add_host_memory_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--glibc-malloc-defaults",
        action="store_true",
        help="on CPU, leave glibc's mmap/trim thresholds alone instead of keeping freed memory in the "
        "process as the trainer does (train.retain_host_memory, racedit/training/host_memory.py)",
    )


def setup_host_memory(args: argparse.Namespace) -> str:
    """Do what the trainer does with host memory on this device; returns a note for the table title."""
    device = getattr(args, "device", "cpu")  # CPU-only benchmarks have no --device
    if device != "cpu" or args.glibc_malloc_defaults:
        return "glibc malloc defaults" if device == "cpu" else ""
    from racedit.training.host_memory import retain_freed_memory

    retain_freed_memory()
    return "freed host memory retained"


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


def peak_step_memory(step: Callable[[], None], device: str) -> int:
    """Bytes of tensor memory allocated at the peak of one step beyond what was live before it."""
    if device.startswith("cuda"):
        synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []  # (time, bytes allocated (+) or freed (-), the allocator's running total after it)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(node.children)
    if not events:
        raise RuntimeError("the profiler recorded no CPU allocations; this torch build cannot measure memory")
    events.sort()
    before = events[0][2] - events[0][1]  # the running total is not reset between profiling sessions
    return max(total for _, _, total in events) - before


def interleaved_wall_and_cpu(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and process-CPU seconds per step, measured round-robin over the variants.

    On a shared CPU, wall time also counts the time other processes hold the cores; process CPU time
    (with one intra-op thread) counts only this step's work, memory stalls included. On CUDA the CPU time
    is meaningless (the host waits): read the wall ratio there.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in tqdm(range(repeats), desc="timing rounds", leave=False):
        for name, step in steps.items():
            synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            synchronize()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return (
        {n: statistics.median(v) for n, v in wall.items()},
        {n: statistics.median(v) for n, v in cpu.items()},
    )
