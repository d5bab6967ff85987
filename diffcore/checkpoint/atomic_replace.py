"""Moving a finished checkpoint directory into place crash-safely, and cleaning up after interrupted saves.

Over an existing checkpoint the new one is swapped in by one atomic exchange of the two directories (Linux
``renameat2(RENAME_EXCHANGE)``, :func:`exchange_directories`). Where the exchange is unavailable the old one is
first renamed aside (:func:`aside_name`, ``.old-<name>-<12 hex>``) and :func:`restore_interrupted` puts it back if
the process died between the two renames. :func:`remove_leftovers` deletes the ``.tmp-<name>-*`` /
``.old-<name>-*`` directories of interrupted saves that hold only checkpoint files; nothing else is ever deleted.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from .. import outputs
from .manifest import CHECKPOINT_FILES, is_checkpoint


def exchange_directories(a: Path, b: Path) -> bool:
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


def aside_name(path: Path, kind: str) -> Path:
    """A fresh hidden name beside ``path`` for a directory being written (``kind="tmp"``) or replaced
    (``kind="old"``): ``.<kind>-<name>-<12 hex>``."""
    return path.parent / f".{kind}-{path.name}-{uuid.uuid4().hex[:12]}"


def _leftover_pattern(name_pattern: str) -> "re.Pattern[str]":
    return re.compile(rf"\.(tmp|old)-({name_pattern})-[0-9a-f]{{12}}")


def _is_leftover_dir(entry: os.DirEntry) -> bool:
    """A real directory holding only regular files named as a checkpoint's are (what an interrupted save leaves)."""
    if not entry.is_dir(follow_symlinks=False):
        return False
    return all(e.name in CHECKPOINT_FILES and e.is_file(follow_symlinks=False) for e in outputs.scan_folder(Path(entry.path)))


def remove_leftovers(folder: Path, name_pattern: str) -> None:
    """Delete ``.tmp-<name>-<12 hex>`` / ``.old-<name>-<12 hex>`` directories of interrupted saves in ``folder``
    (``<name>`` matching the regular expression ``name_pattern``) that hold only checkpoint files."""
    pattern = _leftover_pattern(name_pattern)
    for entry in outputs.scan_folder(folder):
        if pattern.fullmatch(entry.name) and _is_leftover_dir(entry):
            shutil.rmtree(entry.path, ignore_errors=True)


def restore_interrupted(path: Path) -> None:
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
