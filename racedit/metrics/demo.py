"""Demo metrics: an offline quality report for models trained on the embedded 8x8 digits.

Not FID. A small classifier is trained (seconds, on the CPU) on the real **train** digits; then
- per-class accuracy: the share of samples generated for class c that the classifier labels c;
- a Frechet distance between Gaussian fits of the classifier's penultimate features of the generated
  samples and of the held-out real digits (the same formula as FID, in a 64-d feature space).
The same numbers for the held-out real digits are the reference line (accuracy: the classifier's own
held-out accuracy; distance: train vs held-out real digits, the floor a perfect generator would reach
given sampling noise). Real FID with the Inception network is added when its weights are present.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

LABEL = "demo metrics (digits classifier; not comparable to FID on ImageNet)"


class DigitClassifier(nn.Module):
    """MLP on flattened images: (B, 1, S, S) in [-1, 1] -> logits (B, classes); ``features`` (B, 64)."""

    def __init__(self, side: int, num_classes: int, width: int = 128, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(side * side, width),
            nn.GELU(),
            nn.Linear(width, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train_classifier(
    x: Tensor, y: Tensor, num_classes: int, steps: int = 600, seed: int = 0, lr: float = 3e-3
) -> DigitClassifier:
    """Full-batch AdamW with light noise augmentation; x (N, 1, S, S) in [-1, 1], y (N,)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier(x.shape[-1], num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        noisy = x + 0.1 * torch.randn(x.shape, generator=g)
        loss = nn.functional.cross_entropy(clf(noisy), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)


def images_to_input(images: Tensor | np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) grey images (as ``generate`` returns them) -> (N, 1, H, W) float in [-1, 1]."""
    arr = torch.as_tensor(np.asarray(images))
    return (arr[..., 0].float() / 127.5 - 1.0)[:, None]


def to_uint8_rgb(x: Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> uint8 (N, H, W, 3) with the same rounding as the sampler (DiT's)."""
    v = (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8)
    return v.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def frechet(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussian fits of two feature sets (N, D) (``fid.metrics``)."""
    from fid.metrics import feature_statistics, fid_from_statistics

    return fid_from_statistics(feature_statistics(a.double().numpy()), feature_statistics(b.double().numpy()))


@dataclass
class DemoScores:
    accuracy: float  # overall
    per_class: list[float]
    frechet: float


def score(clf: DigitClassifier, x: Tensor, y: Tensor, reference_features: Tensor) -> DemoScores:
    with torch.no_grad():
        feats = clf.features(x)
        pred = clf.head(feats).argmax(-1)
    num_classes = clf.head.out_features
    per_class = [
        float((pred[y == c] == c).float().mean()) if (y == c).any() else float("nan")
        for c in range(num_classes)
    ]
    return DemoScores(float((pred == y).float().mean()), per_class, frechet(feats, reference_features))


def real_fid(generated: np.ndarray, real: np.ndarray, log: Callable[[str], None]) -> float | None:
    """Inception FID (the ``fid`` package) when its weights are present; None (with a note) otherwise."""
    try:
        from fid.data import ArrayImages
        from fid.features import extract_features
        from fid.inception import InceptionFeatures
        from fid.metrics import feature_statistics, fid_from_statistics
        from fid.weights import InceptionWeightsError, load_inception_state_dict
    except ImportError as err:
        log(f"real FID skipped: the fid package is unavailable ({err})")
        return None
    try:
        state, weights_id = load_inception_state_dict()
    except InceptionWeightsError as err:
        log(f"real FID skipped: {str(err).splitlines()[0].rstrip(':')}")
        return None
    model = InceptionFeatures(state, weights_id=weights_id)
    kw = {"use_cache": False, "progress": False, "batch_size": 50}
    a = extract_features(ArrayImages(generated, name="generated"), model, **kw).pool
    b = extract_features(ArrayImages(real, name="heldout"), model, **kw).pool
    return fid_from_statistics(feature_statistics(a), feature_statistics(b))


def real_digits(data_cfg: Any, split: str) -> tuple[Tensor, Tensor, int]:
    """The real digits of ``split`` as the classifier sees them: x (N, 1, S, S) in [-1, 1] after the
    sampler's uint8 quantisation (so real and generated digits are scored alike), y (N,), classes."""
    from racedit.data import build_dataset

    dataset = build_dataset(data_cfg, split=split)
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 1, S, S)
    ys = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return images_to_input(to_uint8_rgb(xs)), ys, int(dataset.num_classes)


def demo_report(
    data_cfg: Any,
    sample_fn: Callable[[list[int], int], Tensor],
    *,
    per_class: int,
    seed: int,
    out_dir: Path,
    log: Callable[[str], None] = print,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate ``per_class`` samples of every class with ``sample_fn(labels, seed) -> uint8 (N,H,W,3)``,
    score them, and write ``report.json``, ``report.md`` and a sample grid of the scored images.

    ``training`` (optional) describes the run the model comes from: ``steps``, ``max_steps``,
    ``stopped_early`` (why training ended before ``max_steps``, or None), ``time_budget_minutes`` and
    ``process_started_at`` (seconds since the epoch); the report states them and, from the last, how long
    after the process start it was written."""
    xs_train, ys_train, num_classes = real_digits(data_cfg, "train")
    xs_held, ys_held, _ = real_digits(data_cfg, "heldout")
    clf = train_classifier(xs_train, ys_train, num_classes, seed=seed)
    with torch.no_grad():
        train_feats = clf.features(xs_train)

    labels = [c for c in range(num_classes) for _ in range(per_class)]
    generated = sample_fn(labels, seed)  # uint8 (N, H, W, 3)
    xs_gen = images_to_input(generated)
    ys_gen = torch.tensor(labels)
    held = score(clf, xs_held, ys_held, train_feats)
    gen = score(clf, xs_gen, ys_gen, train_feats)
    with torch.no_grad():
        gen_vs_held = frechet(clf.features(xs_gen), clf.features(xs_held))
    report: dict[str, Any] = {
        "label": LABEL,
        "classifier": f"MLP {xs_train.shape[-1]}^2-128-64-{num_classes}, trained on {len(xs_train)} real train digits",
        "samples_per_class": per_class,
        "generated": {"accuracy": gen.accuracy, "per_class_accuracy": gen.per_class, "frechet_vs_train": gen.frechet,
                      "frechet_vs_heldout": gen_vs_held},
        "heldout_real": {"accuracy": held.accuracy, "per_class_accuracy": held.per_class,
                         "frechet_vs_train": held.frechet, "count": len(xs_held)},
        "real_fid": real_fid(np.asarray(generated), to_uint8_rgb(xs_held), log),
    }  # fmt: skip
    if training is not None:
        report["training"] = dict(training)
        if training.get("process_started_at") is not None:
            report["training"]["seconds_to_report"] = time.time() - float(training["process_started_at"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(format_report(report))
    try:
        from racedit.sampling import save_grid

        save_grid(
            generated,
            labels,
            None,
            out_dir / "scored_samples.png",
            nrow=per_class,  # a digit is its label
        )
    except Exception as err:  # the report itself is written; a grid failure is only noted
        log(f"report grid skipped: {err}")
    log("\n" + format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    g, h = report["generated"], report["heldout_real"]
    n = len(g["per_class_accuracy"])
    lines = [
        f"## {report['label']}",
        "",
        f"classifier: {report['classifier']}; {report['samples_per_class']} generated samples per class",
        "",
        "| images | accuracy | "
        + " | ".join(f"class {c}" for c in range(n))
        + " | Frechet (classifier features) |",
        "|---" * (n + 3) + "|",
        f"| generated | {g['accuracy']:.3f} | "
        + " | ".join(f"{a:.2f}" for a in g["per_class_accuracy"])
        + f" | {g['frechet_vs_train']:.3f} |",
        f"| held-out real (reference) | {h['accuracy']:.3f} | "
        + " | ".join(f"{a:.2f}" for a in h["per_class_accuracy"])
        + f" | {h['frechet_vs_train']:.3f} |",
        "",
        "Frechet distances are to the real train digits' features; lower is better, the held-out real "
        f"digits ({h['count']}) give the floor. Generated vs held-out real: {g['frechet_vs_heldout']:.3f}.",
        "Real FID (Inception): "
        + (
            f"{report['real_fid']:.2f}"
            if report.get("real_fid") is not None
            else "not computed (weights absent)"
        ),
        "",
    ]
    if report.get("training"):
        lines += [format_training(report["training"]), ""]
    return "\n".join(lines)


def format_training(training: dict[str, Any]) -> str:
    """One line: steps trained, whether a time limit cut training short, when the report was written."""
    steps, max_steps = training["steps"], training["max_steps"]
    if training.get("stopped_early"):
        line = f"Training: {steps:,} of {max_steps:,} steps; cut short ({training['stopped_early']})."
    else:
        line = f"Training: {steps:,} of {max_steps:,} steps (not cut short"
        if training.get("time_budget_minutes") is not None:
            line += f" by train.time_budget_minutes = {training['time_budget_minutes']:g}"
        line += ")."
    if training.get("seconds_to_report") is not None:
        minutes, seconds = divmod(round(training["seconds_to_report"]), 60)
        line += f" Report written {minutes} min {seconds:02d} s after the process started."
    return line
