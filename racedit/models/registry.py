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
from dataclasses import dataclass, field, replace
from typing import Any

from racedit.config.core import ConfigError, deep_merge, from_dict, to_dict
from racedit.connections.config import ConnectionConfig
from racedit.models.config import ModelConfig
from racedit.moe.config import MoEConfig

# name -> (depth, width, heads); docs/spec/race-dit.md section 1 ("M" is new in Race-DiT).
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
    r"^(?P<family>DiT|RaceDiT)-(?P<size>S|B|M|L|XL|custom\(d(?P<d>\d+),w(?P<w>\d+),h(?P<h>\d+)\))"
    r"/(?P<patch>\d+)"
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
            f"unknown model name {name!r}; expected DiT-<size>/<patch>[-<conn>] or "
            f"RaceDiT-<size>/<patch>-<k>in<E>[-<conn>] with size S, B, M, L, XL or custom(d<depth>,w<width>,"
            f"h<heads>), e.g. DiT-XL/2, RaceDiT-XL/2-4in32, DiT-XL/2-HCx2 "
            f"(`python -m racedit.models` lists the zoo)"
        )
    depth, width, heads = SIZES[m["size"]] if m["d"] is None else (int(m["d"]), int(m["w"]), int(m["h"]))
    is_race = m["family"] == "RaceDiT"
    if is_race != (m["k"] is not None):
        raise ValueError(f"model name {name!r}: RaceDiT names need '-<k>in<E>', DiT names must not have it")
    moe = MoEConfig(num_experts=int(m["E"]), k=int(m["k"])) if is_race else None
    conn = parse_connection(m["conn"]) if m["conn"] else ConnectionConfig()
    return ModelConfig(
        depth=depth, hidden_size=width, num_heads=heads, patch_size=int(m["patch"]), moe=moe, connection=conn
    )


class ModelNameError(ConfigError):
    """A registry name and explicit keys describe different models; the message names both."""


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword overrides (nested dicts, dataclasses or dotted keys) -> one nested dict."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node: dict[str, Any] = {}
        part: dict[str, Any] = node
        for parent in parents:
            part = part.setdefault(parent, {})
        part[leaf] = to_dict(value)
        nested = deep_merge(nested, node)
    return nested


def _check_name_agrees(name: str, preset: ModelConfig, given: dict[str, Any]) -> None:
    """Explicit keys may refine what the name leaves open (sizes, router, losses...), never contradict
    what it states: the family (dense or MoE), the patch, ``k`` in ``E`` and the connection."""

    def clash(key: str, says: str, value: Any) -> ModelNameError:
        return ModelNameError(
            f"model.name {name} says {says} but model.{key}={value}; change one of them "
            "(or drop model.name and give every key)"
        )

    if "patch_size" in given and given["patch_size"] != preset.patch_size:
        raise clash("patch_size", f"patch_size={preset.patch_size}", given["patch_size"])
    if "moe" in given:
        moe = given["moe"]
        if preset.moe is None and moe is not None:
            raise ModelNameError(
                f"model.name {name} says a dense DiT but a model.moe section is given; use a RaceDiT-<size>/"
                f"<patch>-<k>in<E> name for an MoE, or set model.moe to null"
            )
        if preset.moe is not None and moe is None:
            raise clash("moe", f"an MoE ({preset.moe.k}in{preset.moe.num_experts})", "null")
        if preset.moe is not None and isinstance(moe, dict):
            for key in ("k", "num_experts"):
                if key in moe and moe[key] != getattr(preset.moe, key):
                    raise clash(f"moe.{key}", f"{key}={getattr(preset.moe, key)}", moe[key])
    connection = given.get("connection")
    if isinstance(connection, dict):
        stated = to_dict(preset.connection)
        for key in ("kind", "rate", "dynamic"):
            if key in connection and connection[key] != stated[key]:
                what = (
                    f"connection {preset.connection.suffix}"
                    if preset.connection.suffix
                    else "a residual connection"
                )
                raise clash(f"connection.{key}", f"{what} ({key}={stated[key]})", connection[key])


def resolve_model_config(name: str | None = None, **overrides: Any) -> ModelConfig:
    """Registry name (a preset, optional) + overrides (nested dicts or dotted keys) -> validated ModelConfig.

    The name is expanded once; explicit keys are merged onto it with ``deep_merge``. A key that
    contradicts the name (``RaceDiT-S/2-2in8`` with ``moe.k=4``, ``DiT-S/2`` with a ``moe`` section)
    raises ``ModelNameError`` naming both. What the name does not fix (depth, width, heads, the
    router, the losses) may be set freely; ``model_name`` then reports the model honestly.
    """
    return _resolve(name, _nest(overrides), prefix="")


