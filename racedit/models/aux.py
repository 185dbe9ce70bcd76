"""Side outputs of one forward pass, carried explicitly (never global state).

``model(x, t, y, aux=ForwardAux())`` lets every MoE layer record its auxiliary losses and routing
statistics in ``aux.layers``; the training loss reads them back. A dense model leaves it empty.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class ForwardAux:
    """The records of one forward. A plain class on purpose, not a dataclass: wrappers that rebuild the
    containers in a module's arguments (FSDP2 around each block, to hook tensors that need gradients; DDP and
    FSDP when they move inputs to the GPU) copy dataclasses, and the layers after the copy would record into
    it instead of the caller's container."""

    def __init__(self, t: Tensor | None = None, layers: list[dict[str, Any]] | None = None):
        self.t = t  # (B,) diffusion timesteps of the batch, set by the model's forward
        self.layers: list[dict[str, Any]] = layers if layers is not None else []  # one record per MoE layer

    def add(self, record: dict[str, Any]) -> None:
        self.layers.append(record)

    def __repr__(self) -> str:
        return f"ForwardAux(t={self.t!r}, layers=<{len(self.layers)} records>)"
