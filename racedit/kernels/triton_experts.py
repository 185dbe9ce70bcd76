"""Triton expert computation: grouped GEMMs over the plan's expert groups, and the combine (docs/spec/kernels.md).

Forward (K selected pairs, expert-major):
  z = x[sorted_token] @ w1[e] + b1[e]        grouped GEMM, the gather happens inside the A loads
  h = GELU_tanh(z)                           on the way out (z is kept for the backward)
  o = h @ w2[e] + b2[e];  y = gate * o       second grouped GEMM, gate multiplied in fp32 on the way out
  out[t] = sum_e y[slot[t, e]]               deterministic combine over each token's slots, no atomics
Backward (dout (T, D)); every dout[sorted_token] gather is fused into a load:
  dgate = <dout[tok], o>                     row dot
  dz = (gate * dout[tok]) @ w2[e]^T * GELU'(z)    grouped GEMM, gate and GELU' on the way out
  dw2[e] = h_e^T (gate * dout[tok])_e,  db2[e] = colsum(...)    per-expert weight-gradient GEMM
  dw1[e] = x[tok]_e^T dz_e,  db1[e] = colsum(dz_e)
  dx = combine(dz @ w1[e]^T)                 grouped GEMM + the same deterministic combine

GEMM programs find their (expert, row tile) from the offsets on the device, so nothing needs a
host sync. Under ``TRITON_INTERPRET=1`` dot operands are upcast to fp32 (the interpreter's bf16 dot
is wrong) and a single tile configuration is used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from racedit.kernels.reference import RoutePlan

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SQRT_2_OVER_PI = 0.7978845608028654


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu_tanh(z):
    return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))


@triton.jit
def _gelu_tanh_grad(z):
    th = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
    return 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)


@triton.jit
def _find_tile(offsets_ptr, E, pid, BM: tl.constexpr, BE: tl.constexpr):
    """Which expert and which BM-row tile of its group program ``pid`` computes."""
    idx = tl.arange(0, BE)
    lo = tl.load(offsets_ptr + idx, mask=idx < E, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + idx + 1, mask=idx < E, other=0).to(tl.int32)
    tiles = (hi - lo + BM - 1) // BM  # (BE,)
    ends = tl.cumsum(tiles, axis=0)
    e = tl.sum((ends <= pid).to(tl.int32), axis=0)
    first = tl.sum(tl.where(idx == e, ends - tiles, 0), axis=0)
    row_lo = tl.sum(tl.where(idx == e, lo, 0), axis=0) + (pid - first) * BM
    row_hi = tl.sum(tl.where(idx == e, hi, 0), axis=0)
    return e, row_lo, row_hi, pid < tl.sum(tiles, axis=0)


def _gemm_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4)]
    return [
        triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=4, num_stages=4),
    ]


@triton.autotune(configs=_gemm_configs(), key=["N", "KD", "GATHER_A", "GELU_FWD", "GELU_BWD"])
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_idx_ptr, stride_am, stride_ak,
    b_ptr, stride_be, stride_bk, stride_bn,
    bias_ptr, gate_ptr, z_ptr, c_ptr, c2_ptr, offsets_ptr,
    E, N, KD,
    GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_FWD: tl.constexpr, GELU_BWD: tl.constexpr,
    SCALE_GATE: tl.constexpr, STORE_UNGATED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """C[p, :] = epilogue(A[row(p), :] @ B[e(p)]) for the pairs p of each expert group.

    A rows are ``a[a_idx[p]]`` (GATHER_A) or ``a[p]``; B[e] is (KD, N) addressed through strides (so
    w^T needs no copy); C, z and c2 are (K, N) contiguous. Epilogue order: + bias[e], GELU (storing
    z), store ungated to c2, * gate[p] (fp32), * GELU'(z) (loading z).
    """
    e, row_lo, row_hi, active = _find_tile(offsets_ptr, E, tl.program_id(0), BM, BE)
    if active:
        rows = row_lo + tl.arange(0, BM)
        rmask = rows < row_hi
        if GATHER_A:
            src = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        cmask = cols < N
        acc = tl.zeros((BM, BN), tl.float32)
        b_base = b_ptr + e.to(tl.int64) * stride_be
        for k0 in range(0, KD, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < KD
            a = tl.load(
                a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            )
            b = tl.load(
                b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        out_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
        omask = rmask[:, None] & cmask[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if GELU_FWD:
            tl.store(z_ptr + out_off, acc.to(z_ptr.dtype.element_ty), mask=omask)
            acc = _gelu_tanh(acc)
        if STORE_UNGATED:
            tl.store(c2_ptr + out_off, acc.to(c2_ptr.dtype.element_ty), mask=omask)
        if SCALE_GATE:
            acc *= tl.load(gate_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        if GELU_BWD:
            acc *= _gelu_tanh_grad(tl.load(z_ptr + out_off, mask=omask, other=0.0).to(tl.float32))
        tl.store(c_ptr + out_off, acc.to(c_ptr.dtype.element_ty), mask=omask)  # fmt: skip


def _wgrad_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BKD": 32, "BN": 32, "BM": 32}, num_warps=4)]
    return [
        triton.Config({"BKD": 128, "BN": 128, "BM": 64}, num_warps=8, num_stages=3),
        triton.Config({"BKD": 64, "BN": 128, "BM": 64}, num_warps=4, num_stages=4),
    ]


@triton.autotune(configs=_wgrad_configs(), key=["KD", "N", "GATHER_A", "GATHER_G"])
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, a_idx_ptr, stride_am, g_ptr, g_idx_ptr, stride_gm, gate_ptr, dw_ptr, db_ptr, offsets_ptr,
    KD, N,
    GATHER_A: tl.constexpr, GATHER_G: tl.constexpr, SCALE_GATE: tl.constexpr, HAS_DB: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BKD: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """dw[e] (KD, N) = A_e^T G_e over expert e's rows; db[e] = colsum(G_e). One program per output tile.

    A rows: a[a_idx[p]] or a[p] (unit column stride); G rows: g[g_idx[p]] or g[p], times gate[p] in
    fp32 when SCALE_GATE. No atomics: each program owns its tile and loops over the expert's rows.
    """
    e = tl.program_id(0)
    n_tiles = tl.cdiv(N, BN)
    pk = tl.program_id(1) // n_tiles
    pn = tl.program_id(1) % n_tiles
    lo = tl.load(offsets_ptr + e).to(tl.int32)
    hi = tl.load(offsets_ptr + e + 1).to(tl.int32)
    ks = pk * BKD + tl.arange(0, BKD)
    ns = pn * BN + tl.arange(0, BN)
    kmask = ks < KD
    nmask = ns < N
    acc = tl.zeros((BKD, BN), tl.float32)
    db = tl.zeros((BN,), tl.float32)
    for m0 in range(lo, hi, BM):
        rows = m0 + tl.arange(0, BM)
        rmask = rows < hi
        if GATHER_A:
            asrc = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            asrc = rows.to(tl.int64)
        if GATHER_G:
            gsrc = tl.load(g_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            gsrc = rows.to(tl.int64)
        a = tl.load(
            a_ptr + asrc[:, None] * stride_am + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        g = tl.load(
            g_ptr + gsrc[:, None] * stride_gm + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0
        )
        if SCALE_GATE:
            gate = tl.load(gate_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * gate[:, None]).to(g_ptr.dtype.element_ty)
        if HAS_DB:
            db += tl.sum(g.to(tl.float32), axis=0)
        if UPCAST:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    out = e.to(tl.int64) * KD * N + ks[:, None] * N + ns[None, :]
    tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])
    if HAS_DB:
        if pk == 0:
            tl.store(db_ptr + e * N + ns, db.to(db_ptr.dtype.element_ty), mask=nmask)  # fmt: skip


@triton.jit
def _combine_kernel(y_ptr, slot_ptr, out_ptr, T, E, D, BT: tl.constexpr, BD: tl.constexpr):
    """out[t] = sum_e y[slot[t, e]] over routed pairs, ascending e, fp32 accumulation, no atomics."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    tmask = t < T
    dmask = d < D
    acc = tl.zeros((BT, BD), tl.float32)
    for e in range(E):
        s = tl.load(slot_ptr + t * E + e, mask=tmask, other=-1)
        m = (s >= 0)[:, None] & dmask[None, :]
        acc += tl.load(y_ptr + tl.where(s >= 0, s, 0)[:, None] * D + d[None, :], mask=m, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + t.to(tl.int64)[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])  # fmt: skip


