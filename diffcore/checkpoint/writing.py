"""Writing one checkpoint directory atomically and crash-safely (:func:`save_checkpoint`).

:func:`save_checkpoint` replaces only a diffcore checkpoint (:func:`~diffcore.checkpoint.is_checkpoint`), and only
with ``overwrite=True``; any other existing path (a file, a folder of documents, a link) is refused before anything
is written.

Writing: the new checkpoint is assembled under ``.tmp-<name>-<12 hex>`` beside the target, every file is
fsync'ed, then it is moved into place: onto a free name by one ``rename``; over an existing checkpoint by one
atomic exchange of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``), after which the old one, now under
the temporary name, is deleted. A kill -9 at any moment therefore leaves the old or the new checkpoint at
``path``, complete. Where the exchange is unavailable the old one is first renamed to ``.old-<name>-<12 hex>`` and
the next save to that path puts it back if the process died between the two renames. Leftovers of interrupted
saves (``.tmp-<name>-*``, ``.old-<name>-*`` holding only checkpoint files, and ``.<file>.tmp-<32 hex>`` of
:func:`diffcore.outputs.atomic_write_bytes`) are removed by the next save; nothing else is ever deleted (see
:mod:`diffcore.checkpoint.atomic_replace`). A failed write (e.g. a full disk, ``ENOSPC``) removes its temporary
folder and raises an ``OSError`` saying the previous checkpoint is unchanged.

No pickle is involved: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import outputs
from . import atomic_replace
from .manifest import FORMAT_NAME, MANIFEST, CheckpointError, is_checkpoint, is_count, make_manifest
from .state_tree import flatten_state


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


def save_checkpoint(path: "str | os.PathLike", *, model: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                    step: int, ema: Optional[Mapping[str, torch.Tensor]] = None,
                    state: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> Path:
    """Write a checkpoint directory at ``path`` atomically and crash-safely (see the module notes).

    Args:
        path: the checkpoint directory to create. If it exists it must be a diffcore checkpoint
            (:func:`~diffcore.checkpoint.is_checkpoint`) and ``overwrite`` must be True; anything else raises
            :class:`~diffcore.checkpoint.CheckpointError` before anything is written, and is left untouched.
        model: the model's ``state_dict()`` (tensors are copied to the CPU).
        config: the full configuration, a JSON-serialisable mapping.
        step: the number of optimizer steps done (an int >= 0).
        ema: the EMA weights as a state dict, or None.
        state: the training state (optimizer ``state_dict()``, RNG states, ...): nested dicts/lists/tuples of
            tensors, numbers, strings and None (see :func:`~diffcore.checkpoint.flatten_state`).
        overwrite: replace an existing diffcore checkpoint at ``path``.
    Returns the checkpoint's path. Raises ``OSError`` (with the previous checkpoint, if any, intact and no partial
    file left) when writing fails, e.g. on a full disk.
    """
    path = Path(path)
    if not is_count(step):
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    _check_target(path, overwrite)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    atomic_replace.restore_interrupted(path)
    atomic_replace.remove_leftovers(parent, re.escape(path.name))
    tree, state_tensors = flatten_state(dict(state or {}))
    files = {"model.safetensors": _safetensors_bytes(model, "model"),
             "state.safetensors": _safetensors_bytes(state_tensors, "state"),
             "state.json": json.dumps(tree, allow_nan=True).encode(),
             "config.json": json.dumps(dict(config), indent=2, sort_keys=True).encode()}
    if ema is not None:
        files["ema.safetensors"] = _safetensors_bytes(ema, "ema")
    files[MANIFEST] = json.dumps(make_manifest(step, files), indent=2).encode()
    tmp = atomic_replace.aside_name(path, "tmp")
    aside: Optional[Path] = None  # where the replaced checkpoint is once the new one is in place
    try:
        tmp.mkdir()
        for name, blob in files.items():
            outputs.write_synced(tmp / name, blob)
        outputs.fsync_dir(tmp)
        if _check_target(path, overwrite):  # again: the target may have appeared meanwhile
            if atomic_replace.exchange_directories(tmp, path):
                aside = tmp
            else:
                aside = atomic_replace.aside_name(path, "old")
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
