"""warp.py: sub-pixel resampling against analytic truth, and the geometric footprint."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from nightstack.registration.warp import INTERPOLATIONS, Interpolation, footprint, warp, warp_rows


def _rigid(angle_deg: float, tx: float, ty: float, scale: float = 1.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def _source_positions(matrix: np.ndarray, out_shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Frame (x, y) sampled by every reference pixel, in float64: inverse(matrix) @ p_ref."""
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    y, x = np.mgrid[0 : out_shape[0], 0 : out_shape[1]].astype(np.float64)
    return inv[0, 0] * x + inv[0, 1] * y + inv[0, 2], inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]


def _ramp(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 0.3 + 0.002 * x + 0.003 * y


def test_bilinear_reproduces_a_ramp_exactly_under_rotation_and_sub_pixel_shift() -> None:
    # Bilinear interpolation is exact on a linear function, so any error beyond float32 rounding
    # would mean the matrix direction (frame -> reference) or the pixel-centre convention is off.
    matrix = _rigid(7.3, 3.37, -2.71)
    y, x = np.mgrid[0:60, 0:80].astype(np.float64)
    frame = _ramp(x, y).astype(np.float32)[:, :, np.newaxis]
    warped, fp = warp(frame, matrix, (70, 90))
    xs, ys = _source_positions(matrix, (70, 90))
    assert warped.shape == (70, 90, 1) and warped.dtype == np.float32
    assert 0.5 * fp.size < fp.sum() < fp.size
    assert_allclose(warped[fp, 0], _ramp(xs, ys)[fp], rtol=0, atol=1e-6)  # float32 values < 1
    assert np.all(warped[~fp] == 0)


def test_the_matrix_maps_frame_to_reference() -> None:
    # A bright pixel at frame (x=10, y=20) must land at matrix @ (10, 20) = (13, 15).
    frame = np.zeros((40, 50, 1), np.float32)
    frame[20, 10] = 1.0
    warped, _ = warp(frame, np.array([[1.0, 0, 3], [0, 1.0, -5]]), (40, 50))
    assert np.unravel_index(np.argmax(warped[:, :, 0]), (40, 50)) == (15, 13)
    assert warped[15, 13, 0] == 1.0


@pytest.mark.parametrize("interpolation", ["bilinear", "lanczos4", "cubic"])
def test_star_centroids_move_to_the_transformed_positions(interpolation: Interpolation) -> None:
    stars = np.array([[20.3, 18.7], [61.2, 25.4], [40.8, 52.1], [75.5, 60.9]])
    y, x = np.mgrid[0:80, 0:96].astype(np.float64)
    frame = np.zeros((80, 96), np.float64)
    for sx, sy in stars:
        frame += np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * 1.8**2))
    matrix = _rigid(2.5, 1.37, -0.61)
    warped, _ = warp(frame.astype(np.float32), matrix, (80, 96), interpolation=interpolation)
    expected = stars @ matrix[:, :2].T + matrix[:, 2]
    image = warped[:, :, 0].astype(np.float64)
    for ex, ey in expected:
        r0, c0 = round(ey), round(ex)
        win = image[r0 - 6 : r0 + 7, c0 - 6 : c0 + 7]
        wy, wx = np.mgrid[r0 - 6 : r0 + 7, c0 - 6 : c0 + 7]
        cx, cy = (win * wx).sum() / win.sum(), (win * wy).sum() / win.sum()
        # bilinear keeps centroids to ~0.01 px; OpenCV's cubic (a = -0.75) and Lanczos-4 shift
        # a ramp by up to 0.05 / 0.03 px depending on phase (module notes), less on a star
        tol = 0.02 if interpolation == "bilinear" else 0.05
        assert abs(cx - ex) < tol and abs(cy - ey) < tol


