"""Schedules equal diffusers'; respacing equals DiT's; the VB term equals a direct computation."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from racedit.diffusion import DiffusionConfig, GaussianSchedule, build_objective, make_betas, space_timesteps
from racedit.diffusion.schedule import respaced_betas


@pytest.mark.parametrize("kind,diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_betas_and_alphas_cumprod_equal_diffusers(kind, diffusers_name):
    ours = GaussianSchedule.from_betas(make_betas(DiffusionConfig(beta_schedule=kind)))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name)
    assert torch.allclose(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-8)
    assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-9)
    if kind == "linear":  # DiT: linspace(1e-4, 0.02, 1000)
        assert ours.betas[0].item() == pytest.approx(1e-4) and ours.betas[-1].item() == pytest.approx(0.02)


def test_posterior_variance_equals_diffusers():
    ours = GaussianSchedule.from_betas(make_betas(DiffusionConfig()))
    ref = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small")
    for t in (1, 2, 10, 250, 500, 999):
        assert ours.posterior_variance[t].item() == pytest.approx(ref._get_variance(t).item(), rel=1e-3)
    assert ours.posterior_variance[0].item() == 0.0  # and the clipped log uses beta~_1 at t = 0
    assert ours.posterior_log_variance_clipped[0] == ours.posterior_log_variance_clipped[1]


@pytest.mark.parametrize("steps", [250, 100, 50, 27])
def test_dit_respacing_equals_diffusers_linspace(steps):
    ours = space_timesteps(1000, str(steps))
    ref = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    assert ours == sorted(ref.timesteps.tolist())
    assert len(ours) == steps and ours[0] == 0 and ours[-1] == 999


def test_dit_250_by_hand_and_ddim_spacing():
    # DiT's "250": fractional stride 999/249 from 0, rounded (improved DDPM's space_timesteps)
    stride = 999 / 249
    expected, cur = [], 0.0
    for _ in range(250):
        expected.append(round(cur))
        cur += stride
    assert space_timesteps(1000, "250") == expected
    ddim = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading")
    ddim.set_timesteps(50)
    assert space_timesteps(1000, "ddim50") == sorted(ddim.timesteps.tolist()) == list(range(0, 1000, 20))
    assert space_timesteps(100, "10,5") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]


def test_respaced_betas_match_diffusers_step_betas():
    sched = GaussianSchedule.from_betas(make_betas(DiffusionConfig()))
    kept = space_timesteps(1000, "25")
    ours = respaced_betas(sched.alphas_cumprod, kept)
    ref = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    ref.set_timesteps(25)
    for i, t in enumerate(kept):
        prev = ref.previous_timestep(t)
        acp_prev = ref.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        assert ours[i].item() == pytest.approx(
            (1 - ref.alphas_cumprod[t] / acp_prev).item(), rel=1e-3, abs=1e-7
        )
    # the respaced chain keeps abar at the kept steps
    assert torch.allclose(sched.respaced(kept).alphas_cumprod, sched.alphas_cumprod[kept])


def _direct_vb(obj, x0, x_t, t, eps, v):
    """The VB term from the definitions, with torch.distributions and the exact normal CDF."""
    betas = obj.schedule.betas
    acp = torch.cumprod(1 - betas, 0)
    out = []
    for i in range(x0.shape[0]):
        ti = int(t[i])
        a, a_prev = acp[ti], (acp[ti - 1] if ti > 0 else torch.tensor(1.0, dtype=torch.float64))
        beta = betas[ti]
        x0_hat = (x_t[i].double() - (1 - a).sqrt() * eps[i].double()) / a.sqrt()

        xt = x_t[i].double()

        def post_mean(x0_, xt=xt, a=a, a_prev=a_prev, beta=beta):
            return (a_prev.sqrt() * beta / (1 - a)) * x0_ + ((1 - a_prev) * (1 - beta).sqrt() / (1 - a)) * xt

        post_var_t = beta * (1 - a_prev) / (1 - a)
        if ti == 0:  # clipped: use beta~_1
            post_var_t = betas[1] * (1 - acp[0]) / (1 - acp[1])
        frac = (v[i].double() + 1) / 2
        logvar = frac * torch.log(beta) + (1 - frac) * torch.log(post_var_t)
        model = torch.distributions.Normal(post_mean(x0_hat), (0.5 * logvar).exp())
        if ti > 0:
            true = torch.distributions.Normal(post_mean(x0[i].double()), post_var_t.sqrt())
            out.append(torch.distributions.kl_divergence(true, model).mean() / math.log(2))
        else:
            x = x0[i].double()
            hi = torch.where(x > 0.999, torch.ones_like(x), model.cdf(x + 1 / 255))
            lo = torch.where(x < -0.999, torch.zeros_like(x), model.cdf(x - 1 / 255))
            out.append(-torch.log(hi - lo).mean() / math.log(2))
    return torch.stack(out)


def test_vb_term_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    obj = build_objective(DiffusionConfig(), learn_sigma=True)
    B = 6
    x0 = (torch.rand(B, 3, 4, 4, generator=g) * 2 - 1).round(decimals=2)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the edge bins
    t = torch.tensor([0, 0, 1, 17, 500, 999])
    noise = torch.randn(x0.shape, generator=g)
    x_t = obj.q_sample(x0, t, noise)
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    ours = obj.vb_terms(x0, x_t, t, eps, v)
    direct = _direct_vb(obj, x0, x_t, t, eps, v)
    assert torch.allclose(ours[2:].double(), direct[2:], rtol=2e-3, atol=1e-6)  # KL terms
    # decoder NLL: ours uses DiT's tanh approximation of the normal CDF
    assert torch.allclose(ours[:2].double(), direct[:2], rtol=2e-2)
    assert (ours >= 0).all()
    # a perfect prediction with the true posterior variance gives zero KL
    v_post = -torch.ones_like(v)
    zero = obj.vb_terms(x0, x_t, t, noise, v_post)
    assert zero[2:].abs().max() < 1e-4


def test_schedule_rejects_bad_betas():
    with pytest.raises(ValueError):
        GaussianSchedule.from_betas(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="beta_start"):
        DiffusionConfig(beta_start=0.1, beta_end=0.01)
    # 0.02 x 1000/10 = 2 is not a beta: the error names the key and the smallest valid T
    with pytest.raises(ValueError, match=r"num_timesteps=10 .*num_timesteps >= 21"):
        make_betas(DiffusionConfig(num_timesteps=10))


@pytest.mark.parametrize("T", [50, 100, 250, 1000, 4000])
def test_linear_betas_scale_by_1000_over_T_as_dit(T):
    """DiT's get_named_beta_schedule("linear", T): scale = 1000 / T; linspace(scale*1e-4, scale*0.02, T)."""
    scale = 1000 / T
    want = np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    got = make_betas(DiffusionConfig(num_timesteps=T)).numpy()
    # both float64 linspace of the same end points; torch and numpy may round the last ulp differently
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    # the point of the scaling: the chain still ends near pure noise, log abar_T ~ -T*mean(beta) = -10.05
    acp_end = GaussianSchedule.from_betas(torch.from_numpy(got)).alphas_cumprod[-1].item()
    assert 1e-6 < acp_end < 2e-4
