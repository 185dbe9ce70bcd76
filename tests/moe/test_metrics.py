"""Routing metrics: MaxVio, combination usage, timestep buckets, the accumulator and the heatmap."""

import math

import numpy as np
import torch

from racedit.interfaces import ForwardAux, RoutingRecord
from racedit.moe.metrics import (
    RoutingStats,
    combination_usage,
    max_violation,
    plot_allocation_heatmap,
    timestep_buckets,
)


def test_max_violation():
    assert max_violation(torch.tensor([2, 2, 2, 2])) == 0.0
    assert math.isclose(max_violation(torch.tensor([6, 2, 0, 0])), (6 - 2) / 2)


def test_combination_usage():
    E = 4  # 6 possible pairs
    pairs = torch.zeros(E, E)
    pairs[0, 1] = pairs[1, 0] = 100  # one pair holds everything -> 1 of 6 pairs
    assert math.isclose(combination_usage(pairs), 100 / 6)
    uniform = torch.ones(E, E)  # all 6 pairs equal -> 95% needs 6 pairs (5 give 83%)
    assert math.isclose(combination_usage(uniform), 100.0)
    skew = torch.zeros(E, E)
    skew[0, 1], skew[2, 3], skew[0, 2] = 50, 46, 4  # 96% after two pairs
    assert math.isclose(combination_usage(skew), 200 / 6)
    assert combination_usage(torch.diag(torch.ones(E))) == 0.0


def test_combination_usage_counts_the_pair_that_crosses_95_percent():
    """By hand, E = 3 (3 pairs): the fewest pairs whose co-activations reach 95% of the total."""

    def sym(c01, c02, c12):
        m = torch.zeros(3, 3)
        m[0, 1], m[0, 2], m[1, 2] = c01, c02, c12
        return m + m.T + torch.diag(torch.tensor([7.0, 8.0, 9.0]))  # the diagonal (i == i) never counts

    # shares 60%, 34%, 6%: two pairs cover 94% < 95%, so the third (crossing) pair is needed -> 3 of 3
    assert combination_usage(sym(60, 34, 6)) == 100.0
    # shares 60%, 35%, 5%: two pairs cover exactly 95% -> 2 of 3 (the boundary counts as covered)
    assert math.isclose(combination_usage(sym(60, 35, 5)), 200 / 3)
    # the same shares at another scale (0.95 * total is not an integer in float64 for every total)
    assert math.isclose(combination_usage(sym(60 * 37, 35 * 37, 5 * 37)), 200 / 3)
    # order of the pairs in the matrix does not matter, only their counts
    assert math.isclose(combination_usage(sym(5, 60, 35)), 200 / 3)
    assert math.isclose(combination_usage(sym(96, 3, 1)), 100 / 3)  # one pair alone covers 96%


def test_timestep_buckets():
    t = torch.tensor([0, 99, 100, 999, 1000.0, 550.5])
    assert timestep_buckets(t).tolist() == [0, 0, 1, 9, 9, 5]


def make_aux(t, per_token):
    """Two layers; sample b routes to the first per_token[b] experts in every token."""
    B, L, E = len(t), 4, 4
    mask = torch.zeros(B, L, E, dtype=torch.bool)
    for b, n in enumerate(per_token):
        mask[b, :, :n] = True
    aux = ForwardAux(t=torch.tensor(t))
    for layer in (0, 1):
        aux.add(
            RoutingRecord(layer=layer, logits=torch.zeros(B * L, E), mask=mask, tau=torch.tensor(0.5 + layer))
        )
    return aux


def test_accumulator_and_heatmap(tmp_path):
    stats = RoutingStats()
    stats.update(make_aux([50, 950], [1, 3]))
    stats.update(make_aux([60, 940], [3, 3]))
    out = stats.compute()
    assert out["moe/experts_per_token/layer0"] == 2.5
    assert out["moe/experts_per_token/t0"] == 2.0 and out["moe/experts_per_token/t9"] == 3.0
    assert out["moe/tau/layer1"] == 1.5 and out["moe/tau"] == 1.0
    # loads over both steps: expert 0: 16, 1: 12, 2: 12, 3: 0 -> mean 10, MaxVio 0.6
    assert math.isclose(out["moe/maxvio/layer0"], 0.6)
    grid = stats.heatmap()
    assert grid.shape == (2, 10) and grid[0, 0] == 2.0 and grid[1, 9] == 3.0 and np.isnan(grid[0, 5])
    path = stats.save_heatmap(tmp_path / "alloc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats.reset()
    assert stats.compute() == {}


def test_plot_rejects_empty(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="non-empty"):
        plot_allocation_heatmap(np.zeros((0, 10)), tmp_path / "x.png")
