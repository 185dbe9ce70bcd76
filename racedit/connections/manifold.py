"""Manifold-constrained hyper-connections (mHC; DeepSeek, arXiv 2512.24880).

docs/spec/connections.md, "mHC". Same n-stream state (B, L, n, D) and update as hyper-connections,

    h0 = sum_i H_pre[i] * H_i,     H_j <- H_post[j] * T(h0) + sum_i H_res[i, j] * H_i,

but every coefficient is computed per token from the RMSNorm of the flattened n*D state x (no tanh):

    H_pre  = sigmoid(a_pre  * (x W_pre)  + b_pre)                    (B, L, n)
    H_post = 2 * sigmoid(a_post * (x W_post) + b_post)               (B, L, n)
    H_res  = SinkhornKnopp(exp(a_res * (x W_res) + b_res), 20 iters) (B, L, n, n), doubly stochastic

A doubly stochastic H_res has spectral norm 1, so the product of residual mixes over depth stays
bounded (unconstrained HC's product spiked at 27B scale). mHC is input-dependent by construction:
the ``dynamic`` and ``tanh`` fields of ``ConnectionConfig`` do not apply to it.

Initialisation: equal to the residual DiT, with the streams' symmetry broken.
Expanded streams start as n equal copies of h. They stay equal through a sublayer exactly when
(1) every stream receives the same output, (2) the mix keeps equal streams equal, and the sublayer
input is h itself when (3) the read weights sum to 1. We initialise the projections W = 0 (the
coefficients are then token-independent; their gradients are not zero since the scales a = 0.01 are
not) and choose the biases so that
(1) b_post = 0: H_post = 2 sigmoid(0) = 1 for every stream, exactly;
(2) b_res = c I: Sinkhorn of a symmetric matrix with constant row sums is its row softmax, so every
    column sums to 1 and sum_i H_res[i, j] H_i = h. We take c = ln(9 (n - 1)): H_res = 0.9 I + 0.1/(n-1)
    off the diagonal: near the identity (as HC's A_r = I) yet away from the saturated limit where
    the Sinkhorn gradient vanishes;
(3) b_pre = logit(p) with p = e_k / 2 + 1 / (2n) (k = sublayer index mod n): the read weights sum to 1,
    and the streams are read unequally, which breaks their symmetry (one-hot-style, as HC's A_m = e_k,
    but not saturated: a sigmoid cannot reach 0 or 1).
The network then equals the pre-norm residual network up to the rounding of sigmoid(logit(p))
(about 1e-7 relative per sublayer in float32), not bitwise like HC and FC. With one stream the read
weight sigmoid(.) cannot equal 1, so mHC needs n >= 2 (``ConnectionConfig`` says so).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from racedit.connections.base import Branch, Connection, Stream, stream_in_state_dtype
from racedit.connections.config import ConnectionConfig
from racedit.connections.hyper import (
    DYNAMIC_SCALE_INIT,
    HyperStream,
    mix_streams_reference,
)

RES_DIAG_INIT = 0.9  # H_res diagonal at init (the rest of each column spread evenly)


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` (..., n, n) onto the doubly stochastic matrices.

    Alternately normalises rows (dim -1) and columns (dim -2), in the log domain (the same iterates as
    dividing exp(logits) by its sums, without overflow). Columns are normalised last, so they sum to 1
    up to rounding; rows after ``iters`` iterations approximately. Computed in float32, or float64 for
    float64 logits.
    """
    log_p = logits.to(torch.promote_types(logits.dtype, torch.float32))
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp().to(logits.dtype)


SINKHORN_FLOOR = -700.0  # fast path: logits more than 700 nats below their row's maximum are raised to it


