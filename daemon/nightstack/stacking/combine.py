"""The final combine: the exact sigma clip (or mean, median, winsorized clip) of every stored
frame, computed in row bands under a RAM cap from the same values the live stack read.

The one banded clip driver: :func:`combine` reads any :class:`Frames` (the session's
:class:`~nightstack.stacking.store.FrameStore`, or the calibration frames a master is built from,
:func:`nightstack.calibration.masters.build_master`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import numpy.typing as npt

from nightstack.arrays import BoolArray, FloatArray
from nightstack.config import StackMethod

_COMBINE_BYTES_PER_SAMPLE: dict[str, int] = {
    "sigma_clip": 5,
    "mean": 5,
    "median": 24,
    "winsorized": 44,
}
"""Working bytes per (frame, pixel, channel) sample of one band in :func:`combine`: the float32
cube 4 B + its validity 1 B; the median and the winsorized clip also work on a float64 copy and
their sorted copies (measured with tracemalloc: tests/test_stack.py checks the cap)."""

_COMBINE_BYTES_PER_PIXEL: dict[str, int] = {
    "sigma_clip": 16,
    "mean": 28,
    "median": 160,
    "winsorized": 160,
}
"""Per (pixel, channel) of one band, independent of the number of frames: the mean's float64
sums, its float32 result and masks; the median and winsorized clip's bounds (~15 float64
arrays). The sigma clip's per-pixel work lives in its chunks (:data:`_CHUNK_BYTES_PER_PIXEL`)."""

_CHUNK_SAMPLES = 1 << 20
"""(frame, pixel, channel) samples the sigma clip works on at a time (a piece of the band): large
enough that each numpy call runs long without the GIL, so two threads clip at 1.7x one's speed
(measured: 2^18 gains nothing, 2^20 is best of 2^18 .. 2^22 at 12 frames)."""

_CHUNK_BYTES_PER_SAMPLE = 36
"""Scratch bytes per sample of one sigma-clip chunk, worst case measured with tracemalloc (a
weighted chunk of partly covered pixels): gathered and sorted copies, float64 deviations and
weighted terms, masks."""

_CHUNK_BYTES_PER_PIXEL = 72
"""And per pixel of it: its float64 sums, bounds and run indices (matters for few frames)."""

_NETWORK_MAX = 96
"""Up to this many frames a band is sorted by a sorting network of element-wise min/max (SIMD
over the pixels); above it by numpy's sort of each pixel's samples (measured crossover)."""

