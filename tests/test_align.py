"""align() against known transforms: star catalogues, rendered frames, and a real sequence."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from _sky import BIN, apply, catalogue, invert, render, similarity, transform_error
from nightstack.errors import AlignmentError
from nightstack.frames import Alignment, Stars
from nightstack.registration.align import align
from nightstack.registration.detect import StarFinder

WIDTH, HEIGHT = 1800.0, 1200.0  # full-res frame (catalogue tests)
CENTRE = (WIDTH / 2, HEIGHT / 2)
REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
M27 = REALDATA / "seq_als_m27_asi224mc"


def _stars(xy: np.ndarray) -> Stars:
    return Stars(
        xy=np.asarray(xy, dtype=np.float64),
        flux=np.linspace(1000.0, 1.0, len(xy)),
        fwhm_px=4.0,
        roundness=0.0,
        elongation=1.0,
        background=0.05,
        noise=0.001,
    )


def _inside(xy: np.ndarray, width: float = WIDTH, height: float = HEIGHT) -> np.ndarray:
    return (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)


def _pair(
    matrix: np.ndarray, seed: int, n_sky: int = 1200, noise_px: float = 0.03, keep: int = 300
) -> tuple[Stars, Stars, int]:
    """Reference and frame star lists seen through ``matrix`` (frame -> reference) from one sky
    (reference coordinates, 3x the frame each way), brightest first, with centroid noise.
    Returns them and the number of stars they share."""
    rng = np.random.default_rng(seed)
    sky = np.column_stack(
        [rng.uniform(-WIDTH, 2 * WIDTH, n_sky * 9), rng.uniform(-HEIGHT, 2 * HEIGHT, n_sky * 9)]
    )
    order = np.argsort(-rng.pareto(1.5, len(sky)))  # brightness order
    sky = sky[order]
    in_ref = _inside(sky)
    frame_xy = apply(invert(matrix), sky)
    in_frame = _inside(frame_xy)
    ref_idx = np.flatnonzero(in_ref)[:keep]
    frame_idx = np.flatnonzero(in_frame)[:keep]
    shared = len(np.intersect1d(ref_idx, frame_idx))
    ref = sky[ref_idx] + rng.normal(0, noise_px, (len(ref_idx), 2))
    frame = frame_xy[frame_idx] + rng.normal(0, noise_px, (len(frame_idx), 2))
    return _stars(frame), _stars(ref), shared


def _random_transforms(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        shift = rng.uniform(-0.4, 0.4, 2) * [WIDTH, HEIGHT]
        out.append(similarity(rng.uniform(-180, 180), rng.uniform(0.99, 1.01), shift, CENTRE))
    return out


@pytest.mark.parametrize("angle", [*range(0, 360, 15), 180.0, 179.9, -90.0])
def test_any_rotation_with_a_shift(angle: float) -> None:
    matrix = similarity(angle, 1.004, (0.4 * WIDTH, -0.3 * HEIGHT), CENTRE)
    frame, ref, shared = _pair(matrix, seed=int(angle * 10) % 1000)
    result = align(frame, ref)
    assert transform_error(result.matrix, matrix, (int(HEIGHT), int(WIDTH))) <= 0.05
    assert result.inliers >= 0.8 * shared
    assert result.residual_px < 0.1


def test_random_transforms_on_sparse_and_dense_fields() -> None:
    worst = 0.0
    for i, matrix in enumerate(_random_transforms(seed=11, count=30)):
        n_sky = 120 if i % 2 else 1200  # >= 30 shared stars even at 40 % shift
        frame, ref, shared = _pair(matrix, seed=100 + i, n_sky=n_sky, noise_px=0.02)
        assert shared >= 30
        result = align(frame, ref)
        worst = max(worst, transform_error(result.matrix, matrix, (int(HEIGHT), int(WIDTH))))
    assert worst <= 0.05


def test_pairs_and_residual_are_consistent() -> None:
    matrix = similarity(33.0, 0.995, (120.0, -80.0), CENTRE)
    frame, ref, _ = _pair(matrix, seed=3)
    result = align(frame, ref)
    assert isinstance(result, Alignment)
    assert result.matrix.shape == (2, 3)
    assert result.pairs.shape == (result.inliers, 2, 2)
    mapped = apply(result.matrix, result.pairs[:, 0])
    rms = math.sqrt(np.mean(np.sum((mapped - result.pairs[:, 1]) ** 2, axis=1)))
    assert result.residual_px == pytest.approx(rms, rel=1e-9)
    # every pair is a true correspondence
    truth = apply(matrix, result.pairs[:, 0])
    assert np.all(np.linalg.norm(truth - result.pairs[:, 1], axis=1) < 0.5)
    again = align(frame, ref)
    np.testing.assert_array_equal(again.matrix, result.matrix)  # seeded: reproducible


def test_a_different_field_is_rejected() -> None:
    rng = np.random.default_rng(21)
    for n in (30, 100, 300, 500):
        a = np.column_stack([rng.uniform(0, WIDTH, n), rng.uniform(0, HEIGHT, n)])
        b = np.column_stack([rng.uniform(0, WIDTH, n), rng.uniform(0, HEIGHT, n)])
        with pytest.raises(AlignmentError, match=r"no consistent match: .*different field\?"):
            align(_stars(a), _stars(b))


def test_too_few_stars_is_rejected_with_the_count() -> None:
    frame, ref, _ = _pair(similarity(10, 1, (5, 5), CENTRE), seed=4)
    few = _stars(frame.xy[:5])
    with pytest.raises(AlignmentError, match=r"^too few stars \(5 < 8\)$"):
        align(few, ref)
    with pytest.raises(AlignmentError, match=r"too few reference stars \(5 < 8\)"):
        align(ref, few)


def test_stationary_features_do_not_pull_to_identity() -> None:
    """Hot pixels and lit windows sit at the same frame coordinates in both frames."""
    rng = np.random.default_rng(31)
    matrix = similarity(0.3, 1.0, (35.0, -22.0), CENTRE)  # a drift, as between two subs
    frame, ref, _ = _pair(matrix, seed=31, n_sky=60, keep=60)
    fixed = np.column_stack([rng.uniform(0, WIDTH, 25), rng.uniform(0, HEIGHT, 25)])
    # the features are brighter than most stars: first in both lists
    frame_all = _stars(np.vstack([fixed, frame.xy]))
    ref_all = _stars(np.vstack([fixed, ref.xy]))
    result = align(frame_all, ref_all)
    assert transform_error(result.matrix, matrix, (int(HEIGHT), int(WIDTH))) <= 0.05
    stationary = cKDTree(fixed).query(result.pairs[:, 0])[0] < 0.5
    assert not stationary.any()


def test_affine_model() -> None:
    lin = np.array([[1.004, 0.006], [-0.003, 0.996]]) @ similarity(40.0, 1.0, (0, 0), (0, 0))[:, :2]
    matrix = np.column_stack([lin, [150.0, -60.0]])
    frame, ref, _ = _pair(matrix, seed=41, noise_px=0.02)
    result = align(frame, ref, model="affine")
    assert transform_error(result.matrix, matrix, (int(HEIGHT), int(WIDTH))) <= 0.05
    # a similarity cannot follow the shear
    similar = align(frame, ref, model="similarity")
    assert transform_error(similar.matrix, matrix, (int(HEIGHT), int(WIDTH))) > 0.5


def test_bad_arguments() -> None:
    frame, ref, _ = _pair(similarity(0, 1, (0, 0), CENTRE), seed=5)
    with pytest.raises(ValueError, match="model"):
        align(frame, ref, model="projective")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_inliers"):
        align(frame, ref, min_inliers=2)


def test_three_hundred_stars_align() -> None:
    """300 stars a side (a full frame's worth; the time is the pipeline benchmark's)."""
    matrix = similarity(123.0, 1.0, (300.0, 200.0), CENTRE)
    frame, ref, _ = _pair(matrix, seed=6)
    assert len(frame) == len(ref) == 300
    result = align(frame, ref)
    assert transform_error(result.matrix, matrix, (int(HEIGHT), int(WIDTH))) <= 0.05


# --- end to end: rendered frames -> StarFinder -> align --------------------------------------

SHAPE = (1200, 1800)


@pytest.mark.parametrize(
    ("angle", "shift", "scale"),
    [(0.0, (700.0, 0.0), 1.0), (180.0, (-300.0, 250.0), 1.01), (97.0, (150.0, -400.0), 0.99)],
)
def test_end_to_end_from_rendered_frames(
    angle: float, shift: tuple[float, float], scale: float
) -> None:
    rng = np.random.default_rng(int(angle))
    sky_xy, sky_flux = catalogue(rng, 1800, 3 * SHAPE[1], 3 * SHAPE[0], x0=-SHAPE[1], y0=-SHAPE[0])
    matrix = similarity(angle, scale, shift, (SHAPE[1] / 2, SHAPE[0] / 2))
    finder = StarFinder(landscape_mask_ratio=1.0)
    ref = finder(render(sky_xy, sky_flux, SHAPE, seed=1).luminance, BIN)
    frame_xy = apply(invert(matrix), sky_xy)
    frame = finder(render(frame_xy, sky_flux, SHAPE, seed=2, hot_pixels=30).luminance, BIN)
    result = align(frame, ref)
    assert result.inliers >= 30
    assert transform_error(result.matrix, matrix, SHAPE) <= 0.05


def test_end_to_end_with_lit_windows_in_both_frames() -> None:
    """Unmasked landscape lights are detected in both frames at the same place."""
    rng = np.random.default_rng(7)
    sky_xy, sky_flux = catalogue(rng, 1000, 3 * SHAPE[1], 3 * SHAPE[0], x0=-SHAPE[1], y0=-SHAPE[0])
    windows = np.column_stack([np.linspace(100, 1700, 12), rng.uniform(1100, 1180, 12)])
    matrix = similarity(1.5, 1.0, (60.0, -45.0), (SHAPE[1] / 2, SHAPE[0] / 2))
    finder = StarFinder(landscape_mask_ratio=1.0)

    def lit(xy: np.ndarray, seed: int) -> Stars:
        field = render(
            xy, sky_flux, SHAPE, seed=seed, landscape_rows=130, windows=windows, window_flux=50.0
        )
        return finder(field.luminance, BIN)

    ref = lit(sky_xy, 1)
    frame = lit(apply(invert(matrix), sky_xy), 2)
    assert np.all(cKDTree(frame.xy).query(windows)[0] < 1.0)  # the lights are "stars"
    result = align(frame, ref)
    assert transform_error(result.matrix, matrix, SHAPE) <= 0.05
    assert np.all(cKDTree(windows).query(result.pairs[:, 0])[0] > 1.0)  # no light is paired


# --- real data ---------------------------------------------------------------------------------


def _superpixel_luminance(path: Path) -> np.ndarray:
    fits = pytest.importorskip("astropy.io.fits")
    with fits.open(path) as hdul:
        raw = np.asarray(hdul[0].data, dtype=np.float32) / 65535.0  # BZERO applied by astropy
        assert hdul[0].header["BAYERPAT"].strip() == "RGGB"
    rows, cols = raw.shape[0] // 2, raw.shape[1] // 2
    return raw[: 2 * rows, : 2 * cols].reshape(rows, 2, cols, 2).mean(axis=(1, 3))


@pytest.mark.skipif(not M27.is_dir(), reason="real data not present")
def test_real_m27_sequence_aligns_to_the_first_frame() -> None:
    paths = sorted(M27.glob("Light_*.fits"))
    assert len(paths) == 6
    finder = StarFinder()
    stars = [finder(_superpixel_luminance(p), BIN) for p in paths]
    shape = (976, 1304)
    direct = []
    for frame in stars[1:]:
        result = align(frame, stars[0])
        assert result.inliers >= 50
        # measured 0.35 px: the faint-star centroid noise of both frames; brightest pairs ~0.2
        assert result.residual_px <= 0.4
        angle = math.degrees(math.atan2(result.matrix[1, 0], result.matrix[0, 0]))
        assert abs(angle) < 0.05 and np.all(np.abs(result.matrix[:, 2]) < 40)
        direct.append(result.matrix)
    # closure: frame 5 -> frame 3 -> frame 0 agrees with frame 5 -> frame 0
    via = align(stars[5], stars[3]).matrix
    composed = np.column_stack(
        [direct[2][:, :2] @ via[:, :2], direct[2][:, :2] @ via[:, 2] + direct[2][:, 2]]
    )
    assert transform_error(composed, direct[4], shape) <= 0.1


def test_a_star_mapped_to_nan_matches_nothing() -> None:
    """A degenerate candidate transform maps stars to NaN: no match for them, no ValueError
    out of the KD-tree (seen once as an "internal error" rejecting a good frame)."""
    from scipy.spatial import cKDTree

    from nightstack.registration.align import _match

    ref = np.array([[10.0, 10.0], [50.0, 20.0]])
    mapped = np.array([[np.nan, np.nan], [50.2, 20.1], [np.inf, 3.0]])
    pairs = _match(mapped, cKDTree(ref), threshold=2.0)
    assert pairs.tolist() == [[1, 1]]
