"""Metric definitions against independent implementations (pytorch-fid, scipy sqrtm, torch-fidelity,
direct formulas, brute-force nearest neighbours)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

import fid
from fid.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    manifold_radii,
    pairwise_sq_distances,
    precision_recall,
)


def _random_stats(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


def _trace_term_tolerance(s1, s2):
    """What float64 can promise for FID's trace term, from the method (not from a seen value).

    Forming M = S1^(1/2) S2 S1^(1/2) and diagonalising it (backward-stable eigh) perturbs each eigenvalue
    by up to ~d * eps * ||S1|| ||S2||; sqrt turns a perturbation delta of a near-zero eigenvalue into up to
    sqrt(delta), so the sum of d square roots can move by d * sqrt(d * eps * ||S1|| ||S2||), doubled by
    the -2 tr factor. Different BLAS kernels, argument orders or sqrtm instead of eigh may differ by that
    much on (near-)singular covariances; a wrong formula differs by O(||S||).
    """
    d = s1.shape[0]
    eps = np.finfo(np.float64).eps
    return 2 * d * np.sqrt(d * eps * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2))


def _fid_wrong_trace(mu1, s1, mu2, s2):
    """A deliberately wrong FID (trace term of S1 S1 instead of S1 S2), to show the checks can fail."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s1 @ root)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def _fid_sqrtm(mu1, s1, mu2, s2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("n", [400, 40])  # full rank, and rank-deficient (n < d): near-singular covariances
def test_frechet_distance_matches_pytorch_fid_and_sqrtm(n):
    rng = np.random.default_rng(n)
    d = 64
    mu1, s1 = _random_stats(rng, d, n)
    mu2, s2 = _random_stats(rng, d, n)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = calculate_frechet_distance(mu1, s1, mu2, s2)
    tol = _trace_term_tolerance(s1, s2)
    assert ours == pytest.approx(theirs, abs=tol)
    assert ours == pytest.approx(_fid_sqrtm(mu1, s1, mu2, s2), abs=tol)
    assert abs(_fid_wrong_trace(mu1, s1, mu2, s2) - ours) > 100 * tol  # the check can fail


def test_frechet_distance_near_singular_and_properties():
    rng = np.random.default_rng(1)
    d = 48
    mu, s = _random_stats(rng, d, 10)  # rank 9 covariance
    mu2, s2 = _random_stats(rng, d, 12)
    s = s + 1e-9 * np.eye(d)
    ref = _fid_sqrtm(mu, s, mu2, s2)
    tol = _trace_term_tolerance(s, s2)  # condition number ~1e9: float64 promises no more than this
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(ref, abs=tol)
    # symmetric in its arguments up to round-off; a wrong trace term (or one argument used twice) is not
    assert frechet_distance(mu2, s2, mu, s) == pytest.approx(frechet_distance(mu, s, mu2, s2), abs=tol)
    assert abs(_fid_wrong_trace(mu2, s2, mu, s) - _fid_wrong_trace(mu, s, mu2, s2)) > 100 * tol
    assert abs(frechet_distance(mu, s, mu, s)) <= _trace_term_tolerance(s, s)
    # pure mean shift, equal covariances: FID = ||dmu||^2
    assert frechet_distance(mu, s2, mu + 2.0, s2) == pytest.approx(4.0 * d, rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu, s, mu[:-1], s[:-1, :-1])


def test_feature_statistics_equal_numpy_cov_in_float64():
    x = np.random.default_rng(2).standard_normal((37, 5)).astype(np.float32) + 3.0
    st = feature_statistics(x, chunk=8)
    assert st.mu.dtype == np.float64 and st.sigma.dtype == np.float64
    # float64 sums of 37 rows in another order: relative error ~ n * eps = 8e-15 (mean), times
    # mean^2 / var ~ 10 for the covariance's cancellation; 1e-12 / 1e-10 leave a 100x margin
    np.testing.assert_allclose(st.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_inception_score_equals_direct_formula():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((23, 11)) * 3
    mean, std = inception_score(logits, split_size=5)  # splits 5,5,5,5,3: contiguous, unshuffled
    scores = []
    for i in range(0, 23, 5):
        part = np.exp(logits[i : i + 5]) / np.exp(logits[i : i + 5]).sum(1, keepdims=True)
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(p * np.log(p / py)) for p in part])))
    # float64, log-softmax vs exp/normalise over 11 classes: ~C * eps * e^|logit| ~ 1e-13 relative; the std
    # of 5 close scores loses mean/std ~ 100x of that to cancellation
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    # shuffling rows changes the split contents, hence the score: splits are contiguous
    assert inception_score(logits[::-1], split_size=5)[0] != pytest.approx(mean, rel=1e-6)
    # one-hot confident, uniform over C classes -> IS = C
    assert inception_score(np.eye(8) * 60, split_size=8)[0] == pytest.approx(8.0, rel=1e-6)


