"""A solved reference as the outputs carry it: the FITS cards of a stack (the reference's WCS on
the stack's pixel grid, ``OBJECT``, ``RA``, ``DEC``) and the ``solve`` entry of session.json.

The stack is on the reference's pixel grid (every frame is warped onto it), so its WCS is the
reference's; a drizzled stack is ``scale`` times finer: reference pixel x (0-based) lands at
``scale x + (scale - 1) / 2`` (``stacking.drizzle``), so CRPIX becomes ``scale (CRPIX - 0.5) +
0.5``, CD is divided by ``scale`` and the SIP coefficient of order p + q by ``scale^(p+q-1)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightstack.frames import Stars
from nightstack.solve.solver import Solution, Solver, hint_for
from nightstack.solve.targets import FieldObject, objects_in_field, target_name

_SIP_TERM = re.compile(r"\A(A|B|AP|BP)_(\d)_(\d)\Z")


@dataclass(frozen=True)
class SolvedField:
    """A solved frame with its name and the catalogued objects in it."""

    solution: Solution
    target: str
    objects: list[FieldObject] = field(default_factory=list)

    @classmethod
    def of(cls, solution: Solution) -> SolvedField:
        objects = objects_in_field(solution)
        return cls(solution, target_name(solution, objects), objects)

    def entry(self) -> dict[str, Any]:
        """session.json's ``solve``: centre, scale, rotation, field, solve time, objects (their
        x, y, radius in the reference's full-resolution pixels), and the WCS cards."""
        s = self.solution
        return {
            "ra_deg": round(s.ra_deg, 6),
            "dec_deg": round(s.dec_deg, 6),
            "scale_arcsec": round(s.scale_arcsec, 5),
            "rotation_deg": round(s.rotation_deg, 3),
            "field_w_deg": round(s.field_w_deg, 5),
            "field_h_deg": round(s.field_h_deg, 5),
            "seconds": s.seconds,
            "stars_matched": s.stars_matched,
            "objects": [o.entry() for o in self.objects],
            "wcs": s.wcs_header,
        }

    def cards(self, scale: int = 1) -> dict[str, Any]:
        """FITS cards for a stack on the reference grid (``scale``: a drizzle's output pixels
        per reference pixel)."""
        s = self.solution
        return {
            "OBJECT": self.target,
            "RA": (round(s.ra_deg, 6), "[deg] reference centre (plate solve)"),
            "DEC": (round(s.dec_deg, 6), "[deg] reference centre (plate solve)"),
            **scaled_wcs(s.wcs_header, scale),
        }


def scaled_wcs(header: dict[str, Any], scale: int) -> dict[str, Any]:
    """The WCS cards ``header`` on a grid ``scale`` times finer (see the module docstring)."""
    if scale == 1:
        return dict(header)
    out: dict[str, Any] = {}
    for key, value in header.items():
        term = _SIP_TERM.match(key)
        if key in ("CRPIX1", "CRPIX2"):
            out[key] = scale * (float(value) - 0.5) + 0.5
        elif re.fullmatch(r"CD[12]_[12]", key):
            out[key] = float(value) / scale
        elif term is not None:
            order = int(term[2]) + int(term[3])
            out[key] = float(value) * float(scale) ** (1 - order)
        else:
            out[key] = value
    return out


def from_entry(entry: dict[str, Any], shape: tuple[int, int]) -> SolvedField | None:
    """The :class:`SolvedField` a session.json ``solve`` entry holds (a resumed session), or
    None when it is not one."""
    try:
        solution = Solution(
            ra_deg=float(entry["ra_deg"]), dec_deg=float(entry["dec_deg"]),
            scale_arcsec=float(entry["scale_arcsec"]), rotation_deg=float(entry["rotation_deg"]),
            field_w_deg=float(entry["field_w_deg"]), field_h_deg=float(entry["field_h_deg"]),
            seconds=float(entry["seconds"]), wcs_header=dict(entry["wcs"]),
            stars_matched=int(entry.get("stars_matched", 0)), shape=shape,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None
    return SolvedField.of(solution)


def solve_stars(
    solver: Solver, path: Path | str | None, stars: Stars, shape: tuple[int, int]
) -> SolvedField | None:
    """Solve a frame from its detected stars (hint: the settings and the file's header)."""
    if not solver.available or len(stars) == 0:
        return None
    solution = solver.solve_stars(stars, shape, hint_for(path, solver.settings, shape))
    return SolvedField.of(solution) if solution is not None else None
