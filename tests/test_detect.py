"""StarFinder against synthetic fields with known stars (tests/_sky.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from _sky import BIN, Field, Psf, catalogue, render
from nightstack.frames import Stars
from nightstack.registration.detect import StarFinder

SHAPE = (1200, 1800)  # full-resolution rows, cols (binned 600 x 900)
MATCH_PX = 1.5  # a detection within this many full-res px of a true star is that star
MIN_SEPARATION_FULL_PX = 2.5 * 4.0  # DAOFind's default minimum separation, 2.5 FWHM


def _field(seed: int, n: int = 300, **kwargs: object) -> Field:
    rng = np.random.default_rng(seed)
    xy, flux = catalogue(rng, n, SHAPE[1] - 20, SHAPE[0] - 20, x0=10, y0=10)
    return render(xy, flux, SHAPE, seed=seed, **kwargs)  # type: ignore[arg-type]


def _detectable(field: Field) -> np.ndarray:
    """True stars in the sky rows (top 90 %, the default mask) with no other true star within
    DAOFind's minimum separation."""
    dist = cKDTree(field.xy).query(field.xy, k=2)[0][:, 1]
    return (dist > MIN_SEPARATION_FULL_PX) & (field.xy[:, 1] < 0.9 * field.shape[0] - 1)


def _nearest(stars: Stars, field: Field) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each true star to the nearest detection, and that detection's index."""
    dist, index = cKDTree(stars.xy).query(field.xy)
    return dist, index


@pytest.fixture(scope="module")
def clean() -> tuple[Field, Stars]:
    field = _field(1)
    return field, StarFinder()(field.luminance, BIN)


def test_finds_bright_stars_with_centroids_at_the_noise_limit(clean: tuple[Field, Stars]) -> None:
    field, stars = clean
    bright = (field.peak_snr >= 10) & _detectable(field)
    dist, index = _nearest(stars, field)
    found = bright & (dist < MATCH_PX)
    assert bright.sum() >= 150
    assert found.sum() >= 0.9 * bright.sum()

    error = stars.xy[index[found]] - field.xy[found]
    per_axis_rms = math.sqrt(np.mean(error**2))
    assert per_axis_rms <= 0.1  # full-res px, stars above 10 sigma
    assert np.all(np.abs(error.mean(axis=0)) < 0.02)  # no bias

    # Cramer-Rao bound of a Gaussian star in white sky noise, per axis, full-res px:
    # sqrt(2 / pi) * noise / peak binned px, x2 to full resolution
    snr = field.peak_snr[found]
    bound = 2.0 * math.sqrt(2.0 / math.pi) / snr
    for lo, hi in [(10, 20), (20, 50), (50, 1e9)]:
        sel = (snr >= lo) & (snr < hi)
        assert sel.sum() >= 20
        rms = math.sqrt(np.mean(error[sel] ** 2))
        assert rms <= 1.35 * math.sqrt(np.mean(bound[sel] ** 2)), (lo, rms)


def test_no_false_stars_and_brightest_first(clean: tuple[Field, Stars]) -> None:
    field, stars = clean
    dist = cKDTree(field.xy).query(stars.xy)[0]
    assert np.all(dist < MATCH_PX)
    assert np.all(np.diff(stars.flux) <= 0)
    assert stars.xy.shape == (len(stars), 2) and stars.xy.dtype == np.float64


def test_summaries_of_a_round_gaussian_field(clean: tuple[Field, Stars]) -> None:
    field, stars = clean
    assert stars.fwhm_px == pytest.approx(4.0, rel=0.03)
    assert 1.0 <= stars.elongation < 1.1
    assert 0.0 <= stars.roundness < 0.15
    assert stars.noise == pytest.approx(field.noise, rel=0.05)
    assert stars.background == pytest.approx(field.sky, rel=0.01)


