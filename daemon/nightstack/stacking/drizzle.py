"""Bayer drizzle: each stored frame's CFA samples dropped straight onto the output grid.

No demosaic at all: a sensor site is a square "drop" of side ``drop`` sensor pixels around its
centre, carried by the frame's transform onto the output grid (the reference grid, ``scale``
times finer), where it adds its value to its own colour only, weighted by the area it overlaps
each output pixel. A drifting or dithered night thus fills every output pixel of every colour
with real samples: full colour resolution, and at ``scale`` 2 resolution beyond the sensor's
for undersampled optics. The drops are taken axis-aligned (the transform's rotation of the
square is ignored, as STScI's "turbo" kernel does; session rotations are a fraction of a degree).

Output coordinates: reference pixel (x, y) covers output pixels ``scale x .. scale x + scale -
1``, so a reference position x lands at ``scale x + (scale - 1) / 2`` (pixel centres at
integers). Values are those the frame store's readers give (mosaic values times the white
balance, then the frame's normalization), so a drizzled stack is on the same scale as the
demosaiced one.

Rejection: per output pixel and channel, each frame's drizzled value (its drops' weighted mean)
with its weight (their overlap) is judged against the weighted mean and standard deviation of
the other frames' values there and dropped beyond ``sigma`` of them; the result is the weighted
mean of the rest (see :func:`_combine_band`).

The final combine only: the live stack keeps the demosaic path. Memory: the output image
(float32, ``scale``^2 x the demosaiced final's) and a few band-sized accumulators; each frame is
read twice per band of output rows (the clip's two passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from nightstack.arrays import Float32Array, Float64Array
from nightstack.registration.normalize import Normalization
from nightstack.registration.warp import footprint_spans, source_rows
from nightstack.stacking.store import FrameStore, StoredFrame, value_gains

SCALES = {"1x": 1, "2x": 2}
"""The ``drizzle`` setting's output scales."""

BAND_ROWS = 64
MIN_OTHERS = 3
"""Other frames' samples a value needs at a pixel to be judged (fewer give no usable spread)."""
"""Output rows accumulated at a time (a few MB of float64 accumulators at 12000 columns)."""


@dataclass(frozen=True)
class Drizzle:
    """``scale``: output pixels per reference pixel (1 or 2); ``drop``: the side of a site's
    drop in sensor pixels (0 < drop <= 1; 1 covers the sensor, smaller is sharper but needs more
    frames and dither to fill every output pixel)."""

    scale: int
    drop: float

    def __post_init__(self) -> None:
        if self.scale not in SCALES.values():
            raise ValueError(f"drizzle scale must be one of {sorted(SCALES.values())}")
        if not 0 < self.drop <= 1:
            raise ValueError(f"drizzle drop must be in (0, 1], not {self.drop}")

    def shape(self, reference: tuple[int, int]) -> tuple[int, int]:
        """The output grid's (rows, cols) for a reference grid of ``reference``."""
        return reference[0] * self.scale, reference[1] * self.scale


