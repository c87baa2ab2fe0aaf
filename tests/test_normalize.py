"""Background normalization against known sky changes (nightstack.registration.normalize)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from numpy.testing import assert_allclose

from nightstack.registration.normalize import Normalization, SkySamples, clipped_median, estimate

ROWS, COLS = 400, 600
NOISE = 0.004
SKY = np.array([0.08, 0.07, 0.05], dtype=np.float32)


def _scene(seed: int = 0) -> np.ndarray:
    """A sky with a gentle gradient and a few hundred bright point sources (stars)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    image = np.empty((ROWS, COLS, 3), np.float32)
    for c in range(3):
        image[:, :, c] = SKY[c] * (1 + 0.2 * x / COLS + 0.1 * y / ROWS)
    stars = np.zeros((ROWS, COLS), np.float32)
    rr, cc = rng.integers(5, ROWS - 5, 400), rng.integers(5, COLS - 5, 400)
    stars[rr, cc] = rng.uniform(0.05, 2.0, 400).astype(np.float32)
    stars = cv2.GaussianBlur(stars, (0, 0), 1.2)
    image += stars[:, :, None] * np.array([1.0, 0.9, 0.7], np.float32)
    return image


def _observe(scene: np.ndarray, shift: tuple[float, float], seed: int) -> np.ndarray:
    """The scene seen by a frame displaced by ``shift`` (frame = reference - shift), noisy."""
    m = np.array([[1.0, 0.0, -shift[0]], [0.0, 1.0, -shift[1]]])
    moved = cv2.warpAffine(scene, m, (COLS, ROWS), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)  # fmt: skip
    noise = np.random.default_rng(seed).normal(0, NOISE, moved.shape).astype(np.float32)
    return np.asarray(moved + noise, np.float32)


def _all_sky(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.ones(np.shape(x), dtype=bool)


def _matrix(shift: tuple[float, float]) -> np.ndarray:
    """Frame -> reference for a frame displaced by ``shift``."""
    return np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])


def _normalized(norm: Normalization, frame: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    warped = cv2.warpAffine(frame, _matrix(shift), (COLS, ROWS), flags=cv2.INTER_LINEAR)
    out = np.asarray(warped, np.float32).reshape(ROWS, COLS, 3)
    norm.apply(out, 0, (ROWS, COLS))
    return out


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, np.ndarray, SkySamples]:
    scene = _scene()
    ref = _observe(scene, (0.0, 0.0), seed=1)
    return scene, ref, SkySamples.of(ref, _all_sky)


def test_add_matches_a_brighter_sky_to_the_reference_per_channel(
    reference: tuple[np.ndarray, np.ndarray, SkySamples],
) -> None:
    scene, ref, samples = reference
    shift = (7.3, -4.6)
    step = np.array([0.04, 0.03, 0.01], np.float32)  # moonrise: brighter, bluer ratio changes
    frame = _observe(scene + step, shift, seed=2)
    norm = estimate("add", frame, _matrix(shift), samples, _all_sky)
    assert norm.scale == (1.0, 1.0, 1.0)
    assert_allclose(norm.offset, -step, rtol=0, atol=0.05 * NOISE)
    # after normalization the frame's sky is the reference's (overlap only)
    out = _normalized(norm, frame, shift)
    inner = (slice(20, -20), slice(20, -20))
    for c in range(3):
        diff = clipped_median((out[inner][..., c] - ref[inner][..., c]).ravel())
        assert abs(diff) < 0.05 * NOISE


def test_none_is_the_identity_and_the_reference_level_defines_the_stack(
    reference: tuple[np.ndarray, np.ndarray, SkySamples],
) -> None:
    scene, _, samples = reference
    frame = _observe(scene + 0.05, (1.0, 2.0), seed=3)
    assert estimate("none", frame, _matrix((1.0, 2.0)), samples, _all_sky).is_identity


