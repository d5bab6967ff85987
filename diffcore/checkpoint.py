"""Checkpoints: one directory per checkpoint, written atomically and verified on load.

Layout of a checkpoint directory::

    model.safetensors   the model's state dict
    ema.safetensors     the EMA weights, as a state dict of the same model (optional)
    state.safetensors   the tensors of the training state (optimizer moments, RNG states, sampler history, ...)
    state.json          the rest of the training state (step, LR schedule, data position, ...), tensors referenced
    config.json         the full configuration (JSON object)
    manifest.json       format name and version, the step, and the size and SHA-256 of every file above

The directory is assembled under a temporary name in the same parent folder, every file is fsync'ed, and then
the directory is renamed into place, so a checkpoint is either complete or absent: a training run killed
mid-write leaves at most a hidden ``.tmp-*`` folder, which the next save removes. Loading re-hashes every file
against the manifest, so a truncated or corrupted checkpoint raises :class:`CheckpointError` instead of loading
partially; :func:`load_state_strict` refuses state dicts whose keys or shapes differ from the model's.

No pickle is involved: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

FORMAT_NAME = "diffcore-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"  #: file in a checkpoint folder naming the newest complete checkpoint directory
_TENSOR_TAG, _INT_DICT_TAG, _TUPLE_TAG = "__tensor__", "__int_keys__", "__tuple__"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not match the model/config it is loaded into."""


# ----------------------------------------------------------------------------------------------------------------
# atomic file writes

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: "str | os.PathLike", data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, then ``os.replace``.
    Readers see the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: "str | os.PathLike", text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    atomic_write_bytes(path, text.encode("utf-8"))


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
# saving and loading

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
    """

    path: Path
    step: int
    config: dict
    model: dict[str, torch.Tensor]
    ema: Optional[dict[str, torch.Tensor]] = None
    state: dict = field(default_factory=dict)


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], what: str) -> bytes:
    from safetensors.torch import save

    clean = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: expected tensors, got a {type(value).__name__} at {key!r}")
        clean[key] = value.detach().to("cpu").contiguous().clone()
    return save(clean, metadata={"format": FORMAT_NAME})


def save_checkpoint(path: "str | os.PathLike", *, model: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                    step: int, ema: Optional[Mapping[str, torch.Tensor]] = None,
                    state: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing an existing checkpoint there).

    Args:
        path: the checkpoint directory to create.
        model: the model's ``state_dict()`` (tensors are copied to the CPU).
        config: the full configuration, a JSON-serialisable mapping.
        step: the number of optimizer steps done.
        ema: the EMA weights as a state dict, or None.
        state: the training state (optimizer ``state_dict()``, RNG states, ...): nested dicts/lists/tuples of
            tensors, numbers, strings and None (see :func:`flatten_state`).
    Returns the checkpoint's path.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
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
    tmp = parent / f".tmp-{path.name}-{uuid.uuid4().hex[:12]}"
    old = parent / f".old-{path.name}-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        for name, blob in files.items():
            _write_synced(tmp / name, blob)
        _fsync_dir(tmp)
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def _read_verified(path: Path, name: str, entry: Mapping[str, Any]) -> bytes:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: file {name} listed in its manifest is missing")
    blob = file.read_bytes()
    if len(blob) != entry["bytes"]:
        raise CheckpointError(f"checkpoint {path}: {name} is truncated or altered ({len(blob)} bytes, the manifest "
                              f"says {entry['bytes']})")
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {name} is corrupted (its SHA-256 does not match the manifest)")
    return blob


def read_manifest(path: "str | os.PathLike") -> dict:
    """The parsed ``manifest.json`` of a checkpoint directory; raises :class:`CheckpointError` if it is missing,
    unreadable or of another format/version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: not a diffcore checkpoint, "
                              f"or incomplete") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {manifest.get('version')} is not supported "
                              f"(this diffcore reads version {FORMAT_VERSION})")
    return manifest


def verify_checkpoint(path: "str | os.PathLike") -> dict:
    """Check every file of a checkpoint against its manifest (size and SHA-256); returns the manifest."""
    manifest = read_manifest(path)
    for name, entry in manifest["files"].items():
        _read_verified(Path(path), name, entry)
    return manifest


def load_checkpoint(path: "str | os.PathLike", *, map_location: "torch.device | str" = "cpu",
                    load_state: bool = True) -> Checkpoint:
    """Load and verify a checkpoint directory written by :func:`save_checkpoint`.

    Every file is checked against the manifest before anything is returned; ``load_state=False`` skips the
    training state (to sample from a checkpoint). Raises :class:`CheckpointError` on a missing, truncated,
    corrupted or foreign checkpoint.
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
    state = unflatten_state(tree, tensors("state.safetensors")) if load_state else {}
    return Checkpoint(path=path, step=int(manifest["step"]), config=config, model=tensors("model.safetensors"),
                      ema=tensors("ema.safetensors") if "ema.safetensors" in blobs else None, state=state)


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


def save_to_folder(folder: "str | os.PathLike", step: int, *, keep_last: Optional[int] = None, **kwargs: Any) -> Path:
    """:func:`save_checkpoint` to ``folder/step_XXXXXXXX``, then point ``folder/latest`` at it (atomically) and
    delete older ``step_*`` checkpoints beyond the newest ``keep_last`` (None keeps all) and stale ``.tmp-*``
    folders. Returns the new checkpoint's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = save_checkpoint(folder / checkpoint_name(step), step=step, **kwargs)
    atomic_write_text(folder / LATEST, path.name + "\n")
    if keep_last is not None:
        if keep_last < 1:
            raise ValueError(f"keep_last: expected None or >= 1, got {keep_last}")
        older = sorted((p for p in folder.glob("step_*") if p.is_dir() and p.name != path.name), key=lambda p: p.name)
        for victim in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(victim, ignore_errors=True)
    return path


def latest_checkpoint(folder: "str | os.PathLike") -> Optional[Path]:
    """The checkpoint ``folder/latest`` points to, or None when the folder holds no checkpoint yet. A ``latest``
    that names a missing directory raises :class:`CheckpointError`."""
    folder = Path(folder)
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    target = folder / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} names {target.name}, which does not exist")
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
           "read_manifest", "load_state_strict", "config_differences", "save_to_folder", "latest_checkpoint",
           "resolve_checkpoint", "checkpoint_name", "capture_rng_state", "restore_rng_state", "flatten_state",
           "unflatten_state", "atomic_write_bytes", "atomic_write_text"]
