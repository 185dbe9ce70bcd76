"""Leaderboard: evaluation records + the published rows -> a markdown table, a CSV and a plot.

Records are the ``*.fid.json`` files ``racedit-fid eval`` writes (schema ``racedit-fid-record/1``).
Records made with a randomly initialised Inception are left out (their numbers are not FIDs). CMMD and
CLIP score appear only when the record's CLIP is ViT-L/14@336px (``clip_model`` and its weights hash
are columns).
The published rows (``fid/published.csv``, from docs/spec/evaluation.md) are marked ``published``.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Any

from fid.record import SCHEMA

PUBLISHED_CSV = Path(__file__).with_name("published.csv")

COLUMNS = (
    "model",
    "source",
    "fid",
    "sfid",
    "is",
    "precision",
    "recall",
    "cmmd",
    "clip_score",
    "params_total",
    "params_activated",
    "training",
    "vae",
    "objective",
    "sampler",
    "cfg",
    "num_samples",
    "label_sampling",
    "reference",
    "quantisation",
    "model_weights_sha256",
    "clip_model",
    "clip_weights_sha256",
    "metric_version",
    "notes",
)


def _num(x: Any) -> float | None:
    if x is None or x == "":
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _int(x: Any) -> int | None:
    v = _num(x)
    return None if v is None else int(v)


def published_rows(path: str | os.PathLike = PUBLISHED_CSV) -> list[dict[str, Any]]:
    """The published results as leaderboard rows (``source = "published"``)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(line for line in f if not line.startswith("#"))
        rows = []
        for r in reader:
            row = {c: None for c in COLUMNS}
            row.update(
                {
                    "model": r["model"],
                    "source": "published",
                    "fid": _num(r["fid"]),
                    "is": _num(r["is"]),
                    "precision": _num(r["precision"]),
                    "recall": _num(r["recall"]),
                    "params_total": _int(r["params_total"]),
                    "params_activated": _int(r["params_activated"]),
                    "training": r["training"] or None,
                    "num_samples": 50000,
                    "reference": "VIRTUAL_imagenet256_labeled.npz",
                    "metric_version": "ADM evaluator (published)",
                    "notes": r["notes"] or None,
                }
            )
            rows.append(row)
    return rows


