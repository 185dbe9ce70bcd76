"""Leaving torch.distributed cleanly at the end of a command.

A process that exits with its gloo (or NCCL) process group still alive can be aborted by the C++ runtime
while the interpreter tears down the group's worker threads ("terminate called without an active
exception", SIGABRT): the run did its work, yet torchrun reports a failure. Every command that may run
under ``torchrun`` / ``accelerate launch`` therefore ends inside :func:`process_group_scope`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
    import os
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
