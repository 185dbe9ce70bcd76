"""The MoE feed-forward: grouped path vs dense reference, gradients, accounting, model integration."""

import pytest
import torch
import torch.nn.functional as F

from racedit.interfaces import ForwardAux
from racedit.kernels import dispatch
from racedit.models.loading import build_model
from racedit.moe import MoEConfig, MoEFeedForward, aux_losses
from racedit.routing import select

TINY = dict(input_size=8, num_classes=10, hidden_size=64, depth=2, num_heads=2)


def tiny_model(**moe):
    torch.manual_seed(0)
    return (
        build_model("RaceDiT-B/2-2in8", **TINY, moe=moe) if moe else build_model("RaceDiT-B/2-2in8", **TINY)
    )


def batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, 4, 8, 8, generator=g),
        torch.randint(0, 1000, (B,), generator=g),
        torch.randint(0, 10, (B,), generator=g),
    )


def dense_masked_moe(x, mask, gates, w1, b1, w2, b2):
    """Every expert on every token, then masked: out = sum_e M*g*Expert_e(x)."""
    h = F.gelu(torch.einsum("td,edh->eth", x, w1) + b1[:, None], approximate="tanh")  # (E, T, H)
    y = torch.einsum("eth,ehd->etd", h, w2) + b2[:, None]  # (E, T, D)
    return (y * (mask * gates).T[..., None]).sum(0)


@pytest.mark.parametrize("strategy", ["race", "token", "expert"])
def test_grouped_path_equals_dense_masked_forward_and_backward(strategy):
    torch.manual_seed(0)
    T, D, H, E = 24, 16, 8, 4
    x = torch.randn(T, D, requires_grad=True)
    scores = torch.randn(T, E, requires_grad=True)
    params = [
        torch.randn(E, D, H) * 0.3,
        torch.randn(E, H) * 0.1,
        torch.randn(E, H, D) * 0.3,
        torch.randn(E, D) * 0.1,
    ]
    params = [p.requires_grad_() for p in params]
    mask = select(scores.detach().view(2, T // 2, E), strategy, 2).view(T, E)
    plan = dispatch.plan_from_mask(mask, scores, "torch")
    got = dispatch.expert_ffn(x, plan, *params, "torch")
    want = dense_masked_moe(x, mask.float(), scores, *params)
    assert int(plan.counts.sum()) == T * 2 and (plan.counts < T).all()  # never every expert on every token
    # float32, per-expert GEMMs against one einsum over every expert: sums of D = 16 and H = 8 terms of O(1) in
    # another order, a few 6e-8 roundings each (~1e-6); gradients sum over at most T = 24 tokens more: 1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cot = torch.randn(T, D)
    inputs = [x, scores, *params]
    g_got = torch.autograd.grad(got, inputs, cot)
    g_want = torch.autograd.grad(want, inputs, cot)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layer_forward_equals_dense_reference_and_router_gets_gradient():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, k=2)
    layer = MoEFeedForward(16, 64, cfg, 0, 4).double()
    h = torch.randn(2, 6, 16, dtype=torch.float64)
    out = layer(h)
    x = h.view(12, 16)
    scores = layer.router(x)[1]  # identity gating
    mask = select(scores.detach().view(2, 6, 4), "race", 2).view(12, 4)
    want = dense_masked_moe(x, mask.double(), scores, layer.w1, layer.b1, layer.w2, layer.b2)
    # float64, the same products summed in another order: ~(D + H) * 1e-16 relative, with margin
    torch.testing.assert_close(out.view(12, 16), want, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()  # the gates carry the gradient into the router
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert layer.router.trunk.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gating", ["identity", "sigmoid", "softmax"])
def test_gates_are_gated_scores(gating):
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 32, MoEConfig(num_experts=4, k=2, gating=gating, router="token"), 0, 4)
    x = torch.randn(10, 8)
    logits = layer.router(x)[1]
    g = {"identity": logits, "sigmoid": torch.sigmoid(logits), "softmax": torch.softmax(logits, -1)}[gating]
    plan = layer.route(g.view(1, 10, 4))
    assert torch.allclose(plan.sorted_gate, g[plan.sorted_token, plan.sorted_expert])
    assert torch.equal(plan.mask(), select(g.detach().view(1, 10, 4), "token", 2).view(10, 4))


def test_aux_losses_reach_router_and_plr_reaches_first_block():
    model = tiny_model(plr_weight=1e-2, rsl_weight=1e-4, balance_weight=1e-2)
    model.train()
    x, t, y = batch()
    target = torch.randn_like(x)
    for term in ("rsl", "balance", "plr"):
        model.zero_grad()
        aux = ForwardAux()
        model(x, t, y, aux)
        losses = aux_losses(aux, model.patchify(target), model.arch.moe)
        assert set(losses) == {"plr", "rsl", "balance"}
        losses[term].backward()
        if term in ("rsl", "balance"):
            assert all(b.mlp.router.gate.weight.grad.abs().sum() > 0 for b in model.blocks)
            for b in model.blocks:  # these losses read only the router logits, never the experts
                assert b.mlp.w1.grad is None or b.mlp.w1.grad.abs().sum() == 0
    # PLR of the second layer flows through block 0 (no stop-gradient) into the embeddings.
    assert model.blocks[0].adaLN_modulation[-1].weight.grad.abs().sum() > 0
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].mlp.router.trunk.weight.grad.abs().sum() > 0


