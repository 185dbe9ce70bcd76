"""Hyper-connections (Zhu et al., ICLR 2025, arXiv 2409.19606): n copies of the residual stream.

docs/spec/connections.md, "HC". The state is ``H`` of shape (B, L, n, D).
Each sublayer T reads a weighted sum of the streams and writes its output back to every stream,
while the streams are mixed among themselves:

    h0  = sum_i A_m[i] * H_i                              (the sublayer input,   paper eq. 2)
    H_j <- B[j] * T(h0) + sum_i A_r[i, j] * H_i          (the new streams,      paper eq. 3-5)

Static HC learns A_m (n,), A_r (n, n), B (n,) per sublayer. Dynamic HC adds per-token terms computed
from the LayerNorm-ed streams (paper eq. 10-13):

    A_m = s_a * tanh(Hn W_m) + A_m_static,   A_r = s_a * tanh(Hn W_r) + A_r_static,
    B   = s_b * tanh(Hn W_b) + B_static.

Initialisation (paper section 3.3): W = 0, s_a = s_b = 0.01, B = 1, A_r = I, A_m = e_{k mod n} with k
the index of the sublayer in the network (``2 * block + sublayer``: the paper numbers every attention
and every FFN as its own layer T^k). Then all n streams hold the same vector at every depth, each
sublayer reads exactly that vector, and the network is the pre-norm residual network.

Collapse. The spec sums the streams before the final layer and relies on the final LayerNorm to cancel
the factor n. It cancels only up to the LayerNorm eps: LN_eps(n x) = LN_{eps/n^2}(x), a relative change
of about eps (1 - 1/n^2) / (2 var(x)) that grows where a token's variance is small. ``HyperStream``
therefore collapses with the *mean* of the streams, which equals the residual stream exactly at init
(a fixed 1/n that the following LayerNorm would remove anyway, so nothing is lost in expressiveness).

Layout and speed (docs/design.md, "Connections: layout, fast paths, and the hyper-connection init"). The
update is memory-bound: its FLOPs are a few per element, so its cost is the number of passes over the n-copy
state. Static HC keeps the state stream-major, ``(n, B, L, D)``: then the read is one (1 x n) @ (n x BLD)
product and the mix plus write is one (n x n) @ (n x BLD) GEMM followed by an in-place rank-1 update, and
autograd saves only the state itself (the GEMMs' backward reads it). Dynamic HC has per-token coefficients and
keeps the token-major ``(B, L, n, D)`` layout, where read and mix are batched (1 x n) and (n x n) products per
token. Both paths have the plain einsum formula beside them (``reference_forward``), tested to agree in values
and gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from racedit.connections.base import Branch, Connection, Stream, stream_in_state_dtype
from racedit.connections.config import ConnectionConfig

DYNAMIC_SCALE_INIT = 0.01  # s_a = s_b at init (paper section 3.3)


class HyperStream(Stream):
    """n copies of the stream: expand (B, L, D) -> state; collapse by the mean over streams.

    The state is ``(B, L, n, D)`` (token-major), or ``(n, B, L, D)`` with ``streams_first`` (static HC)."""

    def __init__(self, rate: int, streams_first: bool = False):
        super().__init__()
        self.rate, self.streams_first = rate, streams_first

    def expand(self, h: Tensor) -> Tensor:  # (B, L, D) -> (B, L, n, D) or (n, B, L, D)
        if self.streams_first:
            return h.unsqueeze(0).expand(self.rate, *h.shape)
        return h.unsqueeze(-2).expand(*h.shape[:-1], self.rate, h.shape[-1])

    def collapse(self, state: Tensor) -> Tensor:  # state -> (B, L, D)
        axis = 0 if self.streams_first else -2
        if state.shape[axis] != self.rate:
            where = f"({self.rate}, ..., D)" if self.streams_first else f"(..., {self.rate}, D)"
            raise ValueError(f"expected a stream state {where}, got {tuple(state.shape)}")
        return state.mean(dim=axis)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, streams_first={self.streams_first}"


def recompute_in_backward(fn, state: Tensor) -> Tensor:
    """``fn(state)`` whose intermediates are recomputed in backward instead of saved: for the coefficient
    projections of dynamic HC and mHC, whose normalised input is n copies of the stream wide while their
    output is n + 2 (or n^2 + 2n) numbers per token. Costs one more normalisation + projection in backward."""
    if not torch.is_grad_enabled():
        return fn(state)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, state, use_reentrant=False)


def mix_streams(state: Tensor, pre: Tensor, res: Tensor, post: Tensor, branch: Branch) -> Tensor:
    """The HC/mHC update on a token-major state (B, L, n, D) with per-token (or broadcast) coefficients
    pre (..., n), res (..., n, n), post (..., n): batched matrix products, no pass per stream.

    h0 = pre^T H (one (1 x n) @ (n x D) product per token); new = res^T H + post out^T (one batched
    (n x n) @ (n x D) product, then the rank-1 write accumulated onto it in place by one batched (n x 1) @ (1 x D)
    product). Every term's backward is then a batched product too (the gradients of post and out are
    reductions over D and over the streams, which an elementwise multiply-and-sum would spend two passes on)."""
    *lead, n, D = state.shape
    if res.dim() == 2:  # static: one (n x n) matrix for every token
        h0 = torch.matmul(pre.unsqueeze(-2), state).squeeze(-2)  # (B, L, D)
        out = branch(h0)  # (B, L, D)
        mixed = torch.matmul(res.t(), state)  # (B, L, n, D)
        # In place on the product (its backward does not read its output): no separate write tensor.
        return mixed.addcmul_(post.unsqueeze(-1), out.unsqueeze(-2))
    flat = state.reshape(-1, n, D)  # (T, n, D), T = B L tokens
    h0 = torch.bmm(pre.reshape(-1, 1, n), flat).view(*lead, D)  # (B, L, D)
    out = branch(h0)  # (B, L, D)
    mixed = torch.bmm(res.reshape(-1, n, n).transpose(-1, -2), flat)  # (T, n, D)
    # In place on the product (bmm's backward reads its inputs, not its output): no separate write tensor.
    mixed.baddbmm_(post.reshape(-1, n, 1), out.reshape(-1, 1, D))
    return mixed.view(*lead, n, D)


def mix_streams_reference(state: Tensor, pre: Tensor, res: Tensor, post: Tensor, branch: Branch) -> Tensor:
    """The plain formula of ``mix_streams`` (docs/spec/connections.md): h0 = sum_i pre_i H_i,
    H_j <- post_j T(h0) + sum_i res_ij H_i, as einsums over the token-major state (B, L, n, D)."""
    h0 = torch.einsum("...nd,...n->...d", state, pre)  # (B, L, D)
    out = branch(h0)  # (B, L, D)
    mixed = torch.einsum("...id,...ij->...jd", state, res)  # (B, L, n, D)
    return mixed + post.unsqueeze(-1) * out.unsqueeze(-2)


class HyperConnection(Connection):
    """One sublayer's hyper-connection, static or dynamic (docs/spec/connections.md, HC).

    Parameters (names as they appear in a state dict, e.g. ``blocks.3.conn_mlp.static_res``):
    - ``static_pre``  (n,)    A_m: how much of each stream the sublayer reads;
    - ``static_res``  (n, n)  A_r[i, j]: how much of stream i goes to stream j;
    - ``static_post`` (n,)    B: how much of the sublayer output each stream receives;
    - dynamic only: ``dynamic_proj`` Linear(D, n + 2) without bias, its output columns being
      [W_m | W_r (n columns) | W_b]; ``dynamic_alpha_scale`` s_a and ``dynamic_beta_scale`` s_b (scalars).
    """

    def __init__(
        self,
        dim: int,
        rate: int,
        index: int,
        dynamic: bool = False,
        tanh: bool = True,
        streams_first: bool = False,
        output_init_gain: float = 1.0,
    ):
        super().__init__()
        if streams_first and dynamic:
            raise ValueError("the streams-first layout is for static HC; dynamic HC mixes per token")
        self.dim, self.rate, self.index = dim, rate, index
        self.dynamic, self.use_tanh, self.streams_first = dynamic, tanh, streams_first
        self.output_init_gain = output_init_gain
        n = rate
        self.static_pre = nn.Parameter(torch.empty(n))  # (n,)    A_m
        self.static_res = nn.Parameter(torch.empty(n, n))  # (n, n)  A_r
        self.static_post = nn.Parameter(torch.empty(n))  # (n,)    B
        if dynamic:
            self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.dynamic_proj = nn.Linear(dim, n + 2, bias=False)  # D -> [m | r_1..r_n | b]
            self.dynamic_alpha_scale = nn.Parameter(torch.empty(()))  # s_a
            self.dynamic_beta_scale = nn.Parameter(torch.empty(()))  # s_b
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Identity init (docs/spec/connections.md): A_m = e_{k mod n}, A_r = I, B = 1, W = 0, s = 0.01."""
        n = self.rate
        self.static_pre.zero_()
        self.static_pre[self.index % n] = 1.0
        self.static_res.copy_(torch.eye(n, device=self.static_res.device))
        self.static_post.fill_(1.0)
        if self.dynamic:
            self.dynamic_proj.weight.zero_()  # DiT's xavier init touches every nn.Linear: re-zero it
            self.dynamic_alpha_scale.fill_(DYNAMIC_SCALE_INIT)
            self.dynamic_beta_scale.fill_(DYNAMIC_SCALE_INIT)

    def coefficients(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(A_m, A_r, B) for ``state`` (B, L, n, D): static (n,), (n, n), (n,) or per token
        (B, L, n), (B, L, n, n), (B, L, n)."""
        if not self.dynamic:
            return self.static_pre, self.static_res, self.static_post
        z = recompute_in_backward(self._dynamic_logits, state)  # (B, L, n, n + 2); row i from stream i
        n = self.rate
        pre = self.dynamic_alpha_scale * z[..., 0] + self.static_pre  # (B, L, n)
        res = self.dynamic_alpha_scale * z[..., 1 : n + 1] + self.static_res  # (B, L, n, n)
        post = self.dynamic_beta_scale * z[..., n + 1] + self.static_post  # (B, L, n)
        return pre, res, post

    def _dynamic_logits(self, state: Tensor) -> Tensor:  # (B, L, n, D) -> (B, L, n, n + 2)
        z = self.dynamic_proj(self.norm(state))
        return torch.tanh(z) if self.use_tanh else z

    @stream_in_state_dtype
    def forward(self, state: Tensor, branch: Branch) -> Tensor:  # state -> state, same layout
        if not self.streams_first:  # (B, L, n, D)
            return mix_streams(state, *self.coefficients(state), branch)
        n = self.rate
        flat = state.reshape(n, -1)  # (n, B L D): a view of the stream-major state
        h0 = torch.matmul(self.static_pre, flat).view(state.shape[1:])  # (B, L, D)
        out = branch(h0)  # (B, L, D)
        # One GEMM mixes the streams; the write is a rank-1 update in place (mm's backward reads its inputs).
        new = torch.mm(self.static_res.t(), flat).addr_(self.static_post, out.reshape(-1))  # (n, B L D)
        return new.view(state.shape)

    @stream_in_state_dtype
    def reference_forward(self, state: Tensor, branch: Branch) -> Tensor:
        """The plain einsum formula (docs/spec/connections.md), in the same layout as ``forward``."""
        if not self.streams_first:
            return mix_streams_reference(state, *self.coefficients(state), branch)
        token_major = state.movedim(0, -2)  # (B, L, n, D)
        new = mix_streams_reference(token_major, *self.coefficients(token_major), branch)
        return new.movedim(-2, 0)

    def flops(self, num_tokens: int) -> int:
        """Read n D, mix n^2 D, write n D multiply-adds per token; dynamic adds the n x D x (n + 2) projection."""
        n, D = self.rate, self.dim
        per_token = n * (n + 2) * D + (n * D * (n + 2) if self.dynamic else 0)
        return num_tokens * per_token

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, rate={self.rate}, index={self.index}, dynamic={self.dynamic}, "
            f"tanh={self.use_tanh}, streams_first={self.streams_first}"
        )


def build_stream(cfg: ConnectionConfig, dim: int) -> Stream:
    """All n streams start as copies of the patch embedding; static HC keeps them stream-major."""
    return HyperStream(cfg.rate, streams_first=not cfg.dynamic)


def build_connection(cfg: ConnectionConfig, dim: int, layer_index: int, sublayer_index: int) -> Connection:
    """Sublayer k = 2 * layer + sublayer reads stream k mod n at init; its output projection's initial std is
    scaled by sqrt(n) (the paper's init; ``cfg.scale_output_init``)."""
    return HyperConnection(
        dim,
        cfg.rate,
        2 * layer_index + sublayer_index,
        cfg.dynamic,
        cfg.tanh,
        streams_first=not cfg.dynamic,
        output_init_gain=math.sqrt(cfg.rate) if cfg.scale_output_init else 1.0,
    )


__all__ = [
    "HyperConnection",
    "HyperStream",
    "build_connection",
    "build_stream",
    "mix_streams",
    "mix_streams_reference",
]
