"""The synthetic night: real DNGs that LibRaw decodes, and a truth that the pixels obey."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rawpy
from scipy import ndimage, optimize, special

from nightstack.cli import main
from nightstack.io.loaders import load
from nightstack.simulate import (
    SKY_RGB,
    SkyModel,
    seeing_jitter,
    simulate_night,
    sky_ramp,
    sky_step,
)
from nightstack.simulate.dng import write_dng

BLACK, WHITE = 512, 16383
_CFA_CHANNEL = np.array([[0, 1], [1, 2]])  # RGGB: (r, g, b) index by (row % 2, col % 2)
POSTPROCESS = {
    "gamma": (1, 1),
    "no_auto_bright": True,
    "output_bps": 16,
    "use_camera_wb": True,
    "user_flip": 0,
}


@pytest.fixture(scope="module")
def model() -> SkyModel:
    """A small night: frame 1 has a satellite, 2 is cloudy, 3 is wind-trailed."""
    return SkyModel(
        width=480,
        height=320,
        frames=4,
        seed=3,
        stars=150,
        satellite=(1,),
        cloudy=(2,),
        trailed=(3,),
    )


@pytest.fixture(scope="module")
def raws(model: SkyModel) -> list[np.ndarray]:
    return [model.render(i) for i in range(model.frames)]


def _isolated(
    model: SkyModel, i: int, index: np.ndarray, distance: float, *, ratio: float = 0.02
) -> np.ndarray:
    """Unsaturated stars of ``index`` with no neighbour brighter than ``ratio`` times their
    flux within ``distance`` px in frame i."""
    everywhere = model.to_frame(i, model.star_xy)
    keep = []
    for k in index:
        d = np.hypot(*(everywhere - everywhere[k]).T)
        d[k] = np.inf
        bright = model.star_flux_e > ratio * model.star_flux_e[k]
        if not (bright & (d < distance)).any() and not model.star_saturated[k]:
            keep.append(k)
    return np.array(keep, dtype=int)


# ---- DNG writer -----------------------------------------------------------------------------


def test_dng_round_trip_through_rawpy(tmp_path: Path) -> None:
    rows, cols = 64, 96
    cfa = np.random.default_rng(0).integers(BLACK, WHITE + 1, (rows, cols), dtype=np.uint16)
    taken = datetime(2024, 8, 10, 23, 15, 42)
    path = write_dng(tmp_path / "a.dng", cfa, exposure_s=1 / 250, iso=3200, capture_time=taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dng"]  # no temporary left over
    with rawpy.imread(str(path)) as raw:
        assert np.array_equal(raw.raw_image_visible, cfa)
        assert raw.color_desc == b"RGBG"
        assert raw.raw_pattern.tolist() == [[0, 1], [3, 2]]  # R G / G B
        assert list(raw.black_level_per_channel) == [BLACK] * 4
        assert raw.white_level == WHITE
        assert raw.other.iso_speed == 3200
        assert raw.other.shutter_speed == pytest.approx(1 / 250, rel=1e-6)
        assert raw.other.timestamp == taken
        rgb = raw.postprocess(**POSTPROCESS)
    assert rgb.shape == (rows, cols, 3)
    assert rgb.dtype == np.uint16


def test_dng_grey_decodes_neutral_with_camera_white_balance(tmp_path: Path) -> None:
    level = 4000
    cfa = np.full((64, 64), level, dtype=np.uint16)
    write_dng(tmp_path / "grey.dng", cfa, black_level=BLACK, white_level=WHITE)
    with rawpy.imread(str(tmp_path / "grey.dng")) as raw:
        rgb = raw.postprocess(**POSTPROCESS).astype(np.float64)
    expected = (level - BLACK) / (WHITE - BLACK) * 65535
    means = rgb[8:-8, 8:-8].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(means, expected, rtol=0.005)


def test_dng_other_levels_and_bad_input(tmp_path: Path) -> None:
    cfa = np.random.default_rng(1).integers(256, 4096, (32, 48), dtype=np.uint16)
    write_dng(tmp_path / "b.dng", cfa, black_level=256, white_level=4095)
    with rawpy.imread(str(tmp_path / "b.dng")) as raw:
        assert list(raw.black_level_per_channel) == [256] * 4
        assert raw.white_level == 4095
        assert np.array_equal(raw.raw_image_visible, cfa)
        assert raw.other.iso_speed == 0  # not written: LibRaw reports 0
    with pytest.raises(ValueError, match="uint16"):
        write_dng(tmp_path / "c.dng", cfa.astype(np.float32))
    with pytest.raises(ValueError, match="black_level"):
        write_dng(tmp_path / "c.dng", cfa, black_level=5000, white_level=4095)


# ---- model: determinism, geometry, catalogue --------------------------------------------------


def test_render_is_deterministic_in_seed_and_frame(model: SkyModel) -> None:
    again = SkyModel(**model.parameters())
    assert again == model
    assert np.array_equal(again.render(1), model.render(1))
    assert not np.array_equal(model.render(0), model.render(1))
    other_seed = SkyModel(**{**model.parameters(), "seed": 4})
    assert not np.array_equal(other_seed.render(0), model.render(0))


def test_same_sky_whatever_the_night_length() -> None:
    short, long = SkyModel(frames=2, seed=9), SkyModel(frames=30, seed=9)
    a, b = short.visible_stars(0), long.visible_stars(0)
    assert len(a) > 300
    np.testing.assert_array_equal(short.star_xy[a], long.star_xy[b])
    np.testing.assert_array_equal(short.star_flux_e[a], long.star_flux_e[b])


def test_transforms_map_frame_stars_back_to_reference(model: SkyModel) -> None:
    np.testing.assert_allclose(model.transform(0), [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    for i in range(model.frames):
        xy, flux = model.stars_in_frame(i)
        index = model.visible_stars(i)
        m = model.transform(i)
        back = xy @ m[:, :2].T + m[:, 2]
        np.testing.assert_allclose(back, model.star_xy[index], rtol=0, atol=1e-9)
        assert np.all((xy >= 0) & (xy <= [model.width - 1, model.height - 1]))
        np.testing.assert_allclose(flux, model.star_flux_e[index] * model.star_factor(i))
        # a rigid motion: the field turned by i * rotation_deg (frame -> reference undoes it)
        angle = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
        assert angle == pytest.approx(-i * model.rotation_deg, abs=1e-9)
        assert np.linalg.det(m[:, :2]) == pytest.approx(1.0, abs=1e-12)


def test_default_night_moves_meaningfully() -> None:
    night = SkyModel(frames=20)
    centre = np.array([[599.5, 399.5]])
    shift = np.hypot(*(night.to_frame(19, centre) - centre)[0])
    assert 40 < shift < 150  # pixels over 20 frames: must be aligned, yet mostly overlapping
    # stars cover the whole of the last frame too (generated over a larger sky region)
    xy, _ = night.stars_in_frame(19)
    counts, _, _ = np.histogram2d(xy[:, 0], xy[:, 1], bins=(4, 3), range=((0, 1200), (0, 700)))
    assert counts.min() > 10


def test_star_catalogue_has_many_faint_few_bright() -> None:
    night = SkyModel(seed=2)
    index = night.visible_stars(0)
    assert 300 < len(index) < 450  # 400 expected in the frame, less the landscape
    snr = night.star_peak_snr[index]
    assert 0.2 < np.mean(snr > 10) < 0.6
    assert np.mean(snr < 5) > 0.3
    assert 1 <= night.star_saturated[index].sum() <= 40
    assert np.all(np.diff(night.star_flux_e) <= 0)  # brightest first


def test_invalid_model_is_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        SkyModel(width=101)
    with pytest.raises(ValueError, match="seed"):
        SkyModel(seed=-1)


# ---- pixels obey the truth -------------------------------------------------------------------


def test_noise_model_matches_sky_level_and_noise() -> None:
    flat = SkyModel(
        width=256, height=256, stars=0, nebula=False, gradient=0.0, landscape_fraction=0.0,
        hot_pixels=0,
    )  # fmt: skip
    raw = flat.render(0).astype(np.float64)
    green = np.concatenate([raw[0::2, 1::2].ravel(), raw[1::2, 0::2].ravel()])
    assert green.mean() == pytest.approx(BLACK + flat.sky_e, abs=1.0)
    assert green.std() == pytest.approx(flat.pixel_noise_e, rel=0.03)
    red = raw[0::2, 0::2]
    assert red.mean() == pytest.approx(BLACK + 1.1 * flat.sky_e, abs=2.0)  # warm sky


def _oracle_stars(model: SkyModel, i: int, r0: int, c0: int, size: int) -> np.ndarray:
    """Slow, obvious star image of a (size, size) window at (row r0, col c0) of frame i: every
    catalogue star's Gaussian PSF sampled at 9x9 points inside each pixel, times its colour."""
    sub = (np.arange(9) - 4) / 9.0  # sub-pixel sample offsets
    rows = (np.arange(r0, r0 + size)[:, None] + sub).reshape(-1)  # (size * 9,)
    cols = (np.arange(c0, c0 + size)[:, None] + sub).reshape(-1)
    sigma = model.psf_sigma_px
    xy = model.to_frame(i, model.star_xy)
    near = np.flatnonzero(
        (np.abs(xy[:, 0] - (c0 + size / 2)) < size / 2 + 10 * sigma)
        & (np.abs(xy[:, 1] - (r0 + size / 2)) < size / 2 + 10 * sigma)
    )
    channel = _CFA_CHANNEL[(np.arange(r0, r0 + size) % 2)[:, None], np.arange(c0, c0 + size) % 2]
    image = np.zeros((size, size))
    for k in near:
        gy = np.exp(-0.5 * ((rows - xy[k, 1]) / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)
        gx = np.exp(-0.5 * ((cols - xy[k, 0]) / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)
        pixel = np.outer(gy, gx).reshape(size, 9, size, 9).mean(axis=(1, 3))
        image += model.star_flux_e[k] * model.star_rgb[k][channel] * pixel
    return image


def test_stars_match_an_independent_psf_oracle() -> None:
    """Positions (sub-pixel), fluxes, colours and the pixel-integrated PSF, in a drifted and
    rotated frame too: rendered star light equals a brute-force sum over the catalogue."""
    night = SkyModel(width=480, height=320, frames=6, seed=11, stars=300, landscape_fraction=0.0)
    starless = SkyModel(**{**night.parameters(), "stars": 0})
    for i in (0, 5):
        rendered = night.electrons(i).astype(np.float64) - starless.electrons(i)
        bright = night.visible_stars(i, margin=40, min_peak_snr=20)
        assert len(bright) >= 4
        for x, y in night.to_frame(i, night.star_xy[bright[[1, 3]]]):  # windows on real stars
            r0, c0 = round(y) - 32, round(x) - 32
            window = rendered[r0 : r0 + 64, c0 : c0 + 64]
            oracle = _oracle_stars(night, i, r0, c0, 64)
            np.testing.assert_allclose(window, oracle, rtol=0, atol=1e-3 * oracle.max() + 0.05)


def test_bright_stars_centroid_within_a_tenth_pixel_in_noisy_raws() -> None:
    # no nebula: its gradient would bias this plain flux-weighted centroid, not the rendering
    model = SkyModel(width=640, height=480, frames=3, seed=21, stars=500, nebula=False)
    raw = model.render(2).astype(np.float64) - BLACK
    index = model.visible_stars(2, margin=15, min_peak_snr=150)
    xy = model.to_frame(2, model.star_xy[index])
    hot = model.hot_pixel_xy
    clear = [np.abs(hot - p).max(axis=1).min() > 13 for p in xy]  # no hot pixel in the box
    sky_only = index[clear & (xy[:, 1] < model.landscape_top_row - 15)]
    index = _isolated(model, 2, sky_only, 12, ratio=0.0)  # no neighbour light in the core
    assert len(index) >= 3
    rows, cols = np.mgrid[-6:7, -6:7]
    for k, (x, y) in zip(index, model.to_frame(2, model.star_xy[index]), strict=True):
        r0, c0 = round(y), round(x)
        box = raw[r0 - 12 : r0 + 13, c0 - 12 : c0 + 13]
        # per-channel sky from the box border, then undo sky and star colour per CFA site
        channel = _CFA_CHANNEL[
            (np.arange(r0 - 12, r0 + 13) % 2)[:, None], (np.arange(c0 - 12, c0 + 13) % 2)
        ]
        border = np.ones(box.shape, bool)
        border[4:-4, 4:-4] = False
        plane = np.empty_like(box)
        for c in range(3):
            on = channel == c
            plane[on] = (box[on] - np.median(box[on & border])) / model.star_rgb[k][c]
        core = plane[6:19, 6:19]
        cx = c0 + (core * cols).sum() / core.sum()
        cy = r0 + (core * rows).sum() / core.sum()
        assert np.hypot(cx - x, cy - y) < 0.1


def test_satellite_trail_is_where_the_truth_says(model: SkyModel, raws: list[np.ndarray]) -> None:
    sat = model.defects(1)["satellite"]
    (x0, y0), (x1, y1) = sat["start"], sat["end"]
    t = np.linspace(0, 1, 400)
    x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
    normal = np.array([-(y1 - y0), x1 - x0]) / np.hypot(x1 - x0, y1 - y0)

    def pixels(offset: float) -> tuple[np.ndarray, np.ndarray]:
        r = np.rint(y + offset * normal[1]).astype(int)
        c = np.rint(x + offset * normal[0]).astype(int)
        ok = (c >= 0) & (c < model.width) & (r >= 0) & (r < model.landscape_top_row - 4)
        return r[ok], c[ok]

    on = pixels(0.0)
    off = pixels(8.0)
    assert len(on[0]) > 100
    trail = raws[1].astype(np.float64) - raws[0]  # the other frame has no trail
    assert np.median(trail[on]) > 1500  # ADU: peak about 3200 e-, pixels up to 0.7 px off
    assert abs(np.median(trail[off])) < 60  # 8 px to the side: just sky noise
    assert sat["fwhm_px"] == pytest.approx(2.35, abs=0.01)


def test_cloud_dims_stars_and_brightens_a_lumpy_sky(
    model: SkyModel, raws: list[np.ndarray]
) -> None:
    both = np.intersect1d(model.visible_stars(0, margin=12), model.visible_stars(2, margin=12))
    index = _isolated(model, 0, both[model.star_peak_snr[both] > 60], 14)
    assert len(index) >= 3
    rows, cols = np.mgrid[-10:11, -10:11]
    aperture = np.hypot(rows, cols) <= 5
    annulus = np.hypot(rows, cols) >= 8

    def flux(i: int) -> np.ndarray:
        out = []
        for x, y in model.to_frame(i, model.star_xy[index]):
            r0, c0 = round(y), round(x)
            box = raws[i][r0 - 10 : r0 + 11, c0 - 10 : c0 + 11].astype(np.float64)
            channel = _CFA_CHANNEL[(rows + r0) % 2, (cols + c0) % 2]
            for c in range(3):  # the sky has a colour: subtract it per CFA channel
                box[channel == c] -= np.median(box[(channel == c) & annulus])
            out.append(box[aperture].sum())
        return np.array(out)

    ratio = np.median(flux(2) / flux(0))
    assert 0.02 < ratio < 0.1  # truth: 20x dimmer
    sky = slice(0, model.landscape_top_row)
    clear, cloudy = raws[0][sky] - float(BLACK), raws[2][sky] - float(BLACK)
    assert np.median(cloudy) > 1.5 * np.median(clear)
    rows, cols = cloudy.shape[0] // 64, cloudy.shape[1] // 64
    blocks = cloudy[: rows * 64, : cols * 64].reshape(rows, 64, cols, 64)
    means = np.median(blocks, axis=(1, 3))
    assert means.max() - means.min() > 0.2 * np.median(cloudy)  # lumpy, not flat


def test_wind_trailed_frame_has_elongated_stars(model: SkyModel, raws: list[np.ndarray]) -> None:
    angle = np.radians(model.defects(3)["trailed"]["angle_deg"])

    def elongation(i: int) -> tuple[float, float]:
        """Axis ratio and major-axis angle of the brightest isolated star's 5-sigma blob."""
        candidates = model.visible_stars(i, margin=22, min_peak_snr=60)
        index = _isolated(model, i, candidates, 24, ratio=0.2)
        assert len(index) > 0
        x, y = model.to_frame(i, model.star_xy[index[:1]])[0]
        r0, c0 = round(y), round(x)
        rows, cols = np.mgrid[-20:21, -20:21]
        box = raws[i][r0 - 20 : r0 + 21, c0 - 20 : c0 + 21].astype(np.float64)
        channel = _CFA_CHANNEL[(rows + r0) % 2, (cols + c0) % 2]
        for c in range(3):  # the sky has a colour: subtract it per CFA channel
            box[channel == c] -= np.median(box[channel == c])
        blobs, _ = ndimage.label(box > 5 * model.pixel_noise_e, np.ones((3, 3)))
        w = np.where(blobs == blobs[20, 20], box, 0.0)  # only the star's own blob
        mx, my = (w * cols).sum() / w.sum(), (w * rows).sum() / w.sum()
        cov = np.cov(np.stack([cols.ravel() - mx, rows.ravel() - my]), aweights=w.ravel())
        values, vectors = np.linalg.eigh(cov)
        major = vectors[:, 1]
        return float(np.sqrt(values[1] / values[0])), float(np.arctan2(major[1], major[0]))

    clean, _ = elongation(0)
    trailed, direction = elongation(3)
    assert clean < 1.3
    assert trailed > 2.0
    assert abs(np.sin(direction - angle)) < 0.1  # smeared along the recorded direction


def test_hot_pixels_are_fixed_and_exactly_where_recorded(
    model: SkyModel, raws: list[np.ndarray]
) -> None:
    cold = SkyModel(**{**model.parameters(), "hot_pixels": 0})
    x, y = model.hot_pixel_xy.T
    for i in (0, 2):
        difference = model.render(i, noise=False).astype(int) - cold.render(i, noise=False)
        hot = np.zeros(difference.shape, bool)
        hot[y, x] = True
        assert np.all(difference[~hot] == 0)
        unclipped = raws[i][y, x] < WHITE
        expected = np.minimum(model.hot_pixel_adu, WHITE - cold.render(i, noise=False)[y, x])
        assert np.array_equal(difference[y, x], expected)
        assert np.all(raws[i][y, x][unclipped] > BLACK + model.hot_pixel_adu[unclipped] - 30)
    assert len(x) == max(4, round(480 * 320 / 30_000))


def test_landscape_is_dark_static_and_has_lit_windows(
    model: SkyModel, raws: list[np.ndarray]
) -> None:
    top = model.landscape_top_row
    assert 0.8 * model.height < top < 0.95 * model.height
    covered = np.mean(model.height - model.skyline) / model.height
    assert 0.05 < covered < 0.11  # roughly the bottom 8 %
    rows = np.arange(model.height)[:, None]
    ground = rows > model.skyline[None, :] + 1.0
    for x0, y0, x1, y1 in model.windows_xyxy:
        ground[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = False
    ground[model.hot_pixel_xy[:, 1], model.hot_pixel_xy[:, 0]] = False
    for raw in raws:
        sky = np.median(raw[:top]) - BLACK
        assert np.median(raw[ground]) - BLACK < 0.05 * sky
        assert np.median(raw[-3:]) - BLACK < 0.05 * sky  # bottom rows: all ground
        for x0, y0, x1, y1 in model.windows_xyxy:
            assert raw[y0:y1, x0:x1].min() > BLACK + 2000
    assert len(model.windows_xyxy) == model.windows
    # the ground is the same in every frame while the stars move
    assert np.array_equal(raws[0][ground] > BLACK + 100, raws[1][ground] > BLACK + 100)


# ---- the whole night on disk -----------------------------------------------------------------


def test_simulate_night_writes_truth_first_then_decodable_frames(tmp_path: Path) -> None:
    outdir = tmp_path / "night"
    seen: list[tuple[int, Path, bool]] = []

    def progress(i: int, path: Path) -> None:
        seen.append((i, path, (outdir / "truth.json").is_file()))

    start = time.monotonic()
    truth_path = simulate_night(
        outdir, frames=3, width=256, height=192, seed=5, interval_s=0.2, satellite=1,
        cloudy=[2], stars=80, progress=progress,
    )  # fmt: skip
    assert time.monotonic() - start >= 0.4  # slept between frames like a camera
    assert truth_path == outdir / "truth.json"
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[2] for s in seen)
    assert sorted(p.name for p in outdir.iterdir()) == [
        "IMG_0000.DNG", "IMG_0001.DNG", "IMG_0002.DNG", "truth.json",
    ]  # fmt: skip
    truth = json.loads(truth_path.read_text())
    model = SkyModel.from_truth(truth_path)
    assert model.seed == truth["seed"] == 5 and model.satellite == (1,) and model.cloudy == (2,)
    assert truth["landscape"]["top_row"] == model.landscape_top_row
    assert truth["psf"]["fwhm_px"] == 3.5
    assert len(truth["stars"]["x"]) == len(model.star_xy)
    assert set(truth["stars"]) >= {"x", "y", "flux_e", "peak_snr", "snr", "saturated"}
    assert [f["defects"] for f in truth["frames"]] == [[], ["satellite"], ["cloudy"]]
    assert truth["frames"][1]["satellite"]["start"] == model.defects(1)["satellite"]["start"]
    times = []
    for i, frame in enumerate(truth["frames"]):
        assert frame["file"] == f"IMG_{i:04d}.DNG"
        np.testing.assert_allclose(frame["matrix"], model.transform(i), rtol=0, atol=1e-12)
        with rawpy.imread(str(outdir / frame["file"])) as raw:
            assert np.array_equal(raw.raw_image_visible, model.render(i))
            assert raw.other.shutter_speed == frame["exposure_s"] == 30.0
            assert raw.other.iso_speed == frame["iso"] == 1600
            assert raw.other.timestamp == datetime.fromisoformat(frame["capture_time"])
            times.append(raw.other.timestamp)
    assert (times[1] - times[0]).total_seconds() == 32.0


@pytest.mark.slow
def test_a_full_size_frame_renders() -> None:
    big = SkyModel(width=6000, height=4000, stars=3000, frames=10, trailed=1)
    raw = big.render(1)
    assert raw.shape == (4000, 6000) and raw.dtype == np.uint16


# ---- a changing night: sky level, moon glow, transparency -------------------------------------


def _decoded(truth_path: Path, i: int) -> np.ndarray:
    """Frame i of a simulated night decoded by LibRaw like ``nightstack.io.loaders.load`` does
    (linear AHD, camera white balance), but with LibRaw's ``adjust_maximum_thr`` off, then
    converted to electrons above black: (rows, cols, 3) float64.

    LibRaw by default rescales a frame whose brightest pixel lies between 0.75 and 1 of the
    white level as if that pixel were white, which changes a frame's scale with its content
    (a hazy frame with no saturated star comes out up to 1.33x brighter); the truth is
    checked without that rescaling.
    """
    truth = json.loads(truth_path.read_text())
    with rawpy.imread(str(truth_path.parent / truth["frames"][i]["file"])) as raw:
        rgb = raw.postprocess(**POSTPROCESS, adjust_maximum_thr=0.0)
    span = (truth["white_level"] - truth["black_level"]) * truth["gain_e_per_adu"]
    return rgb.astype(np.float64) * (span / 65535.0)


def test_sky_step_and_ramp_helpers() -> None:
    assert sky_step(5, 2, 1.4) == [1.0, 1.0, 1.4, 1.4, 1.4]
    assert sky_ramp(5, 2.0) == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0])
    assert sky_ramp(1, 3.0) == [1.0]
    with pytest.raises(ValueError, match="sky_levels needs 4 values"):
        SkyModel(frames=4, sky_levels=(1.0, 2.0))
    with pytest.raises(ValueError, match="transparency values must be in"):
        SkyModel(frames=2, transparency=(1.0, 1.2))


