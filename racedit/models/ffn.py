"""The block's feed-forward slot: the dense MLP, and the interface an MoE layer also implements.

A feed-forward module takes ``(h, aux)`` with ``h`` of shape (B, L, D) and an optional
``ForwardAux`` to record side outputs into, and returns (B, L, D). It also reports its cost, so
the model zoo can count activated parameters and FLOPs without running it.
"""

from __future__ import annotations

from torch import Tensor, nn

from racedit.models.aux import ForwardAux


class FeedForward(nn.Module):
    """Interface of the MLP slot."""

    def forward(self, h: Tensor, aux: ForwardAux | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def flops(self, num_tokens: int) -> int:
        """Multiply-adds of one forward over ``num_tokens`` tokens (activated experts only)."""
        raise NotImplementedError

    def inactive_params(self) -> int:
        """Parameters that a token does not use on average (experts not selected)."""
        return 0

    def output_weights(self) -> list[Tensor]:
        """The weights of the slot's output projection(s), which a connection may rescale at init."""
        raise NotImplementedError


class Mlp(FeedForward):
    """DiT's MLP: Linear(D, H) -> GELU(tanh) -> Linear(H, D). Key names match facebookresearch/DiT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h: Tensor, aux: ForwardAux | None = None) -> Tensor:
        return self.fc2(self.act(self.fc1(h)))

    def flops(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.fc1.in_features * self.fc1.out_features

    def output_weights(self) -> list[Tensor]:
        return [self.fc2.weight]
