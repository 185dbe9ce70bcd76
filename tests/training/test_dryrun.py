"""``train_imagenet.py --dry-run``: passes on a good launch, lists what a real run would fail on, and
handles the XL recipe on a CPU machine through the meta device and the reduced-depth copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from racedit.models import DiT, resolve_model_config
from racedit.models.loading import model_kwargs
from racedit.testing import save_tiny_autoencoder
from racedit.training.config import load_run_config
from racedit.training.dryrun import DryRun, state_memory

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("ant", "bee", "cow")


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 latents of 3 classes (4 x 4 x 4), extracted through a tiny random AutoencoderKL."""

    from racedit.cli.extract import main as extract

    root = tmp_path_factory.mktemp("dryrun")
    save_tiny_autoencoder(root / "vae", num_blocks=4, width=4, sample_size=32)
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
                root / "images" / name / f"{i}.png"
            )
    args = ["extract", "--data-dir", str(root / "images"), "--out", str(root / "latents")]
    args += ["--vae", str(root / "vae"), "--resolution", "32", "--shard-size", "8", "--num-workers", "0"]
    assert extract(args) == 0
    return root / "latents"


def small_config(tmp_path: Path, latents: Path, **sections) -> Path:
    cfg = {
        "model": {"name": "RaceDiT-S/2-2in8-HCx2", "hidden_size": 32, "depth": 2, "num_heads": 2,
                  "moe": {"plr_weight": 0.01, "rsl_weight": 1.0e-4}},
        "diffusion": {"objective": "flow"},
        "data": {"kind": "latents", "root": str(latents)},
        "train": {"output_dir": str(tmp_path / "run"), "global_batch_size": 8, "lr": 1e-3},
        "sample": {"classes": [0, 1, 2]},
        "log": {"trackers": []},
    }  # fmt: skip
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_passes_on_a_good_launch(tmp_path, latents, capsys):
    path = small_config(tmp_path, latents)
    cfg = load_run_config(path, [])
    report = DryRun(cfg, world_size=4, config_path=str(path)).run()
    out = capsys.readouterr().out
    assert report.problems == [], out
    assert report.full_model_run is True  # a model this small is trained as it is
    assert report.checkpoint_ok is True and "checkpoint round trip ok" in out
    assert len(report.step_times) == 2 and all(t > 0 for t in report.step_times)
    # the counts are those of the model the run builds (3 classes and 4x4x4 inputs taken from the data)
    mc = resolve_model_config(
        "RaceDiT-S/2-2in8-HCx2", hidden_size=32, depth=2, num_heads=2, input_size=4, in_channels=4,
        num_classes=3, learn_sigma=False, moe={"plr_weight": 0.01, "rsl_weight": 1.0e-4},
    )  # fmt: skip
    model = DiT(**model_kwargs(mc))
    assert report.params_total == sum(p.numel() for p in model.parameters())
    # 12 bytes per trained parameter (gradient, 2 AdamW moments) + 8 per parameter (fp32 weights and EMA);
    # FSDP: a quarter of each part at world size 4
    n, n_train = report.params_total, sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.memory["DDP"]["total"] == 8 * n + 12 * n_train
    for part, nbytes in report.memory["DDP"].items():
        assert report.memory["FSDP"][part] == pytest.approx(nbytes / 4, abs=4)
    assert "| DDP |" in out and "| FSDP |" in out and "world size 4" in out
    # the grid went through the VAE: 3 classes, 32 x 32 pixels, not a constant image
    assert report.grid is not None and "decoded to (3, 32, 32, 3) torch.uint8" in out
    assert not (tmp_path / "run").exists()  # the dry run never touches train.output_dir


def test_dry_run_lists_every_problem_and_exits_2(tmp_path, latents, capsys):
    from racedit.cli.train import main

    broken = tmp_path / "latents"
    shutil.copytree(latents, broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["vae"] = "racedit-tests/no-such-vae"  # a hub id that is not in any local cache
    (broken / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "run" / "checkpoints" / "step_00000010").mkdir(parents=True)  # another run's checkpoint
    path = small_config(tmp_path, broken, train={"global_batch_size": 6})
    code = main(["--config", str(path), "--dry-run", "--world-size", "4", "model.num_classes=5"])
    out = capsys.readouterr().out
    assert code == 2
    problems = out.split("problem(s) a real run would fail on:")[1]
    assert "model.num_classes = 5" in problems and "3 classes" in problems
    assert "racedit-tests/no-such-vae" in problems and "not available locally" in problems
    assert "not divisible by processes x grad_accum = 4 x 1" in problems
    assert "holds 1 checkpoint(s) (step_00000010 ...) and this run starts fresh" in problems
    assert problems.count("\n  ") == 4  # exactly these four
    assert (tmp_path / "run" / "checkpoints" / "step_00000010").is_dir()  # nothing was moved


def test_state_memory_shards_every_part_under_fsdp():
    mem = state_memory(params_total=1000, params_trainable=900, world_size=8)
    assert mem["DDP"] == {"params": 4000, "grads": 3600, "AdamW moments": 7200, "EMA": 4000, "total": 18800}
    assert mem["FSDP"] == {"params": 500, "grads": 450, "AdamW moments": 900, "EMA": 500, "total": 2350}


@pytest.mark.slow
def test_recipe_xl_dry_run_on_a_cpu_machine(latents, capsys):
    """The XL recipe as shipped, pointed at a tiny latents folder: counted on the meta device, stepped on a
    2-block copy (about 200M parameters), and the two things that are wrong with that data are listed."""
    path = REPO / "configs" / "recipes" / "racedit_xl2_4in32.yaml"
    cfg = load_run_config(path, [f"data.root={latents}", "data.num_workers=0"])
    report = DryRun(cfg, world_size=8, config_path=str(path)).run()
    out = capsys.readouterr().out
    assert report.full_model_run is False and "a copy with 2 blocks at width 1152" in out
    assert report.checkpoint_ok is True and len(report.step_times) == 2
    # The zoo's RaceDiT-XL/2-4in32 (1000 classes, 32x32 latents) has 2,796,156,064 parameters without PLR
    # heads. On these latents: 4 tokens instead of 256 (position embedding), 3 + 1 label rows instead of
    # 1000 + 1, and the recipe's PLR adds one target head per MoE layer, 1152 -> 2 x 2 x 4 values per token
    # (with bias).
    expected = 2_796_156_064 - (256 - 4) * 1152 - (1001 - 4) * 1152 + 28 * (1152 * 16 + 16)
    assert report.params_total == expected
    assert report.memory["DDP"]["total"] > 50 * 2**30  # ~52 GiB per GPU: the reason for FSDP
    assert report.memory["FSDP"]["total"] == pytest.approx(report.memory["DDP"]["total"] / 8, abs=16)
    assert len(report.problems) == 2
    assert "fewer than one global micro-batch (128 x 8 processes)" in report.problems[0]
    assert "sample.classes [207, 360" in report.problems[1]
