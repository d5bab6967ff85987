"""In-memory image data: the tiny synthetic set generated in code, :class:`ImageDataset`, and
:func:`to_model_batch`, the one conversion of uint8 pixels to a model's batch (shared with the streaming sources)."""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..images import from_uint8

__all__ = ["synthetic_images", "ImageDataset", "to_model_batch"]


def to_model_batch(pixels: torch.Tensor, flip: Optional[torch.Tensor] = None, pad_to: Optional[int] = None
                   ) -> torch.Tensor:
    """uint8 pixels ``[B, C, H, W]`` (0..255) -> float32 ``[B, C, H', W']`` in [-1, 1] (``x / 127.5 - 1``):
    ``flip`` (bool ``[B]``) mirrors the chosen images left-right; ``pad_to`` pads symmetrically with -1 (black)
    to ``pad_to x pad_to``. Every data path (in memory, streamed, memory-mapped) assembles batches with it."""
    x = from_uint8(pixels)
    if flip is not None:
        flip = flip.to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if pad_to is not None:
        height, width = x.shape[-2:]
        top, left = (pad_to - height) // 2, (pad_to - width) // 2
        x = F.pad(x, (left, pad_to - width - left, top, pad_to - height - top), value=-1.0)
    return x


def synthetic_images(n: int = 64, size: int = 16, channels: Literal[1, 3] = 1, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny deterministic data set generated in code, for tests: four classes of shapes on a black background
    (0: filled square, 1: ring, 2: horizontal bar, 3: vertical bar) with random position, size and brightness.

    Returns ``(images uint8 [n, channels, size, size], labels int64 [n])``; the same arguments always give the same
    tensors (numpy PCG64 seeded by ``seed``).
    """
    if n < 1 or size < 4:
        raise ValueError(f"n, size: expected n >= 1 and size >= 4, got n={n}, size={size}")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((n, channels, size, size), dtype=np.uint8)
    labels = rng.integers(0, 4, size=n)
    for i in range(n):
        half = int(rng.integers(max(1, size // 8), max(2, size // 3) + 1))
        cy, cx = (int(v) for v in rng.integers(half, size - half, size=2))
        colour = rng.integers(128, 256, size=channels)
        if labels[i] == 0:
            mask = (abs(yy - cy) <= half) & (abs(xx - cx) <= half)
        elif labels[i] == 1:
            r = np.hypot(yy - cy, xx - cx)
            mask = (r <= half + 0.5) & (r >= half - 1.0)
        elif labels[i] == 2:
            mask = (abs(yy - cy) <= max(1, half // 3)) & (abs(xx - cx) <= half)
        else:
            mask = (abs(xx - cx) <= max(1, half // 3)) & (abs(yy - cy) <= half)
        images[i][:, mask] = colour[:, None]
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


class ImageDataset(torch.utils.data.Dataset):
    """In-memory images served as float32 ``[C, H, W]`` tensors in ``[-1, 1]`` (``x / 127.5 - 1``).

    Args:
        images: uint8 ``[N, C, H, W]`` or ``[N, H, W]`` (grayscale), pixel values 0..255.
        labels: int64 ``[N]`` (default zeros).
        pad_to: if given, pad each image symmetrically with -1 (black) to ``pad_to x pad_to`` (28 -> 32).
        hflip: flip horizontally with probability 1/2 (in ``__getitem__`` from torch's global RNG; in
            :class:`ShardedBatches` from its own seeded generator).
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *, pad_to: Optional[int] = None,
                 hflip: bool = False):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images: expected a uint8 tensor, got {got}")
        if images.dim() == 3:
            images = images[:, None]
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"images: expected a non-empty [N, C, H, W] or [N, H, W] tensor, "
                             f"got {tuple(images.shape)}")
        if labels is None:
            labels = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
            raise ValueError(f"labels: expected a tensor of shape ({images.shape[0]},), got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        height, width = images.shape[-2:]
        if pad_to is not None and (pad_to < height or pad_to < width):
            raise ValueError(f"pad_to: expected >= the image size {height}x{width}, got {pad_to}")
        self.images, self.labels = images, labels.to(torch.int64)
        self.pad_to, self.hflip = pad_to, bool(hflip)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the served (padded) images; the stored images' height when not square and not padded."""
        return int(self.pad_to) if self.pad_to is not None else int(self.images.shape[-2])

    def to(self, device: "torch.device | str") -> "ImageDataset":
        """The same data set with its uint8 images on ``device`` (so that batches are assembled there)."""
        return ImageDataset(self.images.to(device), self.labels.to(device), pad_to=self.pad_to, hflip=self.hflip)

    def batch(self, indices: torch.Tensor, flip: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``indices`` (int64 ``[B]``) as float32 ``[B, C, H, W]`` in [-1, 1] and their labels ``[B]``;
        ``flip`` (bool ``[B]``) mirrors the chosen images left-right."""
        indices = indices.to(self.images.device)
        x = to_model_batch(self.images[indices], flip, self.pad_to)
        return x, self.labels[indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x float32 [C, H, W] in [-1, 1], label int64 [])``."""
        flip = (torch.rand(1) < 0.5) if self.hflip else None
        x, y = self.batch(torch.tensor([index]), flip)
        return x[0], y[0]
