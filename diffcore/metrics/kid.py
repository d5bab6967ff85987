"""Kernel Inception Distance (Binkowski et al. 2018) in a given feature space, float64.

KID is the squared maximum mean discrepancy with the cubic polynomial kernel k(x, y) = (x . y / d + 1)^3, estimated
without bias: within-set kernel sums exclude the diagonal (divide by m (m - 1)), the cross term uses all m^2 pairs.
As in the paper (and torch-fidelity / clean-fid), the estimate is averaged over ``num_subsets`` random subsets of
``subset_size`` samples drawn without replacement from each set; the std over subsets is reported too.
Being unbiased, single estimates can be negative when the distributions are equal.

In diffcore the features are the Fashion-MNIST classifier's, not Inception's: numbers compare within the project.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import as_features, positive_int, same_dim


@dataclass(frozen=True)
class KIDResult:
    """KID estimate: ``mean`` and ``std`` (population std over subsets) of the unbiased MMD^2 over ``num_subsets``
    subsets of ``subset_size`` samples each (squared kernel units; dimensionless since the kernel is)."""

    mean: float
    std: float
    num_subsets: int
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for ``x`` ``[N, D]``, ``y`` ``[M, D]`` float64 -> ``[N, M]``."""
    t = x @ y.T
    t /= x.shape[1]
    t += 1.0
    return t * t * t  # t ** 3 would go through the much slower pow()


def mmd2_unbiased(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Unbiased MMD^2 estimate with :func:`polynomial_kernel` between ``x`` ``[m, D]`` and ``y`` ``[n, D]`` (m, n >= 2).

    = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1)) - 2 sum_{i, j} k(x_i, y_j) / (m n).
    """
    a = as_features("x", x, min_rows=2)
    b = as_features("y", y, min_rows=2)
    same_dim("y", b, "x", a)
    m, n = a.shape[0], b.shape[0]
    kxx = polynomial_kernel(a, a)
    kyy = polynomial_kernel(b, b)
    kxy = polynomial_kernel(a, b)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kid_from_features(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor, *,
                      num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KIDResult:
    """KID between ``generated`` ``[N, D]`` and ``real`` ``[M, D]``: mean and std of :func:`mmd2_unbiased` over
    ``num_subsets`` random subsets of ``min(subset_size, N, M)`` samples from each set (numpy Generator(seed))."""
    g = as_features("generated", generated, min_rows=2)
    r = as_features("real", real, min_rows=2)
    same_dim("generated", g, "real", r)
    num_subsets = positive_int("num_subsets", num_subsets)
    size = min(positive_int("subset_size", subset_size), g.shape[0], r.shape[0])
    if size < 2:
        raise ValueError(f"subset_size: expected at least 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(g[rng.choice(g.shape[0], size, replace=False)],
                                     r[rng.choice(r.shape[0], size, replace=False)]) for _ in range(num_subsets)])
    return KIDResult(mean=float(values.mean()), std=float(values.std()), num_subsets=num_subsets, subset_size=size)
