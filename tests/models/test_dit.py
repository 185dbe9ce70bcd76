"""The dense DiT backbone: shapes, adaLN-Zero init, official layout, save/load, zoo numbers."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import racedit
from racedit.models import CheckpointError, infer_config
from racedit.models.registry import PATCHES, SIZES
from racedit.models.zoo import describe


def tiny(**kw):
    cfg = dict(input_size=8, num_classes=10, hidden_size=64, depth=2, num_heads=4)
    cfg.update(kw)
    return racedit.build_model("DiT-S/2", **cfg)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (including the zero-initialised adaLN and final layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("patch", PATCHES)
def test_every_size_and_patch_has_the_right_shapes(size, patch):
    depth, width, heads = SIZES[size]
    with torch.device("meta"):  # shape propagation only: the XL models would not fit a CI budget otherwise
        model = racedit.build_model(f"DiT-{size}/{patch}")
        x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([1.0, 999.0]), torch.tensor([3, 1000])
        out = model(x, t, y)
    assert out.shape == (2, 8, 32, 32)
    assert len(model.blocks) == depth and model.pos_embed.shape == (1, (32 // patch) ** 2, width)
    assert model.blocks[0].attn.num_heads == heads


@pytest.mark.parametrize("learn_sigma,channels", [(True, 4), (False, 4), (True, 3), (False, 1)])
def test_forward_shapes_any_channels_and_learn_sigma(learn_sigma, channels):
    model = racedit.build_model(
        "DiT-S/4", learn_sigma=learn_sigma, in_channels=channels, input_size=16, num_classes=10,
        hidden_size=64, depth=2, num_heads=4,
    )  # fmt: skip
    out = model(torch.randn(3, channels, 16, 16), torch.tensor([0, 10, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == (3, channels * (2 if learn_sigma else 1), 16, 16)


def test_adaln_zero_init_makes_every_block_the_identity_and_the_output_zero():
    model = tiny()
    x = torch.randn(2, 64 // 4, 64)  # (B, L, D)
    c = torch.randn(2, 64)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_label_dropout_uses_the_null_class_and_is_off_in_eval():
    model = tiny(class_dropout_prob=1.0)
    model.train()
    emb = model.y_embedder(torch.tensor([0, 1, 2]), train=True)
    null = model.y_embedder.embedding_table.weight[10]
    assert torch.equal(emb, null.expand(3, -1))
    assert not torch.equal(model.y_embedder(torch.tensor([0]), train=False)[0], null)
    assert model.y_embedder.embedding_table.num_embeddings == 11  # num_classes is a parameter, + null row


def test_patchify_inverts_unpatchify():
    model = tiny(learn_sigma=False)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_pos_embed_is_the_2d_sincos_table():
    model = tiny(hidden_size=8, num_heads=2, input_size=4, patch_size=2)  # 2x2 grid, D=8
    pe = model.pos_embed[0]  # (4, 8): [sin(h w_i), cos(h w_i)] then the same for the column
    omega = 1.0 / 10000 ** (torch.arange(2) / 2.0)
    for idx, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expect_h = torch.cat([torch.sin(row * omega), torch.cos(row * omega)])
        expect_w = torch.cat([torch.sin(col * omega), torch.cos(col * omega)])
        # DiT's meshgrid puts the column coordinate in the first half
        torch.testing.assert_close(pe[idx], torch.cat([expect_w, expect_h]).float())


# ----------------------------------------------------------------------- official layout


def official_state_dict(depth=2, D=64, p=2, C=4, classes=10, grid=4, learn_sigma=True, seed=0):
    """A state dict with facebookresearch/DiT's key names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    out_c = 2 * C if learn_sigma else C
    sd = {
        "pos_embed": r(1, grid * grid, D),
        "x_embedder.proj.weight": r(D, C, p, p),
        "x_embedder.proj.bias": r(D),
        "t_embedder.mlp.0.weight": r(D, 256),
        "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D),
        "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(classes + 1, D),
        "final_layer.linear.weight": r(p * p * out_c, D),
        "final_layer.linear.bias": r(p * p * out_c),
        "final_layer.adaLN_modulation.1.weight": r(2 * D, D),
        "final_layer.adaLN_modulation.1.bias": r(2 * D),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "attn.qkv.weight": r(3 * D, D),
            b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D),
            b + "attn.proj.bias": r(D),
            b + "mlp.fc1.weight": r(4 * D, D),
            b + "mlp.fc1.bias": r(4 * D),
            b + "mlp.fc2.weight": r(D, 4 * D),
            b + "mlp.fc2.bias": r(D),
            b + "adaLN_modulation.1.weight": r(6 * D, D),
            b + "adaLN_modulation.1.bias": r(6 * D),
        }
    return sd


