"""Every connection's fast ``forward`` against its plain ``reference_forward`` (the einsum formulas of
docs/spec/connections.md; log-domain Sinkhorn under autograd for mHC): values and gradients, at random weights."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from racedit.connections import FracConnection, HyperConnection, ManifoldHyperConnection
from racedit.connections.manifold import SINKHORN_FLOOR, sinkhorn, sinkhorn_fast, sinkhorn_traced

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


@pytest.mark.parametrize("rate", [1, 2, 4])
def test_static_fc_fractions_first_gemm_path(rate: int) -> None:
    conn = FracConnection(D, rate, fractions_first=True).double()
    _check(conn, torch.randn(rate, B, L, D // rate, dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("rate", [2, 4])
def test_mhc_fast_path_matches_the_reference_in_float32(rate: int) -> None:
    conn = ManifoldHyperConnection(D, rate, index=1, sinkhorn_iters=20)
    # float32: the reference's log-domain Sinkhorn runs in float32 (the fast path's in float64), 40
    # normalisations, each a relative rounding of ~6e-8, accumulate to ~2.4e-6 relative; gradients pass back
    # through the same 40 steps.
    _check(conn, torch.randn(B, L, rate, D), rtol=2e-5, atol=2e-5)


# Under bf16 autocast the branch's product rounds its input to bf16 (8 significant bits); the two paths hand it
# inputs that differ by float32 rounding, so a rounding may flip (2^-8 relative) in an element: 2^-5 covers a few.
AUTOCAST_TOL = dict(rtol=2.0**-5, atol=2.0**-5)


@pytest.mark.parametrize(
    "make,shape",
    [
        pytest.param(
            lambda: HyperConnection(D, 2, index=1, streams_first=True), (2, B, L, D), id="HC-streams-first"
        ),
        pytest.param(lambda: HyperConnection(D, 4, index=1), (B, L, 4, D), id="HC-token-major"),
        pytest.param(lambda: HyperConnection(D, 2, index=1, dynamic=True), (B, L, 2, D), id="DHC"),
        pytest.param(
            lambda: FracConnection(D, 2, fractions_first=True), (2, B, L, D // 2), id="FC-fractions-first"
        ),
        pytest.param(lambda: FracConnection(D, 4, dynamic=True), (B, L, D), id="DFC"),
        pytest.param(lambda: ManifoldHyperConnection(D, 4, index=1), (B, L, 4, D), id="mHC"),
    ],
)
def test_fast_path_under_bf16_autocast_keeps_the_state_float32_and_matches_the_reference(make, shape) -> None:
    """``mixed_precision: bf16``: the branch runs in bf16, the connection's own arithmetic in the state's float32
    (``stream_in_state_dtype``), in the fast path and the reference alike."""
    conn = make()
    _randomize(conn)
    state = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    cotangent = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    results = []
    for fn_name in ("forward", "reference_forward"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_values_and_grads(conn, state, fn_name, cotangent))
    for out, state_grad, grads in results:
        assert out.dtype == state_grad.dtype == torch.float32
        assert all(g.dtype == torch.float32 for g in grads.values())
    fast, ref = results
    torch.testing.assert_close(fast[0], ref[0], **AUTOCAST_TOL)
    torch.testing.assert_close(fast[1], ref[1], **AUTOCAST_TOL)
    assert fast[2].keys() == ref[2].keys() and fast[2]
    for name in ref[2]:
        torch.testing.assert_close(
            fast[2][name], ref[2][name], **AUTOCAST_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("rate", [2, 4])
def test_mhc_fast_path_matches_the_reference_in_float64(rate: int) -> None:
    """The whole fast path (fused read + RMS-projection node, Sinkhorn's hand-written backward, batched write)
    against autograd through the plain formulas, in float64, so that any error in a hand-written derivative
    shows far above rounding."""
    conn = ManifoldHyperConnection(D, rate, index=1, sinkhorn_iters=20).double()
    # Both paths run in float64: 40 normalisations of ~1e-16 each, and the log domain against the scaling
    # vectors, differ by ~1e-14; a wrong term in a derivative would be O(1e-2) at these random weights.
    _check(conn, torch.randn(B, L, rate, D, dtype=torch.float64), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("iters", [1, 2, 7])
def test_sinkhorn_backward_is_the_unrolled_derivative_for_any_iteration_count(iters: int) -> None:
    """float64, where the log-domain reference under autograd is exact to ~1e-15: the hand-written reverse pass
    (first and last iteration are special cases in it) equals autograd's derivative of the same iterations."""
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(5, 3, 3, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    cotangent = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    (gf,) = torch.autograd.grad((sinkhorn_fast(logits, iters) * cotangent).sum(), logits)
    (gr,) = torch.autograd.grad((sinkhorn(logits, iters) * cotangent).sum(), logits)
    torch.testing.assert_close(sinkhorn_fast(logits, iters), sinkhorn(logits, iters), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-12)


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
    assert fast.is_contiguous()  # a token-strided result would send the mix's bmm down its per-matrix loop
    # the float32 reference rounds each of its 40 normalisations (~6e-8 relative): ~2.4e-6 relative after
    # 40, against the fast path's float64; gradients go back through the same 40 steps
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("iters", [1, 2, 20])
@pytest.mark.parametrize("spread", [1.0, 100.0])
def test_sinkhorn_traced_equals_the_fast_path(iters: int, spread: float) -> None:
    """The form ``torch.compile`` runs, eagerly under autograd: the same float64 iterates as the fast path
    (spread 100: logits hundreds of nats apart; the floor itself is tested below). Both compute in float64 and
    differ only in the order of their sums (~1e-16 per op over 2 x iters normalisations); a wrong iterate or term
    is O(1e-2)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(7, 4, 4, generator=g, dtype=torch.float64) * spread).requires_grad_(True)
    cotangent = torch.randn(7, 4, 4, generator=g, dtype=torch.float64)
    fast, traced = sinkhorn_fast(logits, iters), sinkhorn_traced(logits, iters)
    (gf,) = torch.autograd.grad((fast * cotangent).sum(), logits)
    (gt,) = torch.autograd.grad((traced * cotangent).sum(), logits)
    torch.testing.assert_close(traced, fast, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gt, gf, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", [sinkhorn_fast, sinkhorn_traced], ids=["fast", "traced"])
def test_sinkhorn_floor_gives_zero_gradient_past_700_nats_and_the_reference_elsewhere(fn) -> None:
    """Logits more than 700 nats below their row's maximum are raised to that floor (``SINKHORN_FLOOR``) and get
    zero gradient. Their true weight exp(-750) or exp(-1000) underflows float64 to 0 in the log-domain reference
    too, so both paths agree everywhere: floored values differ by ~e^-700 ~ 1e-304, far below the tolerance; the
    rest in float64 rounding (~1e-16 per op over 40 normalisations)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 4, 4, generator=g, dtype=torch.float64)
    logits[0, 1, 2] -= 1000.0
    logits[2, 3, 0] -= 750.0
    logits[3, 0] -= 800.0  # a whole row far below the others: the row shift cancels, nothing is floored there
    floored = (logits - logits.amax(-1, keepdim=True)) < SINKHORN_FLOOR
    assert floored.sum() == 2
    logits.requires_grad_(True)
    cotangent = torch.randn(4, 4, 4, generator=g, dtype=torch.float64)
    out = fn(logits, 20)
    (grad,) = torch.autograd.grad((out * cotangent).sum(), logits)
    ref = sinkhorn(logits, 20)
    (grad_ref,) = torch.autograd.grad((ref * cotangent).sum(), logits)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert torch.all(grad[floored] == 0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_compiled_sinkhorn_takes_the_traced_form_once_per_model() -> None:
    """Under ``torch.compile`` ``sinkhorn_fast`` runs ``sinkhorn_traced`` as one nested region (graphs recorded
    by the backend name it once, however many call sites), with the eager fast path's values and gradients:
    float32 results of float64 math, equal to a float32 rounding or two."""
    backend = CompileCounterWithBackend("aot_eager")  # aot_eager, keeping the graphs dynamo hands it

    def two_sublayers(logits):
        return sinkhorn_fast(logits, 5) + sinkhorn_fast(2 * logits, 5)

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3, 3, generator=g)
    cotangent = torch.randn(6, 3, 3, generator=g)
    out, grads = [], []
    for fn in (two_sublayers, torch.compile(two_sublayers, backend=backend, fullgraph=True)):
        x = logits.clone().requires_grad_(True)
        y = fn(x)
        out.append(y.detach())
        grads.append(torch.autograd.grad((y * cotangent).sum(), x)[0])
    code = "\n".join(gm.code for gm in backend.graphs)
    regions = re.findall(r"invoke_subgraph\(\w+, '(\w+)'", code)  # (subgraph, identifier, inputs)
    assert len(regions) == 2 and len(set(regions)) == 1, code  # two calls of one compiled region
    assert "SinkhornScaling" not in code, code
    torch.testing.assert_close(out[1], out[0], rtol=3e-7, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def _fast_path_nodes():
    """The fast paths whose read node accumulates the state gradient in place onto the write node's."""
    return {
        "mHCx2": (ManifoldHyperConnection(D, 2, index=1, sinkhorn_iters=5).double(), (B, L, 2, D)),
        "FCx4 fractions first": (FracConnection(D, 4, fractions_first=True).double(), (4, B, L, D // 4)),
    }


@pytest.mark.parametrize("name", list(_fast_path_nodes()))
@pytest.mark.parametrize("uses_input", [True, False])
def test_in_place_state_gradient_keeps_other_consumers_gradients(name: str, uses_input: bool) -> None:
    """The read node adds its terms onto the write node's state gradient in place. The state's other consumers
    (here a second use of the state, and a branch that ignores its input, so that no gradient reaches h0)
    must still receive exactly their own gradient: fast path and reference agree in float64."""
    conn, shape = _fast_path_nodes()[name]
    _randomize(conn)
    g = torch.Generator().manual_seed(4)
    state0 = torch.randn(shape, generator=g, dtype=torch.float64)
    cotangent = torch.randn(shape, generator=g, dtype=torch.float64)
    fixed = torch.randn(D, generator=g, dtype=torch.float64)
    branch = _branch(torch.float64) if uses_input else (lambda h: torch.tanh(fixed).expand(h.shape))
    results = []
    for fn_name in ("forward", "reference_forward"):
        state = state0.clone().requires_grad_(True)
        conn.zero_grad(set_to_none=True)
        out = getattr(conn, fn_name)(state, branch) + 0.5 * state.square()
        (out * cotangent).sum().backward()
        results.append((out.detach(), state.grad, {n: p.grad for n, p in conn.named_parameters()}))
    (fast, fast_grad, fast_params), (ref, ref_grad, ref_params) = results
    torch.testing.assert_close(fast, ref, **EXACT)
    torch.testing.assert_close(fast_grad, ref_grad, **EXACT)
    for n, grad in ref_params.items():
        if grad is None:  # a parameter the branch never reaches (the read weights when h0 is unused)
            assert fast_params[n] is None or torch.count_nonzero(fast_params[n]) == 0, n
        else:
            torch.testing.assert_close(fast_params[n], grad, **EXACT, msg=lambda m, n=n: f"{n}: {m}")
