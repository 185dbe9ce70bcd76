"""Training-step time and peak memory of each residual-stream variant relative to the residual DiT.

Every variant is the same small DiT (same weights where they share names) with a different connection
(docs/spec/connections.md: HC, dynamic HC, FC, dynamic FC, mHC). One training step = forward, MSE loss,
backward, AdamW step. Timing is interleaved round-robin over the variants (warm-up, repeats, median;
both wall-clock and process CPU time), so machine drift hits every variant alike. On a CPU shared with
other processes the CPU-time ratio is the steadier one; both are printed.

Peak memory of a step:
- CPU: the largest amount of tensor memory allocated during one step beyond what was live before it,
  read from the PyTorch profiler's allocation events (``profile_memory=True``; each allocation event
  carries the CPU allocator's running total). Not tracemalloc: it does not see tensor storage, which
  PyTorch allocates outside Python's allocator.
- CUDA: ``torch.cuda.max_memory_allocated`` over one step minus the memory allocated before it.

    python -m bench.connections                       # CPU, the default small DiT
    python -m bench.connections --variants HCx2,FCx4 --repeats 11
    python -m bench.connections --variants HCx2,FCx4,mHCx4 --compile   # every model torch.compile'd

On CPU the freed host memory stays in the process, as the trainer keeps it (``train.retain_host_memory``,
docs/design.md "Host memory on CPU"); ``--glibc-malloc-defaults`` measures with glibc's defaults instead, where
each step page-faults its activations back in (more for the n-wide states of HC and mHC).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop chatter off stderr

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import racedit  # noqa: E402
from bench.common import (  # noqa: E402
    add_host_memory_flag,
    interleaved_wall_and_cpu,
    peak_step_memory,
    print_table,
    setup_host_memory,
)
from racedit.models.dit import DiT  # noqa: E402
from racedit.training.optim import build_adamw, resolve_adamw_impl  # noqa: E402

DEFAULT_VARIANTS = "HCx1,HCx2,HCx4,DHCx2,DHCx4,FCx2,FCx4,DFCx2,DFCx4,mHCx2,mHCx4"


def build_variants(names: list[str], args: argparse.Namespace) -> dict[str, DiT]:
    """The residual DiT and one model per connection suffix, all sharing the residual model's weights."""
    kw = dict(
        input_size=args.input_size,
        num_classes=10,
        hidden_size=args.hidden_size,
        depth=args.depth,
        num_heads=args.num_heads,
    )
    torch.manual_seed(0)
    residual = racedit.build_model("DiT-S/2", **kw)
    with torch.no_grad():  # non-zero gates, so every sublayer does real work in forward and backward
        for name, p in residual.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.normal_(0, 0.02)
    models = {"residual": residual}
    for suffix in names:
        model = racedit.build_model(f"DiT-S/2-{suffix}", **kw)
        model.load_state_dict(residual.state_dict(), strict=False)
        models[suffix] = model
    return {name: m.to(args.device).train() for name, m in models.items()}