_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads reading frames and clipping chunks: OpenCV and numpy release the GIL in their loops."""


class Frames(Protocol):
    """What :func:`combine` reads: ``len()`` frames on one (rows, cols) grid of ``channels``,
    band of rows by band of rows, each with its coverage (a frame store's aligned frames;
    calibration frames, which cover everything)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def channels(self) -> int: ...

    @property
    def block_rows(self) -> int:
        """Rows a frame is computed in at a time: bands are multiples of it where they can be."""
        ...

    def __len__(self) -> int: ...

    def footprint_spans(
        self, i: int, row_start: int, row_stop: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Frame ``i``'s coverage of rows row_start:row_stop: ``(first, stop)``, (band_rows,)
        int64 each, row ``r`` covered on columns ``first[r]:stop[r]``."""
        ...

    def read_band(
        self, i: int, row_start: int, row_stop: int, out: FloatArray | None = None
    ) -> FloatArray:
        """Frame ``i``'s rows row_start:row_stop, (band_rows, cols, channels), into ``out``."""
        ...


def combine(
    store: Frames,
    *,
    method: StackMethod = "sigma_clip",
    sigma: float = 3.0,
    maxiters: int = 5,
    weights: FloatArray | None = None,
    ram_cap_bytes: int = 256 * 2**20,
    progress: Callable[[int, int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Combine every frame of ``store``, band of rows by band of rows, under a RAM cap.

    Each pixel's sample is the frames whose footprint covers it (absent elsewhere, not zero).

    Methods:

    - ``"sigma_clip"``: exactly astropy ``sigma_clip(cube, sigma=sigma, maxiters=maxiters,
      cenfunc='median', stdfunc='std', axis=0)`` of the float64 cube of the stored values
      (per pixel, so banding does not change it), then the mean of the survivors
      (:func:`_clip_pixels` says how).
    - ``"mean"``: mean of the sample.
    - ``"median"``: median of the sample (mean of the two middle values for an even count);
      weights are ignored.
    - ``"winsorized"``: winsorized sigma clip, per pixel with sample X:
      (1) W = X; at most ``maxiters`` times: m = median(W), s = std(W) (population std about the
      mean), W' = clip(W, m - sigma s, m + sigma s), stop if W' == W, else W = W';
      (2) m = median(W), s = std(W) of the final W;
      (3) survivors = the x in X with m - sigma s <= x <= m + sigma s; result = their mean.
      Outliers cannot inflate s, unlike a plain sigma clip's first iteration.

    The mean of survivors is ``sum(w_i x_i) / sum(w_i)`` in float64 (rounded to float32 at the
    end), ``w`` the per-frame weights; the clip itself is unweighted.

    Frames are read by :data:`_THREADS` threads and the sigma clip works on chunks in as many;
    bands are whole multiples of the store's
    :attr:`~nightstack.stacking.store.FrameStore.block_rows` where the cap allows, so no frame's
    block is demosaiced and warped twice.

    Parameters
    ----------
    store : Frames
        The aligned frames (a :class:`~nightstack.stacking.store.FrameStore`).
    method : {"sigma_clip", "mean", "median", "winsorized"}
    sigma : float
        Clipping threshold in standard deviations (> 0).
    maxiters : int
        Maximum clipping iterations (>= 1).
    weights : array-like, optional
        (n,) per-frame weights > 0 (e.g. ``store.weights()``); default: all equal.
    ram_cap_bytes : int
        Working memory allowed for one band (cube and working copies); the (rows, cols, C)
        float32 result is extra.
    progress : callable, optional
        Called as ``progress(rows_done, rows_total)`` after each band.

    Returns
    -------
    ndarray
        (rows, cols, C) float32; NaN where no frame covers the pixel (and wherever the clip
        rejects the whole sample, as astropy does, possible only for sigma < 1).
    """
    if method not in _COMBINE_BYTES_PER_SAMPLE:
        methods = sorted(_COMBINE_BYTES_PER_SAMPLE)
        raise ValueError(f"method must be one of {methods}, not {method!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be > 0, not {sigma}")
    if maxiters < 1:
        raise ValueError(f"maxiters must be >= 1, not {maxiters}")
    n = len(store)
    rows, cols = store.shape
    channels = store.channels
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError(f"weights must be {n} finite values > 0")
    out = np.full((rows, cols, channels), np.nan, dtype=np.float32)
    if n == 0:
        return out
    chunk = _chunk_samples(n, ram_cap_bytes)
    scratch = 0  # the sigma clip's chunks, in every thread
    if method == "sigma_clip":
        scratch = _THREADS * (chunk * _CHUNK_BYTES_PER_SAMPLE + chunk // n * _CHUNK_BYTES_PER_PIXEL)
    per_row = (
        cols * channels * (n * _COMBINE_BYTES_PER_SAMPLE[method] + _COMBINE_BYTES_PER_PIXEL[method])
    )
    band = (ram_cap_bytes - scratch) // per_row
    if band < 1:
        raise ValueError(
            f"ram_cap_bytes={ram_cap_bytes} is too small: "
            f"one row of {n} frames needs {per_row + scratch} bytes"
        )
    block = store.block_rows
    if band >= block:
        band -= band % block
    with ThreadPoolExecutor(_THREADS) as pool:
        for r0 in range(0, rows, band):
            r1 = min(r0 + band, rows)
            cube, valid, common = _read_band(store, r0, r1, pool)
            if method == "sigma_clip":
                _clip_band(cube, valid, common, sigma, maxiters, w, chunk, pool, out[r0:r1])
            elif method == "mean":
                out[r0:r1] = _weighted_mean(cube, valid, w)
            elif method == "median":
                out[r0:r1] = _median(cube.astype(np.float64), valid)
            else:
                wide = cube.astype(np.float64)
                out[r0:r1] = _weighted_mean(wide, _winsorized_keep(wide, valid, sigma, maxiters), w)
                del wide
            del cube, valid
            if progress is not None:
                progress(r1, rows)
    return out


def _chunk_samples(n: int, ram_cap_bytes: int) -> int:
    """Samples (a multiple of ``n``) of one sigma-clip chunk: :data:`_CHUNK_SAMPLES`, less when
    the cap is small (half of it for all threads' chunks: smaller chunks spend their time on
    the GIL, 2^18 samples no faster in two threads than in one), at least one pixel's."""
    per_sample = _CHUNK_BYTES_PER_SAMPLE + _CHUNK_BYTES_PER_PIXEL / n
    fit = int(ram_cap_bytes / (2 * _THREADS * per_sample))
    return n * max(1, min(_CHUNK_SAMPLES, fit) // n)


def _read_band(
    store: Frames, r0: int, r1: int, pool: ThreadPoolExecutor
) -> tuple[npt.NDArray[np.float32], BoolArray, tuple[int, int]]:
    """Rows r0:r1 of every frame, read in ``pool``: the (n, rows, cols, C) float32 cube (0 where
    absent), its (n, rows, cols, C) bool validity (the footprints), and the columns
    ``first:stop`` every frame covers on every row of the band (empty when none)."""
    n, cols, channels = len(store), store.shape[1], store.channels
    cube = np.empty((n, r1 - r0, cols, channels), dtype=np.float32)
    valid = np.zeros(cube.shape, dtype=bool)
    firsts, stops = np.zeros(n, np.int64), np.zeros(n, np.int64)

    def read(i: int) -> None:
        first, stop = store.footprint_spans(i, r0, r1)
        firsts[i], stops[i] = first.max(), stop.min()
        for r in range(r1 - r0):
            valid[i, r, first[r] : stop[r]] = True
        if np.any(stop > first):
            store.read_band(i, r0, r1, out=cube[i])
        else:
            cube[i] = 0.0

    for _ in pool.map(read, range(n)):
        pass
    first, stop = int(min(max(firsts.max(), 0), cols)), int(min(stops.min(), cols))
    return cube, valid, (first, max(first, stop))


def _clip_band(
    cube: npt.NDArray[np.float32],
    valid: BoolArray,
    common: tuple[int, int],
    sigma: float,
    maxiters: int,
    weights: npt.NDArray[np.float64],
    chunk: int,
    pool: ThreadPoolExecutor,
    out: npt.NDArray[np.float32],
) -> None:
    """The sigma clip's mean of a band into ``out`` ((rows, cols, C) float32), in ``pool``.

    The band's columns ``common`` (covered by every frame on every row: nearly all) go in
    pieces of about ``chunk`` samples, each copied to one contiguous (frames, samples) array
    (a view strided by the band would alias in the CPU cache) and clipped without validity
    masks; the edges beside them, whole rows of the band at a time, with them."""
    n, rows, cols, channels = cube.shape
    first, stop = common
    pieces: list[tuple[int, int, int, int, bool]] = []
    for c0, c1, full in ((first, stop, True), (0, first, False), (stop, cols, False)):
        if c1 <= c0:
            continue
        width = max(1, min(c1 - c0, chunk // (n * channels)))  # columns of a piece
        group = max(1, chunk // (n * channels * (c1 - c0))) if width == c1 - c0 else 1
        pieces += [
            (r0, min(r0 + group, rows), a, min(a + width, c1), full)
            for r0 in range(0, rows, group)
            for a in range(c0, c1, width)
        ]

    def run(piece: tuple[int, int, int, int, bool]) -> None:
        r0, r1, c0, c1, full = piece
        x = np.ascontiguousarray(cube[:, r0:r1, c0:c1]).reshape(n, -1)
        v = None if full else np.ascontiguousarray(valid[:, r0:r1, c0:c1]).reshape(n, -1)
        mean = _clip_pixels(x, v, sigma, maxiters, weights)
        out[r0:r1, c0:c1] = mean.reshape(r1 - r0, c1 - c0, channels)

    def share(start: int) -> None:  # one task a thread (a future a piece would cost its RAM)
        for piece in pieces[start::_THREADS]:
            run(piece)

    for _ in pool.map(share, range(_THREADS)):
        pass


def _clip_pixels(
    x: npt.NDArray[np.float32],
    valid: BoolArray | None,
    sigma: float,
    maxiters: int,
    weights: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """Mean of the survivors of astropy's sigma_clip (median centre, std) along axis 0.

    ``x``: (n, m) float32 samples of m pixels, ``valid`` (n, m) bool, or None when every sample
    is valid (absent samples may hold any finite filler). Returns (m,) float32, NaN where
    nothing survives.

    Astropy's algorithm (``sigma_clip(..., cenfunc="median", stdfunc="std", axis=0)``, its C
    ``compute_sigma_clipped_bounds``), per pixel: bounds ``median -/+ sigma * std`` (population
    std) of the kept samples, the kept samples narrowed to those within them (inclusive), until
    nothing changes, nothing is left, or ``maxiters`` bounds were computed; the survivors are
    then *all* valid samples within the last bounds (a sample clipped early can come back).

    Here the kept samples are always a run ``[lo, hi)`` of the pixel's sorted samples (they are
    the samples within an interval), so one sort gives every median and whether a pass clips
    anything is whether the run's first or last value lies outside its bounds. The first pass
    (every pixel) sums in frame order in float64; the few pixels it clips go on, gathered, with
    their run's sums; the survivors' (weighted) mean is summed in frame order in float64. Sums
    differ from astropy's (its selection reorders them) only in float64 rounding, far below a
    float32 sample's step: the survivors are the same, the means agree to float32 rounding.
    """
    n, m = x.shape
    unit = bool(np.all(weights == 1.0))
    if valid is None:  # inside every frame: no masks, ranks known
        some: BoolArray | None = None  # pixels with any valid sample: all
        rows = _sorted_rows(x.copy())
        total = np.add.reduce(x, axis=0, dtype=np.float64)
        mean = total / n
        deviation = np.subtract(x, mean, dtype=np.float64)
        deviation *= deviation
        std = np.add.reduce(deviation, axis=0)
        std /= n
        a, b = rows[(n - 1) // 2], rows[n // 2]
        centre = a.astype(np.float64)
        if n % 2 == 0:
            centre += b
            centre /= 2
        first, last = rows[0], rows[n - 1]
        result = mean.astype(np.float32)  # the plain mean, where nothing is clipped
    else:
        count = np.count_nonzero(valid, axis=0)
        rows = _sorted_rows(np.where(valid, x, np.float32(np.inf)))
        safe = np.maximum(count, 1)
        total = np.add.reduce(x, axis=0, where=valid, dtype=np.float64)
        deviation = np.subtract(x, total / safe, dtype=np.float64)
        deviation *= deviation
        std = np.add.reduce(deviation, axis=0, where=valid) / safe
        ordered = np.stack(rows)
        everything = np.arange(m)
        centre = _run_median(ordered, np.zeros(m, np.intp), count, everything)
        first = rows[0]
        last = ordered[np.maximum(count - 1, 0), everything]
        some = count > 0
        result = np.full(m, np.nan, dtype=np.float32)
        np.divide(total, count, out=result, where=some, casting="same_kind")
    del deviation
    np.sqrt(std, out=std)
    std *= sigma
    lower, upper = centre - std, centre + std
    clipped = first < lower
    clipped |= last > upper
    if some is not None:
        clipped &= some
    cols = np.flatnonzero(clipped) if unit else np.arange(m)
    if cols.size == 0:
        return result
    # --- the pixels that clip: narrow their runs until astropy would stop
    lower, upper = lower[cols], upper[cols]
    sorted_ = np.stack([row[cols] for row in rows])
    lo = np.count_nonzero(sorted_ < lower, axis=0)
    hi = np.count_nonzero(sorted_ <= upper, axis=0)
    active = np.flatnonzero(clipped[cols] & (hi > lo))
    rank = np.arange(n)[:, np.newaxis]
    for _ in range(1, maxiters):
        if active.size == 0:
            break
        run = sorted_[:, active]
        a_lo, a_hi = lo[active], hi[active]
        inside = (rank >= a_lo) & (rank < a_hi)
        kept = a_hi - a_lo
        run_mean = np.add.reduce(run, axis=0, where=inside, dtype=np.float64) / kept
        deviation = np.subtract(run, run_mean, dtype=np.float64)
        deviation *= deviation
        run_std = np.sqrt(np.add.reduce(deviation, axis=0, where=inside) / kept)
        del deviation
        run_centre = _run_median(run, a_lo, a_hi, np.arange(active.size))
        new_lower = run_centre - sigma * run_std
        new_upper = run_centre + sigma * run_std
        lower[active], upper[active] = new_lower, new_upper
        new_lo = np.maximum(a_lo, np.count_nonzero(run < new_lower, axis=0))
        new_hi = np.minimum(a_hi, np.count_nonzero(run <= new_upper, axis=0))
        lo[active], hi[active] = new_lo, new_hi
        active = active[((new_lo != a_lo) | (new_hi != a_hi)) & (new_hi > new_lo)]
    # --- the survivors: every valid sample within the last bounds
    xs = x[:, cols]
    keep = (xs >= lower) & (xs <= upper)
    if valid is not None:
        keep &= valid[:, cols]
    if unit:
        total_k = np.add.reduce(xs, axis=0, where=keep, dtype=np.float64)
        wsum = np.count_nonzero(keep, axis=0).astype(np.float64)
    else:
        w = weights[:, np.newaxis]
        total_k = np.add.reduce(xs * w, axis=0, where=keep)
        wsum = np.add.reduce(np.broadcast_to(w, xs.shape), axis=0, where=keep)
    good = wsum > 0
    means = np.full(cols.size, np.nan)
    means[good] = total_k[good] / wsum[good]
    result[cols] = means
    return result


def _run_median(
    ordered: npt.NDArray[np.float32],
    lo: npt.NDArray[np.intp],
    hi: npt.NDArray[np.intp],
    index: npt.NDArray[np.intp],
) -> npt.NDArray[np.float64]:
    """Median of each column's sorted run ``ordered[lo:hi]`` (numpy's: the middle value, or the
    mean of the two middle ones), float64; an empty run gives its first value."""
    n = ordered.shape[0]
    kept = np.maximum(hi - lo, 1)
    a = ordered[np.minimum(lo + (kept - 1) // 2, n - 1), index].astype(np.float64)
    b = ordered[np.minimum(lo + kept // 2, n - 1), index].astype(np.float64)
    return np.where(kept % 2 == 1, a, (a + b) / 2)


def _sorted_rows(values: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    """The rows of (n, m) ``values`` sorted along axis 0, as n (m,) arrays (``values`` is used as
    scratch): for n <= :data:`_NETWORK_MAX` by Batcher's odd-even merge network of row-wise
    minima and maxima (each comparator two SIMD passes over the pixels), else by numpy."""
    n = values.shape[0]
    if n > _NETWORK_MAX:
        values.sort(axis=0)
        return list(values)
    spare = np.empty(values.shape[1], dtype=values.dtype)
    rows = list(values)
    for i, j in _network(n):
        np.minimum(rows[i], rows[j], out=spare)
        np.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = spare, rows[i]
    return rows


@functools.cache
def _network(n: int) -> tuple[tuple[int, int], ...]:
    """The comparators (i, j), i < j, of Batcher's odd-even merge sort for ``n`` inputs (any n:
    the comparators of the next power of two that stay inside n)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _weighted_mean(
    cube: FloatArray, keep: BoolArray, weights: npt.NDArray[np.float64]
) -> npt.NDArray[np.float32]:
    """sum_i w_i x_i / sum_i w_i over kept samples, float64 accumulation; NaN where none."""
    total = np.zeros(cube.shape[1:], dtype=np.float64)
    wsum = np.zeros(cube.shape[1:], dtype=np.float64)
    unit = bool(np.all(weights == 1.0))
    term = None if unit else np.empty(cube.shape[1:], dtype=np.float64)
    for i in range(cube.shape[0]):
        if term is None:
            np.add(total, cube[i], out=total, where=keep[i])
        else:
            np.multiply(cube[i], weights[i], out=term)
            np.add(total, term, out=total, where=keep[i])
        np.add(wsum, weights[i], out=wsum, where=keep[i])
    result = np.full(total.shape, np.nan, dtype=np.float32)
    np.divide(total, wsum, out=total, where=wsum > 0)
    np.copyto(result, total, where=wsum > 0, casting="same_kind")
    return result


def _median(cube: FloatArray, valid: BoolArray) -> npt.NDArray[np.float32]:
    """Median of the valid samples along axis 0 (as np.nanmedian), NaN where none; sorts cube."""
    cube[~valid] = np.inf
    cube.sort(axis=0)
    count = np.count_nonzero(valid, axis=0)
    med = _sorted_median(cube, count)
    result = np.full(med.shape, np.nan, dtype=np.float32)
    np.copyto(result, med, where=count > 0, casting="same_kind")
    return result


def _sorted_median(values: FloatArray, count: npt.NDArray[np.intp]) -> FloatArray:
    """Median along axis 0 of ``values`` sorted ascending with the ``count`` valid values first.

    Even counts average the two middle values, as np.median; a zero count gives values[0].
    """
    safe = np.maximum(count, 1)
    lo = np.take_along_axis(values, ((safe - 1) // 2)[np.newaxis], axis=0)[0]
    hi = np.take_along_axis(values, (safe // 2)[np.newaxis], axis=0)[0]
    median: FloatArray = np.where(safe % 2 == 1, lo, 0.5 * (lo + hi))
    return median


def _sorted_stats(
    values: FloatArray, inside: BoolArray, count: npt.NDArray[np.intp]
) -> tuple[FloatArray, FloatArray]:
    """Median and population std along axis 0 of sorted ``values`` (valid first, ``count`` each)."""
    safe = np.maximum(count, 1)
    median = _sorted_median(values, count)
    mean = np.sum(values, axis=0, where=inside) / safe
    dev = values - mean
    dev *= dev
    std = np.sqrt(np.sum(dev, axis=0, where=inside) / safe)
    return median, std


def _winsorized_keep(cube: FloatArray, valid: BoolArray, sigma: float, maxiters: int) -> BoolArray:
    """Survivors of the winsorized sigma clip documented in :func:`combine`."""
    n = cube.shape[0]
    count = np.count_nonzero(valid, axis=0)
    wins = np.where(valid, cube, np.inf)
    wins.sort(axis=0)  # valid values first, ascending; clamping keeps the order
    inside = np.arange(n).reshape((n,) + (1,) * (cube.ndim - 1)) < count
    wins[~inside] = 0.0
    for _ in range(maxiters):
        median, std = _sorted_stats(wins, inside, count)
        lo = median - sigma * std
        hi = median + sigma * std
        clamped = np.clip(wins, lo, hi)
        clamped[~inside] = 0.0
        changed = not np.array_equal(clamped, wins)
        wins = clamped
        if not changed:
            break
    median, std = _sorted_stats(wins, inside, count)
    lo = median - sigma * std
    hi = median + sigma * std
    keep: BoolArray = valid & (cube >= lo) & (cube <= hi)
    return keep
