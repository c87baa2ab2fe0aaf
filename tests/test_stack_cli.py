"""`nightstack stack` end to end on simulated raws (known truth) and on the real ALS sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

from nightstack.cli import main, natural_key
from nightstack.config import Settings
from nightstack.io.loaders import load
from nightstack.simulate import simulate_night

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
ALS = REALDATA / "seq_als_m27_asi224mc"

# 12 frames, 2 of them rejected: a single outlier among n samples lies at most n / sqrt(n - 1)
# standard deviations from their median, so a 3-sigma clip can remove it only from n >= 8 on;
# ten accepted frames, as in the issue, leave it room.
N_FRAMES = 12
SATELLITE, CLOUDY, TRAILED = 4, 6, 8


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    outdir = tmp_path_factory.mktemp("night")
    truth = simulate_night(
        outdir,
        frames=N_FRAMES,
        width=1000,
        height=700,
        seed=11,
        satellite=SATELLITE,
        cloudy=CLOUDY,
        trailed=TRAILED,
    )
    return outdir, json.loads(truth.read_text())


def _stack(outdir: Path, out: Path, *args: str) -> tuple[Path, list[dict[str, Any]]]:
    report = out / "report.jsonl"
    code = main(
        ["stack", str(outdir), "-o", str(out / "stack.fits"), "--report", str(report), *args]
    )
    assert code == 0
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    return out / "stack.fits", lines


@pytest.fixture(scope="module")
def stacked(
    night: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict[str, Any]]]:
    return _stack(night[0], tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def mean_stacked(
    night: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict[str, Any]]]:
    """The control: a plain mean keeps every outlier."""
    return _stack(night[0], tmp_path_factory.mktemp("mean"), "--method", "mean")


def _fits_image(path: Path) -> np.ndarray:
    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
        assert hdul[0].header["ROWORDER"] == "TOP-DOWN"
    return np.moveaxis(data, 0, -1) if data.ndim == 3 else data[..., None]


def _grid_rms(matrix: np.ndarray, truth: np.ndarray, width: int, height: int) -> float:
    xs, ys = np.meshgrid(np.linspace(0, width - 1, 9), np.linspace(0, height - 1, 7))
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    return float(np.sqrt(np.mean(np.sum((matrix @ pts - truth @ pts) ** 2, axis=0))))


def test_report_has_one_line_per_input_with_reasons(
    night: tuple[Path, dict[str, Any]], stacked: tuple[Path, list[dict[str, Any]]]
) -> None:
    _, truth = night
    _, lines = stacked
    assert [Path(r["file"]).name for r in lines] == [f["file"] for f in truth["frames"]]
    for field in (
        "file",
        "status",
        "reason",
        "reference",
        "transform",
        "stars",
        "fwhm",
        "residual_px",
    ):
        assert all(field in r for r in lines)
    by_index = {i: r for i, r in enumerate(lines)}
    assert by_index[0]["reference"] is True
    assert sum(r["reference"] for r in lines) == 1
    assert by_index[CLOUDY]["status"] == "rejected" and "stars" in by_index[CLOUDY]["reason"]
    assert by_index[TRAILED]["status"] == "rejected"
    # trailed stars fail DAOFind's roundness test, so few "stars" remain, or they are measured
    assert any(word in by_index[TRAILED]["reason"] for word in ("stars", "trailed"))
    accepted = [i for i, r in by_index.items() if r["status"] == "accepted"]
    assert accepted == [i for i in range(N_FRAMES) if i not in (CLOUDY, TRAILED)]


def test_transforms_match_truth(
    night: tuple[Path, dict[str, Any]], stacked: tuple[Path, list[dict[str, Any]]]
) -> None:
    _, truth = night
    _, lines = stacked
    for frame, record in zip(truth["frames"], lines, strict=True):
        if record["status"] != "accepted":
            assert record["transform"] is None or frame["defects"]
            continue
        rms = _grid_rms(
            np.array(record["transform"]),
            np.array(frame["matrix"]),
            truth["width"],
            truth["height"],
        )
        assert rms <= 0.05, (frame["file"], rms)


def _sky_noise(image: np.ndarray, truth: dict[str, Any]) -> float:
    """Pixel noise of the sky (above the landscape) of the channel mean.

    Differences of horizontal neighbours remove the smooth sky and nebula; / sqrt(2) for one
    pixel's noise. Stars are clipped away by the sigma clip.
    """
    top = int(truth["landscape"]["top_row"]) - 10
    lum = np.nan_to_num(image[: max(top, 10)].mean(axis=-1))
    _, _, std = sigma_clipped_stats(np.diff(lum, axis=1), sigma=3.0)
    return float(std) / np.sqrt(2)


def _line_pixels(start: np.ndarray, end: np.ndarray, offset: float) -> np.ndarray:
    direction = (end - start) / np.linalg.norm(end - start)
    normal = np.array([-direction[1], direction[0]])
    t = np.linspace(0.1, 0.9, 400)[:, None]
    return start + t * (end - start) + offset * normal


def _trail_excess(path: Path, truth: dict[str, Any]) -> tuple[float, float]:
    """(median stack value on the satellite's line - beside it, the background noise there)."""
    image = _fits_image(path)
    lum = np.nan_to_num(image.mean(axis=-1))
    sat = truth["frames"][SATELLITE]["satellite"]
    matrix = np.array(truth["frames"][SATELLITE]["matrix"])
    ends = [matrix @ np.array([*p, 1.0]) for p in (sat["start"], sat["end"])]

    def sample(offset: float) -> np.ndarray:
        xy = np.rint(_line_pixels(ends[0], ends[1], offset)).astype(int)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < lum.shape[1]) & (xy[:, 1] >= 0)
        inside &= xy[:, 1] < int(truth["landscape"]["top_row"]) - 5
        return lum[xy[inside, 1], xy[inside, 0]]

    on_trail = np.median(sample(0.0))
    beside = np.median(np.concatenate([sample(-8.0), sample(8.0)]))
    # noise of the stack's background: pixel-to-pixel scatter along the parallel lines
    noise = float(np.std(np.diff(np.concatenate([sample(-8.0), sample(8.0)]))) / np.sqrt(2))
    return float(on_trail - beside), noise


