"""Building models from the zoo, saving them, and loading every checkpoint format we know.

Formats ``load_model`` reads:
- a racedit model directory (``config.json`` + ``model.safetensors``, written by ``save_pretrained``);
- a racedit training checkpoint directory (it holds an ``ema/`` or ``model/`` model directory);
- an official facebookresearch/DiT ``.pt`` file (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``, or a
  ``train.py`` checkpoint with ``model``/``ema`` entries), or a bare state dict in ``.safetensors``;
- a diffusers ``DiTTransformer2DModel`` folder, or a ``DiTPipeline`` folder (its ``transformer/``): see
  ``racedit.models.diffusers_io``; the model carries diffusers' timestep convention and gives its outputs.
Nothing is unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``).

A directory with a ``manifest.json`` (the training export ``final/``, a training checkpoint) is checked
against it before loading: a file whose bytes changed since it was written is an error naming the file,
unless ``verify=False`` (for files edited on purpose).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from racedit.config.core import deep_merge, to_dict
from racedit.io import MANIFEST, atomic_directory, sha256_file
from racedit.models.config import ModelConfig
from racedit.models.dit import DiT
from racedit.models.errors import CheckpointError
from racedit.models.registry import SIZES, resolve_model_config

# Keys every DiT state dict (ours and the official one) has.
_REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "t_embedder.mlp.0.weight",
    "final_layer.linear.weight",
)
# Modules the official layout does not have; they start at their identity init when absent.
_OPTIONAL_PREFIXES = re.compile(r"(^stream\.|\.conn_attn\.|\.conn_mlp\.)")


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> the JSON-serialisable keyword arguments of ``DiT.__init__``."""
    return to_dict(cfg)


def build_model(name: str | None = None, config: ModelConfig | None = None, **overrides: Any) -> DiT:
    """Build a randomly initialised model from a registry name (and/or a ModelConfig) plus overrides.

    ``build_model("RaceDiT-B/2-2in8", input_size=8, num_classes=10, moe={"router": "token"})``
    """
    if config is not None:
        if name is not None:
            raise ValueError("pass either a registry name or a ModelConfig, not both")
        cfg = resolve_model_config(None, **deep_merge(to_dict(config), overrides))
    else:
        cfg = resolve_model_config(name, **overrides)
    return DiT(**model_kwargs(cfg))


def save_model(model: DiT, path: str | Path) -> Path:
    """``save_pretrained`` into a temporary sibling directory, then an atomic rename onto ``path``
    (``racedit.io.atomic_directory``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return path


def load_model(
    path: str | Path, device: str | torch.device = "cpu", *, verify: bool = True, **overrides: Any
) -> DiT:
    """Load any supported checkpoint (see the module docstring) as a ``DiT`` in eval mode.

    ``verify`` (default on): a directory's model files are checked against its ``manifest.json`` when it
    has one; a mismatch raises ``CheckpointError`` naming the file.

    ``overrides`` change the architecture read from the file before the weights go in, e.g.
    ``connection={"kind": "hc", "rate": 2}`` initialises an HC DiT from official DiT weights
    (the connection parameters start at their identity init).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist. Official DiT weights: download DiT-XL-2-256x256.pt from "
            "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt and pass its path"
        )
    if path.is_dir():
        from racedit.models import diffusers_io

        if diffusers_io.transformer_folder(path) is not None:
            cfg, state = diffusers_io.read_diffusers(path, **overrides)
            model = DiT(**model_kwargs(cfg))
            load_state_dict_checked(model, state, source=str(path))
        else:
            model = _load_directory(path, overrides, verify)
    else:
        state = read_state_dict(path)
        cfg = infer_config(state, **overrides)
        model = DiT(**model_kwargs(cfg))
        load_state_dict_checked(model, state, source=str(path))
    return model.to(device).eval()