def sinkhorn_fast(logits: Tensor, iters: int) -> Tensor:
    """``sinkhorn`` through its scaling vectors, with a hand-written backward: the same iterates and the same
    derivative as the reference, a fraction of the work.

    Every Sinkhorn iterate is diag(r) P0 diag(c) with P0 = exp(logits): normalising the rows sets
    r = 1 / (P0 c), normalising the columns sets c = 1 / (P0^T r). Iterating on the vectors (n numbers per
    matrix instead of n^2: one mat-vec and one reciprocal per half-iteration, where the log domain spends a
    logsumexp of five ops on the whole matrix), then forming diag(r) P0 diag(c) once, gives the reference's
    result after the same number of iterations.

    Forward and backward are one ``torch.autograd.Function`` (``_SinkhornScaling``): the forward runs without
    autograd and keeps only P0 and the column scalings c_0..c_K; the backward is the exact reverse-mode
    derivative of the ``iters`` unrolled iterations (not the implicit-function gradient of the converged fixed
    point: near mHC's init the iteration contracts by only ~0.75 per step, and the derivative after 20
    iterations differs from the one after 400 by 3e-3 relative, measured at the init logits + 0.01 noise, while
    the values agree to 3e-6). Each iteration is a handful of small broadcast ops over all tokens at once (six
    in forward, about a dozen in backward), where autograd through the loop would record and replay ~10 nodes
    per half-iteration.

    Computed in float64 from exp(logits - rowmax) (the row shift cancels exactly in the first row
    normalisation, so it carries no gradient): exp() is exact to ~1e-16 down to e^-700, so the only departure
    from the log-domain reference is for logits more than 700 nats below their row's maximum (probability
    < 1e-304 of the row's largest), raised to that floor so that no column can sum to zero, and given zero
    gradient. Returns ``logits.dtype``.

    Under ``torch.compile`` it runs ``sinkhorn_traced`` instead: the same iterates written as plain tensor ops,
    which the compiler differentiates and fuses.
    """
    if torch.compiler.is_compiling():
        return sinkhorn_traced(logits, iters)
    return _SinkhornScaling.apply(logits, iters)


