"""What the daemon remembers while its output cannot be written (disk full, I/O error).

A failed write loses nothing: the frame is not journaled, the daemon drops its in-memory session
(its state may be ahead of its journal) and :class:`Recovery` keeps what waits: the session to
reload from disk (:attr:`Recovery.reopen`, exactly as after a kill -9), why it must be closed once
reloaded, and when to look for free space again. While :attr:`Recovery.paused` is set the
prepare thread decodes nothing and the worker stacks nothing; the daemon says so once.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path

from nightstack.io.frameio import free_bytes

log = logging.getLogger("nightstack")

RETRY_S = 5.0  # while the output cannot be written: how often to look for free space again
SPACE_MARGIN = 16 * 2**20  # free bytes wanted besides two frame-store entries before a retry
_FULL = (errno.ENOSPC, errno.EDQUOT)


class Recovery:
    """The daemon's degraded state (see the module docstring); used by the worker thread.
    ``paused`` is the daemon's event, shared with the prepare thread."""

    def __init__(self, output: Path, paused: threading.Event) -> None:
        self.output = output
        self.paused = paused
        self.reopen: Path | None = None  # a session to reload from disk before going on
        self.close_wanted = ""  # why to close the session at ``reopen`` once it is reloaded
        self.frame_bytes = 0  # one frame-store entry of the last session: room wanted for two
        self._retry_at = 0.0

    def failed(self, err: OSError, what: str, session_dir: Path | None) -> str | None:
        """A write failed (``what``: of which frame or file). Pause, remember ``session_dir``
        to reload; returns the one-line status when this starts the pause (logged), else
        None."""
        if session_dir is not None:
            self.reopen = session_dir
        self._retry_at = time.monotonic() + RETRY_S
        if self.paused.is_set():
            return None
        self.paused.set()
        full = err.errno in _FULL or self.free() < SPACE_MARGIN
        kind = "disk full" if full else "write failed"
        log.error(
            "%s: %s (%s); decoding paused, frames wait and are stacked when %s can be written "
            "again (checked every %g s); nothing is lost",
            kind, what, err.strerror or err, self.output, RETRY_S,
            extra={"ALERT": "disk_full"},  # its own notification (service.alerts), not 'error'
        )  # fmt: skip
        return f"{kind}: waiting for space in {self.output}"

    def due(self) -> bool:
        """Paused, and time to look for free space again."""
        return self.paused.is_set() and time.monotonic() >= self._retry_at

    def room(self) -> bool:
        """Whether there is room to go on (two frame-store entries and a margin); the next look
        is :data:`RETRY_S` from now either way."""
        self._retry_at = time.monotonic() + RETRY_S
        return self.free() >= SPACE_MARGIN + 2 * self.frame_bytes

    def resumed(self, queued: int) -> None:
        """The output can be written again and ``queued`` waiting frames are queued."""
        self.paused.clear()
        log.info("%s can be written again: %d waiting frame(s) queued", self.output, queued)

    def free(self) -> int:
        """Bytes free for us in the output folder (0 if that cannot be told)."""
        return free_bytes(self.output) or 0
