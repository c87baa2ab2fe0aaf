"""A session's plate solves, on their own thread: the reference once, then one accepted frame
every ``solve_every_s`` (where the mount points now). Never on the frame path: a frame only
hands over its stars; the solve child runs beside the stacking.

The reference's solve goes to the stack's header (``Stacker.solved``: the WCS, OBJECT, RA, DEC
of live.fits and stack.fits) and to session.json (``solve`` and ``target``, written by the
session's ``on_solved``); a later frame's solve to the log and to session.json's ``pointing``
(its centre and how far it is from the reference's).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nightstack.config import Settings
from nightstack.frames import Stars
from nightstack.pipeline.prepare import Prepared
from nightstack.solve.solver import Hint, Solver, separation_deg
from nightstack.solve.wcs import SolvedField, solve_stars

log = logging.getLogger("nightstack.service.session")

LOCATE_TIMEOUT_S = 15.0
"""The longest a frame that failed to align is solved for on the worker (the split rules): with
the reference's scale as the hint a real frame solves in 1-2 s; clouds give up sooner (too few
stars) or here."""

LOCATE_SCALE_TOLERANCE = 0.05
"""The hint for such a frame: the reference's solved scale, within this fraction."""


class Solving:
    """The plate solves of one session (see the module docstring). ``on_solved()`` is called
    from the solve thread after each result is kept."""

    def __init__(self, settings: Settings, session: str, on_solved: Callable[[], None]) -> None:
        self.settings = settings
        self.session = session
        self.on_solved = on_solved
        self.solver = Solver(settings)
        self.reference: SolvedField | None = None
        self.pointing: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._last = -float("inf")
        if settings.solve_enabled is True and not self.solver.available:
            log.warning("session %s: no plate solving: %s", session, self.solver.reason)

    @property
    def available(self) -> bool:
        return self.solver.available

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def solve_reference(self, path: Path | str, stars: Stars, shape: tuple[int, int],
                        done: Callable[[SolvedField], None]) -> None:  # fmt: skip
        """Solve the reference in the background; ``done(field)`` when it solves."""
        self._start(path, stars, shape, lambda found: self._reference_solved(path, found, done))

    def frame_due(self) -> bool:
        """Whether an accepted frame should be solved now (``solve_every_s``)."""
        every = self.settings.solve_every_s
        return (
            self.available and every > 0 and self.reference is not None and not self.busy
            and time.monotonic() - self._last >= every
        )  # fmt: skip

    def solve_frame(self, path: Path | str, stars: Stars, shape: tuple[int, int]) -> None:
        """Solve a later frame in the background: where the mount points now."""
        self._start(path, stars, shape, lambda found: self._frame_solved(path, found))

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for a running solve (a closing session's final gets its WCS)."""
        thread = self._thread
        if thread is not None:
            thread.join(self.settings.solve_timeout_s + 10 if timeout_s is None else timeout_s)

    def _start(self, path: Path | str, stars: Stars, shape: tuple[int, int],
               then: Callable[[SolvedField | None], None]) -> None:  # fmt: skip
        if not self.available or self.busy:
            return
        self._last = time.monotonic()

        def run() -> None:
            try:
                found = solve_stars(self.solver, path, stars, shape)
            except Exception as err:  # a solver fault never stops the session
                log.error("session %s: plate solve of %s failed (%s: %s)", self.session,
                          Path(path).name, type(err).__name__, err)  # fmt: skip
                return
            then(found)

        self._thread = threading.Thread(target=run, name="plate-solve", daemon=True)
        self._thread.start()

    def _reference_solved(self, path: Path | str, found: SolvedField | None,
                          done: Callable[[SolvedField], None]) -> None:  # fmt: skip
        if found is None:
            log.info("session %s: reference %s not solved", self.session, Path(path).name)
            return
        s = found.solution
        log.info(
            "session %s: reference %s solved in %.1f s: %s, RA %.4f Dec %+.4f, %.3f\"/px, "
            "rotation %.1f deg, field %.2f x %.2f deg, %d objects",
            self.session, Path(path).name, s.seconds, found.target, s.ra_deg, s.dec_deg,
            s.scale_arcsec, s.rotation_deg, s.field_w_deg, s.field_h_deg, len(found.objects),
        )  # fmt: skip
        self.reference = found
        done(found)
        self.on_solved()

    def _frame_solved(self, path: Path | str, found: SolvedField | None) -> None:
        ref = self.reference
        if found is None or ref is None:
            log.info("session %s: %s not solved", self.session, Path(path).name)
            return
        s, r = found.solution, ref.solution
        moved = separation_deg(r.ra_deg, r.dec_deg, s.ra_deg, s.dec_deg)
        self.pointing = {
            "file": str(path), "ra_deg": round(s.ra_deg, 6), "dec_deg": round(s.dec_deg, 6),
            "rotation_deg": round(s.rotation_deg, 3), "moved_deg": round(moved, 5),
            "target": found.target, "seconds": s.seconds,
        }  # fmt: skip
        log.info(
            "session %s: %s points at RA %.4f Dec %+.4f (%s), %.3f deg from the reference",
            self.session, Path(path).name, s.ra_deg, s.dec_deg, found.target, moved,
        )  # fmt: skip
        self.on_solved()


class Locator:
    """The split rules' plate solver (:class:`nightstack.service.split.Locate`): the sky position
    of a frame that failed to align, solved at once on the worker thread (a frame that failed
    costs no other frame a wait; bounded by :data:`LOCATE_TIMEOUT_S`), hinted by the open
    session reference's solved scale. None without a solver, before that reference is solved
    (the split then waits for the frames that align with each other) or for a frame without
    stars."""

    def __init__(self, solving: Callable[[], Solving | None]) -> None:
        self.solving = solving  # the open session's solves, or None

    def __call__(self, prepared: Prepared) -> tuple[float, float] | None:
        solving = self.solving()
        ref = solving.reference if solving is not None else None
        if solving is None or ref is None or prepared.stars is None or prepared.frame is None:
            return None
        scale = ref.solution.scale_arcsec
        hint = Hint(scale * (1 - LOCATE_SCALE_TOLERANCE), scale * (1 + LOCATE_SCALE_TOLERANCE))
        rows, cols = prepared.frame.shape[:2]
        found = solving.solver.solve_stars(prepared.stars, (rows, cols), hint,
                                           timeout_s=LOCATE_TIMEOUT_S)  # fmt: skip
        if found is None:
            return None
        log.info("%s located: RA %.4f Dec %+.4f (solved in %.1f s)", prepared.path.name,
                 found.ra_deg, found.dec_deg, found.seconds)  # fmt: skip
        return found.ra_deg, found.dec_deg
