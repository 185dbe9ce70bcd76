"""racedit-extract against corrupt files and bad input: content hashes that catch a few flipped bytes
(verify reports them, a rerun redoes the shard), the VAE recorded as an absolute path, numeric flags
checked at parse time, and every input error as one line with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import extract_args

from racedit.cli.extract import main
from racedit.data.extract import verify
from racedit.data.format import SafetensorsHeader, shard_name


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.safetensors"))}


def test_verify_catches_four_flipped_bytes_and_a_rerun_redoes_the_shard(
    extracted, image_folder, tiny_vae, tmp_path, capsys
):
    bad = tmp_path / "bad"
    shutil.copytree(extracted, bad)
    reference = _shard_bytes(extracted)
    path = bad / shard_name(2)
    header = SafetensorsHeader(path)
    start = header.data_start + header.tensors["mean"]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    for i in range(4):  # the low byte of four float16 means: finite values, slightly off; shapes intact
        data[start + 2 * i] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify(bad, progress=False)
    assert len(problems) == 1 and shard_name(2) in problems[0] and "content hash" in problems[0]
    assert main(["verify", "--root", str(bad)]) == 1
    assert "FAILED: 1 problem" in capsys.readouterr().out
    assert verify(bad, quick=True, progress=False) == []  # --quick reads headers only, as it says
    # resuming in that directory redoes the damaged shard (and only it): identical to the clean run
    assert main(extract_args(image_folder, bad, tiny_vae)) == 0
    err = capsys.readouterr().err
    assert f"redoing {shard_name(2)}" in err and "1 of its 5 shards to encode" in err
    assert _shard_bytes(bad) == reference
    assert verify(bad, progress=False) == []


def test_meta_records_the_vae_as_an_absolute_path(image_folder, tiny_vae, tmp_path, monkeypatch):
    from racedit.data.latents import LatentDataset
    from racedit.vae import load_vae

    monkeypatch.chdir(tiny_vae.parent)
    out = tmp_path / "rel"
    args = extract_args(image_folder, out, tiny_vae)
    args[args.index("--vae") + 1] = tiny_vae.name  # typed relative to the working directory
    assert main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vae"] == str(tiny_vae.resolve()) and meta["vae_hub_id"] is None
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded path still loads
    ds = LatentDataset(out)
    assert load_vae(ds.meta["vae"]).config.latent_channels == ds.sample_shape[0]


@pytest.mark.parametrize(
    "flags",
    [
        ["--resolution", "0"],
        ["--batch-size", "0"],
        ["--shard-size", "-1"],
        ["--num-workers", "-1"],
        ["--scaling-factor", "nan"],
        ["--scaling-factor", "-0.18"],
        ["--throttle", "-1"],
        ["--timeout-hours", "0"],
    ],
)
def test_extract_numeric_flags_are_checked_when_parsed(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and flags[0] in err


def test_stats_flags_are_checked_when_parsed(tmp_path, capsys):
    for flags in (["--max-images", "0"], ["--seed", "-3"]):
        with pytest.raises(SystemExit) as exc:
            main(["stats", "--root", str(tmp_path), *flags])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and flags[0] in err


def test_input_errors_are_one_line(extracted, image_folder, tiny_vae, tmp_path, capsys):
    broken_index = tmp_path / "broken-index"
    shutil.copytree(extracted, broken_index)
    (broken_index / "index.safetensors").write_bytes(b"\x00" * 20)
    not_latents = tmp_path / "empty"
    not_latents.mkdir()
    cases = {
        "missing data dir": (extract_args(tmp_path / "nowhere", tmp_path / "o1", tiny_vae), "nowhere"),
        "VAE that is no folder nor hub id": (
            extract_args(image_folder, tmp_path / "o2", Path("tinyvae")),
            "tinyvae",
        ),
        "verify a folder without meta.json": (["verify", "--root", str(not_latents)], str(not_latents)),
        "corrupt index": (["verify", "--root", str(broken_index)], "index.safetensors"),
        "stats of a missing folder": (["stats", "--root", str(tmp_path / "gone")], "gone"),
    }
    for name, (argv, mentioned) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err, (name, err)
        last = err.splitlines()[-1]  # progress lines ("[racedit-extract] ...") may come before it
        assert last.startswith("racedit-extract: error:") and mentioned in last, (name, err)


def test_shard_hash_files_are_sha256sum_format(extracted):
    from racedit.io import sha256_file

    for k in range(5):
        digest, name = (extracted / f"{shard_name(k)}.sha256").read_text().split()
        assert name == shard_name(k) and digest == sha256_file(extracted / name)
    manifest = json.loads((extracted / "manifest.json").read_text())["files"]
    assert {f"shard-{k:05d}.safetensors" for k in range(5)} <= set(manifest)
    assert np.all([len(v["sha256"]) == 64 for v in manifest.values()])
