"""Improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019), float64, batched.

The manifold of a feature set is the union of balls centred on its points, each with the radius of the distance
to that point's k-th nearest neighbour within the set (the point itself excluded). Precision is the fraction of
generated samples inside the real manifold (fidelity); recall is the fraction of real samples inside the generated
manifold (coverage). A collapsed generator has high precision and low recall.

Distances are computed ``batch_size`` rows at a time (memory ``batch_size x N`` float64), as squared Euclidean
distances ||a||^2 + ||b||^2 - 2 a . b. Values depend on k and on the set sizes: compare at equal counts only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import as_features, positive_int, same_dim


@dataclass(frozen=True)
class PrecisionRecall:
    """``precision`` and ``recall``, each a fraction in [0, 1], measured with ``k`` nearest neighbours."""

    precision: float
    recall: float
    k: int


def _sq_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared distances ``[len(a), len(b)]``, clamped at 0."""
    d2 = (a * a).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def knn_radii_sq(features: np.ndarray | torch.Tensor, k: int = 3, *, batch_size: int = 1024) -> np.ndarray:
    """Squared distance of each point of ``features`` ``[N, D]`` to its k-th nearest other point -> float64 ``[N]``.

    Needs N > k. Duplicated points count as neighbours at distance 0.
    """
    x = as_features("features", features)
    k = positive_int("k", k)
    batch_size = positive_int("batch_size", batch_size)
    if x.shape[0] <= k:
        raise ValueError(f"features: expected more than k={k} points for a k-NN radius, got {x.shape[0]}")
    x_sq = (x * x).sum(axis=1)
    radii = np.empty(x.shape[0])
    for i in range(0, x.shape[0], batch_size):
        d2 = _sq_distances(x[i:i + batch_size], x, x_sq)
        rows = np.arange(d2.shape[0])
        d2[rows, rows + i] = 0.0  # the point itself, exactly (roundoff could leave a tiny positive value)
        radii[i:i + batch_size] = np.partition(d2, k, axis=1)[:, k]  # index 0..k: self + k nearest
    return radii


def fraction_inside(points: np.ndarray | torch.Tensor, centers: np.ndarray | torch.Tensor, radii_sq: np.ndarray, *,
                    batch_size: int = 1024) -> float:
    """Fraction of ``points`` ``[N, D]`` within distance sqrt(``radii_sq`` [M]) of at least one of ``centers`` ``[M, D]``
    (boundary included)."""
    p = as_features("points", points)
    c = as_features("centers", centers)
    same_dim("points", p, "centers", c)
    radii_sq = np.asarray(radii_sq, dtype=np.float64)
    if radii_sq.shape != (c.shape[0],):
        raise ValueError(f"radii_sq: expected shape ({c.shape[0]},) (one radius per center), got {radii_sq.shape}")
    batch_size = positive_int("batch_size", batch_size)
    c_sq = (c * c).sum(axis=1)
    inside = 0
    for i in range(0, p.shape[0], batch_size):
        d2 = _sq_distances(p[i:i + batch_size], c, c_sq)
        inside += int((d2 <= radii_sq[None, :]).any(axis=1).sum())
    return inside / p.shape[0]


def precision_recall(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor, *, k: int = 3,
                     batch_size: int = 1024) -> PrecisionRecall:
    """Improved precision and recall of ``generated`` ``[N, D]`` against ``real`` ``[M, D]`` with k-NN manifolds
    (N, M > k)."""
    g = as_features("generated", generated)
    r = as_features("real", real)
    same_dim("generated", g, "real", r)
    real_radii = knn_radii_sq(r, k, batch_size=batch_size)
    gen_radii = knn_radii_sq(g, k, batch_size=batch_size)
    return PrecisionRecall(precision=fraction_inside(g, r, real_radii, batch_size=batch_size),
                           recall=fraction_inside(r, g, gen_radii, batch_size=batch_size), k=int(k))