def test_decoded_sky_level_follows_the_schedule(tmp_path: Path) -> None:
    levels = [1.0, 1.0, 1.4, 2.0]
    truth_path = simulate_night(
        tmp_path, frames=4, width=320, height=214, seed=8, stars=40, nebula=False,
        sky_levels=levels,
    )  # fmt: skip
    truth = json.loads(truth_path.read_text())
    model = SkyModel.from_truth(truth)
    assert truth["schema"] == 2
    assert [f["sky_level"] for f in truth["frames"]] == levels
    sky = (slice(8, model.landscape_top_row - 8), slice(8, -8))
    medians = []
    for i in range(4):
        image = _decoded(truth_path, i)
        surface = model.sky_surface(i)
        for c in range(3):
            measured = np.median(image[sky][..., c])
            expected = np.median(surface[sky]) * SKY_RGB[c]
            assert measured == pytest.approx(expected, rel=0.01)  # faint stars: < 1 % bias
        medians.append(np.median(image[sky][..., 1]))
    assert np.array(medians) / medians[0] == pytest.approx(levels, rel=0.01)


def test_moon_glow_is_the_recorded_smooth_surface(tmp_path: Path) -> None:
    glow = [0.0, 0.3, 0.6]
    truth_path = simulate_night(
        tmp_path, frames=3, width=320, height=214, seed=9, stars=30, nebula=False, glow=glow,
        sky_levels=[1.0, 1.2, 1.2],
    )  # fmt: skip
    truth = json.loads(truth_path.read_text())
    model = SkyModel.from_truth(truth)
    records = [f["glow"] for f in truth["frames"]]
    assert [g["amplitude"] for g in records] == glow
    assert records[0]["centre"] != records[2]["centre"]  # the moon moves over the night
    top = model.landscape_top_row - 8
    ys, xs = np.mgrid[0:214, 0:320]
    for i, g in enumerate(records):
        # rebuild the surface from truth.json alone
        d2 = (xs - g["centre"][0]) ** 2 + (ys - g["centre"][1]) ** 2
        shape = np.exp(-(d2 - g["near_px"] ** 2) / (2 * g["scale_px"] ** 2))
        glow_e = g["amplitude"] * truth["sky_e"] * truth["frames"][i]["sky_level"] * shape
        without = SkyModel(**{**model.parameters(), "glow": ()}).sky_at(i, xs, ys)
        np.testing.assert_allclose(model.sky_at(i, xs, ys) - glow_e, without, rtol=1e-9)
        assert shape.max() == pytest.approx(1.0, abs=1e-3)  # 1 at the brightest point
        # the decoded frame carries that surface: 16x16 block medians of green
        image = _decoded(truth_path, i)[:top, :, 1]
        expected = model.sky_surface(i)[:top]
        rows, cols = top // 16, 320 // 16
        block = (slice(0, rows * 16), slice(0, cols * 16))
        measured = np.median(image[block].reshape(rows, 16, cols, 16), axis=(1, 3))
        want = expected[block].reshape(rows, 16, cols, 16).mean(axis=(1, 3))
        residual = measured - want
        assert np.median(np.abs(residual)) < 3.0  # electrons: block noise ~ 25 / 16 * 1.25
    # the reference grid: frame i's sky seen through its transform
    on_reference = model.sky_surface(2, grid="reference")
    q = np.array([[100.0, 50.0], [250.0, 150.0]])
    p = model.to_frame(2, q)
    for (qx, qy), (px, py) in zip(q.astype(int), p, strict=True):
        assert on_reference[qy, qx] == pytest.approx(float(model.sky_at(2, px, py)), rel=1e-12)
    ys, xs = np.mgrid[0:214, 0:320]
    np.testing.assert_allclose(model.sky_surface(2), model.sky_at(2, xs, ys), rtol=1e-5)