def test_addscale_restores_the_dimmed_signal_and_matches_the_sky(
    reference: tuple[np.ndarray, np.ndarray, SkySamples],
) -> None:
    scene, ref, samples = reference
    sky = np.broadcast_to(scene[:1, :1], scene.shape) * 0 + SKY  # the flat sky part
    signal = scene - sky
    t = 0.5  # haze lets through half the starlight and adds scattered light
    frame = _observe(sky * 1.3 + t * signal, (3.0, 5.0), seed=4)
    norm = estimate("addscale", frame, _matrix((3.0, 5.0)), samples, _all_sky, transparency=t)
    assert_allclose(norm.scale, (2.0, 2.0, 2.0))
    out = _normalized(norm, frame, (3.0, 5.0))
    inner = (slice(20, -20), slice(20, -20))
    for c in range(3):
        diff = clipped_median((out[inner][..., c] - ref[inner][..., c]).ravel())
        assert abs(diff) < 0.15 * NOISE  # the doubled noise of the scaled frame
    bright = signal[inner][..., 1] > 0.2  # stars: restored to the reference's brightness
    ratio = np.median(out[inner][..., 1][bright] - SKY[1]) / np.median(ref[inner][..., 1][bright]
                                                                        - SKY[1])  # fmt: skip
    assert 0.9 < ratio < 1.1
    missing = estimate("addscale", frame, _matrix((3.0, 5.0)), samples, _all_sky)
    assert missing.scale == (1.0, 1.0, 1.0) and missing.note


def test_gradient_removes_a_moving_moon_glow_that_an_offset_cannot(
    reference: tuple[np.ndarray, np.ndarray, SkySamples],
) -> None:
    scene, ref, samples = reference
    y, x = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    u, v = 2 * x / (COLS - 1) - 1, 2 * y / (ROWS - 1) - 1
    glow = 0.03 * (1 + 0.8 * u - 0.5 * v + 0.3 * u * u)  # brighter towards the rising Moon
    shift = (-5.5, 3.25)
    frame = _observe(scene + glow[:, :, None], shift, seed=5)
    inner = (slice(30, -30), slice(30, -30))
    residual = {}
    for mode in ("add", "gradient"):
        norm = estimate(mode, frame, _matrix(shift), samples, _all_sky)
        out = _normalized(norm, frame, shift)
        smooth = cv2.blur(out[..., 1] - ref[..., 1], (31, 31))[inner]
        residual[mode] = float(np.percentile(np.abs(smooth), 99))
    # the floor: the 31 x 31 mean of two frames' noise is 0.046 NOISE, its 99th percentile ~0.12
    assert residual["gradient"] < 0.25 * NOISE, residual
    assert residual["add"] > 5 * NOISE, residual  # an offset leaves the glow's slope


def test_the_ground_and_the_uncovered_edge_do_not_bias_the_offset(
    reference: tuple[np.ndarray, np.ndarray, SkySamples],
) -> None:
    scene, ref, _ = reference

    def sky(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, dtype=np.float64) < 0.75 * ROWS

    with_ground = ref.copy()
    with_ground[int(0.75 * ROWS) :] = 0.5  # lit windows, a bright foreground
    samples = SkySamples.of(with_ground, sky)
    shift = (60.0, 0.0)  # a large drift: a strip on the left is not covered
    frame = _observe(scene + 0.02, shift, seed=6)
    frame[int(0.75 * ROWS) :] = 0.9
    norm = estimate("add", frame, _matrix(shift), samples, sky)
    assert_allclose(norm.offset, [-0.02] * 3, rtol=0, atol=0.05 * NOISE)


def test_too_little_overlap_is_the_identity_with_a_note(
    reference: tuple[np.ndarray, np.ndarray, SkySamples],
) -> None:
    scene, _, samples = reference
    frame = _observe(scene, (0.0, 0.0), seed=7)
    far = np.array([[1.0, 0.0, 5000.0], [0.0, 1.0, 0.0]])
    norm = estimate("add", frame, far, samples, _all_sky)
    assert norm.is_identity and norm.note


def test_apply_by_bands_equals_apply_whole_and_round_trips_json() -> None:
    norm = Normalization(
        "gradient", (1.0, 1.0, 1.0), (0.01, -0.02, 0.03),
        ((0.001, 0.002, 0.003, 0.004, 0.005),) * 3,
    )  # fmt: skip
    image = np.random.default_rng(8).random((50, 70, 3)).astype(np.float32)
    whole = image.copy()
    norm.apply(whole, 0, (50, 70))
    banded = image.copy()
    for r0 in range(0, 50, 16):
        norm.apply(banded[r0 : r0 + 16], r0, (50, 70))
    assert_allclose(banded, whole, rtol=0, atol=1e-7)
    back = Normalization.from_json(norm.as_json(), 3)
    assert back.offset == norm.offset and back.surface == norm.surface
    assert Normalization.from_json(None, 3).is_identity


def test_estimate_is_cheap_on_24_mp() -> None:
    """Not a timing test: the work is a fixed number of samples whatever the frame size."""
    image = np.zeros((4000, 6000, 3), np.float32)
    samples = SkySamples.of(image, _all_sky)
    assert samples.values.shape[0] * samples.values.shape[1] <= 110_000
