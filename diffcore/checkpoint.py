"""Checkpoints: one directory per checkpoint, written atomically, replaced crash-safely and verified on load.

Layout of a checkpoint directory::

    model.safetensors   the model's state dict
    ema.safetensors     the EMA weights, as a state dict of the same model (optional)
    state.safetensors   the tensors of the training state (optimizer moments, RNG states, sampler history, ...)
    state.json          the rest of the training state (step, LR schedule, data position, ...), tensors referenced
    config.json         the full configuration (JSON object)
    manifest.json       format name and version, the step, and the size and SHA-256 of every file above

What counts as a diffcore checkpoint: a real directory (not a symbolic link) holding a regular file
``manifest.json`` of at most 1 MiB that is a JSON object with ``"format": "diffcore-checkpoint"`` (any version;
:func:`is_checkpoint`). :func:`save_checkpoint` replaces only such a directory, and only with ``overwrite=True``;
any other existing path (a file, a folder of documents, a link) is refused before anything is written.

Writing: the new checkpoint is assembled under ``.tmp-<name>-<12 hex>`` beside the target, every file is
fsync'ed, then it is moved into place: onto a free name by one ``rename``; over an existing checkpoint by one
atomic exchange of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``), after which the old one, now under
the temporary name, is deleted. A kill -9 at any moment therefore leaves the old or the new checkpoint at
``path``, complete. Where the exchange is unavailable the old one is first renamed to ``.old-<name>-<12 hex>`` and
the next save to that path puts it back if the process died between the two renames. Leftovers of interrupted
saves (``.tmp-<name>-*``, ``.old-<name>-*`` holding only checkpoint files, and ``.<file>.tmp-<32 hex>`` of
:func:`diffcore.outputs.atomic_write_bytes`) are removed by the next save; nothing else is ever deleted. A failed write (e.g. a
full disk, ``ENOSPC``) removes its temporary folder and raises an ``OSError`` saying the previous checkpoint is
unchanged.

Reading: the manifest is validated (plain file names inside the folder, sizes and digests well formed, an integer
step), every file must be a regular file of the size the manifest states (checked before reading) and is hashed
in chunks, so a truncated, corrupted or malicious checkpoint raises :class:`CheckpointError` instead of loading
partially or reading outside its folder; :func:`load_state_strict` refuses state dicts whose keys or shapes
differ from the model's.

Format versions: 1, the first; 2 (current) adds no file but lets the TrainConfig it stores gain fields (see
``diffcore.train.config.CONFIG_FIELDS_ADDED``: a field introduced in version v may be absent from the config of a
checkpoint of an earlier version, and then takes its default; every other field must be present).

No pickle is involved: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import random
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from . import outputs

FORMAT_NAME = "diffcore-checkpoint"
FORMAT_VERSION = 2  #: the version this diffcore writes
SUPPORTED_VERSIONS = (1, 2)  #: the versions it reads
MANIFEST = "manifest.json"
LATEST = "latest"  #: file in a checkpoint folder naming the newest complete checkpoint directory
CHECKPOINT_FILES = frozenset({"model.safetensors", "ema.safetensors", "state.safetensors", "state.json",
                              "config.json", MANIFEST})  #: every file name a checkpoint written by diffcore holds
MAX_MANIFEST_BYTES = 1 << 20
_TENSOR_TAG, _INT_DICT_TAG, _TUPLE_TAG = "__tensor__", "__int_keys__", "__tuple__"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_STEP_NAME = re.compile(r"step_[0-9]{8,}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not match the model/config it is loaded into; or a
    save would replace something that is not a diffcore checkpoint (or a checkpoint, without ``overwrite``)."""


# ----------------------------------------------------------------------------------------------------------------
# nested state <-> (JSON tree, flat tensor dict)

