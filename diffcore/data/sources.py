"""Streaming image sources: data sets too large for memory, decoded one image at a time (in DataLoader workers).

A source is a map-style ``torch.utils.data.Dataset``: ``source[i]`` is image ``i`` as uint8 pixels
``[C, H, W]`` (0..255), decoded on the fly; ``source.labels`` (int64 ``[N]``) are known without decoding. The
order in which images are visited, the flips and the split across DDP ranks are decided elsewhere
(:class:`diffcore.data.ShardedBatches`), so a source holds no randomness. Memory: an index (one path, or one
offset, per image), never the pixels.

- :class:`ImageFolderSource`: every PNG/JPEG/BMP/WebP file under a folder (recursively, sorted by path).
- :class:`diffcore.data.shards.TarShardSource`: tar archives in the WebDataset layout.
- :class:`PackedArraySource`: the memory-mapped ``images.npy`` of ``diffcore pack --format npy``.

Decoding (:func:`decode_image`) converts to the wanted channels and, with ``image_size``, resizes and centre-crops
exactly as :func:`load_image_folder` does, so a streamed folder serves the same pixels as the
in-memory one. Without ``image_size`` every image must have the first image's (square) size.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch

from ..images import IMAGE_EXTENSIONS, center_crop_resize, list_images, open_picture

__all__ = ["BadImageError", "decode_image", "image_header_size", "ImageSource", "ImageFolderSource",
           "PackedArraySource", "folder_labels", "LABELS_FILE", "PACKED_IMAGES", "PACKED_LABELS", "is_packed_folder"]

LABELS_FILE = "labels.csv"  #: an image folder's optional labels file: lines ``relative/path.png,<int label>``
PACKED_IMAGES, PACKED_LABELS = "images.npy", "labels.npy"  #: the files of a ``diffcore pack --format npy`` folder


class BadImageError(ValueError):
    """An image that cannot be used (unreadable, corrupt, of another size): the message names the file."""


def decode_image(data: "Union[str, os.PathLike, bytes]", name: str, channels: Literal[1, 3],
                 image_size: Optional[int] = None, expected: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Decode one image file (a path, or its bytes) to uint8 pixels ``[channels, S, S]``.

    Args:
        data: the file's path or its bytes.
        name: names the image in errors (its path, or ``shard.tar:member``).
        channels: 1 (PIL "L", ITU-R 601-2 luma) or 3 (RGB; alpha dropped).
        image_size: resize (shorter side) and centre-crop to ``image_size``
            (:func:`diffcore.images.center_crop_resize`).
        expected: without ``image_size``, the ``(height, width)`` every image must have.
    Raises :class:`BadImageError` naming ``name`` when the file cannot be decoded or has another size.
    """
    try:
        image = open_picture(data, channels, name)
    except ValueError as error:
        raise BadImageError(str(error)) from None
    if image_size is not None:
        image = center_crop_resize(image, image_size)
    elif expected is not None and (image.size[1], image.size[0]) != tuple(expected):
        raise BadImageError(f"image file {name} is {image.size[1]}x{image.size[0]} pixels (HxW) but the data set's "
                            f"images are {expected[0]}x{expected[1]} (mixed image sizes); pass --image-size to "
                            f"resize and centre-crop every image")
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels).transpose(2, 0, 1)


def image_header_size(data: "Union[str, os.PathLike, bytes]", name: str) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header (no decoding); BadImageError naming ``name``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise BadImageError(f"image file {name} is unreadable (corrupt or not an image): {error}") from None


