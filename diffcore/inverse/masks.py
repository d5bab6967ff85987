"""Inpainting and outpainting: y = m * x with a binary pixel mask m (1 = observed), shared by all channels.

The measurement keeps the image's shape, with zeros at the missing pixels (as in DPS's code). The operator is a
diagonal projection, so it is its own adjoint and its own Moore-Penrose pseudo-inverse.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import LinearOperator, check_image_shape

__all__ = ["MaskOperator", "box_mask", "random_mask", "outpaint_mask", "BoxInpainting", "RandomInpainting",
           "Outpainting"]


def _check_box(name: str, box: Sequence[int], height: int, width: int) -> tuple[int, int]:
    try:
        bh, bw = (int(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (height, width) ints, got {box!r}") from None
    if not (1 <= bh <= height and 1 <= bw <= width):
        raise ValueError(f"{name}: expected a box within the {height}x{width} image (sizes 1..{height} and "
                         f"1..{width}), got {(bh, bw)}")
    return bh, bw


def box_mask(height: int, width: int, box: Optional[Sequence[int]] = None,
             position: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> torch.Tensor:
    """Observation mask ``[H, W]`` (bool, True = observed) with a missing box.

    Args:
        box: (box_height, box_width) of the missing region; default half of each side.
        position: (top, left) of the box; default centred, or uniformly random when ``seed`` is given.
        seed: seeds the random placement (ignored when ``position`` is given).
    The missing fraction is box_height * box_width / (H * W).
    """
    bh, bw = _check_box("box", box if box is not None else (height // 2 or 1, width // 2 or 1), height, width)
    if position is not None:
        top, left = (int(v) for v in position)
        if not (0 <= top <= height - bh and 0 <= left <= width - bw):
            raise ValueError(f"position: expected top in [0, {height - bh}] and left in [0, {width - bw}] for a "
                             f"{bh}x{bw} box in a {height}x{width} image, got {(top, left)}")
    elif seed is not None:
        g = torch.Generator().manual_seed(int(seed))
        top = int(torch.randint(0, height - bh + 1, (1,), generator=g))
        left = int(torch.randint(0, width - bw + 1, (1,), generator=g))
    else:
        top, left = (height - bh) // 2, (width - bw) // 2
    mask = torch.ones(height, width, dtype=torch.bool)
    mask[top:top + bh, left:left + bw] = False
    return mask


def random_mask(height: int, width: int, missing: float = 0.92, seed: int = 0) -> torch.Tensor:
    """Observation mask ``[H, W]`` (bool) with exactly ``round(missing * H * W)`` missing pixels, chosen
    uniformly without replacement by a generator seeded with ``seed``. DPS's random inpainting drops 92%."""
    if not 0.0 <= missing <= 1.0:
        raise ValueError(f"missing: expected a fraction in [0, 1], got {missing}")
    n = height * width
    g = torch.Generator().manual_seed(int(seed))
    drop = torch.randperm(n, generator=g)[: int(round(missing * n))]
    mask = torch.ones(n, dtype=torch.bool)
    mask[drop] = False
    return mask.reshape(height, width)


def outpaint_mask(height: int, width: int, known: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Observation mask ``[H, W]`` (bool) observing only a centred box of size ``known`` = (h, w) (default half
    of each side); everything outside it is to be generated. Missing fraction 1 - h w / (H W)."""
    kh, kw = _check_box("known", known if known is not None else (height // 2 or 1, width // 2 or 1), height, width)
    mask = torch.zeros(height, width, dtype=torch.bool)
    top, left = (height - kh) // 2, (width - kw) // 2
    mask[top:top + kh, left:left + kw] = True
    return mask


class MaskOperator(LinearOperator):
    """y = m * x for a fixed observation mask m (``[H, W]`` bool, True = observed), the same in every channel.

    Measurement shape = image shape (zeros where unobserved). adjoint = pseudo_inverse = the same projection, so
    ``pseudo_inverse(y)`` returns the observed pixels and zeros elsewhere.
    """

    name = "inpaint"

    def __init__(self, image_shape: Sequence[int], mask: torch.Tensor):
        super().__init__(image_shape)
        _, h, w = self.image_shape
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (h, w):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a [{h}, {w}] tensor (the image's height and width), got {got}")
        self.register_buffer("mask", mask.to(torch.float64).reshape(1, 1, h, w) != 0, persistent=False)

    @property
    def missing_fraction(self) -> float:
        """Fraction of pixels not observed."""
        return 1.0 - float(self.mask.double().mean())

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def _adjoint_map(self, y: torch.Tensor) -> torch.Tensor:
        return self._forward_map(y)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The observed pixels of ``y`` and zeros elsewhere (the Moore-Penrose inverse of a projection)."""
        self._check_measurement(y)
        return self._forward_map(y)


class BoxInpainting(MaskOperator):
    """Inpainting of a missing box (task ``inpaint-box``); arguments as in :func:`box_mask`."""

    name = "inpaint-box"

    def __init__(self, image_shape: Sequence[int], box: Optional[Sequence[int]] = None,
                 position: Optional[Sequence[int]] = None, seed: Optional[int] = None):
        _, h, w = check_image_shape("image_shape", image_shape)
        super().__init__(image_shape, box_mask(h, w, box=box, position=position, seed=seed))


class RandomInpainting(MaskOperator):
    """Inpainting of randomly missing pixels (task ``inpaint-random``); arguments as in :func:`random_mask`."""

    name = "inpaint-random"

    def __init__(self, image_shape: Sequence[int], missing: float = 0.92, seed: int = 0):
        _, h, w = check_image_shape("image_shape", image_shape)
        super().__init__(image_shape, random_mask(h, w, missing=missing, seed=seed))


class Outpainting(MaskOperator):
    """Outpainting around a known centred box (task ``outpaint``); arguments as in :func:`outpaint_mask`."""

    name = "outpaint"

    def __init__(self, image_shape: Sequence[int], known: Optional[Sequence[int]] = None):
        _, h, w = check_image_shape("image_shape", image_shape)
        super().__init__(image_shape, outpaint_mask(h, w, known=known))
