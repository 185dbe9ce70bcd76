"""The learnable threshold of expert race: EMA rule, short training, train/eval agreement, global batch."""

import math
import os
import sys

import pytest
import torch

from racedit.interfaces import ForwardAux
from racedit.models.loading import build_model
from racedit.moe import MoEConfig, MoEFeedForward
from racedit.moe.threshold import Threshold
from racedit.routing.distributed import radix_kth

TINY = dict(input_size=8, num_classes=10, hidden_size=64, depth=2, num_heads=2, class_dropout_prob=0.0)


def test_ema_rule_first_step_sets_tau():
    th = Threshold(decay=0.9)
    th.update(torch.tensor(2.0))
    assert th.tau.item() == 2.0 and th.initialized
    th.update(torch.tensor(1.0))
    assert math.isclose(th.tau.item(), 0.9 * 2.0 + 0.1 * 1.0, rel_tol=1e-6)
    assert int(th.updates) == 2


def test_layer_updates_tau_in_training_only():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 32, MoEConfig(num_experts=4, k=2, threshold_decay=0.5), 0, 4)
    h = torch.randn(2, 5, 8)
    layer(h)
    scores = layer.router(h.view(10, 8))[1].detach()
    kth1 = torch.sort(scores.reshape(-1), descending=True).values[2 * 10 - 1]
    assert torch.allclose(layer.threshold.tau, kth1)
    layer.eval()
    layer(h)
    assert int(layer.threshold.updates) == 1


def ddpm_batch(x0, y, g):
    """A minimal epsilon-prediction DDPM batch (linear betas), enough to train a router."""
    B = x0.shape[0]
    betas = torch.linspace(1e-4, 0.02, 1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.randint(0, 1000, (B,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a = alpha_bar[t].view(B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise


def test_short_training_eval_spends_k_experts_per_token():
    """Train briefly (a fast phase, then a low-lr phase in which the router settles and the EMA catches
    up, as at the end of a real schedule); eval-mode ``score >= tau`` then spends ~k experts per token."""
    torch.manual_seed(0)
    model = build_model("RaceDiT-B/2-2in8", **{**TINY, "hidden_size": 32}, learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(64, 4, 8, 8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    steps = 60
    for step in range(steps):
        if step == 20:
            opt.param_groups[0]["lr"] = 1e-5
        idx = torch.randint(0, 64, (16,), generator=g)
        xt, t, noise = ddpm_batch(data[idx], labels[idx], g)
        loss = (model(xt, t, labels[idx]) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(int(b.mlp.threshold.updates) == steps for b in model.blocks)
    model.eval()
    per_layer = torch.zeros(2)
    with torch.no_grad():
        for _ in range(8):
            idx = torch.randint(0, 64, (16,), generator=g)
            xt, t, _ = ddpm_batch(data[idx], labels[idx], g)
            aux = ForwardAux()
            model(xt, t, labels[idx], aux)
            assert all(b.mlp.eval_uses_threshold() for b in model.blocks)
            per_layer += torch.stack([r.experts_per_sample.mean() for r in aux.layers]) / 8
    assert ((per_layer - 2).abs() / 2 < 0.10).all(), f"eval experts per token {per_layer.tolist()}, k = 2"


@pytest.mark.parametrize("eval_routing", ["threshold", "topk"])
def test_tau_at_batch_kth_gives_train_eval_agreement(eval_routing):
    torch.manual_seed(0)
    model = build_model("RaceDiT-B/2-2in8", **TINY, moe={"eval_routing": eval_routing})
    for p in model.parameters():  # make every block active (adaLN-Zero starts them as identity)
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    model.train()
    aux = ForwardAux()
    with torch.no_grad():
        out_train = model(x, t, y, aux)  # the first update sets tau = this batch's K-th value exactly
    for block, record in zip(model.blocks, aux.layers):
        scores = record.logits.reshape(-1)  # identity gating: the routing scores are the logits
        assert block.mlp.threshold.tau == torch.sort(scores, descending=True).values[2 * 4 * 16 - 1]
    model.eval()
    aux_eval = ForwardAux()
    with torch.no_grad():
        out_eval = model(x, t, y, aux_eval)
    torch.testing.assert_close(out_eval, out_train)
    for a, b, block in zip(aux.layers, aux_eval.layers, model.blocks):
        assert torch.equal(a.mask, b.mask)
        assert block.mlp.eval_uses_threshold() == (eval_routing == "threshold")


def test_uninitialised_threshold_falls_back_to_topk():
    layer = MoEFeedForward(8, 32, MoEConfig(num_experts=4, k=2), 0, 4).eval()
    aux = ForwardAux()
    layer(torch.randn(2, 5, 8), aux)
    assert not layer.eval_uses_threshold() and int(aux.layers[0].mask.sum()) == 20


def _ddp_layer_and_input(rank: int):
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 32, MoEConfig(num_experts=4, k=2), 0, 4)
    return layer, torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(10 + rank))


def _ddp_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    scores = torch.arange(12.0).view(6, 2) + 100 * rank  # rank 1 holds all the large scores
    kth = radix_kth(scores, k_per_token=1)  # K = 1 * 12 global tokens -> 12th largest of 24
    from racedit.moe.losses import balance_loss, router_similarity_loss

    g = torch.Generator().manual_seed(rank)
    logits = torch.randn(6, 3, generator=g)
    mask = torch.rand(6, 3, generator=g) > 0.5
    layer, h = _ddp_layer_and_input(rank)
    layer(h)  # training forward: tau <- T_K of both ranks' scores together
    rsl, bal = float(router_similarity_loss(logits, mask)), float(balance_loss(logits, mask))
    queue.put((rank, float(kth), rsl, bal, float(layer.threshold.tau)))
    dist.destroy_process_group()


def test_threshold_and_rsl_use_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    from racedit.moe.losses import balance_loss, router_similarity_loss

    queue = mp.get_context("fork").SimpleQueue()  # fork: no re-import of torch in the workers (CPU only)
    init_file = os.path.join(tmp_path, "init")
    mp.start_processes(_ddp_worker, args=(2, init_file, queue), nprocs=2, join=True, start_method="fork")
    results = sorted(queue.get() for _ in range(2))
    all_scores = torch.cat([torch.arange(12.0) + 100 * r for r in range(2)])
    want = torch.sort(all_scores, descending=True).values[11]
    assert all(r[1] == float(want) for r in results)  # both ranks see the global T_K (100.0)
    # Average of the per-rank losses equals the loss of the concatenated global batch.
    logits, masks = [], []
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        logits.append(torch.randn(6, 3, generator=g))
        masks.append(torch.rand(6, 3, generator=g) > 0.5)
    L, Mk = torch.cat(logits), torch.cat(masks)
    assert math.isclose(sum(r[2] for r in results) / 2, float(router_similarity_loss(L, Mk)), rel_tol=1e-5)
    assert math.isclose(sum(r[3] for r in results) / 2, float(balance_loss(L, Mk)), rel_tol=1e-5)
    # The layer's tau on every rank is the K-th value of the union of both ranks' scores (K = 2 * 12).
    scores = []
    for rank in range(2):
        layer, h = _ddp_layer_and_input(rank)
        scores.append(layer.router(h.view(6, 8))[1].detach())
    want_tau = torch.sort(torch.cat(scores).reshape(-1), descending=True).values[2 * 12 - 1]
    assert all(math.isclose(r[4], float(want_tau), rel_tol=1e-6) for r in results)
    local_tau = torch.sort(scores[0].reshape(-1), descending=True).values[2 * 6 - 1]
    assert not math.isclose(float(local_tau), float(want_tau))  # the check can tell local from global


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