def check_export(path: Path, files: list[str]) -> None:
    """Compare ``files`` (relative to ``path``) with ``path/manifest.json`` if there is one.

    Only the named files are hashed, so loading the EMA model of a training checkpoint does not read its
    optimizer state. A file the manifest does not list is not checked (nothing to compare with).
    """
    manifest = path / MANIFEST
    if not manifest.is_file():
        return
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{manifest} is unreadable ({err}); load with verify=False to skip the check"
        ) from None
    for rel in files:
        info = listed.get(rel)
        if info is None:
            continue
        f = path / rel
        if not f.is_file():
            problem = "is missing"
        elif f.stat().st_size != info["size"]:
            problem = f"has {f.stat().st_size} bytes, the manifest says {info['size']}"
        elif sha256_file(f) != info["sha256"]:
            problem = "does not match its sha256 in manifest.json (the file changed after it was written)"
        else:
            continue
        raise CheckpointError(
            f"{f} {problem}: the model may be corrupt. Re-export or re-download it; if you edited it on "
            "purpose, load with verify=False (racedit-sample --no-verify)"
        )


def _load_directory(path: Path, overrides: dict[str, Any], verify: bool = True) -> DiT:
    from racedit.models import diffusers_io

    if (path / "model_index.json").is_file():  # a diffusers pipeline, but not a DiTPipeline
        raise diffusers_io.unsupported_config_error(path / "model_index.json")
    for sub in ("", "ema", "model"):
        candidate = path / sub if sub else path
        if (candidate / "config.json").is_file():
            if (
                diffusers_io.read_json(candidate / "config.json").get("_class_name", DiT.__name__)
                != DiT.__name__
            ):
                raise diffusers_io.unsupported_config_error(candidate / "config.json")
            if verify:
                prefix = f"{sub}/" if sub else ""
                names = ["config.json", "model.safetensors", "sampling.json"]
                check_export(path, [prefix + n for n in names])
            if overrides:
                cfg_json = json.loads((candidate / "config.json").read_text())
                kwargs = {k: v for k, v in cfg_json.items() if not k.startswith("_")}
                cfg = resolve_model_config(None, **deep_merge(kwargs, overrides))
                model = DiT(**model_kwargs(cfg))
                from safetensors.torch import load_file

                load_state_dict_checked(
                    model, load_file(candidate / "model.safetensors"), source=str(candidate)
                )
                return model
            return DiT.from_pretrained(candidate)
    raise CheckpointError(
        f"{str(path)!r} is a directory without config.json (nor ema/config.json, model/config.json); "
        "expected a racedit model directory written by save_pretrained or a training checkpoint"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or a torch file, without executing pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {err}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds pickled Python objects beyond tensors, and loading it "
            f"would execute code ({str(err).splitlines()[0]}). Re-save the state dict alone "
            "(torch.save(model.state_dict(), path)) or convert it to safetensors"
        ) from None
    except Exception as err:
        raise CheckpointError(
            f"{str(path)!r} is not a torch checkpoint ({type(err).__name__}: {err})"
        ) from None
    if isinstance(obj, dict):
        for key in (
            "ema",
            "model",
            "state_dict",
        ):  # facebookresearch/DiT train.py saves model, ema, opt, args
            if key in obj and isinstance(obj[key], dict):
                obj = obj["ema"] if "ema" in obj else obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} is not a DiT checkpoint: it lacks {missing}. Expected a facebookresearch/DiT state "
            "dict (DiT-XL-2-256x256.pt), a racedit model directory, or a racedit training checkpoint"
        )
    return state


def infer_config(state: dict[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """Recover a DiT architecture from the shapes of an official-layout state dict."""
    proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    num_tokens = state["pos_embed"].shape[1]
    grid = int(round(num_tokens**0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    table = state["y_embedder.embedding_table.weight"].shape[0]
    heads = next((h for d, w, h in SIZES.values() if w == hidden), max(1, hidden // 64))
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / hidden if fc1 is not None else 4.0
    kwargs: dict[str, Any] = dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        num_classes=table - 1,  # DiT always trains with label dropout, so the table has a null row
        class_dropout_prob=0.1,
        learn_sigma=out_channels == 2 * in_channels,
    )
    if fc1 is None:
        raise CheckpointError(
            "this state dict has no dense MLP (blocks.0.mlp.fc1); MoE checkpoints are racedit model directories "
            "with a config.json: load those by directory"
        )
    return resolve_model_config(None, **deep_merge(kwargs, overrides))


def load_state_dict_checked(model: DiT, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load, except parameters of connection modules the file predates (they keep identity init)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _OPTIONAL_PREFIXES.search(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source} does not match the model architecture: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}"
        )
