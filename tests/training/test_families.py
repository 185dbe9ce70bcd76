"""A few training steps of every zoo family (dense, each router, each connection variant, both objectives)
through the trainer's own step decrease the loss on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import tiny_run

from racedit.config.core import from_dict
from racedit.training.config import RunConfig
from racedit.training.loop import Trainer

FAMILIES = {
    "dense-flow": ({"name": "DiT-S/2"}, "flow"),
    "dense-ddpm": ({"name": "DiT-S/2"}, "ddpm"),
    "race-ddpm": ({"name": "RaceDiT-S/2-2in8", "moe": {"plr_weight": 0.01, "rsl_weight": 1e-4}}, "ddpm"),
    **{
        f"router-{r}": ({"name": "RaceDiT-S/2-2in8", "moe": {"router": r, "balance_weight": 0.01}}, "flow")
        for r in ("token", "expert", "bl", "be", "le", "race")
    },
    "gating-softmax": ({"name": "RaceDiT-S/2-2in8", "moe": {"gating": "softmax"}}, "flow"),
    "gating-sigmoid": ({"name": "RaceDiT-S/2-2in8", "moe": {"gating": "sigmoid"}}, "flow"),
    **{f"conn-{s}": ({"name": f"DiT-S/2-{s}"}, "flow") for s in ("HCx2", "DHCx2", "FCx2", "DFCx2", "mHCx2")},
    "race-FCx2": ({"name": "RaceDiT-S/2-2in8-FCx2"}, "flow"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_decreases_on_a_fixed_batch(family: str, tmp_path: Path, one_thread) -> None:
    model, objective = FAMILIES[family]
    model = {**model, "hidden_size": 32, "depth": 2, "num_heads": 2}
    run = tiny_run(tmp_path / "run", diffusion={"objective": objective}, train={"lr": 3e-3})
    run["model"] = model  # replace the tiny default (a 2-in-8 MoE section would contradict a dense name)
    cfg = from_dict(RunConfig, run)
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.consecutive_skips = 0
    x, y = next(trainer.stream)  # one fixed batch (16 digits)

    class Fixed:
        def __next__(self):
            return x, y

    trainer.stream = Fixed()

    def fixed_loss() -> float:  # the same timesteps and noise every time
        trainer.noise.manual_seed(1234)
        torch.manual_seed(1234)
        with torch.no_grad():
            return float(trainer.compute_loss(x, y)[0])

    start = fixed_loss()
    for _ in range(12):
        scalars = trainer.train_step()
        assert scalars is not None and torch.isfinite(torch.tensor(scalars["loss"]))
    end = fixed_loss()
    assert end < 0.9 * start, f"{family}: loss {start:.4f} -> {end:.4f}"


def _setup(tmp_path: Path, model: dict | None = None, **train) -> Trainer:
    run = tiny_run(tmp_path / "run", train={"lr": 1e-3, **train})
    if model is not None:
        run["model"] = model
    cfg = from_dict(RunConfig, run)
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.consecutive_skips = 0
    return trainer


@pytest.mark.parametrize(
    "model",
    [
        pytest.param({"name": "DiT-S/2"}, id="dense"),
        pytest.param(
            {"name": "RaceDiT-S/2-2in8", "moe": {"plr_weight": 0.01, "rsl_weight": 1e-4}},
            id="race",
        ),
    ],
)
def test_gradient_checkpointing_gives_the_same_step(model: dict, tmp_path: Path, one_thread) -> None:
    """Same loss, same updated weights, and tau advances once per forward (not again in the recompute)."""
    model = {**model, "hidden_size": 32, "depth": 2, "num_heads": 2}
    plain = _setup(tmp_path / "a", model=model)
    ckpt = _setup(tmp_path / "b", model=model, gradient_checkpointing=True)
    assert ckpt.raw_model.gradient_checkpointing
    # Leave adaLN-Zero's init: there most block gradients are exactly zero or fp noise, and Adam's first
    # step (about lr * sign(g)) would turn noise of either sign into lr-sized differences.
    for trainer in (plain, ckpt):
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in trainer.raw_model.named_parameters():
                if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    torch.manual_seed(0)  # label dropout draws from the global generator, shared by both trainers here
    a = plain.train_step()
    torch.manual_seed(0)
    b = ckpt.train_step()
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    sa, sb = plain.raw_model.state_dict(), ckpt.raw_model.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-6), k
    updates = [int(v) for k, v in sb.items() if k.endswith("threshold.updates")]
    assert all(u == 1 for u in updates) and (bool(updates) == ("moe" in model))


# bf16 keeps 8 significant bits (relative rounding 2^-9 per operand of every product under autocast); the first
# loss of a two-block model passes through ~10 such roundings of random sign, so it stays within ~2^-9 * 10 of
# the float32 loss: 2^-5 leaves margin. (Later steps compare updated weights, where Adam's first steps, ~lr *
# sign(g), would turn rounding-level gradient differences into lr-sized weight differences.)
BF16_FIRST_LOSS_RTOL = 2.0**-5


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(None, id="race"),  # the tiny default: RaceDiT-S/2-2in8
        pytest.param({"name": "DiT-S/2-mHCx2"}, id="dense-mHCx2"),
        pytest.param({"name": "DiT-S/2-FCx2"}, id="dense-FCx2"),
        pytest.param({"name": "RaceDiT-S/2-2in8-HCx2"}, id="race-HCx2"),
    ],
)
def test_bf16_autocast_steps_on_cpu(model: dict | None, tmp_path: Path, one_thread) -> None:
    """``mixed_precision: bf16`` trains every family (connections included: their stream stays float32), with
    float32 master weights, from the float32 run's first loss within bf16 rounding."""
    if model is not None:
        model = {**model, "hidden_size": 32, "depth": 2, "num_heads": 2}
    losses = {}
    for precision in ("no", "bf16"):
        trainer = _setup(tmp_path / precision, model=model, mixed_precision=precision)
        g = torch.Generator().manual_seed(
            7
        )  # open adaLN-Zero's gates: at init every branch is multiplied by 0
        with torch.no_grad():
            for name, p in trainer.raw_model.named_parameters():
                if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        torch.manual_seed(0)  # label dropout and the step's noise: the same draws in both runs
        losses[precision] = [trainer.train_step()["loss"] for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert losses["bf16"][0] == pytest.approx(losses["no"][0], rel=BF16_FIRST_LOSS_RTOL)
    assert losses["bf16"][0] != losses["no"][0]  # autocast really ran the forward in bf16
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())  # fp32 master weights
    assert all(p.dtype == torch.float32 for p in trainer.ema.model.parameters())
