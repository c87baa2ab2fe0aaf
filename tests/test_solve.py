"""Plate solving (issue 23) with the real solver and index files: simulated fields of real
Tycho-2 stars solve to their truth, the real frames of ../shared/realdata to their known
pointings, a session's reference is solved in the background into session.json and the FITS
outputs, and the stack's WCS puts catalogue stars on the stars of the stack.

Skips without astrometry.net (``deploy/install.sh --solver``) or without the real frames."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from _daemon import Daemon, journal, wait_for
from nightstack.config import Settings
from nightstack.io.decoder import Decoder, load_kwargs
from nightstack.io.loaders import load
from nightstack.pipeline.prepare import Preparer, star_finder
from nightstack.registration.detect import SkyArea
from nightstack.service.session import Session
from nightstack.simulate.catalog import (
    catalogue_stars,
    densest_index,
    field_wcs,
    simulate_field,
    wcs_residual,
)
from nightstack.solve.solver import Hint, Solver, hint_for, separation_deg
from nightstack.solve.targets import coordinates_name
from nightstack.solve.wcs import SolvedField, scaled_wcs

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
SETTINGS = Settings(solve_enabled=True, landscape_mask_ratio=1.0)
SOLVER = Solver(SETTINGS)
needs_solver = pytest.mark.skipif(not SOLVER.available, reason=str(SOLVER.reason))
needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata not present")

M27 = (299.901596, 22.721081)  # OpenNGC, J2000
M94 = (192.721451, 41.120152)
M16 = (274.700708, -13.807222)  # OpenNGC, J2000


def _stars(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """(x, y, flux) of a frame's detections and its full-resolution shape."""
    frame = load(path, bin=2)
    stars = star_finder(SETTINGS)(frame.luminance, frame.bin, None, SkyArea(1.0, None))
    return np.column_stack([stars.xy, stars.flux]), frame.shape


def _catalogue_night(out: Path, ra: float, dec: float, scale: float, rotation: float,
                     frames: int = 1, width: int = 1600, height: int = 1200) -> Path:  # fmt: skip
    simulate_field(out, ra, dec, scale, rotation, frames=frames, width=width, height=height,
                   drift_px=2.0, rotation_deg=0.0)  # fmt: skip
    return out


@needs_solver
def test_a_simulated_field_of_real_stars_solves_to_its_truth(tmp_path: Path) -> None:
    truth = (299.95, 22.60, 1.6, 75.0)  # beside M27, turned 75 degrees
    night = _catalogue_night(tmp_path / "night", *truth)
    stars, shape = _stars(night / "IMG_0000.DNG")
    solution = SOLVER.solve(stars, shape, Hint.around(1.6))
    assert solution is not None
    error = separation_deg(solution.ra_deg, solution.dec_deg, truth[0], truth[1]) * 3600
    assert error < 5.0, f"centre {error:.2f} arcsec from the truth"
    assert abs(solution.scale_arcsec / truth[2] - 1) < 0.005
    assert abs((solution.rotation_deg - truth[3] + 180) % 360 - 180) < 0.1
    assert solution.field_w_deg == pytest.approx(1600 * 1.6 / 3600, rel=0.005)
    field = SolvedField.of(solution)
    assert field.target == "M27"  # the nearest Messier object in the field
    m27 = next(o for o in field.objects if o.name == "M27")
    x, y = solution.pixel(*M27)
    assert (m27.x, m27.y) == pytest.approx((float(x), float(y)), abs=0.5)
    assert m27.kind == "planetary nebula" and m27.radius_px == pytest.approx(6.7 * 30 / 1.6, 0.01)


@needs_solver
def test_a_wide_field_is_solved_on_its_centre_and_mapped_back_to_the_frame(tmp_path: Path) -> None:
    truth = (83.8, 2.0, 40.0, 200.0)  # Orion, 13.3 x 8.9 degrees: over WIDE_FIELD_DEG
    night = _catalogue_night(tmp_path / "night", *truth, width=1200, height=800)
    stars, shape = _stars(night / "IMG_0000.DNG")
    solution = SOLVER.solve(stars, shape, Hint.around(40.0))
    assert solution is not None
    error = separation_deg(solution.ra_deg, solution.dec_deg, truth[0], truth[1]) * 3600
    assert error < 0.1 * truth[2], f"centre {error:.1f} arcsec from the truth"
    assert abs(solution.scale_arcsec / truth[2] - 1) < 0.005


