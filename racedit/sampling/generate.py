"""Drawing samples: prior noise -> sampler (with CFG) -> decode -> uint8 images.

Sample i of a run (global index ``first_index + i``) draws its prior noise and every later noise from
its own generator seeded by ``(seed, first_index + i)``, so the noise does not depend on batch size
or on how the indices are spread over processes. The images do not either (up to float rounding)
unless the model routes across the batch: BL / BE choice, or expert race with top-K at eval
(``racedit.moe.inference_batch_dependence`` says which). Then a sample depends on the other samples of
its batch, so on the batch size and the label order; the same call reproduces the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from racedit.diffusion import Objective
from racedit.progress import progress as progress_bar
from racedit.sampling.guidance import Guidance, guided_forward
from racedit.sampling.samplers import check_sampler, num_evaluations, run_sampler
from racedit.sampling.seeding import per_sample_randn, sample_generators

Quantization = Literal["dit", "adm"]
QUANTIZATIONS: dict[str, str] = {
    "dit": "clamp(127.5 * x + 128, 0, 255) truncated to uint8 (= rounding; DiT sample.py)",
    "adm": "clamp((x + 1) * 127.5, 0, 255) truncated to uint8 (guided-diffusion image_sample.py)",
}


def to_uint8(images: Tensor, quantization: Quantization = "dit") -> Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, H, W, 3) uint8 on the CPU; C = 1 is repeated to 3 channels.

    The two conventions papers use (docs/spec/evaluation.md, "Samples"): ``dit`` rounds,
    ``adm`` truncates (half a grey level darker on average). Record which one a result used."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
    x = images.detach().float()
    if quantization == "dit":
        x = 127.5 * x + 128.0
    elif quantization == "adm":
        x = (x + 1.0) * 127.5
    else:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    x = x.clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu()


def sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of one model-space sample; ``arch.input_size`` is a side length or an (H, W) pair."""
    size = model.arch.input_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return model.arch.in_channels, h, w


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_batch(
    model: nn.Module,
    labels: Tensor,
    *,
    objective: Objective,
    sampler: str,
    steps: int,
    guidance: Guidance,
    generators: Sequence[torch.Generator],
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[], None] | None = None,
    sampler_options: dict[str, Any] | None = None,
) -> Tensor:
    """One batch: labels (B,) -> model-space samples (B, C, H, W) float32 on the model's device."""
    arch = model.arch
    device = _model_device(model)
    C = arch.in_channels
    labels = labels.to(device).long()
    x = per_sample_randn(sample_shape(model), generators, device)  # first draw of every sample's stream

    def denoise(x: Tensor, t_model: float) -> Tensor:
        t = torch.full((x.shape[0],), t_model, device=device, dtype=torch.float32)
        ctx = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            return guided_forward(model, x, t, labels, guidance, objective.normalized_time(t_model), C)

    with torch.no_grad():
        return run_sampler(
            objective, sampler, steps, denoise, x, generators, progress=progress, **(sampler_options or {})
        )


def _check_labels(model: nn.Module, labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels).long().reshape(-1)
    n = model.arch.num_classes
    if labels.numel() and (labels.min() < 0 or labels.max() > n):
        raise ValueError(
            f"labels must lie in [0, {n}] ({n} = the null class), got {labels.min()}..{labels.max()}"
        )
    return labels


