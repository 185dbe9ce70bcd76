"""Training-step images/s and peak memory: dense DiT, Race-DiT with each router, each connection variant.

All models share one size (width, depth, tokens) and one batch; a Race-DiT k-in-E with hidden split
g = k spends the same activated expert FLOPs as the dense MLP, so its ratio to dense is the MoE
overhead (routing, gathers, per-expert matmuls, the optimizer over ~2.3x the parameters); the row
"race, reference experts" runs the reference expert computation (impl=torch) instead of the device's
choice (impl=auto: Triton on CUDA; on CPU auto is the reference, so the two rows agree within noise). The
row "dense DiT + unused router (MoE floor)" adds a Race-DiT router to every dense block and differentiates it
without routing anything: what any Race-DiT costs at least, so Race-DiT minus it is the price of dispatch, the
experts' extra parameters in AdamW and the auxiliary losses. With ``--compile`` every row is also timed
``torch.compile``'d (``train.compile=true``); the column "same mode" compares compiled rows with the compiled
dense row (eager rows with the eager one). One
step = the diffusion objective's loss (the run's real loss: DDPM hybrid loss or flow matching, plus the
MoE auxiliary losses), backward, AdamW.
Timing is interleaved round-robin with warm-up and repeats; medians of wall and process-CPU time.

    python -m bench.train_step                     # CPU defaults
    python -m bench.train_step --device cuda --hidden-size 768 --depth 12 --input-size 32 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

import racedit  # noqa: E402
from bench.common import (  # noqa: E402
    add_host_memory_flag,
    interleaved_wall_and_cpu,
    peak_step_memory,
    print_table,
    setup_host_memory,
)
from racedit.diffusion import DiffusionConfig, build_objective  # noqa: E402
from racedit.interfaces import FeedForward  # noqa: E402
from racedit.models import ForwardAux  # noqa: E402
from racedit.moe.layer import Router  # noqa: E402
from racedit.moe.losses import aux_losses  # noqa: E402
from racedit.training.optim import build_adamw, resolve_adamw_impl  # noqa: E402

ROUTERS = ("token", "expert", "bl", "be", "le", "race")
CONNECTIONS = ("HCx2", "DHCx2", "FCx4", "DFCx4", "mHCx4")


def variants(args: argparse.Namespace) -> dict[str, str | tuple[str, dict]]:
    """label -> (registry name, overrides)."""
    out: dict[str, tuple[str, dict]] = {"dense DiT": (f"DiT-S/{args.patch}", {})}
    moe = {"plr_weight": 0.01, "rsl_weight": 1e-4}
    for router in ROUTERS:
        out[f"Race-DiT {args.k}in{args.experts} {router}"] = (
            f"RaceDiT-S/{args.patch}-{args.k}in{args.experts}",
            {"moe": {"router": router, **moe}},
        )
    # the same model with the reference expert computation (impl=torch) instead of the device's choice
    # (impl=auto: Triton on CUDA, the reference on CPU): what the fast path saves
    out[f"Race-DiT {args.k}in{args.experts} race, reference experts"] = (
        f"RaceDiT-S/{args.patch}-{args.k}in{args.experts}",
        {"moe": {"router": "race", "impl": "torch", **moe}},
    )
    # the floor of the MoE overhead: the dense model plus a router of the Race-DiT's shape whose output is
    # computed and differentiated but not used (no dispatch, no expert parameters): router FLOPs and AdamW
    # over its parameters only. Race-DiT minus this row is what dispatch, the experts' extra parameters and
    # the auxiliary losses cost.
    out["dense DiT + unused router (MoE floor)"] = (f"DiT-S/{args.patch}", {ROUTER_FLOOR: args.experts})
    for conn in CONNECTIONS:
        out[f"dense {conn}"] = (f"DiT-S/{args.patch}-{conn}", {})
        out[f"race {conn}"] = (f"RaceDiT-S/{args.patch}-{args.k}in{args.experts}-{conn}", {"moe": moe})
    return out


ROUTER_FLOOR = "router_floor_experts"  # override key of the floor row (not a model option)


class RouterFloor(FeedForward):
    """A dense MLP beside a Race-DiT router (trunk D x D + GELU, gating head D x E) whose logits enter the
    output multiplied by zero: the router's forward and backward run in full, nothing is routed."""

    def __init__(self, mlp: FeedForward, dim: int, num_experts: int):
        super().__init__()
        self.mlp = mlp
        self.router = Router(dim, num_experts, target_dim=None)

    def forward(self, h: torch.Tensor, aux: ForwardAux | None = None) -> torch.Tensor:
        _, logits = self.router(h.reshape(-1, h.shape[-1]))
        return self.mlp(h) + 0.0 * logits.sum()


