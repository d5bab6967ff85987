"""Writing files so that nothing is ever half-written: one file atomically, or a command's files all together.

:func:`atomic_write_bytes` writes a temporary file beside the target, fsyncs it and renames it over the target:
readers see the old file or the new one. :func:`write_together` does that for several files at once: every
file's bytes are prepared by the caller first, every temporary file is written before the first rename, and a
failure (full disk, read-only folder, a target that is a folder) removes the temporaries and the folders it
created, so the output folder is left as it was.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Mapping

__all__ = ["atomic_write_bytes", "atomic_write_text", "write_together", "temporary_name", "write_synced", "fsync_dir",
           "remove_write_leftovers", "scan_folder"]


def temporary_name(path: Path) -> Path:
    """The hidden temporary file that :func:`atomic_write_bytes` writes before renaming it to ``path``:
    ``.NAME.tmp-<32 hex>`` in the same folder."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or truncated) and fsync it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that renames inside it survive a power loss (a no-op where folders cannot be opened)."""
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


def atomic_write_bytes(path: "str | os.PathLike", data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file ``.<name>.tmp-<32 hex>`` in the same folder, fsync,
    then ``os.replace``. Readers see the old file or the new one, never a partial one; on failure (e.g. a full
    disk) the temporary file is removed, the old file is left as it was, and an ``OSError`` says so. The folder
    must exist."""
    path = Path(path)
    try:
        write_together({path: data}, create_folders=False)
    except OSError as error:
        raise OSError(error.errno, f"could not write {path}: {error.strerror or error}; it was left as it "
                      f"was") from error


def atomic_write_text(path: "str | os.PathLike", text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def scan_folder(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` (empty when it does not exist)."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except FileNotFoundError:
        return []


def remove_write_leftovers(path: Path) -> None:
    """Remove the temporary files an interrupted :func:`atomic_write_bytes` of ``path`` left (regular files named
    exactly ``.<name>.tmp-<32 hex>``; nothing else)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-[0-9a-f]{{32}}")
    for entry in scan_folder(path.parent):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its missing ancestors, outermost first (empty when ``folder`` exists)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    return missing[::-1]


def write_together(files: Mapping["str | os.PathLike", bytes], *, create_folders: bool = True) -> list[Path]:
    """Write every ``{path: bytes}`` of ``files`` or none of them.

    Each target is checked first (an existing folder or a parent that is a file is an error naming it); then every
    file is written to a temporary name beside its target and fsynced, and only then renamed into place. On any
    error the temporaries and the folders this call created are removed and the error is raised: existing files
    are untouched. (The final renames are not one atomic step: a crash between two of them can leave some new
    files beside old ones, never a partial file.) Returns the paths written."""
    targets = {Path(p): data for p, data in files.items()}
    for path in targets:
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a folder; expected a file path")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise NotADirectoryError(f"{path}: {parent} is a file, not a folder")
                break
        if not create_folders and not path.parent.is_dir():
            raise FileNotFoundError(f"{path}: no such folder {path.parent}")
    created: list[Path] = []
    temporaries: dict[Path, Path] = {}
    try:
        for path in targets:
            missing = _missing_folders(path.parent)
            for folder in missing:
                folder.mkdir()
                created.append(folder)
        for path, data in targets.items():
            tmp = temporary_name(path)
            temporaries[path] = tmp
            write_synced(tmp, data)
        for path, tmp in temporaries.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    for folder in {path.parent for path in targets}:
        fsync_dir(folder)
    return list(targets)
