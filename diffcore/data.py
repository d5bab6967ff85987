"""Image data for training and evaluation: Fashion-MNIST (IDX files), image folders, .npy/.npz arrays and a tiny
synthetic set generated in code. Nothing downloads.

Every loader returns ``(images, labels)``: ``images`` uint8 ``[N, C, H, W]`` (pixel values 0..255) or, for the
Fashion-MNIST loader, uint8 ``[N, 28, 28]``; ``labels`` int64 ``[N]``. :class:`ImageDataset` turns them into float32
tensors in ``[-1, 1]`` shaped ``[C, H, W]`` (optionally padded, e.g. 28x28 -> 32x32), and :class:`ShardedBatches`
serves endless shuffled batches, split across the ranks of a DDP job the way ``DistributedSampler`` does, with a
``state_dict`` so that resumed training sees exactly the batches it would have seen.
"""
from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_FASHION_MNIST_ROOTS = ("/usr/share/datasets/fashion-mnist",)  #: Debian's dataset-fashion-mnist package
FASHION_MNIST_ENV = "DIFFCORE_FASHION_MNIST"  #: environment variable naming a folder with the IDX files
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# IDX type codes (third byte of the magic number) -> big-endian numpy dtype
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ----------------------------------------------------------------------------------------------------------------
# IDX (the MNIST / Fashion-MNIST file format)

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


# ----------------------------------------------------------------------------------------------------------------
# image folders and arrays

def center_crop_resize(image: "PIL.Image.Image", size: int) -> "PIL.Image.Image":  # noqa: F821
    """Resize so that the shorter side is ``size`` (box-halving first, then bicubic, as in guided-diffusion), then
    crop the central ``size x size`` square."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def list_images(root: "str | os.PathLike") -> list[Path]:
    """All files under ``root`` (recursively) whose extension is in :data:`IMAGE_EXTENSIONS`, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(root: "str | os.PathLike", size: int, channels: Literal[1, 3] = 3
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load every PNG/JPEG/BMP/WebP image under ``root``, resized and centre-cropped to ``size x size``.

    Images directly in ``root`` get label 0; images in sub-folders are labelled by the sorted index of their
    first-level sub-folder name (the ImageFolder convention) when every image lies in a sub-folder.
    Returns ``(images uint8 [N, channels, size, size], labels int64 [N], class_names)``.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    root = Path(root)
    paths = list_images(root)
    if not paths:
        raise ValueError(f"image folder {root} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
    top = [p.relative_to(root).parts for p in paths]
    if all(len(parts) > 1 for parts in top):
        class_names = sorted({parts[0] for parts in top})
        labels = [class_names.index(parts[0]) for parts in top]
    else:
        class_names, labels = [""], [0] * len(paths)
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.load()
                image = image.convert("RGB" if channels == 3 else "L")
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"image file {path} is unreadable: {error}") from error
        arr = np.asarray(center_crop_resize(image, size))
        out[i] = arr.reshape(size, size, channels)
    return (torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.int64),
            class_names)


def load_array(path: "str | os.PathLike", key: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load images from a ``.npy`` or ``.npz`` file.

    The array may be ``[N, H, W]`` (grayscale), ``[N, H, W, C]`` or ``[N, C, H, W]`` with C in {1, 3}; uint8 arrays
    hold pixel values 0..255, float arrays must already be in ``[-1, 1]`` and are mapped to 0..255 (rounded).
    In a ``.npz``, the images are ``key`` (default: ``"images"``, else ``"arr_0"``, else the only array) and labels
    are ``"labels"`` (or ``"arr_1"``) when present, else zeros.
    Returns ``(images uint8 [N, C, H, W], labels int64 [N])``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path}")
    labels = None
    try:
        if path.suffix == ".npy":
            images = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.keys())
                if key is None:
                    key = next((k for k in ("images", "arr_0") if k in names), names[0] if len(names) == 1 else None)
                if key is None or key not in names:
                    raise ValueError(f"key: {path} holds arrays {names}; name the image array with key=")
                images = archive[key]
                label_key = next((k for k in ("labels", "arr_1") if k in names and k != key), None)
                labels = archive[label_key] if label_key else None
        else:
            raise ValueError(f"path: expected a .npy or .npz file, got {path}")
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        if str(error).startswith(("key:", "path:")):
            raise
        raise ValueError(f"array file {path} is unreadable (truncated or corrupt): {error}") from error
    images = _to_nchw_uint8(images, str(path))
    if labels is None:
        labels_t = torch.zeros(images.shape[0], dtype=torch.int64)
    else:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: expected integer labels of shape ({images.shape[0]},), got {labels.dtype} "
                             f"{labels.shape}")
        labels_t = torch.from_numpy(labels.astype(np.int64))
    return images, labels_t


def _to_nchw_uint8(array: np.ndarray, name: str) -> torch.Tensor:
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected images [N, H, W], [N, H, W, C] or [N, C, H, W] with C in (1, 3), "
                         f"got shape {array.shape}")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (not np.isfinite(array).all() or array.min() < -1.0 or array.max() > 1.0):
            raise ValueError(f"{name}: float images must lie in [-1, 1], got values in "
                             f"[{float(np.nanmin(array))}, {float(np.nanmax(array))}]")
        return torch.from_numpy(np.ascontiguousarray(np.round((array + 1.0) * 127.5).astype(np.uint8)))
    raise TypeError(f"{name}: expected uint8 or float images, got dtype {array.dtype}")


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


