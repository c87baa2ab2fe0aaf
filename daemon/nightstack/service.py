"""The live daemon: watcher -> ingest queue -> prepare thread -> worker loop -> session.

Threads and what they own:
- the watcher's threads only enqueue paths of complete files (``watcher.py``);
- the prepare thread hashes, decodes (in the isolated decoder process) and detects the next
  frame, so decoding frame N+1 overlaps stacking frame N; it hands over through a queue of one;
- the worker loop (the main thread) stacks, journals, checkpoints, writes previews, closes
  sessions, turns signals into state changes and pings the systemd watchdog.
Signal handlers only set events. While frames wait, previews follow only the clock (at least one
every ``preview_every_s``), not every ``preview_every_frames``: frames are never held back for one.

Faults the daemon survives (see bench/RELIABILITY.md): a file that cannot be decoded is journaled
as rejected with its reason; a decoder hang or crash costs that one frame (``decoder.py``), and
one that may pass (a timeout, a decoder killed by the OOM killer, a read error) is retried once
when the queue is empty (``retries.py``). A
write that fails (disk full, I/O error) loses nothing: the frame is not journaled, the daemon
drops its in-memory session, says so once, pauses decoding and checks every ``RETRY_S`` seconds
for free space; then it reloads the session from disk exactly as after a kill -9 and re-queues
every frame that was handed over but never journaled ("outstanding"). Items prepared before such a
recovery carry an older ``epoch`` and are dropped, so each frame is stacked exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .capture.control import start_in_daemon
from .config import Settings, load_settings, web_token
from .control import hold_lock, request_close, take_close_request
from .decoder import DEFAULT_DECODE_FN, Decoder
from .errors import ConfigError
from .frameio import FD_ERRNOS, file_sha256, transient_error
from .notify import Notifier
from .pipeline import FrameRecord, Prepared, Stacker
from .quality import Quality
from .retries import Retries, first_attempts
from .session import Session, find_open, known_hashes, quarantine
from .watcher import FrameWatcher

if TYPE_CHECKING:
    from .web.server import WebServer

log = logging.getLogger("nightstack")

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # every empty file: rejected each, not deduped
_TICK_S = 0.5  # worker loop period when idle: signals, close requests, watchdog, previews
RETRY_S = 5.0  # while the output cannot be written: how often to look for free space again
_SPACE_MARGIN = 16 * 2**20  # free bytes wanted besides two frame-store entries before a retry
_FULL = (errno.ENOSPC, errno.EDQUOT)
_DECODER_BASE_BYTES = 2 << 30  # the decoder child's virtual memory besides its frame
FD_WAIT_S = 1.0  # no file descriptor left: how often to try a frame's file again
STAGE_SLACK_S = 10.0
"""The prepare stage's time for one frame beyond the decode timeout (hash, detection, s)."""
LONG_WRITE_MAX_S = 900.0
"""The longest one write (a frame into the store, a checkpoint, a preview with live.fits, the
final combine and its files) keeps the watchdog fed: a card that slow is failing, and a write
that never ends is a hang the watchdog must see."""