def functional_dit(sd, x, t, y, heads, p):
    """An independent, purely functional DiT forward over an official-layout state dict."""
    B, C, H, W = x.shape
    D = sd["x_embedder.proj.weight"].shape[0]
    lin = lambda h, k: h @ sd[k + ".weight"].T + sd[k + ".bias"]
    ln = lambda h: F.layer_norm(h, (D,), eps=1e-6)
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t[:, None].float() * freqs
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = (
        lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
        + sd["y_embedder.embedding_table.weight"][y]
    )
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        mod = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = ln(h) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1) @ v
        h = h + mod[2][:, None] * lin(att.transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        m = ln(h) * (1 + mod[4][:, None]) + mod[3][:, None]
        h = h + mod[5][:, None] * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    out_c = h.shape[-1] // (p * p)
    g = H // p
    return h.reshape(B, g, g, p, p, out_c).permute(0, 5, 1, 3, 2, 4).reshape(B, out_c, H, W)


def test_official_layout_loads_infers_the_size_and_matches_a_functional_forward(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(sd, path)
    model = racedit.load_model(path)
    cfg = model.arch
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.input_size, cfg.num_classes) == (2, 64, 2, 8, 10)
    assert cfg.learn_sigma and cfg.in_channels == 4
    assert model.state_dict().keys() == sd.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 17, 999]), torch.tensor([0, 9, 10])
    with torch.no_grad():
        ours = model(x, t, y)
        ref = functional_dit(sd, x, t, y, heads=cfg.num_heads, p=2)
    assert (ours - ref).abs().max() <= 1e-5


def test_official_training_checkpoint_with_args_namespace_loads_the_ema(tmp_path):
    import argparse

    sd = official_state_dict(seed=3)
    torch.save(
        {"model": official_state_dict(seed=4), "ema": sd, "args": argparse.Namespace(lr=1e-4)},
        tmp_path / "c.pt",
    )
    model = racedit.load_model(tmp_path / "c.pt")
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])


def test_heads_inferred_from_known_widths():
    sd = official_state_dict(D=1152, depth=1, grid=2)
    assert infer_config(sd).num_heads == 16
    sd = official_state_dict(D=384, depth=1, grid=2)
    assert infer_config(sd).num_heads == 6


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_bearing_file_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "evil": _Evil()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        racedit.load_model(path)
    with open(tmp_path / "raw.pt", "wb") as fh:
        pickle.dump(_Evil(), fh)
    with pytest.raises(CheckpointError):
        racedit.load_model(tmp_path / "raw.pt")


def test_unknown_file_names_what_was_expected(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="facebookresearch/DiT"):
        racedit.load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="DiT-XL-2-256x256.pt"):
        racedit.load_model(tmp_path / "missing.pt")


def test_save_pretrained_round_trip_is_bitwise(tmp_path):
    model = tiny()
    randomize_(model)
    racedit.save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    loaded = racedit.load_model(tmp_path / "m")
    assert loaded.arch == model.arch
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.tensor([1, 2])
    model.eval()
    assert torch.equal(model(x, t, y), loaded(x, t, y))
    racedit.save_model(model, tmp_path / "m")  # overwriting an existing export is atomic too
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_weight_decay_groups_exclude_biases_and_the_frozen_pos_embed():
    model = tiny()
    groups = model.optimizer_param_groups(0.05)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    names = {n for n, p in model.named_parameters() if id(p) in decay}
    assert "blocks.0.attn.qkv.weight" in names and "blocks.0.attn.qkv.bias" not in names
    assert all(p is not model.pos_embed for g in groups for p in g["params"])


# ----------------------------------------------------------------------------- zoo


def test_zoo_reproduces_the_dit_paper_numbers():
    xl = describe("DiT-XL/2")
    assert round(xl["params_total"] / 1e6) == 675
    assert round(xl["gflops"], 1) == 118.6
    assert round(describe("DiT-B/2")["gflops"], 1) == 23.0  # DiT paper: 23.01
    assert (
        round(describe("DiT-XL/2")["block_params_total"] / 1e9, 3) == 0.669
    )  # docs/spec/race-dit.md section 7


def test_zoo_json_has_the_documented_keys(capsys):
    from racedit.cli.models import main

    assert main(["--json", "--filter", "^DiT-S/8$"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "DiT-S/8"
    assert {"name", "block_params_total", "block_params_activated", "params_total"} <= set(rows[0])
