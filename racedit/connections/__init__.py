"""Residual-stream connections: plain residual, hyper-connections, frac-connections, mHC.

One interface (``racedit.connections.base``), one registry: ``VARIANTS`` maps a ``ConnectionConfig.kind``
to the module that builds its model-level ``Stream`` and its per-sublayer ``Connection``.

| kind       | module        | stream state                                 | per-sublayer parameters (static; + dynamic)      |
|------------|---------------|----------------------------------------------|--------------------------------------------------|
| "residual" | ``base``      | (B, L, D)                                    | none                                             |
| "hc"       | ``hyper``     | static (n, B, L, D); dynamic (B, L, n, D)    | n(n+2); + D(n+2) + 2                             |
| "fc"       | ``frac``      | static (m, B, L, D/m); dynamic (B, L, D)     | m(2m+1); + (D/m)(2m+1) + 2                       |
| "mhc"      | ``manifold``  | (B, L, n, D)                                 | n(n+2) + 3 + nD(n^2+2n) (always input-dependent) |
"""

from __future__ import annotations

from types import SimpleNamespace

from racedit.connections import frac, hyper, manifold
from racedit.connections.base import Branch, Connection, Residual, Stream
from racedit.connections.config import ConnectionConfig
from racedit.connections.frac import FracConnection, FracStream
from racedit.connections.hyper import HyperConnection, HyperStream
from racedit.connections.manifold import ManifoldHyperConnection, sinkhorn

_residual = SimpleNamespace(
    build_stream=lambda cfg, dim: Stream(),
    build_connection=lambda cfg, dim, layer_index, sublayer_index: Residual(),
)

# kind -> module with build_stream(cfg, dim) and build_connection(cfg, dim, layer_index, sublayer_index)
VARIANTS = {"residual": _residual, "hc": hyper, "fc": frac, "mhc": manifold}


def build_stream(cfg: ConnectionConfig, dim: int) -> Stream:
    """The model-level stream layout for ``cfg``: expand after the patch embedding, collapse before
    the final layer."""
    return _variant(cfg).build_stream(cfg, dim)


def build_connection(cfg: ConnectionConfig, dim: int, layer_index: int, sublayer_index: int) -> Connection:
    """The connection of sublayer ``sublayer_index`` (0 = attention, 1 = MLP) of block ``layer_index``."""
    return _variant(cfg).build_connection(cfg, dim, layer_index, sublayer_index)


def _variant(cfg: ConnectionConfig):
    try:
        return VARIANTS[cfg.kind]
    except KeyError:
        raise ValueError(
            f"connection kind {cfg.kind!r} is not implemented; known kinds: {sorted(VARIANTS)}"
        ) from None


__all__ = [
    "VARIANTS",
    "Branch",
    "Connection",
    "ConnectionConfig",
    "FracConnection",
    "FracStream",
    "HyperConnection",
    "HyperStream",
    "ManifoldHyperConnection",
    "Residual",
    "Stream",
    "build_connection",
    "build_stream",
    "sinkhorn",
]