def flatten_state(state: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers, strings, None) into a JSON-able tree and a flat
    ``{key: tensor}`` dict for safetensors. Tensors are replaced by ``{"__tensor__": key}``; dicts with non-string
    keys (optimizer state is keyed by int) and tuples are tagged so that :func:`unflatten_state` restores them."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            if key in tensors:
                raise ValueError(f"state: two tensors map to the key {key!r} (a dict key contains '.')")
            tensors[key] = obj.detach().cpu().contiguous().clone()
            return {_TENSOR_TAG: key}
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) for k in obj):
                return {k: walk(v, f"{key}.{k}") for k, v in obj.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
                return {_INT_DICT_TAG: [[k, walk(v, f"{key}.{k}")] for k, v in obj.items()]}
            raise TypeError(f"state: dict keys must be all str or all int, got {[type(k).__name__ for k in obj]}")
        if isinstance(obj, tuple):
            return {_TUPLE_TAG: [walk(v, f"{key}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, (np.integer, np.floating)):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"state: cannot store a {type(obj).__name__} at {key!r} in a checkpoint")

    return walk(state, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR_TAG}:
            key = tree[_TENSOR_TAG]
            if key not in tensors:
                raise CheckpointError(f"training state refers to tensor {key!r}, which state.safetensors lacks")
            return tensors[key]
        if set(tree) == {_INT_DICT_TAG}:
            return {int(k): unflatten_state(v, tensors) for k, v in tree[_INT_DICT_TAG]}
        if set(tree) == {_TUPLE_TAG}:
            return tuple(unflatten_state(v, tensors) for v in tree[_TUPLE_TAG])
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


# ----------------------------------------------------------------------------------------------------------------
# RNG state

def capture_rng_state() -> dict:
    """The global RNG states: torch CPU, torch CUDA (every device, when CUDA is initialised), Python's ``random``
    and numpy's legacy global generator. Restore with :func:`restore_rng_state`."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"torch_cpu": torch.get_rng_state(),
             "python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the global RNG states saved by :func:`capture_rng_state` (CUDA ones when CUDA is available and the
    device count matches; otherwise they are skipped)."""
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])


# ----------------------------------------------------------------------------------------------------------------
# reading and validating a manifest

@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: its directory.
        step: the optimizer step it was written at.
        config: the configuration (JSON object) it was written with.
        model: the model's state dict (CPU tensors unless ``map_location`` said otherwise).
        ema: the EMA weights as a state dict of the same model, or None.
        state: the training state (nested dicts/lists of numbers, strings and tensors), ``{}`` if none was saved.
        version: the format version it was written in (one of :data:`SUPPORTED_VERSIONS`).
    """

    path: Path
    step: int
    config: dict
    model: dict[str, torch.Tensor]
    ema: Optional[dict[str, torch.Tensor]] = None
    state: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    if not _is_count(manifest["step"]):
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
        if not _is_count(entry["bytes"]):
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
    :func:`save_checkpoint` agrees to replace (with ``overwrite=True``) and what folder pruning may delete."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        manifest = _load_manifest_json(path)
    except CheckpointError:
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def _read_verified(path: Path, name: str, entry: Mapping[str, Any], keep: bool = True) -> bytes:
    """Check ``path/name`` against its manifest entry: a regular file (no link), its size before reading, then its
    SHA-256 read in chunks. Returns its bytes (``b""`` when ``keep`` is False)."""
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
        _read_verified(Path(path), name, entry, keep=False)
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# writing

def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors in ``tensors`` that hold a NaN or an infinity (one reduction per
    tensor; a host sync)."""
    return [key for key, value in tensors.items()
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
            and not bool(torch.isfinite(value).all())]


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], what: str) -> bytes:
    from safetensors.torch import save

    clean = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: expected tensors, got a {type(value).__name__} at {key!r}")
        clean[key] = value.detach().to("cpu").contiguous().clone()
    return save(clean, metadata={"format": FORMAT_NAME})


