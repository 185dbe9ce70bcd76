"""Hyper-connections (Zhu et al., ICLR 2025, arXiv 2409.19606): n copies of the residual stream.

connections.md, "Hyper-connections (HC), expansion rate n". The state is ``H`` of shape (B, L, n, D).
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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from racedit.connections.base import Branch, Connection, Stream
from racedit.connections.config import ConnectionConfig

DYNAMIC_SCALE_INIT = 0.01  # s_a = s_b at init (paper section 3.3)


class HyperStream(Stream):
    """n copies of the stream: expand (B, L, D) -> (B, L, n, D); collapse by the mean over streams."""

    def __init__(self, rate: int):
        super().__init__()
        self.rate = rate

    def expand(self, h: Tensor) -> Tensor:  # (B, L, D) -> (B, L, n, D)
        return h.unsqueeze(-2).expand(*h.shape[:-1], self.rate, h.shape[-1])

    def collapse(self, state: Tensor) -> Tensor:  # (B, L, n, D) -> (B, L, D)
        if state.shape[-2] != self.rate:
            raise ValueError(f"expected a stream state (..., {self.rate}, D), got {tuple(state.shape)}")
        return state.mean(dim=-2)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class HyperConnection(Connection):
    """One sublayer's hyper-connection, static or dynamic (connections.md, HC).

    Parameters (names as they appear in a state dict, e.g. ``blocks.3.conn_mlp.static_res``):
    - ``static_pre``  (n,)    A_m: how much of each stream the sublayer reads;
    - ``static_res``  (n, n)  A_r[i, j]: how much of stream i goes to stream j;
    - ``static_post`` (n,)    B: how much of the sublayer output each stream receives;
    - dynamic only: ``dynamic_proj`` Linear(D, n + 2) without bias, its output columns being
      [W_m | W_r (n columns) | W_b]; ``dynamic_alpha_scale`` s_a and ``dynamic_beta_scale`` s_b (scalars).
    """

    def __init__(self, dim: int, rate: int, index: int, dynamic: bool = False, tanh: bool = True):
        super().__init__()
        self.dim, self.rate, self.index = dim, rate, index
        self.dynamic, self.use_tanh = dynamic, tanh
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
        """Identity init (connections.md): A_m = e_{k mod n}, A_r = I, B = 1, W = 0, s = 0.01."""
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
        z = self.dynamic_proj(self.norm(state))  # (B, L, n, n + 2); row i is computed from stream i
        if self.use_tanh:
            z = torch.tanh(z)
        n = self.rate
        pre = self.dynamic_alpha_scale * z[..., 0] + self.static_pre  # (B, L, n)
        res = self.dynamic_alpha_scale * z[..., 1 : n + 1] + self.static_res  # (B, L, n, n)
        post = self.dynamic_beta_scale * z[..., n + 1] + self.static_post  # (B, L, n)
        return pre, res, post

    def forward(self, state: Tensor, branch: Branch) -> Tensor:  # (B, L, n, D) -> (B, L, n, D)
        pre, res, post = self.coefficients(state)
        h0 = torch.einsum("...nd,...n->...d", state, pre)  # (B, L, D)
        out = branch(h0)  # (B, L, D)
        mixed = torch.einsum("...id,...ij->...jd", state, res)  # (B, L, n, D)
        return mixed + post.unsqueeze(-1) * out.unsqueeze(-2)

    def flops(self, num_tokens: int) -> int:
        """Read n D, mix n^2 D, write n D multiply-adds per token; dynamic adds the n x D x (n + 2) projection."""
        n, D = self.rate, self.dim
        per_token = n * (n + 2) * D + (n * D * (n + 2) if self.dynamic else 0)
        return num_tokens * per_token

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rate={self.rate}, index={self.index}, dynamic={self.dynamic}, tanh={self.use_tanh}"


def build_stream(cfg: ConnectionConfig, dim: int) -> Stream:
    """All n streams start as copies of the patch embedding."""
    return HyperStream(cfg.rate)


def build_connection(cfg: ConnectionConfig, dim: int, layer_index: int, sublayer_index: int) -> Connection:
    """Sublayer k = 2 * layer + sublayer reads stream k mod n at init."""
    return HyperConnection(dim, cfg.rate, 2 * layer_index + sublayer_index, cfg.dynamic, cfg.tanh)


__all__ = ["HyperConnection", "HyperStream", "build_connection", "build_stream"]
