"""Test-only: a stand-in for libgphoto2's camera object where the virtual camera cannot go.

libgphoto2's virtual camera has a ``bulb`` setting but no open capture (setting it fails with
an I/O error), and no Canon ``eosremoterelease``: the bulb handshake of
``nightstack.capture.camera.Camera.capture_bulb`` (press, hold, release, wait for the camera's
FILE_ADDED) cannot run against it. :class:`BulbCamera` answers the few calls that handshake
makes, as python-gphoto2's ``Camera`` does, and records when each setting was written; a
stand-in for a camera we do not have, used only there (tests/test_capture.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gphoto2 as gp


@dataclass
class _Widget:
    value: Any
    choices: tuple[str, ...] = ()

    def get_value(self) -> Any:
        return self.value

    def set_value(self, value: Any) -> None:
        self.value = value

    def count_choices(self) -> int:
        return len(self.choices)

    def get_choice(self, i: int) -> str:
        return self.choices[i]


@dataclass
class _Path:
    folder: str
    name: str


class BulbCamera:
    """``release``: the setting and its press / release values ('bulb' 1/0, or Canon's
    'eosremoterelease' 'Press Full'/'Release Full'); ``readout_s``: the time from the release
    to the camera's FILE_ADDED; ``timed``: its shutter speeds."""

    def __init__(self, release: str, readout_s: float = 0.2, timed: tuple[str, ...] = ()) -> None:
        self.widgets = {
            "shutterspeed": _Widget(timed[-1] if timed else "bulb", (*timed, "Bulb")),
            release: _Widget(0),
        }
        self.readout_s, self.writes = readout_s, []
        self.released_at: float | None = None

    def get_single_config(self, name: str) -> _Widget:
        if name not in self.widgets:
            raise gp.GPhoto2Error(gp.GP_ERROR_BAD_PARAMETERS)  # the camera has no such setting
        return self.widgets[name]

    def set_single_config(self, name: str, widget: _Widget) -> None:
        self.writes.append((time.monotonic(), name, widget.value))
        if widget.value in (0, "Release Full"):
            self.released_at = time.monotonic()

    def wait_for_event(self, timeout_ms: int) -> tuple[int, Any]:
        if self.released_at is not None and time.monotonic() >= self.released_at + self.readout_s:
            self.released_at = None
            return gp.GP_EVENT_FILE_ADDED, _Path("/store_00010001/DCIM/100CANON", "IMG_0001.CR3")
        time.sleep(min(timeout_ms, 50) / 1000)
        return gp.GP_EVENT_TIMEOUT, None

    def exit(self) -> None:
        pass