def make_step(
    name: str, overrides: dict, args: argparse.Namespace, compiled: bool = False
) -> Callable[[], None]:
    torch.manual_seed(0)
    overrides = dict(overrides)
    floor_experts = overrides.pop(ROUTER_FLOOR, None)
    model = racedit.build_model(
        name,
        input_size=args.input_size,
        in_channels=4,
        num_classes=10,
        hidden_size=args.hidden_size,
        depth=args.depth,
        num_heads=args.num_heads,
        learn_sigma=args.objective == "ddpm",
        **overrides,
    )
    if floor_experts:
        for block in model.blocks:
            block.mlp = RouterFloor(block.mlp, args.hidden_size, floor_experts)
    model = model.to(args.device)
    model.train()
    net = torch.compile(model) if compiled else model  # train.compile=true does the same
    objective = build_objective(DiffusionConfig(objective=args.objective), learn_sigma=model.arch.learn_sigma)
    opt, _ = build_adamw(model.optimizer_param_groups(0.0), lr=1e-4, device=args.device)  # as the trainer
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(args.batch_size, 4, args.input_size, args.input_size, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(args.device)

    def step() -> None:
        aux = ForwardAux()
        out = objective.training_loss(net, x0, y, aux=aux)
        loss = out.loss
        if model.arch.moe is not None:
            loss = loss + sum(aux_losses(aux, model.patchify(out.target), model.arch.moe).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--hidden-size", type=int, default=192, help="model width D (default 192)")
    p.add_argument("--depth", type=int, default=4, help="DiT blocks (default 4)")
    p.add_argument("--num-heads", type=int, default=6, help="attention heads (default 6)")
    p.add_argument(
        "--input-size", type=int, default=16, help="latent side; tokens = (side/patch)^2 (default 16)"
    )
    p.add_argument("--patch", type=int, default=2, help="patch size (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per step (default 16)")
    p.add_argument("--experts", type=int, default=8, help="experts E of the Race-DiT rows (default 8)")
    p.add_argument("--k", type=int, default=2, help="experts per token k (default 2)")
    p.add_argument("--objective", default="flow", choices=["flow", "ddpm"], help="diffusion objective")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all variants (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on shared CPUs)"
    )
    p.add_argument(
        "--filter", default=None, help="only rows whose label contains one of these comma-separated texts"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time every row torch.compile'd (its own row, ratio to the eager dense row); compiling "
        "takes minutes per model on a small CPU",
    )
    add_host_memory_flag(p)
    args = p.parse_args(argv)
    host_memory = setup_host_memory(args)
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    wanted = [w for w in (args.filter or "").split(",") if w]
    todo = {k: v for k, v in variants(args).items() if not wanted or any(w in k for w in wanted)}
    steps = {label: make_step(name, ov, args) for label, (name, ov) in todo.items()}
    if args.compile:
        steps.update(
            {f"{label} (compiled)": make_step(name, ov, args, True) for label, (name, ov) in todo.items()}
        )
    wall, cpu = interleaved_wall_and_cpu(steps, args.repeats, args.warmup)
    mem = {label: peak_step_memory(step, args.device) for label, step in steps.items()}
    base = "dense DiT" if "dense DiT" in steps else next(iter(steps))
    compiled_base = f"{base} (compiled)"

    def same_mode_base(label: str) -> str:  # compiled rows against the compiled base row
        return compiled_base if label.endswith(" (compiled)") and compiled_base in steps else base

    rows = []
    for label in steps:
        rows.append(
            [
                label,
                args.batch_size / wall[label],
                wall[label] / wall[base],
                cpu[label] / cpu[base],
                cpu[label] / cpu[same_mode_base(label)],
                mem[label] / 2**20,
                mem[label] / mem[base],
            ]
        )
    print_table(
        f"Training step vs {base} (D={args.hidden_size}, depth={args.depth}, "
        f"L={(args.input_size // args.patch) ** 2} tokens, batch={args.batch_size}, {args.objective}, "
        f"{args.device}; medians of {args.repeats} interleaved rounds; AdamW {resolve_adamw_impl('auto', args.device)}"
        f"{', ' + host_memory if host_memory else ''})",
        [
            "model",
            "images/s",
            "wall ratio",
            "CPU-time ratio",
            "CPU-time ratio, same mode",
            "peak MiB",
            "memory ratio",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
