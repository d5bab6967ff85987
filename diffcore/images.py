"""Image files and pixels: everything diffcore reads or writes as an image lives here.

Pixels: diffcore's models see float images in [-1, 1]; files hold 8-bit pixels 0..255. :func:`from_uint8` and
:func:`to_uint8` are the one pair of conversions (``x / 127.5 - 1`` and ``round((x + 1) * 127.5)`` after clamping).

Reading: :func:`load_image` (one image file or ``.npy`` as a model input), :func:`read_images` (files, folders and
arrays as one batch), :func:`open_picture`, :func:`list_images`, :func:`load_array` (``.npy``/``.npz``),
:func:`center_crop_resize`. Writing, always atomically (a temporary file beside the target, then ``os.replace``):
:func:`save_image_grid` (one PNG), :func:`save_npz`; :func:`grid_png` and :func:`npz_bytes` give the bytes, for
commands that write several files together (:func:`diffcore.outputs.write_together`).
"""
from __future__ import annotations

import io
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from .outputs import write_together

__all__ = ["IMAGE_EXTENSIONS", "from_uint8", "to_uint8", "center_crop_resize", "open_picture", "list_images",
           "load_array", "load_image", "read_images", "require_finite", "encode_png", "grid_png", "save_image_grid", "npz_bytes",
           "save_npz"]

#: The file extensions read as images (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


# ------------------------------------------------------------------------------------------------ pixels
def from_uint8(pixels: "torch.Tensor | np.ndarray") -> torch.Tensor:
    """8-bit pixels 0..255 (any shape, uint8 or float holding those values) -> float32 in [-1, 1]:
    ``x / 127.5 - 1``."""
    if isinstance(pixels, np.ndarray):
        pixels = torch.tensor(pixels)  # a copy: PIL's arrays are read-only
    return pixels.to(torch.float32).div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (any shape; values outside are clamped) -> uint8 pixels ``round((x + 1) * 127.5)``.
    NaN has no pixel value: callers that write files check finiteness first (see :func:`save_image_grid`)."""
    images = images.detach()
    images = images if images.dtype == torch.float64 else images.float()
    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def require_finite(result: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``result``, or raise FloatingPointError naming ``what`` when it holds NaN or infinite values: a front
    door reports a diverged model or sampler instead of handing back (or writing) an image that looks black.
    One host sync."""
    if result.numel() and not bool(torch.isfinite(result).all()):
        nonfinite = ~torch.isfinite(result)
        bad = int(nonfinite.sum())
        where = ""
        if result.dim() >= 2:  # a batch: which images (rows)
            rows = nonfinite.flatten(1).any(1).nonzero().flatten().tolist()
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            where = f" in {len(rows)} of {result.shape[0]} images (rows {shown})"
        raise FloatingPointError(
            f"{what}: {bad} of {result.numel()} values are NaN or infinite{where} (the model's output or the "
            f"sampler's arithmetic diverged: check the model's weights, the dtype and values such as eta and steps); "
            f"nothing was written")
    return result


# ------------------------------------------------------------------------------------------------ reading
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


def _as_8bit(picture: "PIL.Image.Image", name: str) -> "PIL.Image.Image":  # noqa: F821
    """A 16-bit grayscale picture (PIL modes "I;16*", and "I" holding 0..65535, as 16-bit PNGs decode) scaled to
    8 bits, ``round(v / 257)`` (65535 -> 255); PIL's own conversion would clip every value above 255 to white.
    Other modes are returned as they are; 32-bit integer or float pictures are a ValueError naming ``name``."""
    from PIL import Image

    if picture.mode.startswith("I;16") or picture.mode == "I":
        values = np.asarray(picture, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"image file {name} holds 32-bit integer pixels (values in [{values.min():.0f}, "
                             f"{values.max():.0f}]); expected 8- or 16-bit images")
        return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L")
    if picture.mode == "F":
        raise ValueError(f"image file {name} holds floating-point pixels (PIL mode F); expected 8- or 16-bit images")
    return picture