def test_aux_records_and_eval_has_no_plr():
    model = tiny_model(plr_weight=1e-2)
    x, t, y = batch(B=3)
    aux = ForwardAux()
    model.train()
    model(x, t, y, aux)
    assert [r.layer for r in aux.layers] == [0, 1]
    r = aux.layers[0]
    assert r.mask.shape == (3, 16, 8) and r.plr_pred.shape == (3, 16, 16) and r.logits.shape == (48, 8)
    assert int(r.mask.sum()) == 3 * 16 * 2
    assert torch.allclose(r.experts_per_sample.mean(), torch.tensor(2.0))
    assert r.tau == model.blocks[0].mlp.threshold.tau  # a copy of the threshold after this forward
    assert torch.equal(aux.t, t)
    model.eval()
    aux = ForwardAux()
    with torch.no_grad():
        model(x, t, y, aux)
    assert all(r.plr_pred is None for r in aux.layers)
    assert all(b.mlp.eval_uses_threshold() for b in model.blocks)  # eval routes score >= tau
    token = tiny_model(router="token")
    aux = ForwardAux()
    token(x, t, y, aux)
    assert all(r.tau is None for r in aux.layers)  # only the expert race has a threshold


def test_accounting_flops_inactive_training_only():
    cfg = MoEConfig(num_experts=8, k=2, plr_weight=1e-2)
    layer = MoEFeedForward(64, 256, cfg, 0, 16)
    D, H, E, k = 64, 128, 8, 2
    assert layer.w1.shape == (E, D, H) and layer.w2.shape == (E, H, D)
    assert layer.flops(10) == 10 * (D * D + D * E + 2 * k * D * H)  # experts equal one dense MLP: 2*D*4D
    assert 2 * k * D * H == 2 * D * 256
    expert_params = E * (2 * D * H + H + D)
    assert layer.inactive_params() == expert_params * (E - k) // E
    assert layer.training_only_params() == D * 16 + 16
    no_plr = MoEConfig(num_experts=8, k=2, plr_weight=0.0)  # PLR switched off: no target head is built
    assert MoEFeedForward(64, 256, no_plr, 0, 16).training_only_params() == 0
    assert layer.no_weight_decay() == {"b1", "b2"}


@pytest.mark.parametrize(
    "size,total,activated",
    [("B", 0.531, 0.135), ("M", 1.106, 0.281), ("L", 1.889, 0.479), ("XL", 2.788, 0.707)],
)
def test_zoo_block_counts_match_paper(size, total, activated):
    """docs/spec/race-dit.md section 7: 4-in-32 block parameters (routers included, PLR head excluded) within 0.5%."""
    with torch.device("meta"):
        model = build_model(f"RaceDiT-{size}/2-4in32", moe={"plr_weight": 1e-2})
    c = model.param_counts()
    assert abs(c["block_params_total"] / 1e9 / total - 1) < 0.005
    assert abs(c["block_params_activated"] / 1e9 / activated - 1) < 0.005
    assert c["training_only_params"] > 0


def test_ablation_default_size_without_routers():
    with torch.device("meta"):
        model = build_model("RaceDiT-B/2-2in8")
    routers = sum(p.numel() for n, p in model.blocks.named_parameters() if ".router." in n)
    assert abs((model.param_counts()["block_params_total"] - routers) / 1e9 / 0.297 - 1) < 0.005


@pytest.mark.parametrize("router", ["race", "token", "expert", "bl", "be", "le"])
@pytest.mark.parametrize("gating", ["identity", "softmax"])
def test_every_baseline_runs_in_the_model(router, gating):
    """Inside the model each MoE layer routes with the configured router and gating: its output (captured in a
    training forward) equals every expert on every token masked by ``select`` of that router on the gated
    scores, and the loss reaches the experts and the router."""
    model = tiny_model(router=router, gating=gating)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # open adaLN-Zero's gates, so that the loss reaches the MoE layers
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    layer = model.blocks[1].mlp
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    x, t, y = batch(B=2)
    out = model(x, t, y)
    hook.remove()
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    out.sum().backward()
    assert layer.w1.grad is not None and layer.router.gate.weight.grad.abs().sum() > 0
    (h, got), (B, L, D) = seen[0], seen[0][0].shape
    with torch.no_grad():
        logits = layer.router(h.reshape(B * L, D))[1]
        scores = {"identity": logits, "softmax": torch.softmax(logits, -1)}[gating]
        mask = select(scores.view(B, L, -1), router, 2).view(B * L, -1)
        want = dense_masked_moe(
            h.reshape(B * L, D), mask.float(), scores, layer.w1, layer.b1, layer.w2, layer.b2
        )
    # float32, the same products summed in another order (einsum over all experts against per-expert GEMMs)
    torch.testing.assert_close(got.view(B * L, D), want, rtol=1e-5, atol=1e-5)


