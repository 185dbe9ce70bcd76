"""CMMD and CLIP score: the estimator against an independent numpy version and hand-computed cases, the
reference preprocessing, weights resolution (never a download), and `racedit-fid eval --cmmd --clip-score`
end to end with a tiny randomly initialised CLIPModel saved to a temporary folder."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import fid
from fid.clip import (
    CLIP_MEAN,
    CLIP_STD,
    PROMPT_TEMPLATE,
    ClipEmbedder,
    ClipWeightsError,
    clip_score,
    clip_score_of_samples,
    preprocess,
    resolve_clip_weights,
)
from fid.reference import build_reference
from racedit.io import sha256_file

pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- CMMD estimator


def cmmd_by_differences(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """An independent version: kernel from explicit differences a_i - b_j (not the expanded norms)."""

    def mean_k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2)).mean()

    return 1000.0 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))


def test_cmmd_equals_an_independent_numpy_implementation():
    rng = np.random.default_rng(0)
    for scale in (1.0, 8.0):  # unit-norm CLIP-like rows, and rows far apart (kernel values far from 1)
        x = rng.normal(size=(37, 12)) * scale
        y = rng.normal(0.3, 1.0, size=(23, 12)) * scale
        want = cmmd_by_differences(x, y)
        # float64 both ways; expanding ||a-b||^2 loses ~1e-16 * ||a||^2 per entry, times 1000
        assert math.isclose(fid.cmmd(x, y), want, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(fid.cmmd(x, y, block=5), want, rel_tol=1e-9, abs_tol=1e-9)  # blocks don't matter
    assert fid.cmmd(np.float32(x), y) == pytest.approx(cmmd_by_differences(np.float32(x).astype(float), y))


def test_cmmd_hand_computed_cases():
    # one point each, distance 3: k_xx = k_yy = 1 (diagonal included), k_xy = exp(-9 / 200)
    assert math.isclose(fid.cmmd([[0.0]], [[3.0]]), 1000 * (2 - 2 * math.exp(-9 / 200)), rel_tol=1e-12)
    # x = {0, 2}, y = {0}: k_xx = (1 + 1 + 2 e^{-4/200}) / 4, k_xy = (1 + e^{-4/200}) / 2
    e = math.exp(-4 / 200)
    want = 1000 * ((2 + 2 * e) / 4 + 1 - (1 + e))
    assert math.isclose(fid.cmmd([[0.0], [2.0]], [[0.0]]), want, rel_tol=1e-12)
    same = np.random.default_rng(1).normal(size=(9, 4))
    assert abs(fid.cmmd(same, same)) < 1e-9  # identical sets
    with pytest.raises(ValueError, match="embeddings"):
        fid.cmmd(np.zeros((3, 4)), np.zeros((3, 5)))


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_centre_square_bicubic_and_clip_normalisation():
    # a 10-wide, 6-high image whose outer columns (outside the centre 6x6 square) are red
    img = np.zeros((6, 10, 3), dtype=np.uint8)
    img[:, :2] = img[:, -2:] = (255, 0, 0)
    img[:, 2:-2] = (0, 128, 255)
    x = preprocess(img[None], 12)  # (1, 3, 12, 12), upsampled by 2 like 256 -> 336 is upsampled
    assert x.shape == (1, 3, 12, 12) and x.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    rgb = x[0] * std + mean  # back to [0, 1]
    # the red columns were cropped away: the image is the flat centre colour (bicubic of a constant)
    torch.testing.assert_close(rgb, torch.tensor([0, 128 / 255, 1.0])[:, None, None].expand(3, 12, 12),
                               rtol=0, atol=1e-6)  # fmt: skip
    # an image already at the target size is only normalised
    sq = np.random.default_rng(0).integers(0, 256, (2, 7, 7, 3), dtype=np.uint8)
    back = preprocess(sq, 7) * std + mean
    torch.testing.assert_close(
        back, torch.from_numpy(sq).permute(0, 3, 1, 2).float() / 255, rtol=0, atol=1e-6
    )


# ----------------------------------------------------------------------------- a tiny CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised CLIPModel (28 px, patch 14, width 32) and a byte-level tokenizer, saved."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {c: i + 2 for i, c in enumerate(chars)}
    vocab |= {c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                  image_size=28, patch_size=14)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return ClipEmbedder.from_pretrained(tiny_clip_dir)


def test_weights_from_argument_env_or_cache_never_downloaded(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("RACEDIT_CLIP_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(ClipWeightsError, match="huggingface-cli download openai/clip-vit-large-patch14-336"):
        resolve_clip_weights()
    with pytest.raises(ClipWeightsError, match="--clip-weights"):
        resolve_clip_weights(tmp_path)  # a folder without config.json / weights
    assert resolve_clip_weights(tiny_clip_dir) == tiny_clip_dir
    monkeypatch.setenv("RACEDIT_CLIP_WEIGHTS", str(tiny_clip_dir))
    assert resolve_clip_weights() == tiny_clip_dir


def test_embeddings_are_unit_norm_and_identity_names_the_weights(tiny_clip, tiny_clip_dir):
    imgs = np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    emb = tiny_clip.embed_images(imgs)
    assert emb.shape == (3, 16) and emb.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=0, atol=1e-12)
    # batching does not change an image's embedding (fp32 forward; rounding only)
    np.testing.assert_allclose(tiny_clip.embed_images(imgs[1:2])[0], emb[1], rtol=0, atol=1e-5)
    ident = tiny_clip.identity
    assert ident["weights_sha256"] == sha256_file(tiny_clip_dir / "model.safetensors")
    assert not tiny_clip.is_reference_network and not ident["comparable_with_literature"]


def test_clip_score_hand_computed_and_per_label_prompts(tiny_clip):
    a = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    t = np.array([[0.6, 0.8], [-1.0, 0.0], [0.0, 5.0]])  # cos 0.6, cos -1 (clipped to 0), cos 1
    assert math.isclose(clip_score(a, t), (60.0 + 0.0 + 100.0) / 3, rel_tol=1e-12)
    names = ["tench", "goldfish", "great white shark"]
    imgs = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    labels = np.array([2, 0, 2, 1])
    emb = tiny_clip.embed_images(imgs)
    text = tiny_clip.embed_texts([PROMPT_TEMPLATE.format(n) for n in names])  # "a photo of a tench."
    want = np.mean([100 * max(float(emb[i] @ text[c]), 0.0) for i, c in enumerate(labels)])
    assert math.isclose(clip_score_of_samples(tiny_clip, emb, labels, names), want, rel_tol=1e-9)


# ----------------------------------------------------------------------------- racedit-fid eval


def test_eval_cli_cmmd_and_clip_score_records_and_leaderboard(
    tmp_path, tiny_clip_dir, tiny_images, random_inception, capsys
):
    from fid.leaderboard import record_row
    from racedit.cli.fid import main

    cache = tmp_path / "cache"
    ref = tmp_path / "ref.npz"
    np.savez(tmp_path / "ref_src.npz", arr_0=tiny_images["ref"])
    build_reference(tmp_path / "ref_src.npz", ref, random_inception, num_ref_images=6,
                    cache_dir=cache, progress=False)  # fmt: skip
    samples = tmp_path / "samples.npz"
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(samples, arr_0=tiny_images["samples"], arr_1=labels)
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish\ngreat white shark\n")
    out = tmp_path / "evals" / f"fid-{ref.stem}.fid.json"  # --out DIR: the record has a fixed name
    args = ["eval", str(samples), "--ref", str(ref), "--random-inception", "0", "--cmmd", "--clip-score",
            "--clip-weights", str(tiny_clip_dir), "--clip-class-names", str(names), "--cache-dir", str(cache),
            "--no-progress", "--is-split-size", "3", "--out", str(out.parent)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "CMMD" in printed.out and "CLIP score" in printed.out and "not CLIP ViT-L/14@336px" in printed.err
    record = json.loads(out.read_text())
    clip = ClipEmbedder.from_pretrained(tiny_clip_dir)
    real, gen = clip.embed_images(tiny_images["ref"]), clip.embed_images(tiny_images["samples"])
    assert math.isclose(record["metrics"]["cmmd"], fid.cmmd(real, gen), rel_tol=1e-6)  # CPU fp32 forwards
    want_score = clip_score_of_samples(clip, gen, labels, ["tench", "goldfish", "great white shark"])
    assert math.isclose(record["metrics"]["clip_score"], want_score, rel_tol=1e-6)
    info = record["evaluator"]["clip"]
    assert info["weights_sha256"] == sha256_file(tiny_clip_dir / "model.safetensors")
    assert info["clip_score"]["prompt_template"] == "a photo of a {}."
    assert "minimum-variance" in info["cmmd"]["estimator"]
    # a rerun reads the embeddings from the cache and gives the same numbers
    assert main(args) == 0
    again = json.loads(out.read_text())
    assert again["evaluator"]["clip"]["samples_from_cache"] and again["metrics"] == record["metrics"]
    # leaderboard: a test CLIP's numbers are left out; the reference CLIP's are columns
    with pytest.warns(UserWarning, match="test CLIP"):
        assert record_row(record)["cmmd"] is None
    record["evaluator"]["clip"] |= {"comparable_with_literature": True, "model": "CLIP ViT-L/14@336px"}
    row = record_row(record)
    assert row["cmmd"] == record["metrics"]["cmmd"] and row["clip_model"] == "CLIP ViT-L/14@336px"
    assert row["clip_weights_sha256"] == info["weights_sha256"]


def test_eval_cli_clip_errors_are_one_line(tmp_path, tiny_images, monkeypatch, capsys):
    from racedit.cli.fid import main

    monkeypatch.delenv("RACEDIT_CLIP_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    np.savez(tmp_path / "s.npz", arr_0=tiny_images["samples"])
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--cmmd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openai/clip-vit-large-patch14-336" in err[0]


# ----------------------------------------------------------------------------- golden (real weights)


def _real_clip_dir():
    try:
        return resolve_clip_weights()
    except ClipWeightsError:
        return None


@pytest.mark.golden
@pytest.mark.skipif(
    _real_clip_dir() is None and not os.environ.get("RACEDIT_CLIP_WEIGHTS"),
    reason="CLIP ViT-L/14@336px weights absent ($RACEDIT_CLIP_WEIGHTS or the HF cache)",
)
def test_golden_real_clip_vit_l14_336():
    clip = ClipEmbedder.from_pretrained()
    assert clip.is_reference_network and clip.image_size == 336
    # zero-shot sanity: a prompt is closer to its own paraphrase than to an unrelated class
    t = clip.embed_texts([PROMPT_TEMPLATE.format("golden retriever"), "a photo of a golden retriever dog.",
                          PROMPT_TEMPLATE.format("container ship")])  # fmt: skip
    assert t[0] @ t[1] > t[0] @ t[2]
    rng = np.random.default_rng(0)
    flat = np.repeat(rng.integers(0, 256, (8, 1, 1, 3), dtype=np.uint8), 256, 1).repeat(256, 2)
    noise = rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
    a, b = clip.embed_images(flat), clip.embed_images(noise)
    assert abs(fid.cmmd(a, a)) < 1e-9 and fid.cmmd(a, b) > 0.1
