"""Expert Race routing and expert GEMMs: Triton kernels against their baselines (docs/spec/kernels.md targets).

On a GPU (``--device cuda``, the default when CUDA is present), at DiT-XL/2 shapes (D = 1152,
T = 256 * batch, 4-in-32, bf16):
- routing share: ``race_plan`` (cut + count + scan + scatter) and the threshold variant over the
  MoE layer's forward time (target <= 2%);
- expert GEMMs: the two Triton grouped GEMMs (gather fused into the loads) in TFLOP/s against one
  dense cuBLAS MLP of the same FLOPs (target >= 70%) and ``torch._grouped_mm`` (target: not slower);
- fused gather overhead: the first grouped GEMM with the gather against the same GEMM on rows
  gathered beforehand (target <= 5%);
- the MoE layer (forward + backward) against a dense MLP of equal activated FLOPs (drive to 1.0).
On CPU it times the PyTorch reference (the CPU training path) against the naive formulation it
replaced, and says that no GPU figure was measured.

    python -m bench.routing                    # CPU: reference timings; GPU: everything above
    python -m bench.routing --device cuda --batch 64
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import interleaved_medians, machine_description, print_table
from racedit.kernels import dispatch, reference
from racedit.kernels.reference import RoutePlan

# ----------------------------------------------------------------------------------------------
# The formulation the CPU reference replaced (kept here as the "naive" baseline)
# ----------------------------------------------------------------------------------------------


def naive_expert_ffn(x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Per-expert row slices and ``w[e]`` indexing (each backward zero-fills a full-size tensor) and a
    (T, E, D) padded gather + sum combine (backward through index_put)."""
    T, D = x.shape
    rows = x.index_select(0, plan.sorted_token)
    offsets = plan.offsets.tolist()
    outs = []
    for e in range(w1.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            h = F.gelu(rows[lo:hi] @ w1[e] + b1[e], approximate="tanh")
            outs.append(h @ w2[e] + b2[e])
    y = torch.cat(outs) * plan.sorted_gate.to(x.dtype).unsqueeze(1)  # (K, D)
    padded = torch.cat([y, y.new_zeros(1, D)])
    idx = torch.where(plan.slot >= 0, plan.slot, torch.full_like(plan.slot, y.shape[0]))
    return padded[idx].sum(dim=1)  # (T, E, D) -> (T, D)


def make_experts(E: int, D: int, H: int, device: str, dtype: torch.dtype) -> list[Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    w1 = torch.randn(E, D, H, device=device, generator=g) / D**0.5
    w2 = torch.randn(E, H, D, device=device, generator=g) / H**0.5
    b1, b2 = torch.zeros(E, H, device=device), torch.zeros(E, D, device=device)
    return [p.to(dtype).requires_grad_() for p in (w1, b1, w2, b2)]


# ----------------------------------------------------------------------------------------------
# CPU: the reference
# ----------------------------------------------------------------------------------------------


def cpu_tables(args: argparse.Namespace) -> None:
    T, D, E, k = args.tokens, args.dim, args.experts, args.k
    H = 4 * D // k
    x = torch.randn(T, D, requires_grad=True)
    s = torch.randn(T, E, requires_grad=True)
    w1, b1, w2, b2 = make_experts(E, D, H, "cpu", torch.float32)
    cot = torch.randn(T, D)

    def ffn(fn, backward: bool):
        def step() -> None:
            plan = reference.race_plan(s, k_total=k * T)
            out = fn(x, plan, w1, b1, w2, b2)
            if backward:
                torch.autograd.backward(out, cot)

        return step

    grouped = lambda *a: dispatch.expert_ffn(*a, impl="grouped_mm")  # noqa: E731
    fns = {
        "routing only (race_plan)": lambda: reference.race_plan(s.detach(), k_total=k * T),
        "torch.topk of T*E (lower bound)": lambda: torch.topk(s.detach().view(-1), k * T),
        "fwd: reference": ffn(reference.expert_ffn, False),
        "fwd: naive": ffn(naive_expert_ffn, False),
        "fwd: torch._grouped_mm": ffn(grouped, False),
        "fwd+bwd: reference": ffn(reference.expert_ffn, True),
        "fwd+bwd: naive": ffn(naive_expert_ffn, True),
        "fwd+bwd: torch._grouped_mm": ffn(grouped, True),
    }
    t = interleaved_medians(fns, repeats=args.repeats, warmup=args.warmup)
    base = {"fwd": t["fwd: reference"], "fwd+bwd": t["fwd+bwd: reference"]}
    rows = []
    for name, sec in t.items():
        kind = name.split(":")[0]
        ratio = f"{sec / base[kind]:.2f}x reference" if kind in base else f"{sec / base['fwd']:.1%} of fwd"
        rows.append([name, sec * 1e3, ratio])
    print_table(
        f"CPU reference, expert race + expert FFN: T={T}, D={D}, {k}-in-{E}, H={H}, fp32, "
        f"median of {args.repeats}",
        ["what", "ms", "relative"],
        rows,
    )
    print(
        "\nNo GPU was available: the Triton kernels' routing share, grouped-GEMM TFLOP/s, gather overhead "
        "and MoE-vs-dense ratios are NOT measured (run `python -m bench.routing --device cuda` on a GPU)."
    )


# ----------------------------------------------------------------------------------------------
# GPU: Triton kernels at DiT-XL/2 shapes
# ----------------------------------------------------------------------------------------------


def gpu_tables(args: argparse.Namespace, dev: str = "cuda", dt: torch.dtype = torch.bfloat16) -> None:
    """The GPU tables (``dev``/``dt`` are only changed to smoke-test this code under the interpreter)."""
    from racedit.kernels import grouped_mm, triton_experts
    from racedit.models.ffn import Mlp
    from racedit.moe import MoEConfig, MoEFeedForward

    T, D, E, k = args.batch * 256, args.dim, args.experts, args.k
    H = 4 * D // k
    torch.manual_seed(0)
    layer = MoEFeedForward(D, 4 * D, MoEConfig(num_experts=E, k=k, impl="triton"), 0, 16).to(dev, dt).train()
    dense = Mlp(D, 4 * D).to(dev, dt)
    h = torch.randn(1, T, D, device=dev, dtype=dt)
    x = h.view(T, D)
    with torch.no_grad():
        scores = layer.gating(layer.router(x)[1]).contiguous()  # (T, E)
        plan = dispatch.race_plan(scores, k_total=k * T, impl="triton")
        tau = plan.kth.float()
    w1, b1, w2, b2 = (p.detach() for p in (layer.w1, layer.b1, layer.w2, layer.b2))
    K = plan.num_pairs

    # -- routing share of the layer's forward
    with torch.no_grad():
        t = interleaved_medians(
            {
                "MoE layer forward": lambda: layer(h),
                "race_plan (exact K)": lambda: dispatch.race_plan(scores, k_total=k * T, impl="triton"),
                "race_plan (threshold)": lambda: dispatch.race_plan(scores, tau=tau, impl="triton"),
                "torch.topk of T*E": lambda: torch.topk(scores.view(-1), k * T),
            },
            repeats=args.repeats,
            warmup=args.warmup,
            inner=args.inner,
        )
    fwd = t["MoE layer forward"]
    rows = [[n, s * 1e6, f"{s / fwd:.2%}"] for n, s in t.items()]
    print_table(
        f"Routing share of the MoE forward: T={T}, D={D}, {k}-in-{E}, {str(dt)[6:]} (target: exact-K <= 2%)",
        ["what", "us", "share of MoE forward"],
        rows,
    )

    # -- expert GEMMs: TFLOP/s against dense cuBLAS of equal FLOPs and torch._grouped_mm
    flops = 2 * 2 * K * D * H  # two GEMMs, multiply-add = 2 FLOPs
    xd = torch.randn(T, D, device=dev, dtype=dt)
    wd1, wd2 = torch.randn(D, 4 * D, device=dev, dtype=dt), torch.randn(4 * D, D, device=dev, dtype=dt)
    rows_pre = x.index_select(0, plan.sorted_token).contiguous()
    offs32 = plan.offsets[1:].to(torch.int32)

    def tri_gemms() -> None:
        a, _, _ = triton_experts.grouped_gemm(
            x, w1, plan.offsets, K, a_idx=plan.sorted_token, bias=b1, gelu_fwd=True
        )
        triton_experts.grouped_gemm(a, w2, plan.offsets, K, bias=b2, gate=plan.sorted_gate)

    fns = {
        "dense cuBLAS (T,D)x(D,4D)x(4D,D)": lambda: (xd @ wd1) @ wd2,
        "Triton grouped GEMMs (fused gather)": tri_gemms,
        "Triton GEMM1 with gather": lambda: triton_experts.grouped_gemm(
            x, w1, plan.offsets, K, a_idx=plan.sorted_token, bias=b1, gelu_fwd=True
        ),
        "Triton GEMM1 on pre-gathered rows": lambda: triton_experts.grouped_gemm(
            rows_pre, w1, plan.offsets, K, bias=b1, gelu_fwd=True
        ),
    }
    if grouped_mm.supports(x, w1) is None:
        fns["torch._grouped_mm x2 (gather materialised)"] = lambda: torch._grouped_mm(
            torch._grouped_mm(x.index_select(0, plan.sorted_token), w1, offs=offs32), w2, offs=offs32
        )
        fns["torch._grouped_mm x2 (no gather)"] = lambda: torch._grouped_mm(
            torch._grouped_mm(rows_pre, w1, offs=offs32), w2, offs=offs32
        )
    with torch.no_grad():
        t = interleaved_medians(fns, repeats=args.repeats, warmup=args.warmup, inner=args.inner)
    dense_s = t["dense cuBLAS (T,D)x(D,4D)x(4D,D)"]
    rows = []
    for n, s in t.items():
        f = flops / 2 if "GEMM1" in n else flops
        rows.append(
            [n, s * 1e6, f / s / 1e12, f"{(flops / s) / (flops / dense_s):.2f}" if "GEMM1" not in n else ""]
        )
    gather = t["Triton GEMM1 with gather"] / t["Triton GEMM1 on pre-gathered rows"] - 1
    print_table(
        f"Expert GEMMs (forward): K={K} pairs, D={D}, H={H}, {str(dt)[6:]} (targets: >= 0.70 of dense, not slower than "
        f"_grouped_mm; gather overhead {gather:+.1%}, target <= 5%)",
        ["what", "us", "TFLOP/s", "throughput / dense"],
        rows,
    )

    # -- the MoE layer against a dense MLP of equal activated FLOPs, forward + backward
    cot = torch.randn_like(h)

    def fwd_bwd(module: torch.nn.Module):
        def step() -> None:
            torch.autograd.backward(module(h.detach().requires_grad_()), cot)
            module.zero_grad(set_to_none=True)

        return step

    t = interleaved_medians(
        {"dense MLP": fwd_bwd(dense), "MoE race (triton)": fwd_bwd(layer)},
        repeats=args.repeats,
        warmup=args.warmup,
    )
    rows = [[n, s * 1e3, s / t["dense MLP"]] for n, s in t.items()]
    print_table(
        f"MoE layer vs dense MLP, forward + backward: T={T}, D={D}, {k}-in-{E}, {str(dt)[6:]} (drive toward 1.0)",
        ["what", "ms", "time / dense"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if present")
    p.add_argument("--dim", type=int, default=None, help="model width D (default: 1152 on GPU, 128 on CPU)")
    p.add_argument("--experts", type=int, default=None, help="experts E (default: 32 on GPU, 8 on CPU)")
    p.add_argument("--k", type=int, default=None, help="experts per token on average (default: 4 GPU, 2 CPU)")
    p.add_argument("--batch", type=int, default=32, help="GPU: samples of 256 tokens (DiT-XL/2 at 256 px)")
    p.add_argument("--tokens", type=int, default=2048, help="CPU: tokens T")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per function (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each function first")
    p.add_argument("--inner", type=int, default=10, help="GPU: calls per timed round (short kernels)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    args.dim = args.dim or (1152 if on_gpu else 128)
    args.experts = args.experts or (32 if on_gpu else 8)
    args.k = args.k or (4 if on_gpu else 2)
    print(f"machine: {machine_description()}")
    if on_gpu:
        gpu_tables(args)
    else:
        cpu_tables(args)


if __name__ == "__main__":
    main()
