"""racedit.vae: latents <-> images with scale AND shift, the one local-folder/hub-id rule, and an offline
hub id that fails at once (one cache lookup, one reachability check, no download retries)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from racedit import vae as V
from racedit.testing import save_tiny_autoencoder

SCALE, SHIFT = 0.6, 0.35  # a VAE with a shift factor (as SD3's and FLUX's have), tiny and random


def make_shifted_vae(path: Path) -> Path:
    return save_tiny_autoencoder(
        path, num_blocks=2, width=8, sample_size=16, scaling_factor=SCALE, shift_factor=SHIFT
    )


@pytest.fixture(scope="module")
def shifted_vae_dir(tmp_path_factory) -> Path:
    return make_shifted_vae(tmp_path_factory.mktemp("vae") / "shifted")


def test_decode_inverts_the_training_latents_with_scale_and_shift(shifted_vae_dir):
    """Training latents are (z - shift) * scale; the sampler's decoder must give vae.decode(z) back."""
    from racedit.vae import decoder as vae_decoder  # what sample.py and the trainer's preview call
    from racedit.vae import load_vae

    vae = load_vae(str(shifted_vae_dir))
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (SCALE, SHIFT)
    torch.manual_seed(1)
    z = torch.randn(3, 4, 8, 8)  # raw posterior samples
    x = V.to_latents(z, SCALE, SHIFT)  # what LatentDataset feeds the model
    with torch.no_grad():
        want = vae.decode(z).sample
        unshifted = vae.decode(x / SCALE).sample  # the old decoder: z / scale, shift forgotten
    got = vae_decoder(vae, SCALE, batch_size=2)(x)  # the shift is read from the VAE config
    # x / scale + shift = z up to float32 rounding (a few ulp of |z| ~ 4): 1e-5 absolute is ample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - unshifted).abs().max() > 1e-2  # the shift matters: the old formula is measurably wrong
    torch.testing.assert_close(V.from_latents(x, SCALE, SHIFT), z, atol=1e-6, rtol=1e-6)


def test_encode_then_decode_is_the_vae_round_trip(shifted_vae_dir):
    """LatentVAE.encode applies (z - shift) * scale, decode its inverse: together exactly the VAE's own
    reconstruction vae.decode(posterior mean)."""
    codec = V.LatentVAE(V.load_vae(shifted_vae_dir), batch_size=2)
    assert (codec.scaling_factor, codec.shift_factor) == (SCALE, SHIFT)
    torch.manual_seed(2)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    latents = codec.encode(images)
    with torch.no_grad():
        mean = codec.vae.encode(images).latent_dist.mean
        recon = codec.vae.decode(mean).sample
    torch.testing.assert_close(latents, (mean - SHIFT) * SCALE)
    torch.testing.assert_close(codec.decode(latents), recon, atol=1e-5, rtol=1e-5)  # float32 rounding only


def test_local_folder_is_recorded_absolute_hub_id_as_typed(shifted_vae_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(shifted_vae_dir.parent)
    source = V.resolve_vae(shifted_vae_dir.name)  # typed relative, as a user would
    assert source.record() == {
        "vae": str(shifted_vae_dir.resolve()),
        "vae_hub_id": None,
        "vae_subfolder": None,
    }
    hub = V.resolve_vae("stabilityai/sd-vae-ft-ema")
    assert hub.record()["vae"] == hub.record()["vae_hub_id"] == "stabilityai/sd-vae-ft-ema"
    pipeline = tmp_path / "sd-pipeline"
    make_shifted_vae(pipeline / "vae")  # a Stable Diffusion pipeline folder: the VAE is in vae/
    assert V.resolve_vae(pipeline).name == str((pipeline / "vae").resolve())
    for bad in ("tinyvae", "./tinyvae", "a/b/c"):  # neither an existing folder nor 'org/name'
        with pytest.raises(V.VAEError, match="does not exist"):
            V.resolve_vae(bad)


def test_default_hub_vae_offline_fails_at_once_and_only_once(tmp_path, monkeypatch):
    """No cached copy and no reachable hub: one cache lookup, no download attempt (the retries took 34 s),
    the message says what to download and where, and a second request fails from memory."""
    import diffusers

    calls: list[dict] = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(kwargs)
        raise OSError(f"{name} is not cached")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(V, "_FAILED", {})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once, no network used
    with pytest.raises(V.VAEError) as err:
        V.load_vae(V.DEFAULT_VAE)
    message = str(err.value)
    assert f"hf download {V.DEFAULT_VAE}" in message and str(tmp_path / "hf" / "hub") in message
    assert "unreachable" in message
    assert len(calls) == 1 and calls[0]["local_files_only"] is True  # the cache only, never the network
    with pytest.raises(V.VAEError, match="hf download"):
        V.load_vae(V.DEFAULT_VAE, device="cpu")
    assert len(calls) == 1  # remembered: a trainer's preview every N steps does not try again


def test_loaded_once_per_process(shifted_vae_dir):
    assert V.load_vae(shifted_vae_dir) is V.load_vae(str(shifted_vae_dir))
