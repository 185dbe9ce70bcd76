"""Classifier-free guidance: scale 1 is the conditional prediction in one forward; the interval is
respected; the 3-channel mode touches only the first 3 channels; sigma channels come from cond."""

import pytest
import torch
from sampling_helpers import make_tiny_model

from racedit.diffusion import DiffusionConfig, build_objective
from racedit.sampling import Guidance, generate, guided_forward


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.arch, self.y_embedder = model, model.arch, model.y_embedder
        self.calls: list[tuple[int, float]] = []
        self.eval()

    def forward(self, x, t, y, aux=None):
        self.calls.append((x.shape[0], float(t[0])))
        return self.model(x, t, y)


def _inputs(B=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 4, 8, 8, generator=g), torch.full((B,), 500.0), torch.tensor([1, 2, 3][:B])


def test_scale_one_is_conditional_in_one_forward():
    m = CountingModel(make_tiny_model())
    x, t, y = _inputs()
    with torch.no_grad():
        out = guided_forward(m, x, t, y, Guidance(scale=1.0), 0.5, 4)
        ref = m.model(x, t, y)
    assert torch.equal(out, ref) and m.calls == [(3, 500.0)]


@pytest.mark.parametrize("channels", ["all", 3])
def test_guided_channels_formula(channels):
    m = CountingModel(make_tiny_model())
    x, t, y = _inputs()
    s = 2.5
    with torch.no_grad():
        out = guided_forward(m, x, t, y, Guidance(scale=s, channels=channels), 0.5, 4)
        cond, uncond = m.model(x, t, y), m.model(x, t, torch.full_like(y, 10))
    assert m.calls == [(6, 500.0)]  # one batched forward of cond + uncond
    k = 4 if channels == "all" else 3
    assert torch.allclose(out[:, :k], uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k]), atol=1e-5)
    assert torch.allclose(out[:, k:], cond[:, k:], atol=1e-6)  # unguided eps channel(s) and sigma: cond
    assert not torch.allclose(out[:, :k], cond[:, :k], atol=1e-3)


def test_guidance_interval_in_a_sampling_run():
    m = CountingModel(make_tiny_model(in_channels=3))
    obj = build_objective(DiffusionConfig(), True)
    lo, hi = 0.2, 0.6
    generate(m, [1, 2], objective=obj, sampler="ddim", steps=10, cfg_scale=4.0, guidance_interval=(lo, hi))
    assert len(m.calls) == 10
    for batch, t in m.calls:  # ddim50 grid: t = 900, 800, ..., 0; noise level t / 1000
        assert batch == (4 if lo <= t / 1000 <= hi else 2), (batch, t)
    assert {b for b, _ in m.calls} == {2, 4}
    # scale 1: never a second pass
    m.calls.clear()
    generate(m, [1, 2], objective=obj, sampler="ddim", steps=5, cfg_scale=1.0)
    assert [b for b, _ in m.calls] == [2] * 5


def test_guidance_changes_samples_and_needs_null_class():
    m = make_tiny_model(in_channels=3)
    obj = build_objective(DiffusionConfig(objective="flow"), True)
    a = generate(m, [3], objective=obj, sampler="euler", steps=4, cfg_scale=1.0)
    b = generate(m, [3], objective=obj, sampler="euler", steps=4, cfg_scale=4.0)
    assert not torch.equal(a, b)
    no_null = make_tiny_model(in_channels=3, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        generate(no_null, [3], objective=obj, sampler="euler", steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="interval"):
        Guidance(scale=2.0, interval=(0.7, 0.2))
