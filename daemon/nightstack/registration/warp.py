"""Resample a frame onto the reference grid, with the footprint of the pixels it really covers.

A transform is the 2x3 matrix ``[[a, b, tx], [c, d, ty]]`` mapping a frame's pixel (x, y) to the
reference's (x, y) (x = column, y = row, pixel centres at integers). Warping evaluates, for every
reference pixel ``p_ref``, the frame at ``inverse(matrix) @ p_ref`` by interpolation.

The footprint is purely geometric: a reference pixel is inside when its source position lies
inside the frame, ``0 <= x <= cols - 1`` and ``0 <= y <= rows - 1`` (its four bilinear
neighbours exist), for every kernel: the outer taps of cubic and Lanczos-4 beyond the frame's
edge read the edge pixel repeated, and their result is clamped to the range of those four
neighbours, so a frame's last row and column are kept (the reference frame covers its whole
grid) with no dark or bright rim. Because an affine image of a rectangle is convex, the
footprint of each row is one run of columns, computed in O(rows) by :func:`footprint` for any
band of rows, so it never needs to be stored. Outside the footprint the warped values are 0 and
must be ignored.

Accuracy (OpenCV 5, measured): bilinear samples at the source position computed in float32
(position error <= ~2.5e-4 px at x = 6000; ~1e-7 error on a linear ramp). Cubic and Lanczos-4
quantise the sub-pixel position to 1/32 px and OpenCV's kernels (cubic a = -0.75) do not
reproduce a linear ramp exactly: on a ramp they shift the signal by up to ~0.05 px (cubic) and
~0.03 px (Lanczos-4) depending on the sub-pixel phase. Bilinear blurs: it widens a stack's stars
by 3-8 % (the real frames in ``bench/RESULTS.md``), so clamped cubic is the default. Edge pixels:
the footprint is computed in float64, OpenCV's position in float32, so a pixel on the
footprint's edge may take up to ~2.5e-4 of its value from beyond the frame's edge.
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from nightstack.arrays import BoolArray, FloatArray

Interpolation = Literal["bilinear", "cubic", "lanczos4"]

INTERPOLATIONS: dict[str, tuple[int, int]] = {
    "bilinear": (cv2.INTER_LINEAR, 0),
    "cubic": (cv2.INTER_CUBIC, 1),
    "lanczos4": (cv2.INTER_LANCZOS4, 3),
}
"""Name -> (OpenCV flag, reach): neighbours used are floor(x) - reach .. floor(x) + 1 + reach (the
rows a band of output needs; the footprint is the same for every kernel)."""

_EDGE_EPS = 1e-6
"""Source-position slack (px) at the frame edge: absorbs float rounding of exactly-on-edge
positions (identity transform), far below any sample's interpolation weight that matters."""

_CV_MAX_SIDE = 32767
"""OpenCV's remap (used by Lanczos-4 warps) asserts every side of source and output < SHRT_MAX."""

_TILE = 8192
"""Output tile side when an image is too large for one OpenCV call."""


def warp(
    image: FloatArray,
    matrix: FloatArray,
    out_shape: tuple[int, int],
    *,
    interpolation: Interpolation = "bilinear",
) -> tuple[npt.NDArray[np.float32], BoolArray]:
    """Resample ``image`` onto the reference grid.

    Parameters
    ----------
    image : ndarray
        (rows, cols, C) float32 linear frame, C = 1 or 3 (a 2-D array is taken as C = 1).
    matrix : ndarray
        (2, 3) frame (x, y) -> reference (x, y) transform.
    out_shape : (int, int)
        (rows, cols) of the reference grid.
    interpolation : {"bilinear", "cubic", "lanczos4"}
        Resampling kernel; see the module notes on accuracy.

    Returns
    -------
    warped : ndarray
        (out_rows, out_cols, C) float32; 0 outside the footprint.
    footprint : ndarray
        (out_rows, out_cols) bool, True where every interpolation neighbour lies in the frame.
    """
    return warp_rows(image, matrix, out_shape, 0, None, interpolation=interpolation)


