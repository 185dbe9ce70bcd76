"""racedit-analyze norms: the hooks measure what the blocks compute (checked against a hand-run forward),
the noising matches training's, and the command writes the CSV and the plot."""

from __future__ import annotations

import csv

import pytest
import torch

import racedit
from racedit.analysis.norms import QUANTITIES, layer_norms, noisy_input
from racedit.cli.analyze import main
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.sampling import write_sampling_meta


def tiny(moe: bool = False):
    torch.manual_seed(0)
    name = "RaceDiT-S/2-2in8" if moe else "DiT-S/2"
    model = racedit.build_model(name, input_size=8, num_classes=10, hidden_size=32, depth=3, num_heads=2,
                                in_channels=1, learn_sigma=False)  # fmt: skip
    with torch.no_grad():  # DiT's zero init makes every block the identity: nothing to measure
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_noisy_input_is_the_training_forward_process(objective):
    obj = build_objective(DiffusionConfig(objective=objective), False)
    x0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    if objective == "flow":
        x, t = noisy_input(obj, x0, 0.25, noise)
        torch.testing.assert_close(x, 0.75 * x0 + 0.25 * noise)
        assert t.tolist() == [250.0, 250.0]  # t * time_scale
    else:
        x, t = noisy_input(obj, x0, 1.0, noise)
        assert t.tolist() == [999.0, 999.0]
        torch.testing.assert_close(x, obj.q_sample(x0, torch.tensor([999, 999]), noise))


@pytest.mark.parametrize("moe", [False, True])
def test_norms_equal_a_hand_run_forward(moe):
    model = tiny(moe)
    obj = build_objective(DiffusionConfig(objective="flow"), False)
    x0, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    # the untrained race model has no threshold yet, so it ranks across the batch: one batch of 5 then
    batch = 5 if moe else 2
    table = layer_norms(model, obj, x0, y, [0.0, 0.5], batch_size=batch, seed=3)
    assert table.mean["stream"].shape == (2, 3) and table.model_t == [0.0, 500.0]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    x_t, t = noisy_input(obj, x0, 0.5, noise)
    with torch.no_grad():
        h = model.x_embedder(x_t) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        for i, block in enumerate(model.blocks):
            mlp_out: list[torch.Tensor] = []
            hook = block.mlp.register_forward_hook(lambda m, a, o, store=mlp_out: store.append(o))
            out = block(h, c)
            hook.remove()
            want = {
                "stream": out.norm(dim=-1).mean(1),
                "update": (out - h).norm(dim=-1).mean(1),
                "mlp": mlp_out[0].norm(dim=-1).mean(1),
            }
            for q in QUANTITIES:  # float32 forwards, batches of 2 vs 5 (dense): rounding only
                assert table.mean[q][1, i] == pytest.approx(want[q].double().mean().item(), rel=1e-5), (q, i)
                assert table.std[q][1, i] == pytest.approx(
                    want[q].double().std(correction=0).item(), rel=1e-3, abs=1e-6
                )
            h = out


def test_command_writes_csv_and_plot(tmp_path, capsys):
    model_dir = tmp_path / "model"
    racedit.save_model(tiny(moe=True), model_dir)
    write_sampling_meta(model_dir, space="pixel", vae=None, diffusion={"objective": "flow"}, image_size=8)
    out = tmp_path / "analysis"
    args = ["norms", "--ckpt", str(model_dir), "--data", "digits", "--num-samples", "6", "--levels", "3",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = list(csv.DictReader((out / "norms.csv").open()))
    assert len(rows) == 3 * 3 * 3  # quantities x levels x blocks
    assert {r["quantity"] for r in rows} == set(QUANTITIES)
    assert sorted({float(r["noise_level"]) for r in rows}) == [0.0, 0.5, 1.0]
    assert all(float(r["mean"]) > 0 for r in rows)
    assert (out / "norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no data named anywhere: one line, exit code 2
    assert main(["norms", "--ckpt", str(model_dir)]) == 2
    assert "--data digits" in capsys.readouterr().err
