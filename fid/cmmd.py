"""CMMD (Jayasumana et al. 2024, "Rethinking FID"): the maximum mean discrepancy between CLIP image
embeddings of real and generated images, with a Gaussian RBF kernel.

    k(a, b) = exp(-||a - b||^2 / (2 sigma^2)),  sigma = 10
    CMMD = 1000 * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y))

The minimum-variance (biased) estimator of Gretton et al. (2012, eq. 5), as the reference
implementation computes it: every mean is over all pairs, the diagonal included, and the squared
distances are expanded as ||a||^2 + ||b||^2 - 2 a.b (no clipping). The inputs are taken as given: the
L2 normalisation of CLIP embeddings belongs to the embedding step (``fid.clip``), not here.
"""

from __future__ import annotations

import numpy as np

SIGMA = 10.0  # bandwidth of the Gaussian RBF kernel (the paper's choice)
SCALE = 1000.0  # the paper multiplies by 1000 to make the numbers readable


def _mean_kernel(a: np.ndarray, b: np.ndarray, gamma: float, block: int) -> float:
    """mean over all (i, j) of exp(-gamma ||a_i - b_j||^2), in float64, ``block`` rows at a time."""
    sq_a = np.einsum("nd,nd->n", a, a)  # (N,)
    sq_b = np.einsum("nd,nd->n", b, b)  # (M,)
    total = 0.0
    for i in range(0, a.shape[0], block):
        for j in range(0, b.shape[0], block):
            d2 = (
                sq_a[i : i + block, None]
                + sq_b[None, j : j + block]
                - 2.0 * (a[i : i + block] @ b[j : j + block].T)
            )
            total += float(np.exp(-gamma * d2).sum())
    return total / (a.shape[0] * b.shape[0])


def cmmd(
    real_embeddings: np.ndarray,
    generated_embeddings: np.ndarray,
    *,
    sigma: float = SIGMA,
    scale: float = SCALE,
    block: int = 4096,
) -> float:
    """CMMD between (N, D) real and (M, D) generated embeddings (float64 arithmetic; memory ~ block^2).

    The numbers do not depend on ``block``. With CLIP ViT-L/14@336px embeddings, L2-normalised, this is
    the paper's metric (lower is better; 0 for identical sets)."""
    x = np.asarray(real_embeddings, dtype=np.float64)
    y = np.asarray(generated_embeddings, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"cmmd expects (N, D) and (M, D) embeddings, got {x.shape} and {y.shape}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("cmmd needs at least one embedding in each set")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = _mean_kernel(x, x, gamma, block)
    k_yy = _mean_kernel(y, y, gamma, block)
    k_xy = _mean_kernel(x, y, gamma, block)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))
