"""Decode a light frame from disk into a linear float32 :class:`~nightstack.frames.Frame`.

This is the one module that imports rawpy. :func:`load` reads

- camera raws through LibRaw (rawpy): CR3, CR2, NEF, ARW, DNG, RAF, ORF, RW2, PEF, ...;
- FITS through astropy: mono, Bayer CFA (``BAYERPAT``) or 3-plane colour;
- TIFF through tifffile (assumed linear), JPEG and PNG through OpenCV (sRGB, linearised).

Every frame comes back as ``image`` (rows, cols, 3 or 1) float32 in [0, 1] (linear) and a binned
``luminance`` (rows // bin, cols // bin) float32 for star detection. Luminance pixel (u, v) is
centred on full-resolution pixel (bin * u + (bin - 1) / 2, bin * v + (bin - 1) / 2); trailing rows
and columns that do not fill a bin are dropped.

Orientation: raws are decoded with ``user_flip=0``, i.e. in sensor orientation, ignoring the
camera's orientation flag. The CFA luminance and the demosaiced image then share pixel coordinates
(checked: ``raw_image_visible.shape == rgb.shape[:2]``), and frames from one session share one
orientation even if the camera's tilt sensor flips its opinion mid-night. FITS frames are returned
with row 0 at the top (``ROWORDER = 'BOTTOM-UP'`` is flipped), JPEG/PNG ignore EXIF orientation.

Any failure to decode a file raises :class:`~nightstack.errors.DecodeError` with a one-line
reason; no other exception type escapes :func:`load` for a bad file. Invalid *arguments* (an
unknown demosaic name, ``bin < 1``) are a caller's bug and raise ``ValueError`` before the file is
touched.

Why one module of this size: every input format's way to the mosaic or frame (LibRaw raws, FITS,
TIFF, sRGB) behind one dispatcher, with the same metadata and refusals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rawpy
import tifffile
from astropy.io import fits

from nightstack.arrays import Float32Array
from nightstack.errors import DecodeError, NotMosaicError
from nightstack.formats import CAMERA_RAW_EXTENSIONS, FITS_EXTENSIONS, TIFF_EXTENSIONS
from nightstack.frames import BAYER_PATTERNS, Frame, FrameMeta, Mosaic
from nightstack.io.demosaic import METHODS, demosaic_image, mhc, mosaic_codes

log = logging.getLogger(__name__)


RAW_EXTENSIONS = frozenset(CAMERA_RAW_EXTENSIONS).union(
    {
        ".3fr", ".crw", ".dcr", ".erf", ".fff", ".iiq", ".k25", ".kdc", ".mef", ".mos", ".mrw",
        ".nrw", ".raw", ".rwl", ".sr2", ".srf", ".srw", ".x3f",
    }
)  # fmt: skip
"""Camera raw extensions handed to LibRaw (it identifies the format from the content)."""
SRGB_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
SUPPORTED_EXTENSIONS = RAW_EXTENSIONS.union(FITS_EXTENSIONS, TIFF_EXTENSIONS, SRGB_EXTENSIONS)
"""Every extension :func:`load` accepts, lowercase with the dot; compare ``path.suffix.lower()``."""

DEMOSAIC_ALGORITHMS = ("AHD", "LINEAR", "VNG", "PPG", "DCB", "DHT", "AAHD")
"""LibRaw demosaic algorithms available in every rawpy wheel (the GPL demosaic packs are not)."""
DEMOSAIC_METHODS = (*METHODS, *DEMOSAIC_ALGORITHMS)
"""Every ``demosaic`` option: OpenCV's on the mosaic (:mod:`nightstack.io.demosaic`, the pipeline's
path for Bayer sensors), or LibRaw's full postprocess (:func:`load`)."""
WHITE_BALANCE_MODES = ("camera", "daylight", "auto")

FLOAT_UNIT_LIMIT = 1.5
"""Float data whose maximum is at most this is taken as already in [0, 1] (with some overshoot
from calibration); above it, float data is assumed to be in 16-bit ADU and divided by 65535."""
ADU_16BIT = 65535.0

_MAX_REASON_CHARS = 300  # keep a library's chatter to one journal-sized line
MAX_FRAME_PIXELS = 120_000_000
"""Default limit of a frame's pixels (rows x cols) read from its header before decoding: the
largest sensors are ~100 MP; a small compressed file claiming more is a decompression bomb."""

# (offset, magic bytes, what the content is); the first match wins, so CR3 precedes generic ftyp.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"SIMPLE  =", "a FITS file"),
    (0, b"II*\x00", "a TIFF file"),
    (0, b"MM\x00*", "a TIFF file"),
    (0, b"II+\x00", "a BigTIFF file"),
    (0, b"MM\x00+", "a BigTIFF file"),
    (0, b"IIRO", "an Olympus raw"),
    (0, b"IIRS", "an Olympus raw"),
    (0, b"MMOR", "an Olympus raw"),
    (0, b"IIU\x00", "a Panasonic raw"),
    (0, b"FUJIFILMCCD-RAW", "a Fujifilm raw"),
    (4, b"ftypcrx ", "a Canon CR3 raw"),
    (4, b"ftyp", "an ISO media file (HEIF/MP4/MOV)"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"),
    (0, b"\x1f\x8b", "a gzip archive"),
    (0, b"RIFF", "a RIFF file (WebP/AVI/WAV)"),
)
_NOT_RAW = frozenset(
    {
        "a JPEG image", "a PNG image", "a FITS file", "an ISO media file (HEIF/MP4/MOV)",
        "a GIF image", "a PDF document", "a ZIP archive", "a gzip archive",
        "a RIFF file (WebP/AVI/WAV)",
    }
)  # fmt: skip
"""Contents LibRaw can never decode: reject them by name instead of a vague LibRaw error."""
_EXPECTED_CONTENT: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(FITS_EXTENSIONS, ("a FITS file",)),
    **dict.fromkeys(TIFF_EXTENSIONS, ("a TIFF file", "a BigTIFF file")),
    ".jpg": ("a JPEG image",),
    ".jpeg": ("a JPEG image",),
    ".png": ("a PNG image",),
}