@torch.compiler.nested_compile_region
def sinkhorn_traced(logits: Tensor, iters: int) -> Tensor:
    """``sinkhorn_fast``'s computation for the compiler: the same scaling-vector iterates in float64 from
    exp(logits - rowmax) with the same floor, as plain ops on the tokens-first (..., n, n) layout, differentiated
    by autograd (AOTAutograd under compile).

    Why not trace ``_SinkhornScaling``: its preallocated ``out=`` stacks and in-place updates become copies
    once functionalised: compiled alone it ran 6x slower than eager (19.5 against 3.3 ms forward + backward
    for 1024 tokens, n = 4) after 43 s of compiling. This form compiles alone in ~18 s and runs in 1.8 ms. It is
    a nested compile region, compiled once and reused by every mHC sublayer: the first step of the connections
    bench's 4-block mHCx4 DiT, compiling included, takes 105 s against 301 s tracing the fast path (inductor's
    cache empty; the residual DiT's: 43 s). Eagerly it is the plain reference of the scaling iteration (autograd
    through the unrolled iterations; ``tests/connections/test_fast_paths.py``)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float64))
    x = x - x.amax(dim=-1, keepdim=True).detach()  # the row shift cancels in the first row normalisation
    # (..., n, n); entries clamped to the floor get zero gradient, as in the fast path
    p0 = x.clamp(min=SINKHORN_FLOOR).exp()
    r = 1.0 / p0.sum(-1, keepdim=True)  # (..., n, 1): rows of diag(r) P0 sum to 1 (c_0 = 1)
    c = 1.0 / (p0 * r).sum(-2, keepdim=True)  # (..., 1, n): then its columns
    for _ in range(iters - 1):
        r = 1.0 / (p0 * c).sum(-1, keepdim=True)
        c = 1.0 / (p0 * r).sum(-2, keepdim=True)
    return (p0 * r * c).to(logits.dtype)


class _SinkhornScaling(torch.autograd.Function):
    """Layout: tokens last. P0 is (n, n, T) with P0[i, j, t], a row scaling r is (n, 1, T), a column scaling c is
    (1, n, T), so a mat-vec over all T matrices is one broadcast multiply and one sum, contiguous along the
    tokens (about half the time of a batched bmm of T tiny matrices on CPU), and an outer product is one
    broadcast multiply-add.

    Per iteration the forward spends six small ops (multiply, sum, reciprocal, for rows then columns) and writes
    r_k and c_k into preallocated stacks (K, n, 1, T) and (K, 1, n, T) that the backward reads: it recomputes
    nothing. At these sizes (n^2 T = 8192 numbers) each op costs its dispatch (~3-5 us on CPU), not its
    arithmetic, so the op count is the cost: float32 would be no faster and is not used."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:  # (..., n, n) -> (..., n, n)
        n = logits.shape[-1]
        x = logits.detach().reshape(-1, n, n).permute(1, 2, 0)  # (n, n, T)
        x = x.to(torch.float64, memory_format=torch.contiguous_format)
        T = x.shape[-1]
        shifted = x - x.amax(dim=1, keepdim=True)
        kept = shifted > SINKHORN_FLOOR  # (n, n, T) where the gradient flows
        p0 = shifted.clamp_(min=SINKHORN_FLOOR).exp_()  # (n, n, T), contiguous
        rs = p0.new_empty(iters, n, 1, T)  # r_1..r_K
        cs = p0.new_empty(iters, 1, n, T)  # c_1..c_K (c_0 = 1)
        r_k, c_k = rs.unbind(0), cs.unbind(0)  # views, made once (indexing costs an op each time)
        prod = torch.empty_like(p0)
        torch.sum(p0, 1, keepdim=True, out=r_k[0])  # P0 c_0 with c_0 = 1
        for k in range(iters):
            if k:
                torch.sum(torch.mul(p0, c_k[k - 1], out=prod), 1, keepdim=True, out=r_k[k])
            r_k[k].reciprocal_()  # rows of diag(r) P0 diag(c) sum to 1
            torch.sum(torch.mul(p0, r_k[k], out=prod), 0, keepdim=True, out=c_k[k])
            c_k[k].reciprocal_()  # then its columns
        ctx.save_for_backward(p0, kept, rs, cs)
        ctx.views = r_k, c_k  # the stacks' per-iteration views, made once (each view is an op when made)
        out = prod.copy_(p0).mul_(rs[-1]).mul_(cs[-1]).permute(2, 0, 1)  # (T, n, n)
        # contiguous (T, n, n): a token-strided batch would send bmm down its one-matrix-at-a-time path
        return out.to(logits.dtype, memory_format=torch.contiguous_format).view(logits.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        """Reverse of the unrolled iterations. With u_k = P0^T r_k (c_k = 1/u_k) and v_k = P0 c_{k-1}
        (r_k = 1/v_k): dL/du_k = -c_k^2 dL/dc_k, dL/dr_k = P0 dL/du_k (+ the output's term at k = K),
        dL/dv_k = -r_k^2 dL/dr_k, dL/dc_{k-1} = P0^T dL/dv_k, and P0 collects r_k (dL/du_k)^T + (dL/dv_k) c_{k-1}^T.
        ``gu`` and ``w`` below hold -dL/du_k and -dL/dr_k (the signs cancel in pairs); eight small ops per
        iteration (two mat-vecs of two ops each, two scalings, two outer products accumulated in place)."""
        p0, kept, rs, cs = ctx.saved_tensors  # (n, n, T), (K, n, 1, T), (K, 1, n, T)
        K, n = rs.shape[0], p0.shape[0]
        g = grad.reshape(-1, n, n).permute(1, 2, 0)  # (n, n, T)
        g = g.to(torch.float64, memory_format=torch.contiguous_format)
        r, c = rs[-1], cs[-1]
        gp = g * p0
        grad_r = (gp * c).sum(1, keepdim=True)  # the output's dL/dr_K, (n, 1, T)
        grad_c = gp.mul_(r).sum(0, keepdim=True)  # dL/dc_K, (1, n, T)
        grad_p0 = g.mul_(r).mul_(c)  # the output's direct dL/dP0
        gus = torch.mul(cs, cs)  # c_k^2, overwritten below by -dL/du_k
        gvs = torch.mul(rs, rs)  # r_k^2, overwritten below by dL/dv_k
        gu_k, gv_k = gus.unbind(0), gvs.unbind(0)
        r_k, c_k = ctx.views
        prod = torch.empty_like(p0)
        for k in range(K - 1, -1, -1):  # iteration k + 1 of the forward
            gu = gu_k[k].mul_(grad_c)  # -dL/du = c^2 dL/dc
            w = torch.sum(torch.mul(p0, gu, out=prod), 1, keepdim=True)  # -dL/dr (iteration k + 1's part)
            if k == K - 1:
                w = w.sub_(grad_r)
            gv = gv_k[k].mul_(w)  # dL/dv = r^2 (-dL/dr)
            grad_p0.addcmul_(r_k[k], gu, value=-1.0)
            if k:
                grad_p0.addcmul_(gv, c_k[k - 1])
                grad_c = torch.sum(torch.mul(p0, gv, out=prod), 0, keepdim=True)  # dL/dc_{k}
            else:
                grad_p0.add_(gv)  # c_0 = 1
        grad_x = grad_p0.mul_(p0).masked_fill_(~kept, 0.0)  # through P0 = exp(x - rowmax)
        grad_x = grad_x.permute(2, 0, 1).to(grad.dtype, memory_format=torch.contiguous_format)
        return grad_x.view(grad.shape), None


RMS_EPS = 1e-6  # the RMSNorm's eps of the coefficient projection


class _ReadAndLogits(torch.autograd.Function):
    """mHC's work on the state before its branch, as one autograd node: the coefficient logits
    z = proj(x) / rms(x) (x the flattened state, (T, n D)); from them H_pre = sigmoid(a_pre z_pre + b_pre),
    H_post = 2 sigmoid(a_post z_post + b_post) and the Sinkhorn logits a_res z_res + b_res; and the sublayer
    input h0 = H_pre^T H. Its last output is the state itself (an alias, for ``_MixAndWrite``).

    Why one node: under autograd these are three consumers of the n-wide state (the norm, the projection, the
    read), each handing back its own (T, n, D) gradient that the engine then adds up, and the norm's backward
    alone spends three passes; the coefficients are some twenty small ops, each an autograd node. Here the
    backward writes the state's gradient once, ``c x + (dL/dz / rms) W + H_pre (dL/dh0)^T`` (c a per-token scalar
    from the norm), in three in-place passes, and the coefficients' derivatives are a dozen small ops.

    Why the alias: the write after the branch (``_MixAndWrite``) is the state's fourth consumer. It reads the
    alias, so its state gradient ``H_res (dL/dnew)`` arrives here as the alias's gradient, a tensor that only
    ``_MixAndWrite.backward`` made and nothing else holds; the three terms above are accumulated onto it in
    place, instead of into a second (T, n, D) tensor that the engine would add to the first.
    The formulas are the plain chain rule; ``tests/connections/test_fast_paths.py`` checks them against
    autograd through the reference path."""

    @staticmethod
    def forward(ctx, state, weight, pre_scale, pre_bias, post_scale, post_bias, res_scale, res_bias):
        T, n, D = state.shape
        x = state.view(T, n * D)
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / (n * D) + RMS_EPS)
        z = torch.mm(x, weight.t()).mul_(inv_rms)  # (T, 2n + n^2)
        pre = torch.sigmoid(torch.addcmul(pre_bias, z[:, :n], pre_scale))  # (T, n)
        post = torch.sigmoid(torch.addcmul(post_bias, z[:, n : 2 * n], post_scale)).mul_(2.0)  # (T, n)
        res_logits = torch.addcmul(res_bias.view(-1), z[:, 2 * n :], res_scale).view(T, n, n)  # (T, n, n)
        h0 = torch.bmm(pre.unsqueeze(1), state).squeeze(1)  # (T, D)
        ctx.save_for_backward(state, weight, pre_scale, post_scale, res_scale, z, inv_rms, pre, post)
        return h0, post, res_logits, state.view_as(state)

    @staticmethod
    def backward(ctx, grad_h0, grad_post, grad_res_logits, grad_alias):
        state, weight, pre_scale, post_scale, res_scale, z, inv_rms, pre, post = ctx.saved_tensors
        T, n, D = state.shape
        x = state.view(T, n * D)
        if grad_h0 is None:
            grad_h0 = state.new_zeros(T, D)
        grad_post = torch.zeros_like(post) if grad_post is None else grad_post
        grad_res = z.new_zeros(T, n * n) if grad_res_logits is None else grad_res_logits.reshape(T, n * n)
        # the read h0 = sum_i pre_i H_i; <H_i, dL/dh0> as a (1 x D) @ (D x n) product per token (the
        # (n x D) @ (D x 1) form is ~2.5x slower on CPU)
        grad_pre = torch.bmm(grad_h0.unsqueeze(1), state.transpose(1, 2)).squeeze(1)  # (T, n)
        d_pre = grad_pre.mul_(pre * (1 - pre))  # dL/d(a z_pre + b): sigmoid' = s (1 - s)
        d_post = grad_post * post * (1 - 0.5 * post)  # post = 2 s: d post / d(a z + b) = 2 s (1 - s)
        z_pre, z_post, z_res = z[:, :n], z[:, n : 2 * n], z[:, 2 * n :]
        grad_pre_scale = (d_pre * z_pre).sum().reshape(pre_scale.shape)
        grad_post_scale = (d_post * z_post).sum().reshape(post_scale.shape)
        grad_res_scale = (grad_res * z_res).sum().reshape(res_scale.shape)
        grad_z = torch.cat(
            [d_pre * pre_scale, d_post * post_scale, grad_res * res_scale], dim=1
        )  # (T, 2n + n^2)
        # z = (x W^T) s with s = (|x|^2 / (n D) + eps)^(-1/2): ds/dx = -s^3 x / (n D), dL/ds = sum_k dL/dz_k z_k / s
        grad_raw = grad_z.mul_(inv_rms)  # dL/d(x W^T)
        coef = (
            (grad_raw * z).sum(-1, keepdim=True).mul_(inv_rms / -(n * D))
        )  # (T, 1): (dL/dz . z) s^2 / -(n D)
        grad_weight = torch.mm(grad_raw.t(), x)
        if grad_alias is None or not grad_alias.is_contiguous():
            grad_state = torch.zeros_like(state) if grad_alias is None else grad_alias.contiguous()
        else:
            grad_state = grad_alias  # made by _MixAndWrite.backward alone: accumulated onto in place
        grad_state.view(T, n * D).addmm_(grad_raw, weight).addcmul_(x, coef)
        grad_state.baddbmm_(pre.unsqueeze(-1), grad_h0.unsqueeze(1))
        return (
            grad_state,
            grad_weight,
            grad_pre_scale,
            d_pre.sum(0),
            grad_post_scale,
            d_post.sum(0),
            grad_res_scale,
            grad_res.sum(0).view(n, n),
        )


