"""diffusers interop: DiT weights in and out of diffusers' ``DiTTransformer2DModel`` / ``DiTPipeline`` format.

Reading: ``load_model`` calls :func:`read_diffusers` on a folder whose ``config.json`` names a
``DiTTransformer2DModel`` (or the legacy ``Transformer2DModel`` with adaLN-Zero that the hub's
``facebook/DiT-XL-2-256`` still carries), or whose ``model_index.json`` names a ``DiTPipeline``
(the weights come from ``transformer/``). Writing: :func:`export_diffusers`.

Two numerical facts of diffusers' DiT, carried as model config fields so a converted model gives
diffusers' outputs:
- ``timestep_convention="diffusers"``: ``CombinedTimestepLabelEmbeddings`` builds its sinusoidal
  features with ``Timesteps(downscale_freq_shift=1)``, frequencies ``exp(-ln(1e4) i / (half - 1))``;
  the official DiT divides by ``half``.
- ``mlp_norm_eps``: the LayerNorm before the MLP uses the config's ``norm_eps`` (1e-5 unless set), where
  DiT uses 1e-6. An export writes the model's value, so it runs with its own eps in diffusers.

Key mapping (diffusers -> racedit), per block i:
``transformer_blocks.i.norm1.linear`` -> ``blocks.i.adaLN_modulation.1``;
``attn1.to_{q,k,v}`` -> ``attn.qkv`` (concatenated in that order); ``attn1.to_out.0`` -> ``attn.proj``;
``ff.net.0.proj`` / ``ff.net.2`` -> ``mlp.fc1`` / ``mlp.fc2``. Every block of diffusers' model holds its own
copy of the timestep / label embedders (``norm1.emb``) and the final layer reads block 0's; DiT has one.
A conversion from DiT writes the same tensors into every block, so block 0's are taken and the others
must equal them. ``pos_embed.proj`` -> ``x_embedder.proj``; ``proj_out_1`` / ``proj_out_2`` ->
``final_layer.adaLN_modulation.1`` / ``final_layer.linear``. diffusers recomputes the fixed position
embedding (a non-persistent buffer), and it is taken from its own function so both models add the
same numbers.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from racedit.config.core import deep_merge
from racedit.models.config import ModelConfig
from racedit.models.dit import DiT
from racedit.models.errors import CheckpointError
from racedit.models.registry import resolve_model_config

TRANSFORMER_CLASS = "DiTTransformer2DModel"
LEGACY_TRANSFORMER_CLASS = "Transformer2DModel"  # what facebook/DiT-XL-2-256 still names its transformer
PIPELINE_CLASS = "DiTPipeline"
SIDECAR = "racedit_export.json"  # what diffusers' config cannot say (class dropout, trained convention)
SUPPORTED = (
    "a racedit model directory (config.json + model.safetensors), a racedit training checkpoint "
    "(ema/ or model/), a facebookresearch/DiT .pt file, a diffusers DiTTransformer2DModel folder, or a "
    "diffusers DiTPipeline folder (model_index.json + transformer/)"
)
# Keys of a DiTTransformer2DModel config whose values the mapping relies on, with the only value it maps.
_FIXED = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "norm_type": "ada_norm_zero",
}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class DiffusersExportWarning(UserWarning):
    """An exported model will not run in diffusers exactly as it runs here; the message says by how much."""


# ------------------------------------------------------------------------------------ detection


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def is_dit_transformer_config(cfg: dict[str, Any]) -> bool:
    """A diffusers config of DiT's transformer: the DiT class, or the legacy 2-D transformer with
    adaLN-Zero (``norm_type`` absent in old configs: patches plus ``num_embeds_ada_norm`` meant DiT)."""
    name = cfg.get("_class_name")
    if name == TRANSFORMER_CLASS:
        return True
    if name == LEGACY_TRANSFORMER_CLASS:
        norm = cfg.get("norm_type")
        legacy_dit = norm is None and cfg.get("patch_size") and cfg.get("num_embeds_ada_norm")
        return norm == "ada_norm_zero" or bool(legacy_dit)
    return False


def transformer_folder(path: str | Path) -> Path | None:
    """The folder holding the DiT transformer when ``path`` is a diffusers DiT or DiTPipeline folder."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        if index.get("_class_name") != PIPELINE_CLASS:
            return None
        if not (path / "transformer" / "config.json").is_file():
            raise CheckpointError(f"{path} is a DiTPipeline folder without transformer/config.json")
        return path / "transformer"
    if (path / "config.json").is_file() and is_dit_transformer_config(read_json(path / "config.json")):
        return path
    return None


