"""A simulated field of real stars: Tycho-2 stars read from astrometry.net's index files, put on
the sensor by a TAN projection at a given centre, scale and rotation, so a rendered frame solves
to a known truth (``nightstack simulate --field RA,DEC,SCALE[,ROT]``).

The stars come from the densest installed ``index-tycho2-*.fits`` (astrometry.net's
``query-starkd``, with their Tycho VT magnitudes): the same catalogue the solver matches
against, so a field solves wherever the index files do. They are planted into an ordinary
:class:`~nightstack.simulate.sky.SkyModel` (``planted_stars``, no random stars), which renders,
drifts and turns them like any night. A star of VT magnitude m gets
``FLUX_MAG12_E * 10 ** (-0.4 (m - 12))`` electrons.

Rotation: the position angle of the image's up (row 0's side), east of north, as
``solve.solver.Solution.rotation_deg`` reports it; the image is not mirrored (east is left of
north when north is up).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from nightstack.arrays import FloatArray
from nightstack.solve.solver import INDEX_DIRS

FLUX_MAG12_E = 4000.0
"""Electrons of a VT = 12 star (about the faintest Tycho-2 star: a peak S/N near 10 on the
default sky and seeing)."""


def densest_index(index_dir: Path | None = None) -> Path | None:
    """The installed Tycho-2 index file with the most stars (the lowest scale number)."""
    folders = [index_dir] if index_dir is not None else list(INDEX_DIRS)
    found: list[tuple[int, Path]] = []
    for folder in folders:
        for path in folder.glob("index-tycho2-*.fits") if folder.is_dir() else ():
            number = re.search(r"index-tycho2-(\d+)", path.name)
            if number is not None:
                found.append((int(number[1]), path))
    return min(found)[1] if found else None


def catalogue_stars(
    ra_deg: float, dec_deg: float, radius_deg: float, index: Path | None = None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(RA, Dec, VT magnitude) of the catalogue's stars within ``radius_deg`` of a position,
    brightest first. Raises FileNotFoundError without ``query-starkd`` or an index file."""
    index = index or densest_index()
    binary = shutil.which("query-starkd")
    if index is None or binary is None:
        raise FileNotFoundError("no astrometry.net query-starkd or Tycho-2 index files")
    with tempfile.TemporaryDirectory(prefix="nightstack-catalog-") as tmp:
        out = Path(tmp) / "stars.fits"
        subprocess.run(
            [binary, "-T", "-r", f"{ra_deg:.6f}", "-d", f"{dec_deg:.6f}", "-R", f"{radius_deg:g}",
             "-o", str(out), str(index)],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        with fits.open(out) as hdus:
            table = hdus[1].data
            ra = np.array(table["RA"], dtype=np.float64)
            dec = np.array(table["DEC"], dtype=np.float64)
            names = table.columns.names
            mag = np.array(table["MAG_VT"] if "MAG_VT" in names else np.full(len(ra), 11.0),
                           dtype=np.float64)  # fmt: skip
    order = np.argsort(mag)
    return ra[order], dec[order], mag[order]


def field_wcs(
    ra_deg: float,
    dec_deg: float,
    scale_arcsec: float,
    rotation_deg: float,
    width: int,
    height: int,
) -> dict[str, Any]:
    """TAN WCS cards (1-based CRPIX at the frame's centre) of a field centred on (RA, Dec) whose
    up points to position angle ``rotation_deg`` (see the module docstring)."""
    s = scale_arcsec / 3600.0
    t = math.radians(rotation_deg)
    return {
        "WCSAXES": 2, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg",
        "CUNIT2": "deg", "CRVAL1": ra_deg % 360.0, "CRVAL2": dec_deg,
        "CRPIX1": (width + 1) / 2.0, "CRPIX2": (height + 1) / 2.0,
        "CD1_1": -s * math.cos(t), "CD1_2": -s * math.sin(t),
        "CD2_1": s * math.sin(t), "CD2_2": -s * math.cos(t),
    }  # fmt: skip


def planted_stars(
    ra_deg: float,
    dec_deg: float,
    scale_arcsec: float,
    rotation_deg: float,
    width: int,
    height: int,
    *,
    margin_px: float = 64.0,
    index: Path | None = None,
) -> tuple[tuple[float, float, float, float, float, float], ...]:
    """The catalogue's stars in a field (and ``margin_px`` around it: a drifting night keeps
    them) as ``SkyModel.planted_stars``: (x, y, flux_e, 1, 1, 1), 0-based reference pixels."""
    radius = math.hypot(width + 2 * margin_px, height + 2 * margin_px) / 2 * scale_arcsec / 3600
    ra, dec, mag = catalogue_stars(ra_deg, dec_deg, radius * 1.02, index)
    wcs = WCS(fits.Header(field_wcs(ra_deg, dec_deg, scale_arcsec, rotation_deg, width, height)))
    x, y = wcs.all_world2pix(ra, dec, 0)
    inside = (np.abs(x - (width - 1) / 2) < width / 2 + margin_px) & (
        np.abs(y - (height - 1) / 2) < height / 2 + margin_px
    )
    flux = FLUX_MAG12_E * 10.0 ** (-0.4 * (mag - 12.0))
    return tuple(
        (float(xi), float(yi), float(fi), 1.0, 1.0, 1.0)
        for xi, yi, fi in zip(x[inside], y[inside], flux[inside], strict=True)
    )


def wcs_residual(path: Path, *, match_px: float = 3.0) -> tuple[float, int]:
    """How well a FITS's WCS puts the catalogue's stars on the stars in its image: (RMS
    distance in pixels, number matched) between the catalogue's stars projected by the header's
    WCS and the nearest star found in the image (within ``match_px``, 10 px from the edges)."""
    from nightstack.registration.detect import SkyArea, StarFinder

    with fits.open(path) as hdus:
        header = hdus[0].header
        data = np.asarray(hdus[0].data, dtype=np.float32)
    luminance = data.mean(axis=0) if data.ndim == 3 else data
    luminance = np.nan_to_num(luminance, nan=float(np.nanmedian(luminance)))
    finder = StarFinder(fwhm_px=4.0, threshold_sigma=6.0, sigma_clip=3.0,
                        landscape_mask_ratio=1.0, max_stars=2000)  # fmt: skip
    found = finder(luminance, 1, None, SkyArea(1.0, None)).xy
    wcs = WCS(header, naxis=2)
    rows, cols = luminance.shape
    ra, dec = wcs.all_pix2world([(cols - 1) / 2], [(rows - 1) / 2], 0)
    scale = math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))
    cat_ra, cat_dec, _ = catalogue_stars(float(ra[0]), float(dec[0]), math.hypot(rows, cols) / 2
                                         * scale * 1.05)  # fmt: skip
    x, y = wcs.all_world2pix(cat_ra, cat_dec, 0)
    inside = (x > 10) & (x < cols - 10) & (y > 10) & (y < rows - 10)
    projected = np.column_stack([x[inside], y[inside]])
    if not len(projected) or not len(found):
        return math.nan, 0
    nearest = np.linalg.norm(projected[:, None, :] - found[None, :, :], axis=2).min(axis=1)
    matched = nearest[nearest < match_px]
    return (float(np.sqrt(np.mean(matched**2))) if len(matched) else math.nan), len(matched)


def simulate_field(
    outdir: str | os.PathLike[str],
    ra_deg: float,
    dec_deg: float,
    scale_arcsec: float,
    position_angle_deg: float = 0.0,
    **night: Any,
) -> Path:
    """``simulate_night`` of a field of real stars (no random ones, no nebula, no landscape
    unless ``night`` says otherwise): frame 0 is centred on (RA, Dec) at ``scale_arcsec`` with
    its up at ``position_angle_deg`` east of north (the module docstring's rotation); the other
    ``simulate_night`` arguments (``frames``, ``width``, ``height``, ``rotation_deg`` per frame,
    ``name_pattern``, ...) pass through. A night
    of several targets is several calls into one folder, each with its own ``name_pattern``.
    Returns the path of ``truth.json``."""
    from nightstack.simulate.night import simulate_night

    width, height = int(night.pop("width", 1200)), int(night.pop("height", 800))
    options: dict[str, Any] = {"stars": 0, "nebula": False, "landscape_fraction": 0.0, **night}
    stars = planted_stars(ra_deg, dec_deg, scale_arcsec, position_angle_deg, width, height)
    return simulate_night(outdir, width=width, height=height, planted_stars=stars, **options)