def warp_rows(
    image: FloatArray,
    matrix: FloatArray,
    out_shape: tuple[int, int],
    row_start: int = 0,
    row_stop: int | None = None,
    *,
    interpolation: Interpolation = "bilinear",
) -> tuple[npt.NDArray[np.float32], BoolArray]:
    """Rows ``row_start:row_stop`` of :func:`warp`'s result, without computing the others.

    Lets a caller stream a frame onto the reference grid band by band (no full-size copy).

    Returns
    -------
    warped : ndarray
        (band_rows, out_cols, C) float32; 0 outside the footprint.
    footprint : ndarray
        (band_rows, out_cols) bool.
    """
    flag, margin = _interpolation(interpolation)
    src = np.asarray(image)
    if src.ndim == 2:
        src = src[:, :, np.newaxis]
    if src.ndim != 3 or src.shape[2] not in (1, 3):
        raise ValueError(f"image must be (rows, cols, 1|3), not {src.shape}")
    src = np.ascontiguousarray(src, dtype=np.float32)
    out_rows, cols = int(out_shape[0]), int(out_shape[1])
    start, stop, _ = slice(row_start, row_stop).indices(out_rows)
    stop = max(stop, start)
    rows = stop - start
    inverse = _inverse(matrix)
    channels = src.shape[2]
    if rows == 0:
        return np.zeros((0, cols, channels), np.float32), np.zeros((0, cols), bool)
    if max(rows, cols, src.shape[0], src.shape[1]) < _CV_MAX_SIDE:
        warped = _cv_warp(src, _shifted(inverse, 0, start), (rows, cols), flag)
    else:
        warped = _tiled_warp(src, inverse, (start, stop), cols, flag, margin)
    warped = warped.reshape(rows, cols, channels)
    first, end = _spans(inverse, src.shape[:2], cols, start, stop)
    mask = _mask_from_spans(first, end, cols)
    for r in range(rows):  # zero outside the run: O(rows) slice writes, no image-sized temporary
        warped[r, : first[r]] = 0.0
        warped[r, end[r] :] = 0.0
    return warped, mask


def footprint(
    matrix: FloatArray,
    src_shape: tuple[int, int],
    out_shape: tuple[int, int],
    row_start: int = 0,
    row_stop: int | None = None,
    *,
    interpolation: Interpolation = "bilinear",
) -> BoolArray:
    """Geometric coverage of a warped frame for reference rows ``row_start:row_stop``.

    Parameters
    ----------
    matrix : ndarray
        (2, 3) frame (x, y) -> reference (x, y) transform.
    src_shape : (int, int)
        (rows, cols) of the frame.
    out_shape : (int, int)
        (rows, cols) of the reference grid.
    row_start, row_stop : int
        Band of reference rows (``row_stop`` None = to the end), Python slice semantics.
    interpolation : {"bilinear", "cubic", "lanczos4"}
        Accepted for symmetry with :func:`warp`: the footprint is the same for every kernel.

    Returns
    -------
    ndarray
        (row_stop - row_start, out_cols) bool, identical to the rows of :func:`warp`'s footprint.
    """
    _interpolation(interpolation)
    rows, cols = int(out_shape[0]), int(out_shape[1])
    start, stop, _ = slice(row_start, row_stop).indices(rows)
    stop = max(stop, start)
    first, end = _spans(_inverse(matrix), src_shape, cols, start, stop)
    return _mask_from_spans(first, end, cols)


