"""The hyper-connection paper's init of the sublayer outputs: the std of each output projection's initial
weights is multiplied by sqrt(n) (docs/design.md, "Connections: layout, fast paths, and the hyper-connection
init"). In a DiT block the output projections are the attention ``proj`` and the MLP's ``fc2`` (every
expert's ``w2`` in a Race-DiT block); the adaLN-Zero gates stay zero, so the network still starts as the
residual DiT, exactly."""

from __future__ import annotations

import math

import pytest
import torch

import racedit

TINY = dict(input_size=8, num_classes=10, hidden_size=32, depth=2, num_heads=2)
OUTPUTS = ("attn.proj.weight", "mlp.fc2.weight", "mlp.w2")


def _build(name: str, **connection) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # static HC draws nothing at init, so both models see the same random stream
    model = racedit.build_model(name, **TINY, **({"connection": connection} if connection else {}))
    return model.state_dict()


@pytest.mark.parametrize("base,rate", [("DiT-S/2", 2), ("DiT-S/2", 4), ("RaceDiT-S/2-2in8", 4)])
def test_hc_output_projections_start_sqrt_n_wider(base: str, rate: int) -> None:
    residual = _build(base)
    hc = _build(f"{base}-HCx{rate}")
    scaled = 0
    for name, value in residual.items():
        if name.endswith(OUTPUTS) and name.startswith("blocks."):
            # one multiplication in float32 on both sides: bitwise equal
            assert torch.equal(hc[name], value * math.sqrt(rate)), name
            scaled += 1
        else:
            assert torch.equal(hc[name], value), name  # everything else untouched
    assert scaled == 2 * TINY["depth"]
    # the std of the initial weights grows by sqrt(n) (well within sampling noise at these sizes)
    w0, w1 = residual["blocks.0.attn.proj.weight"], hc["blocks.0.attn.proj.weight"]
    # the same numbers times sqrt(n): float32 rounding of the products and of std's sums (~1e-7 relative)
    assert w1.std().item() == pytest.approx(math.sqrt(rate) * w0.std().item(), rel=1e-5)


def test_scaling_can_be_switched_off_and_other_connections_keep_dit_init() -> None:
    residual = _build("DiT-S/2")
    off = _build("DiT-S/2-HCx4", scale_output_init=False)  # the name states the connection, a key refines it
    assert all(torch.equal(off[k], v) for k, v in residual.items())
    fc = _build("DiT-S/2-FCx4")  # static FC draws nothing at init either
    assert all(torch.equal(fc[k], v) for k, v in residual.items())
    mhc = racedit.build_model("DiT-S/2-mHCx2", **TINY)  # its projections draw: compare the rule, not values
    assert all(b.conn_attn.output_init_gain == b.conn_mlp.output_init_gain == 1.0 for b in mhc.blocks)


def test_hc_dit_still_starts_as_the_residual_dit() -> None:
    """The gates are zero at init, so the wider output projections change nothing until they open."""
    torch.manual_seed(0)
    residual = racedit.build_model("DiT-S/2", **TINY).eval()
    torch.manual_seed(0)
    hc = racedit.build_model("DiT-S/2-HCx4", **TINY).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 3])
    assert torch.equal(hc(x, t, y), residual(x, t, y))
