"""diffusers interop: DiTTransformer2DModel / DiTPipeline folders load with diffusers' outputs, exports load
in diffusers and round-trip exactly, and what cannot be converted says so in one line. Every model is a
tiny random one saved into a temporary folder; nothing is downloaded."""

import json
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file

import racedit
from racedit.models import CheckpointError
from racedit.models.diffusers_io import (
    DiffusersExportWarning,
    export_diffusers,
    pipeline_sampling_meta,
    probe_inputs,
)
from racedit.models.dit import TimestepEmbedder
from racedit.testing import tiny_autoencoder

# Tolerance of racedit vs diffusers on the same weights. The two compute the same sums and differ at most in
# the summation order inside matmuls and attention (one fused qkv projection vs three). A reordered sum of K
# terms moves by at most ~K unit roundoffs of its magnitude; the widest sum here is the MLP's K = 4 * 64 and
# a forward chains ~8 such steps per block. So |difference| <= 8 * depth * K * u * max|output|: 2.5e-4
# relative in float32 (u = 6e-8), 4e-13 in float64 (u = 1.1e-16). A wrong map (convention, eps, key order)
# moves outputs by >= 1e-6 relative, far above the float64 bound; the negative control below checks that.
WIDTH, DEPTH = 64, 2


def tolerance(dtype: torch.dtype, out: torch.Tensor) -> float:
    u = torch.finfo(dtype).eps / 2
    return 8 * DEPTH * (4 * WIDTH) * u * float(out.abs().max())