def footprint_spans(
    matrix: FloatArray,
    src_shape: tuple[int, int],
    out_cols: int,
    row_start: int,
    row_stop: int,
    *,
    interpolation: Interpolation = "bilinear",
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The footprint of reference rows ``row_start:row_stop`` as one run of columns per row.

    Returns ``(first, stop)``, each (band_rows,) int64: row ``r`` is covered on columns
    ``first[r]:stop[r]`` (empty when equal), exactly :func:`footprint`'s True pixels, in O(rows).
    """
    _interpolation(interpolation)
    return _spans(_inverse(matrix), src_shape, out_cols, row_start, row_stop)


def source_rows(
    matrix: FloatArray,
    src_shape: tuple[int, int],
    out_cols: int,
    row_start: int,
    row_stop: int,
    *,
    interpolation: Interpolation = "bilinear",
) -> tuple[int, int]:
    """The frame rows ``[first, stop)`` that reference rows ``row_start:row_stop`` sample (every
    interpolation neighbour, plus a pixel of slack), clipped to the frame; empty when none."""
    margin = _interpolation(interpolation)[1]
    inverse = _inverse(matrix)
    corners = np.array(
        [[x, y, 1.0] for x in (0, out_cols - 1) for y in (row_start, row_stop - 1)], np.float64
    )
    ys = corners @ inverse[1]
    first = max(0, math.floor(float(ys.min())) - margin - 2)
    stop = min(int(src_shape[0]), math.ceil(float(ys.max())) + margin + 3)
    return first, max(first, stop)


def warp_crop_rows(
    crop: FloatArray,
    crop_top: int,
    src_shape: tuple[int, int],
    matrix: FloatArray,
    out_shape: tuple[int, int],
    row_start: int,
    row_stop: int,
    *,
    interpolation: Interpolation = "bilinear",
) -> npt.NDArray[np.float32]:
    """:func:`warp_rows` from the frame rows ``crop_top:crop_top + len(crop)`` only.

    ``crop`` must hold every row :func:`source_rows` names for the band; the footprint is the
    whole frame's (``src_shape``), so values near the crop's edges are not mistaken for edges of
    the frame. Returns (band_rows, out_cols, C) float32, 0 outside the footprint. The result
    depends on ``crop_top`` only through float rounding (~1e-7): callers that need bit-equal
    values for a band read twice must use the same crop.
    """
    flag, margin = _interpolation(interpolation)
    src = np.asarray(crop)
    if src.ndim == 2:
        src = src[:, :, np.newaxis]
    src = np.ascontiguousarray(src, dtype=np.float32)
    cols = int(out_shape[1])
    rows = max(0, row_stop - row_start)
    channels = src.shape[2]
    if rows == 0 or src.shape[0] == 0:
        return np.zeros((rows, cols, channels), np.float32)
    inverse = _inverse(matrix)
    local = _shifted(inverse, 0, row_start)
    local[1, 2] -= crop_top
    if max(rows, cols, src.shape[0], src.shape[1]) < _CV_MAX_SIDE:
        warped = _cv_warp(src, local, (rows, cols), flag).reshape(rows, cols, channels)
    else:
        shifted = inverse.copy()
        shifted[1, 2] -= crop_top
        warped = _tiled_warp(src, shifted, (row_start, row_stop), cols, flag, margin)
    first, end = _spans(inverse, src_shape, cols, row_start, row_stop)
    for r in range(rows):  # zero outside the run: O(rows) slice writes
        warped[r, : first[r]] = 0.0
        warped[r, end[r] :] = 0.0
    return warped


def _interpolation(name: str) -> tuple[int, int]:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(
            f"interpolation must be one of {sorted(INTERPOLATIONS)}, not {name!r}"
        ) from None


def _inverse(matrix: FloatArray) -> npt.NDArray[np.float64]:
    """Reference (x, y) -> frame (x, y) as a (2, 3) float64 matrix."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3) or not np.all(np.isfinite(m)):
        raise ValueError(f"matrix must be a finite (2, 3) array, not {m.shape}")
    linear = m[:, :2]
    det = float(np.linalg.det(linear))
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise ValueError("matrix is singular")
    inv = np.linalg.inv(linear)
    return np.hstack([inv, -inv @ m[:, 2:]])


def _cv_warp(
    src: npt.NDArray[np.float32],
    inverse: npt.NDArray[np.float64],
    out_shape: tuple[int, int],
    flag: int,
) -> npt.NDArray[np.float32]:
    """OpenCV's warp, then, for cubic and Lanczos-4, each value clamped to the range of the four
    source pixels around its position (those bilinear would blend): the kernels' negative
    lobes no longer ring around bright stars (dark halos, negative values), while a star's
    profile between its samples keeps the sharper kernel's shape."""
    size = (out_shape[1], out_shape[0])
    out = np.asarray(_warp_affine(src, inverse, size, flag), dtype=np.float32)
    if flag == cv2.INTER_LINEAR:
        return out
    # floor(x) = round(x - 1/2): a nearest-neighbour warp, shifted by half a pixel, of the 2x2
    # minimum and maximum whose top-left pixel is that floor
    corner = inverse.copy()
    corner[:, 2] -= 0.5
    square = np.ones((2, 2), np.uint8)
    for extreme, limit in ((cv2.erode, np.fmax), (cv2.dilate, np.fmin)):
        bound = np.asarray(
            extreme(src, square, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE), np.float32
        )
        limit(out, _warp_affine(bound, corner, size, cv2.INTER_NEAREST), out=out)
    return out.reshape(out.shape)


def _warp_affine(
    src: npt.NDArray[np.float32], inverse: npt.NDArray[np.float64], size: tuple[int, int], flag: int
) -> npt.NDArray[np.float32]:
    out = cv2.warpAffine(
        src,
        inverse,
        size,
        flags=flag | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.asarray(out, dtype=np.float32)


def _shifted(inverse: npt.NDArray[np.float64], left: int, top: int) -> npt.NDArray[np.float64]:
    """The inverse map for an output window whose pixel (0, 0) is reference pixel (left, top)."""
    shifted = inverse.copy()
    shifted[:, 2] = inverse @ np.array([left, top, 1.0])
    return shifted


def _tiled_warp(
    src: npt.NDArray[np.float32],
    inverse: npt.NDArray[np.float64],
    row_range: tuple[int, int],
    cols: int,
    flag: int,
    margin: int,
) -> npt.NDArray[np.float32]:
    """Warp tile by tile, each from the crop of the frame it needs, to stay under SHRT_MAX."""
    start, stop = row_range
    out = np.zeros((stop - start, cols, src.shape[2]), dtype=np.float32)
    pad = margin + 2
    for top in range(start, stop, _TILE):
        for left in range(0, cols, _TILE):
            bottom, right = min(top + _TILE, stop), min(left + _TILE, cols)
            corners = np.array(
                [[x, y, 1.0] for x in (left, right - 1) for y in (top, bottom - 1)],
                dtype=np.float64,
            )
            xy = corners @ inverse.T
            x0 = max(0, math.floor(xy[:, 0].min()) - pad)
            x1 = min(src.shape[1], math.ceil(xy[:, 0].max()) + pad + 1)
            y0 = max(0, math.floor(xy[:, 1].min()) - pad)
            y1 = min(src.shape[0], math.ceil(xy[:, 1].max()) + pad + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            if max(x1 - x0, y1 - y0) >= _CV_MAX_SIDE:
                raise ValueError("warp: the transform shrinks the frame too much to tile")
            tile_inverse = _shifted(inverse, left, top)
            tile_inverse[:, 2] -= (x0, y0)
            crop = np.ascontiguousarray(src[y0:y1, x0:x1])
            tile = _cv_warp(crop, tile_inverse, (bottom - top, right - left), flag)
            out[top - start : bottom - start, left:right] = tile.reshape(
                bottom - top, right - left, -1
            )
    return out


def _spans(
    inverse: npt.NDArray[np.float64],
    src_shape: tuple[int, int],
    out_cols: int,
    row_start: int,
    row_stop: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per reference row, the run of columns [first, stop) whose source lies inside the frame.

    For row ``r`` and column ``c`` the source is ``x = A c + (B r + C)``, ``y = D c + (E r + F)``;
    each bound ``lo <= v <= hi`` is a half-line in ``c`` solved exactly, then intersected.
    """
    src_rows, src_cols = int(src_shape[0]), int(src_shape[1])
    r = np.arange(row_start, row_stop, dtype=np.float64)
    lo_c = np.zeros(r.size)
    hi_c = np.full(r.size, float(out_cols - 1))
    limits = ((0, src_cols), (1, src_rows))
    for axis, size in limits:
        slope = float(inverse[axis, 0])
        offset = inverse[axis, 1] * r + inverse[axis, 2]
        lo = -_EDGE_EPS
        hi = size - 1 + _EDGE_EPS
        if slope == 0.0:
            inside = (offset >= lo) & (offset <= hi)
            hi_c = np.where(inside, hi_c, -1.0)
            continue
        a = (lo - offset) / slope
        b = (hi - offset) / slope
        lo_c = np.maximum(lo_c, np.minimum(a, b))
        hi_c = np.minimum(hi_c, np.maximum(a, b))
    first = np.ceil(lo_c)
    last = np.floor(hi_c)
    first = np.clip(first, 0, out_cols).astype(np.int64)
    stop = np.clip(last + 1, 0, out_cols).astype(np.int64)
    stop = np.maximum(stop, first)
    return first, stop


def _mask_from_spans(
    first: npt.NDArray[np.int64], stop: npt.NDArray[np.int64], cols: int
) -> BoolArray:
    columns = np.arange(cols)
    mask: BoolArray = (columns >= first[:, np.newaxis]) & (columns < stop[:, np.newaxis])
    return mask
