"""``racedit-analyze``: analyses of a trained checkpoint.

  racedit-analyze norms --ckpt runs/demo/checkpoints/step_00000800 --out runs/demo/analysis
      per-layer output norms over noise levels (racedit/analysis/norms.py): norms.csv and norms.png
      (step_00000800 is the last checkpoint of a demo run that completed its 800 steps; a run the time
      budget cut short ends at its own step)

The data are the checkpoint's training data: the run config (``config.yaml`` in the checkpoint folder or
its parent, or ``--config``) names them; ``--data digits`` or ``--data LATENT_DIR`` overrides it. The
objective comes from the model's ``sampling.json`` when there is one, else from the run config.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from racedit.cli.args import (
    Parser,
    add_config,
    add_debug,
    add_device,
    add_out,
    add_seed,
    int_at_least,
    positive_int,
)
from racedit.cli.common import UserError, entry, run, say

PROG = "racedit-analyze"
# The models, data and torch are imported when a sub-command runs, so --help answers at once.


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Analyses of a trained checkpoint.", epilog=__doc__)
    add_debug(p)
    sub = p.add_subparsers(dest="command", required=True)
    n = sub.add_parser(
        "norms",
        help="per-layer output norms over noise levels (the observation behind PLR): a CSV and a plot",
    )
    n.add_argument("--ckpt", required=True, help="model folder or training checkpoint folder (its EMA model)")
    add_config(n, required=False, what="names the data and objective (default: config.yaml in the checkpoint "
               "folder or its parent)")  # fmt: skip
    n.add_argument("--data", default=None, help="'digits' or a latent directory (overrides the run config)")
    n.add_argument(
        "--num-samples", type=positive_int, default=256, help="training samples to noise, in data order"
    )
    n.add_argument(
        "--levels", type=int_at_least(2), default=11, help="noise levels, evenly spaced over [0, 1]"
    )
    n.add_argument("--batch-size", type=positive_int, default=64, help="samples per forward")
    add_seed(n, "the noise draw (the same for every level)")
    add_device(n)
    add_out(n, "norms.csv and norms.png (default: <ckpt>/analysis)")
    add_debug(n)
    return p


def _run_sections(ckpt: Path, path: str | None) -> tuple[Any, Any] | None:
    """(DataConfig, DiffusionConfig) of the run: ``--config``, else a checkpoint's ``config.yaml``
    ({run: ..., model_resolved: ...}). Only these two sections are read, so a config written by another
    racedit version still serves."""
    from racedit.config.core import from_dict, load_yaml
    from racedit.data import DataConfig
    from racedit.diffusion import DiffusionConfig

    candidates = [Path(path)] if path is not None else [f / "config.yaml" for f in (ckpt, ckpt.parent)]
    for file in candidates:
        if file.is_file() or path is not None:
            data = load_yaml(file)
            run = data.get("run", data)
            return (
                from_dict(DataConfig, run.get("data") or {}, prefix="data"),
                from_dict(DiffusionConfig, run.get("diffusion") or {}, prefix="diffusion"),
            )
    return None


def _data_config(run: tuple[Any, Any] | None, data: str | None):
    from racedit.data import DataConfig

    if data == "digits":
        return DataConfig(kind="digits")
    if data is not None:
        return DataConfig(kind="latents", root=data)
    if run is not None:
        return run[0]
    raise UserError(
        "no run config next to --ckpt names the data: pass --data digits, --data LATENT_DIR or --config RUN.yaml"
    )


def cmd_norms(args: argparse.Namespace) -> int:
    import torch

    from racedit.analysis.norms import layer_norms, plot, write_csv
    from racedit.data import build_dataset
    from racedit.diffusion import build_objective
    from racedit.distributed import process_state
    from racedit.models.loading import load_model
    from racedit.sampling.meta import read_sampling_meta

    ckpt = Path(args.ckpt)
    model = load_model(ckpt, device=process_state(args.device).device)
    run = _run_sections(ckpt, args.config)
    meta = read_sampling_meta(ckpt) if ckpt.is_dir() else None
    if meta is not None:
        dcfg = meta.diffusion_config()
    elif run is not None:
        dcfg = run[1]
    else:
        raise UserError(f"{ckpt} has no sampling.json and no run config: pass --config RUN.yaml")
    objective = build_objective(dcfg, model.arch.learn_sigma)
    dataset = build_dataset(_data_config(run, args.data), "train")
    n = min(args.num_samples, len(dataset))
    items = [dataset[i] for i in range(n)]
    x0 = torch.stack([torch.as_tensor(x) for x, _ in items]).float()
    labels = torch.tensor([int(y) for _, y in items])
    levels = [i / (args.levels - 1) for i in range(args.levels)]
    table = layer_norms(model, objective, x0, labels, levels, batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(table, out / "norms.csv")
    name = getattr(model.arch, "moe", None)
    kind = f"MoE {name.k}-in-{name.num_experts} ({name.router})" if name is not None else "dense"
    title = f"{ckpt.name}: depth {model.arch.depth}, width {model.arch.hidden_size}, {kind}; {n} samples"
    png_path = plot(table, out / "norms.png", title=title)
    stream = table.mean["stream"]
    say(PROG, f"wrote {csv_path} and {png_path}")
    print(f"stream norm, block 0 -> {table.num_layers - 1} (mean over levels): "
          + " ".join(f"{v:.2f}" for v in stream.mean(0)))  # fmt: skip
    return 0


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"norms": cmd_norms}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """The command: user errors are one stderr line and exit code 2 (``--debug``: the traceback)."""
    return run(_main, PROG, argv)


cli = entry(_main, PROG)  # the console script racedit-analyze

if __name__ == "__main__":
    cli()
