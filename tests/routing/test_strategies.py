"""Routing strategies against a brute-force reference (docs/spec/race-dit.md section 3)."""

import itertools

import pytest
import torch

from racedit.kernels import dispatch
from racedit.routing import STRATEGIES, get_strategy, select, topk_mask

OVER = {"token": "E", "expert": "L", "bl": "BL", "be": "BE", "le": "LE", "race": "BLE"}


def brute_force(scores: torch.Tensor, over: str, k: int, ties: str) -> torch.Tensor:
    """Enumerate every group and its candidates explicitly; sort by (-value, flat index)."""
    B, L, E = scores.shape
    sizes = {"B": B, "L": L, "E": E}
    group_size = 1
    for d in over:
        group_size *= sizes[d]
    K = max(1, round(k * group_size / E))
    indep = [d for d in "BLE" if d not in over]
    mask = torch.zeros(B, L, E, dtype=torch.bool)
    for fixed in itertools.product(*[range(sizes[d]) for d in indep]):
        fix = dict(zip(indep, fixed))
        cands = []
        for b, l, e in itertools.product(range(B), range(L), range(E)):
            if all({"B": b, "L": l, "E": e}[d] == v for d, v in fix.items()):
                cands.append((-float(scores[b, l, e]), (b * L + l) * E + e, (b, l, e)))
        cands.sort()
        kth = -cands[K - 1][0]
        chosen = cands[:K] if ties == "index" else [c for c in cands if -c[0] >= kth]
        for _, _, (b, l, e) in chosen:
            mask[b, l, e] = True
    return mask


def score_cases():
    g = torch.Generator().manual_seed(0)
    yield "random", torch.randn(3, 8, 4, generator=g)
    yield "ties", torch.randint(0, 3, (3, 8, 4), generator=g).float()  # many exact ties
    yield "equal", torch.zeros(3, 8, 4)
    yield "signed_zero", torch.tensor([0.0, -0.0]).repeat(48).view(3, 8, 4)


@pytest.mark.parametrize("strategy", sorted(OVER))
@pytest.mark.parametrize("ties", ["index", "all"])
def test_select_matches_brute_force(strategy, ties):
    for name, scores in score_cases():
        got = select(scores, strategy, k=2, ties=ties)
        want = brute_force(scores, OVER[strategy], 2, ties)
        assert torch.equal(got, want), f"{strategy}/{ties} differs on {name} scores"