def _check_target(path: Path, overwrite: bool) -> bool:
    """Whether ``path`` holds a checkpoint to replace; raises CheckpointError for anything it may not replace."""
    if not os.path.lexists(path):
        return False
    if path.is_symlink():
        raise CheckpointError(f"path: {path} exists and is a symbolic link; refusing to replace it (diffcore only "
                              f"replaces checkpoint directories it wrote)")
    if not is_checkpoint(path):
        kind = "a folder" if path.is_dir() else "a file" if path.is_file() else "a special file"
        raise CheckpointError(f"path: {path} exists and is {kind}, not a diffcore checkpoint (no {MANIFEST} with "
                              f"format {FORMAT_NAME!r}); refusing to replace it: choose another path or move it "
                              f"away (nothing was changed)")
    if not overwrite:
        raise CheckpointError(f"path: {path} already holds a diffcore checkpoint; pass overwrite=True "
                              f"(diffcore export --overwrite) to replace it (nothing was changed)")
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``). Returns False when
    the platform or file system cannot; raises OSError for other failures."""
    renameat2 = getattr(_libc(), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _aside_name(path: Path, kind: str) -> Path:
    return path.parent / f".{kind}-{path.name}-{uuid.uuid4().hex[:12]}"


def _leftover_pattern(name_pattern: str) -> "re.Pattern[str]":
    return re.compile(rf"\.(tmp|old)-({name_pattern})-[0-9a-f]{{12}}")


def _is_leftover_dir(entry: os.DirEntry) -> bool:
    """A real directory holding only regular files named as a checkpoint's are (what an interrupted save leaves)."""
    if not entry.is_dir(follow_symlinks=False):
        return False
    return all(e.name in CHECKPOINT_FILES and e.is_file(follow_symlinks=False) for e in outputs.scan_folder(Path(entry.path)))


def _remove_leftovers(folder: Path, name_pattern: str) -> None:
    """Delete ``.tmp-<name>-<12 hex>`` / ``.old-<name>-<12 hex>`` directories of interrupted saves in ``folder``
    (``<name>`` matching ``name_pattern``) that hold only checkpoint files."""
    pattern = _leftover_pattern(name_pattern)
    for entry in outputs.scan_folder(folder):
        if pattern.fullmatch(entry.name) and _is_leftover_dir(entry):
            shutil.rmtree(entry.path, ignore_errors=True)


def _restore_interrupted(path: Path) -> None:
    """Where the exchange is unavailable: if a save died between renaming the old checkpoint aside and moving the
    new one in, ``path`` is missing and ``.old-<name>-*`` is complete: put it back."""
    if os.path.lexists(path):
        return
    pattern = _leftover_pattern(re.escape(path.name))
    for entry in outputs.scan_folder(path.parent):
        match = pattern.fullmatch(entry.name)
        if match and match.group(1) == "old" and _is_leftover_dir(entry) and is_checkpoint(entry.path):
            os.rename(entry.path, path)
            return


