"""Which checkpoint a run continues, whether it may, and what a resume may change.

The rules, in the order the trainer applies them:

- **A fresh start never lands on another run's checkpoints.** Without ``--resume`` (or with ``--resume
  auto`` when no checkpoint loads), an output folder that holds checkpoints is refused with the two ways
  out: ``--resume auto``, or a new ``train.output_dir`` / ``--overwrite``, which moves the old
  checkpoints (and ``final/``, ``logs/metrics.jsonl``) into ``old-<time>/`` and deletes nothing. Without
  this rule, rotation ("keep the newest ``keep_last`` by step") would keep the old run's higher-numbered
  checkpoints and delete the new run's, and a later ``--resume auto`` would continue the old run.
- **``--resume auto`` takes the newest checkpoint that verifies *and* loads.** Each one that does not
  (hash mismatch, truncated file, an optimizer file that does not parse, tensors of the wrong shape) is
  reported, renamed ``corrupt-step_...`` for inspection, and the previous one is tried.
- **``--resume DIR`` may not continue below newer checkpoints** in the output folder (they would be
  replaced one by one, and ``--resume auto`` could pick an old one later); ``--overwrite`` moves them aside.
- **A resume accepts changes to what does not change the experiment** (``RESUME_REFUSES`` lists the
  rest): learning rate and schedule, ``max_steps``, time limits, optimizer hyperparameters, EMA,
  clipping, checkpoint/log/sample settings. Each accepted change is applied (the optimizer and scheduler
  state restored from the checkpoint would otherwise bring back the old learning rate) and logged as
  ``changed on resume: train.lr 0.001 -> 0.005``. A changed model, diffusion objective or dataset, or a
  change that breaks the data order (seed, batch size, accumulation), is refused naming the key.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from racedit.training import checkpoint as ckpt


class ResumeError(RuntimeError):
    """A run cannot start or resume as asked (a different model, a folder holding another run, ...)."""


# Keys (dotted prefixes) a resume refuses to change: they define the experiment or the data order the
# checkpointed position refers to. The model is compared on its resolved config (a preset name and the
# explicit keys it expands to are the same model).
RESUME_REFUSES = ("diffusion", "data", "train.seed", "train.global_batch_size", "train.grad_accum")
# Exceptions inside refused sections: loader workers (performance only) and the dataset's location (a
# run moved to another machine or disk; a different dataset shows as a model mismatch or a data error).
RESUME_ACCEPTS = ("data.num_workers", "data.root")
# Not settings of the run: where it lives (a run copied elsewhere resumes there) and the raw model
# section (compared resolved instead).
RESUME_IGNORES = ("train.output_dir", "model")

_MISSING = object()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass
class SettingChanges:
    accepted: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, checkpoint value, now)
    refused: list[tuple[str, Any, Any]] = field(default_factory=list)


def setting_changes(saved: dict[str, Any], run: dict[str, Any], model_now: dict[str, Any]) -> SettingChanges:
    """Compare a checkpoint's ``config.yaml`` (``{"run": ..., "model_resolved": ...}``) with this run.

    A key the checkpoint does not record (written by an older version) is not a change.
    """
    changes = SettingChanges()
    old_model = saved.get("model_resolved") or {}
    old, new = _flat(old_model, "model"), _flat(model_now, "model")
    for key in sorted(set(old) | set(new)):
        if old.get(key, _MISSING) != new.get(key, _MISSING):
            changes.refused.append((key, old.get(key), new.get(key)))
    old, new = _flat(saved.get("run") or {}), _flat(run)
    for key in sorted(set(old) & set(new)):
        if old[key] == new[key] or _under(key, RESUME_IGNORES):
            continue
        refused = _under(key, RESUME_REFUSES) and not _under(key, RESUME_ACCEPTS)
        (changes.refused if refused else changes.accepted).append((key, old[key], new[key]))
    return changes


def check_settings(
    path: Path, saved: dict[str, Any], run: dict[str, Any], model_now: dict[str, Any]
) -> list[str]:
    """Raise ``ResumeError`` for a refused change; return the accepted ones as ``"key old -> new"``."""
    changes = setting_changes(saved, run, model_now)
    if changes.refused:
        listed = "; ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (now)" for k, a, b in changes.refused)
        raise ResumeError(
            f"refusing to resume from {path}: {listed}. A resume may not change the model, diffusion, data, "
            "train.seed, train.global_batch_size or train.grad_accum; resume with the checkpoint's values, or "
            "start a new run in another train.output_dir"
        )
    return [f"{k} {a!r} -> {b!r}" for k, a, b in changes.accepted]


# ----------------------------------------------------------------------------- the optimizer's hyperparameters


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every param group's settings except its parameters (take it before loading a state dict)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def reapply_hyperparameters(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    configured: list[dict[str, Any]],
) -> None:
    """After loading optimizer and scheduler state: put back this run's configured hyperparameters.

    ``Optimizer.load_state_dict`` restores every group's ``lr``, ``weight_decay``, betas, eps and
    ``initial_lr`` from the checkpoint, and ``LambdaLR.load_state_dict`` its ``base_lrs``: a changed
    ``train.lr`` would silently be the old one. The configured values go back in, ``base_lrs`` follow
    ``initial_lr``, and each group's current lr is the schedule's value at the restored step, computed as
    ``LambdaLR`` does it (so an unchanged config gives the checkpoint's values bit for bit).
    """
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ----------------------------------------------------------------------------- can it load?


def check_loadable(
    loaded: ckpt.LoadedCheckpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Raise ``CheckpointCorrupt`` unless every part of ``loaded`` fits this model and optimizer.

    Checked before anything is loaded, so a checkpoint that fails leaves the fresh model untouched for
    the next candidate (or a fresh start).
    """
    where = loaded.path
    params = dict(model.state_dict())
    for part, tensors in (("model", loaded.model), ("ema", loaded.ema)):
        if set(tensors) != set(params):
            missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            raise ckpt.CheckpointCorrupt(
                f"{where}: {part} tensors missing {missing[:3]}, unexpected {extra[:3]}"
            )
        bad = [k for k, v in tensors.items() if v.shape != params[k].shape]
        if bad:
            raise ckpt.CheckpointCorrupt(
                f"{where}: {part} tensor {bad[0]} has shape {tuple(tensors[bad[0]].shape)}"
            )
    opt = loaded.optimizer
    if not (
        isinstance(opt, dict)
        and isinstance(opt.get("state"), dict)
        and isinstance(opt.get("param_groups"), list)
    ):
        raise ckpt.CheckpointCorrupt(f"{where}: optimizer.pt does not hold an optimizer state dict")
    sizes_now = [len(g["params"]) for g in optimizer.param_groups]
    sizes_saved = [len(g.get("params", ())) for g in opt["param_groups"]]
    if sizes_now != sizes_saved:
        raise ckpt.CheckpointCorrupt(
            f"{where}: optimizer.pt has parameter groups of sizes {sizes_saved}, this model {sizes_now}"
        )
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in opt["param_groups"] for i in g["params"]]
    for pid, param in zip(ids, flat):
        for name, value in opt["state"].get(pid, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ckpt.CheckpointCorrupt(
                    f"{where}: optimizer state {name} of parameter {pid} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )
    if not (isinstance(loaded.scheduler, dict) and "last_epoch" in loaded.scheduler):
        raise ckpt.CheckpointCorrupt(f"{where}: scheduler.pt does not hold a scheduler state dict")
    state = loaded.state
    if not (
        isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("data"), dict)
    ):
        raise ckpt.CheckpointCorrupt(f"{where}: state.json lacks the step or the data position")


# ----------------------------------------------------------------------------- choosing a checkpoint


@dataclass
class Found:
    path: Path
    loaded: ckpt.LoadedCheckpoint
    changes: list[str]  # accepted setting changes, "key old -> new"


def find_checkpoint(
    ckpt_dir: Path,
    try_load: Callable[[Path], tuple[ckpt.LoadedCheckpoint, list[str]]],
    log: Callable[[str], None],
    dist: ckpt.Distributed,
) -> Found | None:
    """``--resume auto``: the newest checkpoint that verifies and that ``try_load`` accepts.

    ``try_load`` reads and checks a candidate; it raises ``CheckpointCorrupt`` to skip it (we fall back to
    the previous one) and ``ResumeError`` to stop (a refused setting change is not a fallback reason).
    Every process scans the same files; then the main process renames the skipped ones ``corrupt-...``.
    """
    found, skipped = None, []
    for path in ckpt.list_checkpoints(ckpt_dir):
        try:
            ckpt.verify(path)
            loaded, changes = try_load(path)
        except ckpt.CheckpointCorrupt as err:
            log(f"skipping corrupt checkpoint {path.name}: {err}; falling back to the previous one")
            skipped.append(path)
            continue
        found = Found(path, loaded, changes)
        break
    dist.barrier()  # every process has chosen before any file moves
    if dist.is_main:
        for path in skipped:
            kept = ckpt.set_aside(path, ckpt.CORRUPT_PREFIX)
            log(f"kept {path.name} for inspection as {kept}")
    dist.barrier()
    if found is None and skipped:
        log(f"{len(skipped)} checkpoint(s) found under {ckpt_dir}, all corrupt")
    elif found is None:
        log(f"no checkpoint under {ckpt_dir}; starting from step 0")
    return found


def load_explicit(path: Path, try_load: Callable[[Path], tuple[ckpt.LoadedCheckpoint, list[str]]]) -> Found:
    """``--resume DIR``: that checkpoint or an error naming it (no fallback: the user chose it)."""
    if not path.is_dir():
        raise ResumeError(f"--resume {path}: no such checkpoint directory")
    try:
        ckpt.verify(path)
        loaded, changes = try_load(path)
    except ckpt.CheckpointCorrupt as err:
        raise ResumeError(f"--resume {path}: {err}") from None
    return Found(path, loaded, changes)


# ----------------------------------------------------------------------------- the output folder


def _in_the_way(ckpt_dir: Path, below: Path | None) -> list[Path]:
    """Checkpoints a run starting here would collide with: all of them (fresh start, ``below=None``), or
    those newer than the one it resumes (and every corrupt one kept aside)."""
    corrupt = ckpt.corrupt_checkpoints(ckpt_dir)
    if below is None:
        return ckpt.list_checkpoints(ckpt_dir) + corrupt
    step = ckpt.checkpoint_step(below) if below.name.startswith(ckpt.CHECKPOINT_PREFIX) else -1
    newer = [p for p in ckpt.list_checkpoints(ckpt_dir) if ckpt.checkpoint_step(p) > step and p != below]
    return newer


def claim_output(
    out: Path,
    ckpt_dir: Path,
    *,
    resumed: Path | None,
    overwrite: bool,
    log: Callable[[str], None],
    dist: ckpt.Distributed,
) -> None:
    """Refuse to start (or to continue ``resumed``) over checkpoints it does not own, or with
    ``overwrite`` move them, the old ``final/`` and the old metrics into ``out/old-<time>/``."""
    in_the_way = _in_the_way(ckpt_dir, resumed)
    if not in_the_way:
        return
    names = ", ".join(p.name for p in in_the_way[:3]) + (" ..." if len(in_the_way) > 3 else "")
    if not overwrite:
        if resumed is None and all(p.name.startswith(ckpt.CORRUPT_PREFIX) for p in in_the_way):
            raise ResumeError(
                f"{len(in_the_way)} checkpoint(s) found under {ckpt_dir}, all corrupt (kept for inspection as "
                f"{names}); a fresh start there would mix two runs: start a new one with another "
                f"train.output_dir=PATH, or --overwrite (moves them to {out}/old-<time>/, deletes nothing)"
            )
        if resumed is None:
            raise ResumeError(
                f"{out} already holds {len(in_the_way)} checkpoint(s) ({names}) and this run starts fresh: "
                "continue that run with --resume auto, or start a new one with another train.output_dir=PATH "
                f"or --overwrite (moves the old checkpoints to {out}/old-<time>/, deletes nothing)"
            )
        raise ResumeError(
            f"--resume {resumed}: {ckpt_dir} holds newer checkpoints ({names}) that this run would replace "
            "one by one; resume the newest with --resume auto, or branch from this one with another "
            f"train.output_dir=PATH or --overwrite (moves them to {out}/old-<time>/, deletes nothing)"
        )
    dist.barrier()  # every process has seen the same folder before the main one changes it
    if dist.is_main:
        aside = out / f"old-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        n = 2
        while aside.exists():
            aside = aside.with_name(f"{aside.name.split('~')[0]}~{n}")
            n += 1
        (aside / "checkpoints").mkdir(parents=True)
        for p in in_the_way:
            shutil.move(str(p), str(aside / "checkpoints" / p.name))
        moved = [f"{len(in_the_way)} checkpoint(s)"]
        if resumed is None:  # a new run: its export and metrics must not mix with the old run's either
            for rel in ("final", "logs/metrics.jsonl"):
                if (out / rel).exists():
                    (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(out / rel), str(aside / rel))
                    moved.append(rel)
        log(f"--overwrite: moved {', '.join(moved)} of the previous run to {aside}")
    dist.barrier()


def shared_run_id(dist: ckpt.Distributed) -> str:
    """A new run id, the same on every process (drawn on the main one)."""
    run_id = ckpt.new_run_id()
    if dist.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [run_id]
        torch.distributed.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id
