"""Grid PNG, class names, sampling.json, and the VAE loader on a tiny random AutoencoderKL."""

import numpy as np
import pytest
import torch
from PIL import Image

from racedit.diffusion import DiffusionConfig
from racedit.sampling import official_dit_meta, read_sampling_meta, save_grid, write_sampling_meta
from racedit.sampling.classes import imagenet_class_names, parse_classes
from racedit.testing import save_tiny_autoencoder
from racedit.vae import VAEError, load_vae
from racedit.vae import decoder as vae_decoder


def test_grid_upscales_tiny_images_nearest_and_captions(tmp_path):
    imgs = torch.zeros(5, 8, 8, 3, dtype=torch.uint8)
    imgs[1, 2, 3] = 255  # one white pixel in tile 1
    path = save_grid(imgs, [0, 1, 2, 3, 4], [f"digit {i}" for i in range(10)], tmp_path / "g.png", nrow=3)
    grid = np.asarray(Image.open(path).convert("RGB"))
    scale = 12  # ceil(96 / 8)
    assert grid.shape[1] == 3 * (8 * scale + 2) + 2
    x0 = 2 + (8 * scale + 2)  # tile 1 starts here (pad 2)
    tile = grid[2 : 2 + 8 * scale, x0 : x0 + 8 * scale]
    assert (tile[2 * scale : 3 * scale, 3 * scale : 4 * scale] == 255).all()  # a crisp 12x12 block
    assert (tile[: 2 * scale] == 0).all()
    caption = grid[2 + 8 * scale : 2 + 8 * scale + 10, 2 : 2 + 8 * scale]
    assert (caption < 128).any()  # text drawn under the tile
    with pytest.raises(ValueError):
        save_grid(imgs.float(), [0] * 5, None, tmp_path / "bad.png")


def test_imagenet_names_and_parse_classes():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden retriever"
    assert parse_classes(["golden retriever", "207,1", "Tench", "88"], names, 1000) == [207, 207, 1, 0, 88]
    assert parse_classes(["crane"], names, 1000) == [517]  # exact beats prefix ("crane bird" is 134)
    with pytest.raises(ValueError, match="ambiguous"):
        parse_classes(["great"], names, 1000)  # great white shark, great grey owl, ...
    with pytest.raises(ValueError, match="unknown class"):
        parse_classes(["no such animal"], names, 1000)
    with pytest.raises(ValueError, match="out of range"):
        parse_classes(["12"], [str(i) for i in range(10)], 10)


def test_sampling_meta_roundtrip_and_defaults(tmp_path):
    write_sampling_meta(
        tmp_path, space="pixel", vae=None, diffusion=DiffusionConfig(objective="flow"), image_size=8
    )
    meta = read_sampling_meta(tmp_path)
    assert meta.space == "pixel" and meta.diffusion_config().objective == "flow" and meta.image_size == 8
    assert read_sampling_meta(tmp_path / "nothing") is None
    (tmp_path / "ema").mkdir()
    (tmp_path / "sampling.json").rename(tmp_path / "ema" / "sampling.json")  # training checkpoint layout
    assert read_sampling_meta(tmp_path).space == "pixel"
    dit = official_dit_meta()
    assert (dit.vae, dit.scaling_factor, dit.diffusion_config().objective) == (
        "stabilityai/sd-vae-ft-ema",
        0.18215,
        "ddpm",
    )
    with pytest.raises(ValueError, match="vae"):
        write_sampling_meta(tmp_path, space="latent", vae=None)


def _tiny_vae_dir(path):
    return save_tiny_autoencoder(path, num_blocks=2, width=8, sample_size=16)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return _tiny_vae_dir(tmp_path_factory.mktemp("vae") / "tiny-vae")


def test_vae_from_local_dir_decodes(tiny_vae_dir):
    vae = load_vae(str(tiny_vae_dir))
    decode = vae_decoder(vae, scaling_factor=0.5, batch_size=2)
    z = torch.randn(3, 4, 8, 8)
    img = decode(z)
    assert img.shape == (3, 3, 16, 16)
    ref = vae.decode(z / 0.5).sample
    assert torch.allclose(img, ref, atol=1e-5)


def test_vae_missing_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(VAEError, match="hf download stabilityai/sd-vae-ft-ema"):
        load_vae("stabilityai/sd-vae-ft-ema")
    with pytest.raises(VAEError, match="does not exist"):
        load_vae(str(tmp_path / "no-vae-here"))
