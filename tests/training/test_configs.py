"""Every shipped run config loads and resolves to the model it documents; overrides and unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from racedit.config.core import ConfigError
from racedit.models import resolve_model_config
from racedit.training.config import load_run_config
from racedit.training.loop import lr_lambda

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_CONFIGS = [
    CONFIGS / "demo.yaml",
    *sorted((CONFIGS / "recipes").glob("*.yaml")),
    *sorted((CONFIGS / "ablation").glob("*.yaml")),
    *sorted((CONFIGS / "sweeps").rglob("*.yaml")),
]


def resolved(path: Path):
    cfg = load_run_config(path)
    return cfg, cfg.model.config  # the typed section: expanded and validated when the file was read


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_run_config_loads(path: Path) -> None:
    cfg, model = resolved(path)
    assert cfg.train.max_steps >= 1
    if path.parent.name == "ablation" and path.stem != "dense_b2":
        assert model.moe is not None and model.hidden_size == 768 and model.depth == 12
        assert (model.moe.k, model.moe.num_experts) in ((2, 8), (4, 32))
        assert cfg.train.global_batch_size == 256


def test_ablation_covers_every_router_gating_and_component() -> None:
    seen = {}
    for path in (CONFIGS / "ablation").glob("gating_*.yaml"):
        _, m = resolved(path)
        seen[(m.moe.router, m.moe.gating)] = m.moe
        assert m.moe.plr_weight == 0 and m.moe.rsl_weight == 0 and m.moe.eval_routing == "topk"
    assert set(seen) == {
        (r, g)
        for r in ("token", "expert", "bl", "be", "le", "race")
        for g in ("softmax", "sigmoid", "identity")
    }
    steps = [resolved(p)[1].moe for p in sorted((CONFIGS / "ablation").glob("components_*.yaml"))]
    assert [(s.gating, s.eval_routing, s.plr_weight > 0, s.rsl_weight > 0) for s in steps] == [
        ("softmax", "topk", False, False),
        ("identity", "topk", False, False),
        ("identity", "threshold", False, False),
        ("identity", "threshold", True, False),
        ("identity", "threshold", True, True),
    ]
    balance = {p.stem: resolved(p)[1] for p in (CONFIGS / "ablation").glob("balance_*.yaml")}
    assert all((m.moe.k, m.moe.num_experts) == (4, 32) for m in balance.values())
    assert balance["balance_loss"].moe.balance_weight > 0 and balance["balance_rsl"].moe.rsl_weight > 0
    assert balance["balance_none"].moe.balance_weight == 0 == balance["balance_none"].moe.rsl_weight
    assert resolved(CONFIGS / "ablation" / "dense_b2.yaml")[1].moe is None


def test_zoo_names_mean_the_papers_full_method() -> None:
    """A RaceDiT-* name alone trains the paper's 8.03-FID row: race + identity, PLR 1e-2, RSL 1e-4, threshold."""
    from racedit.models import zoo_names

    names = [n for n in zoo_names() if n.startswith("RaceDiT")]
    assert names
    for name in names:
        moe = resolve_model_config(name).moe
        assert (moe.router, moe.gating, moe.eval_routing) == ("race", "identity", "threshold"), name
        assert (moe.plr_weight, moe.rsl_weight, moe.balance_weight) == (1e-2, 1e-4, 0.0), name
    # an ablation switches a term off by naming it
    assert resolve_model_config("RaceDiT-B/2-2in8", moe={"plr_weight": 0.0}).moe.plr_weight == 0.0


def test_hidden_split_sweep_grid() -> None:
    """g in {1, 2, 4, 8} for k in {1, 2, 4, 8} (E = 4k), the full method; activated expert FLOPs = k/g x dense."""
    import torch

    from racedit.models import build_model

    seen = set()
    for path in sorted((CONFIGS / "sweeps" / "hidden_split").glob("*.yaml")):
        cfg, m = resolved(path)
        k, g = m.moe.k, m.moe.split
        seen.add((k, g))
        assert (
            path.stem == f"k{k}_g{g}"
            and m.moe.num_experts == 4 * k
            and cfg.train.output_dir.endswith(path.stem)
        )
        assert (m.moe.eval_routing, m.moe.plr_weight, m.moe.rsl_weight) == ("threshold", 1e-2, 1e-4)
        assert (m.hidden_size, m.depth, cfg.train.global_batch_size) == (768, 12, 256)  # the ablation recipe
        with torch.device("meta"):
            layer = build_model(None, config=m).blocks[0].mlp
        D, T = m.hidden_size, 10
        router = T * (D * D + D * layer.num_experts)
        assert (layer.flops(T) - router) * g == T * 2 * D * 4 * D * k  # experts: k/g of the dense MLP
    assert seen == {(k, g) for k in (1, 2, 4, 8) for g in (1, 2, 4, 8)}


def test_paper_recipes() -> None:
    cfg, m = resolved(CONFIGS / "recipes" / "racedit_xl2_4in32.yaml")
    assert (m.depth, m.hidden_size, m.moe.k, m.moe.num_experts) == (28, 1152, 4, 32)
    assert cfg.train.global_batch_size == 1024 and cfg.train.lr == 1e-4 and cfg.train.ema_decay == 0.9999
    cfg, m = resolved(CONFIGS / "recipes" / "dit_xl2.yaml")
    assert m.moe is None and cfg.train.global_batch_size == 1024


def test_accelerate_configs_parse() -> None:
    kinds = {
        p.stem: yaml.safe_load(p.read_text())["distributed_type"]
        for p in (CONFIGS / "accelerate").glob("*.yaml")
    }
    assert kinds == {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP"}


def test_overrides_and_unknown_keys() -> None:
    cfg = load_run_config(
        CONFIGS / "demo.yaml", ["train.lr=3e-4", "model.moe.router=token", "log.trackers=[]"]
    )
    assert cfg.train.lr == 3e-4 and cfg.model.config.moe.router == "token" and cfg.log.trackers == []
    with pytest.raises(ConfigError, match="train.lrr"):
        load_run_config(CONFIGS / "demo.yaml", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="train.max_steps must be >= 1"):
        load_run_config(CONFIGS / "demo.yaml", ["train.max_steps=0"])


def test_lr_schedule() -> None:
    assert [lr_lambda(s, 4, 100, "constant", 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_lambda(4, 4, 104, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_lambda(54, 4, 104, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_lambda(104, 4, 104, "cosine", 0.1) == pytest.approx(0.1)


def test_cli_help_explains_flags(capsys) -> None:
    from racedit.cli.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--resume", "--print-config", "key=value"):
        assert flag in out


def test_every_row_of_the_ablation_reproduction_resolves_to_the_model_it_names() -> None:
    """The dense row writes ``moe: null`` (the base's MoE section would contradict DiT-S/2); no row needs
    the driver to patch its config."""
    from experiments.ablation import load_ablation, run_config
    from racedit.config.core import from_dict
    from racedit.training.config import RunConfig

    ablation = load_ablation(CONFIGS / "repro" / "ablation_digits.yaml")
    names = {v.name: from_dict(RunConfig, run_config(ablation, v, 0)).model.name for v in ablation.variants}
    assert names["dense"] == "DiT-custom(d4,w128,h4)/2"
    assert names["race_full"] == names["token"] == "RaceDiT-custom(d4,w128,h4)/2-2in8"
    assert names["balance_none_4in32"] == "RaceDiT-custom(d4,w128,h4)/2-4in32"
