"""stack.py: the frame store, the live stack and the final combine against oracles."""

from __future__ import annotations

import json
import math
import tracemalloc
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.stats import sigma_clip
from numpy.testing import assert_allclose
from scipy.stats import t as t_dist

from nightstack.config import StackMethod
from nightstack.io.writers import write_preview
from nightstack.registration.warp import warp
from nightstack.stacking.checkpoint import load_live, save_live
from nightstack.stacking.codes import dither, dither_start, encode
from nightstack.stacking.combine import combine
from nightstack.stacking.live import LiveStack, _warmup_band_rows
from nightstack.stacking.store import QUANT_MAX, FrameStore

SKY_NOISE = 0.01


def _rigid(angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a), tx], [np.sin(a), np.cos(a), ty]])


def _sky(x: np.ndarray, y: np.ndarray, channels: int) -> np.ndarray:
    """A smooth sky (values 0.05..0.2) at reference coordinates (x, y): bilinear resampling
    changes it by < 2e-4, so a stack of warped frames can be compared with it directly."""
    sky = 0.1 + 0.05 * np.sin(x / 7.0) * np.cos(y / 9.0)
    return np.stack([sky * (1 + 0.2 * c) for c in range(channels)], axis=-1)


def _truth(shape: tuple[int, int], channels: int) -> np.ndarray:
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    return _sky(x, y, channels).astype(np.float32)


def _frames(
    n: int,
    shape: tuple[int, int],
    channels: int,
    *,
    seed: int = 1,
    max_shift: float = 3.0,
    max_angle: float = 0.0,
    offset: float = 0.0,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Noisy frames of one sky, each with its frame -> reference transform, and the truth.

    Frame i shows the sky at ``matrix_i @ (x, y)``, so warping it with ``matrix_i`` puts the
    sky back on the reference grid. Frame 0 is the reference (identity) unless ``offset`` is
    set; then every frame is shifted by ``offset`` +- ``max_shift`` px in x and y, leaving the
    first rows and columns of the reference uncovered.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    frames, matrices = [], []
    for i in range(n):
        if i == 0 and offset == 0:
            matrix = np.eye(2, 3)
        else:
            matrix = _rigid(
                rng.uniform(-max_angle, max_angle),
                offset + rng.uniform(-max_shift, max_shift),
                offset + rng.uniform(-max_shift, max_shift),
            )
        xr = matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]
        yr = matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2]
        frame = _sky(xr, yr, channels) + SKY_NOISE * rng.standard_normal((*shape, channels))
        frames.append(frame.astype(np.float32))
        matrices.append(matrix)
    return frames, matrices, _truth(shape, channels)


def _fill_store(
    directory: Path, frames: list[np.ndarray], matrices: list[np.ndarray]
) -> tuple[FrameStore, list[np.ndarray], list[np.ndarray]]:
    shape = frames[0].shape[:2]
    store = FrameStore(directory, shape, frames[0].shape[2])
    warped_all, fps = [], []
    for i, (frame, matrix) in enumerate(zip(frames, matrices, strict=True)):
        warped, fp = warp(frame, matrix, shape)
        store.add(warped, matrix, shape, name=f"light_{i}.cr3")
        warped_all.append(warped)
        fps.append(fp)
    return store, warped_all, fps


def _cube(store: FrameStore) -> tuple[np.ndarray, np.ndarray]:
    """The full (n, rows, cols, C) float64 cube as the store returns it, and its validity."""
    rows = store.shape[0]
    cube = np.stack([store.read_band(i, 0, rows) for i in range(len(store))]).astype(np.float64)
    fps = np.stack([store.footprint_band(i, 0, rows) for i in range(len(store))])
    valid = np.broadcast_to(fps[..., np.newaxis], cube.shape)
    return cube, valid


