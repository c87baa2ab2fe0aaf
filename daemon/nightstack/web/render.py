"""Stretched JPEGs of a session's live stack (``live.fits``), for the page's stretch controls.

``live.fits`` is float32 linear, (rows, cols) mono or a (3, rows, cols) colour cube, row 0 at the
top (``ROWORDER = 'TOP-DOWN'``). A render:

1. shrinks it by an integer factor ``f = ceil(cols / width)`` with ``cv2.resize(INTER_AREA)``
   (an exact f x f block mean), band by band, each band read from the file on its own (astropy's
   ``section``: no memory map, whose pages would count in the daemon's RSS while a render runs),
   so a 24 MP stack costs a few MB of RAM, not its 288 MB;
2. stretches it with :func:`nightstack.io.writers.stretch`, the preview's own auto-stretch, over all
   channels at once ("linked", as the preview) or channel by channel ("unlinked": each channel
   its own shadows and highlights, which neutralises a colour cast of the stars too);
3. applies the strength as a midtones transfer on the stretched values: balance
   ``m = 0.5 ** strength`` (strength 1 leaves the auto-stretch as it is, 2 lifts its sky
   background from 0.25 to 0.5, 0.5 darkens it to about 0.13).

A 1:1 crop reads only its own window at full resolution and is stretched on its own statistics.
Shrunk stacks and JPEGs are cached by the file's inode, mtime and size, so each new live.fits is
read once whatever the number of clients; the cache is bounded in bytes (:data:`CACHE_BYTES`).

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from astropy.io import fits

from nightstack.arrays import Float32Array
from nightstack.io.writers import stretch

_BAND_OUT_ROWS = 64
"""Output rows shrunk per band: bounds the float32 temporaries to ~64 * f rows of the stack."""

_JPEG_QUALITY = 88  # the preview's look at a third of PNG's size

CACHE_BYTES = 64 * 2**20
"""Shrunk stacks and encoded images kept, in bytes all together (a 24 MP colour stack shrunk to
1600 px is 18 MB; a JPEG of it 0.3 MB, a PNG up to 17 MB)."""

WIDTHS = (200, 300, 400, 600, 800, 1200, 1600, 2400)
"""Render widths, pixels: a width asked for is rounded up to the next one (at most 2400)."""

CROPS = (128, 256, 512, 768, 1024)
"""1:1 crop sides, stack pixels: a size asked for is rounded up to the next one."""

STRENGTH_RANGE = (0.2, 3.0)  # of the midtones balance exponent; 1 = the auto-stretch

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
    channels, rows, cols = _planes(data)
    factor = max(1, math.ceil(cols / width))
    out_rows, out_cols = rows // factor, cols // factor
    out = np.empty((out_rows, out_cols, channels), dtype=np.float32)
    for c in range(channels):
        for r0 in range(0, out_rows, _BAND_OUT_ROWS):
            r1 = min(out_rows, r0 + _BAND_OUT_ROWS)
            window = _rows(data, c, slice(r0 * factor, r1 * factor), slice(0, out_cols * factor))
            band = np.asarray(window, dtype=np.float32)
            if factor == 1:
                out[r0:r1, :, c] = band
            else:
                small = cv2.resize(band, (out_cols, r1 - r0), interpolation=cv2.INTER_AREA)
                out[r0:r1, :, c] = small
    return out


def display(image: Float32Array, *, strength: float = 1.0, linked: bool = True) -> Float32Array:
    """The stretched view of a linear (rows, cols, C) image, float32 in [0, 1].

    ``linked``: one :func:`~nightstack.io.writers.stretch` over all channels (the preview's);
    else each channel stretched alone. ``strength``: midtones balance ``0.5 ** strength`` on
    top (1 = unchanged).
    """
    if linked or image.shape[2] == 1:
        shown = stretch(image)
    else:
        shown = np.dstack([stretch(image[:, :, c]) for c in range(image.shape[2])])
    shown = np.asarray(shown, dtype=np.float32)
    if strength != 1.0:  # in place: a 2400 px render's temporaries are 46 MB apiece
        balance = np.float32(0.5**strength)
        # midtones transfer (m - 1) x / ((2m - 1) x - m); the denominator is < 0 on [0, 1]
        den = shown * np.float32(2.0 * balance - 1.0)
        den -= balance
        shown *= np.float32(balance - 1.0)
        shown /= den
    return shown


FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}
"""Encodings a render can be asked for: JPEG for the page, lossless PNG for scripts."""


def encode(shown: Float32Array, fmt: str = "jpeg") -> bytes:
    """8-bit JPEG or PNG of a (rows, cols, C) image in [0, 1] (RGB or mono), values rounded."""
    values = np.clip(shown, np.float32(0.0), np.float32(1.0))  # one float copy, then in place
    values *= np.float32(255.0)
    np.rint(values, out=values)
    pixels = values.astype(np.uint8)
    del values
    pixels = np.ascontiguousarray(pixels[:, :, ::-1]) if pixels.shape[2] == 3 else pixels[:, :, 0]
    if fmt == "png":
        ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise OSError(f"OpenCV could not encode a {fmt} image")
    return bytes(encoded.tobytes())


class _ByteCache:
    """Least recently used values (arrays or bytes) up to ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._items: OrderedDict[tuple[object, ...], Float32Array | bytes] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> Float32Array | bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple[object, ...], value: Float32Array | bytes) -> None:
        size = value.nbytes if isinstance(value, np.ndarray) else len(value)
        if size > self.limit:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes if isinstance(old, np.ndarray) else len(old)
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.limit:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.nbytes if isinstance(dropped, np.ndarray) else len(dropped)


