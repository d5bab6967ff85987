"""``diffcore pack``: decode, resize and crop an image folder once, into tar shards or a memory-mapped array, so
that training epochs skip the resizing (shards: decode a small PNG) or all decoding (array: read pixels).

Both keep the folder's order (sorted by path) and labels, and hold the exact pixels that streaming the folder with
the same ``image_size`` and ``channels`` serves (PNG is lossless), so training from the packed data equals
training from the folder, batch for batch. Writing is all-or-nothing: every file goes to a temporary name beside
its target and is renamed only when all are complete; the output folder must be new or empty.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch

from ..images import encode_png
from ..outputs import fsync_dir, temporary_name, write_synced
from .loader import decoded_batches
from .shards import shard_bytes
from .sources import PACKED_IMAGES, PACKED_LABELS, ImageFolderSource

__all__ = ["pack_folder", "PackFormat", "PACK_INFO"]

PackFormat = Literal["shards", "npy"]
PACK_INFO = "pack.json"  #: written beside the packed data: source folder, image size, channels, class names, count


def _batches(source: ImageFolderSource, batch: int, num_workers: int):
    n = len(source)
    requests = ((start, list(range(start, min(n, start + batch)))) for start in range(0, n, batch))
    for decoded in decoded_batches(source, requests, num_workers=num_workers):
        if decoded.error is not None:
            raise decoded.error
        yield decoded.ticket, decoded.pixels


def pack_folder(folder: "str | os.PathLike", out: "str | os.PathLike", image_size: int, *,
                channels: Literal[1, 3] = 3, format: PackFormat = "shards", shard_size: int = 1000,
                num_workers: int = 0, progress: Optional[Callable[[int, int], None]] = None) -> list[Path]:
    """Pack the image folder ``folder`` into the new (or empty) folder ``out``.

    Args:
        image_size: resize and centre-crop every image to it (:func:`diffcore.images.center_crop_resize`).
        channels: 1 or 3.
        format: ``"shards"``: ``shard-000000.tar``, ... in the WebDataset layout (``KEY.png`` + ``KEY.cls``,
            ``shard_size`` samples each), read by ``--data OUT`` or ``--data 'OUT/shard-{000000..000009}.tar'``;
            ``"npy"``: ``images.npy`` (uint8 ``[N, C, S, S]``, memory-mapped when training) and ``labels.npy``.
        num_workers: DataLoader workers decoding the folder.
        progress: called as ``progress(done, total)`` after each batch.
    Returns the paths written (the data files and ``pack.json``). Errors (a corrupt image names its file) leave
    ``out`` as it was.
    """
    if format not in ("shards", "npy"):
        raise ValueError(f"format: expected 'shards' or 'npy', got {format!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size: expected a positive int, got {shard_size!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out: {out} exists and is not an empty folder; pack into a new folder")
    source = ImageFolderSource(folder, image_size, channels)
    n = len(source)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    temporaries: dict[Path, Path] = {}
    try:
        if format == "npy":
            target = out / PACKED_IMAGES
            temporaries[target] = temporary_name(target)
            images = np.lib.format.open_memmap(temporaries[target], mode="w+", dtype=np.uint8,
                                               shape=(n, source.channels, image_size, image_size))
            for start, pixels in _batches(source, 256, num_workers):
                images[start:start + len(pixels)] = pixels.numpy()
                if progress:
                    progress(start + len(pixels), n)
            images.flush()
            del images
            with open(temporaries[target], "rb+") as handle:
                os.fsync(handle.fileno())
            labels_target = out / PACKED_LABELS
            temporaries[labels_target] = temporary_name(labels_target)
            with open(temporaries[labels_target], "wb") as handle:
                np.save(handle, source.labels.numpy().astype(np.int64))
                handle.flush()
                os.fsync(handle.fileno())
        else:
            for start, pixels in _batches(source, shard_size, num_workers):
                target = out / f"shard-{start // shard_size:06d}.tar"
                samples = [(f"{start + i:08d}", encode_png(_hwc(p)), int(source.labels[start + i]))
                           for i, p in enumerate(pixels)]
                temporaries[target] = temporary_name(target)
                write_synced(temporaries[target], shard_bytes(samples))
                if progress:
                    progress(start + len(pixels), n)
        info = {"source": str(Path(folder).resolve()), "format": format, "count": n, "image_size": image_size,
                "channels": source.channels, "class_names": source.class_names}
        target = out / PACK_INFO
        temporaries[target] = temporary_name(target)
        write_synced(temporaries[target], (json.dumps(info, indent=2) + "\n").encode())
        for target, tmp in temporaries.items():
            os.replace(tmp, target)
    except BaseException:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
        if created_out:
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    fsync_dir(out)
    return list(temporaries)


def _hwc(pixels: torch.Tensor) -> np.ndarray:
    """uint8 ``[C, H, W]`` -> what PIL saves: ``[H, W]`` (grayscale) or ``[H, W, 3]``."""
    array = pixels.permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else np.ascontiguousarray(array)