def test_a_field_with_no_object_is_named_by_its_coordinates() -> None:
    assert coordinates_name(299.93, 22.7107) == "RA 19h59m Dec +22°42'"
    assert coordinates_name(83.82, -5.39) == "RA 05h35m Dec -05°23'"
    assert coordinates_name(359.999, -0.01) == "RA 23h59m Dec -00°00'"


def test_a_drizzled_stack_s_wcs_points_its_pixels_where_the_reference_s_do() -> None:
    header = {
        "WCSAXES": 2, "CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "CRVAL1": 120.0,
        "CRVAL2": 30.0, "CRPIX1": 400.5, "CRPIX2": 300.5, "CD1_1": -4e-4, "CD1_2": 1e-5,
        "CD2_1": 1.2e-5, "CD2_2": -4e-4, "A_ORDER": 2, "A_2_0": 3e-6, "A_1_1": -2e-6,
        "A_0_2": 1e-6, "B_ORDER": 2, "B_2_0": -1e-6, "B_1_1": 2e-6, "B_0_2": 4e-6,
    }  # fmt: skip
    ref, twice = WCS(fits.Header(header)), WCS(fits.Header(scaled_wcs(header, 2)))
    x, y = np.array([0.0, 123.4, 799.0]), np.array([0.0, 456.7, 599.0])
    # reference pixel x (0-based) is drizzle output pixel 2 x + 0.5 (stacking.drizzle)
    expected = np.column_stack(ref.all_pix2world(x, y, 0))
    found = np.column_stack(twice.all_pix2world(2 * x + 0.5, 2 * y + 0.5, 0))
    assert np.abs(found - expected).max() * 3600 < 1e-6


def test_a_hint_comes_from_the_settings_or_the_header(tmp_path: Path) -> None:
    assert hint_for(None, Settings(), (100, 100)) is None  # blind
    hint = hint_for(None, Settings(solve_focal_mm=500, solve_pixel_um=3.76), (100, 100))
    assert hint is not None and hint.scale_low is not None and hint.scale_high is not None
    assert hint.scale_low < 206.265 * 3.76 / 500 < hint.scale_high
    path = tmp_path / "f.fits"
    header = fits.Header({"FOCALLEN": 800.0, "XPIXSZ": 2.9, "XBINNING": 2,
                          "OBJCTRA": "05 35 17.3", "OBJCTDEC": "-05 23 28"})  # fmt: skip
    fits.PrimaryHDU(np.zeros((8, 8), np.uint16), header).writeto(path)
    hint = hint_for(path, Settings(), (600, 600))
    assert hint is not None and hint.scale_low is not None and hint.scale_high is not None
    scale = 206.265 * 2.9 / 800  # binned or not: both inside
    assert hint.scale_low < scale and 2 * scale < hint.scale_high
    assert (hint.ra_deg, hint.dec_deg) == pytest.approx((83.8221, -5.3911), abs=1e-4)


def test_without_a_solver_nothing_is_solved(tmp_path: Path) -> None:
    off = Solver(Settings(solve_enabled=False))
    assert not off.available and "solve_enabled" in str(off.reason)
    empty = Solver(Settings(solve_index_dir=tmp_path))
    assert not empty.available
    assert empty.solve(np.zeros((50, 3)), (100, 100)) is None


@needs_solver
@needs_realdata
@pytest.mark.parametrize(
    ("path", "target", "nominal_scale", "position"),
    [
        ("seq_als_m27_asi224mc/Light_1069.fits", "M27", 206.265 * 3.75 / 510, M27),
        ("seq_seestar_s50_m94/Light_M_94_10.0s_IRCUT_20250326-212046.fit", "M94",
         206.265 * 2.9 / 250, M94),
    ],
)  # fmt: skip
def test_real_frames_solve_to_their_target(
    path: str, target: str, nominal_scale: float, position: tuple[float, float]
) -> None:
    """The truth these frames allow: the named target is in the middle of the field (framed by
    hand, so within a tenth of the field of the centre), the scale within 3 % of the nominal
    focal length and pixel size."""
    frame = REALDATA / path
    stars, shape = _stars(frame)
    solution = SOLVER.solve(stars, shape, hint_for(frame, SETTINGS, shape))
    assert solution is not None
    offset = separation_deg(solution.ra_deg, solution.dec_deg, *position)
    assert offset < 0.1 * max(solution.field_w_deg, solution.field_h_deg)
    assert abs(solution.scale_arcsec / nominal_scale - 1) < 0.03
    assert SolvedField.of(solution).target == target


