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
mean of the rest (see :func:`clip_band`).

The final combine (:func:`drizzle_combine`) and, through :func:`drop_rows` and
:func:`clip_band`, the live drizzle (:mod:`nightstack.stacking.live_drizzle`: the same drops,
a running weighted mean and variance, this clip for its warm-up batch). Memory of the final:
the output image (float32, ``scale``^2 x the demosaiced final's) and a few band-sized
accumulators; each frame is read twice per band of output rows (the clip's two passes), a few
rows at a time from its file (:class:`StoredCodes`).
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
from nightstack.stacking.store import FrameStore, MosaicLayout, StoredFrame, value_gains

SCALES = {"1x": 1, "2x": 2}
"""The ``drizzle`` setting's output scales."""

BAND_ROWS = 16
"""Output rows accumulated at a time: the clip's float64 accumulators and a frame's drops are
~30 band-sized arrays, ~70 MB at 6000 columns (64 rows took the daemon's memory while
finalizing a 24 MP night from 1026 MB with the demosaic's combine to 1337 MB)."""

MIN_OTHERS = 3
"""Other frames' samples a value needs at a pixel to be judged (fewer give no usable spread)."""


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


class StoredCodes:
    """A stored mosaic frame's codes, read a few rows at a time from its file (``codes[a:b]``,
    as an array's rows): nothing of the frame stays mapped or held between reads, so reading
    every frame of a night band by band costs no memory beyond the band (a memory map would
    count each page it touched in the process's memory until it is closed)."""

    def __init__(self, store: FrameStore, i: int) -> None:
        record = store.frame(i)
        self._path = store.directory / record.file
        self._cols = int(record.src_shape[1])

    def __getitem__(self, rows: slice) -> npt.NDArray[np.uint16]:
        first, stop = int(rows.start), int(rows.stop)
        count = max(0, stop - first) * self._cols
        codes = np.fromfile(self._path, np.uint16, count=count, offset=first * self._cols * 2)
        if codes.size != count:
            raise OSError(f"{self._path.name}: stored frame file is truncated")
        return codes.reshape(-1, self._cols)


Codes = npt.NDArray[np.uint16] | StoredCodes
"""A mosaic frame's (rows, cols) uint16 codes: an array, or :class:`StoredCodes`."""


def frame_rows(
    record: StoredFrame, reference: tuple[int, int], drizzle: Drizzle, row_start: int, row_stop: int
) -> tuple[int, int]:
    """The frame rows ``[first, stop)`` whose drops can reach output rows ``row_start:row_stop``
    (empty when none)."""
    s = drizzle.scale
    half = drizzle.drop * s / 2.0  # the drop's half side, output pixels
    # the reference rows this band covers, with a drop's reach, then the frame rows they need
    ref_top = max(0, math.floor((row_start - half - s) / s))
    ref_stop = min(reference[0], math.ceil((row_stop + half + s) / s))
    matrix = np.asarray(record.matrix, np.float64)
    return source_rows(matrix, record.src_shape, reference[1], ref_top, ref_stop)


def drizzle_frame(
    codes: Codes,
    record: StoredFrame,
    reference: tuple[int, int],
    drizzle: Drizzle,
    row_start: int,
    row_stop: int,
) -> tuple[Float64Array, Float64Array]:
    """One stored mosaic frame dropped onto output rows ``row_start:row_stop``.

    ``codes``: the frame's whole (rows, cols) uint16 mosaic codes (an array, or
    :class:`StoredCodes`: only the rows the band needs are read). Returns ``(total, weight)``,
    each (band_rows, out_cols, 3) float64: per output pixel and channel, the sum of overlap x
    value and the sum of overlaps.
    """
    first, stop = frame_rows(record, reference, drizzle, row_start, row_stop)
    crop = codes[first:stop] if stop > first else np.zeros((0, record.src_shape[1]), np.uint16)
    return drop_rows(crop, first, record, reference, drizzle, row_start, row_stop)


def drop_rows(
    crop: npt.NDArray[np.uint16],
    first: int,
    record: StoredFrame,
    reference: tuple[int, int],
    drizzle: Drizzle,
    row_start: int,
    row_stop: int,
) -> tuple[Float64Array, Float64Array]:
    """The frame rows ``first:first + len(crop)`` (``crop``, their codes; those
    :func:`frame_rows` names) dropped onto output rows ``row_start:row_stop``: ``(total,
    weight)`` as :func:`drizzle_frame` returns them.

    Each site's drop starts ``u`` (0 <= u < 1) output pixels into the output pixel ``left`` it
    starts in (per axis); with ``D`` its side in output pixels, it covers
    ``max(0, min(u + D, k + 1) - max(u, k))`` of pixel ``left + k``. The sums are ``bincount``s
    into the band padded by one pixel on every side: a drop landing outside the band is clipped
    onto the padding, which is cut away (no masked gather: a 24 MP frame drops in ~1 s)."""
    layout = record.mosaic
    if layout is None:
        raise ValueError("drizzle needs frames stored as their mosaic (a Bayer sensor)")
    s = drizzle.scale
    out_cols = drizzle.shape(reference)[1]
    band = row_stop - row_start
    rows, cols = crop.shape
    if rows == 0 or band <= 0:
        return np.zeros((band, out_cols, 3)), np.zeros((band, out_cols, 3))
    side = drizzle.drop * s  # the drop's side, output pixels
    reach = math.ceil(side) + 1  # output pixels a drop can touch along an axis
    m = np.asarray(record.matrix, np.float64)
    values = _site_values(crop, first, layout, record, reference)
    # where each site's drop starts on the output grid (its centre's output coordinate less
    # half a side, pixel centres at integers): pixel ``left``, ``u`` into it
    ys = np.arange(first, first + rows, dtype=np.float64)[:, np.newaxis]
    xs = np.arange(cols, dtype=np.float64)[np.newaxis, :]
    shift = (s - 1) / 2.0 - side / 2.0 + 0.5
    start = (s * m[0, 0]) * xs + ((s * m[0, 1]) * ys + (s * m[0, 2] + shift))
    left = np.floor(start)
    start -= left
    u_x = start.astype(np.float32)
    start = (s * m[1, 0]) * xs + ((s * m[1, 1]) * ys + (s * m[1, 2] + shift))
    top = np.floor(start)
    start -= top
    u_y = start.astype(np.float32)
    del start
    # the flat bin of each drop's first pixel in the band padded by ``reach`` on every side
    # (a drop outside the band is clipped into the padding, cut away after)
    width = out_cols + 2 * reach
    np.clip(top, row_start - reach, row_stop, out=top)
    top -= row_start - reach
    top *= width
    np.clip(left, -reach, out_cols, out=left)
    left += reach
    top += left
    del left
    base = top.astype(np.intp)
    del top
    base *= 3
    channel = np.zeros((2, 2), np.intp)
    for site, colour in enumerate(layout.pattern):
        channel[(site // 2 + first) % 2, site % 2] = "RGB".index(colour)
    base += np.tile(channel, ((rows + 1) // 2, (cols + 1) // 2))[:rows, :cols]
    size = (band + 2 * reach) * width * 3
    total = np.zeros(size)
    weight = np.zeros(size)
    overlaps_y = [_covered(u_y, side, j) for j in range(reach)]
    flat = base.reshape(-1)
    for k in range(reach):
        ox = _covered(u_x, side, k)
        if not ox.any():
            continue
        for j in range(reach):
            # the drops' pixel (k, j) from their first: bin base + shift, i.e. the bincount
            # over ``base`` moved by ``shift``
            shift = (j * width + k) * 3
            area = overlaps_y[j] * ox
            weight[shift:] += np.bincount(flat, area.reshape(-1), minlength=size)[: size - shift]
            area *= values
            total[shift:] += np.bincount(flat, area.reshape(-1), minlength=size)[: size - shift]
    inner = (slice(reach, reach + band), slice(reach, reach + out_cols))
    total_band = total.reshape(band + 2 * reach, width, 3)[inner]
    weight_band = weight.reshape(band + 2 * reach, width, 3)[inner]
    return np.ascontiguousarray(total_band), np.ascontiguousarray(weight_band)


def _covered(u: Float32Array, side: float, k: int) -> Float32Array:
    """The length of [u, u + side] inside [k, k + 1] (float32)."""
    high = np.minimum(u + np.float32(side), np.float32(k + 1))
    high -= np.maximum(u, np.float32(k))
    np.maximum(high, np.float32(0.0), out=high)
    return high


def _site_values(
    crop: npt.NDArray[np.uint16],
    first: int,
    layout: MosaicLayout,
    record: StoredFrame,
    reference: tuple[int, int],
) -> Float32Array:
    """The crop's codes as the store's readers give them (:func:`~nightstack.stacking.store.
    value_gains`: value x white balance, normalized), float32; the normalization's surface
    added at each site's reference position."""
    norm = Normalization.from_json(record.normalization, 3) if record.normalization else None
    gain, offset = value_gains(layout.white_balance, norm)
    values = np.empty(crop.shape, np.float32)
    for site, colour in enumerate(layout.pattern):
        c = "RGB".index(colour)
        r0, c0 = (site // 2 + first) % 2, site % 2
        part = values[r0::2, c0::2]
        np.multiply(crop[r0::2, c0::2], gain[c], out=part, casting="unsafe")
        part += offset[c]
    if norm is not None and norm.surface is not None:
        channel = np.empty(crop.shape, np.intp)
        for site, colour in enumerate(layout.pattern):
            channel[(site // 2 + first) % 2 :: 2, site % 2 :: 2] = "RGB".index(colour)
        m = np.asarray(record.matrix, np.float64)
        ys, xs = np.mgrid[first : first + crop.shape[0], 0 : crop.shape[1]].astype(np.float64)
        x_ref = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        y_ref = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        values += norm.surface_at(x_ref, y_ref, reference, channel).astype(np.float32)
    return values


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
    codes: list[Codes] = [StoredCodes(store, i) for i in range(n)]
    for r0 in range(0, out_rows, BAND_ROWS):
        r1 = min(out_rows, r0 + BAND_ROWS)
        out[r0:r1] = clip_band(codes, records, store.shape, drizzle, r0, r1, sigma).result()
        if progress is not None:
            progress(r1, out_rows)
    return out


def drizzle_holes(image: Float32Array, store: FrameStore, drizzle: Drizzle) -> Float64Array:
    """(3,) fraction of the output pixels every frame covers (away from the drift's edges,
    where partial colour coverage is normal) that got no sample of each colour. Row by row of
    the reference grid (a mask and a gathered copy of the whole image were 384 MB at 24 MP)."""
    rows, cols = store.shape
    first, stop = np.zeros(rows, np.int64), np.full(rows, cols, np.int64)
    for i in range(len(store)):
        record = store.frame(i)
        a, b = footprint_spans(np.asarray(record.matrix), record.src_shape, cols, 0, rows)
        first, stop = np.maximum(first, a), np.minimum(stop, b)
    s = drizzle.scale
    holes = np.zeros(3)
    inside = 0
    for r in np.flatnonzero(stop > first):
        block = image[r * s : (r + 1) * s, first[r] * s : stop[r] * s]
        holes += np.count_nonzero(np.isnan(block), axis=(0, 1))
        inside += block.shape[0] * block.shape[1]
    return holes / inside if inside else np.zeros(3)


@dataclass
class BandClip:
    """One band's clip (:func:`clip_band`): per output pixel and channel, (band_rows, out_cols,
    3) float64 sums over every frame's value (``weight``: of the overlaps, ``total``: of
    overlap x value) and over the kept ones (``kept_weight``, ``kept_total``, ``kept_square``:
    of overlap x value^2, ``kept_weight_sq``: of overlap^2), and the values rejected."""

    weight: Float64Array
    total: Float64Array
    kept_weight: Float64Array
    kept_total: Float64Array
    kept_square: Float64Array
    kept_weight_sq: Float64Array
    rejected: int

    def result(self) -> Float32Array:
        """The weighted mean of the kept values (of all, where every value was rejected); NaN
        where no frame dropped a sample."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.total / self.weight
            kept = self.kept_total / self.kept_weight
        return np.where(self.kept_weight > 0, kept, mean).astype(np.float32)


def clip_band(
    codes: list[Codes],
    records: list[StoredFrame],
    reference: tuple[int, int],
    drizzle: Drizzle,
    r0: int,
    r1: int,
    sigma: float | None,
    floor: Float64Array | None = None,
    *,
    keep_drops: bool = False,
) -> BandClip:
    """Output rows r0:r1 of the frames ``codes`` (with their ``records``): each frame's value
    judged against the weighted mean and standard deviation of the *other* frames there
    (leave-one-out, as the live stack judges a sample: a lone outlier cannot hide by inflating
    the spread it is judged by), rejected beyond ``sigma`` of them where at least
    :data:`MIN_OTHERS` other frames have a sample (none rejected for ``sigma`` None); the
    spread is taken at least ``floor`` (3,) per channel when given (the live drizzle's
    warm-up: 3 or 4 others' spread alone is too often small by chance). ``keep_drops``: the
    frames' drops are kept from the first pass for the second (2 float64 bands a frame: for a
    few frames, the live drizzle's warm-up), else dropped again. The final combine's band, and
    the live drizzle's warm-up batch."""
    shape = (r1 - r0, drizzle.shape(reference)[1], 3)
    weight, total, square = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    count = np.zeros(shape, np.int32)
    weight_sq = np.zeros(shape)
    kept: list[tuple[Float64Array, Float64Array]] = []
    for frame, record in zip(codes, records, strict=True):
        t, w = drizzle_frame(frame, record, reference, drizzle, r0, r1)
        if keep_drops and sigma is not None:
            kept.append((t, w))
        has = w > 0
        weight += w
        total += t
        count += has
        square += np.divide(t * t, w, out=np.zeros(shape), where=has)  # w v^2 = t^2 / w
        weight_sq += w * w
    if sigma is None:
        return BandClip(weight, total, weight, total, square, weight_sq, 0)
    kept_weight, kept_total, kept_square = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    kept_weight_sq = np.zeros(shape)
    rejected = 0
    for n, (frame, record) in enumerate(zip(codes, records, strict=True)):
        if kept:
            t, w = kept[n]
        else:
            t, w = drizzle_frame(frame, record, reference, drizzle, r0, r1)
        has = w > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            value = t / w
            others = weight - w
            centre = (total - t) / others
            spread = np.sqrt(np.maximum((square - value * t) / others - centre * centre, 0.0))
            if floor is not None:
                spread = np.maximum(spread, floor)
            judged = has & (count - 1 >= MIN_OTHERS)
            keep = has & ~(judged & (np.abs(value - centre) > sigma * spread))
        rejected += int(np.count_nonzero(has & ~keep))
        kept_weight += np.where(keep, w, 0.0)
        kept_total += np.where(keep, t, 0.0)
        kept_square += np.where(keep, np.divide(t * t, w, out=np.zeros(shape), where=has), 0.0)
        kept_weight_sq += np.where(keep, w * w, 0.0)
    return BandClip(weight, total, kept_weight, kept_total, kept_square, kept_weight_sq, rejected)
