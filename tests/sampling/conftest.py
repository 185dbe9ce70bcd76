"""Fixtures of the sampling tests; the helpers live in sampling_helpers.py."""

import pytest
from sampling_helpers import make_tiny_model, save_pixel_model


@pytest.fixture
def tiny_model():
    return make_tiny_model


@pytest.fixture(scope="module")
def pixel_model_dir(tmp_path_factory):
    return save_pixel_model(tmp_path_factory.mktemp("pixel") / "model")
