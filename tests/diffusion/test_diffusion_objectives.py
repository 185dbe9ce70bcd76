"""Training objectives: targets, the hybrid loss's stop-gradient, time conventions, config parsing."""

import pytest
import torch
from torch import nn

import racedit
from racedit.config import ConfigError, from_dict
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.sampling import make_scheduler


class Recorder(nn.Module):
    """A 'model' whose output is a leaf tensor, recording what it was fed."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = nn.Parameter(out)
        self.seen: dict = {}

    def forward(self, x, t, y, aux=None):
        self.seen = {"x": x, "t": t, "y": y}
        return self.out


def test_ddpm_hybrid_loss_target_and_stop_gradient():
    g = torch.Generator().manual_seed(0)
    B, C = 4, 2
    x0 = torch.randn(B, C, 4, 4, generator=g)
    noise = torch.randn(B, C, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    obj = build_objective(DiffusionConfig(), learn_sigma=True)
    model = Recorder(torch.randn(B, 2 * C, 4, 4, generator=g))
    out = obj.per_sample_losses(model, x0, torch.zeros(B, dtype=torch.long), t=t, noise=noise)
    assert out.loss.shape == (B,) and set(out.terms) == {"mse", "vb"}
    assert torch.equal(out.target, noise)  # epsilon, never the sigma channels
    assert torch.allclose(model.seen["x"], obj.q_sample(x0, t, noise))
    assert torch.equal(model.seen["t"], t.float())  # DiT: integer steps as they are
    mse = ((noise - model.out[:, :C]) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(out.terms["mse"], mse)
    assert torch.allclose(out.loss, out.terms["mse"] + out.terms["vb"])
    # VB term: no gradient into the epsilon channels (mean detached); MSE: none into sigma channels
    out.terms["vb"].sum().backward(retain_graph=True)
    assert model.out.grad[:, :C].abs().max() == 0 and model.out.grad[:, C:].abs().max() > 0
    model.out.grad = None
    out.terms["mse"].sum().backward()
    assert model.out.grad[:, C:].abs().max() == 0 and model.out.grad[:, :C].abs().max() > 0


def test_ddpm_without_sigma_and_channel_check():
    obj = build_objective(DiffusionConfig(), learn_sigma=False)
    x0 = torch.randn(3, 2, 4, 4)
    out = obj.training_loss(Recorder(torch.randn(3, 2, 4, 4)), x0, torch.zeros(3, dtype=torch.long))
    assert set(out.terms) == {"mse"} and out.loss.ndim == 0 and torch.equal(out.loss, out.terms["mse"])
    with pytest.raises(ValueError, match="learn_sigma"):
        obj.training_loss(Recorder(torch.randn(3, 4, 4, 4)), x0, torch.zeros(3, dtype=torch.long))


def test_flow_target_convention_and_time_scale():
    g = torch.Generator().manual_seed(1)
    B, C = 5, 3
    x0, noise = torch.randn(B, C, 2, 2, generator=g), torch.randn(B, C, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    obj = build_objective(DiffusionConfig(objective="flow"), learn_sigma=True)
    model = Recorder(torch.randn(B, 2 * C, 2, 2, generator=g))
    out = obj.per_sample_losses(model, x0, torch.zeros(B, dtype=torch.long), t=t, noise=noise)
    assert torch.equal(out.target, noise - x0)  # velocity, t = 0 data, t = 1 noise
    assert torch.allclose(model.seen["x"][0], x0[0]) and torch.allclose(model.seen["x"][-1], noise[-1])
    assert torch.allclose(model.seen["t"], t * 1000)
    # the sigma channels of a learn_sigma model are ignored
    assert torch.allclose(out.loss, ((noise - x0 - model.out[:, :C]) ** 2).mean(dim=(1, 2, 3)))
    assert obj.normalized_time(250.0) == 0.25


def test_time_sampling_distributions_and_generator():
    obj = build_objective(
        DiffusionConfig(objective="flow", time_sampling="logit_normal", logit_std=0.5), False
    )
    t = obj.sample_t(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(torch.logit(t).mean().item()) < 0.02 and abs(torch.logit(t).std().item() - 0.5) < 0.02
    ddpm = build_objective(DiffusionConfig(), True)
    a = ddpm.sample_t(64, torch.device("cpu"), torch.Generator().manual_seed(3))
    b = ddpm.sample_t(64, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 999 and a.dtype == torch.long


def test_training_loss_on_real_model_backprops():
    torch.manual_seed(0)
    model = racedit.build_model("DiT-S/2", input_size=8, num_classes=10, hidden_size=64, depth=2, num_heads=2)
    model.train()
    for objective in ("ddpm", "flow"):
        obj = build_objective(DiffusionConfig(objective=objective), model.arch.learn_sigma)
        out = obj.training_loss(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.target.shape == (2, 4, 8, 8) and out.t.shape == (2,)
        model.zero_grad()
        out.loss.backward()
        assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_ddpm_step_of_diffusers_equals_our_learned_range_posterior():
    """The sampler (diffusers, learned range) and the loss (ours) agree on p(x_{t-1} | x_t)."""
    obj = build_objective(DiffusionConfig(), learn_sigma=True)
    sched = make_scheduler(obj, "ddpm", 1000)
    g = torch.Generator().manual_seed(0)
    x, eps, v = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    v = v.clamp(-1, 1)
    t = torch.tensor([400, 400])
    prev = sched.step(torch.cat([eps, v], 1), 400, x, generator=torch.Generator().manual_seed(5)).prev_sample
    mean, _ = obj.q_posterior(obj.predict_x0(x, t, eps), x, t)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    ours = mean + (0.5 * obj.model_log_variance(v, t)).exp() * z
    assert torch.allclose(prev, ours, atol=1e-4)


def test_config_from_dict_validates():
    cfg = from_dict(
        DiffusionConfig, {"objective": "flow", "time_sampling": "logit_normal"}, prefix="diffusion"
    )
    assert cfg.objective == "flow"
    with pytest.raises(ConfigError, match="diffusion.nope"):
        from_dict(DiffusionConfig, {"nope": 1}, prefix="diffusion")
    with pytest.raises(ConfigError):
        from_dict(DiffusionConfig, {"objective": "edm"}, prefix="diffusion")
    with pytest.raises(ValueError, match="logit_std"):
        DiffusionConfig(logit_std=0)
