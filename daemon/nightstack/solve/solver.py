"""Plate solving from our own star detections: astrometry.net's ``solve-field`` fed a star list.

Why the Debian binary and not the PyPI ``astrometry`` wrapper: fed the same detections and the
same Debian index files, ``solve-field`` solved the M27 frame (1304 x 976, 301 stars) in 1.9 s
with a scale hint and 20 s blind; the wrapper, with its default parameters, had not solved it
after 10 minutes. The binary also runs as a child process: a solve that hangs is killed at
``solve_timeout_s`` and cannot take the daemon's memory with it.

The star list (x, y, flux in full-resolution pixels, 0-based) is written as an ``xylist`` (a
FITS table, 1-based pixels); no image is read. With a hint (scale from the settings or the
header's focal length and pixel size, position from its RA/DEC) the solve is limited to it;
when a hinted solve fails, a blind one follows within the same time limit. A wide field
(over :data:`WIDE_FIELD_DEG`) is solved on its central half only (lens distortion); the WCS is
moved back to the whole frame's pixel grid.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits

from nightstack.config import Settings
from nightstack.frames import Stars

if TYPE_CHECKING:
    from astropy.wcs import WCS

log = logging.getLogger("nightstack.solve")

INDEX_DIRS = (Path("/usr/share/astrometry"), Path("/usr/local/astrometry/data"))
"""Where the index files are looked for when ``solve_index_dir`` is unset."""

WIDE_FIELD_DEG = 10.0
"""A field wider than this is solved on its central half (lens distortion at the edges)."""

MIN_STARS = 8
"""Fewer detections are not worth a solve."""

MAX_STARS = 300
"""The brightest this many detections are handed to the solver."""

HINT_SPREAD = 0.15
"""A scale hint is used as +-15 %: nominal focal lengths and pixel sizes are rough."""

WCS_KEYS = re.compile(
    r"\A(WCSAXES|CTYPE[12]|CUNIT[12]|CRVAL[12]|CRPIX[12]|CD[12]_[12]|EQUINOX|RADESYS|LONPOLE|"
    r"LATPOLE|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_\d_\d|B_\d_\d|AP_\d_\d|BP_\d_\d)\Z"
)
"""The cards of a solve's WCS kept for the outputs (TAN, and SIP when the solver fits it)."""


@dataclass(frozen=True)
class Hint:
    """What is known before a solve: a scale range (arcsec per pixel) and/or a position."""

    scale_low: float | None = None
    scale_high: float | None = None
    ra_deg: float | None = None
    dec_deg: float | None = None
    radius_deg: float = 5.0

    @classmethod
    def around(cls, scale: float, **position: Any) -> Hint:
        """A hint of ``scale`` arcsec/px +- :data:`HINT_SPREAD`."""
        return cls(scale * (1 - HINT_SPREAD), scale * (1 + HINT_SPREAD), **position)


