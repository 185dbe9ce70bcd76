"""Configuration of the residual stream (connections.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ConnectionConfig:
    kind: Literal["residual", "hc", "fc", "mhc"] = "residual"
    rate: int = 1  # HC/mHC: expansion n (streams); FC: m fractions
    dynamic: bool = False  # dynamic (per-token) mixing on top of the static parameters
    tanh: bool = True  # tanh on the dynamic projections
    sinkhorn_iters: int = 20  # mHC: Sinkhorn-Knopp iterations

    def __post_init__(self) -> None:
        if self.rate < 1:
            raise ValueError(f"connection rate must be >= 1, got {self.rate}")
        if self.kind == "residual" and (self.rate != 1 or self.dynamic):
            raise ValueError("a residual connection takes rate=1 and dynamic=false")

    @property
    def suffix(self) -> str:
        """Registry-name suffix: '' | 'HCx2' | 'DHCx4' | 'FCx4' | 'DFCx2' | 'mHCx4'."""
        if self.kind == "residual":
            return ""
        if self.kind == "mhc":
            return f"mHCx{self.rate}"
        return f"{'D' if self.dynamic else ''}{self.kind.upper()}x{self.rate}"
