"""What a capture sequence is asked to do (:class:`Plan`) and where it is (:class:`CaptureStatus`).

Plain values, no libgphoto2: the daemon and the web page import this module only, and read a
status the capture thread replaces whole at each step (never mutated in place).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Target = Literal["ram", "card"]
State = Literal[
    "starting", "waiting", "exposing", "downloading", "paused", "reconnecting", "done",
    "stopped", "failed",
]  # fmt: skip

FINISHED: frozenset[str] = frozenset({"done", "stopped", "failed"})
"""States after which the sequence's thread has ended."""


@dataclass(frozen=True)
class Plan:
    """A sequence: ``count`` frames (0 = until stopped) of ``exposure_s`` seconds, an exposure
    starting every ``interval_s`` seconds at most (start to start; a frame that takes longer is
    followed at once), the first after ``delay_s``. ``iso`` None keeps the camera's; ``raw``
    sets the camera's RAW format; ``target``: where the camera keeps a frame until it is
    downloaded; ``keep_on_card``: leave the file on the card after the download. ``model`` and
    ``serial`` choose the camera (None: the first found)."""

    exposure_s: float
    count: int = 0
    iso: int | None = None
    interval_s: float = 0.0
    delay_s: float = 0.0
    raw: bool = True
    target: Target = "ram"
    keep_on_card: bool = False
    model: str | None = None
    serial: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exposure_s) and 0 < self.exposure_s <= 3600):
            raise ValueError(f"exposure: 0 to 3600 s, not {self.exposure_s:g}")
        if self.count < 0:
            raise ValueError(f"count: 0 (until stopped) or more, not {self.count}")
        if self.iso is not None and not 1 <= self.iso <= 10_000_000:
            raise ValueError(f"ISO: a positive number, not {self.iso}")
        for name in ("interval_s", "delay_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 86_400):
                raise ValueError(f"{name[:-2]}: 0 to 86400 s, not {value:g}")

    def with_changes(self, **changes: Any) -> Plan:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class CaptureStatus:
    """Where the sequence is. ``frame``: frames downloaded so far; ``exposure_ends`` and
    ``next_start``: wall-clock times (Unix seconds) of the current exposure's end and the next
    exposure's start, None when none is due; ``camera``: the camera's report (model, serial,
    battery, free space, lens, settings) as JSON, None before the first connection;
    ``reason``: why it is reconnecting, stopped or failed; ``last_file``: the last frame's name
    in the watch folder."""

    state: State = "starting"
    frame: int = 0
    count: int = 0
    exposure_s: float = 0.0
    exposure_ends: float | None = None
    next_start: float | None = None
    connected: bool = False
    camera: dict[str, Any] | None = None
    reason: str | None = None
    last_file: str | None = None
    reconnects: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