@dataclass(frozen=True)
class Solution:
    """Where a frame points. Pixel coordinates are the frame's full-resolution (x, y), 0-based;
    ``wcs_header`` holds FITS cards (1-based CRPIX, as FITS wants): TAN, plus SIP when fitted.
    ``rotation_deg``: the position angle of the image's up (row 0's side), east of north."""

    ra_deg: float
    dec_deg: float
    scale_arcsec: float
    rotation_deg: float
    field_w_deg: float
    field_h_deg: float
    seconds: float
    wcs_header: dict[str, Any]
    stars_matched: int
    shape: tuple[int, int]

    @property
    def wcs(self) -> WCS:
        from astropy.wcs import WCS  # 30 MB a daemon without a solve never needs

        return WCS(fits.Header(self.wcs_header))

    def pixel(self, ra_deg: Any, dec_deg: Any) -> tuple[np.ndarray, np.ndarray]:
        """0-based (x, y) of sky positions (degrees)."""
        x, y = self.wcs.all_world2pix(np.asarray(ra_deg), np.asarray(dec_deg), 0)
        return np.asarray(x), np.asarray(y)

    def sky(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """(RA, Dec) in degrees of 0-based pixel positions."""
        ra, dec = self.wcs.all_pix2world(np.asarray(x), np.asarray(y), 0)
        return np.asarray(ra), np.asarray(dec)


def index_dir(settings: Settings) -> Path | None:
    """The folder holding index files, or None."""
    folders = [settings.solve_index_dir] if settings.solve_index_dir else list(INDEX_DIRS)
    for folder in folders:
        if folder is not None and folder.is_dir() and any(folder.glob("index-*.fits")):
            return folder
    return None


class Solver:
    """``solve-field`` on star lists. ``available`` says whether it can run; ``reason`` why
    not (no binary, no index files, switched off)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.binary = shutil.which("solve-field")
        self.index_dir = index_dir(settings)
        self.reason: str | None = None
        if settings.solve_enabled is False:
            self.reason = "plate solving switched off (solve_enabled = false)"
        elif self.binary is None:
            self.reason = "astrometry.net's solve-field not found (deploy/install.sh --solver)"
        elif self.index_dir is None:
            where = settings.solve_index_dir or " or ".join(str(d) for d in INDEX_DIRS)
            self.reason = f"no astrometry.net index files (index-*.fits) in {where}"

    @property
    def available(self) -> bool:
        return self.reason is None

    def solve_stars(
        self,
        stars: Stars,
        shape: tuple[int, int],
        hint: Hint | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Solution | None:
        """:meth:`solve` on our own detections (their positions and fluxes)."""
        table = np.column_stack([stars.xy, stars.flux]) if len(stars) else np.empty((0, 3))
        return self.solve(table, shape, hint, timeout_s=timeout_s)

    def solve(
        self,
        stars_xy_flux: np.ndarray,
        shape: tuple[int, int],
        hint: Hint | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Solution | None:
        """Solve a frame of ``shape`` (rows, cols) from its stars ((N, 3): x, y, flux in
        full-resolution 0-based pixels); None when it does not solve (a log line says why)."""
        if not self.available:
            return None
        start = time.perf_counter()
        limit = timeout_s if timeout_s is not None else self.settings.solve_timeout_s
        stars = np.asarray(stars_xy_flux, dtype=np.float64).reshape(-1, 3)
        stars = stars[np.all(np.isfinite(stars), axis=1)]
        if len(stars) < MIN_STARS:
            log.info("plate solve skipped: %d stars (at least %d needed)", len(stars), MIN_STARS)
            return None
        rows, cols = shape
        offset, size = (0.0, 0.0), (cols, rows)
        field = _field_deg(hint, cols)
        if field is not None and field > WIDE_FIELD_DEG:  # the central half: less distortion
            x0, y0 = cols / 4, rows / 4
            inside = (np.abs(stars[:, 0] - (cols - 1) / 2) < cols / 4) & (
                np.abs(stars[:, 1] - (rows - 1) / 2) < rows / 4
            )
            if inside.sum() >= 2 * MIN_STARS:
                stars = stars[inside] - [x0, y0, 0.0]
                offset, size = (x0, y0), (cols - 2 * int(x0), rows - 2 * int(y0))
        stars = stars[np.argsort(-stars[:, 2])][:MAX_STARS]
        tries: list[Hint | None] = [hint] if hint is not None else []
        tries.append(None)  # blind: the hint may be wrong (a header's nominal focal length)
        for attempt in tries:
            left = limit - (time.perf_counter() - start)
            if left <= 1:
                break
            found = self._run(stars, size, attempt, left)
            if found is not None:
                header, matched = found
                header = _shifted(header, offset)
                return _solution(header, shape, matched, time.perf_counter() - start)
        log.info("plate solve: no solution (%d stars, %.1f s)", len(stars),
                 time.perf_counter() - start)  # fmt: skip
        return None

    def _run(
        self, stars: np.ndarray, size: tuple[float, int], hint: Hint | None, timeout_s: float
    ) -> tuple[dict[str, Any], int] | None:
        """One ``solve-field`` run; (WCS cards, stars matched) or None."""
        assert self.binary is not None and self.index_dir is not None
        with tempfile.TemporaryDirectory(prefix="nightstack-solve-") as tmp:
            work = Path(tmp)
            table = fits.BinTableHDU.from_columns(
                [
                    fits.Column("X", "D", array=stars[:, 0] + 1.0),  # FITS pixels are 1-based
                    fits.Column("Y", "D", array=stars[:, 1] + 1.0),
                    fits.Column("FLUX", "D", array=stars[:, 2]),
                ]
            )
            fits.HDUList([fits.PrimaryHDU(), table]).writeto(work / "stars.xy")
            (work / "astrometry.cfg").write_text(
                f"add_path {self.index_dir}\nautoindex\n", encoding="utf-8"
            )
            command = [
                self.binary, "--config", str(work / "astrometry.cfg"), "--dir", str(work),
                "--no-plots", "--no-verify", "--overwrite", "--no-remove-lines",
                "--width", str(int(size[0])), "--height", str(int(size[1])),
                "--x-column", "X", "--y-column", "Y", "--sort-column", "FLUX",
                "--crpix-center", "--cpulimit", str(max(1, int(timeout_s))),
                "--new-fits", "none", "--rdls", "none", "--index-xyls", "none",
                "--match", "none", "--solved", "solved", "--corr", "corr.fits",
                "--wcs", "solution.wcs",
            ]  # fmt: skip
            if hint is not None and hint.scale_low is not None and hint.scale_high is not None:
                command += ["--scale-units", "arcsecperpix", "--scale-low", f"{hint.scale_low:g}",
                            "--scale-high", f"{hint.scale_high:g}"]  # fmt: skip
            if hint is not None and hint.ra_deg is not None and hint.dec_deg is not None:
                command += ["--ra", f"{hint.ra_deg:.6f}", "--dec", f"{hint.dec_deg:.6f}",
                            "--radius", f"{hint.radius_deg:g}"]  # fmt: skip
            command.append(str(work / "stars.xy"))
            # its own process group: solve-field runs astrometry-engine through a shell, and a
            # timeout must end them all (a killed solve-field alone left the engine running to
            # its CPU limit, and a pipe to it kept the caller waiting: 77 s for a 30 s limit)
            proc = subprocess.Popen(
                command, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                proc.wait(timeout=timeout_s + 5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                log.info("plate solve: solve-field gave no answer in %.0f s", timeout_s)
                return None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # nothing of it outlives the call
            if not (work / "solution.wcs").exists():
                return None
            raw = fits.getheader(work / "solution.wcs")
            header = {k: raw[k] for k in raw if WCS_KEYS.match(k)}
            try:
                matched = len(fits.getdata(work / "corr.fits", 1))
            except (OSError, IndexError, TypeError):
                matched = 0
            return header, matched


def _field_deg(hint: Hint | None, cols: int) -> float | None:
    if hint is None or hint.scale_high is None:
        return None
    return cols * hint.scale_high / 3600.0


def _shifted(header: dict[str, Any], offset: tuple[float, float]) -> dict[str, Any]:
    """A WCS of a crop starting at ``offset`` (x, y) moved to the whole frame's pixels."""
    moved = dict(header)
    moved["CRPIX1"] = float(header["CRPIX1"]) + offset[0]
    moved["CRPIX2"] = float(header["CRPIX2"]) + offset[1]
    return moved


def _solution(
    header: dict[str, Any], shape: tuple[int, int], matched: int, seconds: float
) -> Solution:
    """Centre, scale, rotation and field of a WCS on a frame of ``shape``."""
    from astropy.wcs import WCS

    rows, cols = shape
    wcs = WCS(fits.Header(header))
    cx, cy = (cols - 1) / 2, (rows - 1) / 2
    (ra, dec), (ra_up, dec_up) = wcs.all_pix2world([[cx, cy], [cx, cy - 10.0]], 0)
    scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
    rotation = _position_angle(ra, dec, ra_up, dec_up)
    return Solution(
        ra_deg=float(ra) % 360.0,
        dec_deg=float(dec),
        scale_arcsec=scale,
        rotation_deg=rotation,
        field_w_deg=cols * scale / 3600.0,
        field_h_deg=rows * scale / 3600.0,
        seconds=round(seconds, 2),
        wcs_header=header,
        stars_matched=matched,
        shape=(rows, cols),
    )


def _position_angle(ra0: float, dec0: float, ra1: float, dec1: float) -> float:
    """The position angle (degrees east of north, 0..360) of point 1 seen from point 0."""
    r0, d0, r1, d1 = (math.radians(v) for v in (ra0, dec0, ra1, dec1))
    y = math.sin(r1 - r0) * math.cos(d1)
    x = math.cos(d0) * math.sin(d1) - math.sin(d0) * math.cos(d1) * math.cos(r1 - r0)
    return math.degrees(math.atan2(y, x)) % 360.0


def separation_deg(ra0: float, dec0: float, ra1: float, dec1: float) -> float:
    """The angle between two sky positions (degrees)."""
    r0, d0, r1, d1 = (math.radians(v) for v in (ra0, dec0, ra1, dec1))
    c = math.sin(d0) * math.sin(d1) + math.cos(d0) * math.cos(d1) * math.cos(r1 - r0)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def hint_for(path: Path | str | None, settings: Settings, shape: tuple[int, int]) -> Hint | None:
    """The hint for a frame: the scale from ``solve_scale_arcsec``, else the focal length and
    pixel size of the settings or of its FITS header (FOCALLEN, XPIXSZ / PIXSIZE1; with
    XBINNING > 1 the range covers both readings of XPIXSZ, binned or not), and the position
    from the header's RA/DEC (or OBJCTRA/OBJCTDEC); None when nothing is known (blind)."""
    header: fits.Header | None = None
    if path is not None and str(path).lower().endswith((".fit", ".fits", ".fts")):
        try:
            header = fits.getheader(path)
        except (OSError, ValueError):
            header = None
    position = _position(header)
    scale_range = _scale_range(header, settings)
    if scale_range is None and not position:
        return None
    low, high = scale_range or (None, None)
    if high is not None and position:
        position["radius_deg"] = max(2.0, 2.0 * shape[1] * high / 3600.0)
    return Hint(low, high, **position)


def _number(header: fits.Header | None, *keys: str) -> float | None:
    for key in keys:
        value = header.get(key) if header is not None else None
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def _scale_range(header: fits.Header | None, settings: Settings) -> tuple[float, float] | None:
    if settings.solve_scale_arcsec is not None:
        hint = Hint.around(settings.solve_scale_arcsec)
        assert hint.scale_low is not None and hint.scale_high is not None
        return hint.scale_low, hint.scale_high
    focal = settings.solve_focal_mm or _number(header, "FOCALLEN", "FOCAL")
    pixel = settings.solve_pixel_um or _number(header, "XPIXSZ", "PIXSIZE1", "PIXSIZE")
    if focal is None or pixel is None:
        return None
    scale = 206.265 * pixel / focal
    binning = 1.0 if settings.solve_pixel_um else (_number(header, "XBINNING") or 1.0)
    return scale * (1 - HINT_SPREAD), scale * binning * (1 + HINT_SPREAD)


def _position(header: fits.Header | None) -> dict[str, float]:
    """RA/Dec from a header (degrees, or sexagesimal OBJCTRA / OBJCTDEC), else empty."""
    if header is None:
        return {}
    ra, dec = header.get("RA"), header.get("DEC")
    if isinstance(ra, int | float) and isinstance(dec, int | float) and -90 <= dec <= 90:
        return {"ra_deg": float(ra) % 360.0, "dec_deg": float(dec)}
    try:
        h, m, s = (float(v) for v in str(header["OBJCTRA"]).split())
        d, dm, ds = (float(v) for v in str(header["OBJCTDEC"]).replace("+", "").split())
    except (KeyError, ValueError):
        return {}
    sign = -1.0 if str(header["OBJCTDEC"]).strip().startswith("-") else 1.0
    dec_deg = sign * (abs(d) + dm / 60 + ds / 3600)
    return {"ra_deg": 15.0 * (h + m / 60 + s / 3600), "dec_deg": dec_deg}
