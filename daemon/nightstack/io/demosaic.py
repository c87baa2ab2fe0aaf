"""The sensor mosaic -> linear RGB: 16-bit mosaic codes, OpenCV demosaic band by band, samples.

A calibrated :class:`~nightstack.frames.Mosaic` is kept as 16-bit *codes* (2 bytes a pixel, the
frame store's format): ``code = rint((value - MOSAIC_LOW) * MOSAIC_SCALE)`` clipped to 0..65535,
read back as ``value = code / MOSAIC_SCALE + MOSAIC_LOW`` in float32. OpenCV demosaics the codes
directly (its interpolation is a weighted mean, so it commutes with that affine map up to its
integer rounding of half a code), then each channel is multiplied by the frame's white balance.

Colour: the result is linear *camera* RGB x white balance (no camera-to-sRGB matrix; green 1),
in the mosaic's units (black 0, the sensor's clipping level 1.0 before white balance).

Demosaic methods:

- ``"mhc"``: Malvar, He and Cutler's gradient-corrected linear interpolation (ICASSP 2004):
  each missing colour is the bilinear estimate plus a fraction of the known colour's own
  Laplacian (gains 1/2, 5/8 and 3/4, fitted to daylight photographs), four 5x5 filters. It runs
  on the *white-balanced* mosaic (the correction carries one colour's detail into another,
  which holds only for balanced colours) and keeps a star's core sharp: on the real Seestar S50
  and ASI224MC frames a stack's stars are 20-30 % narrower than with bilinear.
  Its output is float (the correction may overshoot a code's range slightly at hard edges).
- ``"mhc-sharp"`` (the default): the same filters with every correction at gain 3/4
  (:data:`SHARP_GAIN`): a missing colour takes more of the known colour's local detail. Stars
  are near-white points whose colours differ mostly in width (the Seestar S50's red stars are
  1.4x its green ones on the raw sites alone), so this is what the sky wants: on the real sets
  its stacks' stars are 2-4 % narrower than with ``"mhc"`` at equal faint-star S/N, with less
  colour noise in a star-sized aperture (``bench/RESULTS.md``).
- ``"bilinear"``: OpenCV's; each colour interpolated from its own sites (3x3). It widens stars
  by a third on a small-star camera; kept for comparison and the slowest machines.
- ``"edge-aware"``: OpenCV's edge-aware (``_EA``) interpolation along the weaker gradient. It
  runs on the unbalanced codes, the white balance applied after.

A band of rows is demosaiced from the mosaic rows around it (:data:`_BAND_PAD` on each side for
OpenCV's methods, 2 for MHC's 5x5 filters): the result equals the same rows of a whole-frame
demosaic bit for bit (tests/test_demosaic.py), so a frame read band by band by the live stack and
by the final combine gives the same values.

How MHC runs (:func:`_mhc_into`), and why it is fast: in float32, a band of rows at a time (32
rows of a 24 MP frame, :data:`_MHC_BAND_SAMPLES`, of a whole frame or of a store reader's block)
with 2 context rows on each side. The band's codes become balanced values (an exact
subtraction, then one row of gains per row phase); ``cv2.filter2D`` runs the four filters (it
visits only their nonzero taps) and ``cv2.erode``/``dilate`` the clamp's 3x3 range, all into
buffers allocated once per frame. The three output planes are then built in place in three of
the filter buffers (9 strided copies of a quarter of the band: own samples, the diagonal filter
at the other colour's sites, across and along swapped at one green site), clamped, scaled and
offset per channel and interleaved by ``cv2.merge`` straight into the result. No full-size
intermediate is formed, a band's buffers stay in the cache, and each value goes through the
float32 steps of the plain whole-frame version in the same order: the output did not change
(tests/test_demosaic.py holds it to a float64 reference of the same filters and clamp). 24 MP on
one core: 160-180 ms for a whole frame (filters ~60, clamp ~45, copies and scaling ~40, the
window ~15, the result's fresh pages 40 or more), against ~300 ms for the first version
(whole-frame filter outputs, gathered planes, a second pass over the result); a store reader's
64-row blocks ~145 ms a frame, against ~200.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from nightstack.arrays import Float32Array, UInt16Array
from nightstack.frames import BAYER_PATTERNS, Mosaic

METHODS = ("mhc-sharp", "mhc", "bilinear", "edge-aware")
"""The mosaic path's demosaic methods (the first is the default); LibRaw's (AHD, ...) go through
``loaders.load`` instead."""

MOSAIC_LOW = -0.125
"""Lowest storable mosaic value: 1/8 of the sensor's range below black, far below any read noise
(a raw value cannot lie more than its black level, ~3-15 % of the range, below black)."""
MOSAIC_HIGH = 1.875
"""Highest storable value: the clipping level 1.0 with room for a flat field's division (a pixel
at 0.53 of the flat's mean reaches 1.875 when it clips)."""
MOSAIC_SCALE = 65535.0 / (MOSAIC_HIGH - MOSAIC_LOW)
"""Codes per unit: a step of 3.05e-5, half a 14-bit camera's ADU (1/16383)."""

