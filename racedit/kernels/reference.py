"""PyTorch reference of the MoE routing layout and expert computation (docs/spec/kernels.md).

These functions define the semantics; the Triton kernels in this package must agree with them
(integers exactly, floats within dtype tolerance). They run on any device and are the CPU
training path, so they are written to be memory-lean: nothing of size (T, E, D) is built.

Layout ("plan") of a routing decision over T tokens and E experts with K selected pairs:
- ``counts`` (E,) int64: pairs per expert; ``offsets`` (E+1,) int64: exclusive prefix sum;
- ``sorted_token`` (K,) int64: token of each pair, grouped by expert, tokens ascending in a group;
- ``sorted_expert`` (K,) int64: expert of each pair (derivable from offsets; kept for gathers);
- ``sorted_gate`` (K,) float: gate value G(s) of each pair (differentiable w.r.t. the scores;
  its backward is a dense write through ``slot``, no scatter);
- ``slot`` (T, E) int64: position of pair (t, e) in the sorted layout, -1 when not routed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

# How the K-th value's ties are cut, for every routing path (reference, Triton, strategies, distributed):
# "index" takes exactly K, the lowest flat indices first; "all" keeps every entry >= the K-th value.
Ties = Literal["index", "all"]
TIES: tuple[str, ...] = get_args(Ties)
NAN_MESSAGE = "router scores contain NaN; check the model for a diverged forward (loss, lr)"


def check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


@dataclass
class RoutePlan:
    counts: Tensor  # (E,) int64
    offsets: Tensor  # (E+1,) int64
    sorted_token: Tensor  # (K,) int64
    sorted_expert: Tensor  # (K,) int64
    sorted_gate: Tensor  # (K,) float, carries the gradient to the gates
    slot: Tensor  # (T, E) int64, -1 = not routed
    kth: Tensor | None = None  # scalar: K-th largest score (expert race, training), feeds the threshold EMA

    @property
    def num_tokens(self) -> int:
        return self.slot.shape[0]

    @property
    def num_experts(self) -> int:
        return self.slot.shape[1]

    @property
    def num_pairs(self) -> int:
        return self.sorted_token.shape[0]

    def mask(self) -> Tensor:
        """(T, E) bool selection mask."""
        return self.slot >= 0


# ----------------------------------------------------------------------------------------------
# Gate gather: pairs read their gate from the (T, E) scores; backward is a dense write via slot
# ----------------------------------------------------------------------------------------------


class _GatherGates(torch.autograd.Function):
    """``sorted_gate = scores[sorted_token, sorted_expert]``; dScores[t, e] = dGate[slot[t, e]] or 0.

    Every (t, e) owns at most one slot, so the backward is a dense gather + write with no
    scatter/atomics (docs/spec/kernels.md, "Design that needs no sort": the backward reuses ``slot``).
    ``values`` lets a kernel pass the gates it already wrote during its scatter.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, slot: Tensor, values: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(slot)
        return values

    @staticmethod
    def backward(ctx, grad_gate: Tensor):  # type: ignore[override]
        (slot,) = ctx.saved_tensors
        if grad_gate.numel() == 0:  # nothing routed
            return grad_gate.new_zeros(slot.shape), None, None
        routed = slot >= 0  # (T, E)
        picked = grad_gate.index_select(0, slot.clamp(min=0).view(-1)).view(slot.shape)  # (T, E)
        return torch.where(routed, picked, picked.new_zeros(())), None, None


def gather_gates(scores: Tensor, slot: Tensor, sorted_token: Tensor, sorted_expert: Tensor) -> Tensor:
    """(K,) gate values of the selected pairs, differentiable w.r.t. ``scores`` (T, E)."""
    return gather_gates_from_values(scores, slot, scores.detach()[sorted_token, sorted_expert])


def gather_gates_from_values(scores: Tensor, slot: Tensor, values: Tensor) -> Tensor:
    """Attach the slot-based backward to gate ``values`` (K,) already gathered from ``scores``."""
    if not (scores.requires_grad and torch.is_grad_enabled()):
        return values
    return _GatherGates.apply(scores, slot, values)


