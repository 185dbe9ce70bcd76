"""The SD-VAE decoder for latent-space models (diffusers ``AutoencoderKL``), loaded without surprises.

Resolution: a local directory is loaded as is; a hub id is read from the Hugging Face cache first
(``local_files_only``), then downloaded unless ``HF_HUB_OFFLINE=1``. When neither works the error
says exactly what to download and where to put it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


class VAEError(RuntimeError):
    """The VAE could not be found or loaded; the message says how to fix it."""


def _missing_message(name: str, err: Exception) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    return (
        f"cannot load the VAE {name!r}: it is not a local directory, not in the Hugging Face cache ({cache}), "
        f"and it could not be downloaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
        f"Fix: on a machine with network run\n"
        f"    huggingface-cli download {name} --local-dir ./vae/{name.split('/')[-1]}\n"
        f"(files: config.json and diffusion_pytorch_model.safetensors), copy that directory here and pass "
        f"--vae ./vae/{name.split('/')[-1]}; or copy the hub cache folder models--{name.replace('/', '--')} "
        f"into {cache}."
    )


def load_vae(name_or_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``AutoencoderKL`` from a local directory or a hub id (cache first, then the network)."""
    from diffusers import AutoencoderKL

    path = Path(name_or_dir).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise VAEError(
                f"{str(path)!r} is not a diffusers AutoencoderKL directory (no config.json); expected what "
                "AutoencoderKL.save_pretrained or `huggingface-cli download stabilityai/sd-vae-ft-ema` writes"
            )
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    else:
        if name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") != 1:
            raise VAEError(
                f"VAE directory {name_or_dir!r} does not exist (and it is not a hub id like 'org/name')"
            )
        try:
            vae = AutoencoderKL.from_pretrained(name_or_dir, torch_dtype=dtype, local_files_only=True)
        except Exception as cache_err:
            if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
                raise VAEError(_missing_message(name_or_dir, cache_err)) from None
            try:
                vae = AutoencoderKL.from_pretrained(name_or_dir, torch_dtype=dtype)
            except Exception as err:
                raise VAEError(_missing_message(name_or_dir, err)) from None
    return vae.to(device).eval().requires_grad_(False)


def vae_decoder(vae, scaling_factor: float, batch_size: int = 32) -> Callable[[Tensor], Tensor]:
    """latents (B, c, h, w) -> images (B, 3, H, W) in about [-1, 1]: ``vae.decode(z / scaling_factor)``."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype

    @torch.no_grad()
    def decode(z: Tensor) -> Tensor:
        outs = [
            vae.decode(chunk.to(device, dtype) / scaling_factor).sample.float()
            for chunk in z.split(batch_size)
        ]
        return torch.cat(outs)

    return decode
