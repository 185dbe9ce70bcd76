"""The contracts between racedit's layers, in a leaf module (imports torch only).

- ``ForwardAux``: the side outputs of one forward pass, carried explicitly (never global state).
  ``model(x, t, y, aux=ForwardAux())`` lets every MoE layer append a ``RoutingRecord`` (its selection and
  the tensors its auxiliary losses need) to ``aux.layers``; the objectives' training loss and the routing
  metrics read them back. A dense model leaves it empty.
- ``RoutingRecord``: what one MoE layer reports about one forward.
- ``FeedForward``: the interface of a block's MLP slot, which the dense MLP (``racedit/models/ffn.py``)
  and the MoE layer (``racedit/moe/layer.py``) implement. It takes ``(h, aux)`` with ``h`` of shape
  (B, L, D) and returns (B, L, D), and reports its cost so the zoo can count parameters and FLOPs
  without running it.

``models``, ``moe`` and ``diffusion`` all import this module and none imports another for these types.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class RoutingRecord:
    """One MoE layer's report of one forward (``racedit.moe.aux_losses`` and ``RoutingStats`` read it)."""

    layer: int  # index of the block
    logits: Tensor  # (T, E) raw gating-head logits s, T = B*L, with grad (router-similarity and balance loss)
    mask: Tensor  # (B, L, E) bool: the selection, no grad
    tau: Tensor | None = None  # fp32 scalar, the expert race's threshold after this forward; None otherwise
    plr_pred: Tensor | None = None  # (B, L, p*p*C) PLR prediction: training forwards with a PLR head only

    @property
    def experts_per_sample(self) -> Tensor:
        """(B,) float: mean number of experts a token of each sample was routed to."""
        return self.mask.sum(-1).float().mean(-1)


class ForwardAux:
    """The records of one forward. A plain class on purpose, not a dataclass: wrappers that rebuild the
    containers in a module's arguments (FSDP2 around each block, to hook tensors that need gradients; DDP and
    FSDP when they move inputs to the GPU) copy dataclasses, and the layers after the copy would record into
    it instead of the caller's container."""

    def __init__(self, t: Tensor | None = None, layers: list[RoutingRecord] | None = None):
        self.t = t  # (B,) diffusion timesteps of the batch, set by the model's forward
        self.layers: list[RoutingRecord] = layers if layers is not None else []  # one record per MoE layer

    def add(self, record: RoutingRecord) -> None:
        self.layers.append(record)

    def __repr__(self) -> str:
        return f"ForwardAux(t={self.t!r}, layers=<{len(self.layers)} records>)"


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
