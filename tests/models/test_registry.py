"""The zoo name is a preset: keys refine it, never contradict it; the printed name is derived from the config."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

import racedit
from racedit.config.core import ConfigError, deep_merge, from_dict, to_dict
from racedit.models.config import ModelConfig
from racedit.models.dit import DiT
from racedit.models.registry import (
    ModelNameError,
    ModelSection,
    config_from_name,
    model_name,
    resolve_model_config,
    zoo_names,
)
from racedit.training.config import RunConfig, load_run_config

TINY = dict(input_size=8, num_classes=10, hidden_size=32, depth=2, num_heads=2)


@pytest.mark.parametrize(
    "name,keys,message",
    [
        ("RaceDiT-S/2-2in8", {"moe": {"k": 4}}, r"RaceDiT-S/2-2in8 says k=2 but model\.moe\.k=4"),
        ("RaceDiT-S/2-2in8", {"moe.num_experts": 16}, r"says num_experts=8 but model\.moe\.num_experts=16"),
        ("RaceDiT-S/2-2in8", {"moe": None}, r"says an MoE \(2in8\) but model\.moe=null"),
        ("DiT-S/2", {"moe": {"router": "race"}}, r"DiT-S/2 says a dense DiT but a model\.moe section"),
        ("DiT-S/2", {"patch_size": 4}, r"says patch_size=2 but model\.patch_size=4"),
        ("DiT-XL/2-HCx2", {"connection": {"rate": 4}}, r"says connection HCx2 \(rate=2\) but .*rate=4"),
        (
            "DiT-XL/2",
            {"connection": {"kind": "fc", "rate": 2}},
            r"says a residual connection .* but model\.connection\.kind=fc",
        ),
    ],
)
def test_a_key_that_contradicts_the_name_is_an_error_naming_both(name, keys, message) -> None:
    with pytest.raises(ModelNameError, match=message):
        resolve_model_config(name, **keys)
    with pytest.raises(ValueError, match=message):  # the library entry point: a ValueError subclass
        racedit.build_model(name, **{**TINY, **keys})


def test_keys_that_agree_with_the_name_or_refine_it_are_accepted() -> None:
    cfg = resolve_model_config(
        "RaceDiT-S/2-2in8-DHCx2", moe={"k": 2, "router": "token"}, connection={"tanh": False}
    )
    assert (cfg.moe.k, cfg.moe.num_experts, cfg.moe.router) == (2, 8, "token")
    assert (cfg.connection.kind, cfg.connection.dynamic, cfg.connection.tanh) == ("hc", True, False)
    assert resolve_model_config("DiT-S/2", moe=None).moe is None  # null agrees with a dense name


def test_dit_name_with_an_moe_section_is_refused_in_a_run_config(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: DiT-S/2, moe: {router: race}}\n")
    with pytest.raises(ConfigError, match=r"DiT-S/2 says a dense DiT"):
        load_run_config(path)
    with pytest.raises(ConfigError, match=r"RaceDiT-S/2-2in8 says k=2 but model\.moe\.k=4"):
        load_run_config(path, ["model.name=RaceDiT-S/2-2in8", "model.moe.k=4"])
    with pytest.raises(ConfigError, match=r"'model\.moe\.routr'"):  # errors carry the section's key path
        load_run_config(path, ["model.name=RaceDiT-S/2-2in8", "model.moe.routr=race"])


def test_model_name_inverts_the_grammar_for_every_zoo_name() -> None:
    for name in zoo_names():
        assert model_name(config_from_name(name)) == name


def test_model_name_reports_what_was_built() -> None:
    # Keys the name leaves open do not change it; a shape that is no preset size is spelled out.
    assert model_name(resolve_model_config("RaceDiT-S/2-4in8", moe={"router": "token"})) == "RaceDiT-S/2-4in8"
    custom = resolve_model_config("RaceDiT-S/2-2in8", depth=4, hidden_size=128, num_heads=4)
    assert model_name(custom) == "RaceDiT-custom(d4,w128,h4)/2-2in8"
    assert config_from_name(model_name(custom)) == custom  # a custom name parses back to the same network
    assert model_name(resolve_model_config(None, depth=12, hidden_size=384, num_heads=6)) == "DiT-S/2"


def test_run_config_model_section_is_typed_and_round_trips() -> None:
    cfg = load_run_config("configs/demo.yaml")
    assert isinstance(cfg.model, ModelSection) and isinstance(cfg.model.config, ModelConfig)
    assert cfg.model.name == "RaceDiT-custom(d4,w128,h4)/2-2in8"
    # input_size, in_channels, num_classes and learn_sigma were not written: the run takes them from the data
    assert set(cfg.model.from_data) == {"input_size", "in_channels", "num_classes", "learn_sigma"}
    bound = cfg.model.bind((1, 8, 8), 10, learn_sigma=False)
    assert (bound.input_size, bound.in_channels, bound.num_classes, bound.learn_sigma) == (8, 1, 10, False)
    # The dump (run.yaml, --print-config) is the resolved section, and reads back to the same model.
    dumped = to_dict(cfg)
    assert dumped["model"]["name"] == "RaceDiT-custom(d4,w128,h4)/2-2in8"
    assert "input_size" not in dumped["model"]  # still taken from the data when read back
    again = from_dict(RunConfig, dumped)
    assert again.model == cfg.model
    with pytest.raises(ConfigError, match=r"model\.in_channels = 4 \(dataset value: 1\)"):
        load_run_config("configs/demo.yaml", ["model.in_channels=4"]).model.bind((1, 8, 8), 10, False)


def test_dit_signature_is_model_config() -> None:
    """DiT.__init__'s arguments are what diffusers serialises; they must stay ModelConfig's fields."""
    params = list(inspect.signature(DiT.__init__).parameters)[1:]
    assert params == [f.name for f in fields(ModelConfig)]
    model = racedit.build_model("RaceDiT-S/2-2in8", **TINY)
    assert not hasattr(model, "model_config") and not hasattr(model, "config_dict")
    assert {k: v for k, v in model.config.items() if not k.startswith("_")} == to_dict(model.arch)


def test_deep_merge_semantics() -> None:
    base = {"model": {"name": "A", "moe": {"k": 2, "router": "race"}}, "tags": [1, 2]}
    over = {"model": {"moe": {"router": "token"}}, "tags": [3]}
    merged = deep_merge(base, over)
    # mappings merge key by key; lists and scalars replace
    assert merged == {"model": {"name": "A", "moe": {"k": 2, "router": "token"}}, "tags": [3]}
    assert deep_merge(base, {"model": {"moe": None}})["model"] == {"name": "A", "moe": None}  # null removes
    assert deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}  # a mapping replaces a scalar
    # neither input is modified, and the result shares no mutable value with the override
    assert base["model"]["moe"] == {"k": 2, "router": "race"} and over["tags"] == [3]
    merged["tags"].append(4)
    assert over["tags"] == [3]


def test_overrides_on_a_saved_model_merge_into_its_sections(tmp_path) -> None:
    """Overriding one MoE key of a saved model keeps the others (a shallow merge reset them to defaults)."""
    saved = racedit.build_model("RaceDiT-S/2-1in4", **TINY, moe={"router": "token", "plr_weight": 0.0})
    racedit.save_model(saved, tmp_path / "m")
    loaded = racedit.load_model(tmp_path / "m", moe={"eval_routing": "topk"})
    assert (loaded.arch.moe.k, loaded.arch.moe.num_experts, loaded.arch.moe.router) == (1, 4, "token")
    assert loaded.arch.moe.eval_routing == "topk" and loaded.arch.moe.plr_weight == 0.0
    rebuilt = racedit.build_model(config=saved.arch, **{"moe.gating": "softmax"})
    assert (rebuilt.arch.moe.router, rebuilt.arch.moe.gating) == ("token", "softmax")
