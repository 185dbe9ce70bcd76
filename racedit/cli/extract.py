"""``racedit-extract`` / ``python -m racedit.data``: encode an image folder into VAE latent shards, verify
them, report their statistics (the library: ``racedit/data/extract.py``).

Examples::

    racedit-extract extract --data-dir /data/imagenet/train --out /data/latents/in256 --resolution 256
    torchrun --nproc_per_node 8 -m racedit.cli.extract extract --data-dir /data/imagenet/train --out ...
    racedit-extract verify --root /data/latents/in256
    racedit-extract stats --root /data/latents/in256
"""

from __future__ import annotations

import argparse
import json
import os

from racedit.cli.args import (
    Parser,
    add_debug,
    add_device,
    add_json,
    add_no_progress,
    add_out,
    add_seed,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from racedit.cli.common import entry, run
from racedit.data.extract import DTYPES, extract_latents, latent_stats, verify
from racedit.data.format import load_meta
from racedit.distributed import process_group_scope
from racedit.vae import DEFAULT_VAE

PROG = "racedit-extract"


def run_extract(args: argparse.Namespace) -> int:
    extract_latents(
        args.data_dir,
        args.out,
        vae=args.vae,
        vae_subfolder=args.vae_subfolder,
        resolution=args.resolution,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        dtype=args.dtype,
        scaling_factor=args.scaling_factor,
        device=args.device,
        timeout_hours=args.timeout_hours,
        throttle=args.throttle,
        progress=not args.no_progress,
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    problems = verify(args.root, quick=args.quick, progress=not args.no_progress)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.root}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    meta = load_meta(args.root)
    print(
        f"OK: {meta['num_images']} images in {meta['num_shards']} shards, {meta['num_classes']} classes, "
        f"latents {meta['latent_shape']} ({'headers and labels only' if args.quick else 'all values checked'})"
    )
    return 0


def run_stats(args: argparse.Namespace) -> int:
    stats = latent_stats(args.root, args.max_images, args.seed)
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(
        f"latent statistics of {stats['root']}: {stats['images']} images, one posterior draw each, random "
        f"flip, multiplied by the scaling factor {stats['scaling_factor']}"
    )
    print(f"{'channel':>8} {'mean':>9} {'std':>9}")
    for c, (m, s) in enumerate(zip(stats["channel_mean"], stats["channel_std"])):
        print(f"{c:>8} {m:>9.4f} {s:>9.4f}")
    print(f"{'all':>8} {stats['mean']:>9.4f} {stats['std']:>9.4f}")
    if stats["unit_std_scaling_factor"] is not None:
        print(f"a scaling factor of {stats['unit_std_scaling_factor']:.5f} would give unit std")
    if not 0.5 <= stats["std"] <= 2.0:
        print(
            f"WARNING: the scaled latents have std {stats['std']:.3g}, far from 1: the scaling factor "
            f"{stats['scaling_factor']} in meta.json is probably wrong for this VAE"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Encode an image-folder dataset into VAE latent shards, verify them, report their stats.",
        epilog="examples:" + __doc__.split("Examples::")[1] if __doc__ else None,
    )
    add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{extract,verify,stats}")

    ex = sub.add_parser(
        "extract",
        help="encode an ImageFolder tree into latent shards (resumable; multi-process with torchrun)",
        description="Encode <data-dir>/<class>/<image> with ADM's center crop and a diffusers AutoencoderKL; "
        "store mean and std (fp16) of each image and its horizontal flip. Rerun the same command to resume "
        "after an interruption. Launch with `torchrun --nproc_per_node N -m racedit.cli.extract extract ...` "
        "or `accelerate launch` to use N processes (each takes every N-th shard).",
    )
    ex.add_argument("--data-dir", required=True, help="root of the image folder: <data-dir>/<class>/<image>")
    add_out(
        ex,
        "the latent directory (shard-*.safetensors, index, meta.json, manifest.json; rerun to resume)",
        required=True,
    )
    ex.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: hub id or local folder")
    ex.add_argument(
        "--vae-subfolder",
        default=None,
        help="subfolder of --vae holding the VAE (auto 'vae' for a full Stable Diffusion pipeline folder)",
    )
    ex.add_argument(
        "--resolution", type=positive_int, default=256, help="image side after ADM center crop (256, 512)"
    )
    ex.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per VAE forward (x2 with flips)"
    )
    ex.add_argument(
        "--shard-size",
        type=positive_int,
        default=4096,
        help="images per shard (the unit of resume and of work)",
    )
    ex.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=min(8, os.cpu_count() or 1),
        help="image decoding processes",
    )
    ex.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="VAE compute precision (storage is fp16)"
    )
    ex.add_argument(
        "--scaling-factor",
        type=positive_float,
        default=None,
        help="latent scaling factor to record; default: the VAE config's (0.18215 for SD VAEs)",
    )
    add_device(ex)
    ex.add_argument(
        "--timeout-hours",
        type=positive_float,
        default=12.0,
        help="how long processes wait for each other at the end",
    )
    ex.add_argument(
        "--throttle",
        type=non_negative_float,
        default=0.0,
        help="seconds to sleep after each batch (only for testing interruption and resume)",
    )
    add_no_progress(ex)
    add_debug(ex)
    ex.set_defaults(func=run_extract)

    ve = sub.add_parser(
        "verify",
        help="check every shard against the index (counts, shapes, labels, finite values)",
        description="Check a latent directory: shard headers against meta.json and the index, labels, "
        "each image exactly once, and (unless --quick) every stored value finite with std >= 0. "
        "Exit status 1 when a problem is found (listed on stdout).",
    )
    ve.add_argument("--root", required=True, help="latent directory written by `racedit-extract extract`")
    ve.add_argument("--quick", action="store_true", help="check headers and labels only, not every value")
    add_no_progress(ve)
    add_debug(ve)
    ve.set_defaults(func=run_verify)

    st = sub.add_parser(
        "stats",
        help="per-channel mean/std of the scaled latents (spot a wrong scaling factor)",
        description="Per-channel mean and std of the latents as the trainer sees them (one posterior draw, "
        "random flip, times the scaling factor). A std far from 1 means a wrong scaling factor.",
    )
    st.add_argument("--root", required=True, help="latent directory written by `racedit-extract extract`")
    st.add_argument(
        "--max-images", type=positive_int, default=10000, help="random subset size (all if fewer)"
    )
    add_seed(st, "the subset and of the posterior draws")
    add_json(st, "the statistics")
    add_debug(st)
    st.set_defaults(func=run_stats)
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with process_group_scope():  # under torchrun: every rank leaves the process group cleanly
        return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """The command: user errors are one stderr line and exit code 2 (``--debug``: the traceback)."""
    return run(_main, PROG, argv)


cli = entry(_main, PROG)  # the console script racedit-extract

if __name__ == "__main__":
    cli()
