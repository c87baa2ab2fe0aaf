"""The output folder's control files: the daemon's lock and the close request.

- ``.nightstack.lock``: the running daemon holds a shared ``flock`` on it for as long as it runs
  (the kernel drops it when the process ends, kill -9 included), so ``nightstack close`` can tell
  whether a daemon is there to ask.
- ``close-request``: an empty regular file that asks the daemon to close its session. It is
  created with ``O_NOFOLLOW`` and never truncated (a planted symlink is refused, never followed);
  the daemon takes only a regular file and ignores anything else of that name (a directory, a
  symlink, a FIFO) with one log line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

CLOSE_REQUEST = "close-request"
LOCK = ".nightstack.lock"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def hold_lock(output_dir: Path) -> int:
    """The daemon's side: open the lock file and hold a shared lock on it; returns the
    descriptor (keep it open while running: closing it, or exiting, releases the lock)."""
    fd = os.open(output_dir / LOCK, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return fd


def daemon_running(output_dir: Path) -> bool:
    """Whether a daemon holds the lock of ``output_dir`` now."""
    try:
        fd = os.open(output_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file (or not a file): no daemon ever ran here, or not ours
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def request_close(output_dir: Path) -> None:
    """Ask the daemon writing into ``output_dir`` to close its session: create the request file
    (an existing regular one is left as it is). Raises ``OSError`` with a one-line
    ``strerror`` when the name is taken by something else (a symlink: ``ELOOP``)."""
    try:
        fd = os.open(output_dir / CLOSE_REQUEST, _CREATE, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            err.strerror = f"{CLOSE_REQUEST} is a symlink: refused, not followed"
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{CLOSE_REQUEST} is not a regular file")
    finally:
        os.close(fd)


def take_close_request(output_dir: Path) -> str | None:
    """The daemon's side, every tick: "close" if a regular request file was there (it is
    removed), a one-line complaint if something else has its name, None if nothing."""
    path = output_dir / CLOSE_REQUEST
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file: ignored (remove it; `nightstack close` asks)"
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"{path} cannot be removed ({err.strerror}): ignored"
    return "close"
