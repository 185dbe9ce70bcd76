"""The residual-stream interface: how a block's sublayers read from and write to the stream.

Every sublayer of every block (attention, then MLP/MoE) owns one ``Connection``. The block hands it
the stream state and the sublayer's branch ``T``, a function ``(B, L, D) -> (B, L, D)`` that already
contains the adaLN modulate and gate (docs/spec/connections.md: ``T(h) = gate * F(modulate(LN(h)))``).
The model owns one ``Stream``, which turns the patch embedding into the stream state before the
first block and back into ``(B, L, D)`` before the final layer.

Plain residual: state is ``(B, L, D)``, ``state + T(state)``. Hyper-connections keep n copies
``(B, L, n, D)``; frac-connections keep ``(B, L, D)`` viewed as m fractions of width D/m.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

Branch = Callable[[Tensor], Tensor]


def stream_in_state_dtype(forward: Callable[[nn.Module, Tensor, Branch], Tensor]):
    """Decorator of a ``Connection.forward``: under autocast, the stream's own arithmetic (coefficients, read,
    mix, write) runs outside autocast, in the state's dtype, while the branch runs under the caller's autocast
    and its output is cast to the state's dtype.

    That is what autocast gives the plain residual for free: ``state + branch(state)`` adds a bf16 branch
    output to the float32 stream, so the stream stays float32 (docs/design.md, "Connections under mixed
    precision"). Without it the connections' matrix products would be cast to bf16 (autocast lists mm, bmm,
    baddbmm, addmm), so the n-copy stream would drop to bf16 after the first sublayer, and the hand-written
    autograd nodes, which take the state, the coefficients and the branch output together, would be handed
    mixed dtypes (every connection but dynamic FC failed with a dtype error in forward or backward)."""

    @functools.wraps(forward)
    def wrapper(self: nn.Module, state: Tensor, branch: Branch) -> Tensor:
        device = state.device.type
        if not torch.is_autocast_enabled(device):
            return forward(self, state, branch)
        dtype, cache = torch.get_autocast_dtype(device), torch.is_autocast_cache_enabled()

        def branch_under_autocast(h: Tensor) -> Tensor:
            with torch.autocast(device, dtype=dtype, cache_enabled=cache):
                return branch(h).to(h.dtype)

        with torch.autocast(device, enabled=False):
            return forward(self, state, branch_under_autocast)

    return wrapper


class Connection(nn.Module):
    """One sublayer's connection: ``forward(state, branch) -> new state``.

    ``output_init_gain``: the factor the model applies, after its own init, to the initial weights of this
    sublayer's output projection (1 for every connection but hyper-connections, where it is sqrt(n)).
    """

    output_init_gain: float = 1.0

    def forward(self, state: Tensor, branch: Branch) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def flops(self, num_tokens: int) -> int:
        """Multiply-adds the connection itself spends for ``num_tokens`` tokens (not the branch)."""
        return 0

    def no_weight_decay(self) -> set[str]:
        """Names (local to this module) of parameters that must not be weight-decayed: every static mixing
        parameter, bias and scale (docs/spec/connections.md); only the dynamic projection matrices are decayed."""
        return {name for name, _ in self.named_parameters() if not name.endswith("proj.weight")}


class Stream(nn.Module):
    """Model-level layout of the residual stream."""

    def expand(self, h: Tensor) -> Tensor:  # (B, L, D) -> state
        return h

    def collapse(self, state: Tensor) -> Tensor:  # state -> (B, L, D)
        return state


class Residual(Connection):
    """Pre-norm residual: ``h + T(h)``. Under autocast the sum promotes a bf16 branch output to the float32
    stream, so it needs no ``stream_in_state_dtype``."""

    def forward(self, state: Tensor, branch: Branch) -> Tensor:
        return state + branch(state)