def open_picture(source: "str | os.PathLike | bytes", channels: Literal[1, 3],
                 name: "str | None" = None) -> "PIL.Image.Image":  # noqa: F821
    """Decode an image file (its path, or its bytes) fully and convert it to ``channels`` (1: PIL's "L", ITU-R
    601-2 luma; 3: "RGB"; alpha dropped). 16-bit images are scaled to 8 bits (``round(v / 257)``). An unreadable
    or corrupt file, or one with 32-bit or float pixels, is a ValueError naming ``name`` (default: the path)."""
    from PIL import Image, UnidentifiedImageError

    label = name or (source if not isinstance(source, bytes) else "(bytes)")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as picture:
            picture.load()
            decoded = picture.copy()
    except Image.DecompressionBombError as error:
        raise ValueError(f"image file {label} is too large to decode safely: {error}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"image file {label} is unreadable (corrupt or not an image): {error}") from None
    return _as_8bit(decoded, str(label)).convert("RGB" if channels == 3 else "L")


def list_images(root: "str | os.PathLike") -> list[Path]:
    """All files under ``root`` (recursively) whose extension is in :data:`IMAGE_EXTENSIONS`, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


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
        return to_uint8(torch.from_numpy(np.ascontiguousarray(array)))
    raise TypeError(f"{name}: expected uint8 or float images, got dtype {array.dtype}")


def _array_to_chw(array: np.ndarray, name: str) -> np.ndarray:
    """[H, W], [H, W, C], [C, H, W] (C in 1, 3) or the same with a leading 1 -> [C, H, W]."""
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"{name}: expected one image, got an array of {array.shape[0]} images "
                             f"(shape {array.shape})")
        array = array[0]
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        if array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
            return array.transpose(2, 0, 1)
        if array.shape[0] in (1, 3):
            return array
        raise ValueError(f"{name}: expected 1 (grayscale) or 3 (RGB) channels, got an array of shape {array.shape}")
    raise ValueError(f"{name}: expected an image array [H, W], [H, W, C] or [C, H, W], got shape {array.shape}")


def _match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """[C, H, W] -> [channels, H, W]: gray to RGB by repetition, RGB to gray by ITU-R 601 luma."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1 and channels == 3:
        return image.expand(3, -1, -1).clone()
    if image.shape[0] == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=image.dtype).reshape(3, 1, 1)
        return (image * weights).sum(0, keepdim=True)
    raise ValueError(f"cannot convert a {image.shape[0]}-channel image to {channels} channels")


def load_image(path: "str | os.PathLike", image_shape: Sequence[int], *, resize: bool = False,
               name: str = "input") -> torch.Tensor:
    """Read one image and convert it to a model's input: float32 ``[1, C, H, W]`` in [-1, 1].

    Files: PNG/JPEG/BMP/WebP (8-bit; any PIL mode, alpha dropped) or ``.npy`` holding one image ``[H, W]``,
    ``[H, W, C]``, ``[C, H, W]`` (C = 1 or 3, optionally with a leading 1): uint8 pixels 0..255 or floats in
    [-1, 1] (kept unquantized). Channels are converted to ``image_shape[0]`` (gray -> RGB by repetition, RGB ->
    gray by ITU-R 601 luma, as PIL). The height and width must equal ``image_shape``'s unless ``resize``: then the
    image is resized (shorter side, bicubic) and centre-cropped as :func:`center_crop_resize` does
    (a float array is quantized to 8 bits first). Errors name ``name`` (FileNotFoundError for a missing file,
    ValueError for an unreadable file or a size / channel count that cannot be matched).
    """
    from PIL import Image

    channels, height, width = (int(s) for s in image_shape)
    if channels not in (1, 3):
        raise ValueError(f"image_shape: expected 1 or 3 channels, got {tuple(image_shape)}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {path} is a folder; expected one image file")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"{name}: {path} is not a readable .npy file: {error}") from error
        chw = _array_to_chw(np.asarray(array), f"{name} ({path})")
        if chw.dtype == np.uint8:
            image = from_uint8(chw)
        elif np.issubdtype(chw.dtype, np.floating):
            if not np.isfinite(chw).all() or chw.min() < -1.0 or chw.max() > 1.0:
                raise ValueError(f"{name}: float images must lie in [-1, 1] (uint8 arrays hold pixels 0..255), "
                                 f"{path} has values in [{float(np.nanmin(chw)):.4g}, {float(np.nanmax(chw)):.4g}]")
            image = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))
        else:
            raise ValueError(f"{name}: expected uint8 or float pixels in {path}, got dtype {chw.dtype}")
    elif suffix in IMAGE_EXTENSIONS:
        try:
            picture = open_picture(path, channels)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        pixels = np.asarray(picture, dtype=np.float32).reshape(picture.size[1], picture.size[0], -1)
        image = from_uint8(pixels.transpose(2, 0, 1))
    else:
        raise ValueError(f"{name}: expected a {', '.join(IMAGE_EXTENSIONS)} or .npy file, got {path}")
    try:
        image = _match_channels(image, channels)
    except ValueError as error:
        raise ValueError(f"{name}: {error} (the model's channel count)") from None
    if tuple(image.shape[1:]) != (height, width):
        if not resize:
            raise ValueError(f"{name}: the image is {image.shape[1]}x{image.shape[2]} pixels (HxW) but the model "
                             f"takes {height}x{width}; pass --resize to resize and centre-crop it")
        if height != width:
            raise ValueError(f"{name}: resizing needs a square model image, got {height}x{width}")
        pixels = to_uint8(image).permute(1, 2, 0).numpy()
        picture = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
        resized = np.asarray(center_crop_resize(picture, height), dtype=np.float32)
        image = from_uint8(resized.reshape(height, width, channels).transpose(2, 0, 1))
    return image.contiguous()[None]