def is_pipeline_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "model_index.json").is_file() and transformer_folder(path) is not None


def unsupported_config_error(config_path: Path) -> CheckpointError:
    """One line: what ``config_path`` holds (its ``_class_name``) and the formats we read."""
    cfg = read_json(config_path)
    found = cfg.get("_class_name")
    what = f"_class_name {found!r}" if found else f"keys {sorted(cfg)[:6]}"
    return CheckpointError(
        f"{config_path} is not a DiT config we can load (it has {what}); supported: {SUPPORTED}"
    )


# ------------------------------------------------------------------------------------ diffusers -> racedit


def config_from_diffusers(cfg: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """A diffusers DiT transformer config -> racedit ``ModelConfig`` keyword arguments."""
    for key, value in _FIXED.items():
        got = cfg.get(key, value)
        if key == "norm_type" and got is None:
            got = value  # legacy configs: see is_dit_transformer_config
        if got != value:
            raise CheckpointError(f"{source}: {key}={got!r} has no racedit equivalent (DiT uses {value!r})")
    if cfg.get("num_embeds_ada_norm") is None or cfg.get("patch_size") is None:
        raise CheckpointError(f"{source}: a DiT transformer needs patch_size and num_embeds_ada_norm")
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    in_channels = int(cfg.get("in_channels", 4))
    out_channels = cfg.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"{source}: out_channels={out_channels} for in_channels={in_channels}; racedit's DiT outputs C "
            "(no learned sigma) or 2C (learned sigma) channels"
        )
    return dict(
        input_size=int(cfg.get("sample_size", 32)),
        patch_size=int(cfg["patch_size"]),
        in_channels=in_channels,
        hidden_size=heads * head_dim,
        depth=int(cfg.get("num_layers", 28)),
        num_heads=heads,
        mlp_ratio=4.0,  # diffusers' FeedForward default (mult=4); DiTTransformer2DModel has no key for it
        num_classes=int(cfg["num_embeds_ada_norm"]),
        class_dropout_prob=0.1,  # CombinedTimestepLabelEmbeddings always builds a null row with p = 0.1
        learn_sigma=out_channels == 2 * in_channels,
        timestep_convention="diffusers",
        mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)),
    )


