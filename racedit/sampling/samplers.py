"""Samplers: diffusers' schedulers where they fit, and by hand only what no library provides.

| objective | sampler | implementation |
|---|---|---|
| ddpm | ``ddpm`` ancestral, respaced (DiT: 250 steps, ``linspace`` spacing = DiT's ``"250"``) | diffusers ``DDPMScheduler`` (learned-range variance when the model learns sigma) |
| ddpm | ``ddim`` (eta 0; ``leading`` spacing = DiT's ``"ddimN"``) | diffusers ``DDIMScheduler`` |
| ddpm | ``dpm++`` (DPM-Solver++ 2M, data prediction) | diffusers ``DPMSolverMultistepScheduler`` |
| flow | ``euler`` ODE | diffusers ``FlowMatchEulerDiscreteScheduler`` |
| flow | ``heun`` ODE (2 evaluations per step but the last) | diffusers ``FlowMatchHeunDiscreteScheduler`` |
| flow | ``euler-maruyama`` SDE | by hand (below) |

All randomness comes from per-sample generators (``racedit.sampling.seeding``). The state ``x`` is
kept in float32 whatever the model's precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from racedit.diffusion import FlowMatching, GaussianDiffusion, Objective
from racedit.sampling.seeding import per_sample_randn

# denoise(x (B, C, H, W) float32, t_model: float) -> model output (B, out, H, W)
Denoiser = Callable[[Tensor, float], Tensor]

SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": GaussianDiffusion.samplers, "flow": FlowMatching.samplers}
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++": 20, "euler": 50, "heun": 25, "euler-maruyama": 250}


def check_sampler(objective: Objective, sampler: str) -> None:
    if sampler not in objective.samplers:
        raise ValueError(
            f"sampler {sampler!r} does not fit the {objective.kind} objective; choose one of "
            f"{list(objective.samplers)} (the checkpoint's objective comes from its sampling.json)"
        )


def make_scheduler(objective: Objective, sampler: str, steps: int, **options: Any):
    """The configured diffusers scheduler for ``sampler`` with ``steps`` steps set (not the SDE)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
    )

    check_sampler(objective, sampler)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(objective, GaussianDiffusion):
        T = objective.num_timesteps
        if steps > T:
            raise ValueError(f"cannot take {steps} steps of a {T}-step diffusion")
        # Exactly the objective's betas (float32, as diffusers keeps them).
        common = dict(
            num_train_timesteps=T, trained_betas=objective.schedule.betas.numpy().astype(np.float32)
        )
        if sampler == "ddpm":
            if objective.learn_sigma:
                variance = "learned_range"
            else:
                variance = "fixed_large" if objective.cfg.fixed_variance == "large" else "fixed_small"
            sched = DDPMScheduler(
                **common,
                variance_type=variance,
                clip_sample=False,
                timestep_spacing=options.get("spacing", "linspace"),
            )
        elif sampler == "ddim":
            sched = DDIMScheduler(
                **common,
                clip_sample=False,
                set_alpha_to_one=True,
                timestep_spacing=options.get("spacing", "leading"),
            )
        else:
            sched = DPMSolverMultistepScheduler(
                **common,
                algorithm_type="dpmsolver++",
                solver_order=int(options.get("order", 2)),
                timestep_spacing=options.get("spacing", "linspace"),
                lower_order_final=True,
            )
        sched.set_timesteps(steps)
        return sched
    if sampler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=float(options.get("shift", 1.0))
        )
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist())  # then 0 is appended
        return sched
    if sampler == "heun":
        sched = FlowMatchHeunDiscreteScheduler(
            num_train_timesteps=1000, shift=float(options.get("shift", 1.0))
        )
        sched.set_timesteps(steps)
        return sched
    raise ValueError(f"{sampler!r} is not a diffusers-backed sampler")


def run_sampler(
    objective: Objective,
    sampler: str,
    steps: int,
    denoise: Denoiser,
    x: Tensor,
    generators: Sequence[torch.Generator],
    progress: Callable[[], None] | None = None,
    **options: Any,
) -> Tensor:
    """Integrate from the prior sample ``x`` (B, C, H, W) to data; returns (B, C, H, W) float32.

    ``progress`` is called once per model evaluation step (for a progress bar)."""
    check_sampler(objective, sampler)
    if sampler == "euler-maruyama":
        return euler_maruyama(objective, steps, denoise, x, generators, progress, **options)
    C = x.shape[1]
    sched = make_scheduler(objective, sampler, steps, **options)
    gens = list(generators)
    x = x.float() * float(getattr(sched, "init_noise_sigma", 1.0))
    for t in sched.timesteps:
        if isinstance(objective, FlowMatching):  # diffusers' timesteps are sigma * 1000, sigma = our t
            t_model = float(t) / sched.config.num_train_timesteps * objective.cfg.time_scale
        else:
            t_model = float(t)
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x  # identity here
        out = denoise(x_in, t_model).float()
        # DDPM with learned sigma reads the variance channels; every other sampler uses the prediction.
        keep_sigma = sampler == "ddpm" and objective.learn_sigma
        model_output = out[:, : 2 * C] if keep_sigma else objective.prediction(out, C)
        x = sched.step(model_output, t, x, generator=gens).prev_sample.float()
        if progress is not None:
            progress()
    return x


def euler_maruyama(
    objective: Objective,
    steps: int,
    denoise: Denoiser,
    x: Tensor,
    generators: Sequence[torch.Generator],
    progress: Callable[[], None] | None = None,
    diffusion_norm: float = 1.0,
    **_: Any,
) -> Tensor:
    """Reverse-time SDE for the linear flow ``x_t = (1-t) x0 + t eps`` (t: 1 -> 0), Euler-Maruyama.

    Any diffusion g(t) gives an SDE with the flow's marginals (SiT, Ma et al. 2024, section 2.3):
    ``dx = [v - g^2/2 * score] dt + g dW`` run backwards, with ``score = -E[eps|x_t]/t`` and
    ``E[eps|x_t] = x_t + (1 - t) v``. We take ``g^2 = diffusion_norm * t`` (SiT's "sigma" form), so
    ``g^2/2 * score = -diffusion_norm/2 * (x + (1-t) v)`` stays bounded at t -> 0. Uniform grid; the last
    step is a deterministic Euler step (no noise is added at the end).
    """
    if not isinstance(objective, FlowMatching):
        raise ValueError("euler-maruyama needs the flow objective")
    if diffusion_norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    ts = np.linspace(1.0, 0.0, steps + 1)
    x = x.float()
    for i in range(steps):
        t, h = float(ts[i]), float(ts[i] - ts[i + 1])
        v = objective.prediction(denoise(x, t * objective.cfg.time_scale).float(), x.shape[1])
        if i == steps - 1:
            x = x - h * v
        else:
            drift = v + 0.5 * diffusion_norm * (x + (1.0 - t) * v)
            z = per_sample_randn(x.shape[1:], generators, x.device)
            x = x - h * drift + math.sqrt(diffusion_norm * t * h) * z
        if progress is not None:
            progress()
    return x


def num_evaluations(objective: Objective, sampler: str, steps: int, **options: Any) -> int:
    """Model evaluations (guided or not, each one batched forward) the sampler makes."""
    if sampler == "euler-maruyama":
        return steps
    return len(make_scheduler(objective, sampler, steps, **options).timesteps)
