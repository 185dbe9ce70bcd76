"""The block's dense feed-forward: DiT's MLP, one implementation of ``racedit.interfaces.FeedForward``
(the MoE layer in ``racedit/moe/layer.py`` is the other)."""

from __future__ import annotations

from torch import Tensor, nn

from racedit.interfaces import FeedForward, ForwardAux

__all__ = ["FeedForward", "Mlp"]


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
