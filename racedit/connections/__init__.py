"""Residual-stream connections: plain residual, hyper-connections, frac-connections, mHC."""

from __future__ import annotations

from racedit.connections.base import Branch, Connection, Residual, Stream
from racedit.connections.config import ConnectionConfig


def build_stream(cfg: ConnectionConfig, dim: int) -> Stream:
    """The model-level stream layout for ``cfg``."""
    if cfg.kind == "residual":
        return Stream()
    from racedit.connections import hyper  # noqa: F401  (registered by the variants' module)

    return _variant(cfg).build_stream(cfg, dim)


def build_connection(cfg: ConnectionConfig, dim: int, layer_index: int, sublayer_index: int) -> Connection:
    """The connection of sublayer ``sublayer_index`` (0 = attention, 1 = MLP) of block ``layer_index``."""
    if cfg.kind == "residual":
        return Residual()
    return _variant(cfg).build_connection(cfg, dim, layer_index, sublayer_index)


def _variant(cfg: ConnectionConfig):
    from racedit.connections import VARIANTS

    try:
        return VARIANTS[cfg.kind]
    except KeyError:
        raise ValueError(
            f"connection kind {cfg.kind!r} is not implemented; known: {sorted(VARIANTS)}"
        ) from None


VARIANTS: dict = {}  # kind -> module-like object with build_stream / build_connection (see hyper.py)

__all__ = [
    "Branch",
    "Connection",
    "ConnectionConfig",
    "Residual",
    "Stream",
    "build_connection",
    "build_stream",
]
