"""Connection modules on their own: the update rules of docs/spec/connections.md against loop-by-loop references,
their identity init, parameter counts, FLOPs and configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from racedit.connections import (
    ConnectionConfig,
    FracConnection,
    HyperConnection,
    HyperStream,
    ManifoldHyperConnection,
    Residual,
    Stream,
    build_connection,
    build_stream,
    sinkhorn,
)

D = 8
B, L = 2, 3


def _branch(seed: int = 0):
    """A fixed non-linear sublayer T: (B, L, D) -> (B, L, D)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(D, D, generator=g)
    return lambda h: torch.tanh(h @ M)


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ----------------------------------------------------------------------------- references (loops)


def _hc_reference(conn: HyperConnection, H: torch.Tensor, T) -> torch.Tensor:
    """docs/spec/connections.md HC, written per stream: h0 = sum_i A_m[i] H_i; H_j <- B[j] T(h0) + sum_i A_r[i,j] H_i."""
    n = conn.rate
    Am = conn.static_pre.expand(B, L, n)
    Ar = conn.static_res.expand(B, L, n, n)
    Bw = conn.static_post.expand(B, L, n)
    if conn.dynamic:
        W = conn.dynamic_proj.weight  # (n + 2, D): rows W_m, W_r (n), W_b
        act = torch.tanh if conn.use_tanh else (lambda v: v)
        s_a, s_b = conn.dynamic_alpha_scale, conn.dynamic_beta_scale
        Am, Ar, Bw = Am.clone(), Ar.clone(), Bw.clone()
        for i in range(n):
            hn = F.layer_norm(H[:, :, i], (D,), eps=1e-6)
            Am[:, :, i] = Am[:, :, i] + s_a * act(hn @ W[0])
            for j in range(n):
                Ar[:, :, i, j] = Ar[:, :, i, j] + s_a * act(hn @ W[1 + j])
            Bw[:, :, i] = Bw[:, :, i] + s_b * act(hn @ W[n + 1])
    h0 = sum(Am[:, :, i, None] * H[:, :, i] for i in range(n))
    out = T(h0)
    new = [
        Bw[:, :, j, None] * out + sum(Ar[:, :, i, j, None] * H[:, :, i] for i in range(n)) for j in range(n)
    ]
    return torch.stack(new, dim=2)


def _fc_reference(conn: FracConnection, h: torch.Tensor, T) -> torch.Tensor:
    """docs/spec/connections.md FC, per fraction: h0 = concat_j sum_i Y[i,j] H_i; H_j <- B[j] T_out_j + sum_i A[i,j] H_i."""
    m, f = conn.rate, D // conn.rate
    H = [h[..., i * f : (i + 1) * f] for i in range(m)]
    Y = conn.static_pre.expand(B, L, m, m).clone()
    A = conn.static_res.expand(B, L, m, m).clone()
    Bw = conn.static_post.expand(B, L, m).clone()
    if conn.dynamic:
        W = conn.dynamic_proj.weight  # (2m + 1, D/m)
        act = torch.tanh if conn.use_tanh else (lambda v: v)
        for i in range(m):
            hn = F.layer_norm(H[i], (f,), eps=1e-6)
            for j in range(m):
                Y[:, :, i, j] += conn.dynamic_alpha_scale * act(hn @ W[j])
                A[:, :, i, j] += conn.dynamic_alpha_scale * act(hn @ W[m + j])
            Bw[:, :, i] += conn.dynamic_beta_scale * act(hn @ W[2 * m])
    h0 = torch.cat([sum(Y[:, :, i, j, None] * H[i] for i in range(m)) for j in range(m)], dim=-1)
    out = T(h0)
    new = [
        Bw[:, :, j, None] * out[..., j * f : (j + 1) * f] + sum(A[:, :, i, j, None] * H[i] for i in range(m))
        for j in range(m)
    ]
    return torch.cat(new, dim=-1)


def _mhc_reference(conn: ManifoldHyperConnection, H: torch.Tensor, T) -> torch.Tensor:
    """docs/spec/connections.md mHC with the textbook Sinkhorn-Knopp (divide exp by row sums, then column sums)."""
    n = conn.rate
    x = H.flatten(-2)
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm over n D
    z = x @ conn.proj.weight.T
    pre = torch.sigmoid(conn.pre_scale * z[..., :n] + conn.pre_bias)
    post = 2 * torch.sigmoid(conn.post_scale * z[..., n : 2 * n] + conn.post_bias)
    M = torch.exp(conn.res_scale * z[..., 2 * n :].reshape(B, L, n, n) + conn.res_bias)
    for _ in range(conn.sinkhorn_iters):
        M = M / M.sum(-1, keepdim=True)
        M = M / M.sum(-2, keepdim=True)
    h0 = sum(pre[:, :, i, None] * H[:, :, i] for i in range(n))
    out = T(h0)
    new = [
        post[:, :, j, None] * out + sum(M[:, :, i, j, None] * H[:, :, i] for i in range(n)) for j in range(n)
    ]
    return torch.stack(new, dim=2)


