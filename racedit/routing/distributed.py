"""The expert race over the scores of every process: a distributed radix select (docs/spec/race-dit.md section 3).

Each process holds its own scores (T_r, E). The global race cut (the K-th largest of the union, K = k x
the global token count, and which of the entries equal to it are in) is found without moving scores:

1. **Keys.** fp32 scores (lower precisions upcast exactly) become order-preserving unsigned 32-bit keys,
   held in int64: a larger float has a larger key, -0.0 and +0.0 share the key of +0.0, -inf and +inf are
   the ends. NaN has no place in an order and is an error on every process at once (its count travels
   with the first histogram, so no process is left waiting in a collective).
2. **Radix select.** ``PASSES`` passes, each over the next ``BITS`` bits of the key, most significant first:
   each process counts, among its keys that match the prefix fixed so far, how many have each digit
   (a ``2**BITS``-bin histogram), one ``all_reduce`` sums the histograms, and every process takes the same
   decision from the same sums: the digit where the running count from the top reaches K. After the last
   pass the prefix is the K-th key itself, and ``room`` = K - #(keys > K-th key) says how many of the
   entries equal to it the race takes.
3. **Ties across processes** (``ties="index"``: the lowest flat index wins, processes in rank order, rank 0's
   (B, L, E) block first). When every tie fits (the common case) nothing more is sent; otherwise one
   ``all_gather`` of each process's tie count gives the exclusive prefix over ranks, and a process takes
   ``clamp(room - prefix, 0, its ties)`` of its own ties, lowest index first.

Communication per call: ``PASSES`` all-reduces of ``2**BITS`` int64, the first carrying two more counts
(4 x 256 x 8 + 16 = 8,208 B), plus 8 x world bytes when ties straddle the cut: independent of the batch. ``gather_kth`` is the plain
all-gather reference it must equal bit for bit (it moves every score: 4 x T x E x world bytes received);
it is kept as the test oracle and the benchmark's baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from racedit.kernels.reference import NAN_MESSAGE, Ties, check_ties

BITS = 8  # digit width: 4 passes of 256 bins cover the 32-bit key
PASSES = 32 // BITS
NBINS = 1 << BITS
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
    room: int  # how many entries equal to the K-th value the race takes (1 <= room <= equal)
    equal: int  # how many entries of the union equal the K-th value


def _signed_keys(scores: Tensor) -> Tensor:
    """int32 keys whose *signed* order is the order of the fp32 values (``float_keys`` minus 2**31): for a
    negative float flip every bit but the sign. One int32 pass; -0.0 canonicalised to +0.0 first."""
    bits = (scores.detach().float() + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def radix_cut(
    scores: Tensor, k_per_token: int, group: dist.ProcessGroup | None = None, bits: int = BITS
) -> RaceCut:
    """The exact global cut of the expert race over every process's scores (T_r, E); see the module doc.

    Collective: every process of ``group`` must call it (with its own, possibly different, T_r). Without
    a process group it is the cut of the local scores. Only the first pass reads every key; each later one
    reads the keys that still share the chosen prefix. ``bits``: digit width, 8 (4 passes of 256 bins, the
    default) or 16 (2 passes of 65,536 bins: half the collectives, 64x the bytes).
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    passes, nbins = 32 // bits, 1 << bits
    if scores.ndim != 2:
        raise ValueError(f"race scores must be (T, E), got shape {tuple(scores.shape)}")
    distributed = is_distributed()
    # Unsigned order as int32 bit patterns: digit p is (u >> shift) & 255 (the mask undoes the sign extension).
    cand = (_signed_keys(scores) ^ -_SIGN).reshape(-1)  # (N,) int32
    prefix, k_rem, k_total, equal = 0, 0, 0, 0
    for p in range(passes):
        shift = 32 - bits * (p + 1)
        digits = ((cand >> shift) & (nbins - 1)).long()
        hist = torch.bincount(digits, minlength=nbins)  # (nbins,) int64
        if p == 0:  # NaN count and token count ride with the first histogram: still one collective
            nan = torch.isnan(scores).sum().reshape(1)
            hist = torch.cat([hist, nan, torch.tensor([scores.shape[0]], device=hist.device)])
        if distributed:
            dist.all_reduce(hist, group=group)
        if p == 0:
            nan_count, tokens = int(hist[nbins]), int(hist[nbins + 1])
            if nan_count:
                raise ValueError(f"{NAN_MESSAGE} ({nan_count} NaN scores over all processes)")
            k_total = k_per_token * tokens
            if not 1 <= k_total <= tokens * scores.shape[1]:
                raise ValueError(f"K = {k_total} is outside [1, {tokens * scores.shape[1]}] candidates")
            k_rem = k_total
            hist = hist[:nbins]
        # Digits from the top: the chosen one is where the running count first reaches k_rem.
        from_top = torch.cumsum(hist.flip(0), 0)  # (nbins,) how many digits are >= nbins - 1 - i
        i = int(torch.searchsorted(from_top, torch.tensor(k_rem, device=hist.device)))
        digit = nbins - 1 - i
        k_rem -= int(from_top[i - 1]) if i > 0 else 0
        equal = int(hist[digit])
        prefix |= digit << shift
        if p < passes - 1:
            cand = cand[digits == digit]
    kth = key_to_float(torch.tensor(prefix, dtype=torch.int64, device=scores.device))
    return RaceCut(kth=kth, key=prefix, k_total=k_total, room=k_rem, equal=equal)


