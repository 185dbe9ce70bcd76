"""Triton kernels on a real GPU against the reference (skipped without CUDA; see tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from racedit.kernels import dispatch, grouped_mm, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
INT_FIELDS = ("counts", "offsets", "sorted_token", "sorted_expert", "slot")


@pytest.mark.parametrize("ties", ["index", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_race_plan_on_gpu_equals_reference(ties, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, E, k in [(65536, 32, 4), (4099, 7, 2)]:
        s = torch.randn(T, E, device="cuda", generator=g).to(dtype)
        s[::3] = torch.round(s[::3] * 4) / 4  # many ties
        got = dispatch.race_plan(s, k_total=k * T, ties=ties, impl="triton")
        want = reference.race_plan(s, k_total=k * T, ties=ties)
        for f in INT_FIELDS:
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        assert torch.equal(got.sorted_gate, want.sorted_gate) and torch.equal(got.kth, want.kth)
        thr = dispatch.race_plan(s, tau=0.5, impl="triton")
        thr_want = reference.race_plan(s, tau=0.5)
        for f in INT_FIELDS:
            assert torch.equal(getattr(thr, f), getattr(thr_want, f)), f"threshold {f}"
        assert torch.equal(thr.sorted_gate, thr_want.sorted_gate)


# bf16 keeps 8 significant bits. The two paths round their intermediates (pre-activation, expert output, gated
# output) to bf16 at different points, 2^-8 relative each: ~1.2e-2 of the largest magnitude for three roundings,
# and 3e-2 leaves margin. Gradients pass back through the same three roundings. The 1e-3 absolute term covers
# entries whose reference is ~0 (a few bf16 ulps at the O(1) scale of these activations).
BF16_RTOL_OF_MAX, BF16_ATOL = 3e-2, 1e-3


def _expert_problem(T: int, D: int = 256, E: int = 8, H: int = 256):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16().requires_grad_()

    # random biases: a wrong expert row or offset in the bias epilogue shows in the output and in dx
    params = (randn(T, D), randn(T, E), randn(E, D, H, scale=D**-0.5), randn(E, H, scale=0.1))
    params += (randn(E, H, D, scale=H**-0.5), randn(E, D, scale=0.1))
    return params, randn(T, D).detach()


def _run(params, go, impl: str, k: int, tau: float | None):
    x, s, w1, b1, w2, b2 = params
    routing = "triton" if impl == "triton" else "torch"
    if tau is None:
        plan = dispatch.race_plan(s, k_total=k * x.shape[0], impl=routing)
    else:
        plan = dispatch.race_plan(s, tau=tau, impl=routing)
    out = dispatch.expert_ffn(x, plan, w1, b1, w2, b2, impl=impl)
    return [out.float()] + [gr.float() for gr in torch.autograd.grad((out * go).sum(), params)]


def _assert_close_bf16(got, want, what: str) -> None:
    for name, u, v in zip(("out", "x", "scores", "w1", "b1", "w2", "b2"), got, want):
        assert (u - v).abs().max() <= BF16_RTOL_OF_MAX * v.abs().max() + BF16_ATOL, f"{what}: {name}"


# (T, k, tau): thousands of tokens; one token (K = 2 pairs, smaller than any tile, 6 of 8 experts empty); an odd
# count; a threshold that routes nothing (K = 0: zero output, zero gradients)
CASES = [(4096, 2, None), (1, 2, None), (37, 3, None), (64, 2, 100.0)]


@pytest.mark.parametrize("T,k,tau", CASES)
def test_expert_ffn_on_gpu_matches_reference_and_is_deterministic(T, k, tau):
    params, go = _expert_problem(T)
    a, b, ref = (
        _run(params, go, "triton", k, tau),
        _run(params, go, "triton", k, tau),
        _run(params, go, "torch", k, tau),
    )
    for u, v in zip(a, b):
        assert torch.equal(u, v)  # no atomics: bitwise repeatable
    _assert_close_bf16(a, ref, "triton")
    if tau is not None:  # nothing routed: zero output and zero gradients, in both paths
        assert all(torch.count_nonzero(u) == 0 for u in a + ref)


@pytest.mark.parametrize("T,k,tau", CASES)
def test_grouped_mm_on_gpu_matches_reference(T, k, tau):
    params, go = _expert_problem(T)
    reason = grouped_mm.supports(params[0], params[2])
    if reason is not None:
        pytest.skip(reason)  # bf16 on sm90 or newer
    _assert_close_bf16(
        _run(params, go, "grouped_mm", k, tau), _run(params, go, "torch", k, tau), "grouped_mm"
    )


def test_moe_layer_under_bf16_autocast_runs_the_experts_in_bf16_on_every_impl():
    """The trainer's mixed precision: float32 weights and activations (the block hands the MLP slot LayerNorm's
    float32 output) under bf16 autocast. Every impl computes the experts in bf16 (the dense MLP's nn.Linear does
    the same) and agrees with the others within bf16 rounding."""
    from racedit.moe import MoEConfig, MoEFeedForward

    h = torch.randn(4, 64, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    outs = {}
    for impl in ("torch", "triton", "grouped_mm"):
        torch.manual_seed(0)
        layer = MoEFeedForward(128, 512, MoEConfig(num_experts=8, k=2, impl=impl), 0, 16).cuda().train()
        if impl == "grouped_mm" and grouped_mm.supports(h.bfloat16(), layer.w1) is not None:
            continue  # bf16 on sm90 or newer
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(h)
        assert out.dtype == torch.bfloat16, impl
        outs[impl] = out.float()
    for impl, out in outs.items():
        ref = outs["torch"]
        assert (out - ref).abs().max() <= BF16_RTOL_OF_MAX * ref.abs().max() + BF16_ATOL, impl


def test_grouped_mm_float32_forward_on_gpu_runs_triton_with_a_warning():
    """A run training with impl=grouped_mm under bf16 autocast still has float32 forwards (preview grids and
    sampling outside autocast); torch._grouped_mm takes only bf16 on CUDA, so those run the Triton path."""
    params, _ = _expert_problem(256)
    x, s, w1, b1, w2, b2 = (p.detach().float() for p in params)
    plan = dispatch.race_plan(s, k_total=2 * 256, impl="triton")
    with pytest.warns(UserWarning, match="needs bf16 on CUDA"):
        out = dispatch.expert_ffn(x, plan, w1, b1, w2, b2, impl="grouped_mm")
    assert out.dtype == torch.float32
    assert torch.equal(out, dispatch.expert_ffn(x, plan, w1, b1, w2, b2, impl="triton"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_runs_on_the_tensors_device_not_the_current_one():
    """Triton launches on the current device; dispatch makes the tensors' device current (sample.py --device
    cuda:1 never calls set_device)."""
    params, go = _expert_problem(256)
    ref = _run(params, go, "triton", 2, None)
    moved = tuple(p.detach().to("cuda:1").requires_grad_() for p in params)
    with torch.cuda.device(0):
        got = _run(moved, go.to("cuda:1"), "triton", 2, None)
    for u, v in zip(got, ref):
        assert torch.equal(u.cpu(), v.cpu())  # the same kernels on the same numbers
