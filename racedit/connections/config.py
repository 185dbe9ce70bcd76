"""Configuration of the residual stream (docs/spec/connections.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ConnectionConfig:
    """How every sublayer reads from and writes to the residual stream.

    ``kind``: "residual" (plain ``h + T(h)``), "hc" (hyper-connections, n stream copies), "fc"
    (frac-connections, m fractions of the width), "mhc" (manifold-constrained HC, n >= 2 streams).
    ``dynamic`` and ``tanh`` apply to "hc" and "fc"; mHC is always input-dependent and has no tanh.
    """

    kind: Literal["residual", "hc", "fc", "mhc"] = "residual"
    rate: int = 1  # HC/mHC: expansion n (streams); FC: m fractions
    dynamic: bool = False  # HC/FC: dynamic (per-token) mixing on top of the static parameters
    tanh: bool = True  # HC/FC dynamic: tanh on the dynamic projections
    sinkhorn_iters: int = 20  # mHC: Sinkhorn-Knopp iterations
    # HC: the std of each sublayer's output projection (attention proj, MLP fc2 / expert w2) at init is
    # multiplied by sqrt(n), as the hyper-connection paper does (docs/design.md, "Connections: layout, fast
    # paths, and the hyper-connection init")
    scale_output_init: bool = True

    def __post_init__(self) -> None:
        if self.rate < 1:
            raise ValueError(f"connection rate must be >= 1, got {self.rate}")
        if self.kind == "residual" and (self.rate != 1 or self.dynamic):
            raise ValueError("a residual connection takes rate=1 and dynamic=false")
        if self.kind == "mhc" and self.rate < 2:
            raise ValueError(
                "mHC needs rate >= 2 streams (with one stream its sigmoid read weight cannot equal 1); "
                "use kind='hc' with rate=1 for a single stream"
            )
        if self.sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")

    @property
    def suffix(self) -> str:
        """Registry-name suffix: '' | 'HCx2' | 'DHCx4' | 'FCx4' | 'DFCx2' | 'mHCx4'."""
        if self.kind == "residual":
            return ""
        if self.kind == "mhc":
            return f"mHCx{self.rate}"
        return f"{'D' if self.dynamic else ''}{self.kind.upper()}x{self.rate}"
