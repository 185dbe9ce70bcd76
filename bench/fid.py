"""Benchmark: FID from 2048-d statistics (eigen route vs scipy sqrtm) and Inception feature extraction.

    python -m bench.fid [--repeats 3] [--threads 1] [--batch-size 8]

Timings are interleaved (eigh, sqrtm, eigh, ...) after one warm-up each (bench.common); medians reported. Feature
extraction runs a seeded random-init Inception (same cost as the real weights) on the CPU.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from bench.common import interleaved_medians, print_table
from fid.metrics import frechet_distance


def fid_sqrtm(mu1, s1, mu2, s2) -> float:
    """The classic route (TTUR / pytorch-fid / ADM): scipy.linalg.sqrtm of S1 S2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _stats(rng, d=2048, n=4096):
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 1.0, d) + rng.standard_normal(d) * 0.1
    return x.mean(0), np.cov(x, rowvar=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median reported)")
    p.add_argument("--threads", type=int, default=1, help="BLAS and torch threads")
    p.add_argument("--batch-size", type=int, default=8, help="Inception batch size")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    mu1, s1 = _stats(rng)
    mu2, s2 = _stats(rng)
    with threadpool_limits(limits=args.threads):
        gap = abs(frechet_distance(mu1, s1, mu2, s2) - fid_sqrtm(mu1, s1, mu2, s2))
        fid_times = interleaved_medians(
            {
                "eigh": lambda: frechet_distance(mu1, s1, mu2, s2),
                "sqrtm": lambda: fid_sqrtm(mu1, s1, mu2, s2),
            },
            repeats=args.repeats,
        )
        from fid.inception import InceptionFeatures

        model = InceptionFeatures.random_init(0)
        x = torch.randint(
            0, 256, (args.batch_size, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator()
        )
        with torch.no_grad():
            feat_time = interleaved_medians({"features": lambda: model.features(x)}, repeats=args.repeats)
    ips = args.batch_size / feat_time["features"]
    rows = [
        [
            "FID from 2048-d statistics: eigh route (fid.frechet_distance)",
            f"{fid_times['eigh']:.2f} s",
            "1.00",
        ],
        [
            "FID from 2048-d statistics: scipy.linalg.sqrtm",
            f"{fid_times['sqrtm']:.2f} s",
            f"{fid_times['sqrtm'] / fid_times['eigh']:.2f}x slower",
        ],
        [
            f"Inception pool+spatial features, 256px uint8, CPU, batch {args.batch_size}",
            f"{ips:.2f} images/s",
            "",
        ],
    ]
    print_table(
        f"fid: {args.threads} BLAS/torch thread(s); |FID_eigh - FID_sqrtm| = {gap:.1e}; GPU: not measured",
        ["measurement", "median", "ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
