"""The end of a run: the EMA model as a self-contained folder that ``racedit-sample`` and ``load_model`` read.

``export_model(model, out_dir, dataset, diffusion_cfg, model_cfg)`` writes ``model.safetensors`` +
``config.json`` (``racedit.models.save_model``), ``sampling.json`` (the data space, the VAE and its scale
and shift, the objective, the class names, the image size) and ``manifest.json`` (the content hashes
``load_model`` checks), each atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from racedit.config.core import to_dict
from racedit.io import write_manifest
from racedit.models import ModelConfig, save_model
from racedit.sampling import write_sampling_meta
from racedit.vae import DEFAULT_SCALING, DEFAULT_VAE

LATENT_DOWNSAMPLING = 8  # SD-VAE: image side = latent side x 8, when the dataset does not record it


def export_model(
    model: torch.nn.Module, out_dir: Path, dataset: Any, diffusion_cfg: Any, model_cfg: ModelConfig
) -> Path:
    """Save ``model`` with what sampling it needs; the dataset's metadata says which VAE decodes it."""
    out_dir = save_model(model, out_dir)
    meta = getattr(dataset, "meta", {}) or {}
    space = getattr(dataset, "space", "pixel")
    latent = space == "latent"
    names = getattr(dataset, "class_names", None)
    write_sampling_meta(
        out_dir,
        space=space,
        vae=meta.get("vae", DEFAULT_VAE) if latent else None,
        vae_subfolder=meta.get("vae_subfolder") if latent else None,
        scaling_factor=float(meta.get("scaling_factor", DEFAULT_SCALING)),
        shift_factor=meta.get("shift_factor") if latent else None,
        diffusion=to_dict(diffusion_cfg),
        class_names=list(names) if names is not None else None,
        image_size=int(meta.get("image_size", model_cfg.input_size * (LATENT_DOWNSAMPLING if latent else 1))),
    )
    write_manifest(out_dir)  # racedit.load_model checks the export against it
    return out_dir
