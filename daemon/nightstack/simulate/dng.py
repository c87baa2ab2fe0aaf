"""A minimal DNG writer: one uncompressed CFA image that LibRaw (rawpy) decodes exactly.

Hand-built rather than through tifffile because LibRaw reads ISO only from a real EXIF
sub-IFD, which tifffile's extra tags cannot create. Part of the simulator
(``nightstack.simulate``): the daemon reads DNGs through LibRaw and never writes one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import numpy.typing as npt

_BYTE, _ASCII, _SHORT, _LONG, _RATIONAL, _UNDEFINED, _SRATIONAL = 1, 2, 3, 4, 5, 7, 10
_TIFF_FORMAT = {
    _BYTE: "B",
    _ASCII: "B",
    _SHORT: "H",
    _LONG: "I",
    _RATIONAL: "I",
    _UNDEFINED: "B",
    _SRATIONAL: "i",
}
_CFA_PHOTOMETRIC = 32803  # PhotometricInterpretation "Color Filter Array" (TIFF/EP, DNG)
_D65 = 21  # EXIF LightSource code for D65, the illuminant of ColorMatrix1
_MATRIX_DENOMINATOR = 10_000  # SRATIONAL denominator: 4 decimals are plenty for a colour matrix
_RATIONAL_MAX_DENOMINATOR = 1_000_000  # exposure times down to 1 microsecond stay exact
_PIXEL_DATA_ALIGN = 16  # start the strip on a 16-byte boundary (cheap, friendly to readers)
_CFA_COLOURS = "RGB"  # TIFF/EP CFAPattern colour codes 0, 1, 2, as in CFAPlaneColor below
CFA_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")  # the 2x2 Bayer tiles this writer accepts

# XYZ (D65) -> linear sRGB: as DNG ColorMatrix1 (XYZ -> camera) it makes the simulated camera's
# RGB equal linear sRGB, so LibRaw's camera -> sRGB matrix is the identity and grey stays grey.
_XYZ_TO_SRGB = (
    (3.2404542, -1.5371385, -0.4985314),
    (-0.9692660, 1.8760108, 0.0415560),
    (0.0556434, -0.2040259, 1.0572252),
)


@dataclass(frozen=True)
class _Tag:
    """One TIFF directory entry; rationals are flattened (num, den, num, den, ...)."""

    code: int
    kind: int
    values: tuple[int, ...]

    @property
    def count(self) -> int:
        rational = self.kind in (_RATIONAL, _SRATIONAL)
        return len(self.values) // 2 if rational else len(self.values)

    def payload(self) -> bytes:
        return struct.pack(f"<{len(self.values)}{_TIFF_FORMAT[self.kind]}", *self.values)


def _ascii(code: int, text: str) -> _Tag:
    return _Tag(code, _ASCII, tuple(text.encode("ascii", "replace") + b"\0"))


def _rationals(code: int, values: Iterable[float], *, signed: bool = False) -> _Tag:
    flat: list[int] = []
    for value in values:
        if signed:
            flat += [round(value * _MATRIX_DENOMINATOR), _MATRIX_DENOMINATOR]
        else:
            fraction = Fraction(value).limit_denominator(_RATIONAL_MAX_DENOMINATOR)
            flat += [fraction.numerator, fraction.denominator]
    return _Tag(code, _SRATIONAL if signed else _RATIONAL, tuple(flat))


def _even(n: int) -> int:
    return n + (n & 1)


def _ifd_size(tags: list[_Tag]) -> int:
    """Bytes of a directory plus its out-of-line values (each padded to an even length)."""
    data = sum(_even(len(t.payload())) for t in tags if len(t.payload()) > 4)
    return 2 + 12 * len(tags) + 4 + data


def _pack_ifd(tags: list[_Tag], offset: int) -> bytes:
    """A little-endian IFD at file ``offset``, values that do not fit inline right after it."""
    tags = sorted(tags, key=lambda t: t.code)
    data_offset = offset + 2 + 12 * len(tags) + 4
    entries = [struct.pack("<H", len(tags))]
    data: list[bytes] = []
    for tag in tags:
        payload = tag.payload()
        if len(payload) <= 4:
            value = payload.ljust(4, b"\0")
        else:
            value = struct.pack("<I", data_offset)
            padded = payload.ljust(_even(len(payload)), b"\0")
            data.append(padded)
            data_offset += len(padded)
        entries.append(struct.pack("<HHI", tag.code, tag.kind, tag.count) + value)
    entries.append(struct.pack("<I", 0))  # no next IFD
    return b"".join(entries + data)


def _dng_tags(
    rows: int,
    cols: int,
    *,
    black_level: int,
    white_level: int,
    make: str,
    model: str,
    capture_time: datetime | None,
    as_shot_neutral: tuple[float, float, float],
    cfa_pattern: str,
    strip_offset: int,
    exif_offset: int,
) -> list[_Tag]:
    tags = [
        _Tag(254, _LONG, (0,)),  # NewSubfileType: the main (full-resolution) image
        _Tag(256, _LONG, (cols,)),
        _Tag(257, _LONG, (rows,)),
        _Tag(258, _SHORT, (16,)),  # BitsPerSample
        _Tag(259, _SHORT, (1,)),  # Compression: none
        _Tag(262, _SHORT, (_CFA_PHOTOMETRIC,)),
        _ascii(271, make),
        _ascii(272, model),
        _Tag(273, _LONG, (strip_offset,)),  # StripOffsets: one strip
        _Tag(274, _SHORT, (1,)),  # Orientation: row 0 at the top, column 0 on the left
        _Tag(277, _SHORT, (1,)),  # SamplesPerPixel
        _Tag(278, _LONG, (rows,)),  # RowsPerStrip
        _Tag(279, _LONG, (rows * cols * 2,)),  # StripByteCounts
        _Tag(284, _SHORT, (1,)),  # PlanarConfiguration: chunky
        _ascii(305, "nightstack simulate"),
        _Tag(33421, _SHORT, (2, 2)),  # CFARepeatPatternDim
        _Tag(33422, _BYTE, tuple(_CFA_COLOURS.index(c) for c in cfa_pattern)),  # CFAPattern
        _Tag(34665, _LONG, (exif_offset,)),  # ExifIFD
        _Tag(50706, _BYTE, (1, 4, 0, 0)),  # DNGVersion
        _Tag(50707, _BYTE, (1, 4, 0, 0)),  # DNGBackwardVersion
        _ascii(50708, f"{make} {model}"),  # UniqueCameraModel
        _Tag(50710, _BYTE, (0, 1, 2)),  # CFAPlaneColor: R G B
        _Tag(50711, _SHORT, (1,)),  # CFALayout: rectangular
        _Tag(50713, _SHORT, (1, 1)),  # BlackLevelRepeatDim: one level for every site
        _Tag(50714, _LONG, (black_level,)),
        _Tag(50717, _LONG, (white_level,)),
        _rationals(50721, [v for row in _XYZ_TO_SRGB for v in row], signed=True),  # ColorMatrix1
        _rationals(50728, as_shot_neutral),  # AsShotNeutral: defines the camera white balance
        _Tag(50778, _SHORT, (_D65,)),  # CalibrationIlluminant1
    ]
    if capture_time is not None:
        tags.append(_ascii(306, capture_time.strftime("%Y:%m:%d %H:%M:%S")))  # DateTime
    return tags


def _exif_tags(
    exposure_s: float | None,
    iso: float | None,
    capture_time: datetime | None,
    temperature_c: float | None = None,
) -> list[_Tag]:
    tags = [_Tag(36864, _UNDEFINED, tuple(b"0231"))]  # ExifVersion
    if exposure_s is not None:
        tags.append(_rationals(33434, [exposure_s]))  # ExposureTime
    if iso is not None:
        tags.append(_Tag(34855, _SHORT, (min(max(round(iso), 1), 65535),)))  # ISOSpeedRatings
    if capture_time is not None:
        tags.append(_ascii(36867, capture_time.strftime("%Y:%m:%d %H:%M:%S")))  # DateTimeOriginal
    if temperature_c is not None:
        tags.append(_rationals(37888, [temperature_c], signed=True))  # EXIF 2.31 Temperature
    return tags


def write_dng(
    path: str | os.PathLike[str],
    cfa: npt.ArrayLike,
    *,
    black_level: int = 512,
    white_level: int = 16383,
    exposure_s: float | None = None,
    iso: float | None = None,
    capture_time: datetime | None = None,
    make: str = "nightstack",
    model: str = "Simulated Camera",
    as_shot_neutral: tuple[float, float, float] = (1.0, 1.0, 1.0),
    cfa_pattern: str = "RGGB",
    temperature_c: float | None = None,
) -> Path:
    """Write a Bayer mosaic as an uncompressed little-endian DNG that LibRaw (rawpy) decodes.

    Parameters
    ----------
    path
        Destination. The file is opened once, written and closed: it is complete when the
        handle closes (no temporary name, so a folder watcher sees one close-after-write).
    cfa
        (rows, cols) uint16 raw values laid out as ``cfa_pattern``.
    black_level, white_level
        Raw ADU of zero light and of saturation, written as DNG BlackLevel and WhiteLevel.
    exposure_s, iso, capture_time
        EXIF ExposureTime, ISOSpeedRatings and DateTimeOriginal (+ TIFF DateTime), read back by
        LibRaw as ``raw.other.shutter_speed``, ``iso_speed`` and ``timestamp``. ``capture_time``
        is written as its wall-clock fields (EXIF carries no time zone); ``None`` omits a tag.
    make, model
        TIFF Make and Model; UniqueCameraModel is ``f"{make} {model}"``.
    as_shot_neutral
        DNG AsShotNeutral (camera R, G, B of a neutral object); the default makes the camera
        white balance the identity.
    cfa_pattern
        The Bayer tile read row by row from pixel (0, 0), one of ``CFA_PATTERNS``: ``"RGGB"``
        has red at (row 0, col 0), green at (0, 1) and (1, 0), blue at (1, 1). Written as the
        DNG CFAPattern tag.
    temperature_c
        EXIF Temperature (0x9400, Celsius, 4 decimals): the sensor temperature of a simulated
        camera (``None`` omits it).

    Returns
    -------
    Path
        ``path``.
    """
    mosaic = np.asarray(cfa)
    if mosaic.ndim != 2 or mosaic.dtype != np.uint16:
        raise ValueError(f"cfa must be a 2-D uint16 array, got {mosaic.dtype} {mosaic.shape}")
    if not 0 <= black_level < white_level <= 65535:
        raise ValueError(
            f"need 0 <= black_level < white_level <= 65535, got {black_level}, {white_level}"
        )
    if cfa_pattern not in CFA_PATTERNS:
        raise ValueError(
            f"cfa_pattern must be one of {', '.join(CFA_PATTERNS)}, got {cfa_pattern!r}"
        )
    if min(as_shot_neutral) <= 0:
        raise ValueError(f"as_shot_neutral must be positive, got {as_shot_neutral}")
    rows, cols = mosaic.shape

    def ifd0(strip_offset: int, exif_offset: int) -> list[_Tag]:
        return _dng_tags(
            rows,
            cols,
            black_level=black_level,
            white_level=white_level,
            make=make,
            model=model,
            capture_time=capture_time,
            as_shot_neutral=as_shot_neutral,
            cfa_pattern=cfa_pattern,
            strip_offset=strip_offset,
            exif_offset=exif_offset,
        )

    exif = _exif_tags(exposure_s, iso, capture_time, temperature_c)
    exif_offset = 8 + _ifd_size(ifd0(0, 0))  # offsets are inline LONGs: sizes do not change
    end = exif_offset + _ifd_size(exif)
    strip_offset = -(-end // _PIXEL_DATA_ALIGN) * _PIXEL_DATA_ALIGN
    header = struct.pack("<2sHI", b"II", 42, 8)
    head = (
        header + _pack_ifd(ifd0(strip_offset, exif_offset), 8) + _pack_ifd(exif, exif_offset)
    ).ljust(strip_offset, b"\0")
    pixels = np.ascontiguousarray(mosaic, dtype="<u2")
    destination = Path(path)
    with open(destination, "wb") as fh:
        fh.write(head)
        fh.write(pixels.tobytes())
    return destination
