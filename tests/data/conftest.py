"""Shared fixtures: a tiny random AutoencoderKL, a small image folder written here, one extraction."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import extract_args, make_image_folder, make_tiny_vae


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="session")
def extracted(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_vae: Path) -> Path:
    """One uninterrupted single-process extraction of ``image_folder`` (the reference for other tests)."""
    from racedit.cli.extract import main

    out = tmp_path_factory.mktemp("latents") / "ref"
    assert main(extract_args(image_folder, out, tiny_vae)) == 0
    return out