def _astropy_oracle(
    store: FrameStore, sigma: float, maxiters: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """The batch script: astropy sigma_clip on the whole in-memory cube, then the mean."""
    cube, valid = _cube(store)
    clipped = sigma_clip(
        np.ma.array(cube, mask=~valid),
        sigma=sigma,
        maxiters=maxiters,
        cenfunc="median",
        stdfunc="std",
        axis=0,
    )
    if weights is None:
        return np.ma.filled(clipped.mean(axis=0), np.nan)
    return np.ma.filled(np.ma.average(clipped, axis=0, weights=weights), np.nan)


def _coverage(store: FrameStore) -> np.ndarray:
    rows = store.shape[0]
    return sum(store.footprint_band(i, 0, rows).astype(int) for i in range(len(store)))


# --------------------------------------------------------------------------- frame store


def test_store_quantises_to_16_bits_and_reads_back(tmp_path: Path) -> None:
    values = np.array([[[0.0, 0.5, 1.0], [1.7, -0.2, np.nan], [1e-6, 0.123456, 0.999999]]])
    store = FrameStore(tmp_path / "s", (1, 3), 3)
    store.add(values.astype(np.float32), np.eye(2, 3), (1, 3))
    back = store.read_band(0, 0, 1)
    expected = np.round(np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * QUANT_MAX)
    assert back.dtype == np.float32
    assert np.array_equal(back, (expected.astype(np.float32) * np.float32(1 / QUANT_MAX)))
    in_range = (values >= 0) & (values <= 1)
    assert np.all(np.abs(back - values)[in_range] <= 0.5 / QUANT_MAX + 1e-7)
    raw = np.fromfile(tmp_path / "s" / "frame_000000.u16", dtype=np.uint16)
    assert raw.tolist() == expected.ravel().astype(int).tolist()


def test_store_reopens_with_its_frames_and_rejects_a_mismatch(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(3, (20, 30), 3)
    store, _, _ = _fill_store(tmp_path / "s", frames, matrices)
    again = FrameStore(tmp_path / "s", (20, 30), 3)
    opened = FrameStore.open(tmp_path / "s")
    for other in (again, opened):
        assert len(other) == 3
        for i in range(3):
            assert other.frame(i) == store.frame(i)
            assert np.array_equal(other.read_band(i, 5, 12), store.read_band(i, 5, 12))
            assert np.array_equal(other.footprint_band(i, 0, 20), store.footprint_band(i, 0, 20))
    assert store.frame(1).name == "light_1.cr3"
    assert np.array_equal(np.array(store.frame(1).matrix), matrices[1])  # JSON round trip exact
    with pytest.raises(ValueError, match="holds"):
        FrameStore(tmp_path / "s", (20, 31), 3)
    assert store.disk_bytes() >= 3 * 20 * 30 * 3 * 2


def test_store_recovers_from_a_crash_between_frame_and_index(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(3, (20, 30), 1)
    _fill_store(tmp_path / "s", frames[:2], matrices[:2])
    # a crash after the raw file of frame 2 was renamed into place but before the index: junk
    (tmp_path / "s" / "frame_000002.u16").write_bytes(b"partial")
    reopened = FrameStore(tmp_path / "s", (20, 30), 1)
    assert len(reopened) == 2
    w, _ = warp(frames[2], matrices[2], (20, 30))
    assert reopened.add(w, matrices[2], (20, 30)) == 2
    assert_allclose(reopened.read_band(2, 0, 20), w, atol=0.5 / QUANT_MAX + 1e-7)
    # a truncated indexed frame is refused, not silently read
    (tmp_path / "s" / "frame_000001.u16").write_bytes(b"short")
    with pytest.raises(ValueError, match="truncated"):
        FrameStore(tmp_path / "s", (20, 30), 1)


def test_store_truncate_drops_the_last_frames(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(4, (10, 12), 3)
    store, _, _ = _fill_store(tmp_path / "s", frames, matrices)
    store.truncate(2)
    assert len(store) == 2 and len(FrameStore.open(tmp_path / "s")) == 2
    assert not (tmp_path / "s" / "frame_000003.u16").exists()
    store.truncate(5)  # no-op
    assert len(store) == 2


def test_add_warped_streams_the_same_frame(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(2, (70, 50), 3, max_angle=5.0)
    a, _, _ = _fill_store(tmp_path / "a", frames, matrices)
    b = FrameStore(tmp_path / "b", (70, 50), 3)
    for frame, matrix in zip(frames, matrices, strict=True):
        b.add_warped(frame, matrix)
    for i in range(2):
        diff = np.abs(a.read_band(i, 0, 70) - b.read_band(i, 0, 70))
        # OpenCV's float32 source positions differ by ~1e-6 px between a band and the full
        # warp, which can flip the rounding of a sample to the neighbouring 16-bit step
        assert diff.max() <= 1.01 / QUANT_MAX
        assert np.count_nonzero(diff) <= 0.01 * diff.size
        assert np.array_equal(a.footprint_band(i, 0, 70), b.footprint_band(i, 0, 70))


def test_footprint_spans_are_the_footprint_rows(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(3, (40, 30), 1, max_angle=20.0, max_shift=8.0)
    store, _, _ = _fill_store(tmp_path / "s", frames, matrices)
    cols = np.arange(30)
    for i in range(3):
        for r0, r1 in [(0, 40), (7, 19), (39, 40), (12, 12)]:
            first, stop = store.footprint_spans(i, r0, r1)
            mask = (cols >= first[:, np.newaxis]) & (cols < stop[:, np.newaxis])
            assert np.array_equal(mask, store.footprint_band(i, r0, r1))


def test_read_band_into_float64_holds_the_float32_values(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(1, (30, 20), 3)
    store, _, _ = _fill_store(tmp_path / "s", frames, matrices)
    out = np.full((13, 20, 3), np.nan)
    store.read_band(0, 4, 17, out=out)
    assert np.array_equal(out, store.read_band(0, 4, 17).astype(np.float64))
    # a frame file cut short after the store was opened is an error, not zeros
    path = tmp_path / "s" / store.frame(0).file
    path.write_bytes(path.read_bytes()[: 10 * 20 * 3 * 2])
    with pytest.raises(ValueError, match="truncated"):
        store.read_band(0, 4, 17)


# --------------------------------------------------------------------------- combine


def _outlier_store(tmp_path: Path, *, n: int = 12, max_angle: float = 4.0) -> FrameStore:
    """Frames with hot samples (saturated: +1000-style outliers clip to 1.0 in the store), a
    satellite line in one frame, random shifts and rotations (partial footprints)."""
    frames, matrices, _ = _frames(n, (36, 44), 3, max_shift=4.0, max_angle=max_angle, offset=5.0)
    rng = np.random.default_rng(5)
    for frame in frames:
        hot = rng.random(frame.shape) < 0.002
        frame[hot] = 1000.0
    frames[4][17, :, :] += 0.6  # satellite
    store, _, _ = _fill_store(tmp_path / "s", frames, matrices)
    return store


@pytest.mark.parametrize("max_angle", [0.0, 4.0])
def test_sigma_clip_combine_equals_astropy_on_the_whole_cube(
    tmp_path: Path, max_angle: float
) -> None:
    store = _outlier_store(tmp_path, max_angle=max_angle)
    bands: list[int] = []
    result = combine(
        store, sigma=3.0, maxiters=5, ram_cap_bytes=40_000, progress=lambda d, t: bands.append(d)
    )
    assert len(bands) >= 8 and bands[-1] == 36  # many bands
    oracle = _astropy_oracle(store, 3.0, 5)
    covered = _coverage(store) > 0
    assert not covered.all() and covered.any()
    assert np.array_equal(np.isnan(result), np.broadcast_to(~covered[..., None], result.shape))
    # the same survivors, both means summed in float64: only the final float32 rounding differs
    assert_allclose(result[covered], oracle[covered], rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    ("n", "sigma", "maxiters"), [(5, 0.8, 5), (7, 1.5, 10), (40, 1.2, 8), (97, 2.0, 6)]
)
def test_sigma_clip_equals_astropy_where_early_clips_return(
    tmp_path: Path, n: int, sigma: float, maxiters: int
) -> None:
    """Tight clips move the centre, so a sample clipped early can lie within the last bounds:
    astropy keeps it (its survivors are every sample within the last bounds), and so must the
    combine; across the sorting network (n <= 96) and numpy's sort (n = 97)."""
    store = _outlier_store(tmp_path, n=n, max_angle=2.0)
    result = combine(store, sigma=sigma, maxiters=maxiters, ram_cap_bytes=200_000)
    oracle = _astropy_oracle(store, sigma, maxiters)
    covered = _coverage(store) > 0
    assert_allclose(result[covered], oracle[covered], rtol=1e-7, atol=0)
    weights = np.linspace(0.5, 2.0, n)
    weighted = combine(store, sigma=sigma, maxiters=maxiters, weights=weights)
    oracle_w = _astropy_oracle(store, sigma, maxiters, weights)
    assert_allclose(weighted[covered], oracle_w[covered], rtol=1e-7, atol=0)


def test_sigma_clip_removes_hot_samples(tmp_path: Path) -> None:
    store = _outlier_store(tmp_path, max_angle=0.0)
    clipped = combine(store)
    plain = combine(store, method="mean")
    deep = _coverage(store) >= 10
    truth = _truth((36, 44), 3)
    clip_err = np.abs(clipped - truth)[deep]
    limit = 5 * SKY_NOISE / np.sqrt(10)  # a clean mean of >= 10 frames is within this
    # Bilinear warping spreads each hot sample over 4 pixels (~0.8 % of samples per frame), so a
    # few pixels get two in 12 frames, which a 3-sigma clip of 12 samples cannot catch (two
    # equal outliers sit 2.7 std from the median): allow 0.5 % of samples beyond the limit.
    assert np.quantile(clip_err, 0.99) < limit
    assert np.mean(clip_err > limit) < 0.005
    assert np.abs(plain - truth)[deep].max() > 0.05  # and the test could fail without clipping


def test_mean_and_median_against_numpy(tmp_path: Path) -> None:
    store = _outlier_store(tmp_path)
    cube, valid = _cube(store)
    nan_cube = np.where(valid, cube, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices where nothing covers
        mean_oracle = np.nanmean(nan_cube, axis=0)
        median_oracle = np.nanmedian(nan_cube, axis=0)
    mean = combine(store, method="mean", ram_cap_bytes=100_000)
    median = combine(store, method="median", ram_cap_bytes=100_000)
    assert np.array_equal(np.isnan(mean), np.isnan(mean_oracle))
    assert np.array_equal(np.isnan(median), np.isnan(median_oracle))
    ok = ~np.isnan(mean_oracle)
    assert_allclose(mean[ok], mean_oracle[ok], rtol=1e-6)  # numpy sums pairwise, we in order
    assert np.array_equal(median[ok], median_oracle[ok].astype(np.float32))


def _winsorized_oracle(
    cube: np.ndarray, valid: np.ndarray, sigma: float, maxiters: int
) -> np.ndarray:
    """The documented winsorized clip, one pixel at a time with plain numpy."""
    out = np.full(cube.shape[1:], np.nan)
    for idx in np.ndindex(*cube.shape[1:]):
        x = cube[(slice(None), *idx)][valid[(slice(None), *idx)]]
        if x.size == 0:
            continue
        w = x.copy()
        for _ in range(maxiters):
            m, s = np.median(w), np.std(w)
            clamped = np.clip(w, m - sigma * s, m + sigma * s)
            if np.array_equal(clamped, w):
                break
            w = clamped
        m, s = np.median(w), np.std(w)
        kept = x[(x >= m - sigma * s) & (x <= m + sigma * s)]
        out[idx] = kept.mean() if kept.size else np.nan
    return out


def test_winsorized_against_a_per_pixel_oracle(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(9, (14, 18), 3, max_shift=4.0)
    rng = np.random.default_rng(8)
    for frame in frames:
        frame[rng.random(frame.shape) < 0.03] = 0.9
    store, _, _ = _fill_store(tmp_path / "s", frames, matrices)
    cube, valid = _cube(store)
    oracle = _winsorized_oracle(cube, valid, 2.5, 5)
    result = combine(store, method="winsorized", sigma=2.5, ram_cap_bytes=60_000)
    assert np.array_equal(np.isnan(result), np.isnan(oracle))
    ok = ~np.isnan(oracle)
    assert_allclose(result[ok], oracle[ok], rtol=1e-6)  # float summation order only


def test_weights_give_the_weighted_mean_of_survivors(tmp_path: Path) -> None:
    store = _outlier_store(tmp_path)
    weights = np.random.default_rng(3).uniform(0.2, 2.0, len(store))
    result = combine(store, weights=weights, ram_cap_bytes=150_000)
    oracle = _astropy_oracle(store, 3.0, 5, weights)
    ok = ~np.isnan(oracle)
    assert np.array_equal(np.isnan(result), ~ok)
    assert_allclose(result[ok], oracle[ok], rtol=1e-6)  # float64 sums in different orders
    mean = combine(store, method="mean", weights=weights)
    cube, valid = _cube(store)
    w = weights[:, None, None, None] * valid
    with np.errstate(invalid="ignore"):
        expected = (cube * w).sum(axis=0) / w.sum(axis=0)
    assert_allclose(mean[ok], expected[ok], rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        combine(store, weights=np.zeros(len(store)))
    with pytest.raises(ValueError, match="weights"):
        combine(store, weights=np.ones(3))


@pytest.mark.parametrize("method", ["sigma_clip", "mean", "median", "winsorized"])
def test_combine_stays_under_its_ram_cap(tmp_path: Path, method: StackMethod) -> None:
    frames, matrices, _ = _frames(12, (60, 90), 3, max_shift=2.0)
    store, _, _ = _fill_store(tmp_path / "s", frames, matrices)
    cap = 600_000
    result_bytes = 60 * 90 * 3 * 4
    tracemalloc.start()
    try:
        bands: list[int] = []
        combine(store, method=method, ram_cap_bytes=cap, progress=lambda d, t: bands.append(d))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(bands) >= 3
    assert peak - result_bytes <= cap
    with pytest.raises(ValueError, match="too small"):
        combine(store, method=method, ram_cap_bytes=1000)


def test_empty_store_combines_to_nan(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "s", (4, 5), 1)
    assert np.isnan(combine(store)).all()


# --------------------------------------------------------------------------- live stack


def _run_live(
    frames: list[np.ndarray],
    matrices: list[np.ndarray],
    directory: Path,
    *,
    warmup: int = 5,
    with_store: bool = True,
) -> tuple[LiveStack, FrameStore]:
    shape = frames[0].shape[:2]
    store = FrameStore(directory, shape, frames[0].shape[2])
    live = LiveStack(shape, frames[0].shape[2], warmup=warmup, store=store if with_store else None)
    for frame, matrix in zip(frames, matrices, strict=True):
        warped, fp = warp(frame, matrix, shape)
        store.add(warped, matrix, shape)
        live.add(warped, fp)
    return live, store


@pytest.mark.parametrize("satellite_frame", [2, 7])  # inside the warm-up batch, and after it
@pytest.mark.parametrize("with_store", [True, False])
def test_a_satellite_in_one_of_ten_frames_is_absent_from_live_and_final(
    tmp_path: Path, satellite_frame: int, with_store: bool
) -> None:
    frames, matrices, truth = _frames(10, (40, 48), 3, max_shift=1.5)
    frames[satellite_frame][20:22, :, :] += 0.5
    live, store = _run_live(frames, matrices, tmp_path / "s", with_store=with_store)
    trail = np.zeros((40, 48), bool)
    trail[17:26, 3:-3] = True  # the trail after any shift, with its interpolation spread
    limit = 5 * SKY_NOISE / np.sqrt(8)  # a clean 10-frame mean is within this of the truth
    final = combine(store)
    plain = combine(store, method="mean")
    assert np.abs(plain - truth)[trail].max() > 0.04  # without rejection the trail shows
    assert np.abs(live.result() - truth)[trail].max() < limit
    assert np.abs(final - truth)[trail].max() < limit
    assert live.rejected >= 2 * 40  # at least the trail's samples
    assert live.frames == 10


def test_live_and_final_agree_on_clean_data(tmp_path: Path) -> None:
    frames, matrices, truth = _frames(16, (48, 64), 3, max_shift=2.0)
    live, store = _run_live(frames, matrices, tmp_path / "s")
    final = combine(store)
    current = live.result()
    full = _coverage(store) == 16
    diff = np.abs(current - final)[full]
    # Both are unbiased means of the same samples; they differ only where one rejects tail
    # samples the other keeps (each moves the mean by ~ kappa * sigma / 16 ~ 0.2 sigma; the live
    # test, on few-frame estimates, can drop up to ~3 in a pixel) and by the store's 16-bit
    # quantisation (<= 7.6e-6)
    assert diff.max() < 1.0 * SKY_NOISE
    assert np.quantile(diff, 0.99) < 0.3 * SKY_NOISE
    assert diff.mean() < 0.02 * SKY_NOISE
    assert np.abs(current - truth)[full].mean() < 0.35 * SKY_NOISE  # ~ sigma / sqrt(16) * 0.8
    # few good samples lost to live rejection on Gaussian noise (simulated ~0.4 %)
    assert live.rejected < 0.015 * 16 * 48 * 64 * 3


def test_nan_exactly_where_no_frame_covers(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(6, (30, 40), 1)
    matrices = [np.array([[1.0, 0, 25.0], [0, 1.0, 0.0]])] * 6  # only the right strip covered
    live, store = _run_live(frames, matrices, tmp_path / "s", warmup=3)
    result = live.result()
    fp = store.footprint_band(0, 0, 30)
    assert result.shape == (30, 40, 1) and result.dtype == np.float32
    assert np.array_equal(np.isnan(result[..., 0]), ~fp)
    assert np.array_equal(np.isnan(combine(store)[..., 0]), ~fp)


def _encode(var: np.ndarray, dither: np.ndarray) -> np.ndarray:
    """The variance code written plainly (int64): (float32 bits + dither - bits of 2^-30)
    >> 12, clipped to uint16; ``dither`` already holds the offset, as codes.dither gives it."""
    bits = np.asarray(var, np.float32).view(np.int32).astype(np.int64) + dither
    return np.clip(bits >> 12, 0, 65535).astype(np.uint16)


def _decode(code: np.ndarray) -> np.ndarray:
    bits = (code.astype(np.int64) << 12) + ((127 - 30) << 23)
    return bits.astype(np.uint32).view(np.float32)


def _frame_dither(live: LiveStack, number: int, band_rows: int) -> np.ndarray:
    """The dither offsets of frame ``number`` for the whole (rows, cols * C) image, band by
    band as LiveStack reads them."""
    rows, width = live.shape[0], live.shape[1] * live.channels
    parts = []
    for r0 in range(0, rows, band_rows):
        r1 = min(r0 + band_rows, rows)
        parts.append(dither(dither_start(number, r0), (r1 - r0) * width).reshape(-1, width))
    return np.concatenate(parts).astype(np.int64)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` rounded once (the product of two float32 is exact in float64)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def _reference_update(
    live: LiveStack,
    state: tuple[np.ndarray, np.ndarray, np.ndarray],
    x: np.ndarray,
    fp: np.ndarray,
    number: int,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """LiveStack's documented running test and update, written plainly on the whole image:
    every pixel judged with the full float32 statistic, then the accepted ones updated."""
    mean, code, count = state
    channels = x.shape[2]
    floor_sq = np.square(live.floor)
    var = _decode(code)
    delta = np.where(fp[..., np.newaxis], x - mean, np.float32(0))
    d2 = np.square(delta)
    n = np.maximum(count, 2).astype(np.float32)[..., np.newaxis]
    ratio = n / (n - np.float32(1))
    inc = np.float32(1) / n + np.float32(1)
    terms = d2 / (np.maximum(var * ratio, floor_sq) * inc)
    z = terms[..., 0]
    for c in range(1, channels):
        z = z + terms[..., c]
    reject = (z > live.quantiles[count]) & fp
    accept = fp & ~reject
    w = np.where(accept, np.float32(1) / (count + np.float32(1)), np.float32(0))
    w = w.astype(np.float32)[..., np.newaxis]
    new_mean = _fma(delta, w, mean)
    a = _fma(d2, w, var)
    new_var = a * (np.float32(1) - w)
    dither = _frame_dither(live, number, live._band_rows()).reshape(x.shape)
    new_code = _encode(new_var, dither)
    new_count = (count + accept).astype(np.uint16)
    return (new_mean, new_code, new_count), int(np.count_nonzero(reject)) * channels


@pytest.mark.parametrize("path", ["catch_up", "add"])
def test_running_update_is_bitwise_the_documented_rule(tmp_path: Path, path: str) -> None:
    # ragged footprints (rotation, offset), pixels with fewer than 3 samples at the edges, a
    # satellite (few rejections: the per-candidate path) and a frame with a bright half (more
    # than 5 % of the pixels far out: the whole-band path)
    frames, matrices, _ = _frames(12, (48, 64), 3, max_shift=3.0, max_angle=3.0, offset=2.0)
    frames[7][20:22] += 0.5
    frames[5][:, :40] += 0.3
    shape = (48, 64)
    store = FrameStore(tmp_path / "s", shape, 3)
    live = LiveStack(shape, 3, warmup=4, store=store)
    for frame, matrix in zip(frames, matrices, strict=True):
        store.add_warped(frame, matrix)
        i = len(store) - 1
        x, fp = store.read_band(i, 0, 48), store.footprint_band(i, 0, 48)
        if path == "catch_up":
            live.catch_up()
        else:
            live.add(np.where(fp[..., np.newaxis], x, np.nan), fp)  # NaN outside: ignored
        if live.frames == live.warmup:
            state = (live._mean.copy(), live._spread.copy(), live._count.copy())
            rejected = live.rejected
        elif live.frames > live.warmup:
            state, r = _reference_update(live, state, x, fp, live.frames)
            rejected += r
            assert _bits(live._mean) == _bits(state[0])
            assert _bits(live._spread) == _bits(state[1])
            assert _bits(live._count) == _bits(state[2])
            assert live.rejected == rejected
    assert np.count_nonzero(live.count < 3) > 0  # the edges were exercised
    assert live.rejected > 2 * 64 * 3  # the satellite and the bright half were rejected
    assert np.all(np.isfinite(live._mean))


def _reference_batch(
    live: LiveStack, cube: np.ndarray, fp: np.ndarray, floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The documented warm-up batch clip, written plainly on the whole (n, rows, cols, C)
    float32 cube: each pixel's sample judged against the others of its pixel, then the
    survivors' mean, coded variance and count (float32 throughout, sums in frame order)."""
    channels = cube.shape[3]
    valid = np.repeat(fp[..., np.newaxis], channels, axis=3)
    x = cube * valid
    count = valid.sum(axis=0).astype(np.float32)
    mean = x.sum(axis=0) / np.maximum(count, 1)
    dev = (x - mean) * valid
    q = np.zeros_like(mean)
    for j in range(len(x)):
        q += np.square(dev[j])
    others = np.maximum(count - 1, 2)
    ratio = count / others
    factor = (others + 1) / others
    others_m2 = q - np.square(dev) * ratio
    threshold = np.maximum(others_m2 / (others - 1), np.square(floor)) * factor
    terms = np.square(dev) * np.square(ratio) / threshold
    z = terms[..., 0]
    for c in range(1, channels):
        z = z + terms[..., c]
    others = np.maximum(count[..., 0] - 1, 0).astype(np.intp)
    outside = (z > live.quantiles[others]) & fp
    keep = valid & ~outside[..., np.newaxis]
    survivors = keep.sum(axis=0)
    total = np.sum(x, axis=0, where=keep)
    survivors_mean = np.where(survivors > 0, total / np.maximum(survivors, 1), 0)
    survivors_mean = survivors_mean.astype(np.float32)  # divided in float64, rounded once
    m2 = np.zeros_like(mean)
    for j in range(len(x)):
        m2 += np.where(keep[j], np.square(x[j] - survivors_mean), 0)
    var = m2 / np.maximum(survivors, 1).astype(np.float32)
    width = cube.shape[2] * channels
    dither = _frame_dither(live, len(cube), _warmup_band_rows(len(cube), width))
    code = _encode(var, dither.reshape(var.shape))
    rejected = int(np.count_nonzero(valid)) - int(np.count_nonzero(keep))
    return survivors_mean, code, survivors[..., 0].astype(np.uint16), rejected


@pytest.mark.parametrize("path", ["catch_up", "add"])
def test_warmup_batch_is_bitwise_the_documented_clip(tmp_path: Path, path: str) -> None:
    frames, matrices, _ = _frames(6, (40, 52), 3, max_shift=3.0, max_angle=3.0, offset=2.0)
    frames[0] += 0.02 * np.random.default_rng(9).standard_normal(frames[0].shape).astype(
        np.float32
    )  # a noisier frame: many tail samples near the threshold
    frames[2][18:20] += 0.5  # satellite
    for frame in frames:  # a flat patch (a saturated star core): the floor decides there
        frame[10:30, 14:42] = 0.7
    frames[3][10:30, 14:42] += 0.001  # below 3 floors: kept only thanks to the floor
    shape = (40, 52)
    store = FrameStore(tmp_path / "s", shape, 3)
    live = LiveStack(shape, 3, warmup=6, store=store if path == "catch_up" else None)
    for frame, matrix in zip(frames, matrices, strict=True):
        store.add_warped(frame, matrix)
        i = len(store) - 1
        if live.frames == 5:
            floor = live._typical_std_floor()  # from the first warmup - 1 frames
        if path == "catch_up":
            live.catch_up()
        else:
            live.add(store.read_band(i, 0, 40), store.footprint_band(i, 0, 40))
    cube = np.stack([store.read_band(i, 0, 40) for i in range(6)])
    fps = np.stack([store.footprint_band(i, 0, 40) for i in range(6)])
    mean, code, count, rejected = _reference_batch(live, cube, fps, floor)
    assert _bits(live._mean) == _bits(mean)
    assert _bits(live._spread) == _bits(code)
    assert _bits(live._count) == _bits(count)
    assert live.rejected == rejected > 2 * 52 * 3  # the satellite and some tail samples
    assert np.count_nonzero(count < 4) > 0  # pixels with too few others were not judged


def _stack_with_holes(shape: tuple[int, int], channels: int, seed: int = 3) -> LiveStack:
    """A live stack whose state is random, with uncovered (count 0) blocks and single pixels."""
    rng = np.random.default_rng(seed)
    live = LiveStack(shape, channels, warmup=1)
    live._mean[:] = 0.05 + 0.2 * rng.random((*shape, channels), dtype=np.float32)
    live._count[:] = 4
    live._count[: shape[0] // 3, : shape[1] // 5] = 0
    live._count[rng.random(shape) < 0.001] = 0
    return live


@pytest.mark.parametrize(
    ("shape", "channels", "width"),
    [
        ((400, 600), 3, 160),  # 3.75x, the 24 MP -> 1600 px ratio
        ((401, 599), 1, 160),  # odd sizes, mono
        ((300, 400), 3, 100),  # integer factor
        ((300, 400), 3, 200),  # integer factor 2 (OpenCV's shortcut: float rounding differs)
        ((97, 131), 3, 7),
        ((50, 60), 3, 59),  # barely smaller
    ],
)
def test_preview_image_is_the_resized_result(
    shape: tuple[int, int], channels: int, width: int
) -> None:
    live = _stack_with_holes(shape, channels)
    height = max(1, round(shape[0] * width / shape[1]))
    full = live.result()
    expected = cv2.resize(full, (width, height), interpolation=cv2.INTER_AREA)
    expected = expected.reshape(height, width, channels)
    got = live.preview_image(width)
    assert got.shape == (height, width, channels) and got.dtype == np.float32
    assert np.array_equal(np.isnan(got), np.isnan(expected))  # NaN spreads as in OpenCV
    assert np.isnan(got).any() and not np.isnan(got).all()
    # measured: bit-identical except with OpenCV's integer-factor shortcut (2e-7 relative)
    assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_preview_image_never_enlarges_and_never_forms_the_full_image(tmp_path: Path) -> None:
    live = _stack_with_holes((30, 40), 3)
    assert _bits(live.preview_image(40)) == _bits(live.result())
    assert _bits(live.preview_image(1600)) == _bits(live.result())
    with pytest.raises(ValueError, match="width"):
        live.preview_image(0)
    big = _stack_with_holes((1200, 1800), 3)
    tracemalloc.start()
    small = big.preview_image(320)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    full_bytes = 1200 * 1800 * 3 * 4  # 26 MB
    assert peak < small.nbytes + full_bytes / 3  # measured ~7 MB: one 4 MB band and its copies
    # the preview written from it is the one written from the full image (float rounding
    # could move a value across an 8-bit step; measured identical)
    write_preview(tmp_path / "full.png", big.result(), width=320)
    write_preview(tmp_path / "small.png", small, width=320)
    a = cv2.imread(str(tmp_path / "full.png"), cv2.IMREAD_UNCHANGED).astype(int)
    b = cv2.imread(str(tmp_path / "small.png"), cv2.IMREAD_UNCHANGED).astype(int)
    assert a.shape == (213, 320, 3) and np.abs(a - b).max() <= 1


def test_store_must_hold_each_frame_before_the_live_stack(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "s", (10, 10), 1)
    live = LiveStack((10, 10), 1, store=store)
    with pytest.raises(ValueError, match="append each frame to the store"):
        live.add(np.zeros((10, 10, 1), np.float32), np.ones((10, 10), bool))


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _same_state(a: LiveStack, b: LiveStack) -> bool:
    return (
        _bits(a._mean) == _bits(b._mean)
        and _bits(a._spread) == _bits(b._spread)
        and _bits(a._count) == _bits(b._count)
        and _bits(a.floor) == _bits(b.floor)
        and (a.frames, a.rejected, a.kappa, a.warmup) == (b.frames, b.rejected, b.kappa, b.warmup)
    )


@pytest.mark.parametrize(("split", "with_store"), [(7, True), (3, False), (3, True)])
def test_save_load_round_trip_is_bitwise_and_the_session_continues_identically(
    tmp_path: Path, split: int, with_store: bool
) -> None:
    frames, matrices, _ = _frames(10, (24, 30), 3, max_shift=2.0)
    frames[8][10, :, :] += 0.5
    shape = (24, 30)
    warped = [warp(f, m, shape) for f, m in zip(frames, matrices, strict=True)]
    store = FrameStore(tmp_path / "store", shape, 3)
    straight = LiveStack(shape, 3, warmup=5, store=store if with_store else None)
    resumed = LiveStack(shape, 3, warmup=5, store=store if with_store else None)
    for i, (w, fp) in enumerate(warped):
        store.add(w, matrices[i], shape)
        straight.add(w, fp)
        if i < split:
            resumed.add(w, fp)
        elif i == split:
            save_live(resumed, tmp_path / "ckpt")
            resumed = load_live(tmp_path / "ckpt", store=store if with_store else None)
            resumed.add(w, fp)
        else:
            resumed.add(w, fp)
    assert _same_state(straight, resumed)
    assert _bits(straight.result()) == _bits(resumed.result())


def test_reload_is_bitwise_and_a_crashed_save_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(7, (16, 20), 3)
    live, store = _run_live(frames, matrices, tmp_path / "s")
    save_live(live, tmp_path / "ckpt")
    loaded = load_live(tmp_path / "ckpt", store=store)
    assert _same_state(live, loaded)
    # A crash during the next save: new-generation files half written, manifest not replaced.
    (tmp_path / "ckpt" / "mean.2.npy").write_bytes(b"\x93NUMPY half")
    (tmp_path / "ckpt" / ".m2.2.npy.0123456789ab.tmp").write_bytes(b"junk")
    assert _same_state(live, load_live(tmp_path / "ckpt", store=store))
    # the next save replaces them and cleans older generations
    save_live(live, tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("."))
    assert names == ["count.2.npy", "live.json", "mean.2.npy", "spread.2.npy"]
    assert json.loads((tmp_path / "ckpt" / "live.json").read_text())["generation"] == 2
    assert _same_state(live, load_live(tmp_path / "ckpt", store=store))


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(6, (16, 20), 3)
    live, store = _run_live(frames, matrices, tmp_path / "s")
    save_live(live, tmp_path / "ckpt")
    manifest = tmp_path / "ckpt" / "live.json"
    meta = json.loads(manifest.read_text())
    assert meta["version"] == 2
    meta["version"] = 1  # an older nightstack's: M2 and counts per sample
    manifest.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 1 live-stack checkpoint, not 2"):
        load_live(tmp_path / "ckpt", store=store)
    # the next save (format 2) deletes the older format's arrays
    np.save(tmp_path / "ckpt" / "m2.1.npy", np.zeros(3, np.float32))
    save_live(live, tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("m2.*"))
    assert _same_state(live, load_live(tmp_path / "ckpt", store=store))


def test_catch_up_replays_stored_frames_like_add(tmp_path: Path) -> None:
    frames, matrices, _ = _frames(8, (20, 26), 3)
    store = FrameStore(tmp_path / "s", (20, 26), 3)
    for f, m in zip(frames, matrices, strict=True):
        store.add_warped(f, m)
    by_add = LiveStack((20, 26), 3, store=store)
    for i in range(8):
        by_add.add(store.read_band(i, 0, 20), store.footprint_band(i, 0, 20))
    by_catch_up = LiveStack((20, 26), 3, store=store)
    assert by_catch_up.catch_up() == 8
    assert _same_state(by_add, by_catch_up)


def test_live_validates_its_inputs(tmp_path: Path) -> None:
    live = LiveStack((10, 12), 3)
    with pytest.raises(ValueError, match="shape"):
        live.add(np.zeros((10, 12, 1), np.float32), np.ones((10, 12), bool))
    with pytest.raises(ValueError, match="footprint"):
        live.add(np.zeros((10, 12, 3), np.float32), np.ones((10, 13), bool))
    with pytest.raises(ValueError, match="warmup"):
        LiveStack((10, 12), 3, warmup=0)
    with pytest.raises(ValueError, match="kappa"):
        LiveStack((10, 12), 3, kappa=0)


def test_running_statistics_match_a_float64_two_pass_after_300_and_3000_frames() -> None:
    # A bright pixel level (0.5) with small noise (1e-3): the hardest case for a float32 mean
    # and for a variance coded in 16 bits and re-rounded every frame.
    rows, cols = 40, 50
    rng = np.random.default_rng(11)
    fp = np.ones((rows, cols), bool)
    live = LiveStack((rows, cols), 3, kappa=1e6, warmup=1)  # no rejection: plain statistics
    frames = []
    for i in range(3000):
        frame = (0.5 + 1e-3 * rng.standard_normal((rows, cols, 3))).astype(np.float32)
        frames.append(frame)
        live.add(frame, fp)
        n = i + 1
        if n not in (300, 3000):
            continue
        data = np.array(frames, dtype=np.float64)
        assert live.rejected == 0 and np.all(live.count == n)
        # each float32 update rounds the mean by <= half an ulp of 0.5 (3e-8): a random walk of
        # ~2e-6 over 3000 frames, 5 % of the mean's own statistical error (1e-3 / sqrt(n))
        assert_allclose(live.result(), data.mean(axis=0), rtol=0, atol=2.5e-6)
        rel = live.variance.astype(np.float64) / data.var(axis=0) - 1
        rms, bias = float(np.sqrt(np.mean(rel**2))), float(np.mean(rel))
        statistical = np.sqrt(2 / n)  # the relative error of a variance from n samples
        # measured: rms 1.6e-3 (300 frames) and 6.0e-3 (3000), bias 7e-6 and 1.6e-5 (within
        # their sampling error, 2e-5 and 8e-5), max 7e-3 and 2.2e-2: 50 and 4.3 times below the
        # statistical error, which they enlarge by 0.04 % and 2.7 % in quadrature
        assert rms < (3e-3 if n == 300 else 9e-3) < 0.35 * statistical
        assert abs(bias) < 3e-4 < 0.012 * statistical
        assert np.abs(rel).max() < (1.5e-2 if n == 300 else 4e-2)


def test_the_variance_code_round_trips_and_rounds_stochastically() -> None:
    codes = np.arange(65536, dtype=np.uint16)
    values = _decode(codes)
    assert np.array_equal(live_variance_codes(values, 0), codes)  # exact values keep their code
    assert np.array_equal(live_variance_codes(values, 4095), codes)
    assert np.all(np.diff(values) > 0)  # monotonic
    step = values[1:] / values[:-1] - 1
    assert step.max() <= 2.0**-11 * 1.0001 and step.min() > 2.0**-12  # 11 mantissa bits
    assert values[0] == 2.0**-30 and 3.99 < values[-1] < 4
    assert live_variance_codes(np.array([0.0, 1e-12, 1e3, np.inf], np.float32), 0).tolist() == [
        0,
        0,
        65535,
        65535,
    ]
    # a value 30 % of the way between two codes rounds up 30 % of the time, over the table
    x = np.full(1 << 18, values[30000] + 0.3 * (values[30001] - values[30000]), np.float32)
    offsets = dither(12345, x.size)
    code = np.empty(x.size, np.uint16)
    encode(x.copy(), offsets, code)
    assert set(np.unique(code)) == {30000, 30001}
    assert abs(np.mean(code == 30001) - 0.3) < 0.005


def live_variance_codes(values: np.ndarray, dither: int) -> np.ndarray:
    """The codes LiveStack's encoder gives ``values`` with a constant dither."""
    out = np.empty(values.shape, np.uint16)
    offsets = np.full(values.shape, dither - ((127 - 30) << 23), np.int32)
    encode(values.astype(np.float32), offsets, out)
    return out


def test_the_live_state_is_6_67_bytes_a_sample_and_counts_are_per_pixel() -> None:
    live = LiveStack((4000, 6000), 3)
    assert live.state_bytes == 4000 * 6000 * 3 * (4 + 2) + 4000 * 6000 * 2  # 480 MB at 24 MP
    assert live.state_bytes / (4000 * 6000 * 3) == pytest.approx(6.667, abs=1e-3)
    count = live.count
    assert count.shape == (4000, 6000, 3) and count.dtype == np.uint16
    with pytest.raises(ValueError):
        count[0, 0, 0] = 1  # read-only


def test_the_quantiles_have_the_false_rejection_rate_of_a_kappa_sigma_cut() -> None:
    mono = LiveStack((4, 4), 1, kappa=3.0).quantiles
    assert np.all(np.isinf(mono[:3])) and np.all(mono[3:] == np.float32(9.0))  # kappa^2
    rgb = LiveStack((4, 4), 3, kappa=3.0).quantiles
    assert np.all(np.isinf(rgb[:3])) and np.all(np.diff(rgb[3:]) <= 0)
    # many samples: the chi2(3) quantile, P(chi2(3) > q) = P(|N(0, 1)| > 3) = 0.27 % by a
    # closed form independent of scipy
    q = float(rgb[-1])
    assert q == pytest.approx(14.157, abs=0.002)
    tail = math.erfc(math.sqrt(q / 2)) + math.sqrt(2 * q / math.pi) * math.exp(-q / 2)
    assert tail == pytest.approx(math.erfc(3 / math.sqrt(2)), rel=1e-3)
    # 11 samples: 3 x the F(3, 10) quantile at P(|t_10| > 3) = 1.33 %
    assert float(rgb[11]) == pytest.approx(17.93, abs=0.01)
    assert float(LiveStack((4, 4), 3, kappa=2.0).quantiles[-1]) == pytest.approx(8.025, abs=0.005)


def test_few_samples_reject_no_more_clean_pixels_than_the_per_channel_test() -> None:
    # The documented statistic on 300 000 clean Gaussian pixels judged against 11 samples
    # each (no floor): the per-channel 3-sigma test rejected P(|t_10| > 3) = 1.33 % of the
    # samples; the pixel test with q_11 a little less (the channels' variances are estimated
    # apart), where the chi2(3) quantile would reject 2.1 %
    rng = np.random.default_rng(8)
    n, pixels = 11, 300_000
    history = rng.standard_normal((n, pixels, 3))
    x = rng.standard_normal((pixels, 3))
    var = history.var(axis=0, ddof=1)
    z = np.sum(np.square(x - history.mean(axis=0)) / ((1 + 1 / n) * var), axis=1)
    quantiles = LiveStack((4, 4), 3).quantiles
    per_channel = 2 * t_dist.sf(3.0, n - 1)
    assert per_channel == pytest.approx(0.0133, abs=1e-4)
    assert 0.6 * per_channel < np.mean(z > quantiles[n]) < per_channel  # measured 0.95 %
    assert np.mean(z > quantiles[-1]) > 1.5 * per_channel  # chi2(3)'s 14.16: 2.1 %


def _clean_history(
    shape: tuple[int, int], frames: int, sigma: float, seed: int
) -> tuple[LiveStack, np.random.Generator]:
    rng = np.random.default_rng(seed)
    live = LiveStack(shape, 3, warmup=5)
    fp = np.ones(shape, bool)
    for _ in range(frames):
        live.add((0.2 + sigma * rng.standard_normal((*shape, 3))).astype(np.float32), fp)
    return live, rng


def test_clean_gaussian_noise_is_rejected_at_the_stated_rate() -> None:
    # 60 clean frames, then the rejections of 20 more: P(chi2(3) > 14.16) = 0.27 % with the
    # true sigma; q_n (14.8 .. 14.7 here) keeps the per-channel test's rate with variances
    # estimated from 60..80 samples, and the floor lowers it a little (measured 0.26 %)
    shape, sigma = (100, 100), 0.01
    live, rng = _clean_history(shape, 60, sigma, seed=5)
    fp = np.ones(shape, bool)
    before = live.rejected
    for _ in range(20):
        live.add((0.2 + sigma * rng.standard_normal((*shape, 3))).astype(np.float32), fp)
    rate = (live.rejected - before) / 3 / (20 * shape[0] * shape[1])  # pixels rejected
    # 200 000 pixel samples: the binomial error of the rate is 0.013 %
    assert 0.0024 < rate < 0.0042


def test_a_trail_in_every_channel_and_a_one_channel_hot_sample_are_rejected() -> None:
    shape, sigma = (60, 80), 0.01
    live, rng = _clean_history(shape, 60, sigma, seed=7)
    mean = live.result()
    frame = (0.2 + sigma * rng.standard_normal((*shape, 3))).astype(np.float32)
    frame[20:23] = mean[20:23] + 2.6 * sigma  # a faint trail: 2.6 sigma in every channel
    frame[40:43, :, 1] = mean[40:43, :, 1] + 4.5 * sigma  # hot in one channel only
    frame[50:53, :, 2] = mean[50:53, :, 2] + 2.4 * sigma  # one channel at 2.4 sigma: normal
    count = live.pixel_count.copy()
    live.add(frame, np.ones(shape, bool))
    kept = live.pixel_count - count
    # z = 3 x 2.6^2 = 20.3 and 4.5^2 = 20.3 (plus the others' noise), above q_61 = 14.8:
    # caught (a per-channel 3-sigma cut would have kept the trail); 2.4^2 + noise = 6.8 is not
    assert np.count_nonzero(kept[20:23] == 0) >= 0.97 * 3 * 80
    assert np.count_nonzero(kept[40:43] == 0) >= 0.97 * 3 * 80
    assert np.count_nonzero(kept[50:53] == 0) <= 0.03 * 3 * 80
    # a rejected pixel's samples left its mean untouched, in all channels; an accepted one's
    # moved it in all channels
    after = live.result()
    rejected = kept == 0
    assert np.array_equal(after[rejected], mean[rejected])
    assert np.mean(after[~rejected] != mean[~rejected]) > 0.99  # a few deltas round to 0