def test_gradient_hot_pixels_and_landscape() -> None:
    windows = np.array([[200.0, 1140.0], [700.0, 1160.0], [1500.0, 1130.0], [1701.0, 1175.0]])
    field = _field(
        2,
        gradient=(0.8, 0.6),
        hot_pixels=60,
        landscape_rows=SHAPE[0] // 10,
        windows=windows,
    )
    stars = StarFinder()(field.luminance, BIN)

    bright = (field.peak_snr >= 10) & _detectable(field)
    dist, _ = _nearest(stars, field)
    assert np.count_nonzero(bright & (dist < MATCH_PX)) >= 0.9 * bright.sum()
    assert np.all(cKDTree(field.xy).query(stars.xy)[0] < MATCH_PX)  # nothing false
    assert stars.noise == pytest.approx(field.noise, rel=0.05)  # the gradient is removed
    # nothing in the landscape: not the lit windows, not a star
    assert np.all(stars.xy[:, 1] < 0.9 * SHAPE[0])
    # no hot pixel (one bright CFA pixel) is a star, unless a real star is there too
    star_free = cKDTree(field.xy).query(field.hot)[0] > 3
    near_hot = cKDTree(stars.xy).query(field.hot[star_free])[0]
    assert star_free.sum() >= 50
    assert np.all(near_hot > 2)


@pytest.mark.parametrize("binned_sigma", [12.5, 125.0, 1000.0])
def test_hot_pixels_alone_are_not_stars(binned_sigma: float) -> None:
    """One hot CFA pixel makes one sharp superpixel: DAOFind's sharpness limit rejects it."""
    noise = 0.002  # full-res; binned noise is half, and a CFA pixel is a quarter of a superpixel
    rng = np.random.default_rng(10)
    gy, gx = np.mgrid[20 : SHAPE[0] - 150 : 50, 20 : SHAPE[1] - 20 : 50]  # isolated, any CFA site
    hot = np.column_stack([gx.ravel(), gy.ravel()]) + rng.integers(0, 20, (gx.size, 2))
    field = render(
        np.zeros((0, 2)), np.zeros(0), SHAPE, hot_xy=hot, hot_value=binned_sigma * 2 * noise
    )
    assert len(hot) >= 300
    assert len(StarFinder()(field.luminance, BIN)) == 0