def test_glow_is_well_fitted_by_a_low_order_surface() -> None:
    """What a 'gradient' normalization must represent: a quadratic leaves < 2 % of the glow."""
    model = SkyModel(width=480, height=320, frames=2, gradient=0.0, glow=(0.5, 0.5))
    glow = model.sky_surface(1) - model.sky_e
    ys, xs = np.mgrid[0:320, 0:480] / 480.0
    terms = np.stack([(xs**p * ys**q).ravel() for p in range(3) for q in range(3 - p)], 1)
    coef, *_ = np.linalg.lstsq(terms, glow.ravel(), rcond=None)
    residual = glow.ravel() - terms @ coef
    assert glow.max() - glow.min() > 0.3 * 0.5 * model.sky_e  # a real gradient
    assert np.abs(residual).max() < 0.02 * 0.5 * model.sky_e


def _aperture_fluxes(image: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    """Background-subtracted sums of (rows, cols) ``image`` in a circle of ``radius`` px around
    each (x, y), background the median of an annulus 2 to 3 radii out."""
    reach = math.ceil(3 * radius)
    rows, cols = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    out = []
    for x, y in xy:
        r0, c0 = round(y), round(x)
        box = image[r0 - reach : r0 + reach + 1, c0 - reach : c0 + reach + 1]
        d = np.hypot(cols + c0 - x, rows + r0 - y)
        sky = np.median(box[(d >= 2 * radius) & (d <= 3 * radius)])
        out.append((box[d <= radius] - sky).sum())
    return np.array(out)


def test_transparency_scales_star_fluxes_not_the_sky(tmp_path: Path) -> None:
    transparency = [1.0, 0.85, 0.3]
    truth_path = simulate_night(
        tmp_path, frames=3, width=480, height=320, seed=12, stars=150, nebula=False,
        transparency=transparency,
    )  # fmt: skip
    truth = json.loads(truth_path.read_text())
    model = SkyModel.from_truth(truth)
    assert [f["transparency"] for f in truth["frames"]] == transparency
    both = np.intersect1d(model.visible_stars(0, margin=20), model.visible_stars(2, margin=20))
    index = _isolated(model, 0, both[model.star_peak_snr[both] > 40], 20)
    assert len(index) >= 5
    green = [_decoded(truth_path, i)[..., 1] for i in range(3)]
    flux = [
        _aperture_fluxes(green[i], model.to_frame(i, model.star_xy[index]), 6) for i in range(3)
    ]
    for i in (1, 2):
        ratio = np.median(flux[i] / flux[0])
        assert ratio == pytest.approx(transparency[i], rel=0.03)
        _, expected = model.stars_in_frame(i)
        np.testing.assert_allclose(
            expected, model.star_flux_e[model.visible_stars(i)] * transparency[i], rtol=1e-12
        )
    sky = (slice(8, model.landscape_top_row - 8), slice(8, -8))
    assert np.median(green[2][sky]) == pytest.approx(np.median(green[0][sky]), rel=0.01)


# ---- CFA patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_dng_cfa_pattern_tag_decodes_as_written(tmp_path: Path, pattern: str) -> None:
    cfa = np.full((64, 64), 600, dtype=np.uint16)
    r, c = divmod(pattern.index("R"), 2)
    cfa[r::2, c::2] = 8000  # light on the red sites only
    write_dng(tmp_path / "p.dng", cfa, cfa_pattern=pattern)
    with rawpy.imread(str(tmp_path / "p.dng")) as raw:
        desc = raw.color_desc.decode()
        assert "".join(desc[k] for k in raw.raw_pattern.ravel()) == pattern
        rgb = raw.postprocess(**POSTPROCESS).astype(np.float64)
    mean = rgb[16:48, 16:48].reshape(-1, 3).mean(axis=0)
    assert mean[0] > 50 * max(mean[1], mean[2])  # decoded red, nothing else
    with pytest.raises(ValueError, match="cfa_pattern"):
        write_dng(tmp_path / "q.dng", cfa, cfa_pattern="RGBG")


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_each_colour_is_rendered_on_its_own_sites(pattern: str) -> None:
    flat = SkyModel(
        width=128, height=128, stars=0, nebula=False, gradient=0.0, landscape_fraction=0.0,
        hot_pixels=0, cfa_pattern=pattern,
    )  # fmt: skip
    expected = flat.render(0, noise=False).astype(np.float64) - BLACK
    for k, colour in enumerate(pattern):
        r, c = divmod(k, 2)
        weight = SKY_RGB["RGB".index(colour)]
        assert np.all(expected[r::2, c::2] == round(weight * flat.sky_e))


def _star_colour(image: np.ndarray, x: float, y: float, radius: int = 5) -> np.ndarray:
    """Background-subtracted (r, g, b) sums of a decoded (rows, cols, 3) image in a circle of
    ``radius`` px at (x, y); background the median beyond 1.5 radii in a (4 radius + 1) box."""
    r0, c0 = round(y), round(x)
    box = image[r0 - 2 * radius : r0 + 2 * radius + 1, c0 - 2 * radius : c0 + 2 * radius + 1]
    rows, cols = np.mgrid[-2 * radius : 2 * radius + 1, -2 * radius : 2 * radius + 1]
    d = np.hypot(rows, cols)
    sky = np.median(box[d > 1.5 * radius], axis=0)
    return (box[d <= radius].astype(np.float64) - sky).sum(axis=0)


def _mosaic_colour(
    mosaic: np.ndarray, channel: np.ndarray, x: float, y: float, radius: int
) -> np.ndarray:
    """A star's (r, g, b) light in a raw (rows, cols) mosaic whose sites have colour index
    ``channel``: per colour, the sum over its sites in a circle of ``radius`` px less their
    sky (median of its sites beyond 1.5 radii), scaled to a full plane (x4 red and blue, x2
    green)."""
    r0, c0 = round(y), round(x)
    window = (
        slice(r0 - 2 * radius, r0 + 2 * radius + 1),
        slice(c0 - 2 * radius, c0 + 2 * radius + 1),
    )
    rows, cols = np.mgrid[-2 * radius : 2 * radius + 1, -2 * radius : 2 * radius + 1]
    d = np.hypot(rows, cols)
    out = []
    for c, sites in enumerate((4, 2, 4)):
        on = channel[window] == c
        sky = np.median(mosaic[window][on & (d > 1.5 * radius)])
        out.append((mosaic[window][on & (d <= radius)] - sky).sum() * sites)
    return np.array(out)


RED, BLUE = (1.4, 1.0, 0.6), (0.6, 1.0, 1.4)  # colour weights of two planted stars
PLANTED = ((100.3, 80.6, 80_000.0, *RED), (220.7, 120.2, 80_000.0, *BLUE))  # peak SNR ~ 230


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_red_star_decodes_red_and_blue_star_blue_for_every_pattern(
    tmp_path: Path, pattern: str
) -> None:
    night = SkyModel(
        width=320, height=214, frames=1, seed=4, stars=60, nebula=False, cfa_pattern=pattern,
        planted_stars=PLANTED,
    )  # fmt: skip
    path = write_dng(tmp_path / "IMG.DNG", night.render(0), cfa_pattern=night.cfa_pattern)
    truth = night.truth()
    assert truth["cfa_pattern"] == pattern
    stars = np.array([truth["stars"]["x"], truth["stars"]["y"]]).T
    with rawpy.imread(str(path)) as raw:  # LibRaw's own reading of the CFAPattern tag
        desc = raw.color_desc.decode()
        channel = np.array(["RGB".index(desc[k]) for k in range(4)])[raw.raw_colors_visible]
        mosaic = raw.raw_image_visible.astype(np.float64) - BLACK
    image = load(path).image
    for (x, y, _, *colour), order in zip(PLANTED, ([0, 1, 2], [2, 1, 0]), strict=True):
        k = int(np.argmin(np.hypot(*(stars - (x, y)).T)))
        assert truth["stars"]["rgb"][k] == pytest.approx(colour)  # in the truth like any star
        # in the mosaic: each colour's light on the sites LibRaw takes for that colour
        light = _mosaic_colour(mosaic, channel, x, y, radius=7)
        np.testing.assert_allclose(light / light[1], colour, rtol=0.05)  # noise: ~2 %
        # decoded by nightstack's loader (LibRaw AHD): the colour order, ratios within 15 %
        rgb = _star_colour(image, x, y)
        assert rgb[order[0]] > rgb[order[1]] > rgb[order[2]], (pattern, rgb)
        np.testing.assert_allclose(rgb / rgb[1], colour, rtol=0.15)  # AHD errs ~10 % on stars
        pixel = image[round(y), round(x)]
        assert pixel[order[0]] > pixel[order[1]] > pixel[order[2]]  # the sky left in too
    # the same pixels under another pattern's tag decode to other colours: the test can fail
    other = "GBRG" if pattern == "RGGB" else "RGGB"
    write_dng(tmp_path / "wrong.dng", night.render(0), cfa_pattern=other)
    rgb = _star_colour(load(tmp_path / "wrong.dng").image, *PLANTED[0][:2])
    assert not rgb[0] > rgb[1] > rgb[2]


def test_simulate_night_writes_the_pattern_it_rendered(tmp_path: Path) -> None:
    truth_path = simulate_night(
        tmp_path, frames=1, width=128, height=96, stars=10, cfa_pattern="GRBG"
    )
    truth = json.loads(truth_path.read_text())
    assert truth["cfa_pattern"] == "GRBG"
    model = SkyModel.from_truth(truth)
    with rawpy.imread(str(tmp_path / truth["frames"][0]["file"])) as raw:
        desc = raw.color_desc.decode()
        assert "".join(desc[k] for k in raw.raw_pattern.ravel()) == "GRBG"
        assert np.array_equal(raw.raw_image_visible, model.render(0))
    with pytest.raises(ValueError, match="cfa_pattern"):
        SkyModel(cfa_pattern="RGBW")


# ---- seeing ---------------------------------------------------------------------------------


def _fitted_fwhm(image: np.ndarray, x: float, y: float, half: int = 9) -> float:
    """FWHM (px) of a circular Gaussian + constant fitted to a (2 half + 1) box of a
    (rows, cols) image at (x, y), corrected for the pixel's own width (variance 1/12)."""
    r0, c0 = round(y), round(x)
    box = image[r0 - half : r0 + half + 1, c0 - half : c0 + half + 1].astype(np.float64)
    rows, cols = np.mgrid[r0 - half : r0 + half + 1, c0 - half : c0 + half + 1]

    def residual(p: np.ndarray) -> np.ndarray:
        amplitude, cx, cy, sigma, sky = p
        model = amplitude * np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * sigma**2))
        return (model + sky - box).ravel()

    start = [box.max() - np.median(box), x, y, 1.5, np.median(box)]
    fit = optimize.least_squares(residual, start)
    sigma2 = fit.x[3] ** 2 - 1 / 12
    return float(np.sqrt(sigma2) * 2 * np.sqrt(2 * np.log(2)))


