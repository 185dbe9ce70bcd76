"""The expert race over the scores of every process: one exact cut, communication bounded whatever the batch
(docs/spec/race-dit.md section 3).

Each process holds its own scores (T_r, E). The global race cut (the K-th largest of the union, K = k x
the global token count, and which of the entries equal to it are in) is found in one of two exact ways:

1. **Counts first.** One ``all_gather`` of one int64 per process: its score count and its NaN count. NaN has
   no place in an order and is an error on every process at once (no process is left waiting in a later
   collective); every process now knows every count, K, and which way to take.
2. **Small: one all-gather of the scores** when world x the largest count x 4 B <= ``GATHER_BYTES``: every
   process gathers every process's fp32 scores and takes the cut of the union locally (``kthvalue``). Two
   collectives in all, like the all-gather reference, and the split of the ties across processes comes with
   the union.
3. **Large: radix select** on order-preserving keys (a larger float has a larger key, -0.0 and +0.0 share the
   key of +0.0, -inf and +inf are the ends): ``PASSES`` passes, each over the next ``BITS`` bits of the key,
   most significant first. Each process counts, among its keys that match the prefix fixed so far, how many
   have each digit (a ``2**BITS``-bin histogram), one ``all_reduce`` sums the histograms, and every process
   takes the same decision from the same sums: the digit where the running count from the top reaches K.
   After the last pass the prefix is the K-th key, and ``room`` = K - #(keys > K-th key) says how many of the
   entries equal to it the race takes.
4. **Ties across processes** (``ties="index"``: the lowest flat index wins, processes in rank order, rank 0's
   (B, L, E) block first). Radix: when every tie fits (the common case) nothing more is sent; otherwise one
   ``all_gather`` of each process's tie count gives the exclusive prefix over ranks, and a process takes
   ``clamp(room - prefix, 0, its ties)`` of its own ties, lowest index first.

Why ``GATHER_BYTES`` = 64 KiB: it bounds what a layer may move by a fixed multiple of the radix select's
8 KiB (8x), whatever the batch and world, while saving three collective rounds where the scores are few
(2 collectives against 5; a ring all-reduce also takes two rounds to an all-gather's one). Up to it both ways
are latency-bound on any interconnect (64 KiB is ~6 us of transfer at 10 GB/s, below one collective's
start-up on gloo or NCCL), so the gather cannot lose there. It is not where the two cross on one CPU host:
there the gather stays faster up to at least 2 MiB (shared memory is fast, and the radix passes cost CPU
time; ``python -m bench.distributed`` prints the sweep), but over a network the gathered bytes grow with
batch x world. The demo's race (32 samples x 16 tokens x 8 experts per process, 16 KiB) gathers at 2 and 4
processes; RaceDiT-XL/2 at 32 per GPU (1 MiB per process) takes the radix select at any world size.

Communication per call (``comm_bytes``): the counts, 8 B x world, then either the radix select's ``PASSES``
all-reduces of ``2**BITS`` int64 (4 x 2,048 B; plus 8 B x world when ties straddle the cut), or the gathered
scores (at most 64 KiB). Neither grows with the batch; the world enters only through 8 B per process.
``gather_kth`` / ``gather_race_mask`` are the plain all-gather references it must equal bit for bit (they move
every score, 4 x T x E x world bytes received, unbounded); they are the test oracle and the benchmark's
baseline.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from racedit.kernels.reference import NAN_MESSAGE, Ties, check_ties

BITS = 8  # digit width: 4 passes of 256 bins cover the 32-bit key
PASSES = 32 // BITS
NBINS = 1 << BITS
GATHER_BYTES = 64 * 1024  # all-gather the scores when world x the largest count x 4 B is at most this
_SIGN = 1 << 31
_MASK32 = (1 << 32) - 1


def is_distributed() -> bool:
    """A process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------- order-preserving keys


