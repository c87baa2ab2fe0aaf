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

Why one module of this size: the worker loop and what it reacts to (frames, signals, close
requests, previews, the close, the watchdog, the web status) share the daemon's state; the
prepare thread (``intake``), the disk-full recovery (``recovery``) and the session (``session``)
are apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from nightstack.capture.control import CaptureControl, start_in_daemon
from nightstack.config import Settings, load_settings, web_token
from nightstack.errors import ConfigError
from nightstack.io.decoder import DEFAULT_DECODE_FN, Decoder, decoder_memory, load_kwargs
from nightstack.memory import trim_heap
from nightstack.pipeline.prepare import Prepared, Preparer
from nightstack.pipeline.records import FrameRecord
from nightstack.pipeline.stacker import OffTarget
from nightstack.registration.detect import SkyArea
from nightstack.registration.quality import Quality
from nightstack.service.alerts import Alerts, ErrorForwarder
from nightstack.service.control import hold_lock, take_close_request
from nightstack.service.folder import find_open, quarantine
from nightstack.service.intake import TICK_S, Duplicate, Intake, Item, Transient
from nightstack.service.notify import Notifier, shown
from nightstack.service.recovery import Recovery
from nightstack.service.retries import Retries, first_attempts
from nightstack.service.session import Session
from nightstack.service.solving import Locator
from nightstack.service.split import Locate, Splitter
from nightstack.service.watcher import FrameWatcher


class WebPage(Protocol):
    """The web page as the daemon sees it (``web.server.WebServer``)."""

    def stop(self) -> None: ...

    def reconfigure(self, token: str | None, hosts: tuple[str, ...] | list[str]) -> None: ...


WebStarter = Callable[
    [Settings, Path, Callable[[], dict[str, Any]], CaptureControl | None], WebPage | None
]
"""Starts the web page of a daemon writing into a folder, given its status and its tethered
capture (None: no page); ``web.server.start_web``. Given by the caller, so the service does not
import the web page."""

log = logging.getLogger("nightstack")

LONG_WRITE_MAX_S = 900.0
"""The longest one write (a frame into the store, a checkpoint, a preview with live.fits, the
final combine and its files) keeps the watchdog fed: a card that slow is failing, and a write
that never ends is a hang the watchdog must see."""


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


@dataclass(frozen=True)
class LastFrame:
    """The last frame journaled, as the page shows it."""

    file: str  # its name
    status: str
    reason: str | None
    at: str  # ISO UTC time it was journaled


