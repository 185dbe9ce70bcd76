"""The VAE of latent-space models: where it comes from, how it is loaded, and latents <-> images.

Latents. A model trains on ``x = (z - shift_factor) * scaling_factor`` where ``z`` is the VAE's posterior
(``racedit-extract`` stores its mean and std; ``LatentDataset`` draws ``z`` and applies this map). Decoding
inverts it: ``images = vae.decode(x / scaling_factor + shift_factor)``. SD-VAE has scale 0.18215 and no
shift; the VAEs of SD3 and FLUX have a shift, so both directions apply both factors (:func:`to_latents`,
:func:`from_latents`, :class:`LatentVAE`).

Where a VAE comes from (:func:`resolve_vae`, the one rule every command uses):
- an existing local folder (``~`` expanded) is that folder, recorded as an absolute path, so a
  ``meta.json`` or ``sampling.json`` that names it works from any working directory;
- otherwise ``org/name`` is a Hugging Face hub id, recorded as typed;
- anything else is an error that names it.
A folder holding ``vae/config.json`` but no ``config.json`` (a whole Stable Diffusion pipeline) means its
``vae`` subfolder.

Loading a hub id (:func:`load_vae`): the Hugging Face cache first; then, unless ``HF_HUB_OFFLINE=1``, one
reachability check of the hub that gives up after a few seconds, and only then a download. Without
network the command fails within seconds (instead of half a minute of hub retries) with a message saying
what to download and where. Loaded VAEs (and failures) are remembered for the whole process, so a
trainer that decodes a preview grid every N steps loads the VAE once and tries the hub once.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from racedit.errors import UserError

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # DiT's VAE
DEFAULT_SCALING = 0.18215  # SD-VAE latents' scale (Rombach et al. 2022), as DiT uses
DEFAULT_SHIFT = 0.0
HUB_CHECK_TIMEOUT_S = 3.0  # one HEAD request to the hub endpoint; no retries

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class VAEError(UserError):
    """The VAE could not be found or loaded; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------------
# Where a VAE comes from
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAESource:
    """A resolved VAE reference: an absolute local folder, or a hub id (+ an optional subfolder)."""

    name: str  # absolute path of a local folder, or a hub id "org/name"
    is_hub: bool
    subfolder: str | None = None

    def record(self) -> dict[str, str | None]:
        """What metadata files store: ``vae`` (absolute folder or hub id), ``vae_hub_id``, ``vae_subfolder``."""
        return {
            "vae": self.name,
            "vae_hub_id": self.name if self.is_hub else None,
            "vae_subfolder": self.subfolder,
        }

    def __str__(self) -> str:
        return self.name + (f" (subfolder {self.subfolder})" if self.subfolder else "")


def resolve_vae(name: str | os.PathLike | VAESource, subfolder: str | None = None) -> VAESource:
    """The one rule that tells a local folder from a hub id (module docstring)."""
    if isinstance(name, VAESource):
        return name
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise VAEError(f"VAE {text!r} is a file; pass the folder that holds its config.json")
        path = path.resolve()
        if (
            subfolder is None
            and not (path / "config.json").is_file()
            and (path / "vae/config.json").is_file()
        ):
            subfolder = "vae"  # a full Stable Diffusion pipeline folder
        if subfolder is not None:  # record the folder that holds the VAE itself
            path, subfolder = (path / subfolder).resolve(), None
        if not (path / "config.json").is_file():
            raise VAEError(
                f"{path} is not a diffusers AutoencoderKL folder (no config.json); expected what "
                f"AutoencoderKL.save_pretrained or `hf download {DEFAULT_VAE}` writes"
            )
        return VAESource(str(path), is_hub=False)
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise VAEError(
            f"VAE folder {text!r} does not exist (resolved: {path.absolute()}), and it is not a Hugging Face "
            "hub id of the form 'org/name'; pass an existing folder or a hub id such as " + DEFAULT_VAE
        )
    return VAESource(text, is_hub=True, subfolder=subfolder)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

_LOADED: dict[tuple[Any, ...], Any] = {}  # (source, device, dtype) -> AutoencoderKL, shared in a process
_FAILED: dict[VAESource, str] = {}  # source -> error message: a failed hub lookup is not retried