def float_keys(scores: Tensor) -> Tensor:
    """Scores (any shape, float) -> int64 keys in [0, 2**32) with the order of the fp32 values.

    -0.0 becomes +0.0 first (``x + 0.0``), so the two zeros share one key; NaN must be rejected by the caller.
    """
    bits = (scores.detach().float() + 0.0).view(torch.int32).to(torch.int64) & _MASK32
    return torch.where(bits >= _SIGN, _MASK32 - bits, bits + _SIGN)  # negative: flip all; else set the sign


def key_to_float(key: Tensor) -> Tensor:
    """Inverse of ``float_keys`` (int64 keys -> fp32 values; a zero comes back as +0.0)."""
    bits = torch.where(key >= _SIGN, key - _SIGN, _MASK32 - key)
    bits = torch.where(bits >= _SIGN, bits - (1 << 32), bits)  # two's complement for the int32 view
    return bits.to(torch.int32).view(torch.float32)


# ----------------------------------------------------------------------------- the radix select


@dataclass(frozen=True)
class RaceCut:
    """The global race cut, the same on every process."""

    kth: Tensor  # fp32 scalar: the K-th largest score of the union (a zero is +0.0)
    key: int  # its order-preserving key
    k_total: int  # K = k x the global token count
    room: int | None  # how many entries equal to the K-th value the race takes (1 <= room <= equal)
    equal: int | None  # how many entries of the union equal the K-th value
    ties_before: int | None = None  # of them on the lower ranks (known when the scores were gathered)
    method: str = "radix"  # "radix" or "gather"


