"""Encode an image-folder dataset into VAE latent shards; verify them; report their stats.

The library behind the ``racedit-extract`` command (``racedit/cli/extract.py``), one function per
subcommand:

``extract_latents``  ImageFolder tree -> ADM center crop -> diffusers ``AutoencoderKL`` -> for each image *and its
             horizontal flip* the posterior mean and std (fp16), in shards with a label index and a
             metadata file (format: ``racedit/data/format.py``). Several processes (``torchrun`` or
             ``accelerate launch``) each take shards ``k`` with ``k % world_size == rank``. Resumable: a
             rerun of the same command skips finished shards and redoes only unfinished ones (shards are
             written atomically), even with another number of processes. Unreadable images are listed in
             ``report.json`` and excluded.
``verify``   checks every file's content hash against ``manifest.json`` (a single flipped byte fails), and
             every shard against the index and metadata (counts, shapes, dtypes, labels, finite values,
             every image exactly once).
``latent_stats`` per-channel mean and std of the scaled latents the trainer will see: a wrong scaling
             factor shows up as a std far from 1.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from racedit.data.format import (
    FILES_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    META_FILE,
    PLAN_FILE,
    REPORT_FILE,
    LatentFormatError,
    SafetensorsHeader,
    check_shard_header,
    fingerprint,
    hash_name,
    load_index,
    load_meta,
    read_json,
    read_shard_hash,
    shard_name,
    write_safetensors,
    write_shard_hash,
)
from racedit.data.imagefolder import ImageListDataset, collate_items, list_image_folder
from racedit.data.latents import LatentDataset
from racedit.distributed import process_state
from racedit.errors import UserError
from racedit.io import atomic_write_json, check_manifest, remove_stale_temporaries, sha256_file
from racedit.progress import progress as progress_bar
from racedit.progress import say
from racedit.vae import DEFAULT_VAE, load_vae, resolve_vae

PROG = "racedit-extract"  # the prefix of the messages
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # VAE compute precisions
FP16_MAX = 65504.0
# Settings a shard's content depends on; a rerun must match them to resume (batch size, workers do not).
_PLAN_KEYS = (
    "data_dir",
    "vae",
    "vae_subfolder",
    "vae_config",
    "resolution",
    "shard_size",
    "encode_dtype",
    "scaling_factor",
    "shift_factor",
    "latent_shape",
)


class ExtractError(UserError):
    """Extraction cannot proceed; the message names the problem and the fix."""


def _log(msg: str) -> None:
    say(PROG, msg)


# ---------------------------------------------------------------------------------------------------
# VAE (loaded by racedit.vae: the one loader every command uses)
# ---------------------------------------------------------------------------------------------------


def vae_properties(vae: Any, resolution: int, scaling_factor: float | None) -> dict[str, Any]:
    """Scaling factor, shift, latent shape and the JSON config of a diffusers AutoencoderKL."""
    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    cfg = json.loads(json.dumps(cfg, default=list))
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if resolution % factor:
        raise ExtractError(
            f"--resolution {resolution} is not a multiple of the VAE downsampling factor {factor}"
        )
    sf = scaling_factor if scaling_factor is not None else cfg.get("scaling_factor")
    if sf is None:
        raise ExtractError(
            "the VAE config has no scaling_factor; pass --scaling-factor (0.18215 for SD VAEs)"
        )
    shift = cfg.get("shift_factor")
    return {
        "vae_config": cfg,
        "scaling_factor": float(sf),
        "shift_factor": float(shift) if shift is not None else 0.0,
        "latent_shape": [int(cfg["latent_channels"]), resolution // factor, resolution // factor],
        "downsample_factor": factor,
    }


@torch.inference_mode()
def encode_batch(vae: Any, images: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (b, 3, R, R) -> posterior mean and std, float16 (b, 2, C, h, w); [:, 1] is the flip."""
    device = next(vae.parameters()).device
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)  # (b, 3, R, R) in [-1, 1]
    x = torch.cat([x, x.flip(-1)]).to(dtype)  # (2b, 3, R, R): images, then their flips
    dist = vae.encode(x).latent_dist
    mean, std = dist.mean.float(), dist.std.float()  # (2b, C, h, w)
    b = images.shape[0]
    mean = torch.stack([mean[:b], mean[b:]], dim=1)  # (b, 2, C, h, w)
    std = torch.stack([std[:b], std[b:]], dim=1)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise ExtractError("the VAE produced non-finite latents; encode in fp32 (--dtype fp32)")
    if mean.abs().max() > FP16_MAX:
        raise ExtractError(f"latent mean {mean.abs().max():.3g} overflows float16; is this a KL-VAE?")
    return mean.half().cpu().numpy(), std.half().cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# Plan: the ordered file list and the settings, fixed by the first run and reused by reruns
