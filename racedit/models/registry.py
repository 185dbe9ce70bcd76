"""The model zoo: registry names -> ``ModelConfig``.

Names follow DiT and Race-DiT:
- ``DiT-XL/2``: dense DiT, size XL, patch 2;
- ``RaceDiT-B/2-2in8``: every MLP an MoE of 8 experts, 2 activated per token, routed by expert race
  (the baselines change ``moe.router``/``moe.gating`` in a config, not the name);
- a connection suffix on either: ``DiT-XL/2-HCx2`` (static hyper-connections, n = 2),
  ``DiT-XL/2-DHCx4`` (dynamic), ``RaceDiT-B/2-2in8-FCx4`` (frac-connections, m = 4),
  ``DFCx2`` (dynamic FC), ``mHCx4`` (manifold-constrained HC).
"""

from __future__ import annotations

import re
from typing import Any

from racedit.config.core import ConfigError, from_dict, to_dict
from racedit.connections.config import ConnectionConfig
from racedit.models.config import ModelConfig
from racedit.moe.config import MoEConfig

# name -> (depth, width, heads); race-dit.md section 1 ("M" is new in Race-DiT).
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (16, 960, 16),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
EXPERT_SETTINGS = ((2, 8), (4, 32))  # (k, E) the zoo lists; any kinE parses
CONNECTION_SUFFIXES = ("HCx2", "HCx4", "DHCx2", "DHCx4", "FCx2", "FCx4", "DFCx2", "DFCx4", "mHCx4")

_NAME = re.compile(
    r"^(?P<family>DiT|RaceDiT)-(?P<size>S|B|M|L|XL)/(?P<patch>\d+)"
    r"(?:-(?P<k>\d+)in(?P<E>\d+))?"
    r"(?:-(?P<conn>m?D?(?:HC|FC)x\d+))?$"
)
_CONN = re.compile(r"^(?P<m>m?)(?P<dyn>D?)(?P<kind>HC|FC)x(?P<rate>\d+)$")


def parse_connection(suffix: str) -> ConnectionConfig:
    m = _CONN.match(suffix)
    if m is None or (m["m"] and (m["dyn"] or m["kind"] != "HC")):
        raise ValueError(
            f"unknown connection suffix {suffix!r}; expected e.g. HCx2, DHCx4, FCx4, DFCx2, mHCx4"
        )
    kind = "mhc" if m["m"] else m["kind"].lower()
    return ConnectionConfig(kind=kind, rate=int(m["rate"]), dynamic=bool(m["dyn"]))


def config_from_name(name: str) -> ModelConfig:
    """``"RaceDiT-B/2-2in8-FCx4"`` -> ModelConfig (ImageNet 256 defaults: 32x32x4 latents, 1000 classes)."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(
            f"unknown model name {name!r}; expected DiT-<S|B|M|L|XL>/<patch>[-<conn>] or "
            f"RaceDiT-<size>/<patch>-<k>in<E>[-<conn>], e.g. DiT-XL/2, RaceDiT-XL/2-4in32, DiT-XL/2-HCx2 "
            f"(`python -m racedit.models` lists the zoo)"
        )
    depth, width, heads = SIZES[m["size"]]
    is_race = m["family"] == "RaceDiT"
    if is_race != (m["k"] is not None):
        raise ValueError(f"model name {name!r}: RaceDiT names need '-<k>in<E>', DiT names must not have it")
    moe = MoEConfig(num_experts=int(m["E"]), k=int(m["k"])) if is_race else None
    conn = parse_connection(m["conn"]) if m["conn"] else ConnectionConfig()
    return ModelConfig(
        depth=depth, hidden_size=width, num_heads=heads, patch_size=int(m["patch"]), moe=moe, connection=conn
    )


def resolve_model_config(name: str | None = None, **overrides: Any) -> ModelConfig:
    """Registry name (optional) + overrides (nested dicts or dotted keys) -> validated ModelConfig."""
    data = to_dict(config_from_name(name)) if name else to_dict(ModelConfig())
    for key, value in overrides.items():
        value = to_dict(value)
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **value}
        else:
            node[leaf] = value
    try:
        return from_dict(ModelConfig, data)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None


def zoo_names(include_connections: bool = True) -> list[str]:
    """The names the zoo table lists (any other valid name still builds)."""
    names = []
    for size in SIZES:
        for p in PATCHES:
            names.append(f"DiT-{size}/{p}")
            names += [f"RaceDiT-{size}/{p}-{k}in{E}" for k, E in EXPERT_SETTINGS]
    if include_connections:
        for base in ("DiT-XL/2", "RaceDiT-B/2-2in8"):
            names += [f"{base}-{s}" for s in CONNECTION_SUFFIXES]
    return names
