"""Process state of a command (rank, world size, device) and leaving torch.distributed cleanly at its end.

Every command asks :func:`process_state` for its rank and world size: under ``torchrun`` / ``accelerate
launch`` (``WORLD_SIZE`` > 1) it is Accelerate's ``PartialState`` (CPU processes use gloo), in a plain
process a single-process stand-in that neither imports Accelerate nor forms a process group. The trainer
gets the same numbers from its ``Accelerator``, which is built on that ``PartialState``.

A process that exits with its gloo (or NCCL) process group still alive can be aborted by the C++ runtime
while the interpreter tears down the group's worker threads ("terminate called without an active
exception", SIGABRT): the run did its work, yet torchrun reports a failure. Every command that may run
under ``torchrun`` / ``accelerate launch`` therefore ends inside :func:`process_group_scope`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any


def launched() -> bool:
    """True under a launcher that started several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class SingleProcess:
    """The parts of Accelerate's ``PartialState`` that commands use, for one plain process."""

    process_index = 0
    local_process_index = 0
    num_processes = 1
    is_main_process = True
    is_local_main_process = True

    def __init__(self, device: Any) -> None:
        self.device = device

    def wait_for_everyone(self) -> None:
        pass


def process_state(cpu: bool = False, timeout: timedelta | None = None) -> Any:
    """This process's rank, world size and device (``process_index``, ``num_processes``, ``device``,
    ``is_main_process``, ``wait_for_everyone()``). ``cpu``: stay on the CPU even with a GPU present (and
    use gloo under a launcher); without CUDA that is the default."""
    import torch

    cpu = cpu or not torch.cuda.is_available()
    if not launched():
        return SingleProcess(torch.device("cpu" if cpu else "cuda"))
    from accelerate import PartialState

    return PartialState(cpu=cpu, **({"timeout": timeout} if timeout is not None else {}))


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
