"""Super-resolution operators: down-sampling by an integer factor, by average pooling or by bicubic filtering."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import LinearOperator

__all__ = ["AveragePoolDownsample", "BicubicDownsample", "bicubic_matrix"]


def _check_factor(factor: int, image_shape: tuple[int, int, int]) -> int:
    if not (isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1):
        raise ValueError(f"factor: expected an int >= 1, got {factor!r}")
    _, h, w = image_shape
    if h % factor or w % factor:
        raise ValueError(f"image_shape: height and width must be divisible by factor={factor}, got {h}x{w}")
    return factor


class AveragePoolDownsample(LinearOperator):
    """y = mean of each ``factor x factor`` block of x (tasks ``sr2``, ``sr4``): ``[B, C, H, W] -> [B, C, H/f, W/f]``.

    A A^T = I / f^2, so the adjoint spreads y / f^2 over each block and the pseudo-inverse A^T (A A^T)^{-1}
    is nearest-neighbour up-sampling (each block filled with its mean).
    """

    def __init__(self, image_shape: Sequence[int], factor: int = 4):
        super().__init__(image_shape)
        self.factor = _check_factor(factor, self.image_shape)
        self.name = f"sr{factor}"
        c, h, w = self.image_shape
        self.measurement_shape = (c, h // factor, w // factor)

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x

    def _upsample(self, y: torch.Tensor) -> torch.Tensor:
        f = self.factor
        return y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)

    def _adjoint_map(self, y: torch.Tensor) -> torch.Tensor:
        return self._upsample(y) / (self.factor**2)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour up-sampling of y ``[B, C, H/f, W/f]`` -> ``[B, C, H, W]`` (exact Moore-Penrose)."""
        self._check_measurement(y)
        return self._upsample(y)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with parameter a (-0.5 as in PIL and torch's antialiased bicubic)."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def bicubic_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The 1-D antialiased bicubic resampling matrix ``[out_size, in_size]`` (float64), as PIL computes it.

    Output sample i is centred at (i + 0.5) * s in input coordinates (s = in_size / out_size); when
    down-sampling the cubic kernel (a = -0.5, support 2) is stretched by s (antialiasing); taps outside the
    image are dropped and each row renormalized to sum 1 (PIL's ``precompute_coeffs``; torch's
    ``interpolate(mode="bicubic", antialias=True)`` matches it).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = torch.arange(lo, hi, dtype=torch.float64)
        weights = _cubic((taps - center + 0.5) / filterscale)
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix


class BicubicDownsample(LinearOperator):
    """Antialiased bicubic down-sampling by ``factor`` (task ``sr4-bicubic`` for factor 4).

    Separable: y = M_h x M_w^T per channel with the matrices of :func:`bicubic_matrix` (identical to PIL's
    ``Image.resize(..., BICUBIC)``). The adjoint is M_h^T y M_w and the pseudo-inverse
    pinv(M_h) y pinv(M_w)^T, the exact Moore-Penrose inverse of the Kronecker product.
    """

    def __init__(self, image_shape: Sequence[int], factor: int = 4):
        super().__init__(image_shape)
        self.factor = _check_factor(factor, self.image_shape)
        self.name = f"sr{factor}-bicubic"
        c, h, w = self.image_shape
        self.measurement_shape = (c, h // factor, w // factor)
        mh, mw = bicubic_matrix(h, h // factor), bicubic_matrix(w, w // factor)
        self.register_buffer("matrix_h", mh, persistent=False)
        self.register_buffer("matrix_w", mw, persistent=False)
        self.register_buffer("pinv_h", torch.linalg.pinv(mh), persistent=False)
        self.register_buffer("pinv_w", torch.linalg.pinv(mw), persistent=False)

    @staticmethod
    def _separable(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """left @ x @ right^T over the last two dims."""
        return torch.matmul(torch.matmul(left, x), right.transpose(0, 1))

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self._separable(x, self._buffer(self.matrix_h, x), self._buffer(self.matrix_w, x))

    def _adjoint_map(self, y: torch.Tensor) -> torch.Tensor:
        return self._separable(y, self._buffer(self.matrix_h, y).T, self._buffer(self.matrix_w, y).T)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """pinv(M_h) y pinv(M_w)^T: ``[B, C, H/f, W/f] -> [B, C, H, W]``, so forward(pseudo_inverse(y)) = y."""
        self._check_measurement(y)
        return self._separable(y, self._buffer(self.pinv_h, y), self._buffer(self.pinv_w, y))
