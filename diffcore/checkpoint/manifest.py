"""The on-disk format of a checkpoint: its file names, format versions, its ``manifest.json`` (written, read and
validated), and the verification of every file against it.

Layout of a checkpoint directory::

    model.safetensors   the model's state dict
    ema.safetensors     the EMA weights, as a state dict of the same model (optional)
    state.safetensors   the tensors of the training state (optimizer moments, RNG states, sampler history, ...)
    state.json          the rest of the training state (step, LR schedule, data position, ...), tensors referenced
    config.json         the full configuration (JSON object)
    manifest.json       format name and version, the step, and the size and SHA-256 of every file above

What counts as a diffcore checkpoint: a real directory (not a symbolic link) holding a regular file
``manifest.json`` of at most 1 MiB that is a JSON object with ``"format": "diffcore-checkpoint"`` (any version;
:func:`is_checkpoint`).

Reading: the manifest is validated (plain file names inside the folder, sizes and digests well formed, an integer
step), every file must be a regular file of the size the manifest states (checked before reading) and is hashed
in chunks, so a truncated, corrupted or malicious checkpoint raises :class:`CheckpointError` instead of loading
partially or reading outside its folder.

Format versions: 1, the first; 2 (current) adds no file but lets the TrainConfig it stores gain fields (see
``diffcore.train.config.CONFIG_FIELDS_ADDED``: a field introduced in version v may be absent from the config of a
checkpoint of an earlier version, and then takes its default; every other field must be present).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Mapping

FORMAT_NAME = "diffcore-checkpoint"
FORMAT_VERSION = 2  #: the version this diffcore writes
SUPPORTED_VERSIONS = (1, 2)  #: the versions it reads
MANIFEST = "manifest.json"
CHECKPOINT_FILES = frozenset({"model.safetensors", "ema.safetensors", "state.safetensors", "state.json",
                              "config.json", MANIFEST})  #: every file name a checkpoint written by diffcore holds
MAX_MANIFEST_BYTES = 1 << 20
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not match the model/config it is loaded into; or a
    save would replace something that is not a diffcore checkpoint (or a checkpoint, without ``overwrite``)."""


def is_count(value: Any) -> bool:
    """True when ``value`` is an int >= 0 (a bool is not), as a manifest's ``step`` and ``bytes`` must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def make_manifest(step: int, files: Mapping[str, bytes]) -> dict:
    """The manifest of a checkpoint of ``step`` (an int >= 0) holding ``files`` (file name -> its bytes): format
    name and version, the step, and the size (bytes) and SHA-256 (hex) of every file."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": int(step),
            "files": {name: {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
                      for name, blob in files.items()}}


def _load_manifest_json(path: Path) -> Any:
    """The parsed manifest of ``path`` (a regular file of at most 1 MiB); raises CheckpointError otherwise."""
    file = path / MANIFEST
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: not a diffcore checkpoint, "
                              f"or incomplete") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable: {error}") from error
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a regular file")
    if info.st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes, "
                              f"not a diffcore manifest")
    try:
        return json.loads(file.read_bytes())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable: {error}") from error


def _check_manifest(path: Path, manifest: dict) -> dict:
    """Validate the fields of a manifest of a supported version; errors name the field."""
    where = f"checkpoint {path}: {MANIFEST}"
    for key in ("step", "files"):
        if key not in manifest:
            raise CheckpointError(f"{where} has no '{key}' field")
    if not is_count(manifest["step"]):
        raise CheckpointError(f"{where}: 'step' must be an integer >= 0, got {manifest['step']!r}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: 'files' must be an object of file name -> {{bytes, sha256}}, "
                              f"got {type(files).__name__}")
    for name, entry in files.items():
        if not _PLAIN_NAME.fullmatch(name) or name == MANIFEST:
            raise CheckpointError(f"{where}: 'files' lists {name!r}, which is not a plain file name inside the "
                                  f"checkpoint folder (letters, digits, '.', '_', '-'; no path, no leading dot)")
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: files[{name!r}] must be an object {{bytes, sha256}}, got {entry!r}")
        for key in ("bytes", "sha256"):
            if key not in entry:
                raise CheckpointError(f"{where}: files[{name!r}] has no '{key}' field")
        if not is_count(entry["bytes"]):
            raise CheckpointError(f"{where}: files[{name!r}].bytes must be an integer >= 0, got {entry['bytes']!r}")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            raise CheckpointError(f"{where}: files[{name!r}].sha256 must be 64 lowercase hex digits, "
                                  f"got {entry['sha256']!r}")
    return manifest


def read_manifest(path: "str | os.PathLike") -> dict:
    """The parsed and validated ``manifest.json`` of a checkpoint directory; raises :class:`CheckpointError` if it
    is missing, unreadable, of another format or an unsupported version, or malformed (the message names the
    field: a missing ``files``/``bytes``, a ``step`` that is not an integer, a file name with a path in it...)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    manifest = _load_manifest_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a {FORMAT_NAME} manifest")
    version = manifest.get("version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"checkpoint {path}: format version {version!r} is not supported "
                              f"(this diffcore reads versions {', '.join(map(str, SUPPORTED_VERSIONS))})")
    return _check_manifest(path, manifest)


def is_checkpoint(path: "str | os.PathLike") -> bool:
    """True when ``path`` is a diffcore checkpoint directory: a real directory (not a symbolic link) with a regular
    ``manifest.json`` (at most 1 MiB) whose ``format`` is ``"diffcore-checkpoint"``, of any version. This is what
    :func:`~diffcore.checkpoint.save_checkpoint` agrees to replace (with ``overwrite=True``) and what folder
    pruning may delete."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        manifest = _load_manifest_json(path)
    except CheckpointError:
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def read_verified(path: Path, name: str, entry: Mapping[str, Any], keep: bool = True) -> bytes:
    """Check the file ``path/name`` of a checkpoint against its manifest entry ``entry`` (``{"bytes": int,
    "sha256": hex str}``, as validated by :func:`read_manifest`): a regular file (no link), its size before
    reading, then its SHA-256 read in 1 MiB chunks. Returns its bytes (``b""`` when ``keep`` is False); raises
    :class:`CheckpointError` naming the file when it is missing, a link, truncated, altered or corrupted."""
    file = path / name
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: file {name} listed in its manifest is missing") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"checkpoint {path}: {name} is not a regular file (a checkpoint holds no links or "
                              f"special files)")
    if info.st_size != entry["bytes"]:
        raise CheckpointError(f"checkpoint {path}: {name} is truncated or altered ({info.st_size} bytes, the "
                              f"manifest says {entry['bytes']})")
    digest, parts, total = hashlib.sha256(), [], 0
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            total += len(chunk)
            if total > entry["bytes"]:
                break
            digest.update(chunk)
            if keep:
                parts.append(chunk)
    if total != entry["bytes"]:
        raise CheckpointError(f"checkpoint {path}: {name} changed size while it was read")
    if digest.hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {name} is corrupted (its SHA-256 does not match the manifest)")
    return b"".join(parts)


def verify_checkpoint(path: "str | os.PathLike") -> dict:
    """Check every file of a checkpoint against its manifest (regular file, size, SHA-256 streamed in 1 MiB
    chunks); returns the manifest. Only plain file names inside the checkpoint folder are ever opened."""
    manifest = read_manifest(path)
    for name, entry in manifest["files"].items():
        read_verified(Path(path), name, entry, keep=False)
    return manifest
