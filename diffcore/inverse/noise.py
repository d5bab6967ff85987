"""Measurement noise models y = A(x) + n: additive Gaussian and Poisson (photon counting), seeded.

Each model draws noisy measurements (``model(clean, seed=...)``) and defines the data-fidelity norm DPS
differentiates (:meth:`residual_norm`): the plain Euclidean norm for Gaussian noise, and for Poisson noise the
weighted norm of DPS's Poisson algorithm (Chung et al. 2023, eq. 17: ||y - A x||_Lambda with
Lambda_jj = 1 / (2 y_j) in photon counts).

Seeding: ``seed`` makes a fresh ``torch.Generator`` on the measurement's device, so one seed gives one noise
draw per device type (CPU and CUDA streams differ); or pass a ``generator``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

__all__ = ["NoiseKind", "GaussianNoise", "PoissonNoise", "NoiseModel", "make_noise", "residual_norm"]

NoiseKind = Literal["gaussian", "poisson"]


def residual_norm(y: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm ``[B]`` of y - prediction (both ``[B, ...]``); differentiable."""
    return (y - prediction).flatten(1).norm(dim=1)


def _generator(like: torch.Tensor, seed: Optional[int], generator: Optional[torch.Generator]):
    if generator is not None:
        return generator
    if seed is None:
        return None
    return torch.Generator(device=like.device).manual_seed(int(seed))


@dataclass(frozen=True)
class GaussianNoise:
    """y = A(x) + sigma n, n ~ N(0, I): mean A(x), variance sigma^2 per element (sigma in image units;
    DPS uses 0.05 for images in [-1, 1])."""

    sigma: float

    def __post_init__(self):
        if not self.sigma >= 0.0:
            raise ValueError(f"sigma: expected a standard deviation >= 0, got {self.sigma}")

    def __call__(self, clean: torch.Tensor, *, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A noisy copy of ``clean`` (any shape, float); seeded by ``seed`` or ``generator``."""
        if self.sigma == 0.0:
            return clean.clone()
        n = torch.randn(clean.shape, generator=_generator(clean, seed, generator), device=clean.device,
                        dtype=clean.dtype)
        return clean + self.sigma * n

    def residual_norm(self, y: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """||y - prediction||_2 per sample, ``[B]``."""
        return residual_norm(y, prediction)


@dataclass(frozen=True)
class PoissonNoise:
    """Photon counting: k ~ Poisson(rate * I) with intensity I = (z - low) / (high - low) clamped at 0, where
    z = A(x); the measurement is rescaled back, y = low + (high - low) k / rate.

    So E[y] = z (for z >= low) and Var[y] = (high - low) (z - low) / rate: ``rate`` is the expected photon count
    at z = high (the dose); larger is less noisy. DPS's Poisson noise with rate r on [-1, 1] images is
    rate = 255 r, low = -1, high = 1 (it also clamps z to [low, high]; here only below). For sinograms pass a
    range that covers them.
    """

    rate: float
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self):
        if not self.rate > 0.0:
            raise ValueError(f"rate: expected the photon count at intensity 1, > 0, got {self.rate}")
        if not self.high > self.low:
            raise ValueError(f"high: expected high > low, got low={self.low}, high={self.high}")

    def intensity(self, z: torch.Tensor) -> torch.Tensor:
        """(z - low) / (high - low), clamped at 0."""
        return ((z - self.low) / (self.high - self.low)).clamp(min=0.0)

    def __call__(self, clean: torch.Tensor, *, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A noisy copy of ``clean`` (any shape, float); seeded by ``seed`` or ``generator``."""
        counts = torch.poisson((self.rate * self.intensity(clean)).double(),
                               generator=_generator(clean, seed, generator))
        return (self.low + (self.high - self.low) * counts / self.rate).to(clean.dtype)

    def residual_norm(self, y: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """Weighted residual norm ``[B]`` in photon counts: sqrt(sum_j (k_j - k^_j)^2 / (2 max(k_j, 1))), with
        k = rate I(y) the measured and k^ = rate (prediction - low) / (high - low) the predicted counts."""
        scale = self.rate / (self.high - self.low)
        counts = (self.rate * self.intensity(y)).clamp(min=1.0)
        weighted = (scale * (y - prediction)) / torch.sqrt(2.0 * counts)
        return weighted.flatten(1).norm(dim=1)


NoiseModel = Union[GaussianNoise, PoissonNoise]


def make_noise(kind: NoiseKind, **kwargs) -> NoiseModel:
    """``make_noise("gaussian", sigma=0.05)`` or ``make_noise("poisson", rate=255.0)``."""
    if kind == "gaussian":
        return GaussianNoise(**kwargs)
    if kind == "poisson":
        return PoissonNoise(**kwargs)
    raise ValueError(f"kind: expected 'gaussian' or 'poisson', got {kind!r}")