def global_race_mask(
    scores: Tensor, k_per_token: int, ties: Ties = "index", group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """This process's part of the expert race over all processes: scores (T_r, E) -> (mask (T_r, E) bool,
    global K-th value (fp32 scalar)). Equal, bit for bit, to rank r's slice of the single-process race over
    ``torch.cat`` of every rank's scores (flat order rank-major). Collective."""
    check_ties(ties)
    cut = radix_cut(scores, k_per_token, group)
    keys = float_keys(scores)  # (T_r, E)
    above, equal = keys > cut.key, keys == cut.key
    if ties == "all" or cut.room == cut.equal:  # every tie is in: no rank needs the others' counts
        return above | equal, cut.kth
    flat_equal = equal.reshape(-1)
    mine = flat_equal.sum()
    before = 0
    if is_distributed():
        counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, mine, group=group)
        before = sum(int(c) for c in counts[: dist.get_rank(group)])  # ties of the lower ranks
    budget = min(max(cut.room - before, 0), int(mine))
    take = flat_equal & (torch.cumsum(flat_equal, 0) <= budget)
    return above | take.view_as(equal), cut.kth


def radix_kth(
    scores: Tensor, k_per_token: int, group: dist.ProcessGroup | None = None, bits: int = BITS
) -> Tensor:
    """The K-th largest score of the union of every process's scores (T_r, E), K = k x global tokens.
    Collective; fp32 scalar, a zero returned as +0.0."""
    return radix_cut(scores, k_per_token, group, bits).kth


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


def comm_bytes(world: int, tokens_per_rank: int, experts: int) -> dict[str, int]:
    """Bytes each process receives per call, from the algorithms (the benchmark's computed column).

    all-gather: the sizes (8 B per rank) and every rank's fp32 scores; radix: ``PASSES`` histograms of
    ``NBINS`` int64 plus the NaN and token counts (the all-reduce's message size; a ring all-reduce moves
    about 2 (world - 1) / world of it per process, which does not grow with the world either), and the tie
    counts (8 B per rank) when ties straddle the cut."""
    radix = PASSES * NBINS * 8 + 2 * 8
    return {
        "allgather": 8 * world + 4 * tokens_per_rank * experts * world,
        "radix": radix,
        "radix_ties": radix + 8 * world,
    }
