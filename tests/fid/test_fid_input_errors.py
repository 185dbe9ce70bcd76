"""racedit-fid input errors are one line naming the file (no BadZipFile traceback), numeric flags are
checked at parse time, and image folders are read with the extension list and ADM crop of extraction."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from racedit.cli.fid import main


def _npz(path, arr):
    np.savez(path, arr_0=arr)
    return path


@pytest.fixture
def good_npz(tmp_path):
    return _npz(tmp_path / "good.npz", np.zeros((4, 8, 8, 3), np.uint8))


def _fails_in_one_line(argv, capsys, *mentioned):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("racedit-fid: error:")
    for text in mentioned:
        assert text in err, (text, err)


def test_bad_samples_and_reference_files_are_named(tmp_path, good_npz, capsys):
    garbage = tmp_path / "samples.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip archive")
    truncated = tmp_path / "ref.npz"
    truncated.write_bytes(good_npz.read_bytes()[:100])
    floats = _npz(tmp_path / "floats.npz", np.zeros((4, 8, 8, 3), np.float32))
    grey = _npz(tmp_path / "grey.npz", np.zeros((4, 8, 8), np.uint8))
    run = ["--random-inception", "0", "--no-cache", "--no-progress", "--device", "cpu"]
    _fails_in_one_line(["eval", str(garbage), "--ref", str(good_npz), *run], capsys, str(garbage))
    _fails_in_one_line(["eval", str(good_npz), "--ref", str(truncated), *run], capsys, str(truncated))
    _fails_in_one_line(["eval", str(floats), "--ref", str(good_npz), *run], capsys, str(floats), "uint8")
    _fails_in_one_line(["eval", str(grey), "--ref", str(good_npz), *run], capsys, str(grey), "(N, H, W, 3)")
    _fails_in_one_line(["eval", str(good_npz), "--ref", str(floats), *run], capsys, str(floats), "uint8")
    _fails_in_one_line(["eval", str(good_npz), "--ref", str(tmp_path / "none.npz"), *run], capsys, "none.npz")
    _fails_in_one_line(["eval", str(good_npz), "--ref", str(tmp_path), *run], capsys, "racedit-fid ref")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_in_one_line(["ref", str(empty), "--npz", str(tmp_path / "r.npz"), *run], capsys, str(empty))


@pytest.mark.parametrize(
    "flags",
    [
        ["--batch-size", "0"],
        ["--pr-k", "0"],
        ["--is-split-size", "-5"],
        ["--pr-chunk", "0"],
        ["--image-size", "-1"],
        ["--random-inception", "-1"],
        ["--workers", "0"],
    ],
)
def test_eval_numeric_flags_are_checked_when_parsed(flags, good_npz, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(good_npz), "--ref", str(good_npz), *flags])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and flags[0] in err


def test_ref_numeric_flags_are_checked_when_parsed(good_npz, tmp_path, capsys):
    for flags in (["--num-ref-images", "0"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(["ref", str(good_npz), "--npz", str(tmp_path / "r.npz"), *flags])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and flags[0] in err


def test_folders_use_the_extraction_extension_list_and_crop(tmp_path):
    import fid.data
    import racedit.data.imagefolder as imagefolder

    assert fid.data.adm_center_crop is imagefolder.adm_center_crop  # one ADM crop
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("x.JPEG", "y.ppm", "z.Png", "w.tif", "v.webp"):  # names the old fid list missed or matched
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "a" / name)
    (root / "a" / "notes.txt").write_text("not an image")
    src = fid.data.FolderImages(root, image_size=16)
    listed = imagefolder.list_image_folder(root)
    assert [p.relative_to(root).as_posix() for p in src.files] == [rel for rel, _ in listed.files]
    assert len(src.files) == 5
    with Image.open(src.files[0]) as im:
        want = imagefolder.adm_center_crop(im.convert("RGB"), 16)
    assert np.array_equal(src.load(0), want)
