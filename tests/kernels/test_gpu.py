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
        assert torch.equal(thr.slot, reference.race_plan(s, tau=0.5).slot)


def test_expert_ffn_on_gpu_matches_reference_and_is_deterministic():
    torch.manual_seed(0)
    T, D, E, H = 4096, 256, 8, 256
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.randn(T, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(E, D, H, device="cuda") / D**0.5).bfloat16().requires_grad_()
    b1 = torch.zeros(E, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = (torch.randn(E, H, D, device="cuda") / H**0.5).bfloat16().requires_grad_()
    b2 = torch.zeros(E, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = (x, s, w1, b1, w2, b2)
    go = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

    def run(impl):
        plan = dispatch.race_plan(s, k_total=2 * T, impl="triton" if impl == "triton" else "torch")
        out = dispatch.expert_ffn(x, plan, w1, b1, w2, b2, impl=impl)
        return [out.float()] + [gr.float() for gr in torch.autograd.grad((out * go).sum(), params)]

    a, b, ref = run("triton"), run("triton"), run("torch")
    for u, v in zip(a, b):
        assert torch.equal(u, v)  # no atomics: bitwise repeatable
    for u, v in zip(a, ref):
        assert (u - v).abs().max() <= 3e-2 * v.abs().max() + 1e-3
    if grouped_mm.supports(x, w1) is not None:  # needs bf16 on sm90+
        return
    gm = run("grouped_mm")
    assert (gm[0] - ref[0]).abs().max() <= 3e-2 * ref[0].abs().max() + 1e-3