def test_seeing_schedule_is_the_fwhm_measured_on_decoded_frames(tmp_path: Path) -> None:
    schedule = [3.0, 4.5, 6.0]
    truth_path = simulate_night(
        tmp_path, frames=3, width=480, height=320, seed=14, stars=150, nebula=False,
        fwhm_schedule=schedule,
    )  # fmt: skip
    truth = json.loads(truth_path.read_text())
    assert [f["fwhm_px"] for f in truth["frames"]] == schedule
    model = SkyModel.from_truth(truth)
    for i, fwhm in enumerate(schedule):
        candidates = model.visible_stars(i, margin=14, min_peak_snr=30)
        index = _isolated(model, i, candidates, 16)
        assert len(index) >= 4
        green = _decoded(truth_path, i)[..., 1]
        measured = [_fitted_fwhm(green, *xy) for xy in model.to_frame(i, model.star_xy[index])]
        assert np.median(measured) == pytest.approx(fwhm, rel=0.04)


def test_seeing_jitter_is_seeded_and_wanders_around_the_fwhm() -> None:
    a = seeing_jitter(400, 3.5, 0.15, seed=2)
    assert a == seeing_jitter(400, 3.5, 0.15, seed=2)
    assert a != seeing_jitter(400, 3.5, 0.15, seed=3)
    log = np.log(np.array(a) / 3.5)
    assert np.std(log) == pytest.approx(0.15, rel=0.2)
    assert abs(np.mean(log)) < 0.05
    assert 0.4 < np.corrcoef(log[:-1], log[1:])[0, 1] < 0.8  # drifts, not white noise
    assert SkyModel(frames=3, fwhm_schedule=a[:3]).fwhm(2) == a[2]