def tiny_diffusers_dit(seed=0, out_channels=8, patch_size=2, norm_eps=1e-5, num_classes=10, tie=True):
    """A random DiTTransformer2DModel; its per-block embedders tied as a conversion from DiT writes them."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=WIDTH // 2,
        in_channels=4,
        out_channels=out_channels,
        num_layers=DEPTH,
        sample_size=8,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
        norm_eps=norm_eps,
    )
    if tie:
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model.eval()


def tiny_vae():
    return tiny_autoencoder(num_blocks=2, width=8, sample_size=16).eval()


def tiny_racedit(**overrides):
    torch.manual_seed(1)
    model = racedit.build_model(
        "DiT-S/2", input_size=8, num_classes=10, hidden_size=WIDTH, depth=DEPTH, num_heads=2, **overrides
    )
    with torch.no_grad():  # DiT's zero init would make every output 0 and every comparison vacuous
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@torch.no_grad()
def both(ours, theirs, dtype=torch.float32):
    x, t, y = probe_inputs(ours)
    y[-1] = ours.arch.num_classes  # the null class too
    if dtype != torch.float32:
        ours, theirs = ours.to(dtype), theirs.to(dtype)
    return ours(x.to(dtype), t, y), theirs(x.to(dtype), timestep=t, class_labels=y).sample


def test_timestep_features_match_diffusers_bitwise():
    t = torch.tensor([0.0, 1.0, 250.0, 999.0, 37.5])
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert torch.equal(TimestepEmbedder.timestep_embedding(t, 256, freq_shift=1), theirs)
    official = TimestepEmbedder.timestep_embedding(t, 256)
    assert not torch.allclose(official, theirs)  # the conventions differ (except at t = 0)
    assert racedit.build_model("DiT-S/2").arch.timestep_convention == "official"  # the default


@pytest.mark.parametrize("out_channels,patch_size", [(8, 2), (None, 4)])
def test_transformer_folder_loads_with_diffusers_outputs(tmp_path, out_channels, patch_size):
    theirs = tiny_diffusers_dit(out_channels=out_channels, patch_size=patch_size)
    theirs.save_pretrained(tmp_path / "dit")
    ours = racedit.load_model(tmp_path / "dit")
    arch = ours.arch
    assert (arch.timestep_convention, arch.mlp_norm_eps) == ("diffusers", 1e-5)
    assert (arch.patch_size, arch.input_size, arch.num_classes, arch.hidden_size) == (
        patch_size,
        8,
        10,
        WIDTH,
    )
    assert arch.learn_sigma == (out_channels == 8) and arch.class_dropout_prob > 0
    for dtype in (torch.float32, torch.float64):
        a, b = both(ours, theirs, dtype)
        assert (a - b).abs().max() <= tolerance(dtype, b)
    # negative control: DiT's frequencies or DiT's eps on these weights move far past the float64 bound
    for override in ({"timestep_convention": "official"}, {"mlp_norm_eps": 1e-6}):
        wrong = racedit.load_model(tmp_path / "dit", **override)
        a, b = both(wrong, theirs, torch.float64)
        assert (a - b).abs().max() > 1e3 * tolerance(torch.float64, b)


def test_legacy_transformer2d_config_of_the_hub_dit_loads(tmp_path):
    # facebook/DiT-XL-2-256 still names its transformer Transformer2DModel, without norm_type or norm_eps
    theirs = tiny_diffusers_dit()
    theirs.save_pretrained(tmp_path / "dit")
    cfg = json.loads((tmp_path / "dit" / "config.json").read_text())
    for key in ("norm_type", "norm_eps"):
        cfg.pop(key)
    cfg.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None)
    (tmp_path / "dit" / "config.json").write_text(json.dumps(cfg))
    ours = racedit.load_model(tmp_path / "dit")
    assert ours.arch.mlp_norm_eps == 1e-5  # diffusers' default, which the hub model runs with
    a, b = both(ours, theirs)
    assert (a - b).abs().max() <= tolerance(torch.float32, b)


def test_untied_per_block_embedders_are_refused(tmp_path):
    tiny_diffusers_dit(tie=False).save_pretrained(tmp_path / "dit")
    with pytest.raises(CheckpointError, match="block 1's timestep_embedder.*single timestep/label embedder"):
        racedit.load_model(tmp_path / "dit")


def test_pipeline_folder_loads_transformer_and_names_its_vae(tmp_path):
    theirs = tiny_diffusers_dit()
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.5)
    pipe = DiTPipeline(transformer=theirs, vae=vae, scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(tmp_path / "pipe")
    ours = racedit.load_model(tmp_path / "pipe")
    a, b = both(ours, theirs)
    assert (a - b).abs().max() <= tolerance(torch.float32, b)
    meta = pipeline_sampling_meta(tmp_path / "pipe")
    assert meta.vae == str((tmp_path / "pipe" / "vae").resolve()) and meta.scaling_factor == 0.5
    assert meta.diffusion_config().objective == "ddpm" and meta.image_size == 16


def test_export_round_trip_is_exact(tmp_path):
    theirs = tiny_diffusers_dit()
    theirs.save_pretrained(tmp_path / "src")
    ours = racedit.load_model(tmp_path / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffusersExportWarning)  # diffusers' convention: nothing to warn
        export_diffusers(ours, tmp_path / "out")
    before = load_file(tmp_path / "src" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    _, b0 = both(ours, theirs)
    a, b1 = both(ours, reloaded)
    assert torch.equal(b0, b1)  # same weights, same config: diffusers computes the same bits
    assert (a - b1).abs().max() <= tolerance(torch.float32, b1)
    again = racedit.load_model(tmp_path / "out")
    assert again.arch == ours.arch
    assert all(torch.equal(p, q) for p, q in zip(again.state_dict().values(), ours.state_dict().values()))


def test_official_convention_export_warns_with_the_measured_difference(tmp_path):
    ours = tiny_racedit()
    with pytest.warns(DiffusersExportWarning, match=r"official DiT timestep frequencies.*max \|difference\|"):
        export_diffusers(ours, tmp_path / "out")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    a, b = both(ours, reloaded)
    check = json.loads((tmp_path / "out" / "racedit_export.json").read_text())["check"][
        "diffusers_convention"
    ]
    x, t, y = probe_inputs(ours)
    with torch.no_grad():
        expected = (ours(x, t, y) - reloaded(x, timestep=t, class_labels=y).sample).abs()
    assert check["max_abs"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert check["max_abs"] > 10 * tolerance(torch.float32, b)  # a real difference, not float noise
    # diffusers runs it exactly as racedit does with diffusers' frequencies (and the same eps, written as is)
    switched = tiny_racedit(timestep_convention="diffusers")
    a, b = both(switched, reloaded)
    assert (a - b).abs().max() <= tolerance(torch.float32, b)
    # loading the export back warns that the weights were trained with the official convention
    with pytest.warns(DiffusersExportWarning, match="trained with the official"):
        assert racedit.load_model(tmp_path / "out").arch.timestep_convention == "diffusers"
    assert racedit.load_model(tmp_path / "out", timestep_convention="official").arch == ours.arch


def test_class_dropout_zero_pads_a_null_row_and_comes_back(tmp_path):
    ours = tiny_racedit(class_dropout_prob=0.0, timestep_convention="diffusers", learn_sigma=False)
    export_diffusers(ours, tmp_path / "out")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_embeds_ada_norm == 10 and reloaded.config.out_channels == 4
    again = racedit.load_model(tmp_path / "out")
    assert again.arch == ours.arch
    table = again.y_embedder.embedding_table.weight
    assert table.shape[0] == 10 and torch.equal(table, ours.y_embedder.embedding_table.weight)


@pytest.mark.parametrize("name,message", [("RaceDiT-S/2-1in4", "MoE"), ("DiT-S/2-HCx2", "'hc' connections")])
def test_moe_and_connection_models_cannot_be_exported(tmp_path, name, message):
    model = racedit.build_model(name, input_size=8, num_classes=10, hidden_size=64, depth=2, num_heads=2)
    with pytest.raises(CheckpointError, match=f"cannot export to diffusers: .*{message}"):
        export_diffusers(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pipeline_export_loads_offline_and_samples(tmp_path, monkeypatch):
    from racedit.sampling.meta import SamplingMeta

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = tiny_racedit(timestep_convention="diffusers")
    meta = SamplingMeta(
        space="latent", vae="unused", scaling_factor=0.5, class_names=[f"c{i}" for i in range(10)]
    )
    with pytest.warns(
        DiffusersExportWarning, match="guidance_scale=1"
    ):  # 10 classes: no label 1000 null class
        export_diffusers(
            ours, tmp_path / "pipe", pipeline=True, vae=tiny_vae(), sampling=meta, scheduler="dpm++"
        )
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.labels["c3"] == 3
    assert pipe.vae.config.scaling_factor == 0.5
    pipe.set_progress_bar_config(disable=True)
    images = pipe([1, 2], guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and images.std() > 0
    flow = SamplingMeta(space="latent", vae="unused", diffusion={"objective": "flow"})
    with pytest.raises(CheckpointError, match="flow-matching"):
        export_diffusers(ours, tmp_path / "flow", pipeline=True, vae=tiny_vae(), sampling=flow)


@pytest.mark.parametrize(
    "name,content",
    [
        ("config.json", {"_class_name": "UNet2DModel", "sample_size": 32}),
        ("model_index.json", {"_class_name": "StableDiffusionPipeline"}),
    ],
)
def test_foreign_config_is_a_one_line_error(tmp_path, capsys, name, content):
    from racedit.cli.common import run

    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(CheckpointError) as info:
        racedit.load_model(tmp_path)
    text = str(info.value)
    assert "\n" not in text and content["_class_name"] in text
    assert "DiTTransformer2DModel" in text and "DiTPipeline" in text and ".pt" in text
    # a command shows it as one line on stderr with exit code 2 (CheckpointError is a UserError)
    assert run(lambda argv: racedit.load_model(tmp_path), "racedit-sample", []) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and err.startswith("racedit-sample: error: ") and content["_class_name"] in err
    )


def test_sample_cli_draws_a_grid_from_a_pipeline_folder(tmp_path, monkeypatch):
    from racedit.cli.sample import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.5)
    pipe = DiTPipeline(transformer=tiny_diffusers_dit(), vae=vae, scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    args = ["--ckpt", str(tmp_path / "pipe"), "--classes", "3", "7", "--num-per-class", "2", "--steps", "3"]
    assert main([*args, "--sampler", "ddim", "--out", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 2 * 16
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["vae"] == str((tmp_path / "pipe" / "vae").resolve()) and record["scaling_factor"] == 0.5
    assert record["model"]["timestep_convention"] == "diffusers" and record["weights_sha256"]
