"""The one module that writes files: stacks (TIFF, FITS), previews, and atomic replacement.

Every file is written atomically: the data go to a hidden temporary file in the destination
directory, which is fsync'd, renamed over the destination with :func:`os.replace`, and the
directory is fsync'd. A reader (or a crash) therefore sees either the old file or the new one,
never a half-written file, and no temporary file is left behind when writing fails.

Images are (rows, cols, channels) float32 linear, channels 1 (mono) or 3 (RGB), row 0 at the top;
NaN marks pixels that no frame covered.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import tifffile
from astropy.io import fits

from nightstack import __version__
from nightstack.arrays import FloatArray

_TIFF_MAX = 65535
"""Full scale of a 16-bit TIFF sample."""

_BAND_ROWS = 256
"""Rows converted at a time when scaling to 16 bits: bounds temporaries to a few MB."""

STF_SHADOWS_SIGMA = 2.8
"""Auto-STF shadows clipping point, in normalised MADs below the background (PixInsight's)."""

STF_TARGET_BACKGROUND = 0.25
"""Auto-STF: where the background lands after the midtones transfer (PixInsight's default)."""

_MAD_TO_SIGMA = 1.4826
"""Normalised MAD: 1.4826 * MAD estimates the standard deviation of Gaussian noise."""

STATS_SAMPLES = 250_000
"""Pixels per channel used for the stretch statistics: medians to ~0.3 % of the noise, fast."""

_PREVIEW_FORMATS = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png"}


# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path`` atomically.

    The temporary file is created empty (mode 0666 minus the umask, like an ordinary file) in
    the same directory, so the final :func:`os.replace` never crosses a file system. Write the
    content to the yielded path inside the ``with`` block. On normal exit the file is fsync'd,
    renamed to ``path`` and the directory fsync'd; if the block raises, the temporary file is
    removed and the exception propagates, leaving any existing ``path`` untouched.

    Parameters
    ----------
    path : path-like
        The destination file. Its directory must exist.

    Yields
    ------
    pathlib.Path
        Hidden temporary path ``.<name>.<random>.tmp`` in the destination directory.
    """
    final = Path(path)
    directory = final.parent
    tmp = directory / f".{final.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # the names atomic_path gives


def remove_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete the temporary files of atomic writes a crash interrupted, below ``directory``;
    return how many."""
    removed = 0
    for path in Path(directory).rglob(".*.tmp"):
        if _TEMPORARY.match(path.name) and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically."""
    write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable. Some file systems (and Windows) cannot open a directory: skip."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- TIFF


def write_tiff(
    path: str | os.PathLike[str],
    image: FloatArray,
    *,
    stretched: bool = False,
    scale: str = "fixed",
) -> None:
    """Write a 16-bit TIFF, linear by default, atomically.

    Linear, ``scale="fixed"`` (the default): ``pixel = round(value * 65535)``, i.e. the data's
    full scale 1.0 (a camera's white level after black subtraction, LibRaw's 16-bit output) is
    65535, the same for every session, so two sessions' TIFFs compare directly; values above
    full scale clip to 65535 and covered pixels are at least 1, so that 0 means only "no frame
    covered this pixel" (NaN). ``scale="range"``: the finite values are mapped from their range
    ``[data_min, data_max]`` onto ``[0, 65535]`` (no clipping, so the brightest pixel is 65535
    and the faintest 0); NaN is written as 0. Either way the ImageDescription holds a JSON record
    with ``data_min``, ``data_max`` and ``scale`` so that ``value = data_min + pixel / scale``.
    With ``stretched=True`` the image first goes through :func:`stretch` (display-ready, not
    linear) and ``[0, 1]`` is mapped onto ``[0, 65535]``.

    Parameters
    ----------
    path : path-like
        Destination ``.tif`` file.
    image : ndarray
        (rows, cols, C) or (rows, cols) float, C = 1 or 3. Mono is written as a 2-D image,
        colour as interleaved RGB.
    stretched : bool
        Apply the preview stretch instead of the linear scaling.
    scale : {"fixed", "range"}
        The linear mapping (ignored when ``stretched``).
    """
    if scale not in ("fixed", "range"):
        raise ValueError(f"TIFF scale must be 'fixed' or 'range', not {scale!r}")
    data = _as_image(image)
    description: dict[str, Any] = {"software": f"nightstack {__version__}"}
    fixed = scale == "fixed" and not stretched
    if stretched:
        data = stretch(data)
        lo, hi = 0.0, 1.0
        description["stretched"] = True
    elif fixed:
        lo, hi = 0.0, 1.0
        description.update(stretched=False, linear_scale="fixed: 65535 = full scale")
    else:
        lo, hi = _finite_range(data)
        description.update(stretched=False, linear_scale="range")
    factor = _TIFF_MAX / (hi - lo) if hi > lo else 0.0
    description.update(
        data_min=lo,
        data_max=hi,
        scale=factor,
        formula="value = data_min + pixel / scale",
        no_coverage="pixels no frame covered are 0",
    )
    out: npt.NDArray[np.uint16] = np.empty(data.shape, dtype=np.uint16)
    for start in range(0, data.shape[0], _BAND_ROWS):
        band = np.subtract(data[start : start + _BAND_ROWS], lo, dtype=np.float64)
        band *= factor
        np.rint(band, out=band)
        covered = np.isfinite(band)
        np.nan_to_num(band, copy=False, nan=0.0)
        np.clip(band, 0, _TIFF_MAX, out=band)  # range: only guards the float rounding
        if fixed:
            np.maximum(band, 1.0, out=band, where=covered)  # 0 is reserved for no coverage
        out[start : start + _BAND_ROWS] = band
    if out.shape[2] == 1:
        pixels: npt.NDArray[np.uint16] = out[:, :, 0]
        photometric = "minisblack"
    else:
        pixels = out
        photometric = "rgb"
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            pixels,
            photometric=photometric,
            description=json.dumps(description),
            metadata=None,
            software=f"nightstack {__version__}",
        )


def _finite_range(image: FloatArray) -> tuple[float, float]:
    """(min, max) of the finite values, (0, 0) when there are none."""
    lo = math.inf
    hi = -math.inf
    for start in range(0, image.shape[0], _BAND_ROWS):
        band = image[start : start + _BAND_ROWS]
        finite = np.isfinite(band)
        if finite.any():
            lo = min(lo, float(np.min(band, where=finite, initial=np.inf)))
            hi = max(hi, float(np.max(band, where=finite, initial=-np.inf)))
    if lo > hi:
        return 0.0, 0.0
    return lo, hi


# --------------------------------------------------------------------------- FITS


def write_fits(path: str | os.PathLike[str], image: FloatArray, header: Mapping[str, Any]) -> None:
    """Write a 32-bit float FITS file atomically, row 0 at the top, NaN where no coverage.

    The data are written in the array's own row order (row 0 first) and the header says
    ``ROWORDER = 'TOP-DOWN'``, so Siril and other ROWORDER-aware readers show the image upright.
    Colour is written as a (3, rows, cols) cube (NAXIS1 = cols, NAXIS2 = rows, NAXIS3 = 3, planes
    R, G, B); mono as (rows, cols).

    Parameters
    ----------
    path : path-like
        Destination ``.fits`` file.
    image : ndarray
        (rows, cols, C) or (rows, cols) float, C = 1 or 3.
    header : mapping
        Cards to add, e.g. ``NCOMBINE``, ``EXPTIME``, ``DATE-OBS``, ``DATE-END``, software name and
        version, settings. Values may be str, int, float, bool, datetime/date (written as ISO
        8601), or a ``(value, comment)`` tuple; ``None`` values are skipped. Keys longer than 8
        characters become HIERARCH cards; long strings use CONTINUE cards.
    """
    data = _as_image(image)  # streamed by bands: a (3, rows, cols) copy is 288 MB at 24 MP
    shape = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
    write_fits_bands(path, shape, lambda r0, r1: data[r0:r1], header)


def write_fits_bands(
    path: str | os.PathLike[str],
    shape: tuple[int, int, int],
    read_band: Callable[[int, int], FloatArray],
    header: Mapping[str, Any],
    *,
    band_rows: int = _BAND_ROWS,
) -> None:
    """The FITS of :func:`write_fits` (its layout, header and atomicity) from an image delivered
    band by band: a few MB of memory whatever its size (a live stack's 288 MB at 24 MP is never
    copied whole; :func:`write_fits` streams an array's bands through it too).

    ``shape``: (rows, cols, C); ``read_band(r0, r1)`` returns rows r0:r1 as (r1 - r0, cols, C)
    float.
    """
    rows, cols, channels = (int(v) for v in shape)
    hdr = fits.Header()
    hdr["SIMPLE"] = True
    hdr["BITPIX"] = -32
    hdr["NAXIS"] = 2 if channels == 1 else 3
    hdr["NAXIS1"], hdr["NAXIS2"] = cols, rows
    if channels != 1:
        hdr["NAXIS3"] = channels
    hdr.extend(_fits_header(header))
    with atomic_path(path) as tmp:
        stream = fits.StreamingHDU(str(tmp), hdr)
        try:
            for c in range(channels):
                for r0 in range(0, rows, band_rows):
                    band = _as_image(read_band(r0, min(r0 + band_rows, rows)))
                    stream.write(np.ascontiguousarray(band[:, :, c], dtype=">f4"))
        finally:
            stream.close()


def _fits_header(header: Mapping[str, Any]) -> fits.Header:
    """A FITS header from plain cards (see :func:`write_fits`), ROWORDER = 'TOP-DOWN'."""
    hdr = fits.Header()
    for key, raw in header.items():
        value, comment = raw if isinstance(raw, tuple) else (raw, None)
        if value is None:
            continue
        if isinstance(value, date):
            value = value.isoformat()
        elif isinstance(value, np.generic):
            value = value.item()
        name = str(key).upper()
        card_key = name if len(name) <= 8 and " " not in name else f"HIERARCH {name}"
        hdr[card_key] = (value, comment) if comment else value
    hdr["ROWORDER"] = ("TOP-DOWN", "row 0 of the data is the top of the image")
    return hdr


# --------------------------------------------------------------------------- stretch, preview


def stretch(image: FloatArray) -> npt.NDArray[np.float32]:
    """Auto screen-transfer stretch (like PixInsight's / Siril's auto-STF) to [0, 1].

    Definition, for a (rows, cols, C) linear image:

    1. Statistics come from a regular subsample (about 250 000 pixels per channel) of the finite
       values: per channel the background median ``m_c`` and normalised MAD
       ``s_c = 1.4826 * median(|v - m_c|)``.
    2. Background neutralisation: ``y_c = v_c - m_c``, so every channel's sky sits at 0 (neutral).
    3. Linked shadows/highlights: shadows ``c0 = -2.8 * mean_c(s_c)`` (the background median
       minus 2.8 normalised MADs), highlights ``h`` = the largest finite ``y``;
       ``x = (y - c0) / (h - c0)`` clipped to [0, 1].
    4. Midtones transfer ``MTF(m, x) = (m - 1) x / ((2 m - 1) x - m)`` with the balance
       ``m = MTF(0.25, x_bg)``, ``x_bg = -c0 / (h - c0)``: the background maps to exactly 0.25.

    NaN (no coverage) maps to 0. A flat image (no spread) is returned normalised but unstretched.

    Parameters
    ----------
    image : ndarray
        (rows, cols, C) or (rows, cols) float, linear.

    Returns
    -------
    ndarray
        float32 with the shape of ``image`` (2-D stays 2-D), values in [0, 1].
    """
    data = np.asarray(image)
    squeeze = data.ndim == 2
    data3 = _as_image(data)
    medians, sigmas, high = stretch_stats(data3)
    params = None if medians is None else stretch_params(medians, sigmas, high)
    out = np.empty(data3.shape, dtype=np.float32)
    for start in range(0, data3.shape[0], _BAND_ROWS):
        stretch_band(params, data3[start : start + _BAND_ROWS], out[start : start + _BAND_ROWS])
    return out[:, :, 0] if squeeze else out


StretchParams = tuple[npt.NDArray[np.float32], float, float | None] | None
"""What :func:`stretch` derives from its statistics: the per-channel offsets (background
median plus shadows), the span and the midtones balance (None: none); None for an image
without a finite value."""


def stretch_params(
    medians: npt.NDArray[np.float64], sigmas: npt.NDArray[np.float64], high: float
) -> StretchParams:
    """:func:`stretch`'s parameters from the channels' background medians, normalised MADs and
    the highlight point (steps 2-4 of its definition)."""
    shadows = -STF_SHADOWS_SIGMA * float(np.mean(sigmas))
    span = high - shadows
    background = -shadows / span if span > 0 else 0.0
    balance = mtf(STF_TARGET_BACKGROUND, background) if 0.0 < background < 1.0 else None
    return (medians + shadows).astype(np.float32), span, balance


def stretch_band(params: StretchParams, values: FloatArray, out: npt.NDArray[np.float32]) -> None:
    """``out`` = :func:`stretch` of a band of rows ``values`` with ``params`` (float32, in
    place: the same values to the bit whatever the banding)."""
    if params is None:
        out.fill(0.0)
        return
    offsets, span, balance = params
    np.subtract(values, offsets, out=out, dtype=np.float32)
    if span > 0:
        out /= np.float32(span)
    np.clip(out, 0.0, 1.0, out=out)
    if balance is not None:
        _mtf_inplace(balance, out)
    np.nan_to_num(out, copy=False, nan=0.0)


def stretch_stats(
    image: FloatArray,
) -> tuple[npt.NDArray[np.float64] | None, npt.NDArray[np.float64], float]:
    """Per-channel background median, normalised MAD (from a subsample) and the highlight point.

    Returns ``(None, ..., ...)`` when the image has no finite value.
    """
    rows, cols, channels = image.shape
    step = max(1, int(math.sqrt(rows * cols / STATS_SAMPLES)))
    sample = image[::step, ::step].reshape(-1, channels)
    medians = np.zeros(channels)
    sigmas = np.zeros(channels)
    for c in range(channels):
        values = sample[:, c]
        values = values[np.isfinite(values)].astype(np.float64)
        if values.size == 0:
            return None, sigmas, 0.0
        medians[c] = np.median(values)
        sigmas[c] = _MAD_TO_SIGMA * np.median(np.abs(values - medians[c]))
    high = -math.inf
    for c in range(channels):
        plane = image[:, :, c]
        finite = np.isfinite(plane)
        if finite.any():
            high = max(high, float(np.max(plane, where=finite, initial=-np.inf)) - medians[c])
    return medians, sigmas, high


def mtf(balance: float, x: float) -> float:
    """Midtones transfer function of one value: 0 -> 0, balance -> 0.5, 1 -> 1."""
    return (balance - 1.0) * x / ((2.0 * balance - 1.0) * x - balance)


def _mtf_inplace(balance: float, x: npt.NDArray[np.float32]) -> None:
    """Apply :func:`mtf` in place to values in [0, 1]; the denominator is < 0 for 0 < m < 1."""
    den = np.multiply(x, np.float32(2.0 * balance - 1.0))
    den -= np.float32(balance)
    x *= np.float32(balance - 1.0)
    x /= den


def write_preview(
    path: str | os.PathLike[str], image: FloatArray, *, width: int = 1600, quality: int = 90
) -> None:
    """Write a stretched 8-bit preview (JPEG or PNG, by the extension of ``path``) atomically.

    The image is first shrunk to ``width`` pixels wide with area averaging (never enlarged), then
    stretched with :func:`stretch` on the small image, so the cost is dominated by one pass over
    the full-size data. An image already at most ``width`` pixels wide is not resized: pass
    :meth:`nightstack.stacking.live.LiveStack.preview_image` ``(width)`` to avoid forming the
    full-size live stack at all (the same preview, from a few MB instead of 288 MB at 24 MP).

    Parameters
    ----------
    path : path-like
        Destination ``.jpg``, ``.jpeg`` or ``.png`` file.
    image : ndarray
        (rows, cols, C) or (rows, cols) float linear, C = 1 or 3; NaN shows as black.
    width : int
        Preview width in pixels; the height keeps the aspect ratio.
    quality : int
        JPEG quality 1-100 (ignored for PNG).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in _PREVIEW_FORMATS:
        raise ValueError(f"preview must be .jpg, .jpeg or .png, not {suffix or 'no extension'!r}")
    if width < 1:
        raise ValueError(f"preview width must be >= 1, not {width}")
    data = _as_image(image)
    rows, cols, channels = data.shape
    small: FloatArray = data
    if cols > width:
        height = max(1, round(rows * width / cols))
        src = np.ascontiguousarray(data, dtype=np.float32)
        resized = cv2.resize(src, (width, height), interpolation=cv2.INTER_AREA)
        small = np.asarray(resized, dtype=np.float32).reshape(height, width, channels)
    shown = stretch(small)
    shown *= 255.0
    np.rint(shown, out=shown)
    pixels = shown.astype(np.uint8)
    # OpenCV encodes BGR
    pixels = np.ascontiguousarray(pixels[:, :, ::-1]) if channels == 3 else pixels[:, :, 0]
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if _PREVIEW_FORMATS[suffix] == ".jpg" else []
    ok, encoded = cv2.imencode(_PREVIEW_FORMATS[suffix], pixels, params)
    if not ok:
        raise OSError(f"OpenCV could not encode the preview as {suffix}")
    write_bytes(path, encoded.tobytes())


def _as_image(image: FloatArray) -> FloatArray:
    """View a (rows, cols) or (rows, cols, C) array as (rows, cols, C), C = 1 or 3."""
    data = np.asarray(image)
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim != 3 or data.shape[2] not in (1, 3):
        raise ValueError(f"image must be (rows, cols) or (rows, cols, 1|3), not {data.shape}")
    if data.dtype.kind != "f":
        raise ValueError(f"image must be floating point, not {data.dtype}")
    return data


def write_fits_extended(
    path: str | os.PathLike[str],
    shape: tuple[int, int, int],
    primary: Callable[[int, int], FloatArray],
    header: Mapping[str, Any],
    extension: Callable[[int, int], FloatArray],
    extname: str,
    *,
    band_rows: int = _BAND_ROWS,
) -> None:
    """:func:`write_fits_bands` of a primary image plus one image extension ``extname`` of the
    same shape and header conventions (e.g. the freeze-ground composite and its aligned sky),
    both delivered band by band, atomically."""
    rows, cols, channels = (int(v) for v in shape)

    def card_header(first: bool) -> fits.Header:
        hdr = fits.Header()
        if first:
            hdr["SIMPLE"] = True
        else:
            hdr["XTENSION"] = "IMAGE"
        hdr["BITPIX"] = -32
        hdr["NAXIS"] = 2 if channels == 1 else 3
        hdr["NAXIS1"], hdr["NAXIS2"] = cols, rows
        if channels != 1:
            hdr["NAXIS3"] = channels
        if first:
            hdr["EXTEND"] = True
        else:
            hdr["PCOUNT"], hdr["GCOUNT"] = 0, 1
            hdr["EXTNAME"] = extname
        hdr.extend(_fits_header(header))
        return hdr

    with atomic_path(path) as tmp:
        for first, read_band in ((True, primary), (False, extension)):
            stream = fits.StreamingHDU(str(tmp), card_header(first))
            try:
                for c in range(channels):
                    for r0 in range(0, rows, band_rows):
                        band = _as_image(read_band(r0, min(r0 + band_rows, rows)))
                        stream.write(np.ascontiguousarray(band[:, :, c], dtype=">f4"))
            finally:
                stream.close()