@dataclass(frozen=True)
class Snapshot:
    """What the daemon is doing, for the web page: replaced whole by the worker thread."""

    state: str  # starting, waiting, stacking, closing, degraded, stopping
    session: str | None = None  # the open session's id (or the one waiting to be reloaded)
    accepted: int = 0
    rejected: int = 0
    last_frame: LastFrame | None = None


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
        web: WebStarter | None = None,
        locate: Locate | None = None,
    ) -> None:
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.config, self.overrides = config, overrides
        self.exit_when_closed = exit_when_closed
        self.on_close = on_close
        self.web = web
        self.notifier = Notifier()
        self.alerts = Alerts.off(settings)  # notifications: started by run()
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.session: Session | None = None
        self._paused = threading.Event()  # the output cannot be written: wait for space
        self.intake = Intake(settings, self._sky, self.stop, self._paused)
        self.retries = Retries(set())  # transient failures: tried once, waiting for the retry
        # when a session splits itself (split.py); a frame that fails to align is plate-solved
        locate = locate or Locator(lambda: self.session.solving if self.session else None)
        self.split = Splitter(settings, locate)
        self._stuck_said = False
        self._request_said: str | None = None  # the last complaint about the close request
        self.stats = {"stacked": 0, "rejected": 0}
        self._last_keepalive = 0.0
        # --- web ---
        self._web: WebPage | None = None
        self._started = time.monotonic()
        self._status_lock = threading.Lock()  # guards _status: the worker swaps, the web reads
        self._status = Snapshot("starting")
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
        self.alerts = Alerts.start(self.settings, output)  # ntfy, MQTT, webhook: own threads
        errors = ErrorForwarder(self.alerts)
        log.addHandler(errors)
        # camera: its own thread
        self.capture = start_in_daemon(self.settings, watch, output, self.alerts.capture)
        web = self._start_web(output)  # --- web ---
        try:
            return self._run(watch, output)
        finally:
            self.capture.close()
            if web is not None:
                web.stop()
            log.removeHandler(errors)
            self.alerts.close()  # what is queued (session closed) for at most two timeouts
            os.close(lock)

    def _run(self, watch: Path, output: Path) -> int:
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
        self.retries = Retries(first_attempts(output))
        with Decoder(
            timeout_s=self.settings.decode_timeout_s,
            load_kwargs=load_kwargs(self.settings),
            decode_fn=self.hooks.decode_fn,
            address_space_bytes=decoder_memory(self.settings),
        ) as decoder:
            self.decoder = decoder
            self.output = output
            self.recovery = Recovery(output, self._paused)
            self.preparer = Preparer(self.settings, decoder)
            open_dir = find_open(output)
            if open_dir is not None:
                self.recovery.reopen = open_dir
                self._open_again()
            self.intake.start(output, self.preparer)
            watcher = FrameWatcher(
                watch,
                self.intake.enqueue,
                extensions=self.settings.extensions,
                recursive=self.settings.recursive,
                polling=self.settings.polling,
                poll_interval_s=self.settings.poll_interval_s,
                stable_s=self.settings.stable_s,
                follow_symlinks=self.settings.follow_symlinks,
                # after a crash, frames in flight must be found again: scan the backlog
                ignore_existing=self.settings.ignore_existing and open_dir is None,
                on_problem=lambda text: log.warning("%s", shown(text)),
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
                if self.session is None and self.recovery.reopen is not None:
                    self._open_again()  # a session a failed write left on disk: finish it too
                if self.session is not None and self.session.state != "closed":
                    self._close("stopping")
                self.stop.set()
                self.intake.join(timeout=self.settings.decode_timeout_s + 5)
        return 0

    def _loop(self, output: Path) -> None:
        interval = self.notifier.watchdog_interval_s
        tick = min(TICK_S, interval) if interval else TICK_S
        while not self.stop.is_set():
            if not self.intake.alive():  # never ping the watchdog for a dead pipeline
                raise RuntimeError("the prepare thread died; see the log above")
            self._feed_watchdog()
            if self.reload.is_set():
                self._reload()
            if self.recovery.due():
                self._recover(output)
            request = take_close_request(output)
            if request == "close":
                self._close("close requested")
            elif request is not None and request != self._request_said:
                log.warning("%s", shown(request))  # once, not every tick
            self._request_said = request
            item = self.intake.take(tick)
            if item is None:
                self._idle()
                if self.exit_when_closed and self.session is None and self.stats["stacked"]:
                    return
                continue
            if self._paused.is_set():
                continue  # still outstanding: queued again by the recovery
            if self.hooks.stall_s:
                time.sleep(self.hooks.stall_s)  # a test's stuck worker
            self._ingest(item, output)

    def _feed_watchdog(self) -> None:
        """``WATCHDOG=1``, only while every stage makes progress (one log line when a stage
        is stuck: systemd then restarts the daemon after ``WatchdogSec``)."""
        stuck = self.intake.stuck()
        if stuck is None:
            self._stuck_said = False
            self.notifier.watchdog()
        elif not self._stuck_said:
            self._stuck_said = True
            log.error("%s: the watchdog is no longer fed", stuck)

    def _sky(self) -> SkyArea:
        """Where the stars are for the next frame: the open session's sky (an automatic
        landscape mask once learned), else the configured one."""
        session = self.session
        return session.sky if session is not None else self.preparer.sky

    def _ingest(self, item: Item, output: Path) -> None:
        if isinstance(item, Duplicate):
            log.info("%s: already processed (same content), skipped", shown(item.path.name))
            self.intake.done(item.path)
            return
        transient = isinstance(item, Transient)
        if isinstance(item, Transient):
            item = item.prepared
        session = self.session or self._open_session(item, output)
        if session is None:
            return
        if transient and self._retry_later(session, item):
            return
        session = self._follow(session, item, output)  # --- split ---
        if session is None:
            return
        better = session.better_reference(item)
        if better is not None:
            session = self._start_over(session, better, item, output)
            if session is None:
                return
        try:
            with self._fed("stacking"):  # store write and checkpoint on a slow SD card
                record = session.ingest(item, lambda done: self._publish(record=done))
        except OffTarget as off:  # --- split ---
            self._off_target(session, item, off, output)
            return
        except OSError as err:
            self._failed(err, f"{shown(item.path.name)} not stacked", session)
            return
        except Exception as err:  # a bug must not end the night, nor loop on restart
            log.exception("internal error while stacking %s", shown(item.path.name))
            record = self._reject_after_error(session, item, err)
        self.intake.done(item.path)
        self.recovery.frame_bytes = session.frame_bytes or self.recovery.frame_bytes
        self._report(session, record)
        if record.transform is not None:  # aligned: frames held as a new target stay rejected
            self._reject_held(session, self.split.aligned())
        trim_heap()  # the frame's freed temporaries back to the system, not kept in an arena

    # --- split --------------------------------------------------------------------------------
    def _follow(self, session: Session, item: Prepared, output: Path) -> Session | None:
        """The split rules before ``item`` is stacked (``split.py``): the session to stack it
        in, a new one when its settings changed or after a gap (None: a write failed)."""
        opened_by = self.split.watch(session.id)
        if opened_by is not None:
            session.opened_by = opened_by
        why = self.split.before(item)
        if why is not None:
            new = self._split(why, item, output)
            if new is None:
                return None
            session = new
        if item.frame is not None:
            if session.stacker.reference is None:
                self.split.locate_reference(item)
            session.stacker.follow = self.split.follow_px(item.frame.shape)
        return session

    def _split(self, why: str, item: Prepared | None, output: Path) -> Session | None:
        """Close the open session (as the idle timeout does) and open the next for ``item``,
        which becomes its reference (None: the frames to stack in it were queued again)."""
        self._close(f"new session: {why}")
        if self.session is not None or self._paused.is_set():
            return None  # not finalized (disk full): the frame waits for the recovery
        self.split.pending = why
        if item is None:
            return None
        session = self._open_session(item, output)
        if session is not None:
            session.opened_by = self.split.watch(session.id)
            self.split.before(item)  # its first frame, for the next frame's rules
        return session

    def _off_target(self, session: Session, item: Prepared, off: OffTarget, output: Path) -> None:
        """``item`` failed to align, or moved: split, hold it, or reject it (``split.py``)."""
        solved = session.solving.reference  # where the reference points, once plate-solved
        if solved is not None and self.split.pointing is None:
            self.split.pointing = (solved.solution.ra_deg, solved.solution.dec_deg)
            self.split.scale_arcsec = solved.solution.scale_arcsec
        verdict = self.split.off_target(item, off)
        self._reject_held(session, verdict.reject)
        if verdict.split is not None:
            new = self._split(verdict.split, None if verdict.requeue else item, output)
            if verdict.requeue and self.session is None and not self._paused.is_set():
                queued = self.intake.requeue(output, verdict.requeue)
                log.info("%d frame(s) queued again for the new session", queued)
            if new is not None:
                self._ingest(item, output)  # the new session's reference
        elif verdict.held:
            log.info("%s does not align with the reference: held, it may start a new target",
                     shown(item.path.name))  # fmt: skip

    def _reject_held(self, session: Session, records: list[FrameRecord]) -> None:
        """Journal held frames as rejected, as they would have been without the split rules."""
        for record in records:
            try:
                session.reject(record)
            except OSError as err:
                self._failed(err, f"{shown(Path(record.file).name)} not journaled", session)
                return
            self.intake.done(Path(record.file))
            self._report(session, record)
    # --- end split ----------------------------------------------------------------------------

    def _retry_later(self, session: Session, item: Prepared) -> bool:
        """A transient failure: journal its first attempt and keep it for a retry (True), or,
        if this was the retry, let it be journaled as usual (False)."""
        record = self.retries.first(item)
        if record is None:
            return False
        try:
            session.journal_attempt(record)
        except OSError as err:
            self._failed(err, f"{shown(item.path.name)} not journaled", session)
            return True
        self.retries.wait(record)
        if item.sha256 is not None:
            self.intake.forget(item.sha256)  # not processed for good: let the retry in
        self.intake.done(item.path)
        self._report(session, record)
        return True

    def _report(self, session: Session, record: FrameRecord) -> None:
        """The frame's log line, systemd status and, when wanted, a preview."""
        if record.status == "accepted":
            self.stats["stacked"] += 1
        else:
            self.stats["rejected"] += 1
        depth = self.intake.depth()
        timings = " ".join(f"{k}={v:.0f}ms" for k, v in record.ms.items())
        if record.stored and session.accumulate_ms is not None:  # after the journal line
            timings += f" live={session.accumulate_ms:.0f}ms"
        log.info(
            "%s %s%s stars=%s fwhm=%s residual=%s %s queue=%d",
            shown(Path(record.file).name),
            record.status,
            f" ({record.reason})" if record.reason else "",
            record.stars,
            record.fwhm,
            record.residual_px,
            timings,
            depth,
            extra={"SESSION": session.id, "FRAME": record.file, "STATUS": record.status},
        )
        fwhm = session.reference_fwhm
        notes = "".join(f"; {n}" for n in session.notes)
        self.notifier.status(
            f"{session.tally.accepted} stacked, {session.tally.rejected_total} "
            f"rejected, FWHM {record.fwhm if record.fwhm is not None else fwhm or 0:.2f} px, "
            f"queue {depth}{notes}"
        )
        self._publish(record=record)  # --- web ---
        self.alerts.frame(session, record, depth)
        if _preview_wanted(session, behind=depth > 0):
            self._preview(session)

    def _reject_after_error(self, session: Session, item: Prepared, err: Exception) -> FrameRecord:
        """Reload ``session`` from disk (its memory may be half-updated) and journal ``item`` as
        rejected, so the frame is not retried after a restart."""
        session.abandon()
        self.session = session = Session.resume(session.dir, self.settings)
        record = FrameRecord(
            file=str(item.path),
            status="rejected",
            reason=f"internal error ({type(err).__name__}: {err})",
            sha256=item.sha256,
        )
        session.reject(record)
        return record

    def _open_session(self, item: Prepared, output: Path) -> Session | None:
        """A new session for ``item`` (settings reloaded since it was detected: detected
        again), or None when the disk refuses one."""
        if self.preparer.settings is not self.settings:  # reloaded (SIGHUP) since
            self.preparer = Preparer(self.settings, self.decoder)
            self.intake.use(self.preparer)
            if item.frame is not None:  # detected with the old settings: detect again
                item.stars = self.preparer.detect(item.frame)
                item.quality = Quality.of(item.stars)
        try:
            self.session = Session.create(output, self.settings)
        except OSError as err:
            self._failed(err, f"cannot open a session for {shown(item.path.name)}")
        else:
            self.alerts.opened(self.session, item.path.name)
        return self.session

    def _start_over(
        self, session: Session, why: str, item: Prepared, output: Path
    ) -> Session | None:
        """A much better reference arrived early: supersede the session and stack its frames
        again in a new one, ``item`` first (it becomes the reference). Returns the new session
        (None when a write failed)."""
        log.warning("%s; starting the session over with it as the reference", shown(why))
        try:
            files = session.supersede(why)
        except OSError as err:
            self._failed(err, f"session {session.id} not superseded", session)
            return None
        self.session = None
        queued = self.intake.requeue(output, [Path(f) for f in files], current=item)
        log.info("%d frame(s) queued again for the new session", queued)
        return self._open_session(item, output)

    def _failed(self, err: OSError, what: str, session: Session | None = None) -> None:
        """A write failed. Nothing is journaled for the frame; ``session`` (whose in-memory state
        may be ahead of its journal) is dropped and reloaded from disk when space returns."""
        if session is not None:
            session.abandon()
            if self.session is session:
                self.session = None
        status = self.recovery.failed(err, what, session.dir if session is not None else None)
        if status is not None:
            self.notifier.status(status)
            self.alerts.disk_full(what, str(err.strerror or err))
        self._publish()  # --- web ---

    def _recover(self, output: Path) -> None:
        """Paused: when there is room again, reload the session and queue the waiting frames."""
        if not self.recovery.room():
            return
        if self.recovery.reopen is not None and not self._open_again():
            return
        self.recovery.resumed(self.intake.requeue(output))
        self.alerts.disk_back()
        self._publish()  # --- web ---

    def _open_again(self) -> bool:
        """Reload the session at ``_reopen`` from disk (finishing it if it was closing)."""
        assert self.recovery.reopen is not None
        try:
            session = Session.resume(self.recovery.reopen, self.settings)
        except OSError as err:
            self._failed(err, f"session {self.recovery.reopen.name} cannot be reloaded")
            return False
        except Exception as err:  # damaged beyond salvage: never a crash loop
            quarantine(self.recovery.reopen, f"cannot be resumed ({type(err).__name__}: {err})")
            self.recovery.reopen, self.recovery.close_wanted = None, ""
            self.intake.requeue(self.output)  # its frames are not processed any more
            return True
        self.recovery.reopen = None
        self.session = session
        self._publish()  # --- web ---
        if session.tally.lost:  # frames to stack again when their raw files come back
            self.intake.requeue(self.output)
        self.recovery.frame_bytes = session.frame_bytes or self.recovery.frame_bytes
        if session.state == "closing":  # stopped while finalizing: finish it
            self._close("resumed while closing")
        elif self.recovery.close_wanted:
            self._close(self.recovery.close_wanted)
        return self.recovery.reopen is None

    def _behind(self) -> bool:
        return self.intake.behind()

    def _idle(self) -> None:
        behind = self._behind()  # frames wait, but the worker waits for the next decode
        if not behind and self.retries.waiting:  # the queue is empty: time for the retries
            paths = self.retries.take()
            log.info("retrying %d frame(s) that failed for a reason that may pass", len(paths))
            for path in paths:
                self.intake.enqueue(path)
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
        recovery = self.recovery
        if session is None:
            if recovery.reopen is not None and not recovery.close_wanted:
                recovery.close_wanted = why  # a session waiting for space: close it once reloaded
                log.info("session %s will be closed when it can be reloaded", recovery.reopen.name)
            return
        recovery.close_wanted = ""
        self._reject_held(session, self.split.release(session.id))  # --- split ---
        if self.session is not session:  # a held frame could not be journaled (disk full)
            self._close(why)  # closed once the session is reloaded
            return
        log.info("closing session %s: %s", session.id, why)
        self._publish("closing")  # --- web ---
        self.notifier.status(f"finalizing session {session.id} ({session.tally.accepted} frames)")
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
        self.preparer.new_session()  # the next session learns from its own lights
        self._publish()  # --- web ---
        self.alerts.closed(session, outputs, why)
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
            self.split.settings = fresh  # --- split: the rules follow at once ---
            logging.getLogger().setLevel(fresh.log_level)
            log.info("configuration reloaded; it applies from the next session")
            self._reload_web(old, fresh)
            if any(getattr(old, n) != getattr(fresh, n) for n in type(fresh).model_fields
                   if n.startswith("notify_")):  # fmt: skip
                log.warning("notify_* settings changed: they apply after a restart of the daemon")
        self.notifier.ready()

    # --- web ---------------------------------------------------------------------------------
    def _start_web(self, output: Path) -> WebPage | None:
        """The web page (:attr:`web` starts it on its own thread), if the daemon has one."""
        page = self.web(self.settings, output, self.status, self.capture) if self.web else None
        self._web = page
        return self._web

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
            elif self._paused.is_set():
                state = "degraded"
            else:
                state = "waiting" if session is None else "stacking"
        last = self._status.last_frame
        if record is not None:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            last = LastFrame(Path(record.file).name, record.status, record.reason, at)
        if session is not None:
            snapshot = Snapshot(
                state, session.id, session.tally.accepted, session.tally.rejected_total, last
            )
        else:
            pending = self.recovery.reopen.name if self.recovery.reopen is not None else None
            snapshot = Snapshot(state, pending, last_frame=last)
        with self._status_lock:
            self._status = snapshot
        self.alerts.state({"state": state, "session": snapshot.session})

    def status(self) -> dict[str, Any]:
        """Any thread: the worker's last snapshot (state, session id or None, accepted,
        rejected, last_frame) with the queue depth and uptime (s) read now."""
        with self._status_lock:
            snapshot = asdict(self._status)
        snapshot["queue"] = self.intake.depth()
        snapshot["uptime_s"] = round(time.monotonic() - self._started, 1)
        return snapshot

    # --- end web -----------------------------------------------------------------------------


def _preview_wanted(session: Session, *, behind: bool) -> bool:
    """Whether to rewrite the preview now: when due (``preview_every_frames`` frames or
    ``preview_every_s`` seconds since the last one), but while frames wait only by the clock,
    so a backlog gets a preview at least every ``preview_every_s`` (plus one frame) and no more."""
    if not session.preview_due():
        return False
    return not behind or time.monotonic() - session.last_preview >= session.settings.preview_every_s

