"""Tar shards in the WebDataset layout: the reader (:class:`TarShardSource`) and the writer (:func:`shard_bytes`).

Layout (as the ``webdataset`` library writes and reads it): uncompressed tar archives whose members are grouped
into samples by key, the member name up to the first dot of its file name: ``000042.png`` + ``000042.cls`` is
sample ``000042`` with an image and an ASCII integer class label. Images may be PNG, JPEG, BMP or WebP.

Why a reader of our own rather than the ``webdataset`` package: webdataset streams each shard front to back and
shuffles through a buffer, so the order depends on the shard list's shuffle, the buffer and the worker count, and
resuming mid-epoch means replaying the stream. Indexing the tar headers once (a seek per member; the data is not
read) gives random access to every sample by offset, so shards are served in exactly the seeded, rank-split
order of the in-memory path and resume to the sample, whatever the number of workers. Uncompressed tar is what
WebDataset recommends for images anyway (PNG/JPEG do not compress further); ``.tar.gz`` shards are refused.
"""
from __future__ import annotations

import glob
import io
import re
import tarfile
from pathlib import Path
from typing import Iterable, Literal, Optional

import numpy as np
import torch

from .sources import BadImageError, ImageSource, decode_image, image_header_size

__all__ = ["expand_shards", "is_shard_spec", "TarShardSource", "shard_bytes", "SHARD_IMAGE_EXTENSIONS"]

SHARD_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp")  #: member extensions read as the sample's image
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shard_spec(spec: str) -> bool:
    """True when ``spec`` names tar shards: a ``.tar`` file, a brace range or glob ending in ``.tar``, or a folder
    holding ``.tar`` files and no image files."""
    if spec.endswith(".tar") or (spec.endswith(".tar}") and "{" in spec):
        return True
    path = Path(spec)
    return path.is_dir() and any(path.glob("*.tar")) and not any(
        p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp") for p in path.iterdir())


def expand_shards(spec: str) -> list[Path]:
    """The shard files of ``spec``: ``data/shard-{000000..000009}.tar`` (brace range, zero-padded as written),
    ``data/*.tar`` (glob, sorted), one ``.tar`` file, or a folder (its ``*.tar`` files, sorted). A missing shard or
    a spec that matches nothing is a FileNotFoundError naming it."""
    match = _BRACES.search(spec)
    if match:
        lo, hi = match.group(1), match.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"data: the shard range {match.group(0)} in {spec!r} is empty (end before start)")
        width = len(lo) if lo.startswith("0") else 0
        paths = [Path(spec[:match.start()] + str(i).zfill(width) + spec[match.end():])
                 for i in range(int(lo), int(hi) + 1)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data: shard {missing[0]} of {spec!r} does not exist ({len(missing)} of "
                                    f"{len(paths)} missing)")
        return paths
    if any(c in spec for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec))
    elif Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = [Path(spec)] if Path(spec).is_file() else []
    if not paths:
        raise FileNotFoundError(f"data: no tar shards match {spec!r}")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key and extension: ``a/b/000042.seg.png`` -> ``("a/b/000042", "seg.png")``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


