"""The CPU expert path (one autograd node) against the op-by-op reference: same values and gradients.

The CPU path runs the reference's operations one for one (same GEMM shapes and operands, the gate product
in fp32, the serial ``index_add_`` in pair order). One thing differs: it applies GELU (and GELU') once over
all K rows where the reference applies it per expert group, and ATen's vectorised elementwise loop computes
the last partial vectors of a tensor with the scalar formula, whose tanh rounds differently from the SIMD
one. When a group's element count is a multiple of twice the vector width, which H = 128 guarantees for
every float width up to 2048-bit vectors, no group has such a tail, and the two paths agree bit for bit:
those tests assert exact equality. Other widths are checked within a rounding tolerance.
"""

from __future__ import annotations

import pytest
import torch

from racedit.kernels import cpu_experts, dispatch, reference

NAMES = ("out", "x", "scores", "w1", "b1", "w2", "b2")


def make_inputs(T, D, E, H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(T, D), (T, E), (E, D, H), (E, H), (E, H, D), (E, D)]
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in shapes]


def run(fn, inputs, mask=None, k_total=None):
    """Output and the gradients of every input under a fixed random cotangent."""
    x, s, w1, b1, w2, b2 = inputs
    plan = reference.plan_from_mask(mask, s) if mask is not None else reference.race_plan(s, k_total=k_total)
    out = fn(x, plan, w1, b1, w2, b2)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    wanted = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad((out * cot).sum(), wanted, allow_unused=True)
    return [out, *grads]


def assert_same(inputs, **route):
    got = run(cpu_experts.expert_ffn, inputs, **route)
    want = run(reference.expert_ffn, inputs, **route)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), name


H = 128  # see the module docstring: no vector tails inside any group, so the paths agree exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_race_routing_matches_reference_exactly(dtype):
    # T*k not a multiple of E, D not a multiple of 8: uneven groups of every size
    assert_same(make_inputs(T=37, D=12, E=5, H=H, dtype=dtype), k_total=61)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_odd_hidden_width_agrees_within_rounding(dtype):
    # H = 20: groups end inside a vector, where one path's GELU/GELU' runs the scalar tanh and the other the
    # SIMD one, each within ~1 ulp of tanh. That relative change of h (and of GELU') enters the outputs and
    # gradients through sums of at most max(D, H, T) = 37 products: |error| <= ~4 * 37 * eps * sum|terms|,
    # and for these O(1) random inputs sum|terms| stays within ~10x the largest result: 2e3 * eps * max|ref|.
    inputs = make_inputs(T=37, D=12, E=5, H=20, dtype=dtype)
    got = run(cpu_experts.expert_ffn, inputs, k_total=61)
    want = run(reference.expert_ffn, inputs, k_total=61)
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e3 * eps * b.abs().max().item(), msg=name)


def test_expert_with_zero_tokens_gets_zero_gradients():
    inputs = make_inputs(T=24, D=8, E=4, H=H, seed=1)
    mask = torch.rand(24, 4, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[:, 2] = False  # expert 2 gets nothing
    assert_same(inputs, mask=mask)
    x, s, w1, b1, w2, b2 = inputs
    out = cpu_experts.expert_ffn(x, reference.plan_from_mask(mask, s), w1, b1, w2, b2)
    gw1, gb2 = torch.autograd.grad(out.sum(), (w1, b2))
    assert torch.equal(gw1[2], torch.zeros_like(gw1[2])) and torch.equal(gb2[2], torch.zeros_like(gb2[2]))
    assert gw1[0].abs().sum() > 0


def test_all_tokens_to_one_expert_and_every_token_to_every_expert():
    inputs = make_inputs(T=19, D=8, E=3, H=H, seed=3)
    one = torch.zeros(19, 3, dtype=torch.bool)
    one[:, 1] = True
    assert_same(inputs, mask=one)
    assert_same(inputs, mask=torch.ones(19, 3, dtype=torch.bool))


def test_nothing_routed_is_zero_with_zero_gradients():
    inputs = make_inputs(T=8, D=4, E=3, H=H, seed=4)
    assert_same(inputs, mask=torch.zeros(8, 3, dtype=torch.bool))
    x, s, w1, b1, w2, b2 = inputs
    out = cpu_experts.expert_ffn(
        x, reference.plan_from_mask(torch.zeros(8, 3, dtype=torch.bool), s), *inputs[2:]
    )
    assert torch.equal(out, torch.zeros_like(out))


def test_frozen_inputs_get_no_gradient_and_the_rest_still_match():
    x, s, w1, b1, w2, b2 = make_inputs(T=30, D=8, E=4, H=H, seed=5)
    inputs = [x.detach(), s, w1, b1.detach(), w2, b2]  # no grad for x and b1
    assert_same(inputs, k_total=50)


def test_gradcheck_float64():
    inputs = make_inputs(T=6, D=3, E=3, H=4, dtype=torch.float64, seed=6)

    def f(x, s, w1, b1, w2, b2):
        return cpu_experts.expert_ffn(x, reference.race_plan(s, k_total=7), w1, b1, w2, b2)

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_dispatch_auto_takes_the_cpu_path_and_torch_the_reference(monkeypatch):
    calls = []
    for module in (cpu_experts, reference):
        real = module.expert_ffn
        monkeypatch.setattr(module, "expert_ffn", lambda *a, real=real, m=module: calls.append(m) or real(*a))
    x, s, w1, b1, w2, b2 = make_inputs(T=10, D=4, E=3, H=4)
    plan = reference.race_plan(s, k_total=12)
    dispatch.expert_ffn(x, plan, w1, b1, w2, b2)
    dispatch.expert_ffn(x, plan, w1, b1, w2, b2, impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the reference's per-op casts apply
        dispatch.expert_ffn(x, plan, w1, b1, w2, b2)
    assert calls == [cpu_experts, reference, reference]
    with pytest.raises(ValueError, match="impl='torch'"), torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_experts.expert_ffn(x, plan, w1, b1, w2, b2)


def test_race_dit_training_step_is_unchanged_by_the_cpu_path():
    """One Race-DiT forward + backward (diffusion loss + PLR + RSL) with impl=auto (the CPU path) and
    impl=torch (the reference): the same loss and gradients, bit for bit (expert hidden 4*32/2 = 64)."""
    import racedit
    from racedit.diffusion import DiffusionConfig, build_objective
    from racedit.models import ForwardAux
    from racedit.moe.losses import aux_losses

    results = []
    for impl in ("auto", "torch"):
        torch.manual_seed(0)
        model = racedit.build_model(
            "RaceDiT-S/2-2in8", input_size=8, num_classes=10, hidden_size=32, depth=2, num_heads=2,
            in_channels=4, moe={"impl": impl},
        ).train()  # fmt: skip
        objective = build_objective(DiffusionConfig(objective="flow"), learn_sigma=model.arch.learn_sigma)
        g = torch.Generator().manual_seed(3)
        x0, y = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        aux = ForwardAux()
        out = objective.training_loss(model, x0, y, aux=aux, generator=torch.Generator().manual_seed(7))
        loss = out.loss + sum(aux_losses(aux, model.patchify(out.target), model.arch.moe).values())
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss_fast, grads_fast), (loss_ref, grads_ref) = results
    assert torch.equal(loss_fast, loss_ref)
    assert grads_fast.keys() == grads_ref.keys() and any(".w1" in n for n in grads_fast)
    for n in grads_ref:
        assert torch.equal(grads_fast[n], grads_ref[n]), n