@pytest.mark.parametrize(
    ("interpolation", "atol"),
    # bilinear: curvature error h^2/8 (|f_xx| + |f_yy|) + cross term ~ 1.2e-3 for this wave;
    # cubic/Lanczos-4: their sub-pixel bias (<= 0.05 px) times the max gradient (0.04 / px),
    # and within a pixel of the frame's edge their outer taps read the edge repeated (2.8e-3).
    [("bilinear", 1.5e-3), ("cubic", 3e-3), ("lanczos4", 3e-3)],
)
def test_smooth_signal_matches_analytic_resampling(
    interpolation: Interpolation, atol: float
) -> None:
    def wave(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return 0.5 + 0.2 * np.sin(2 * np.pi * x / 40 + 0.3) * np.cos(2 * np.pi * y / 50)

    matrix = _rigid(-7.3, 3.37, -2.71)
    y, x = np.mgrid[0:80, 0:100].astype(np.float64)
    frame = wave(x, y).astype(np.float32)[:, :, np.newaxis]
    warped, fp = warp(frame, matrix, (80, 100), interpolation=interpolation)
    xs, ys = _source_positions(matrix, (80, 100))
    assert_allclose(warped[fp, 0], wave(xs, ys)[fp], rtol=0, atol=atol)


def _brute_force_footprint(
    matrix: np.ndarray, src_shape: tuple[int, int], out_shape: tuple[int, int], margin: int
) -> np.ndarray:
    xs, ys = _source_positions(matrix, out_shape)
    rows, cols = src_shape
    return (xs >= margin) & (xs <= cols - 1 - margin) & (ys >= margin) & (ys <= rows - 1 - margin)


@pytest.mark.parametrize("interpolation", ["bilinear", "cubic", "lanczos4"])
def test_footprint_is_exactly_the_pixels_whose_source_lies_inside(
    interpolation: Interpolation,
) -> None:
    rng = np.random.default_rng(7)
    for _ in range(25):
        src = (int(rng.integers(15, 50)), int(rng.integers(15, 50)))
        out = (int(rng.integers(15, 50)), int(rng.integers(15, 50)))
        matrix = _rigid(
            rng.uniform(-180, 180),
            rng.uniform(-20, 40),
            rng.uniform(-20, 40),
            rng.uniform(0.8, 1.25),
        )
        ones = np.ones((*src, 3), np.float32)
        warped, fp = warp(ones, matrix, out, interpolation=interpolation)
        brute = _brute_force_footprint(matrix, src, out, 0)  # the same for every kernel
        assert np.array_equal(fp, brute)
        # inside: interpolation of a constant is the constant; outside: exactly 0
        assert_allclose(warped[fp], 1.0, rtol=0, atol=1e-5)
        assert np.all(warped[~fp] == 0)
        band = footprint(matrix, src, out, 4, 11, interpolation=interpolation)
        assert np.array_equal(band, fp[4:11])


def test_footprint_of_axis_aligned_rotations_and_empty_bands() -> None:
    # a 90-degree rotation makes one source coordinate constant along a row (zero slope)
    matrix = np.array([[0.0, -1.0, 29.0], [1.0, 0.0, 0.0]])
    fp = footprint(matrix, (20, 30), (40, 40))
    assert np.array_equal(fp, _brute_force_footprint(matrix, (20, 30), (40, 40), 0))
    assert fp.sum() == 20 * 30
    assert footprint(matrix, (20, 30), (40, 40), 10, 10).shape == (0, 40)
    far = footprint(np.array([[1.0, 0, 500], [0, 1.0, 0]]), (20, 30), (40, 40))
    assert not far.any()


def test_identity_keeps_every_pixel_and_value() -> None:
    image = np.random.default_rng(1).random((30, 40, 3), dtype=np.float32)
    warped, fp = warp(image, np.array([[1.0, 0, 0], [0, 1.0, 0]]), (30, 40))
    assert fp.all()
    assert np.array_equal(warped, image)


def test_mono_frames_keep_their_channel_axis() -> None:
    image = np.random.default_rng(2).random((30, 40), dtype=np.float32)
    matrix = _rigid(3.0, 0.5, 0.25)
    from_2d, fp2 = warp(image, matrix, (32, 41))
    from_3d, fp3 = warp(image[:, :, np.newaxis], matrix, (32, 41))
    assert from_2d.shape == from_3d.shape == (32, 41, 1)
    assert np.array_equal(from_2d, from_3d) and np.array_equal(fp2, fp3)


def test_bands_equal_the_full_warp() -> None:
    rng = np.random.default_rng(3)
    image = rng.random((50, 60, 3), dtype=np.float32)
    matrix = _rigid(11.0, 4.2, -3.3)
    full, fp = warp(image, matrix, (55, 66))
    for start, stop in [(0, 7), (7, 30), (30, 55), (54, 55)]:
        band, band_fp = warp_rows(image, matrix, (55, 66), start, stop)
        assert np.array_equal(band_fp, fp[start:stop])
        # OpenCV computes source positions in float32 (ulp ~4e-6 px near 50 px) from the band's
        # own offset; this random image changes by up to 1 per px
        assert_allclose(band, full[start:stop], rtol=0, atol=2e-5)


def test_a_24_mp_frame_warps() -> None:
    # 6000 x 4000 (cols x rows) is far below OpenCV's SHRT_MAX limit; check values, not just shape
    y, x = np.mgrid[0:4000, 0:6000]
    frame = (1e-5 * x + 2e-5 * y).astype(np.float32)
    del x, y
    matrix = _rigid(0.2, 12.25, -7.5)
    warped, fp = warp(frame, matrix, (4000, 6000))
    del frame
    rows, cols = np.array([5, 100, 2000, 3990]), np.array([20, 3000, 5990, 100])
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    xs = inv[0, 0] * cols + inv[0, 1] * rows + inv[0, 2]
    ys = inv[1, 0] * cols + inv[1, 1] * rows + inv[1, 2]
    inside = fp[rows, cols]
    assert inside.sum() >= 3
    assert_allclose(warped[rows, cols, 0][inside], (1e-5 * xs + 2e-5 * ys)[inside], atol=1e-6)


@pytest.mark.parametrize("interpolation", ["bilinear", "lanczos4"])
def test_frames_wider_than_shrt_max_are_tiled(interpolation: Interpolation) -> None:
    # OpenCV's remap (Lanczos-4) asserts every side < 32767; warp tiles the output instead.
    y, x = np.mgrid[0:20, 0:40000].astype(np.float64)
    frame = (0.1 + 1e-5 * x + 1e-3 * y).astype(np.float32)
    matrix = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.25]])
    warped, fp = warp(frame, matrix, (20, 40000), interpolation=interpolation)
    xs, ys = x + 0.5, y - 0.25
    truth = 0.1 + 1e-5 * xs + 1e-3 * ys
    # Lanczos-4 is not exact on a ramp: its phase bias (<= 0.03 px) times the 1e-3 / px slope;
    # within its reach (3 px) of the edge its outer taps read the edge repeated (tested apart)
    atol = 1e-6 if interpolation == "bilinear" else 5e-5
    assert fp.sum() > 0.5 * fp.size
    inner = fp.copy()
    if interpolation != "bilinear":
        inner[:3], inner[-4:], inner[:, :3], inner[:, -4:] = False, False, False, False
    assert_allclose(warped[inner, 0], truth[inner], rtol=0, atol=atol)


