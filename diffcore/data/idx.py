"""(Fashion-)MNIST's IDX files: the parser and the Fashion-MNIST loader (Debian's dataset-fashion-mnist package).
Nothing downloads."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = ["read_idx", "fashion_mnist_root", "is_idx_folder", "load_fashion_mnist", "FASHION_MNIST_CLASSES",
           "DEFAULT_FASHION_MNIST_ROOTS", "FASHION_MNIST_ENV"]

DEFAULT_FASHION_MNIST_ROOTS = ("/usr/share/datasets/fashion-mnist",)  #: Debian's dataset-fashion-mnist package
FASHION_MNIST_ENV = "DIFFCORE_FASHION_MNIST"  #: environment variable naming a folder with the IDX files
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# IDX type codes (third byte of the magic number) -> big-endian numpy dtype
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}



def read_idx(path: "str | os.PathLike") -> np.ndarray:
    """Read one IDX file (gzip-compressed if its name ends in ``.gz``) into a numpy array.

    The header is a magic number ``0x00 0x00 <type code> <ndim>`` followed by ``ndim`` big-endian uint32 sizes;
    the payload must hold exactly ``prod(sizes)`` items. Returns an array of the file's shape in native byte
    order (uint8 for Fashion-MNIST). A missing, truncated or malformed file raises an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # truncated or corrupt gzip stream
        raise ValueError(f"IDX file {path} is unreadable (truncated or corrupt gzip data): {error}") from error
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, less than the 4-byte magic number")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"IDX file {path}: bad magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type code "
                         f"TT in {sorted(hex(c) for c in _IDX_DTYPES)} and NN >= 1 dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes, header needs {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        state = "truncated" if got < expected else "longer than its header says"
        raise ValueError(f"IDX file {path} is {state}: header says shape {tuple(shape)} ({expected} data bytes), "
                         f"found {got} data bytes")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def fashion_mnist_root(root: "str | os.PathLike | None" = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files: ``root`` if given, else ``$DIFFCORE_FASHION_MNIST``, else
    Debian's ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``)."""
    candidates = [Path(root)] if root is not None else (
        [Path(os.environ[FASHION_MNIST_ENV])] if os.environ.get(FASHION_MNIST_ENV) else
        [Path(p) for p in DEFAULT_FASHION_MNIST_ROOTS])
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST folder not found (looked in {', '.join(map(str, candidates))}); install Debian's package "
        f"with `apt-get install dataset-fashion-mnist`, or pass root= / set ${FASHION_MNIST_ENV} to a folder holding "
        f"train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz")


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file missing: {root / (stem + '.gz')} (nor an uncompressed {stem})")


def is_idx_folder(path: "str | os.PathLike") -> bool:
    """True when ``path`` is a folder holding (at least) the training IDX pair of (Fashion-)MNIST."""
    path = Path(path)
    return path.is_dir() and any((path / (_IDX_FILES["train"][0] + ext)).is_file() for ext in (".gz", ""))


def load_fashion_mnist(split: Literal["train", "test"] = "train", root: "str | os.PathLike | None" = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split from its IDX files (any MNIST-format folder works).

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        root: folder with the IDX files (``.gz`` or uncompressed); default: see :func:`fashion_mnist_root`.
    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` (0 = background, 255 = ink) and int64 ``[N]`` in 0..9
        (names in :data:`FASHION_MNIST_CLASSES`).
    Raises:
        FileNotFoundError naming a missing file; ValueError naming a truncated/corrupt file or inconsistent pair.
    """
    if split not in _IDX_FILES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    folder = fashion_mnist_root(root)
    image_path, label_path = (_find_idx(folder, stem) for stem in _IDX_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{label_path}: expected uint8 labels of shape [N], got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_path}: expected labels in 0..9, got a maximum of {int(labels.max())}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