def test_counts_per_strategy():
    B, L, E, k = 3, 8, 4, 2
    scores = torch.randn(B, L, E, generator=torch.Generator().manual_seed(1))
    m = {s: select(scores, s, k) for s in OVER}
    assert (m["token"].sum(-1) == k).all()  # k per token
    assert (m["expert"].sum(1) == k * L // E).all()  # kL/E per (sample, expert)
    assert (m["bl"].sum((0, 1)) == B * L * k // E).all()  # per expert
    assert (m["be"].sum((0, 2)) == B * k).all()  # per position
    assert (m["le"].sum((1, 2)) == L * k).all()  # per sample
    assert int(m["race"].sum()) == B * L * k  # exactly K in total
    for mask in m.values():  # every strategy spends k experts per token on average
        assert int(mask.sum()) == B * L * k


def test_all_equal_scores_race_takes_lowest_flat_indices():
    B, L, E, k = 2, 4, 4, 1
    mask = select(torch.zeros(B, L, E), "race", k)
    flat = mask.reshape(-1)
    assert flat[: B * L * k].all() and not flat[B * L * k :].any()


def test_keep_all_ties_keeps_every_tie():
    scores = torch.tensor([[[3.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]])  # (1, 2, 4)
    exact = select(scores, "race", k=1)  # K = 2: 3.0 and the first 1.0
    assert int(exact.sum()) == 2 and bool(exact[0, 0, 0]) and bool(exact[0, 0, 1])
    kept = select(scores, "race", k=1, ties="all")
    assert torch.equal(kept, scores >= 1.0)  # all four 1.0 entries tie with the K-th value
    tok = select(scores, "token", k=1, ties="all")
    assert tok[0, 0].tolist() == [True, False, False, False]
    assert tok[0, 1].tolist() == [False, True, False, False]


def test_kth_value_reported():
    scores = torch.randn(2, 4, 4)
    sel = get_strategy("race", k=2).select(scores)
    assert sel.kth.shape == (1,)
    assert sel.kth[0] == torch.sort(scores.reshape(-1), descending=True).values[2 * 4 * 2 - 1]


@pytest.mark.parametrize("ties", ["index", "all"])
def test_race_plan_equals_select(ties):
    """The fused dispatch.race_plan used by the layer selects exactly what select('race') selects."""
    scores = torch.randint(0, 4, (2, 8, 4)).float()
    race = get_strategy("race", k=2, ties=ties, impl="torch")
    plan = race.plan(scores)
    assert torch.equal(plan.mask().view(2, 8, 4), select(scores, "race", 2, ties))
    assert plan.kth == torch.sort(scores.reshape(-1), descending=True).values[race.k_for((2, 8, 4)) - 1]
    plan = race.threshold_plan(scores, torch.tensor(2.0))
    assert torch.equal(plan.mask().view(2, 8, 4), scores >= 2.0)


@pytest.mark.parametrize("strategy", sorted(OVER))
def test_plan_gates_are_the_scores(strategy):
    scores = torch.randn(2, 8, 4, requires_grad=True)
    plan = get_strategy(strategy, k=2, impl="torch").plan(scores)
    mask = select(scores.detach(), strategy, 2).view(16, 4)
    assert torch.equal(plan.mask(), mask)
    assert torch.equal(plan.sorted_gate, scores.view(16, 4)[plan.sorted_token, plan.sorted_expert])
    plan.sorted_gate.sum().backward()
    assert torch.equal(scores.grad.view(16, 4), mask.float())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown routing strategy"):
        select(torch.zeros(1, 2, 2), "nope", 1)
    with pytest.raises(ValueError, match=r"\(B, L, E\)"):
        select(torch.zeros(2, 2), "race", 1)
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([[float("nan"), 1.0]]), 1)


def test_dispatch_plan_from_mask_roundtrip():
    mask = select(torch.randn(2, 4, 4), "token", 2).view(8, 4)
    plan = dispatch.plan_from_mask(mask, torch.ones(8, 4), "torch")
    assert torch.equal(plan.mask(), mask) and int(plan.counts.sum()) == 16


def test_strategy_binds_its_settings_once():
    """k, ties, the routing kernels and the scope are set at construction and checked there."""
    race = get_strategy("race", k=2, ties="all", impl="torch")
    assert (race.k, race.ties, race.impl, race.scope) == (2, "all", "torch", "local")
    assert race.k_for((3, 8, 4)) == 3 * 8 * 2 and get_strategy("expert", k=2).k_for((3, 8, 4)) == 2 * 8 // 4
    assert get_strategy("race", k=2, scope="global").local().scope == "local"
    with pytest.raises(ValueError, match="scope='global' is defined for the expert race"):
        get_strategy("token", k=2, scope="global")
    with pytest.raises(ValueError, match="ties must be one of"):
        get_strategy("race", k=2, ties="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k \\(experts per token\\) must be >= 1"):
        get_strategy("race", k=0)


def test_threshold_routing_belongs_to_the_race_alone():
    """Only the expert race has a threshold: asking another strategy for one is an error, not a no-op."""
    scores = torch.randn(2, 8, 4)
    for name in sorted(set(STRATEGIES) - {"race"}):
        strategy = get_strategy(name, k=2)
        assert not strategy.uses_threshold
        with pytest.raises(TypeError, match="has no threshold"):
            strategy.threshold_plan(scores, torch.tensor(0.0))
        with pytest.raises(TypeError, match="has no threshold"):
            strategy.threshold_kth(scores.view(16, 4), torch.tensor(0.0))
    assert get_strategy("race", k=2).uses_threshold


def test_grouped_mm_is_not_a_routing_kernel():
    """impl="grouped_mm" names the expert GEMMs; routing refuses it instead of quietly running "auto"."""
    with pytest.raises(ValueError, match="grouped_mm.*no routing kernel"):
        get_strategy("race", k=2, impl="grouped_mm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no routing kernel"):
        dispatch.race_plan(torch.randn(8, 4), k_total=4, impl="grouped_mm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no routing kernel"):
        dispatch.plan_from_mask(torch.ones(8, 4, dtype=torch.bool), torch.randn(8, 4), "grouped_mm")  # type: ignore[arg-type]
