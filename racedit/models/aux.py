"""Side outputs of one forward pass, carried explicitly (never global state).

``model(x, t, y, aux=ForwardAux())`` lets every MoE layer record its auxiliary losses and routing
statistics in ``aux.layers``; the training loss reads them back. A dense model leaves it empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class ForwardAux:
    t: Tensor | None = None  # (B,) diffusion timesteps of the batch, set by the model's forward
    layers: list[dict[str, Any]] = field(default_factory=list)  # one record per MoE layer, in depth order

    def add(self, record: dict[str, Any]) -> None:
        self.layers.append(record)
