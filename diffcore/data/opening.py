"""Opening a data set by name or path: :func:`open_dataset` (everything in memory) and :func:`open_source` (what
training uses: in memory when small, streamed when it may be large). ``--data PATH`` is resolved here."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch

from ..images import load_array
from .idx import is_idx_folder, load_fashion_mnist
from .memory import ImageDataset, synthetic_images
from .shards import TarShardSource, is_shard_spec
from .sources import ImageFolderSource, ImageSource, PackedArraySource, is_packed_folder, load_image_folder

__all__ = ["DataKind", "data_kind", "open_dataset", "open_source"]

DataKind = Literal["fashion_mnist", "synthetic", "idx", "packed", "shards", "folder", "array"]


def data_kind(source: str) -> DataKind:
    """What ``source`` is: ``"fashion_mnist"`` or ``"synthetic"`` (names), ``"idx"`` (a folder of (Fashion-)MNIST
    IDX files), ``"packed"`` (a ``diffcore pack --format npy`` folder), ``"shards"`` (tar shards: a ``.tar`` file,
    a brace range or glob of them, or a folder of ``.tar`` files), ``"folder"`` (image files) or ``"array"``
    (``.npy`` / ``.npz``). A path that does not exist is a FileNotFoundError naming it, an existing one of another
    kind (e.g. a ``.png`` file) a ValueError naming it and its suffix."""
    if source in ("fashion_mnist", "fashion-mnist"):
        return "fashion_mnist"
    if source == "synthetic":
        return "synthetic"
    if is_idx_folder(source):
        return "idx"
    if Path(source).is_dir() and is_packed_folder(source):
        return "packed"
    if is_shard_spec(source) or any(c in source for c in "*?{"):
        return "shards"
    if Path(source).is_dir():
        return "folder"
    if Path(source).suffix in (".npy", ".npz"):
        return "array"
    expected = "expected 'fashion_mnist', 'synthetic', a folder, tar shards or a .npy/.npz file"
    path = Path(source)
    if path.exists():
        what = (f"a file of an unsupported kind ({path.suffix or 'no suffix'})" if path.is_file() else
                "which exists but is neither a file nor a folder")
        raise ValueError(f"source: {expected}, got {source!r}, {what}")
    raise FileNotFoundError(f"source: {expected}, got {source!r} (no such file or folder)")


def _check(images_channels: int, size: tuple[int, int], source: str, image_size: Optional[int],
           channels: Optional[int], pad_to: Optional[int]) -> None:
    if channels is not None and images_channels != channels:
        raise ValueError(f"channels: expected {channels}, but {source} has {images_channels}-channel images")
    if image_size is not None and pad_to is None and tuple(size) != (image_size, image_size):
        raise ValueError(f"image_size: expected {image_size}, but {source} has images of "
                         f"{size[0]}x{size[1]} (set pad_to to pad them)")


def open_dataset(source: str, *, split: Literal["train", "test"] = "train", image_size: Optional[int] = None,
                 channels: Optional[Literal[1, 3]] = None, pad_to: Optional[int] = None, hflip: bool = False
                 ) -> ImageDataset:
    """Open a data set by name or path, entirely in memory.

    ``source`` is one of (see :func:`data_kind`): ``"fashion_mnist"`` (Debian's IDX files, see
    :func:`~diffcore.data.fashion_mnist_root`); ``"synthetic"`` (:func:`synthetic_images`, 256 images of
    ``image_size`` (default 16) pixels); a folder holding (Fashion-)MNIST IDX files; a folder of image files
    (resized/centre-cropped to ``image_size``, which is then required); tar shards or a packed folder (decoded
    into memory); or a ``.npy`` / ``.npz`` file. ``channels`` (1 or 3) converts image folders and shards (default
    3) and is checked against arrays. Returns an :class:`ImageDataset`.
    """
    kind = data_kind(source)
    if kind in ("fashion_mnist", "idx"):
        images, labels = load_fashion_mnist(split, None if kind == "fashion_mnist" else source)
        images = images[:, None]
    elif kind == "synthetic":
        images, labels = synthetic_images(256, image_size or 16, channels or 1, seed=0 if split == "train" else 1)
    elif kind == "folder":
        if image_size is None:
            raise ValueError(f"image_size: required to load the image folder {source}")
        images, labels, _ = load_image_folder(source, image_size, channels or 3)
    elif kind == "array":
        images, labels = load_array(source)
    else:
        streamed = open_source(source, image_size=image_size, channels=channels)
        images = torch.from_numpy(np.stack([streamed[i] for i in range(len(streamed))]))
        labels = streamed.labels
    _check(images.shape[1], tuple(images.shape[-2:]), source, image_size, channels, pad_to)
    return ImageDataset(images, labels, pad_to=pad_to, hflip=hflip)


def open_source(source: str, *, image_size: Optional[int] = None, channels: Optional[Literal[1, 3]] = None,
                pad_to: Optional[int] = None, hflip: bool = False) -> Union[ImageDataset, ImageSource]:
    """The training data ``source`` (as ``diffcore train --data``): image folders, tar shards and packed folders
    are streamed (an :class:`~diffcore.data.sources.ImageSource`, decoded in DataLoader workers: memory does not
    grow with the data set); Fashion-MNIST, IDX folders, arrays and the synthetic set are loaded into memory (an
    :class:`ImageDataset`). Both serve the same batches through :class:`~diffcore.data.ShardedBatches`.
    ``image_size``: resize and centre-crop folder and shard images (default: their own size, the same for all);
    ``channels``: 1 or 3 (default 3 for folders and shards); ``pad_to``, ``hflip``: as :class:`ImageDataset`."""
    kind = data_kind(source)
    if kind == "folder":
        return ImageFolderSource(source, image_size, channels or 3, pad_to=pad_to, hflip=hflip)
    if kind == "shards":
        return TarShardSource(source, image_size, channels or 3, pad_to=pad_to, hflip=hflip)
    if kind == "packed":
        return PackedArraySource(source, image_size, channels, pad_to=pad_to, hflip=hflip)
    return open_dataset(source, image_size=image_size, channels=channels, pad_to=pad_to, hflip=hflip)
