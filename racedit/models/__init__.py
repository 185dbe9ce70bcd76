"""Models: the DiT backbone, its registry (the zoo) and checkpoint loading (names load lazily)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CheckpointError": "racedit.models.loading",
    "DiT": "racedit.models.dit",
    "ForwardAux": "racedit.interfaces",
    "ModelConfig": "racedit.models.config",
    "ModelNameError": "racedit.models.registry",
    "ModelSection": "racedit.models.registry",
    "build_model": "racedit.models.loading",
    "config_from_name": "racedit.models.registry",
    "export_diffusers": "racedit.models.diffusers_io",
    "infer_config": "racedit.models.loading",
    "load_model": "racedit.models.loading",
    "model_name": "racedit.models.registry",
    "resolve_model_config": "racedit.models.registry",
    "save_model": "racedit.models.loading",
    "zoo_names": "racedit.models.registry",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'racedit.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
