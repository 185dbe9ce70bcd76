"""Forward+backward time of the expert-race MoE layer relative to a dense MLP of equal activated FLOPs.

The MoE layer is ``racedit.moe.MoEFeedForward`` (E experts of hidden 4D/k, k per token on average, so
its expert FLOPs equal the dense ``Mlp(D, 4D)``; the router adds D*D + D*E MACs per token). Rows:

- ``dense MLP``: DiT's MLP, the denominator;
- ``MoE <router>``: the whole layer (router, routing, layout, experts, combine), forward + backward;
- ``  routing share``: router trunk + gating head + selection + layout (``strategy.plan``) forward and the
  backward into the router through the gates, i.e. everything but the experts;
- ``  experts share``: ``dispatch.expert_ffn`` on a fixed plan, forward + backward;
- ``  expert GEMMs alone`` against ``dense MLP GEMMs alone``: only the matrix products of a forward + backward
  (per linear map: x W, dL/dx = dL/dy W^T, dL/dW = x^T dL/dy), on preallocated operands: one set per expert at
  the fixed plan's token counts against one set at the dense MLP's shapes. The same multiply-adds, so their
  ratio is what splitting one GEMM into E smaller ones costs on this device: a floor under the experts
  share that no gather, combine or layout work can remove.

Timing is interleaved round-robin (warm-up, repeats, median), wall-clock and process CPU time; on a
shared CPU the CPU-time ratio is the steadier one. Shapes default to DiT-B scaled to a CPU:
D = 384 (half of B's 768), 2 samples of 256 tokens (B/2 at 256 px), the B/2 2-in-8 ablation.
GPUs are measured only with ``--device cuda``.

    python -m bench.moe_layer
    python -m bench.moe_layer --experts 32 --k 4 --routers race,token,expert
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from bench.common import print_table, synchronize
from racedit.kernels import dispatch
from racedit.models.ffn import Mlp
from racedit.moe import MoEConfig, MoEFeedForward


def measure(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, process-CPU s) per call of each function, interleaved round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {n: [] for n in fns}
    cpu: dict[str, list[float]] = {n: [] for n in fns}
    for _ in tqdm(range(repeats), desc="repeats", leave=False):
        for name, fn in fns.items():
            synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            synchronize()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in fns}


def mlp_gemms(rows: list[int], D: int, hidden: int, device: str, dtype: torch.dtype) -> Callable[[], None]:
    """The six matrix products of an MLP's forward + backward (D -> hidden -> D), one set per entry of
    ``rows`` (tokens per expert; one entry for a dense MLP), on operands made once."""
    sets = []
    for n in rows:
        if n == 0:
            continue

        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, dtype=dtype)

        sets.append((r(n, D), r(D, hidden), r(n, hidden), r(hidden, D), r(n, D), r(n, hidden)))

    def run() -> None:
        for x, w1, h, w2, gy, gh in sets:
            torch.mm(x, w1)  # forward
            torch.mm(h, w2)
            torch.mm(gy, w2.t())  # backward: dL/dh, dL/dW2, dL/dx, dL/dW1
            torch.mm(h.t(), gy)
            torch.mm(gh, w1.t())
            torch.mm(x.t(), gh)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=384, help="model width D (DiT-B: 768; halved for CPU)")
    p.add_argument("--batch", type=int, default=2, help="samples per batch B")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sample L (B/2 at 256 px: 256)")
    p.add_argument("--experts", type=int, default=8, help="number of experts E")
    p.add_argument("--k", type=int, default=2, help="experts per token on average (hidden split g = k)")
    p.add_argument("--routers", default="race", help="comma-separated routing strategies to time")
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"], help="kernel dispatch")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each function first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    D, hidden = args.dim, 4 * args.dim
    torch.manual_seed(0)
    h = torch.randn(args.batch, args.tokens, D, device=args.device, dtype=dtype)
    cot = torch.randn_like(h)

    def fwd_bwd(module: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            x = h.detach().requires_grad_()
            torch.autograd.backward(module(x), cot)
            module.zero_grad(set_to_none=True)

        return step

    dense = Mlp(D, hidden).to(args.device, dtype)
    T = args.batch * args.tokens
    fns: dict[str, Callable[[], None]] = {"dense MLP": fwd_bwd(dense)}
    macs: dict[str, int] = {"dense MLP": dense.flops(T)}
    fns["dense MLP GEMMs alone"] = mlp_gemms([T], D, hidden, args.device, dtype)
    macs["dense MLP GEMMs alone"] = dense.flops(T)
    for router in args.routers.split(","):
        cfg = MoEConfig(num_experts=args.experts, k=args.k, router=router, impl=args.impl)
        layer = MoEFeedForward(D, hidden, cfg, 0, 16).to(args.device, dtype).train()
        fns[f"MoE {router}"] = fwd_bwd(layer)
        macs[f"MoE {router}"] = layer.flops(T)
        router_macs = T * (D * D + D * args.experts)

        def routing(layer: MoEFeedForward = layer) -> None:
            x = h.detach().reshape(-1, D).requires_grad_()
            scores = layer.gating(layer.router(x)[1])
            plan = layer.route(scores.view(args.batch, args.tokens, -1))
            plan.sorted_gate.float().sum().backward()
            layer.zero_grad(set_to_none=True)

        with torch.no_grad():
            x0 = h.reshape(-1, D)
            fixed_plan = layer.route(layer.gating(layer.router(x0)[1]).view(args.batch, args.tokens, -1))
        fixed_plan.sorted_gate = fixed_plan.sorted_gate.detach()

        def experts(layer: MoEFeedForward = layer, plan=fixed_plan) -> None:
            x = h.detach().reshape(-1, D).requires_grad_()
            y = dispatch.expert_ffn(x, plan, layer.w1, layer.b1, layer.w2, layer.b2, args.impl)
            torch.autograd.backward(y, cot.reshape(-1, D))
            layer.zero_grad(set_to_none=True)

        fns[f"  {router}: routing share"] = routing
        fns[f"  {router}: experts share"] = experts
        macs[f"  {router}: routing share"] = router_macs
        macs[f"  {router}: experts share"] = layer.flops(T) - router_macs
        counts = fixed_plan.counts.tolist()
        fns[f"  {router}: expert GEMMs alone"] = mlp_gemms(counts, D, layer.expert_hidden, args.device, dtype)
        macs[f"  {router}: expert GEMMs alone"] = sum(counts) * 2 * D * layer.expert_hidden

    times = measure(fns, args.repeats, args.warmup)
    rows = []
    for name, (w, c) in times.items():
        base = "dense MLP GEMMs alone" if "GEMMs alone" in name else "dense MLP"  # GEMMs against GEMMs
        base_w, base_c = times[base]
        rows.append([name, w * 1e3, c * 1e3, w / base_w, c / base_c, f"{macs[name] / macs[base]:.3f}"])
    print_table(
        f"MoE layer fwd+bwd vs dense MLP: D={D}, T={args.batch}x{args.tokens}, {args.k}-in-{args.experts}, "
        f"{args.dtype}, {args.device}, impl={args.impl}, median of {args.repeats}",
        ["what", "wall ms", "cpu ms", "wall / dense", "cpu / dense", "activated MACs / dense"],
        rows,
    )
    print(
        "(the GEMMs-alone rows are divided by the dense MLP's GEMMs alone; every other row by the whole dense MLP)"
    )


if __name__ == "__main__":
    main()