def test_satellite_trail_is_gone_from_the_final_stack(
    night: tuple[Path, dict[str, Any]],
    stacked: tuple[Path, list[dict[str, Any]]],
    mean_stacked: tuple[Path, list[dict[str, Any]]],
) -> None:
    excess, noise = _trail_excess(stacked[0], night[1])
    assert excess <= noise, (excess, noise)
    control, noise = _trail_excess(mean_stacked[0], night[1])
    assert control > 3 * noise, (control, noise)  # the trail is there without rejection


def test_stack_noise_falls_like_one_over_sqrt_n(
    night: tuple[Path, dict[str, Any]], stacked: tuple[Path, list[dict[str, Any]]]
) -> None:
    outdir, truth = night
    path, lines = stacked
    n = sum(r["status"] == "accepted" for r in lines)
    single = load(outdir / truth["frames"][0]["file"], demosaic=Settings().demosaic).image
    ratio = _sky_noise(_fits_image(path), truth) / _sky_noise(single, truth)
    # warping's bilinear interpolation smooths the non-reference frames a little, so the
    # stack can be somewhat better than 1/sqrt(n); sigma clipping costs a few per cent
    assert 0.6 / np.sqrt(n) <= ratio <= 1.15 / np.sqrt(n), (ratio, 1 / np.sqrt(n))


