"""Triton kernels for the Expert Race routing layout (docs/spec/kernels.md, "Design that needs no sort").

Pipeline (training, exact-K): 4 radix passes that find the K-th largest key, a tie pass (does no work
unless ties straddle the cut), count, scan, scatter. Threshold (inference) and mask modes: count,
scan, scatter (3 launches). Every (t, e) is decided independently once the cut is known, and a
running count down each expert's column gives each selected pair its slot, so the outputs are
written without atomics and in a deterministic order.

Keys: fp32 scores (bf16/fp16 upcast exactly) become order-preserving uint32 keys: -0.0 is first
made +0.0, then negatives flip all bits and non-negatives flip the sign bit, so a larger float has a
larger key. NaN would sort above +inf; it is counted and rejected.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from racedit.kernels.reference import NAN_MESSAGE, RoutePlan, Ties, check_ties, gather_gates_from_values

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

RADIX_BITS = 8  # the kernels below spell out 4 passes x 256 bins x 8 bits where a constexpr is needed
NUM_PASSES = 32 // RADIX_BITS
NUM_BINS = 1 << RADIX_BITS

MODE_RACE = 0  # exact top-K through the radix cut
MODE_THRESHOLD = 1  # score >= tau
MODE_MASK = 2  # a given boolean selection


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _float_to_key(s):
    """fp32 -> order-preserving uint32 (-0.0 and +0.0 map to the same key)."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) != 0
    return tl.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _is_nan(s):
    """Bit test (exponent all ones, mantissa non-zero): immune to fast-math folding of ``s != s``."""
    return (s.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def _key_to_float(key):
    """Inverse of ``_float_to_key`` (for +0.0)."""
    was_negative = (key >> 31) == 0
    bits = tl.where(was_negative, key ^ 0xFFFFFFFF, key & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cut_from_hist(hist_ptr, k_total, DONE: tl.constexpr, NBINS: tl.constexpr, BITS: tl.constexpr):
    """Replay the first DONE radix passes from their global histograms (the same on every program).

    Returns (prefix: the top DONE*BITS bits of the K-th key, k_rem: how many entries equal to that
    prefix still have to be taken, count_eq: how many entries share it).
    """
    bins = tl.arange(0, NBINS)
    prefix = tl.full((), 0, tl.uint32)
    k_rem = tl.full((), 0, tl.int32) + k_total  # k_total may arrive as a specialised constant
    count_eq = tl.full((), 0, tl.int32)
    for q in tl.static_range(DONE):
        h = tl.load(hist_ptr + q * NBINS + bins)  # (NBINS,) int32
        at_or_above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # entries with digit >= d
        digit = tl.sum((at_or_above >= k_rem).to(tl.int32), axis=0) - 1  # largest d with >= k_rem at/above
        above = tl.sum(tl.where(bins > digit, h, 0), axis=0)
        count_eq = tl.sum(tl.where(bins == digit, h, 0), axis=0)
        k_rem = k_rem - above
        prefix = prefix | (digit.to(tl.uint32) << (32 - BITS * (q + 1)))
    return prefix, k_rem, count_eq


@triton.jit
def _radix_pass_kernel(
    scores_ptr,
    N,
    hist_ptr,
    k_total,
    PASS: tl.constexpr,
    BLOCK: tl.constexpr,
    NBINS: tl.constexpr,
    BITS: tl.constexpr,
):
    """Histogram of digit PASS among keys that share the prefix fixed by the previous passes."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    prefix, k_rem, count_eq = _cut_from_hist(hist_ptr, k_total, PASS, NBINS, BITS)
    SHIFT: tl.constexpr = 32 - BITS * (PASS + 1)
    hist = tl.zeros((NBINS,), tl.int32)
    for start in range(pid * BLOCK, N, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < N
        s = tl.load(scores_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        key = _float_to_key(s)
        match = valid
        if PASS > 0:
            match = valid & ((key >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
        digit = ((key >> SHIFT) & (NBINS - 1)).to(tl.int32)
        hist += tl.histogram(digit, NBINS, mask=match)
    tl.atomic_add(hist_ptr + PASS * NBINS + tl.arange(0, NBINS), hist)


@triton.jit
def _block_tile(T, E, b, BT: tl.constexpr, BE: tl.constexpr):
    t = b * BT + tl.arange(0, BT)[:, None]  # (BT, 1)
    e = tl.arange(0, BE)[None, :]  # (1, BE)
    valid = (t < T) & (e < E)
    return t, e, valid


@triton.jit
def _flat_rank(flags):
    """Exclusive rank of each set flag in row-major (flat t*E+e) order inside the tile."""
    f = flags.to(tl.int32)
    per_row = tl.sum(f, axis=1)  # (BT,)
    row_before = tl.cumsum(per_row, axis=0) - per_row
    return row_before[:, None] + tl.cumsum(f, axis=1) - f


@triton.jit
def _tie_kernel(scores_ptr, T, E, hist_ptr, k_total, tie_ptr, BT: tl.constexpr, BE: tl.constexpr):
    """Per-block count of entries equal to the K-th key; reads no scores unless ties straddle the cut."""
    b = tl.program_id(0)
    v, k_rem, count_eq = _cut_from_hist(hist_ptr, k_total, 4, 256, 8)
    ties = tl.full((), 0, tl.int32)
    if k_rem < count_eq:
        t, e, valid = _block_tile(T, E, b, BT, BE)
        s = tl.load(scores_ptr + t * E + e, mask=valid, other=0.0).to(tl.float32)
        eq = valid & (_float_to_key(s) == v)
        ties = tl.sum(tl.sum(eq.to(tl.int32), axis=1), axis=0)
    tl.store(tie_ptr + b, ties)


@triton.jit
def _block_selection(
    sel_ptr,
    T,
    E,
    b,
    hist_ptr,
    k_total,
    tie_ptr,
    tau_ptr,
    MODE: tl.constexpr,
    TIES_ALL: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """(BT, BE) selection of block b; identical in the count and the scatter kernels."""
    t, e, valid = _block_tile(T, E, b, BT, BE)
    nan = valid & (t < 0)
    if MODE == 2:
        sel = valid & (tl.load(sel_ptr + t * E + e, mask=valid, other=0) != 0)
    else:
        s = tl.load(sel_ptr + t * E + e, mask=valid, other=0.0).to(tl.float32)
        nan = valid & _is_nan(s)
        if MODE == 1:
            sel = valid & (s >= tl.load(tau_ptr).to(tl.float32))
        else:
            v, k_rem, count_eq = _cut_from_hist(hist_ptr, k_total, 4, 256, 8)
            key = _float_to_key(s)
            above = valid & (key > v)
            eq = valid & (key == v)
            if TIES_ALL:
                sel = above | eq
            else:
                # Ties straddle the cut: take the k_rem lowest flat indices among them.
                n_before = tl.where(k_rem < count_eq, b, 0)
                ties_before = tl.full((), 0, tl.int32)
                for c in range(0, n_before, CHUNK):
                    idx = c + tl.arange(0, CHUNK)
                    ties_before += tl.sum(tl.load(tie_ptr + idx, mask=idx < n_before, other=0), axis=0)
                sel = above | (eq & ((ties_before + _flat_rank(eq)) < k_rem))
    return t, e, valid, sel, nan


@triton.jit
def _count_kernel(
    sel_ptr,
    T,
    E,
    hist_ptr,
    k_total,
    tie_ptr,
    tau_ptr,
    block_counts_ptr,
    block_nan_ptr,
    kth_ptr,
    MODE: tl.constexpr,
    TIES_ALL: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """block_counts[b, e] = selected entries of expert e among the tokens of block b; block_nan[b] = NaNs."""
    b = tl.program_id(0)
    t, e, valid, sel, nan = _block_selection(
        sel_ptr, T, E, b, hist_ptr, k_total, tie_ptr, tau_ptr, MODE, TIES_ALL, BT, BE, CHUNK
    )
    cols = tl.arange(0, BE)
    tl.store(block_counts_ptr + b * E + cols, tl.sum(sel.to(tl.int32), axis=0), mask=cols < E)
    tl.store(block_nan_ptr + b, tl.sum(tl.sum(nan.to(tl.int32), axis=1), axis=0))
    if MODE == 0:
        if b == 0:
            v, k_rem, count_eq = _cut_from_hist(hist_ptr, k_total, 4, 256, 8)
            tl.store(kth_ptr, _key_to_float(v))


@triton.jit
def _scan_kernel(
    block_counts_ptr,
    block_nan_ptr,
    NB,
    E,
    block_start_ptr,
    counts_ptr,
    offsets_ptr,
    summary_ptr,
    BE: tl.constexpr,
    CH: tl.constexpr,
):
    """One program: per-expert exclusive prefix over blocks, counts, offsets, summary = [K, NaNs]."""
    cols = tl.arange(0, BE)
    carry = tl.zeros((BE,), tl.int32)
    nans = tl.zeros((CH,), tl.int32)
    for c in range(0, NB, CH):
        idx = c + tl.arange(0, CH)
        nans += tl.load(block_nan_ptr + idx, mask=idx < NB, other=0)
        rows = c + tl.arange(0, CH)[:, None]
        m = (rows < NB) & (cols[None, :] < E)
        x = tl.load(block_counts_ptr + rows * E + cols[None, :], mask=m, other=0)
        tl.store(
            block_start_ptr + rows * E + cols[None, :], tl.cumsum(x, axis=0) - x + carry[None, :], mask=m
        )
        carry += tl.sum(x, axis=0)
    tl.store(counts_ptr + cols, carry.to(tl.int64), mask=cols < E)
    tl.store(offsets_ptr + 1 + cols, tl.cumsum(carry, axis=0).to(tl.int64), mask=cols < E)
    tl.store(offsets_ptr + cols, (carry * 0).to(tl.int64), mask=cols == 0)
    tl.store(summary_ptr, tl.sum(carry, axis=0).to(tl.int64))
    tl.store(summary_ptr + 1, tl.sum(nans, axis=0).to(tl.int64))


@triton.jit
def _scatter_kernel(
    sel_ptr,
    gate_ptr,
    T,
    E,
    hist_ptr,
    k_total,
    tie_ptr,
    tau_ptr,
    block_start_ptr,
    offsets_ptr,
    slot_ptr,
    sorted_token_ptr,
    sorted_expert_ptr,
    sorted_gate_ptr,
    MODE: tl.constexpr,
    TIES_ALL: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """slot (dense), sorted_token / sorted_expert / sorted_gate at each selected pair's slot."""
    b = tl.program_id(0)
    t, e, valid, sel, nan = _block_selection(
        sel_ptr, T, E, b, hist_ptr, k_total, tie_ptr, tau_ptr, MODE, TIES_ALL, BT, BE, CHUNK
    )
    cols = tl.arange(0, BE)
    base = tl.load(block_start_ptr + b * E + cols, mask=cols < E, other=0) + tl.load(
        offsets_ptr + cols, mask=cols < E, other=0
    ).to(tl.int32)
    f = sel.to(tl.int32)
    slot = tl.where(sel, base[None, :] + tl.cumsum(f, axis=0) - f, -1)  # tokens ascending inside e
    tl.store(slot_ptr + t * E + e, slot.to(tl.int64), mask=valid)
    safe = tl.where(sel, slot, 0)
    tl.store(sorted_token_ptr + safe, (t + e * 0).to(tl.int64), mask=sel)
    tl.store(sorted_expert_ptr + safe, (e + t * 0).to(tl.int64), mask=sel)
    g = tl.load(gate_ptr + t * E + e, mask=sel, other=0.0)
    tl.store(sorted_gate_ptr + safe, g, mask=sel)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _tile_sizes(T: int, E: int) -> tuple[int, int]:
    BE = triton.next_power_of_2(max(E, 1))
    BT = max(16, min(1024, triton.next_power_of_2(max(1, 4096 // BE))))
    return BT, BE


def _radix_grid(N: int, block: int, device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return min(triton.cdiv(N, block), 4)
    return min(triton.cdiv(N, block), 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def _raise_nan(summary: Tensor) -> None:
    if summary.is_cuda:  # no host sync: raises at the next synchronisation point
        torch._assert_async(summary[1] == 0, NAN_MESSAGE)
    elif int(summary[1]) != 0:
        raise ValueError(NAN_MESSAGE)


def build_plan(
    scores: Tensor,
    *,
    k_total: int | None = None,
    tau: Tensor | float | None = None,
    mask: Tensor | None = None,
    ties: Ties = "index",
) -> RoutePlan:
    """The routing layout of ``scores`` (T, E): race top-K (``k_total``), threshold (``tau``) or a mask.

    In mask mode ``scores`` are only the gate values. Integer outputs equal ``reference.race_plan`` /
    ``reference.plan_from_mask`` exactly. One host sync reads K when it is data-dependent (threshold,
    mask, ties="all"); exact-K training needs none.
    """
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(
            f"router scores must be a float (T, E) tensor, got {scores.dtype} {tuple(scores.shape)}"
        )
    modes = [k_total is not None, tau is not None, mask is not None]
    if sum(modes) != 1:
        raise ValueError("build_plan takes exactly one of k_total, tau or mask")
    check_ties(ties)
    mode = MODE_RACE if modes[0] else MODE_THRESHOLD if modes[1] else MODE_MASK
    T, E = scores.shape
    N = T * E
    dev = scores.device
    values = scores.detach().contiguous()  # (T, E)
    if mode == MODE_RACE and not 1 <= k_total <= N:
        raise ValueError(f"k_total must be in [1, {N}] for {T} tokens x {E} experts, got {k_total}")
    if mode == MODE_MASK:
        if mask.shape != scores.shape:
            raise ValueError(f"mask {tuple(mask.shape)} and gates {tuple(scores.shape)} must both be (T, E)")
        sel_src = (
            mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).to(torch.uint8)
        )
    else:
        sel_src = values
    BT, BE = _tile_sizes(T, E)
    NB = triton.cdiv(T, BT)
    CHUNK = 256
    # Launches: race = 1 memset (histograms) + 4 radix passes [+ tie pass] + count + scan + scatter;
    # threshold / mask = count + scan + scatter. Buffers a mode does not use are never touched.
    i32 = dict(dtype=torch.int32, device=dev)
    kth = torch.empty(1, dtype=torch.float32, device=dev)
    hist = torch.zeros(NUM_PASSES, NUM_BINS, **i32) if mode == MODE_RACE else kth
    tie_counts = torch.empty(NB, **i32) if mode == MODE_RACE and ties != "all" else kth
    tau_t = kth
    if mode == MODE_THRESHOLD:  # a device fp32 buffer (the layer's tau) is used as it is
        tau_t = torch.as_tensor(tau, device=dev).reshape(1).to(torch.float32)
    k_arg = int(k_total) if k_total is not None else 0
    ties_all = ties == "all"

    if mode == MODE_RACE:
        block = 1024
        grid = (_radix_grid(N, block, dev),)
        for p in range(NUM_PASSES):
            _radix_pass_kernel[grid](
                values, N, hist, k_arg, PASS=p, BLOCK=block, NBINS=NUM_BINS, BITS=RADIX_BITS
            )
        if not ties_all:
            _tie_kernel[(NB,)](values, T, E, hist, k_arg, tie_counts, BT=BT, BE=BE)

    block_counts = torch.empty(NB, E, **i32)
    block_nan = torch.empty(NB, **i32)
    _count_kernel[(NB,)](
        sel_src,
        T,
        E,
        hist,
        k_arg,
        tie_counts,
        tau_t,
        block_counts,
        block_nan,
        kth,
        MODE=mode,
        TIES_ALL=ties_all,
        BT=BT,
        BE=BE,
        CHUNK=CHUNK,
    )
    block_start = torch.empty(NB, E, **i32)
    counts = torch.empty(E, dtype=torch.long, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.long, device=dev)
    summary = torch.empty(2, dtype=torch.long, device=dev)  # [K, NaN count]
    _scan_kernel[(1,)](block_counts, block_nan, NB, E, block_start, counts, offsets, summary, BE=BE, CH=64)

    if mode == MODE_RACE and not ties_all:
        K = int(k_total)
        _raise_nan(summary)
    else:  # data-dependent K: one device-to-host copy (it also checks NaN on the host)
        K, nans = summary.tolist()
        if nans:
            raise ValueError(NAN_MESSAGE)

    slot = torch.empty(T, E, dtype=torch.long, device=dev)
    sorted_token = torch.empty(K, dtype=torch.long, device=dev)
    sorted_expert = torch.empty(K, dtype=torch.long, device=dev)
    sorted_vals = torch.empty(K, dtype=scores.dtype, device=dev)
    _scatter_kernel[(NB,)](
        sel_src, values, T, E, hist, k_arg, tie_counts, tau_t, block_start, offsets,
        slot, sorted_token, sorted_expert, sorted_vals,
        MODE=mode, TIES_ALL=ties_all, BT=BT, BE=BE, CHUNK=CHUNK,
    )  # fmt: skip
    plan = RoutePlan(
        counts=counts,
        offsets=offsets,
        sorted_token=sorted_token,
        sorted_expert=sorted_expert,
        sorted_gate=gather_gates_from_values(scores, slot, sorted_vals),
        slot=slot,
    )
    if mode == MODE_RACE:
        plan.kth = kth[0].to(scores.dtype)
    return plan
