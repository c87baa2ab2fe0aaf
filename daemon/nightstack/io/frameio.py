"""Reading a frame's file: regular files only, never blocking, hashing bounded, faults sorted.

A name in the watch folder may have become anything by the time its frame is read: a FIFO
(``open`` would wait for a writer forever), a symlink re-pointed to ``/dev/zero`` (an endless
read), a directory. :func:`open_frame` opens with ``O_NONBLOCK`` (a FIFO opens at once) and
checks the *opened* descriptor with ``fstat``, so what is read is what was checked; anything but
a regular file is refused with a one-line reason (:class:`NotAFrameFile`). Hashing stops after
:data:`MAX_FRAME_BYTES`.

Which read errors are the file's and which the machine's: ``EIO`` (the card), ``EMFILE`` /
``ENFILE`` (this process or the system is out of file descriptors: idle web clients, another
program) may pass; :func:`transient_error` finds them in an exception's chain of causes.

Also here, for every module that needs them: the frame files' extensions and the free space
under a folder (:func:`free_bytes`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

MAX_FRAME_BYTES = 4 << 30
"""No frame file is larger (bytes): a 100 MP 16-bit raw is ~200 MB, an uncompressed 61 MP RGB
float32 FITS ~730 MB; a larger "frame" is refused rather than hashed for minutes."""
_HASH_CHUNK = 1 << 20  # read files in 1 MiB pieces while hashing


TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EMFILE, errno.ENFILE})
"""Read errors of the storage or the process, not of the file's content: worth another try."""
FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
"""Out of file descriptors (the process's ``RLIMIT_NOFILE``, or the system's table)."""


class NotAFrameFile(OSError):
    """The path is not a regular file (a FIFO, a device, a directory); ``strerror`` says what."""


def transient_error(err: BaseException) -> OSError | None:
    """The transient ``OSError`` (:data:`TRANSIENT_ERRNOS`) in ``err``'s chain of causes, if any
    (LibRaw's own ``LibRawIOError`` is not an OSError)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in TRANSIENT_ERRNOS:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def open_frame(path: str | os.PathLike[str]) -> int:
    """Open ``path`` for reading without blocking and return the descriptor (the caller closes
    it); raise :class:`NotAFrameFile` unless the opened file is a regular file (a symlink is
    followed: what counts is what it points at now)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFrameFile(errno.EINVAL, f"not a regular file ({_kind(mode)})", str(path))
        os.set_blocking(fd, True)  # regular files never block; reads see EOF normally
    except BaseException:
        os.close(fd)
        raise
    return fd


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged process may still write on the file system holding ``path``
    (``statvfs``: available blocks x fragment size); ``None`` if that cannot be told."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def file_sha256(path: Path, limit: int = MAX_FRAME_BYTES) -> str:
    """Content hash of a frame file (the journal's identity of a frame); at most ``limit``
    bytes are read (a longer file raises :class:`NotAFrameFile`, ``EFBIG``)."""
    digest = hashlib.sha256()
    fd = open_frame(path)
    with open(fd, "rb", buffering=0, closefd=True) as fh:
        left = limit
        while chunk := fh.read(min(_HASH_CHUNK, left + 1)):
            left -= len(chunk)
            if left < 0:
                raise NotAFrameFile(
                    errno.EFBIG, f"larger than {limit / 2**30:g} GiB: not a frame", str(path)
                )
            digest.update(chunk)
    return digest.hexdigest()


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"