def _resized_pixels(picture: "PIL.Image.Image", size: int) -> torch.Tensor:  # noqa: F821
    """uint8 ``[C, size, size]`` of a decoded picture, resized and centre-cropped."""
    pixels = np.array(center_crop_resize(picture, size))
    return torch.from_numpy(pixels.reshape(size, size, -1)).permute(2, 0, 1)


def read_images(paths: Sequence["str | os.PathLike"], image_shape: Sequence[int]) -> torch.Tensor:
    """Read image files, image folders (recursively) and ``.npy``/``.npz`` arrays as one batch of model inputs:
    float32 ``[N, C, H, W]`` in [-1, 1], ``(C, H, W) = image_shape`` (square). Image files and folders are
    converted to C channels, resized and centre-cropped (:func:`center_crop_resize`); arrays must already have
    the shape. Errors name the offending path."""
    channels, size = int(image_shape[0]), int(image_shape[-1])
    parts = []
    for path in map(Path, paths):
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise ValueError(f"{path}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            parts.extend(_resized_pixels(open_picture(file, channels), size)[None] for file in files)
        elif path.suffix in (".npy", ".npz"):
            arrays = load_array(path)[0]
            if tuple(arrays.shape[1:]) != (channels, size, size):
                raise ValueError(f"{path}: expected images of shape {(channels, size, size)}, got "
                                 f"{tuple(arrays.shape[1:])}")
            parts.append(arrays)
        elif path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            parts.append(_resized_pixels(open_picture(path, channels), size)[None])
        else:
            raise FileNotFoundError(f"{path}: not an image file, image folder or .npy/.npz file")
    return from_uint8(torch.cat(parts))

# ------------------------------------------------------------------------------------------------ writing
def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of uint8 pixels ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def grid_png(images: torch.Tensor, *, nrow: Optional[int] = None, padding: int = 2, pad_value: float = -1.0
             ) -> bytes:
    """PNG bytes of images ``[N, C, H, W]`` (or one ``[C, H, W]``) in [-1, 1], C = 1 or 3, laid out as one grid.

    ``nrow`` images per row (default ceil(sqrt(N))), ``padding`` pixels between and around them filled with
    ``pad_value`` (in [-1, 1]; -1 is black). NaN or infinite values are an error (FloatingPointError).
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images: expected a floating-point tensor [N, C, H, W] in [-1, 1], got {images!r:.80}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"images: expected shape [N, C, H, W] with N >= 1 and C = 1 or 3, got {tuple(images.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding: expected an int >= 0, got {padding!r}")
    require_finite(images, "images")
    N, C, H, W = images.shape
    ncol = min(N, nrow if nrow is not None else math.ceil(math.sqrt(N)))
    if ncol < 1:
        raise ValueError(f"nrow: expected an int >= 1, got {nrow!r}")
    nrows = math.ceil(N / ncol)
    grid = torch.full((C, nrows * (H + padding) + padding, ncol * (W + padding) + padding), float(pad_value))
    for i, image in enumerate(images.detach().float().cpu()):
        r, c = divmod(i, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = image
    pixels = to_uint8(grid).permute(1, 2, 0).numpy()
    return encode_png(pixels[:, :, 0] if C == 1 else pixels)  # uint8: "L" for 2-D, "RGB" for H x W x 3


def save_image_grid(images: torch.Tensor, path: "str | os.PathLike", *, nrow: Optional[int] = None,
                    padding: int = 2, pad_value: float = -1.0, overwrite: bool = True) -> Path:
    """Write images ``[N, C, H, W]`` (or one ``[C, H, W]``) in [-1, 1], C = 1 or 3, as one PNG grid
    (:func:`grid_png`: ``nrow``, ``padding``, ``pad_value``). The file is written atomically
    (:func:`diffcore.outputs.write_together`); missing parent folders are created. An existing file at ``path``
    is replaced, as Python's own writers do, unless ``overwrite=False`` (then it is a FileExistsError and nothing
    is written; the command line refuses existing files unless ``--overwrite``). NaN or infinite values are an
    error (FloatingPointError; nothing is written). Returns the path."""
    path = Path(path)
    write_together({path: grid_png(images, nrow=nrow, padding=padding, pad_value=pad_value)}, replace=overwrite)
    return path


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The bytes of an uncompressed ``.npz`` (``np.savez``) holding ``arrays``."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save_npz(path: "str | os.PathLike", *, overwrite: bool = True, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` into one ``.npz`` file (uncompressed, ``np.savez``), atomically; missing parent folders are
    created; an existing file is replaced unless ``overwrite=False`` (a FileExistsError, nothing written). Returns
    the path."""
    path = Path(path)
    write_together({path: npz_bytes(**arrays)}, replace=overwrite)
    return path
