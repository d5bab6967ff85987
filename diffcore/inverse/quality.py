"""Per-image reconstruction quality: PSNR and SSIM (Wang et al. 2004).

Images are ``[B, C, H, W]`` with values in ``value_range`` (``(-1, 1)``, the models' range, by default, or
``(0, 1)``); the dynamic range L = high - low enters PSNR and SSIM's constants, so the same pair of images gives
the same scores in either range. By default both images are first clamped to the range (what saving them as
8-bit images would do; no quantization). Scores are computed in float64 and returned as float64 ``[B]``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .base import check_batch
from .blur import gaussian_window

__all__ = ["psnr", "ssim"]

ValueRange = Tuple[float, float]


def _prepare(x: torch.Tensor, reference: torch.Tensor, value_range: ValueRange, clamp: bool):
    if not isinstance(reference, torch.Tensor) or reference.dim() != 4:
        got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"reference: expected images [B, C, H, W], got {got}")
    check_batch("x", x, tuple(reference.shape[1:]), "the shape of reference")
    if x.shape[0] != reference.shape[0]:
        raise ValueError(f"x: expected {reference.shape[0]} images (as in reference), got {x.shape[0]}")
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range: expected (low, high) with high > low, got {value_range!r}")
    x, reference = x.double(), reference.double()
    if clamp:
        x, reference = x.clamp(low, high), reference.clamp(low, high)
    return x, reference, high - low


def psnr(x: torch.Tensor, reference: torch.Tensor, value_range: ValueRange = (-1.0, 1.0),
         clamp: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image: 10 log10(L^2 / MSE), MSE over C, H, W; +inf when equal.

    Args: x, reference ``[B, C, H, W]``; value_range (low, high), L = high - low. Returns float64 ``[B]``.
    """
    x, reference, span = _prepare(x, reference, value_range, clamp)
    mse = (x - reference).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(span**2 / mse)


def ssim(x: torch.Tensor, reference: torch.Tensor, value_range: ValueRange = (-1.0, 1.0), clamp: bool = True,
         window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image, as in Wang et al. (2004) and their reference code.

    Local means, variances and covariance come from an 11 x 11 Gaussian window (sigma 1.5) applied only where
    it fits inside the image ("valid"; a (H-10) x (W-10) map), with the population (not sample) statistics;
    C1 = (k1 L)^2, C2 = (k2 L)^2; the map is averaged over positions and channels. The luminance term depends
    on the absolute level, so images are shifted to start at 0 (x - low) first: the score is that of the same
    images stored in [0, 1] (or 8-bit), whichever ``value_range`` they come in.

    Args: x, reference ``[B, C, H, W]`` with H, W >= ``window``. Returns float64 ``[B]`` (1 for equal images).
    """
    x, reference, span = _prepare(x, reference, value_range, clamp)
    low = float(value_range[0])
    x, reference = x - low, reference - low  # SSIM is not shift-invariant: measure intensities from 0
    _, c, h, w = x.shape
    if min(h, w) < window:
        raise ValueError(f"x: SSIM needs images of at least {window}x{window} pixels (the window), got {h}x{w}")
    g = gaussian_window(window, sigma, device=x.device)

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(z, g.reshape(1, 1, window, 1).expand(c, 1, window, 1), groups=c)
        return F.conv2d(z, g.reshape(1, 1, 1, window).expand(c, 1, 1, window), groups=c)

    mu_x, mu_y = blur(x), blur(reference)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(reference * reference) - mu_y**2
    cov = blur(x * reference) - mu_x * mu_y
    c1, c2 = (k1 * span) ** 2, (k2 * span) ** 2
    ssim_map = ((2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)

