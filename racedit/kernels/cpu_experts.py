"""The CPU expert computation: ``reference.expert_ffn``'s math as one autograd node (the CPU training path).

The reference builds an autograd graph of ~3E small ops per layer (a split, an unbind, one addmm-GELU-addmm
chain per expert, a cat, the gate product); its backward stacks E per-expert weight gradients into fresh
(E, D, H) tensors (the backward of ``w1.unbind(0)``, likewise ``w2``, ``b1``, ``b2``), and every per-expert
node allocates and accumulates on its own. Here forward and backward are written out by hand (K selected
pairs, expert-major, group e = rows ``offsets[e]:offsets[e+1]``); at RaceDiT-S/2-2in8's layer shapes on one
CPU thread that takes the expert part from 14.2 to 13.6 ms per forward + backward (a dense MLP of equal
FLOPs: 10.1 ms; what remains is mostly the GEMMs on ~128-row groups, 16% slower than one large GEMM, and
the gather, gate and combine).

  Forward                                            Backward (dout (T, D))
  rows = x[sorted_token]                  (K, D)     dy = dout[sorted_token]              (K, D)
  z[e] = rows[e] @ w1[e] + b1[e]          (K, H)     dgate = sum_d dy * o                 (K,)
  h = GELU_tanh(z)                        (K, H)     do = gate * dy                       (K, D)
  o[e] = h[e] @ w2[e] + b2[e]             (K, D)     dw2[e] = h[e]^T do[e], db2[e] = colsum(do[e])
  y = gate * o            (in >= fp32)    (K, D)     dz = (do[e] @ w2[e]^T) * GELU'(z)    (K, H)
  out = index_add(y at sorted_token)      (T, D)     dw1[e] = rows[e]^T dz[e], db1[e] = colsum(dz[e])
                                                     dx = index_add(dz[e] @ w1[e]^T at sorted_token)

Every per-expert product is written straight into its slice of one preallocated tensor (``out=``): the
(E, D, H) weight gradients are filled in place, nothing is stacked or concatenated, and GELU and its
derivative run once over all K rows. The backward keeps its peak low: it saves x rather than the gathered
rows (the router keeps x alive anyway) and gathers them again into a spent buffer, computes GELU' in place,
and allocates the first layer's weight gradients only when it needs them.

The operations and operands are the reference's, one for one (the same addmm/mm shapes and transposes, the
same row sums, the gate product in fp32, the serial CPU ``index_add_`` in pair order), so the results are
the reference's bit for bit whenever GELU over all rows at once rounds like GELU per group: ATen computes
the last partial SIMD vectors of an elementwise op with its scalar formula, so bits can differ (by ~1 ulp
of GELU) only where a group's element count n_e*H is not a multiple of twice the vector width. Every zoo
model's H is a multiple of 128, where the paths agree exactly (tests/kernels/test_cpu_experts.py).
Zero-token experts get zero weight gradients; a plan with no pairs gives zeros everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from racedit.kernels.reference import RoutePlan


def supports(x: Tensor) -> str | None:
    """None when this path can run ``x``, else the reason (the reference then runs instead)."""
    if x.device.type != "cpu":
        return f"the grouped CPU path takes CPU tensors (index_add_ is serial, so deterministic, there), got {x.device}"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on: the reference's per-op autocast casts apply, so it runs instead"
    return None


class _GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,  # (T, D)
        gate: Tensor,  # (K,)
        w1: Tensor,  # (E, D, H)
        b1: Tensor,  # (E, H)
        w2: Tensor,  # (E, H, D)
        b2: Tensor,  # (E, D)
        sorted_token: Tensor,  # (K,) int64
        counts: list[int],  # pairs per expert
    ) -> Tensor:
        T, D = x.shape
        K, H = sorted_token.shape[0], w1.shape[2]
        experts = [e for e, n in enumerate(counts) if n > 0]
        rows = x.index_select(0, sorted_token)  # (K, D)
        z = x.new_empty(K, H)
        # per-expert views in one call each (split/unbind), not one indexing op per expert and tensor
        rows_, z_, w1_, b1_ = rows.split(counts), z.split(counts), w1.unbind(0), b1.unbind(0)
        for e in experts:
            torch.addmm(b1_[e], rows_[e], w1_[e], out=z_[e])
        h = torch.nn.functional.gelu(z, approximate="tanh")  # (K, H)
        o = x.new_empty(K, D)
        h_, o_, w2_, b2_ = h.split(counts), o.split(counts), w2.unbind(0), b2.unbind(0)
        for e in experts:
            torch.addmm(b2_[e], h_[e], w2_[e], out=o_[e])
        acc = torch.promote_types(x.dtype, torch.float32)  # the gate multiplies in (at least) fp32
        y = (o.to(acc) * gate.to(acc).unsqueeze(1)).to(x.dtype)  # (K, D)
        # x, not rows: x is kept alive by the router anyway, and the backward gathers rows again (cheap)
        ctx.save_for_backward(x, z, h, o, gate, w1, w2, sorted_token)
        ctx.counts, ctx.experts, ctx.num_tokens = counts, experts, T
        return x.new_zeros(T, D).index_add_(0, sorted_token, y)  # (T, D), pairs in order: deterministic

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, z, h, o, gate, w1, w2, sorted_token = ctx.saved_tensors
        need_x, need_gate, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        E, counts, experts = w1.shape[0], ctx.counts, ctx.experts
        acc = torch.promote_types(o.dtype, torch.float32)
        dy = grad_out.index_select(0, sorted_token).to(acc)  # (K, D)
        dgate = (dy * o.to(acc)).sum(1).to(gate.dtype) if need_gate else None  # (K,)
        do = dy.mul_(gate.to(acc).unsqueeze(1)).to(o.dtype)  # (K, D), in dy's buffer
        # experts without tokens keep zero weight gradients
        alloc = torch.empty if len(experts) == E else torch.zeros
        gw2 = alloc(w2.shape, dtype=w2.dtype) if need_w2 else None
        gb2 = alloc(E, w2.shape[2], dtype=w2.dtype) if need_b2 else None
        gw2_, gb2_ = (g.unbind(0) if g is not None else None for g in (gw2, gb2))
        dh = h.new_empty(h.shape)  # (K, H)
        h_, do_, dh_, w2_ = h.split(counts), do.split(counts), dh.split(counts), w2.unbind(0)
        for e in experts:
            if gw2_ is not None:
                torch.mm(h_[e].t(), do_[e], out=gw2_[e])
            if gb2_ is not None:
                torch.sum(do_[e], 0, out=gb2_[e])
            torch.mm(do_[e], w2_[e].t(), out=dh_[e])
        dz = torch.ops.aten.gelu_backward.grad_input(dh, z, approximate="tanh", grad_input=dh)  # in place
        # rows (K, D), gathered again, into dy's buffer when the dtypes allow (dy is not needed any more)
        rows = torch.index_select(x, 0, sorted_token, out=dy) if dy.dtype == x.dtype else x[sorted_token]
        del do, do_, dy
        gw1 = alloc(w1.shape, dtype=w1.dtype) if need_w1 else None  # allocated only now: a lower peak
        gb1 = alloc(E, w1.shape[2], dtype=w1.dtype) if need_b1 else None
        gw1_, gb1_ = (g.unbind(0) if g is not None else None for g in (gw1, gb1))
        rows_, dz_, w1_ = rows.split(counts), dz.split(counts), w1.unbind(0)
        for e in experts:
            if gw1_ is not None:
                torch.mm(rows_[e].t(), dz_[e], out=gw1_[e])
            if gb1_ is not None:
                torch.sum(dz_[e], 0, out=gb1_[e])
            if need_x:  # drows of expert e overwrites its rows, which its weight gradient has used
                torch.mm(dz_[e], w1_[e].t(), out=rows_[e])
        del dh, dh_, dz, dz_  # free (K, H) before the (T, D) result: the peak of this backward
        dx = None
        if need_x:
            dx = x.new_zeros(x.shape).index_add_(0, sorted_token, rows)  # (T, D); rows now holds drows
        return dx, dgate, gw1, gb1, gw2, gb2, None, None


@torch.compiler.disable  # data-dependent group sizes: runs eagerly, as one graph break, inside a compiled model
def expert_ffn(x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``reference.expert_ffn`` (same signature and values) as one autograd node; CPU tensors only."""
    reason = supports(x)
    if reason is not None:
        raise ValueError(f"{reason}; use impl='torch'")
    return _GroupedExpertFFN.apply(
        x, plan.sorted_gate, w1, b1, w2, b2, plan.sorted_token, plan.counts.tolist()
    )
