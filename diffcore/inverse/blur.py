"""Deblurring operators: convolution of every channel with a 2-D kernel (Gaussian, or a seeded random motion path).

``y = k * x`` is a true convolution (so the blur of a unit delta at pixel p is the kernel centred at p), with the
image extended past its border by reflection (DPS's ``ReflectionPad2d``) or another :data:`Padding` mode; the
output has the image's shape. The padding is written as an index map, so its adjoint (scatter-add along the
same map) is explicit and A^T is the exact transpose.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import LinearOperator

__all__ = ["Padding", "gaussian_window", "gaussian_kernel", "motion_kernel", "BlurOperator", "GaussianBlur",
           "MotionBlur"]

#: How the image is extended past its border: reflection without repeating the edge (``dcb|abcd|cba``), the
#: edge repeated, periodic, or zeros.
Padding = Literal["reflect", "replicate", "circular", "zeros"]
_PADDINGS = ("reflect", "replicate", "circular", "zeros")


def _check_kernel_size(kernel_size: int) -> int:
    if not (isinstance(kernel_size, int) and not isinstance(kernel_size, bool) and kernel_size >= 1
            and kernel_size % 2 == 1):
        raise ValueError(f"kernel_size: expected an odd int >= 1, got {kernel_size!r}")
    return kernel_size


def gaussian_window(size: int, sigma: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """1-D normalized Gaussian ``[size]``: exp(-r^2 / (2 sigma^2)) at integer offsets r from the centre, divided by
    its sum (sigma in pixels). The one Gaussian formula of the package (blur kernels, SSIM's window)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2.0 * sigma**2))
    return (w / w.sum()).to(dtype=dtype, device=device)


def gaussian_kernel(kernel_size: int = 61, sigma: float = 3.0) -> torch.Tensor:
    """Normalized isotropic Gaussian ``[k, k]`` (float64): the outer product of :func:`gaussian_window` with
    itself, i.e. exp(-|r|^2 / (2 sigma^2)) over its sum. DPS uses k = 61, sigma = 3.0 on 256x256 images."""
    k = _check_kernel_size(kernel_size)
    if not sigma > 0.0:
        raise ValueError(f"sigma: expected a float > 0 (pixels), got {sigma}")
    g = gaussian_window(k, sigma)
    return g[:, None] * g[None, :]


def _random_trajectory(rng: np.random.Generator, intensity: float, length: float, points: int) -> np.ndarray:
    """A camera-shake path: ``points`` complex positions of a random walk of total length ``length`` pixels.

    After Boracchi & Foi (2012), "Modeling the performance of image restoration from motion blur": the speed
    is constant; each step the velocity turns by a Gaussian kick plus a pull back toward the start, whose sizes
    grow with ``intensity``, with rare abrupt reversals ("big shakes").
    """
    step = length / (points - 1)
    centripetal = 0.7 * rng.random()
    gaussian_term = 10.0 * rng.random()
    big_shake_rate = 0.2 * rng.random()
    anxiety = 0.01 * intensity  # Boracchi & Foi's default 0.005 at intensity 0.5
    velocity = step * np.exp(1j * 2.0 * math.pi * rng.random())
    path = np.zeros(points, dtype=np.complex128)
    for i in range(1, points):
        shake = 0.0
        if rng.random() < big_shake_rate * anxiety:
            shake = 2.0 * velocity * np.exp(1j * (math.pi + (rng.random() - 0.5)))
        kick = gaussian_term * complex(rng.standard_normal(), rng.standard_normal()) - centripetal * path[i - 1]
        velocity = velocity + shake + anxiety * kick * step
        velocity = velocity / max(abs(velocity), 1e-12) * step
        path[i] = path[i - 1] + velocity
    return path


def motion_kernel(kernel_size: int = 61, intensity: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A random motion-blur kernel ``[k, k]`` (float64, non-negative, sum 1) drawn from ``seed``.

    A random-walk camera path (:func:`_random_trajectory`, 2000 points, length k - 1 pixels) is centred
    on its mean, shrunk if needed so that it fits inside the k x k grid, and rasterized by bilinear splatting
    of its points (each point spreads unit mass over its four nearest pixels); the result is normalized to
    sum 1. ``intensity`` in [0, 1]: 0 gives a straight line at a random angle, larger values more erratic
    paths (the role of the ``intensity`` argument of the ``motionblur`` package used by DPS, whose kernels
    these resemble but do not reproduce). The same (kernel_size, intensity, seed) gives the same kernel on
    every machine (numpy's PCG64 generator).
    """
    k = _check_kernel_size(kernel_size)
    if k < 5:
        raise ValueError(f"kernel_size: a motion kernel needs kernel_size >= 5, got {k}")
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity: expected a float in [0, 1], got {intensity}")
    rng = np.random.default_rng(int(seed))
    path = _random_trajectory(rng, float(intensity), float(k - 1), 2000)
    path = path - path.mean()
    extent = max(np.abs(path.real).max(), np.abs(path.imag).max())
    limit = (k - 1) / 2 - 1.0
    if extent > limit:
        path = path * (limit / extent)
    cols = path.real + (k - 1) / 2
    rows = -path.imag + (k - 1) / 2
    kernel = np.zeros((k, k), dtype=np.float64)
    r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    fr, fc = rows - r0, cols - c0
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        np.add.at(kernel, (r0 + dr, c0 + dc), w)
    return torch.from_numpy(kernel / kernel.sum())


def _pad_index(size: int, pad: int, padding: str) -> torch.Tensor:
    """Source index ``[size + 2 pad]`` (int64) of each padded position; -1 marks a zero (``zeros`` padding)."""
    i = torch.arange(-pad, size + pad)
    if padding == "reflect":
        period = 2 * (size - 1) if size > 1 else 1
        i = torch.remainder(i, period)
        return torch.where(i >= size, period - i, i)
    if padding == "replicate":
        return i.clamp(0, size - 1)
    if padding == "circular":
        return torch.remainder(i, size)
    return torch.where((i >= 0) & (i < size), i, torch.full_like(i, -1))


class BlurOperator(LinearOperator):
    """y = k * x, the same kernel on every channel, ``[B, C, H, W] -> [B, C, H, W]``.

    Args:
        image_shape: (C, H, W).
        kernel: ``[k, k]`` with k odd and k <= min(H, W); stored in float64.
        padding: how the border is extended (:data:`Padding`).
    adjoint: correlation with the kernel followed by the scatter-add of the padding map (exact transpose).
    pseudo_inverse: damped least squares (CG), since a blur has near-zero singular values.
    """

    name = "deblur"

    def __init__(self, image_shape: Sequence[int], kernel: torch.Tensor, padding: Padding = "reflect"):
        super().__init__(image_shape)
        if not isinstance(kernel, torch.Tensor) or kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
            got = tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
            raise ValueError(f"kernel: expected a square [k, k] tensor, got {got}")
        k = _check_kernel_size(int(kernel.shape[0]))
        _, h, w = self.image_shape
        if k > min(h, w):
            raise ValueError(f"kernel_size: the {k}x{k} kernel is larger than the {h}x{w} image "
                             f"(expected kernel_size <= {min(h, w)})")
        if padding not in _PADDINGS:
            raise ValueError(f"padding: expected one of {_PADDINGS}, got {padding!r}")
        self.padding = padding
        self.kernel_size = k
        self.register_buffer("kernel", kernel.detach().to(torch.float64).clone(), persistent=False)
        pad = k // 2
        self.register_buffer("_rows", _pad_index(h, pad, padding), persistent=False)
        self.register_buffer("_cols", _pad_index(w, pad, padding), persistent=False)

    def _weight(self, like: torch.Tensor, flip: bool) -> torch.Tensor:
        kernel = self._buffer(self.kernel, like)
        kernel = kernel.flip(0, 1) if flip else kernel
        c = like.shape[1]
        return kernel.expand(c, 1, -1, -1)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "zeros":
            p = self.kernel_size // 2
            return F.pad(x, (p, p, p, p))
        return x.index_select(-2, self._rows.to(x.device)).index_select(-1, self._cols.to(x.device))

    def _pad_adjoint(self, g: torch.Tensor) -> torch.Tensor:
        _, h, w = self.image_shape
        p = self.kernel_size // 2
        if self.padding == "zeros":
            return g[..., p:p + h, p:p + w]
        cols = g.new_zeros(g.shape[:-1] + (w,)).index_add(-1, self._cols.to(g.device), g)
        return cols.new_zeros(cols.shape[:-2] + (h, w)).index_add(-2, self._rows.to(g.device), cols)

    def pseudo_inverse(self, y: torch.Tensor, damping: float = 1e-2, iterations: int = 100) -> torch.Tensor:
        """Tikhonov-damped deconvolution, :meth:`LinearOperator.least_squares` with ``damping`` 1e-2 (an exact
        inverse would amplify noise without bound where the kernel's spectrum is near zero)."""
        return self.least_squares(y, damping=damping, iterations=iterations)

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        # conv2d is a cross-correlation: correlating with the flipped kernel is the convolution with it
        return F.conv2d(self._pad(x), self._weight(x, flip=True), groups=x.shape[1])

    def _adjoint_map(self, y: torch.Tensor) -> torch.Tensor:
        return self._pad_adjoint(F.conv_transpose2d(y, self._weight(y, flip=True), groups=y.shape[1]))


class GaussianBlur(BlurOperator):
    """Gaussian deblurring (task ``deblur-gauss``): kernel :func:`gaussian_kernel` (kernel_size, sigma)."""

    name = "deblur-gauss"

    def __init__(self, image_shape: Sequence[int], kernel_size: int = 61, sigma: float = 3.0,
                 padding: Padding = "reflect"):
        super().__init__(image_shape, gaussian_kernel(kernel_size, sigma), padding)
        self.sigma = float(sigma)


class MotionBlur(BlurOperator):
    """Motion deblurring (task ``deblur-motion``): kernel :func:`motion_kernel` (kernel_size, intensity, seed)."""

    name = "deblur-motion"

    def __init__(self, image_shape: Sequence[int], kernel_size: int = 61, intensity: float = 0.5,
                 seed: int = 0, padding: Padding = "reflect"):
        super().__init__(image_shape, motion_kernel(kernel_size, intensity, seed), padding)
        self.intensity, self.seed = float(intensity), int(seed)

