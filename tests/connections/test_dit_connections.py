"""Connections inside (Race-)DiT: equality with the residual DiT at init, learning, save/load,
official-DiT initialisation, weight-decay groups, Race-DiT blocks (docs/spec/connections.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import racedit
from racedit.connections import Connection, FracConnection, HyperConnection, ManifoldHyperConnection
from racedit.connections.config import ConnectionConfig
from racedit.models import ForwardAux
from racedit.models.dit import DiT

TINY = dict(input_size=8, num_classes=10, hidden_size=32, depth=2, num_heads=2)

# Every variant docs/spec/connections.md names ("Properties the tests pin down"): HC n in {1, 2, 4} and
# FC m in {1, 2, 4}, static and dynamic; mHC.
VARIANTS = {
    **{
        f"{'D' if d else ''}HCx{n}": dict(kind="hc", rate=n, dynamic=d)
        for n in (1, 2, 4)
        for d in (False, True)
    },
    **{
        f"{'D' if d else ''}FCx{m}": dict(kind="fc", rate=m, dynamic=d)
        for m in (1, 2, 4)
        for d in (False, True)
    },
    "DHCx2-notanh": dict(kind="hc", rate=2, dynamic=True, tanh=False),
    "mHCx2": dict(kind="mhc", rate=2),
    "mHCx4": dict(kind="mhc", rate=4),
}
CONN_KEY = re.compile(r"(^stream\.|\.conn_attn\.|\.conn_mlp\.)")


def _randomize_adaln(model: DiT, seed: int = 0) -> None:
    """Overwrite the adaLN-Zero parts (every block's and the final layer's modulation, the final linear)
    with random non-zero values, so every gate is non-zero and the output is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _variant_like(reference: DiT, connection: dict, name: str = "DiT-S/2", **kw) -> DiT:
    """A model with ``connection`` sharing every weight of ``reference``; its connections at init."""
    suffix = ConnectionConfig(**connection).suffix  # the name states the connection the keys refine
    model = racedit.build_model(
        f"{name}-{suffix}" if suffix else name, connection=connection, **{**TINY, **kw}
    )
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(CONN_KEY.search(k) for k in result.missing_keys), result.missing_keys
    return model


def _inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 11, (batch,), generator=g)  # 10 = the null class
    return x, t, y


def _connections(model: DiT) -> list[tuple[str, Connection]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Connection)]


@pytest.fixture(scope="module")
def residual() -> DiT:
    torch.manual_seed(0)
    model = racedit.build_model("DiT-S/2", **TINY)
    _randomize_adaln(model)
    return model.eval()


# ----------------------------------------------------------------------------- equality at init


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_at_init_equals_residual_dit(residual: DiT, variant: str) -> None:
    model = _variant_like(residual, VARIANTS[variant]).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        expected = residual(x, t, y)
        got = model(x, t, y)
    assert expected.abs().mean() > 0.1  # random gates: the blocks really contribute
    if VARIANTS[variant]["kind"] == "mhc":  # sigmoid(logit(p)) rounding, see connections/manifold.py
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # HC (mean collapse) and FC: identical arithmetic, bitwise equal
        assert torch.equal(got, expected)


def test_dynamic_projections_are_zero_after_dit_init() -> None:
    """DiT's init applies xavier to every nn.Linear; the connections' init_weights must re-zero theirs."""
    for conn in (
        dict(kind="hc", rate=2, dynamic=True),
        dict(kind="fc", rate=2, dynamic=True),
        dict(kind="mhc", rate=2),
    ):
        model = racedit.build_model(f"DiT-S/2-{ConnectionConfig(**conn).suffix}", **TINY)
        projs = [p for n, p in model.named_parameters() if n.endswith("proj.weight") and "conn_" in n]
        assert len(projs) == 2 * TINY["depth"]
        assert all(torch.equal(p, torch.zeros_like(p)) for p in projs)


def test_gradient_checkpointing_gives_the_same_gradients(residual: DiT) -> None:
    x, t, y = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = _variant_like(residual, dict(kind="hc", rate=2, dynamic=True)).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.y_embedder.dropout_prob = 0.0
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # the recomputed forward runs the same ops on the same inputs: bitwise
        assert torch.equal(grads[0][name], grads[1][name]), name


# ----------------------------------------------------------------------------- mixed precision

# bf16 keeps 8 significant bits: a relative rounding of 2^-9 per operand of every matrix product under autocast.
# Where two models feed a branch inputs that differ only by float32 rounding (mHC's read), one bf16 rounding in
# ~10^4 may flip, by 2^-8 relative; and gradients summed in another order (HC's streams) flip roundings of the
# bf16 operands of the branch's backward products likewise. Bound: a few flipped roundings (2^-8 each) through a
# two-block net, with margin: 2^-5 of the norm.
BF16_FLIP_RTOL = 2.0**-5