def _resolve(name: str | None, given: dict[str, Any], prefix: str) -> ModelConfig:
    if name:
        try:
            preset = config_from_name(name)
        except ValueError as err:
            raise ConfigError(f"{prefix}.name: {err}" if prefix else str(err)) from None
        _check_name_agrees(name, preset, given)
        data = deep_merge(to_dict(preset), given)
    else:
        data = deep_merge(to_dict(ModelConfig()), given)
    return from_dict(ModelConfig, data, prefix=prefix)  # a failed check raises ConfigError naming the key


# Keys a run takes from its data (shape, classes) and objective (learn_sigma) unless the section gives them.
DATA_KEYS = ("input_size", "in_channels", "num_classes", "learn_sigma")


@dataclass
class ModelSection:
    """The ``model:`` section of a run config, typed: a zoo name (a preset) expanded once, plus the keys
    written next to it, validated by the config core when the file is read.

    ``config`` is the resolved architecture; the keys listed in ``from_data`` were not written and
    hold ModelConfig's defaults until ``bind`` takes them from the dataset and the objective. The
    section dumps back (``to_dict``) as its derived ``name`` plus the full resolved mapping without
    those keys, which reads back to the same model.
    """

    config: ModelConfig = field(default_factory=lambda: config_from_name("RaceDiT-B/2-2in8"))
    from_data: tuple[str, ...] = DATA_KEYS

    @classmethod
    def from_config_data(cls, data: Any, key: str = "model") -> ModelSection:
        if not isinstance(data, dict):
            raise ConfigError(f"config key '{key}' must be a mapping (a zoo name and ModelConfig keys)")
        given = {k: v for k, v in data.items() if not (k in DATA_KEYS and v is None)}  # null: from the data
        name = given.pop("name", None)
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"config key '{key}.name' must be a string such as RaceDiT-B/2-2in8")
        config = _resolve(name, _nest(given), prefix=key)
        return cls(config, tuple(k for k in DATA_KEYS if k not in given))

    def to_config_data(self) -> dict[str, Any]:
        keys = {k: v for k, v in to_dict(self.config).items() if k not in self.from_data}
        return {"name": self.name, **keys}  # the derived name agrees with every key, so this reads back

    @property
    def name(self) -> str:
        return model_name(self.config)

    def bind(self, sample_shape: tuple[int, int, int], num_classes: int, learn_sigma: bool) -> ModelConfig:
        """The architecture for data of ``sample_shape`` (C, H, W) with ``num_classes`` classes: keys the
        section did not give come from the data; a given key the data contradicts is an error naming both."""
        C, H, W = (int(v) for v in sample_shape)
        if H != W:
            raise ConfigError(f"the dataset's samples are {H}x{W}; the DiT needs square inputs")
        data = {"input_size": H, "in_channels": C, "num_classes": int(num_classes)}
        for key, value in data.items():
            given = getattr(self.config, key)
            if key not in self.from_data and given != value:
                raise ConfigError(
                    f"the dataset does not match the model: data samples have shape (C, H, W) = ({C}, {H}, "
                    f"{W}) and {num_classes} classes, but model.{key} = {given} (dataset value: {value}). "
                    f"Remove model.{key} to take it from the data, or use the data this model was meant for"
                )
        data["learn_sigma"] = learn_sigma
        try:
            return replace(self.config, **{k: v for k, v in data.items() if k in self.from_data})
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None


def model_name(cfg: ModelConfig) -> str:
    """The registry name of a resolved config (the inverse of ``config_from_name``), for logs and reports.

    ``RaceDiT-S/2-2in8``, ``DiT-XL/2-HCx2``. A shape that is no preset size is spelled out:
    ``RaceDiT-custom(d4,w128,h4)/2-2in8`` (depth, width, heads), which parses back too, so
    ``config_from_name(model_name(cfg))`` builds the same network. The name states family, size, patch,
    experts and connection; other keys (router, gating, losses, ``moe.every``, ``hidden_split``) are
    not part of it.
    """
    shape = (cfg.depth, cfg.hidden_size, cfg.num_heads)
    size = next((s for s, preset in SIZES.items() if preset == shape), None)
    size = size or f"custom(d{cfg.depth},w{cfg.hidden_size},h{cfg.num_heads})"
    family = "RaceDiT" if cfg.moe is not None else "DiT"
    name = f"{family}-{size}/{cfg.patch_size}"
    if cfg.moe is not None:
        name += f"-{cfg.moe.k}in{cfg.moe.num_experts}"
    if cfg.connection.suffix:
        name += f"-{cfg.connection.suffix}"
    return name


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