# ----------------------------------------------------------------------------- update rules


@pytest.mark.parametrize("rate", [1, 2, 4])
@pytest.mark.parametrize("dynamic,tanh", [(False, True), (True, True), (True, False)])
def test_hc_matches_the_per_stream_formula(rate: int, dynamic: bool, tanh: bool) -> None:
    conn = HyperConnection(D, rate, index=3, dynamic=dynamic, tanh=tanh)
    _randomize(conn)
    H = torch.randn(B, L, rate, D)
    T = _branch()
    # float32, the same sums of n + 1 terms of O(1) in another order (batched products against a per-stream
    # loop), a few 6e-8 roundings each: 1e-5 leaves two orders of margin
    torch.testing.assert_close(conn(H, T), _hc_reference(conn, H, T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rate", [1, 2, 4])
@pytest.mark.parametrize("dynamic,tanh", [(False, True), (True, True), (True, False)])
def test_fc_matches_the_per_fraction_formula(rate: int, dynamic: bool, tanh: bool) -> None:
    conn = FracConnection(D, rate, dynamic=dynamic, tanh=tanh)
    _randomize(conn)
    h = torch.randn(B, L, D)
    T = _branch()
    # float32, sums of m terms reordered (as the HC test above)
    torch.testing.assert_close(conn(h, T), _fc_reference(conn, h, T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rate", [2, 4])
def test_mhc_matches_the_textbook_formula(rate: int) -> None:
    conn = ManifoldHyperConnection(D, rate, index=1)
    _randomize(conn)
    H = torch.randn(B, L, rate, D)
    T = _branch()
    # float32: the reference's 20 log-domain Sinkhorn iterations round ~6e-8 relative in each of 40
    # normalisations (~2.4e-6), the fast path computes them in float64
    torch.testing.assert_close(conn(H, T), _mhc_reference(conn, H, T), rtol=1e-5, atol=1e-5)


def test_sinkhorn_is_doubly_stochastic_and_matches_exp_normalisation() -> None:
    logits = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(0)) * 2
    P = sinkhorn(logits, 200)
    assert (P >= 0).all()
    # columns are normalised last: they sum to 1 up to float32 rounding of a sum of 4 terms (~2e-7); rows
    # only up to the iteration's remaining error, small after 200 iterations of logits spread by ~2
    torch.testing.assert_close(P.sum(-2), torch.ones(5, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(P.sum(-1), torch.ones(5, 4), atol=1e-4, rtol=0)
    M = logits.exp()
    for _ in range(200):
        M = M / M.sum(-1, keepdim=True)
        M = M / M.sum(-2, keepdim=True)
    # float32, the same 400 normalisations in the log domain against direct division: ~400 * 6e-8 = 2.4e-5
    # at worst if every rounding went one way; they do not, and the iteration contracts them
    torch.testing.assert_close(P, M, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rate", [2, 3, 4])
def test_mhc_init_reads_one_stream_most_and_keeps_equal_streams_equal(rate: int) -> None:
    conn = ManifoldHyperConnection(D, rate, index=5)
    H = torch.randn(B, L, 1, D).expand(B, L, rate, D)
    pre, res, post = conn.coefficients(H)
    k = 5 % rate
    assert torch.argmax(pre[0, 0]).item() == k and pre[0, 0, k] > pre[0, 0].min()  # symmetry broken
    torch.testing.assert_close(pre.sum(-1), torch.ones(B, L))
    assert torch.equal(post, torch.ones(B, L, rate))  # 2 sigmoid(0) = 1 exactly
    torch.testing.assert_close(res.sum(-2), torch.ones(B, L, rate))
    torch.testing.assert_close(torch.diagonal(res, dim1=-2, dim2=-1), torch.full((B, L, rate), 0.9))
    T = _branch()
    h = H[:, :, 0]
    torch.testing.assert_close(conn(H, T), (h + T(h)).unsqueeze(2).expand(B, L, rate, D))


def test_mhc_res_gradient_vanishes_on_equal_streams_and_not_otherwise() -> None:
    """A doubly stochastic H_res maps n equal streams to themselves, so at the residual-equivalent init
    it gets no gradient; once the streams differ it does (the mHC learning signal for H_res)."""
    conn = ManifoldHyperConnection(D, 4, index=0)
    with torch.no_grad():
        conn.proj.weight.normal_(0, 0.1)
    T = _branch()
    equal = torch.randn(B, L, 1, D).expand(B, L, 4, D)
    conn(equal, T).square().sum().backward()
    assert conn.res_bias.grad.abs().max() < 1e-5 * conn.post_bias.grad.abs().max()
    conn.zero_grad()
    conn(torch.randn(B, L, 4, D), T).square().sum().backward()
    assert conn.res_bias.grad.abs().max() > 1e-2 and conn.res_scale.grad.abs() > 1e-3


# ----------------------------------------------------------------------------- init, streams


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("rate", [1, 2, 4])
def test_hc_init_is_one_hot_read_identity_mix(rate: int, dynamic: bool) -> None:
    conn = HyperConnection(D, rate, index=5, dynamic=dynamic)
    assert torch.equal(conn.static_pre, torch.eye(rate)[5 % rate])
    assert torch.equal(conn.static_res, torch.eye(rate))
    assert torch.equal(conn.static_post, torch.ones(rate))
    if dynamic:
        assert torch.equal(conn.dynamic_proj.weight, torch.zeros(rate + 2, D))
        assert conn.dynamic_alpha_scale.item() == conn.dynamic_beta_scale.item() == pytest.approx(0.01)
    h = torch.randn(B, L, D)
    T = _branch()
    state = HyperStream(rate).expand(h)
    new = conn(state, T)
    assert torch.equal(new, (h + T(h)).unsqueeze(2).expand_as(new))  # bitwise the residual update


def test_hc_reads_stream_of_the_global_sublayer_index() -> None:
    cfg = ConnectionConfig(kind="hc", rate=4)
    reads = [
        int(torch.argmax(build_connection(cfg, D, layer, sub).static_pre))
        for layer in range(3)
        for sub in (0, 1)
    ]
    assert reads == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("rate", [1, 2, 4])
def test_fc_init_is_exactly_residual(rate: int) -> None:
    conn = FracConnection(D, rate, dynamic=True)
    h = torch.randn(B, L, D)
    T = _branch()
    assert torch.equal(conn(h, T), h + T(h))


def test_streams_expand_and_collapse() -> None:
    h = torch.randn(B, L, D)
    # static HC keeps the streams first (n, B, L, D); dynamic HC and mHC token-major (B, L, n, D)
    for cfg, axis in [(ConnectionConfig(kind="hc", rate=4), 0), (ConnectionConfig(kind="mhc", rate=4), 2)]:
        stream = build_stream(cfg, D)
        state = stream.expand(h)
        assert state.shape == torch.Size([4, B, L, D] if axis == 0 else [B, L, 4, D])
        assert torch.equal(stream.collapse(state), h)  # the mean of equal copies: exact
        different = torch.randn(state.shape)
        torch.testing.assert_close(stream.collapse(different), different.mean(axis))
        with pytest.raises(ValueError, match="stream state"):
            stream.collapse(torch.randn(B, L, 2, D).movedim(2, axis))
    for cfg in (ConnectionConfig(), ConnectionConfig(kind="fc", rate=4, dynamic=True)):
        s = build_stream(cfg, D)
        assert type(s) is Stream and s.expand(h) is h and s.collapse(h) is h
    assert isinstance(build_connection(ConnectionConfig(), D, 0, 0), Residual)


# ----------------------------------------------------------------------------- accounting, errors


@pytest.mark.parametrize(
    "cfg,expected",
    [
        (ConnectionConfig(kind="hc", rate=2), 2 * 4),  # n (n + 2)
        (ConnectionConfig(kind="hc", rate=4), 4 * 6),
        (ConnectionConfig(kind="hc", rate=4, dynamic=True), 4 * 6 + D * 6 + 2),  # + D (n + 2) + s_a, s_b
        (ConnectionConfig(kind="fc", rate=4), 4 * 9),  # m (2m + 1)
        (ConnectionConfig(kind="fc", rate=2, dynamic=True), 2 * 5 + (D // 2) * 5 + 2),
        (ConnectionConfig(kind="mhc", rate=4), 4 * 6 + 3 + 4 * D * 24),  # biases, scales, n D (n^2 + 2n)
    ],
)
def test_parameter_counts(cfg: ConnectionConfig, expected: int) -> None:
    conn = build_connection(cfg, D, 0, 0)
    assert sum(p.numel() for p in conn.parameters()) == expected


def test_flops() -> None:
    n, m, N = 4, 4, 10
    assert build_connection(ConnectionConfig(), D, 0, 0).flops(N) == 0
    assert HyperConnection(D, n, 0).flops(N) == N * n * (n + 2) * D
    assert HyperConnection(D, n, 0, dynamic=True).flops(N) == 2 * N * n * (n + 2) * D
    assert FracConnection(D, m).flops(N) == N * (2 * m + 1) * D
    assert FracConnection(D, m, dynamic=True).flops(N) == 2 * N * (2 * m + 1) * D
    mhc = ManifoldHyperConnection(D, n, 0, sinkhorn_iters=20)
    assert mhc.flops(N) == N * (n * D * (n * n + 2 * n) + n * (n + 2) * D + 40 * n * n)


def test_configuration_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="not divisible by 3"):
        FracConnection(D, 3)
    with pytest.raises(ValueError, match="divisible by m"):
        build_stream(ConnectionConfig(kind="fc", rate=3), D)
    with pytest.raises(ValueError, match="mHC needs rate >= 2"):
        ConnectionConfig(kind="mhc", rate=1)
    with pytest.raises(ValueError, match="rate must be >= 1"):
        ConnectionConfig(kind="hc", rate=0)
    bogus = ConnectionConfig(kind="hc", rate=2)
    bogus.kind = "nope"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="not implemented; known kinds"):
        build_connection(bogus, D, 0, 0)
