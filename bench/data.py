"""Data pipeline throughput: extraction images/s and loader samples/s against what a training step consumes.

Extraction (CPU; a tiny random AutoencoderKL with SD-VAE's layout (4 latent channels, /8) but 4
channels wide, so the row measures the pipeline around the VAE rather than the VAE itself):
- decode + ADM center crop of ImageNet-sized JPEGs (PIL, one process);
- VAE encode of the image and its flip;
- the whole ``racedit-extract extract`` command (listing, decode, encode, shard writes), 0 and 2 workers;
- optionally (``--sd-vae``) the real SD-VAE architecture with random weights (minutes per image on a
  small CPU).
Loading: ``LatentDataset`` on synthetic shards of 256 px latents (4, 32, 32) and ``DigitsDataset``,
item by item and through DataLoaders, against the samples/s that a training step of a DiT consumes
on the same machine (forward, loss, backward, AdamW). "headroom" = loader samples/s / step
samples/s; above 1 the loader keeps up. All rows are timed interleaved (warm-up, repeats, median).

    python -m bench.data                 # a few minutes on 2 CPU cores
    python -m bench.data --repeats 5 --sd-vae
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import interleaved_medians, print_table
from racedit.cli.extract import main as extract_main
from racedit.data import DigitsDataset, LatentDataset
from racedit.data.extract import encode_batch
from racedit.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    shard_name,
    write_safetensors,
)
from racedit.data.imagefolder import load_image
from racedit.io import atomic_write_json
from racedit.models.registry import SIZES
from racedit.vae import load_vae


def tiny_vae(path: Path, sd_layout: bool = False) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    widths = (128, 256, 512, 512) if sd_layout else (4, 4, 4, 4)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=2 if sd_layout else 1,
        latent_channels=4,
        norm_num_groups=32 if sd_layout else 2,
    ).save_pretrained(path)
    return path


def image_folder(root: Path, n: int) -> Path:
    """``n`` random-noise JPEGs of ImageNet-like sizes (about 500x375) in 4 class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = (375, 500) if i % 2 else (500, 400)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def synthetic_latents(root: Path, n: int, shape: tuple[int, int, int], shard_size: int = 4096) -> Path:
    """A latent directory in the extraction format with random content (no VAE needed)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    counts, all_labels = [], []
    fprint = "synthetic"
    for k, lo in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - lo)
        all_labels.append(rng.integers(0, 1000, m).astype(np.int64))
        write_safetensors(
            root / shard_name(k),
            {
                "mean": rng.standard_normal((m, 2, *shape)).astype(np.float16),
                "std": np.full((m, 2, *shape), 0.1, np.float16),
                "labels": all_labels[-1],
                "file_index": np.arange(lo, lo + m, dtype=np.int64),
            },
            {"format_version": FORMAT_VERSION, "shard": k, "count": m, "fingerprint": fprint, "excluded": []},
        )
        counts.append(m)
    labels = np.concatenate(all_labels)
    write_safetensors(
        root / INDEX_FILE,
        {"labels": labels, "file_index": np.arange(n, dtype=np.int64), "shard_counts": np.asarray(counts)},
        {"format_version": FORMAT_VERSION, "fingerprint": fprint},
    )
    atomic_write_json(
        root / META_FILE,
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vae": "synthetic",
            "scaling_factor": 0.18215,
            "shift_factor": 0.0,
            "resolution": shape[1] * 8,
            "latent_shape": list(shape),
            "class_names": [str(i) for i in range(1000)],
            "num_classes": 1000,
            "num_images": n,
            "num_excluded": 0,
            "class_counts": np.bincount(labels, minlength=1000).tolist(),
            "num_shards": len(counts),
            "shard_size": shard_size,
            "fingerprint": fprint,
        },
    )
    return root


def train_step_fn(input_size: int, in_channels: int, batch: int, num_classes: int, device: str, **model_kw):
    """One DiT training step (forward, epsilon MSE, backward, AdamW) on random data of the given shape."""
    from racedit.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **model_kw).to(
        device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, in_channels, input_size, input_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        out = model(x, t, y)
        loss = (out[:, :in_channels] - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def drain(loader: torch.utils.data.DataLoader) -> None:
    for _ in loader:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median reported)")
    parser.add_argument("--images", type=int, default=16, help="JPEGs in the extraction benchmark folder")
    parser.add_argument("--resolution", type=int, default=256, help="extraction resolution")
    parser.add_argument("--latents", type=int, default=8192, help="items in the synthetic latent dataset")
    parser.add_argument(
        "--dit",
        choices=sorted(SIZES),
        default=None,
        help="size of the DiT-*/2 whose training step is the reference (default: XL on CUDA, S on CPU)",
    )
    parser.add_argument(
        "--train-batch", type=int, default=None, help="batch of that training step (default: 32 CUDA, 4 CPU)"
    )
    parser.add_argument(
        "--sd-vae", action="store_true", help="also time the SD-VAE architecture (slow on CPU)"
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.dit or ("XL" if device == "cuda" else "S")
    batch = args.train_batch or (32 if device == "cuda" else 4)

    tmp = Path(tempfile.mkdtemp(prefix="racedit-bench-data-"))
    vae_dir = tiny_vae(tmp / "vae")
    folder = image_folder(tmp / "images", args.images)
    files = sorted(folder.rglob("*.jpg"))
    vae = load_vae(str(vae_dir))
    R = args.resolution
    crops = torch.stack([load_image(f, R) for f in files[:8]])  # (8, 3, R, R) uint8
    runs = itertools.count()

    def extract(workers: int) -> None:
        argv = [
            "extract",
            "--data-dir",
            str(folder),
            "--out",
            str(tmp / f"out{next(runs)}"),
            "--vae",
            str(vae_dir),
        ]
        argv += ["--resolution", str(R), "--batch-size", "16", "--num-workers", str(workers)]
        with contextlib.redirect_stderr(io.StringIO()):
            assert extract_main(argv) == 0

    ex_fns = {
        "decode + ADM crop (PIL, 1 process)": lambda: [load_image(f, R) for f in files[:16]],
        "tiny VAE encode, image + flip": lambda: encode_batch(vae, crops, torch.float32),
        "racedit-extract extract, 0 workers": lambda: extract(0),
        "racedit-extract extract, 2 workers": lambda: extract(2),
    }
    ex_items = [16, 8, len(files), len(files)]
    if args.sd_vae:
        sd = load_vae(str(tiny_vae(tmp / "sdvae", sd_layout=True)))
        ex_fns["SD-VAE architecture encode, image + flip"] = lambda: encode_batch(
            sd, crops[:1], torch.float32
        )
        ex_items.append(1)
    ex_times = interleaved_medians(ex_fns, repeats=args.repeats, warmup=1)
    print_table(
        f"Extraction throughput at {R}px (CPU; tiny random AutoencoderKL unless noted)",
        ["stage", "images/s", "ms/image"],
        [[name, n / s, 1000 * s / n] for (name, s), n in zip(ex_times.items(), ex_items)],
    )

    # ---- loading against a training step ----
    root = synthetic_latents(tmp / "latents", args.latents, (4, 32, 32))
    lat = LatentDataset(root)
    sub = torch.utils.data.Subset(lat, range(min(2048, len(lat))))
    loader0 = torch.utils.data.DataLoader(sub, batch_size=256, shuffle=True, num_workers=0)
    loader2 = torch.utils.data.DataLoader(
        sub, batch_size=256, shuffle=True, num_workers=2, persistent_workers=True
    )
    digits = DigitsDataset("train")
    dloader = torch.utils.data.DataLoader(digits, batch_size=256, shuffle=True, num_workers=0)
    depth, width, heads = SIZES[size]
    step_s2 = train_step_fn(32, 4, batch, 1000, device, hidden_size=width, depth=depth, num_heads=heads)
    step_digits = train_step_fn(8, 1, 64, 10, device, hidden_size=128, depth=4, num_heads=4)
    ld_fns = {
        "LatentDataset[i], 256px latents": lambda: [lat[i] for i in range(512)],
        "DataLoader(latents, batch 256, 0 workers)": lambda: drain(loader0),
        "DataLoader(latents, batch 256, 2 workers)": lambda: drain(loader2),
        "DataLoader(digits 8x8, batch 256, 0 workers)": lambda: drain(dloader),
        f"train step DiT-{size}/2 ({device}) on 32x32x4 latents, batch {batch}": step_s2,
        f"train step DiT (D=128, depth 4, {device}) on 8x8 digits, batch 64": step_digits,
    }
    items = [512, len(sub), len(sub), len(digits), batch, 64]
    times = interleaved_medians(ld_fns, repeats=args.repeats, warmup=1)
    rates = {name: n / s for (name, s), n in zip(times.items(), items)}
    names = list(rates)
    latent_step = rates[names[4]]
    digits_step = rates[names[5]]
    rows = [
        [names[0], rates[names[0]], rates[names[0]] / latent_step],
        [names[1], rates[names[1]], rates[names[1]] / latent_step],
        [names[2], rates[names[2]], rates[names[2]] / latent_step],
        [names[4], latent_step, 1.0],
        [names[3], rates[names[3]], rates[names[3]] / digits_step],
        [names[5], digits_step, 1.0],
    ]
    print_table(
        "Loader samples/s against the samples/s a training step consumes (CPU; headroom = loader / step)",
        ["what", "samples/s", "headroom"],
        rows,
    )
    if device == "cpu":
        print(
            "\nGPU: not measured (no GPU in this run). A DiT-XL/2 step on a GPU consumes far more samples/s "
            "than the CPU steps above; rerun this on a GPU machine (the step then runs there) before "
            "relying on few loader workers."
        )


if __name__ == "__main__":
    main()