def diffusers_pos_embed(hidden_size: int, grid: int) -> Tensor:
    """(1, grid*grid, D) float32: the position embedding diffusers' PatchEmbed recomputes for DiT."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    pe = get_2d_sincos_pos_embed(hidden_size, grid, base_size=grid, interpolation_scale=1, output_type="pt")
    return pe.float().unsqueeze(0)


def state_dict_from_diffusers(
    state: dict[str, Tensor], depth: int, hidden_size: int, grid: int, source: str = "weights"
) -> dict[str, Tensor]:
    """diffusers DiT keys -> racedit keys (see the module docstring for the map)."""
    emb = "transformer_blocks.{i}.norm1.emb."
    shared = {  # racedit name -> diffusers name under block i's norm1.emb
        "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
        "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
        "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
        "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
        "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
    }
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in state:
            raise CheckpointError(f"{source} lacks {name!r}: not the weights of a diffusers DiT transformer")
        used.add(name)
        return state[name]

    for ours, theirs in shared.items():
        out[ours] = take(emb.format(i=0) + theirs)
        for i in range(1, depth):
            other = take(emb.format(i=i) + theirs)
            if not torch.equal(other, out[ours]):
                raise CheckpointError(
                    f"{source}: block {i}'s {theirs} differs from block 0's. racedit's DiT (like the official "
                    "one) has a single timestep/label embedder; diffusers keeps a copy per block, and these "
                    "copies were trained apart, so the model cannot be converted exactly"
                )
    out["x_embedder.proj.weight"] = take("pos_embed.proj.weight")
    out["x_embedder.proj.bias"] = take("pos_embed.proj.bias")
    out["pos_embed"] = diffusers_pos_embed(hidden_size, grid)
    for i in range(depth):
        d, r = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[r + f"adaLN_modulation.1.{kind}"] = take(d + f"norm1.linear.{kind}")
            out[r + f"attn.qkv.{kind}"] = torch.cat([take(d + f"attn1.to_{x}.{kind}") for x in "qkv"])
            out[r + f"attn.proj.{kind}"] = take(d + f"attn1.to_out.0.{kind}")
            out[r + f"mlp.fc1.{kind}"] = take(d + f"ff.net.0.proj.{kind}")
            out[r + f"mlp.fc2.{kind}"] = take(d + f"ff.net.2.{kind}")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = take(f"proj_out_1.{kind}")
        out[f"final_layer.linear.{kind}"] = take(f"proj_out_2.{kind}")
    left = sorted(set(state) - used)
    if left:
        raise CheckpointError(
            f"{source} has weights a DiT does not: {left[:5]}{'...' if len(left) > 5 else ''}"
        )
    return out


def read_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    """The transformer's tensors: one safetensors file, a sharded safetensors index, or a ``.bin`` read
    with ``weights_only`` (no code runs)."""
    from safetensors.torch import load_file

    if (folder / _WEIGHT_FILES[0]).is_file():
        return load_file(folder / _WEIGHT_FILES[0])
    if (folder / _SHARD_INDEX).is_file():
        shards = sorted(set(read_json(folder / _SHARD_INDEX).get("weight_map", {}).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    if (folder / _WEIGHT_FILES[1]).is_file():
        obj = torch.load(folder / _WEIGHT_FILES[1], map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        raise CheckpointError(f"{folder / _WEIGHT_FILES[1]} does not hold a state dict")
    raise CheckpointError(f"{folder} has a DiT config.json but no weights ({', '.join(_WEIGHT_FILES)})")


def read_diffusers(path: str | Path, **overrides: Any) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A diffusers DiTTransformer2DModel or DiTPipeline folder -> (racedit ``ModelConfig``, state dict).

    The config carries ``timestep_convention="diffusers"`` and diffusers' MLP norm eps, so the model gives
    diffusers' outputs. ``overrides`` change the config before the weights go in, e.g.
    ``timestep_convention="official"`` to run weights trained with the official frequencies (a
    ``racedit_export.json`` beside the weights says which convention they were trained with).
    """
    folder = transformer_folder(path)
    if folder is None:
        raise CheckpointError(f"{path} is not a diffusers DiT folder; supported: {SUPPORTED}")
    kwargs = config_from_diffusers(read_json(folder / "config.json"), source=str(folder / "config.json"))
    sidecar = read_json(folder / SIDECAR) if (folder / SIDECAR).is_file() else {}
    if "class_dropout_prob" in sidecar:
        kwargs["class_dropout_prob"] = float(sidecar["class_dropout_prob"])
    trained = sidecar.get("trained_timestep_convention")
    if trained and trained != "diffusers" and "timestep_convention" not in overrides:
        warnings.warn(
            f"{folder}: these weights were trained with the {trained} timestep convention and are loaded with "
            "diffusers' (to reproduce diffusers' outputs); pass timestep_convention='official' to run them as "
            "trained",
            DiffusersExportWarning,
            stacklevel=3,
        )
    cfg = resolve_model_config(None, **deep_merge(kwargs, overrides))
    grid = cfg.input_size // cfg.patch_size
    state = state_dict_from_diffusers(
        read_diffusers_weights(folder), cfg.depth, cfg.hidden_size, grid, source=str(folder)
    )
    if cfg.class_dropout_prob == 0:  # an export padded the null row diffusers requires; it was never trained
        state["y_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"][:-1]
    return cfg, state


# ------------------------------------------------------------------------------------ racedit -> diffusers


def check_exportable(model: DiT) -> None:
    """One error naming everything that keeps ``model`` out of diffusers' DiTTransformer2DModel."""
    arch = model.arch
    problems = []
    if arch.moe is not None:
        problems.append("it has MoE feed-forward layers (moe)")
    if arch.connection.kind != "residual":
        problems.append(f"it uses {arch.connection.kind!r} connections")
    if arch.mlp_ratio != 4.0:
        problems.append(f"its mlp_ratio is {arch.mlp_ratio} (diffusers' DiT fixes 4)")
    if problems:
        raise CheckpointError(
            "cannot export to diffusers: " + "; ".join(problems) + ". diffusers' DiTTransformer2DModel is a "
            "dense DiT with plain residual connections; only such models can be exported"
        )


def diffusers_config(model: DiT) -> dict[str, Any]:
    """``DiTTransformer2DModel`` keyword arguments for ``model``'s architecture."""
    arch = model.arch
    return dict(
        num_attention_heads=arch.num_heads,
        attention_head_dim=arch.hidden_size // arch.num_heads,
        in_channels=arch.in_channels,
        out_channels=arch.out_channels,
        num_layers=arch.depth,
        dropout=0.0,
        attention_bias=True,
        sample_size=arch.input_size,
        patch_size=arch.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=arch.num_classes,
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=arch.mlp_norm_eps,
    )