# ---- dense fields ---------------------------------------------------------------------------


def test_dense_field_has_the_requested_stars_and_conserves_their_light() -> None:
    dense = SkyModel(
        width=1600, height=1066, frames=2, seed=6, stars=5000, landscape_fraction=0.0,
        nebula=False,
    )  # fmt: skip
    truth = dense.truth()
    x, y = np.array(truth["stars"]["x"]), np.array(truth["stars"]["y"])
    inside = (x >= -0.5) & (x < 1599.5) & (y >= -0.5) & (y < 1065.5)
    assert abs(inside.sum() - 5000) < 4 * np.sqrt(5000)  # Poisson
    stars = dense.electrons(1).astype(np.float64)
    stars -= SkyModel(**{**dense.parameters(), "stars": 0}).electrons(1)
    # oracle: each star's flux x its mean site weight x the part of its PSF inside the frame
    fx, fy = dense.to_frame(1, dense.star_xy).T
    s = np.sqrt(2) * dense.psf_sigma(1)

    def inside_1d(c: np.ndarray, n: int) -> np.ndarray:
        return 0.5 * (special.erf((n - 0.5 - c) / s) - special.erf((-0.5 - c) / s))

    weight = dense.star_rgb @ np.array([0.25, 0.5, 0.25])  # R, G, G, B sites
    expected = dense.star_flux_e * weight * inside_1d(fx, 1600) * inside_1d(fy, 1066)
    assert stars.sum() == pytest.approx(expected.sum(), rel=1e-4)


