"""Provenance records: one JSON per evaluation, carrying every column docs/spec/evaluation.md asks for.

docs/spec/evaluation.md, "Recorded with every result (the leaderboard's columns)": model, total/activated
params, training iterations x batch, VAE, objective, sampler and steps, CFG scale (+ interval, channels),
number of samples, label sampling, reference batch, quantisation, weights hash, metric implementation version.

The run columns are copied from the sample.py JSON record found next to the samples (looked up by the
names in ``RUN_FIELDS``, at the top level or as the last part of a nested key, so ``{"sampler":
{"steps": 250}}`` fills ``sampling_steps`` through ``steps``), and can be set or overridden with
``--meta key=value``. The raw sample.py record is kept whole under ``sample_settings``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch_fidelity

from racedit.io import atomic_write_text

SCHEMA = "racedit-fid-record/1"
METRIC_VERSION = "racedit-fid 1.0 (ADM protocol)"

# leaderboard column -> names accepted in a sample.py record (first match wins)
RUN_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model", "model_name", "name"),
    "params_total": ("params_total", "total_params", "num_params", "parameters_total"),
    "params_activated": ("params_activated", "activated_params", "active_params", "parameters_activated"),
    "train_iterations": ("train_iterations", "train_steps", "iterations", "train_step"),
    "train_batch_size": ("train_batch_size", "global_batch_size"),
    "vae": ("vae",),
    "objective": ("objective",),
    "sampler": ("sampler", "sampler_name", "solver"),
    "sampling_steps": ("sampling_steps", "num_sampling_steps", "num_steps", "steps"),
    "cfg_scale": ("cfg_scale", "guidance_scale", "cfg"),
    "cfg_interval": ("cfg_interval", "guidance_interval"),
    "cfg_channels": ("cfg_channels", "guidance_channels"),
    "label_sampling": ("label_sampling", "class_sampling"),
    "quantisation": ("quantisation", "quantization", "to_uint8"),
    "model_weights_sha256": ("weights_sha256", "checkpoint_sha256", "ckpt_sha256", "model_sha256"),
    "checkpoint": ("checkpoint", "ckpt", "checkpoint_path"),
}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(_flatten(v, key))
            out[key] = v
    return out


def run_fields_from_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """Pick the leaderboard's run columns out of a sample.py record (see ``RUN_FIELDS``)."""
    flat = _flatten(settings or {})
    found: dict[str, Any] = {}
    for column, names in RUN_FIELDS.items():
        for name in names:
            if name in flat and not isinstance(flat[name], dict):  # top level first
                found[column] = flat[name]
                break
            nested = [v for k, v in flat.items() if k.rsplit(".", 1)[-1] == name and not isinstance(v, dict)]
            if nested:
                found[column] = nested[0]
                break
    return found


def parse_meta(items: list[str] | None) -> dict[str, Any]:
    """``["cfg_scale=1.5", "model=DiT-XL/2"]`` -> dict; values parsed as JSON when they parse."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--meta expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def build_record(
    *,
    metrics: dict[str, float],
    extra_metrics: dict[str, Any] | None,
    samples: dict[str, Any],
    reference: dict[str, Any],
    evaluator: dict[str, Any],
    settings: dict[str, Any] | None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record of one evaluation (schema ``racedit-fid-record/1``)."""
    run = {column: None for column in RUN_FIELDS}
    run.update(run_fields_from_settings(settings))
    unknown = sorted(set(meta or {}) - set(run) - {"notes"})
    if unknown:
        raise ValueError(f"unknown --meta keys {unknown}; known: {sorted(run) + ['notes']}")
    run.update(meta or {})
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics,
        "extra_metrics": extra_metrics,
        "run": run,
        "num_samples": samples["num_images"],
        "samples": samples,
        "reference": reference,
        "evaluator": {
            "version": METRIC_VERSION,
            "torch": torch.__version__,
            "torch_fidelity": torch_fidelity.__version__,
            **evaluator,
        },
        "sample_settings": settings,
    }


def write_record(record: dict[str, Any], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        p, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n"
    )  # never half a record
    return p


def default_record_path(samples_path: str | os.PathLike, reference_path: str | os.PathLike) -> Path:
    """``<samples folder>/fid-<ref stem>.fid.json`` or ``<samples stem>.fid-<ref stem>.fid.json`` beside a file."""
    s, ref = Path(samples_path), Path(reference_path).stem
    if s.is_dir():
        return s / f"fid-{ref}.fid.json"
    return s.with_name(f"{s.stem}.{ref}.fid.json")