def save_checkpoint(path: "str | os.PathLike", *, model: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                    step: int, ema: Optional[Mapping[str, torch.Tensor]] = None,
                    state: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> Path:
    """Write a checkpoint directory at ``path`` atomically and crash-safely (see the module notes).

    Args:
        path: the checkpoint directory to create. If it exists it must be a diffcore checkpoint
            (:func:`is_checkpoint`) and ``overwrite`` must be True; anything else raises :class:`CheckpointError`
            before anything is written, and is left untouched.
        model: the model's ``state_dict()`` (tensors are copied to the CPU).
        config: the full configuration, a JSON-serialisable mapping.
        step: the number of optimizer steps done (an int >= 0).
        ema: the EMA weights as a state dict, or None.
        state: the training state (optimizer ``state_dict()``, RNG states, ...): nested dicts/lists/tuples of
            tensors, numbers, strings and None (see :func:`flatten_state`).
        overwrite: replace an existing diffcore checkpoint at ``path``.
    Returns the checkpoint's path. Raises ``OSError`` (with the previous checkpoint, if any, intact and no partial
    file left) when writing fails, e.g. on a full disk.
    """
    path = Path(path)
    if not _is_count(step):
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    _check_target(path, overwrite)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted(path)
    _remove_leftovers(parent, re.escape(path.name))
    tree, state_tensors = flatten_state(dict(state or {}))
    files = {"model.safetensors": _safetensors_bytes(model, "model"),
             "state.safetensors": _safetensors_bytes(state_tensors, "state"),
             "state.json": json.dumps(tree, allow_nan=True).encode(),
             "config.json": json.dumps(dict(config), indent=2, sort_keys=True).encode()}
    if ema is not None:
        files["ema.safetensors"] = _safetensors_bytes(ema, "ema")
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": int(step),
                "files": {name: {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
                          for name, blob in files.items()}}
    files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    tmp = _aside_name(path, "tmp")
    aside: Optional[Path] = None  # where the replaced checkpoint is once the new one is in place
    try:
        tmp.mkdir()
        for name, blob in files.items():
            outputs.write_synced(tmp / name, blob)
        outputs.fsync_dir(tmp)
        if _check_target(path, overwrite):  # again: the target may have appeared meanwhile
            if _exchange(tmp, path):
                aside = tmp
            else:
                aside = _aside_name(path, "old")
                os.rename(path, aside)
                os.rename(tmp, path)
        else:
            os.rename(tmp, path)
        outputs.fsync_dir(parent)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not os.path.lexists(path):  # the second rename of the fallback failed
            os.rename(aside, path)
        previous = "the previous checkpoint there is unchanged" if aside is None else "it was not replaced"
        raise OSError(error.errno, f"could not write the checkpoint {path}: {error.strerror or error}; "
                      f"{previous} and no partial file was left") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return path


def load_checkpoint(path: "str | os.PathLike", *, map_location: "torch.device | str" = "cpu",
                    load_state: bool = True) -> Checkpoint:
    """Load and verify a checkpoint directory written by :func:`save_checkpoint`.

    Every file is checked against the manifest before anything is returned; ``load_state=False`` skips the
    training state (to sample from a checkpoint). Raises :class:`CheckpointError` on a missing, truncated,
    corrupted, malformed or foreign checkpoint.
    """
    from safetensors.torch import load

    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    wanted = ["model.safetensors", "config.json"] + (["ema.safetensors"] if "ema.safetensors" in files else [])
    if load_state:
        wanted += ["state.safetensors", "state.json"]
    blobs = {}
    for name in wanted:
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: its manifest lists no {name}")
        blobs[name] = _read_verified(path, name, files[name])

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            loaded = load(blobs[name])
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"checkpoint {path}: {name} is not a valid safetensors file: {error}") from error
        return {k: v.to(map_location) for k, v in loaded.items()}

    try:
        config = json.loads(blobs["config.json"])
        tree = json.loads(blobs["state.json"]) if load_state else {}
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: a JSON file is unreadable: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: config.json must hold a JSON object, got {type(config).__name__}")
    state = unflatten_state(tree, tensors("state.safetensors")) if load_state else {}
    return Checkpoint(path=path, step=manifest["step"], config=config, model=tensors("model.safetensors"),
                      ema=tensors("ema.safetensors") if "ema.safetensors" in blobs else None, state=state,
                      version=manifest["version"])


def load_state_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Load ``state_dict`` into ``module`` only if its keys, shapes and dtypes (float vs not) match exactly.

    Raises :class:`CheckpointError` listing missing and unexpected keys and shape mismatches (the usual sign that
    the checkpoint was trained with another model configuration); nothing is loaded in that case.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:5])}{', ...' if len(items) > 5 else ''})")
        raise CheckpointError(f"{what}: the checkpoint does not match the model configuration: " + "; ".join(parts))
    module.load_state_dict(dict(state_dict), strict=True)


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """The leaves where two JSON-like configs differ, as ``"key.path: saved != current"`` strings."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in current:
                out.append(f"{name}: {saved.get(key, '<absent>')!r} != {current.get(key, '<absent>')!r}")
            else:
                out.extend(config_differences(saved[key], current[key], name))
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix or '<root>'}: {saved!r} != {current!r}"]


# ----------------------------------------------------------------------------------------------------------------
# a folder of checkpoints

def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint at ``step``: ``step_00001000``."""
    return f"step_{int(step):08d}"