@triton.jit
def _gate_grad_kernel(dout_ptr, tok_ptr, o_ptr, dgate_ptr, K, D, BM: tl.constexpr, BD: tl.constexpr):
    """dgate[p] = <dout[sorted_token[p]], o[p]> in fp32."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < K
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    acc = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        m = rmask[:, None] & (d < D)[None, :]
        g = tl.load(dout_ptr + tok[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(g * o, axis=1)
    tl.store(dgate_ptr + rows, acc, mask=rmask)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def grouped_gemm(
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    num_rows: int,
    *,
    a_idx: Tensor | None = None,
    b_transposed: bool = False,
    bias: Tensor | None = None,
    gate: Tensor | None = None,
    gelu_fwd: bool = False,
    gelu_bwd_z: Tensor | None = None,
    store_ungated: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(K, N) = epilogue(A[rows] @ B[e]) per expert group; returns (c, z or None, ungated or None).

    a (M, KD) (rows gathered by ``a_idx`` (K,) when given); b (E, KD, N), or (E, N, KD) read
    transposed when ``b_transposed``; offsets (E+1,) of the plan.
    """
    E = b.shape[0]
    KD, N = (b.shape[2], b.shape[1]) if b_transposed else (b.shape[1], b.shape[2])
    stride_be, stride_bk, stride_bn = (
        (b.stride(0), b.stride(2), b.stride(1)) if b_transposed else (b.stride(0), b.stride(1), b.stride(2))
    )
    if a.stride(-1) != 1:
        a = a.contiguous()
    dev, dt = a.device, out_dtype or a.dtype
    c = torch.empty(num_rows, N, dtype=dt, device=dev)
    z = torch.empty(num_rows, N, dtype=dt, device=dev) if gelu_fwd else gelu_bwd_z
    c2 = torch.empty(num_rows, N, dtype=dt, device=dev) if store_ungated else None
    if num_rows == 0:
        return c, z if gelu_fwd else None, c2
    BE = triton.next_power_of_2(max(E, 1))
    grid = lambda meta: (triton.cdiv(num_rows, meta["BM"]) + E, triton.cdiv(N, meta["BN"]))  # noqa: E731
    dummy = c
    _grouped_gemm_kernel[grid](
        a, a_idx if a_idx is not None else dummy, a.stride(0), a.stride(1),
        b, stride_be, stride_bk, stride_bn,
        bias if bias is not None else dummy, gate if gate is not None else dummy,
        z if z is not None else dummy, c, c2 if c2 is not None else dummy, offsets,
        E, N, KD,
        GATHER_A=a_idx is not None, HAS_BIAS=bias is not None, GELU_FWD=gelu_fwd,
        GELU_BWD=gelu_bwd_z is not None, SCALE_GATE=gate is not None, STORE_UNGATED=store_ungated,
        UPCAST=INTERPRET, PRECISION=_precision(a.dtype), BE=BE,
    )  # fmt: skip
    return c, z if gelu_fwd else None, c2


