"""FSDP2's two collectives, done with the gloo operations that are cheap on CPU (``train.distributed: fsdp``
over gloo; NCCL keeps FSDP2's own).

FSDP2 lets a run replace how a unit's all-gather and reduce-scatter are carried out
(``FSDPModule.set_custom_all_gather`` / ``set_custom_reduce_scatter``): what is sent, to whom and in which
layout stays FSDP2's, only the calls that move the bytes change. Measured on 2 CPU processes on the demo
model's block (2.7 MiB; ``python -m bench.distributed --parts train``, process CPU time per call, several
runs on a loaded machine):

- ``AllReduceReduceScatter``: an all-reduce in place on FSDP2's reduce-scatter input, then this process's chunk
  (divided by the world size for FSDP2's mean), takes 0.67-0.72x the CPU time of gloo's
  ``reduce_scatter_single``. With two processes the sum is ``g0 + g1`` either way and halving is exact:
  bitwise the same gradients.
- ``BroadcastAllGather``: one broadcast per process into its slot of the output, issued together and then
  waited, takes 0.50-0.54x the CPU time of gloo's ``all_gather_single``. Pure data movement: bitwise the same
  output.

Only the reduce-scatter moves more bytes than the textbook collective (an all-reduce returns the whole
reduced buffer to every process); on gloo that still costs less CPU than gloo's own reduce-scatter. Measured
at world 2 only; with more processes the sums may be added in another order than gloo's reduce-scatter adds
them (equal up to rounding, not bitwise).

FSDP2's reference collectives stay the default wherever these are not installed, and a test runs a sharded
step both ways and compares the gradients bit for bit (tests/training/test_sharded.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter


class _Allocate:
    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class BroadcastAllGather(_Allocate, AllGather):
    """All-gather as one asynchronous broadcast per process into its slot of ``output_tensor`` (FSDP2 has
    already copied this process's shard into its own slot: ``input_tensor`` is a view of it)."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> None:
        world = group.size()
        slots = output_tensor.view(world, -1)  # (world, shard numel), rank-major like all_gather_single
        if input_tensor.data_ptr() != slots[group.rank()].data_ptr():
            slots[group.rank()].copy_(input_tensor)
        works = [dist.broadcast(slots[r], group_src=r, group=group, async_op=True) for r in range(world)]
        for work in works:
            work.wait()
        return None  # completed: FSDP2 waits only on a returned Work


class AllReduceReduceScatter(_Allocate, ReduceScatter):
    """Reduce-scatter as an in-place ``all_reduce`` (sum) of FSDP2's flat, rank-major input, then this
    process's chunk: divided by the world size for ``ReduceOp.AVG`` (FSDP2's gradient mean), as is for SUM.
    Any other op (a custom divide factor) goes to ``reduce_scatter_single``."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: object,
        async_op: bool = False,
    ) -> dist.Work | None:
        if op not in (dist.ReduceOp.AVG, dist.ReduceOp.SUM):
            return dist.reduce_scatter_single(
                output_tensor, input_tensor, op=op, group=group, async_op=async_op
            )
        world = group.size()
        dist.all_reduce(input_tensor, group=group)  # the input is FSDP2's temporary: reduced in place
        mine = input_tensor.view(world, -1)[group.rank()]
        if op == dist.ReduceOp.AVG:
            torch.div(mine, world, out=output_tensor)
        else:
            output_tensor.copy_(mine)
        return None


def install(unit: object) -> None:
    """Use these collectives for one FSDP2 unit (a module ``fully_shard`` returned)."""
    unit.set_custom_all_gather(BroadcastAllGather())  # type: ignore[attr-defined]
    unit.set_custom_reduce_scatter(AllReduceReduceScatter())  # type: ignore[attr-defined]
