"""Steps to accuracy of the demo: which setting reaches the demo's quality in the least compute.

Each setting is ``configs/demo.yaml`` plus overrides. It trains from scratch; at a few steps the EMA model
samples ``sample.report_per_class`` digits of every class with the demo's final sampling settings, and the
demo classifier (``racedit.metrics.demo``, trained once on the real train digits) scores them. Printed per
setting: the accuracy at each evaluation step, the first evaluated step with accuracy >= the target, and
the process CPU time and wall time per training step (evaluation excluded). On a shared machine compare
settings by steps and CPU time per step: wall time moves with the load of other processes.

    python -m bench.demo_steps                                   # the default settings below
    python -m bench.demo_steps --eval-at 100 200 300 --setting lr3e-3 "train.lr=3e-3"
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

from bench.common import print_table  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

# name -> overrides of configs/demo.yaml (the quiet-run keys are added to every one)
SETTINGS: dict[str, list[str]] = {
    "demo": [],
    "lr 2e-3": ["train.lr=2e-3"],
    "batch 64": ["train.global_batch_size=64"],
    "width 96": ["model.hidden_size=96", "model.num_heads=4"],
    "depth 3": ["model.depth=3"],
    "2 threads": ["train.num_threads=2"],
}
QUIET = ["sample.every=0", "log.trackers=[]", "log.progress=false", "train.checkpoint_every=1000000"]


def evaluate(trainer, clf, per_class: int, seed: int) -> float:
    """Accuracy of the demo classifier on ``per_class`` EMA samples of every class."""
    from racedit.metrics.demo import images_to_input, score

    labels = [c for c in range(trainer.model_cfg.num_classes) for _ in range(per_class)]
    images = trainer.preview.images(trainer.ema.model, labels, seed)
    scores = score(clf, images_to_input(images), torch.tensor(labels), clf_reference(clf, trainer))
    return scores.accuracy


_REFERENCE: dict[int, torch.Tensor] = {}


def clf_reference(clf, trainer) -> torch.Tensor:
    if id(clf) not in _REFERENCE:
        from racedit.metrics.demo import real_digits

        xs, _, _ = real_digits(trainer.cfg.data, "train")
        with torch.no_grad():
            _REFERENCE[id(clf)] = clf.features(xs)
    return _REFERENCE[id(clf)]


def run_setting(
    overrides: list[str], eval_at: list[int], target: float, out: Path
) -> tuple[list[float], int | None, float, float]:
    from racedit.metrics.demo import real_digits, train_classifier
    from racedit.training.config import load_run_config
    from racedit.training.loop import Trainer

    cfg = load_run_config(
        DEMO, [*QUIET, f"train.output_dir={out}", f"train.max_steps={max(eval_at)}", *overrides]
    )
    trainer = Trainer(cfg)
    trainer.setup()
    seed = cfg.sample.seed + 10_000  # the report's classifier and sampling seed (Trainer.finish)
    xs, ys, num_classes = real_digits(cfg.data, "train")
    clf = train_classifier(xs, ys, num_classes, seed=seed)
    accuracies, reached, cpu, wall = [], None, 0.0, 0.0
    for stop in eval_at:
        c0, w0 = time.process_time(), time.perf_counter()
        while trainer.step < stop:
            trainer.train_step()
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        acc = evaluate(trainer, clf, cfg.sample.report_per_class, seed)
        accuracies.append(acc)
        if reached is None and acc >= target:
            reached = stop
        print(f"  step {stop}: accuracy {acc:.3f} ({cpu / trainer.step * 1e3:.0f} ms CPU/step)", flush=True)
    return accuracies, reached, cpu / trainer.step, wall / trainer.step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.demo_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-at", type=int, nargs="+", default=[100, 200, 300, 400, 600])
    p.add_argument("--target", type=float, default=0.9, help="accuracy that counts as reached")
    p.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="samples per class scored (default: sample.report_per_class)",
    )
    p.add_argument(
        "--setting",
        nargs=2,
        action="append",
        metavar=("NAME", "OVERRIDES"),
        help="a setting to measure (repeatable): a name and space-separated key=value overrides; "
        "replaces the default settings",
    )
    p.add_argument("--only", nargs="+", help="measure only these default settings, by name")
    args = p.parse_args(argv)
    settings = {n: o.split() for n, o in args.setting} if args.setting else dict(SETTINGS)
    if args.only:
        settings = {n: settings[n] for n in args.only}
    eval_at = sorted(args.eval_at)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(settings.items()):
            print(f"{name}: {' '.join(overrides) or '(configs/demo.yaml as is)'}", flush=True)
            if args.per_class is not None:
                overrides = [*overrides, f"sample.report_per_class={args.per_class}"]
            accs, reached, cpu, wall = run_setting(overrides, eval_at, args.target, Path(tmp) / str(i))
            rows.append(
                [
                    name,
                    *(f"{a:.3f}" for a in accs),
                    reached if reached is not None else f"> {eval_at[-1]}",
                    f"{cpu * 1e3:.0f}",
                    f"{wall * 1e3:.0f}",
                    f"{reached * cpu:.0f}" if reached is not None else "-",
                ]
            )
    print_table(
        f"demo steps to accuracy >= {args.target} (EMA model, demo classifier)",
        ["setting", *(f"acc @ {s}" for s in eval_at), "steps to target", "CPU ms/step", "wall ms/step",
         "CPU s to target"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
