"""AdamW step time per implementation (fused / foreach / for-loop) on real model parameter sets.

The measurement behind ``racedit.training.optim.MEASURED_FASTEST``: each implementation updates the
parameters of the same models (the train-step benchmark's DiT-S/2 and RaceDiT-S/2-2in8) with random
gradients; interleaved rounds, medians of wall and process-CPU time, ratios to the per-parameter loop.

    python -m bench.optimizer
    python -m bench.optimizer --device cuda --hidden-size 1152 --depth 28 --experts 32 --k 4
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import racedit
from bench.common import interleaved_wall_and_cpu, print_table
from racedit.training.optim import build_adamw, resolve_adamw_impl

IMPLS = ("for-loop", "foreach", "fused")


def make_update(model: torch.nn.Module, impl: str, device: str) -> Callable[[], None]:
    """One optimizer step of ``impl`` on a private copy of ``model``'s parameters with fixed gradients."""
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    opt, _ = build_adamw(params, lr=1e-4, impl=impl, device=device)
    return opt.step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.optimizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--hidden-size", type=int, default=192, help="model width D (default 192)")
    p.add_argument("--depth", type=int, default=4, help="DiT blocks (default 4)")
    p.add_argument("--num-heads", type=int, default=6, help="attention heads (default 6)")
    p.add_argument("--input-size", type=int, default=16, help="latent side (default 16)")
    p.add_argument("--experts", type=int, default=8, help="experts E (default 8)")
    p.add_argument("--k", type=int, default=2, help="experts per token k (default 2)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    kw = dict(
        input_size=args.input_size,
        num_classes=10,
        hidden_size=args.hidden_size,
        depth=args.depth,
        num_heads=args.num_heads,
    )
    models = {
        "DiT-S/2": racedit.build_model("DiT-S/2", **kw),
        f"RaceDiT-S/2-{args.k}in{args.experts}": racedit.build_model(
            f"RaceDiT-S/2-{args.k}in{args.experts}", **kw
        ),
    }
    steps, meta = {}, {}
    for name, model in models.items():
        params = [q for q in model.parameters() if q.requires_grad]
        meta[name] = (len(params), sum(q.numel() for q in params))
        for impl in IMPLS:
            steps[(name, impl)] = make_update(model.to(args.device), impl, args.device)
    wall, cpu = interleaved_wall_and_cpu(steps, args.repeats, args.warmup)
    rows = []
    for (name, impl), t in cpu.items():
        tensors, numel = meta[name]
        rows.append(
            [
                name,
                impl,
                f"{tensors} / {numel / 1e6:.2f}M",
                f"{1e3 * t:.2f}",
                t / cpu[(name, "for-loop")],
                wall[(name, impl)] / wall[(name, "for-loop")],
            ]
        )
    print_table(
        f"AdamW step by implementation ({args.device}; medians of {args.repeats} interleaved rounds; "
        f"auto picks {resolve_adamw_impl('auto', args.device)!r} here)",
        ["model", "impl", "tensors / params", "step CPU ms", "CPU-time vs loop", "wall vs loop"],
        rows,
    )


if __name__ == "__main__":
    main()