@needs_solver
@needs_realdata
def test_four_real_wide_fields_solve_to_the_square_their_pointings_make() -> None:
    """tetra3's frames were taken at altitude 40 degrees, azimuths -135, -45, 45 and 135, with a
    11.4 degree field: four pointings on one altitude circle, 90 degrees of azimuth apart. On
    the sky that is a square whose sides d and diagonals D satisfy cos d = sin^2 a and
    cos D = -cos 2a for the same altitude a."""
    centres = {}
    for azimuth in (-135, -45, 45, 135):
        frame = REALDATA / "sky_tetra3_mono" / f"2019-07-29T204726_Alt40_Azi{azimuth}_Try1.tiff"
        stars, shape = _stars(frame)
        solution = SOLVER.solve(stars, shape, Hint.around(11.4 * 3600 / 1024))
        assert solution is not None, frame.name
        assert solution.field_w_deg == pytest.approx(11.4, rel=0.01)
        centres[azimuth] = (solution.ra_deg, solution.dec_deg)
    order = (-135, -45, 45, 135)
    sides = [
        separation_deg(*centres[a], *centres[b])
        for a, b in zip(order, order[1:] + order[:1], strict=True)
    ]
    diagonals = [separation_deg(*centres[-135], *centres[45]),
                 separation_deg(*centres[-45], *centres[135])]  # fmt: skip
    assert max(sides) - min(sides) < 1.0 and abs(diagonals[0] - diagonals[1]) < 1.0
    altitude_sides = math.degrees(math.asin(math.sqrt(math.cos(math.radians(np.mean(sides))))))
    altitude_diagonals = math.degrees(math.acos(-math.cos(math.radians(np.mean(diagonals)))) / 2)
    assert abs(altitude_sides - altitude_diagonals) < 0.5
    assert abs(altitude_sides - 40.0) < 2.0  # refraction and the mount's own pointing error


@needs_solver
def test_a_session_solves_its_reference_in_the_background_into_its_outputs(tmp_path: Path) -> None:
    night = _catalogue_night(tmp_path / "night", 274.72, -13.80, 2.0, 10.0, frames=5,
                             width=1200, height=900)  # fmt: skip
    settings = Settings(solve_enabled=True, solve_scale_arcsec=2.0, landscape_mask_ratio=1.0,
                        output_dir=tmp_path / "out", watch_dir=night,
                        live_fits_every_s=0.0, solve_every_s=0.001)  # fmt: skip
    session = Session.create(tmp_path / "out", settings)
    with Decoder(timeout_s=60, load_kwargs=load_kwargs(settings)) as decoder:
        preparer = Preparer(settings, decoder)
        frames = sorted(night.glob("*.DNG"))
        started = time.monotonic()
        record = session.ingest(preparer.prepare(frames[0], sky=session.sky))
        assert record.status == "accepted", record.reason
        assert time.monotonic() - started < 5.0  # the solve runs beside, never in the frame path
        for frame in frames[1:4]:
            session.ingest(preparer.prepare(frame, sky=session.sky))
        session.solving.wait()
        # solved: the next accepted frame is solved too (solve_every_s), where the mount points
        session.ingest(preparer.prepare(frames[4], sky=session.sky))
        session.solving.wait()
        meta = json.loads((session.dir / "session.json").read_text())
        pointing = meta["pointing"]
        index = [f.name for f in frames].index(Path(pointing["file"]).name)
        assert index >= 1 and pointing["target"] == "M16"
        drifted = index * 2.0 * 2.0 / 3600  # the night drifts 2 px a frame, at 2"/px
        assert pointing["moved_deg"] == pytest.approx(drifted, abs=1 / 3600)
        assert meta["target"] == "M16"
        solve = meta["solve"]
        assert separation_deg(solve["ra_deg"], solve["dec_deg"], 274.72, -13.80) * 3600 < 5.0
        assert solve["scale_arcsec"] == pytest.approx(2.0, rel=0.005)
        assert {"ra_deg", "dec_deg", "scale_arcsec", "rotation_deg", "field_w_deg",
                "field_h_deg", "seconds", "objects"} <= set(solve)  # fmt: skip
        m16 = next(o for o in solve["objects"] if o["name"] == "M16")
        assert set(m16) == {"name", "kind", "x", "y", "radius_px"}
        truth = WCS(fits.Header(field_wcs(274.72, -13.80, 2.0, 10.0, 1200, 900)))
        x, y = truth.all_world2pix([M16[0]], [M16[1]], 0)
        assert (m16["x"], m16["y"]) == pytest.approx((float(x[0]), float(y[0])), abs=1.0)
        session.write_live_fits(session.dir / "live.fits")
        session.abandon()  # as a restart: the solve comes back from session.json
        session = Session.resume(session.dir, settings)
        assert session.stacker.solved is not None and session.stacker.solved.target == "M16"
        assert not session.solving.busy  # not solved again
        outputs = session.close()
    live = fits.getheader(session.dir / "live.fits")
    final = fits.getheader(Path(outputs["fits"]))
    for header in (live, final):
        assert header["OBJECT"] == "M16" and header["CTYPE1"].startswith("RA---TAN")
        assert header["RA"] == pytest.approx(solve["ra_deg"])
    rms, matched = wcs_residual(Path(outputs["fits"]))
    assert matched >= 15 and rms < 0.5, f"catalogue stars {rms:.2f} px rms from the stack's"