def _stream_dtypes(model: DiT) -> tuple[list[torch.dtype], list]:
    dtypes: list[torch.dtype] = []
    hooks = [b.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for b in model.blocks]
    return dtypes, hooks


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_under_bf16_autocast_keeps_a_float32_stream_and_equals_the_residual_dit(
    residual: DiT, variant: str
) -> None:
    """``mixed_precision: bf16``: the connections' arithmetic stays in the state's float32 (the branch runs in
    bf16), as the residual stream does, so at init the variant is still the residual DiT, forward and backward."""
    model = _variant_like(residual, VARIANTS[variant]).eval()
    x, t, y = _inputs()
    shared = [n for n, p in residual.named_parameters() if p.requires_grad]
    outs, grads = [], []
    for net in (residual, model):
        dtypes, hooks = _stream_dtypes(net)
        params = dict(net.named_parameters())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t, y)
        for h in hooks:
            h.remove()
        assert dtypes == [torch.float32] * TINY["depth"], f"stream dtypes {dtypes}"
        loss = out.float().square().mean()
        grads.append(torch.autograd.grad(loss, [params[n] for n in shared], allow_unused=True))
        outs.append(out)
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16  # the final linear runs under autocast
    if VARIANTS[variant]["kind"] == "mhc":  # its read differs from the stream by float32 rounding
        torch.testing.assert_close(outs[1], outs[0], rtol=BF16_FLIP_RTOL, atol=BF16_FLIP_RTOL)
    else:  # HC and FC at init: the same float32 stream arithmetic, the same branch inputs, bitwise
        assert torch.equal(outs[1], outs[0])
    for name, g_res, g_var in zip(shared, *grads):
        assert (g_res is None) == (g_var is None), name
        if g_res is not None:
            assert g_var.dtype == torch.float32, name
            err = (g_var - g_res).norm() / g_res.norm().clamp(min=1e-30)
            assert err <= BF16_FLIP_RTOL, f"{name}: relative gradient difference {err:.2e}"


# ----------------------------------------------------------------------------- learning


def _train(model: DiT, steps: int, record_grads: bool = False) -> dict[str, float]:
    """A few AdamW steps on a fixed toy regression; returns the largest |grad| seen per parameter."""
    model.train()
    model.y_embedder.dropout_prob = 0.0  # deterministic labels
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.01), lr=1e-2)
    x, t, y = _inputs(seed=1, batch=4)
    target = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    max_grad: dict[str, float] = {}
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, t, y), target).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                max_grad[n] = max(max_grad.get(n, 0.0), p.grad.abs().max().item())
        opt.step()
    return max_grad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_diverges_from_residual_after_a_few_steps(residual: DiT, variant: str) -> None:
    base = _variant_like(residual, {"kind": "residual"})  # a trainable copy of the residual model
    model = _variant_like(residual, VARIANTS[variant])
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(base, 3)
    max_grad = _train(model, 3)
    conn_params = [n for n in init if CONN_KEY.search(n)]
    assert conn_params
    for n in conn_params:  # every new parameter received a gradient and moved
        assert max_grad[n] > 0, f"{n} never received a gradient"
        if n.endswith(("res_bias", "res_scale")):
            # mHC's H_res is doubly stochastic: it leaves equal streams equal, so while the streams are
            # (nearly) equal its gradient is (nearly) zero: ~1e-16 after 3 steps, below what AdamW's eps
            # lets move. test_modules.py checks that H_res does learn once the streams differ.
            continue
        assert not torch.equal(init[n], dict(model.named_parameters())[n]), f"{n} did not change"
    x, t, y = _inputs(seed=3)
    base.eval(), model.eval()
    with torch.no_grad():
        diff = (model(x, t, y) - base(x, t, y)).abs().max().item()
    assert diff > 1e-4, f"{variant} still equals the residual model after training (max diff {diff})"


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_round_trip_is_bitwise(residual: DiT, variant: str, tmp_path: Path) -> None:
    model = _variant_like(residual, VARIANTS[variant])
    with torch.no_grad():  # move the connections off their init so the round trip is not trivial
        for n, p in model.named_parameters():
            if CONN_KEY.search(n):
                p.add_(torch.randn_like(p) * 0.1)
    path = racedit.save_model(model, tmp_path / "model")
    loaded = racedit.load_model(path)
    assert loaded.arch.connection == model.arch.connection
    state, state2 = model.state_dict(), loaded.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    x, t, y = _inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))


