"""Frechet distance between Gaussians and FID from feature arrays, in float64.

The Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) is

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

Numerics: instead of a general matrix square root of the non-symmetric S1 S2 (``scipy.linalg.sqrtm``, which can
return complex parts and needs an epsilon added to the diagonal when a covariance is singular), we use the identity
tr((S1 S2)^{1/2}) = tr((A S2 A)^{1/2}) with A = S1^{1/2}: S1 S2 = A (A S2 A) A^{-1} is similar to the symmetric
positive semi-definite matrix A S2 A, so both have the same non-negative eigenvalues. Two symmetric
eigen-decompositions (``numpy.linalg.eigh``) therefore suffice. Eigenvalues at roundoff level
(|w| <= D * eps * max|w|) or negative are set to 0, so exactly singular (rank-deficient) covariances, e.g. fewer
samples than dimensions, give exact results and no epsilon is added anywhere. Because sqrt is not Lipschitz at 0,
an eigenvalue that is truly tiny (near-singular covariance) carries an absolute error of at most about
sqrt(D * eps * max|w|) per eigenvalue, i.e. ~1e-7 relative to the covariance scale: far below FID's sampling
noise. The result is clamped at 0 (roundoff can make a zero distance slightly negative).

``fid`` here is the Frechet distance of the Gaussians fitted to two sets of features. In diffcore those are the
Fashion-MNIST classifier's features (see ``diffcore.metrics.classifier``), not Inception's: numbers compare within
the project only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import as_features, same_dim


@dataclass(frozen=True)
class GaussianStats:
    """Mean float64 ``[D]`` and covariance float64 ``[D, D]`` (unbiased, divided by N - 1) of a feature set."""

    mean: np.ndarray
    cov: np.ndarray


def gaussian_stats(features: np.ndarray | torch.Tensor) -> GaussianStats:
    """Fit a Gaussian to ``features`` ``[N, D]`` (N >= 2): mean ``[D]`` and unbiased covariance ``[D, D]``, float64."""
    x = as_features("features", features, min_rows=2)
    mean = x.mean(axis=0)
    centered = x - mean
    cov = centered.T @ centered / (x.shape[0] - 1)
    return GaussianStats(mean=mean, cov=cov)


def _check_cov(name: str, cov: np.ndarray, dim: int) -> np.ndarray:
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (dim, dim):
        raise ValueError(f"{name}: expected a covariance of shape ({dim}, {dim}), got {cov.shape}")
    if not np.isfinite(cov).all():
        raise ValueError(f"{name}: covariance contains NaN or infinite values")
    scale = max(float(np.abs(cov).max()), 1e-300)
    if float(np.abs(cov - cov.T).max()) > 1e-8 * scale:
        raise ValueError(f"{name}: expected a symmetric covariance, got one with max |S - S^T| = "
                         f"{float(np.abs(cov - cov.T).max()):.3g}")
    return 0.5 * (cov + cov.T)


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those at roundoff level (|w| <= D * eps * max|w|) set to 0."""
    tol = w.shape[0] * np.finfo(np.float64).eps * float(np.abs(w).max(initial=0.0))
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh, eigenvalues at roundoff level or negative set to 0."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr((S1 S2)^{1/2}) for symmetric PSD float64 ``[D, D]`` matrices, as tr((A S2 A)^{1/2}), A = S1^{1/2}."""
    a = _psd_sqrt(cov1)
    m = a @ cov2 @ a
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(_clip_eigenvalues(w)).sum())


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Frechet distance between N(mean1, cov1) and N(mean2, cov2) (float, >= 0; units: squared feature units).

    ``mean1``/``mean2``: ``[D]``; ``cov1``/``cov2``: symmetric PSD ``[D, D]`` (singular allowed); computed in float64.
    """
    m1 = np.asarray(mean1, dtype=np.float64)
    m2 = np.asarray(mean2, dtype=np.float64)
    if m1.ndim != 1:
        raise ValueError(f"mean1: expected a 1-D mean vector, got shape {m1.shape}")
    if m2.shape != m1.shape:
        raise ValueError(f"mean2: expected shape {m1.shape} (that of mean1), got {m2.shape}")
    if not (np.isfinite(m1).all() and np.isfinite(m2).all()):
        raise ValueError("mean1/mean2: means contain NaN or infinite values")
    s1 = _check_cov("cov1", cov1, m1.shape[0])
    s2 = _check_cov("cov2", cov2, m1.shape[0])
    diff = m1 - m2
    value = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * trace_sqrt_product(s1, s2)
    return max(value, 0.0)


def fid_from_features(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor) -> float:
    """FID: Frechet distance between Gaussians fitted to ``generated`` ``[N, D]`` and ``real`` ``[M, D]`` (N, M >= 2).

    FID is biased upward at small N (it shrinks as N grows), so compare values at equal sample counts only.
    """
    g = as_features("generated", generated, min_rows=2)
    r = as_features("real", real, min_rows=2)
    same_dim("generated", g, "real", r)
    sg, sr = gaussian_stats(g), gaussian_stats(r)
    return frechet_distance(sg.mean, sg.cov, sr.mean, sr.cov)