_LIBRAW_REASONS = {
    "LibRawIOError": "truncated or corrupt raw data",
    "LibRawFileUnsupportedError": "unsupported raw format",
    "LibRawDataError": "corrupt raw data",
    "LibRawUnsufficientMemoryError": "not enough memory to decode the raw",
    "LibRawMemPoolOverflowError": "not enough memory to decode the raw",
    "LibRawTooBigError": "raw image too big for LibRaw",
    "LibRawBadCropError": "bad crop in the raw",
    "LibRawRequestForNonexistentImageError": "the raw holds no image",
    "LibRawCancelledByCallbackError": "raw decode cancelled",
    "NotSupportedError": "LibRaw lacks a feature this file needs",
}



def load(
    path: str | Path,
    *,
    demosaic: str = "AHD",
    white_balance: str | Sequence[float] = "camera",
    bin: int = 2,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> Frame:
    """Decode one light frame.

    Parameters
    ----------
    path
        A raw, FITS, TIFF, JPEG or PNG file (see ``SUPPORTED_EXTENSIONS``).
    demosaic
        One of :data:`nightstack.io.demosaic.METHODS` (``"mhc"``, ``"bilinear"``,
        ``"edge-aware"``): a Bayer raw or FITS is decoded to its mosaic and demosaiced by it
        (:func:`mosaic_to_frame`: linear camera RGB x white balance, the pipeline's values);
        other raws through LibRaw's AHD. Or a LibRaw algorithm (``DEMOSAIC_ALGORITHMS``) for
        LibRaw's full postprocess of a raw (sRGB primaries); a Bayer FITS, which LibRaw cannot
        read, is then demosaiced by MHC (:func:`decode_light`, the pipeline's path, refuses).
    white_balance
        Raws only: ``"camera"`` (as shot), ``"daylight"`` (the camera's daylight multipliers),
        ``"auto"`` (LibRaw's grey-world estimate), or four multipliers (R, G, B, G2), as a
        sequence or a comma-separated string.
    bin
        Luminance binning factor >= 1. With an even ``bin`` and a 2x2 Bayer sensor the luminance
        is the undemosaiced CFA averaged over bin x bin blocks (``bin=2``: the superpixel), black
        level subtracted; otherwise it is the block mean of the image's channel mean.
    max_pixels
        A frame whose header claims more pixels (rows x cols) is refused before decoding.

    Returns
    -------
    Frame
        ``image`` (rows, cols, 3 | 1) float32, linear, integer inputs scaled by their full scale
        (raws: LibRaw's 16-bit output / 65535); ``luminance`` (rows // bin, cols // bin) float32
        in the same units (raw CFA: (value - black) / (white - black)); ``meta`` from the file.

    Raises
    ------
    DecodeError
        The file cannot be decoded; ``reason`` says why in one line.
    ValueError
        An argument is invalid (checked before the file is read).
    """
    options = replace(_check_options(demosaic, white_balance, bin), max_pixels=max_pixels)
    if demosaic in METHODS and is_mosaic_source(path):
        try:
            mosaic = load_mosaic(path, white_balance=white_balance, max_pixels=max_pixels)
            return mosaic_to_frame(mosaic, demosaic, bin)
        except NotMosaicError:
            pass  # LibRaw's own demosaic
    with _decode_errors():
        return _load(Path(path), options)
    raise AssertionError("unreachable")  # pragma: no cover (mypy: the context may swallow)


def check_options(
    demosaic: str = "AHD", white_balance: str | Sequence[float] = "camera", bin: int = 2
) -> None:
    """Validate :func:`load`'s options without decoding anything; raise ``ValueError`` if bad."""
    _check_options(demosaic, white_balance, bin)


def load_mosaic(
    path: str | Path,
    *,
    white_balance: str | Sequence[float] = "camera",
    max_pixels: int = MAX_FRAME_PIXELS,
) -> Mosaic:
    """Decode one frame to its sensor mosaic, without demosaicing.

    Camera raws are unpacked by LibRaw (``raw_image_visible``: the visible area, sensor
    orientation); Bayer FITS (``BAYERPAT``, with ``XBAYROFF``/``YBAYROFF`` and ``ROWORDER``) are
    read by astropy and returned with row 0 at the top, the pattern re-phased to match.

    Parameters
    ----------
    path
        A camera raw or a 2-D FITS file with ``BAYERPAT``.
    white_balance
        ``"camera"`` (as shot; the camera's daylight multipliers if the file has none, else 1),
        ``"daylight"``, ``"auto"`` (grey world: each colour's mean over unsaturated sites made
        equal to green's) or four multipliers (R, G, B, G2). FITS frames are 1, 1, 1 unless four
        multipliers are given. The multipliers are recorded, never applied to ``data``.
    max_pixels
        A frame whose header claims more pixels (rows x cols) is refused before decoding.

    Returns
    -------
    Mosaic
        ``data`` (rows, cols) float32: raws ``(adu - black_c) / (white_c - black_c)`` per CFA
        colour c (LibRaw's per-channel black and white levels), so black is 0 and the clipping
        level 1.0, not clipped below 0; integer FITS ``value / full scale`` (16-bit: / 65535),
        float FITS as :func:`load` scales them. ``pattern`` the 2x2 tile at visible pixel (0, 0).
        A raw's mosaic is held as its visible uint16 ``adu`` with per-site ``black`` and
        ``span`` (:meth:`Mosaic.from_adu`): ``data`` is formed only when first asked for.

    Raises
    ------
    NotMosaicError
        The file decodes but is not a 2x2 Bayer mosaic (X-Trans, Foveon, 4-colour or linear
        DNG raws; mono or 3-plane FITS; TIFF, JPEG, PNG): decode it with :func:`load`.
    DecodeError
        The file cannot be decoded; ``reason`` says why in one line.
    ValueError
        ``white_balance`` is invalid (checked before the file is read).
    """
    wb = _check_options("AHD", white_balance, 2).white_balance
    with _decode_errors():
        return _load_mosaic(Path(path), wb, max_pixels)
    raise AssertionError("unreachable")  # pragma: no cover (mypy: the context may swallow)


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """The contract of the public loaders: a bad file never escapes as anything but a
    DecodeError (out of memory included)."""
    try:
        yield
    except DecodeError:
        raise
    except MemoryError as err:
        raise DecodeError("out of memory while decoding") from err
    except Exception as err:
        raise DecodeError(f"cannot decode ({_describe(err)})") from err


def mosaic_to_frame(mosaic: Mosaic, demosaic: str = "bilinear", bin: int = 2) -> Frame:
    """A mosaic demosaiced whole, as the frame store demosaics it (16-bit codes, OpenCV
    ``demosaic``, white balance): ``image`` (rows, cols, 3) float32 linear camera RGB x WB;
    ``luminance`` the superpixel mean of the mosaic for an even ``bin``. A raw's mosaic held
    as ADU is never formed as float32 (:func:`nightstack.io.demosaic.mosaic_codes`)."""
    codes, luminance = mosaic_codes(mosaic, bin if bin % 2 == 0 else None)
    image = demosaic_image(codes, mosaic.pattern, mosaic.white_balance, demosaic)
    del codes
    if luminance is None:
        luminance = _channel_mean_binned(image, bin)
    return Frame(path=mosaic.path, image=image, luminance=luminance, bin=bin, meta=mosaic.meta)


def decode_light(
    path: str | Path,
    *,
    demosaic: str = "bilinear",
    white_balance: str | Sequence[float] = "camera",
    bin: int = 2,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> Mosaic | Frame:
    """What the pipeline decodes a light to (the decoder process's default function).

    With an OpenCV ``demosaic`` (:data:`nightstack.io.demosaic.METHODS`) a Bayer raw or FITS file
    comes back as its :class:`~nightstack.frames.Mosaic` (:func:`load_mosaic`), for calibration
    and the OpenCV demosaic after it; anything else (X-Trans, Foveon, linear DNG, mono or RGB
    FITS, TIFF, JPEG, PNG) as a :class:`~nightstack.frames.Frame` from :func:`load`, raws
    through LibRaw's own demosaic (AHD). A LibRaw ``demosaic`` name always takes :func:`load`.
    Arguments and errors as for those two functions.
    """
    _check_options(demosaic, white_balance, bin)
    if demosaic in METHODS and is_mosaic_source(path):
        try:
            return load_mosaic(path, white_balance=white_balance, max_pixels=max_pixels)
        except NotMosaicError as err:
            log.debug("%s: %s; LibRaw's own demosaic", path, err.reason)
    elif Path(path).suffix.lower() in FITS_EXTENSIONS and fits_is_bayer(path):
        raise DecodeError(
            f"demosaic {demosaic!r} is LibRaw's, which cannot read a Bayer FITS: set demosaic "
            f"to one of {METHODS}"
        )
    return load(path, demosaic=demosaic, white_balance=white_balance, bin=bin,
                max_pixels=max_pixels)  # fmt: skip


def fits_is_bayer(path: str | Path) -> bool:
    """Whether a FITS file's header names a Bayer pattern (``BAYERPAT``); True when the header
    cannot be read (the loaders then give the reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = fits.getheader(path)
    except Exception:
        return True
    return bool(str(header.get("BAYERPAT", "")).strip())


def is_mosaic_source(path: str | Path) -> bool:
    """Whether :func:`load_mosaic` may read ``path`` by its extension (a raw or a FITS file);
    it can still raise :class:`~nightstack.errors.NotMosaicError` from the content."""
    ext = Path(path).suffix.lower()
    return ext in RAW_EXTENSIONS or ext in FITS_EXTENSIONS


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """Validated :func:`load` options."""

    demosaic: str
    white_balance: str | list[float]
    bin: int
    max_pixels: int = MAX_FRAME_PIXELS


def _check_options(demosaic: str, white_balance: str | Sequence[float], bin: int) -> _Options:
    algorithm = str(demosaic).upper()
    if str(demosaic) in METHODS:
        algorithm = "AHD"  # an OpenCV method asked of load(): LibRaw's own demosaic
    elif algorithm not in DEMOSAIC_ALGORITHMS:
        raise ValueError(f"demosaic must be one of {DEMOSAIC_METHODS}, not {demosaic!r}")
    if isinstance(bin, bool) or not isinstance(bin, int | np.integer) or bin < 1:
        raise ValueError(f"bin must be an integer >= 1, not {bin!r}")
    wb: str | list[float]
    if isinstance(white_balance, str) and white_balance.strip().lower() in WHITE_BALANCE_MODES:
        wb = white_balance.strip().lower()
    else:
        parts = white_balance.split(",") if isinstance(white_balance, str) else white_balance
        try:
            wb = [float(p) for p in parts]
        except (TypeError, ValueError):
            wb = []
        if len(wb) != 4 or not all(math.isfinite(m) and m > 0 for m in wb):
            raise ValueError(
                f"white_balance must be one of {WHITE_BALANCE_MODES} or four positive "
                f"multipliers, not {white_balance!r}"
            )
    return _Options(algorithm, wb, int(bin))


def _check_pixels(rows: int, cols: int, limit: int, what: str) -> None:
    """Refuse a frame whose header claims ``rows`` x ``cols`` > ``limit`` pixels (or a
    non-positive size) before any pixel is decoded."""
    if rows < 1 or cols < 1:
        raise DecodeError(f"{what} claims an empty image ({cols} x {rows})")
    if rows * cols > limit:
        raise DecodeError(
            f"{what} claims {cols} x {rows} pixels ({rows * cols / 1e6:.0f} MP), over the "
            f"limit of {limit / 1e6:.0f} MP (max_frame_pixels): not decoded"
        )


# --- dispatch --------------------------------------------------------------------------------


def _load(path: Path, options: _Options) -> Frame:
    kind, content = _identify(path)
    if kind == "raw":
        return _load_raw(path, content, options)
    if kind == "fits":
        return _load_fits(path, options.bin, options.max_pixels)
    if kind == "tiff":
        return _load_tiff(path, options.bin, options.max_pixels)
    return _load_srgb(path, options.bin)


def _load_mosaic(path: Path, white_balance: str | list[float], max_pixels: int) -> Mosaic:
    kind, content = _identify(path)
    if kind == "raw":
        return _mosaic_raw(path, content, white_balance, max_pixels)
    if kind == "fits":
        return _mosaic_fits(path, white_balance, max_pixels)
    raise NotMosaicError(f"a {path.suffix[1:].upper()} file holds no sensor mosaic")


def _identify(path: Path) -> tuple[str, str | None]:
    """The one format dispatcher of :func:`load` and :func:`load_mosaic`: ``(kind, content)``,
    kind ``"raw"``, ``"fits"``, ``"tiff"`` or ``"srgb"`` by the extension, content what the
    leading bytes say (:func:`_sniff`). DecodeError for a missing, unreadable or empty file, an
    unsupported extension, or content the extension cannot hold (a raw's content is left to
    LibRaw unless it is something LibRaw never reads)."""
    head = _read_head(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        shown = f"'{path.suffix}'" if path.suffix else "(none)"
        raise DecodeError(f"unsupported file extension {shown}")
    content = _sniff(head)
    if ext in RAW_EXTENSIONS:
        if content in _NOT_RAW:
            raise DecodeError(
                f"file content is {content}, not a {ext[1:].upper()} raw (wrong extension?)"
            )
        return "raw", content
    expected = _EXPECTED_CONTENT[ext]
    if content not in expected:
        found = content or "not recognised as any image format"
        raise DecodeError(f"not {expected[0]}: content is {found}")
    if ext in FITS_EXTENSIONS:
        return "fits", content
    return ("tiff" if ext in TIFF_EXTENSIONS else "srgb"), content


def _read_head(path: Path) -> bytes:
    """The first bytes of the file; DecodeError for missing, unreadable or empty files."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except FileNotFoundError as err:
        raise DecodeError("file not found") from err
    except PermissionError as err:
        raise DecodeError("cannot read file: permission denied") from err
    except IsADirectoryError as err:
        raise DecodeError("not a file but a directory") from err
    except OSError as err:
        raise DecodeError(f"cannot read file ({_describe(err)})") from err
    if not head:
        raise DecodeError("empty file (0 bytes)")
    return head


def _sniff(head: bytes) -> str | None:
    """What the leading bytes say the file is, e.g. ``"a JPEG image"``; None if unknown."""
    for offset, magic, what in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return what
    return None


# --- camera raws (LibRaw) --------------------------------------------------------------------


def _load_raw(path: Path, content: str | None, options: _Options) -> Frame:
    params: dict[str, Any] = {
        "gamma": (1, 1),
        "no_auto_bright": True,
        # LibRaw otherwise takes a frame's brightest pixel for white when it lies above 0.75 of
        # the white level: a hazy frame without a saturated star would decode up to 1.33x too
        # bright, and its sky level and transparency with it
        "adjust_maximum_thr": 0.0,
        "output_bps": 16,
        "user_flip": 0,  # sensor orientation: CFA luminance and RGB share coordinates
        "demosaic_algorithm": rawpy.DemosaicAlgorithm[options.demosaic],
    }
    if options.white_balance == "camera":
        params["use_camera_wb"] = True
    elif options.white_balance == "auto":
        params["use_auto_wb"] = True
    elif isinstance(options.white_balance, list):
        params["user_wb"] = options.white_balance
    luminance: Float32Array | None = None
    try:
        with _libraw_name(path) as name, rawpy.imread(name) as raw:
            _check_raw_size(raw, options.max_pixels)  # opened, not unpacked yet
            cfa = raw.raw_image_visible  # a view into LibRaw's buffer: use before close
            pattern = raw.raw_pattern
            cfa_shape = None if cfa is None else tuple(cfa.shape[:2])
            if (
                cfa is not None
                and cfa.ndim == 2
                and pattern is not None
                and pattern.shape == (2, 2)
                and options.bin % 2 == 0
            ):
                black_per_colour = np.asarray(raw.black_level_per_channel, np.float64)
                black = float(black_per_colour[pattern.ravel()].mean())
                span = max(float(raw.white_level) - black, 1.0)
                luminance = _block_mean(cfa, options.bin)
                luminance -= np.float32(black)
                luminance *= np.float32(1.0 / span)
            rgb16 = raw.postprocess(**params)
            meta = _raw_meta(raw.other, path, content)
    except (rawpy.LibRawError, rawpy.NotSupportedError) as err:
        what = _LIBRAW_REASONS.get(type(err).__name__, "LibRaw could not decode the file")
        hint = "" if content else "; content not recognised as any image format"
        raise DecodeError(f"{what} ({_describe(err)}){hint}") from err
    if cfa_shape is not None and cfa_shape != tuple(rgb16.shape[:2]):
        raise DecodeError(
            f"raw shape mismatch: sensor {cfa_shape} but LibRaw output {rgb16.shape[:2]} "
            "(rotated or non-square-pixel sensors are not supported)"
        )
    image = np.divide(rgb16, np.float32(ADU_16BIT), dtype=np.float32)
    del rgb16
    if luminance is None:
        luminance = _channel_mean_binned(image, options.bin)
    return Frame(path=path, image=image, luminance=luminance, bin=options.bin, meta=meta)


def _check_raw_size(raw: Any, limit: int) -> None:
    """The raw's sensor size from LibRaw's header parse (``open_file``), before ``unpack``."""
    sizes = raw.sizes
    _check_pixels(int(sizes.raw_height), int(sizes.raw_width), limit, "the raw")


def _mosaic_raw(
    path: Path, content: str | None, white_balance: str | list[float], max_pixels: int
) -> Mosaic:
    """The raw's visible ADU (LibRaw's own buffer, 2 bytes a pixel, not copied) with each 2x2
    site's black level and span; its float32 values are formed only when asked for."""
    try:
        with _libraw_name(path) as name, contextlib.ExitStack() as on_failure:
            raw = rawpy.imread(name)
            on_failure.callback(raw.close)
            _check_raw_size(raw, max_pixels)  # opened, not unpacked yet
            pattern, sites = _raw_bayer(raw)
            # A view into LibRaw's buffer. Its numpy base is `raw`, which the view keeps alive
            # (LibRaw's memory is freed when the last view goes), so `raw` is closed only on
            # failure: no copy of the frame, and none alive beside LibRaw's in the decoder.
            adu = raw.raw_image_visible
            black = [float(b) for b in raw.black_level_per_channel]
            whites = raw.camera_white_level_per_channel
            white_level = float(raw.white_level)
            site_black, site_span = [], []
            for site in ((0, 0), (0, 1), (1, 0), (1, 1)):  # the order of frames.SiteLevels
                colour = sites[site]
                white = float(whites[colour]) if whites and whites[colour] > 0 else white_level
                site_black.append(black[colour])
                site_span.append(max(white - black[colour], 1.0))
            camera_wb = _wb_rgb(raw.camera_whitebalance, sites, raw.color_desc)
            daylight_wb = _wb_rgb(raw.daylight_whitebalance, sites, raw.color_desc)
            meta = _raw_meta(raw.other, path, content)
            on_failure.pop_all()
    except (rawpy.LibRawError, rawpy.NotSupportedError) as err:
        what = _LIBRAW_REASONS.get(type(err).__name__, "LibRaw could not decode the file")
        hint = "" if content else "; content not recognised as any image format"
        raise DecodeError(f"{what} ({_describe(err)}){hint}") from err
    b0, b1, b2, b3 = site_black
    s0, s1, s2, s3 = site_span
    levels = ((b0, b1, b2, b3), (s0, s1, s2, s3))
    if isinstance(white_balance, list):
        wb = _user_wb(white_balance)
    elif white_balance == "daylight":
        wb = daylight_wb or (1.0, 1.0, 1.0)
    elif white_balance == "auto":
        wb = _grey_world(Mosaic.from_adu(path, adu, *levels, pattern), 1.0)
    else:
        wb = camera_wb or daylight_wb or (1.0, 1.0, 1.0)
    return Mosaic.from_adu(path, adu, *levels, pattern, wb, 1.0, meta)


def _raw_bayer(raw: Any) -> tuple[str, dict[tuple[int, int], int]]:
    """The visible area's Bayer pattern and LibRaw colour index of each 2x2 site (dy, dx);
    NotMosaicError for sensors that are not a 2x2 R/G/B Bayer mosaic."""
    visible = raw.raw_image_visible
    desc = raw.color_desc.decode("ascii", "replace") if raw.color_desc else ""
    if raw.raw_type != rawpy.RawType.Flat or visible is None or visible.ndim != 2:
        raise NotMosaicError("the raw holds no colour filter mosaic (linear DNG or Foveon)")
    pattern_shape = None if raw.raw_pattern is None else tuple(raw.raw_pattern.shape)
    if pattern_shape != (2, 2):
        kind = "X-Trans 6x6" if pattern_shape == (6, 6) else f"{pattern_shape}"
        raise NotMosaicError(f"the sensor's colour filter array is {kind}, not 2x2 Bayer")
    if visible.shape[0] < 2 or visible.shape[1] < 2:
        raise DecodeError(f"raw visible area {visible.shape} is too small")
    # the visible area's first 2x2 colours from the pattern and the margins, as rawpy's
    # raw_colors_visible crops them out of the pattern tiled over the whole raw (which tiles 24
    # MB at 24 MP for four values: 20-300 ms a decode, measured)
    pattern_2x2, sizes = np.asarray(raw.raw_pattern), raw.sizes
    sites = {
        (dy, dx): int(pattern_2x2[(dy + sizes.top_margin) % 2, (dx + sizes.left_margin) % 2])
        for dy in (0, 1)
        for dx in (0, 1)
    }
    try:
        pattern = "".join(desc[sites[(dy, dx)]] for dy in (0, 1) for dx in (0, 1))
    except IndexError:
        pattern = ""
    if pattern not in BAYER_PATTERNS:
        raise NotMosaicError(f"the sensor's 2x2 filter is {pattern or desc!r}, not R/G/B Bayer")
    return pattern, sites


def _wb_rgb(
    multipliers: Sequence[float] | None, sites: dict[tuple[int, int], int], desc: bytes
) -> tuple[float, float, float] | None:
    """LibRaw multipliers per colour index -> (r, g, b) with green 1; None if absent or bad."""
    if multipliers is None:
        return None
    letters = desc.decode("ascii", "replace")
    values: dict[str, float] = {}
    for colour in sorted(set(sites.values())):
        m = float(multipliers[colour]) if colour < len(multipliers) else 0.0
        if math.isfinite(m) and m > 0:
            values.setdefault(letters[colour], m)
    if not all(c in values for c in "RGB"):
        return None
    return (values["R"] / values["G"], 1.0, values["B"] / values["G"])


def _user_wb(multipliers: list[float]) -> tuple[float, float, float]:
    """Four user multipliers (R, G, B, G2) -> (r, g, b) with green 1."""
    r, g, b, _ = multipliers
    return (r / g, 1.0, b / g)


def _grey_world(mosaic: Mosaic, saturation: float) -> tuple[float, float, float]:
    """(r, g, b) that make each colour's mean over unsaturated sites equal to green's."""
    means: dict[str, list[float]] = {"R": [], "G": [], "B": []}
    for i, colour in enumerate(mosaic.pattern):
        plane = _sample_sites(mosaic, i // 2, i % 2)
        good = plane[plane < saturation]
        means[colour].append(float(good.mean()) if good.size else 0.0)
    red, green, blue = (float(np.mean(means[c])) for c in "RGB")
    if min(red, green, blue) <= 0:
        return (1.0, 1.0, 1.0)
    return (green / red, 1.0, green / blue)


def _sample_sites(mosaic: Mosaic, dy: int, dx: int) -> Float32Array:
    """Every 4th site (dy, dx) of the mosaic in each direction (plenty for a mean, 16x less),
    its ``data`` values, computed from the ADU alone when the mosaic holds ADU."""
    if mosaic.has_data or mosaic.adu is None or mosaic.black is None or mosaic.span is None:
        return np.asarray(mosaic.data[dy::8, dx::8], np.float32)
    site = 2 * dy + dx
    plane = np.subtract(mosaic.adu[dy::8, dx::8], np.float32(mosaic.black[site]), dtype=np.float32)
    plane /= np.float32(mosaic.span[site])
    return plane


@contextlib.contextmanager
def _libraw_name(path: Path) -> Iterator[str]:
    """A name LibRaw can open for ``path``. rawpy encodes names as strict UTF-8, so a name that
    is not (bytes from a card written by another system) is opened here and handed over as
    ``/proc/self/fd/N``."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield name
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _raw_meta(other: Any, path: Path, content: str | None) -> FrameMeta:
    """Exposure, ISO and time from LibRaw; camera make/model from TIFF tags where cheap."""
    exposure = float(other.shutter_speed) if other.shutter_speed > 0 else None
    iso = float(other.iso_speed) if other.iso_speed > 0 else None
    # LibRaw reads the EXIF wall-clock time (which has no zone) as this machine's local time and
    # rawpy hands it back as a naive local datetime; .timestamp() recovers LibRaw's epoch seconds.
    # 0 means the file has no time. Returned as an aware UTC datetime, comparable with FITS times.
    capture_time = None
    try:
        epoch = other.timestamp.timestamp()
        if epoch > 0:
            capture_time = datetime.fromtimestamp(epoch, tz=UTC)
    except (OverflowError, OSError, ValueError):
        capture_time = None
    camera, temperature = None, None
    if content in ("a TIFF file", "a BigTIFF file"):
        camera, temperature = _tiff_camera(path)
    return FrameMeta(
        exposure_s=exposure,
        iso=iso,
        capture_time=capture_time,
        camera=camera,
        temperature_c=temperature,
    )


def _tiff_camera(path: Path) -> tuple[str | None, float | None]:
    """The camera ("Make Model") from IFD0 of a TIFF-based raw (DNG, CR2, NEF, ARW) and the EXIF
    ``Temperature`` (0x9400, Celsius) where the file has it; None where not."""
    temperature = None
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
            make = _tag_text(tags.get("Make"))
            model = _tag_text(tags.get("Model")) or _tag_text(tags.get("UniqueCameraModel"))
            exif = tags.get("ExifTag")
            value = exif.value.get("Temperature") if exif is not None else None
            if isinstance(value, tuple) and len(value) == 2 and value[1]:
                value = value[0] / value[1]  # an EXIF SRATIONAL
            if isinstance(value, int | float) and math.isfinite(value):
                temperature = float(value)
    except Exception:  # metadata is a nicety: never fail a decodable raw over it
        return None, None
    if make and model and not model.lower().startswith(make.lower().split()[0]):
        return f"{make} {model}", temperature
    return model or make or None, temperature


def _tag_text(tag: Any) -> str:
    if tag is None:
        return ""
    value = tag.value
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return " ".join(str(value).replace("\x00", " ").split())


# --- FITS ------------------------------------------------------------------------------------


def _load_fits(path: Path, bin: int, max_pixels: int) -> Frame:
    data, header = _read_fits(path, max_pixels)
    bottom_up = str(header.get("ROWORDER", "")).strip().upper() == "BOTTOM-UP"
    bayer = str(header.get("BAYERPAT", "")).strip().upper()
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2 and bayer:
        pattern = _fits_pattern(header, bayer)
        image, luminance = _debayer_fits(data, pattern, bin, bottom_up)
    elif data.ndim == 2 or (data.ndim == 3 and data.shape[0] == 3):
        planes = data[:, :, np.newaxis] if data.ndim == 2 else np.moveaxis(data, 0, -1)
        image = _unit_image(planes[::-1] if bottom_up else planes)
        luminance = _channel_mean_binned(image, bin)
    else:
        raise DecodeError(f"unsupported FITS image shape {data.shape} (want 2-D or 3 planes)")
    return Frame(path=path, image=image, luminance=luminance, bin=bin, meta=_fits_meta(header))


def _mosaic_fits(path: Path, white_balance: str | list[float], max_pixels: int) -> Mosaic:
    data, header = _read_fits(path, max_pixels)
    bayer = str(header.get("BAYERPAT", "")).strip().upper()
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2 or not bayer:
        kind = "a mono image" if data.ndim == 2 else f"an image of shape {data.shape}"
        raise NotMosaicError(f"the FITS file holds {kind}, not a Bayer mosaic (no BAYERPAT)")
    if data.shape[0] < 2 or data.shape[1] < 2:
        raise DecodeError(f"FITS image {data.shape} is too small for a Bayer mosaic")
    pattern = _fits_pattern(header, bayer)
    if str(header.get("ROWORDER", "")).strip().upper() == "BOTTOM-UP":
        data = data[::-1]
        pattern = _shift_pattern(pattern, 0, data.shape[0] - 1)
    saturation = 1.0 if data.dtype.kind in "ui" else math.inf  # float data: clipping unknown
    mosaic = _unit_image(data[:, :, np.newaxis])[:, :, 0]
    if isinstance(white_balance, list):
        wb = _user_wb(white_balance)
    elif white_balance == "auto":
        wb = _grey_world(Mosaic(path, mosaic, pattern), saturation)
    else:
        wb = (1.0, 1.0, 1.0)  # a FITS header states no white balance
    return Mosaic(
        path=path,
        data=mosaic,
        pattern=pattern,
        white_balance=wb,
        saturation=saturation,
        meta=_fits_meta(header),
    )


def _fits_pattern(header: Any, bayer: str) -> str:
    """The Bayer pattern at stored pixel (0, 0): ``BAYERPAT`` shifted by X/YBAYROFF."""
    if bayer not in BAYER_PATTERNS:
        raise DecodeError(f"unsupported FITS Bayer pattern BAYERPAT='{bayer}'")
    return _shift_pattern(bayer, _int_card(header, "XBAYROFF"), _int_card(header, "YBAYROFF"))


def _read_fits(path: Path, max_pixels: int) -> tuple[np.ndarray, Any]:
    """The first image HDU's data (native byte order) and a copy of its header; its size
    (``NAXISn``, or ``ZNAXISn`` of a tile-compressed image) checked before its data is read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                hdu = next(
                    (
                        h for h in hdul
                        if h.is_image and _fits_size_ok(h, max_pixels) and h.data is not None
                        and h.data.ndim >= 2
                    ),
                    None,
                )  # fmt: skip
                if hdu is None:
                    raise DecodeError("FITS file holds no image data")
                data = np.asarray(hdu.data)
                data = data.astype(data.dtype.newbyteorder("="), copy=False)  # OpenCV: native
                header = hdu.header.copy()
        except DecodeError:
            raise
        except Exception as err:
            notes = [_warning_text(w.message) for w in caught]
            what = "truncated" if any("truncated" in n for n in notes) else "corrupt"
            reason = "; ".join([f"{what} FITS file ({_describe(err)})", *notes])
            raise DecodeError(reason[:_MAX_REASON_CHARS]) from err
    for w in caught:
        if "truncated" in str(w.message):
            raise DecodeError(f"truncated FITS file; {_warning_text(w.message)}")
        log.debug("%s: astropy: %s", path, _warning_text(w.message))
    return data, header


def _fits_size_ok(hdu: Any, max_pixels: int) -> bool:
    """Whether an image HDU's header claims at most ``max_pixels`` per plane (DecodeError if
    not): ``ZNAXISn`` of a tile-compressed image (its true size), else ``NAXISn``. An HDU with
    fewer than two axes is not a frame (False)."""
    header = getattr(hdu, "_header", hdu.header)  # a compressed HDU's own cards: ZNAXISn
    prefix = "ZNAXIS" if "ZNAXIS" in header else "NAXIS"
    axes = [_int_card(header, f"{prefix}{k}") for k in range(1, _int_card(header, prefix) + 1)]
    if len(axes) < 2:
        return False
    _check_pixels(axes[1], axes[0], max_pixels, "the FITS image")
    return True


def _shift_pattern(pattern: str, x_offset: int, y_offset: int) -> str:
    """The Bayer pattern seen from pixel (0, 0) when the CFA starts at (x_offset, y_offset)."""
    grid = [pattern[0:2], pattern[2:4]]
    return "".join(grid[(r + y_offset) % 2][(c + x_offset) % 2] for r in (0, 1) for c in (0, 1))


def _debayer_fits(
    cfa: np.ndarray, pattern: str, bin: int, bottom_up: bool
) -> tuple[Float32Array, Float32Array]:
    """Demosaic a 2-D CFA (stored orientation) by Malvar-He-Cutler, as the mosaic path's default
    does (:func:`nightstack.io.demosaic.mhc`, in float32: no codes), then flip rows if the file is
    bottom-up."""
    full_scale = np.float32(_full_scale(cfa))
    rgb = mhc(np.nan_to_num(cfa.astype(np.float32)), pattern)
    rows = slice(None, None, -1) if bottom_up else slice(None)
    image = np.divide(rgb[rows], full_scale, dtype=np.float32, order="C")
    del rgb
    if bin % 2 == 0:
        plane = cfa[rows] if cfa.dtype.kind in "ui" else np.nan_to_num(cfa[rows])
        luminance = _block_mean(plane, bin)
        luminance /= full_scale
    else:
        luminance = _channel_mean_binned(image, bin)
    return image, luminance


def _fits_meta(header: Any) -> FrameMeta:
    exposure = _float_card(header, "EXPTIME", "EXPOSURE")
    iso = _float_card(header, "GAIN", "ISOSPEED")
    camera = None
    for key in ("INSTRUME", "CAMERA"):
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            camera = value.strip()
            break
    return FrameMeta(
        exposure_s=exposure,
        iso=iso,
        capture_time=_fits_time(header.get("DATE-OBS")),
        camera=camera,
        temperature_c=_float_card(header, "CCD-TEMP", "CCD_TEMP", "SENSTEMP", "TEMPERAT"),
        filter=_text_card(header, "FILTER"),
    )


def _fits_time(value: Any) -> datetime | None:
    """DATE-OBS (ISO 8601, UTC by the FITS standard unless it states a zone) -> aware datetime."""
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _text_card(header: Any, key: str) -> str | None:
    """A card's text, stripped; None where missing or blank."""
    value = header.get(key)
    return (value.strip() or None) if isinstance(value, str) else None


def _float_card(header: Any, *keys: str) -> float | None:
    for key in keys:
        try:
            value = float(header[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return None


def _int_card(header: Any, key: str) -> int:
    value = _float_card(header, key)
    return 0 if value is None else round(value)


def _warning_text(message: Warning | str) -> str:
    """The informative lines of an astropy warning (drop its 'Error validating header' preface)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Error validating header")]
    return " ".join(useful or lines)


# --- TIFF, JPEG, PNG -------------------------------------------------------------------------


def _load_tiff(path: Path, bin: int, max_pixels: int) -> Frame:
    """A linear TIFF (8/16/32-bit integer or float, mono or RGB); first page only, its size
    (``ImageLength`` x ``ImageWidth``) checked before its strips are decoded."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            _check_pixels(int(page.imagelength), int(page.imagewidth), max_pixels, "the TIFF")
            photometric = int(page.photometric)
            separate = int(page.planarconfig) == int(tifffile.PLANARCONFIG.SEPARATE)
            data = page.asarray()
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(f"corrupt TIFF file ({_describe(err)})") from err
    if photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
        try:
            name = tifffile.PHOTOMETRIC(photometric).name
        except ValueError:
            name = str(photometric)
        raise DecodeError(f"unsupported TIFF photometric {name} (want grey or RGB)")
    if data.ndim == 3 and separate:
        data = np.moveaxis(data, 0, -1)
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim != 3:
        raise DecodeError(f"unsupported TIFF shape {data.shape}")
    channels = 3 if photometric == tifffile.PHOTOMETRIC.RGB else 1
    if data.shape[2] < channels:
        raise DecodeError(f"TIFF has {data.shape[2]} samples per pixel, RGB needs 3")
    image = _unit_image(data[:, :, :channels])  # extra samples (alpha) dropped
    return Frame(path=path, image=image, luminance=_channel_mean_binned(image, bin), bin=bin)


def _load_srgb(path: Path, bin: int) -> Frame:
    """JPEG or PNG, 8 or 16 bit: decoded by OpenCV and linearised with the sRGB transfer curve.

    These files are display-referred, so the sRGB curve is the best available guess at linear
    light; a camera's own tone curve on top of it is not undone.
    """
    try:
        encoded = np.fromfile(path, dtype=np.uint8)
        bgr = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    except Exception as err:
        raise DecodeError(f"cannot decode image ({_describe(err)})") from err
    if bgr is None:
        raise DecodeError("OpenCV could not decode the image (corrupt or truncated?)")
    if bgr.dtype not in (np.uint8, np.uint16):
        raise DecodeError(f"unsupported image sample type {bgr.dtype}")
    if bgr.ndim == 2:
        codes = bgr[:, :, np.newaxis]
    elif bgr.shape[2] == 2:  # grey + alpha
        codes = bgr[:, :, :1]
    else:  # BGR or BGRA -> RGB
        codes = bgr[:, :, 2::-1]
    image = _srgb_to_linear_lut(bgr.dtype)[codes]
    return Frame(path=path, image=image, luminance=_channel_mean_binned(image, bin), bin=bin)


@lru_cache(maxsize=2)
def _srgb_to_linear_lut(dtype: np.dtype[Any]) -> Float32Array:
    """Lookup table code -> linear value for the sRGB transfer function (IEC 61966-2-1)."""
    codes = np.arange(int(np.iinfo(dtype).max) + 1, dtype=np.float64)
    encoded = codes / codes[-1]
    linear = np.where(encoded <= 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)
    return linear.astype(np.float32)


# --- shared array helpers --------------------------------------------------------------------


def _full_scale(data: np.ndarray) -> float:
    """The value that ``data`` is divided by to reach the [0, 1] convention.

    Integers: the full scale of their width (8-bit 255, 16-bit 65535, 32-bit 2**32 - 1, whether
    signed or not). Floats: 1 if the finite maximum is <= ``FLOAT_UNIT_LIMIT``, else 65535.
    """
    if data.dtype.kind in "ui":
        return float(2 ** (8 * data.dtype.itemsize) - 1)
    if data.dtype.kind == "f":
        finite_max = float(np.nanmax(data, initial=0.0)) if data.size else 0.0
        if not math.isfinite(finite_max):
            finite_max = float(np.max(data[np.isfinite(data)], initial=0.0))
        return 1.0 if finite_max <= FLOAT_UNIT_LIMIT else ADU_16BIT
    raise DecodeError(f"unsupported sample type {data.dtype}")


def _unit_image(data: np.ndarray) -> Float32Array:
    """(rows, cols, channels) of any numeric type -> C-contiguous float32 scaled to [0, 1];
    non-finite samples become 0."""
    # A true division (not a multiply by the reciprocal): k / 65535 exactly rounded.
    image = np.divide(data, np.float32(_full_scale(data)), dtype=np.float32, order="C")
    if data.dtype.kind == "f":
        np.nan_to_num(image, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return image


def _block_mean(plane: np.ndarray, bin: int) -> Float32Array:
    """Mean over bin x bin blocks of a 2-D array -> (rows // bin, cols // bin) float32.

    The trailing rows/cols that do not fill a block are dropped, so block (u, v) covers
    full-resolution rows bin*u .. bin*u + bin - 1 and is centred on bin*u + (bin - 1) / 2.
    """
    rows, cols = plane.shape[0] // bin, plane.shape[1] // bin
    cropped = plane[: rows * bin, : cols * bin].astype(np.float32)
    if bin == 1 or cropped.size == 0:  # OpenCV refuses empty input
        return cropped.reshape(rows, cols)
    # INTER_AREA with an integer factor is the exact block mean, and several times faster
    # than a numpy reshape-mean.
    return np.asarray(cv2.resize(cropped, (cols, rows), interpolation=cv2.INTER_AREA), np.float32)


def _channel_mean_binned(image: Float32Array, bin: int) -> Float32Array:
    """Block mean of the channel mean of a (rows, cols, channels) float32 image."""
    channels = image.shape[2]
    total = image[:, :, 0].copy() if channels > 1 else image[:, :, 0]
    for c in range(1, channels):
        total += image[:, :, c]
    luminance = _block_mean(total, bin)
    if channels > 1:
        luminance *= np.float32(1.0 / channels)
    return luminance


def _describe(err: BaseException) -> str:
    """``ClassName: message`` on one line; LibRaw's byte-string messages decoded."""
    detail = err.args[0] if len(err.args) == 1 else (str(err) if err.args else "")
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    text = " ".join(str(detail).split())
    out = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return out[:_MAX_REASON_CHARS]
