"""Calibration through ``nightstack stack`` on a simulated tracked night, against its truth.

The night is real DNGs from ``simulate_night`` with the sensor model (vignetting to 0.7 in the
corners, dust shadows, PRNU, amp glow in the top-right corner, hot pixels, bias columns) and its
bias/dark/flat/dark-flat sets; the mount tracks (no drift, no rotation), so hot pixels and amp
glow stay on the same sky pixels and the sigma clip cannot remove them. The truth is the sky
model's sky surface in each colour, up to one scale (a master flat is normalized to its median).
An uncalibrated stack of the same frames is the control: each claim fails on it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from _daemon import Daemon, journal, wait_for
from nightstack.calibration.calibrate import DEFECT_FRAMES
from nightstack.calibration.masters import Master, MasterInfo, write_master
from nightstack.cli import main
from nightstack.simulate import simulate_night
from nightstack.simulate.sensor import SensorModel
from nightstack.simulate.sky import SKY_RGB, SkyModel

pytestmark = pytest.mark.slow  # seven stacks of a 12-frame night: ~1 min on 2 cores

W, H, FRAMES = 480, 320, 12
BOX = 24  # px: sky statistics are medians over BOX x BOX boxes (stars do not move them)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calnight")
    sensor = SensorModel(seed=8, glow_e_per_s=4.0, hot_pixels=60, dust=3)
    simulate_night(
        out / "lights",
        frames=FRAMES,
        width=W,
        height=H,
        seed=8,
        stars=250,
        drift_px=0.0,
        rotation_deg=0.0,
        nebula=False,
        sensor=sensor,
        calibration_frames=12,
    )
    cal = out / "lights" / "calibration"
    masters = out / "masters"
    for kind, folder in (("dark", "darks"), ("darkflat", "darkflats"), ("bias", "bias")):
        assert main(["master", kind, str(cal / folder), "-o", str(masters / f"{kind}.fits")]) == 0
    flat = ["master", "flat", str(cal / "flats"), "-o", str(masters / "flat.fits")]
    assert main([*flat, "--darkflat", str(masters / "darkflat.fits")]) == 0
    return out


def _stack(night: Path, name: str, *flags: str) -> tuple[np.ndarray, list[dict]]:
    out = night / f"{name}.fits"
    report = night / f"{name}.jsonl"
    argv = ["stack", str(night / "lights"), "-o", str(out), "--report", str(report), *flags]
    assert main(argv) == 0
    image = np.moveaxis(fits.getdata(out).astype(np.float64), 0, -1)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert all(line["status"] == "accepted" for line in lines), lines
    return image, lines


def _truth(night: Path) -> tuple[SkyModel, dict, np.ndarray]:
    truth = json.loads((night / "lights" / "truth.json").read_text())
    model = SkyModel.from_truth(truth)
    span = (model.white_level - model.black_level) * model.gain_e_per_adu
    sky = model.sky_surface(0) / span  # green, in the stack's units (white balance 1)
    expected = np.stack([sky * c for c in SKY_RGB], axis=-1)
    return model, truth, expected


def _box(a: np.ndarray, x: int, y: int) -> np.ndarray:
    return a[y : y + BOX, x : x + BOX]


def _measure(image: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """Sky over truth in the top corners and the centre (green), the scale, the noise."""
    ratio = image[..., 1] / expected[..., 1]
    centre = float(np.median(_box(ratio, W // 2 - BOX // 2, H // 2 - BOX // 2)))
    corners = [float(np.median(_box(ratio, x, 2))) for x in (2, W - BOX - 2)]
    residual = image - centre * expected
    patch = _box(residual[..., 1], W // 2 - BOX // 2, H // 2 - BOX // 2)
    sigma = 1.4826 * float(np.median(np.abs(patch - np.median(patch))))
    return {
        "centre": centre,
        "worst_corner": max(abs(c / centre - 1) for c in corners),
        "sigma": sigma,
    }


def _dust_contrast(residual: np.ndarray, spot: dict) -> float:
    """Median residual (green) inside a dust shadow less that of a ring around it."""
    yy, xx = np.mgrid[0:H, 0:W]
    d = np.hypot(xx - spot["x"], yy - spot["y"]) / spot["radius_px"]
    green = residual[..., 1]
    return float(np.median(green[d < 0.6]) - np.median(green[(d > 1.4) & (d < 2.0)]))


def test_calibrated_stack_is_flat_without_glow_dust_or_hot_pixels(
    night: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, truth, expected = _truth(night)
    dark, flat = str(night / "masters" / "dark.fits"), str(night / "masters" / "flat.fits")
    calibrated, lines = _stack(night, "calibrated", "--dark", dark, "--flat", flat)
    for line in lines:
        assert line["calibration"]["masters"] == {"dark": "dark.fits", "flat": "flat.fits"}
        assert line["calibration"]["repaired"] > 60 and not line["calibration"].get("warnings")
    monkeypatch.setenv("NIGHTSTACK_COSMETIC", "false")  # the controls: no cosmetic correction
    controls = {
        "none": _stack(night, "control")[0],
        "flat only": _stack(night, "flat_only", "--flat", flat)[0],
        "dark only": _stack(night, "dark_only", "--dark", dark)[0],
    }
    cal = _measure(calibrated, expected)
    sigma = cal["sigma"]
    residual = calibrated - cal["centre"] * expected
    scaled = {}
    for name, image in controls.items():
        m = _measure(image, expected)
        scaled[name] = (image - m["centre"] * expected, m["sigma"])
    # flat to 1 % corner to centre; without a flat the lens's 30 % vignetting stays
    assert cal["worst_corner"] <= 0.01, cal
    assert _measure(controls["none"], expected)["worst_corner"] > 0.1
    # amp glow: the corner's residual below 1 sigma of the stack's noise (over 8 x 8 px)
    gx, gy = (int(v) for v in truth["sensor"]["glow_corner_xy"])
    corner = (slice(gy, gy + 8), slice(gx - 7, gx + 1), 1)
    assert abs(float(np.median(residual[corner]))) < sigma
    kept, kept_sigma = scaled["flat only"]
    assert float(np.median(kept[corner])) > 3 * kept_sigma
    # dust shadows: each below 1 sigma against the sky around it; the dark alone keeps them
    for spot in truth["sensor"]["dust"]:
        assert abs(_dust_contrast(residual, spot)) < sigma, spot
        kept, kept_sigma = scaled["dark only"]
        assert _dust_contrast(kept, spot) < -2 * kept_sigma, spot
    # hot pixels on a tracked night: gone (within 5 sigma of the sky); the flat alone keeps them
    hot = truth["sensor"]["hot_pixels"]
    xs = np.array(hot["x"] + truth["hot_pixels"]["x"])
    ys = np.array(hot["y"] + truth["hot_pixels"]["y"])
    stars = model.to_frame(0, model.star_xy)[model.star_peak_snr > 3]
    clear = np.array(
        [np.min(np.hypot(*(stars - (x, y)).T)) > 8 for x, y in zip(xs, ys, strict=True)]
    )
    clear &= (ys < model.landscape_top_row - 4) & (ys > 2) & (xs > 2) & (xs < W - 3)
    xs, ys = xs[clear], ys[clear]
    assert len(xs) > 20
    channel = model.cfa[ys % 2, xs % 2]
    assert np.max(np.abs(residual[ys, xs, channel])) < 5 * sigma
    kept, kept_sigma = scaled["flat only"]
    assert np.median(kept[ys, xs, channel]) > 20 * kept_sigma


def test_library_of_raw_folders_calibrates_the_night(night: Path) -> None:
    _, _, expected = _truth(night)
    library = night / "lights" / "calibration"
    image, lines = _stack(night, "library", "--calibration-dir", str(library))
    for line in lines:
        used = line["calibration"]["masters"]
        assert used["dark"].startswith("dark-darks-") and used["flat"].startswith("flat-flats-")
        assert "bias" not in used, "a dark of the light's exposure holds the bias"
    assert _measure(image, expected)["worst_corner"] <= 0.01
    cached = sorted(p.name for p in (library / ".nightstack-masters").glob("*.fits"))
    assert [name.split("-")[0] for name in cached] == ["bias", "dark", "darkflat", "flat"]


def test_a_master_of_another_size_is_refused_and_the_night_stacks(
    night: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = night / "masters" / "dark_small.fits"
    write_master(
        wrong, Master(MasterInfo("dark", (100, 150), "RGGB"), np.zeros((100, 150), np.float32))
    )
    image, lines = _stack(night, "refused", "--dark", str(wrong))
    assert np.isfinite(image).all()
    for line in lines:
        assert line["calibration"]["masters"] == {}
        assert any(
            "dark master dark_small.fits is 150x100 RGGB, the frame 480x320 RGGB: refused" in w
            for w in line["calibration"]["warnings"]
        )
    err = capsys.readouterr().err
    assert err.count("refused") <= 2, "one warning, not one a frame"


def test_the_daemon_calibrates_and_journals_the_masters(night: Path, daemons: list[Daemon]) -> None:
    watch, out = night / "watch", night / "daemon-out"
    watch.mkdir()
    lights = sorted((night / "lights").glob("IMG_*.DNG"))[:6]
    for light in lights:
        shutil.copy(light, watch / light.name)
    flat = str(night / "masters" / "flat.fits")
    library = str(night / "lights" / "calibration")
    daemon = Daemon(watch, out, "--flat", flat, "--calibration-dir", library)
    daemons.append(daemon)
    wait_for(lambda: len(journal(out)) >= len(lights), 180, "all frames", daemon)
    assert daemon.stop() == 0
    for line in journal(out):
        assert line["status"] == "accepted", line
        used = line["calibration"]["masters"]
        assert used["flat"] == "flat.fits", "the explicit flat wins over the library's"
        assert used["dark"].startswith("dark-darks-"), used


def test_defects_learned_from_the_lights_are_the_session_s_own(
    night: Path, daemons: list[Daemon]
) -> None:
    """cosmetic_from_lights through the daemon: a new session learns its defect map afresh from
    its own first lights (none repaired before DEFECT_FRAMES were seen), as the first did."""
    watch, out = night / "watch-defects", night / "defects-out"
    watch.mkdir()
    lights = sorted((night / "lights").glob("IMG_*.DNG"))
    env = {"NIGHTSTACK_COSMETIC_FROM_LIGHTS": "true"}
    daemon = Daemon(watch, out, env=env)
    daemons.append(daemon)
    def closed() -> bool:
        states = [json.loads(p.read_text())["state"] for p in out.glob("*/session.json")]
        return bool(states) and all(state == "closed" for state in states)

    sessions: list[list[dict]] = []
    for batch in (lights[:4], lights[4:8]):
        for light in batch:
            shutil.copy(light, watch / light.name)
        done = 4 * (len(sessions) + 1)
        wait_for(lambda: len(journal(out)) >= done, 120, "the batch", daemon)  # noqa: B023
        assert main(["close", "--output-dir", str(out)]) == 0
        wait_for(closed, 120, "the close", daemon)
        newest = sorted(out.glob("*/journal.jsonl"))[-1]
        sessions.append([json.loads(line) for line in newest.read_text().splitlines()])
    assert daemon.stop() == 0
    assert len(list(out.glob("*/session.json"))) == 2
    for records in sessions:
        repaired = [r["calibration"]["repaired"] for r in records]
        assert repaired[: DEFECT_FRAMES - 1] == [0] * (DEFECT_FRAMES - 1), repaired
        assert min(repaired[DEFECT_FRAMES - 1 :]) > 20, repaired