# ----------------------------------------------------------------------------------------------
# Routing: mask -> plan, and the expert race (exact top-K over all T*E scores, or a threshold)
# ----------------------------------------------------------------------------------------------


def plan_from_mask(mask: Tensor, gates: Tensor) -> RoutePlan:
    """Sorted layout of a (T, E) boolean selection; ``gates`` (T, E) are gathered per selected pair."""
    if mask.shape != gates.shape or mask.ndim != 2:
        raise ValueError(f"mask {tuple(mask.shape)} and gates {tuple(gates.shape)} must both be (T, E)")
    T, E = mask.shape
    # Expert-major order: transpose so that nonzero() enumerates (e, t) with t ascending inside e.
    expert, token = mask.t().nonzero(as_tuple=True)  # (K,), (K,)
    counts = torch.bincount(expert, minlength=E)
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    slot = torch.full((T, E), -1, dtype=torch.long, device=mask.device)
    slot[token, expert] = torch.arange(token.numel(), device=mask.device)
    return RoutePlan(
        counts=counts,
        offsets=offsets,
        sorted_token=token,
        sorted_expert=expert,
        sorted_gate=gather_gates(gates, slot, token, expert),
        slot=slot,
    )


def check_scores(scores: Tensor) -> None:
    """Router scores must be a finite-or-inf (T, E) float tensor: NaN has no place in an order."""
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(
            f"router scores must be a float (T, E) tensor, got {scores.dtype} {tuple(scores.shape)}"
        )
    if torch.isnan(scores).any():
        raise ValueError(NAN_MESSAGE)


def race_plan(
    scores: Tensor, k_total: int | None = None, tau: Tensor | float | None = None, ties: Ties = "index"
) -> RoutePlan:
    """Expert race over all T*E scores (docs/spec/race-dit.md section 3; docs/spec/kernels.md, "What routing
    computes").

    Training (``k_total`` = K): exact top-K of the flattened scores, ties broken by lowest flat index
    t*E+e (``ties="index"``) or every score >= the K-th value kept (``ties="all"``); -0.0 == +0.0.
    ``plan.kth`` is the K-th largest score. Inference (``tau``): select ``float(scores) >= float(tau)``
    (the comparison is done in fp32 whatever the score dtype).
    """
    if (k_total is None) == (tau is None):
        raise ValueError("race_plan takes exactly one of k_total (training) or tau (inference)")
    check_scores(scores)
    if tau is not None:
        tau32 = torch.as_tensor(tau, dtype=torch.float32, device=scores.device)
        return plan_from_mask(scores.detach().float() >= tau32, scores)
    mask, kth = race_mask(scores.detach(), k_total, ties)
    plan = plan_from_mask(mask, scores)
    plan.kth = kth
    return plan


def race_mask(scores: Tensor, k_total: int, ties: Ties = "index") -> tuple[Tensor, Tensor]:
    """(T, E) selection of the expert race and the K-th largest score, without a full sort.

    The same cut the kernel makes: everything above the K-th value is in; of the entries equal to it
    the lowest flat indices fill the remaining places (``ties="index"``) or all are in (``"all"``).
    Equal to ``racedit.routing.topk.topk_mask`` on the flattened scores (-0.0 == +0.0 in both).
    """
    flat = scores.reshape(-1)
    if not 1 <= k_total <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}] for {flat.numel()} candidates, got {k_total}")
    check_ties(ties)
    kth = torch.topk(flat, k_total, sorted=False).values.min()  # the K-th largest value
    if ties == "all":
        return (flat >= kth).view_as(scores), kth
    above = flat > kth
    equal = flat == kth
    room = k_total - above.sum()  # places left for the ties, >= 1
    mask = above | (equal & (torch.cumsum(equal, 0) <= room))
    return mask.view_as(scores), kth


# ----------------------------------------------------------------------------------------------
# Expert computation and the deterministic combine
# ----------------------------------------------------------------------------------------------


