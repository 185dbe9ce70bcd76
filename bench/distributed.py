"""Scale-out: the distributed expert-race K-th value, and FSDP against DDP (2 CPU processes, gloo).

1. **Bytes per MoE layer** each process receives to find the global K-th score: the all-gather reference
   (every score of every rank) against ``radix_cut`` (its counts, then the gathered scores when they are at most
   64 KiB, else the radix select's 4 all-reduces of a 256-bin histogram), computed from the algorithms at world
   2, 8 and 64 for the demo (32 samples x 16 tokens x 8 experts per process) and RaceDiT-XL/2-4in32 (32 x 256 x
   32 per GPU), and counted at world 2 (the tensors actually handed to the collectives).
2. **Time per layer** at world 2 on CPU at both shapes: the reference, the switch's choice, each way forced,
   and a size sweep where the two ways cross; every call started together on both processes (a barrier
   before it), interleaved repeats, median.
3. **FSDP vs DDP** on the same tiny model (the demo's RaceDiT-S/2-2in8 at width 128, depth 4, 32 per process),
   2 processes: train-step time (forward, backward, clipping, AdamW, EMA) as wall and process CPU time per
   interleaved round; the bytes of parameters + gradients + AdamW state + EMA held per process after the
   optimizer step (local shards under FSDP) and the peak tensor memory of a step (torch profiler), for
   ``train.fsdp_reshard_after_forward`` true and false, and with FSDP2's own gloo collectives instead of
   ``racedit.training.collectives``; and those collectives alone, per call, on one block's buffer.

    python -m bench.distributed
    python -m bench.distributed --parts kth
    python -m bench.distributed --train-repeats 41 --width 256

CPU numbers from a shared machine: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import add_host_memory_flag, print_table, setup_host_memory

LAYERS_XL = 28  # MoE layers of RaceDiT-XL/2-4in32 (every block)


def computed_bytes_table() -> None:
    from racedit.routing.distributed import comm_bytes

    rows = []
    for label, tokens, experts in (("demo", 32 * 16, 8), ("XL/2", 32 * 256, 32)):
        for world in (2, 8, 64):
            b = comm_bytes(world, tokens, experts)
            rows.append(
                [
                    f"{label} x {world}",
                    f"{b['allgather']:,}",
                    f"{b['radix']:,}",
                    f"{b['gather']:,}",
                    f"{b['switch']}: {b['switched']:,}",
                    f"{b['allgather'] / b['switched']:,.1f}x",
                    f"{b['allgather'] * LAYERS_XL / 2**20:,.1f} MiB",
                    f"{b['switched'] * LAYERS_XL / 2**10:,.0f} KiB",
                ]
            )
    print_table(
        "K-th score per MoE layer: bytes received per process (computed). demo: 32 samples x 16 tokens x 8 "
        "experts per process; XL/2: 32 x 256 x 32 per GPU",
        [
            "shape x world",
            "all-gather reference B",
            "radix B",
            "gather way B",
            "switch takes",
            "reference / switch",
            "reference per step (28 layers)",
            "switch per step",
        ],
        rows,
    )


# ----------------------------------------------------------------------------- 2-process worker


def _count_collectives() -> dict[str, int]:
    """Wrap the collectives the K-th paths call so they add the bytes each process receives (the tensor
    handed to all_reduce, the outputs of the all-gathers)."""
    counts = {"bytes": 0}
    real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor")}

    def all_reduce(t, *a, **k):
        counts["bytes"] += t.numel() * t.element_size()
        return real["all_reduce"](t, *a, **k)

    def all_gather(outs, t, *a, **k):
        counts["bytes"] += sum(o.numel() * o.element_size() for o in outs)
        return real["all_gather"](outs, t, *a, **k)

    def all_gather_into_tensor(out, t, *a, **k):
        counts["bytes"] += out.numel() * out.element_size()
        return real["all_gather_into_tensor"](out, t, *a, **k)

    for name, fn in (
        ("all_reduce", all_reduce),
        ("all_gather", all_gather),
        ("all_gather_into_tensor", all_gather_into_tensor),
    ):
        setattr(dist, name, fn)
    counts["restore"] = lambda: [setattr(dist, n, f) for n, f in real.items()]  # type: ignore[assignment]
    return counts


def _collective_medians(fns: dict[str, object], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each collective function, interleaved, each call started on every process
    together (a barrier first: a process that arrives late would otherwise charge its lateness to the
    others' next collective)."""
    import statistics
    import time

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def _kth_bench(rank: int, repeats: int) -> tuple[list[list[object]], list[list[object]]]:
    from racedit.routing.distributed import gather_kth, radix_cut, radix_kth

    ways = {
        "reference": gather_kth,  # the all-gather oracle
        "switch": radix_kth,  # the default: gather or radix by size
        "radix": lambda s, k: radix_kth(s, k, gather_bytes=0),
        "radix16": lambda s, k: radix_kth(s, k, bits=16, gather_bytes=0),
        "gather": lambda s, k: radix_kth(s, k, gather_bytes=1 << 62),
    }
    rows = []
    for samples, tokens, experts, label in ((32, 16, 8, "demo"), (32, 256, 32, "XL/2 per GPU")):
        g = torch.Generator().manual_seed(rank)
        scores = torch.randn(samples * tokens, experts, generator=g)
        k = 2 if experts == 8 else 4
        ref = gather_kth(scores, k).view(torch.int32)
        counted = {}
        for name, fn in ways.items():
            assert torch.equal(fn(scores, k).view(torch.int32), ref), name  # exact, every way
            c = _count_collectives()
            fn(scores, k)
            c["restore"]()
            counted[name] = c["bytes"]
        t = _collective_medians(
            {name: (lambda fn=fn, s=scores, k=k: fn(s, k)) for name, fn in ways.items()},
            repeats=repeats * (10 if experts == 8 else 2),
        )
        rows.append(
            [
                f"{label}: {samples} x {tokens} x {experts}",
                radix_cut(scores, k).method,
                *(f"{counted[n]:,}" for n in ("reference", "switch", "radix", "radix16")),
                *(t[n] * 1e3 for n in ("reference", "switch", "radix", "radix16")),
                t["switch"] / t["reference"],
                t["radix"] / t["reference"],
            ]
        )
    # Where the two exact ways cross: forced gather against forced radix, per-process score count swept.
    sweep = []
    for n in (1 << 10, 1 << 12, 1 << 13, 1 << 14, 1 << 15, 1 << 16, 1 << 18):
        scores = torch.randn(n // 8, 8, generator=torch.Generator().manual_seed(rank))
        t = _collective_medians(
            {w: (lambda fn=ways[w], s=scores: fn(s, 2)) for w in ("gather", "radix")}, repeats=repeats * 4
        )
        sweep.append(
            [n, f"{2 * n * 4 / 1024:,.0f}", t["gather"] * 1e3, t["radix"] * 1e3, t["gather"] / t["radix"]]
        )
    return rows, sweep


def _demo_model_config(width: int, depth: int, **overrides):
    """The demo-size RaceDiT-S/2-2in8 (8x8 one-channel inputs, 10 classes) the FSDP parts measure."""
    from racedit.models.registry import resolve_model_config

    return resolve_model_config(
        "RaceDiT-S/2-2in8",
        hidden_size=width,
        depth=depth,
        num_heads=4,
        input_size=8,
        in_channels=1,
        num_classes=10,
        **overrides,
    )


TRAIN_MODES = {  # label -> (sharded, train.fsdp_reshard_after_forward, gloo collectives)
    "ddp": (False, None, None),
    "fsdp": (True, True, True),  # the trainer's default on CPU
    "fsdp keep": (True, False, True),  # train.fsdp_reshard_after_forward=false
    "fsdp, FSDP2's gloo calls": (True, True, False),  # before racedit.training.collectives
}


def _train_bench(rank: int, repeats: int, width: int, depth: int, batch: int) -> list[list[object]]:
    import copy
    import statistics
    import time

    from torch.nn.parallel import DistributedDataParallel

    from bench.common import peak_step_memory
    from racedit.models import DiT, ForwardAux
    from racedit.models.loading import model_kwargs
    from racedit.training import sharded
    from racedit.training.ema import EMA

    cfg = _demo_model_config(width, depth, moe={"plr_weight": 0.01, "rsl_weight": 1e-4})
    torch.manual_seed(0)
    base = DiT(**model_kwargs(cfg))
    g = torch.Generator().manual_seed(rank)
    x, t, y = (
        torch.randn(batch, 1, 8, 8, generator=g),
        torch.rand(batch, generator=g) * 1000,
        torch.randint(0, 10, (batch,), generator=g),
    )

    setups = {}
    for kind, (fsdp, reshard, gloo) in TRAIN_MODES.items():
        model = copy.deepcopy(base)
        ema = EMA(model, 0.999)
        if fsdp:
            sharded.shard(model, torch.device("cpu"), reshard_after_forward=reshard, gloo_collectives=gloo)
            sharded.shard(ema.model, torch.device("cpu"), gloo_collectives=gloo)
            wrapped = model
        else:
            wrapped = DistributedDataParallel(model, static_graph=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the trainer's CPU default
        clip = sharded.clip_grad_norm_ if fsdp else torch.nn.utils.clip_grad_norm_
        setups[kind] = (model, wrapped, opt, ema, clip)
    state: dict[str, int] = {}

    def step(kind: str) -> None:  # the trainer's step (racedit/training/loop.py, Trainer.train_step)
        model, wrapped, opt, ema, clip = setups[kind]
        out = wrapped(x, t, y, aux=ForwardAux())
        out.float().pow(2).mean().backward()
        clip(model.parameters(), 1.0)
        opt.step()
        # what the process holds at its fullest between steps: params, gradients, AdamW moments, EMA
        state[kind] = sharded.state_bytes(model, opt) + sharded.state_bytes(ema.model)
        opt.zero_grad(set_to_none=True)
        ema.update(model, 0)

    # Interleaved steps, each started together on both processes; wall and process CPU time per step.
    for _ in range(2):
        for kind in setups:
            step(kind)
    wall: dict[str, list[float]] = {k: [] for k in setups}
    cpu: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(repeats):
        for kind in setups:
            dist.barrier()
            w, c = time.perf_counter(), time.process_time()
            step(kind)
            cpu[kind].append(time.process_time() - c)
            wall[kind].append(time.perf_counter() - w)

    # Peak tensor memory during one step (torch profiler; both processes run the step together): what is live
    # when it starts (params, AdamW moments, EMA: the gradients are freed between steps) plus the step's peak
    # allocation on top (full weights of the gathered units, gradients, communication buffers, activations).
    # The activations are the same computation in every mode: measured alone on the plain model (gradients
    # already allocated, so the forward + backward allocates only activations and temporaries).
    peak = {}
    for kind, (model, _, opt, ema, _) in setups.items():
        dist.barrier()
        at_start = sharded.state_bytes(model, opt) + sharded.state_bytes(ema.model)
        peak[kind] = at_start + peak_step_memory(lambda kind=kind: step(kind), "cpu")
    plain = copy.deepcopy(base)
    for p in plain.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None

    def forward_backward() -> None:
        plain(x, t, y, aux=ForwardAux()).float().pow(2).mean().backward()

    forward_backward()
    activations = peak_step_memory(forward_backward, "cpu")

    rows = []
    base_cpu = statistics.median(cpu["ddp"])
    base_wall = statistics.median(wall["ddp"])
    for kind in setups:
        c = sorted(cpu[kind])
        ratios = sorted(a / b for a, b in zip(cpu[kind], cpu["ddp"]))  # per interleaved round
        rows.append(
            [
                kind,
                statistics.median(wall[kind]) * 1e3,
                statistics.median(c) * 1e3,
                f"{c[len(c) // 4] * 1e3:.1f}-{c[(3 * len(c)) // 4] * 1e3:.1f}",
                statistics.median(c) / base_cpu,
                f"{ratios[len(ratios) // 4]:.2f}-{ratios[(3 * len(ratios)) // 4]:.2f}",
                statistics.median(wall[kind]) / base_wall,
                state[kind] / 2**20,
                state[kind] / state["ddp"],
                peak[kind] / 2**20,
                (peak[kind] - activations) / 2**20,
                (peak[kind] - activations) / (peak["ddp"] - activations),
            ]
        )
    rows.append(["(activations of the step, every mode)", *[""] * 8, activations / 2**20, "", ""])
    return rows


def _collectives_bench(rank: int, repeats: int, width: int, depth: int) -> list[list[object]]:
    """Process CPU time per call of FSDP's two collectives on one DiT block's flat buffer: gloo's own call
    (what FSDP2 runs) against racedit.training.collectives' (what the trainer runs on gloo), interleaved, each
    call started together on both processes."""
    import statistics
    import time

    from racedit.models import DiT
    from racedit.models.loading import model_kwargs
    from racedit.training.collectives import ExchangeAllGather, ExchangeReduceScatter

    cfg = _demo_model_config(width, depth)
    block = DiT(**model_kwargs(cfg)).blocks[0]
    numel = sum(p.numel() for p in block.parameters())
    numel += -numel % 2  # FSDP pads each parameter to a multiple of the world size; close enough here
    world, group, avg = 2, dist.group.WORLD, dist.ReduceOp.AVG
    gathered = torch.randn(numel)
    grads, reduced = torch.randn(numel), torch.empty(numel // world)
    source = grads.clone()
    mine = gathered.view(world, -1)[rank]  # FSDP2 gathers in place: the input is this process's slot
    ways = {
        "all-gather: gloo all_gather_single (FSDP2)": lambda: dist.all_gather_single(gathered, mine),
        "all-gather: exchange (send own shard, receive the others')": lambda: ExchangeAllGather()(
            gathered, mine, group
        ),
        "reduce-scatter: gloo reduce_scatter_single (FSDP2)": lambda: dist.reduce_scatter_single(
            reduced, grads, op=avg
        ),
        "reduce-scatter: exchange (send their chunks, add own)": lambda: ExchangeReduceScatter()(
            reduced, grads, group, avg
        ),
    }
    for fn in ways.values():
        fn()
        grads.copy_(source)
    cpu: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            grads.copy_(source)  # the same input every call
            dist.barrier()
            c = time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    names = list(ways)
    rows = []
    for i, name in enumerate(names):
        reference = med[names[i - i % 2]]  # FSDP2's call of the same collective
        rows.append([name, f"{numel * 4 / 2**20:.2f}", med[name] * 1e3, med[name] / reference])
    return rows


def _export_bench(rank: int, width: int, depth: int) -> list[list[object]]:
    """Peak CPU memory allocated on the main process while exporting the sharded EMA model: gathering the full
    model then ``save_model`` (before) against ``sharded.save_full`` (one tensor at a time)."""
    from bench.common import peak_step_memory
    from racedit.models import DiT, save_model
    from racedit.models.loading import model_kwargs
    from racedit.training import sharded

    cfg = _demo_model_config(width, depth)
    torch.manual_seed(0)
    model = DiT(**model_kwargs(cfg))
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    sharded.shard(model, torch.device("cpu"))

    def build():
        return DiT(**model_kwargs(cfg))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:

        def gather_then_save() -> None:
            plain = sharded.full_model(model, build)
            if rank == 0:
                save_model(plain, os.path.join(tmp, "old"))

        def streamed() -> None:
            sharded.save_full(model, build, os.path.join(tmp, "new"))

        for name, fn in (
            ("gather the model, save_model", gather_then_save),
            ("save_full (streamed)", streamed),
        ):
            fn()  # warm-up (imports, first allocations)
            dist.barrier()
            peak = peak_step_memory(fn, "cpu") if rank == 0 else (fn() or 0)
            rows.append([name, peak / 2**20, peak / full_bytes])
    rows.append(["(the model's full state; its largest tensor)", full_bytes / 2**20, largest / full_bytes])
    return rows


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    setup_host_memory(args)  # what the trainer does on CPU (train.retain_host_memory)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parts = args.parts.split(",")
    kth = _kth_bench(rank, args.repeats) if "kth" in parts else None
    train = (
        _train_bench(rank, args.train_repeats, args.width, args.depth, args.batch)
        if "train" in parts
        else None
    )
    if "train" in parts:
        train = (train, _collectives_bench(rank, 10 * args.train_repeats, args.width, args.depth))
    export = _export_bench(rank, args.width, args.depth) if "export" in parts else None
    queue.put((rank, kth, train, export))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--width", type=int, default=128, help="FSDP vs DDP model width (the demo's: 128)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="FSDP vs DDP samples per process (the demo's: 32)")
    p.add_argument("--train-repeats", type=int, default=21, help="interleaved FSDP/DDP step rounds")
    p.add_argument("--parts", default="kth,train,export", help="comma-separated subset of kth,train,export")
    add_host_memory_flag(p)
    args = p.parse_args(argv)
    if "kth" in args.parts:
        computed_bytes_table()
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, args, queue)) for r in range(world)]
        for proc in procs:
            proc.start()
        results = {r: rest for r, *rest in (queue.get() for _ in procs)}
        for proc in procs:
            proc.join()
    kth, train, export = results[0]
    if kth is not None:
        kth_rows, sweep = kth
        print_table(
            "K-th score per MoE layer at world 2 (gloo, 2 CPU processes): bytes counted, time measured (rank 0, "
            "median of interleaved repeats, a barrier before each call)",
            [
                "scores per process",
                "switch takes",
                "reference B",
                "switch B",
                "radix 4x256 B",
                "radix 2x65536 B",
                "reference ms",
                "switch ms",
                "radix 4x256 ms",
                "radix 2x65536 ms",
                "switch / reference",
                "radix / reference",
            ],
            kth_rows,
        )
        print_table(
            "Where the two exact ways cross at world 2 (gloo, CPU): per-process scores swept",
            ["scores per process", "gathered KiB (world 2)", "gather ms", "radix ms", "gather / radix"],
            sweep,
        )
    if train is not None:
        train, comms = train
        print_table(
            "FSDP's collectives on gloo, 2 CPU processes, one DiT block's buffer (the demo model's block): process "
            "CPU time per call (rank 0, median of interleaved calls)",
            ["collective", "MiB", "CPU ms", "/ FSDP2's"],
            comms,
        )
        print_table(
            f"FSDP vs DDP, 2 CPU processes, RaceDiT-S/2-2in8 width {args.width} depth {args.depth}, {args.batch} "
            "per process, forward + backward + clip + AdamW + EMA (rank 0; medians of interleaved rounds; IQR = "
            "interquartile range; state = params + grads + AdamW + EMA held by the process after the optimizer "
            "step; peak = tensor memory at the peak of a step (torch profiler), activations included; fsdp keep "
            "= train.fsdp_reshard_after_forward=false; the last row runs FSDP2's own gloo all-gather and "
            "reduce-scatter; "
            f"{'glibc malloc defaults' if args.glibc_malloc_defaults else 'freed host memory retained'})",
            [
                "mode",
                "step ms (wall)",
                "step ms (CPU)",
                "CPU IQR",
                "CPU / DDP",
                "CPU / DDP IQR (per round)",
                "wall / DDP",
                "state MiB",
                "state / DDP",
                "peak MiB",
                "peak - activations MiB",
                "(peak - activations) / DDP",
            ],
            train,
        )
    if export is not None:
        print_table(
            f"Exporting the sharded EMA model (width {args.width}, depth {args.depth}, 2 processes): peak CPU "
            "memory allocated on the main process during the export (torch profiler)",
            ["export", "peak MiB", "peak / full model"],
            export,
        )


if __name__ == "__main__":
    main()