# ----------------------------------------------------------------------------------------------------------------
# torch datasets

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
        x = self.images[indices].to(torch.float32).div_(127.5).sub_(1.0)
        if flip is not None:
            flip = flip.to(x.device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if self.pad_to is not None:
            height, width = x.shape[-2:]
            top, left = (self.pad_to - height) // 2, (self.pad_to - width) // 2
            x = F.pad(x, (left, self.pad_to - width - left, top, self.pad_to - height - top), value=-1.0)
        return x, self.labels[indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x float32 [C, H, W] in [-1, 1], label int64 [])``."""
        flip = (torch.rand(1) < 0.5) if self.hflip else None
        x, y = self.batch(torch.tensor([index]), flip)
        return x[0], y[0]


def open_dataset(source: str, *, split: Literal["train", "test"] = "train", image_size: Optional[int] = None,
                 channels: Optional[Literal[1, 3]] = None, pad_to: Optional[int] = None, hflip: bool = False
                 ) -> ImageDataset:
    """Open a data set by name or path.

    ``source`` is one of: ``"fashion_mnist"`` (Debian's IDX files, see :func:`fashion_mnist_root`);
    ``"synthetic"`` (:func:`synthetic_images`, 256 images of ``image_size`` (default 16) pixels);
    a folder holding (Fashion-)MNIST IDX files; any other folder (image files, resized/centre-cropped to
    ``image_size``, which is then required); or a ``.npy`` / ``.npz`` file. ``channels`` (1 or 3) converts image
    folders (default 3) and is checked against arrays. Returns an :class:`ImageDataset`.
    """
    if source in ("fashion_mnist", "fashion-mnist") or is_idx_folder(source):
        images, labels = load_fashion_mnist(split, None if source in ("fashion_mnist", "fashion-mnist") else source)
        images = images[:, None]
    elif source == "synthetic":
        images, labels = synthetic_images(256, image_size or 16, channels or 1, seed=0 if split == "train" else 1)
    elif Path(source).is_dir():
        if image_size is None:
            raise ValueError(f"image_size: required to load the image folder {source}")
        images, labels, _ = load_image_folder(source, image_size, channels or 3)
    elif Path(source).suffix in (".npy", ".npz"):
        images, labels = load_array(source)
    else:
        raise FileNotFoundError(f"source: expected 'fashion_mnist', 'synthetic', a folder or a .npy/.npz file, "
                                f"got {source!r} (no such file or folder)")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"channels: expected {channels}, but {source} has {images.shape[1]}-channel images")
    if image_size is not None and pad_to is None and tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"image_size: expected {image_size}, but {source} has images of "
                         f"{images.shape[-2]}x{images.shape[-1]} (set pad_to to pad them)")
    return ImageDataset(images, labels, pad_to=pad_to, hflip=hflip)


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default torch.distributed group, ``(0, 1)`` when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedBatches:
    """An endless stream of shuffled batches of an :class:`ImageDataset`, sharded across DDP ranks.

    Epoch ``e`` shuffles with a permutation drawn from a generator seeded ``seed + e`` (and draws the flip bits from
    it when the data set flips); rank ``r`` of ``W`` takes the positions ``r, r + W, r + 2W, ...`` of it, exactly as
    ``torch.utils.data.DistributedSampler``; the last incomplete global batch of an epoch is dropped. So the union
    of the ranks' k-th batches is the k-th batch a single process with batch ``W * batch_size`` would see.

    Args:
        dataset: the data.
        batch_size: images per batch on this rank.
        seed: shuffling seed (the same on every rank).
        rank, world_size: default: from torch.distributed if initialised, else 0 and 1.
    Yields ``(x float32 [batch_size, C, H, W] in [-1, 1], labels int64 [batch_size])`` on the data set's device.
    ``state_dict()`` / ``load_state_dict()`` save and restore the position (epoch, batch).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        default_rank, default_world = distributed_info()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={self.world_size}, got {self.rank}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.batches_per_epoch = len(dataset) // (batch_size * self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch_size: the global batch {batch_size} x {self.world_size} ranks is larger than the "
                             f"data set ({len(dataset)} images)")
        self.epoch, self.position = 0, 0
        self._order: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def _epoch_order(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(self.dataset), generator=generator)
            flips = (torch.randint(0, 2, (len(self.dataset),), generator=generator).bool()
                     if self.dataset.hflip else None)
            mine = slice(self.rank, None, self.world_size)
            self._order = (perm[mine], flips[mine] if flips is not None else None)
        return self._order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        perm, flips = self._epoch_order()
        window = slice(self.position * self.batch_size, (self.position + 1) * self.batch_size)
        batch = self.dataset.batch(perm[window], None if flips is None else flips[window])
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "world_size", "batch_size"}`` (plain ints, JSON-friendly)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`; the seed, world size and batch size must match."""
        for name in ("seed", "world_size", "batch_size"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f"data stream state: {name} was {state[name]} when saved, "
                                 f"is {getattr(self, name)} now")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


__all__ = ["read_idx", "load_fashion_mnist", "fashion_mnist_root", "is_idx_folder", "load_image_folder",
           "list_images", "center_crop_resize", "load_array", "synthetic_images", "ImageDataset", "open_dataset",
           "ShardedBatches", "distributed_info", "FASHION_MNIST_CLASSES"]
