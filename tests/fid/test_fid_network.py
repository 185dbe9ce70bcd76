"""``racedit-fid --features``: the stand-in network hook loads what it is given and refuses what it must."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fid.data import InputError
from fid.network import load_feature_network

STANDIN = Path(__file__).resolve().parents[1] / "rehearsal_features.py"


def test_a_file_spec_builds_the_stand_in_with_the_inception_shapes():
    net = load_feature_network(f"{STANDIN}:build")
    assert net.is_reference_network is False and "stand-in" in net.identity
    images = torch.randint(0, 256, (3, 3, 20, 28), dtype=torch.uint8)
    pool, spatial = net.to("cpu").features(images)
    assert pool.shape == (3, 2048) and spatial.shape == (3, 2023) and pool.dtype == torch.float32
    assert net.unbiased_logits(pool).shape[0] == 3
    assert not torch.equal(pool[0], pool[1])  # different images, different features


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected package.module:callable"),
        ("/nowhere/x.py:build", "no such file"),
        (f"{STANDIN}:nope", "has no callable 'nope'"),
        ("json:dumps", "needs an argument"),
    ],
)
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises((InputError, FileNotFoundError), match=message):
        load_feature_network(spec)


def test_a_stand_in_cannot_claim_to_be_the_reference(tmp_path):
    module = tmp_path / "liar.py"
    module.write_text(
        "class Net:\n    is_reference_network = True\n    identity = 'x'\n"
        "    def features(self, x): ...\n    def unbiased_logits(self, p): ...\n    def to(self, d): return self\n"
        "def build():\n    return Net()\n"
    )
    with pytest.raises(InputError, match="cannot be the reference"):
        load_feature_network(f"{module}:build")
