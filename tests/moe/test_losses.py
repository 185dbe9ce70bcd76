"""Auxiliary losses: RSL on a hand-computed example, Switch balance, PLR, the weighted sum."""

import math

import pytest
import torch

from racedit.interfaces import ForwardAux, RoutingRecord
from racedit.moe import MoEConfig, aux_losses
from racedit.moe.losses import balance_loss, plr_loss, router_similarity_loss

# Two tokens, three experts; logits = log P so softmax gives P back exactly.
P = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]])
M = torch.tensor([[True, True, False], [False, True, True]])


def test_rsl_hand_computed():
    # M' = M^T M: diag (loads) [1, 2, 1], off-diagonal co-selection 1 at (0,1),(1,0),(1,2),(2,1).
    # W_ii = 3 * [1, 2, 1] / 4 = [0.75, 1.5, 0.75]; W_ij = (9 - 3) * 1 / 4 = 1.5 on those four pairs.
    # P' = P^T P: diag [0.3125, 0.125, 0.3125]; P'_01 = P'_12 = 0.1875.
    # sum W*P' = 0.75*0.3125*2 + 1.5*0.125 + 1.5*0.1875*4 = 1.78125; / N = 2 -> 0.890625.
    logits = P.log().requires_grad_()
    loss = router_similarity_loss(logits, M)
    assert math.isclose(loss.item(), 0.890625, rel_tol=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0  # P' carries the gradient


def test_rsl_no_gradient_through_mask_and_zero_coselection():
    logits = torch.randn(5, 4, requires_grad=True)
    top1 = torch.nn.functional.one_hot(logits.argmax(-1), 4).bool()  # k = 1: no co-selection
    loss = router_similarity_loss(logits, top1)
    Pm = torch.softmax(logits, -1)
    loads = top1.float().sum(0)
    want = (4 * loads / loads.sum() * (Pm.T @ Pm).diagonal()).sum() / 5
    assert torch.allclose(loss, want)


def test_balance_hand_computed_and_formula():
    loss = balance_loss(P.log(), M)
    # f = [1, 2, 1] / 4, Pbar = [0.375, 0.25, 0.375] -> 3 * (0.09375 + 0.125 + 0.09375) = 0.9375
    assert math.isclose(float(loss), 0.9375, rel_tol=1e-6)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 8, generator=g)
    mask = torch.rand(32, 8, generator=g) > 0.6
    f = mask.float().sum(0) / mask.float().sum()
    Pbar = torch.softmax(logits, -1).mean(0)
    assert torch.allclose(balance_loss(logits, mask), 8 * (f * Pbar).sum())
    uniform = balance_loss(torch.zeros(8, 8), torch.eye(8, dtype=torch.bool))
    assert math.isclose(float(uniform), 1.0, rel_tol=1e-6)


def test_plr_loss_and_shape_error():
    pred, target = torch.zeros(2, 4, 3), torch.full((2, 4, 3), 2.0)
    assert float(plr_loss(pred, target)) == 4.0
    with pytest.raises(ValueError, match="patchify"):
        plr_loss(pred, torch.zeros(2, 4, 6))


def test_aux_losses_weights_and_sums_over_layers():
    cfg = MoEConfig(num_experts=3, k=1, plr_weight=0.5, rsl_weight=0.1, balance_weight=2.0)
    aux = ForwardAux()
    target = torch.ones(1, 2, 3)
    for layer in range(2):
        aux.add(
            RoutingRecord(layer=layer, logits=P.log(), mask=M.view(1, 2, 3), plr_pred=torch.zeros(1, 2, 3))
        )
    out = aux_losses(aux, target, cfg)
    assert math.isclose(out["plr"].item(), 0.5 * 2 * 1.0, rel_tol=1e-6)
    assert math.isclose(out["rsl"].item(), 0.1 * 2 * 0.890625, rel_tol=1e-6)
    assert math.isclose(out["balance"].item(), 2.0 * 2 * 0.9375, rel_tol=1e-6)
    off = MoEConfig(num_experts=3, k=1, plr_weight=0.0, rsl_weight=0.0, balance_weight=0.0)
    assert aux_losses(aux, target, off) == {}  # zero weights are skipped
    # the defaults are the paper's weights (PLR 1e-2, RSL 1e-4), no balance loss
    default = aux_losses(aux, target, MoEConfig(num_experts=3, k=1))
    assert set(default) == {"plr", "rsl"}
    assert math.isclose(default["plr"].item(), 1e-2 * 2 * 1.0, rel_tol=1e-6)
    assert math.isclose(default["rsl"].item(), 1e-4 * 2 * 0.890625, rel_tol=1e-6)
    with pytest.raises(ValueError, match="target_tokens"):
        aux_losses(aux, None, cfg)
