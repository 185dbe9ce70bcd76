"""Sampling throughput per sampler on a tiny model on the CPU (images/s), with and without CFG.

    python -m bench.sampling [--steps 20] [--batch 16] [--repeats 3]

Every sampler runs ``--steps`` steps (Heun makes 2 model evaluations per step but the last); the
table gives images/s and the time per model evaluation relative to DDIM without guidance (scheduler
overhead and CFG's doubled batch show up there). Interleaved repeats, one warm-up, medians. The
model is tiny, so this measures sampler and CFG overhead, not GPU throughput (not measured).
"""

from __future__ import annotations

import argparse

import torch

import racedit
from bench.common import interleaved_medians, print_table
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.sampling import generate
from racedit.sampling.samplers import num_evaluations


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="sampling steps for every sampler")
    p.add_argument("--batch", type=int, default=16, help="images per call (one batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per sampler (median)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = racedit.build_model(
        "DiT-S/2", input_size=8, num_classes=10, hidden_size=64, depth=2, num_heads=2, in_channels=3
    ).eval()
    labels = torch.arange(args.batch) % 10
    cases = {}
    for objective, samplers in (
        ("ddpm", ("ddpm", "ddim", "dpm++")),
        ("flow", ("euler", "heun", "euler-maruyama")),
    ):
        obj = build_objective(DiffusionConfig(objective=objective), model.arch.learn_sigma)
        for sampler in samplers:
            for cfg in (1.0, 4.0):
                kw = dict(
                    objective=obj, sampler=sampler, steps=args.steps, cfg_scale=cfg, batch_size=args.batch
                )
                cases[(sampler, cfg)] = (obj, (lambda kw=kw: generate(model, labels, **kw)))
    times = interleaved_medians({k: fn for k, (_, fn) in cases.items()}, repeats=args.repeats, warmup=1)
    base = times[("ddim", 1.0)] / num_evaluations(cases[("ddim", 1.0)][0], "ddim", args.steps)
    rows = []
    for (sampler, cfg), (obj, _) in cases.items():
        evals = num_evaluations(obj, sampler, args.steps)
        sec = times[(sampler, cfg)]
        rows.append([sampler, cfg, evals, args.batch / sec, (sec / evals) / base])
    print_table(
        f"sampling, tiny DiT (8x8x3, width 64, depth 2), batch {args.batch}, {args.steps} steps, CPU",
        ["sampler", "cfg scale", "model evals", "images/s", "time per eval / ddim's (cfg 1)"],
        rows,
    )


if __name__ == "__main__":
    main()
