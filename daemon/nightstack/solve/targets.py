"""What is in a solved field, and what to call it: Messier, NGC and IC objects from OpenNGC.

The catalogue is OpenNGC (Mattia Verga, CC-BY-SA-4.0: https://github.com/mattiaverga/OpenNGC),
as the PyPI package ``pyongc`` ships it (its ``ongc.db``, read here with sqlite3: 14,000
objects, positions, types, sizes, magnitudes, Messier numbers). Without the package no object
is named and a field is named by its coordinates.

A field's name (:func:`target_name`): the Messier object nearest the centre, else the nearest
bright or large NGC/IC object (:data:`BRIGHT_MAG`, :data:`LARGE_ARCMIN`), else any NGC/IC object
in the central half, else the centre's coordinates ("RA 19h59m Dec +22°43'").
"""

from __future__ import annotations

import logging
import math
import sqlite3
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from nightstack.solve.solver import Solution

log = logging.getLogger("nightstack.solve")

KINDS = {
    "G": "galaxy", "GPair": "galaxy pair", "GTrpl": "galaxy triplet", "GGroup": "galaxy group",
    "PN": "planetary nebula", "OCl": "open cluster", "GCl": "globular cluster",
    "Cl+N": "cluster with nebula", "EmN": "emission nebula", "RfN": "reflection nebula",
    "HII": "HII region", "Neb": "nebula", "DrkN": "dark nebula", "SNR": "supernova remnant",
    "*Ass": "star cloud", "Nova": "nova",
}  # fmt: skip
"""OpenNGC's object types that are named (stars, duplicates and non-existent entries are not)."""

BRIGHT_MAG = 13.0
LARGE_ARCMIN = 3.0
MAX_OBJECTS = 50
"""At most this many objects are listed for a field (Messier first, then by brightness)."""


@dataclass(frozen=True)
class Catalogue:
    """OpenNGC's named objects as arrays (degrees, arcminutes, magnitudes; NaN when unknown)."""

    names: list[str]
    kinds: list[str]
    messier: np.ndarray  # bool
    ra: np.ndarray
    dec: np.ndarray
    size_arcmin: np.ndarray
    mag: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class FieldObject:
    """A catalogued object in a frame: full-resolution 0-based pixel centre, radius in px."""

    name: str
    kind: str
    x: float
    y: float
    radius_px: float
    messier: bool
    mag: float
    distance: float  # from the frame's centre, in half-diagonals (0 centre, 1 corner)

    def entry(self) -> dict[str, object]:
        """The object as session.json lists it."""
        return {"name": self.name, "kind": self.kind, "x": round(self.x, 1),
                "y": round(self.y, 1), "radius_px": round(self.radius_px, 1)}  # fmt: skip


@cache
def catalogue() -> Catalogue | None:
    """OpenNGC from ``pyongc``'s database, or None without the package (said once)."""
    try:
        source = resources.files("pyongc") / "ongc.db"
        with resources.as_file(source) as path:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = db.execute(
                    "SELECT name, type, ra, dec, majax, vmag, bmag, messier FROM objects "
                    "WHERE ra IS NOT NULL AND dec IS NOT NULL"
                ).fetchall()
            finally:
                db.close()
    except (ModuleNotFoundError, FileNotFoundError, sqlite3.Error) as err:
        log.warning("no catalogue of objects (pyongc: %s): fields are named by coordinates", err)
        return None
    rows = [r for r in rows if r[1] in KINDS]

    def number(value: object) -> float:
        return float(value) if isinstance(value, int | float) else math.nan

    return Catalogue(
        names=[_name(r[0], r[7]) for r in rows],
        kinds=[KINDS[r[1]] for r in rows],
        messier=np.array([bool(r[7]) for r in rows]),
        ra=np.degrees([r[2] for r in rows]),
        dec=np.degrees([r[3] for r in rows]),
        size_arcmin=np.array([number(r[4]) for r in rows]),
        mag=np.array([number(r[5]) if r[5] is not None else number(r[6]) for r in rows]),
    )


def _name(name: str, messier: str | None) -> str:
    """'M27' for a Messier object, else 'NGC 6853' / 'IC 4715' (leading zeros dropped)."""
    if messier:
        return f"M{int(messier)}"
    for prefix in ("NGC", "IC"):
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            digits = rest.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
            return f"{prefix} {int(digits)}{rest[len(digits) :]}" if digits.isdigit() else name
    return name


def objects_in_field(solution: Solution) -> list[FieldObject]:
    """The catalogued objects whose centre falls in the solved frame, Messier first, then by
    brightness, at most :data:`MAX_OBJECTS`."""
    cat = catalogue()
    if cat is None:
        return []
    rows, cols = solution.shape
    half_diag = math.hypot(solution.field_w_deg, solution.field_h_deg) / 2
    near = np.flatnonzero(
        _separation(solution.ra_deg, solution.dec_deg, cat.ra, cat.dec) < half_diag * 1.1
    )
    if not len(near):
        return []
    x, y = solution.pixel(cat.ra[near], cat.dec[near])
    cx, cy = (cols - 1) / 2, (rows - 1) / 2
    found = []
    for i, xi, yi in zip(near, np.atleast_1d(x), np.atleast_1d(y), strict=True):
        if not (0 <= xi < cols and 0 <= yi < rows):
            continue
        size = cat.size_arcmin[i]
        radius = 30.0 * size / solution.scale_arcsec if np.isfinite(size) else 0.0
        found.append(FieldObject(
            cat.names[i], cat.kinds[i], float(xi), float(yi), float(radius),
            bool(cat.messier[i]), float(cat.mag[i]),
            math.hypot(xi - cx, yi - cy) / math.hypot(cx, cy),
        ))  # fmt: skip
    found.sort(key=lambda o: (not o.messier, o.mag if math.isfinite(o.mag) else 99.0))
    return found[:MAX_OBJECTS]


def target_name(solution: Solution, objects: list[FieldObject]) -> str:
    """The field's name (see the module docstring)."""
    tiers = (
        [o for o in objects if o.messier],
        [o for o in objects if o.mag <= BRIGHT_MAG or o.radius_px * solution.scale_arcsec / 30.0
         >= LARGE_ARCMIN],
        [o for o in objects if o.distance <= 0.5],
    )  # fmt: skip
    for tier in tiers:
        if tier:
            return min(tier, key=lambda o: o.distance).name
    return coordinates_name(solution.ra_deg, solution.dec_deg)


def coordinates_name(ra_deg: float, dec_deg: float) -> str:
    """'RA 19h59m Dec +22°43'' (minutes truncated, as a chart shows them)."""
    minutes = int(round((ra_deg % 360.0) / 15.0 * 60.0, 6)) % (24 * 60)
    arcmin = int(round(abs(dec_deg) * 60.0, 6))
    sign = "-" if dec_deg < 0 else "+"
    dec = f"{sign}{arcmin // 60:02d}°{arcmin % 60:02d}'"
    return f"RA {minutes // 60:02d}h{minutes % 60:02d}m Dec {dec}"


def _separation(ra0: float, dec0: float, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Angles (degrees) from one position to many."""
    r0, d0 = math.radians(ra0), math.radians(dec0)
    r, d = np.radians(ra), np.radians(dec)
    c = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(r - r0)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))
