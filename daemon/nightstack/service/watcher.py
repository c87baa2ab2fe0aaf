"""Watch the folder the camera writes into and report each light frame once it is complete.

:class:`FrameWatcher` wraps a watchdog observer. Its threads only *route*: they filter names, take
a ``stat`` and call ``on_ready(path)``, which the daemon uses to enqueue the path; nothing here
opens, hashes or decodes a frame.

When is a file READY (complete)?

- inotify (default): when it is closed after writing (``FileClosedEvent``, ``IN_CLOSE_WRITE``),
  or moved/renamed into place (``FileMovedEvent`` whose destination passes the filter; tether
  tools write ``IMG_0001.CR3.part`` and rename it), or when a symlink to a frame appears. A bare
  create or modify is not enough, and a read-only open + close (``FileClosedNoWriteEvent``) never
  counts.
- polling (``polling=True``, for network shares, FUSE and MTP mounts that inotify cannot see):
  when its size and mtime have not changed for ``stable_s`` seconds.
- files already in the folder when the watch is (re)armed: at once, in natural name order
  (``IMG_2`` before ``IMG_10``), if their mtime is at least ``stable_s`` old; a younger file may
  still be being written, so it waits until it is closed (inotify) or until size and mtime have
  been stable for ``stable_s``, whichever comes first.

Each ``(path, size, mtime_ns)`` is reported at most once per watcher; a file rewritten with other
content (size or mtime) is reported again. An empty file is reported only once it has stayed empty
(size and mtime unchanged) for ``stable_s``: some writers create the file, close it, and open it
again to write, but a file that stays empty is a fault the user should hear of (the daemon rejects
it with a reason). The watch folder may disappear (card pulled) and
come back: the watcher says so through ``on_problem``, polls for the folder about once a second,
re-arms the observer and scans it for frames not yet reported.

Threads: one watchdog observer (observer, emitter and, for inotify, a reader thread) plus one
supervisor thread of ours that checks the folder, scans new sub-folders and times the polling
stability. ``on_ready`` and ``on_problem`` run in those threads and must be quick.

Why one module of this size: the readiness rules (inotify and polling, settle times, symlinks,
odd names, the start-up scan) are one policy that both observers must apply alike.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserver

logger = logging.getLogger(__name__)

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".crdownload", "~")
"""Names of files still being downloaded or written by tether tools, browsers, WinSCP, editors."""

DIR_CHECK_S = 1.0
"""How often the watch folder's existence is checked (a pulled card is noticed within this)."""

MAX_TICK_S = 1.0
MIN_TICK_S = 0.05
"""Bounds of the supervisor's period: responsive stability timing without a busy loop."""

JOIN_TIMEOUT_S = 5.0
"""How long stop() waits for each thread; a thread still alive after it is logged, not waited."""

# Native (inotify) path: only the events we route. Filtering in watchdog also narrows the inotify
# mask, so the IN_MODIFY flood of a 30 MB raw written in 4 KiB chunks never reaches Python.
_NATIVE_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileMovedEvent,
    FileCreatedEvent,  # only used for symlinks, which are never "closed after writing"
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]

_DIGITS = re.compile(r"(\d+)")


def natural_key(path: Path | str) -> tuple[tuple[tuple[int, int | str], ...], ...]:
    """Sort key for natural name order: ``IMG_2`` before ``IMG_10``, case-insensitive.

    Parameters
    ----------
    path
        A path (usually relative to the watch folder); each component is compared in turn.

    Returns
    -------
    tuple
        Per component, alternating text and number chunks as ``(1, text)`` / ``(0, number)``,
        then the exact name as a tie-break so the order is total.
    """
    key = []
    for part in Path(path).parts:
        chunks: list[tuple[int, int | str]] = []
        for i, chunk in enumerate(_DIGITS.split(part)):
            if i % 2:
                chunks.append((0, int(chunk)))
            elif chunk:
                chunks.append((1, chunk.casefold()))
        chunks.append((2, part))
        key.append(tuple(chunks))
    return tuple(key)


@dataclass
class _Pending:
    """A file waiting to be stable: its last (size, mtime_ns) and since when (monotonic s)."""

    signature: tuple[int, int] | None = None
    since: float = 0.0