def state_dict_to_diffusers(model: DiT) -> dict[str, Tensor]:
    """racedit keys -> diffusers DiT keys; the inverse of :func:`state_dict_from_diffusers`."""
    check_exportable(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    D = model.arch.hidden_size
    table = state["y_embedder.embedding_table.weight"]
    if model.arch.class_dropout_prob == 0:  # diffusers always has the null row: pad it (never trained)
        table = torch.cat([table, torch.zeros_like(table[:1])])
    shared = {
        "timestep_embedder.linear_1.weight": state["t_embedder.mlp.0.weight"],
        "timestep_embedder.linear_1.bias": state["t_embedder.mlp.0.bias"],
        "timestep_embedder.linear_2.weight": state["t_embedder.mlp.2.weight"],
        "timestep_embedder.linear_2.bias": state["t_embedder.mlp.2.bias"],
        "class_embedder.embedding_table.weight": table,
    }
    out: dict[str, Tensor] = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
    }
    for i in range(model.arch.depth):
        d, r = f"transformer_blocks.{i}.", f"blocks.{i}."
        for name, tensor in shared.items():
            out[d + "norm1.emb." + name] = tensor.clone()  # safetensors stores no shared storage
        for kind in ("weight", "bias"):
            out[d + f"norm1.linear.{kind}"] = state[r + f"adaLN_modulation.1.{kind}"]
            for x, part in zip("qkv", state[r + f"attn.qkv.{kind}"].split(D)):
                out[d + f"attn1.to_{x}.{kind}"] = part
            out[d + f"attn1.to_out.0.{kind}"] = state[r + f"attn.proj.{kind}"]
            out[d + f"ff.net.0.proj.{kind}"] = state[r + f"mlp.fc1.{kind}"]
            out[d + f"ff.net.2.{kind}"] = state[r + f"mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"proj_out_1.{kind}"] = state[f"final_layer.adaLN_modulation.1.{kind}"]
        out[f"proj_out_2.{kind}"] = state[f"final_layer.linear.{kind}"]
    return {k: v.contiguous().cpu() for k, v in out.items()}


def probe_inputs(model: DiT, timesteps: tuple[int, ...] = (0, 250, 500, 999), seed: int = 0):
    """A fixed batch (x, t, y): one sample per timestep, N(0, 1) latents, labels spread over the classes."""
    arch = model.arch
    gen = torch.Generator().manual_seed(seed)
    n = len(timesteps)
    x = torch.randn(n, arch.in_channels, arch.input_size, arch.input_size, generator=gen)
    t = torch.tensor(timesteps, dtype=torch.float32)
    y = torch.arange(n) * max(1, arch.num_classes // n) % arch.num_classes
    return x, t, y


@torch.no_grad()
def compare_with_diffusers(model: DiT, transformer: Any, timesteps: tuple[int, ...] = (0, 250, 500, 999)):
    """max and mean |racedit - diffusers| of one forward on :func:`probe_inputs`, and max |racedit|."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    x, t, y = (v.to(device) for v in probe_inputs(model, timesteps))
    x = x.to(dtype)
    was_training = model.training
    ours = model.eval()(x, t, y).float()
    model.train(was_training)
    theirs = transformer.to(device).eval()(x, timestep=t, class_labels=y).sample.float()
    diff = (ours - theirs).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "output_max_abs": float(ours.abs().max()),
    }


def export_diffusers(
    model: DiT,
    path: str | Path,
    *,
    pipeline: bool = False,
    vae: Any = None,
    sampling: Any = None,
    scheduler: str = "ddim",
    check: bool = True,
) -> Path:
    """Write ``model`` as a diffusers ``DiTTransformer2DModel`` folder (``pipeline=False``) or a full
    ``DiTPipeline`` folder (``transformer/``, ``vae/``, ``scheduler/``, ``model_index.json``).

    - ``sampling``: a ``SamplingMeta``, or a racedit model directory whose ``sampling.json`` says which VAE
      and scaling factor the model was trained with and its diffusion schedule (default: DiT's).
    - ``vae``: an ``AutoencoderKL``, or a hub id / local directory (default: ``sampling``'s VAE).
    - ``scheduler``: ``"ddim"`` (``DDIMScheduler``) or ``"dpm++"`` (``DPMSolverMultistepScheduler``), built
      from the model's DDPM schedule. DiTPipeline's loop calls ``scale_model_input``, which diffusers'
      flow-matching scheduler lacks, so flow-matching models export as a transformer only.
    - ``check``: load the written folder with ``DiTTransformer2DModel.from_pretrained`` and compare one
      forward on a few inputs; the result is in ``racedit_export.json``. A model with the official
      timestep convention gets a ``DiffusersExportWarning`` with the measured difference (diffusers runs
      it with its own frequencies).

    The folder is written atomically: a complete folder or the old one, never a partial one.
    """
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import save_file

    from racedit.io import atomic_directory

    check_exportable(model)
    path = Path(path)
    meta = _sampling_meta(sampling)
    if pipeline:
        pieces = _pipeline_pieces(model, meta, vae, scheduler)
    arch = model.arch
    sidecar: dict[str, Any] = {
        "written_by": "racedit.export_diffusers",
        "class_dropout_prob": arch.class_dropout_prob,
        "trained_timestep_convention": arch.timestep_convention,
    }
    with atomic_directory(path) as tmp:
        tdir = tmp / "transformer" if pipeline else tmp
        tdir.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": TRANSFORMER_CLASS, "_diffusers_version": _diffusers_version()}
        config.update(diffusers_config(model))
        (tdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state_dict_to_diffusers(model), tdir / _WEIGHT_FILES[0], metadata={"format": "pt"})
        if check:
            dtype = next(model.parameters()).dtype
            transformer = DiTTransformer2DModel.from_pretrained(tdir, torch_dtype=dtype)
            sidecar["check"] = {
                "inputs": "probe_inputs: N(0,1) latents, t in (0, 250, 500, 999), seed 0",
                "diffusers_convention": compare_with_diffusers(model, transformer),
            }
            del transformer
        (tdir / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        if pipeline:
            _write_pipeline(tmp, model, meta, *pieces)
    if arch.timestep_convention != "diffusers":
        measured = sidecar.get("check", {}).get("diffusers_convention")
        size = (
            f"measured on 4 inputs (t = 0, 250, 500, 999): max |difference| {measured['max_abs']:.3g}, mean "
            f"{measured['mean_abs']:.3g}, for outputs up to {measured['output_max_abs']:.3g}"
            if measured
            else "not measured (check=False)"
        )
        warnings.warn(
            f"{path}: this model was trained with the official DiT timestep frequencies (exponent / half); "
            f"diffusers' DiTTransformer2DModel will run it with its own (exponent / (half - 1)), so its outputs "
            f"differ: {size}",
            DiffusersExportWarning,
            stacklevel=2,
        )
    return path


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _sampling_meta(sampling: Any):
    from racedit.sampling.meta import SamplingMeta, official_dit_meta, read_sampling_meta

    if sampling is None or isinstance(sampling, SamplingMeta):
        return sampling
    meta = read_sampling_meta(sampling)
    return meta if meta is not None else official_dit_meta()


def _pipeline_pieces(model: DiT, meta: Any, vae: Any, scheduler: str):
    """(vae module, scaling factor, scheduler) of a DiTPipeline for ``model``; errors name the fix."""
    from racedit.vae import DEFAULT_SCALING

    diffusion = meta.diffusion_config() if meta is not None else None
    if diffusion is not None and diffusion.objective != "ddpm":
        raise CheckpointError(
            "cannot write a DiTPipeline for a flow-matching model: DiTPipeline's loop calls "
            "scheduler.scale_model_input, which diffusers' FlowMatchEulerDiscreteScheduler does not have. "
            "Export the transformer alone (pipeline=False)"
        )
    if meta is not None and meta.space == "pixel":
        raise CheckpointError(
            "cannot write a DiTPipeline for a pixel-space model: DiTPipeline always decodes with a VAE. "
            "Export the transformer alone (pipeline=False)"
        )
    if vae is None and meta is not None:
        vae = meta.vae
    if vae is None:
        raise CheckpointError(
            "a DiTPipeline needs the VAE the model was trained with: pass vae= (an AutoencoderKL, a hub id or a "
            "local folder) or sampling= (the racedit model directory with its sampling.json)"
        )
    if isinstance(vae, (str, Path)):
        from racedit.vae import load_vae

        vae = load_vae(vae, subfolder=meta.vae_subfolder if meta is not None else None)
    if meta is not None and meta.shift_factor:
        raise CheckpointError(
            f"cannot write a DiTPipeline for latents with shift_factor {meta.shift_factor}: DiTPipeline decodes "
            "latents / scaling_factor without a shift. Export the transformer alone (pipeline=False)"
        )
    scaling = meta.scaling_factor if meta is not None else vae.config.get("scaling_factor", DEFAULT_SCALING)
    return vae, scaling, _scheduler(diffusion, scheduler)


def _scheduler(diffusion: Any, kind: str):
    """A diffusers DDPM-family scheduler with the betas of ``diffusion`` (DiT's when None)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from racedit.diffusion import DiffusionConfig

    diffusion = diffusion or DiffusionConfig()
    betas = dict(
        num_train_timesteps=diffusion.num_timesteps,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        beta_schedule="linear" if diffusion.beta_schedule == "linear" else "squaredcos_cap_v2",
        prediction_type="epsilon",
    )
    if kind == "ddim":
        return DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    if kind in ("dpm++", "dpmsolver"):
        return DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"scheduler must be 'ddim' or 'dpm++', got {kind!r}")


def _write_pipeline(root: Path, model: DiT, meta: Any, vae: Any, scaling: float, scheduler: Any) -> None:
    """vae/, scheduler/ and model_index.json beside root/transformer (written already)."""
    if not math.isclose(float(vae.config.get("scaling_factor", scaling)), scaling):
        vae.register_to_config(scaling_factor=scaling)  # DiTPipeline divides latents by vae's scaling_factor
    vae.save_pretrained(root / "vae", safe_serialization=True)
    scheduler.save_pretrained(root / "scheduler")
    index: dict[str, Any] = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": _diffusers_version(),
        "transformer": ["diffusers", TRANSFORMER_CLASS],
        "vae": ["diffusers", type(vae).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    names = meta.class_names if meta is not None else None
    if names is None and model.arch.num_classes == 1000:
        from racedit.sampling.classes import default_class_names

        names = default_class_names(1000)  # ImageNet's, as the hub's DiTPipeline folders carry
    if names:
        index["id2label"] = {str(i): name for i, name in enumerate(names)}
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if model.arch.num_classes != 1000 or model.arch.class_dropout_prob == 0:
        warnings.warn(
            f"DiTPipeline uses label 1000 as the null class for guidance; this model has {model.arch.num_classes} "
            "classes"
            + (" and no trained null class" if model.arch.class_dropout_prob == 0 else "")
            + ", so call the pipeline with guidance_scale=1",
            DiffusersExportWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------ pipeline as a sampling source


def pipeline_sampling_meta(path: str | Path):
    """The ``SamplingMeta`` a DiTPipeline folder implies: its ``vae/`` folder and scaling factor, DDPM with
    its scheduler's betas (only informative: racedit's samplers run), its ``id2label`` class names."""
    from racedit.config.core import to_dict
    from racedit.diffusion import DiffusionConfig
    from racedit.sampling.meta import SamplingMeta
    from racedit.vae import DEFAULT_SCALING

    path = Path(path)
    index = read_json(path / "model_index.json")
    vae_cfg = read_json(path / "vae" / "config.json") if (path / "vae" / "config.json").is_file() else None
    if vae_cfg is None:
        raise CheckpointError(f"{path} is a DiTPipeline folder without vae/config.json")
    diffusion = DiffusionConfig()
    sched_path = path / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        sched = read_json(sched_path)
        if sched.get("prediction_type", "epsilon") != "epsilon":
            raise CheckpointError(
                f"{sched_path}: prediction_type {sched['prediction_type']!r}; DiT predicts epsilon"
            )
        schedule = sched.get("beta_schedule", "linear")
        if schedule not in ("linear", "squaredcos_cap_v2"):
            raise CheckpointError(f"{sched_path}: beta_schedule {schedule!r} has no racedit equivalent")
        diffusion = DiffusionConfig(
            num_timesteps=int(sched.get("num_train_timesteps", 1000)),
            beta_schedule="linear" if schedule == "linear" else "cosine",
            beta_start=float(sched.get("beta_start", 1e-4)),
            beta_end=float(sched.get("beta_end", 0.02)),
        )
    id2label = index.get("id2label")
    names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
    transformer = read_json(path / "transformer" / "config.json")
    downscale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return SamplingMeta(
        space="latent",
        vae=str((path / "vae").resolve()),
        scaling_factor=float(vae_cfg.get("scaling_factor", DEFAULT_SCALING)),
        diffusion=to_dict(diffusion),
        class_names=names,
        image_size=int(transformer.get("sample_size", 32)) * downscale,
    )