def grouped_wgrad(
    a: Tensor,
    g: Tensor,
    offsets: Tensor,
    *,
    a_idx: Tensor | None = None,
    g_idx: Tensor | None = None,
    gate: Tensor | None = None,
    with_bias: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """dw (E, KD, N) = per expert A_e^T G_e (rows gathered/gate-scaled as asked); db (E, N) = colsum G_e."""
    E = offsets.shape[0] - 1
    KD, N = a.shape[1], g.shape[1]
    a, g = a.contiguous(), g.contiguous()
    dt = out_dtype or a.dtype
    dw = torch.empty(E, KD, N, dtype=dt, device=a.device)
    db = torch.empty(E, N, dtype=dt, device=a.device) if with_bias else None
    grid = lambda meta: (E, triton.cdiv(KD, meta["BKD"]) * triton.cdiv(N, meta["BN"]))  # noqa: E731
    dummy = dw
    _grouped_wgrad_kernel[grid](
        a, a_idx if a_idx is not None else dummy, a.stride(0), g, g_idx if g_idx is not None else dummy,
        g.stride(0), gate if gate is not None else dummy, dw, db if db is not None else dummy, offsets,
        KD, N,
        GATHER_A=a_idx is not None, GATHER_G=g_idx is not None, SCALE_GATE=gate is not None,
        HAS_DB=with_bias, UPCAST=INTERPRET, PRECISION=_precision(a.dtype),
    )  # fmt: skip
    return dw, db


def combine(y: Tensor, slot: Tensor) -> Tensor:
    """out (T, D) = sum_e y[slot[t, e]] (ascending e, fp32 accumulation); y (K, D), slot (T, E)."""
    T, E = slot.shape
    D = y.shape[1]
    out = torch.empty(T, D, dtype=y.dtype, device=y.device)
    BT, BD = 32, min(128, triton.next_power_of_2(max(D, 16)))
    _combine_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
        y.contiguous(), slot, out, T, E, D, BT=BT, BD=BD
    )
    return out