def _brute_force_pr(ref, smp, k, dist):
    d_rr, d_ss, d_rs = dist(ref, ref), dist(smp, smp), dist(ref, smp)
    r_ref = np.sort(d_rr, axis=1)[:, k]  # self at rank 0
    r_smp = np.sort(d_ss, axis=1)[:, k]
    precision = np.mean([(d_rs[:, j] <= r_ref).any() for j in range(len(smp))])
    recall = np.mean([(d_rs[i, :] <= r_smp).any() for i in range(len(ref))])
    return precision, recall


def _fp32_dist(a, b):
    a, b = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return pairwise_sq_distances(a, b, "fp32").numpy()


@pytest.mark.parametrize("chunk", [7, 10000])
def test_precision_recall_equals_brute_force(chunk):
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((40, 16)).astype(np.float32)
    smp = (rng.standard_normal((33, 16)) * 0.8 + 0.7).astype(np.float32)
    exact = lambda a, b: ((a[:, None, :].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)
    # float64 distances: same answer as fp32 (no ties this close on random data)
    want = _brute_force_pr(ref, smp, 3, exact)
    assert precision_recall(ref, smp, k=3, chunk=chunk, precision="fp32") == pytest.approx(want)
    assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0  # a non-trivial case
    # ADM's float16 blocks: compare with brute force on independently half-rounded distances
    want16 = _brute_force_pr(ref, smp, 3, lambda a, b: _adm_fp16_dist(a, b))
    assert precision_recall(ref, smp, k=3, chunk=chunk, precision="adm") == pytest.approx(want16)


def _adm_fp16_dist(a, b):
    """ADM's DistanceBlock in numpy: half inputs/squares/norms/product/sums, fp32 accumulation."""
    h = lambda x: np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    a, b = h(a), h(b)
    na = h(h(a * a).sum(1))[:, None]
    nb = h(h(b * b).sum(1))[None, :]
    return np.maximum(h(h(na - h(2 * h(a @ b.T))) + nb), 0.0)


def test_adm_distances_fall_back_to_fp32_on_overflow():
    big = torch.full((3, 4), 300.0)  # |u|^2 = 360000 overflows float16
    d = pairwise_sq_distances(big, big * 0.5, "adm")
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, pairwise_sq_distances(big, big * 0.5, "fp32"))


def test_manifold_radii_chunked_equals_unchunked():
    x = torch.randn(29, 8, generator=torch.Generator().manual_seed(5))
    full = np.sort(_fp32_dist(x.numpy(), x.numpy()), axis=1)[:, 3]
    np.testing.assert_allclose(manifold_radii(x, 3, chunk=4, precision="fp32").numpy(), full, rtol=1e-6)


def test_kid_equals_formula_and_torch_fidelity():
    rng = np.random.default_rng(6)
    ref = rng.standard_normal((30, 8))
    smp = rng.standard_normal((30, 8)) + 0.5
    # one subset holding every vector: the unbiased MMD^2 written out with loops
    kid, std = kernel_inception_distance(ref, smp, num_subsets=1, subset_size=30)
    k = lambda a, b: (a @ b / 8 + 1.0) ** 3
    m = 30
    xx = sum(k(smp[i], smp[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(ref[i], ref[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(smp[i], ref[j]) for i in range(m) for j in range(m)) / (m * m)
    # float64 sums of 900 kernel values ~O(10) in another order (~1e-13), KID ~0.1: cancellation costs
    # 100x; rel 1e-10 keeps a 10x margin, and a wrong estimator (biased diagonal) is off by ~1%
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0
    # with subsets: the same estimator as torch-fidelity's, given the same seed
    from torch_fidelity.metric_kid import kid_features_to_metric

    ours = kernel_inception_distance(ref, smp, num_subsets=10, subset_size=12, seed=3)
    theirs = kid_features_to_metric(
        torch.tensor(smp), torch.tensor(ref), kid_subsets=10, kid_subset_size=12, rng_seed=3, verbose=False
    )
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
