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

from collections.abc import Callable

from torch import Tensor, nn

Branch = Callable[[Tensor], Tensor]


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
    """Pre-norm residual: ``h + T(h)``."""

    def forward(self, state: Tensor, branch: Branch) -> Tensor:
        return state + branch(state)
