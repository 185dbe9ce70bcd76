"""``sample.py`` / ``racedit-sample``: class-conditional samples from a racedit or official DiT checkpoint.

Two modes, both writing into the folder ``--out DIR`` (default ``samples``):
- a labelled grid: ``sample.py --ckpt CKPT --classes 207 "golden retriever" --num-per-class 4 --out DIR``
  writes ``DIR/grid.png`` and ``DIR/grid.json`` (every setting);
- an evaluation file: ``sample.py --ckpt CKPT --num-samples 50000 --out DIR`` writes ``DIR/samples.npz`` in
  ADM's format (``arr_0`` uint8 N x H x W x 3, ``arr_1`` labels) and ``DIR/samples.json`` (every setting);
  ``racedit-fid eval DIR --ref REF.npz`` reads both. Finished chunks are kept in ``DIR/samples.parts/``;
  rerunning the same command after a kill resumes.
  ``torchrun --nproc_per_node K sample.py ...`` or ``accelerate launch sample.py ...`` spreads the
  chunks over processes (CPU: gloo); sample i always gets seed (seed, i), so the result does not
  depend on the number of processes, nor on the batch size, except for models whose routing ranks
  across the batch (BL / BE choice, expert race with top-K at eval): then each image depends on the
  other samples of its batch; the command says so, the record holds the batch size and the label order,
  and the same command with the same --batch-size reproduces the same bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from safetensors import SafetensorError

import racedit
from racedit.cli.args import (
    Parser,
    add_debug,
    add_device,
    add_no_progress,
    add_out,
    add_seed,
    finite_float,
    non_negative_float,
    positive_float,
    positive_int,
    unit_interval,
)
from racedit.cli.common import UserError, entry, progress, run, say
from racedit.config.core import to_dict
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.distributed import process_group_scope, process_state
from racedit.io import atomic_write_json, sha256_bytes, sha256_file
from racedit.models.diffusers_io import is_pipeline_folder, pipeline_sampling_meta
from racedit.models.loading import CheckpointError, load_model
from racedit.moe import inference_batch_dependence
from racedit.sampling.classes import default_class_names, parse_classes
from racedit.sampling.generate import QUANTIZATIONS, generate
from racedit.sampling.grid import save_grid
from racedit.sampling.meta import SamplingMeta, official_dit_meta, read_sampling_meta
from racedit.sampling.samplers import DEFAULT_STEPS, SAMPLERS
from racedit.sampling.store import ChunkStore, ChunkStoreError
from racedit.vae import LatentVAE, load_vae, resolve_vae

PROG = "racedit-sample"
GRID, SAMPLES = "grid", "samples"  # the file names inside --out: grid.png / grid.json, samples.npz / .json
ALL_SAMPLERS = [s for names in SAMPLERS.values() for s in names]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--ckpt",
        required=True,
        help="racedit model/checkpoint directory, an official DiT .pt file, or a diffusers "
        "DiTTransformer2DModel / DiTPipeline folder (a pipeline's vae/ is the VAE)",
    )
    g.add_argument(
        "--no-verify",
        action="store_true",
        help="load an exported model even when its files no longer match the hashes in its manifest.json "
        "(for weights edited on purpose; by default a mismatch is an error naming the file)",
    )
    g.add_argument(
        "--objective",
        choices=["ddpm", "flow"],
        default=None,
        help="override the objective from sampling.json (an official DiT .pt is ddpm)",
    )
    g.add_argument(
        "--vae",
        default=None,
        help="latent models: diffusers AutoencoderKL hub id or local dir (default: sampling.json's, "
        "else stabilityai/sd-vae-ft-ema)",
    )
    g.add_argument(
        "--scaling-factor",
        type=positive_float,
        default=None,
        help="latent scale (default: sampling.json's, else 0.18215)",
    )
    g.add_argument(
        "--shift-factor",
        type=finite_float,
        default=None,
        help="latent shift: the decoder gets latents / scale + shift (default: sampling.json's, else the "
        "VAE config's; 0 for SD-VAE)",
    )

    g = p.add_argument_group("what to sample")
    g.add_argument(
        "--classes",
        nargs="+",
        default=None,
        help="class ids or names, e.g. 207 'golden retriever' 88,89 (grid default: 8 classes spread over "
        "the label range; with --num-samples: restrict labels to these classes)",
    )
    g.add_argument("--num-per-class", type=positive_int, default=4, help="grid mode: samples per class")
    g.add_argument(
        "--num-samples",
        type=positive_int,
        default=None,
        help="evaluation mode: total samples, written as --out/samples.npz (without it: a grid)",
    )
    g.add_argument(
        "--label-sampling",
        choices=["uniform", "balanced"],
        default="uniform",
        help="evaluation mode labels: uniform random draws seeded by --seed (ADM/DiT), or balanced "
        "(sample i gets class i mod number of classes)",
    )

    g = p.add_argument_group("sampler and guidance")
    g.add_argument(
        "--sampler",
        choices=ALL_SAMPLERS,
        default=None,
        help="ddpm objective: ddpm (ancestral), ddim, dpm++; flow objective: euler, heun, euler-maruyama "
        "(default: ddpm or euler)",
    )
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"sampling steps (default per sampler: {DEFAULT_STEPS})",
    )
    g.add_argument(
        "--cfg-scale",
        type=non_negative_float,
        default=None,
        help="classifier-free guidance scale >= 0; 1 = none (one forward per step), 0 = unconditional. "
        "Default 4.0 for a grid, 1.5 for --num-samples (DiT's settings)",
    )
    g.add_argument(
        "--guidance-interval",
        nargs=2,
        type=unit_interval,
        metavar=("LO", "HI"),
        default=None,
        help="apply guidance only at noise levels in [LO, HI] (0 = data, 1 = noise; ddpm: t/1000)",
    )
    g.add_argument(
        "--guidance-channels",
        type=guidance_channels,
        default="all",
        help="guide 'all' prediction channels, or only the first N (3 reproduces DiT's numbers)",
    )
    g.add_argument(
        "--cfg-halves",
        choices=["joint", "separate"],
        default="joint",
        help="guided forward: conditional and unconditional halves in one batch (DiT's protocol), or two "
        "forwards; differs only for routing that ranks across the batch (they then race together or not)",
    )
    g.add_argument(
        "--spacing",
        choices=["linspace", "leading", "trailing"],
        default=None,
        help="timestep spacing of the ddpm-family samplers (default: linspace for ddpm and dpm++ = DiT's "
        "'250' respacing; leading for ddim = DiT's 'ddimN')",
    )
    g.add_argument(
        "--shift",
        type=positive_float,
        default=None,
        help="flow euler/heun: time shift of the grid (1 = uniform)",
    )
    g.add_argument(
        "--sde-norm",
        type=non_negative_float,
        default=None,
        help="euler-maruyama: diffusion g(t)^2 = norm * t (default 1)",
    )
    add_seed(g, "the samples (sample i uses seed (seed, i)) and of the evaluation labels")

    g = p.add_argument_group("output")
    add_out(
        g,
        "grid.png + grid.json (grid mode), or samples.npz + samples.json + samples.parts/ (with --num-samples)",
        default="samples",
    )
    g.add_argument(
        "--nrow", type=positive_int, default=None, help="grid mode: tiles per row (default: --num-per-class)"
    )
    g.add_argument(
        "--quantization",
        choices=list(QUANTIZATIONS),
        default="dit",
        help="float -> uint8: dit = clamp(127.5x+128) (rounds), adm = clamp((x+1)*127.5) (truncates)",
    )
    g.add_argument(
        "--chunk-size", type=positive_int, default=500, help="evaluation mode: samples per resumable chunk"
    )
    g.add_argument("--keep-chunks", action="store_true", help="keep the .parts folder after merging")
    g.add_argument(
        "--overwrite", action="store_true", help="evaluation mode: redo even if samples.npz is complete"
    )

    g = p.add_argument_group("runtime")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="samples per forward (results do not depend on it unless the routing ranks across the batch)",
    )
    add_device(g)
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="autocast precision of the model forward (the sampler state stays fp32)",
    )
    add_no_progress(g)
    add_debug(g)
    return p


def guidance_channels(text: str) -> str | int:
    """``all`` or a positive number of channels."""
    if text == "all":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'all' or an integer >= 1, got {text!r}") from None


# ------------------------------------------------------------------------------------------- helpers


def weights_file(ckpt: Path) -> Path | None:
    if ckpt.is_file():
        return ckpt
    for sub in ("", "ema", "model"):
        f = (ckpt / sub if sub else ckpt) / "model.safetensors"
        if f.is_file():
            return f
    for f in (
        ckpt / "diffusion_pytorch_model.safetensors",
        ckpt / "transformer" / "diffusion_pytorch_model.safetensors",
    ):
        if f.is_file():  # diffusers DiTTransformer2DModel / DiTPipeline folders
            return f
    return None


def resolve_meta(args: argparse.Namespace, model: torch.nn.Module) -> SamplingMeta:
    ckpt = Path(args.ckpt)
    meta = read_sampling_meta(ckpt) if ckpt.is_dir() else None
    if meta is None and ckpt.is_dir():
        if is_pipeline_folder(ckpt):  # its vae/; the scheduler config only says which DDPM betas
            meta = pipeline_sampling_meta(ckpt)
    if meta is None:
        if ckpt.is_dir():
            say(
                PROG,
                f"{ckpt} has no sampling.json: assuming DiT's settings (latent space, ddpm, "
                "stabilityai/sd-vae-ft-ema, scale 0.18215)",
            )
        meta = official_dit_meta(image_size=model.arch.input_size * 8)
    diffusion = dict(meta.diffusion)
    if args.objective is not None:
        diffusion["objective"] = args.objective
    pick = lambda flag, stored: flag if flag is not None else stored  # noqa: E731
    return SamplingMeta(
        space=meta.space,
        vae=args.vae or meta.vae,
        scaling_factor=pick(args.scaling_factor, meta.scaling_factor),
        shift_factor=pick(args.shift_factor, meta.shift_factor),
        vae_subfolder=meta.vae_subfolder if args.vae is None else None,
        diffusion=diffusion,
        class_names=meta.class_names,
        image_size=meta.image_size,
    )


def evaluation_labels(args: argparse.Namespace, pool: list[int]) -> np.ndarray:
    """(num_samples,) labels: uniform draws seeded by --seed, or balanced round-robin over ``pool``."""
    pool_arr = np.asarray(pool, dtype=np.int64)
    if args.label_sampling == "balanced":
        return pool_arr[np.arange(args.num_samples) % len(pool_arr)]
    rng = np.random.default_rng([args.seed, 0x1ABE1])
    return pool_arr[rng.integers(0, len(pool_arr), size=args.num_samples)]


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        parser.error(f"--guidance-interval LO HI needs LO <= HI, got {args.guidance_interval}")
    out = Path(args.out)
    if out.suffix.lower() in (".png", ".npz", ".json", ".jpg"):
        parser.error(
            f"--out is the output folder (files {GRID}.png / {SAMPLES}.npz are written inside it), got the file "
            f"name {args.out}; pass its folder, e.g. --out {out.parent if str(out.parent) != '.' else SAMPLES}"
        )
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out} is a file; pass a folder (created if needed)")


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """The command: user errors are one stderr line and exit code 2 (``--debug``: the traceback)."""
    return run(_main, PROG, argv)


def _main(argv: list[str] | None = None) -> int:
    with process_group_scope():  # under torchrun: every rank leaves the process group cleanly
        return _sample(argv)


cli = entry(_main, PROG)  # the console script racedit-sample


def load_checkpoint(ckpt: str, device: torch.device, verify: bool = True) -> torch.nn.Module:
    """``load_model`` with every failure of the files (missing, corrupt, malformed) as one UserError."""
    path = Path(ckpt)
    if not path.exists():
        raise UserError(
            f"--ckpt {ckpt}: no such file or directory. Pass a racedit model directory (train.output_dir/final), "
            "a training checkpoint directory, or an official DiT .pt file (download DiT-XL-2-256x256.pt from "
            "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt)"
        )
    if path.is_dir():
        model_dir = next(
            (d for d in (path, path / "ema", path / "model") if (d / "config.json").is_file()), None
        )
        if model_dir is not None:
            config = model_dir / "config.json"
            try:
                if not isinstance(json.loads(config.read_text()), dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as err:
                raise UserError(
                    f"{config} is not a valid model config ({err}); re-export the model with "
                    "racedit.save_model or restore config.json from the run's checkpoint"
                ) from None
            weights = ("model.safetensors", "diffusion_pytorch_model.safetensors")  # racedit, diffusers
            if not any((model_dir / name).is_file() for name in weights):
                raise UserError(
                    f"{model_dir} has a config.json but no model.safetensors (the weights); the export is "
                    "incomplete: re-export it, or pass a training checkpoint directory (it holds ema/)"
                )
    try:
        return load_model(ckpt, device=device, verify=verify)
    except UserError:
        raise
    except (CheckpointError, SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"cannot load the model from {weights_file(path) or path} ({type(err).__name__}: {first}); the file "
            "is corrupt or not a racedit/DiT checkpoint: re-export it or use another checkpoint "
            "(--debug shows the traceback)"
        ) from err


def _sample(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    # Without CUDA (or with --device cpu), torchrun's environment means gloo processes on the CPU.
    state = process_state(args.device)
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    device = state.device
    grid_mode = args.num_samples is None
    if grid_mode and not is_main:
        return 0  # a grid is drawn by one process

    model = load_checkpoint(args.ckpt, device, verify=not args.no_verify)
    meta = resolve_meta(args, model)
    dcfg: DiffusionConfig = meta.diffusion_config()
    objective = build_objective(dcfg, model.arch.learn_sigma)
    sampler = args.sampler or objective.samplers[0]
    if sampler not in objective.samplers:
        parser.error(
            f"--sampler {sampler} does not fit the {objective.kind} objective: use one of {list(objective.samplers)}"
        )
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[sampler]
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (4.0 if grid_mode else 1.5)
    class_names = list(meta.class_names) if meta.class_names else default_class_names(model.arch.num_classes)
    try:
        classes = parse_classes(args.classes, class_names, model.arch.num_classes) if args.classes else None
    except ValueError as err:
        parser.error(str(err))
    options: dict[str, Any] = {}
    if args.spacing is not None:
        options["spacing"] = args.spacing
    if args.shift is not None:
        options["shift"] = args.shift
    if args.sde_norm is not None:
        options["diffusion_norm"] = args.sde_norm
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    decode, vae_record = None, {"vae": None, "scaling_factor": None, "shift_factor": None}
    if meta.space == "latent":
        source = resolve_vae(meta.vae, meta.vae_subfolder)
        latent_vae = LatentVAE(
            load_vae(source, device), meta.scaling_factor, meta.shift_factor, batch_size=args.batch_size
        )
        decode = latent_vae.decode
        vae_record = {
            **source.record(),
            "scaling_factor": latent_vae.scaling_factor,
            "shift_factor": latent_vae.shift_factor,
        }

    dependence = inference_batch_dependence(model)
    if dependence is not None and is_main:
        say(
            PROG,
            f"batch-dependent: {dependence}; each image depends on the other samples of its batch "
            f"(--batch-size {args.batch_size}{'' if grid_mode else f' within chunks of {args.chunk_size}'}, "
            f"label order, --cfg-halves {args.cfg_halves}); the same command reproduces the same bytes",
        )

    wfile = weights_file(Path(args.ckpt))
    settings: dict[str, Any] = {
        "ckpt": str(Path(args.ckpt).resolve()),
        "weights_sha256": sha256_file(wfile) if wfile is not None else None,
        "model": to_dict(model.arch),
        "space": meta.space,
        **vae_record,
        "diffusion": to_dict(dcfg),
        "sampler": sampler,
        "steps": steps,
        "sampler_options": options,
        "cfg_scale": cfg_scale,
        "guidance_interval": list(args.guidance_interval) if args.guidance_interval else None,
        "guidance_channels": args.guidance_channels,
        "cfg_halves": args.cfg_halves,
        "batch_dependence": dependence,  # None: each image is independent of its batch (to float rounding)
        "seed": args.seed,
        "seeding": "sample i: torch CPU generator seeded by SeedSequence([seed, i])",
        "quantization": args.quantization,
        "quantization_rule": QUANTIZATIONS[args.quantization],
        "precision": args.precision,
    }
    if dependence is not None:  # part of what the images are: a different batch size gives other images
        settings["batch_size"] = args.batch_size
    common = dict(
        objective=objective,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        guidance_channels=args.guidance_channels,
        guidance_halves=args.cfg_halves,
        seed=args.seed,
        decode=decode,
        batch_size=args.batch_size,
        quantization=args.quantization,
        autocast_dtype=autocast,
        sampler_options=options,
    )
    if grid_mode:
        return _grid(args, model, classes, class_names, settings, common)
    return _evaluation(args, model, classes, settings, common, state, rank, world, is_main)


def _record(settings: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        **settings,
        **extra,
        "versions": {
            "racedit": racedit.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _grid(args, model, classes, class_names, settings, common) -> int:
    n = model.arch.num_classes
    if classes is None:
        classes = sorted({round(i * (n - 1) / 7) for i in range(min(8, n))})
    labels = [c for c in classes for _ in range(args.num_per_class)]
    images = generate(model, labels, progress=not args.no_progress, **common)
    out = Path(args.out) / f"{GRID}.png"
    save_grid(images, labels, class_names, out, nrow=args.nrow or args.num_per_class)
    extra = {"mode": "grid", "classes": classes, "num_per_class": args.num_per_class}
    extra |= {"batch_size": args.batch_size, "class_order": labels}  # the order batches were filled in
    record = _record(settings, extra)
    record["params"] = model.param_counts()
    atomic_write_json(out.with_suffix(".json"), record, indent=2)
    print(f"wrote {out} ({len(labels)} samples) and {out.with_suffix('.json')}")
    return 0


def _evaluation(args, model, classes, settings, common, state, rank, world, is_main) -> int:
    npz = Path(args.out) / f"{SAMPLES}.npz"
    json_path = npz.with_suffix(".json")
    pool = classes if classes is not None else list(range(model.arch.num_classes))
    settings = {
        **settings,
        "num_samples": args.num_samples,
        "label_sampling": args.label_sampling,
        "classes": classes,
        "chunk_size": args.chunk_size,
    }
    store = ChunkStore(npz, args.num_samples, args.chunk_size)
    if npz.is_file() and json_path.is_file() and not args.overwrite:
        old = json.loads(json_path.read_text())
        if all(old.get(k) == v for k, v in settings.items()):
            if is_main:
                print(f"{npz} is already complete with these settings (use --overwrite to redo)")
            return 0
    error: str | None = None
    if is_main:
        try:
            store.prepare(settings)
            for problem in store.remove_corrupt_chunks():  # redone below, never merged
                say(PROG, problem)
        except ChunkStoreError as err:
            error = str(err)
    state.wait_for_everyone()
    if error is not None or not (store.dir / "settings.json").is_file():
        if is_main:
            raise UserError(error or f"{store.dir}/settings.json could not be written")
        return 2
    labels = evaluation_labels(args, pool)
    todo = store.missing()
    if is_main:
        done = store.num_chunks - len(todo)
        say(
            PROG,
            f"{args.num_samples} samples in {store.num_chunks} chunks of {args.chunk_size}: "
            f"{done} already done, {len(todo)} to go, over {world} process(es)",
        )
    state.wait_for_everyone()  # every rank has listed the same missing chunks before any is written
    mine = todo[rank::world]
    bar = progress(
        total=sum(store.bounds(k)[1] - store.bounds(k)[0] for k in mine) * world,
        desc="samples (all processes, estimated)",
        disable=args.no_progress or not is_main,
        unit="img",
    )
    for k in mine:
        start, end = store.bounds(k)
        images = generate(model, torch.from_numpy(labels[start:end]), first_index=start, **common)
        store.save(k, images.numpy(), labels[start:end])
        bar.update((end - start) * world)
    bar.close()
    state.wait_for_everyone()
    if is_main:
        store.merge(keep_parts=args.keep_chunks)
        record = _record(
            settings,
            {
                "mode": "npz",
                "file": str(npz),
                "layout": "arr_0 uint8 (N,H,W,3), arr_1 int64 labels",
                "num_processes": world,
                "batch_size": args.batch_size,
                # batches are consecutive runs of arr_1 within each chunk, in this order
                "class_order": "arr_1 (sampling order)",
                "class_order_sha256": sha256_bytes(labels.astype("<i8").tobytes()),
            },
        )
        record["params"] = model.param_counts()
        atomic_write_json(json_path, record, indent=2)
        print(f"wrote {npz} and {json_path}", flush=True)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    cli()