class _MixAndWrite(torch.autograd.Function):
    """mHC's write after the branch, ``new = H_res^T H + H_post out^T`` per token ((T, n, D) from (T, n, n),
    (T, n, D), (T, n), (T, D)), as one node: one batched (n x n) @ (n x D) product and a rank-1 update in place.
    Its backward spends one batched product per input, each in the form that is fast on CPU: the reductions over
    D (dL/dH_res, dL/dH_post) as (rows x D) @ (D x n) products, where autograd's baddbmm backward takes the
    (n x D) @ (D x 1) form (~2.5x slower)."""

    @staticmethod
    def forward(ctx, state: Tensor, res: Tensor, post: Tensor, out: Tensor) -> Tensor:
        ctx.save_for_backward(state, res, post, out)
        mixed = torch.bmm(res.transpose(1, 2), state)  # (T, n, D)
        return mixed.baddbmm_(post.unsqueeze(-1), out.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad: Tensor):
        state, res, post, out = ctx.saved_tensors
        grad = grad.contiguous()
        grad_state = torch.bmm(res, grad)  # (T, n, D)
        grad_res = torch.bmm(state, grad.transpose(1, 2))  # (T, n, n): [i, j] = <H_i, dL/dnew_j>
        grad_post = torch.bmm(out.unsqueeze(1), grad.transpose(1, 2)).squeeze(1)  # (T, n)
        grad_out = torch.bmm(post.unsqueeze(1), grad).squeeze(1)  # (T, D)
        return grad_state, grad_res, grad_post, grad_out


