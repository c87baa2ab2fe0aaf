"""When to notify: the event rules, between the daemon and its channels (``channels.py``).

The worker loop calls :class:`Alerts` as things happen (a session opened or closed, each frame's
record, a write that failed for lack of space, the space back); the capture thread calls
:meth:`Alerts.capture` with each status; :class:`ErrorForwarder` turns the daemon's ERROR log
lines into events. Each call decides in microseconds and hands an :class:`Event` (or the MQTT
state) to the channels' queues: nothing here waits on a receiver.

Rules: ``notify_rejected_in_row`` frames rejected in a row (one event per run, and one when
frames are accepted again); the median FWHM of the last :data:`TREND` accepted frames above
``notify_fwhm_ratio`` x the reference's, the median transparency of the last :data:`TREND`
measured frames below ``notify_transparency_below`` (each said once when crossed, once when
back); free disk below ``notify_disk_low_gb``; a write that failed (disk full); an error; the
camera lost, a sequence done or failed. Rate limit: one event of a kind per
``notify_min_interval_s`` (session opened and closed always go; the suppressed are counted
in the next one's ``data.suppressed``).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from nightstack.capture.status import CaptureStatus
from nightstack.config import Settings
from nightstack.pipeline.records import FrameRecord
from nightstack.service.channels import Channels, Event
from nightstack.service.folder import PREVIEW
from nightstack.service.session import Session

TREND = 5
"""Frames in the running median of a trend (FWHM, transparency)."""
ALWAYS = frozenset({"session_opened", "session_closed"})
"""Kinds the rate limit never holds back."""
GB = 1e9


class Alerts:
    """The rules for one daemon (see the module's docstring); thread-safe."""

    def __init__(self, settings: Settings, channels: Channels, output: Path | None) -> None:
        self.settings, self.channels, self.output = settings, channels, output
        self.on = bool(channels.senders)
        self._lock = threading.RLock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._run = 0  # frames rejected in a row
        self._fwhm: deque[float] = deque(maxlen=TREND)
        self._transparency: deque[float] = deque(maxlen=TREND)
        self._high = {"fwhm": False, "transparency": False, "disk": False}
        self._camera = "off"

    @classmethod
    def start(cls, settings: Settings, output: Path | None) -> Alerts:
        """The daemon's alerts, its channels' threads started (none: every call a no-op)."""
        alerts = cls(settings, Channels.from_settings(settings), output)
        free = alerts._free_bytes()
        alerts.state({"state": "starting", "camera": "off",
                      "free_disk": None if free is None else round(free / GB, 2)})  # fmt: skip
        return alerts

    @classmethod
    def off(cls, settings: Settings) -> Alerts:
        return cls(settings, Channels([]), None)

    def close(self) -> None:
        """Deliver what is queued (at most two timeouts), stop the threads."""
        self.channels.close(2 * self.settings.notify_timeout_s)

    # --- sessions -----------------------------------------------------------------------------
    def opened(self, session: Session, first: str) -> None:
        if self.on:
            self._reset()
            self._emit(Event(
                "session_opened", "Session opened", f"Session {session.id} opened on {first}.",
                priority=3, tags=("telescope",), session=session.id, data={"first": first},
            ))  # fmt: skip

    def closed(self, session: Session, outputs: dict[str, Any], why: str) -> None:
        if not self.on:
            return
        tally = session.tally
        fwhm = session.reference_fwhm
        text = (
            f"Session {session.id} closed ({why}): {tally.accepted} frames stacked, "
            f"{_duration(tally.exposure_s)} of exposure, {tally.rejected_total} rejected"
            + (f", FWHM {fwhm:.2f} px" if fwhm else "")
            + ("." if outputs.get("final") else "; nothing stacked.")
        )
        preview = session.dir / PREVIEW
        shown = bool(outputs.get("final")) and preview.exists()
        data = {
            "why": why, "accepted": tally.accepted, "rejected": tally.rejected_total,
            "rejected_by": dict(tally.rejected), "exposure_s": round(tally.exposure_s, 1),
            "fwhm_px": fwhm, "first": tally.first_time, "last": tally.last_time,
            "files": sorted(Path(str(v)).name for k, v in outputs.items()
                            if k in ("fits", "tiff", "preview", "trails", "timelapse")),
        }  # fmt: skip
        page = self.settings.notify_page_url
        if page and shown:  # the web page serves it (behind its token, if any)
            data["preview_url"] = urljoin(page, f"api/sessions/{session.id}/{PREVIEW}")
        self._emit(Event(
            "session_closed", "Session closed", text, priority=3, tags=("white_check_mark",),
            session=session.id, data=data,
            attachment=preview if shown else None,
        ))  # fmt: skip
        self._reset()
        self.state({"state": "waiting"})

    # --- frames -------------------------------------------------------------------------------
    def frame(self, session: Session, record: FrameRecord, queue: int) -> None:
        """One journaled frame: the MQTT state and the rules on it."""
        if not self.on:
            return
        free = self._free_bytes()
        transparency = record.transparency
        self.state({
            "state": "stacking", "session": session.id, "accepted": session.tally.accepted,
            "rejected": session.tally.rejected_total,
            "fwhm": record.fwhm if record.fwhm is not None else session.reference_fwhm,
            "background": record.background,
            "transparency": None if transparency is None else round(100 * transparency, 1),
            "queue": queue, "free_disk": None if free is None else round(free / GB, 2),
        })  # fmt: skip
        with self._lock:
            self._rejections(session, record)
            if record.status == "accepted" and record.fwhm is not None:
                self._fwhm.append(record.fwhm)
            if transparency is not None:
                self._transparency.append(transparency)
            self._trends(session)
            if free is not None:
                self._disk(free)

    def _rejections(self, session: Session, record: FrameRecord) -> None:
        n = self.settings.notify_rejected_in_row
        if record.status == "accepted":
            if self._run >= n:
                self._emit(Event(
                    "frames_accepted_again", "Frames accepted again",
                    f"Frames are stacked again after {self._run} rejected in a row.",
                    priority=2, tags=("sparkles",), session=session.id,
                    data={"rejected_in_row": self._run},
                ))  # fmt: skip
            self._run = 0
            return
        if record.status != "rejected":
            return
        self._run += 1
        if self._run == n:
            reason = record.reason or "rejected"
            self._emit(Event(
                "rejected_in_row", f"{n} frames rejected in a row",
                f"The last {n} frames were rejected; the last: {reason}.",
                priority=4, tags=("cloud",), session=session.id,
                data={"rejected_in_row": n, "reason": reason, "file": Path(record.file).name},
            ))  # fmt: skip

    def _trends(self, session: Session) -> None:
        ref = session.reference_fwhm
        if ref and len(self._fwhm) == TREND:
            limit = self.settings.notify_fwhm_ratio * ref
            median = statistics.median(self._fwhm)
            self._cross(
                "fwhm", median > limit, median < 0.95 * limit, session,
                f"FWHM {median:.2f} px over the last {TREND} frames, above {limit:.2f} px "
                f"({self.settings.notify_fwhm_ratio:g} x the reference's {ref:.2f}): focus or "
                "seeing?",
                f"FWHM {median:.2f} px over the last {TREND} frames, back below {limit:.2f} px.",
                {"fwhm_px": round(median, 3), "limit_px": round(limit, 3)},
            )  # fmt: skip
        if len(self._transparency) == TREND:
            least = self.settings.notify_transparency_below
            median = statistics.median(self._transparency)
            self._cross(
                "transparency", median < least, median > min(1.0, 1.05 * least), session,
                f"Transparency {median:.0%} of the reference's over the last {TREND} frames, "
                f"below {least:.0%}: haze, dew or cloud?",
                f"Transparency back to {median:.0%} of the reference's.",
                {"transparency": round(median, 3), "limit": least},
            )  # fmt: skip

    def _cross(
        self, name: str, bad: bool, good: bool, session: Session, says: str, back: str,
        data: dict[str, Any],
    ) -> None:  # fmt: skip
        """A threshold crossed (said once) and crossed back (said once)."""
        if bad and not self._high[name]:
            self._high[name] = True
            self._emit(Event(f"{name}_warning", f"{name.capitalize()} warning", says,
                             priority=3, tags=("warning",), session=session.id, data=data))
        elif good and self._high[name]:
            self._high[name] = False
            self._emit(Event(f"{name}_ok", f"{name.capitalize()} back", back, priority=2,
                             tags=("ok",), session=session.id, data=data))

    def _disk(self, free: float) -> None:
        low = self.settings.notify_disk_low_gb * GB
        if free < low and not self._high["disk"]:
            self._high["disk"] = True
            self._emit(Event(
                "disk_low", "Disk low", f"{free / GB:.1f} GB free on the output disk.",
                priority=4, tags=("floppy_disk",), data={"free_gb": round(free / GB, 2)},
            ))  # fmt: skip
        elif free > 1.2 * low and self._high["disk"]:
            self._high["disk"] = False

    def _free_bytes(self) -> float | None:
        if self.output is None:
            return None
        try:
            return float(shutil.disk_usage(self.output).free)
        except OSError:
            return None

    # --- faults -------------------------------------------------------------------------------
    def disk_full(self, what: str, reason: str) -> None:
        """A write failed (the daemon pauses until there is room)."""
        if self.on:
            self.state({"state": "degraded"})
            self._emit(Event(
                "disk_full", "Writing stopped", f"{what}: {reason}; waiting for free space.",
                priority=5, tags=("rotating_light",), data={"what": what, "reason": reason},
            ))  # fmt: skip

    def disk_back(self) -> None:
        if self.on:
            self._emit(Event("disk_ok", "Writing again", "There is room again: stacking "
                             "goes on.", priority=3, tags=("ok",)))  # fmt: skip

    def error(self, text: str) -> None:
        if self.on:
            self._emit(Event("error", "nightstack error", text, priority=4, tags=("x",)))

    def capture(self, status: CaptureStatus) -> None:
        """The capture thread: each new status of a sequence."""
        if not self.on:
            return
        state = status.state
        with self._lock:
            before, self._camera = self._camera, state
        self.state({"camera": state})
        if state == before:
            return
        data = {"frame": status.frame, "count": status.count, "reason": status.reason}
        if state == "reconnecting":
            self._emit(Event("camera_lost", "Camera lost",
                             f"Camera lost after frame {status.frame}: {status.reason or '?'}; "
                             "looking for it again.", priority=4, tags=("camera",), data=data))
        elif state == "done":
            self._emit(Event("capture_done", "Sequence done",
                             f"Capture sequence done: {status.frame} frames.", priority=3,
                             tags=("camera", "checkered_flag"), data=data))
        elif state == "failed":
            self._emit(Event("capture_failed", "Capture failed",
                             f"Capture sequence failed: {status.reason or '?'}.", priority=4,
                             tags=("camera", "x"), data=data))
        elif before == "reconnecting" and state not in ("stopped",):
            self._emit(Event("camera_back", "Camera back", "The camera is connected again.",
                             priority=2, tags=("camera",), data=data))

    # --- plumbing -----------------------------------------------------------------------------
    def state(self, values: dict[str, Any]) -> None:
        """MQTT's retained state (merged into the last)."""
        if self.on:
            self.channels.state(values)

    def _reset(self) -> None:
        with self._lock:
            self._run = 0
            self._fwhm.clear()
            self._transparency.clear()
            self._high["fwhm"] = self._high["transparency"] = False

    def _emit(self, event: Event) -> None:
        with self._lock:
            now = time.monotonic()
            last = self._last.get(event.kind)
            if event.kind not in ALWAYS and last is not None and (
                now - last < self.settings.notify_min_interval_s
            ):
                self._suppressed[event.kind] = self._suppressed.get(event.kind, 0) + 1
                return
            self._last[event.kind] = now
            held = self._suppressed.pop(event.kind, 0)
        if held:
            event.data["suppressed"] = held
        self.channels.event(event)


class ErrorForwarder(logging.Handler):
    """The daemon's ERROR log lines as ``error`` events; not the notifier's own lines, nor
    those with an ``ALERT`` extra (sent as their own event, e.g. disk_full)."""

    def __init__(self, alerts: Alerts) -> None:
        super().__init__(logging.ERROR)
        self.alerts = alerts

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("nightstack.notify") or hasattr(record, "ALERT"):
            return
        try:
            text = record.getMessage().splitlines()[0][:300]
        except Exception:  # a bad format string must not break logging
            return
        self.alerts.error(text)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