# ---------------------------------------------------------------------------------------------------


def make_or_check_plan(out: Path, data_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write plan.json + files.json on the first run; on a rerun check the settings match. Main process only."""
    plan_path = out / PLAN_FILE
    if plan_path.is_file() and (out / FILES_FILE).is_file():
        plan = read_json(plan_path, "plan file")
        diff = [k for k in _PLAN_KEYS if plan["settings"].get(k) != settings.get(k)]
        if diff:
            lines = "\n".join(
                f"  {k}: was {plan['settings'].get(k)!r}, now {settings.get(k)!r}" for k in diff
            )
            raise ExtractError(
                f"{out} holds an extraction made with other settings:\n{lines}\n"
                "Rerun with the original settings to resume it, or choose a new --out directory."
            )
        return plan
    if (out / META_FILE).exists() or any(out.glob("shard-*.safetensors")):
        raise ExtractError(f"{out} holds shards but no {PLAN_FILE}; choose an empty --out directory")
    _log(f"listing {data_dir} ...")
    try:
        listing = list_image_folder(data_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ExtractError(str(err)) from None
    if not listing.files:
        raise ExtractError(f"no images found under {data_dir}/<class>/ (extensions .jpg .jpeg .png ...)")
    if listing.ignored:
        _log(f"{len(listing.ignored)} files without an image extension are ignored (listed in {REPORT_FILE})")
    n = len(listing.files)
    num_shards = (n + settings["shard_size"] - 1) // settings["shard_size"]
    atomic_write_json(
        out / FILES_FILE,
        {"class_names": listing.class_names, "files": listing.files, "ignored": listing.ignored},
        indent=None,  # 1.28M entries for ImageNet: keep it compact
    )
    plan = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "fingerprint": fingerprint(settings),
        "num_files": n,
        "num_shards": num_shards,
    }
    atomic_write_json(plan_path, plan)  # written after files.json: a plan on disk always has its file list
    return plan


# ---------------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------------


def _shard_done(out: Path, k: int, latent_shape: tuple[int, int, int], fprint: str) -> bool:
    """Whether finished shard k can be kept: its header fits the plan and its bytes match its hash."""
    path = out / shard_name(k)
    if not path.is_file():
        return False
    try:
        check_shard_header(SafetensorsHeader(path), latent_shape, None, fprint)
    except LatentFormatError as err:
        _log(f"redoing {path.name}: {err}")
        return False
    recorded = read_shard_hash(out, k)
    if recorded is None:  # killed between the shard and its hash: the shard is complete (atomic)
        write_shard_hash(out, k)
    elif sha256_file(path) != recorded:
        _log(f"redoing {path.name}: its content differs from the hash in {hash_name(k)} (corrupted on disk)")
        return False
    return True


def _encode_shards(
    vae: Any,
    data_dir: Path,
    files: list[tuple[str, int]],
    shards: list[int],
    plan: dict[str, Any],
    out: Path,
    *,
    batch_size: int,
    num_workers: int,
    throttle: float,
    show_progress: bool,
) -> None:
    """Encode the given shards in order; each is written (atomically) as soon as its last batch is done."""
    settings = plan["settings"]
    size, n_files = settings["shard_size"], plan["num_files"]
    latent_shape = tuple(settings["latent_shape"])
    dtype = DTYPES[settings["encode_dtype"]]
    batches: list[list[int]] = []
    ends: list[int | None] = []  # shard index when the batch closes a shard, else None
    for k in shards:
        idx = list(range(k * size, min((k + 1) * size, n_files)))
        for j in range(0, len(idx), batch_size):
            batches.append(idx[j : j + batch_size])
            ends.append(k if j + batch_size >= len(idx) else None)
    dataset = ImageListDataset(data_dir, files, settings["resolution"])
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_items,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    total = sum(len(b) for b in batches)
    bar = progress_bar(total=total, unit="img", desc="encoding", disable=not show_progress)
    means: list[np.ndarray] = []
    stds: list[np.ndarray] = []
    labels: list[int] = []
    indices: list[int] = []
    excluded: list[dict[str, str]] = []
    for batch, end in zip(loader, ends):
        good = [item for item in batch if item[1] is not None]
        for i, _, _, error in batch:
            if error:
                excluded.append({"path": files[i][0], "error": error})
        if good:
            mean, std = encode_batch(vae, torch.stack([item[1] for item in good]), dtype)
            means.append(mean)
            stds.append(std)
            labels.extend(item[2] for item in good)
            indices.extend(item[0] for item in good)
        bar.update(len(batch))
        if end is not None:
            empty = np.zeros((0, 2, *latent_shape), np.float16)
            tensors = {
                "mean": np.concatenate(means) if means else empty,
                "std": np.concatenate(stds) if stds else empty,
                "labels": np.asarray(labels, np.int64),
                "file_index": np.asarray(indices, np.int64),
            }
            meta = {
                "format_version": FORMAT_VERSION,
                "shard": end,
                "count": len(labels),
                "fingerprint": plan["fingerprint"],
                "excluded": excluded,
            }
            write_safetensors(out / shard_name(end), tensors, meta)
            write_shard_hash(out, end)
            for e in excluded:
                _log(f"excluded unreadable image {e['path']} ({e['error']})")
            means, stds, labels, indices, excluded = [], [], [], [], []
            bar.set_postfix(shard=end, refresh=False)
        if throttle > 0:
            time.sleep(throttle)
    bar.close()


def _write_manifest(out: Path, num_shards: int) -> None:
    """manifest.json: size and SHA-256 of every file of the extraction; shard hashes come from their
    ``.sha256`` files (hashed when written), so a 40 GB extraction is not read again here."""
    files = {}
    for k in range(num_shards):
        name = shard_name(k)
        digest = read_shard_hash(out, k) or write_shard_hash(out, k)
        files[name] = {"size": (out / name).stat().st_size, "sha256": digest}
    for name in (PLAN_FILE, FILES_FILE, INDEX_FILE, REPORT_FILE):
        files[name] = {"size": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    atomic_write_json(out / MANIFEST_FILE, {"files": files})


def finalize(
    out: Path, plan: dict[str, Any], vae: dict[str, Any], file_list: dict[str, Any]
) -> dict[str, Any]:
    """Gather all shards into index.safetensors, report.json, manifest.json and (last) meta.json.
    Main process only. ``vae``: the VAE's record (``racedit.vae.VAESource.record``)."""
    settings = plan["settings"]
    latent_shape = tuple(settings["latent_shape"])
    labels, file_index, counts, excluded = [], [], [], []
    for k in range(plan["num_shards"]):
        header = SafetensorsHeader(out / shard_name(k))
        check_shard_header(header, latent_shape, None, plan["fingerprint"])
        labels.append(np.array(header.memmap("labels")))
        file_index.append(np.array(header.memmap("file_index")))
        counts.append(len(labels[-1]))
        excluded.extend(header.metadata["excluded"])
    labels_all = np.concatenate(labels)
    index_all = np.concatenate(file_index)
    excluded_idx = {e["path"] for e in excluded}
    if len(np.unique(index_all)) != len(index_all) or len(index_all) + len(excluded_idx) != plan["num_files"]:
        raise ExtractError(
            f"shards of {out} do not cover the {plan['num_files']} files exactly once "
            f"({len(index_all)} encoded, {len(excluded_idx)} excluded); delete the directory and re-extract"
        )
    write_safetensors(
        out / INDEX_FILE,
        {"labels": labels_all, "file_index": index_all, "shard_counts": np.asarray(counts, np.int64)},
        {"format_version": FORMAT_VERSION, "fingerprint": plan["fingerprint"]},
    )
    class_names = file_list["class_names"]
    atomic_write_json(
        out / REPORT_FILE,
        {
            "num_files": plan["num_files"],
            "num_encoded": int(len(index_all)),
            "num_excluded": len(excluded),
            "excluded": excluded,
            "ignored_not_images": file_list.get("ignored", []),
        },
    )
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **vae,
        "scaling_factor": settings["scaling_factor"],
        "shift_factor": settings["shift_factor"],
        "resolution": settings["resolution"],
        "latent_shape": list(latent_shape),
        "crop": "adm_center_crop",
        "flip": True,
        "stores": "mean and std of the VAE posterior, float16, (n, 2, C, h, w); [:, 1] = horizontal flip",
        "encode_dtype": settings["encode_dtype"],
        "class_names": class_names,
        "num_classes": len(class_names),
        "num_images": int(len(labels_all)),
        "num_excluded": len(excluded),
        "class_counts": np.bincount(labels_all, minlength=len(class_names)).tolist(),
        "num_shards": plan["num_shards"],
        "shard_size": settings["shard_size"],
        "source": settings["data_dir"],
        "fingerprint": plan["fingerprint"],
        "vae_config": settings["vae_config"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_manifest(out, plan["num_shards"])
    atomic_write_json(out / META_FILE, meta)  # last: its presence marks a complete extraction
    return meta


def extract_latents(
    data_dir: str | Path,
    out: str | Path,
    *,
    vae: str = DEFAULT_VAE,
    vae_subfolder: str | None = None,
    resolution: int = 256,
    batch_size: int = 32,
    shard_size: int = 4096,
    num_workers: int = 0,
    dtype: str = "fp32",
    scaling_factor: float | None = None,
    device: str | None = None,
    timeout_hours: float = 12.0,
    throttle: float = 0.0,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Encode ``data_dir/<class>/<image>`` into shards under ``out`` (resumable; every process of a launch
    takes shards ``k % world_size == rank``). Returns ``meta.json``'s content on the main process, else None.
    ``device``: as ``racedit.distributed.process_state`` takes it; ``throttle``: seconds to sleep after each
    batch (for tests of interruption and resume)."""
    state = process_state(device, timeout=datetime.timedelta(hours=timeout_hours))
    out = Path(out).expanduser().resolve()
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir() and not (out / PLAN_FILE).is_file():  # a resume only needs files.json
        raise ExtractError(f"--data-dir {data_dir} is not a folder; expected <data-dir>/<class name>/<image>")
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    source = resolve_vae(vae, vae_subfolder)  # a local folder is recorded absolute
    autoencoder = load_vae(source, state.device, DTYPES[dtype])
    props = vae_properties(autoencoder, resolution, scaling_factor)
    settings = {
        "data_dir": str(data_dir),
        "vae": source.name,
        "vae_subfolder": source.subfolder,
        "resolution": resolution,
        "shard_size": shard_size,
        "encode_dtype": dtype,
        **{k: props[k] for k in ("vae_config", "scaling_factor", "shift_factor", "latent_shape")},
    }
    if state.is_main_process:
        removed = remove_stale_temporaries(out)
        if removed:
            _log(f"removed {len(removed)} partial files of an interrupted run")
        make_or_check_plan(out, data_dir, settings)
    state.wait_for_everyone()
    plan = read_json(out / PLAN_FILE, "plan file")
    if not state.is_main_process:  # the main process has checked them; all processes must agree
        diff = [k for k in _PLAN_KEYS if plan["settings"].get(k) != settings.get(k)]
        if diff:
            raise ExtractError(f"process {state.process_index} sees other settings than the plan: {diff}")
    file_list = read_json(out / FILES_FILE, "file list")
    files = [(rel, int(label)) for rel, label in file_list["files"]]
    latent_shape = tuple(plan["settings"]["latent_shape"])
    rank, world = state.process_index, state.num_processes
    mine = [k for k in range(plan["num_shards"]) if k % world == rank]
    todo = [k for k in mine if not _shard_done(out, k, latent_shape, plan["fingerprint"])]
    _log(
        f"process {rank}/{world} on {state.device}: {len(todo)} of its {len(mine)} shards to encode "
        f"({plan['num_files']} images, {plan['num_shards']} shards of {plan['settings']['shard_size']} in all)"
    )
    if todo:
        _encode_shards(
            autoencoder,
            data_dir,
            files,
            todo,
            plan,
            out,
            batch_size=batch_size,
            num_workers=num_workers,
            throttle=throttle,
            show_progress=progress and state.is_local_main_process,
        )
    state.wait_for_everyone()
    meta = None
    if state.is_main_process:
        meta = finalize(out, plan, source.record(), file_list)
        _log(
            f"done: {meta['num_images']} images in {meta['num_shards']} shards, {meta['num_excluded']} "
            f"excluded (see {out / REPORT_FILE}); latents {meta['latent_shape']}, scaling factor "
            f"{meta['scaling_factor']}"
        )
    state.wait_for_everyone()
    return meta


# ---------------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------------


def verify(root: str | Path, quick: bool = False, progress: bool = True) -> list[str]:
    """Check every file's content hash (unless ``quick``) and every shard against the index and metadata;
    returns the problems found (empty: all good)."""
    root = Path(root)
    meta = load_meta(root)
    problems: list[str] = []
    if not quick:
        if (root / MANIFEST_FILE).is_file():
            problems += check_manifest(root, MANIFEST_FILE)
        else:
            problems.append(
                f"{root / MANIFEST_FILE} is missing, so content hashes cannot be checked (an extraction by an "
                "older racedit-extract); rerun the same `racedit-extract extract` command to write it"
            )
    index = load_index(root)
    latent_shape = tuple(meta["latent_shape"])
    counts = index["shard_counts"]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if len(counts) != meta["num_shards"]:
        problems.append(f"index lists {len(counts)} shards, meta.json says {meta['num_shards']}")
    if int(offsets[-1]) != meta["num_images"] or len(index["labels"]) != meta["num_images"]:
        problems.append(f"index holds {len(index['labels'])} images, meta.json says {meta['num_images']}")
    extra = sorted(
        p.name for p in root.glob("shard-*.safetensors") if int(p.stem.split("-")[1]) >= len(counts)
    )
    if extra:
        problems.append(f"shard files not in the index: {extra}")
    fidx = index["file_index"]
    if len(np.unique(fidx)) != len(fidx):
        problems.append("some images occur more than once (duplicate file_index entries)")
    labels = index["labels"]
    if len(labels) and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
        problems.append(f"labels outside [0, {meta['num_classes']})")
    if np.bincount(labels, minlength=meta["num_classes"]).tolist() != meta["class_counts"]:
        problems.append("class_counts in meta.json do not match the index labels")
    plan_path = root / PLAN_FILE
    if plan_path.is_file():
        plan = read_json(plan_path, "plan file")
        if meta["num_images"] + meta["num_excluded"] != plan["num_files"]:
            problems.append(
                f"{meta['num_images']} encoded + {meta['num_excluded']} excluded != {plan['num_files']} files"
            )
    for k in progress_bar(range(len(counts)), desc="verifying shards", unit="shard", disable=not progress):
        path = root / shard_name(k)
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        try:
            header = SafetensorsHeader(path)
            check_shard_header(header, latent_shape, int(counts[k]), meta["fingerprint"])
        except LatentFormatError as err:
            problems.append(str(err))
            continue
        if not np.array_equal(header.memmap("labels"), labels[lo:hi]):
            problems.append(f"{path.name}: labels differ from the index")
        if not np.array_equal(header.memmap("file_index"), fidx[lo:hi]):
            problems.append(f"{path.name}: file_index differs from the index")
        if quick:
            continue
        for name in ("mean", "std"):
            arr = header.memmap(name)
            for j in range(0, len(arr), 1024):  # chunks bound the memory used
                chunk = np.asarray(arr[j : j + 1024], dtype=np.float32)
                if not np.isfinite(chunk).all():
                    problems.append(f"{path.name}: non-finite values in '{name}' (items {j}..{j + 1023})")
                    break
                if name == "std" and (chunk < 0).any():
                    problems.append(f"{path.name}: negative std (items {j}..{j + 1023})")
                    break
    return problems


# ---------------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------------


def latent_stats(root: str | Path, max_images: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Per-channel mean/std of the latents the trainer sees (one posterior draw, random flip, scaled)."""
    ds = LatentDataset(root, seed=seed)
    n = len(ds)
    rng = np.random.default_rng(seed)
    pick = np.arange(n) if n <= max_images else np.sort(rng.choice(n, size=max_images, replace=False))
    C = ds.sample_shape[0]
    s1 = np.zeros(C, np.float64)
    s2 = np.zeros(C, np.float64)
    per_item = ds.sample_shape[1] * ds.sample_shape[2]
    for i in progress_bar(pick, desc="latent stats", unit="img", disable=len(pick) < 2000):
        x = ds[int(i)][0].double().reshape(C, -1).numpy()  # (C, h*w)
        s1 += x.sum(1)
        s2 += (x * x).sum(1)
    count = len(pick) * per_item
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
    overall_mean = s1.sum() / (count * C)
    overall_std = float(np.sqrt(max(s2.sum() / (count * C) - overall_mean**2, 0.0)))
    sf = ds.meta["scaling_factor"]
    return {
        "root": str(root),
        "images": int(len(pick)),
        "scaling_factor": sf,
        "channel_mean": mean.tolist(),
        "channel_std": std.tolist(),
        "mean": float(overall_mean),
        "std": overall_std,
        "unit_std_scaling_factor": sf / overall_std if overall_std > 0 else None,
    }
