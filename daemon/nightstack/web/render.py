"""Stretched JPEGs of a session's live stack (``live.fits``), for the page's stretch controls.

``live.fits`` is float32 linear, (rows, cols) mono or a (3, rows, cols) colour cube, row 0 at the
top (``ROWORDER = 'TOP-DOWN'``). A render:

1. shrinks it by an integer factor ``f = ceil(cols / width)`` with ``cv2.resize(INTER_AREA)``
   (an exact f x f block mean), band by band, each band's :data:`_READ_ROWS` stack rows read
   from the file then (:class:`LiveFits`: into buffers reused band after band; no memory map,
   whose pages would count in the daemon's RSS while a render runs);
2. stretches it as :func:`nightstack.io.writers.stretch` does, the preview's own auto-stretch, over
   all channels at once ("linked", as the preview) or channel by channel ("unlinked": each
   channel its own shadows and highlights, which neutralises a colour cast of the stars too);
3. applies the strength as a midtones transfer on the stretched values: balance
   ``m = 0.5 ** strength`` (strength 1 leaves the auto-stretch as it is, 2 lifts its sky
   background from 0.25 to 0.5, 0.5 darkens it to about 0.13), and rounds to 8 bits.

The shrunk image is never held whole: a first pass over the file takes the stretch's
statistics (:func:`statistics`: its subsample and largest values), a second shrinks again and
runs steps 2 and 3 band by band (:data:`_PIXEL_ROWS` rows) into the 8-bit image handed to the
encoder, the same bytes as stretching the whole image. A render holds the 8-bit image, the
statistics' sample and a few MB of bands: 7-28 MB at any width of a 24 MP stack (the former
render held the shrunk float image and three float copies of it, 4 x 31 MB at 2400 px, and read
a 200 px render 1920 rows at a time: the daemon's RSS grew by 253 MB under looping renders,
bench_hardening). The statistics are kept per file and width (a few numbers), so another
strength or view of the same stack is one pass.

A 1:1 crop reads only its own window at full resolution (astropy's ``section``) and is
stretched on its own statistics. Encoded images are cached by the file's inode, mtime and size
and the view asked for, bounded in bytes (:data:`CACHE_BYTES`).

What a render may cost is bounded: widths and crop sizes are taken from short lists
(:data:`WIDTHS`, :data:`CROPS`: a size asked for is rounded up to the next listed one), and
:class:`RenderQueue` runs renders on one thread of their own (at most one core, never the
threads that answer the JSON API), one at a time per session, with a few waiting at most.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

import cv2
import numpy as np
import numpy.typing as npt
from astropy.io import fits

from nightstack.arrays import Float32Array
from nightstack.io.writers import (
    STATS_SAMPLES,
    StretchParams,
    stretch_band,
    stretch_params,
    stretch_stats,
)
from nightstack.memory import trim_heap

Pixels = npt.NDArray[np.uint8]
_T = TypeVar("_T")
Bands = Callable[[], Iterator[tuple[int, Float32Array]]]
"""A new pass over an image: its bands (first row, (rows, cols, C) float32) top to bottom."""

_READ_ROWS = 128
"""Stack rows read and shrunk at a time (at least one output row's ``f``): 3 MB of a 6000
column plane, and as much again converted to native float32."""

_PIXEL_ROWS = 128
"""Rows stretched and rounded to 8 bits at a time: 3 MB of float32 temporaries apiece at
2000 x 3 columns."""

_JPEG_QUALITY = 88  # the preview's look at a third of PNG's size

CACHE_BYTES = 8 * 2**20
"""Encoded images kept, in bytes all together (a 24 MP colour stack shrunk to 1600 px is a
0.25 MB JPEG, a PNG of 3 to 17 MB): what the cache holds stays in the daemon's RSS."""

WIDTHS = (200, 300, 400, 600, 800, 1200, 1600, 2400)
"""Render widths, pixels: a width asked for is rounded up to the next one (at most 2400)."""

CROPS = (128, 256, 512, 768, 1024)
"""1:1 crop sides, stack pixels: a size asked for is rounded up to the next one."""

STRENGTH_RANGE = (0.2, 3.0)  # of the midtones balance exponent; 1 = the auto-stretch

_STATISTICS_KEPT = 32
"""Files x widths whose :class:`Statistics` a renderer keeps (a few hundred bytes each)."""

RENDERS_WAITING = 2
"""Renders of one session that may wait behind the running one: 503 (Retry-After) beyond."""


def listed(value: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` (ascending) at least ``value``; the largest beyond them."""
    return next((size for size in sizes if size >= value), sizes[-1])


def _key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path), st.st_ino, st.st_mtime_ns, st.st_size)


def _planes(data: Any) -> tuple[int, int, int]:
    """(channels, rows, cols) of a live.fits data array or section; ValueError for another
    layout."""
    shape = tuple(data.shape)
    if len(shape) == 2:
        return 1, int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[0] in (1, 3):
        return int(data.shape[0]), int(data.shape[1]), int(data.shape[2])
    raise ValueError(f"live.fits must be (rows, cols) or (3, rows, cols), not {shape}")


def _rows(data: Any, c: int, rows: slice, cols: slice) -> npt.NDArray[np.floating]:
    """Plane ``c``'s window ``rows`` x ``cols`` of a live.fits array or section, read then."""
    return np.asarray(data[rows, cols] if len(data.shape) == 2 else data[c, rows, cols])


class LiveFits:
    """An open live.fits: its ``shape``, astropy's ``section`` (any window, read then) and
    :meth:`rows`, whole rows of a plane read from the file into buffers of its own, reused from
    one call to the next (fresh arrays for every band cost a page fault a page: half a render's
    time)."""

    def __init__(self, fh: BinaryIO, hdul: fits.HDUList) -> None:
        hdu = hdul[0]
        header = hdu.header
        self.shape = tuple(int(n) for n in hdu.shape)
        self.section = hdu.section
        self._fh = fh
        self._offset = int(hdul.fileinfo(0)["datLoc"])
        # what nightstack writes: big-endian float32, unscaled; anything else through astropy
        self._direct = (
            header.get("BITPIX") == -32
            and header.get("BSCALE", 1) == 1
            and header.get("BZERO", 0) == 0
        )
        self._raw = np.empty(0, dtype=">f4")
        self._native = np.empty(0, dtype=np.float32)

    def rows(self, c: int, r0: int, r1: int) -> Float32Array:
        """Rows ``r0:r1`` of plane ``c``, native float32 (valid until the next call)."""
        _, rows, cols = _planes(self)
        if not self._direct:
            window = _rows(self.section, c, slice(r0, r1), slice(0, cols))
            return np.asarray(window, dtype=np.float32)
        count = (r1 - r0) * cols
        if self._raw.size < count:
            self._raw = np.empty(count, dtype=">f4")
            self._native = np.empty(count, dtype=np.float32)
        raw, native = self._raw[:count], self._native[:count]
        self._fh.seek(self._offset + (c * rows + r0) * cols * raw.itemsize)
        if self._fh.readinto(raw) != raw.nbytes:  # type: ignore[attr-defined]
            raise ValueError("live.fits is shorter than its header says")
        np.copyto(native, raw)
        return native.reshape(r1 - r0, cols)


class _ArrayRows:
    """:meth:`LiveFits.rows` of an array (or any object astropy's section behaves like)."""

    def __init__(self, data: Any) -> None:
        self.shape = tuple(data.shape)
        self._data = data

    def rows(self, c: int, r0: int, r1: int) -> Float32Array:
        window = _rows(self._data, c, slice(r0, r1), slice(0, self.shape[-1]))
        return np.asarray(window, dtype=np.float32)


def _shrunk_shape(data: Any, width: int) -> tuple[int, tuple[int, int, int]]:
    """``f = ceil(cols / width)`` and the (rows // f, cols // f, C) shape of the shrunk image."""
    channels, rows, cols = _planes(data)
    factor = max(1, math.ceil(cols / width))
    return factor, (rows // factor, cols // factor, channels)


def _shrunk_bands(data: Any, width: int) -> Iterator[tuple[int, Float32Array]]:
    """The bands of :func:`shrink`'s image, top to bottom: (first row, float32 band; the band
    is valid until the next one), each shrunk from :data:`_READ_ROWS` stack rows (or ``f``
    when more) read then."""
    factor, (out_rows, out_cols, channels) = _shrunk_shape(data, width)
    source = data if isinstance(data, LiveFits) else _ArrayRows(data)
    band_rows = max(1, _READ_ROWS // factor)  # output rows per band
    buffer = np.empty((min(band_rows, out_rows), out_cols, channels), dtype=np.float32)
    for r0 in range(0, out_rows, band_rows):
        r1 = min(out_rows, r0 + band_rows)
        band = buffer[: r1 - r0]
        for c in range(channels):
            plane = source.rows(c, r0 * factor, r1 * factor)[:, : out_cols * factor]
            if factor == 1:
                band[:, :, c] = plane
            else:
                small = cv2.resize(plane, (out_cols, r1 - r0), interpolation=cv2.INTER_AREA)
                band[:, :, c] = small
        yield r0, band


def shrink(data: Any, width: int) -> Float32Array:
    """Shrink a live.fits array by ``f = ceil(cols / width)`` (f x f block means).

    Parameters
    ----------
    data : ndarray or astropy Section
        (rows, cols) or (C, rows, cols) float, as stored in the FITS file (any byte order); a
        section is read band by band.
    width : int
        The widest result wanted, pixels.

    Returns
    -------
    ndarray
        float32 (rows // f, cols // f, C): a remainder of fewer than f rows or columns at the
        bottom and right is dropped.
    """
    _, shape = _shrunk_shape(data, width)
    out = np.empty(shape, dtype=np.float32)
    for r0, band in _shrunk_bands(data, width):
        out[r0 : r0 + len(band)] = band
    return out


class Statistics(NamedTuple):
    """What :func:`nightstack.io.writers.stretch` measures of an image, channel by channel: the
    background median (None: no finite value in its subsample) and normalised MAD of the
    subsample, and the largest finite value (-inf: none). A few numbers: a renderer keeps
    them per file and width, so another strength or view of the same stack is one pass."""

    medians: tuple[float | None, ...]
    sigmas: tuple[float, ...]
    maxima: tuple[float, ...]


def _stretch_of(stats: Statistics, chans: slice) -> StretchParams:
    """:func:`nightstack.io.writers.stretch`'s parameters for the channels ``chans`` stretched
    together: the same shadows, highlights and background balance, to the bit."""
    if any(median is None for median in stats.medians[chans]):
        return None
    medians = np.array(stats.medians[chans], dtype=np.float64)
    high = max(top - median for top, median in zip(stats.maxima[chans], medians, strict=True))
    return stretch_params(medians, np.array(stats.sigmas[chans], dtype=np.float64), high)


def statistics(bands: Bands, shape: tuple[int, int, int]) -> Statistics:
    """One pass over the bands of a (rows, cols, C) image: the :class:`Statistics` that
    :func:`nightstack.io.writers.stretch` takes of it (its subsample: every ``step``-th row and
    column, ``step`` from ``rows * cols``; given that subsample, stretch's own statistics take
    all of it again: the sample has fewer than 4 x ``STATS_SAMPLES`` pixels)."""
    rows, cols, channels = shape
    step = max(1, int(math.sqrt(rows * cols / STATS_SAMPLES)))
    sample = np.empty((-(-rows // step), -(-cols // step), channels), dtype=np.float32)
    maxima = [-math.inf] * channels
    for r0, band in bands():
        first = -(-r0 // step) * step  # the band's first row of the sample
        taken = band[first - r0 :: step, ::step]
        sample[first // step : first // step + len(taken)] = taken
        for c in range(channels):
            plane = band[:, :, c]
            finite = np.isfinite(plane)
            if finite.any():
                top = float(np.max(plane, where=finite, initial=-np.inf))
                maxima[c] = max(maxima[c], top)
    medians: list[float | None] = []
    sigmas: list[float] = []
    for c in range(channels):  # each channel's statistics are its own, linked or not
        median, sigma, _ = stretch_stats(sample[:, :, c : c + 1])
        medians.append(None if median is None else float(median[0]))
        sigmas.append(float(sigma[0]))
    return Statistics(tuple(medians), tuple(sigmas), tuple(maxima))


def _pixels(
    bands: Bands, shape: tuple[int, int, int], stats: Statistics, *, strength: float, linked: bool
) -> Pixels:
    """The stretched 8-bit view of the image that ``bands`` gives (one pass over it), with
    its :func:`statistics`: band by band, never a float copy of the whole image.

    ``linked``: one :func:`~nightstack.writers.stretch` over all channels (the preview's); else
    each channel stretched alone. ``strength``: midtones balance ``0.5 ** strength`` on top
    (1 = unchanged). Values in [0, 1] are scaled by 255 and rounded.

    Returns
    -------
    ndarray
        uint8 (rows, cols, 3) in OpenCV's BGR order for colour, (rows, cols) for mono.
    """
    rows, cols, channels = shape
    groups = [slice(0, channels)] if linked else [slice(c, c + 1) for c in range(channels)]
    plans = [(chans, _stretch_of(stats, chans)) for chans in groups]
    balance = np.float32(0.5**strength)
    out = np.empty(shape, dtype=np.uint8)
    work = np.empty((min(rows, _PIXEL_ROWS), cols, channels), dtype=np.float32)
    den = np.empty_like(work) if strength != 1.0 else work
    for r0, band in bands():
        for b0 in range(0, len(band), _PIXEL_ROWS):
            values = band[b0 : b0 + _PIXEL_ROWS]
            shown = work[: len(values)]
            for chans, params in plans:
                stretch_band(params, values[:, :, chans], shown[:, :, chans])
            if strength != 1.0:
                # midtones transfer (m - 1) x / ((2m - 1) x - m); the denominator is < 0 on [0, 1]
                under = np.multiply(shown, np.float32(2.0 * balance - 1.0), out=den[: len(shown)])
                under -= balance
                shown *= np.float32(balance - 1.0)
                shown /= under
            np.clip(shown, np.float32(0.0), np.float32(1.0), out=shown)
            shown *= np.float32(255.0)
            np.rint(shown, out=shown)
            out[r0 + b0 : r0 + b0 + len(shown)] = shown[:, :, ::-1]  # RGB -> BGR; whole numbers
        del band
    return out if channels == 3 else out[:, :, 0]


def pixels(image: Float32Array, *, strength: float = 1.0, linked: bool = True) -> Pixels:
    """The stretched 8-bit view of a linear (rows, cols, C) image held whole (a crop): see
    :func:`_pixels`."""
    rows, cols, channels = image.shape
    shape = (rows, cols, channels)

    def bands() -> Iterator[tuple[int, Float32Array]]:
        return iter([(0, image)])

    return _pixels(bands, shape, statistics(bands, shape), strength=strength, linked=linked)


FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}
"""Encodings a render can be asked for: JPEG for the page, lossless PNG for scripts."""


def encode(image: Pixels, fmt: str = "jpeg") -> bytes:
    """JPEG or PNG of an 8-bit (rows, cols, 3) BGR or (rows, cols) mono image."""
    if fmt == "png":
        ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise OSError(f"OpenCV could not encode a {fmt} image")
    return encoded.tobytes()


class _ByteCache:
    """Least recently used encoded images up to ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple[object, ...], value: bytes) -> None:
        if len(value) > self.limit:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._items[key] = value
        self.bytes += len(value)
        while self.bytes > self.limit:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= len(dropped)


class StretchRenderer:
    """Renders and caches stretched views of live.fits files; one render at a time."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self._lock = threading.Lock()
        self.cache = _ByteCache(cache_bytes)
        self._statistics: OrderedDict[tuple[object, ...], Statistics] = OrderedDict()
        self.reads = 0  # live.fits files read (the cache's misses), for tests and the bench

    def render(
        self, path: Path, *, width: int, strength: float, linked: bool, fmt: str = "jpeg"
    ) -> bytes:
        """The whole stack at most ``width`` pixels wide (see the module docstring)."""

        key = _key(path)

        def view(data: LiveFits) -> Pixels:
            _, shape = _shrunk_shape(data, width)
            bands = functools.partial(_shrunk_bands, data, width)
            stats = self._statistics.get((*key, width))
            if stats is not None:
                self._statistics.move_to_end((*key, width))
            else:  # a pass of its own; then kept for other strengths and views
                stats = statistics(bands, shape)
                self._statistics[(*key, width)] = stats
                while len(self._statistics) > _STATISTICS_KEPT:
                    self._statistics.popitem(last=False)
            return _pixels(bands, shape, stats, strength=strength, linked=linked)

        return self._rendered(path, (*key, "full", width, strength, linked, fmt), view, fmt)

    def crop(
        self,
        path: Path,
        *,
        cx: float,
        cy: float,
        size: int,
        strength: float,
        linked: bool,
        fmt: str = "jpeg",
    ) -> bytes:
        """A ``size`` x ``size`` window of the stack at full resolution (1:1), centred at the
        fractions (cx, cy) of its width and height (clamped inside the image)."""

        def view(data: LiveFits) -> Pixels:
            channels, rows, cols = _planes(data)
            w, h = min(size, cols), min(size, rows)
            x0 = min(max(0, round(cx * cols - w / 2)), cols - w)
            y0 = min(max(0, round(cy * rows - h / 2)), rows - h)
            window = np.empty((h, w, channels), dtype=np.float32)
            for c in range(channels):
                window[:, :, c] = _rows(data.section, c, slice(y0, y0 + h), slice(x0, x0 + w))
            return pixels(window, strength=strength, linked=linked)

        key = (*_key(path), "crop", cx, cy, size, strength, linked, fmt)
        return self._rendered(path, key, view, fmt)

    def _rendered(
        self, path: Path, key: tuple[object, ...], view: Callable[[LiveFits], Pixels], fmt: str
    ) -> bytes:
        """The encoded image ``key``: from the cache, or ``view`` of the file encoded; the
        render's memory given back to the system afterwards."""
        with self._lock:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
            try:
                encoded = encode(self._read(path, view), fmt)
                self.cache.put(key, encoded)
            finally:
                trim_heap()
            return encoded

    def _read(self, path: Path, take: Callable[[LiveFits], _T]) -> _T:
        """Open ``path`` and return ``take(live)``: :class:`LiveFits` reads the pixels it is
        asked for from the file, nothing else (no memory map, no whole array)."""
        self.reads += 1
        # our own file object: closed even when astropy fails half way through a bad file
        with path.open("rb") as fh:
            try:
                with fits.open(fh, memmap=False, lazy_load_hdus=False) as hdul:
                    hdu = hdul[0]
                    if not hdu.header.get("NAXIS"):
                        raise ValueError("no image data")
                    result = take(LiveFits(fh, hdul))
            except (OSError, ValueError, TypeError, IndexError, KeyError, Warning) as err:
                raise ValueError(f"{type(err).__name__}: {err}") from err
        return result





class RenderQueue:
    """Runs renders on one thread of their own, one at a time per session (see the module
    docstring); lives on the server's event loop."""

    class Busy(Exception):
        """Too many renders of this session wait already."""

    def __init__(self, waiting: int = RENDERS_WAITING) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="nightstack-web-render"
        )
        self._waiting = waiting
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # session -> (lock, renders)

    async def run(self, session: str, fn: Callable[..., bytes], *args: Any, **kwargs: Any) -> bytes:
        """``fn(*args, **kwargs)`` on the render thread once this session's turn comes;
        raises :class:`Busy` when ``waiting`` renders of the session already wait."""
        lock, count = self._locks.get(session, (asyncio.Lock(), 0))
        if count > self._waiting:
            raise self.Busy(f"{count} renders of this session are under way")
        self._locks[session] = (lock, count + 1)
        try:
            async with lock:
                loop = asyncio.get_running_loop()
                call = functools.partial(fn, *args, **kwargs)
                return await loop.run_in_executor(self._executor, call)
        finally:
            lock, count = self._locks[session]
            if count > 1:
                self._locks[session] = (lock, count - 1)
            else:
                del self._locks[session]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