def _hub_cache() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> tuple[bool, str]:
    """One HEAD request to the hub endpoint (``HF_ENDPOINT``); any HTTP answer counts as reachable."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True, endpoint  # the server answered
    except (OSError, ValueError) as err:  # DNS failure, refused, timeout, bad endpoint
        reason = getattr(err, "reason", err)
        return False, f"{endpoint} is unreachable ({type(reason).__name__}: {reason})"
    return True, endpoint


def missing_message(source: VAESource, why: str) -> str:
    """What to download and where, for a hub VAE that is neither cached nor downloadable."""
    name = source.name
    local = "./" + name.split("/")[-1]
    files = "config.json diffusion_pytorch_model.safetensors"
    if source.subfolder:
        files = f"{source.subfolder}/config.json {source.subfolder}/diffusion_pytorch_model.safetensors"
        local_vae = f"{local}/{source.subfolder}"
    else:
        local_vae = local
    return (
        f"cannot load the VAE {name!r}: it is not in the Hugging Face cache ({_hub_cache()}) and {why}. "
        f"Fix: on a machine with network run `hf download {name} {files} --local-dir {local}`, copy that "
        f"folder here and pass --vae {local_vae} (it is recorded as an absolute path); or copy the cache "
        f"folder models--{name.replace('/', '--')} into {_hub_cache()}"
    )


def _from_pretrained(source: VAESource, dtype: torch.dtype) -> Any:
    with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub deprecated: noise only
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return _load(source, dtype)


def _load(source: VAESource, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    if not source.is_hub:
        try:
            return AutoencoderKL.from_pretrained(source.name, torch_dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise VAEError(
                f"cannot load the VAE folder {source.name}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from None
    if source in _FAILED:
        raise VAEError(_FAILED[source])
    kwargs = {"subfolder": source.subfolder, "torch_dtype": dtype, "cache_dir": _hub_cache()}
    try:
        return AutoencoderKL.from_pretrained(source.name, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError):
        pass  # not (completely) cached
    if _offline():
        why = "HF_HUB_OFFLINE is set"
    else:
        reachable, why = hub_reachable()
        if reachable:
            try:
                return AutoencoderKL.from_pretrained(source.name, **kwargs)
            except Exception as err:  # the hub answered but the download failed: say why, once
                why = f"the download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    _FAILED[source] = missing_message(source, why)
    raise VAEError(_FAILED[source])


def load_vae(
    name: str | os.PathLike | VAESource = DEFAULT_VAE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    subfolder: str | None = None,
) -> Any:
    """The ``AutoencoderKL`` of ``name`` on ``device`` in ``dtype``, in eval mode without gradients.

    Loaded once per process and shared: ask for another device or dtype here rather than moving it.
    """
    source = resolve_vae(name, subfolder)
    key = (source, str(torch.device(device)), dtype)
    if key not in _LOADED:
        _LOADED[key] = _from_pretrained(source, dtype).to(device).eval().requires_grad_(False)
    return _LOADED[key]


# ---------------------------------------------------------------------------------------------------
# Latents <-> images
# ---------------------------------------------------------------------------------------------------


def vae_factors(
    vae: Any, scaling_factor: float | None = None, shift_factor: float | None = None
) -> tuple[float, float]:
    """(scale, shift): the given values, else the VAE config's, else SD-VAE's (0.18215, 0)."""
    cfg = getattr(vae, "config", {})
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    if scaling_factor is None:
        scaling_factor = get("scaling_factor", None) or DEFAULT_SCALING
    if shift_factor is None:
        shift_factor = get("shift_factor", None) or DEFAULT_SHIFT
    return float(scaling_factor), float(shift_factor)


def to_latents(z: Tensor, scaling_factor: float, shift_factor: float) -> Tensor:
    """VAE posterior sample -> the model's latent space: ``(z - shift) * scale``."""
    return (z - shift_factor) * scaling_factor


def from_latents(x: Tensor, scaling_factor: float, shift_factor: float) -> Tensor:
    """The model's latent space -> what the VAE decoder takes: ``x / scale + shift``."""
    return x / scaling_factor + shift_factor


class LatentVAE:
    """An ``AutoencoderKL`` with the scale and shift of its latent space.

    ``encode(images in [-1, 1] (B, 3, H, W)) -> latents (B, C, h, w)`` and ``decode(latents) -> images``
    are inverse up to the VAE's reconstruction error; both run in chunks of ``batch_size``.
    """

    def __init__(
        self,
        vae: Any,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        batch_size: int = 32,
    ) -> None:
        self.vae = vae
        self.scaling_factor, self.shift_factor = vae_factors(vae, scaling_factor, shift_factor)
        self.batch_size = batch_size

    def _param(self) -> Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Posterior mean (or, with ``generator``, a posterior sample) mapped to the model's latent space."""
        p = self._param()
        outs = []
        for chunk in images.split(self.batch_size):
            dist = self.vae.encode(chunk.to(p.device, p.dtype)).latent_dist
            z = dist.mean if generator is None else dist.sample(generator)
            outs.append(to_latents(z.float(), self.scaling_factor, self.shift_factor))
        return torch.cat(outs)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Model latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1], float32."""
        p = self._param()
        outs = [
            self.vae.decode(
                from_latents(chunk.to(p.device, torch.float32), self.scaling_factor, self.shift_factor).to(
                    p.dtype
                )
            ).sample.float()
            for chunk in latents.split(self.batch_size)
        ]
        return torch.cat(outs)

    __call__ = decode


def decoder(
    vae: Any, scaling_factor: float | None = None, shift_factor: float | None = None, batch_size: int = 32
) -> Callable[[Tensor], Tensor]:
    """A function latents -> images (:meth:`LatentVAE.decode`); factors default to the VAE config's."""
    return LatentVAE(vae, scaling_factor, shift_factor, batch_size).decode