def test_milky_way_band_concentrates_stars() -> None:
    sky = SkyModel(width=1600, height=1066, frames=1, seed=6, stars=500, milky_way=10.0)
    band = sky.truth()["milky_way"]
    assert band["contrast"] == 10.0
    angle = np.radians(band["angle_deg"])

    def distance(xy: np.ndarray) -> np.ndarray:  # from the band's centre line, px
        dx, dy = xy[:, 0] - band["point"][0], xy[:, 1] - band["point"][1]
        return np.abs(dy * np.cos(angle) - dx * np.sin(angle)) / band["sigma_px"]

    x0, y0, x1, y1 = sky.sky_region
    area = np.random.default_rng(0).uniform((x0, y0), (x1, y1), (400_000, 2))  # Monte Carlo
    d_star, d_area = distance(sky.star_xy), distance(area)
    on, off = (d_star < 0.3, d_area < 0.3), (d_star > 3, d_area > 3)
    density_on = on[0].sum() / on[1].mean()
    density_off = off[0].sum() / off[1].mean()
    assert 9 < density_on / density_off < 13  # 1 + 10 x 0.99 on the centre line
    plain = SkyModel(width=1600, height=1066, frames=1, seed=6, stars=500)
    assert len(plain.star_xy) < 0.5 * len(sky.star_xy)


