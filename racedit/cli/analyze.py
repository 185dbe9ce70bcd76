"""``racedit-analyze``: analyses of a trained checkpoint.

  racedit-analyze norms --ckpt runs/demo/checkpoints/step_00001200 --out-dir runs/demo/analysis
      per-layer output norms over noise levels (racedit/analysis/norms.py): norms.csv and norms.png

The data are the checkpoint's training data: the run config (``config.yaml`` in the checkpoint folder or
its parent, or ``--config``) names them; ``--data digits`` or ``--data LATENT_DIR`` overrides it. The
objective comes from the model's ``sampling.json`` when there is one, else from the run config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from racedit.cli.common import UserError, add_debug_flag, entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="racedit-analyze",
        description="Analyses of a trained checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_debug_flag(p)
    sub = p.add_subparsers(dest="command", required=True)
    n = sub.add_parser(
        "norms",
        help="per-layer output norms over noise levels (the observation behind PLR): a CSV and a plot",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    n.add_argument("--ckpt", required=True, help="model folder or training checkpoint folder (its EMA model)")
    n.add_argument("--config", default=None, help="run config naming the data and objective (default: "
                   "config.yaml in the checkpoint folder or its parent)")  # fmt: skip
    n.add_argument("--data", default=None, help="'digits' or a latent directory (overrides the run config)")
    n.add_argument("--num-samples", type=int, default=256, help="training samples to noise, in data order")
    n.add_argument("--levels", type=int, default=11, help="noise levels, evenly spaced over [0, 1]")
    n.add_argument("--batch-size", type=int, default=64, help="samples per forward")
    n.add_argument("--seed", type=int, default=0, help="seed of the noise draw (the same for every level)")
    n.add_argument("--device", default="cpu", help="torch device")
    n.add_argument(
        "--out-dir", default=None, help="where norms.csv and norms.png go (default: <ckpt>/analysis)"
    )
    add_debug_flag(n)
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
    from racedit.models.loading import load_model
    from racedit.sampling.meta import read_sampling_meta

    if args.num_samples < 1 or args.levels < 2 or args.batch_size < 1:
        raise UserError("--num-samples and --batch-size must be >= 1 and --levels >= 2")
    ckpt = Path(args.ckpt)
    model = load_model(ckpt, device=args.device)
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
    out = Path(args.out_dir) if args.out_dir else (ckpt if ckpt.is_dir() else ckpt.parent) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(table, out / "norms.csv")
    name = getattr(model.arch, "moe", None)
    kind = f"MoE {name.k}-in-{name.num_experts} ({name.router})" if name is not None else "dense"
    title = f"{ckpt.name}: depth {model.arch.depth}, width {model.arch.hidden_size}, {kind}; {n} samples"
    png_path = plot(table, out / "norms.png", title=title)
    stream = table.mean["stream"]
    print(f"[analyze] stream norm, block 0 -> {table.num_layers - 1} (mean over levels): "
          + " ".join(f"{v:.2f}" for v in stream.mean(0)))  # fmt: skip
    print(f"[analyze] wrote {csv_path} and {png_path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"norms": cmd_norms}[args.command](args)


console_main = entry(main, "racedit-analyze")

if __name__ == "__main__":
    console_main()
