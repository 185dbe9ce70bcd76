"""``train.compile=true``: one tiny training step of the compiled model equals the eager step, for the dense
DiT, Race-DiT and every connection kind (their fast paths included). The dense model goes through the
default backend (inductor: generated C++ on CPU); the others through ``aot_eager``, which runs the same
graph capture, AOTAutograd and functionalisation that inductor consumes, at a fraction of the compile time.
Each compile takes tens of seconds on 2 loaded cores, hence ``slow``."""

from __future__ import annotations

import pytest
import torch

import racedit
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.models import ForwardAux
from racedit.moe.losses import aux_losses

TINY = dict(input_size=8, num_classes=10, hidden_size=32, depth=1, num_heads=2, in_channels=4)

CASES = [  # (registry name, backend, overrides)
    ("DiT-S/2", "inductor", {}),
    ("RaceDiT-S/2-2in8-HCx2", "aot_eager", {}),  # Race-DiT routing + static HC's stream-major GEMMs
    ("DiT-S/2-DHCx2", "aot_eager", {}),  # batched per-token mixes + coefficients recomputed in backward
    ("RaceDiT-S/2-2in8-FCx4", "aot_eager", {}),
    ("DiT-S/2-DFCx2", "aot_eager", {}),
    ("DiT-S/2-mHCx2", "aot_eager", {"connection": {"kind": "mhc", "rate": 2, "sinkhorn_iters": 3}}),
]


def _loss(model, objective, compiled) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x0, y = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    torch.manual_seed(5)  # label dropout draws from the global RNG
    aux = ForwardAux()
    out = objective.training_loss(compiled, x0, y, aux=aux, generator=torch.Generator().manual_seed(7))
    loss = out.loss
    if model.arch.moe is not None:
        loss = loss + sum(aux_losses(aux, model.patchify(out.target), model.arch.moe).values())
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("name,backend,overrides", CASES, ids=[c[0] for c in CASES])
def test_compiled_training_step_matches_eager(name: str, backend: str, overrides: dict) -> None:
    torch.manual_seed(0)
    model = racedit.build_model(name, **TINY, **overrides).train()
    objective = build_objective(DiffusionConfig(objective="flow"), learn_sigma=model.arch.learn_sigma)
    eager = _loss(model, objective, model)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = _loss(model, objective, torch.compile(model, backend=backend))
    compiled.backward()
    # Same float32 math; inductor fuses and reorders sums: a few ulps (~1e-7 relative) per op over the
    # ~10^2 ops of a depth-1 forward and backward, ~1e-5 relative at most (aot_eager: the same kernels).
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_compiled_race_dit_compiles_once_whatever_its_depth_and_routing() -> None:
    """Six MoE layers under a recompile limit of 3 that fails when hit: per-layer guards (a routing record's
    list length, a layer index) or guards on the data (an expert left with 0 or 1 tokens) would recompile the
    layer's frames once per layer or per routing pattern, and past dynamo's limit (8 by default; RaceDiT-XL/2
    has 28 layers) the rest of every deeper layer would run eagerly. Three steps on different batches."""
    torch._dynamo.reset()  # the limit counts per code object: forget other tests' compiles of the same code
    torch.manual_seed(0)
    model = racedit.build_model("RaceDiT-S/2-2in8", **{**TINY, "depth": 6}).train()
    objective = build_objective(DiffusionConfig(objective="flow"), learn_sigma=model.arch.learn_sigma)
    compiled = torch.compile(model, backend="aot_eager")
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x0, y = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
            aux = ForwardAux()
            out = objective.training_loss(compiled, x0, y, aux=aux, generator=g)
            loss = out.loss + sum(aux_losses(aux, model.patchify(out.target), model.arch.moe).values())
            loss.backward()
            assert len(aux.layers) == 6  # every layer's record reached the caller
