"""Frac-connections (Zhu et al., arXiv 2503.14125): the residual stream split into m fractions.

docs/spec/connections.md, "Frac-connections (FC), m fractions". Instead of n copies, the width-D stream is
viewed as m fractions of width D/m: ``H = reshape(h, (m, D/m))``. The state stays (B, L, D), so the
model-level stream is the plain one (no expand, no collapse). Per sublayer:

    h0      = concat_j ( sum_i Y[i, j] * H_i )                     (B, L, D)
    T_out   = reshape(T(h0), (m, D/m))
    H_j    <- B[j] * T_out_j + sum_i A[i, j] * H_i

Static FC learns Y (m, m), A (m, m), B (m,). Dynamic FC adds per-token terms like dynamic HC, one per
fraction: with Hn = LayerNorm(H) over D/m, a projection (D/m) -> 2m gives row i of Y and of A from
fraction i, and (D/m) -> 1 gives B[i]; scaled by s_a, s_b after an optional tanh.

Initialisation: W = 0, s = 0.01, Y = A = I, B = 1. Then h0 = h and H <- T(h) + H: exactly the
pre-norm residual network, with no scale factor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from racedit.connections.base import Branch, Connection, Stream
from racedit.connections.config import ConnectionConfig
from racedit.connections.hyper import DYNAMIC_SCALE_INIT


class FracConnection(Connection):
    """One sublayer's frac-connection, static or dynamic (docs/spec/connections.md, FC).

    Parameters (state-dict names):
    - ``static_pre``  (m, m)  Y[i, j]: how much of fraction i goes into fraction j of the sublayer input;
    - ``static_res``  (m, m)  A[i, j]: how much of fraction i goes to fraction j of the new stream;
    - ``static_post`` (m,)    B: the weight of the sublayer output's fraction j in the new fraction j;
    - dynamic only: ``dynamic_proj`` Linear(D/m, 2m + 1) without bias, output columns [Y row | A row | B],
      ``dynamic_alpha_scale`` s_a and ``dynamic_beta_scale`` s_b (scalars).
    """

    def __init__(self, dim: int, rate: int, dynamic: bool = False, tanh: bool = True):
        super().__init__()
        if dim % rate:
            raise ValueError(
                f"frac-connections split the width into m = {rate} fractions, but hidden_size {dim} is not "
                f"divisible by {rate}; choose a rate that divides the hidden size"
            )
        self.dim, self.rate, self.dynamic, self.use_tanh = dim, rate, dynamic, tanh
        m = rate
        self.static_pre = nn.Parameter(torch.empty(m, m))  # (m, m) Y
        self.static_res = nn.Parameter(torch.empty(m, m))  # (m, m) A
        self.static_post = nn.Parameter(torch.empty(m))  # (m,)   B
        if dynamic:
            self.norm = nn.LayerNorm(dim // m, elementwise_affine=False, eps=1e-6)
            self.dynamic_proj = nn.Linear(dim // m, 2 * m + 1, bias=False)  # D/m -> [Y row | A row | B]
            self.dynamic_alpha_scale = nn.Parameter(torch.empty(()))  # s_a
            self.dynamic_beta_scale = nn.Parameter(torch.empty(()))  # s_b
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Identity init (docs/spec/connections.md): Y = A = I, B = 1, W = 0, s = 0.01."""
        eye = torch.eye(self.rate, device=self.static_pre.device)
        self.static_pre.copy_(eye)
        self.static_res.copy_(eye)
        self.static_post.fill_(1.0)
        if self.dynamic:
            self.dynamic_proj.weight.zero_()  # DiT's xavier init touches every nn.Linear: re-zero it
            self.dynamic_alpha_scale.fill_(DYNAMIC_SCALE_INIT)
            self.dynamic_beta_scale.fill_(DYNAMIC_SCALE_INIT)

    def coefficients(self, fractions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(Y, A, B) for ``fractions`` (B, L, m, D/m): static (m, m), (m, m), (m,) or per token
        (B, L, m, m), (B, L, m, m), (B, L, m)."""
        if not self.dynamic:
            return self.static_pre, self.static_res, self.static_post
        m = self.rate
        z = self.dynamic_proj(self.norm(fractions))  # (B, L, m, 2m + 1); row i from fraction i
        if self.use_tanh:
            z = torch.tanh(z)
        pre = self.dynamic_alpha_scale * z[..., :m] + self.static_pre  # (B, L, m, m)
        res = self.dynamic_alpha_scale * z[..., m : 2 * m] + self.static_res  # (B, L, m, m)
        post = self.dynamic_beta_scale * z[..., 2 * m] + self.static_post  # (B, L, m)
        return pre, res, post

    def forward(self, state: Tensor, branch: Branch) -> Tensor:  # (B, L, D) -> (B, L, D)
        """Read and mix as one batched (m x m) @ (m x D/m) product over the tokens each (static: the one
        matrix broadcast to every token as a stride-0 batch, which a broadcasting ``matmul`` would instead
        turn into two transposing copies of the stream around a K = m GEMM); the write accumulated in place
        onto the mix (no pass per fraction)."""
        m, F = self.rate, self.dim // self.rate
        H = state.reshape(-1, m, F)  # (T, m, D/m), T = B L tokens
        pre, res, post = self.coefficients(H)
        T = H.shape[0]
        h0 = torch.bmm(pre.transpose(-1, -2).expand(T, m, m), H)  # (T, m, D/m)
        out = branch(h0.view(state.shape)).view(T, m, F)  # (T, m, D/m)
        mixed = torch.bmm(res.transpose(-1, -2).expand(T, m, m), H)  # bmm's backward reads only its inputs
        return mixed.addcmul_(post.unsqueeze(-1), out).view(state.shape)

    def reference_forward(self, state: Tensor, branch: Branch) -> Tensor:
        """The plain einsum formula (docs/spec/connections.md, FC)."""
        m = self.rate
        H = state.unflatten(-1, (m, self.dim // m))  # (B, L, m, D/m)
        pre, res, post = self.coefficients(H)
        h0 = torch.einsum("...if,...ij->...jf", H, pre).flatten(-2)  # (B, L, D)
        out = branch(h0).unflatten(-1, (m, self.dim // m))  # (B, L, m, D/m)
        mixed = torch.einsum("...if,...ij->...jf", H, res)  # (B, L, m, D/m)
        return (mixed + post.unsqueeze(-1) * out).flatten(-2)

    def flops(self, num_tokens: int) -> int:
        """Per token: m D (read mix) + m D (residual mix) + D (write); dynamic adds D (2m + 1)."""
        m, D = self.rate, self.dim
        per_token = (2 * m + 1) * D + ((2 * m + 1) * D if self.dynamic else 0)
        return num_tokens * per_token

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rate={self.rate}, dynamic={self.dynamic}, tanh={self.use_tanh}"


def build_stream(cfg: ConnectionConfig, dim: int) -> Stream:
    """Frac-connections keep the plain (B, L, D) stream; the fractions are a view inside each sublayer."""
    if dim % cfg.rate:
        raise ValueError(
            f"frac-connections need hidden_size divisible by m; got hidden_size {dim}, m = {cfg.rate}"
        )
    return Stream()


def build_connection(cfg: ConnectionConfig, dim: int, layer_index: int, sublayer_index: int) -> Connection:
    return FracConnection(dim, cfg.rate, cfg.dynamic, cfg.tanh)


__all__ = ["FracConnection", "build_connection", "build_stream"]