def _worst_hot_pixel(path: Path, lines: list[dict[str, Any]], truth: dict[str, Any]) -> float:
    """Largest excess, in units of the sky noise, at the hot pixels' places in the stack."""
    lum = np.nan_to_num(_fits_image(path).mean(axis=-1))
    noise = _sky_noise(_fits_image(path), truth)
    hot, stars = truth["hot_pixels"], truth["stars"]
    bright = np.array(stars["peak_snr"]) > 2
    star_xy = np.stack([np.array(stars["x"])[bright], np.array(stars["y"])[bright]], axis=1)
    accepted = [
        np.array(frame["matrix"])
        for record, frame in zip(lines, truth["frames"], strict=True)
        if record["status"] == "accepted"
    ]
    inverses = [np.linalg.inv(np.vstack([m, [0, 0, 1]])) for m in accepted]

    def coverage(x: float, y: float) -> int:
        src = [inv @ [x, y, 1.0] for inv in inverses]
        return sum(0 <= p[0] <= lum.shape[1] - 1 and 0 <= p[1] <= lum.shape[0] - 1 for p in src)

    worst = 0.0
    for matrix in accepted:
        for x, y in zip(hot["x"], hot["y"], strict=True):
            rx, ry = matrix @ np.array([x, y, 1.0])
            ix, iy = round(rx), round(ry)
            if not (3 <= ix < lum.shape[1] - 3 and 3 <= iy < lum.shape[0] - 3):
                continue
            if np.min(np.hypot(*(star_xy - [rx, ry]).T)) < 10:
                continue  # a star's light, not the hot pixel's
            if coverage(rx, ry) < 8:
                continue  # near the edge: too few frames for a 3-sigma clip to reject one
            patch = lum[iy - 1 : iy + 2, ix - 1 : ix + 2]
            ring = lum[iy - 3 : iy + 4, ix - 3 : ix + 4]
            worst = max(worst, float(patch.max() - np.median(ring)))
    return worst / noise


def test_hot_pixels_are_removed(
    night: tuple[Path, dict[str, Any]],
    stacked: tuple[Path, list[dict[str, Any]]],
    mean_stacked: tuple[Path, list[dict[str, Any]]],
) -> None:
    worst = _worst_hot_pixel(stacked[0], stacked[1], night[1])
    # in units of the stack's own sky noise: the bilinear demosaic's stack is 2.2x quieter than
    # LibRaw AHD's (measured), so the same unit is smaller; the residual itself is 0.62x AHD's
    assert worst <= 7, worst
    control = _worst_hot_pixel(mean_stacked[0], mean_stacked[1], night[1])
    assert control > 30, control  # a plain mean keeps them: the test can fail


def _fwhm(image: np.ndarray) -> float:
    """Median star FWHM (px) by the pipeline's detection on the 2x2-binned channel mean."""
    from nightstack.pipeline.prepare import star_finder

    settings = Settings()
    grey = np.nan_to_num(image.mean(axis=2))
    rows, cols = grey.shape[0] // 2 * 2, grey.shape[1] // 2 * 2
    binned = grey[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))
    finder = star_finder(settings)
    return float(finder(binned.astype(np.float32), 2).fwhm_px)


