"""The daemon's prepare thread: the queue of complete files, exactly-once bookkeeping, and one
prepared frame at a time handed to the worker.

:class:`Intake` owns what the watcher and the worker share about frames not stacked yet:

- ``paths``: complete files, in arrival order (the watcher's ``on_ready`` is :meth:`enqueue`);
- the content hashes of every frame processed for good (``folder.known_hashes``), so a copy of
  a frame already stacked is skipped (:class:`Duplicate`);
- the *outstanding* paths: handed over by the watcher and not journaled yet. After a failed
  write the worker rebuilds the queues from them (:meth:`requeue`), and items prepared before
  carry an older ``epoch`` and are dropped, so each frame is stacked exactly once;
- ``prepared``: a queue of one, so at most two frames are in memory (one being stacked, one
  waiting) and decoding frame N+1 overlaps stacking frame N.

Its thread hashes, skips known frames and runs the :class:`~nightstack.pipeline.prepare.Preparer`
(decode, calibrate, detect) with the open session's sky. It pauses while ``paused`` is set
(the output cannot be written: nothing could be stored) and reports a stage stuck on one frame
(:meth:`stuck`: the daemon then stops feeding systemd's watchdog).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nightstack.config import Settings
from nightstack.io.frameio import FD_ERRNOS, file_sha256, transient_error
from nightstack.pipeline.prepare import Prepared, Preparer
from nightstack.registration.detect import SkyArea
from nightstack.service.folder import known_hashes
from nightstack.service.notify import shown

log = logging.getLogger("nightstack")

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # every empty file: rejected each, not deduped
TICK_S = 0.5  # how often a waiting thread looks at its stop event
FD_WAIT_S = 1.0  # no file descriptor left: how often to try a frame's file again
STAGE_SLACK_S = 10.0
"""The prepare stage's time for one frame beyond the decode timeout (hash, detection, s)."""


@dataclass
class Duplicate:
    """A file whose content was already processed: skipped."""

    path: Path


@dataclass
class Transient:
    """A frame that failed for a reason that may pass (``decoder.TransientDecodeError``)."""

    prepared: Prepared


Item = Prepared | Duplicate | Transient
"""What the prepare thread hands the worker."""


