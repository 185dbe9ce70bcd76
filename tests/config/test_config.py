"""YAML configs into typed dataclasses: errors name the key; overrides reach any key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

import racedit
from racedit.config import ConfigError, apply_overrides, from_dict, load_config
from racedit.models import resolve_model_config


@dataclass
class Inner:
    lr: float = 1e-4
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    maybe: int | None = None


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"'inner\.lrr'.*valid keys.*lr"):
        from_dict(Outer, {"inner": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="'stepz'"):
        from_dict(Outer, {"stepz": 3})


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        from_dict(Outer, {"steps": "ten"})
    with pytest.raises(ConfigError, match=r"'inner\.mode' must be one of \['a', 'b'\]"):
        from_dict(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match="'steps'"):
        from_dict(Outer, {"steps": True})


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = from_dict(Outer, {"inner": {"lr": 1}, "maybe": None, "tags": ["a"]})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float) and cfg.maybe is None and cfg.tags == ["a"]


def test_overrides_reach_nested_keys_and_parse_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  lr: 0.1\n")
    cfg = load_config(Outer, path, ["inner.lr=1e-3", "inner.mode=b", "tags=[p, q]", "maybe=null", "steps=7"])
    assert cfg == Outer(steps=7, inner=Inner(lr=1e-3, mode="b"), tags=["p", "q"], maybe=None)
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_overrides({}, ["novalue"])


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\ninner: {lr: 0.5, mode: b}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ninner: {lr: 0.25}\n")
    assert load_config(Outer, tmp_path / "child.yaml") == Outer(steps=5, inner=Inner(lr=0.25, mode="b"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_model_config_from_name_and_overrides():
    cfg = resolve_model_config("RaceDiT-B/2-2in8-FCx4", input_size=8, **{"moe.router": "token"})
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.input_size) == (12, 768, 2, 8)
    assert cfg.moe.k == 2 and cfg.moe.num_experts == 8 and cfg.moe.router == "token"
    assert cfg.connection.kind == "fc" and cfg.connection.rate == 4
    with pytest.raises(ConfigError, match=r"'moe\.routr'"):
        resolve_model_config("RaceDiT-B/2-2in8", moe={"routr": "token"})
    with pytest.raises(ValueError, match="unknown model name"):
        racedit.build_model("DiT-XXL/2")
    with pytest.raises(ValueError, match="divisible"):
        resolve_model_config("DiT-S/4", input_size=6)