def test_the_default_stack_keeps_the_stars_as_sharp_as_one_frame(
    night: tuple[Path, dict[str, Any]],
    stacked: tuple[Path, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    """The defaults (mhc-sharp demosaic, clamped cubic warp) keep the drifting night's stack
    within 2 % of its reference frame's own star FWHM and no wider than LibRaw's AHD decode of it;
    a bilinear warp widens them (its 2-tap kernel adds t(1 - t) px^2 of variance at a sub-pixel
    offset t)."""
    outdir, _ = night
    first = sorted(outdir.glob("*.DNG"))[0]
    single = _fwhm(load(first, demosaic="mhc-sharp").image)
    ahd = _fwhm(load(first, demosaic="AHD").image)
    default = _fwhm(_fits_image(stacked[0]))
    bilinear_path, _ = _stack(outdir, tmp_path, "--interpolation", "bilinear")
    bilinear = _fwhm(_fits_image(bilinear_path))
    assert bilinear > 1.01 * single, (bilinear, single)
    assert default < bilinear and abs(default / single - 1) <= 0.02, (default, bilinear, single)
    assert default <= 1.01 * ahd, (default, ahd)  # measured 3.45 vs 3.52 px: sharper


def test_tiff_and_png_outputs(night: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    outdir, truth = night
    files = [str(outdir / f["file"]) for f in truth["frames"][:4]]
    assert main(["stack", *files, "-o", str(tmp_path / "s.tif")]) == 0
    data = tifffile.imread(tmp_path / "s.tif")
    assert data.dtype == np.uint16 and data.shape == (truth["height"], truth["width"], 3)
    assert np.median(data) < 0.1 * 65535  # linear: the sky is dark
    # the fixed scale: the FITS value (1.0 = full scale) times 65535
    assert main(["stack", *files, "-o", str(tmp_path / "s.fits")]) == 0
    linear = np.moveaxis(fits.getdata(tmp_path / "s.fits"), 0, 2)
    covered = np.isfinite(linear)
    expected = np.clip(np.rint(np.nan_to_num(linear).astype(np.float64) * 65535.0), 1, 65535)
    assert np.array_equal(data[covered], expected[covered]) and np.all(data[~covered] == 0)
    assert main(["stack", *files, "-o", str(tmp_path / "r.tif"), "--tiff-scale", "range"]) == 0
    assert tifffile.imread(tmp_path / "r.tif").max() == 65535  # scaled to the data range
    assert main(["stack", *files, "-o", str(tmp_path / "v.tif"), "--stretched"]) == 0
    stretched = tifffile.imread(tmp_path / "v.tif")
    assert 0.15 * 65535 < np.median(stretched) < 0.35 * 65535  # auto-stretch: sky near 0.25
    assert main(["stack", *files, "-o", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_fewer_than_two_frames_exits_nonzero(
    night: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outdir, truth = night
    junk = tmp_path / "junk.CR3"
    junk.write_bytes(b"\0" * 100)
    code = main(
        [
            "stack",
            str(outdir / truth["frames"][0]["file"]),
            str(junk),
            "-o",
            str(tmp_path / "x.tif"),
        ]
    )
    assert code != 0
    assert "only 1 frame" in capsys.readouterr().err
    assert not (tmp_path / "x.tif").exists()


def test_natural_order() -> None:
    names = [Path(f"IMG_{n}.CR3") for n in (10, 2, 1, 100)]
    assert [p.name for p in sorted(names, key=natural_key)] == [
        "IMG_1.CR3",
        "IMG_2.CR3",
        "IMG_10.CR3",
        "IMG_100.CR3",
    ]


@pytest.mark.skipif(not ALS.is_dir(), reason="real ALS M27 frames not available")
def test_real_als_sequence_stack_beats_every_single_frame(tmp_path: Path) -> None:
    out = tmp_path / "m27.fits"
    report = tmp_path / "r.jsonl"
    code = main(
        [
            "stack",
            str(ALS),
            "-o",
            str(out),
            "--report",
            str(report),
            "--landscape-mask-ratio",
            "1.0",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert sum(r["status"] == "accepted" for r in lines) == 6
    stack = _fits_image(out)

    def noise(image: np.ndarray) -> float:
        # pixel-to-pixel differences remove the nebula and the sky gradient
        lum = np.nan_to_num(image.mean(axis=-1))[50:-50, 50:-50]
        _, _, std = sigma_clipped_stats(np.diff(lum, axis=1), sigma=3.0)
        return float(std)

    stacked_noise = noise(stack)
    singles = [noise(load(p).image) for p in sorted(ALS.glob("*.fits"))]
    assert stacked_noise < min(singles), (stacked_noise, singles)


def test_a_mono_frame_in_a_colour_session_is_rejected_with_its_reason(
    night: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    outdir, truth = night
    files = [outdir / f["file"] for f in truth["frames"][:3]]
    mono = tmp_path / "mono.fits"  # the same sky, as a mono camera would see it
    image = load(files[1]).image.mean(axis=-1)
    fits.PrimaryHDU(np.round(image * 65535).astype(np.uint16)).writeto(mono)
    report = tmp_path / "r.jsonl"
    args = [*map(str, files), str(mono), "-o", str(tmp_path / "s.tif"), "--report", str(report)]
    assert main(["stack", *args]) == 0
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["status"] for r in lines] == ["accepted"] * 3 + ["rejected"]
    assert "channels" in lines[3]["reason"]


def test_a_missing_work_dir_is_one_line_not_a_traceback(
    night: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outdir, _ = night
    frames = [str(p) for p in sorted(outdir.glob("*.DNG"))[:2]]
    missing = tmp_path / "no" / "such"
    code = main(["stack", *frames, "-o", str(tmp_path / "x.fits"), "--work-dir", str(missing)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"nightstack stack: --work-dir {missing} is not a folder"
    assert not missing.exists()
