"""Calibration masters: bias, dark, flat and dark-flat, built tile by tile in bounded memory.

A master is the per-pixel combine of calibration frames in the sensor's mosaic (CFA) domain,
in the units of ``nightstack.io.loaders.load_mosaic``: black level subtracted, white level = 1.0
(mono and 3-plane FITS in ``nightstack.io.loaders.load``'s units, full scale = 1). The combine is
astropy's ``sigma_clip`` (``sigma`` 3, ``maxiters`` 5, median centre, std) then the mean of the
survivors, per pixel, computed band of rows by band of rows by the final stack's own driver
(:func:`nightstack.stacking.combine.combine`: the same computation, here on frames that cover
everything):

- every frame is decoded once; when all of them fit in a quarter of the RAM cap they are kept
  in memory, otherwise each is spilled to a float32 file in a temporary folder beside the output
  (4 bytes a pixel: 96 MB a 24 MP frame) and read back one band at a time, so memory stays
  bounded whatever the number of frames;
- flats have their offset master (dark-flat, else bias) subtracted and are scaled to the same
  median level frame by frame before the combine (twilight and panel flats drift), and the
  master is normalized to 1 per CFA colour (its median on each colour's sites), so it corrects
  vignetting, dust and pixel response without changing the colour balance.

The header records the kind, camera, size, CFA pattern, ISO/gain, exposure, sensor temperature
when the frames say it, NCOMBINE, the first and last capture times and the clip settings.
Pure numpy in the middle (:func:`normalize_flat`, the combine); files at the edges
(:func:`read_frame`, :func:`read_master`, :func:`write_master`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from nightstack import __version__
from nightstack.arrays import FloatArray
from nightstack.errors import CalibrationError, DecodeError
from nightstack.frames import FrameMeta
from nightstack.stacking.combine import combine

KINDS = ("bias", "dark", "flat", "darkflat")
"""The kinds of master, as ``nightstack master KIND`` names them."""
IMAGETYP = {
    "bias": "Bias Frame",
    "dark": "Dark Frame",
    "flat": "Flat Field",
    "darkflat": "Dark Flat",
}
"""FITS IMAGETYP of each kind (the MaxIm DL / Siril names)."""
UNITS = "black-subtracted, white level = 1"  # the CALUNIT card: load_mosaic's units
CFA_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")  # the 2x2 Bayer tiles a master may carry
DEFAULT_RAM_CAP = 384 * 2**20  # bytes for the band combine: with one decoded 24 MP frame and
# the interpreter the whole build stays under 0.5 GB
_IN_MEMORY_FRACTION = 4  # frames are kept in RAM when they fit in 1/4 of the cap, else spilled
_LEVEL_STRIDE = 7  # a flat's level is the median of every 7th pixel of every 7th row: 2 % of
# the pixels, odd so each CFA colour is sampled


@dataclass(frozen=True)
class MasterInfo:
    """What a master is: its kind, the sensor it fits and how it was taken.

    ``shape``: (rows, cols); ``pattern``: the CFA tile at pixel (0, 0) ("RGGB", ...) or ``None``
    (mono, or ``planes`` == 3 colour planes); ``iso``: ISO or gain; ``exposure_s`` seconds;
    ``temperature_c``: sensor temperature, Celsius (``None`` when the frames do not say);
    ``ncombine``: frames combined; ``date_obs``/``date_end``: first and last capture (ISO 8601).
    """

    kind: str
    shape: tuple[int, int]
    pattern: str | None = None
    planes: int = 1
    camera: str | None = None
    iso: float | None = None
    exposure_s: float | None = None
    temperature_c: float | None = None
    ncombine: int = 0
    date_obs: str | None = None
    date_end: str | None = None
    path: Path | None = None

    def describe(self) -> str:
        """One line: ``dark 1200x800 RGGB ISO 1600 30 s -5.0 C (master_dark.fits)``."""
        rows, cols = self.shape
        parts = [
            self.kind,
            f"{cols}x{rows}",
            self.pattern or ("RGB" if self.planes == 3 else "mono"),
        ]
        parts += conditions_text(self.iso, self.exposure_s, self.temperature_c)
        if self.path is not None:
            parts.append(f"({self.path.name})")
        return " ".join(parts)

    def header(self) -> dict[str, Any]:
        """FITS cards of this master (see :func:`write_master`)."""
        rows, cols = self.shape
        cards: dict[str, Any] = {
            "IMAGETYP": IMAGETYP[self.kind],
            "CALKIND": (self.kind, "nightstack master kind"),
            "CALUNIT": (UNITS, "data units"),
            "INSTRUME": self.camera,
            "CALROWS": rows,
            "CALCOLS": cols,
            "ISOSPEED": self.iso,
            "EXPTIME": self.exposure_s,
            "CCD-TEMP": self.temperature_c,
            "NCOMBINE": self.ncombine,
            "DATE-OBS": self.date_obs,
            "DATE-END": self.date_end,
            "SWCREATE": f"nightstack {__version__}",
        }
        if self.pattern is not None:
            cards.update(BAYERPAT=self.pattern, XBAYROFF=0, YBAYROFF=0)
        return cards


@dataclass(frozen=True, eq=False)
class Master:
    """A master: ``info`` and ``data``, (rows, cols) or (rows, cols, planes) float32."""

    info: MasterInfo
    data: FloatArray


@dataclass(frozen=True, eq=False)
class CalibrationFrame:
    """One decoded calibration frame: ``data`` (rows, cols) float32 mosaic (``pattern`` its CFA
    tile) or (rows, cols, planes) float32 with ``pattern`` None; ``meta`` from the file."""

    path: Path
    data: FloatArray
    pattern: str | None
    meta: FrameMeta


Reader = Callable[[Path], CalibrationFrame]
Progress = Callable[[int, int, str], None]


# --- the pure middle ---------------------------------------------------------------------------


def colour_sites(pattern: str | None, shape: tuple[int, ...]) -> dict[str, tuple[slice, slice]]:
    """The sites of each colour plane of a mosaic: ``{"R": ..., "G": ..., "G2": ..., "B": ...}``
    as (row slice, col slice) pairs into (rows, cols); one ``"L"`` entry covering everything
    for ``pattern`` None. The two greens are kept apart (they differ on many sensors)."""
    if pattern is None:
        return {"L": (slice(None), slice(None))}
    sites: dict[str, tuple[slice, slice]] = {}
    for i, colour in enumerate(pattern):
        name = colour if colour not in sites else colour + "2"
        sites[name] = (slice(i // 2, None, 2), slice(i % 2, None, 2))
    return sites


def normalize_flat(data: FloatArray, pattern: str | None) -> tuple[FloatArray, dict[str, float]]:
    """A combined flat divided by its median on each CFA colour's sites (each plane of a
    (rows, cols, planes) flat; the whole of a mono one), so each colour's typical value is 1.

    Returns the (same-shape) float32 normalized flat and the levels divided by. Raises
    ``CalibrationError`` when a colour's level is not positive (an empty or unlit flat).
    """
    out = np.array(data, dtype=np.float32, copy=True)
    levels: dict[str, float] = {}
    planes = [out[:, :, p] for p in range(out.shape[2])] if out.ndim == 3 else [out]
    for p, plane in enumerate(planes):
        for name, (rows, cols) in colour_sites(
            pattern if out.ndim == 2 else None, plane.shape
        ).items():
            level = float(np.nanmedian(plane[rows, cols]))
            key = name if out.ndim == 2 else "RGB"[p] if out.shape[2] == 3 else str(p)
            if not (math.isfinite(level) and level > 0):
                raise CalibrationError(
                    f"flat level of {key} is {level:g}: the flats are not lit (or their offset "
                    "master is brighter than they are)"
                )
            plane[rows, cols] /= np.float32(level)
            levels[key] = level
    return out, levels


def frame_level(data: FloatArray) -> float:
    """A flat frame's brightness: the median of a sparse subsample (every ``_LEVEL_STRIDE``th
    pixel of every ``_LEVEL_STRIDE``th row, every CFA colour included)."""
    return float(np.median(data[::_LEVEL_STRIDE, ::_LEVEL_STRIDE]))


# --- building a master -------------------------------------------------------------------------


def build_master(
    kind: str,
    paths: Sequence[str | os.PathLike[str]],
    *,
    offset: Master | None = None,
    sigma: float = 3.0,
    maxiters: int = 5,
    ram_cap_bytes: int = DEFAULT_RAM_CAP,
    spill_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    reader: Reader | None = None,
) -> Master:
    """Combine calibration frames into a master (see the module docstring).

    Parameters
    ----------
    kind
        One of ``KINDS``.
    paths
        The frames: raws, Bayer, mono or 3-plane FITS, all of one size and CFA pattern.
    offset
        Flats only: the dark-flat (or bias) master subtracted from every flat frame.
    sigma, maxiters
        The clip (astropy ``sigma_clip`` semantics).
    ram_cap_bytes
        Memory for the band combine; frames beyond a quarter of it are spilled to disk.
    spill_dir
        Where the temporary spill folder goes (default: the system's temporary folder).
    progress
        Called as ``progress(done, total, note)`` after each frame read and each band.
    reader
        Decodes one frame (default :func:`read_frame`).

    Raises
    ------
    CalibrationError
        Fewer than 2 frames, a frame that cannot be decoded, frames of different sizes or CFA
        patterns, an offset master that does not fit, an unlit flat.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if offset is not None and kind != "flat":
        raise ValueError("only flats take an offset master")
    files = [Path(p) for p in paths]
    if len(files) < 2:
        raise CalibrationError(f"a {kind} master needs at least 2 frames, got {len(files)}")
    read = reader or read_frame
    n = len(files)
    first = _read(read, files[0])
    shape, pattern = first.data.shape, first.pattern
    frame_bytes = int(np.prod(shape)) * 4
    total = 2 * n  # progress: the frames read, then the combine's rows as n more steps
    in_memory = n * frame_bytes <= ram_cap_bytes // _IN_MEMORY_FRACTION
    metas: list[FrameMeta] = []
    spill = (
        Path(tempfile.mkdtemp(prefix=".nightstack-master-", dir=spill_dir))
        if not in_memory
        else None
    )
    try:
        held: list[FloatArray] = []
        frame: CalibrationFrame | None = first
        for i, path in enumerate(files):
            frame = frame if frame is not None else _read(read, path)
            _check_same(frame, shape, pattern, files[0])
            data = _prepared(kind, frame.data, offset, pattern)
            metas.append(frame.meta)
            if spill is None:
                held.append(data)
            else:
                data.astype(np.float32, copy=False).tofile(spill / f"{i:05d}.f32")
            frame = None
            del data
            if progress is not None:
                progress(i + 1, total, path.name)

        def rows_done(done: int, rows: int) -> None:
            if progress is not None:
                progress(n + n * done // rows, total, f"rows {done}/{rows}")

        frames = _Frames(shape, held, spill, n)
        out = combine(
            frames, sigma=sigma, maxiters=maxiters, ram_cap_bytes=ram_cap_bytes, progress=rows_done
        ).reshape(shape)
        del held, frames
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    info = _info(kind, shape, pattern, metas)
    if kind == "flat":
        out, _ = normalize_flat(out, pattern)
    return Master(info, out)


def _read(read: Reader, path: Path) -> CalibrationFrame:
    try:
        return read(path)
    except DecodeError as err:
        raise CalibrationError(f"{path.name}: {err.reason}") from err


def _check_same(
    frame: CalibrationFrame, shape: tuple[int, ...], pattern: str | None, first: Path
) -> None:
    if frame.data.shape != shape or frame.pattern != pattern:
        raise CalibrationError(
            f"{frame.path.name} is {_shape_text(frame.data.shape, frame.pattern)} but "
            f"{first.name} is {_shape_text(shape, pattern)}: a master combines one sensor mode"
        )


def _shape_text(shape: tuple[int, ...], pattern: str | None) -> str:
    """``1200x800 RGGB``, ``1200x800 mono`` or ``1200x800x3``."""
    if len(shape) == 3:
        return f"{shape[1]}x{shape[0]}x{shape[2]}"
    return f"{shape[1]}x{shape[0]} {pattern or 'mono'}"


def _prepared(
    kind: str, data: FloatArray, offset: Master | None, pattern: str | None
) -> FloatArray:
    """A frame as it enters the combine: flats less their offset, scaled to level 1."""
    if kind != "flat":
        return data
    out = np.array(data, dtype=np.float32, copy=True)
    if offset is not None:
        check_fits(offset.info, out.shape, pattern)
        out -= offset.data
    level = frame_level(out)
    if not (math.isfinite(level) and level > 0):
        raise CalibrationError(f"a flat frame's level is {level:g}: not lit, or under its offset")
    out *= np.float32(1.0 / level)
    return out


def check_fits(info: MasterInfo, shape: tuple[int, ...], pattern: str | None) -> None:
    """Raise ``CalibrationError`` with the reason when a master of ``info`` cannot calibrate
    data of ``shape`` (rows, cols[, planes]) and CFA ``pattern``."""
    planes = shape[2] if len(shape) == 3 else 1
    mine = info.shape + ((info.planes,) if info.planes != 1 else ())
    name = f"{info.kind} master" + (f" {info.path.name}" if info.path else "")
    if tuple(shape[:2]) != info.shape or planes != info.planes:
        raise CalibrationError(
            f"{name} is {_shape_text(mine, info.pattern)}, the frame "
            f"{_shape_text(shape, pattern)}: refused"
        )
    if pattern != info.pattern:
        raise CalibrationError(
            f"{name} has CFA pattern {info.pattern or 'none'}, the frame "
            f"{pattern or 'none'}: refused"
        )


class _Frames:
    """The prepared frames as :func:`~nightstack.stacking.combine.combine` reads a frame
    store's: every frame covers every pixel (calibration frames are not aligned), rows read from
    memory or from the frame's spill file; a mosaic is one channel."""

    block_rows = 1  # any band reads each frame's rows once

    def __init__(
        self, shape: tuple[int, ...], held: list[FloatArray], spill: Path | None, n: int
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = int(shape[2]) if len(shape) == 3 else 1
        self._frame_shape = shape
        self._held = held
        self._spill = spill
        self._n = n

    def __len__(self) -> int:
        return self._n

    def footprint_spans(
        self, i: int, row_start: int, row_stop: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        rows = row_stop - row_start
        return np.zeros(rows, np.int64), np.full(rows, self.shape[1], np.int64)

    def read_band(
        self, i: int, row_start: int, row_stop: int, out: FloatArray | None = None
    ) -> FloatArray:
        if out is None:
            out = np.empty((row_stop - row_start, self.shape[1], self.channels), np.float32)
        band = out[..., 0] if len(self._frame_shape) == 2 else out  # a view of ``out``
        if self._spill is None:
            band[...] = self._held[i][row_start:row_stop]
        else:
            _read_band(self._spill / f"{i:05d}.f32", row_start, row_stop, self._frame_shape, band)
        return out


def _read_band(path: Path, r0: int, r1: int, shape: tuple[int, ...], out: FloatArray) -> None:
    """Rows r0:r1 of a spilled float32 frame of ``shape`` into ``out``."""
    row = int(np.prod(shape[1:]))
    buffer = np.empty((r1 - r0) * row, dtype=np.float32)
    with path.open("rb") as fh:
        fh.seek(r0 * row * 4)
        if fh.readinto(buffer.view(np.uint8)) != buffer.nbytes:  # type: ignore[arg-type]
            raise CalibrationError(f"spilled frame {path.name} is cut short (disk full?)")
    out[...] = buffer.reshape(out.shape)


def _info(
    kind: str, shape: tuple[int, ...], pattern: str | None, metas: list[FrameMeta]
) -> MasterInfo:
    """A master's description from its frames' metadata (medians of what they say)."""

    def typical(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(median(known)) if known else None

    cameras = {m.camera for m in metas if m.camera}
    times = sorted(m.capture_time for m in metas if m.capture_time is not None)
    temperature = typical([getattr(m, "temperature_c", None) for m in metas])
    return MasterInfo(
        kind=kind,
        shape=(int(shape[0]), int(shape[1])),
        pattern=pattern,
        planes=int(shape[2]) if len(shape) == 3 else 1,
        camera=", ".join(sorted(cameras)) if cameras else None,
        iso=typical([m.iso for m in metas]),
        exposure_s=typical([m.exposure_s for m in metas]),
        temperature_c=None if temperature is None else round(temperature, 2),
        ncombine=len(metas),
        date_obs=times[0].isoformat() if times else None,
        date_end=times[-1].isoformat() if times else None,
    )


# --- files at the edges ------------------------------------------------------------------------


def read_frame(path: str | os.PathLike[str]) -> CalibrationFrame:
    """Decode one calibration frame: raws and Bayer FITS to the mosaic
    (``loaders.load_mosaic``), mono and 3-plane FITS through ``loaders.load``.

    Raises ``DecodeError`` with a one-line reason when the file cannot be decoded.
    """
    from nightstack.formats import FITS_EXTENSIONS
    from nightstack.io.loaders import fits_is_bayer, load, load_mosaic

    path = Path(path)
    if path.suffix.lower() in FITS_EXTENSIONS and not fits_is_bayer(path):
        frame = load(path, bin=1)
        image = frame.image[:, :, 0] if frame.image.shape[2] == 1 else frame.image
        return CalibrationFrame(path, image, None, frame.meta)
    mosaic = load_mosaic(path)
    return CalibrationFrame(path, mosaic.data, mosaic.pattern, mosaic.meta)


def write_master(path: str | os.PathLike[str], master: Master) -> Path:
    """Write a master as float32 FITS (atomically), its description in the header; returns the
    path. Colour planes are written (planes, rows, cols) as ``writers.write_fits`` does."""
    from nightstack.io.writers import write_fits

    path = Path(path)
    write_fits(path, master.data, master.info.header())
    return path


def read_master(path: str | os.PathLike[str]) -> Master:
    """Read a master written by :func:`write_master`.

    Raises ``CalibrationError`` for a file that cannot be read or is not a nightstack master
    (no ``CALKIND`` card: masters of other programs differ in black level and scale).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False) as hdul:
                header = hdul[0].header.copy()
                data = None if hdul[0].data is None else np.asarray(hdul[0].data, dtype=np.float32)
    except Exception as err:
        raise CalibrationError(
            f"{path.name}: cannot read the master ({type(err).__name__}: {err})"
        ) from err
    kind = str(header.get("CALKIND", "")).strip().lower()
    if kind not in KINDS:
        raise CalibrationError(
            f"{path.name} is not a nightstack master (no CALKIND card): build it with "
            "'nightstack master'"
        )
    if data is None or data.ndim not in (2, 3):
        raise CalibrationError(f"{path.name}: a master holds a 2-D mosaic or 3 planes")
    if str(header.get("ROWORDER", "TOP-DOWN")).strip().upper() == "BOTTOM-UP":
        data = data[::-1]
    if data.ndim == 3:
        data = np.ascontiguousarray(np.moveaxis(data, 0, -1))
    pattern = str(header.get("BAYERPAT", "")).strip().upper() or None
    if pattern is not None and pattern not in CFA_PATTERNS:
        raise CalibrationError(f"{path.name}: unsupported BAYERPAT {pattern!r}")

    def number(key: str) -> float | None:
        value = header.get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    info = MasterInfo(
        kind=kind,
        shape=(int(data.shape[0]), int(data.shape[1])),
        pattern=pattern,
        planes=int(data.shape[2]) if data.ndim == 3 else 1,
        camera=str(header["INSTRUME"]).strip() if header.get("INSTRUME") else None,
        iso=number("ISOSPEED"),
        exposure_s=number("EXPTIME"),
        temperature_c=number("CCD-TEMP"),
        ncombine=int(header.get("NCOMBINE", 0) or 0),
        date_obs=str(header["DATE-OBS"]) if header.get("DATE-OBS") else None,
        date_end=str(header["DATE-END"]) if header.get("DATE-END") else None,
        path=path,
    )
    return Master(info, np.ascontiguousarray(data))


def with_path(master: Master, path: Path) -> Master:
    """The same master, ``info.path`` set (after writing it)."""
    return Master(replace(master.info, path=path), master.data)


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 DATE-OBS back to a datetime (``None`` if absent or unreadable)."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def conditions_text(
    iso: float | None, exposure_s: float | None, temperature_c: float | None
) -> list[str]:
    """The shooting conditions a master is matched by, as words: ``["ISO 800", "30 s",
    "12.5 C"]`` (those that are known)."""
    parts = []
    if iso is not None:
        parts.append(f"ISO {iso:g}")
    if exposure_s is not None:
        parts.append(f"{exposure_s:g} s")
    if temperature_c is not None:
        parts.append(f"{temperature_c:.1f} C")
    return parts
