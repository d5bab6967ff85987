"""A folder of checkpoints, as a training run keeps them: ``step_XXXXXXXX`` directories, a ``latest`` file naming
the newest complete one, pruning of older ones, and finding a checkpoint from either kind of path.

Layout::

    latest              one line: the name of the newest complete step folder
    step_00001000/      checkpoints (see :mod:`diffcore.checkpoint.manifest`)
    step_00002000/
"""
from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import outputs
from .atomic_replace import remove_leftovers
from .manifest import MANIFEST, CheckpointError, is_checkpoint
from .writing import nonfinite_tensors, save_checkpoint

LATEST = "latest"  #: file in a checkpoint folder naming the newest complete checkpoint directory
_STEP_NAME = re.compile(r"step_[0-9]{8,}")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint at ``step``: ``step_00001000``."""
    return f"step_{int(step):08d}"


def _step_of(name: str) -> int:
    return int(name[len("step_"):])


def save_to_folder(folder: "str | os.PathLike", step: int, *, keep_last: Optional[int] = None,
                   model: Mapping[str, torch.Tensor], ema: Optional[Mapping[str, torch.Tensor]] = None,
                   **kwargs: Any) -> Path:
    """:func:`~diffcore.checkpoint.save_checkpoint` to ``folder/step_XXXXXXXX`` (replacing a checkpoint of the same
    step), then point ``folder/latest`` at it (atomically) and delete older ``step_*`` checkpoints beyond the newest
    ``keep_last`` (None keeps all) and the leftovers of interrupted saves (see
    :mod:`diffcore.checkpoint.writing`). Returns the new checkpoint's path.

    Only finite states enter a folder: a ``model`` or ``ema`` holding NaN or infinity raises
    :class:`~diffcore.checkpoint.CheckpointError` before anything is written or deleted, so the newest checkpoint,
    which pruning never deletes, is always the last finite one. Pruning deletes only diffcore checkpoints named
    ``step_<digits>``.
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
    remove_leftovers(folder, _STEP_NAME.pattern)
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
    :class:`~diffcore.checkpoint.CheckpointError`."""
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
