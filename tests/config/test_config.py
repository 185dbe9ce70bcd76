"""YAML configs into typed dataclasses: errors name the key; overrides reach any key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

import racedit
from racedit.config import ConfigError, apply_overrides, from_dict, load_config, load_yaml
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


@dataclass
class Small:
    lr: float = 1.0
    steps: int = 1
    name: str = ""
    scale: float = 1.0


def test_exponent_floats_in_yaml_files_and_overrides(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 as the string "1e-4"; our loader reads it as a float in both places.
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nsteps: 3\nname: run1e5x\n")
    cfg = load_config(Small, path, ["scale=2E3"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.scale == 2000.0
    assert load_yaml(path)["name"] == "run1e5x"  # strings that merely contain an e stay strings
    assert load_config(Small, path, ["lr=-1.5e-3"]).lr == -1.5e-3


def test_malformed_yaml_is_one_line_with_file_line_and_reason(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 1.0\nnested:\n  a: [1, 2\n  b: 3\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:") and "invalid YAML" in message
    line = int(message[len(str(path)) + 1 :].split(":")[0])
    assert 3 <= line <= 5  # the parser reports where the unclosed list was noticed (lines 3-5)
    with pytest.raises(ConfigError, match=r"override 'lr=\[1': invalid YAML"):
        load_config(Small, None, ["lr=[1"])


def test_post_init_errors_carry_the_key_path():
    from racedit.models.config import ModelConfig

    with pytest.raises(ConfigError, match=r"config section 'moe': MoE needs 1 <= k <= num_experts"):
        from_dict(ModelConfig, {"moe": {"k": 9, "num_experts": 8}})
    # messages that already name their key are left as they are
    from racedit.training.config import RunConfig

    with pytest.raises(ConfigError, match=r"^train.lr must be a finite number > 0, got -0.001$"):
        from_dict(RunConfig, {"train": {"lr": -1e-3}})
