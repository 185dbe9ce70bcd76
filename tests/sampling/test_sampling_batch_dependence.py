"""Does one sample's output depend on the rest of its batch? For every router and eval routing: the claim
(a table here), the library's own answer (``inference_batch_dependence``), and the behaviour; where it
depends, the same call with the same batch size reproduces the same bytes. Guided halves: joint vs separate.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from sampling_helpers import make_tiny_model

import racedit
from racedit.cli.sample import main
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.moe import inference_batch_dependence
from racedit.sampling import sample_latents, write_sampling_meta
from racedit.sampling.guidance import Guidance, guided_forward

# (router, eval_routing) -> whether a sample's eval-mode output depends on the other samples of its batch.
# eval_routing only acts for expert race; the others route the same way in train and eval mode.
DEPENDS = {
    ("token", "threshold"): False,  # top-k over E, per token
    ("token", "topk"): False,
    ("expert", "threshold"): False,  # top-K over L, per sample and expert
    ("expert", "topk"): False,
    ("le", "threshold"): False,  # top-K over L*E, per sample
    ("le", "topk"): False,
    ("bl", "threshold"): True,  # top-K over B*L, per expert: samples compete
    ("bl", "topk"): True,
    ("be", "threshold"): True,  # top-K over B*E, per token position
    ("be", "topk"): True,
    ("race", "threshold"): False,  # score >= tau: a constant per layer
    ("race", "topk"): True,  # top-K over B*L*E
}


def moe_model(router: str, eval_routing: str, set_tau: bool = True, in_channels: int = 4):
    """A tiny 2-in-8 Race-DiT with random (non-zero) weights everywhere, tau set by one training forward."""
    model = make_tiny_model(
        in_channels, name="RaceDiT-S/2-2in8", moe={"router": router, "eval_routing": eval_routing}
    )
    if set_tau:
        model.train()
        with torch.no_grad():
            model(torch.randn(8, in_channels, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,)))
    return model.eval()


def inputs(B: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, 8, 8, generator=g), torch.randint(0, 1000, (B,), generator=g), torch.arange(B)


@pytest.mark.parametrize("router,eval_routing", list(DEPENDS), ids=lambda v: str(v))
def test_one_sample_alone_vs_in_a_batch(router, eval_routing):
    model = moe_model(router, eval_routing)
    depends = DEPENDS[(router, eval_routing)]
    assert (inference_batch_dependence(model) is not None) == depends
    x, t, y = inputs()
    with torch.no_grad():
        in_batch = model(x, t, y)[0]
        alone = model(x[:1], t[:1], y[:1])[0]
        again = model(x, t, y)[0]
    assert torch.equal(in_batch, again)  # same batch, same bytes
    if depends:
        # other samples took experts from sample 0 (or gave some up): O(0.1) changes, far above rounding
        assert (alone - in_batch).abs().max() > 1e-3
    else:
        # the same arithmetic on fewer rows: only matmul rounding may differ (float32, O(1) values)
        torch.testing.assert_close(alone, in_batch, rtol=1e-5, atol=1e-5)


def test_race_threshold_before_any_training_step_ranks_across_the_batch():
    model = moe_model("race", "threshold", set_tau=False)
    assert "never set" in inference_batch_dependence(model)
    assert inference_batch_dependence(racedit.build_model("DiT-S/2", input_size=8, num_classes=10)) is None


@pytest.mark.parametrize("router,eval_routing", [("bl", "topk"), ("race", "topk"), ("race", "threshold")])
def test_sampling_reproduces_bytes_with_the_same_batch_size(router, eval_routing):
    model = moe_model(router, eval_routing)
    obj = build_objective(DiffusionConfig(objective="flow"), False)
    labels = [3, 1, 4, 1, 5]
    kw = dict(objective=obj, sampler="euler", steps=4, cfg_scale=2.0, seed=5)
    a = sample_latents(model, labels, batch_size=4, **kw)
    b = sample_latents(model, labels, batch_size=4, **kw)
    assert torch.equal(a, b)
    c = sample_latents(model, labels, batch_size=1, **kw)
    if DEPENDS[(router, eval_routing)]:
        assert (a - c).abs().max() > 1e-3
    else:  # 4 Euler steps of float32 rounding differences, O(1) latents
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router,eval_routing", [("bl", "topk"), ("race", "threshold")])
def test_guided_halves_joint_or_separate(router, eval_routing):
    model = moe_model(router, eval_routing)
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    s = 3.0
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        separate = guided_forward(model, x, t, y, Guidance(scale=s, halves="separate"), 0.5, 4)
        joint = guided_forward(model, x, t, y, Guidance(scale=s, halves="joint"), 0.5, 4)
    # separate = two plain forwards: the conditional half routes exactly as unguided sampling would
    want = torch.cat([uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)
    assert torch.equal(separate, want)
    if DEPENDS[(router, eval_routing)]:
        assert (joint - separate).abs().max() > 1e-3  # the unconditional copies raced with the conditional
    else:  # guidance multiplies rounding differences by s = 3
        torch.testing.assert_close(joint, separate, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="halves"):
        Guidance(scale=2.0, halves="both")


def test_cli_says_when_batch_dependent_and_records_it(tmp_path, capsys):
    model_dir = tmp_path / "bl"
    racedit.save_model(moe_model("bl", "topk", in_channels=3), model_dir)
    write_sampling_meta(model_dir, space="pixel", vae=None, diffusion={"objective": "flow"}, image_size=8)
    out = tmp_path / "grid.png"  # --out DIR: the grid's name inside it is fixed
    args = ["--ckpt", str(model_dir), "--classes", "2", "7", "--num-per-class", "3", "--steps", "2"]
    assert main([*args, "--batch-size", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "batch-dependent" in line]
    assert len(lines) == 1 and "router 'bl'" in lines[0] and "--batch-size 4" in lines[0]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["batch_dependence"].startswith("router 'bl' ranks across the batch")
    assert record["batch_size"] == 4 and record["class_order"] == [2, 2, 2, 7, 7, 7]
    assert record["cfg_halves"] == "joint"
    first = out.read_bytes()
    assert main([*args, "--batch-size", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    assert out.read_bytes() == first  # the same command, the same bytes

    # evaluation file: the record names the label order by the hash of arr_1 (batches are runs of it)
    npz = tmp_path / "s" / "samples.npz"
    eval_args = ["--ckpt", str(model_dir), "--num-samples", "5", "--out", str(npz.parent), "--steps", "2"]
    assert main([*eval_args, "--batch-size", "2", "--chunk-size", "4", "--no-progress"]) == 0
    rec = json.loads(npz.with_suffix(".json").read_text())
    with np.load(npz) as z:
        assert rec["class_order_sha256"] == hashlib.sha256(z["arr_1"].astype("<i8").tobytes()).hexdigest()
    assert rec["batch_size"] == 2 and rec["chunk_size"] == 4 and rec["batch_dependence"] is not None

    race_dir = tmp_path / "race"
    racedit.save_model(moe_model("race", "threshold", in_channels=3), race_dir)
    write_sampling_meta(race_dir, space="pixel", vae=None, diffusion={"objective": "flow"}, image_size=8)
    capsys.readouterr()
    g2 = tmp_path / "g2"
    assert main(["--ckpt", str(race_dir), "--steps", "2", "--out", str(g2), "--no-progress"]) == 0
    assert "batch-dependent" not in capsys.readouterr().err
    assert json.loads((g2 / "grid.json").read_text())["batch_dependence"] is None
