"""``python -m bench``: every benchmark in one go, each printing its table of ratios.

python -m bench                  # all, CPU-sized defaults
python -m bench train_step fid   # a subset, by module name
python -m bench --quick          # fewer repeats (a smoke run)
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before torch loads: keep the profiler's chatter off stderr

from bench.common import machine_description  # noqa: E402

SUITES = {  # module -> (extra args for --quick)
    "train_step": ["--repeats", "2", "--warmup", "1"],
    "moe_layer": ["--repeats", "2", "--warmup", "1"],
    "routing": ["--repeats", "3", "--warmup", "1"],
    "connections": ["--repeats", "2", "--warmup", "1"],
    "optimizer": ["--repeats", "2", "--warmup", "1"],
    "sampling": ["--repeats", "1"],
    "data": ["--repeats", "1"],
    "fid": ["--repeats", "1"],
}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("suites", nargs="*", choices=[*SUITES, []], help="benchmarks to run (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run, not numbers to quote")
    args = p.parse_args()
    print(f"# racedit benchmarks\n\nmachine: {machine_description()}\n")
    for name in args.suites or list(SUITES):
        module = importlib.import_module(f"bench.{name}")
        start = time.perf_counter()
        print(f"\n## bench.{name}\n", flush=True)
        module.main(SUITES[name] if args.quick else [])
        print(f"\n(bench.{name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