@pytest.mark.parametrize("variant", ["HCx2", "DHCx4", "FCx4", "DFCx2", "mHCx4"])
def test_official_dit_weights_initialise_a_connection_dit(
    residual: DiT, variant: str, tmp_path: Path
) -> None:
    """An official-layout DiT state dict (.pt) loaded into an HC/FC/mHC DiT gives the
    residual DiT's outputs before any fine-tuning."""
    state = residual.state_dict()
    assert not any(CONN_KEY.search(k) for k in state)  # the official layout has no connection keys
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state, path)
    plain = racedit.load_model(path, num_heads=TINY["num_heads"])
    model = racedit.load_model(path, num_heads=TINY["num_heads"], connection=VARIANTS[variant])
    assert model.arch.connection.suffix == variant
    for _, conn in _connections(model):  # connection parameters at their identity init (not xavier)
        if isinstance(conn, (HyperConnection, FracConnection)) and conn.dynamic:
            assert torch.equal(conn.dynamic_proj.weight, torch.zeros_like(conn.dynamic_proj.weight))
        if isinstance(conn, ManifoldHyperConnection):
            assert torch.equal(conn.proj.weight, torch.zeros_like(conn.proj.weight))
    x, t, y = _inputs()
    with torch.no_grad():
        expected = residual(x, t, y)
        assert torch.equal(plain(x, t, y), expected)
        got = model(x, t, y)
    if variant.startswith("mHC"):
        # sigmoid(logit(p)) rounds ~1e-7 relative per sublayer (racedit/connections/manifold.py)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_mixing_parameters_are_not_weight_decayed(residual: DiT, variant: str) -> None:
    model = _variant_like(residual, VARIANTS[variant])
    groups = model.optimizer_param_groups(0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(listed) == len(set(listed)) == len(trainable)  # each trainable parameter exactly once
    for name, p in model.named_parameters():
        if not CONN_KEY.search(name):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("proj.weight"):  # the dynamic projections W are ordinary matrices
            assert id(p) in decayed, name
        else:  # static mixing (A_m, A_r, B / Y, A, B / mHC biases) and the scales s
            assert id(p) not in decayed, name
            assert leaf.startswith(("static_", "dynamic_alpha", "dynamic_beta")) or leaf.endswith(
                ("_bias", "_scale")
            ), name
    res_names = [n for n, _ in model.named_parameters() if n.endswith(("static_res", "res_bias"))]
    assert res_names  # the 2-D mixing matrices exist, and the ndim rule alone would have decayed them
    assert all(dict(model.named_parameters())[n].ndim == 2 for n in res_names)


# ----------------------------------------------------------------------------- Race-DiT blocks

RACE_KW = dict(input_size=8, num_classes=10, hidden_size=64, depth=2, num_heads=2)
RACE_SUFFIXES = [v for v in VARIANTS if "-" not in v]  # every registry-nameable variant


@pytest.mark.parametrize("suffix", RACE_SUFFIXES)
def test_race_dit_blocks_shapes_gradients_and_equality(suffix: str) -> None:
    pytest.importorskip("racedit.moe.layer", reason="racedit.moe.MoEFeedForward is not written yet")
    torch.manual_seed(0)
    base = racedit.build_model("RaceDiT-S/2-2in8", **RACE_KW)
    _randomize_adaln(base)
    model = racedit.build_model(f"RaceDiT-S/2-2in8-{suffix}", **RACE_KW)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and all(CONN_KEY.search(k) for k in result.missing_keys)
    assert model.arch.moe is not None and model.arch.connection.suffix == suffix
    for m in (base, model):
        m.train()
        m.y_embedder.dropout_prob = 0.0
    x, t, y = _inputs(batch=2)
    aux_base, aux = ForwardAux(), ForwardAux()
    out_base = base(x, t, y, aux_base)
    out = model(x, t, y, aux)
    assert out.shape == (2, 8, 8, 8)
    assert len(aux.layers) == len(aux_base.layers) == RACE_KW["depth"]  # every block routed through MoE
    # mHC equals the residual only to float32 rounding (~1e-7 relative per sublayer); near a router score tie
    # that could move one token to another expert, so the margin is wider than the dense test's 1e-5
    tol = dict(rtol=1e-4, atol=1e-4) if suffix.startswith("mHC") else dict(rtol=0, atol=0)
    torch.testing.assert_close(out, out_base, **tol)  # same routing, same output at init
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # only parameters that this forward genuinely does not use may lack grads
            assert not CONN_KEY.search(name), f"{name} got no gradient"
            continue
        assert torch.isfinite(p.grad).all(), name
        if CONN_KEY.search(name) and not name.endswith(
            ("_alpha_scale", "_beta_scale", "pre_scale", "post_scale", "res_scale", "res_bias")
        ):
            # the scales s multiply tanh(H W) with W = 0 at init, so their first gradient is exactly 0;
            # mHC's res_bias: a doubly stochastic H_res maps the n equal streams of the init to themselves,
            # so its first gradient is 0 up to rounding (test_modules checks it is non-zero once they differ)
            assert p.grad.abs().sum() > 0, f"{name} has a zero gradient"