def test_router_scores_are_float32_under_bf16_autocast_so_the_race_cut_does_not_tie():
    """Under bf16 autocast the gating head runs in float32. In bf16 the same logits tie 57 scores at the race's
    cut here (8 significant bits over 65536 scores), broken by flat index, i.e. by position in the batch. In
    float32 a tie at the cut needs two sums of 64 products to agree in 24 bits: expected far below one other
    score; allow 2 (a coincidence), against dozens."""
    torch.manual_seed(0)
    layer = MoEFeedForward(64, 256, MoEConfig(num_experts=32, k=4), 0, 16).train()
    h = torch.randn(4, 512, 64, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, logits = layer.router(h.view(-1, 64))
        y = layer(h)
    assert u.dtype == torch.bfloat16 and logits.dtype == torch.float32  # the trunk stays in bf16
    assert y.dtype == torch.bfloat16  # the experts follow autocast
    flat = logits.detach().reshape(-1)
    kth = torch.topk(flat, 4 * 2048).values.min()
    assert int((flat == kth).sum()) <= 3


def test_threshold_stays_float32_when_the_model_is_cast():
    layer = MoEFeedForward(16, 64, MoEConfig(num_experts=4, k=2), 0, 4)
    layer.threshold.update(torch.tensor(0.123456789))
    tau = layer.threshold.tau.clone()
    layer = layer.to(torch.bfloat16)
    assert layer.w1.dtype == torch.bfloat16 and layer.threshold.tau.dtype == torch.float32
    assert torch.equal(layer.threshold.tau, tau) and layer.threshold.updates.dtype == torch.long


def test_threshold_is_persistent_state():
    model = tiny_model()
    x, t, y = batch()
    model.train()
    model(x, t, y)
    sd = model.state_dict()
    assert "blocks.0.mlp.threshold.tau" in sd and int(sd["blocks.0.mlp.threshold.updates"]) == 1
    other = tiny_model()
    assert int(other.blocks[0].mlp.threshold.updates) == 0
    other.load_state_dict(sd)
    assert other.blocks[1].mlp.threshold.tau == model.blocks[1].mlp.threshold.tau
    assert int(other.blocks[1].mlp.threshold.updates) == 1


def test_save_and_load_restore_threshold(tmp_path):
    from racedit.models.dit import DiT

    model = tiny_model()
    model.train()
    model(*batch())
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = DiT.from_pretrained(tmp_path)
    for a, b in zip(model.blocks, loaded.blocks):
        assert a.mlp.threshold.tau == b.mlp.threshold.tau and int(b.mlp.threshold.updates) == 1


def test_gradient_checkpointing_updates_tau_once_and_records_once():
    model = tiny_model()
    model.enable_gradient_checkpointing()
    model.train()
    aux = ForwardAux()
    model(*batch(), aux).square().mean().backward()
    assert len(aux.layers) == 2  # the recomputation in backward adds no records
    assert [int(b.mlp.threshold.updates) for b in model.blocks] == [1, 1]
    assert model.blocks[0].mlp.w1.grad is not None


def test_every_nth_block_is_moe():
    torch.manual_seed(0)
    model = build_model("RaceDiT-B/2-2in8", **TINY, moe={"every": 2})
    assert [type(b.mlp).__name__ for b in model.blocks] == ["Mlp", "MoEFeedForward"]
    aux = ForwardAux()
    model(*batch(B=2), aux)
    assert [r.layer for r in aux.layers] == [1]


@pytest.mark.parametrize("impl", ["auto", "torch", "grouped_mm"])
def test_layer_strategy_is_bound_from_the_config(impl):
    """The layer's strategy carries the config's k, ties, scope and routing kernels; impl="grouped_mm"
    (torch._grouped_mm expert GEMMs, no routing kernel) routes with "auto", the others with themselves."""
    cfg = MoEConfig(num_experts=4, k=2, ties="all", race_scope="global", impl=impl)
    strategy = MoEFeedForward(8, 32, cfg, 0, 4).strategy
    assert (strategy.name, strategy.k, strategy.ties, strategy.scope) == ("race", 2, "all", "global")
    assert strategy.impl == ("auto" if impl == "grouped_mm" else impl) == cfg.routing_impl


def test_config_routers_are_the_routing_strategies():
    """MoEConfig.router's choices and the routing registry name the same strategies."""
    from typing import get_args

    from racedit.moe.config import Router
    from racedit.routing import STRATEGIES

    assert set(get_args(Router)) == set(STRATEGIES)