class ImageSource(torch.utils.data.Dataset):
    """What every streaming source offers (subclasses set the attributes and implement :meth:`__getitem__`).

    Attributes:
        labels: int64 ``[N]``.
        class_names: the names of labels 0, 1, ... (``[""]`` when unlabelled).
        pixel_size: side of the decoded images (``image_size``, else the images' own size).
        pad_to, hflip: as :class:`diffcore.data.ImageDataset`: pad the served images with black to ``pad_to``;
            random horizontal flips (drawn by :class:`diffcore.data.ShardedBatches`).
    """

    labels: torch.Tensor
    class_names: list[str]
    pixel_size: int
    channels: int
    pad_to: Optional[int] = None
    hflip: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        """Side of the served (padded) images."""
        return int(self.pad_to) if self.pad_to is not None else int(self.pixel_size)

    def name(self, index: int) -> str:
        """How errors name image ``index`` (a path)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> np.ndarray:
        """uint8 pixels ``[C, S, S]`` of image ``index``; :class:`BadImageError` naming the file."""
        raise NotImplementedError

    def _set_serving(self, pad_to: Optional[int], hflip: bool) -> None:
        if pad_to is not None and pad_to < self.pixel_size:
            raise ValueError(f"pad_to: expected >= the image size {self.pixel_size}, got {pad_to}")
        self.pad_to, self.hflip = pad_to, bool(hflip)


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")


def folder_labels(root: Path, relative: Sequence[str]) -> tuple[list[int], list[str]]:
    """Labels of the images ``relative`` (paths relative to ``root``, ``/``-separated): from ``root/labels.csv``
    when it exists (lines ``relative/path,<int label>``; every image must be listed), else torchvision's
    ImageFolder convention: the sorted index of the first-level sub-folder when every image lies in one, else 0.
    Returns ``(labels, class_names)``."""
    labels_file = root / LABELS_FILE
    if labels_file.is_file():
        table: dict[str, int] = {}
        with open(labels_file, newline="") as handle:
            for number, row in enumerate(csv.reader(handle), 1):
                if not row or row[0].startswith("#"):
                    continue
                try:
                    if len(row) != 2:
                        raise ValueError
                    table[row[0].strip()] = int(row[1])
                except ValueError:
                    if number == 1:  # a header line
                        continue
                    raise ValueError(f"{labels_file}, line {number}: expected 'relative/path,<int label>', "
                                     f"got {','.join(row)!r}") from None
        missing = [p for p in relative if p not in table]
        if missing:
            raise ValueError(f"{labels_file} has no label for {len(missing)} image(s), e.g. {missing[0]}")
        labels = [table[p] for p in relative]
        if min(labels) < 0:
            raise ValueError(f"{labels_file}: expected labels >= 0, got {min(labels)}")
        return labels, [str(i) for i in range(max(labels) + 1)]
    parts = [p.split("/") for p in relative]
    if all(len(p) > 1 for p in parts):
        class_names = sorted({p[0] for p in parts})
        index = {name: i for i, name in enumerate(class_names)}
        return [index[p[0]] for p in parts], class_names
    return [0] * len(relative), [""]


class ImageFolderSource(ImageSource):
    """Every image file under ``root`` (recursively, sorted by path; extensions
    :data:`diffcore.images.IMAGE_EXTENSIONS`), decoded on demand.

    Labels: see :func:`folder_labels` (sub-folders, or ``labels.csv``). ``image_size``: resize and centre-crop
    to it; without it every image must be square and of the first image's size (else the offending file is
    named when it is read). An empty folder is a ValueError naming it.
    """

    def __init__(self, root: "str | os.PathLike", image_size: Optional[int] = None, channels: Literal[1, 3] = 3, *,
                 pad_to: Optional[int] = None, hflip: bool = False):
        _check_channels(channels)
        self.root = Path(root)
        paths = list_images(self.root)
        if not paths:
            raise ValueError(f"image folder {self.root} holds no image files (looked recursively for "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
        self.paths = [p.relative_to(self.root).as_posix() for p in paths]
        labels, self.class_names = folder_labels(self.root, self.paths)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.channels, self.resize = int(channels), image_size
        if image_size is None:
            height, width = image_header_size(paths[0], str(paths[0]))
            if height != width:
                raise ValueError(f"image_size: required for {self.root}: its first image {paths[0]} is not square "
                                 f"({height}x{width})")
            self.pixel_size = height
        else:
            if not isinstance(image_size, int) or image_size < 1:
                raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
            self.pixel_size = image_size
        self._set_serving(pad_to, hflip)

    def name(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.root / self.paths[index]
        return decode_image(path, str(path), self.channels, self.resize, (self.pixel_size, self.pixel_size))


def is_packed_folder(path: "str | os.PathLike") -> bool:
    """True for a folder written by ``diffcore pack --format npy`` (it holds ``images.npy``)."""
    return (Path(path) / PACKED_IMAGES).is_file()


class PackedArraySource(ImageSource):
    """The folder of ``diffcore pack --format npy``: ``images.npy`` (uint8 ``[N, C, S, S]``), memory-mapped, and
    ``labels.npy`` (int64 ``[N]``). The pages of the file are read as batches touch them; nothing is decoded."""

    def __init__(self, folder: "str | os.PathLike", image_size: Optional[int] = None,
                 channels: Optional[Literal[1, 3]] = None, *, pad_to: Optional[int] = None, hflip: bool = False):
        self.root = Path(folder)
        path = self.root / PACKED_IMAGES
        try:
            self.images = np.load(path, mmap_mode="r", allow_pickle=False)
            labels = np.load(self.root / PACKED_LABELS, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"packed data {self.root} is unreadable (truncated or corrupt {PACKED_IMAGES} / "
                             f"{PACKED_LABELS}): {error}") from None
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3) or \
                self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"{path}: expected uint8 images [N, C, S, S] with C in (1, 3), got {self.images.dtype} "
                             f"{self.images.shape}")
        if labels.shape != (self.images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{self.root / PACKED_LABELS}: expected integer labels of shape "
                             f"({self.images.shape[0]},), got {labels.dtype} {labels.shape}")
        if len(labels) == 0:
            raise ValueError(f"packed data {self.root} holds no images")
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.class_names = [str(i) for i in range(int(labels.max()) + 1)]
        self.channels, self.pixel_size = int(self.images.shape[1]), int(self.images.shape[2])
        if channels is not None and channels != self.channels:
            raise ValueError(f"channels: expected {channels}, but {path} holds {self.channels}-channel images")
        if image_size is not None and image_size != self.pixel_size:
            raise ValueError(f"image_size: expected {image_size}, but {path} holds {self.pixel_size}px images "
                             f"(pack the folder again with --image-size {image_size})")
        self._set_serving(pad_to, hflip)

    def name(self, index: int) -> str:
        return f"{self.root / PACKED_IMAGES}[{index}]"

    def __getitem__(self, index: int) -> np.ndarray:
        return np.array(self.images[index])


def load_image_folder(root: "str | os.PathLike", size: int, channels: Literal[1, 3] = 3
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image under ``root`` in memory, decoded as :class:`ImageFolderSource` streams them (resized and
    centre-cropped to ``size x size``; labels from sub-folders or ``labels.csv``, :func:`folder_labels`).
    Returns ``(images uint8 [N, channels, size, size], labels int64 [N], class_names)``."""
    source = ImageFolderSource(root, size, channels)
    images = np.stack([source[i] for i in range(len(source))])
    return torch.from_numpy(images), source.labels.clone(), list(source.class_names)
