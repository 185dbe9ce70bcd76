"""``racedit-fid`` / ``python -m fid``: evaluate samples, build reference batches, make the leaderboard.

The library is the ``fid`` package; this module is only its command line.

examples:
  racedit-fid eval samples/DiT-XL-2/ --ref VIRTUAL_imagenet256_labeled.npz
  racedit-fid eval samples/DiT-XL-2/ --ref VIRTUAL_imagenet256_labeled.npz --cmmd --clip-score
  accelerate launch -m fid eval samples/DiT-XL-2/ --ref VIRTUAL_imagenet256_labeled.npz   # several GPUs
  racedit-fid ref /data/imagenet/train --image-size 256 --npz ref_imagenet256.npz
  racedit-fid leaderboard samples/ --out assets/leaderboard
  racedit-fid weights                      # where the Inception weights are (or how to get them)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fid.weights import ENV_VAR, WEIGHTS_URL, InceptionWeightsError
from racedit.cli.args import (
    Parser,
    add_debug,
    add_device,
    add_no_progress,
    add_out,
    add_seed,
    non_negative_int,
    positive_int,
)
from racedit.cli.common import UserError, entry, run, say
from racedit.distributed import process_group_scope

PROG = "racedit-fid"
# Each sub-command imports its part of fid/ when it runs: --help and usage errors answer without loading
# torch-fidelity and the Inception code (seconds), and `weights` or `leaderboard` never load the network.


def _add_network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network and feature extraction")
    g.add_argument(
        "--inception-weights",
        metavar="PATH",
        default=None,
        help=f"the 2015-12-05 Inception weights (.pth, SHA-256 checked); default: ${ENV_VAR}, then "
        f"$TORCH_HOME/hub/checkpoints/ under either known name. Never downloaded: fetch {WEIGHTS_URL}",
    )
    g.add_argument(
        "--random-inception",
        metavar="SEED",
        type=non_negative_int,
        default=None,
        help="use a seeded randomly initialised Inception instead of the weights (smoke tests only: "
        "the numbers are not FIDs and the leaderboard ignores such records)",
    )
    g.add_argument(
        "--features",
        metavar="MODULE:CALLABLE",
        default=None,
        help="for tests only: a stand-in feature network instead of the Inception (package.module:callable or "
        "file.py:callable; interface in fid/network.py). Its numbers are not FIDs and are recorded as such",
    )
    g.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per Inception forward pass per process"
    )
    add_device(g)
    g.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="for image folders: centre-crop every image to this size with ADM's preprocessing "
        "(BOX halving, BICUBIC resize, centre crop); needed when the images differ in size",
    )
    g.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="image-decoding threads for folders (default min(8, CPUs))",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache folder (default $RACEDIT_FID_CACHE, else ~/.cache/racedit/fid); keyed by the "
        "content hash of the input and the network",
    )
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    add_no_progress(g)
    add_debug(g)


def _build_model(args: argparse.Namespace):
    from fid.inception import InceptionFeatures

    if args.features is not None:
        from fid.network import load_feature_network

        return load_feature_network(args.features)
    if args.random_inception is not None:
        return InceptionFeatures.random_init(args.random_inception)
    return InceptionFeatures.from_weights(args.inception_weights)


def _extract_kwargs(args: argparse.Namespace) -> dict:
    return {
        "batch_size": args.batch_size,
        "device": args.device,
        "cache_dir": args.cache_dir,
        "use_cache": not args.no_cache,
        "progress": not args.no_progress,
    }


def check_reference(path: str) -> None:
    """Refuse a reference that is not an ADM-format .npz before any work, naming the file."""
    from fid.data import InputError, NpzImages

    p = Path(path)
    if not p.exists():
        raise UserError(
            f"--ref {path}: no such file; pass an ADM reference batch .npz (or build one: racedit-fid ref)"
        )
    if p.is_dir():
        raise InputError(
            f"reference {p} is a folder: build a reference batch first with `racedit-fid ref {p} --out ref.npz` "
            "(ADM's .npz format), then pass --ref ref.npz"
        )
    NpzImages(p)  # readable zip with arr_0 uint8 (N, H, W, 3), else an InputError naming the file


def cmd_eval(args: argparse.Namespace) -> int:
    from fid.data import FolderImages, open_images
    from fid.evaluate import evaluate
    from fid.record import parse_meta

    clip = None
    if args.cmmd or args.clip_score:
        from fid.clip import ClipEmbedder

        clip = ClipEmbedder.from_pretrained(args.clip_weights)
    class_names = None
    if args.clip_class_names is not None:
        class_names = [n.strip() for n in open(args.clip_class_names).read().splitlines() if n.strip()]
    src = open_images(args.samples, image_size=args.image_size, settings_path=args.settings)
    check_reference(args.ref)
    record_path = record_file(args.samples, args.ref, args.out)
    model = _build_model(args)
    if isinstance(src, FolderImages) and args.workers is not None:
        src.workers = args.workers
    out = evaluate(
        src,
        args.ref,
        model,
        is_split_size=args.is_split_size,
        pr_k=args.pr_k,
        pr_chunk=args.pr_chunk,
        pr_precision=args.pr_precision,
        kid=args.kid,
        clip=clip,
        cmmd=args.cmmd,
        clip_score=args.clip_score,
        class_names=class_names,
        meta=parse_meta(args.meta),
        record_path=record_path,
        write=False,
        **_extract_kwargs(args),
    )
    if out is None:  # not process 0
        return 0
    result, record = out
    from fid.record import write_record

    path = write_record(record, record_path)
    if not model.is_reference_network:
        say(PROG, f"warning: {model.identity} is not the reference Inception: these numbers are not FIDs")
    rows = [
        ("FID", result.fid),
        ("sFID", result.sfid),
        ("Inception Score", result.inception_score),
        ("IS std (splits)", result.inception_score_std),
        ("Precision", result.precision),
        ("Recall", result.recall),
    ]
    if result.kid is not None:
        rows += [("KID (not ADM)", result.kid), ("KID std", result.kid_std)]
    if result.cmmd is not None:
        rows.append(("CMMD", result.cmmd))
    if result.clip_score is not None:
        rows.append(("CLIP score", result.clip_score))
    if clip is not None and not clip.is_reference_network:
        say(PROG, "warning: not CLIP ViT-L/14@336px: CMMD / CLIP score are not the literature's")
    print(f"{result.num_samples} samples vs {result.num_ref_images} reference images ({args.ref})")
    for name, value in rows:
        print(f"{name:>16}: {value:.4f}")
    print(f"record: {path}")
    return 0


def record_file(samples: str, ref: str, out: str | None) -> Path:
    """Where ``eval`` writes its record: ``--out DIR/fid-<ref name>.fid.json``, else beside the samples
    (``fid.record.default_record_path``)."""
    from fid.record import default_record_path

    if out is None:
        return default_record_path(samples, ref)
    return Path(out) / f"fid-{Path(ref).stem}.fid.json"


def cmd_ref(args: argparse.Namespace) -> int:
    from fid.reference import build_reference

    model = _build_model(args)
    out = build_reference(
        args.source,
        args.npz,
        model,
        num_ref_images=args.num_ref_images,
        seed=args.seed,
        image_size=args.image_size,
        **_extract_kwargs(args),
    )
    print(f"reference batch: {out}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from fid.leaderboard import write_leaderboard

    paths = write_leaderboard(
        args.records,
        args.out,
        include_published=not args.no_published,
        include_test_records=args.include_test_records,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from fid.weights import resolve_inception_weights, verify_weights

    path = resolve_inception_weights(args.inception_weights)
    print(json.dumps({"path": str(path), "sha256": verify_weights(path)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="ADM-protocol evaluation (FID, sFID, IS, precision/recall; KID optional) on torch-fidelity's "
        "InceptionV3 port, reference batches and the leaderboard. Spec: docs/spec/evaluation.md.",
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate samples against a reference batch; writes a JSON record")
    p.add_argument(
        "samples",
        help="an ADM-format .npz (arr_0 uint8 N,H,W,3), a sample.py output folder (one .npz + JSON record) "
        "or a folder of PNG images",
    )
    p.add_argument(
        "--ref",
        required=True,
        help="reference batch .npz in ADM's format (e.g. VIRTUAL_imagenet256_labeled.npz, or one made by "
        "`racedit-fid ref`)",
    )
    add_out(
        p,
        "the record, fid-<ref name>.fid.json (default: the samples folder, or <samples stem>.<ref name>.fid.json "
        "beside an .npz)",
    )
    p.add_argument(
        "--settings", default=None, help="the sample.py JSON record (default: found next to the .npz)"
    )
    p.add_argument(
        "--meta",
        action="append",
        metavar="KEY=VALUE",
        help="set or override a record column (model, params_total, params_activated, train_iterations, "
        "train_batch_size, vae, objective, sampler, sampling_steps, cfg_scale, cfg_interval, cfg_channels, "
        "label_sampling, quantisation, model_weights_sha256, checkpoint, notes); repeatable",
    )
    p.add_argument(
        "--kid", action="store_true", help="also compute KID (outside the ADM protocol, labelled so)"
    )
    p.add_argument(
        "--cmmd",
        action="store_true",
        help="also compute CMMD (CLIP ViT-L/14@336px embeddings, Gaussian RBF sigma 10, x1000) against the "
        "reference batch's images",
    )
    p.add_argument(
        "--clip-score",
        action="store_true",
        help="also compute the CLIP score: 100 * max(cos(image, 'a photo of a {class name}.'), 0), mean; "
        "needs the samples' labels (arr_1)",
    )
    p.add_argument(
        "--clip-weights",
        metavar="DIR",
        default=None,
        help="CLIPModel folder of openai/clip-vit-large-patch14-336; default: $RACEDIT_CLIP_WEIGHTS, then the "
        "Hugging Face cache. Never downloaded",
    )
    p.add_argument(
        "--clip-class-names",
        metavar="FILE",
        default=None,
        help="class names for the CLIP score prompts, one per line in label order (default: ImageNet-1k)",
    )
    p.add_argument(
        "--is-split-size",
        type=positive_int,
        default=5000,
        help="Inception Score split size (ADM: 5000 -> 10 splits of 50k)",
    )
    p.add_argument(
        "--pr-k", type=positive_int, default=3, help="k of the k-NN manifolds for precision/recall (ADM: 3)"
    )
    p.add_argument(
        "--pr-chunk",
        type=positive_int,
        default=10000,
        help="block size of the pairwise distances (memory ~ chunk^2 floats; results do not depend on it)",
    )
    p.add_argument(
        "--pr-precision",
        choices=("adm", "fp32"),
        default="adm",
        help="distance arithmetic: 'adm' = ADM's float16 blocks with float32 fallback; 'fp32' = float32",
    )
    _add_network_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ref", help="build a reference batch (ADM .npz format) from a folder of images")
    p.add_argument("source", help="folder of images (recursive) or an .npz with arr_0")
    p.add_argument(
        "--npz",
        required=True,
        metavar="FILE",
        help="the reference batch to write, in ADM's format (arr_0, mu, sigma, mu_s, sigma_s, racedit_meta)",
    )
    p.add_argument(
        "--num-ref-images",
        type=positive_int,
        default=10000,
        help="images kept as arr_0 for precision/recall (ADM: 10,000); statistics use all images",
    )
    add_seed(p, "the arr_0 subset")
    _add_network_args(p)
    p.set_defaults(func=cmd_ref)

    p = sub.add_parser("leaderboard", help="gather records into a markdown table, a CSV and a plot")
    p.add_argument(
        "records", nargs="*", default=[], help="*.fid.json records or folders searched recursively"
    )
    add_out(p, "leaderboard.md, leaderboard.csv and leaderboard.png", default="assets/leaderboard")
    p.add_argument(
        "--no-published", action="store_true", help="leave out the published rows of docs/spec/evaluation.md"
    )
    p.add_argument(
        "--include-test-records",
        action="store_true",
        help="also list records made with a random-init Inception or a stand-in network (--features), their "
        "notes marked 'not an FID' (pipeline tests only)",
    )
    add_debug(p)
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("weights", help="resolve and verify the Inception weights file (never downloads)")
    p.add_argument("--inception-weights", metavar="PATH", default=None, help="check this file instead")
    add_debug(p)
    p.set_defaults(func=cmd_weights)
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with process_group_scope():  # under accelerate launch / torchrun: ranks leave the group cleanly
            return args.func(args)
    except InceptionWeightsError as err:  # missing or wrong Inception weights: a user error
        raise UserError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    """The command: user errors are one stderr line and exit code 2 (``--debug``: the traceback)."""
    return run(_main, PROG, argv)


cli = entry(_main, PROG)  # the console script racedit-fid

if __name__ == "__main__":
    cli()
