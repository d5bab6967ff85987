"""Writing files so that nothing is ever half-written: one file atomically, or a command's files all together.

:func:`atomic_write_bytes` writes a temporary file beside the target, fsyncs it and renames it over the target:
readers see the old file or the new one. :func:`write_together` does that for several files at once: every
file's bytes are prepared by the caller first, every temporary file is written before the first rename, and a
failure (full disk, read-only folder, a target that is a folder) removes the temporaries and the folders it
created, so the output folder is left as it was; with ``replace=False`` it never replaces an existing file (the
command line's outputs: diffcore never replaces what it did not write unless told to with ``--overwrite``).
"""
from __future__ import annotations

import errno
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
    disk) the temporary file is removed, the old file is left as it was, and an ``OSError`` naming ``path`` says
    so. The folder must exist."""
    write_together({Path(path): data}, create_folders=False)


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


def _place_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (FileExistsError otherwise), atomically: a hard
    link to the new name, then the temporary name removed. Where the file system has no hard links, an existence
    check and a rename (a narrow race with another writer)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (e.g. some network or FAT file systems)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _write_error(error: OSError, path: Path, replace: bool) -> OSError:
    """``error`` re-worded to name the target (not diffcore's temporary name) and to say nothing was written."""
    if isinstance(error, FileExistsError):
        reason = "it exists already (diffcore never replaces a file here)"
    else:
        reason = error.strerror or str(error)
    kept = " and existing files were left as they were" if replace else ""
    return OSError(error.errno, f"could not write {path}: {reason}; nothing was written{kept}")


def write_together(files: Mapping["str | os.PathLike", bytes], *, create_folders: bool = True,
                   replace: bool = True) -> list[Path]:
    """Write every ``{path: bytes}`` of ``files`` or none of them.

    Each target is checked first (an existing folder or a parent that is a file is an error naming it); then every
    file is written to a temporary name beside its target and fsynced, and only then moved into place. With
    ``replace=False`` an existing target is never replaced: the check runs before any write, and each move is a
    no-clobber link, so a file that appeared meanwhile (another process) is an error too, and the files this call
    had already moved into place are removed again. On any error (a full disk, a read-only folder, an interrupt)
    the temporaries and the folders this call created are removed and an OSError naming the target is raised:
    existing files are untouched. (With ``replace=True`` the final renames are not one atomic step: a crash between
    two of them can leave some new files beside old ones, never a partial file.) Returns the paths written."""
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
        if not replace and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, f"{path} exists already; nothing was written (diffcore never "
                                  f"replaces a file here)")
    created: list[Path] = []
    temporaries: dict[Path, Path] = {}
    placed: list[Path] = []
    current = next(iter(targets), Path("."))
    try:
        for path in targets:
            current = path
            missing = _missing_folders(path.parent)
            for folder in missing:
                folder.mkdir()
                created.append(folder)
        for path, data in targets.items():
            current = path
            tmp = temporary_name(path)
            temporaries[path] = tmp
            write_synced(tmp, data)
        for path, tmp in temporaries.items():
            current = path
            if replace:
                os.replace(tmp, path)
            else:
                _place_new(tmp, path)
                placed.append(path)
    except BaseException as error:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
        for path in placed:  # new files this call put in place (replace=False): ours to take back
            path.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        if isinstance(error, OSError) and error.errno is not None:
            raise _write_error(error, current, replace) from error
        raise
    for folder in {path.parent for path in targets}:
        fsync_dir(folder)
    return list(targets)