@pytest.mark.slow
def test_a_dense_full_size_frame_renders() -> None:
    big = SkyModel(width=6000, height=4000, stars=5000, frames=10, milky_way=5.0)
    raw = big.render(1)
    assert raw.shape == (4000, 6000) and len(big.visible_stars(1)) > 10_000


# ---- the command line -----------------------------------------------------------------------


def test_simulate_command_builds_the_changing_night(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "simulate", str(tmp_path), "--frames", "6", "--width", "128", "--height", "96",
        "--stars", "20", "--seed", "3", "--sky-ramp", "1.5", "--sky-step", "3:1.4",
        "--glow", "0.1:0.3", "--haze", "2:0.3,4:0.85", "--haze", "5:0.9",
        "--seeing-jitter", "0.1", "--cfa", "BGGR", "--satellite", "1,4", "--milky-way", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 6 frames" in capsys.readouterr().out
    truth = json.loads((tmp_path / "truth.json").read_text())
    frames = truth["frames"]
    ramp = sky_ramp(6, 1.5)
    expected_levels = [r * (1.4 if i >= 3 else 1.0) for i, r in enumerate(ramp)]
    assert [f["sky_level"] for f in frames] == pytest.approx(expected_levels)
    assert [f["glow"]["amplitude"] for f in frames] == pytest.approx(
        [0.1, 0.14, 0.18, 0.22, 0.26, 0.3]
    )
    assert [f["transparency"] for f in frames] == [1.0, 1.0, 0.3, 1.0, 0.85, 0.9]
    assert [f["fwhm_px"] for f in frames] == seeing_jitter(6, 3.5, 0.1, seed=3)
    assert [f["defects"] for f in frames][1] == ["satellite"] and "satellite" in frames[4]
    assert truth["cfa_pattern"] == "BGGR" and truth["milky_way"]["contrast"] == 2.0
    with rawpy.imread(str(tmp_path / frames[5]["file"])) as raw:
        desc = raw.color_desc.decode()
        assert "".join(desc[k] for k in raw.raw_pattern.ravel()) == "BGGR"
        assert np.array_equal(raw.raw_image_visible, SkyModel.from_truth(truth).render(5))


def test_simulate_command_defaults_are_the_plain_night(tmp_path: Path) -> None:
    assert main(["simulate", str(tmp_path / "a"), "--frames", "2", "--width", "128",
                 "--height", "96", "--satellite", "1"]) == 0  # fmt: skip
    simulate_night(tmp_path / "b", frames=2, width=128, height=96, satellite=1)
    for name in ("truth.json", "IMG_0000.DNG", "IMG_0001.DNG"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_simulate_command_refuses_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["simulate", str(tmp_path), "--frames", "4", "--width", "128", "--height", "96"]
    assert main([*base, "--haze", "7:0.3"]) == 2
    assert "--haze frame 7 is outside 0..3" in capsys.readouterr().err
    assert main([*base, "--seeing", "3,4"]) == 2
    assert "fwhm_schedule needs 4 values" in capsys.readouterr().err
    assert main([*base, "--haze", "1:1.5"]) == 2
    assert "transparency values must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--sky-step", "8"])  # argparse: not FRAME:VALUE
    assert "expected FRAME:VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--cfa", "RGBW"])
    assert not (tmp_path / "truth.json").exists()
