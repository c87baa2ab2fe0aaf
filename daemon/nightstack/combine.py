"""The final combine: the exact sigma clip (or mean, median, winsorized clip) of every stored
frame, computed in row bands under a RAM cap from the same values the live stack read."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt

from nightstack.store import FrameStore

FloatArray = npt.NDArray[np.floating]
BoolArray = npt.NDArray[np.bool_]

Method = Literal["sigma_clip", "mean", "median", "winsorized"]

_COMBINE_BYTES_PER_SAMPLE: dict[str, int] = {
    "sigma_clip": 32,
    "mean": 12,
    "median": 16,
    "winsorized": 36,
}
"""Peak working bytes per (frame, pixel, channel) sample of one band in :func:`combine`, measured
with tracemalloc (tests/test_stack.py checks the cap): float64 cube 8 B + validity mask 1 B +
the method's working copies (the sigma clip's sorted copy and masks; sorted and winsorized
copies)."""

_COMBINE_BYTES_PER_PIXEL = 160
"""Per (pixel, channel) of one band, independent of the number of frames: accumulators, bounds
(the sigma clip's median, mean, std, floor, ceiling and run indices: ~15 float64 arrays)."""


def combine(
    store: FrameStore,
    *,
    method: Method = "sigma_clip",
    sigma: float = 3.0,
    maxiters: int = 5,
    weights: FloatArray | None = None,
    ram_cap_bytes: int = 512 * 2**20,
    progress: Callable[[int, int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Combine every frame of ``store``, band of rows by band of rows, under a RAM cap.

    Each pixel's sample is the frames whose footprint covers it (absent elsewhere, not zero).

    Methods:

    - ``"sigma_clip"``: exactly astropy ``sigma_clip(cube, sigma=sigma, maxiters=maxiters,
      cenfunc='median', stdfunc='std', axis=0)`` (called per band; the clip is per pixel, so
      banding does not change it), then the mean of the survivors.
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

    Parameters
    ----------
    store : FrameStore
        The aligned frames.
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
    per_row = cols * channels * (n * _COMBINE_BYTES_PER_SAMPLE[method] + _COMBINE_BYTES_PER_PIXEL)
    band = ram_cap_bytes // per_row
    if band < 1:
        raise ValueError(
            f"ram_cap_bytes={ram_cap_bytes} is too small: "
            f"one row of {n} frames needs {per_row} bytes"
        )
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        cube = np.zeros((n, r1 - r0, cols, channels), dtype=np.float64)
        valid = np.zeros(cube.shape, dtype=bool)
        for i in range(n):
            fp = store.footprint_band(i, r0, r1)
            if fp.any():
                store.read_band(i, r0, r1, out=cube[i])
                for c in range(channels):  # not a broadcast along the 3-long channel axis: slow
                    valid[i, :, :, c] = fp
        if method == "sigma_clip":
            keep = _clip_keep(cube, valid, sigma, maxiters)
        elif method == "winsorized":
            keep = _winsorized_keep(cube, valid, sigma, maxiters)
        elif method == "mean":
            keep = valid
        else:
            out[r0:r1] = _median(cube, valid)
            del cube, valid
            if progress is not None:
                progress(r1, rows)
            continue
        del valid
        out[r0:r1] = _weighted_mean(cube, keep, w)
        del cube, keep
        if progress is not None:
            progress(r1, rows)
    return out


def _clip_keep(cube: FloatArray, valid: BoolArray, sigma: float, maxiters: int) -> BoolArray:
    """Survivors of astropy's sigma_clip (median centre, std) along axis 0 of (n, ...) ``cube``.

    The same arithmetic as astropy's ``sigma_clip(..., cenfunc="median", stdfunc="std",
    axis=0)`` without its masked-array machinery: per pixel, the kept samples are those within
    ``median -/+ sigma * std`` of the previous kept set (bounds inclusive), until nothing changes
    or ``maxiters`` passes. Since the kept set is always an interval of values, it is a run of
    the pixel's sorted samples: one sort gives every median (the run's middle element, or the
    mean of its two middle ones, as numpy's); the mean and the population std are summed in
    frame order over the kept samples, as numpy's ``nanmean``/``nanstd`` over astropy's
    NaN-filled copy do, so the bounds are astropy's to the last bit. The samples must be float32
    values (as the store's are; the cube is float64 for the sums). Absent samples (``valid``
    False) may hold any finite filler.
    """
    n = cube.shape[0]
    x_all = cube.reshape(n, -1)
    keep_all = valid.reshape(n, -1).copy()
    # sorted in float32 (twice the speed): the store's samples are float32 values, so exact
    ordered_all = np.where(keep_all, x_all, np.inf).astype(np.float32)
    ordered_all.sort(axis=0)
    # pixels still changing: a pixel whose kept set did not change keeps it for good (the same
    # set gives the same bounds), so each pass works on the pixels that changed in the last
    todo: npt.NDArray[np.intp] | None = None  # None: every pixel (views, no gathering)
    x, keep, ordered = x_all, keep_all, ordered_all
    floor = np.full(x_all.shape[1], -np.inf)  # the kept set is valid & floor <= x <= ceiling
    for iteration in range(maxiters):
        kept = np.count_nonzero(keep, axis=0)
        # the median: the kept samples are the run [below, below + kept) of the sorted ones
        here = floor if todo is None else floor[todo]
        below = np.count_nonzero(ordered < here, axis=0) if iteration else 0
        mid_a = np.minimum(below + np.maximum(kept - 1, 0) // 2, n - 1)
        mid_b = np.minimum(below + kept // 2, n - 1)
        a = np.take_along_axis(ordered, mid_a[np.newaxis], axis=0)[0].astype(np.float64)
        b = np.take_along_axis(ordered, mid_b[np.newaxis], axis=0)[0].astype(np.float64)
        centre = np.where(kept % 2 == 1, a, (a + b) / 2)
        # mean, then the population std about it, summed in frame order over the kept samples
        count = np.maximum(kept, 1)
        mean = np.sum(x, axis=0, where=keep) / count
        deviation = x - mean
        deviation *= deviation
        std = np.sqrt(np.sum(deviation, axis=0, where=keep) / count)
        del deviation
        lower = centre - sigma * std
        upper = centre + sigma * std
        new_keep = keep & (x >= lower) & (x <= upper)
        changed = np.count_nonzero(new_keep, axis=0) != kept
        if todo is None:
            keep_all = new_keep
            np.maximum(floor, lower, out=floor)
            todo = np.flatnonzero(changed)
        else:
            keep_all[:, todo] = new_keep
            floor[todo] = np.maximum(here, lower)
            todo = todo[changed]
        if todo.size == 0:
            break
        x, keep, ordered = x_all[:, todo], keep_all[:, todo], ordered_all[:, todo]
    return keep_all.reshape(valid.shape)


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
