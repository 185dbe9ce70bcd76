"""Per-step bookkeeping on a GPU without host synchronisation (skipped without CUDA; see tests/conftest.py).

After every micro-batch the trainer adds the routing records to ``RoutingStats`` and, after every step, updates
the EMA model, thresholds included. A host sync there (``.cpu()``, ``float()``, ``int()`` of a device tensor)
stops the CPU from queueing the next kernels, once per MoE layer."""

from __future__ import annotations

import pytest
import torch

import racedit
from racedit.models import ForwardAux
from racedit.moe import RoutingStats
from racedit.training.ema import EMA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_routing_stats_and_ema_updates_do_not_synchronise():
    model = racedit.build_model(
        "RaceDiT-S/2-2in8", input_size=8, num_classes=10, hidden_size=64, depth=2, num_heads=2
    ).cuda()
    ema = EMA(model, decay=0.99)
    stats = RoutingStats()
    x = torch.randn(4, 4, 8, 8, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    for step in range(2):  # the first EMA update takes the threshold, the second averages it
        aux = ForwardAux()
        with torch.no_grad():
            model(x, t, y, aux=aux)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats.update(aux)
            ema.update(model, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    scalars = stats.compute()
    assert scalars["moe/experts_per_token"] == pytest.approx(
        2.0
    )  # the race routes k = 2 per token on average
    ema_tau = [m.threshold.tau for m in ema.model.modules() if hasattr(m, "threshold")]
    assert all(float(tau) != 0.0 for tau in ema_tau)