def test_landscape_windows_are_stars_when_the_mask_is_off() -> None:
    """The windows are star-like: only the mask keeps them out."""
    windows = np.array([[300.0, 1150.0], [900.0, 1140.0]])
    field = _field(3, n=50, landscape_rows=SHAPE[0] // 10, windows=windows)
    stars = StarFinder(landscape_mask_ratio=1.0)(field.luminance, BIN)
    assert np.all(cKDTree(stars.xy).query(windows)[0] < 1.0)
    masked = StarFinder(landscape_mask_ratio=0.9)(field.luminance, BIN)
    assert np.all(cKDTree(masked.xy).query(windows)[0] > 10)


def test_sky_mask_keeps_stars_out_of_a_tree() -> None:
    field = _field(4, n=200)
    sky_mask = np.ones(SHAPE, dtype=bool)
    sky_mask[:, :500] = False  # a tree on the left
    stars = StarFinder(sky_mask=sky_mask)(field.luminance, BIN)
    assert np.all(stars.xy[:, 0] >= 499.5)
    bright = (field.peak_snr >= 10) & _detectable(field) & (field.xy[:, 0] > 510)
    dist, _ = _nearest(stars, field)
    assert np.count_nonzero(bright & (dist < MATCH_PX)) >= 0.9 * bright.sum()
    with pytest.raises(ValueError, match="sky_mask shape"):
        StarFinder(sky_mask=np.ones((100, 100), dtype=bool))(field.luminance, BIN)


@pytest.mark.parametrize(
    ("psf", "tolerance"),
    [
        (Psf(fwhm=2.5), 0.05),
        (Psf(fwhm=3.0), 0.05),
        (Psf(fwhm=6.0), 0.05),
        (Psf(fwhm=8.0), 0.05),
        (Psf(fwhm=4.0, kind="moffat", beta=4.5), 0.10),
        # a Gaussian fit reads a Moffat's wings as width: beta 3 measures ~13 % wide
        (Psf(fwhm=4.0, kind="moffat", beta=3.0), 0.15),
    ],
)
def test_fwhm_matches_truth(psf: Psf, tolerance: float) -> None:
    rng = np.random.default_rng(5)
    xy, flux = catalogue(rng, 150, SHAPE[1] - 40, SHAPE[0] - 40, x0=20, y0=20, fwhm=psf.fwhm)
    stars = StarFinder()(render(xy, flux, SHAPE, psf=psf, seed=5).luminance, BIN)
    assert len(stars) >= 80
    assert stars.fwhm_px == pytest.approx(psf.fwhm, rel=tolerance)
    assert stars.elongation < 1.12


def test_saturated_stars_do_not_widen_the_fwhm() -> None:
    rng = np.random.default_rng(6)
    xy, flux = catalogue(rng, 150, SHAPE[1] - 40, SHAPE[0] - 40, x0=20, y0=20)
    flux[:60] *= 200  # 60 stars far above the clip level
    field = render(xy, flux, SHAPE, seed=6)
    clipped = np.minimum(field.luminance, 0.3 * field.luminance.max())
    stars = StarFinder()(clipped, BIN)
    assert stars.fwhm_px == pytest.approx(4.0, rel=0.05)


def test_elongated_and_trailed_fields() -> None:
    rng = np.random.default_rng(7)
    xy, flux = catalogue(rng, 150, SHAPE[1] - 60, SHAPE[0] - 60, x0=30, y0=30, snr_min=15)
    finder = StarFinder()
    round_stars = finder(render(xy, flux, SHAPE, seed=7).luminance, BIN)
    oval = Psf(fwhm=4.0, ratio=1.5, angle_deg=70)
    oval_stars = finder(render(xy, flux, SHAPE, psf=oval, seed=7).luminance, BIN)
    trail = Psf(fwhm=4.0, trail_px=10.0, angle_deg=30)
    trailed = finder(render(xy, flux, SHAPE, psf=trail, seed=7).luminance, BIN)
    assert round_stars.elongation < 1.1
    assert oval_stars.elongation == pytest.approx(1.5, abs=0.1)
    assert trailed.elongation > 1.8  # second-moment truth 1.98
    assert trailed.roundness > 3 * round_stars.roundness
    assert len(trailed) >= 40


def test_empty_sky_gives_no_stars_but_measures_the_sky() -> None:
    field = render(np.zeros((0, 2)), np.zeros(0), (400, 600), seed=8)
    stars = StarFinder()(field.luminance, BIN)
    assert len(stars) == 0 and stars.xy.shape == (0, 2)
    assert math.isnan(stars.fwhm_px) and math.isnan(stars.elongation)
    assert stars.noise == pytest.approx(field.noise, rel=0.05)
    flat = StarFinder()(np.full((200, 300), 0.1, dtype=np.float32), BIN)
    assert len(flat) == 0


def test_max_stars_keeps_the_brightest(clean: tuple[Field, Stars]) -> None:
    field, stars = clean
    few = StarFinder(max_stars=20)(field.luminance, BIN)
    assert len(few) == 20
    np.testing.assert_allclose(few.xy, stars.xy[:20], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [{"fwhm_px": 0}, {"threshold_sigma": -1}, {"landscape_mask_ratio": 0}, {"max_stars": 0}],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StarFinder(**kwargs)  # type: ignore[arg-type]


def test_a_24_megapixel_frame_keeps_its_brightest_stars() -> None:
    """A 6000 x 4000 frame's 3000 x 2000 luminance: ``max_stars`` found (the time is the
    pipeline benchmark's, never a unit test's)."""
    rng = np.random.default_rng(9)
    xy, flux = catalogue(rng, 120, 1480, 980, x0=10, y0=10)
    tile = render(xy, flux, (1000, 1500), seed=9, gradient=(0.3, 0.2)).luminance
    luminance = np.ascontiguousarray(np.tile(tile, (4, 4))[:2000, :3000])
    finder = StarFinder()
    stars = finder(luminance, BIN)
    assert len(stars) == 500
    assert np.all(np.diff(stars.flux) <= 0)  # the brightest, brightest first
    tiles = [(1500.0 * j, 1000.0 * i) for i in range(4) for j in range(4)]
    truth = np.concatenate([xy + offset for offset in tiles])
    assert np.all(cKDTree(truth).query(stars.xy)[0] < 1.5)  # every one a true star