class ManifoldHyperConnection(Connection):
    """One sublayer's mHC (docs/spec/connections.md, mHC).

    Parameters (state-dict names):
    - ``proj`` Linear(n D, n + n + n^2) without bias: output columns [W_pre | W_post | W_res (row-major i, j)];
    - ``pre_scale``, ``post_scale``, ``res_scale``: the scalars a (init 0.01);
    - ``pre_bias`` (n,), ``post_bias`` (n,), ``res_bias`` (n, n): the static parts b.
    """

    def __init__(self, dim: int, rate: int, index: int, sinkhorn_iters: int = 20):
        super().__init__()
        if rate < 2:
            raise ValueError("mHC needs rate >= 2 streams; for a single stream use kind='hc' with rate=1")
        self.dim, self.rate, self.index, self.sinkhorn_iters = dim, rate, index, sinkhorn_iters
        n = rate
        self.proj = nn.Linear(n * dim, 2 * n + n * n, bias=False)  # n D -> [pre | post | res]
        self.pre_scale = nn.Parameter(torch.empty(()))
        self.post_scale = nn.Parameter(torch.empty(()))
        self.res_scale = nn.Parameter(torch.empty(()))
        self.pre_bias = nn.Parameter(torch.empty(n))  # (n,)
        self.post_bias = nn.Parameter(torch.empty(n))  # (n,)
        self.res_bias = nn.Parameter(torch.empty(n, n))  # (n, n), [i, j]: stream i -> stream j
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Residual-equivalent, symmetry-breaking init; see the module docstring."""
        n, device = self.rate, self.pre_bias.device
        self.proj.weight.zero_()  # DiT's xavier init touches every nn.Linear: re-zero it
        for scale in (self.pre_scale, self.post_scale, self.res_scale):
            scale.fill_(DYNAMIC_SCALE_INIT)
        p = torch.full((n,), 0.5 / n, device=device)
        p[self.index % n] += 0.5  # sums to 1; stream k read most
        self.pre_bias.copy_(torch.logit(p))
        self.post_bias.zero_()
        c = math.log(RES_DIAG_INIT / (1 - RES_DIAG_INIT) * (n - 1))
        self.res_bias.copy_(c * torch.eye(n, device=device))

    def _logits(self, state: Tensor) -> Tensor:  # (B, L, n, D) -> (B, L, 2n + n^2)
        """proj(RMSNorm(x)) = proj(x) / rms(x) under autograd (``coefficients(fast=True)``; ``forward`` computes
        the same logits inside ``_ReadAndLogits``)."""
        x = state.flatten(-2)  # (B, L, n D)
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]  # (B, L, 1)
        return self.proj(x) * torch.rsqrt(mean_square + RMS_EPS)

    def _logits_reference(self, state: Tensor) -> Tensor:
        return self.proj(F.rms_norm(state.flatten(-2), (self.rate * self.dim,), eps=RMS_EPS))

    def coefficients(self, state: Tensor, fast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(H_pre (B, L, n), H_res (B, L, n, n), H_post (B, L, n)) for ``state`` (B, L, n, D).

        ``fast``: the RMSNorm folded behind the projection and Sinkhorn in ``sinkhorn_fast``; otherwise the
        plain formula: RMSNorm, projection, autograd through the log-domain ``sinkhorn`` (the reference)."""
        n = self.rate
        z = self._logits(state) if fast else self._logits_reference(state)
        pre = torch.sigmoid(self.pre_scale * z[..., :n] + self.pre_bias)
        post = 2 * torch.sigmoid(self.post_scale * z[..., n : 2 * n] + self.post_bias)
        res_logits = self.res_scale * z[..., 2 * n :].unflatten(-1, (n, n)) + self.res_bias
        project = sinkhorn_fast if fast else sinkhorn
        return pre, project(res_logits, self.sinkhorn_iters), post

    @stream_in_state_dtype
    def forward(self, state: Tensor, branch: Branch) -> Tensor:  # (B, L, n, D) -> (B, L, n, D)
        """The fast path: everything read from the state before the branch (RMS, projection, the coefficients, the
        read) in one node, ``_ReadAndLogits``, then Sinkhorn, then the mix and write in one node,
        ``_MixAndWrite``, whose state gradient the first node accumulates onto.

        Under ``torch.compile`` the plain formula instead (the reference's einsums, with the RMS norm folded behind
        the projection and ``sinkhorn_traced``): the compiler fuses it. A compiled mHCx4 DiT's step ran 1.38x the
        compiled dense DiT's, against 1.46x tracing the two nodes (one interleaved run, ``bench/train_step.py``'s
        default shapes)."""
        if torch.compiler.is_compiling():
            return mix_streams_reference(state, *self.coefficients(state, fast=True), branch)
        *lead, n, D = state.shape
        flat = state.reshape(-1, n, D).contiguous()  # (T, n, D); a copy only of the expanded first state
        h0, post, res_logits, alias = _ReadAndLogits.apply(
            flat,
            self.proj.weight,
            self.pre_scale,
            self.pre_bias,
            self.post_scale,
            self.post_bias,
            self.res_scale,
            self.res_bias,
        )  # (T, D), (T, n), (T, n, n), (T, n, D)
        res = sinkhorn_fast(res_logits, self.sinkhorn_iters)  # (T, n, n)
        out = branch(h0.view(*lead, D))  # (B, L, D)
        return _MixAndWrite.apply(alias, res, post, out.reshape(-1, D)).view(state.shape)

    @stream_in_state_dtype
    def reference_forward(self, state: Tensor, branch: Branch) -> Tensor:
        """The plain path: log-domain Sinkhorn under autograd, einsum read/mix/write."""
        return mix_streams_reference(state, *self.coefficients(state, fast=False), branch)

    def flops(self, num_tokens: int) -> int:
        """Per token: projection n D (n^2 + 2n), read/mix/write n (n + 2) D, Sinkhorn 2 iters n^2."""
        n, D = self.rate, self.dim
        per_token = n * D * (n * n + 2 * n) + n * (n + 2) * D + 2 * self.sinkhorn_iters * n * n
        return num_tokens * per_token

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rate={self.rate}, index={self.index}, sinkhorn_iters={self.sinkhorn_iters}"


def build_stream(cfg: ConnectionConfig, dim: int) -> Stream:
    return HyperStream(cfg.rate)


def build_connection(cfg: ConnectionConfig, dim: int, layer_index: int, sublayer_index: int) -> Connection:
    return ManifoldHyperConnection(dim, cfg.rate, 2 * layer_index + sublayer_index, cfg.sinkhorn_iters)


__all__ = [
    "ManifoldHyperConnection",
    "build_connection",
    "build_stream",
    "sinkhorn",
    "sinkhorn_fast",
    "sinkhorn_traced",
]