def test_bad_arguments_are_refused() -> None:
    image = np.zeros((10, 10, 3), np.float32)
    with pytest.raises(ValueError, match="singular"):
        warp(image, np.zeros((2, 3)), (10, 10))
    with pytest.raises(ValueError, match="interpolation"):
        warp(image, np.eye(2, 3), (10, 10), interpolation="nearest")
    with pytest.raises(ValueError, match="rows, cols"):
        warp(np.zeros((10, 10, 4), np.float32), np.eye(2, 3), (10, 10))


@pytest.mark.parametrize("interpolation", ["cubic", "lanczos4"])
def test_sharp_kernels_never_leave_the_range_of_the_four_nearest_samples(
    interpolation: Interpolation,
) -> None:
    """The clamp, against an oracle (the min and max of the 2x2 source pixels around each
    position, computed in float64): no value outside it, so no ringing halo and no negative
    value around a saturated star (a flat-topped disc on a sky of 0.01), while the unclamped
    OpenCV kernel does ring there."""
    import cv2

    rng = np.random.default_rng(3)
    image = rng.uniform(0, 1, (120, 160, 3)).astype(np.float32)
    matrix = np.array([[np.cos(0.1), -np.sin(0.1), 3.3], [np.sin(0.1), np.cos(0.1), -2.7]])
    warped, inside = warp(image, matrix, (120, 160), interpolation=interpolation)
    inverse = cv2.invertAffineTransform(matrix)
    ys, xs = np.nonzero(inside)
    x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    near = np.stack([image[y0, x0], image[y0, x0 + 1], image[y0 + 1, x0], image[y0 + 1, x0 + 1]])
    values = warped[ys, xs]
    assert (values >= near.min(axis=0) - 1e-6).all() and (values <= near.max(axis=0) + 1e-6).all()

    rows, cols = np.mgrid[0:64, 0:64]
    star = np.where(np.hypot(rows - 31.6, cols - 32.2) < 4, 1.0, 0.01).astype(np.float32)
    shift = np.array([[1.0, 0.0, 0.37], [0.0, 1.0, -0.41]])
    ringing = cv2.warpAffine(star, shift, (64, 64), flags=INTERPOLATIONS[interpolation][0])
    assert ringing.min() < 0  # what the clamp removes
    clamped, _ = warp(star, shift, (64, 64), interpolation=interpolation)
    assert clamped[8:-8, 8:-8].min() >= 0.01 - 1e-6
    assert clamped.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("interpolation", ["cubic", "lanczos4"])
def test_sharp_kernels_keep_the_whole_frame_without_a_rim(interpolation: Interpolation) -> None:
    """The identity keeps every pixel of the frame (the reference covers its whole grid), and a
    sub-pixel shift of a flat frame leaves no dark or bright rim along the edges."""
    flat = np.full((40, 50, 3), 0.25, np.float32)
    same, inside = warp(flat, np.array([[1.0, 0, 0], [0, 1.0, 0]]), (40, 50),
                        interpolation=interpolation)  # fmt: skip
    assert inside.all() and np.array_equal(same, flat)
    shifted, inside = warp(flat, np.array([[1.0, 0, 0.4], [0, 1.0, -0.3]]), (40, 50),
                           interpolation=interpolation)  # fmt: skip
    assert inside.sum() == 39 * 49
    assert_allclose(shifted[inside], 0.25, rtol=0, atol=1e-6)
