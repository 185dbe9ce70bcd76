"""The ADM metrics from features: FID, sFID, Inception Score, precision/recall; KID as an extra.

Definitions follow docs/spec/evaluation.md, "FID", "sFID", "IS" and "Precision and recall", i.e.
guided-diffusion's ``evaluations/evaluator.py``. Everything here works on features (numpy or torch), not
images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------- FID / sFID


@dataclass
class Statistics:
    """Gaussian statistics of features, float64: mean (D,) and covariance (D, D)."""

    mu: np.ndarray
    sigma: np.ndarray


def feature_statistics(features: np.ndarray | torch.Tensor, chunk: int = 8192) -> Statistics:
    """Mean and unbiased covariance (``np.cov(x, rowvar=False)``) in float64, two passes over row chunks.

    features: (N, D). Memory stays O(chunk * D + D^2) even for 50k x 2048.
    """
    x = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
    mu = np.zeros(d, dtype=np.float64)
    for i in range(0, n, chunk):
        mu += x[i : i + chunk].astype(np.float64).sum(axis=0)
    mu /= n
    sigma = np.zeros((d, d), dtype=np.float64)
    for i in range(0, n, chunk):
        c = x[i : i + chunk].astype(np.float64) - mu  # (chunk, D)
        sigma += c.T @ c
    sigma /= n - 1
    return Statistics(mu, sigma)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}), where (docs/spec/evaluation.md, "FID") the trace
    term is sum_i sqrt(lambda_i) over the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}
    (similar to S1 S2, so the same spectrum): eigh instead of scipy's sqrtm, same value to ~1e-10.
    Tiny negative eigenvalues from round-off are clipped to zero.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)  # S1 = V diag(w) V^T
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^{1/2}
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_statistics(a: Statistics, b: Statistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ----------------------------------------------------------------------------- Inception Score


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = 5000) -> tuple[float, float]:
    """ADM's Inception Score from unbiased logits (N, 1008): (mean, std) over contiguous splits.

    Splits are consecutive, unshuffled blocks of ``split_size`` (the last may be shorter), as ADM:
    50,000 samples -> 10 splits of 5000. Per split, exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j))).
    Computed in float64 with log-softmax (a probability that underflows contributes its limit 0).
    """
    logits = _as_tensor(logits)
    logp = torch.log_softmax(logits.to(torch.float64), dim=1)  # (N, C)
    scores = []
    for begin in range(0, logp.shape[0], split_size):
        part = logp[begin : begin + split_size]
        p = part.exp()
        log_marginal = torch.log(p.mean(dim=0, keepdim=True))  # (1, C)
        kl = (p * (part - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall


def _round_half(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, precision: str = "adm") -> torch.Tensor:
    """Squared Euclidean distances (A, B) between rows of u (A, D) and v (B, D), as ADM's DistanceBlock.

    ``precision="adm"``: ADM computes the block in float16 (inputs, squares, norms, the product and each
    sum rounded to half; reductions and the matmul accumulated in fp32), and recomputes it in float32 if any entry is not finite.
    ``"fp32"``: float32 throughout. Either way D = max(|u|^2 - 2 u.v + |v|^2, 0).
    """

    def block(a: torch.Tensor, b: torch.Tensor, rnd) -> torch.Tensor:
        na = rnd(rnd(a * a).sum(dim=1, keepdim=True))  # (A, 1)
        nb = rnd(rnd(b * b).sum(dim=1)[None, :])  # (1, B)
        ab2 = rnd(2.0 * rnd(a @ b.T))  # (A, B)
        return torch.clamp(rnd(rnd(na - ab2) + nb), min=0.0)

    u, v = u.to(torch.float32), v.to(torch.float32)
    if precision == "adm":
        d = block(_round_half(u), _round_half(v), _round_half)
        if torch.isfinite(d).all():
            return d
    elif precision != "fp32":
        raise ValueError(f"precision must be 'adm' or 'fp32', got {precision!r}")
    return block(u, v, lambda t: t)


def manifold_radii(
    features: torch.Tensor, k: int = 3, chunk: int = 10000, precision: str = "adm"
) -> torch.Tensor:
    """Distance (squared) of each point to its k-th nearest neighbour in the same set, self included at
    rank 0 (ADM's ``ManifoldEstimator.manifold_radii``, nhood_sizes=(k,)): (N,) float32.

    Column blocks are folded into a running k+1 smallest per row, so memory is O(chunk^2).
    """
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} feature vectors for k-NN radii, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, chunk):
        rows = features[r0 : r0 + chunk]
        best = None  # (R, k+1) smallest distances so far
        for c0 in range(0, n, chunk):
            d = pairwise_sq_distances(rows, features[c0 : c0 + chunk], precision)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + chunk] = best.max(dim=1).values  # the (k+1)-th smallest = k-th neighbour
    return radii


def precision_recall(
    ref: torch.Tensor | np.ndarray,
    samples: torch.Tensor | np.ndarray,
    k: int = 3,
    chunk: int = 10000,
    precision: str = "adm",
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's semantics: (precision, recall).

    precision: fraction of samples within the k-NN ball (radius = squared distance, ``<=``) of some
    reference point; recall: fraction of reference points within the ball of some sample. ref (N1, D),
    samples (N2, D); all pairwise work in (chunk, chunk) blocks.
    """
    ref_t, smp_t = _as_tensor(ref), _as_tensor(samples)
    ref_t, smp_t = (
        ref_t.to(device or ref_t.device, torch.float32),
        smp_t.to(device or ref_t.device, torch.float32),
    )
    radii_ref = manifold_radii(ref_t, k, chunk, precision)  # (N1,)
    radii_smp = manifold_radii(smp_t, k, chunk, precision)  # (N2,)
    ref_in = torch.zeros(ref_t.shape[0], dtype=torch.bool, device=ref_t.device)
    smp_in = torch.zeros(smp_t.shape[0], dtype=torch.bool, device=ref_t.device)
    for r0 in range(0, ref_t.shape[0], chunk):
        r1 = min(r0 + chunk, ref_t.shape[0])
        for s0 in range(0, smp_t.shape[0], chunk):
            s1 = min(s0 + chunk, smp_t.shape[0])
            d = pairwise_sq_distances(ref_t[r0:r1], smp_t[s0:s1], precision)  # (R, S)
            ref_in[r0:r1] |= (d <= radii_smp[None, s0:s1]).any(dim=1)
            smp_in[s0:s1] |= (d <= radii_ref[r0:r1, None]).any(dim=0)
    return float(smp_in.double().mean()), float(ref_in.double().mean())


# ----------------------------------------------------------------------------- KID (outside ADM)


def kernel_inception_distance(
    ref: np.ndarray,
    samples: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / D + coef0)^degree, averaged over
    random subsets (drawn without replacement, seeded): (mean, std). Not part of the ADM protocol.
    """
    x, y = np.asarray(samples, np.float64), np.asarray(ref, np.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 vectors in each set")
    d = x.shape[1]
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kaa = (a @ a.T / d + coef0) ** degree
        kbb = (b @ b.T / d + coef0) ** degree
        kab = (a @ b.T / d + coef0) ** degree
        mmd = (
            (kaa.sum() - np.trace(kaa)) / (m * (m - 1))
            + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
            - 2.0 * kab.sum() / (m * m)
        )
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))