def _step_of(name: str) -> int:
    return int(name[len("step_"):])


def save_to_folder(folder: "str | os.PathLike", step: int, *, keep_last: Optional[int] = None,
                   model: Mapping[str, torch.Tensor], ema: Optional[Mapping[str, torch.Tensor]] = None,
                   **kwargs: Any) -> Path:
    """:func:`save_checkpoint` to ``folder/step_XXXXXXXX`` (replacing a checkpoint of the same step), then point
    ``folder/latest`` at it (atomically) and delete older ``step_*`` checkpoints beyond the newest ``keep_last``
    (None keeps all) and the leftovers of interrupted saves (see the module notes). Returns the new checkpoint's
    path.

    Only finite states enter a folder: a ``model`` or ``ema`` holding NaN or infinity raises
    :class:`CheckpointError` before anything is written or deleted, so the newest checkpoint, which pruning never
    deletes, is always the last finite one. Pruning deletes only diffcore checkpoints named ``step_<digits>``.
    """
    folder = Path(folder)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: expected None or an int >= 1, got {keep_last!r}")
    for what, tensors in (("model", model), ("ema", ema or {})):
        bad = nonfinite_tensors(tensors)
        if bad:
            raise CheckpointError(f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN or infinity (e.g. "
                                  f"{', '.join(bad[:3])}); a folder of checkpoints keeps only finite states, so "
                                  f"{folder} was left as it was")
    folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder, _STEP_NAME.pattern)
    outputs.remove_write_leftovers(folder / LATEST)
    target = folder / checkpoint_name(step)
    existed = os.path.lexists(target)
    path = save_checkpoint(target, step=step, model=model, ema=ema, overwrite=True, **kwargs)
    try:
        outputs.atomic_write_text(folder / LATEST, path.name + "\n")
    except BaseException:
        if not existed:  # the new checkpoint is not reachable: do not leave it behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    if keep_last is not None:
        older = sorted((entry for entry in outputs.scan_folder(folder) if _STEP_NAME.fullmatch(entry.name)
                        and entry.name != path.name and is_checkpoint(entry.path)), key=lambda e: _step_of(e.name))
        for victim in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(victim.path, ignore_errors=True)
    return path


def latest_checkpoint(folder: "str | os.PathLike") -> Optional[Path]:
    """The checkpoint ``folder/latest`` points to, or None when the folder holds no ``latest`` file yet.

    ``latest`` must be a small regular file naming a sibling step folder (``step_<digits>``, a real directory,
    not a link); anything else (``../elsewhere``, an absolute path, a missing folder) raises
    :class:`CheckpointError`."""
    folder = Path(folder)
    pointer = folder / LATEST
    try:
        info = os.lstat(pointer)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > 256:
        raise CheckpointError(f"{pointer}: expected a small file naming a step folder, found something else")
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{pointer} is unreadable: {error}") from error
    if not _STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: expected the name of a step folder beside it (step_NNNNNNNN), "
                              f"got {name!r}")
    target = folder / name
    if target.is_symlink() or not target.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which is not a directory in {folder}")
    return target


def resolve_checkpoint(path: "str | os.PathLike") -> Path:
    """A checkpoint directory from either itself or a folder of checkpoints (then its ``latest``)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"checkpoint not found: {path} is neither a checkpoint directory (no {MANIFEST}) nor a "
                              f"folder of checkpoints (no '{LATEST}' file)")
    return latest


__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
           "read_manifest", "is_checkpoint", "nonfinite_tensors", "load_state_strict", "config_differences",
           "save_to_folder", "latest_checkpoint", "resolve_checkpoint", "checkpoint_name", "capture_rng_state",
           "restore_rng_state", "flatten_state", "unflatten_state",
           "FORMAT_NAME", "FORMAT_VERSION", "SUPPORTED_VERSIONS", "CHECKPOINT_FILES"]
