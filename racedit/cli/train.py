"""``racedit-train`` / ``train_imagenet.py``: train any zoo model with Accelerate from a run config.

    python train_imagenet.py --config configs/demo.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train_imagenet.py \\
        --config configs/recipes/racedit_xl2_4in32.yaml --resume auto
    torchrun --nproc_per_node 2 train_imagenet.py --config configs/demo.yaml train.max_steps=100
"""

from __future__ import annotations

import argparse
import sys

from racedit.config.core import ConfigError

EPILOG = """overrides: any config key as section.key=value (YAML values), e.g.
  train.lr=1e-3 train.max_steps=2000 model.moe.router=token sample.every=0 log.trackers=[]
Sections: model (registry name + ModelConfig keys), diffusion, data, train, sample, log;
see racedit/training/config.py and configs/ for every key. An unknown key is an error naming it.

outputs under train.output_dir: checkpoints/step_XXXXXXXX/ (resume with --resume auto),
final/ (EMA model + sampling.json for sample.py), samples/*.png, logs/ (metrics.jsonl, loss.png,
TensorBoard), routing/ (MoE heatmaps), report/ (demo metrics)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="racedit-train",
        description="Train a class-conditional (Race-)DiT with Accelerate: one process, DDP, or FSDP "
        "(launch with `accelerate launch` or `torchrun`). Resumable bit for bit on CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="run config YAML (e.g. configs/demo.yaml)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|DIR|none",
        help="auto: continue from the newest valid checkpoint under train.output_dir (skipping corrupt ones, "
        "with a message; fresh start when there is none); DIR: that checkpoint; none (default): start fresh",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved run config as YAML and exit"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check this launch on this machine in minutes (config, data, model, 2 steps, checkpoint, grid, "
        "memory per GPU) and list what a real run would fail on; exit 0 only when nothing is (racedit/training/dryrun.py)",
    )
    p.add_argument(
        "--world-size", type=int, default=None, help="with --dry-run: processes of the real launch"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-3")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from racedit.training.config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"racedit-train: config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        from racedit.training.dryrun import dry_run

        return dry_run(cfg, resume=args.resume, world_size=args.world_size, config_path=args.config)
    if args.print_config:
        import yaml

        from racedit.config.core import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from racedit.distributed import process_group_scope
    from racedit.training.loop import NonFiniteLossError, ResumeError, train

    try:
        with process_group_scope():
            result = train(cfg, resume=args.resume)
    except (ConfigError, ResumeError, NonFiniteLossError, PermissionError, FileNotFoundError) as err:
        print(f"racedit-train: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # e.g. a dataset that is missing or malformed (LatentFormatError)
        print(f"racedit-train: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"racedit-train: done at step {result.step}; EMA model in {result.export_dir}")
    return 0


if __name__ == "__main__":
    from racedit.distributed import exit_command

    exit_command(main())
