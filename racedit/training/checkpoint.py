"""Training checkpoints: atomic, self-checking, loadable without executing pickled code.

Layout of ``<output_dir>/checkpoints/step_00001000/``::

    model/  config.json + model.safetensors   live weights and buffers (save_pretrained format)
    ema/    config.json + model.safetensors   EMA weights (fp32); ``racedit.load_model(dir)`` reads this one
    optimizer.pt   scheduler.pt               state dicts (tensors and plain containers only)
    rng/rank_00000.pt ...                     every process's RNG states (torch, CUDA, numpy, python, noise)
    state.json                                step, data position, counters, world size, run id
    config.yaml                               the resolved run config (model section fully resolved)
    manifest.json                             size and sha256 of every file above; written last

A checkpoint is written into ``.tmp-step_00001000`` and renamed when complete, so a crash never leaves
a directory that looks finished. Loading reads tensors with safetensors and everything else with
``torch.load(weights_only=True)``; Accelerate's ``load_state`` unpickles with ``weights_only=False``, which
is why we do not use it.

Lineage: a fresh start draws a run id; a resume keeps the id of the checkpoint it continues. Every
checkpoint records it in ``state.json``, and rotation (``keep_last``) deletes only checkpoints of the
writing run's own lineage, never another run's. A checkpoint that fails to verify or to load is renamed
``corrupt-step_...`` (kept for inspection, no longer a candidate); see ``racedit/training/resume.py`` for
the choice of checkpoint and the rules of a resume.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from racedit.io import MANIFEST, check_manifest, write_manifest

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = "corrupt-"  # a checkpoint that failed to verify or load, kept for inspection
UNREADABLE = "<unreadable>"  # the run id of a checkpoint whose state.json does not parse


class CheckpointCorrupt(RuntimeError):
    """A checkpoint directory is incomplete or its files do not match its manifest."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished-looking checkpoint directories, newest (highest step) first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit():
            found.append((int(p.name[len(CHECKPOINT_PREFIX) :]), p))
    return [p for _, p in sorted(found, reverse=True)]


def corrupt_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints set aside as corrupt (``corrupt-step_...``), newest name first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        (
            p
            for p in ckpt_dir.iterdir()
            if p.is_dir() and p.name.startswith(CORRUPT_PREFIX + CHECKPOINT_PREFIX)
        ),
        reverse=True,
    )


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def verify(path: Path) -> None:
    """Raise ``CheckpointCorrupt`` naming the first problem: missing manifest, missing file, size or hash."""
    if not (path / MANIFEST).is_file():
        raise CheckpointCorrupt(f"{path} has no {MANIFEST} (an interrupted or foreign write)")
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointCorrupt(f"{path}/{MANIFEST} is unreadable: {err}") from None
    full = ("model/model.safetensors", "ema/model.safetensors", "optimizer.pt")
    for rel in ("state.json", "config.yaml", *(("dcp/.metadata",) if "dcp/.metadata" in files else full)):
        if rel not in files:
            raise CheckpointCorrupt(f"{path}: the manifest lists no {rel}")
    problems = check_manifest(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointCorrupt(f"{problems[0]}{more}")


# ----------------------------------------------------------------------------- lineage


def new_run_id() -> str:
    """A fresh run's id: UTC start time plus random bits, so ids sort by age and never collide."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def run_id_of(path: Path) -> str | None:
    """The run id recorded in a checkpoint: None when it was written before run ids existed, and
    ``UNREADABLE`` (no run's id, so rotation never deletes it) when its state.json does not parse."""
    try:
        run_id = json.loads((path / "state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return UNREADABLE
    return run_id if isinstance(run_id, str) else None


def set_aside(path: Path, prefix: str) -> Path:
    """Rename ``path`` to ``<prefix><name>`` beside it (``-2``, ``-3``... if taken); nothing is deleted."""
    target = path.with_name(prefix + path.name)
    n = 2
    while target.exists():
        target = path.with_name(f"{prefix}{path.name}-{n}")
        n += 1
    path.rename(target)
    return target


# ----------------------------------------------------------------------------- RNG states


def rng_state(noise_generator: torch.Generator) -> dict[str, Any]:
    """Every RNG this process draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global RNG third-party code draws from)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save / load


@dataclass
class Distributed:
    """How this process takes part in writing a checkpoint (Accelerate's view, minimal)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema_model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng: dict[str, Any],
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    dist: Distributed,
    run_id: str,
    lineage: Collection[str | None] = (),
    sharded: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically (every process calls this; rank 0 writes the shared parts).

    Then keep the newest ``keep_last`` checkpoints of this run's lineage (``run_id`` plus the ids in
    ``lineage``, e.g. None when the run continues a checkpoint written before run ids existed) and delete
    its older ones; checkpoints of any other run are left alone.

    ``sharded`` (FSDP): every process writes model, EMA and optimizer shards into the temporary directory
    through it (``racedit.training.sharded.save``) instead of rank 0 writing full ones.
    """
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    torch.save(rng, tmp / "rng" / f"rank_{dist.rank:05d}.pt")
    if sharded is not None:
        sharded(tmp)
    if dist.is_main:
        if sharded is None:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            ema_model.save_pretrained(tmp / "ema", safe_serialization=True)
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(
            json.dumps({**state, "step": step, "world_size": dist.world_size, "run_id": run_id}, indent=1)
        )
        (tmp / "config.yaml").write_text(config_yaml)
    dist.barrier()  # every rank's RNG file is in place
    if dist.is_main:
        write_manifest(tmp)
        own = {run_id, *lineage}
        if final.exists() and run_id_of(final) not in own:  # another run's: keep it, under another name
            set_aside(final, "other-run-")
        if final.exists():  # re-running the same step of this run (e.g. after a resume): replace it
            old = ckpt_dir / f"{TMP_PREFIX}old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        for stale in [p for p in list_checkpoints(ckpt_dir) if run_id_of(p) in own][keep_last:]:
            trash = ckpt_dir / f"{TMP_PREFIX}del-{stale.name}"
            stale.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
    dist.barrier()
    return final


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class LoadedCheckpoint:
    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any] | None  # None when this rank has no RNG file (different world size)
    state: dict[str, Any]
    config_yaml: str


def read_checkpoint(path: Path, rank: int) -> LoadedCheckpoint:
    """Read every part of a verified checkpoint into CPU memory (no pickled code is executed).

    A file that verified but does not parse is as bad as a corrupt one: ``CheckpointCorrupt`` names it.
    A sharded (FSDP) checkpoint leaves model, EMA and optimizer empty: they load through DCP.
    """

    def read(rel: str, how: Callable[[Path], Any]) -> Any:
        try:
            return how(path / rel)
        except Exception as err:
            lines = str(err).strip().splitlines()
            text = lines[0][:120] + ("..." if len(lines[0]) > 120 or len(lines) > 1 else "") if lines else ""
            raise CheckpointCorrupt(f"{path}: {rel} does not load ({type(err).__name__}: {text})") from None

    rng_rel = f"rng/rank_{rank:05d}.pt"
    full = not (path / "dcp").is_dir()
    return LoadedCheckpoint(
        path=path,
        model=read("model/model.safetensors", load_file) if full else {},
        ema=read("ema/model.safetensors", load_file) if full else {},
        optimizer=read("optimizer.pt", _torch_load) if full else {},
        scheduler=read("scheduler.pt", _torch_load),
        rng=read(rng_rel, _torch_load) if (path / rng_rel).is_file() else None,
        state=read("state.json", lambda f: json.loads(f.read_text())),
        config_yaml=read("config.yaml", lambda f: f.read_text()),
    )