class StretchRenderer:
    """Renders and caches stretched views of live.fits files; one render at a time."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self._lock = threading.Lock()
        self.cache = _ByteCache(cache_bytes)
        self.reads = 0  # live.fits files read (the cache's misses), for tests and the bench

    def render(
        self, path: Path, *, width: int, strength: float, linked: bool, fmt: str = "jpeg"
    ) -> bytes:
        """The whole stack at most ``width`` pixels wide (see the module docstring)."""
        with self._lock:
            key = _key(path)
            jpeg_key = (*key, "full", width, strength, linked, fmt)
            cached = self.cache.get(jpeg_key)
            if isinstance(cached, bytes):
                return cached
            image_key = (*key, width)
            image = self.cache.get(image_key)
            if not isinstance(image, np.ndarray):
                image = self._read(path, lambda data: shrink(data, width))
                self.cache.put(image_key, image)
            jpeg = encode(display(image, strength=strength, linked=linked), fmt)
            self.cache.put(jpeg_key, jpeg)
            _trim_heap()
            return jpeg

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
        with self._lock:
            key = (*_key(path), "crop", cx, cy, size, strength, linked, fmt)
            cached = self.cache.get(key)
            if isinstance(cached, bytes):
                return cached

            def window(data: Any) -> Float32Array:
                channels, rows, cols = _planes(data)
                w, h = min(size, cols), min(size, rows)
                x0 = min(max(0, round(cx * cols - w / 2)), cols - w)
                y0 = min(max(0, round(cy * rows - h / 2)), rows - h)
                out = np.empty((h, w, channels), dtype=np.float32)
                for c in range(channels):
                    out[:, :, c] = _rows(data, c, slice(y0, y0 + h), slice(x0, x0 + w))
                return out

            image = self._read(path, window)
            jpeg = encode(display(image, strength=strength, linked=linked), fmt)
            self.cache.put(key, jpeg)
            _trim_heap()
            return jpeg

    def _read(self, path: Path, take: Callable[[Any], Float32Array]) -> Float32Array:
        """Open ``path`` and return ``take(section)``: ``section`` reads the pixels it is
        indexed with from the file, nothing else (no memory map, no whole array)."""
        self.reads += 1
        # our own file object: closed even when astropy fails half way through a bad file
        with path.open("rb") as fh:
            try:
                with fits.open(fh, memmap=False, lazy_load_hdus=False) as hdul:
                    hdu = hdul[0]
                    if not hdu.header.get("NAXIS"):
                        raise ValueError("no image data")
                    result: Float32Array = take(hdu.section)
            except (OSError, ValueError, TypeError, IndexError, KeyError, Warning) as err:
                raise ValueError(f"{type(err).__name__}: {err}") from err
        return result


def _trim_heap() -> None:
    """Give the allocator's free memory back to the system after a render: glibc keeps the
    freed temporaries of a large render (~120 MB at 2400 px) in the thread's arena otherwise,
    and the daemon's RSS ratchets up by that much per render thread (measured: +300 MB of
    anonymous memory under looping renders, bench_hardening)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


_LIBC = _libc()


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
