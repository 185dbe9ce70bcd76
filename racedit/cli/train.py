"""``racedit-train`` / ``train_imagenet.py``: train any zoo model with Accelerate from a run config.

    python train_imagenet.py --config configs/demo.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train_imagenet.py \\
        --config configs/recipes/racedit_xl2_4in32.yaml --resume auto
    torchrun --nproc_per_node 2 train_imagenet.py --config configs/demo.yaml train.max_steps=100
"""

from __future__ import annotations

import argparse

from racedit.cli.args import Parser, add_config, add_debug, add_out, add_seed, positive_int
from racedit.cli.common import UserError, entry, fail, run

PROG = "racedit-train"
# The training stack (torch, Accelerate, the models) is imported after parsing, inside _main: --help, usage
# errors and --print-config answer in about 0.5 s instead of the seconds the stack takes to import.

EPILOG = """overrides: any config key as section.key=value (YAML values), e.g.
  train.lr=1e-3 train.max_steps=2000 model.moe.router=token sample.every=0 log.trackers=[]
Sections: model (registry name + ModelConfig keys), diffusion, data, train, sample, log;
see racedit/training/config.py and configs/ for every key. An unknown key is an error naming it.

resuming (--resume auto or DIR) accepts changes to train.lr, the schedule, max_steps, time limits, EMA,
optimizer hyperparameters, checkpoint/log/sample settings, data.root and data.num_workers (each is
applied and logged as "changed on resume: KEY OLD -> NEW"); it refuses changes to the model, diffusion,
the rest of data, train.seed, train.global_batch_size and train.grad_accum, naming the key.

outputs under train.output_dir (--out): checkpoints/step_XXXXXXXX/ (resume with --resume auto),
final/ (EMA model + sampling.json + manifest.json for sample.py), samples/*.png, logs/ (metrics.jsonl,
loss.png, TensorBoard), routing/ (MoE heatmaps), report/ (demo metrics). A fresh start in a folder
that holds checkpoints is refused; --overwrite moves the old checkpoints and final/ aside into
old-<time>/ (nothing is deleted)."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Train a class-conditional (Race-)DiT with Accelerate: one process, DDP, or FSDP2 with "
        "train.distributed=fsdp (launch with `accelerate launch` or `torchrun`). Resumable bit for bit on CPU.",
        epilog=EPILOG,
    )
    add_config(p, required=True, what="the run to train (e.g. configs/demo.yaml)")
    add_out(p, "the run folder; the same as train.output_dir=DIR (default: the config's)")
    add_seed(
        p, "the run: model init, data order, noise; the same as train.seed=N (default: the config's)", None
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|DIR|none",
        help="auto: continue from the newest checkpoint under train.output_dir that loads (corrupt ones are "
        "renamed corrupt-step_* and skipped, with a message; fresh start when there is none); DIR: that "
        "checkpoint; none (default): start fresh",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh (or branch from --resume DIR) even though train.output_dir holds checkpoints of "
        "another run: they are moved to train.output_dir/old-<time>/, never deleted",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved run config as YAML and exit"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check this launch on this machine in minutes (config, data, model, 2 steps, checkpoint, grid, "
        "memory per GPU) and list what a real run would fail on; exit 0 only when nothing is",
    )
    p.add_argument(
        "--world-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --dry-run: processes of the real launch (default: this launch's)",
    )
    add_debug(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-3")
    return p


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """``--out`` and ``--seed`` as the config overrides they stand for; given twice is an error."""
    extra = []
    for flag, key, value in (("--out", "train.output_dir", args.out), ("--seed", "train.seed", args.seed)):
        if value is None:
            continue
        if any(o.split("=", 1)[0] == key for o in args.overrides):
            fail(f"{flag} and {key}= both set the same key; give one of them")
        extra.append(f"{key}={value}")
    return extra


def main(argv: list[str] | None = None) -> int:
    """The command: user errors are one stderr line and exit code 2 (``--debug``: the traceback)."""
    return run(_main, PROG, argv)


def _main(argv: list[str] | None = None) -> int:
    """Parse, validate the config (before anything is loaded), train; user errors raise."""
    args = build_parser().parse_args(argv)
    from racedit.training.config import load_run_config

    if args.world_size is not None and not args.dry_run:
        fail("--world-size is the process count of the launch --dry-run checks; use it with --dry-run")
    cfg = load_run_config(args.config, [*args.overrides, *flag_overrides(args)])
    if args.dry_run:
        from racedit.training.dryrun import dry_run

        return dry_run(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            world_size=args.world_size,
            config_path=args.config,
        )
    if args.print_config:
        import yaml

        from racedit.config.core import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from racedit.distributed import process_group_scope
    from racedit.training.loop import NonFiniteLossError, ResumeError, train

    try:
        with process_group_scope():
            result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ResumeError, NonFiniteLossError) as err:  # (a dataset error is a UserError already)
        raise UserError(str(err)) from err
    print(f"done at step {result.step}; EMA model in {result.export_dir}")
    return 0


cli = entry(_main, PROG)  # the console script racedit-train, and train_imagenet.py

if __name__ == "__main__":
    cli()