class FrameWatcher:
    """Watch ``watch_dir`` and call ``on_ready(path)`` once for each complete light frame.

    Parameters
    ----------
    watch_dir
        Folder the camera or tether tool writes into. It may be missing at start (on_problem,
        then the watcher waits for it).
    on_ready
        Called with the frame's path (under ``watch_dir`` as given, not symlink-resolved) from a
        watcher thread; must be quick (enqueue). Exceptions are logged and swallowed.
    extensions
        Accepted name endings, e.g. ``[".cr3", ".dng", ".fits"]``, matched case-insensitively.
    recursive
        Also watch sub-folders, including ones created later (``DCIM/100CANON``).
    polling
        Use watchdog's ``PollingObserver`` (network shares, FUSE, MTP) and size+mtime stability.
    poll_interval_s
        Period of the polling observer's directory snapshots, seconds.
    stable_s
        Seconds a file's size and mtime must stay unchanged before it counts as complete on the
        polling path; also the age below which a file found by a scan may still be being written.
    follow_symlinks
        Accept frames (and, recursively, folders) whose real path is outside ``watch_dir``.
    ignore_existing
        Do not report files already in the folder at start (they still count as seen).
    on_problem
        Called with a one-line message about a problem the user should know of (folder missing,
        symlink pointing outside); the watcher keeps running. Without it, logged as a warning.
    """

    def __init__(
        self,
        watch_dir: Path,
        on_ready: Callable[[Path], None],
        *,
        extensions: Iterable[str],
        recursive: bool = False,
        polling: bool = False,
        poll_interval_s: float = 1.0,
        stable_s: float = 2.0,
        follow_symlinks: bool = False,
        ignore_existing: bool = False,
        on_problem: Callable[[str], None] | None = None,
    ) -> None:
        exts = tuple(sorted({str(e).strip().lower() for e in extensions}))
        if not exts or any(len(e) < 2 or not e.startswith(".") for e in exts):
            raise ValueError(f"extensions must be non-empty names like '.cr3', got {exts!r}")
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        if not stable_s >= 0:
            raise ValueError(f"stable_s must be >= 0, got {stable_s}")
        self.watch_dir = Path(os.path.abspath(watch_dir))
        self.extensions = exts
        self.recursive = recursive
        self.polling = polling
        self.poll_interval_s = float(poll_interval_s)
        self.stable_s = float(stable_s)
        self.follow_symlinks = follow_symlinks
        self.ignore_existing = ignore_existing
        self._on_ready = on_ready
        self._on_problem = on_problem
        self._tick_s = min(MAX_TICK_S, self.poll_interval_s, self.stable_s / 4 or MAX_TICK_S)
        self._tick_s = max(MIN_TICK_S, self._tick_s)

        # _lock guards everything below; on_ready is called with it held so deliveries are
        # serialised and ordered. Never call into the observer while holding it: the observer
        # holds its own lock while it runs our handler.
        self._lock = threading.RLock()
        self._reported: set[tuple[str, int, int]] = set()
        self._pending: dict[Path, _Pending] = {}
        self._buffering = False
        self._buffer: list[Path] = []
        self._rescans: list[Path] = []
        self._warned: set[str] = set()
        self._first_scan_done = False

        self._observer: BaseObserver | None = None
        self._armed_real: str = ""  # realpath of the folder the observer watches
        self._armed_id: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of it
        self._root_lost = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._started = False
        self._arm_lock = threading.Lock()  # swaps of self._observer (supervisor vs. stop())
        self._in_callback = threading.local()  # .active while on_ready / on_problem runs

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Arm the observer, report existing complete files (natural order), then watch.

        Existing files are delivered before this returns and before any live event; live events
        seen during the scan are buffered and delivered after it, de-duplicated. A missing folder
        is reported through ``on_problem`` and waited for in the background.

        Raises
        ------
        RuntimeError
            If the watcher was already started (a watcher runs once).
        """
        if self._started:
            raise RuntimeError("FrameWatcher.start() called twice")
        self._started = True
        if not self._arm() and not self.watch_dir.is_dir():
            self._problem(f"watch folder {self.watch_dir} does not exist; waiting for it")
        if self._stopping.is_set():  # on_ready called stop() during the first scan
            self._disarm()
            return
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"nightstack-watcher:{self.watch_dir.name}", daemon=True
        )
        self._supervisor.start()

    def stop(self) -> None:
        """Stop and join every thread of this watcher. Idempotent.

        Called from inside ``on_ready`` / ``on_problem`` it only signals: the supervisor thread
        then stops the observer itself, and a later ``stop()`` from outside joins everything.
        """
        self._stopping.set()
        self._wake.set()
        if getattr(self._in_callback, "active", False):
            return
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(JOIN_TIMEOUT_S)
            if supervisor.is_alive():
                logger.warning("watcher supervisor thread did not stop in %.0f s", JOIN_TIMEOUT_S)
        self._disarm()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ observer

    def _arm(self) -> bool:
        """Start an observer on the folder and scan it. False if the folder is not there."""
        if not self.watch_dir.is_dir():
            return False
        real = os.path.realpath(self.watch_dir)
        observer: BaseObserver | None = None
        with self._lock:
            self._buffering = True
            self._buffer.clear()
            self._armed_real = real
        self._root_lost.clear()
        try:
            st = os.stat(real)
            if self.polling:
                observer = PollingObserver(timeout=self.poll_interval_s)
                events = None
            else:
                # generate_full_events: a file moved in from outside the watched tree arrives as
                # FileMovedEvent("", dest) instead of a FileCreatedEvent we could not trust.
                observer = InotifyObserver(generate_full_events=True)
                events = _NATIVE_EVENTS
            observer.schedule(
                _Router(self, real),
                real,
                recursive=self.recursive,
                event_filter=events,
                follow_symlink=self.follow_symlinks,
            )
            observer.start()  # the inotify watch / first snapshot exists when this returns
        except OSError as exc:
            with self._lock:
                self._buffering = False
                self._buffer.clear()
            if observer is not None:
                observer.stop()  # never started: stop() still closes the inotify reader thread
            if self.watch_dir.is_dir():
                message = f"cannot watch {self.watch_dir}: {exc}; retrying"
                self._problem(message, once=message)
            return False
        with self._arm_lock:
            self._observer = observer
        self._armed_id = (st.st_dev, st.st_ino)
        if self._first_scan_done:
            logger.info("watch folder %s is back; scanning it", self.watch_dir)
        self._scan_and_flush(report_existing=self._first_scan_done or not self.ignore_existing)
        self._first_scan_done = True
        return True

    def _disarm(self) -> None:
        """Stop and join the observer, if any (never from a thread of that observer)."""
        with self._arm_lock:
            observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        if observer is not threading.current_thread() and observer.ident is not None:
            observer.join(JOIN_TIMEOUT_S)
            if observer.is_alive():
                logger.warning("watchdog observer did not stop in %.0f s", JOIN_TIMEOUT_S)
        with self._lock:
            self._pending.clear()
            self._rescans.clear()

    def _observer_trouble(self) -> str | None:
        """Why the armed observer no longer watches the folder, or None if it does."""
        observer = self._observer
        if observer is None:
            return None
        gone = f"watch folder {self.watch_dir} disappeared; waiting for it"
        try:
            st = os.stat(self.watch_dir)
        except OSError:
            return gone
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != self._armed_id:
            return gone
        if self._root_lost.is_set() or not all(e.is_alive() for e in list(observer.emitters)):
            return gone  # an emitter stops itself when its folder is deleted (inode reused?)
        # watchdog's inotify reader thread dies on any exception in it, e.g. its own
        # RuntimeWarning turned into an error by `-W error` (see the report of `mkdir -p`).
        reader = getattr(observer, "_inotify_fd", None)
        if not observer.is_alive() or (
            isinstance(reader, threading.Thread) and not reader.is_alive()
        ):
            return f"watching {self.watch_dir} stopped unexpectedly; restarting the watch"
        return None

    # ------------------------------------------------------------------ supervisor thread

    def _supervise(self) -> None:
        next_dir_check = time.monotonic() + DIR_CHECK_S
        while not self._stopping.is_set():
            self._wake.wait(self._tick_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                now = time.monotonic()
                if self._observer is None:
                    if now >= next_dir_check:
                        next_dir_check = now + DIR_CHECK_S
                        self._arm()
                    continue
                if self._root_lost.is_set() or now >= next_dir_check:
                    next_dir_check = now + DIR_CHECK_S
                    trouble = self._observer_trouble()
                    if trouble is not None:
                        self._disarm()
                        self._problem(trouble)
                        if not self._stopping.is_set():
                            self._arm()  # it may be back already (deleted and re-created)
                        continue
                self._run_rescans()
                self._check_pending(now)
            except Exception:  # keep watching whatever one pass hit
                logger.exception("watcher supervisor pass failed")
        self._disarm()

    def _run_rescans(self) -> None:
        """Scan sub-folders that appeared (inotify may have missed files written before its
        watch on the new folder existed)."""
        with self._lock:
            folders, self._rescans = self._rescans, []
        for folder in folders:
            old, young = self._scan(folder)
            with self._lock:
                for path in young:
                    self._pending.setdefault(path, _Pending())
                for path in old:
                    self._offer_locked(path)

    def _check_pending(self, now: float) -> None:
        """Report pending files whose (size, mtime) stayed unchanged for ``stable_s``."""
        with self._lock:
            items = list(self._pending.items())
        ready: list[Path] = []
        for path, state in items:
            try:
                st = os.stat(path)
                signature = (st.st_size, st.st_mtime_ns)
            except OSError:
                signature = None
            with self._lock:
                if self._pending.get(path) is not state:
                    continue  # delivered (closed) meanwhile
                if signature is None:
                    del self._pending[path]
                elif state.signature != signature:
                    state.signature, state.since = signature, now
                elif now - state.since >= self.stable_s:
                    ready.append(path)
        if ready:
            with self._lock:
                for path in sorted(ready, key=self._relative_key):
                    self._offer_locked(path, settled=True)

    # ------------------------------------------------------------------ scanning

    def _scan(self, top: Path) -> tuple[list[Path], list[Path]]:
        """Files under ``top`` that pass the name filter: (old enough to be complete, too young).

        Old files are in natural order. A folder vanishing mid-scan just ends the scan.
        """
        old: list[Path] = []
        young: list[Path] = []
        cutoff = time.time() - self.stable_s
        for path in self._walk(top):
            if not self._name_ok(path):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            (old if st.st_mtime <= cutoff else young).append(path)
        old.sort(key=self._relative_key)
        return old, young

    def _walk(self, top: Path) -> Iterable[Path]:
        if not self.recursive:
            try:
                with os.scandir(top) as entries:
                    return [Path(e.path) for e in entries if not e.is_dir()]
            except OSError:
                return []
        found: list[Path] = []
        seen: set[tuple[int, int]] = set()
        for root, dirs, files in os.walk(top, followlinks=self.follow_symlinks):
            try:
                st = os.stat(root)
            except OSError:
                dirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:  # a symlink loop when following links
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(Path(root, name) for name in files)
        return found

    def _scan_and_flush(self, *, report_existing: bool) -> None:
        """Deliver the folder's existing files, then the live events buffered meanwhile.

        With ``report_existing`` False (``ignore_existing`` at start) every file found counts as
        reported in its current state; one still being written is reported when it changes.
        """
        old, young = self._scan(self.watch_dir)
        with self._lock:
            if report_existing:
                for path in young:
                    self._pending.setdefault(path, _Pending())
                for path in old:
                    self._deliver_locked(path)
            else:
                for path in old + young:
                    self._mark_seen_locked(path)
            buffered, self._buffer = self._buffer, []
            self._buffering = False
            for path in buffered:
                self._deliver_locked(path)

    # ------------------------------------------------------------------ routing (any thread)

    def _user_path(self, raw: bytes | str) -> Path | None:
        """An event path (under the watched real folder) as a path under ``watch_dir``."""
        rel = os.path.relpath(os.fsdecode(raw), self._armed_real)
        if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
            return None
        return self.watch_dir / rel

    def _relative_key(self, path: Path) -> tuple[Any, ...]:
        try:
            return natural_key(path.relative_to(self.watch_dir))
        except ValueError:
            return natural_key(path)

    def _name_ok(self, path: Path) -> bool:
        """Accepted extension, not a temporary name, not hidden, not inside a hidden folder."""
        name = path.name.lower()
        if not name.endswith(self.extensions) or name.endswith(TEMP_SUFFIXES):
            return False
        parts = self._relative_parts(path)
        return bool(parts) and not any(part.startswith(".") for part in parts)

    def _relative_parts(self, path: Path) -> tuple[str, ...]:
        try:
            return path.relative_to(self.watch_dir).parts
        except ValueError:
            return ()

    def _route_ready(self, raw: bytes | str) -> None:
        """Route a path that an event says is complete (inotify close-write, move into place)."""
        path = self._user_path(raw)
        if path is not None and self._name_ok(path):
            with self._lock:
                self._offer_locked(path)

    def _route_track(self, raw: bytes | str) -> None:
        """Route a path that changed on the polling path: it becomes ready once stable."""
        path = self._user_path(raw)
        if path is not None and self._name_ok(path):
            with self._lock:
                self._pending.setdefault(path, _Pending())
            self._wake.set()

    def _route_rescan(self, raw: bytes | str) -> None:
        """Route a new (recursive) sub-folder to the supervisor for a scan."""
        path = self._user_path(raw)
        if path is not None and not any(p.startswith(".") for p in self._relative_parts(path)):
            with self._lock:
                self._rescans.append(path)
            self._wake.set()

    def _route_root_lost(self) -> None:
        """The observer saw the watch folder itself deleted."""
        self._root_lost.set()
        self._wake.set()

    def _offer_locked(self, path: Path, *, settled: bool = False) -> None:
        if self._buffering:
            self._buffer.append(path)
        else:
            self._deliver_locked(path, settled=settled)

    def _inspect(self, path: Path) -> os.stat_result | None:
        """The stat of a regular file we may report; None (with a one-time warning for a link
        pointing outside the folder) otherwise."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if not self.follow_symlinks:
            real = os.path.realpath(path)
            if os.path.commonpath([real, self._armed_real]) != self._armed_real:
                self._problem(
                    f"{path} points outside the watch folder (to {real}); ignored "
                    "(set follow_symlinks to stack it)",
                    once=str(path),
                )
                return None
        return st

    def _mark_seen_locked(self, path: Path) -> None:
        st = self._inspect(path)
        if st is not None:
            self._reported.add((str(path), st.st_size, st.st_mtime_ns))

    def _deliver_locked(self, path: Path, *, settled: bool = False) -> None:
        """Call on_ready(path) unless this (path, size, mtime_ns) was reported already.

        An empty file is only reported ``settled`` (unchanged for ``stable_s``); before that it
        waits in ``_pending``, since its writer may open it again to write the frame.
        """
        self._pending.pop(path, None)
        st = self._inspect(path)
        if st is None:
            return
        if st.st_size == 0 and not settled:
            self._pending[path] = _Pending()
            self._wake.set()
            return
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in self._reported:
            return
        self._reported.add(key)
        self._in_callback.active = True
        try:
            self._on_ready(path)
        except Exception:
            logger.exception("on_ready(%r) failed; the watcher keeps running", str(path))
        finally:
            self._in_callback.active = False

    def _problem(self, message: str, *, once: str | None = None) -> None:
        if once is not None:
            with self._lock:
                if once in self._warned:
                    return
                self._warned.add(once)
        if self._on_problem is None:
            logger.warning("%s", message)
        else:
            self._in_callback.active = True
            try:
                self._on_problem(message)
            except Exception:
                logger.exception("on_problem callback failed")
            finally:
                self._in_callback.active = False


class _Router(FileSystemEventHandler):
    """The watchdog handler: turns an event into ready / track / rescan / lost. Nothing else."""

    def __init__(self, watcher: FrameWatcher, armed_real: str) -> None:
        super().__init__()
        self._watcher = watcher
        self._armed_real = armed_real

    def dispatch(self, event: FileSystemEvent) -> None:
        w = self._watcher
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path)
        if event.is_directory:
            if isinstance(event, DirDeletedEvent) and src == self._armed_real:
                w._route_root_lost()
            elif w.recursive and not w.polling and isinstance(event, DirCreatedEvent):
                w._route_rescan(src)
            elif w.recursive and not w.polling and isinstance(event, DirMovedEvent) and dest:
                w._route_rescan(dest)
        elif w.polling:
            if isinstance(event, FileMovedEvent):
                if dest:
                    w._route_track(dest)
            elif isinstance(event, FileCreatedEvent | FileModifiedEvent | FileAttribEvent):
                w._route_track(src)
        elif isinstance(event, FileClosedEvent):
            w._route_ready(src)
        elif isinstance(event, FileMovedEvent):
            if dest:
                w._route_ready(dest)
        elif isinstance(event, FileCreatedEvent) and os.path.islink(src):
            w._route_ready(src)
