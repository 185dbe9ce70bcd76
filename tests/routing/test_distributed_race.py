"""The distributed expert race (racedit.routing.distributed): radix-select K-th value and the global race
mask, against the all-gather reference, on one process and on two gloo processes (torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from racedit.kernels.reference import race_mask
from racedit.routing import select
from racedit.routing.distributed import (
    comm_bytes,
    float_keys,
    gather_kth,
    global_race_mask,
    key_to_float,
    radix_cut,
    radix_kth,
)

REPO = Path(__file__).resolve().parents[2]
SPECIAL = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38, -3.4e38, 1.17e-38]


def bits(x: torch.Tensor) -> int:
    return int(x.float().reshape(()).view(torch.int32))


def test_keys_preserve_the_order_of_floats_and_invert():
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.tensor(SPECIAL),
            torch.randn(2000, generator=g) * 10.0 ** torch.randint(-40, 38, (2000,), generator=g),
        ]
    )
    keys = float_keys(values)
    assert keys.dtype == torch.int64 and int(keys.min()) >= 0 and int(keys.max()) < 2**32
    order = torch.argsort(values, stable=True)
    assert torch.all(keys[order][1:] >= keys[order][:-1])  # sorted values -> sorted keys
    eq = values[:, None] == values[None, :]  # -0.0 == +0.0 share a key, nothing else does
    assert torch.equal(eq, keys[:, None] == keys[None, :])
    back = key_to_float(keys)
    assert torch.equal((values + 0.0).view(torch.int32), back.view(torch.int32))  # exact, zero as +0.0


def score_cases():
    g = torch.Generator().manual_seed(1)
    yield torch.randn(13, 8, generator=g)
    yield torch.randint(-2, 3, (9, 4), generator=g).float()  # many ties
    yield torch.zeros(5, 4)  # all tied
    yield torch.tensor(SPECIAL[:8]).view(2, 4)
    yield torch.randn(16, 8, generator=g).bfloat16()  # upcast exactly


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_single_process_radix_equals_the_reference_bitwise(case, k):
    scores = list(score_cases())[case]
    assert bits(radix_kth(scores, k)) == bits(gather_kth(scores, k)) == bits(radix_kth(scores, k, bits=16))
    cut = radix_cut(scores, k)
    s = scores.float()
    assert cut.k_total == k * s.shape[0]
    assert int((s > cut.kth).sum()) + cut.room == cut.k_total and 1 <= cut.room <= cut.equal
    assert cut.equal == int((s == cut.kth).sum())
    for ties in ("index", "all"):
        mask, kth = global_race_mask(scores, k, ties)
        ref, _ = race_mask(scores, k * scores.shape[0], ties)
        assert torch.equal(mask, ref)


def test_nan_is_an_error_in_both_paths():
    scores = torch.randn(4, 4)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        radix_kth(scores, 2)
    with pytest.raises(ValueError, match="NaN"):
        gather_kth(scores, 2)


def test_communication_does_not_grow_with_batch_or_world():
    small, big = comm_bytes(2, 16, 8), comm_bytes(64, 32 * 256, 32)
    assert small["radix"] == big["radix"] == 4 * 256 * 8 + 16
    assert big["allgather"] == 8 * 64 + 4 * 32 * 256 * 32 * 64  # ~64 MB per layer
    assert small["radix_ties"] - small["radix"] == 16


def test_global_scope_is_only_for_the_race():
    with pytest.raises(ValueError, match="expert race"):
        select(torch.randn(2, 3, 4), "token", 2, scope="global")
    with pytest.raises(ValueError, match="scope"):
        select(torch.randn(2, 3, 4), "race", 2, scope="world")
    # Without a process group, global == local.
    s = torch.randn(2, 3, 4)
    assert torch.equal(select(s, "race", 2, scope="global"), select(s, "race", 2))


SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from racedit.routing import select
from racedit.routing.distributed import radix_kth, gather_kth, global_race_mask, gather_race_mask

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)

def bits(x):
    return int(x.float().reshape(()).view(torch.int32))

def all_ranks(case, seed):
    # every rank builds every rank's scores from one seed; B differs per rank
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        B, L, E = 2 + r, 3, 4
        if case == "random":
            s = torch.randn(B, L, E, generator=g)
        elif case == "ints":  # ties inside and across ranks
            s = torch.randint(-1, 2, (B, L, E), generator=g).float()
        elif case == "equal":  # every score the same: the cut falls inside the ties of rank 0 / rank 1
            s = torch.full((B, L, E), 0.5)
        elif case == "zeros":  # -0.0 on one rank, +0.0 on the other
            s = torch.zeros(B, L, E) * (-1.0 if r == 0 else 1.0)
        else:  # "special": infinities and zeros of both signs
            vals = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0])
            s = vals[torch.randint(0, 6, (B, L, E), generator=g)]
        out.append(s)
    return out

checks = []
for case in ("random", "ints", "equal", "zeros", "special"):
    for seed in range(4):
        scores = all_ranks(case, seed)
        mine = scores[rank]
        B, L, E = mine.shape
        union = torch.cat(scores)
        start = sum(s.shape[0] for s in scores[:rank])
        for k in (1, 2, 3):
            flat = mine.reshape(B * L, E)
            r_kth, g_kth = radix_kth(flat, k), gather_kth(flat, k)
            assert bits(radix_kth(flat, k, bits=16)) == bits(r_kth)
            for ties in ("index", "all"):
                got = select(mine, "race", k, ties, scope="global")
                ref = select(union, "race", k, ties)[start : start + B]
                via_gather = gather_race_mask(flat, k, ties).view(B, L, E)
                checks.append({
                    "case": case, "seed": seed, "k": k, "ties": ties,
                    "mask_equal": bool(torch.equal(got, ref)), "gather_equal": bool(torch.equal(via_gather, ref)),
                    "radix_bits": bits(r_kth), "gather_bits": bits(g_kth),
                    "selected": int(got.sum()),
                })

# NaN on one rank only: every rank raises (no rank is left waiting in a collective)
nan_raised = False
s = torch.randn(4, 4)
if rank == 1:
    s[0, 0] = float("nan")
try:
    radix_kth(s, 2)
except ValueError:
    nan_raised = True

# The MoE layer with race_scope=global: its routing mask is the rank's slice of the single-process race over
# both ranks' scores, and its threshold update uses the global K-th value.
from racedit.models import ForwardAux
from racedit.moe.config import MoEConfig
from racedit.moe.layer import MoEFeedForward

torch.manual_seed(0)
layer = MoEFeedForward(8, 32, MoEConfig(num_experts=4, k=2, race_scope="global"), 0, 4).train()
h = torch.randn(2 + rank, 3, 8, generator=torch.Generator().manual_seed(10 + rank))
aux = ForwardAux()
layer(h, aux)
rec = aux.layers[0]
logits = rec.logits.detach()
sizes = [(2 + r) * 3 for r in range(world)]
padded = torch.zeros(max(sizes), 4)
padded[: logits.shape[0]] = logits
gathered = [torch.empty_like(padded) for _ in range(world)]
dist.all_gather(gathered, padded)
union = torch.cat([g[:n] for g, n in zip(gathered, sizes)]).view(-1, 3, 4)
start = sum(2 + r for r in range(rank))
ref = select(union, "race", 2)[start : start + 2 + rank]
layer_ok = bool(torch.equal(rec.mask, ref))
tau_bits = bits(layer.threshold.tau)
union_kth_bits = bits(gather_kth(logits, 2))

out = {"checks": checks, "nan_raised": nan_raised, "layer_mask_equal": layer_ok,
       "tau_bits": tau_bits, "union_kth_bits": union_kth_bits, "local_selected": int(rec.mask.sum())}
with open(sys.argv[1] + f".rank{rank}.json", "w") as fh:
    json.dump(out, fh)

from racedit.distributed import exit_command, teardown
teardown()
exit_command(0)
"""


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_global_race_on_two_processes_equals_the_race_over_the_union(tmp_path):
    script = tmp_path / "global_race.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    results = [json.loads(Path(f"{out}.rank{i}.json").read_text()) for i in (0, 1)]
    for res in results:
        assert res["nan_raised"]
        assert len(res["checks"]) == 5 * 4 * 3 * 2
        for c in res["checks"]:
            assert c["mask_equal"] and c["gather_equal"], c
            assert c["radix_bits"] == c["gather_bits"], c  # bitwise the all-gather value
        assert res["layer_mask_equal"]
        assert res["tau_bits"] == res["union_kth_bits"]  # first update: tau = the global K-th value
    # ties="index" picks exactly K = k x global tokens over both ranks together (ranks: 2x3 and 3x3 tokens)
    for c0, c1 in zip(results[0]["checks"], results[1]["checks"]):
        if c0["ties"] == "index":
            assert c0["selected"] + c1["selected"] == c0["k"] * (6 + 9), (c0, c1)
    # all-equal scores: at k=1 (K=15) rank 0's 24 ties fill K and rank 1 takes none; at k=3 (K=45) rank 0
    # takes all 24 and rank 1 the first 21 of its 36
    equal = [
        (a, b)
        for a, b in zip(results[0]["checks"], results[1]["checks"])
        if a["case"] == "equal" and a["ties"] == "index"
    ]
    assert any(a["selected"] > 0 and b["selected"] > 0 for a, b in equal)  # ties straddle the rank boundary
    assert any(b["selected"] == 0 for a, b in equal)  # rank 1 gets none when rank 0's ties fill K
    assert results[0]["local_selected"] + results[1]["local_selected"] == 2 * (6 + 9)