class _CombineCPU(torch.autograd.Function):
    """``out[t] = sum_e y[slot[t, e]]`` as ``index_add_`` in pair order (CPU only).

    Pairs are expert-major, so adding them in pair order adds each token's experts in ascending e,
    the order the Triton combine uses; CPU ``index_add_`` runs serially over the index, so the result
    is deterministic. Backward is a gather: dy[p] = dout[sorted_token[p]].
    """

    @staticmethod
    def forward(ctx, y: Tensor, sorted_token: Tensor, num_tokens: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(sorted_token)
        return y.new_zeros(num_tokens, y.shape[1]).index_add_(0, sorted_token, y)  # (T, D)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (sorted_token,) = ctx.saved_tensors
        return grad_out.index_select(0, sorted_token), None, None


def _combine_by_slot(y: Tensor, slot: Tensor) -> Tensor:
    """Deterministic on any device (CUDA ``index_add_`` is atomic): one (T, D) gather-add per expert."""
    T, E = slot.shape
    out = y.new_zeros(T, y.shape[1])
    padded = torch.cat([y, y.new_zeros(1, y.shape[1])])  # row K is zeros for unrouted pairs
    idx = torch.where(slot >= 0, slot, slot.new_full((), y.shape[0]))  # (T, E)
    for e in range(E):
        out = out + padded.index_select(0, idx[:, e])
    return out


def combine(y: Tensor, plan: RoutePlan) -> Tensor:
    """``out[t] = sum_e y[slot[t, e]]`` over routed pairs; y (K, D) in plan order -> (T, D).

    Deterministic and memory-lean: never builds (T, E, D). Differentiable w.r.t. ``y``.
    """
    if y.is_cuda:
        return _combine_by_slot(y, plan.slot)
    return _CombineCPU.apply(y, plan.sorted_token, plan.num_tokens)


class _GatherRows(torch.autograd.Function):
    """``rows = x[sorted_token]`` whose backward is the deterministic ``combine`` (no atomics)."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: RoutePlan) -> Tensor:  # type: ignore[override]
        ctx.plan = plan
        return x.index_select(0, plan.sorted_token)  # (K, D)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):  # type: ignore[override]
        with torch.no_grad():
            return combine(grad_rows, ctx.plan), None


def _apply_gate(y: Tensor, gate: Tensor) -> Tensor:
    """y (K, D) * gate (K,) computed in at least fp32, returned in y's dtype."""
    acc = torch.promote_types(y.dtype, torch.float32)
    return (y.to(acc) * gate.to(acc).unsqueeze(1)).to(y.dtype)


def expert_ffn(x: Tensor, plan: RoutePlan, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``out[t] = sum_e gate[t,e] * (GELU_tanh(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e])`` over selected pairs.

    x (T, D); w1 (E, D, H); b1 (E, H); w2 (E, H, D); b2 (E, D) -> (T, D). A per-expert loop over the
    contiguous groups of the plan: only selected pairs are computed; the gate multiplies in fp32.
    Deterministic (see ``combine``). A token with no expert gets 0.
    """
    T, D = x.shape
    counts = plan.counts.tolist()
    rows = _GatherRows.apply(x, plan)  # (K, D) gathered inputs, expert-major
    outs = []
    # split / unbind (not slicing or w1[e]): their backward is one cat / stack, not E full-size zero-fills
    per_expert = zip(torch.split(rows, counts), w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0))
    for chunk, w1_e, b1_e, w2_e, b2_e in per_expert:
        if chunk.shape[0] == 0:
            continue
        h = F.gelu(torch.addmm(b1_e, chunk, w1_e), approximate="tanh")  # (K_e, H)
        outs.append(torch.addmm(b2_e, h, w2_e))  # (K_e, D)
    if not outs:  # nothing routed: zeros, still connected to every parameter (zero gradients)
        connect = sum(p[:0].sum() for p in (x, w1, b1, w2, b2, plan.sorted_gate))  # exact 0, no inf*0
        return x.new_zeros(T, D) + connect
    y = torch.cat(outs) if len(outs) > 1 else outs[0]  # (K, D)
    y = _apply_gate(y, plan.sorted_gate)  # gate in (at least) fp32 on the way out
    return combine(y, plan)
