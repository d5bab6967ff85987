"""Image data for training and evaluation. Nothing downloads.

In memory (:mod:`.memory`, :mod:`.idx`): Fashion-MNIST (IDX files), ``.npy``/``.npz`` arrays, small image folders
and a tiny synthetic set generated in code, as an :class:`ImageDataset` (uint8 ``[N, C, H, W]`` served as float32
``[C, H, W]`` in [-1, 1], optionally padded and flipped).

Streamed (:mod:`.sources`, :mod:`.shards`, :mod:`.loader`): image folders (recursive; labels from sub-folders or
``labels.csv``), tar shards in the WebDataset layout and packed arrays (``diffcore pack``, :mod:`.pack`), decoded
on the fly in DataLoader workers, with memory that does not grow with the data set.

:class:`ShardedBatches` (:mod:`.order`) serves endless shuffled batches of either, split across the ranks of a
DDP job the way ``DistributedSampler`` does, in the same order for both, with a ``state_dict`` so that resumed
training sees exactly the batches it would have seen. :func:`open_source` picks the source from what a path is.
"""
from __future__ import annotations

from .idx import (DEFAULT_FASHION_MNIST_ROOTS, FASHION_MNIST_CLASSES, FASHION_MNIST_ENV, fashion_mnist_root,
                  is_idx_folder, load_fashion_mnist, read_idx)
from .memory import ImageDataset, synthetic_images, to_model_batch
from .opening import DataKind, data_kind, open_dataset, open_source
from .order import ShardedBatches, distributed_info, epoch_order
from .pack import pack_folder
from .shards import TarShardSource, expand_shards
from .sources import (BadImageError, ImageFolderSource, ImageSource, PackedArraySource, decode_image,
                      load_image_folder)

__all__ = ["read_idx", "load_fashion_mnist", "fashion_mnist_root", "is_idx_folder", "synthetic_images",
           "ImageDataset", "to_model_batch", "open_dataset", "open_source", "data_kind", "DataKind",
           "ShardedBatches", "epoch_order", "distributed_info", "FASHION_MNIST_CLASSES", "FASHION_MNIST_ENV",
           "DEFAULT_FASHION_MNIST_ROOTS", "ImageSource", "ImageFolderSource", "TarShardSource", "PackedArraySource",
           "BadImageError", "decode_image", "load_image_folder", "expand_shards", "pack_folder"]
