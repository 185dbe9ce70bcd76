"""racedit-extract: end-to-end extraction, corrupt images, kill -9 + resume, two processes, verify, stats."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import CLASSES, PER_CLASS, RESOLUTION, extract_args
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from racedit.cli.extract import main
from racedit.data.extract import verify
from racedit.data.format import read_json, shard_name, write_safetensors
from racedit.data.imagefolder import adm_center_crop, list_image_folder, load_image
from racedit.vae import VAEError, load_vae

REPO = Path(__file__).resolve().parents[2]
N_READABLE = len(CLASSES) * PER_CLASS
N_FILES = N_READABLE + 2  # + corrupt.jpg + truncated.jpg


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.safetensors"))}


# --------------------------------------------------------------------------------------------------
# crop and listing
# --------------------------------------------------------------------------------------------------


def test_adm_center_crop_box_halves_then_crops_the_centre():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = adm_center_crop(Image.fromarray(arr), 32)
    # 64x96 -> BOX halving (short side 64 >= 2*32) -> 32x48; bicubic to short side 32 is the identity;
    # centre crop of width 32 from 48 starts at column (48 - 32) // 2 = 8.
    halved = np.asarray(Image.fromarray(arr).resize((48, 32), resample=Image.BOX))
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, halved[:, 8:40])
    # BOX halving is the rounded 2x2 block mean
    block = arr.reshape(32, 2, 48, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(halved.astype(np.float64) - block).max() <= 1.0


def test_adm_center_crop_upscales_small_images_bicubic():
    arr = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = adm_center_crop(Image.fromarray(arr), 32)  # short side 20 -> 32, long side round(30 * 1.6) = 48
    ref = np.asarray(Image.fromarray(arr).resize((48, 32), resample=Image.BICUBIC))[:, 8:40]
    np.testing.assert_array_equal(out, ref)


def test_list_image_folder_classes_labels_and_ignored(image_folder):
    listing = list_image_folder(image_folder)
    assert listing.class_names == list(CLASSES)
    assert len(listing.files) == N_FILES
    assert [rel for rel, _ in listing.files][:2] == ["cat/img0.jpg", "cat/img1.png"]
    assert {label for rel, label in listing.files if rel.startswith("dog/")} == {1}
    assert listing.ignored == ["cat/notes.txt"]


# --------------------------------------------------------------------------------------------------
# end-to-end extraction and its outputs
# --------------------------------------------------------------------------------------------------


def test_extraction_outputs_and_metadata(extracted, tiny_vae):
    meta = read_json(extracted / "meta.json", "meta")
    assert meta["num_images"] == N_READABLE and meta["num_excluded"] == 2
    assert meta["class_names"] == list(CLASSES) and meta["num_classes"] == 3
    assert meta["class_counts"] == [PER_CLASS] * 3
    assert meta["latent_shape"] == [4, RESOLUTION // 8, RESOLUTION // 8]
    assert meta["scaling_factor"] == pytest.approx(0.18215)  # read from the VAE config
    assert meta["resolution"] == RESOLUTION and meta["format_version"] == 1
    assert meta["num_shards"] == 5  # ceil(20 files / 4)
    report = read_json(extracted / "report.json", "report")
    bad = {e["path"]: e["error"] for e in report["excluded"]}
    assert set(bad) == {"dog/corrupt.jpg", "emu/truncated.jpg"}
    assert "truncated" in bad["emu/truncated.jpg"].lower()
    assert report["ignored_not_images"] == ["cat/notes.txt"]
    index = load_file(str(extracted / "index.safetensors"))
    files = read_json(extracted / "files.json", "files")["files"]
    assert sorted(index["file_index"].tolist()) == [
        i for i, (rel, _) in enumerate(files) if rel not in bad
    ]  # every readable image exactly once, the corrupt ones nowhere
    assert index["labels"].tolist() == [files[i][1] for i in index["file_index"]]
    assert verify(extracted, progress=False) == []


def test_stored_posterior_equals_direct_vae_encoding(extracted, image_folder, tiny_vae):
    """The shard holds the VAE posterior of the ADM-cropped image and of its mirror image."""
    from racedit.data.latents import LatentDataset

    ds = LatentDataset(extracted)
    files = read_json(extracted / "files.json", "files")["files"]
    index = load_file(str(extracted / "index.safetensors"))
    vae = load_vae(str(tiny_vae))
    for item in (0, 7, N_READABLE - 1):
        rel = files[int(index["file_index"][item])][0]
        img = load_image(image_folder / rel, RESOLUTION).float() / 127.5 - 1.0  # (3, R, R)
        with torch.no_grad():
            dist = vae.encode(torch.stack([img, img.flip(-1)])).latent_dist
        mean, std = ds.moments(item)  # (2, C, h, w)
        torch.testing.assert_close(mean, dist.mean, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(std, dist.std, atol=2e-3, rtol=2e-3)
        assert not torch.allclose(mean[0], mean[1])  # the flip is a different latent


def test_verify_and_stats_commands(extracted, tmp_path, capsys):
    assert main(["verify", "--root", str(extracted)]) == 0
    assert "OK: 18 images in 5 shards" in capsys.readouterr().out
    assert main(["stats", "--root", str(extracted), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert len(stats["channel_mean"]) == 4 and stats["images"] == N_READABLE
    assert stats["unit_std_scaling_factor"] == pytest.approx(0.18215 / stats["std"])
    # a corrupted copy: NaN in one shard's mean, labels changed in another
    bad = tmp_path / "bad"
    shutil.copytree(extracted, bad)
    shard = load_file(str(bad / shard_name(1)))
    shard["mean"][0, 0, 0, 0, 0] = np.nan
    meta1 = json.loads(safe_open(str(bad / shard_name(1)), "np").metadata()["racedit"])
    write_safetensors(bad / shard_name(1), shard, meta1)
    problems = verify(bad, progress=False)
    assert len(problems) == 2 and all(shard_name(1) in p for p in problems)  # changed bytes, and NaN
    assert "content hash differs" in problems[0] and "non-finite" in problems[1]
    assert main(["verify", "--root", str(bad)]) == 1
    capsys.readouterr()


def test_rerun_with_other_settings_is_refused(extracted, image_folder, tiny_vae, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(extracted, out)
    before = _shard_bytes(out)
    assert (
        main(extract_args(image_folder, out, tiny_vae)[:-8] + ["--resolution", "64", "--shard-size", "4"])
        == 2
    )
    err = capsys.readouterr().err
    assert "resolution: was 32, now 64" in err and "new --out" in err
    # a rerun with the original settings resumes nothing and changes nothing
    assert main(extract_args(image_folder, out, tiny_vae)) == 0
    assert "0 of its 5 shards to encode" in capsys.readouterr().err
    assert _shard_bytes(out) == before


def test_missing_vae_says_what_to_download(tmp_path):
    with pytest.raises(VAEError, match="does not exist"):
        load_vae(str(tmp_path / "no-such-vae"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="no config.json"):
        load_vae(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------------
# kill -9 part-way, then rerun: exactly the shards of an uninterrupted run
# --------------------------------------------------------------------------------------------------


def test_sigkill_then_rerun_gives_identical_shards(extracted, image_folder, tiny_vae, tmp_path, capsys):
    from racedit.data.format import LatentFormatError
    from racedit.data.latents import LatentDataset

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "racedit.data", *extract_args(image_folder, out, tiny_vae)]
    proc = subprocess.Popen(
        [*cmd, "--throttle", "0.4"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 600  # a bound on waiting, not a timing check
        while not (out / shard_name(1)).exists():  # two shards done, the third in progress
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "extraction did not start in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = set(_shard_bytes(out))
    assert shard_name(0) in done and shard_name(4) not in done and not (out / "meta.json").exists()
    with pytest.raises(LatentFormatError, match="unfinished"):
        LatentDataset(out)
    (out / f"{shard_name(2)}.tmp-99999").write_bytes(b"partial write of a killed process")
    assert main(extract_args(image_folder, out, tiny_vae)) == 0
    err = capsys.readouterr().err
    assert f"{5 - len(done)} of its 5 shards to encode" in err and re.search("removed [12] partial", err)
    assert _shard_bytes(out) == _shard_bytes(extracted)  # bitwise
    assert (out / "index.safetensors").read_bytes() == (extracted / "index.safetensors").read_bytes()
    assert not list(out.glob("*.tmp-*"))


# --------------------------------------------------------------------------------------------------
# two processes (torchrun, gloo on CPU): every image exactly once
# --------------------------------------------------------------------------------------------------


def test_two_process_torchrun_covers_every_image_once(extracted, image_folder, tiny_vae, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "racedit.cli.extract",
        *extract_args(image_folder, out, tiny_vae),
    ]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "terminate called" not in res.stderr  # both ranks left the process group cleanly
    assert "process 0/2" in res.stderr and "process 1/2" in res.stderr
    assert "3 of its 3 shards" in res.stderr and "2 of its 2 shards" in res.stderr  # shards 0,2,4 and 1,3
    index = load_file(str(out / "index.safetensors"))
    ref_index = load_file(str(extracted / "index.safetensors"))
    assert len(np.unique(index["file_index"])) == len(index["file_index"]) == N_READABLE
    np.testing.assert_array_equal(index["file_index"], ref_index["file_index"])
    np.testing.assert_array_equal(index["labels"], ref_index["labels"])
    for k in range(5):
        a, b = load_file(str(out / shard_name(k))), load_file(str(extracted / shard_name(k)))
        np.testing.assert_allclose(a["mean"].astype(np.float32), b["mean"].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(a["std"].astype(np.float32), b["std"].astype(np.float32), atol=2e-3)
    assert verify(out, progress=False) == []
