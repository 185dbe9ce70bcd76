"""DigitsDataset: the embedded demo dataset (values, labels, deterministic stratified splits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from racedit.config import ConfigError, from_dict
from racedit.data import DataConfig, DigitsDataset, build_dataset


def test_all_split_is_the_sklearn_digits_scaled_to_unit_range():
    ds = build_dataset(DataConfig(), split="all")
    ref = load_digits()
    assert isinstance(ds, DigitsDataset) and len(ds) == 1797
    assert ds.num_classes == 10 and ds.class_names == [str(d) for d in range(10)]
    assert ds.sample_shape == (1, 8, 8) and ds.space == "pixel"
    x, y = ds[10]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y == int(ref.target[10])
    torch.testing.assert_close(x[0], torch.from_numpy(ref.images[10] / 8.0 - 1.0).float())
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0  # 0 -> -1, 16 -> 1
    assert np.array_equal(ds.labels, ref.target)


def test_train_heldout_split_is_disjoint_stratified_and_deterministic():
    train, held = DigitsDataset("train"), DigitsDataset("heldout")
    assert len(train) + len(held) == 1797
    assert not set(train.indices) & set(held.indices)
    counts = np.bincount(load_digits().target, minlength=10)
    held_counts = np.bincount(held.labels, minlength=10)
    assert np.array_equal(held_counts, np.round(0.2 * counts).astype(int))  # 20% of every class
    assert np.array_equal(DigitsDataset("heldout").indices, held.indices)  # same split every time
    assert not np.array_equal(DigitsDataset("heldout", split_seed=1).indices, held.indices)
    assert len(DigitsDataset("heldout", held_out_fraction=0.1)) == np.round(0.1 * counts).sum() == 179
    torch.testing.assert_close(held[0][0], DigitsDataset("all")[int(held.indices[0])][0])


def test_upscaled_digits_stay_in_range():
    ds = build_dataset(from_dict(DataConfig, {"kind": "digits", "image_size": 16}))
    x, _ = ds[0]
    assert x.shape == (1, 16, 16) == ds.sample_shape
    assert x.min() >= -1.0 and x.max() <= 1.0
    # bilinear upscaling preserves the image on average
    torch.testing.assert_close(ds.images.mean(), DigitsDataset("train").images.mean(), atol=0.02, rtol=0)


def test_flip_is_refused_for_digits_and_config_is_validated():
    with pytest.raises(ValueError, match="mirrored digit"):
        build_dataset(DataConfig(kind="digits", flip=True))
    build_dataset(DataConfig(kind="digits", flip=False))  # explicit off is fine
    with pytest.raises(ConfigError, match="data.colour"):
        from_dict(DataConfig, {"colour": 1}, prefix="data")
    with pytest.raises(ConfigError, match="must be one of"):
        from_dict(DataConfig, {"kind": "imagenet"})
    with pytest.raises(ValueError, match="split must be one of"):
        DigitsDataset("test")


def test_dataloader_batches(tmp_path):
    ds = DigitsDataset("train")
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)))
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.int64
    ds.set_epoch(3)  # no-op, present for a uniform interface
    torch.testing.assert_close(ds[0][0], x[0])
