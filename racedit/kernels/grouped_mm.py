"""Expert computation through ``torch._grouped_mm`` (the alternative path and the GEMM baseline).

Same semantics as ``reference.expert_ffn``. ``torch._grouped_mm(a (K, D), b (E, D, N), offs)`` with
``offs`` = int32 cumulative group ends (``plan.offsets[1:]``) runs one GEMM per expert group; it needs
every stride to be a multiple of 16 bytes (D and H multiples of 8 for bf16/fp16, of 4 for fp32). In
torch 2.14 it takes fp32/bf16/fp16 on CPU and bf16 on CUDA sm90+. The gather of ``x[sorted_token]``
and the bias rows are materialised here (the Triton path fuses them into its loads).

No gradient here is an atomic sum (docs/spec/kernels.md, "Design that needs no sort"): the rows are gathered by
``reference._GatherRows`` (backward: the deterministic combine) and the biases added by ``_ExpertBias``
(backward: a float32 sum over each expert's contiguous rows). Plain ``index_select`` would backpropagate by
``index_add_``, on CUDA atomic adds, for the biases ~K/E rows into each bias row in bf16, rounding after every
add (the sum of thousands of rows stalls) and in no fixed order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from racedit.kernels.reference import RoutePlan, _apply_gate, _GatherRows, combine


def supports(x: Tensor, w1: Tensor) -> str | None:
    """None when ``torch._grouped_mm`` can run these shapes/dtypes, else the reason it cannot."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm (needs torch >= 2.8)"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm takes fp32/bf16/fp16, got {x.dtype}"
    if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0)):
        return "torch._grouped_mm on CUDA needs bf16 on sm90 or newer"
    D, H = w1.shape[1], w1.shape[2]
    if (D * x.element_size()) % 16 or (H * x.element_size()) % 16:
        return f"torch._grouped_mm needs 16-byte aligned rows: D={D} and H={H} of {x.dtype} are not"
    return None


def expert_ffn(x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``reference.expert_ffn`` with the two per-expert GEMMs done by ``torch._grouped_mm``."""
    reason = supports(x, w1)
    if reason is not None:
        raise ValueError(f"{reason}; use impl='torch' or 'triton' instead")
    offs = plan.offsets[1:].to(torch.int32)  # (E,) cumulative ends
    rows = _GatherRows.apply(x, plan)  # (K, D)
    z = _ExpertBias.apply(
        torch._grouped_mm(rows, w1.to(x.dtype), offs=offs), b1, plan.sorted_expert, plan.counts
    )
    h = F.gelu(z, approximate="tanh")  # (K, H)
    o = _ExpertBias.apply(
        torch._grouped_mm(h, w2.to(x.dtype), offs=offs), b2, plan.sorted_expert, plan.counts
    )
    y = _apply_gate(o, plan.sorted_gate)  # (K, D)
    return combine(y, plan)


class _ExpertBias(torch.autograd.Function):
    """``z + bias[sorted_expert]`` for expert-major rows z (K, N), added in float32 and returned in z's dtype;
    dbias (E, N) is the float32 sum of dz over each expert's contiguous rows (``segment_reduce`` by ``counts``)."""

    @staticmethod
    def forward(ctx, z: Tensor, bias: Tensor, sorted_expert: Tensor, counts: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(counts)
        ctx.bias_dtype = bias.dtype
        return (z.float() + bias.float().index_select(0, sorted_expert)).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (counts,) = ctx.saved_tensors
        dbias = torch.segment_reduce(grad.float(), "sum", lengths=counts, axis=0)  # (E, N); empty experts 0
        return grad, dbias.to(ctx.bias_dtype), None, None
