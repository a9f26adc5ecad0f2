"""Fréchet distance between two sets of feature vectors, each modelled as a Gaussian (as in FID):

    d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2. Two symmetric eigendecompositions in float64
replace scipy's general `sqrtm`, which can return complex values and needs a tolerance check.
"""

from __future__ import annotations

import numpy as np


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1) of an [N, D] array, N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an [N, D] array with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_from_statistics(mu1, s1, mu2, s2) -> float:
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, s1, s2))
    root1 = _psd_sqrt(s1)
    # Rounding can leave tiny negative eigenvalues on singular (N < D) covariances; they are zero in exact math.
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    return float(max(d2, 0.0))


def frechet_distance(features_a, features_b) -> float:
    """The (squared, as FID reports it) Fréchet distance between two [N, D] feature sets."""
    return frechet_from_statistics(*statistics(features_a), *statistics(features_b))


def frechet_standard_error(features_a, features_b, rounds: int = 100, seed: int = 0) -> float:
    """Bootstrap standard error of frechet_distance(a, b) over paired rows: row i of both sets comes from caption
    i, so each round redraws the captions (with replacement) and keeps every pair together."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired feature sets differ in length: {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    draws = [frechet_distance(a[idx], b[idx]) for idx in (rng.integers(0, len(a), len(a)) for _ in range(rounds))]
    return float(np.std(draws, ddof=1))
