"""The small files the web page shows besides ``preview.jpg``: the linear preview behind its
stretch controls and the last single frame.

- ``preview_linear.fits``: the live stack's preview image, linear, written with every preview
  (before ``preview.jpg``, so a page told of a new preview finds both new). Its size is bounded
  so that writing it costs at most :data:`LINEAR_RATIO` of the frame's mosaic (2 bytes a
  pixel): at 24 MP (a 48 MB mosaic) at most 2.4 MB a frame, a 773 px wide colour image
  (1340 px mono); never narrower than :data:`LINEAR_MIN_WIDTH` (a small sensor's whole preview
  is a few MB at most) nor wider than the preview. 16-bit integers scaled by ``BSCALE`` /
  ``BZERO`` from the image's own finite range (65 534 steps: far below the noise of a
  shrunk stack's sky), ``BLANK`` where no frame covered the sky (NaN when read). Any FITS
  reader gives back the floats; ``web/render.py`` stretches it like ``live.fits``.
- ``last.jpg``: the last accepted frame's luminance, shrunk to the preview's width by area
  averaging and auto-stretched (:func:`nightstack.io.writers.stretch`), for checking focus and
  framing between frames: one resize of a plane the prepared frame already holds, no demosaic.

Both are written atomically (:func:`nightstack.io.writers.atomic_path`).
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
from astropy.io import fits

from nightstack.arrays import FloatArray
from nightstack.io.writers import atomic_path, write_preview

LINEAR_PREVIEW = "preview_linear.fits"
LAST_FRAME = "last.jpg"

LINEAR_RATIO = 0.05
"""Bytes of ``preview_linear.fits`` per byte of the frame's uint16 mosaic, at most (above
:data:`LINEAR_MIN_WIDTH`)."""

LINEAR_MIN_WIDTH = 640
"""The narrowest linear preview, pixels (a sensor small enough to need it writes a few MB)."""

_BLANK = -32768
_BLOCK = 2880  # FITS writes in blocks of this many bytes
_STEPS = 65534  # int16 values -32767..32767 for the finite range; -32768 is BLANK


def linear_width(rows: int, cols: int, channels: int, width: int) -> int:
    """The width of the linear preview of a (rows, cols, channels) stack whose preview is
    ``width`` wide: its file (a 2880-byte header block, 2 bytes a sample in 2880-byte blocks)
    within ``LINEAR_RATIO`` x the 2-byte mosaic, but at least ``LINEAR_MIN_WIDTH``; at most
    ``width`` and ``cols``."""
    budget = LINEAR_RATIO * rows * cols * 2

    def size(w: int) -> int:
        samples = max(1, round(rows * w / cols)) * w * channels
        return _BLOCK + _BLOCK * math.ceil(samples * 2 / _BLOCK)

    fits = max(1, math.floor(cols * math.sqrt(LINEAR_RATIO / channels)))
    while fits > 1 and size(fits) > budget:
        fits -= 1
    return max(1, min(width, cols, max(LINEAR_MIN_WIDTH, fits)))


def write_linear_preview(
    path: str | os.PathLike[str], image: FloatArray, *, width: int, header: dict[str, object]
) -> int:
    """Write ``image`` ((rows, cols, C) float, linear) shrunk to ``width`` (area averaging;
    never enlarged) as 16-bit scaled FITS, atomically; return the bytes written.

    Colour is a (3, rows, cols) cube and row 0 is the top (``ROWORDER``), as ``live.fits``."""
    data = np.asarray(image, dtype=np.float32)
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    rows, cols, channels = data.shape
    if cols > width:
        height = max(1, round(rows * width / cols))
        small = cv2.resize(data, (width, height), interpolation=cv2.INTER_AREA)
        data = np.asarray(small, np.float32).reshape(height, width, channels)
    finite = np.isfinite(data)
    lo = float(data.min(where=finite, initial=np.inf))
    hi = float(data.max(where=finite, initial=-np.inf))
    if not lo <= hi:  # no finite value
        lo, hi = 0.0, 1.0
    scale = (hi - lo) / _STEPS if hi > lo else 1.0
    zero = lo + 32767 * scale  # stored -32767 is lo, 32767 is hi
    stored = np.full(data.shape, _BLANK, dtype=np.int16)
    values = np.subtract(data, np.float32(zero))  # a new array: ``image`` is left as it is
    values /= np.float32(scale)
    np.rint(values, out=values)
    np.clip(values, -32767, 32767, out=values)
    stored[finite] = values[finite]
    cube = stored[:, :, 0] if channels == 1 else np.ascontiguousarray(np.moveaxis(stored, 2, 0))
    hdu = fits.PrimaryHDU(data=cube, do_not_scale_image_data=True)
    hdr = hdu.header
    hdr["BSCALE"] = scale
    hdr["BZERO"] = zero
    hdr["BLANK"] = _BLANK
    for key, value in header.items():
        if value is not None:
            hdr[key] = value
    hdr["ROWORDER"] = ("TOP-DOWN", "row 0 of the data is the top of the image")
    with atomic_path(path) as tmp:
        hdu.writeto(tmp, overwrite=True, output_verify="exception")
        written = tmp.stat().st_size
    return written


def write_last_frame(path: str | os.PathLike[str], plane: FloatArray, *, width: int) -> None:
    """``last.jpg``: a frame's (rows, cols) or (rows, cols, C) plane shrunk to ``width`` and
    auto-stretched (see the module docstring)."""
    data = np.asarray(plane)
    if data.dtype.kind != "f":
        data = data.astype(np.float32)
    write_preview(path, data, width=width, quality=85)
