"""Small-scale reproduction of the Race-DiT ablations (docs/spec/race-dit.md section 8) on the embedded digits.

    python -m experiments.ablation --config configs/repro/ablation_digits.yaml

Every variant is one run config = the base config + the variant's overrides, trained for each seed by
``train_imagenet.py`` in its own process (``--parallel`` at a time, one thread each). Finished runs are
skipped on a rerun (a run counts as finished when its ``report/report.json`` exists), so a killed
reproduction resumes where it stopped. Then the driver gathers, per variant and over seeds (mean and
standard deviation):
- the final training loss (mean of the logged loss over the last ``loss_tail`` fraction of steps);
- the demo metrics of the EMA model (accuracy of a classifier trained on real digits on generated
  samples, and the Frechet distance in that classifier's features; see racedit/metrics/demo.py);
- for MoE variants, MaxVio and combination usage (% of expert pairs that make up 95% of co-activations)
  averaged over layers, and the experts spent per token by timestep bucket;
and writes ``results.md`` (tables by ablation group, next to the paper's numbers), ``results.json``,
``loss_curves.png`` and ``allocation.png`` into the assets directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from racedit.config.core import deep_merge, from_dict, load_yaml
from racedit.training.config import RunConfig
from racedit.training.logging import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Variant:
    name: str  # directory name and table row
    groups: list[str]  # ablation tables the row appears in
    config: dict[str, Any] = field(default_factory=dict)  # nested overrides of the base run config
    paper: dict[str, str] = field(default_factory=dict)  # group -> the paper's number for this row


@dataclass
class AblationConfig:
    base: str  # run config the variants override (path relative to this file)
    seeds: list[int]
    variants: list[Variant]
    groups: dict[str, str] = field(default_factory=dict)  # group -> table title
    common: dict[str, Any] = field(default_factory=dict)  # overrides for every variant
    output_dir: str = "runs/ablation"
    assets_dir: str = "assets/ablation"
    loss_tail: float = 0.2  # final loss = mean over the last 20% of logged steps


def load_ablation(path: Path) -> AblationConfig:
    data = yaml.safe_load(path.read_text())
    cfg = from_dict(AblationConfig, data)
    cfg.base = str((path.parent / cfg.base).resolve())
    return cfg


def run_config(cfg: AblationConfig, variant: Variant, seed: int) -> dict[str, Any]:
    """The full run config (nested dict) of one (variant, seed), validated as a RunConfig."""
    data = deep_merge(deep_merge(load_yaml(cfg.base), cfg.common), variant.config)
    data.setdefault("train", {})
    data["train"]["seed"] = seed
    data["train"]["output_dir"] = str(Path(cfg.output_dir) / variant.name / f"seed{seed}")
    from_dict(RunConfig, data)  # fail before any run starts, naming the bad key
    return data


def pending_runs(cfg: AblationConfig) -> list[tuple[Variant, int, Path]]:
    todo = []
    for variant in cfg.variants:
        for seed in cfg.seeds:
            run_dir = Path(cfg.output_dir) / variant.name / f"seed{seed}"
            if not (run_dir / "report" / "report.json").is_file():
                todo.append((variant, seed, run_dir))
    return todo


def launch(cfg: AblationConfig, todo: list[tuple[Variant, int, Path]], parallel: int) -> None:
    """Train every pending run, ``parallel`` processes at a time, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    queue = list(todo)
    running: list[tuple[subprocess.Popen, str, float]] = []
    done = 0
    while queue or running:
        while queue and len(running) < parallel:
            variant, seed, run_dir = queue.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            config_path = run_dir / "run.yaml"
            config_path.write_text(yaml.safe_dump(run_config(cfg, variant, seed), sort_keys=False))
            log = (run_dir / "train.log").open("w")
            cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "--config", str(config_path),
                   "--resume", "auto", "log.progress=false", "log.trackers=[]"]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((proc, f"{variant.name}/seed{seed}", time.time()))
        time.sleep(2)
        for item in list(running):
            proc, name, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                done += 1
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"[{done}/{len(todo)}] {name}: {status} in {time.time() - t0:.0f} s", flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"run {name} failed; see {Path(cfg.output_dir) / name / 'train.log'}")


# --------------------------------------------------------------------------- gathering


def run_metrics(run_dir: Path, loss_tail: float) -> dict[str, Any]:
    records = read_jsonl(run_dir / "logs" / "metrics.jsonl")
    # The diffusion loss alone: auxiliary terms (PLR, RSL, balance) differ between rows by design.
    key = "loss_diffusion" if any("loss_diffusion" in r for r in records) else "loss"
    losses = [(r["step"], r[key]) for r in records if key in r]
    tail = losses[-max(1, int(len(losses) * loss_tail)) :]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    out: dict[str, Any] = {
        "final_loss": statistics.fmean(v for _, v in tail),
        "accuracy": report["generated"]["accuracy"],
        "frechet": report["generated"]["frechet_vs_train"],
        "curve": losses,
        "steps": losses[-1][0] if losses else 0,
    }
    moe = [r for r in records if "moe/maxvio" in r]
    if moe:
        last = moe[-1]
        out["maxvio"] = last["moe/maxvio"]
        out["comb95"] = last["moe/comb95"]
        buckets = sorted(
            (k for k in last if k.startswith("moe/experts_per_token/t")),
            key=lambda k: int(k.removeprefix("moe/experts_per_token/t")),
        )
        out["allocation"] = [last[k] for k in buckets]
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(cfg: AblationConfig) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant in cfg.variants:
        runs = [
            run_metrics(Path(cfg.output_dir) / variant.name / f"seed{s}", cfg.loss_tail) for s in cfg.seeds
        ]
        row: dict[str, Any] = {"groups": variant.groups, "paper": variant.paper, "seeds": cfg.seeds,
                               "steps": runs[0]["steps"]}  # fmt: skip
        for key in ("final_loss", "accuracy", "frechet", "maxvio", "comb95"):
            if all(key in r for r in runs):
                row[key] = mean_std(r[key] for r in runs)
        if all("allocation" in r for r in runs):
            row["allocation"] = [statistics.fmean(v) for v in zip(*(r["allocation"] for r in runs))]
        row["curves"] = [r["curve"] for r in runs]
        summary[variant.name] = row
    return summary