def make_step(model: DiT, args: argparse.Namespace) -> Callable[[], None]:
    """One training step on a fixed random batch (forward, MSE, backward, AdamW)."""
    g = torch.Generator().manual_seed(1)
    B, C, S = args.batch_size, model.arch.in_channels, args.input_size
    x = torch.randn(B, C, S, S, generator=g).to(args.device)
    t = torch.randint(0, 1000, (B,), generator=g).to(args.device)
    y = torch.randint(0, 10, (B,), generator=g).to(args.device)
    target = torch.randn(B, model.arch.out_channels, S, S, generator=g).to(args.device)
    opt, _ = build_adamw(model.optimizer_param_groups(0.0), lr=1e-4, device=args.device)  # as the trainer
    net = torch.compile(model) if args.compile else model  # as train.compile=true

    def step() -> None:  # self-contained: the gradients it allocates are freed before it returns
        torch.nn.functional.mse_loss(net(x, t, y), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def fast_vs_reference(args: argparse.Namespace) -> None:
    """One sublayer's connection, forward + backward with a trivial branch: ``forward`` (the fast path) against
    ``reference_forward`` (the docs/spec/connections.md formula) on the same weights and state, process CPU time."""
    from racedit.connections import FracConnection, HyperConnection, ManifoldHyperConnection

    B, L, D = args.batch_size, (args.input_size // 2) ** 2, args.hidden_size
    cases = {
        "HCx2 (static, streams first)": (HyperConnection(D, 2, 1, streams_first=True), (2, B, L, D)),
        "HCx4 (static, streams first)": (HyperConnection(D, 4, 1, streams_first=True), (4, B, L, D)),
        "DHCx2": (HyperConnection(D, 2, 1, dynamic=True), (B, L, 2, D)),
        "FCx4 (static, fractions first)": (FracConnection(D, 4, fractions_first=True), (4, B, L, D // 4)),
        "DFCx4": (FracConnection(D, 4, dynamic=True), (B, L, D)),
        "mHCx4": (ManifoldHyperConnection(D, 4, 1), (B, L, 4, D)),
    }
    steps = {}
    for name, (conn, shape) in cases.items():
        state = torch.randn(shape).to(args.device).requires_grad_(True)
        for path in ("forward", "reference_forward"):
            fn = getattr(conn.to(args.device), path)
            steps[(name, path)] = lambda fn=fn, s=state: fn(s, lambda h: 0.5 * h).sum().backward()
    _, cpu = interleaved_wall_and_cpu(steps, args.repeats, args.warmup)
    rows = [
        [name, f"{1e3 * cpu[(name, 'forward')]:.2f}", f"{1e3 * cpu[(name, 'reference_forward')]:.2f}",
         cpu[(name, "forward")] / cpu[(name, "reference_forward")]]
        for name in cases
    ]  # fmt: skip
    print_table(
        f"One sublayer's connection, fast path vs reference (B={B}, L={L}, D={D}, forward + backward, trivial "
        f"branch; process CPU time, medians of {args.repeats} interleaved repeats)",
        ["connection", "fast CPU ms", "reference CPU ms", "fast / reference"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Training-step time and peak memory of hyper/frac/mHC connection variants relative to "
        "the residual DiT of the same size, measured side by side in one run (ratios, medians of "
        "interleaved repeats)."
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated connection suffixes of the registry (default {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--hidden-size", type=int, default=256, help="model width D (default 256)")
    parser.add_argument("--depth", type=int, default=4, help="number of DiT blocks (default 4)")
    parser.add_argument("--num-heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument(
        "--input-size", type=int, default=16, help="latent side; patch 2 gives (side/2)^2 tokens (default 16)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="samples per training step (default 8)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds over all variants (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op CPU threads (default 1: steadier on a shared CPU)",
    )
    parser.add_argument(
        "--device", default="cpu", help="'cpu' (default) or 'cuda'; the table header names the machine"
    )
    parser.add_argument(
        "--paths", action="store_true", help="instead: each connection's fast path against its reference"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every model, the residual DiT included (train.compile=true), so the ratios compare "
        "compiled with compiled; compiling takes up to a minute per model on a small CPU",
    )
    add_host_memory_flag(parser)
    args = parser.parse_args(argv)
    host_memory = setup_host_memory(args)
    torch.set_num_threads(args.threads)
    if args.paths:
        return fast_vs_reference(args)
    names = [s.strip() for s in args.variants.split(",") if s.strip()]

    models = build_variants(names, args)
    steps = {name: make_step(model, args) for name, model in models.items()}
    memory = {}
    for name, step in tqdm(steps.items(), desc="peak memory", leave=False):
        step()  # optimizer state exists before measuring
        memory[name] = peak_step_memory(step, args.device)
    wall, cpu = interleaved_wall_and_cpu(steps, args.repeats, args.warmup)

    base_params = sum(p.numel() for p in models["residual"].parameters())
    base_flops = models["residual"].flops(args.batch_size)
    rows = []
    for name, model in models.items():
        extra = sum(p.numel() for p in model.parameters()) - base_params
        rows.append(
            [
                name,
                f"{1e3 * cpu[name]:.1f}",
                cpu[name] / cpu["residual"],
                wall[name] / wall["residual"],
                f"{memory[name] / 2**20:.1f}",
                memory[name] / memory["residual"],
                f"+{extra:,}",
                model.flops(args.batch_size) / base_flops,
            ]
        )
    L = (args.input_size // 2) ** 2
    print_table(
        f"Connections: one training step vs the residual DiT (D={args.hidden_size}, depth={args.depth}, "
        f"L={L} tokens, batch={args.batch_size}, {args.device}{', compiled' if args.compile else ''}; medians of {args.repeats} interleaved repeats; "
        f"peak memory: {'profiler allocation events' if args.device == 'cpu' else 'CUDA allocator'}; "
        f"AdamW {resolve_adamw_impl('auto', args.device)}{', ' + host_memory if host_memory else ''})",
        [
            "variant",
            "step CPU ms",
            "CPU-time ratio",
            "wall ratio",
            "peak MiB",
            "memory ratio",
            "extra params",
            "FLOP ratio",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
