"""The files a capture writes, in one place: a frame's names in the watch folder (a hidden
temporary name while it downloads, then its final name by a rename, which the watcher takes as
a complete file, never over an existing file) and the sequence's journal lines."""

from __future__ import annotations

import ctypes
import errno
import json
import os
from pathlib import Path
from typing import Any


def frame_stem(prefix: str, frame: int) -> str:
    """``PREFIX_NNNN``: the sequence's start time and the frame's number (the camera's own
    names repeat: Canon's ``capt0000.cr3`` for every frame captured to RAM)."""
    return f"{prefix}_{frame:04d}"


def temp_path(folder: Path, stem: str, ext: str) -> Path:
    """``.STEM.ext.part``: hidden and of another extension, so the watcher never takes it."""
    return folder / f".{stem}{ext}.part"


def append_line(journal: Path, line: dict[str, Any]) -> None:
    """Append one JSON line to ``journal`` and fsync it (a line is whole or absent)."""
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def place(temp: Path, folder: Path, stem: str, ext: str) -> Path:
    """Rename ``temp`` to its final name in ``folder`` (the watcher takes a rename into place
    as a complete file), never over an existing file: ``stem-2.ext``, ... if taken."""
    for n in range(1, 1000):
        final = folder / (f"{stem}{ext}" if n == 1 else f"{stem}-{n}{ext}")
        try:
            rename_noreplace(temp, final)
        except FileExistsError:
            continue
        return final
    raise FileExistsError(errno.EEXIST, "no free name", str(folder / f"{stem}{ext}"))


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # linux/fs.h


def rename_noreplace(source: Path, target: Path) -> None:
    """``os.rename`` that fails with FileExistsError instead of replacing ``target``: Linux's
    ``renameat2(RENAME_NOREPLACE)`` (atomic), else, where the file system or the C library
    lacks it, a check just before the rename (a frame's name is unique to its sequence)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        done = renameat2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if done == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)