def find_records(paths: list[str | os.PathLike]) -> list[Path]:
    """``*.fid.json`` files: given directly, or found recursively under given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        found.extend(sorted(p.rglob("*.fid.json")) if p.is_dir() else [p])
    return found


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    """One record -> one leaderboard row."""
    run, m = record.get("run", {}), record["metrics"]
    iters, batch = run.get("train_iterations"), run.get("train_batch_size")
    training = f"{iters} x {batch}" if iters is not None or batch is not None else None
    cfg = run.get("cfg_scale")
    if cfg is not None and (run.get("cfg_interval") is not None or run.get("cfg_channels") is not None):
        cfg = f"{cfg} (interval {run.get('cfg_interval')}, channels {run.get('cfg_channels')})"
    sampler = run.get("sampler")
    if run.get("sampling_steps") is not None:
        sampler = f"{sampler}, {run['sampling_steps']} steps"
    row = {c: None for c in COLUMNS}
    row.update(
        model=run.get("model") or Path(record["samples"]["path"]).name,
        source="ours",
        fid=m["fid"],
        sfid=m["sfid"],
        precision=m["precision"],
        recall=m["recall"],
        params_total=_int(run.get("params_total")),
        params_activated=_int(run.get("params_activated")),
        training=training,
        vae=run.get("vae"),
        objective=run.get("objective"),
        sampler=sampler,
        cfg=cfg,
        num_samples=record.get("num_samples"),
        label_sampling=run.get("label_sampling"),
        reference=record["reference"].get("name"),
        quantisation=run.get("quantisation"),
        model_weights_sha256=run.get("model_weights_sha256"),
        metric_version=record["evaluator"].get("version"),
        notes=run.get("notes"),
    )
    row["is"] = m["inception_score"]
    clip = record["evaluator"].get("clip")
    if clip and clip.get("comparable_with_literature"):
        row.update(cmmd=m.get("cmmd"), clip_score=m.get("clip_score"), clip_model=clip.get("model"),
                   clip_weights_sha256=clip.get("weights_sha256"))  # fmt: skip
    elif clip:
        warnings.warn(f"{row['model']}: CMMD / CLIP score from a test CLIP ({clip.get('model')}), left out",
                      stacklevel=2)  # fmt: skip
    return row


def gather_rows(
    record_paths: list[str | os.PathLike], include_published: bool = True, include_test_records: bool = False
) -> list[dict[str, Any]]:
    """Rows of every valid record (+ the published ones), sorted by FID. Records whose features did not
    come from the reference Inception are skipped, or with ``include_test_records`` kept and marked."""
    rows = published_rows() if include_published else []
    for path in find_records(record_paths):
        record = json.loads(Path(path).read_text())
        if record.get("schema") != SCHEMA:
            warnings.warn(f"{path}: not a {SCHEMA} record, skipped", stacklevel=2)
            continue
        test_network = not record["evaluator"].get("comparable_with_literature")
        if test_network and not include_test_records:
            warnings.warn(
                f"{path}: evaluated with a random-init Inception or a stand-in network (a test run), skipped",
                stacklevel=2,
            )
            continue
        row = record_row(record)
        if test_network:
            mark = f"test network {record['evaluator'].get('network')}: not an FID"
            row["notes"] = f"{mark}; {row['notes']}" if row["notes"] else mark
        rows.append(row)
    return sorted(rows, key=lambda r: (r["fid"] is None, r["fid"] or 0.0))


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return ""
    if column.startswith("params") and isinstance(value, int | float):
        return f"{value / 1e9:.3f}B" if value >= 1e9 else f"{value / 1e6:.0f}M"
    if isinstance(value, float):
        if column == "cmmd":
            return f"{value:.3f}"
        return (
            f"{value:.2f}"
            if column in ("fid", "sfid", "is", "precision", "recall", "clip_score")
            else f"{value:g}"
        )
    return str(value).replace("|", "\\|")


MARKDOWN_COLUMNS = ("model", "source", "fid", "sfid", "is", "precision", "recall", "cmmd", "clip_score",
                    "params_total", "params_activated", "training", "sampler", "cfg", "num_samples",
                    "notes")  # fmt: skip


def to_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(MARKDOWN_COLUMNS) + " |\n|" + "---|" * len(MARKDOWN_COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_fmt(r[c], c) for c in MARKDOWN_COLUMNS) + " |\n" for r in rows)
    return (
        "# Leaderboard: ImageNet 256x256, class-conditional (ADM evaluator protocol)\n\n"
        "Rows marked `published` are the papers' numbers (fid/published.csv); `ours` come from "
        "`racedit-fid eval` records. FID/sFID lower is better; CMMD (x1000, CLIP ViT-L/14@336px) lower is "
        "better; CLIP score higher is better.\n\n" + head + body
    )


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """FID against activated parameters (log x); published rows hollow, ours filled."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for source, style in (("published", dict(facecolors="none", edgecolors="tab:gray")), ("ours", {})):
        pts = [r for r in rows if r["source"] == source and r["fid"] is not None and r["params_activated"]]
        if not pts:
            continue
        ax.scatter([r["params_activated"] / 1e9 for r in pts], [r["fid"] for r in pts], label=source, **style)
        for r in pts:
            ax.annotate(r["model"], (r["params_activated"] / 1e9, r["fid"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    fmt = matplotlib.ticker.FormatStrFormatter("%.2g")
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(fmt)
    ax.set_xlabel("activated parameters (B)")
    ax.set_ylabel("FID-50K (lower is better)")
    ax.set_title("ImageNet 256x256 class-conditional")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_leaderboard(
    record_paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    include_published: bool = True,
    include_test_records: bool = False,
) -> dict[str, Path]:
    """Writes ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.png`` into ``out_dir``."""
    rows = gather_rows(record_paths, include_published, include_test_records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "leaderboard.md",
        "csv": out / "leaderboard.csv",
        "plot": out / "leaderboard.png",
    }
    paths["markdown"].write_text(to_markdown(rows))
    write_csv(rows, paths["csv"])
    plot(rows, paths["plot"])
    return paths
