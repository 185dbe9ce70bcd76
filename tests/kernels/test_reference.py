"""The PyTorch reference of the routing layout and expert computation, against independent oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from racedit.kernels import dispatch, grouped_mm, reference


def oracle_race(scores: torch.Tensor, k: int, ties: str) -> torch.Tensor:
    v = scores.double().flatten().numpy()
    order = np.lexsort((np.arange(v.size), -v))  # value descending, then flat index ascending
    mask = np.zeros(v.size, dtype=bool)
    mask[order[:k]] = True
    if ties == "all":
        mask |= v >= v[order[k - 1]]
    return torch.from_numpy(mask).view(scores.shape)


def naive_moe(x, mask, gates, w1, b1, w2, b2):
    """Every expert on every token, masked: (T, E, D) intermediate, the obvious formula."""
    h = F.gelu(torch.einsum("td,edh->teh", x, w1) + b1, approximate="tanh")
    o = torch.einsum("teh,ehd->ted", h, w2) + b2  # (T, E, D)
    return (o * (gates * mask)[..., None]).sum(1)


def check_layout(plan: reference.RoutePlan, mask: torch.Tensor, gates: torch.Tensor) -> None:
    T, E = mask.shape
    assert torch.equal(plan.mask(), mask)
    assert torch.equal(plan.counts, mask.sum(0))
    assert torch.equal(plan.offsets, torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(0).cumsum(0)]))
    K = int(mask.sum())
    assert plan.sorted_token.shape == (K,) and plan.slot.shape == (T, E)
    # slot is the inverse map of (sorted_token, sorted_expert)
    assert torch.equal(plan.slot[plan.sorted_token, plan.sorted_expert], torch.arange(K))
    assert torch.equal(plan.sorted_gate, gates[plan.sorted_token, plan.sorted_expert])
    for e in range(E):
        lo, hi = plan.offsets[e].item(), plan.offsets[e + 1].item()
        assert torch.all(plan.sorted_expert[lo:hi] == e)
        assert torch.all(plan.sorted_token[lo:hi][1:] > plan.sorted_token[lo:hi][:-1])


def test_plan_from_mask_layout():
    g = torch.Generator().manual_seed(0)
    for T, E, p in [(37, 5, 0.3), (20, 3, 0.0), (16, 4, 1.0)]:
        mask = torch.rand(T, E, generator=g) < p
        gates = torch.randn(T, E, generator=g)
        check_layout(reference.plan_from_mask(mask, gates), mask, gates)


@pytest.mark.parametrize("ties", ["index", "all"])
def test_race_plan_matches_oracle_on_ties_zeros_and_negatives(ties):
    g = torch.Generator().manual_seed(1)
    heavy = torch.randint(-2, 2, (60, 7), generator=g).float()
    signed_zero = torch.where(torch.rand(60, 7, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    for scores in (heavy, signed_zero, torch.randn(60, 7, generator=g) - 5.0, torch.full((60, 7), 3.0)):
        for k in (1, 33, 120, 419, 420):
            plan = reference.race_plan(scores, k_total=k, ties=ties)
            want = oracle_race(scores, k, ties)
            check_layout(plan, want, scores)
            assert plan.kth == scores.flatten().sort(descending=True).values[k - 1]
            if ties == "index":
                assert plan.num_pairs == k


def test_race_plan_rejects_nan_and_bad_arguments():
    s = torch.randn(8, 4)
    s[2, 1] = float("nan")
    for kwargs in (dict(k_total=4), dict(tau=0.0)):
        with pytest.raises(ValueError, match="NaN"):
            reference.race_plan(s, **kwargs)
    with pytest.raises(ValueError, match="exactly one"):
        dispatch.race_plan(torch.randn(8, 4), k_total=4, tau=0.0)
    with pytest.raises(ValueError, match="k must be"):
        reference.race_plan(torch.randn(8, 4), k_total=33)


def test_threshold_compares_in_fp32():
    s = torch.tensor([[0.1, 0.2], [0.3, -0.1]]).bfloat16()  # 0.1 is not a bf16 number
    tau = 0.1
    plan = dispatch.race_plan(s, tau=tau, impl="torch")
    assert torch.equal(plan.mask(), s.float() >= tau)
    assert plan.kth is None


def test_combine_is_lean_exact_and_deterministic():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(40, 6, generator=g)
    scores[5] = -50.0  # token 5 gets no expert
    plan = reference.race_plan(scores, k_total=70)
    y = torch.randn(70, 16, generator=g)
    out = reference.combine(y, plan)
    dense = torch.zeros(40, 6, 16)
    dense[plan.sorted_token, plan.sorted_expert] = y
    assert torch.allclose(out, dense.sum(1), atol=1e-6)
    assert torch.equal(out[5], torch.zeros(16))
    assert torch.equal(out, reference.combine(y.clone(), plan))  # bitwise repeatable
    slot_out = reference._combine_by_slot(y, plan.slot)  # the CUDA-side formulation
    # the same additions in the same order (each token's experts ascending, from 0; an unrouted pair adds an
    # exact 0), so bitwise equal
    assert torch.equal(slot_out, out)


def make_params(T=48, D=16, E=5, H=24, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    shapes = [(T, D), (T, E), (E, D, H), (E, H), (E, H, D), (E, D)]
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def test_expert_ffn_forward_and_gradients_match_naive():
    x, s, w1, b1, w2, b2 = make_params()
    plan = reference.race_plan(s, k_total=96)
    out = reference.expert_ffn(x, plan, w1, b1, w2, b2)
    want = naive_moe(x, plan.mask().to(x.dtype), s, w1, b1, w2, b2)
    # float64, same products summed in another order: ~(D + H) * eps * |terms| ~ 1e-12 at these sizes
    assert torch.allclose(out, want, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (x, s, w1, b1, w2, b2))
    ref = torch.autograd.grad((want * g).sum(), (x, s, w1, b1, w2, b2))
    for name, a, b in zip(("x", "scores", "w1", "b1", "w2", "b2"), got, ref):
        assert torch.allclose(a, b, atol=1e-10), name


def test_expert_ffn_gradcheck_small():
    x, s, w1, b1, w2, b2 = make_params(T=6, D=3, E=3, H=4)

    def f(x, s, w1, b1, w2, b2):
        plan = reference.race_plan(s, k_total=7)
        return reference.expert_ffn(x, plan, w1, b1, w2, b2)

    assert torch.autograd.gradcheck(f, (x, s, w1, b1, w2, b2))


def test_expert_ffn_with_nothing_routed_is_zero_with_zero_gradients():
    x, s, w1, b1, w2, b2 = make_params(T=8, D=4, E=3, H=4)
    plan = reference.plan_from_mask(torch.zeros(8, 3, dtype=torch.bool), s)
    out = reference.expert_ffn(x, plan, w1, b1, w2, b2)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for p in (x, s, w1, b1, w2, b2):
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


# (T, K): 100 pairs over 48 tokens; one token with both its pairs (smaller than any block, 3 of 5 experts empty);
# nothing routed (K = 0: zero output, zero gradients)
GROUPED_CASES = [(48, 100), (1, 2), (48, 0)]


@pytest.mark.parametrize("T,K", GROUPED_CASES)
def test_grouped_mm_path_matches_reference(T: int, K: int):
    params = [p.detach().float().requires_grad_() for p in make_params(T=T, D=16, H=32)]
    x, s, w1, b1, w2, b2 = params
    if K:
        plan = reference.race_plan(s, k_total=K)
    else:
        plan = reference.plan_from_mask(torch.zeros(T, s.shape[1], dtype=torch.bool), s)
    out = dispatch.expert_ffn(x, plan, w1, b1, w2, b2, impl="grouped_mm")
    want = reference.expert_ffn(x, plan, w1, b1, w2, b2)
    # float32, the same products in other kernels (grouped GEMM against per-expert addmm, the bias added after the
    # product rather than inside it): sums of D + H = 48 terms of O(1-10) reordered, ~48 * 6e-8 * 10 ~ 3e-5 at
    # worst; the activations here are O(10), so 1e-5 relative and 1e-4 absolute.
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad((out * g).sum(), params, retain_graph=True)
    ref = torch.autograd.grad((want * g).sum(), params)
    for name, a, b in zip(("x", "scores", "w1", "b1", "w2", "b2"), got, ref):
        # gradients sum over up to K = 100 pairs as well: ten times the forward's terms
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    if not K:
        assert all(torch.count_nonzero(a) == 0 for a in (out, *got))


# bf16 keeps 8 significant bits; the expert computation rounds its operands and its intermediates (pre-activation,
# expert output, gated output) to bf16, 2^-8 relative each: ~1.2e-2 of the largest magnitude for three, so 3e-2
# leaves margin; the absolute term covers entries near 0 at the O(1-10) scale of these activations.
BF16_RTOL_OF_MAX, BF16_ATOL = 3e-2, 1e-2


@pytest.mark.parametrize("impl", ["torch", "grouped_mm"])
def test_expert_ffn_follows_autocast_in_every_impl(impl: str):
    """Under bf16 autocast every implementation computes the experts in bf16, as the dense MLP's nn.Linear layers
    do (the block hands the MLP slot float32 activations), with float32 gradients for float32 inputs; the values
    are the float32 computation's within bf16 rounding. (The Triton path: tests/kernels/interp_checks.py.)"""
    params = [p.detach().float().requires_grad_() for p in make_params(D=16, H=32)]
    x, s, w1, b1, w2, b2 = params
    plan = reference.race_plan(s, k_total=100)
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dispatch.expert_ffn(x, plan, w1, b1, w2, b2, impl=impl)
    assert out.dtype == torch.bfloat16
    got = torch.autograd.grad((out.float() * g).sum(), params, retain_graph=True)
    want_out = reference.expert_ffn(x, plan, w1, b1, w2, b2)  # float32
    want = torch.autograd.grad((want_out * g).sum(), params)
    for name, a, b in zip(("out", "x", "scores", "w1", "b1", "w2", "b2"), (out, *got), (want_out, *want)):
        assert name == "out" or a.dtype == torch.float32, name
        err = (a.float() - b).abs().max()
        assert err <= BF16_RTOL_OF_MAX * b.abs().max() + BF16_ATOL, f"{name}: max error {err:.3e}"


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