def _shown(text: str) -> str:
    """``text`` fit for one log line: control characters (a newline in a file name) and bytes
    that were not UTF-8 are written as escapes."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))


def load_kwargs(settings: Settings) -> dict[str, Any]:
    """The decoder options of a Settings."""
    wb = settings.white_balance
    balance: str | list[float] = (
        wb if wb in ("camera", "daylight", "auto") else [float(v) for v in wb.split(",")]
    )
    return {
        "demosaic": settings.demosaic,
        "white_balance": balance,
        "bin": settings.bin,
        "max_pixels": settings.max_frame_pixels,
    }


def decoder_memory(settings: Settings) -> int:
    """The decoder child's address-space limit (bytes): its libraries' mappings (0.75 GB on
    this machine; more threads, more stacks) plus 32 bytes per pixel of the largest frame
    allowed (LibRaw's buffers and the float32 RGB of its own demosaic: ~28)."""
    return _DECODER_BASE_BYTES + 32 * settings.max_frame_pixels


def check_startup(settings: Settings) -> tuple[Path, Path]:
    """The checks that must pass before READY=1; raises ConfigError naming the problem."""
    if settings.watch_dir is None:
        raise ConfigError("no watch folder: give WATCH_DIR or set 'watch_dir'")
    if settings.output_dir is None:
        raise ConfigError("no output folder: give --output-dir or set 'output_dir'")
    watch, output = settings.watch_dir, settings.output_dir
    if not watch.is_dir() or not os.access(watch, os.R_OK | os.X_OK):
        raise ConfigError(f"watch folder {watch} is not a readable directory")
    _check_apart(watch, output, recursive=settings.recursive)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output folder {output} is not writable: {err.strerror}") from err
    return watch, output


def _check_apart(watch: Path, output: Path, *, recursive: bool) -> None:
    """Refuse folders that overlap: the daemon would stack its own outputs (``stack.tif``,
    ``live.fits`` are frames to the watcher), or write sessions among the camera's files.
    Symlinks are resolved; ``output`` need not exist yet (it is not created when refused)."""
    real_watch, real_output = Path(os.path.realpath(watch)), Path(os.path.realpath(output))
    if real_output == real_watch:
        raise ConfigError(
            f"output folder {output} is the watch folder {watch}: the daemon would stack its "
            "own outputs; choose an output folder outside the watch folder"
        )
    if recursive and real_output.is_relative_to(real_watch):
        raise ConfigError(
            f"output folder {output} is inside the watch folder {watch}, which is watched "
            "recursively: the daemon would stack its own outputs; choose an output folder "
            "outside the watch folder"
        )
    if real_watch.is_relative_to(real_output):
        raise ConfigError(
            f"watch folder {watch} is inside the output folder {output}: keep the camera's "
            "frames and the sessions apart; choose a watch folder outside the output folder"
        )


@dataclass(frozen=True)
class Hooks:
    """Faults a test injects into a :class:`Daemon`. Not settings: no user can set them (not in
    the TOML file, the environment or ``nightstack config show``); tests pass them to the
    constructor, or run the CLI's code path through ``tests/_launch.py``."""

    decode_fn: str = DEFAULT_DECODE_FN  # 'module:function' the decoder child runs
    stall_s: float = 0.0  # the worker sleeps this long before each frame (a stuck worker)


@dataclass
class _Duplicate:
    path: Path


@dataclass
class _Transient:
    """A frame that failed for a reason that may pass (``decoder.TransientDecodeError``)."""

    prepared: Prepared


_Item = Prepared | _Duplicate | _Transient  # what the prepare thread hands the worker


class Daemon:
    """``nightstack watch``. ``run()`` returns the process exit code."""

    def __init__(
        self,
        settings: Settings,
        *,
        config: Path | None = None,
        overrides: dict[str, Any] | None = None,
        exit_when_closed: bool = False,
        on_close: Callable[[Session, dict[str, Any]], None] | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.config, self.overrides = config, overrides
        self.exit_when_closed = exit_when_closed
        self.on_close = on_close
        self.notifier = Notifier()
        self.paths: queue.Queue[Path] = queue.Queue()
        self.prepared: queue.Queue[tuple[int, _Item]] = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.session: Session | None = None
        self.hashes: set[str] = set()
        self.retries = Retries(set())  # transient failures: tried once, waiting for the retry
        self._hash_lock = threading.Lock()
        self._busy = threading.Event()  # the prepare thread holds a frame
        self._stage_since: float | None = None  # monotonic s: the prepare stage's frame since
        self._stuck_said = False
        self._request_said: str | None = None  # the last complaint about the close request
        self.stage_deadline_s = settings.decode_timeout_s + STAGE_SLACK_S
        """The longest the prepare stage may hold one frame (s) before the watchdog starves:
        the decode's own timeout plus hashing and detection."""
        self.stats = {"stacked": 0, "rejected": 0}
        self._last_keepalive = 0.0
        # paths handed over by the watcher and not yet journaled or skipped, in arrival order,
        # with how many times each is queued; guarded by _hash_lock like hashes and _epoch
        self._outstanding: dict[Path, int] = {}
        self._epoch = 0  # bumped when the queues are rebuilt: older prepared items are dropped
        self._degraded = threading.Event()  # the output cannot be written: wait for space
        self._retry_at = 0.0
        self._reopen: Path | None = None  # a session to reload from disk before going on
        self._close_wanted = ""  # why to close the session at _reopen once it is reloaded
        self._frame_bytes = 0  # one frame-store entry of the last session, for the space check
        # --- web ---
        self._web: WebServer | None = None
        self._started = time.monotonic()
        self._status_lock = threading.Lock()  # guards _status: the worker swaps, the web reads
        self._status: dict[str, Any] = {
            "state": "starting",
            "session": None,
            "accepted": 0,
            "rejected": 0,
            "last_frame": None,
        }
        # --- end web ---

    # --- signals ------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    # --- main ---------------------------------------------------------------------------------
    def run(self) -> int:
        watch, output = check_startup(self.settings)
        try:
            lock = hold_lock(output)  # `nightstack close` sees that a daemon is here
        except OSError as err:
            raise ConfigError(f"cannot lock {output} ({err.strerror}): another daemon writes "
                              "there?") from err  # fmt: skip
        self.capture = start_in_daemon(self.settings, watch, output)  # --- capture ---
        web = self._start_web(output)  # --- web ---
        try:
            return self._run(watch, output)
        finally:
            self.capture.close()  # --- capture ---
            if web is not None:
                web.stop()
            os.close(lock)

    def _run(self, watch: Path, output: Path) -> int:
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
        self.hashes = known_hashes(output)
        self.retries = Retries(first_attempts(output))
        with Decoder(
            timeout_s=self.settings.decode_timeout_s,
            load_kwargs=load_kwargs(self.settings),
            decode_fn=self.hooks.decode_fn,
            address_space_bytes=decoder_memory(self.settings),
        ) as decoder:
            self.decoder = decoder
            self.output = output
            open_dir = find_open(output)
            if open_dir is not None:
                self._reopen = open_dir
                self._open_again()
            self._detector = Stacker(self.settings, output, decoder)  # prepare() only
            preparer = threading.Thread(
                target=self._prepare_loop, name="nightstack-prepare", daemon=True
            )
            preparer.start()
            self._preparer = preparer
            watcher = FrameWatcher(
                watch,
                self._enqueue,
                extensions=self.settings.extensions,
                recursive=self.settings.recursive,
                polling=self.settings.polling,
                poll_interval_s=self.settings.poll_interval_s,
                stable_s=self.settings.stable_s,
                follow_symlinks=self.settings.follow_symlinks,
                # after a crash, frames in flight must be found again: scan the backlog
                ignore_existing=self.settings.ignore_existing and open_dir is None,
                on_problem=lambda text: log.warning("%s", _shown(text)),
            )
            watcher.start()
            self.notifier.ready(status="waiting for frames")
            log.info("watching %s, sessions in %s", watch, output)
            self._publish()  # --- web ---
            try:
                self._loop(output)
            finally:
                watcher.stop()
                self.notifier.stopping()
                self._publish("stopping")  # --- web ---
                if self.retries.waiting:
                    log.info(
                        "%d frame(s) not retried before stopping: the next start retries them "
                        "(its start-up scan finds them again)",
                        len(self.retries.waiting),
                    )
                if self.session is None and self._reopen is not None:
                    self._open_again()  # a session a failed write left on disk: finish it too
                if self.session is not None and self.session.state != "closed":
                    self._close("stopping")
                self.stop.set()
                preparer.join(timeout=self.settings.decode_timeout_s + 5)
        return 0

    def _loop(self, output: Path) -> None:
        interval = self.notifier.watchdog_interval_s
        tick = min(_TICK_S, interval) if interval else _TICK_S
        while not self.stop.is_set():
            if not self._preparer.is_alive():  # never ping the watchdog for a dead pipeline
                raise RuntimeError("the prepare thread died; see the log above")
            self._feed_watchdog()
            if self.reload.is_set():
                self._reload()
            if self._degraded.is_set() and time.monotonic() >= self._retry_at:
                self._recover(output)
            request = take_close_request(output)
            if request == "close":
                self._close("close requested")
            elif request is not None and request != self._request_said:
                log.warning("%s", _shown(request))  # once, not every tick
            self._request_said = request
            try:
                epoch, item = self.prepared.get(timeout=tick)
            except queue.Empty:
                self._idle()
                if self.exit_when_closed and self.session is None and self.stats["stacked"]:
                    return
                continue
            if epoch != self._epoch or self._degraded.is_set():
                continue  # still outstanding: queued again by the recovery
            if self.hooks.stall_s:
                time.sleep(self.hooks.stall_s)  # a test's stuck worker
            self._ingest(item, output)

    def _enqueue(self, path: Path) -> None:
        """The watcher's on_ready: remember the path as outstanding, queue it."""
        with self._hash_lock:
            self._outstanding[path] = self._outstanding.get(path, 0) + 1
        self.paths.put(path)

    def _done(self, path: Path) -> None:
        """``path`` was journaled (or skipped as a duplicate): no longer outstanding."""
        with self._hash_lock:
            left = self._outstanding.pop(path, 0) - 1
            if left > 0:
                self._outstanding[path] = left

    def _requeue(
        self, output: Path, first: list[Path] | None = None, current: Prepared | None = None
    ) -> int:
        """Rebuild the queues from the disk: hashes from the journals, then every outstanding
        path (after ``first``) queued once, in arrival order; prepared items of the old epoch
        are dropped. ``current``, the frame the worker is about to stack, is not queued again.
        Returns the number of paths queued."""
        with self._hash_lock:
            self.hashes = known_hashes(output)
            self._epoch += 1
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

    def _prepare_loop(self) -> None:
        """Hash, skip known frames, decode and detect; hand over one frame at a time."""
        while not self.stop.is_set():
            if self._degraded.is_set():  # nothing can be stored: do not decode in vain
                self.stop.wait(_TICK_S)
                continue
            if not self.prepared.empty():  # one frame waits already: at most two in memory
                self.stop.wait(0.02)
                continue
            try:
                path = self.paths.get(timeout=_TICK_S)
            except queue.Empty:
                continue
            self._busy.set()
            self._stage_since = time.monotonic()
            try:
                item: _Item
                seen = _stat_key(path)  # before the hash: what the decode will judge
                digest, unreadable = self._hash(path)
                with self._hash_lock:
                    epoch = self._epoch
                    duplicate = digest in self.hashes and digest != EMPTY_SHA256
                    if digest is not None:
                        self.hashes.add(digest)
                detector = self._detector  # replaced by the worker when a session starts
                if duplicate:
                    item = _Duplicate(path)
                elif unreadable is not None:  # EIO: the card, not the file, may be at fault
                    reason = f"cannot read file: {unreadable.strerror}"
                    transient = transient_error(unreadable) is not None
                    prepared = Prepared(path, None, None, None, None, reason, {}, None, transient)
                    item = self._transient_or_not(prepared)
                else:
                    item = self._transient_or_not(detector.prepare(path, digest))
                    if isinstance(item, Prepared) and item.error and not self._settled(path, seen):
                        log.info("%s: %s while still being written; decoded again once it is "
                                 "complete", _shown(path.name), item.error)  # fmt: skip
                        if digest is not None:
                            with self._hash_lock:
                                self.hashes.discard(digest)
                        self._done(path)  # the watcher reports it again when it changes
                        continue
                self._stage_since = None  # done: handing over is waiting, not a stuck stage
                while not self.stop.is_set():
                    try:
                        self.prepared.put((epoch, item), timeout=_TICK_S)
                        break
                    except queue.Full:
                        continue
            finally:
                self._stage_since = None
                self._busy.clear()

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
                                _shown(path.name), err.strerror, FD_WAIT_S)  # fmt: skip
                waited += 1
                self.stop.wait(FD_WAIT_S)
                continue
            if waited:
                log.info("file descriptors free again after %d tries: %s read", waited,
                         _shown(path.name))  # fmt: skip
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
            self.stop.wait(min(self.settings.stable_s - age, _TICK_S))
        return False

    def _stuck(self) -> str | None:
        """Why the watchdog must not be fed: the prepare stage has held one frame longer than
        :attr:`stage_deadline_s` (else None)."""
        since = self._stage_since
        if since is None or time.monotonic() - since <= self.stage_deadline_s:
            return None
        return f"the prepare stage is stuck on one frame for {time.monotonic() - since:.0f} s"

    def _feed_watchdog(self) -> None:
        """``WATCHDOG=1``, only while every stage makes progress (one log line when a stage
        is stuck: systemd then restarts the daemon after ``WatchdogSec``)."""
        stuck = self._stuck()
        if stuck is None:
            self._stuck_said = False
            self.notifier.watchdog()
        elif not self._stuck_said:
            self._stuck_said = True
            log.error("%s: the watchdog is no longer fed", stuck)

    @staticmethod
    def _transient_or_not(prepared: Prepared) -> Prepared | _Transient:
        """``prepared`` as a _Transient if it failed for a reason that may pass."""
        return _Transient(prepared) if prepared.transient else prepared

    def _ingest(self, item: _Item, output: Path) -> None:
        if isinstance(item, _Duplicate):
            log.info("%s: already processed (same content), skipped", _shown(item.path.name))
            self._done(item.path)
            return
        transient = isinstance(item, _Transient)
        if isinstance(item, _Transient):
            item = item.prepared
        if self.session is None:
            if self._detector.settings is not self.settings:  # reloaded (SIGHUP) since
                self._detector = Stacker(self.settings, output, self.decoder)
                if item.frame is not None:  # detected with the old settings: detect again
                    item.stars = self._detector.finder(item.frame.luminance, item.frame.bin)
                    item.quality = Quality.of(item.stars)
            try:
                self.session = Session.create(output, self.settings, self.decoder)
            except OSError as err:
                self._failed(err, f"cannot open a session for {_shown(item.path.name)}")
                return
        session = self.session
        if transient and self._retry_later(session, item):
            return
        better = session.stacker.better_reference(item)
        if better is not None:
            self._start_over(session, better, item, output)
            return
        try:
            with self._fed("stacking"):  # store write and checkpoint on a slow SD card
                record = session.ingest(item, lambda done: self._publish(record=done))
        except OSError as err:
            self._failed(err, f"{_shown(item.path.name)} not stacked", session)
            return
        except Exception as err:  # a bug must not end the night, nor loop on restart
            log.exception("internal error while stacking %s", _shown(item.path.name))
            record = self._reject_after_error(session, item, err)
        self._done(item.path)
        if session.stacker.store is not None:
            self._frame_bytes = session.stacker.store.frame_bytes
        self._report(session, record)

    def _retry_later(self, session: Session, item: Prepared) -> bool:
        """A transient failure: journal its first attempt and keep it for a retry (True), or,
        if this was the retry, let it be journaled as usual (False)."""
        record = self.retries.first(item)
        if record is None:
            return False
        try:
            session.reject(record)
        except OSError as err:
            self._failed(err, f"{_shown(item.path.name)} not journaled", session)
            return True
        self.retries.wait(record)
        if item.sha256 is not None:
            with self._hash_lock:
                self.hashes.discard(item.sha256)  # not processed for good: let the retry in
        self._done(item.path)
        self._report(session, record)
        return True

    def _report(self, session: Session, record: FrameRecord) -> None:
        """The frame's log line, systemd status and, when wanted, a preview."""
        if record.status == "accepted":
            self.stats["stacked"] += 1
        else:
            self.stats["rejected"] += 1
        depth = self.paths.qsize() + self.prepared.qsize()
        timings = " ".join(f"{k}={v:.0f}ms" for k, v in record.ms.items())
        if record.stored and session.accumulate_ms is not None:  # after the journal line
            timings += f" live={session.accumulate_ms:.0f}ms"
        log.info(
            "%s %s%s stars=%s fwhm=%s residual=%s %s queue=%d",
            _shown(Path(record.file).name),
            record.status,
            f" ({record.reason})" if record.reason else "",
            record.stars,
            record.fwhm,
            record.residual_px,
            timings,
            depth,
            extra={"SESSION": session.id, "FRAME": record.file, "STATUS": record.status},
        )
        fwhm = session.stacker.reference.stars.fwhm_px if session.stacker.reference else None
        notes = "".join(f"; {n}" for n in (session.low_space, session.stacker.live_only) if n)
        self.notifier.status(
            f"{session.stacker.accepted} stacked, {sum(session.stacker.rejected.values())} "
            f"rejected, FWHM {record.fwhm if record.fwhm is not None else fwhm or 0:.2f} px, "
            f"queue {depth}{notes}"
        )
        self._publish(record=record)  # --- web ---
        if _preview_wanted(session, behind=depth > 0):
            self._preview(session)

    def _reject_after_error(self, session: Session, item: Prepared, err: Exception) -> FrameRecord:
        """Reload ``session`` from disk (its memory may be half-updated) and journal ``item`` as
        rejected, so the frame is not retried after a restart."""
        session.abandon()
        self.session = session = Session.resume(session.dir, self.settings, self.decoder)
        record = FrameRecord(
            file=str(item.path),
            status="rejected",
            reason=f"internal error ({type(err).__name__}: {err})",
            sha256=item.sha256,
        )
        session.reject(record)
        return record

    def _start_over(self, session: Session, why: str, item: Prepared, output: Path) -> None:
        """A much better reference arrived early: supersede the session and stack its frames
        again in a new one, ``item`` first (it becomes the reference)."""
        log.warning("%s; starting the session over with it as the reference", _shown(why))
        try:
            files = session.supersede(why)
        except OSError as err:
            self._failed(err, f"session {session.id} not superseded", session)
            return
        self.session = None
        queued = self._requeue(output, [Path(f) for f in files], current=item)
        log.info("%d frame(s) queued again for the new session", queued)
        self._ingest(item, output)

    def _failed(self, err: OSError, what: str, session: Session | None = None) -> None:
        """A write failed. Nothing is journaled for the frame; ``session`` (whose in-memory state
        may be ahead of its journal) is dropped and reloaded from disk when space returns."""
        if session is not None:
            session.abandon()
            self._reopen = session.dir
            if self.session is session:
                self.session = None
        kind = "disk full" if err.errno in _FULL or self._free() < _SPACE_MARGIN else "write failed"
        if not self._degraded.is_set():
            log.error(
                "%s: %s (%s); decoding paused, frames wait and are stacked when %s can be "
                "written again (checked every %g s); nothing is lost",
                kind,
                what,
                err.strerror or err,
                self.output,
                RETRY_S,
            )
            self.notifier.status(f"{kind}: waiting for space in {self.output}")
        self._degraded.set()
        self._retry_at = time.monotonic() + RETRY_S
        self._publish()  # --- web ---

    def _recover(self, output: Path) -> None:
        """Degraded: when there is room again, reload the session and queue the waiting frames."""
        self._retry_at = time.monotonic() + RETRY_S
        if self._free() < _SPACE_MARGIN + 2 * self._frame_bytes:
            return
        if self._reopen is not None and not self._open_again():
            return
        queued = self._requeue(output)
        self._degraded.clear()
        self._publish()  # --- web ---
        log.info("%s can be written again: %d waiting frame(s) queued", output, queued)

    def _free(self) -> int:
        """Bytes free for us in the output folder (0 if that cannot be told)."""
        try:
            st = os.statvfs(self.output)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _open_again(self) -> bool:
        """Reload the session at ``_reopen`` from disk (finishing it if it was closing)."""
        assert self._reopen is not None
        try:
            session = Session.resume(self._reopen, self.settings, self.decoder)
        except OSError as err:
            self._failed(err, f"session {self._reopen.name} cannot be reloaded")
            return False
        except Exception as err:  # damaged beyond salvage: never a crash loop
            quarantine(self._reopen, f"cannot be resumed ({type(err).__name__}: {err})")
            self._reopen, self._close_wanted = None, ""
            self._requeue(self.output)  # its frames are not processed any more
            return True
        self._reopen = None
        self.session = session
        self._publish()  # --- web ---
        if session.stacker.lost:  # frames to stack again when their raw files come back
            self._requeue(self.output)
        if session.stacker.store is not None:
            self._frame_bytes = session.stacker.store.frame_bytes
        if session.state == "closing":  # stopped while finalizing: finish it
            self._close("resumed while closing")
        elif self._close_wanted:
            self._close(self._close_wanted)
        return self._reopen is None

    def _behind(self) -> bool:
        return bool(self.paths.qsize() or self.prepared.qsize() or self._busy.is_set())

    def _idle(self) -> None:
        behind = self._behind()  # frames wait, but the worker waits for the next decode
        if not behind and self.retries.waiting:  # the queue is empty: time for the retries
            paths = self.retries.take()
            log.info("retrying %d frame(s) that failed for a reason that may pass", len(paths))
            for path in paths:
                self._enqueue(path)
            return
        session = self.session
        if session is None:
            return
        if _preview_wanted(session, behind=behind):
            self._preview(session)
        if behind:
            return
        if time.monotonic() - session.last_frame >= self.settings.idle_timeout_s:
            self._close(f"idle for {self.settings.idle_timeout_s:g} s")

    def _preview(self, session: Session) -> None:
        try:
            with self._fed("preview"):  # live.fits: 288 MB at 24 MP
                session.write_preview()
        except OSError as err:
            log.error("preview not written: %s (the previous preview stays)", err.strerror)

    def _close(self, why: str) -> None:
        session = self.session
        if session is None:
            if self._reopen is not None and not self._close_wanted:
                self._close_wanted = why  # a session waiting for space: close it once reloaded
                log.info("session %s will be closed when it can be reloaded", self._reopen.name)
            return
        self._close_wanted = ""
        log.info("closing session %s: %s", session.id, why)
        self._publish("closing")  # --- web ---
        self.notifier.status(f"finalizing session {session.id} ({session.stacker.accepted} frames)")
        try:
            with self._fed("finalizing"):  # the combine, then the TIFF and FITS writes
                outputs = session.close(self._keepalive)
        except OSError as err:
            self._failed(err, f"session {session.id} not finalized", session)
            log.error(
                "session %s stays 'closing': finished when space returns or at the next start",
                session.id,
            )
            return
        self.session = None
        self._publish()  # --- web ---
        if self.on_close is not None:
            self.on_close(session, outputs)

    @contextlib.contextmanager
    def _fed(self, what: str) -> Iterator[None]:
        """Feed systemd's watchdog from a helper thread while the worker does one long write, at
        most :data:`LONG_WRITE_MAX_S`: a slow card does not get the service killed, a write that
        never ends still does. Nothing to do without a watchdog."""
        interval = self.notifier.watchdog_interval_s
        if not interval:
            yield
            return
        done = threading.Event()

        def feed() -> None:
            deadline = time.monotonic() + LONG_WRITE_MAX_S
            while not done.wait(interval) and time.monotonic() < deadline:
                self._feed_watchdog()

        feeder = threading.Thread(target=feed, name=f"nightstack-watchdog-{what}", daemon=True)
        feeder.start()
        try:
            yield
        finally:
            done.set()
            feeder.join()

    def _keepalive(self, done: int = 0, total: int = 0) -> None:
        """Long work in the worker loop (the final combine): keep systemd's timers happy."""
        now = time.monotonic()
        if now - self._last_keepalive >= (self.notifier.watchdog_interval_s or 30.0):
            self._feed_watchdog()
            self.notifier.extend_timeout(90)  # only heeded while starting or stopping
            self._last_keepalive = now

    def _reload(self) -> None:
        """SIGHUP: re-read the configuration; it applies from the next session."""
        self.reload.clear()
        self.notifier.reloading()
        try:
            fresh = load_settings(self.config, self.overrides)
        except ConfigError as err:
            log.error("reload failed, keeping the current settings: %s", err.reason)
        else:
            old, self.settings = self.settings, fresh
            logging.getLogger().setLevel(fresh.log_level)
            log.info("configuration reloaded; it applies from the next session")
            self._reload_web(old, fresh)
        self.notifier.ready()

    # --- web ---------------------------------------------------------------------------------
    def _start_web(self, output: Path) -> WebServer | None:
        """Serve the web page and API on their own thread. A port that cannot be bound costs
        the page, not the night: the error is logged and stacking goes on."""
        if not self.settings.web_enabled:
            return None
        from .web.server import WebServer

        server = WebServer(
            output,
            self.settings.web_listen,
            token=web_token(self.settings),
            hosts=self.settings.web_hosts,
            status=self.status,
            close=lambda: request_close(output),
            capture=self.capture,  # --- capture ---
        )
        try:
            server.start()
        except OSError as err:
            log.error(
                "web page not started: cannot listen on %s (%s); stacking goes on without it",
                self.settings.web_listen,
                err.strerror or err,
            )
            return None
        self._web = server
        return server

    def _reload_web(self, old: Settings, fresh: Settings) -> None:
        """SIGHUP: the web token (also from its file or credential) and ``web_hosts`` apply
        at once; ``web_enabled`` and ``web_listen`` only at the next start (said so)."""
        if self._web is not None:
            self._web.reconfigure(web_token(fresh), fresh.web_hosts)  # checked by load_settings
            log.info("web page: token and host names reloaded")
        moved = [n for n in ("web_enabled", "web_listen") if getattr(old, n) != getattr(fresh, n)]
        if moved:
            log.warning("%s changed: applies after a restart of the daemon", ", ".join(moved))

    def _publish(self, state: str | None = None, record: FrameRecord | None = None) -> None:
        """Worker thread: replace the snapshot :meth:`status` hands out (never waits on a
        reader: the lock only guards the swap)."""
        session = self.session
        if state is None:
            if self.stop.is_set():
                state = "stopping"
            elif self._degraded.is_set():
                state = "degraded"
            else:
                state = "waiting" if session is None else "stacking"
        last = self._status["last_frame"]
        if record is not None:
            last = {
                "file": Path(record.file).name,
                "status": record.status,
                "reason": record.reason,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        pending = self._reopen.name if self._reopen is not None else None
        snapshot = {
            "state": state,
            "session": session.id if session is not None else pending,
            "accepted": session.stacker.accepted if session is not None else 0,
            "rejected": sum(session.stacker.rejected.values()) if session is not None else 0,
            "last_frame": last,
        }
        with self._status_lock:
            self._status = snapshot

    def status(self) -> dict[str, Any]:
        """Any thread: the worker's last snapshot (state, session id or None, accepted,
        rejected, last_frame) with the queue depth and uptime (s) read now."""
        with self._status_lock:
            snapshot = dict(self._status)
        snapshot["queue"] = self.paths.qsize() + self.prepared.qsize()
        snapshot["uptime_s"] = round(time.monotonic() - self._started, 1)
        return snapshot

    # --- end web -----------------------------------------------------------------------------


def _stat_key(path: Path) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of ``path``, None if it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _preview_wanted(session: Session, *, behind: bool) -> bool:
    """Whether to rewrite the preview now: when due (``preview_every_frames`` frames or
    ``preview_every_s`` seconds since the last one), but while frames wait only by the clock,
    so a backlog gets a preview at least every ``preview_every_s`` (plus one frame) and no more."""
    if not session.preview_due():
        return False
    return not behind or time.monotonic() - session.last_preview >= session.settings.preview_every_s