class Intake:
    """The prepare thread and the queues around it (see the module docstring).

    Parameters
    ----------
    settings
        ``decode_timeout_s`` (the stage's deadline) and ``stable_s`` (when a failed file is
        complete).
    sky
        Where the stars are for the next frame (the open session's sky), asked per frame.
    stop, paused
        The daemon's events: stop for good; wait while the output cannot be written.
    """

    def __init__(
        self,
        settings: Settings,
        sky: Callable[[], SkyArea],
        stop: threading.Event,
        paused: threading.Event,
    ) -> None:
        self.settings = settings
        self.preparer: Preparer | None = None  # given at start, replaced on a reload
        self._sky = sky
        self.stop, self.paused = stop, paused
        self.paths: queue.Queue[Path] = queue.Queue()
        self.prepared: queue.Queue[tuple[int, Item]] = queue.Queue(maxsize=1)
        self.hashes: set[str] = set()
        self._lock = threading.Lock()  # guards hashes, _outstanding and epoch
        self._outstanding: dict[Path, int] = {}  # path -> times queued, in arrival order
        self.epoch = 0  # bumped when the queues are rebuilt: older prepared items are dropped
        self._busy = threading.Event()  # the thread holds a frame
        self._stage_since: float | None = None  # monotonic s: the stage's frame since
        self.deadline_s = settings.decode_timeout_s + STAGE_SLACK_S
        """The longest the stage may hold one frame (s) before :meth:`stuck` says so: the
        decode's own timeout plus hashing and detection."""
        self._thread = threading.Thread(target=self._run, name="nightstack-prepare", daemon=True)

    # --- the worker's side --------------------------------------------------------------------
    def start(self, output: Path, preparer: Preparer) -> None:
        """Load the hashes of the frames processed for good in ``output`` and start preparing
        with ``preparer``."""
        self.hashes = known_hashes(output)
        self.use(preparer)
        self._thread.start()

    def use(self, preparer: Preparer) -> None:
        """Prepare the next frames with ``preparer`` (the settings were reloaded)."""
        self.preparer = preparer

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def take(self, timeout: float) -> Item | None:
        """The next prepared item of the current epoch, or None after ``timeout`` s (or an item
        of an older epoch, dropped: it is still outstanding and was queued again)."""
        try:
            epoch, item = self.prepared.get(timeout=timeout)
        except queue.Empty:
            return None
        return item if epoch == self.epoch else None

    def depth(self) -> int:
        """Frames waiting: queued paths and the prepared item."""
        return self.paths.qsize() + self.prepared.qsize()

    def behind(self) -> bool:
        """Whether frames wait or one is being prepared."""
        return bool(self.depth() or self._busy.is_set())

    def enqueue(self, path: Path) -> None:
        """The watcher's on_ready: remember the path as outstanding, queue it."""
        with self._lock:
            self._outstanding[path] = self._outstanding.get(path, 0) + 1
        self.paths.put(path)

    def done(self, path: Path) -> None:
        """``path`` was journaled (or skipped as a duplicate): no longer outstanding."""
        with self._lock:
            left = self._outstanding.pop(path, 0) - 1
            if left > 0:
                self._outstanding[path] = left

    def forget(self, digest: str) -> None:
        """A frame is not processed for good (its first attempt waits for a retry)."""
        with self._lock:
            self.hashes.discard(digest)

    def requeue(
        self, output: Path, first: list[Path] | None = None, current: Prepared | None = None
    ) -> int:
        """Rebuild the queues from the disk: hashes from the journals, then every outstanding
        path (after ``first``) queued once, in arrival order; prepared items of the old epoch
        are dropped. ``current``, the frame the worker is about to stack, is not queued again.
        Returns the number of paths queued."""
        with self._lock:
            self.hashes = known_hashes(output)
            self.epoch += 1
            while True:
                try:
                    self.paths.get_nowait()
                except queue.Empty:
                    break
            order = dict.fromkeys([*(first or []), *self._outstanding], 1)
            if current is not None:
                order.pop(current.path, None)
            for path in order:
                self.paths.put(path)
            queued = len(order)
            if current is not None:
                order[current.path] = 1
                if current.sha256 is not None:
                    self.hashes.add(current.sha256)
            self._outstanding = order
        return queued

    def stuck(self) -> str | None:
        """Why the watchdog must not be fed: the stage has held one frame longer than
        :attr:`deadline_s` (else None)."""
        since = self._stage_since
        if since is None or time.monotonic() - since <= self.deadline_s:
            return None
        return f"the prepare stage is stuck on one frame for {time.monotonic() - since:.0f} s"

    # --- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        """Hash, skip known frames, decode and detect; hand over one frame at a time."""
        while not self.stop.is_set():
            if self.paused.is_set():  # nothing can be stored: do not decode in vain
                self.stop.wait(TICK_S)
                continue
            if not self.prepared.empty():  # one frame waits already: at most two in memory
                self.stop.wait(0.02)
                continue
            try:
                path = self.paths.get(timeout=TICK_S)
            except queue.Empty:
                continue
            self._busy.set()
            self._stage_since = time.monotonic()
            try:
                found = self._prepare(path)
                self._stage_since = None  # done: handing over is waiting, not a stuck stage
                while found is not None and not self.stop.is_set():
                    try:
                        self.prepared.put(found, timeout=TICK_S)
                        break
                    except queue.Full:
                        continue
            finally:
                self._stage_since = None
                self._busy.clear()

    def _prepare(self, path: Path) -> tuple[int, Item] | None:
        """(epoch, item) for ``path``, or None when it failed while still being written (the
        watcher reports it again when it changes)."""
        seen = _stat_key(path)  # before the hash: what the decode will judge
        digest, unreadable = self._hash(path)
        with self._lock:
            epoch = self.epoch
            duplicate = digest in self.hashes and digest != EMPTY_SHA256
            if digest is not None:
                self.hashes.add(digest)
        if duplicate:
            return epoch, Duplicate(path)
        if unreadable is not None:  # EIO: the card, not the file, may be at fault
            reason = f"cannot read file: {unreadable.strerror}"
            transient = transient_error(unreadable) is not None
            prepared = Prepared(path, None, None, None, None, reason, {}, None, transient)
            return epoch, _transient_or_not(prepared)
        assert self.preparer is not None
        prepared = self.preparer.prepare(path, digest, self._sky())
        if prepared.error and not prepared.transient and not self._settled(path, seen):
            log.info("%s: %s while still being written; decoded again once it is complete",
                     shown(path.name), prepared.error)  # fmt: skip
            if digest is not None:
                self.forget(digest)
            self.done(path)
            return None
        return epoch, _transient_or_not(prepared)

    def _hash(self, path: Path) -> tuple[str | None, OSError | None]:
        """(content hash, None), or (None, the error) when the file cannot be read. While the
        process has no file descriptor left (``EMFILE``/``ENFILE``: a fault of the machine, not
        of the frame) it waits and tries again every :data:`FD_WAIT_S` (one log line), so such a
        frame is never rejected for it."""
        waited = 0
        while True:
            self._stage_since = time.monotonic()  # waiting for a descriptor is progress
            try:
                digest = file_sha256(path)
            except OSError as err:
                if err.errno not in FD_ERRNOS or self.stop.is_set():
                    return None, err
                if not waited:
                    log.warning("no file descriptor left to read %s (%s); waiting for one, "
                                "checked every %g s (the frame is not rejected)",
                                shown(path.name), err.strerror, FD_WAIT_S)  # fmt: skip
                waited += 1
                self.stop.wait(FD_WAIT_S)
                continue
            if waited:
                log.info("file descriptors free again after %d tries: %s read", waited,
                         shown(path.name))  # fmt: skip
            return digest, None

    def _settled(self, path: Path, seen: tuple[int, int] | None) -> bool:
        """Whether a file that failed to decode is complete, so the failure is final: its size
        and mtime are still ``seen`` (as before the hash) and ``stable_s`` old. A writer that
        opens and closes the file per chunk makes it fail while young: wait for ``stable_s``
        after its last change; False if it changed (the watcher reports it again, complete or
        not) or the daemon stops."""
        while not self.stop.is_set():
            now_key = _stat_key(path)
            if now_key is None or now_key != seen:
                return False
            age = time.time() - now_key[1] / 1e9
            if age >= self.settings.stable_s:
                return True
            self.stop.wait(min(self.settings.stable_s - age, TICK_S))
        return False


def _transient_or_not(prepared: Prepared) -> Prepared | Transient:
    """``prepared`` as a Transient if it failed for a reason that may pass."""
    return Transient(prepared) if prepared.transient else prepared


def _stat_key(path: Path) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of ``path``, None if it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