def _signed_keys(scores: Tensor) -> Tensor:
    """int32 keys whose *signed* order is the order of the fp32 values (``float_keys`` minus 2**31): for a
    negative float flip every bit but the sign. One int32 pass; -0.0 canonicalised to +0.0 first."""
    bits = (scores.detach().float() + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@torch.compiler.disable  # host-side decisions between collectives: runs eagerly inside a compiled model
def radix_cut(
    scores: Tensor,
    k_per_token: int,
    group: dist.ProcessGroup | None = None,
    bits: int = BITS,
    gather_bytes: int = GATHER_BYTES,
    counts: bool = True,
) -> RaceCut:
    """The exact global cut of the expert race over every process's scores (T_r, E); see the module doc.

    Collective: every process of ``group`` must call it (with its own, possibly different, T_r). Without
    a process group it is the cut of the local scores. ``bits``: digit width of the radix select, 8 (4 passes
    of 256 bins, the default) or 16 (2 passes of 65,536 bins: half the collectives, 64x the bytes).
    ``gather_bytes``: the size switch (0: always the radix select; tests force each way with it).
    ``counts=False``: only ``kth`` and ``key`` are wanted (the gather way then skips counting the ties: ``room``,
    ``equal`` and ``ties_before`` are None).
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if scores.ndim != 2:
        raise ValueError(f"race scores must be (T, E), got shape {tuple(scores.shape)}")
    values = scores.detach().float().reshape(-1)  # (N,) fp32 (both ways treat -0.0 as +0.0)
    # First collective: every process's score count and NaN count, packed in one int64 (count < 2**32).
    local = values.numel() | int(values.isnan().sum()) << 32
    if is_distributed():
        packed = [
            torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(dist.get_world_size(group))
        ]
        dist.all_gather(packed, torch.tensor([local], device=values.device), group=group)
        per_rank = [int(c) for c in torch.cat(packed).tolist()]
    else:
        per_rank = [local]
    sizes, nan_count = [c & _MASK32 for c in per_rank], sum(c >> 32 for c in per_rank)
    if nan_count:
        raise ValueError(f"{NAN_MESSAGE} ({nan_count} NaN scores over all processes)")
    experts = scores.shape[1]
    tokens = sum(sizes) // experts
    k_total = k_per_token * tokens
    if not 1 <= k_total <= tokens * experts:
        raise ValueError(f"K = {k_total} is outside [1, {tokens * experts}] candidates")
    if len(sizes) * max(sizes) * 4 <= gather_bytes:
        return _gathered_cut(values, sizes, k_total, group, counts)
    return _radix_select(values, k_total, group, bits, distributed=len(sizes) > 1)


def _gathered_cut(
    values: Tensor, sizes: list[int], k_total: int, group: dist.ProcessGroup | None, counts: bool
) -> RaceCut:
    """The small way: gather every process's fp32 scores (padded to the largest) and take the cut of the
    union locally. ``sizes``: every process's score count; one entry: no process group."""
    if len(sizes) == 1:
        union, before = values, values[:0]
    else:
        longest, rank = max(sizes), dist.get_rank(group)
        mine = values.new_empty(longest)
        mine[: values.numel()] = values
        parts = [torch.empty_like(mine) for _ in sizes]
        dist.all_gather(parts, mine, group=group)
        union = torch.cat([part[:n] for part, n in zip(parts, sizes)])  # rank-major order
        before = union[: sum(sizes[:rank])]
    kth = torch.kthvalue(union, union.numel() - k_total + 1).values + 0.0  # the K-th largest, a zero as +0.0
    room = equal = ties_before = None
    if counts:
        room = k_total - int((union > kth).sum())
        equal = int((union == kth).sum())
        ties_before = int((before == kth).sum())
    (bits,) = struct.unpack("<i", struct.pack("<f", float(kth)))  # float_keys on a Python scalar
    key = (_MASK32 - (bits & _MASK32)) if bits < 0 else bits + _SIGN
    return RaceCut(kth, key, k_total, room, equal, ties_before, "gather")


def _radix_select(
    values: Tensor, k_total: int, group: dist.ProcessGroup | None, bits: int, distributed: bool
) -> RaceCut:
    """The large way: ``32 / bits`` passes of a ``2**bits``-bin histogram of the keys' next digit, summed
    over processes by one all-reduce each (module doc)."""
    passes, nbins = 32 // bits, 1 << bits
    # Unsigned order as int32 bit patterns: digit p is (u >> shift) & (nbins - 1) (the mask undoes the sign
    # extension of >>).
    cand = _signed_keys(values) ^ -_SIGN
    k_rem, prefix, equal = k_total, 0, 0
    for p in range(passes):
        shift = 32 - bits * (p + 1)
        digits = ((cand >> shift) & (nbins - 1)).long()
        hist = torch.bincount(digits, minlength=nbins)  # (nbins,) int64
        if distributed:
            dist.all_reduce(hist, group=group)
        # Digits from the top: the chosen one is where the running count first reaches k_rem.
        from_top = torch.cumsum(hist.flip(0), 0).tolist()  # how many digits are >= nbins - 1 - i
        i = bisect.bisect_left(from_top, k_rem)
        digit = nbins - 1 - i
        below = from_top[i - 1] if i > 0 else 0
        k_rem -= below
        equal = from_top[i] - below
        prefix |= digit << shift
        if p < passes - 1:
            cand = cand[digits == digit]
    kth = key_to_float(torch.tensor(prefix, dtype=torch.int64, device=values.device))
    return RaceCut(kth=kth, key=prefix, k_total=k_total, room=k_rem, equal=equal)


@torch.compiler.disable
def global_race_mask(
    scores: Tensor,
    k_per_token: int,
    ties: Ties = "index",
    group: dist.ProcessGroup | None = None,
    gather_bytes: int = GATHER_BYTES,
) -> tuple[Tensor, Tensor]:
    """This process's part of the expert race over all processes: scores (T_r, E) -> (mask (T_r, E) bool,
    global K-th value (fp32 scalar)). Equal, bit for bit, to rank r's slice of the single-process race over
    ``torch.cat`` of every rank's scores (flat order rank-major). Collective."""
    check_ties(ties)
    cut = radix_cut(scores, k_per_token, group, gather_bytes=gather_bytes)
    keys = float_keys(scores)  # (T_r, E)
    above, equal = keys > cut.key, keys == cut.key
    if ties == "all" or cut.room == cut.equal:  # every tie is in: no rank needs the others' counts
        return above | equal, cut.kth
    flat_equal = equal.reshape(-1)
    mine = flat_equal.sum()
    before = cut.ties_before or 0
    if cut.ties_before is None and is_distributed():
        counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, mine, group=group)
        before = sum(int(c) for c in counts[: dist.get_rank(group)])  # ties of the lower ranks
    budget = min(max(cut.room - before, 0), int(mine))
    take = flat_equal & (torch.cumsum(flat_equal, 0) <= budget)
    return above | take.view_as(equal), cut.kth