def _batches(
    model: nn.Module,
    labels: Tensor,
    objective: Objective,
    sampler: str,
    steps: int,
    cfg_scale: float,
    guidance_interval: tuple[float, float] | None,
    guidance_channels: Literal["all"] | int,
    guidance_halves: Literal["joint", "separate"],
    seed: int,
    first_index: int,
    batch_size: int,
    progress: bool,
    autocast_dtype: torch.dtype | None,
    sampler_options: dict[str, Any] | None,
):
    """Yields (start, model-space samples) for consecutive batches of ``labels``."""
    check_sampler(objective, sampler)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model.training:
        raise ValueError("sample from a model in eval mode (model.eval()): training mode drops labels")
    labels = _check_labels(model, labels)
    guidance = Guidance(
        scale=float(cfg_scale),
        interval=tuple(guidance_interval) if guidance_interval is not None else None,
        channels=guidance_channels,
        halves=guidance_halves,
    )
    n = labels.numel()
    evals = num_evaluations(objective, sampler, steps, **(sampler_options or {}))
    bar = progress_bar(
        total=n * evals, desc=f"{sampler} x{steps}", unit="img-step", disable=not progress, leave=False
    )
    for start in range(0, n, batch_size):
        y = labels[start : start + batch_size]
        gens = sample_generators(seed, first_index + start, y.numel())
        out = sample_batch(
            model,
            y,
            objective=objective,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            generators=gens,
            autocast_dtype=autocast_dtype,
            progress=functools.partial(bar.update, y.numel()) if progress else None,
            sampler_options=sampler_options,
        )
        yield start, out
    bar.close()


def sample_latents(
    model: nn.Module,
    labels: Tensor | Sequence[int],
    *,
    objective: Objective,
    sampler: str,
    steps: int,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance_channels: Literal["all"] | int = "all",
    guidance_halves: Literal["joint", "separate"] = "joint",
    seed: int = 0,
    first_index: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
    sampler_options: dict[str, Any] | None = None,
) -> Tensor:
    """Model-space samples (N, C, H, W) float32 on the CPU (no decoding, no quantisation)."""
    labels_t = torch.as_tensor(labels)
    outs = [
        x.cpu()
        for _, x in _batches(
            model, labels_t, objective, sampler, steps, cfg_scale, guidance_interval, guidance_channels,
            guidance_halves, seed, first_index, batch_size, progress, autocast_dtype, sampler_options,
        )
    ]  # fmt: skip
    return torch.cat(outs) if outs else torch.empty(0, *sample_shape(model))


def generate(
    model: nn.Module,
    labels: Tensor | Sequence[int],
    *,
    objective: Objective,
    sampler: str,
    steps: int,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance_channels: Literal["all"] | int = "all",
    guidance_halves: Literal["joint", "separate"] = "joint",
    seed: int = 0,
    first_index: int = 0,
    decode: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 32,
    quantization: Quantization = "dit",
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
    sampler_options: dict[str, Any] | None = None,
) -> Tensor:
    """Generate uint8 images (N, H, W, 3) for ``labels`` (N,) (``num_classes`` = unconditional).

    ``decode`` maps model-space samples (B, C, h, w) to images (B, 1 or 3, H, W) in [-1, 1] (a VAE
    decoder for latent models; ``None`` = identity for pixel-space models). ``cfg_scale`` 1 runs one
    forward per step; ``guidance_interval`` (lo, hi) limits guidance to noise levels in [lo, hi]
    (0 = data, 1 = noise); ``guidance_channels`` "all" or 3 (DiT's behaviour); ``guidance_halves``
    "joint" (one forward of [cond; uncond], DiT's) or "separate" (see ``Guidance``). Sample i uses seed
    (seed, first_index + i). ``sampler_options``: e.g. ``{"spacing": "leading"}`` for the DDPM-family
    schedulers, ``{"shift": 3.0}`` for flow ODEs, ``{"diffusion_norm": 1.0}`` for the SDE."""
    labels_t = torch.as_tensor(labels)
    images = []
    for _, x in _batches(
        model, labels_t, objective, sampler, steps, cfg_scale, guidance_interval, guidance_channels,
        guidance_halves, seed, first_index, batch_size, progress, autocast_dtype, sampler_options,
    ):  # fmt: skip
        with torch.no_grad():
            pix = decode(x) if decode is not None else x
        images.append(to_uint8(pix, quantization))
    if not images:
        S = model.arch.input_size
        return torch.empty(0, S, S, 3, dtype=torch.uint8)
    return torch.cat(images)