def gate_grad(dout: Tensor, sorted_token: Tensor, o: Tensor) -> Tensor:
    """(K,) fp32: dgate[p] = <dout[sorted_token[p]], o[p]>."""
    K, D = o.shape
    dgate = torch.empty(K, dtype=torch.float32, device=o.device)
    if K:
        BM, BD = 32, min(128, triton.next_power_of_2(max(D, 16)))
        _gate_grad_kernel[(triton.cdiv(K, BM),)](dout, sorted_token, o, dgate, K, D, BM=BM, BD=BD)
    return dgate


class _ExpertFFN(torch.autograd.Function):
    """Triton ``expert_ffn``: gradients for x, the gates (-> scores via the plan) and all weights."""

    @staticmethod
    def forward(ctx, x, gate, w1, b1, w2, b2, sorted_token, offsets, slot):  # type: ignore[override]
        K = sorted_token.shape[0]
        x = x.contiguous()
        h, z, _ = grouped_gemm(x, w1, offsets, K, a_idx=sorted_token, bias=b1, gelu_fwd=True)  # (K, H)
        need_o = ctx.needs_input_grad[1]
        y, _, o = grouped_gemm(h, w2, offsets, K, bias=b2, gate=gate, store_ungated=need_o)  # (K, D)
        ctx.save_for_backward(x, gate, w1, w2, sorted_token, offsets, slot, z, h, o)
        return combine(y, slot)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        x, gate, w1, w2, tok, offsets, slot, z, h, o = ctx.saved_tensors
        need_x, need_gate, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        dout = dout.contiguous()
        K = tok.shape[0]
        dx = dgate = dw1 = db1 = dw2 = db2 = None
        if need_gate:
            dgate = gate_grad(dout, tok, o).to(gate.dtype)
        if need_w2 or need_b2:
            dw2, db2 = grouped_wgrad(h, dout, offsets, g_idx=tok, gate=gate, out_dtype=w2.dtype)
        # dz = (gate * dout[tok]) @ w2[e]^T * GELU'(z): w2 (E, H, D) read as (E, D, H)
        dz, _, _ = grouped_gemm(dout, w2, offsets, K, a_idx=tok, b_transposed=True, gate=gate, gelu_bwd_z=z)
        if need_w1 or need_b1:
            dw1, db1 = grouped_wgrad(x, dz, offsets, a_idx=tok, out_dtype=w1.dtype)
        if need_x:
            dxp, _, _ = grouped_gemm(
                dz, w1, offsets, K, b_transposed=True
            )  # (K, D): w1 (E, D, H) as (E, H, D)
            dx = combine(dxp, slot)
        return dx, dgate, dw1, db1, dw2, db2, None, None, None


def expert_ffn(x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Triton version of ``reference.expert_ffn`` (same signature and semantics)."""
    dt = x.dtype
    w1, w2 = (p if p.dtype == dt else p.to(dt) for p in (w1, w2))  # any strides: read through them
    b1, b2 = (p.to(dt).contiguous() for p in (b1, b2))  # (E, H), (E, D) indexed as e * N + n
    return _ExpertFFN.apply(
        x, plan.sorted_gate, w1, b1, w2, b2, plan.sorted_token, plan.offsets, plan.slot.contiguous()
    )
