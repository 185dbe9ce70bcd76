"""racedit: class-conditional Diffusion Transformers with Mixture-of-Experts routed by Expert Race.

The package imports lazily: ``import racedit.routing`` costs torch and the routing code, not diffusers
or the training stack. The names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DiT": "racedit.models.dit",
    "ForwardAux": "racedit.interfaces",
    "ModelConfig": "racedit.models.config",
    "build_model": "racedit.models.loading",
    "export_diffusers": "racedit.models.diffusers_io",
    "load_model": "racedit.models.loading",
    "save_model": "racedit.models.loading",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'racedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