class TarShardSource(ImageSource):
    """Samples of tar shards in the WebDataset layout (see the module docstring), decoded on demand.

    Args:
        spec: the shards (:func:`expand_shards`).
        image_size: resize and centre-crop to it (default: every image must have the first image's square size).
        channels: 1 or 3.
        pad_to, hflip: as :class:`diffcore.data.ImageDataset`.
    Labels come from the ``.cls`` members (all samples or none; none: label 0). Indexing reads the tar headers
    and the label members only. A truncated or unreadable shard, or a sample without an image, is a ValueError
    naming the shard (and the member).
    """

    def __init__(self, spec: str, image_size: Optional[int] = None, channels: Literal[1, 3] = 3, *,
                 pad_to: Optional[int] = None, hflip: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.spec, self.shards = spec, expand_shards(spec)
        shard_ids, offsets, sizes, names, labels = [], [], [], [], []
        for number, path in enumerate(self.shards):
            for key, image, label in self._index_shard(path):
                shard_ids.append(number)
                offsets.append(image.offset_data)
                sizes.append(image.size)
                names.append(image.name)
                labels.append(label)
        if not names:
            raise ValueError(f"data: the shards {spec!r} hold no samples")
        has_label = [label is not None for label in labels]
        if any(has_label) and not all(has_label):
            first = has_label.index(False)
            raise ValueError(f"data: shard {self.shards[shard_ids[first]]}: sample {names[first]} has no .cls label "
                             f"but others have one (label every sample or none)")
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.offsets, self.sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
        self.member_names = names
        self.labels = torch.tensor([label or 0 for label in labels], dtype=torch.int64)
        self.class_names = [str(i) for i in range(int(self.labels.max()) + 1)] if any(has_label) else [""]
        self.channels, self.resize = int(channels), image_size
        if image_size is None:
            height, width = image_header_size(self._bytes(0), self.name(0))
            if height != width:
                raise ValueError(f"image_size: required for {spec}: its first image {self.name(0)} is not square "
                                 f"({height}x{width})")
            self.pixel_size = height
        else:
            self.pixel_size = int(image_size)
        self._set_serving(pad_to, hflip)

    @staticmethod
    def _index_shard(path: Path) -> Iterable[tuple[str, tarfile.TarInfo, Optional[int]]]:
        """``(key, image member, label or None)`` of every sample of one shard, in archive order."""
        if path.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            raise ValueError(f"data: shard {path} is compressed; diffcore reads uncompressed .tar shards (random "
                             f"access by offset): unpack it")
        file_size = path.stat().st_size
        if file_size % tarfile.BLOCKSIZE:
            raise ValueError(f"data: shard {path} is truncated: {file_size} bytes is not a whole number of "
                             f"{tarfile.BLOCKSIZE}-byte tar blocks")
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(path, "r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > file_size:
                        raise ValueError(f"data: shard {path} is truncated: member {member.name} ends at byte "
                                         f"{member.offset_data + member.size}, the file has {file_size} bytes")
                    key, ext = _split_name(member.name)
                    entry = samples.setdefault(key, {})
                    if ext in SHARD_IMAGE_EXTENSIONS:
                        entry["image"] = member
                    elif ext == "cls":
                        entry["cls"] = member
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ValueError(f"data: shard {path} is not a readable tar archive (truncated or corrupt): "
                             f"{error}") from None
        for key, entry in samples.items():
            if "image" not in entry:
                raise ValueError(f"data: shard {path}: sample {key} has no image member "
                                 f"({', '.join('.' + e for e in SHARD_IMAGE_EXTENSIONS)})")
            label = None
            if "cls" in entry:
                text = _read_at(path, entry["cls"].offset_data, entry["cls"].size).decode("ascii", "replace").strip()
                try:
                    label = int(text)
                except ValueError:
                    raise ValueError(f"data: shard {path}: {entry['cls'].name} holds {text[:40]!r}, expected an "
                                     f"integer class label") from None
                if label < 0:
                    raise ValueError(f"data: shard {path}: {entry['cls'].name}: expected a label >= 0, got {label}")
            yield key, entry["image"], label

    def name(self, index: int) -> str:
        return f"{self.shards[self.shard_ids[index]]}:{self.member_names[index]}"

    def _bytes(self, index: int) -> bytes:
        path = self.shards[self.shard_ids[index]]
        size = int(self.sizes[index])
        try:
            data = _read_at(path, int(self.offsets[index]), size)
        except OSError as error:
            raise BadImageError(f"image {self.name(index)} could not be read: {error}") from None
        if len(data) != size:
            raise BadImageError(f"image {self.name(index)}: the shard is truncated (read {len(data)} of {size} "
                                f"bytes); was it changed after indexing?")
        return data

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_image(self._bytes(index), self.name(index), self.channels, self.resize,
                            (self.pixel_size, self.pixel_size))


def shard_bytes(samples: Iterable[tuple[str, bytes, int]]) -> bytes:
    """The bytes of one uncompressed tar shard holding ``(key, png bytes, label)`` samples as ``KEY.png`` and
    ``KEY.cls`` members (mtime 0, mode 0644, owner 0: the same samples give the same bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for key, png, label in samples:
            for name, payload in ((f"{key}.png", png), (f"{key}.cls", str(int(label)).encode("ascii"))):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()
