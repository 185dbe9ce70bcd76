"""Fully sharded training (``train.distributed: fsdp``): torch's FSDP2 ``fully_shard`` and
``torch.distributed.checkpoint`` (DCP), driven from the Accelerate trainer.

How the pieces are sharded (every process holds 1/world of each, dim 0 of every parameter):
- **Model**: ``fully_shard`` on every DiT block (dense, MoE, hyper/frac-connection blocks alike: the blocks are
  ``model.blocks`` whatever fills their MLP slot and connections; the embedders ride in the first block's
  unit, the final layer in the last's), then on the root for what is left (the stream's parameters, if any).
  The frozen position embedding and scalar parameters (the dynamic connections' scales, which FSDP2 cannot
  shard) stay whole on every process; the scalars' gradients are averaged over processes as DDP does.
  Parameters become ``DTensor`` shards; a block's
  full weights exist only during its forward and backward. Buffers (the race thresholds ``tau``) stay
  replicated. On gloo (CPU) the units' all-gathers and reduce-scatters go through the cheaper gloo calls of
  ``racedit.training.collectives``.
- **Gradients** are reduce-scattered by FSDP (means over processes); **AdamW** state follows its parameters.
- **EMA**: the fp32 EMA copy is sharded the same way and updated shard by shard (``torch._foreach_lerp_`` on
  their local shards, no DTensor dispatch): no full parameter is gathered per step. Sample grids and the
  demo report sample on every process in lockstep on the sharded EMA model (``lockstep``,
  ``sampled_by_main``: one unit's full weights at a time), so the full model is never gathered onto one
  process; the final export streams it one tensor at a time (``save_full``). ``full_model`` gathers it for
  tools and tests.
- **Checkpoints**: model, EMA and optimizer go through DCP into ``<checkpoint>/dcp/`` (one file per process +
  ``.metadata``), written inside the trainer's atomic temporary directory and covered by its manifest. DCP
  reshards on load, so a checkpoint written by N processes resumes on M. Its ``.metadata`` is a pickle: we
  read it with an unpickler that resolves only DCP's metadata classes, so loading executes no pickled code
  (``SafeReader``); the tensor files DCP reads with ``torch.load(weights_only=True)``.

The launch stays Accelerate's (or torchrun's) data-parallel launch: the sharding is the run config's choice
(``train.distributed=fsdp``), so one config file describes a run whatever launched it. A single process
(world 1) runs the same code path over a one-process gloo/NCCL group, which is how a checkpoint written by
N processes is resumed on one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

DCP_DIR = "dcp"


# ----------------------------------------------------------------------------- process group and wrapping


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group; a plain single process gets a one-process group (in-memory store)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard(
    model: nn.Module,
    device: torch.device,
    reshard_after_forward: bool = True,
    gloo_collectives: bool | None = None,
) -> nn.Module:
    """Apply FSDP2 to every DiT block, then to the root (in place; the module keeps its class and names).

    Units: each DiT block is one; the embedders (patch, timestep, label) join the first block's unit and the
    final layer the last block's, so they cost no all-gather and no reduce-scatter of their own (they run just
    before / after those blocks). The root unit keeps what is left (the stream's parameters, if any). Every
    process holds the frozen position embedding and scalar parameters whole (see below).

    ``reshard_after_forward`` (``train.fsdp_reshard_after_forward``): True frees a block's full weights after its
    forward and all-gathers them again in backward; False keeps them until backward (one all-gather per block
    and step instead of two). The last block keeps them either way (its backward starts right after the
    forward), and so does the root (FSDP2's default for it).

    ``gloo_collectives`` (default: when the process group is gloo, i.e. on CPU): carry each unit's all-gather
    and reduce-scatter with the gloo calls that are cheaper on CPU (``racedit.training.collectives``); False
    keeps FSDP2's own (the reference they are tested against)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Kept whole on every process instead of sharded: the fixed sin-cos position embedding (it never changes, so
    # the root gathers nothing per step) and scalar parameters (the dynamic connections' scales: FSDP2 shards
    # along dim 0 only), whose gradients are averaged over processes as DDP does (``_average_gradient``).
    frozen = {p for p in model.parameters(recurse=False) if not p.requires_grad}
    scalars = {p for p in model.parameters() if p.ndim == 0}
    whole = (frozen | scalars) or None
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_gradient)
    blocks = list(model.blocks)
    last = len(blocks) - 1
    units = []
    for i, block in enumerate(blocks):
        modules = [block]
        if i == 0:
            modules = [model.x_embedder, model.t_embedder, model.y_embedder, *modules]
        if i == last:
            modules.append(model.final_layer)
        unit_reshards = reshard_after_forward and i < last
        fully_shard(modules, mesh=mesh, reshard_after_forward=unit_reshards, ignored_params=whole)
        units.append(block)
    units.append(fully_shard(model, mesh=mesh, ignored_params=whole))
    # FSDP2 warns at the first forward that the last unit returns a view (the final layer's linear output):
    # an in-place op on it would skip the unit's backward hook. The DiT only reads it out of place (unpatchify,
    # the loss), and tests/training/test_sharded.py checks the gradients against DDP's.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if gloo_collectives is None:
        gloo_collectives = dist.get_backend() == "gloo" and dist.get_world_size() > 1
    if gloo_collectives:
        from racedit.training import collectives

        for unit in units:
            collectives.install(unit)
    return model


def _average_gradient(param: Tensor) -> None:
    """A parameter kept whole on every process: its gradient becomes the mean over processes (one all-reduce
    as soon as autograd has accumulated it; under gradient accumulation the part accumulated before is already
    that mean on every process, so averaging again is exact)."""
    world = dist.get_world_size()
    if world > 1:
        dist.all_reduce(param.grad)
        param.grad.div_(world)


def autocast_forward(model: nn.Module, mixed_precision: str, device: torch.device) -> None:
    """bf16 autocast around the forward (what ``accelerator.prepare`` does for a DDP model); fp16 is refused
    by ``check_config`` (FSDP2 would need a sharded gradient scaler).

    Without autocast's cast cache: the cache keeps the bf16 copy of every weight it cast until the forward ends.
    A DiT uses each weight once per forward, so the cache saves no cast; but with gradient checkpointing,
    where autograd saves nothing inside a block, it alone would keep a bf16 copy of every gathered full weight,
    2 B per parameter of the whole model on every process (docs/recipes.md, "State memory per GPU")."""
    if mixed_precision != "bf16":
        return
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            return forward(*args, **kwargs)

    model.forward = autocast_forward  # type: ignore[method-assign]


def check_config(mixed_precision: str) -> str | None:
    """A reason why this run cannot be sharded, or None."""
    if mixed_precision == "fp16":
        return (
            "train.distributed=fsdp supports train.mixed_precision no or bf16, not fp16 (it would need a "
            "sharded gradient scaler); use bf16"
        )
    return None


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduce-scatter for accumulation micro-batches (FSDP2's ``no_sync``)."""
    if enabled:
        yield
        return
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm_(parameters: Iterator[nn.Parameter], max_norm: float) -> Tensor:
    """Global L2 norm of the sharded gradients (per-shard norms by one foreach kernel, one all-reduce of the
    sum of squares), then clip the local shards in place. A gradient every process holds whole (a parameter
    ``shard`` keeps whole) counts once: the main process adds it.

    The same norm as ``torch.nn.utils.clip_grad_norm_`` on the full gradients, up to the summation order.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    shards = [local(g) for g in grads if hasattr(g, "to_local")]
    whole = [g for g in grads if not hasattr(g, "to_local")]
    counted = shards + (whole if not dist.is_initialized() or dist.get_rank() == 0 else [])
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    if counted:
        squares = torch.stack(torch._foreach_norm(counted, dtype=torch.float32)).square().sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(squares)
    norm = squares.sqrt()
    if math.isfinite(max_norm) and grads:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(shards + whole, coef)
    return norm


def state_bytes(*modules_or_optimizers: Any) -> int:
    """Bytes this process holds for the parameters, gradients and optimizer state of the given objects
    (local shards only; what FSDP divides by the world size)."""
    total = 0
    for obj in modules_or_optimizers:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                total += local(p).numel() * p.element_size()
                if p.grad is not None:
                    total += local(p.grad).numel() * p.grad.element_size()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    if isinstance(v, Tensor):
                        total += local(v).numel() * v.element_size()
    return total


# ----------------------------------------------------------------------------- full weights


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Full (unsharded) state dict on CPU, on the main process only (an empty dict elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


@contextlib.contextmanager
def lockstep(model: nn.Module) -> Iterator[nn.Module]:
    """Run a sharded model's forwards (sampling a grid) on every process in lockstep: each process calls the
    same forwards on the same inputs (same labels, same seeds), and FSDP all-gathers one unit's full weights
    at a time, so no process ever holds the full model. Collective: every process must run the same calls.

    On exit every unit is resharded (a forward keeps the last block's and the root's full weights, which a
    backward would free); the local shards are then exactly what they were."""
    from torch.distributed.fsdp import FSDPModule

    try:
        yield model
    finally:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@contextlib.contextmanager
def sampled_by_main(
    model: nn.Module, sample: Callable[[nn.Module, list[int], int], Tensor], device: torch.device
) -> Iterator[Callable[[list[int], int], Tensor] | None]:
    """Let code that runs on the main process alone (the demo report) sample from a sharded model.

    On the main process it yields ``sample_fn(labels, seed)``: each call first sends the labels and the seed
    to the other processes, then every process runs ``sample(model, labels, seed)`` in lockstep (``lockstep``)
    and the main process returns its images. The other processes get None and wait inside the ``with``,
    sampling whatever the main process asks, until it leaves the block. Collective: every process enters."""
    main = dist.get_rank() == 0

    def announce(labels: list[int] | None, seed: int = 0) -> tuple[list[int], int] | None:
        """The main process's request (None: done), received by the others."""
        header = torch.tensor([-1 if labels is None else len(labels), seed], dtype=torch.int64, device=device)
        dist.broadcast(header, src=0)
        if header[0] < 0:
            return None
        payload = torch.tensor(labels if main else [0] * int(header[0]), dtype=torch.int64, device=device)
        dist.broadcast(payload, src=0)
        return payload.tolist(), int(header[1])

    def sample_fn(labels: list[int], seed: int) -> Tensor:
        announce(list(labels), seed)
        with lockstep(model) as m:
            return sample(m, list(labels), seed)

    if main:
        try:
            yield sample_fn
        finally:
            announce(None)  # the others leave
        return
    while (request := announce(None)) is not None:
        with lockstep(model) as m:
            sample(m, *request)
    yield None


def full_model(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """A plain (unsharded) copy of a sharded model on the main process, None elsewhere. Collective.

    ``build()`` makes an unsharded model of the same architecture; the copy is fp32 in eval mode."""
    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    plain = build().float().eval().requires_grad_(False)
    plain.load_state_dict(state, strict=True)
    device = next(iter(model.buffers()), None)
    return plain.to(device.device) if device is not None else plain


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_full(model: nn.Module, build: Callable[[], nn.Module], path: Path) -> Path | None:
    """Export a sharded model's full weights as ``save_pretrained`` does (``config.json`` + ``model.safetensors``,
    atomically), one tensor at a time: every process joins each parameter's all-gather and the main process
    appends it to the file, so the peak is one full tensor, not the model (RaceDiT-XL/2-4in32: 0.17 GB, not
    11.2 GB).
    Collective; returns the directory on the main process, None elsewhere.

    The safetensors header (names, dtypes, shapes, offsets) is known from the shards' global shapes before any
    gather, so the file is written front to back in the format's layout (8-byte little-endian header size,
    JSON header padded to 8 bytes, then the raw tensors). ``build()`` makes an unsharded model of the same
    architecture for its ``config.json`` (on the meta device: no weights are allocated)."""
    import json

    from racedit.io import atomic_directory

    state = model.state_dict()  # sharded parameters (DTensor), replicated buffers: nothing gathered yet
    if dist.get_rank() != 0:
        for t in state.values():
            if hasattr(t, "full_tensor"):
                t.full_tensor()  # this process's part of the main process's gather
        return None
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(path) as tmp:
        with torch.device("meta"):
            build().save_config(tmp)
        with (tmp / "model.safetensors").open("wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for t in state.values():
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                fh.write(full.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


# ----------------------------------------------------------------------------- checkpoints (DCP)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema_model: nn.Module) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(ema_model)}


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema_model: nn.Module) -> None:
    """Every process writes its shards of model, optimizer and EMA into ``directory/dcp``. Collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, ema_model), checkpoint_id=directory / DCP_DIR)


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema_model: nn.Module) -> None:
    """Load a checkpoint written by any number of processes into this run's shards. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _state(model, optimizer, ema_model)  # the layout to fill, resharded by DCP
    reader = SafeReader(directory / DCP_DIR)
    saved = reader.read_metadata().state_dict_metadata
    # AdamW holds no state for a parameter that never had a gradient (e.g. the last block's PLR head): the
    # template has one for every parameter, so keep only those the checkpoint has; loading then leaves the
    # others stateless, as they were in the run that wrote it.
    opt_state = state["optimizer"]["state"]
    state["optimizer"]["state"] = {
        fqn: st for fqn, st in opt_state.items() if all(f"optimizer.state.{fqn}.{k}" in saved for k in st)
    }
    dcp.load(state, storage_reader=reader)
    set_model_state_dict(model, state["model"])  # strict: every key of the model
    # not strict: the parameters left stateless above are allowed
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    set_model_state_dict(ema_model, state["ema"])


def read_full(checkpoint: Path) -> dict[str, Any]:
    """A sharded checkpoint's model, EMA and optimizer as full CPU tensors, in one plain process (no process
    group): ``{"model": {...}, "ema": {...}, "optimizer": {"state": ..., "param_groups": ...}}``. For
    converting or inspecting a run; training resumes through ``load``."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "no process group, loading in a single process": the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        return _load_state_dict_from_keys(storage_reader=SafeReader(checkpoint / DCP_DIR))


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / DCP_DIR / ".metadata").is_file()


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # layout name -> torch.layout
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


def read_metadata_file(fh: Any) -> Any:
    """Unpickle DCP's ``.metadata`` resolving only DCP's metadata classes, ``torch.Size``, dtypes, layouts and
    paths (the Python documentation's "restricting globals"): a crafted file cannot name a callable that
    runs code, so loading a checkpoint executes none."""
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            ):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which is not allowed")

    return Restricted(fh).load()


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        """DCP's file reader with the metadata read by ``read_metadata_file``; tensor data is already read
        with ``torch.load(weights_only=True)`` by DCP itself."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as fh:
                meta = read_metadata_file(fh)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return _SafeReader


def SafeReader(path: Path) -> Any:  # noqa: N802 (a factory standing in for the lazily defined class)
    """A ``FileSystemReader`` for ``path`` that executes no pickled code (see ``read_metadata_file``)."""
    return _reader_class()(path)
