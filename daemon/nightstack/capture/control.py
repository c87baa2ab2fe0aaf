"""One capture sequence at a time on its own thread: what ``nightstack watch`` and the web page
hold. Commands (start, pause, resume, stop) return at once; :meth:`CaptureControl.status` is
the last status the sequence published (a value, never blocking on the camera).

The daemon knows only this: whatever the camera does, a sequence's failure ends the sequence
(its reason in the status and the log), never the daemon.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nightstack.capture.cli import NEEDS_GPHOTO2
from nightstack.capture.status import FINISHED, CaptureStatus, Plan
from nightstack.config import Settings

if TYPE_CHECKING:
    from nightstack.capture.sequence import Sequence

log = logging.getLogger("nightstack.capture")

THREAD_NAME = "nightstack-capture"
_PLAN_FIELDS = [f.name for f in dataclass_fields(Plan)]
STOP_WAIT_S = 10.0
"""How long closing waits for the sequence's thread (a timed exposure cannot be cut short)."""


def plan_from(settings: Settings) -> Plan | None:
    """The plan the ``capture_*`` settings give; None when capture is off."""
    if settings.capture_exposure_s is None:
        return None
    # each field of the plan is the setting capture_<field> (exposure_s, count, iso, ...)
    return Plan(**{name: getattr(settings, f"capture_{name}") for name in _PLAN_FIELDS})


class CaptureControl:
    """Sequences into ``watch_dir``, journals in ``journal_dir``; ``plan``: the settings' plan
    (the web page's start changes some of its fields); ``on_status`` is called with each new
    status (the web page's events)."""

    def __init__(
        self,
        watch_dir: Path,
        journal_dir: Path,
        plan: Plan | None,
        *,
        reconnect_s: float = 600.0,
        on_status: Callable[[CaptureStatus], None] | None = None,
    ) -> None:
        self.watch_dir, self.journal_dir = watch_dir, journal_dir
        self.plan, self.reconnect_s = plan, reconnect_s
        self.on_status = on_status
        self._lock = threading.Lock()
        self._sequence: Sequence | None = None
        self._thread: threading.Thread | None = None
        self._last: CaptureStatus | None = None

    @classmethod
    def from_settings(cls, settings: Settings, watch_dir: Path, output: Path) -> CaptureControl:
        return cls(
            watch_dir, output / "capture", plan_from(settings),
            reconnect_s=settings.capture_reconnect_s,
        )  # fmt: skip

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, **changes: Any) -> CaptureStatus:
        """Start a sequence: the plan with ``changes`` (exposure_s, iso, count, interval_s,
        ...). Raises ValueError with a one-line reason when one runs already or a value is
        wrong; libgphoto2 is imported here, the first time."""
        with self._lock:
            if self.running():
                raise ValueError("a capture sequence is running already: stop it first")
            if self.plan is None and "exposure_s" not in changes:
                raise ValueError("no exposure: give one (or set capture_exposure_s)")
            plan = self.plan.with_changes(**changes) if self.plan is not None else Plan(**changes)
            try:
                from nightstack.capture.sequence import Sequence  # imports libgphoto2
            except ImportError as err:
                raise ValueError(f"{NEEDS_GPHOTO2}: {err}") from err
            journal = self.journal_dir / f"capture-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            self._sequence = sequence = Sequence(
                plan, self.watch_dir, journal, reconnect_s=self.reconnect_s,
                listeners=[self._published], wait_for_camera=True,
            )  # fmt: skip
            self.plan = plan
            self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
            self._thread.start()
            log.info("capture: started (%s), journal %s", plan, journal)
            return sequence.status

    def _run(self) -> None:
        sequence = self._sequence
        assert sequence is not None
        try:
            sequence.run()
        except Exception:  # a bug in the capture must not take the daemon with it
            log.exception("capture: the sequence ended on an unexpected error")
            self._last = CaptureStatus(state="failed", reason="unexpected error (see the log)")

    def _published(self, status: CaptureStatus) -> None:
        self._last = status
        if self.on_status is not None:
            self.on_status(status)

    def pause(self) -> None:
        if self._sequence is not None:
            self._sequence.pause()

    def resume(self) -> None:
        if self._sequence is not None:
            self._sequence.resume()

    def stop(self) -> None:
        """End the sequence after the current frame (returns at once)."""
        if self._sequence is not None:
            self._sequence.stop()

    def close(self) -> None:
        """Stop and wait a little for the sequence's thread (the daemon is stopping)."""
        self.stop()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():
                log.warning("capture: the camera did not finish its frame in %g s", STOP_WAIT_S)

    def status(self) -> dict[str, Any]:
        """The last status as JSON (``state`` 'off' when no sequence ever started), with the
        plan a start would use."""
        last = self._last
        body: dict[str, Any] = last.to_json() if last is not None else {"state": "off", "frame": 0}
        body["running"] = self.running() and (last is None or last.state not in FINISHED)
        body["plan"] = None if self.plan is None else asdict(self.plan)
        return body


def start_in_daemon(
    settings: Settings, watch_dir: Path, output: Path,
    on_status: Callable[[CaptureStatus], None] | None = None,
) -> CaptureControl:  # fmt: skip
    """The daemon's capture: started now when the ``capture_*`` settings ask for it; a start
    that fails is logged (one line) and the daemon goes on stacking. ``on_status``: each new
    status of a sequence (the daemon's notifications)."""
    control = CaptureControl.from_settings(settings, watch_dir, output)
    control.on_status = on_status
    if control.plan is not None:
        try:
            control.start()
        except ValueError as err:
            log.error("capture: not started: %s", err)
    return control
