"""FSDP2's two collectives, done with the gloo operations that are cheap on CPU (``train.distributed: fsdp``
over gloo; NCCL keeps FSDP2's own).

FSDP2 lets a run replace how a unit's all-gather and reduce-scatter are carried out
(``FSDPModule.set_custom_all_gather`` / ``set_custom_reduce_scatter``): what is sent, to whom and in which
layout stays FSDP2's, only the calls that move the bytes change:

- ``ExchangeReduceScatter``: each process sends every other process that process's chunk of FSDP2's
  reduce-scatter input and adds the copies it receives of its own chunk, in rank order (then divides by the
  world size for FSDP2's mean). With two processes the sum is ``g0 + g1`` either way and halving is exact:
  bitwise the same gradients as gloo's ``reduce_scatter_single``.
- ``ExchangeAllGather``: each process sends its shard to every other process and receives theirs into their
  slots of the output. Pure data movement: bitwise the same output as ``all_gather_single``.

Both move the textbook collective's bytes ((world - 1) / world of the buffer per process) with point-to-point
calls, which gloo runs with less CPU than its own collectives. On 2 CPU processes, on the demo model's block
(2.7 MiB; ``python -m bench.distributed --parts train``, process CPU time per call, four runs), the exchange
all-gather takes 0.48-0.49x the CPU time of ``all_gather_single`` and the exchange reduce-scatter 0.53-0.57x that
of ``reduce_scatter_single``. An earlier version used one broadcast per process (0.50-0.55x) and an in-place
all-reduce of the whole buffer (2x the bytes; 0.67-0.72x). With more than two processes the sums may be added
in another order than gloo's reduce-scatter adds them (equal up to rounding, not bitwise).

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


def _exchange(
    sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], group: dist.ProcessGroup
) -> None:
    """Post every send and receive with the peers (group ranks) at once, then wait for all of them. Gloo
    matches point-to-point messages per pair in the order they are posted, and each call here completes before
    the next collective starts, so consecutive calls cannot cross."""
    works = [dist.isend(t, group_dst=peer, group=group) for peer, t in sends.items()]
    works += [dist.irecv(t, group_src=peer, group=group) for peer, t in recvs.items()]
    for work in works:
        work.wait()


class ExchangeAllGather(_Allocate, AllGather):
    """All-gather as a direct exchange: this process sends its shard to every other process and receives each
    of theirs into its slot of ``output_tensor`` (rank-major, like ``all_gather_single``; FSDP2 has already
    copied this process's shard into its own slot: ``input_tensor`` is a view of it). Pure data movement."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> None:
        world, rank = group.size(), group.rank()
        slots = output_tensor.view(world, -1)  # (world, shard numel)
        if input_tensor.data_ptr() != slots[rank].data_ptr():
            slots[rank].copy_(input_tensor)
        peers = [r for r in range(world) if r != rank]
        _exchange({r: slots[rank] for r in peers}, {r: slots[r] for r in peers}, group)
        return None  # completed: FSDP2 waits only on a returned Work


class ExchangeReduceScatter(_Allocate, ReduceScatter):
    """Reduce-scatter as a direct exchange: this process sends chunk ``r`` of FSDP2's flat, rank-major input
    to process ``r`` and receives every other process's copy of its own chunk, then adds the world's copies
    in rank order (the same order on every process; with two processes ``g0 + g1``, which is what gloo's sum
    gives) and divides by the world size for ``ReduceOp.AVG`` (FSDP2's gradient mean). Any other op (a custom
    divide factor) goes to ``reduce_scatter_single``."""

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
        world, rank = group.size(), group.rank()
        chunks = input_tensor.view(world, -1)
        peers = [r for r in range(world) if r != rank]
        received = torch.empty(len(peers), chunks.size(1), dtype=chunks.dtype, device=chunks.device)
        _exchange({r: chunks[r] for r in peers}, dict(zip(peers, received)), group)
        parts = [chunks[rank] if r == rank else received[r - (r > rank)] for r in range(world)]
        torch.add(parts[0], parts[1], out=output_tensor)
        for part in parts[2:]:
            output_tensor.add_(part)
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(world)
        return None


def install(unit: object) -> None:
    """Use these collectives for one FSDP2 unit (a module ``fully_shard`` returned)."""
    unit.set_custom_all_gather(ExchangeAllGather())  # type: ignore[attr-defined]
    unit.set_custom_reduce_scatter(ExchangeReduceScatter())  # type: ignore[attr-defined]
