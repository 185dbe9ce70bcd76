"""The AdamW implementation switch (racedit/training/optim.py): what ``auto`` resolves to, and that the three
implementations compute the same update, so choosing by speed never changes a run beyond rounding."""

from __future__ import annotations

import pytest
import torch

from racedit.training.optim import build_adamw, keep_impl, resolve_adamw_impl


def test_auto_resolves_per_device_and_explicit_choices_pass_through():
    assert resolve_adamw_impl("auto", "cpu") == "fused"
    assert resolve_adamw_impl("auto", torch.device("cuda", 0)) == "fused"
    for impl in ("fused", "foreach", "for-loop"):
        assert resolve_adamw_impl(impl, "cpu") == impl
    with pytest.raises(ValueError, match="optimizer implementation must be one of"):
        resolve_adamw_impl("apex", "cpu")


def _run(impl: str, steps: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=g).requires_grad_(True) for shape in [(7, 5), (5,), (3, 4, 6)]]
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
    opt, chosen = build_adamw(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, impl=impl, device="cpu")
    assert chosen == impl
    assert all(
        gr["fused"] == (impl == "fused") and gr["foreach"] == (impl == "foreach") for gr in opt.param_groups
    )
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params]


def test_fused_foreach_and_loop_give_the_same_parameters():
    reference = _run("for-loop")
    for impl in ("foreach", "fused"):
        for a, b in zip(_run(impl), reference):
            # Same math, different operation order: each of the 5 updates (size <= lr = 1e-2) may differ by a
            # few float32 ulps of itself, and each parameter (|p| < 5) by a few ulps of itself per step:
            # 5 steps x ~4 ulps x 2^-23 x 5 ~ 1e-5 absolute at most.
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_loading_a_state_dict_keeps_this_runs_implementation():
    p = torch.zeros(3, requires_grad=True)
    saved, _ = build_adamw([p], lr=1e-3, impl="for-loop")
    p.grad = torch.ones(3)
    saved.step()
    opt, chosen = build_adamw([p], lr=1e-3, impl="fused")
    opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["fused"] is False  # what load_state_dict alone does
    keep_impl(opt, chosen)
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["foreach"] is False
    opt.step()  # the fused kernel accepts the loop's saved state
