"""Input checks shared by the feature-space metrics: each error names the argument, what was expected and what came."""
from __future__ import annotations

import numpy as np
import torch



def as_features(name: str, features: np.ndarray | torch.Tensor, min_rows: int = 1) -> np.ndarray:
    """``features`` (numpy array or tensor, any float dtype, any device) -> float64 numpy ``[N, D]``.

    Raises TypeError for non-arrays or non-float dtypes, ValueError for a wrong rank, fewer than ``min_rows``
    rows, or non-finite values.
    """
    if isinstance(features, torch.Tensor):
        if not features.is_floating_point():
            raise TypeError(f"{name}: expected floating-point features, got dtype {features.dtype}")
        features = features.detach().to("cpu", torch.float64).numpy()
    elif isinstance(features, np.ndarray):
        if not np.issubdtype(features.dtype, np.floating):
            raise TypeError(f"{name}: expected floating-point features, got dtype {features.dtype}")
        features = features.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name}: expected a numpy array or torch.Tensor, got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"{name}: expected features of shape [N, D], got shape {features.shape}")
    if features.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} feature vectors, got {features.shape[0]}")
    if features.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one feature dimension, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return features


def same_dim(name: str, a: np.ndarray, ref_name: str, ref: np.ndarray) -> None:
    """``a`` and ``ref`` ([N, D] and [M, D]) must share D."""
    if a.shape[1] != ref.shape[1]:
        raise ValueError(f"{name}: expected feature dimension {ref.shape[1]} (that of {ref_name}), got {a.shape[1]}")


def positive_int(name: str, value: int) -> int:
    """``value`` must be an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)
