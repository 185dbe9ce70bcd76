"""``sampling.json``: what a sampler needs to know about an exported model beyond its architecture.

Written next to the model's ``config.json`` at export (training), read by ``sample.py``. Fields:
``space`` ("latent" or "pixel"); for latents the ``vae`` (a Hugging Face hub id, or a local folder stored as
an absolute path so that sampling works from any directory; see ``racedit/vae.py``), its
``scaling_factor`` and ``shift_factor`` (None: the VAE config's); ``diffusion`` (the ``DiffusionConfig`` as a dict); ``class_names`` (None =
ImageNet's, from ``racedit/assets/imagenet_classes.txt``, when the model has 1000 classes);
``image_size`` in pixels. An official DiT ``.pt`` has no such file: ``official_dit_meta`` gives its
values (DDPM with learned sigma, ``stabilityai/sd-vae-ft-ema``, 0.18215, ImageNet).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from racedit.config.core import ConfigError, from_dict, to_dict
from racedit.diffusion import DiffusionConfig
from racedit.io import atomic_write_json
from racedit.vae import DEFAULT_SCALING, DEFAULT_VAE, VAEError, resolve_vae

FILENAME = "sampling.json"


@dataclass
class SamplingMeta:
    space: Literal["latent", "pixel"] = "latent"
    vae: str | None = DEFAULT_VAE  # hub id or absolute local folder; None for pixel space
    scaling_factor: float = DEFAULT_SCALING  # latents = (vae posterior - shift_factor) * scaling_factor
    shift_factor: float | None = None  # None: the VAE config's (0 for SD-VAE)
    vae_subfolder: str | None = None  # subfolder of a hub repository holding the VAE (e.g. "vae")
    diffusion: dict[str, Any] = field(default_factory=dict)  # DiffusionConfig fields (defaults if empty)
    class_names: list[str] | None = None
    image_size: int | None = None  # pixels (latent side * 8 for SD-VAE)

    def __post_init__(self) -> None:
        if self.space not in ("latent", "pixel"):
            raise ValueError(f"sampling.json: space must be 'latent' or 'pixel', got {self.space!r}")
        if self.space == "latent" and not self.vae:
            raise ValueError(
                "sampling.json: a latent-space model needs 'vae' (a hub id or a local directory)"
            )
        self.diffusion_config()  # validate early

    def diffusion_config(self) -> DiffusionConfig:
        return from_dict(DiffusionConfig, dict(self.diffusion), prefix="diffusion")


def official_dit_meta(image_size: int = 256) -> SamplingMeta:
    """Settings of facebookresearch/DiT's released checkpoints."""
    return SamplingMeta(
        space="latent",
        vae=DEFAULT_VAE,
        scaling_factor=DEFAULT_SCALING,
        diffusion=to_dict(DiffusionConfig()),
        class_names=None,
        image_size=image_size,
    )


def write_sampling_meta(model_dir: str | Path, meta: SamplingMeta | None = None, **fields: Any) -> Path:
    """Write ``model_dir/sampling.json`` from ``meta`` or from fields, e.g.
    ``write_sampling_meta(d, space="pixel", vae=None, diffusion=to_dict(cfg), image_size=8)``.
    A ``DiffusionConfig`` passed as ``diffusion`` is converted to a dict."""
    if meta is None:
        if isinstance(fields.get("diffusion"), DiffusionConfig):
            fields["diffusion"] = to_dict(fields["diffusion"])
        meta = SamplingMeta(**fields)
    elif fields:
        raise TypeError("pass either a SamplingMeta or fields, not both")
    if meta.space == "latent" and meta.vae and Path(meta.vae).expanduser().exists():
        try:  # a local folder is stored absolute: the file then works from any working directory
            source = resolve_vae(meta.vae, meta.vae_subfolder)
        except VAEError as err:
            raise ValueError(f"sampling.json: {err}") from None
        meta = replace(meta, vae=source.name, vae_subfolder=source.subfolder)
    path = Path(model_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, to_dict(meta), indent=2)
    return path


def find_sampling_meta(path: str | Path) -> Path | None:
    """The sampling.json that belongs to a model directory or training checkpoint (ema/, model/), if any."""
    path = Path(path)
    if not path.is_dir():
        return None
    for sub in ("", "ema", "model"):
        candidate = (path / sub if sub else path) / FILENAME
        if candidate.is_file():
            return candidate
    return None


def read_sampling_meta(model_dir: str | Path) -> SamplingMeta | None:
    """Read the sampling.json of ``model_dir`` (or its ema/ or model/ subdirectory); None if absent."""
    found = find_sampling_meta(model_dir)
    if found is None:
        return None
    try:
        data = json.loads(found.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{found} is not valid JSON: {err}") from None
    try:
        return from_dict(SamplingMeta, data, prefix=str(found))
    except ValueError as err:
        raise ConfigError(f"{found}: {err}") from None