def radix_kth(
    scores: Tensor,
    k_per_token: int,
    group: dist.ProcessGroup | None = None,
    bits: int = BITS,
    gather_bytes: int = GATHER_BYTES,
) -> Tensor:
    """The K-th largest score of the union of every process's scores (T_r, E), K = k x global tokens.
    Collective; fp32 scalar, a zero returned as +0.0. Radix select, or one all-gather of small scores."""
    return radix_cut(scores, k_per_token, group, bits, gather_bytes, counts=False).kth


# ----------------------------------------------------------------------------- the reference


def gather_kth(scores: Tensor, k_per_token: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Reference for ``radix_kth``: all-gather every score (padded to the largest process) and take the
    K-th largest of the union with ``torch.kthvalue``. Moves 4 x max(T_r) x E x world bytes to every
    process. The test oracle and the benchmark's baseline; a zero is returned as +0.0 like the radix path."""
    scores = scores.detach().float()
    if torch.isnan(scores).any():
        raise ValueError(NAN_MESSAGE)
    flat = scores.reshape(-1)
    tokens = scores.shape[0]
    if is_distributed():
        world = dist.get_world_size(group)
        size = torch.tensor([flat.numel()], device=flat.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        longest = max(int(s) for s in sizes)
        padded = torch.full((longest,), float("-inf"), device=flat.device)
        padded[: flat.numel()] = flat
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        flat = torch.cat([part[: int(s)] for part, s in zip(parts, sizes)])
        tokens = flat.numel() // scores.shape[1]
    k_total = k_per_token * tokens
    return torch.kthvalue(flat, flat.numel() - k_total + 1).values + 0.0  # -0.0 -> +0.0


def gather_race_mask(
    scores: Tensor, k_per_token: int, ties: Ties = "index", group: dist.ProcessGroup | None = None
) -> Tensor:
    """Reference for ``global_race_mask``: gather every rank's scores, run the single-process race on
    their concatenation, keep this rank's rows."""
    from racedit.kernels.reference import race_mask

    scores = scores.detach()
    if not is_distributed():
        return race_mask(scores, k_per_token * scores.shape[0], ties)[0]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    T, E = scores.shape
    size = torch.tensor([T], device=scores.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, E, dtype=scores.dtype, device=scores.device)
    padded[:T] = scores
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    union = torch.cat([part[: int(s)] for part, s in zip(parts, sizes)])
    mask = race_mask(union, k_per_token * union.shape[0], ties)[0]
    start = sum(int(s) for s in sizes[:rank])
    return mask[start : start + T]


def comm_bytes(world: int, tokens_per_rank: int, experts: int) -> dict[str, int | str]:
    """Bytes each process receives per call, from the algorithms (the benchmark's computed column).

    ``allgather``: the reference (sizes, 8 B per rank, and every rank's fp32 scores). Both ways of
    ``radix_cut`` start with the packed counts (8 B per rank). ``radix``: then ``PASSES`` histograms of
    ``NBINS`` int64 (the all-reduce's message size; a ring all-reduce moves about 2 (world - 1) / world of it
    per process, which does not grow with the world either); ``radix_ties``: plus the tie counts (8 B per
    rank) when ties straddle the cut. ``gather``: then every rank's fp32 scores. ``switch``: which of the two
    ``radix_cut`` takes at the default ``GATHER_BYTES``, and ``switched`` its bytes (ties excluded)."""
    counts = 8 * world
    radix = counts + PASSES * NBINS * 8
    gathered = world * tokens_per_rank * experts * 4
    small = gathered <= GATHER_BYTES
    return {
        "allgather": 8 * world + gathered,
        "radix": radix,
        "radix_ties": radix + 8 * world,
        "gather": counts + gathered,
        "switch": "gather" if small else "radix",
        "switched": counts + gathered if small else radix,
    }
