"""The sequence engine: shoot a :class:`~.status.Plan` frame by frame into the watch folder.

A producer beside the camera, like the tether tool it replaces: each frame is downloaded at once
into the watch folder under a hidden temporary name (``.NAME.part``, which the watcher ignores)
and renamed into place under its final name (never over an existing file), so the watcher only
ever sees complete files; each frame is then one fsync'd line of the sequence's own journal
(``capture.jsonl`` lines: time, settings, file, the camera's clock). The stacking side does not
know it exists.

Faults: a camera that stops answering (:class:`~.camera.CameraLost`) is closed and found again
by model and serial with a growing backoff, its settings applied again, and the sequence goes on
with the frame it was taking (a frame counts once it is in the watch folder, so none is lost or
doubled). A setting the camera refuses, a full card or a full watch disk stop the sequence with
a one-line reason. Waits are ``Event.wait``: no CPU between frames or during a bulb exposure.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from nightstack.capture.camera import Camera, CameraLost, CaptureError
from nightstack.capture.files import append_line, frame_stem, place, temp_path
from nightstack.capture.status import CaptureStatus, Plan

log = logging.getLogger("nightstack.capture")

MIN_FREE_BYTES = 64 * 2**20
"""Stop before a frame when the watch folder's disk has less than this (or 2 frames) free."""

BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits between attempts to find a lost camera again; the last repeats."""

Listener = Callable[[CaptureStatus], None]


class Sequence:
    """One capture sequence. ``run()`` shoots until the plan is done, ``stop()`` is called or
    a fault ends it; it returns the final status. ``watch_dir``: where frames go;
    ``journal``: the journal file; ``reconnect_s``: give up finding a lost camera after this
    long; ``listeners`` are called (on the capture thread) with each new status; keep them
    short. ``backoff_s``: the waits between reconnect attempts. ``before_exposure(frame,
    failures)``: a test's hook, called before each exposure with the frame's number and the
    failed attempts at it so far (tests/_capture_launch.py shows the virtual camera its sky).
    ``wait_for_camera``: a camera not on USB at the start is waited for (with the backoff, until
    stopped) instead of failing the sequence: the daemon's capture, started before the camera
    is plugged in or switched on."""

    def __init__(
        self,
        plan: Plan,
        watch_dir: Path,
        journal: Path,
        *,
        reconnect_s: float = 600.0,
        listeners: list[Listener] | None = None,
        backoff_s: tuple[float, ...] = BACKOFF_S,
        before_exposure: Callable[[int, int], None] | None = None,
        wait_for_camera: bool = False,
    ) -> None:
        self.plan = plan
        self.wait_for_camera = wait_for_camera
        self.before_exposure = before_exposure
        self.watch_dir = Path(watch_dir)
        self.journal = Path(journal)
        self.reconnect_s = reconnect_s
        self.backoff_s = backoff_s
        self._listeners = list(listeners or [])
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        self._lock = threading.Lock()
        self._status = CaptureStatus(count=plan.count, exposure_s=plan.exposure_s)
        self._camera: Camera | None = None
        self._prefix = time.strftime("%Y%m%d-%H%M%S")
        self._last_bytes = 0
        self._model = plan.model
        self._serial = plan.serial
        self._lost_since: float | None = None  # the first failure of the frame being taken
        self._losses = 0  # failures since the last frame

    # --- commands (any thread) ---
    @property
    def status(self) -> CaptureStatus:
        with self._lock:
            return self._status

    def stop(self) -> None:
        """End the sequence after the current frame (a bulb exposure ends at once)."""
        self._stop.set()
        self._resume.set()

    def pause(self) -> None:
        """Take no new frame until :meth:`resume` (the current one finishes)."""
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    # --- the capture thread ---
    def _update(self, **changes: Any) -> CaptureStatus:
        with self._lock:
            self._status = replace(self._status, **changes)
            status = self._status
        for listener in self._listeners:
            try:
                listener(status)
            except Exception:  # a listener's bug must not end the sequence
                log.exception("capture: a status listener failed")
        return status

    def run(self) -> CaptureStatus:
        """Shoot the plan; the final status says how it ended (done, stopped or failed)."""
        try:
            self.watch_dir.mkdir(parents=True, exist_ok=True)
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            if not self._first_connect():
                return self._finish()
            self._shoot_all()
        except CaptureError as err:
            log.error("capture: %s", err.reason)
            self._write_journal({"event": "failed", "reason": err.reason})
            return self._update(
                state="failed",
                reason=err.reason,
                connected=False,
                exposure_ends=None,
                next_start=None,
            )
        finally:
            if self._camera is not None:
                self._camera.close()
                self._camera = None
        return self._finish()

    def _finish(self) -> CaptureStatus:
        state = "stopped" if self._stop.is_set() else "done"
        self._write_journal({"event": state, "frames": self.status.frame})
        return self._update(state=state, connected=False, exposure_ends=None, next_start=None)

    def _first_connect(self) -> bool:
        """Open the camera; with ``wait_for_camera``, one absent (CameraLost) is looked for
        again with the backoff until it is there (True) or the sequence is stopped (False).
        One log line when the wait starts (and when its reason changes), one when it ends."""
        if not self.wait_for_camera:
            self._connect()
            return True
        began, attempt, said = time.monotonic(), 0, None
        while True:
            try:
                self._connect()
            except CameraLost as err:
                if self._camera is not None:  # found, then lost while being set up
                    self._camera.close()
                    self._camera = None
                if err.reason != said:
                    log.warning(
                        "capture: %s; waiting for the camera (looking again every %g to %g s)",
                        err.reason, self.backoff_s[0], self.backoff_s[-1],
                    )  # fmt: skip
                    said = err.reason
                wait = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                attempt += 1
                self._update(
                    state="reconnecting", connected=False, next_start=time.time() + wait,
                    reason=f"waiting for the camera: {err.reason}",
                )  # fmt: skip
                if self._stop.wait(wait):
                    return False
                continue
            if attempt:
                log.info("capture: the camera is here after %.0f s", time.monotonic() - began)
                self._update(reason=None)
            return True

    def _connect(self) -> None:
        camera = Camera.open(self._model, self._serial)
        self._camera = camera
        self._model, self._serial = camera.model, camera.serial  # the same one after a reset
        applied = self._apply(camera)
        info = camera.info()
        log.info(
            "capture: %s (serial %s) on %s: battery %s, %s free, lens %s, %s",
            info.model,
            info.serial or "?",
            info.port,
            info.battery or "?",
            _size(info.free_bytes),
            info.lens or "?",
            info.settings,
        )
        self._update(connected=True, camera=info.to_json(), settings=applied)

    def _apply(self, camera: Camera) -> dict[str, Any]:
        """Set ISO, shutter speed (or bulb), RAW and capture target; what was set, by name."""
        plan, applied = self.plan, {}
        if plan.iso is not None:
            if camera.has("iso"):
                camera.set("iso", str(plan.iso))
                applied["iso"] = str(plan.iso)
            else:
                log.warning("capture: the camera has no ISO setting: ISO %d not set", plan.iso)
        applied.update(self._apply_shutter(camera))
        if plan.raw:
            raws = [c for c in camera.choices("imageformat") if _is_raw(c)]
            if raws:
                camera.set("imageformat", raws[0])
                applied["imageformat"] = raws[0]
            else:
                log.warning("capture: the camera offers no RAW image format: left as it is")
        word = "ram" if plan.target == "ram" else "card"
        targets = [c for c in camera.choices("capturetarget") if word in c.lower()]
        if targets:
            camera.set("capturetarget", targets[0])
            applied["capturetarget"] = targets[0]
        return applied

    def _apply_shutter(self, camera: Camera) -> dict[str, Any]:
        exposure = self.plan.exposure_s
        speeds = camera.timed_speeds()
        longest = max(speeds.values(), default=0.0)
        if exposure <= longest:
            label, seconds = min(speeds.items(), key=lambda kv: abs(kv[1] - exposure))
            if abs(seconds - exposure) > 0.02 * exposure:
                near = sorted(speeds.items(), key=lambda kv: abs(kv[1] - exposure))[:3]
                raise CaptureError(
                    f"the camera has no shutter speed of {exposure:g} s (nearest: "
                    f"{', '.join(k for k, _ in near)})"
                )
            camera.set("shutterspeed", label)
            camera.bulb_mode = None
            return {"shutterspeed": label}
        if not camera.can_bulb():
            raise CaptureError(
                f"an exposure of {exposure:g} s needs bulb, which this camera cannot do over "
                f"USB: its longest timed speed is {longest:g} s"
            )
        bulb = [c for c in camera.choices("shutterspeed") if c.lower() == "bulb"]
        if bulb:
            camera.set("shutterspeed", bulb[0])
        camera.bulb_mode = "bulb"
        return {"shutterspeed": "bulb", "bulb_s": exposure}

    def _shoot_all(self) -> None:
        plan = self.plan
        start = time.monotonic() + plan.delay_s
        while plan.count == 0 or self.status.frame < plan.count:
            if not self._wait_until(start):
                return
            start = time.monotonic() + plan.interval_s
            try:
                self._shoot(self.status.frame + 1)
            except CameraLost as err:
                if not self._reconnect(err.reason):
                    return
                start = time.monotonic()  # the frame it was taking, at once

    def _wait_until(self, start: float) -> bool:
        """Wait (paused or not) until the monotonic time ``start``; False when stopped."""
        while True:
            if self._stop.is_set():
                return False
            if not self._resume.is_set():
                self._update(state="paused", next_start=None)
                self._resume.wait()
                continue
            left = start - time.monotonic()
            if left <= 0:
                return True
            self._update(state="waiting", next_start=time.time() + left, exposure_ends=None)
            self._stop.wait(left)

    def _shoot(self, frame: int) -> None:
        camera = self._camera
        assert camera is not None
        self._check_disk()
        if self.before_exposure is not None:
            self.before_exposure(frame, self._losses)
        began = time.time()
        ends = began + self.plan.exposure_s
        self._update(state="exposing", exposure_ends=ends, next_start=None)
        if camera.bulb_mode is not None:
            folder, name = camera.capture_bulb(self.plan.exposure_s, self._stop)
        else:
            folder, name = camera.capture_timed()
        completed = time.time()
        self._update(state="downloading", exposure_ends=None)
        final = self._download(camera, folder, name, frame)
        placed = time.time()
        # the frame is in the watch folder: it counts now (nothing below raises CameraLost, so
        # a camera lost from here on never has this frame taken twice)
        size = final.stat().st_size
        self._last_bytes = size
        self._write_journal({
            "event": "frame", "frame": frame, "time": _iso(began), "completed": _iso(completed),
            "file": final.name,
            "camera_file": f"{folder.rstrip('/')}/{name}", "bytes": size,
            "exposure_s": self.plan.exposure_s, "iso": self.status.settings.get("iso"),
            "settings": self.status.settings, "camera_clock": camera.clock(),
            "model": camera.model, "serial": camera.serial,
            "download_s": round(placed - completed, 4),
            "journal_s": round(time.time() - completed, 4),
        })  # fmt: skip
        log.info("capture: frame %d -> %s (%d bytes)", frame, final.name, size)
        self._lost_since, self._losses = None, 0
        self._update(frame=frame, last_file=final.name)
        if not self.plan.keep_on_card:
            camera.delete(folder, name)
        camera.drain_events()  # a camera with unread events may stall the next capture
        self._check_card(camera)

    def _download(self, camera: Camera, folder: str, name: str, frame: int) -> Path:
        """The camera's file into the watch folder: a hidden temporary name first, then renamed
        to ``PREFIX_NNNN.ext`` (never over an existing file)."""
        ext = Path(name).suffix.lower()
        stem = frame_stem(self._prefix, frame)
        temp = temp_path(self.watch_dir, stem, ext)
        temp.unlink(missing_ok=True)  # ours, from a download a lost camera cut short
        try:
            camera.download(folder, name, temp)
            return place(temp, self.watch_dir, stem, ext)
        except OSError as err:
            temp.unlink(missing_ok=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CaptureError(f"the watch folder's disk is full ({self.watch_dir})") from err
            raise CaptureError(f"cannot write into {self.watch_dir}: {err.strerror}") from err
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _check_disk(self) -> None:
        free = shutil.disk_usage(self.watch_dir).free
        if free < max(MIN_FREE_BYTES, 2 * self._last_bytes):
            raise CaptureError(
                f"the watch folder's disk is full: {_size(free)} free in {self.watch_dir}"
            )

    def _check_card(self, camera: Camera) -> None:
        if self.plan.target != "card" or not self.plan.keep_on_card:
            return  # frames do not stay on the card
        free, images = camera.free_space()
        if images == 0 or (free is not None and free < 2 * self._last_bytes):
            raise CaptureError(f"the camera's card is full ({_size(free)} free)")

    def _reconnect(self, reason: str) -> bool:
        """Find the camera again (model and serial) after ``reason``; False when stopped.
        The backoff grows and the ``reconnect_s`` budget runs from the first failure of the
        frame being taken, across reconnects that do not cure it (a camera that answers but
        cannot shoot); a frame in the watch folder resets both."""
        log.warning("capture: %s; finding the camera again", reason)
        self._write_journal({"event": "lost", "frame": self.status.frame + 1, "reason": reason})
        if self._camera is not None:
            self._camera.close()
            self._camera = None
        if self._lost_since is None:
            self._lost_since = time.monotonic()
        deadline = self._lost_since + self.reconnect_s
        while not self._stop.is_set():
            if time.monotonic() > deadline:
                took = f"{self.reconnect_s:g} s"
                raise CaptureError(f"the camera did not recover in {took}: {reason}")
            wait = self.backoff_s[min(self._losses, len(self.backoff_s) - 1)]
            self._losses += 1
            self._update(
                state="reconnecting", connected=False, reason=reason, exposure_ends=None,
                next_start=time.time() + wait,
            )  # fmt: skip
            if self._stop.wait(wait):
                return False
            try:
                self._connect()
            except CameraLost as err:
                reason = err.reason
                continue
            log.info("capture: the camera is back (attempt %d)", self._losses)
            self._write_journal({"event": "reconnected", "attempt": self._losses})
            self._update(reconnects=self.status.reconnects + 1, reason=None)
            return True
        return False

    def _write_journal(self, line: dict[str, Any]) -> None:
        append_line(self.journal, {"at": _iso(time.time()), **line})


def _is_raw(choice: str) -> bool:
    """'RAW', 'NEF (Raw)', 'RAW 2' are RAW; 'RAW + Large Fine JPEG' is not (two files)."""
    low = choice.lower()
    return ("raw" in low or low.startswith(("nef", "cr2", "cr3", "arw", "orf", "raf"))) and (
        "+" not in low and "jpeg" not in low
    )


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f} MiB"
