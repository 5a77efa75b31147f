"""The Frechet distance between two sets of features (FID's formula), in NumPy float64.

d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The trace of the matrix square root is taken
from the eigenvalues of the symmetric S_a^(1/2) S_b S_a^(1/2), which equal those of S_a S_b, so no general
(complex) matrix square root is needed. Used by `ddpm-eval quality` (classifier and Inception features) and the
sampler sweep.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import DDPMError


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1) of N x D features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise DDPMError(f"need N x D features with N >= 2 for a Frechet distance, got shape {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Frechet distance (squared, as FID reports it) between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise DDPMError(f"feature sizes differ: {mu_a.shape} vs {mu_b.shape}")
    root = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov_b @ root), 0.0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two N x D feature sets."""
    return frechet_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))
