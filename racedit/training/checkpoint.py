"""Training checkpoints: atomic, self-checking, loadable without executing pickled code.

Layout of ``<output_dir>/checkpoints/step_0001000/``::

    model/  config.json + model.safetensors   live weights and buffers (save_pretrained format)
    ema/    config.json + model.safetensors   EMA weights (fp32); ``racedit.load_model(dir)`` reads this one
    optimizer.pt   scheduler.pt               state dicts (tensors and plain containers only)
    rng/rank_00000.pt ...                     every process's RNG states (torch, CUDA, numpy, python, noise)
    state.json                                step, data position, counters, world size
    config.yaml                               the resolved run config (model section fully resolved)
    manifest.json                             size and sha256 of every file above; written last

A checkpoint is written into ``.tmp-step_0001000`` and renamed when complete, so a crash never leaves
a directory that looks finished. Loading reads tensors with safetensors and everything else with
``torch.load(weights_only=True)``; Accelerate's ``load_state`` unpickles with ``weights_only=False``, which
is why we do not use it. ``--resume auto`` takes the newest checkpoint whose manifest verifies and says
which newer ones it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    files = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            rel = f.relative_to(path).as_posix()
            files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (path / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify(path: Path) -> None:
    """Raise ``CheckpointCorrupt`` naming the first problem: missing manifest, missing file, size or hash."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointCorrupt(f"{path} has no {MANIFEST} (an interrupted or foreign write)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointCorrupt(f"{path}/{MANIFEST} is unreadable: {err}") from None
    full = ("model/model.safetensors", "ema/model.safetensors", "optimizer.pt")
    for rel in ("state.json", "config.yaml", *(("dcp/.metadata",) if "dcp/.metadata" in files else full)):
        if rel not in files:
            raise CheckpointCorrupt(f"{path}: the manifest lists no {rel}")
    for rel, info in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointCorrupt(f"{path}: {rel} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointCorrupt(
                f"{path}: {rel} has {f.stat().st_size} bytes, the manifest says {info['size']}"
            )
        if _sha256(f) != info["sha256"]:
            raise CheckpointCorrupt(f"{path}: {rel} does not match its sha256 in the manifest")


def find_resumable(ckpt_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through ``warn``."""
    for path in list_checkpoints(ckpt_dir):
        try:
            verify(path)
            return path
        except CheckpointCorrupt as err:
            warn(f"skipping corrupt checkpoint: {err}; falling back to the previous one")
    return None


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
    sharded: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically (every process calls this; rank 0 writes the shared parts).

    ``sharded`` (FSDP): every process writes model, EMA and optimizer shards into the temporary directory
    through it (``racedit.training.sharded.save``) instead of rank 0 writing full ones."""
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
            json.dumps({**state, "step": step, "world_size": dist.world_size}, indent=1)
        )
        (tmp / "config.yaml").write_text(config_yaml)
    dist.barrier()  # every rank's RNG file is in place
    if dist.is_main:
        write_manifest(tmp)
        if final.exists():  # re-running the same step (e.g. after a resume): replace it
            old = ckpt_dir / f"{TMP_PREFIX}old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        for stale in list_checkpoints(ckpt_dir)[keep_last:]:
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
    """Read every part of a verified checkpoint into CPU memory (no pickled code is executed)."""
    try:
        rng_file = path / "rng" / f"rank_{rank:05d}.pt"
        full = not (path / "dcp").is_dir()  # sharded (FSDP): model, EMA, optimizer load through DCP
        return LoadedCheckpoint(
            path=path,
            model=load_file(path / "model" / "model.safetensors") if full else {},
            ema=load_file(path / "ema" / "model.safetensors") if full else {},
            optimizer=_torch_load(path / "optimizer.pt") if full else {},
            scheduler=_torch_load(path / "scheduler.pt"),
            rng=_torch_load(rng_file) if rng_file.is_file() else None,
            state=json.loads((path / "state.json").read_text()),
            config_yaml=(path / "config.yaml").read_text(),
        )
    except Exception as err:  # a file that verified but does not parse is as bad as a corrupt one
        raise CheckpointCorrupt(f"{path}: {type(err).__name__}: {err}") from None