_BAND_SAMPLES = 1 << 17
"""Samples per band when quantising: 512 KB of float32 temporaries, which stay in the cache."""

_BAND_PAD = 4
"""Mosaic rows read on each side of a band: OpenCV's bilinear uses 1, edge-aware and MHC 2, and
OpenCV's border rows differ from the interior; 4 (even, so the pattern's phase is kept) is exact."""

_MHC_KERNELS = tuple(
    np.asarray(np.array(k, np.float32) / 8, np.float32)
    for k in (
        # green at a red or blue site
        [[0, 0, -1, 0, 0],
         [0, 0, 2, 0, 0],
         [-1, 2, 4, 2, -1],
         [0, 0, 2, 0, 0],
         [0, 0, -1, 0, 0]],
        # at a green site, the colour of its left and right neighbours
        [[0, 0, 0.5, 0, 0],
         [0, -1, 0, -1, 0],
         [-1, 4, 5, 4, -1],
         [0, -1, 0, -1, 0],
         [0, 0, 0.5, 0, 0]],
        # at a green site, the colour of its upper and lower neighbours
        [[0, 0, -1, 0, 0],
         [0, -1, 4, -1, 0],
         [0.5, 0, 5, 0, 0.5],
         [0, -1, 4, -1, 0],
         [0, 0, -1, 0, 0]],
        # red at a blue site, blue at a red one
        [[0, 0, -1.5, 0, 0],
         [0, 2, 0, 2, 0],
         [-1.5, 0, 6, 0, -1.5],
         [0, 2, 0, 2, 0],
         [0, 0, -1.5, 0, 0]],
    )
)  # fmt: skip
"""Malvar-He-Cutler's filters (each sums to 1, so they commute with the codes' affine map)."""

