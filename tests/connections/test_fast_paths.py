"""Every connection's fast ``forward`` against its plain ``reference_forward`` (the einsum formulas of
docs/spec/connections.md; log-domain Sinkhorn under autograd for mHC): values and gradients, at random weights."""

from __future__ import annotations

import pytest
import torch

from racedit.connections import FracConnection, HyperConnection, ManifoldHyperConnection
from racedit.connections.manifold import sinkhorn, sinkhorn_fast

D, B, L = 8, 2, 3


def _branch(dtype: torch.dtype):
    """A fixed non-linear sublayer with parameters of its own, so gradients flow through it too."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(D, D, generator=g, dtype=dtype)
    return lambda h: torch.tanh(h @ M)


def _randomize(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _values_and_grads(conn: torch.nn.Module, state: torch.Tensor, fn_name: str, cotangent: torch.Tensor):
    state = state.detach().clone().requires_grad_(True)
    conn.zero_grad(set_to_none=True)
    out = getattr(conn, fn_name)(state, _branch(state.dtype))
    (out * cotangent).sum().backward()
    grads = {name: p.grad.clone() for name, p in conn.named_parameters() if p.grad is not None}
    return out.detach(), state.grad, grads


def _check(conn: torch.nn.Module, state: torch.Tensor, **tol) -> None:
    _randomize(conn)
    cotangent = torch.randn(state.shape, dtype=state.dtype)
    fast = _values_and_grads(conn, state, "forward", cotangent)
    ref = _values_and_grads(conn, state, "reference_forward", cotangent)
    torch.testing.assert_close(fast[0], ref[0], **tol)
    torch.testing.assert_close(fast[1], ref[1], **tol)
    assert fast[2].keys() == ref[2].keys() and fast[2]
    for name in ref[2]:
        torch.testing.assert_close(fast[2][name], ref[2][name], **tol, msg=lambda m, n=name: f"{n}: {m}")


# float64: the two paths differ only in summation order over <= n + 1 terms of O(1) size, ~1e-15 each.
EXACT = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rate", [1, 2, 4])
def test_static_hc_streams_first_gemm_path(rate: int) -> None:
    conn = HyperConnection(D, rate, index=3, streams_first=True).double()
    _check(conn, torch.randn(rate, B, L, D, dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("rate", [1, 2, 4])
@pytest.mark.parametrize("dynamic,tanh", [(False, True), (True, True), (True, False)])
def test_token_major_hc_batched_path(rate: int, dynamic: bool, tanh: bool) -> None:
    conn = HyperConnection(D, rate, index=1, dynamic=dynamic, tanh=tanh).double()
    _check(conn, torch.randn(B, L, rate, D, dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("rate", [1, 2, 4])
@pytest.mark.parametrize("dynamic", [False, True])
def test_fc_matmul_path(rate: int, dynamic: bool) -> None:
    conn = FracConnection(D, rate, dynamic=dynamic).double()
    _check(conn, torch.randn(B, L, D, dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("rate", [2, 4])
def test_mhc_fast_sinkhorn_and_recomputed_coefficients(rate: int) -> None:
    conn = ManifoldHyperConnection(D, rate, index=1, sinkhorn_iters=20)
    # float32 (Sinkhorn always runs in float32): 40 normalisations, each a relative rounding of ~6e-8,
    # accumulate to ~2.4e-6 relative in either path; gradients pass back through the same 40 steps.
    _check(conn, torch.randn(B, L, rate, D), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("spread", [1.0, 5.0, 100.0])
def test_sinkhorn_fast_matches_the_log_domain_reference(spread: float) -> None:
    """spread 100: logits hundreds of nats apart, far beyond float32's exp range (the fast path computes in
    float64, whose exp reaches e^-700); values and the hand-written backward against autograd's."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 4, 4, generator=g) * spread).requires_grad_(True)
    cotangent = torch.randn(6, 4, 4, generator=g)
    fast = sinkhorn_fast(logits, 20)
    (gf,) = torch.autograd.grad((fast * cotangent).sum(), logits)
    ref = sinkhorn(logits, 20)
    (gr,) = torch.autograd.grad((ref * cotangent).sum(), logits)
    assert fast.dtype == torch.float32 and torch.isfinite(gf).all()
    # the float32 reference rounds each of its 40 normalisations (~6e-8 relative): ~2.4e-6 relative after
    # 40, against the fast path's float64; gradients go back through the same 40 steps
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-5)
