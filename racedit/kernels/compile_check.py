"""Compile every Triton kernel of this package for a GPU target without a GPU (ahead-of-time).

The CPU interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but accepts code the
real compiler rejects; this lowers each kernel variant the package launches through Triton's
compiler and the bundled ``ptxas`` for, by default, sm90 (H100), so such errors show up on a
machine with no GPU. It does not run anything: a GPU run is still needed for races and speed.

    python -m racedit.kernels.compile_check            # every variant (a few minutes on 2 cores)
    python -m racedit.kernels.compile_check --quick    # one variant per kernel
"""

from __future__ import annotations

import argparse
import itertools
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner


def compile_for(fn, pointer_types: dict[str, str], constexprs: dict, target: GPUTarget, **options):
    """Compile jitted ``fn`` for ``target``; arguments not named are i32 scalars."""
    if isinstance(fn, Autotuner):  # unwrap @triton.autotune to the jitted kernel
        fn = fn.fn
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "i32") for n in names}
    src = ASTSource(fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options=options)


def variants(quick: bool):
    """(name, kernel, pointer types, constexprs, options) of every kernel variant the package launches."""
    from racedit.kernels import triton_experts as X
    from racedit.kernels import triton_routing as R

    i32, i64 = "*i32", "*i64"
    passes = [0] if quick else range(R.NUM_PASSES)
    for p in passes:
        yield (
            f"radix pass {p}",
            R._radix_pass_kernel,
            dict(scores_ptr="*fp32", hist_ptr=i32),
            dict(PASS=p, BLOCK=1024, NBINS=R.NUM_BINS, BITS=R.RADIX_BITS),
            {},
        )
    yield (
        "tie pass",
        R._tie_kernel,
        dict(scores_ptr="*bf16", hist_ptr=i32, tie_ptr=i32),
        dict(BT=128, BE=32),
        {},
    )
    modes = [(R.MODE_RACE, False)] if quick else itertools.product((0, 1, 2), (False, True))
    for mode, ties_all in modes:
        sel = "*u8" if mode == R.MODE_MASK else "*bf16"
        common = dict(sel_ptr=sel, hist_ptr=i32, tie_ptr=i32, tau_ptr="*fp32")
        cx = dict(MODE=mode, TIES_ALL=ties_all, BT=128, BE=32, CHUNK=256)
        yield (
            f"count mode={mode} ties_all={ties_all}",
            R._count_kernel,
            dict(common, block_counts_ptr=i32, block_nan_ptr=i32, kth_ptr="*fp32"),
            cx,
            {},
        )
        scatter_ptrs = dict(
            common,
            gate_ptr="*bf16",
            block_start_ptr=i32,
            offsets_ptr=i64,
            slot_ptr=i64,
            sorted_token_ptr=i64,
            sorted_expert_ptr=i64,
            sorted_gate_ptr="*bf16",
        )
        yield f"scatter mode={mode} ties_all={ties_all}", R._scatter_kernel, scatter_ptrs, cx, {}
    yield (
        "scan",
        R._scan_kernel,
        dict(
            block_counts_ptr=i32,
            block_nan_ptr=i32,
            block_start_ptr=i32,
            counts_ptr=i64,
            offsets_ptr=i64,
            summary_ptr=i64,
        ),
        dict(BE=32, CH=64),
        {},
    )
    gemm_flags = [
        dict(
            GATHER_A=True, HAS_BIAS=True, GELU_FWD=True, GELU_BWD=False, SCALE_GATE=False, STORE_UNGATED=False
        ),
        dict(
            GATHER_A=False, HAS_BIAS=True, GELU_FWD=False, GELU_BWD=False, SCALE_GATE=True, STORE_UNGATED=True
        ),
        dict(
            GATHER_A=True, HAS_BIAS=False, GELU_FWD=False, GELU_BWD=True, SCALE_GATE=True, STORE_UNGATED=False
        ),
        dict(
            GATHER_A=False,
            HAS_BIAS=False,
            GELU_FWD=False,
            GELU_BWD=False,
            SCALE_GATE=False,
            STORE_UNGATED=False,
        ),
    ]
    configs = X._gemm_configs()[:1] if quick else X._gemm_configs()
    for cfg, flags in itertools.product(configs, gemm_flags[:1] if quick else gemm_flags):
        ptrs = {n: "*bf16" for n in ("a_ptr", "b_ptr", "bias_ptr", "gate_ptr", "z_ptr", "c_ptr", "c2_ptr")}
        yield (
            f"grouped gemm {cfg.kwargs} {[k for k, v in flags.items() if v]}",
            X._grouped_gemm_kernel,
            dict(ptrs, a_idx_ptr=i64, offsets_ptr=i64),
            dict(flags, UPCAST=False, PRECISION="tf32", BE=32, **cfg.kwargs),
            dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        )
    for cfg in X._wgrad_configs()[:1] if quick else X._wgrad_configs():
        ptrs = {n: "*bf16" for n in ("a_ptr", "g_ptr", "gate_ptr", "dw_ptr", "db_ptr")}
        yield (
            f"grouped wgrad {cfg.kwargs}",
            X._grouped_wgrad_kernel,
            dict(ptrs, a_idx_ptr=i64, g_idx_ptr=i64, offsets_ptr=i64),
            dict(
                GATHER_A=True,
                GATHER_G=True,
                SCALE_GATE=True,
                HAS_DB=True,
                UPCAST=False,
                PRECISION="tf32",
                **cfg.kwargs,
            ),
            dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        )
    yield (
        "combine",
        X._combine_kernel,
        dict(y_ptr="*bf16", slot_ptr=i64, out_ptr="*bf16"),
        dict(BT=32, BD=128),
        {},
    )
    yield (
        "gate grad",
        X._gate_grad_kernel,
        dict(dout_ptr="*bf16", tok_ptr=i64, o_ptr="*bf16", dgate_ptr="*fp32"),
        dict(BM=32, BD=128),
        {},
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch", type=int, default=90, help="CUDA compute capability x10 to compile for (90 = H100)"
    )
    p.add_argument("--quick", action="store_true", help="one variant per kernel instead of every variant")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    start = time.perf_counter()
    count = 0
    for name, fn, ptrs, cx, opts in variants(args.quick):
        kernel = compile_for(fn, ptrs, cx, target, **opts)
        print(f"ok  sm{args.arch}  {name}  (shared memory {kernel.metadata.shared} B)", flush=True)
        count += 1
    print(f"{count} kernel variants compile for sm{args.arch} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