@needs_solver
@needs_realdata
def test_the_real_m27_stack_carries_a_wcs_that_puts_catalogue_stars_on_its_stars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nightstack.cli import main

    monkeypatch.setenv("NIGHTSTACK_SOLVE_ENABLED", "true")
    out = tmp_path / "stack.fits"
    status = main(["stack", str(REALDATA / "seq_als_m27_asi224mc"), "-o", str(out)])
    assert status == 0
    header = fits.getheader(out)
    assert header["OBJECT"] == "M27"
    rms, matched = wcs_residual(out)
    assert matched >= 10 and rms < 0.5, f"catalogue stars {rms:.2f} px rms from the stack's"


def test_the_catalogue_reader_needs_the_index_files(tmp_path: Path) -> None:
    assert densest_index(tmp_path) is None
    if densest_index() is None:
        with pytest.raises(FileNotFoundError):
            catalogue_stars(10.0, 10.0, 1.0)
    else:
        ra, dec, mag = catalogue_stars(*M27, 0.3)
        assert len(ra) > 10 and np.all(np.diff(mag) >= 0)
        assert all(separation_deg(*M27, r, d) <= 0.3 for r, d in zip(ra, dec, strict=True))


@needs_solver
def test_a_real_daemon_names_its_session_and_writes_the_wcs_at_close(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    night = _catalogue_night(tmp_path / "night", 83.82, -5.39, 2.0, 300.0, frames=3,
                             width=1200, height=900)  # fmt: skip
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    env = {"NIGHTSTACK_SOLVE_ENABLED": "true", "NIGHTSTACK_SOLVE_SCALE_ARCSEC": "2.0",
           "NIGHTSTACK_LANDSCAPE_MASK_RATIO": "1.0"}  # fmt: skip
    d = Daemon(watch, out, env=env)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    for frame in sorted(night.glob("*.DNG")):
        shutil.copy(frame, watch / frame.name)
    lines = wait_for(lambda: len(journal(out)) >= 3 and journal(out), 120, "3 frames", d)
    assert [line["status"] for line in lines] == ["accepted"] * 3
    session = out / lines[0]["session"]

    def solved() -> dict[str, object] | None:
        meta = json.loads((session / "session.json").read_text())
        return meta if "solve" in meta else None

    meta = wait_for(solved, 60, "the reference solved in session.json", d)
    assert meta["target"] == "M42" and meta["state"] == "open"
    assert "solved in" in d.text() and "M42" in d.text()
    assert d.stop() == 0  # SIGTERM finalizes
    header = fits.getheader(session / "stack.fits")
    assert header["OBJECT"] == "M42"
    error = separation_deg(header["RA"], header["DEC"], 83.82, -5.39) * 3600
    assert error < 5.0