def test_grouped_mm_backward_has_no_index_add():
    """index_select's backward is index_add_, atomic on CUDA: in bf16 a bias row summing ~K/E rows rounds after
    every add. The grouped_mm path gathers through nodes whose backward is a deterministic sum instead."""
    x, s, w1, b1, w2, b2 = [p.detach().float().requires_grad_() for p in make_params(D=16, H=32)]
    out = dispatch.expert_ffn(x, reference.race_plan(s, k_total=100), w1, b1, w2, b2, impl="grouped_mm")
    nodes = _graph_nodes(out)
    assert "IndexSelectBackward0" not in nodes and "_ExpertBiasBackward" in nodes, sorted(nodes)


def test_grouped_mm_names_alignment_errors():
    x, s, _, b1, _, _ = [p.detach().float() for p in make_params(D=16, H=32)]
    plan = reference.race_plan(s, k_total=100)
    x3 = torch.randn(48, 6)  # 6 fp32 = 24-byte rows
    w3 = torch.randn(5, 6, 24)
    assert "16-byte" in grouped_mm.supports(x3, w3)
    with pytest.raises(ValueError, match="16-byte"):
        dispatch.expert_ffn(x3, plan, w3, b1, torch.randn(5, 24, 6), torch.randn(5, 6), impl="grouped_mm")


def test_dispatch_routes_cpu_to_reference_and_refuses_triton_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = torch.randn(16, 4)
    auto = dispatch.race_plan(s, k_total=10)
    ref = reference.race_plan(s, k_total=10)
    assert torch.equal(auto.slot, ref.slot) and torch.equal(auto.kth, ref.kth)
    assert not dispatch.use_triton(s, "auto")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.race_plan(s, k_total=10, impl="triton")
    with pytest.raises(ValueError, match="routing impl must be"):
        dispatch.race_plan(s, k_total=10, impl="cuda")  # type: ignore[arg-type]