def drizzle_frame(
    codes: npt.NDArray[np.uint16],
    record: StoredFrame,
    reference: tuple[int, int],
    drizzle: Drizzle,
    row_start: int,
    row_stop: int,
) -> tuple[Float64Array, Float64Array]:
    """One stored mosaic frame dropped onto output rows ``row_start:row_stop``.

    ``codes``: the frame's whole (rows, cols) uint16 mosaic codes (a memory map will do: only
    the rows the band needs are read). Returns ``(total, weight)``, each (band_rows, out_cols, 3)
    float64: per output pixel and channel, the sum of overlap x value and the sum of overlaps.
    """
    layout = record.mosaic
    if layout is None:
        raise ValueError("drizzle needs frames stored as their mosaic (a Bayer sensor)")
    s = drizzle.scale
    out_cols = drizzle.shape(reference)[1]
    band = row_stop - row_start
    total = np.zeros(band * out_cols * 3)
    weight = np.zeros(band * out_cols * 3)
    half = drizzle.drop * s / 2.0  # the drop's half side, output pixels
    matrix = np.asarray(record.matrix, np.float64)
    # the reference rows this band covers, with a drop's reach, then the frame rows they need
    ref_top = max(0, math.floor((row_start - half - s) / s))
    ref_stop = min(reference[0], math.ceil((row_stop + half + s) / s))
    first, stop = source_rows(matrix, record.src_shape, reference[1], ref_top, ref_stop)
    if stop <= first or band <= 0:
        return total.reshape(band, out_cols, 3), weight.reshape(band, out_cols, 3)
    crop = np.asarray(codes[first:stop], np.float32)
    ys, xs = np.mgrid[first:stop, 0 : crop.shape[1]].astype(np.float64)
    x_ref = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    y_ref = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    out_x = s * x_ref + (s - 1) / 2.0
    out_y = s * y_ref + (s - 1) / 2.0
    channel = np.empty(crop.shape, np.intp)
    for site, colour in enumerate(layout.pattern):
        channel[(site // 2 + first) % 2 :: 2, site % 2 :: 2] = "RGB".index(colour)
    values = _values(crop, channel, layout.white_balance, record, reference, x_ref, y_ref)
    reach = math.ceil(2 * half) + 1  # output pixels a drop can touch along an axis
    left = np.floor(out_x - half + 0.5).astype(np.intp)
    top = np.floor(out_y - half + 0.5).astype(np.intp)
    for k in range(reach):
        ix = left + k
        ox = _overlap(out_x, half, ix)
        for m in range(reach):
            iy = top + m
            area = ox * _overlap(out_y, half, iy)
            inside = (area > 0) & (ix >= 0) & (ix < out_cols) & (iy >= row_start) & (iy < row_stop)
            index = ((iy[inside] - row_start) * out_cols + ix[inside]) * 3 + channel[inside]
            a = area[inside]
            weight += np.bincount(index, a, minlength=weight.size)
            total += np.bincount(index, a * values[inside], minlength=total.size)
    return total.reshape(band, out_cols, 3), weight.reshape(band, out_cols, 3)


def drizzle_combine(
    store: FrameStore,
    drizzle: Drizzle,
    *,
    sigma: float | None = 3.0,
    progress: Callable[[int, int], None] | None = None,
) -> Float32Array:
    """Every frame of a store of mosaics drizzled and combined (see the module docstring).

    Returns (rows, cols, 3) float32 on the output grid; NaN where no frame dropped a sample of
    that colour (a night with too little dither for the drop size)."""
    n = len(store)
    out_rows, out_cols = drizzle.shape(store.shape)
    out = np.full((out_rows, out_cols, 3), np.nan, np.float32)
    records = [store.frame(i) for i in range(n)]
    maps: list[npt.NDArray[np.uint16]] = [
        np.memmap(store.directory / r.file, np.uint16, "r", shape=tuple(r.src_shape))
        for r in records
    ]
    try:
        for r0 in range(0, out_rows, BAND_ROWS):
            r1 = min(out_rows, r0 + BAND_ROWS)
            out[r0:r1] = _combine_band(maps, records, store.shape, drizzle, r0, r1, sigma)
            if progress is not None:
                progress(r1, out_rows)
    finally:
        del maps  # the memory maps close with their last reference
    return out


def drizzle_holes(image: Float32Array, store: FrameStore, drizzle: Drizzle) -> Float64Array:
    """(3,) fraction of the output pixels every frame covers (away from the drift's edges,
    where partial colour coverage is normal) that got no sample of each colour."""
    rows, cols = store.shape
    first, stop = np.zeros(rows, np.int64), np.full(rows, cols, np.int64)
    for i in range(len(store)):
        record = store.frame(i)
        a, b = footprint_spans(np.asarray(record.matrix), record.src_shape, cols, 0, rows)
        first, stop = np.maximum(first, a), np.minimum(stop, b)
    columns = np.arange(cols)
    common = (columns >= first[:, np.newaxis]) & (columns < stop[:, np.newaxis])
    inside = np.repeat(np.repeat(common, drizzle.scale, 0), drizzle.scale, 1)
    if not inside.any():
        return np.zeros(3)
    return np.asarray(np.isnan(image[inside]).mean(axis=0), np.float64)


def _combine_band(
    maps: list[npt.NDArray[np.uint16]],
    records: list[StoredFrame],
    reference: tuple[int, int],
    drizzle: Drizzle,
    r0: int,
    r1: int,
    sigma: float | None,
) -> Float32Array:
    """Output rows r0:r1: each frame's value judged against the weighted mean and standard
    deviation of the *other* frames there (leave-one-out, as the live stack judges a sample:
    a lone outlier cannot hide by inflating the spread it is judged by), rejected beyond
    ``sigma`` of them where at least :data:`MIN_OTHERS` other frames have a sample; the
    weighted mean of the rest."""
    shape = (r1 - r0, drizzle.shape(reference)[1], 3)
    weight, total, square = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    count = np.zeros(shape, np.int32)
    for codes, record in zip(maps, records, strict=True):
        t, w = drizzle_frame(codes, record, reference, drizzle, r0, r1)
        has = w > 0
        weight += w
        total += t
        count += has
        square += np.divide(t * t, w, out=np.zeros(shape), where=has)  # w v^2 = t^2 / w
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / weight
    if sigma is None:
        return mean.astype(np.float32)
    kept_weight, kept_total = np.zeros(shape), np.zeros(shape)
    for codes, record in zip(maps, records, strict=True):
        t, w = drizzle_frame(codes, record, reference, drizzle, r0, r1)
        has = w > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            value = t / w
            others = weight - w
            centre = (total - t) / others
            spread = np.sqrt(np.maximum((square - value * t) / others - centre * centre, 0.0))
            judged = has & (count - 1 >= MIN_OTHERS)
            keep = has & ~(judged & (np.abs(value - centre) > sigma * spread))
        kept_weight += np.where(keep, w, 0.0)
        kept_total += np.where(keep, t, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(kept_weight > 0, kept_total / kept_weight, mean)
    return result.astype(np.float32)


def _values(
    crop: Float32Array,
    channel: npt.NDArray[np.intp],
    white_balance: tuple[float, float, float],
    record: StoredFrame,
    reference: tuple[int, int],
    x_ref: Float64Array,
    y_ref: Float64Array,
) -> Float64Array:
    """The crop's codes as the store's readers give them
    (:func:`~nightstack.stacking.store.value_gains`: value x white balance, normalized), the
    surface added at each site's reference position."""
    norm = Normalization.from_json(record.normalization, 3) if record.normalization else None
    scale, offset = value_gains(white_balance, norm)
    values = crop * scale.astype(np.float64)[channel] + offset.astype(np.float64)[channel]
    if norm is not None and norm.surface is not None:
        values += norm.surface_at(x_ref, y_ref, reference, channel)
    return np.asarray(values, np.float64)


def _overlap(centre: Float64Array, half: float, index: npt.NDArray[np.intp]) -> Float64Array:
    """Length of [centre - half, centre + half] inside output pixel ``index``'s
    [index - 1/2, index + 1/2]."""
    low = np.maximum(centre - half, index - 0.5)
    high = np.minimum(centre + half, index + 0.5)
    return np.asarray(np.maximum(high - low, 0.0), np.float64)
