"""Calibration masters, application, cosmetic correction and the library, against truth.

Frames are real DNGs written by the simulator's sensor model (``nightstack.simulate.sensor``)
and decoded by LibRaw; FITS frames are written by astropy. The oracle of every master is
astropy's ``sigma_clip`` (sigma 3, maxiters 5, median centre, std) then the mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clip
from numpy.testing import assert_allclose

from nightstack.calibration.calibrate import (
    Calibration,
    Calibrator,
    FrameDefects,
    Library,
    calibrate_mosaic,
    defect_map,
    folder_kind,
    load_masters,
    repair,
)
from nightstack.calibration.masters import (
    Master,
    MasterInfo,
    build_master,
    read_master,
    write_master,
)
from nightstack.cli import main
from nightstack.errors import CalibrationError
from nightstack.frames import FrameMeta, Mosaic
from nightstack.io.loaders import load_mosaic
from nightstack.simulate.dng import write_dng
from nightstack.simulate.sensor import SensorModel, write_calibration
from nightstack.simulate.sky import SkyModel

W, H = 160, 120  # small frames: every test builds masters from real DNGs


def _model(**kw: object) -> SkyModel:
    return SkyModel(width=W, height=H, frames=4, stars=30, nebula=False, **kw)  # type: ignore[arg-type]


def _oracle(paths: list[Path]) -> np.ndarray:
    cube = np.stack([load_mosaic(p).data.astype(np.float64) for p in paths])
    clipped = sigma_clip(cube, sigma=3, maxiters=5, cenfunc="median", stdfunc="std", axis=0)
    return np.ma.mean(clipped, axis=0).filled(np.nan)


def _darks(tmp: Path, n: int = 20, **sensor_kw: object) -> tuple[list[Path], SkyModel, SensorModel]:
    model = _model()
    sensor = SensorModel(seed=3, **sensor_kw)  # type: ignore[arg-type]
    out = tmp / "darks"
    out.mkdir()
    paths = []
    for k in range(n):
        raw = sensor.calibration_frame(model, "dark", k, exposure_s=30.0, temperature_c=15.0)
        if k == 7:  # a cosmic-ray shower in one frame: the clip must drop it
            raw[10:20, 30:40] = 9000
        path = out / f"DARK_{k:04d}.DNG"
        write_dng(path, raw, exposure_s=30.0, iso=800, temperature_c=15.0 + 0.1 * k)
        paths.append(path)
    return paths, model, sensor


# --- masters -----------------------------------------------------------------------------------


def test_master_equals_astropy_sigma_clip_and_mean(tmp_path: Path) -> None:
    paths, _, _ = _darks(tmp_path)
    oracle = _oracle(paths)
    in_memory = build_master("dark", paths)
    # a cap of a few rows forces the spill to disk and many bands
    spilled = build_master("dark", paths, ram_cap_bytes=W * 20 * 40 * 7, spill_dir=tmp_path)
    assert_allclose(in_memory.data, oracle, rtol=0, atol=2e-7)
    assert_allclose(spilled.data, oracle, rtol=0, atol=2e-7)
    assert not list(tmp_path.glob(".nightstack-master-*")), "the spill folder is removed"
    assert np.all(in_memory.data[10:20, 30:40] < 0.1), "the cosmic-ray frame was clipped"
    info = in_memory.info
    assert (info.kind, info.shape, info.pattern, info.ncombine) == ("dark", (H, W), "RGGB", 20)
    assert (info.iso, info.exposure_s, info.temperature_c) == (800.0, 30.0, pytest.approx(15.95))

    out = tmp_path / "master_dark.fits"
    assert main(["master", "dark", str(paths[0].parent), "-o", str(out)]) == 0
    back = read_master(out)
    assert_allclose(back.data, oracle, rtol=0, atol=2e-7)
    header = fits.getheader(out)
    assert header["IMAGETYP"] == "Dark Frame" and header["NCOMBINE"] == 20
    assert header["BAYERPAT"] == "RGGB" and header["EXPTIME"] == 30.0
    assert header["ISOSPEED"] == 800.0 and header["CCD-TEMP"] == pytest.approx(15.95)
    assert header["INSTRUME"] == "nightstack Simulated Camera"


def test_mono_and_three_plane_fits_masters(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for planes in (1, 3):
        shape = (40, 50) if planes == 1 else (3, 40, 50)
        cube = rng.normal(1000.0, 20.0, (12, *shape))
        cube[3, ..., 5, 6] = 60000.0  # an outlier the clip removes
        paths = []
        for k, frame in enumerate(cube):
            path = tmp_path / f"bias{planes}_{k:02d}.fits"
            header = fits.Header({"EXPTIME": 0.001, "GAIN": 120, "CCD-TEMP": -10.0})
            fits.PrimaryHDU(np.rint(frame).astype(np.uint16), header).writeto(path)
            paths.append(path)
        master = build_master("bias", paths)
        data = np.rint(cube).astype(np.uint16) / 65535.0
        expected = sigma_clip(data, sigma=3, maxiters=5, cenfunc="median", axis=0).mean(axis=0)
        if planes == 3:
            expected = np.moveaxis(expected, 0, -1)
        assert_allclose(master.data, expected, rtol=0, atol=2e-7)
        assert master.info.pattern is None and master.info.planes == planes
        assert (master.info.iso, master.info.temperature_c) == (120.0, -10.0)


def test_master_refuses_mixed_frames_and_bad_input(tmp_path: Path) -> None:
    paths, _, _ = _darks(tmp_path, n=3)
    other = tmp_path / "small.DNG"
    write_dng(other, np.full((64, 64), 600, np.uint16))
    with pytest.raises(
        CalibrationError, match=r"small\.DNG is 64x64 RGGB but DARK_0000\.DNG is 160x120"
    ):
        build_master("dark", [*paths, other])
    broken = tmp_path / "broken.DNG"
    broken.write_bytes(b"II*\x00garbage")
    with pytest.raises(CalibrationError, match=r"broken\.DNG"):
        build_master("dark", [paths[0], broken])
    with pytest.raises(CalibrationError, match="at least 2 frames"):
        build_master("bias", paths[:1])
    assert main(["master", "dark", str(paths[0]), str(other), "-o", str(tmp_path / "m.fits")]) == 2


def test_flat_master_is_the_sensor_response(tmp_path: Path) -> None:
    model = _model()
    sensor = SensorModel(seed=4)
    write_calibration(tmp_path, model, sensor, frames=8, flat_e=8000.0)
    darkflat = build_master("darkflat", sorted((tmp_path / "darkflats").iterdir()))
    flat = build_master("flat", sorted((tmp_path / "flats").iterdir()), offset=darkflat)
    truth = sensor.response(model).astype(np.float64)
    for r in (0, 1):
        for c in (0, 1):
            assert np.median(flat.data[r::2, c::2]) == pytest.approx(1.0, abs=1e-6)
            truth[r::2, c::2] /= np.median(truth[r::2, c::2])
    # 8 flats of 8000 e: 0.4 % noise a pixel; vignetting (30 %), dust and PRNU are all there
    assert np.std(flat.data / truth - 1) < 0.006
    assert flat.data[:4, :4].mean() == pytest.approx(truth[:4, :4].mean(), rel=0.01)
    with pytest.raises(CalibrationError, match="refused"):
        small = Master(MasterInfo("bias", (10, 10), "RGGB"), np.zeros((10, 10), np.float32))
        build_master("flat", sorted((tmp_path / "flats").iterdir()), offset=small)


# --- application and cosmetic --------------------------------------------------------------


def test_application_dark_flat_saturation() -> None:
    rng = np.random.default_rng(1)
    light = rng.uniform(0.1, 0.5, (8, 10)).astype(np.float32)
    light[2, 3] = 1.0  # clipped by the sensor
    dark = np.full(light.shape, 0.05, np.float32)
    flat = np.full(light.shape, 0.5, np.float32)
    out = calibrate_mosaic(light, offset=dark, flat=flat)
    expected = (light - dark) / flat
    expected[2, 3] = 2.0  # saturation / flat: stays the brightest, never dimmed by the dark
    assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32 and light[2, 3] == 1.0, "the input is not modified"
    same = light.copy()
    assert calibrate_mosaic(same, offset=dark, flat=flat, out=same) is same
    assert_allclose(same, expected, rtol=1e-6)  # in place
    dead = flat.copy()
    dead[1, 1] = 0.0  # a dead flat site: repaired from its neighbours, never a warning
    calibration = Calibration(flat=Master(MasterInfo("flat", (8, 10), "RGGB"), dead))
    assert 11 in calibration.defects.tolist()


def test_dark_scaling_uses_bias_and_exposure_ratio() -> None:
    bias = Master(MasterInfo("bias", (4, 6), "RGGB"), np.full((4, 6), 0.01, np.float32))
    dark = Master(
        MasterInfo("dark", (4, 6), "RGGB", exposure_s=30.0), np.full((4, 6), 0.04, np.float32)
    )
    scaled = Calibration(bias=bias, dark=dark, dark_scaling=True)
    light = np.full((4, 6), 0.5, np.float32)
    assert_allclose(scaled.apply(light, 60.0), 0.5 - 0.01 - 2 * 0.03, rtol=1e-6)
    assert_allclose(scaled.apply(light, 15.0), 0.5 - 0.01 - 0.5 * 0.03, rtol=1e-6)
    plain = Calibration(bias=bias, dark=dark)
    assert_allclose(plain.apply(light, 60.0), 0.46, rtol=1e-6)


def test_hot_pixel_map_from_a_dark_finds_the_truth_not_the_glow(tmp_path: Path) -> None:
    paths, model, sensor = _darks(tmp_path, n=10, glow_e_per_s=40.0, hot_pixels=50)
    master = build_master("dark", paths)
    hot, cold = defect_map(master.data, "RGGB")
    hx, hy, _rate = sensor.hot(model)
    truth = set((hy * W + hx).tolist()) | {int(y) * W + int(x) for x, y in model.hot_pixel_xy}
    found = set(hot.tolist())
    # every hot pixel brighter than the dark's noise is found; the glow corner is not taken
    assert len(truth & found) >= 0.95 * len(truth)
    assert len(found - truth) <= 3
    assert cold.size <= 3


def test_repair_from_same_colour_neighbours() -> None:
    data = np.arange(100, dtype=np.float32).reshape(10, 10)
    data[::2, 1::2] += 1000  # a colour far from the others: a repair must not mix it in
    original = data.copy()
    data[4, 5] = 1e6
    data[0, 0] = -5.0  # a corner with only 3 in-bounds neighbours
    done = repair(data, np.array([45, 0]), "RGGB")
    assert done == 2
    assert data[4, 5] == np.median(
        [original[r, c] for r in (2, 4, 6) for c in (3, 5, 7) if (r, c) != (4, 5)]
    )
    assert data[0, 0] == np.median([original[0, 2], original[2, 0], original[2, 2]])


def test_frame_defects_find_hot_pixels_not_stars(tmp_path: Path) -> None:
    model = SkyModel(
        width=320, height=240, frames=3, stars=150, nebula=False, drift_px=0.0, rotation_deg=0.0
    )
    sensor = SensorModel(seed=2, hot_pixels=40, glow_e_per_s=5.0)
    finder = FrameDefects()
    for i in range(3):
        assert not finder.ready and finder.defects.size == 0
        finder.learn(_light(model, sensor, i), "RGGB")
    assert finder.ready
    hx, hy, rate = sensor.hot(model)
    stuck = {int(y) * 320 + int(x) for x, y in model.hot_pixel_xy}
    every = set((hy * 320 + hx).tolist()) | stuck
    strong = set((hy * 320 + hx)[rate * 30.0 > 300].tolist()) | stuck  # above the sky's noise
    found = set(finder.defects.tolist())
    assert len(strong & found) >= 0.9 * len(strong)
    xy = model.to_frame(0, model.star_xy)
    stars = {round(y) * 320 + round(x) for x, y in xy if 0 <= x < 319.5 and 0 <= y < 239.5}
    assert len(found - every) <= 2 and not (found - every) & stars


def _light(model: SkyModel, sensor: SensorModel, i: int) -> np.ndarray:
    from nightstack.simulate.render import raw_frame

    raw = raw_frame(model, i, sensor=sensor).astype(np.float32)
    return (raw - model.black_level) / (model.white_level - model.black_level)


# --- the library and the calibrator -------------------------------------------------------


def _fake_master(directory: Path, name: str, kind: str, value: float, **info: object) -> Path:
    shape = info.pop("shape", (H, W))
    master = Master(
        MasterInfo(kind, shape, info.pop("pattern", "RGGB"), **info),
        np.full(shape, value, np.float32),
    )  # type: ignore[arg-type]
    return write_master(directory / name, master)


def _meta(**kw: object) -> FrameMeta:
    base: dict[str, object] = {
        "exposure_s": 30.0,
        "iso": 800.0,
        "camera": "Cam",
        "temperature_c": 10.0,
    }
    base.update(kw)
    return FrameMeta(**base)  # type: ignore[arg-type]


def test_library_picks_the_right_dark(tmp_path: Path) -> None:
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    values = {}
    for n, (t, iso, c) in enumerate(
        [
            (30, 800, 10),
            (30, 800, 0),
            (30, 1600, 10),
            (60, 800, 10),
            (29.5, 800, 11.5),
            (300, 800, 10),
        ]
    ):
        name = f"dark_{t}s_iso{iso}_{c}C.fits"
        _fake_master(
            lib_dir,
            name,
            "dark",
            0.001 * (n + 1),
            camera="Cam",
            exposure_s=t,
            iso=iso,
            temperature_c=c,
        )
        values[name] = 0.001 * (n + 1)
    _fake_master(lib_dir, "flat.fits", "flat", 1.0, camera="Cam")
    _fake_master(
        lib_dir,
        "wrong_size_dark.fits",
        "dark",
        0.5,
        camera="Cam",
        exposure_s=30,
        iso=800,
        temperature_c=10,
        shape=(60, 80),
    )
    library = Library(lib_dir)
    cases = {
        (30.0, 800.0, 10.0): "dark_30s_iso800_10C.fits",  # exact
        (30.0, 800.0, 1.0): "dark_30s_iso800_0C.fits",  # nearest temperature within 2 C
        (30.0, 1600.0, 10.0): "dark_30s_iso1600_10C.fits",  # ISO
        (61.0, 800.0, 10.0): "dark_60s_iso800_10C.fits",  # exposure within 5 %
        (30.0, 800.0, 11.0): "dark_29.5s_iso800_11.5C.fits",  # nearer temperature, 1.7 % off
    }
    for (t, iso, c), expected in cases.items():
        chosen, notes = library.match((H, W), "RGGB", _meta(exposure_s=t, iso=iso, temperature_c=c))
        assert chosen["dark"].info.path is not None and chosen["dark"].info.path.name == expected
        assert chosen["flat"].info.path.name == "flat.fits" and not notes
    chosen, notes = library.match((H, W), "RGGB", _meta(exposure_s=120.0))
    assert "dark" not in chosen
    assert notes and notes[0].startswith(
        "no dark master fits the light (160x120 RGGB ISO 800 120 s 10.0 C)"
    )
    chosen, notes = library.match((H, W), "RGGB", _meta(temperature_c=20.0))
    assert "dark" not in chosen and "temperature" in notes[0]
    chosen, notes = library.match((60, 80), "RGGB", _meta())
    assert chosen["dark"].info.path.name == "wrong_size_dark.fits"
    assert "flat" not in chosen and "refused" in notes[0]


def test_library_builds_masters_from_raw_folders_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    sensor = SensorModel(seed=5)
    sets = write_calibration(
        tmp_path / "lib",
        model,
        sensor,
        frames=3,
        dark_exposures=[30.0, 60.0],
        dark_temperatures=[0.0, 20.0],
    )
    assert {folder_kind(name) for name in sets} == {"bias", "dark", "flat", "darkflat"}
    library = Library(tmp_path / "lib")
    assert not library.problems
    kinds = sorted(m.info.kind for m in library.masters)
    assert kinds == ["bias", "dark", "dark", "dark", "dark", "darkflat", "flat"]
    cache_dir = tmp_path / "lib" / ".nightstack-masters"
    cache = sorted(cache_dir.glob("*.fits"))
    assert len(cache) == 7 and len(list(cache_dir.glob("index-*.json"))) == 7  # one a folder
    stamps = [p.stat().st_mtime_ns for p in cache]
    light = _meta(
        camera="nightstack Simulated Camera", iso=1600.0, exposure_s=60.0, temperature_c=1.0
    )
    chosen, _ = library.match((H, W), "RGGB", light)
    assert chosen["dark"].info.path is not None
    assert chosen["dark"].info.path.name.startswith("dark-darks_60s_0C-")

    def no_decoding(path: Path) -> None:
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr("nightstack.calibration.calibrate.read_frame", no_decoding)
    again = Library(tmp_path / "lib")  # opened again: from the cache, no frame decoded
    assert len(again.masters) == 7 and not again.problems
    assert [p.stat().st_mtime_ns for p in sorted(cache_dir.glob("*.fits"))] == stamps
    chosen, _ = again.match((H, W), "RGGB", light)
    assert chosen["dark"].info.path.name.startswith("dark-darks_60s_0C-")


def _mosaic(value: float = 0.3, shape: tuple[int, int] = (H, W), **meta: object) -> Mosaic:
    return Mosaic(Path("light.dng"), np.full(shape, value, np.float32), "RGGB", meta=_meta(**meta))


def test_calibrator_mismatch_warns_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    _fake_master(lib_dir, "dark60.fits", "dark", 0.1, camera="Cam", exposure_s=60.0, iso=800)
    calibrator = Calibrator(library=Library(lib_dir), cosmetic=False)
    light = _mosaic()
    out, result = calibrator.calibrate(light)
    assert_allclose(out.data, light.data)  # stacked uncalibrated
    assert result.masters == {}
    assert any("exposure 60 s is not 30 s" in w for w in result.warnings)
    assert any("stacked uncalibrated" in w for w in result.warnings)
    calibrator.calibrate(light)
    warned = [r for r in caplog.records if "exposure 60 s" in r.getMessage()]
    assert len(warned) == 1, "one warning per kind of light, not one a frame"


def test_explicit_master_of_another_size_or_pattern_is_refused(tmp_path: Path) -> None:
    wrong = _fake_master(tmp_path, "dark_small.fits", "dark", 0.1, shape=(60, 80))
    other = _fake_master(tmp_path, "dark_bggr.fits", "dark", 0.1, pattern="BGGR")
    good = _fake_master(tmp_path, "flat.fits", "flat", 0.5)
    for path, reason in (
        (wrong, "is 80x60 RGGB, the frame 160x120 RGGB: refused"),
        (other, "has CFA pattern BGGR, the frame RGGB: refused"),
    ):
        calibrator = Calibrator(load_masters({"dark": path, "flat": good}), cosmetic=False)
        out, result = calibrator.calibrate(_mosaic())
        assert result.masters == {"flat": "flat.fits"}
        assert any(reason in w for w in result.warnings), result.warnings
        assert_allclose(out.data, 0.6)  # the flat as given (0.5): light / flat
    with pytest.raises(CalibrationError, match="is a flat master, not a dark"):
        load_masters({"dark": good})
    notmaster = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.zeros((4, 4), np.float32)).writeto(notmaster)
    with pytest.raises(CalibrationError, match="not a nightstack master"):
        load_masters({"bias": notmaster})


def test_simulate_calibration_cli(tmp_path: Path) -> None:
    out = tmp_path / "night"
    argv = ["simulate", str(out), "--frames", "2", "--width", "128", "--height", "96"]
    assert main([*argv, "--calibration", "3", "--temperature", "5"]) == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth["sensor"]["frame_temperatures"] == [5.0, 5.0]
    assert set(truth["calibration"]) == {"bias", "darks", "flats", "darkflats"}
    for folder, entry in truth["calibration"].items():
        assert sorted(p.name for p in (out / "calibration" / folder).iterdir()) == entry["files"]
    assert load_mosaic(out / "IMG_0000.DNG").meta.temperature_c == 5.0


def test_calibrator_learns_hot_pixels_from_the_first_lights() -> None:
    model = SkyModel(width=320, height=240, frames=5, stars=150, nebula=False)
    sensor = SensorModel(seed=6, hot_pixels=30)
    calibrator = Calibrator(from_lights=True)
    repaired = []
    for i in range(5):
        data = _light(model, sensor, i)
        hx, hy, _ = sensor.hot(model)
        before = data[hy, hx].copy()
        out, result = calibrator.calibrate(Mosaic(Path(f"{i}.dng"), data, "RGGB"))
        repaired.append(result.repaired)
        if i >= 2:  # the map is complete with the third light, which is repaired too
            assert np.median(out.data[hy, hx]) < 0.5 * np.median(before)
    assert repaired[:2] == [0, 0] and min(repaired[2:]) >= 30
    assert Calibrator().calibrate(_mosaic())[1].repaired == 0  # off by default