def format_tables(cfg: AblationConfig, summary: dict[str, Any]) -> str:
    def ms(row: dict[str, Any], key: str, fmt: str) -> str:
        if key not in row:
            return "-"
        m, s = row[key]
        return f"{m:{fmt}} ± {s:{fmt}}"

    lines = [
        f"Seeds {cfg.seeds}; mean ± standard deviation over seeds. Loss: the diffusion training loss (flow "
        f"matching MSE, without the auxiliary terms), mean of the last {int(cfg.loss_tail * 100)}% of "
        "logged steps. Accuracy / Frechet: demo metrics of the EMA model (a classifier trained on real "
        "digits; accuracy of generated samples on their requested class; Frechet distance in the "
        "classifier's features against the real train digits; not FID). MaxVio / comb95: expert load at the "
        "end of training, mean over layers.",
        "",
    ]
    for group, title in cfg.groups.items():
        rows = [(n, r) for n, r in summary.items() if group in r["groups"]]
        lines += [f"### {title}", "", "| variant | final loss | demo accuracy | demo Frechet | MaxVio | "
                  "comb95 % | paper |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for name, r in rows:
            lines.append(
                f"| {name} | {ms(r, 'final_loss', '.4f')} | {ms(r, 'accuracy', '.3f')} | "
                f"{ms(r, 'frechet', '.2f')} | {ms(r, 'maxvio', '.2f')} | {ms(r, 'comb95', '.1f')} | "
                f"{r['paper'].get(group, '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(cfg: AblationConfig, summary: dict[str, Any], assets: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    groups = list(cfg.groups)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for name, r in summary.items():
            if group not in r["groups"]:
                continue
            steps = np.array([s for s, _ in r["curves"][0]])
            n = min(len(c) for c in r["curves"])
            vals = np.array([[v for _, v in c[:n]] for c in r["curves"]])
            kernel = np.ones(5) / 5  # light smoothing of the logged window means
            mean = np.convolve(vals.mean(0), kernel, mode="valid")
            ax.plot(steps[: len(mean)] + steps[min(2, n - 1)] - steps[0], mean, label=name)
        ax.set_title(textwrap.fill(cfg.groups[group], 60), fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(assets / "loss_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    alloc = {n: r["allocation"] for n, r in summary.items() if "allocation" in r}
    if alloc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, values in alloc.items():
            ax.plot(np.arange(len(values)), values, marker="o", label=name)
        ax.set_xlabel("timestep bucket (0 = least noise)")
        ax.set_ylabel("experts per token (training, mean over layers and seeds)")
        ax.set_title("expert allocation by timestep", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(assets / "allocation.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default="configs/repro/ablation_digits.yaml", help="the ablation config (YAML)"
    )
    p.add_argument("--parallel", type=int, default=2, help="training processes at a time (one thread each)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds overriding the config's (e.g. 0)")
    p.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    p.add_argument("--report-only", action="store_true", help="gather finished runs; train nothing")
    args = p.parse_args(argv)
    cfg = load_ablation(Path(args.config))
    if args.seeds:
        cfg.seeds = [int(s) for s in args.seeds.split(",")]
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {v.name for v in cfg.variants}
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; the config has {[v.name for v in cfg.variants]}")
        cfg.variants = [v for v in cfg.variants if v.name in keep]
    for variant in cfg.variants:  # validate every run config before the first run starts
        for seed in cfg.seeds:
            run_config(cfg, variant, seed)
    start = time.time()
    if not args.report_only:
        todo = pending_runs(cfg)
        print(
            f"{len(todo)} runs to train ({len(cfg.variants) * len(cfg.seeds) - len(todo)} already finished)"
        )
        launch(cfg, todo, args.parallel)
    summary = summarise(cfg)
    assets = Path(cfg.assets_dir)
    assets.mkdir(parents=True, exist_ok=True)
    table = format_tables(cfg, summary)
    (assets / "results.md").write_text(table + "\n")
    slim = {n: {k: v for k, v in r.items() if k != "curves"} for n, r in summary.items()}
    (assets / "results.json").write_text(json.dumps(slim, indent=1))
    plots = plot(cfg, summary, assets)
    print(table)
    print(f"wrote {assets / 'results.md'}, results.json, {', '.join(p.name for p in plots)} "
          f"in {time.time() - start:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
