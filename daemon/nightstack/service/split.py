"""When a session splits itself: the rules that follow the night (docs/sessions.md).

A night rarely holds one target. The daemon asks a :class:`Splitter` about every frame it hands
to the open session, and a new session starts, with the frame that triggered it as its
reference, when

- the exposure, ISO/gain or filter differs from the session's first frame's (:meth:`before`);
- more than ``split_gap_s`` passed since the last frame ended (capture times from the files,
  else their modification times: a backlog copied in later splits as the live night would);
- the pointing moved: an aligned frame whose centre jumps beyond the move limit from the last
  accepted frame's (the stacker raises :class:`~nightstack.pipeline.stacker.OffTarget`, judged
  in pixels; a slow drift never splits); a frame that fails to align and that a plate solver
  (``locate``) places more than the limit from the reference (degrees);
- without a solver (or one that cannot place the frame): ``split_unaligned_frames`` frames in a
  row fail to align with the reference but align with each other. They are held, not journaled,
  until that is known, then stacked again in the new session, the first as its reference.
  Frames that fail among themselves too (clouds, haze, a dewed lens) are journaled as rejected
  as before, with their own reason; so is a held frame when a frame aligns again or the
  session closes.

Each decision is one line (the daemon logs "closing session ...: new session: <why>" and the new
session's first journal line carries ``split``: ``<why>``). Used by the worker thread only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from nightstack.config import Settings
from nightstack.errors import AlignmentError
from nightstack.frames import FrameMeta, Stars
from nightstack.pipeline.prepare import Prepared
from nightstack.pipeline.records import FrameRecord
from nightstack.pipeline.stacker import OffTarget, quality_limits, reference_flaw
from nightstack.registration.align import align

log = logging.getLogger("nightstack")

MOVE_FIELD_FRACTION = 0.5
"""Without ``split_move_deg``: the pointing moved when the frame's centre jumps more than this
fraction of the frame's short side from the last frame's (a mosaic panel, the next target;
dithering and a re-centred meridian flip stay well inside)."""

LOCATED_MOVE_DEG = 0.5
"""Without ``split_move_deg`` and without a known scale: the move, in degrees, beyond which a
frame that failed to align and that the solver placed is another target."""


class Locate(Protocol):
    """A plate solver as the daemon uses it: the sky position (RA, Dec in degrees) of a prepared
    frame's centre, or None when it cannot tell. May take seconds; called only for a session's
    reference and for frames that fail to align."""

    def __call__(self, prepared: Prepared) -> tuple[float, float] | None: ...


@dataclass
class Verdict:
    """What to do with a frame that raised :class:`OffTarget` (see :meth:`Splitter.off_target`)."""

    split: str | None = None
    """Why a new session starts now (its log and journal reason), or None."""
    requeue: list[Path] = field(default_factory=list)
    """Frames to stack again in the new session, its reference first; empty: the current frame
    starts it (it is stacked there at once)."""
    reject: list[FrameRecord] = field(default_factory=list)
    """Held frames that stay rejected: journal them in the open session."""
    held: bool = False
    """The current frame is held (not journaled yet): it may start a new target."""


@dataclass
class _Held:
    path: Path
    stars: Stars
    record: FrameRecord


@dataclass(frozen=True)
class _Times:
    """When a frame's exposure started and ended (epoch s), and from what: "capture" (the
    file's metadata) or "mtime" (the file's modification time, taken as the end)."""

    source: str
    start: float
    end: float


class Splitter:
    """The split rules of one daemon (see the module docstring)."""

    def __init__(
        self, settings: Settings, locate: Locate | None = None, scale_arcsec: float | None = None
    ) -> None:
        """``scale_arcsec``: the pixel scale ("/px) when known (then ``split_move_deg`` is also
        judged in pixels, and its default is half the field's short side in degrees)."""
        self.settings = settings
        self.locate = locate
        self.scale_arcsec = scale_arcsec
        self.session: str | None = None
        self.pending: str | None = None  # why the next session opens (frames queued again)
        self.first: FrameMeta | None = None  # the session's first frame's settings
        self.last: _Times | None = None
        self.pointing: tuple[float, float] | None = None  # the reference's, when located
        self.owed: str | None = None  # a pause seen on a frame that could not start a session
        self.held: list[_Held] = []
        self._located: tuple[Path, tuple[float, float] | None] | None = None  # the last answer

    @property
    def enabled(self) -> bool:
        return self.settings.split_enabled

    def watch(self, session: str) -> str | None:
        """The frame about to be handed over goes to ``session``; a session not seen before
        starts afresh (frames held for another one were queued again with it). Returns why a new
        session was opened for it (to journal on its first frame), or None."""
        if session == self.session:
            return None
        self.session, self.first, self.last, self.pointing = session, None, None, None
        self.owed = None
        self.held = []
        why, self.pending = self.pending, None
        return why

    def follow_px(self, shape: tuple[int, int]) -> float | None:
        """The stacker's move limit (px) for frames of ``shape`` (None: split off)."""
        if not self.enabled:
            return None
        if self.settings.split_move_deg is not None and self.scale_arcsec:
            return self.settings.split_move_deg * 3600.0 / self.scale_arcsec
        return MOVE_FIELD_FRACTION * min(shape)

    def move_limit_deg(self, shape: tuple[int, int] | None) -> float:
        """The move limit in degrees for located frames."""
        if self.settings.split_move_deg is not None:
            return self.settings.split_move_deg
        if self.scale_arcsec and shape is not None:
            return MOVE_FIELD_FRACTION * min(shape) * self.scale_arcsec / 3600.0
        return LOCATED_MOVE_DEG

    # --- before stacking --------------------------------------------------------------------
    def before(self, item: Prepared) -> str | None:
        """Why ``item`` starts a new session (its settings changed, or a gap), or None; it is
        then the new session's first frame for these rules. Only a frame that could be a
        reference starts one: a stray daylight, cloudy or trailed frame is rejected in the open
        session as before (a pause it follows is owed to the next frame that can, unless a
        later frame's clock runs back before it: a stray frame from another night)."""
        if item.frame is None or not self.enabled:
            return None
        meta = item.frame.meta
        times = _times(item.path, meta)
        changed = _changed(self.first, meta) if self.first is not None else None
        gap = self._gap(self.last, times) if self.last is not None and times else None
        if times is not None:
            last, self.last = self.last, times
            if last is not None and last.source == times.source and times.start < last.start:
                self.owed = None  # the clock ran back: the pause owed was a stray time stamp
        quality = item.quality
        if quality is None or reference_flaw(quality, quality_limits(self.settings)):
            self.owed = self.owed or gap
            return None
        why, self.owed = changed or gap or self.owed, None
        if why is not None or self.first is None:
            self.first = meta
        return why

    def _gap(self, last: _Times, now: _Times) -> str | None:
        limit = self.settings.split_gap_s
        if not limit or last.source != now.source:
            return None
        gap = now.start - last.end
        if gap <= limit:
            return None
        return f"{_duration(gap)} since the last frame (> {_duration(limit)})"

    def locate_reference(self, item: Prepared) -> None:
        """With a solver: place ``item``, a candidate for the session's reference."""
        if self.locate is not None and self.enabled and item.frame is not None:
            self.pointing = self._locate(item)

    # --- a frame off the target -------------------------------------------------------------
    def moved(self, off: OffTarget, shape: tuple[int, int]) -> str:
        """Why an aligned frame that moved ``off.moved_px`` starts a new session."""
        moved = off.moved_px or 0.0
        limit = self.follow_px(shape) or 0.0
        if self.scale_arcsec:
            deg = 3600.0 / self.scale_arcsec
            return f"pointing moved {moved / deg:.2f}° (> {limit / deg:.2f}°)"
        return f"pointing moved {moved:.0f} px (> {limit:.0f} px, half the frame's short side)"

    def off_target(self, item: Prepared, off: OffTarget) -> Verdict:
        """A frame that failed to align with the reference (``off.moved_px`` None) or moved.

        Moved: split at it. With a solver that places it and the reference: split at it when it
        moved beyond the limit, else it is rejected at once (the same field, a bad frame).
        Otherwise it is held: when ``split_unaligned_frames`` held frames in a row align with the
        first of them, split there (they are stacked again); the first held frame of a run
        that does not is rejected."""
        shape = item.frame.shape if item.frame is not None else None
        if off.moved_px is not None and shape is not None:
            return Verdict(split=self.moved(off, shape), reject=self._release())
        where = self._locate(item) if self.locate is not None else None
        if where is not None and self.pointing is not None:
            jump, limit = _separation_deg(self.pointing, where), self.move_limit_deg(shape)
            if jump > limit:
                why = f"pointing moved {jump:.2f}° (> {limit:g}°)"
                run = [*self.held, _Held(item.path, item.stars, off.record)] if item.stars else []
                if len(run) > 1 and self._together(run):  # frames held before the solver
                    self.held = []  # could tell are the new target's first: stacked there
                    return Verdict(split=why, requeue=[h.path for h in run])
                return Verdict(split=why, reject=self._release())
            return Verdict(reject=[*self._release(), off.record])
        if item.stars is None:
            return Verdict(reject=[*self._release(), off.record])
        self.held = [h for h in self.held if h.path != item.path]  # queued again (a recovery)
        self.held.append(_Held(item.path, item.stars, off.record))
        reject: list[FrameRecord] = []
        wanted = self.settings.split_unaligned_frames
        while len(self.held) >= wanted:
            run = self.held[:wanted]
            if self._together(run):
                self.held = []
                why = (f"{wanted} frames in a row do not align with the reference but align "
                       "with each other")  # fmt: skip
                return Verdict(split=why, requeue=[h.path for h in run], reject=reject)
            reject.append(self.held.pop(0).record)
        return Verdict(reject=reject, held=any(h.path == item.path for h in self.held))

    def aligned(self) -> list[FrameRecord]:
        """A frame aligned with the reference: the held run is broken; its frames stay
        rejected (journal them)."""
        return self._release()

    def release(self, session: str) -> list[FrameRecord]:
        """``session`` closes: the frames held for it stay rejected in it (journal them
        first)."""
        return self._release() if session == self.session else []

    def _release(self) -> list[FrameRecord]:
        records = [h.record for h in self.held]
        self.held = []
        return records

    def _together(self, run: list[_Held]) -> bool:
        """Whether every frame of ``run`` aligns with its first."""
        for other in run[1:]:
            try:
                align(
                    other.stars,
                    run[0].stars,
                    model=self.settings.transform_model,
                    min_inliers=self.settings.min_inliers,
                )
            except AlignmentError:
                return False
        return True

    def _locate(self, item: Prepared) -> tuple[float, float] | None:
        """The solver's answer; a solver that fails is a frame it cannot place (logged). The
        last answer is kept: a frame that split is not solved again as the new reference."""
        assert self.locate is not None
        if self._located is not None and self._located[0] == item.path:
            return self._located[1]
        try:
            where = self.locate(item)
        except Exception as err:  # a broken solver must not end the night
            log.warning("cannot locate %s (%s: %s)", item.path.name, type(err).__name__, err)
            where = None
        self._located = (item.path, where)
        return where


def _changed(first: FrameMeta, meta: FrameMeta) -> str | None:
    """Which setting differs from the session's first frame (both known), or None."""
    if first.exposure_s and meta.exposure_s and not _same(first.exposure_s, meta.exposure_s):
        return f"exposure {first.exposure_s:g} s -> {meta.exposure_s:g} s"
    if first.iso and meta.iso and not _same(first.iso, meta.iso):
        return f"ISO/gain {first.iso:g} -> {meta.iso:g}"
    if first.filter and meta.filter and first.filter.casefold() != meta.filter.casefold():
        return f"filter {first.filter} -> {meta.filter}"
    return None


def _same(a: float, b: float) -> bool:
    """Equal but for rounding in the file (1/3 s written as 0.333)."""
    return abs(a - b) <= 0.01 * max(abs(a), abs(b))


def _times(path: Path, meta: FrameMeta) -> _Times | None:
    """When the frame was taken: its capture time (exposure start), else its file's mtime
    (the end of the write, about the end of the exposure); None if neither can be read."""
    exposure = meta.exposure_s or 0.0
    if meta.capture_time is not None:
        start = meta.capture_time.timestamp()
        return _Times("capture", start, start + exposure)
    try:
        end = path.stat().st_mtime
    except OSError:
        return None
    return _Times("mtime", end - exposure, end)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _separation_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (RA, Dec) positions, degrees (haversine)."""
    ra1, dec1, ra2, dec2 = (math.radians(v) for v in (*a, *b))
    h = math.sin((dec2 - dec1) / 2) ** 2
    h += math.cos(dec1) * math.cos(dec2) * math.sin((ra2 - ra1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h))))
