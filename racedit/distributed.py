"""Process state of a command (rank, world size, device) and leaving torch.distributed cleanly at its end.

Every command asks :func:`process_state` for its rank, world size and device: under ``torchrun`` /
``accelerate launch`` (``WORLD_SIZE`` > 1) they come from Accelerate's ``PartialState`` (CPU processes use
gloo); a plain process gets rank 0 of 1 without importing Accelerate or forming a process group. The
trainer gets the same numbers from its ``Accelerator``, which is built on that ``PartialState``.

A process that exits with its gloo (or NCCL) process group still alive can be aborted by the C++ runtime
while the interpreter tears down the group's worker threads ("terminate called without an active
exception", SIGABRT): the run did its work, yet torchrun reports a failure. Every command that may run
under ``torchrun`` / ``accelerate launch`` therefore ends inside :func:`process_group_scope`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


def launched() -> bool:
    """True under a launcher that started several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class ProcessState:
    """Where this process stands: rank (``process_index``) among ``num_processes``, its device, and the
    barrier of the launch (a no-op for one process). Names as in Accelerate's ``PartialState``."""

    process_index: int = 0
    num_processes: int = 1
    local_process_index: int = 0
    device: Any = "cpu"
    barrier: Callable[[], None] | None = None

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    def wait_for_everyone(self) -> None:
        if self.barrier is not None:
            self.barrier()


def process_state(device: str | None = None, timeout: timedelta | None = None) -> ProcessState:
    """This process's rank, world size and device, for a command's ``--device`` flag (``device``).

    ``None``: this process's GPU under a launcher, else cuda when present, else cpu; ``cpu``: the CPU even
    with a GPU present (a launched command then forms a gloo group); ``cuda`` under a launcher: this
    process's own GPU; anything else: that device. Under a launcher the group is Accelerate's
    ``PartialState`` (``timeout`` for its collectives); a plain process imports nothing more."""
    import torch

    cpu = (device is not None and device.startswith("cpu")) or not torch.cuda.is_available()
    if launched():
        from accelerate import PartialState

        state = PartialState(cpu=cpu, **({"timeout": timeout} if timeout is not None else {}))
        own = torch.device(state.device)
        proc = ProcessState(
            state.process_index, state.num_processes, state.local_process_index, own, state.wait_for_everyone
        )
    else:
        own = torch.device("cpu" if cpu else "cuda")
        proc = ProcessState(device=own)
    if device is not None and not (device == "cuda" and own.type == "cuda"):
        proc.device = torch.device(device)
    return proc


def teardown(barrier: bool = True) -> None:
    """Destroy the default process group if one is up; ``barrier`` first so no rank leaves while another
    still talks to it. A no-op in a plain single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


@contextmanager
def process_group_scope() -> Iterator[None]:
    """Run a command's body, then tear the process group down: after a barrier when the body returned,
    without one when it raised (the other ranks may never reach it)."""
    ok = False
    try:
        yield
        ok = True
    finally:
        teardown(barrier=ok)


def exit_command(code: int) -> None:
    """End a command's process with ``code``. Under a launcher (WORLD_SIZE > 1) the process leaves with
    ``os._exit`` after flushing: with torch 2.14 on a loaded CPU, C++ static destructors at interpreter exit
    sometimes abort a worker that had finished its work ("terminate called without an active exception"),
    and torchrun then reports the whole run as failed."""
    import sys

    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