_BILINEAR_KERNELS = tuple(
    np.asarray(np.array(k, np.float32) / 4, np.float32)
    for k in (
        [[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]],
        [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 2, 0, 2, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
        [[0, 0, 0, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 0, 0]],
        [[0, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]],
    )
)  # fmt: skip
"""The bilinear estimates inside :data:`_MHC_KERNELS` (the same four cases, each sums to 1)."""

_MALVAR_GAINS = (0.5, 0.625, 0.625, 0.75)
"""Malvar, He and Cutler's correction gains in :data:`_MHC_KERNELS`: green at a red or blue
site, a colour at a green site (both ways), red at blue and blue at red."""

SHARP_GAIN = 0.75
"""``"mhc-sharp"``'s gain for every correction. Chosen on the real sets by star FWHM against the
colour of strongly coloured stars in an aperture (the 3x3 clamp adds flux where a weak colour
would overshoot below its neighbours): Malvar's gains 1.043x / 1.033x the reference pipeline's
FWHM (Seestar / ASI224MC), 7.0 % colour error; 3/4: 1.020x / 1.009x, 7.6 %; 1: 0.98x / 0.98x,
13.7 % (``tests/test_demosaic.py`` holds every method to 10 %)."""

_KERNELS: dict[str, tuple[Float32Array, ...]] = {
    "mhc": _MHC_KERNELS,
    "mhc-sharp": tuple(
        np.asarray(b + SHARP_GAIN / g * (k - b), np.float32)
        for b, k, g in zip(_BILINEAR_KERNELS, _MHC_KERNELS, _MALVAR_GAINS, strict=True)
    ),
}
"""The gradient-corrected methods' four filters: bilinear plus the correction at its gain."""

_CV_CODES = {
    # OpenCV names a Bayer code after the 2x2 block starting at the second row and column
    # (tests/test_loaders.py pins each with a CFA where only red is lit).
    "bilinear": {
        "RGGB": cv2.COLOR_BayerBG2RGB,
        "BGGR": cv2.COLOR_BayerRG2RGB,
        "GRBG": cv2.COLOR_BayerGB2RGB,
        "GBRG": cv2.COLOR_BayerGR2RGB,
    },
    "edge-aware": {
        "RGGB": cv2.COLOR_BayerBG2RGB_EA,
        "BGGR": cv2.COLOR_BayerRG2RGB_EA,
        "GRBG": cv2.COLOR_BayerGB2RGB_EA,
        "GBRG": cv2.COLOR_BayerGR2RGB_EA,
    },
}


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else ``ValueError``."""
    if method not in METHODS:
        raise ValueError(f"demosaic must be one of {METHODS}, not {method!r}")
    return method


def quantise(data: npt.NDArray[np.floating]) -> UInt16Array:
    """(rows, cols) mosaic values -> uint16 codes (see the module docstring); NaN -> code 0,
    +inf -> 65535. Computed in bands of rows: no full-size temporaries, whatever the input's
    float type (float32 arithmetic: ``rint(clip(float32(v - MOSAIC_LOW) * MOSAIC_SCALE))``)."""
    values = np.asarray(data)
    plane = values.reshape(values.shape[0], -1) if values.ndim >= 2 else values.reshape(1, -1)
    codes = np.empty(plane.shape, np.uint16)
    rows, cols = plane.shape
    step = max(1, _BAND_SAMPLES // max(cols, 1))
    scratch = np.empty((min(step, rows), cols), np.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        _quantise_into(plane[r0:r1], codes[r0:r1], scratch[: r1 - r0])
    return codes.reshape(values.shape)


def _quantise_into(
    values: npt.NDArray[np.floating], codes: UInt16Array, scratch: Float32Array
) -> None:
    """``codes[...] = quantise(values)`` through ``scratch`` (float32, values' shape; it may be
    ``values`` itself, which is then overwritten). ``fmax``/``fmin`` ignore NaN, so NaN and -inf
    land on 0 and +inf on 65535, as ``nan_to_num`` then ``clip`` would put them (against a row
    of bounds: numpy's ``fmax`` with a scalar is not vectorized, 2.5x slower)."""
    np.subtract(values, np.float32(MOSAIC_LOW), out=scratch, dtype=np.float32)
    scratch *= np.float32(MOSAIC_SCALE)
    low, high = _code_bounds(scratch.shape[-1])
    np.fmax(scratch, low, out=scratch)
    np.fmin(scratch, high, out=scratch)
    np.rint(scratch, out=scratch)
    codes[...] = scratch


@functools.lru_cache(maxsize=8)
def _code_bounds(cols: int) -> tuple[Float32Array, Float32Array]:
    """Rows of ``cols`` 0.0 and 65535.0 (float32, read-only): the codes' range."""
    low, high = np.zeros(cols, np.float32), np.full(cols, 65535.0, np.float32)
    low.flags.writeable = high.flags.writeable = False
    return low, high


def mosaic_codes(mosaic: Mosaic, bin: int | None = None) -> tuple[UInt16Array, Float32Array | None]:
    """A mosaic's codes (:func:`quantise` of ``mosaic.data``) and, for an even ``bin``, its
    :func:`superpixel_luminance`, both equal bit for bit to those of the whole ``data``.

    Made in bands of rows (:meth:`Mosaic.values`): a raw's mosaic held as ADU is never formed
    as a whole float32 array, only a band of a few hundred KB at a time.

    Returns
    -------
    codes : ndarray
        (rows, cols) uint16.
    luminance : ndarray or None
        (rows // bin, cols // bin) float32, None when ``bin`` is None.
    """
    if bin is not None and (bin < 2 or bin % 2):
        raise ValueError(f"a mosaic's luminance needs an even bin >= 2, not {bin}")
    rows, cols = mosaic.shape
    codes = np.empty((rows, cols), np.uint16)
    unit = bin or 2  # bands start on even rows (the pattern's phase) and on whole blocks
    step = max(unit, (_BAND_SAMPLES // max(cols, 1)) // unit * unit)
    luminance = None if bin is None else np.empty((rows // bin, cols // bin), np.float32)
    band = np.empty((min(step, rows), cols), np.float32)
    scratch = None if not mosaic.has_data else band
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        values = mosaic.values(r0, r1, out=band)
        if luminance is not None and bin is not None and r1 - r0 >= bin:
            luminance[r0 // bin : r1 // bin] = superpixel_luminance(values, bin)
        _quantise_into(values, codes[r0:r1], values if scratch is None else scratch[: r1 - r0])
    return codes, luminance


def dequantise(codes: npt.NDArray[np.uint16]) -> Float32Array:
    """uint16 codes -> float32 values, ``code / MOSAIC_SCALE + MOSAIC_LOW``."""
    values = np.multiply(codes, np.float32(1.0 / MOSAIC_SCALE), dtype=np.float32)
    values += np.float32(MOSAIC_LOW)
    return values


def demosaic_codes(
    codes: UInt16Array,
    pattern: str,
    white_balance: tuple[float, float, float],
    method: str,
    row_start: int,
    row_stop: int,
) -> Float32Array:
    """Rows ``row_start:row_stop`` of the demosaiced *codes*: (rows, cols, 3) float32 in code
    units, unbalanced, so that :func:`code_gains` turns them into values for every method, before
    or after a warp (both are linear). OpenCV's methods give their 16-bit output exactly; MHC
    interpolates the white-balanced mosaic (``white_balance``) and takes the balance out again."""
    if check_method(method) in _KERNELS:
        return _demosaic_mhc(codes, pattern, white_balance, method, row_start, row_stop)
    return _demosaic_u16(codes, pattern, method, row_start, row_stop).astype(np.float32)


def _window(
    codes: UInt16Array, pattern: str, row_start: int, row_stop: int
) -> tuple[int, int, int]:
    """(start, stop, first): the rows wanted, clipped, and the first row of the mosaic window
    read around them (even: the window keeps the pattern's phase)."""
    if pattern not in BAYER_PATTERNS:
        raise ValueError(f"pattern must be one of {BAYER_PATTERNS}, not {pattern!r}")
    start, stop, _ = slice(row_start, row_stop).indices(codes.shape[0])
    return start, max(stop, start), max(0, start - _BAND_PAD) & ~1


def _demosaic_u16(
    codes: UInt16Array, pattern: str, method: str, row_start: int, row_stop: int
) -> UInt16Array:
    """:func:`demosaic_codes` of an OpenCV method as OpenCV gives it: (rows, cols, 3) uint16."""
    cv_code = _CV_CODES[check_method(method)][pattern]
    start, stop, first = _window(codes, pattern, row_start, row_stop)
    if stop == start:
        return np.zeros((0, codes.shape[1], 3), np.uint16)
    last = min(codes.shape[0], stop + _BAND_PAD)
    window = np.ascontiguousarray(codes[first:last])  # OpenCV's _EA misreads strided input
    rgb = cv2.cvtColor(window, cv_code)[start - first : stop - first]
    return np.asarray(rgb, np.uint16)


def _demosaic_mhc(
    codes: UInt16Array,
    pattern: str,
    white_balance: tuple[float, float, float],
    method: str,
    row_start: int,
    row_stop: int,
) -> Float32Array:
    """:func:`demosaic_codes` by a gradient-corrected ``method``, (rows, cols, 3) float32 codes:
    the window's codes become balanced values (in code steps, black at 0), :func:`_mhc_into`
    demosaics them and unbalances each channel back into codes."""
    start, stop, _ = _window(codes, pattern, row_start, row_stop)
    out = np.empty((stop - start, codes.shape[1], 3), np.float32)
    if stop == start or out.size == 0:
        return out
    gains = tuple(np.float32(g) for g in white_balance)
    affine = [(tuple(float(1 / g) for g in gains), (_BLACK,) * 3)]
    for r0, r1, a, b, scratch in _mhc_bands(start, stop, *codes.shape):
        window = _balanced(codes[a:b], pattern, gains, scratch[6, : b - a])
        _mhc_into(
            window, r0 - a, pattern, _KERNELS[method], out[r0 - start : r1 - start], scratch, affine
        )
    return out


def _context(start: int, stop: int, rows: int) -> tuple[int, int]:
    """The mosaic rows a:b that MHC demosaics rows start:stop from: 2 more on each side, from
    an even row (the pattern's phase), clipped to the frame (whose edge the filters mirror)."""
    return max(0, start - 2) & ~1, min(rows, stop + 2)


_BLACK = float(np.float32(-MOSAIC_LOW * MOSAIC_SCALE))
"""The code of value 0 (exact in float32: 4095.9375)."""


def _balanced(
    codes: UInt16Array, pattern: str, gains: tuple[np.float32, ...], out: Float32Array
) -> Float32Array:
    """``out[...] = (codes - black code) * gain of each site's colour`` (``codes`` from an even
    mosaic row): an exact subtraction, then a row of gains per row phase (not 4 strided passes)."""
    out[...] = codes  # a cast, then a float32 subtraction: 2x a mixed-type np.subtract
    out -= np.float32(_BLACK)
    cols = codes.shape[1]
    for dy in (0, 1):
        row = np.empty(cols, np.float32)
        for dx in (0, 1):
            row[dx::2] = gains["RGB".index(pattern[2 * dy + dx])]
        np.multiply(out[dy::2], row, out=out[dy::2])
    return out


def mhc(mosaic: Float32Array, pattern: str, method: str = "mhc-sharp") -> Float32Array:
    """A gradient-corrected demosaic (``"mhc-sharp"`` or ``"mhc"``) of a whole float (rows, cols)
    mosaic of balanced values (a Bayer FITS: white balance 1), ``pattern`` at pixel (0, 0):
    (rows, cols, 3) float32."""
    if pattern not in BAYER_PATTERNS:
        raise ValueError(f"pattern must be one of {BAYER_PATTERNS}, not {pattern!r}")
    rows, cols = np.shape(mosaic)
    out = np.empty((rows, cols, 3), np.float32)
    for r0, r1, a, b, scratch in _mhc_bands(0, rows, rows, cols):
        window = np.ascontiguousarray(mosaic[a:b], np.float32)
        _mhc_into(window, r0 - a, pattern, _KERNELS[method], out[r0:r1], scratch)
    return out


_MHC_BAND_SAMPLES = 3 << 16
"""Mosaic samples in a band of MHC (:func:`_mhc_bands`): 32 rows of a 24 MP frame, filtered
with their 4 context rows into seven 0.9 MB buffers that stay in the cache. Measured on one
core, 24 MP: 21 or 43 rows 5 % slower, 10 rows 20 % (per-call overhead and context rows), 174
rows (the first version's band) 35 %."""


def _scratch(rows: int, cols: int) -> Float32Array:
    """Seven float32 (rows, cols) buffers, allocated once for all the bands of a frame:
    :func:`_mhc_into`'s six intermediates and, last, the caller's balanced window."""
    return np.empty((7, rows, cols), np.float32)


def _mhc_bands(start: int, stop: int, rows: int, cols: int) -> Any:
    """(r0, r1, a, b, scratch) for each band of rows start:stop of a (rows, cols) mosaic: output
    rows r0:r1, the window a:b that computes them (:func:`_context`) and a :func:`_scratch`
    shared by every band."""
    step = max(2, (_MHC_BAND_SAMPLES // max(cols, 1)) & ~1)
    scratch = _scratch(min(rows, min(step, stop - start) + 5), cols)
    for r0 in range(start, stop, step):
        r1 = min(stop, r0 + step)
        yield r0, r1, *_context(r0, r1, rows), scratch


_SQUARE = np.ones((3, 3), np.uint8)


def _mhc_into(
    window: Float32Array,
    top: int,
    pattern: str,
    kernels: tuple[Float32Array, ...],
    out: Float32Array,
    scratch: Float32Array,
    affine: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
) -> None:
    """Rows ``top:top + len(out)`` of the gradient-corrected demosaic of ``window`` ((rows, cols)
    float32 C-contiguous, balanced, from an even mosaic row: ``pattern`` at its pixel (0, 0)) by
    ``kernels`` (one of :data:`_KERNELS`), each channel then through each (scale, offset) of
    ``affine`` in turn (``plane * scale[c] + offset[c]``, float32), into ``out`` ((rows, cols, 3)
    float32, C-contiguous), through ``scratch`` (:func:`_scratch`, at least the window's size).

    The filters run over the window (mirrored at its edges, which keeps the pattern's phase);
    green's output takes the green sites' own samples, across's becomes the red plane and
    along's the blue one (own samples, the diagonal filter at the other colour's sites, across
    and along swapped at the green sites whose left and right neighbours are blue). Each plane
    is clamped to the range of the 3x3 balanced samples around each pixel, then the three are
    interleaved straight into ``out``."""
    rows, cols = out.shape[0], window.shape[1]
    if rows == 0 or cols == 0:
        return
    green, across, along, diagonal, low, high = scratch[:6, : window.shape[0]]
    for kernel, dst in zip(kernels, (green, across, along, diagonal), strict=True):
        cv2.filter2D(window, -1, kernel, dst=dst, borderType=cv2.BORDER_REFLECT_101)
    # the correction overshoots beside a hot pixel or a clipped core (seen to -0.14 of the range
    # on a real ASI224MC frame): each value clamped to the range of its 3x3 balanced samples,
    # which still admits the sharper peak the correction restores
    cv2.erode(window, _SQUARE, dst=low, borderType=cv2.BORDER_REFLECT_101)
    cv2.dilate(window, _SQUARE, dst=high, borderType=cv2.BORDER_REFLECT_101)

    def sites(colour: str, row_of: str = "") -> tuple[slice, slice]:
        """The window's pixels of ``colour`` among the output rows (a green one: in the rows of
        ``row_of``)."""
        dy, dx = next(
            divmod(i, 2)
            for i, c in enumerate(pattern)
            if c == colour and row_of in pattern[i & 2 : (i & 2) + 2]
        )
        return slice(top + (dy - top) % 2, top + rows, 2), slice(dx, None, 2)

    red, blue, green_r, green_b = sites("R"), sites("B"), sites("G", "R"), sites("G", "B")
    green[green_r] = window[green_r]
    green[green_b] = window[green_b]
    across[red] = window[red]  # the red plane: across's own at the green sites in red rows
    across[blue] = diagonal[blue]
    along[blue] = window[blue]  # the blue plane: along's own at the green sites in red rows
    along[red] = diagonal[red]
    diagonal[green_b] = across[green_b]  # green sites in blue rows: red is along, blue across
    across[green_b] = along[green_b]
    along[green_b] = diagonal[green_b]
    span = slice(top, top + rows)
    planes = [across[span], green[span], along[span]]
    for c, plane in enumerate(planes):
        cv2.min(plane, high[span], dst=plane)  # np.clip's three-way pass: 3x slower
        cv2.max(plane, low[span], dst=plane)
        for scale, offset in affine:
            if scale[c] != 1:
                plane *= np.float32(scale[c])
            if offset[c]:
                plane += np.float32(offset[c])
    cv2.merge(planes, dst=out)


def demosaic_image(
    codes: UInt16Array, pattern: str, white_balance: tuple[float, float, float], method: str
) -> Float32Array:
    """The whole frame demosaiced, as :func:`demosaic` gives it but faster: the demosaiced codes
    turned into values (``code * scale + offset`` of :func:`code_gains`, in float32) while still
    in the cache: MHC's by :func:`_mhc_into` band by band straight into the result, OpenCV's in
    bands of its whole-frame output. Equal to :func:`demosaic` within 2 ulp.

    Returns (rows, cols, 3) float32 linear camera RGB x white balance, mosaic units.
    """
    rows, cols = codes.shape
    out = np.empty((rows, cols, 3), np.float32)
    if out.size == 0:
        return out
    if check_method(method) in _KERNELS:
        if pattern not in BAYER_PATTERNS:
            raise ValueError(f"pattern must be one of {BAYER_PATTERNS}, not {pattern!r}")
        gains = tuple(np.float32(g) for g in white_balance)
        inverse = tuple(float(1 / g) for g in gains)
        scale, offset = code_gains(white_balance)  # after the codes' own unbalance
        affine = [(inverse, (_BLACK,) * 3), (scale.tolist(), offset.tolist())]
        for r0, r1, a, b, scratch in _mhc_bands(0, rows, rows, cols):
            window = _balanced(codes[a:b], pattern, gains, scratch[6, : b - a])
            _mhc_into(window, r0 - a, pattern, _KERNELS[method], out[r0:r1], scratch, affine)
        return out
    scale, offset = code_gains(white_balance)
    # whole rows as (rows, 3 * cols): a contiguous inner loop with a row of gains, not a
    # broadcast over a trailing axis of 3 (several times slower in numpy)
    scale_row, offset_row = np.tile(scale, cols), np.tile(offset, cols)
    flat_in = _demosaic_u16(codes, pattern, method, 0, rows).reshape(rows, 3 * cols)
    flat_out = out.reshape(rows, 3 * cols)
    step = max(1, _BAND_SAMPLES // (3 * cols))
    for r0 in range(0, rows, step):
        band = flat_out[r0 : r0 + step]
        np.multiply(flat_in[r0 : r0 + step], scale_row, out=band, dtype=np.float32)
        band += offset_row  # while the band is in the cache
    return out


def code_gains(
    white_balance: tuple[float, float, float],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(scale, offset), each (3,) float32: ``value = code * scale + offset`` per channel, the
    white balance included (``(code / MOSAIC_SCALE + MOSAIC_LOW) * wb``)."""
    gains = np.asarray(white_balance, np.float64)
    scale = (gains / MOSAIC_SCALE).astype(np.float32)
    offset = (gains * MOSAIC_LOW).astype(np.float32)
    return scale, offset


def apply_gains(rgb: Float32Array, white_balance: tuple[float, float, float]) -> Float32Array:
    """Demosaiced codes -> values (:func:`code_gains`), (rows, cols, 3) float32; ``rgb`` itself
    is left as it was. One ``cv2.transform`` (8x a numpy broadcast over the channel axis)."""
    scale, offset = code_gains(white_balance)
    if rgb.size == 0:
        return np.asarray(rgb * scale + offset, np.float32)
    matrix = np.zeros((3, 4), np.float64)
    matrix[[0, 1, 2], [0, 1, 2]] = scale
    matrix[:, 3] = offset
    out = cv2.transform(np.ascontiguousarray(rgb, np.float32), matrix)
    return np.asarray(out, np.float32).reshape(rgb.shape)


def demosaic_rows(
    codes: UInt16Array,
    pattern: str,
    white_balance: tuple[float, float, float],
    method: str,
    row_start: int,
    row_stop: int,
) -> Float32Array:
    """Rows ``row_start:row_stop`` of the demosaiced frame.

    Parameters
    ----------
    codes : ndarray
        (rows, cols) uint16 mosaic codes, ``pattern`` at pixel (0, 0).
    pattern : str
        One of :data:`~nightstack.frames.BAYER_PATTERNS`.
    white_balance : (float, float, float)
        (r, g, b) multipliers applied after the demosaic.
    method : str
        One of :data:`METHODS`.
    row_start, row_stop : int
        The rows wanted (clipped to the frame).

    Returns
    -------
    ndarray
        (row_stop - row_start, cols, 3) float32 linear camera RGB x white balance, mosaic units.
    """
    rgb = demosaic_codes(codes, pattern, white_balance, method, row_start, row_stop)
    return apply_gains(rgb, white_balance)


def demosaic(
    codes: UInt16Array, pattern: str, white_balance: tuple[float, float, float], method: str
) -> Float32Array:
    """The whole frame: :func:`demosaic_rows` of every row, (rows, cols, 3) float32."""
    return demosaic_rows(codes, pattern, white_balance, method, 0, codes.shape[0])


def superpixel_luminance(data: npt.NDArray[np.floating], bin: int) -> Float32Array:
    """The detection luminance of a mosaic: the mean over bin x bin blocks (``bin`` even: each
    block holds whole 2x2 Bayer tiles), unbalanced, in the mosaic's units.

    Returns (rows // bin, cols // bin) float32; block (u, v) is centred on full-resolution
    (bin * u + (bin - 1) / 2, same for v); trailing rows and columns that fill no block dropped.
    """
    if bin < 2 or bin % 2:
        raise ValueError(f"a mosaic's luminance needs an even bin >= 2, not {bin}")
    rows, cols = data.shape[0] // bin, data.shape[1] // bin
    cropped = np.ascontiguousarray(data[: rows * bin, : cols * bin], dtype=np.float32)
    if cropped.size == 0:
        return cropped.reshape(rows, cols)
    # INTER_AREA with an integer factor is the exact block mean
    return np.asarray(cv2.resize(cropped, (cols, rows), interpolation=cv2.INTER_AREA), np.float32)


class TileSamples:
    """A mosaic seen as a (rows, cols, 3) image for point sampling (sky normalization).

    ``samples[iy, ix]`` with integer index arrays (that broadcast, e.g. ``np.ix_``) gives
    (..., 3) float32: the 2x2 Bayer tile holding each pixel, red, mean green and blue, times the
    white balance, from the stored codes. That is the superpixel colour: for the smooth sky the
    normalization measures it equals the demosaiced value without demosaicing the frame.
    """

    def __init__(self, codes: UInt16Array, pattern: str, white_balance: tuple[float, float, float]):
        self.codes = codes
        self.shape = (int(codes.shape[0]), int(codes.shape[1]), 3)
        self.ndim = 3
        self._sites = {c: [(i // 2, i % 2) for i, s in enumerate(pattern) if s == c] for c in "RGB"}
        self._gain = np.asarray(white_balance, np.float32)

    def __getitem__(self, key: Any) -> Float32Array:
        iy, ix = (np.asarray(k, dtype=np.intp) for k in key)
        rows, cols = self.codes.shape
        ty = np.minimum(iy & ~1, (rows - 2) & ~1)  # the tile's top-left site, in the frame
        tx = np.minimum(ix & ~1, (cols - 2) & ~1)
        ty, tx = np.broadcast_arrays(ty, tx)
        out = np.empty((*ty.shape, 3), np.float32)
        for c, colour in enumerate("RGB"):
            total = np.zeros(ty.shape, np.float32)
            for dy, dx in self._sites[colour]:
                total += dequantise(self.codes[ty + dy, tx + dx])
            out[..., c] = total * (self._gain[c] / len(self._sites[colour]))
        return out
