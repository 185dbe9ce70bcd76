"""LatentDataset: posterior sampling, flips, reproducibility across workers/processes/epochs, format errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from data_helpers import CLASSES, PER_CLASS, RESOLUTION
from safetensors.numpy import load_file

from racedit.config import from_dict
from racedit.data import DataConfig, LatentDataset, LatentFormatError, build_dataset
from racedit.data.format import read_json, shard_name, write_safetensors

N = len(CLASSES) * PER_CLASS
SF = 0.18215


def test_interface_and_items(extracted, tiny_vae):
    ds = build_dataset(from_dict(DataConfig, {"kind": "latents", "root": str(extracted)}))
    assert isinstance(ds, LatentDataset)
    assert len(ds) == N and ds.num_classes == 3 and ds.class_names == list(CLASSES)
    assert ds.sample_shape == (4, RESOLUTION // 8, RESOLUTION // 8) and ds.space == "latent"
    assert ds.meta["scaling_factor"] == pytest.approx(SF) and ds.meta["vae"] == str(tiny_vae.resolve())
    x, y = ds[5]
    assert x.dtype == torch.float32 and x.shape == ds.sample_shape and isinstance(y, int)
    files = read_json(extracted / "files.json", "files")["files"]
    index = load_file(str(extracted / "index.safetensors"))
    assert [ds[i][1] for i in range(N)] == [files[i][1] for i in index["file_index"]]
    with pytest.raises(IndexError):
        ds[N]


def test_without_noise_or_flip_item_is_scaled_stored_mean(extracted):
    ds = LatentDataset(extracted, flip=False, sample_posterior=False)
    for i in (0, 9, N - 1):
        mean, _ = ds.moments(i)
        torch.testing.assert_close(ds[i][0], mean[0] * SF, rtol=0, atol=1e-6)


def test_flip_rate_is_one_half(extracted):
    ds = LatentDataset(extracted, sample_posterior=False)
    flips = 0
    draws = 0
    for epoch in range(60):
        ds.set_epoch(epoch)
        for i in range(N):
            x = ds[i][0]
            mean, _ = ds.moments(i)
            is_flip = torch.allclose(x, mean[1] * SF, atol=1e-6)
            assert is_flip or torch.allclose(x, mean[0] * SF, atol=1e-6)
            flips += int(is_flip)
            draws += 1
    assert abs(flips / draws - 0.5) < 0.05  # 1080 draws: 3.3 standard deviations


def test_many_draws_average_to_the_stored_mean_with_the_stored_std(extracted):
    ds = LatentDataset(extracted, flip=False)
    item = 3
    mean, std = ds.moments(item)  # (2, C, h, w)
    draws = []
    for epoch in range(1500):
        ds.set_epoch(epoch)
        draws.append(ds[item][0])
    x = torch.stack(draws).double()  # (1500, C, h, w)
    se = (std[0] * SF).double() / 1500**0.5
    assert ((x.mean(0) - mean[0] * SF).abs() <= 5 * se + 1e-6).all()
    ratio = x.std(0) / (std[0] * SF)
    assert ratio.min() > 0.85 and ratio.max() < 1.15
    assert std[0].min() > 0.05  # the random VAE's posterior is wide: the test above is not vacuous


def test_draws_depend_only_on_seed_epoch_index(extracted):
    a, b = LatentDataset(extracted, seed=3), LatentDataset(extracted, seed=3)
    torch.testing.assert_close(a[4][0], b[4][0], rtol=0, atol=0)
    assert not torch.equal(a[4][0], LatentDataset(extracted, seed=4)[4][0])
    first = a[4][0]
    a.set_epoch(1)
    assert a.epoch == 1 and not torch.equal(first, a[4][0])
    b.set_epoch(1)
    _ = b[7], b[2]  # access order does not matter
    torch.testing.assert_close(a[4][0], b[4][0], rtol=0, atol=0)


def test_dataloader_workers_see_set_epoch(extracted):
    """Persistent workers (forked, memory maps opened inside them) give the same draws as direct access."""
    ds = LatentDataset(extracted, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=True)
    for epoch in (0, 2):
        ds.set_epoch(epoch)
        got = torch.cat([x for x, _ in loader])
        ref_ds = LatentDataset(extracted, seed=1)
        ref_ds.set_epoch(epoch)
        want = torch.stack([ref_ds[i][0] for i in range(N)])
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_accelerate_process_sharding_reassembles_the_same_batch(extracted):
    from accelerate.data_loader import BatchSamplerShard

    ds = LatentDataset(extracted, seed=2)
    ds.set_epoch(5)
    sampler = torch.utils.data.BatchSampler(range(N), batch_size=6, drop_last=False)
    direct = {i: ds[i][0] for i in range(N)}
    seen = {}
    for rank in range(2):
        for batch in BatchSamplerShard(sampler, num_processes=2, process_index=rank, split_batches=False):
            for i in batch:
                seen.setdefault(i, ds[i][0])
                torch.testing.assert_close(seen[i], direct[i], rtol=0, atol=0)
    assert set(seen) == set(range(N))


def test_missing_root_names_the_command(tmp_path):
    with pytest.raises(LatentFormatError, match="racedit-extract extract --data-dir"):
        build_dataset(DataConfig(kind="latents", root=str(tmp_path / "nowhere")))
    with pytest.raises(LatentFormatError, match="data.root is not set"):
        build_dataset(DataConfig(kind="latents"))
    with pytest.raises(LatentFormatError, match="not a latent directory"):
        LatentDataset(tmp_path)


def test_shard_not_matching_metadata_is_an_error(extracted, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(extracted, bad)
    shard = load_file(str(bad / shard_name(2)))
    meta = {
        "format_version": 1,
        "shard": 2,
        "count": 4,
        "fingerprint": read_json(bad / "meta.json", "m")["fingerprint"],
    }
    wrong_shape = {
        **shard,
        "mean": np.zeros((4, 2, 4, 8, 8), np.float16),
        "std": np.zeros((4, 2, 4, 8, 8), np.float16),
    }
    write_safetensors(bad / shard_name(2), wrong_shape, meta)
    with pytest.raises(LatentFormatError, match=r"shard-00002.*latent shape \[4, 4, 4\]"):
        LatentDataset(bad)
    fewer = {k: v[:3] for k, v in shard.items()}
    write_safetensors(bad / shard_name(2), fewer, meta)
    with pytest.raises(LatentFormatError, match="holds 3 items but the index says 4"):
        LatentDataset(bad)
    (bad / shard_name(2)).unlink()
    with pytest.raises(LatentFormatError, match="shard-00002.safetensors is missing"):
        LatentDataset(bad)


def test_latents_have_no_heldout_split(extracted):
    with pytest.raises(ValueError, match="no 'heldout' split"):
        build_dataset(DataConfig(kind="latents", root=str(extracted)), split="heldout")
