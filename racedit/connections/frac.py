"""Frac-connections (Zhu et al., arXiv 2503.14125): the residual stream split into m fractions.

docs/spec/connections.md, "FC". Instead of n copies, the width-D stream is
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

Layout and speed (docs/design.md, "Connections: layout, fast paths, and the hyper-connection init"). Static FC
keeps the stream fraction-major, ``(m, B, L, D/m)`` (``FracStream``), as static HC keeps its streams first:
then the read and the mix are each one (m x m) @ (m x B L D/m) GEMM, and so are their backward products,
including the gradients of Y and A (in the token-major layout these are T batched (m x D/m) @ (D/m x m)
products summed over the tokens). The price is one transposing copy of the sublayer input h0 (and of its
gradient) into the token-major (B, L, D) that the branch takes. Dynamic FC has per-token coefficients and
keeps the token-major ``(B, L, D)`` state.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from racedit.connections.base import Branch, Connection, Stream, stream_in_state_dtype
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

    def __init__(
        self, dim: int, rate: int, dynamic: bool = False, tanh: bool = True, fractions_first: bool = False
    ):
        super().__init__()
        if fractions_first and dynamic:
            raise ValueError("the fraction-major layout is for static FC; dynamic FC mixes per token")
        if dim % rate:
            raise ValueError(
                f"frac-connections split the width into m = {rate} fractions, but hidden_size {dim} is not "
                f"divisible by {rate}; choose a rate that divides the hidden size"
            )
        self.dim, self.rate, self.dynamic, self.use_tanh = dim, rate, dynamic, tanh
        self.fractions_first = fractions_first
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

    @stream_in_state_dtype
    def forward(self, state: Tensor, branch: Branch) -> Tensor:  # state -> state, same layout
        """Token-major (B, L, D): read and mix as one batched (m x m) @ (m x D/m) product over the tokens each
        (static: the one matrix broadcast to every token as a stride-0 batch, which a broadcasting ``matmul`` would
        instead turn into two transposing copies of the stream around a K = m GEMM); the write accumulated in
        place onto the mix (no pass per fraction). Fraction-major (m, B, L, D/m): read and mix are one GEMM each."""
        if self.fractions_first:
            return self._forward_fractions_first(state, branch)
        m, F = self.rate, self.dim // self.rate
        H = state.reshape(-1, m, F)  # (T, m, D/m), T = B L tokens
        pre, res, post = self.coefficients(H)
        T = H.shape[0]
        h0 = torch.bmm(pre.transpose(-1, -2).expand(T, m, m), H)  # (T, m, D/m)
        out = branch(h0.view(state.shape)).view(T, m, F)  # (T, m, D/m)
        mixed = torch.bmm(res.transpose(-1, -2).expand(T, m, m), H)  # bmm's backward reads only its inputs
        return mixed.addcmul_(post.unsqueeze(-1), out).view(state.shape)

    def _forward_fractions_first(self, state: Tensor, branch: Branch) -> Tensor:  # (m, B, L, D/m)
        m = self.rate
        flat = state.reshape(m, -1)  # (m, B L D/m): a view of the fraction-major state
        h0, alias = _FracRead.apply(flat, self.static_pre, state.shape[1:3])  # (B, L, D), (m, B L D/m)
        out = branch(h0)  # (B, L, D)
        new = _FracWrite.apply(alias, self.static_res, self.static_post, out)  # (m, B L D/m)
        return new.view(state.shape)

    @stream_in_state_dtype
    def reference_forward(self, state: Tensor, branch: Branch) -> Tensor:
        """The plain einsum formula (docs/spec/connections.md, FC), in the same layout as ``forward``."""
        if not self.fractions_first:
            return self._reference_token_major(state, branch)
        token_major = state.permute(1, 2, 0, 3).flatten(-2)  # (m, B, L, D/m) -> (B, L, D)
        new = self._reference_token_major(token_major, branch)
        return new.unflatten(-1, (self.rate, -1)).permute(2, 0, 1, 3)

    def _reference_token_major(self, state: Tensor, branch: Branch) -> Tensor:  # (B, L, D) -> (B, L, D)
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
        return (
            f"dim={self.dim}, rate={self.rate}, dynamic={self.dynamic}, tanh={self.use_tanh}, "
            f"fractions_first={self.fractions_first}"
        )


class _FracRead(torch.autograd.Function):
    """Static FC's read on the fraction-major state, h0 = Y^T H: one (m x m) @ (m x T D/m) GEMM, then one
    transposing copy into the token-major (T, m, D/m) that the branch takes. Its second output is the state itself
    (an alias, for ``_FracWrite``): the write's state gradient A dL/dnew arrives here as the alias's gradient, a
    tensor only ``_FracWrite.backward`` made, and the read's term Y dL/dh0 is accumulated onto it in place (one
    addmm) instead of into a second tensor that the engine would add to the first. Tested against the einsum
    formula (``reference_forward``) in values and gradients."""

    @staticmethod
    def forward(ctx, flat: Tensor, pre: Tensor, lead: torch.Size):  # (m, T F), (m, m) -> (B, L, D), alias
        m = flat.shape[0]
        ctx.save_for_backward(flat, pre)
        h0 = torch.mm(pre.t(), flat).view(m, *lead, -1)  # (m, B, L, F)
        return h0.permute(1, 2, 0, 3).reshape(*lead, -1), flat.view_as(flat)

    @staticmethod
    def backward(ctx, grad_h0: Tensor | None, grad_alias: Tensor | None):
        flat, pre = ctx.saved_tensors
        m = flat.shape[0]
        if grad_alias is None or not grad_alias.is_contiguous():
            grad_flat = torch.zeros_like(flat) if grad_alias is None else grad_alias.contiguous()
        else:
            grad_flat = grad_alias  # made by _FracWrite.backward alone: accumulated onto in place
        if grad_h0 is None:  # a branch that ignores its input
            return grad_flat, torch.zeros_like(pre), None
        grad_h0 = (
            grad_h0.reshape(-1, m, grad_h0.shape[-1] // m).transpose(0, 1).reshape(m, -1)
        )  # (m, T F): a copy
        grad_pre = torch.mm(flat, grad_h0.t())  # [i, j] = <H_i, dL/dh0_j>
        return grad_flat.addmm_(pre, grad_h0), grad_pre, None


class _FracWrite(torch.autograd.Function):
    """Static FC's mix and write on the fraction-major state, new_j = sum_i A[i, j] H_i + B[j] out_j: one GEMM
    and one in-place multiply-add of the token-major branch output (T, m, D/m), read transposed. Backward: two
    GEMMs (dL/dH, dL/dA), dL/dout written token-major in one pass, dL/dB as a multiply-sum."""

    @staticmethod
    def forward(ctx, flat: Tensor, res: Tensor, post: Tensor, out: Tensor) -> Tensor:  # out (B, L, D)
        m = flat.shape[0]
        ctx.save_for_backward(flat, res, post, out)
        new = torch.mm(res.t(), flat)  # (m, T F)
        out_fractions = out.reshape(-1, m, out.shape[-1] // m).transpose(0, 1)  # (m, T, F), a view
        new.view(out_fractions.shape).addcmul_(out_fractions, post.view(m, 1, 1))
        return new

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, res, post, out = ctx.saved_tensors
        m = flat.shape[0]
        grad = grad.contiguous()
        grad_flat = torch.mm(res, grad)  # (m, T F)
        grad_res = torch.mm(flat, grad.t())  # [i, j] = <H_i, dL/dnew_j>
        out_tokens = out.reshape(-1, m, out.shape[-1] // m)  # (T, m, F)
        grad_fractions = grad.view(m, -1, out_tokens.shape[-1]).transpose(0, 1)  # (T, m, F), a view
        if (
            torch.compiler.is_compiling()
        ):  # traced graphs mis-stride out= results; the compiler fuses this anyway
            grad_out = (grad_fractions * post.view(1, m, 1)).contiguous()
        else:  # dL/dout token-major in one pass (a plain multiply would keep the transposed layout)
            grad_out = torch.mul(grad_fractions, post.view(1, m, 1), out=torch.empty_like(out_tokens))
        grad_post = torch.mul(grad_fractions, out_tokens).sum((0, 2))
        return grad_flat, grad_res, grad_post, grad_out.reshape(out.shape)


class FracStream(Stream):
    """Static FC's fraction-major state: expand (B, L, D) -> (m, B, L, D/m), collapse back (both one copy).
    The fractions are the stream itself, so the collapse is exact (no sum, no scale)."""

    def __init__(self, rate: int):
        super().__init__()
        self.rate = rate

    def expand(self, h: Tensor) -> Tensor:  # (B, L, D) -> (m, B, L, D/m)
        return h.unflatten(-1, (self.rate, -1)).permute(2, 0, 1, 3).contiguous()

    def collapse(self, state: Tensor) -> Tensor:  # (m, B, L, D/m) -> (B, L, D)
        if state.dim() != 4 or state.shape[0] != self.rate:
            raise ValueError(
                f"expected a fraction-major state ({self.rate}, B, L, D/m), got {tuple(state.shape)}"
            )
        return state.permute(1, 2, 0, 3).flatten(-2)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def build_stream(cfg: ConnectionConfig, dim: int) -> Stream:
    """Static FC keeps the stream fraction-major (``FracStream``); dynamic FC keeps the plain (B, L, D) stream, the
    fractions being a view inside each sublayer."""
    if dim % cfg.rate:
        raise ValueError(
            f"frac-connections need hidden_size divisible by m; got hidden_size {dim}, m = {cfg.rate}"
        )
    return Stream() if cfg.dynamic else FracStream(cfg.rate)


def build_connection(cfg: ConnectionConfig, dim: int, layer_index: int, sublayer_index: int) -> Connection:
    return FracConnection(dim, cfg.rate, cfg.dynamic, cfg.tanh, fractions_first=not cfg.dynamic)


__all__ = ["FracConnection", "FracStream", "build_connection", "build_stream"]
