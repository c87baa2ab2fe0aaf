"""One journal / report line per frame (:class:`FrameRecord`) and the counts a session or a
batch run keeps from them (:class:`Tally`)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FrameRecord:
    """One journal / ``--report`` line. ``transform`` is the 2x3 frame->reference matrix."""

    file: str
    status: str  # "accepted" or "rejected"
    reason: str | None = None
    reference: bool = False
    transform: list[list[float]] | None = None
    stars: int | None = None
    fwhm: float | None = None
    residual_px: float | None = None
    elongation: float | None = None
    background: float | None = None
    transparency: float | None = None
    normalization: dict[str, Any] | None = None
    weight: float | None = None  # in the combine, with ``weights`` set (else all frames 1)
    stored: bool | None = None
    warning: str | None = None
    sha256: str | None = None
    exposure_s: float | None = None
    capture_time: str | None = None
    calibration: dict[str, Any] | None = None
    split: str | None = None  # the first frame of a session that split itself: why
    ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """One line of JSON. A file name that is not valid UTF-8 (a card written elsewhere)
        keeps its undecodable bytes as ``\\udcXX`` escapes, so the line is always valid UTF-8
        and reads back to the same ``str`` (``os.fsencode`` of it gives the original bytes)."""
        data = {k: finite(v) for k, v in asdict(self).items()}
        text = json.dumps(data, ensure_ascii=False)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrameRecord:
        """A record from a parsed journal line (fields it does not know are ignored)."""
        return cls(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})


_RECORD_FIELDS = frozenset(FrameRecord.__dataclass_fields__)


@dataclass
class Tally:
    """A session's (or a batch run's) counts, from its records in journal order."""

    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by :func:`reason_kind`
    lost: dict[str, dict[str, str]] = field(default_factory=dict)
    """Frames whose stored data a damaged session lost, by content hash: {file, reason}; one
    stacked again later (its raw still in the watch folder) leaves this."""
    exposure_s: float = 0.0
    first_time: str | None = None  # ISO capture times of the first and last frame
    last_time: str | None = None

    def count(self, record: FrameRecord) -> None:
        """Add one finished record. A ``"lost"`` record (written by a salvage) takes back an
        earlier accepted frame whose stored data was lost."""
        if record.status == "lost":
            self.accepted -= 1
            self.exposure_s -= record.exposure_s or 0.0
            self.lost[record.sha256 or record.file] = {
                "file": record.file,
                "reason": record.reason or "lost",
            }
            return
        if record.status == "accepted":
            self.lost.pop(record.sha256 or record.file, None)
            self.accepted += 1
            self.exposure_s += record.exposure_s or 0.0
            if record.capture_time is not None:
                when = record.capture_time
                self.first_time = min(self.first_time or when, when)
                self.last_time = max(self.last_time or when, when)
        else:
            key = reason_kind(record.reason or "rejected")
            self.rejected[key] = self.rejected.get(key, 0) + 1

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def reason_kind(reason: str) -> str:
    """The kind of a rejection, for tallies: its words before any number, ':' or '('.

    "too few stars (4 < 15)" -> "too few stars"; "FWHM 5.1 px > ..." -> "FWHM";
    "trailed: elongation 2.3 > 1.6" -> "trailed".
    """
    kind = re.split(r"[:(\d]", reason, maxsplit=1)[0].strip(" ,;")
    return kind or reason


def finite(value: Any) -> Any:
    """NaN is not JSON: report it as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
