"""Calibration of a light in the sensor mosaic: dark (or bias + scaled dark), flat, cosmetic.

- :func:`calibrate_mosaic` (pure): ``(light - dark) / flat``, or with ``dark_scaling``
  ``(light - bias - (dark - bias) * t_light / t_dark) / flat``; pixels the sensor clipped stay
  at or above its saturation level (``saturation / flat``), the result stays linear.
- Cosmetic correction: :func:`defect_map` finds hot and cold pixels in a master dark (kappa-sigma
  outliers against the local median of the same CFA colour, so amp glow is not taken for hot
  pixels); :class:`FrameDefects` finds them without a dark, as the pixels that stand out sharply
  (a single site above its neighbours of every colour, which no star does) at the same sensor
  place in each of the first frames; :func:`repair` replaces them by the median of their
  neighbours of the same CFA colour.
- :class:`Library`: the masters of a calibration folder (masters written by ``nightstack
  master``, and folders of raw calibration frames named ``bias``, ``darks``, ``flats``,
  ``darkflats``..., built once into masters cached in ``.nightstack-masters/``), and
  :meth:`Library.match`, which picks for each light the masters of its camera, sensor size and
  CFA pattern, ISO/gain, exposure (darks within 5 %) and nearest sensor temperature.
- :class:`Calibrator`: configured once (explicit masters and/or a library, the options); called
  per light mosaic, it returns the calibrated mosaic and what the journal says of it.

Why one module of this size: applying masters, matching them from a library and cosmetic
correction share the CFA-site geometry and the per-light decision of what applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from nightstack.arrays import FloatArray, IntArray
from nightstack.calibration.masters import (
    DEFAULT_RAM_CAP,
    KINDS,
    Master,
    MasterInfo,
    build_master,
    check_fits,
    colour_sites,
    conditions_text,
    read_frame,
    read_master,
    with_path,
    write_master,
)
from nightstack.errors import CalibrationError, ConfigError, DecodeError
from nightstack.formats import CALIBRATION_EXTENSIONS, FITS_EXTENSIONS
from nightstack.frames import FrameMeta, Mosaic
from nightstack.io.writers import write_json

if TYPE_CHECKING:
    from nightstack.config import Settings

log = logging.getLogger(__name__)


EXPOSURE_TOLERANCE = 0.05  # a dark fits a light whose exposure is within 5 % of its own
DEFECT_KAPPA = 6.0  # hot/cold: this many robust sigmas from the local same-colour median
SHARPNESS = 0.5  # a hot pixel stands out at least twice as much as any of its neighbours
DEFECT_FRAMES = 3  # without a dark: outliers at the same place in each of the first 3 frames
_LOCAL_MEDIAN = 5  # cv2.medianBlur kernel on each colour's sub-plane (10 x 10 sensor pixels)
_MAD_TO_SIGMA = 1.4826  # median absolute deviation -> sigma of a normal distribution
_FLAT_FLOOR = 0.05  # a flat below 5 % of its colour's level is a dead site: repaired, not / 0
_CACHE_DIR = ".nightstack-masters"  # masters built from raw folders, in the calibration folder
_FOLDER_KINDS = (
    ("darkflat", ("darkflat", "dark-flat", "dark_flat", "flatdark", "flat-dark", "flat_dark")),
    ("bias", ("bias", "offset")),
    ("dark", ("dark",)),
    ("flat", ("flat",)),
)  # first match wins: a "darkflats" folder is dark-flats, not darks


# --- application (pure) ------------------------------------------------------------------------


def calibrate_mosaic(
    light: FloatArray,
    *,
    offset: FloatArray | None = None,
    flat: FloatArray | None = None,
    saturation: float = 1.0,
    out: FloatArray | None = None,
) -> FloatArray:
    """``(light - offset) / flat``, saturated pixels kept saturated.

    Parameters
    ----------
    light
        (rows, cols) float32 mosaic, black 0, white ``saturation``.
    offset
        (rows, cols) float32: the master dark, or ``bias + (dark - bias) * t_light / t_dark``
        (see :meth:`Calibration.offset`), or the bias alone; ``None``: nothing subtracted.
    flat
        (rows, cols) float32, the normalized master flat; ``None``: no flat. Its dead sites
        (0 or near it) give huge or non-finite values, for the caller to repair (no warning).
    saturation
        Pixels of ``light`` at or above it calibrate to ``saturation / flat`` (or
        ``saturation``): their true signal is unknown but at least that, so they stay the
        brightest of their neighbourhood, never dimmed by the dark.
    out
        Where the result goes (``light`` itself: in place, no 4-byte-a-pixel copy); default
        a new array.

    Returns
    -------
    ndarray
        (rows, cols) float32, linear (``out`` if given).
    """
    clipped = np.flatnonzero(light >= np.float32(saturation)) if math.isfinite(saturation) else None
    if out is None:
        out = np.empty(light.shape, dtype=np.float32)
    if offset is not None:
        np.subtract(light, offset, out=out)
    elif out is not light:
        np.copyto(out, light)
    with np.errstate(divide="ignore", invalid="ignore"):
        if flat is not None:  # a division, not * 1 / flat: no 4-byte-a-pixel inverse kept
            np.divide(out, flat, out=out)
        if clipped is not None and clipped.size:
            level = np.float32(saturation)
            sites = out.reshape(-1)
            sites[clipped] = level if flat is None else level / flat.reshape(-1)[clipped]
    return out


def _excess(data: FloatArray, pattern: str | None) -> tuple[FloatArray, FloatArray]:
    """How far each site stands out of its own CFA colour's neighbourhood, and the noise there:
    ``(excess, sigma)``, both (rows, cols) float32. ``excess`` is the site less the median of
    the ``_LOCAL_MEDIAN`` x ``_LOCAL_MEDIAN`` sites of its colour around it; ``sigma`` the larger
    of the whole frame's robust sigma of ``excess`` and its local one (the median of
    ``|excess|`` around it, x 1.4826), so a steep, noisy amp glow raises its own threshold."""
    excess = np.empty(data.shape, dtype=np.float32)
    local = np.empty(data.shape, dtype=np.float32)
    for rows, cols in colour_sites(pattern, data.shape).values():
        plane = np.ascontiguousarray(data[rows, cols], dtype=np.float32)
        diff = plane - cv2.medianBlur(plane, _LOCAL_MEDIAN)
        excess[rows, cols] = diff
        local[rows, cols] = cv2.medianBlur(np.abs(diff), _LOCAL_MEDIAN)
    local *= np.float32(_MAD_TO_SIGMA)
    sample = excess[::3, ::3]
    centre = float(np.median(sample))
    overall = _MAD_TO_SIGMA * float(np.median(np.abs(sample - centre)))
    np.maximum(local, np.float32(max(overall, 1e-9)), out=local)
    return excess, local


def defect_map(
    dark: FloatArray, pattern: str | None, *, kappa: float = DEFECT_KAPPA
) -> tuple[IntArray, IntArray]:
    """Hot and cold pixels of a master dark: (hot, cold) flat indices into (rows, cols), sites
    more than ``kappa`` robust sigmas above (below) the local median of their own CFA colour.

    ``dark``: (rows, cols) float32 (the master dark, black 0). The local median follows amp
    glow and other smooth structure, so only single sites stand out.
    """
    excess, sigma = _excess(dark, pattern)
    sigma *= np.float32(kappa)
    hot = np.flatnonzero(excess > sigma)
    cold = np.flatnonzero(excess < -sigma)
    return hot, cold


def sharp_outliers(
    light: FloatArray, pattern: str | None, *, kappa: float = DEFECT_KAPPA
) -> IntArray:
    """Sites of one light that stand out like hot pixels, flat indices: ``kappa`` sigmas above
    the local median of their colour (see ``_excess``), and above each of their 8 neighbours
    (of any colour, each measured against its own colour the same way) by more than
    ``SHARPNESS`` times that. A star lights its neighbours too (its core is less than twice
    as bright as the next site; its flanks have a brighter neighbour), a hot pixel does not.
    """
    excess, sigma = _excess(light, pattern)
    sigma *= np.float32(kappa)
    ring = np.ones((3, 3), np.uint8)
    ring[1, 1] = 0
    neighbours = cv2.dilate(excess, ring, borderType=cv2.BORDER_REPLICATE)  # max of the 8
    lead = excess - neighbours
    return np.flatnonzero((excess > sigma) & (lead > np.float32(SHARPNESS) * excess))


def repair(data: FloatArray, defects: IntArray, pattern: str | None) -> int:
    """Replace ``defects`` (flat indices into (rows, cols) ``data``) in place by the median of
    their up to 8 nearest neighbours of the same CFA colour (2 sites away on a Bayer mosaic, 1
    on mono) that are not defects themselves; a site with no such neighbour keeps its value.
    Returns the number of sites replaced."""
    if defects.size == 0:
        return 0
    rows, cols = data.shape
    step = 1 if pattern is None else 2
    r, c = np.divmod(defects, cols)
    offsets = [(dr, dc) for dr in (-step, 0, step) for dc in (-step, 0, step) if dr or dc]
    nr = r[:, None] + np.array([o[0] for o in offsets])
    nc = c[:, None] + np.array([o[1] for o in offsets])
    inside = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols)
    index = np.where(inside, nr * cols + nc, 0)
    bad = np.zeros(rows * cols, dtype=bool)
    bad[defects] = True
    usable = inside & ~bad[index]
    values = np.where(usable, data.reshape(-1)[index], np.nan)
    some = usable.any(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with no usable neighbour
        fill = np.nanmedian(values[some], axis=1)
    data.reshape(-1)[defects[some]] = fill.astype(data.dtype)
    return int(np.count_nonzero(some))


class FrameDefects:
    """Hot pixels found from the lights themselves, when there is no master dark.

    The candidates of each of the first ``frames`` lights (:func:`sharp_outliers`) are
    intersected: a hot pixel is at the same sensor place in every frame, noise spikes, cosmic
    rays and (on a drifting mount) stars are not. Until ``frames`` lights were seen the map is
    empty; the final sigma clip removes the few hot pixels of those first frames.
    """

    def __init__(self, frames: int = DEFECT_FRAMES, kappa: float = DEFECT_KAPPA) -> None:
        if frames < 2:
            raise ValueError(f"frames must be >= 2, got {frames}")
        self.frames, self.kappa = frames, kappa
        self.seen = 0
        self._candidates: IntArray | None = None
        self.shape: tuple[int, int] | None = None

    @property
    def ready(self) -> bool:
        """Whether the map is complete (``frames`` lights seen)."""
        return self.seen >= self.frames

    @property
    def defects(self) -> IntArray:
        """The hot pixels (flat indices); empty until :attr:`ready`."""
        if not self.ready or self._candidates is None:
            return np.zeros(0, dtype=np.intp)
        return self._candidates

    def learn(self, light: FloatArray, pattern: str | None) -> None:
        """Take the candidates of one more light (ignored once ready, or of another size)."""
        if self.ready or (self.shape is not None and light.shape != self.shape):
            return
        self.shape = (int(light.shape[0]), int(light.shape[1]))
        found = sharp_outliers(light, pattern, kappa=self.kappa)
        self._candidates = (
            found if self._candidates is None else np.intersect1d(self._candidates, found)
        )
        self.seen += 1


# --- a calibration set for one kind of light ---------------------------------------------------


@dataclass(eq=False)
class Calibration:
    """The masters that calibrate one kind of light, with what they imply precomputed.

    ``dark_scaling``: subtract ``bias + (dark - bias) * t_light / t_dark`` (needs a bias and both
    exposures), else the dark as it is. ``defects``: flat indices repaired in every light.
    """

    bias: Master | None = None
    dark: Master | None = None
    flat: Master | None = None
    dark_scaling: bool = False
    defects: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    _offsets: dict[float | None, FloatArray | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.flat is not None:
            flat = self.flat.data
            dead = np.flatnonzero(~(flat >= _FLAT_FLOOR))  # NaN too
            if dead.size:
                self.defects = np.union1d(self.defects, dead)

    @property
    def empty(self) -> bool:
        return self.bias is None and self.dark is None and self.flat is None

    def masters(self) -> list[Master]:
        return [m for m in (self.bias, self.dark, self.flat) if m is not None]

    def offset(self, exposure_s: float | None) -> FloatArray | None:
        """What is subtracted from a light of ``exposure_s`` (the last exposure's is cached:
        a scaled dark is a 4-byte-a-pixel array, so one is kept, not one per exposure)."""
        key = exposure_s if self.scaled else None
        if key not in self._offsets:
            self._offsets.clear()
            self._offsets[key] = self._offset(exposure_s)
        return self._offsets[key]

    @property
    def scaled(self) -> bool:
        """Whether the dark is scaled by exposure (``dark_scaling`` with a bias and a dark)."""
        return bool(
            self.dark_scaling
            and self.bias is not None
            and self.dark is not None
            and self.dark.info.exposure_s
        )

    def _offset(self, exposure_s: float | None) -> FloatArray | None:
        if self.dark is None:
            return None if self.bias is None else self.bias.data
        if not self.scaled or exposure_s is None:
            return self.dark.data
        assert self.bias is not None and self.dark.info.exposure_s
        ratio = np.float32(exposure_s / self.dark.info.exposure_s)
        out = self.dark.data - self.bias.data
        out *= ratio
        out += self.bias.data
        return out

    def apply(
        self,
        light: FloatArray,
        exposure_s: float | None,
        saturation: float = 1.0,
        *,
        in_place: bool = False,
    ) -> FloatArray:
        """The calibrated (rows, cols) float32 light (``light`` itself when ``in_place``; a
        new array otherwise); defects are repaired by the caller (:func:`repair`)."""
        return calibrate_mosaic(
            light,
            offset=self.offset(exposure_s),
            flat=None if self.flat is None else self.flat.data,
            saturation=saturation,
            out=light if in_place and light.dtype == np.float32 else None,
        )

    def names(self) -> dict[str, str]:
        """``{"dark": "master_dark.fits", ...}`` for the journal."""
        return {
            m.info.kind: m.info.path.name if m.info.path else m.info.describe()
            for m in self.masters()
        }


# --- the calibration library -------------------------------------------------------------------


def folder_kind(name: str) -> str | None:
    """The calibration kind a folder's name says (``darks_300s`` -> dark), or None."""
    lower = name.lower()
    for kind, words in _FOLDER_KINDS:
        if any(w in lower for w in words):
            return kind
    return None


def _mismatch(
    info: MasterInfo,
    shape: tuple[int, int],
    pattern: str | None,
    meta: FrameMeta,
    *,
    exposure_matters: bool,
    temperature_tolerance_c: float,
) -> str | None:
    """Why master ``info`` does not fit a light, or None."""
    try:
        check_fits(info, shape, pattern)
    except CalibrationError as err:
        return err.reason
    if info.camera and meta.camera and info.camera != meta.camera:
        return f"camera {info.camera} is not {meta.camera}"
    thermal = info.kind in ("bias", "dark")  # ISO and temperature matter to these
    if thermal and info.iso is not None and meta.iso is not None and abs(info.iso - meta.iso) > 0.5:
        return f"ISO {info.iso:g} is not {meta.iso:g}"
    t_master, t_light = info.exposure_s, meta.exposure_s
    far = bool(t_master and t_light and abs(t_master / t_light - 1.0) > EXPOSURE_TOLERANCE)
    if exposure_matters and far:
        return f"exposure {t_master:g} s is not {t_light:g} s (within 5 %)"
    c_master, c_light = info.temperature_c, meta.temperature_c
    known = c_master is not None and c_light is not None
    if thermal and known and abs(c_master - c_light) > temperature_tolerance_c:  # type: ignore[operator]
        return (
            f"temperature {c_master:.1f} C is not {c_light:.1f} C "
            f"(within {temperature_tolerance_c:g} C)"
        )
    return None


def _light_text(shape: tuple[int, int], pattern: str | None, meta: FrameMeta) -> str:
    parts = [f"{shape[1]}x{shape[0]} {pattern or 'mono'}"]
    parts += conditions_text(meta.iso, meta.exposure_s, meta.temperature_c)
    return " ".join(parts)


class Library:
    """The masters of a calibration folder, matched to each light.

    ``directory`` is searched recursively: FITS masters with a ``CALKIND`` card (as ``nightstack
    master`` writes them) are used as they are; a folder whose name says a kind (``bias``,
    ``offset``, ``dark``, ``flat``, ``darkflat`` / ``dark-flat`` / ``flatdark``, e.g.
    ``darks_300s``) and holds raw or FITS frames is combined into masters, one per sensor mode
    (camera, size, ISO, exposure), written to ``cache_dir`` (default ``directory /
    .nightstack-masters``) under a name that hashes the frames' names, sizes and times, so they
    are built once and rebuilt only when the frames change. Flats built from raws have the
    matching dark-flat (else bias) master subtracted. Files that cannot be read are skipped with
    a one-line warning (``problems``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        temperature_tolerance_c: float = 2.0,
        dark_scaling: bool = False,
        ram_cap_bytes: int = DEFAULT_RAM_CAP,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CalibrationError(f"calibration folder {self.directory} is not a folder")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.directory / _CACHE_DIR
        self.temperature_tolerance_c = temperature_tolerance_c
        self.dark_scaling = dark_scaling
        self.ram_cap_bytes = ram_cap_bytes
        self.masters: list[Master] = []
        self.problems: list[str] = []
        self._say = progress or (lambda text: log.info("%s", text))
        self._scan()

    # --- scanning and building ---
    def _scan(self) -> None:
        folders: dict[Path, list[Path]] = {}
        for root, dirs, files in os.walk(self.directory):
            here = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            kind = folder_kind(here.name) if here != self.directory else None
            for name in sorted(files):
                path = here / name
                if path.suffix.lower() not in CALIBRATION_EXTENSIONS:
                    continue
                if kind is not None:
                    folders.setdefault(here, []).append(path)
                elif path.suffix.lower() in FITS_EXTENSIONS:
                    self._add_master(path)
        listing = {folder: _listing(paths) for folder, paths in folders.items()}
        offsets = "".join(  # a flat folder's masters depend on the offsets they had removed
            listing[f] for f in folders if folder_kind(f.name) in ("bias", "darkflat")
        )
        for wanted in ("bias", "darkflat", "dark", "flat"):  # flats need their offsets first
            for folder, paths in folders.items():
                kind = folder_kind(folder.name)
                if kind != wanted:
                    continue
                key = listing[folder] + (offsets if kind == "flat" else "")
                index = self.cache_dir / f"index-{folder.name}-{_digest(key)}.json"
                if self._from_index(index):
                    continue
                made = [self._build(kind, folder, group) for group in self._groups(paths)]
                if made and all(m is not None and m.info.path is not None for m in made):
                    names = [m.info.path.name for m in made if m is not None and m.info.path]
                    with contextlib.suppress(OSError):  # not cached: _build said so
                        write_json(index, {"folder": str(folder), "masters": names})

    def _from_index(self, index: Path) -> bool:
        """The masters a folder was built into, from its cache index, without decoding any of
        its frames (False: no index for these frames, or a master unreadable)."""
        if not index.is_file():
            return False
        try:
            names = json.loads(index.read_text())["masters"]
            masters = [read_master(self.cache_dir / name) for name in names]
        except (OSError, ValueError, KeyError, TypeError, CalibrationError):
            return False
        self.masters.extend(masters)
        return True

    def _add_master(self, path: Path) -> None:
        try:
            self.masters.append(read_master(path))
        except CalibrationError as err:
            if "not a nightstack master" not in err.reason or folder_kind(path.name):
                self._problem(err.reason)

    def _problem(self, text: str) -> None:
        self.problems.append(text)
        log.warning("calibration: %s", text)

    def _groups(self, paths: list[Path]) -> list[list[Path]]:
        """Frames of one folder grouped by sensor mode (camera, size, ISO, exposure)."""
        groups: dict[tuple[Any, ...], list[Path]] = {}
        for path in paths:
            try:
                frame = read_frame(path)
            except DecodeError as err:
                self._problem(f"{path.name}: {err.reason}")
                continue
            m = frame.meta
            key = (m.camera, frame.data.shape, frame.pattern, m.iso, _rounded(m.exposure_s))
            groups.setdefault(key, []).append(path)
        return list(groups.values())

    def _build(self, kind: str, folder: Path, paths: list[Path]) -> Master | None:
        offset = None
        if kind == "flat":
            try:
                first = read_frame(paths[0])
            except DecodeError as err:
                self._problem(f"{paths[0].name}: {err.reason}")
                return None
            offset = self._flat_offset(first.data.shape, first.pattern, first.meta)
        try:
            master = cached_master(
                kind,
                paths,
                self.cache_dir,
                offset=offset,
                ram_cap_bytes=self.ram_cap_bytes,
                say=self._say,
                problem=self._problem,
            )
        except CalibrationError as err:
            self._problem(f"{folder.name}: {err.reason}")
            return None
        self.masters.append(master)
        return master

    def _flat_offset(
        self, shape: tuple[int, ...], pattern: str | None, meta: FrameMeta
    ) -> Master | None:
        """The dark-flat of the flats' exposure, else a bias, for flats being built."""
        if len(shape) != 2:
            return None
        rows_cols = (int(shape[0]), int(shape[1]))
        for kind in ("darkflat", "bias"):
            found = self._pick(kind, rows_cols, pattern, meta, exposure_matters=kind == "darkflat")
            if isinstance(found, Master):
                return found
        return None

    # --- matching ---
    def match(
        self, shape: tuple[int, int], pattern: str | None, meta: FrameMeta
    ) -> tuple[dict[str, Master], list[str]]:
        """The masters for a light: ``({"dark": ..., "flat": ..., "bias": ...}, notes)``, each
        note a one-line reason a kind has no match (nothing of that kind in the library is not
        a note)."""
        chosen: dict[str, Master] = {}
        notes: list[str] = []
        for kind in ("dark", "bias", "flat"):
            found = self._pick(
                kind,
                shape,
                pattern,
                meta,
                exposure_matters=kind == "dark" and not self.dark_scaling,
            )
            if isinstance(found, Master):
                chosen[kind] = found
            elif found:
                notes.append(found)
        if "dark" in chosen and not self.dark_scaling:
            chosen.pop("bias", None)  # a dark of the light's exposure holds the bias already
        return chosen, notes

    def _pick(
        self,
        kind: str,
        shape: tuple[int, int],
        pattern: str | None,
        meta: FrameMeta,
        *,
        exposure_matters: bool,
    ) -> Master | str | None:
        """The best master of ``kind`` for the light, or why none fits (None: none of the kind)."""
        candidates = [m for m in self.masters if m.info.kind == kind]
        if not candidates:
            return None
        fitting, reasons = [], []
        for master in candidates:
            why = _mismatch(
                master.info,
                shape,
                pattern,
                meta,
                exposure_matters=exposure_matters,
                temperature_tolerance_c=self.temperature_tolerance_c,
            )
            if why is None:
                fitting.append(master)
            else:
                reasons.append(f"{master.info.path.name if master.info.path else kind}: {why}")
        if not fitting:
            shown = "; ".join(reasons[:2]) + (
                f"; {len(reasons) - 2} more" if len(reasons) > 2 else ""
            )
            return f"no {kind} master fits the light ({_light_text(shape, pattern, meta)}): {shown}"

        def rank(master: Master) -> tuple[float, ...]:
            info = master.info
            temp = (
                abs(info.temperature_c - meta.temperature_c)
                if info.temperature_c is not None and meta.temperature_c is not None
                else math.inf
            )
            exposure = (
                abs(math.log(info.exposure_s / meta.exposure_s))
                if info.exposure_s and meta.exposure_s
                else math.inf
            )
            iso = (
                0.0
                if info.iso is None or meta.iso is None or abs(info.iso - meta.iso) < 0.5
                else 1.0
            )
            newest = -(_epoch(info.date_obs))
            if kind == "flat":
                return (iso, newest)
            return (temp, exposure if kind == "dark" else 0.0, newest)  # 1 C: ~12 % dark current

        return min(fitting, key=rank)


def _listing(paths: Sequence[Path]) -> str:
    """The frames' names, sizes and modification times, as one string (what a cache key
    hashes: a changed, added or removed frame changes it)."""
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0")
    return "".join(parts)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _epoch(text: str | None) -> float:
    from nightstack.calibration.masters import parse_time

    when = parse_time(text)
    return when.timestamp() if when is not None else 0.0


# --- the per-frame calibrator ------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationResult:
    """What calibrating one light did, for the journal: the masters used by kind (file names),
    the defects repaired, and the one-line warnings (a kind with no match, a master refused)."""

    masters: dict[str, str]
    repaired: int
    warnings: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"masters": dict(self.masters), "repaired": self.repaired}
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


class Calibrator:
    """Calibrates every light: masters given explicitly, else from a library; cosmetic repair.

    Parameters
    ----------
    masters
        Explicit masters by kind (``bias``, ``dark``, ``flat``; a ``darkflat`` only builds
        flats): used for every light they fit; one of another size or CFA pattern is refused
        for that light with the reason, and the light goes on without it.
    library
        A :class:`Library` for the kinds not given explicitly.
    dark_scaling
        Scale the dark by exposure (needs a bias).
    cosmetic
        Repair the hot and cold pixels of the dark (:func:`defect_map`) in every light.
    from_lights
        Without a dark, repair the pixels :class:`FrameDefects` finds in the first lights.
    kappa
        The defect threshold, robust sigmas.
    in_place
        Calibrate each light's mosaic data in place (saves a 96 MB copy and its time at 24 MP;
        for a caller that does not keep the decoded light).
    """

    def __init__(
        self,
        masters: dict[str, Master] | None = None,
        library: Library | None = None,
        *,
        dark_scaling: bool = False,
        cosmetic: bool = True,
        from_lights: bool = False,
        kappa: float = DEFECT_KAPPA,
        in_place: bool = False,
    ) -> None:
        self.in_place = in_place
        self.explicit = dict(masters or {})
        self.explicit.pop("darkflat", None)
        self.library = library
        self.dark_scaling = dark_scaling
        self.cosmetic = cosmetic
        self.kappa = kappa
        self.frame_defects = FrameDefects(kappa=kappa) if from_lights else None
        self._sets: dict[tuple[Any, ...], tuple[Calibration, tuple[str, ...]]] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # the daemon's prepare and salvage threads share it

    def new_session(self) -> None:
        """Forget the defects learned from the lights (``from_lights``): a new session learns
        its own from its first lights."""
        with self._lock:
            if self.frame_defects is not None:
                self.frame_defects = FrameDefects(kappa=self.kappa)

    @property
    def active(self) -> bool:
        """Whether anything would be done to a light."""
        return bool(self.explicit) or self.library is not None or self.frame_defects is not None

    def __call__(self, mosaic: Mosaic) -> tuple[Mosaic, dict[str, Any] | None]:
        """The pipeline's calibration stage (``pipeline.Calibration``): the calibrated mosaic
        and the journal's ``calibration`` entry (:meth:`CalibrationResult.as_json`)."""
        calibrated, result = self.calibrate(mosaic)
        return calibrated, result.as_json()

    def calibrate(self, mosaic: Mosaic) -> tuple[Mosaic, CalibrationResult]:
        """The calibrated mosaic and what was done; never raises for a master that does not
        fit (it is refused, with the reason among the warnings). Thread-safe."""
        with self._lock:
            return self._calibrate(mosaic)

    def _calibrate(self, mosaic: Mosaic) -> tuple[Mosaic, CalibrationResult]:
        calibration, warnings_ = self._set_for(mosaic.shape, mosaic.pattern, mosaic.meta)
        defects = calibration.defects
        if self.frame_defects is not None and calibration.dark is None:
            self.frame_defects.learn(mosaic.data, mosaic.pattern)  # before calibration
            defects = (
                np.union1d(defects, self.frame_defects.defects)
                if defects.size
                else self.frame_defects.defects
            )
        data = calibration.apply(
            mosaic.data, mosaic.meta.exposure_s, mosaic.saturation, in_place=self.in_place
        )
        repaired = repair(data, defects, mosaic.pattern) if defects.size else 0
        for text in warnings_:
            if text not in self._warned:
                self._warned.add(text)
                log.warning("calibration: %s", text)
        return mosaic.replace(data), CalibrationResult(calibration.names(), repaired, warnings_)

    def _set_for(
        self, shape: tuple[int, int], pattern: str | None, meta: FrameMeta
    ) -> tuple[Calibration, tuple[str, ...]]:
        key = (
            shape,
            pattern,
            meta.camera,
            meta.iso,
            _rounded(meta.exposure_s),
            _rounded(meta.temperature_c),
        )
        if key in self._sets:
            return self._sets[key]
        chosen: dict[str, Master] = {}
        notes: list[str] = []
        if self.library is not None:
            chosen, notes = self.library.match(shape, pattern, meta)
        for kind, master in self.explicit.items():
            try:
                check_fits(master.info, shape, pattern)
            except CalibrationError as err:
                notes.append(err.reason + "; the light is calibrated without it")
                chosen.pop(kind, None)
                continue
            chosen[kind] = master
            notes = [n for n in notes if not n.startswith(f"no {kind} master")]
        if "dark" in self.explicit and "bias" not in self.explicit and not self.dark_scaling:
            chosen.pop("bias", None)
        defects = np.zeros(0, dtype=np.intp)
        dark = chosen.get("dark")
        if self.cosmetic and dark is not None and dark.data.ndim == 2:
            hot, cold = defect_map(dark.data, dark.info.pattern, kappa=self.kappa)
            defects = np.union1d(hot, cold)
        calibration = Calibration(
            bias=chosen.get("bias"),
            dark=dark,
            flat=chosen.get("flat"),
            dark_scaling=self.dark_scaling,
            defects=defects,
        )
        if not any(k in chosen for k in ("dark", "bias", "flat")) and (
            self.explicit or self.library
        ):
            notes.append(
                f"no master fits the light ({_light_text(shape, pattern, meta)}): "
                "stacked uncalibrated"
            )
        result = (calibration, tuple(notes))
        self._sets[key] = result
        return result


def cached_master(
    kind: str,
    paths: Sequence[Path],
    cache_dir: Path,
    *,
    offset: Master | None = None,
    ram_cap_bytes: int = DEFAULT_RAM_CAP,
    say: Callable[[str], None] | None = None,
    problem: Callable[[str], None] | None = None,
) -> Master:
    """The master of ``paths`` from ``cache_dir``, built and cached there if absent.

    The cache name hashes the frames' names, sizes and modification times (and the offset
    master's name), so changed frames are built again. A cache folder that cannot be written
    keeps the master in memory (``problem`` is told). Raises ``CalibrationError`` as
    :func:`~nightstack.calibration.masters.build_master`.
    """
    if len(paths) < 2:
        raise CalibrationError(f"a {kind} master needs 2 frames or more, found {len(paths)}")
    key = _listing(paths) + ("" if offset is None else f"offset\0{offset.info.describe()}")
    folder = paths[0].parent.name or "frames"
    cached = cache_dir / f"{kind}-{folder}-{_digest(key)}.fits"
    if cached.is_file():
        try:
            return read_master(cached)
        except CalibrationError as err:
            if problem is not None:
                problem(f"cached master unreadable, building it again: {err.reason}")
    if say is not None:
        say(f"building a {kind} master from {len(paths)} frames in {paths[0].parent}")
    master = build_master(
        kind, paths, offset=offset, ram_cap_bytes=ram_cap_bytes, spill_dir=cache_dir.parent
    )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_master(cached, master)
    except OSError as err:
        if problem is not None:
            problem(
                f"cannot cache the {kind} master in {cache_dir} ({err.strerror}): kept in memory"
            )
        return master
    return with_path(master, cached)


def load_masters(
    paths: dict[str, str | os.PathLike[str] | None],
    *,
    ram_cap_bytes: int = DEFAULT_RAM_CAP,
    say: Callable[[str], None] | None = None,
) -> dict[str, Master]:
    """Explicit masters by kind (``--bias``, ``--dark``, ``--flat``, ``--darkflat``): each a
    master file, or a folder of raw/FITS frames built into a master once (cached in the
    folder's ``.nightstack-masters``; in memory if that cannot be written). A flat folder has
    the dark-flat (else the bias) removed; a dark-flat only serves to build flats. ``None``
    entries are skipped.

    Raises ``CalibrationError`` for a file that is not a master, a master of another kind than
    the flag that named it, or a folder whose frames cannot be combined.
    """
    out: dict[str, Master] = {}
    for kind in ("bias", "darkflat", "dark", "flat"):  # flats need their offset first
        path = paths.get(kind)
        if path is None:
            continue
        folder = Path(path)
        if folder.is_dir():
            frames = sorted(
                p
                for p in folder.iterdir()
                if p.suffix.lower() in CALIBRATION_EXTENSIONS and p.is_file()
            )
            offset = out.get("darkflat") or out.get("bias") if kind == "flat" else None
            out[kind] = cached_master(
                kind,
                frames,
                folder / _CACHE_DIR,
                offset=offset,
                ram_cap_bytes=ram_cap_bytes,
                say=say,
                problem=lambda text: log.warning("calibration: %s", text),
            )
            continue
        master = read_master(folder)
        if master.info.kind != kind:
            raise CalibrationError(f"{folder.name} is a {master.info.kind} master, not a {kind}")
        out[kind] = master
    return out


def calibrator_from_settings(settings: Settings) -> Calibrator | None:
    """The :class:`Calibrator` of the settings (``bias``, ``dark``, ``flat``,
    ``darkflat``, ``calibration_dir``, ``dark_scaling``, ``temperature_tolerance_c``,
    ``cosmetic``, ``cosmetic_from_lights``, ``cosmetic_kappa``), masters read and library
    folders built now; ``None`` when nothing is configured.

    Raises ``ConfigError`` naming the setting for a master that cannot be used (missing, not
    a master, another kind) or a calibration folder that is not one: before the daemon is READY.
    """
    masters, library = _configured(settings)
    if not masters and library is None and not settings.cosmetic_from_lights:
        return None
    return Calibrator(
        masters,
        library,
        dark_scaling=settings.dark_scaling,
        cosmetic=settings.cosmetic,
        from_lights=settings.cosmetic_from_lights,
        kappa=settings.cosmetic_kappa,
        in_place=True,
    )


def _configured(settings: Settings) -> tuple[dict[str, Master], Library | None]:
    """The settings' explicit masters and library, read (and built) now. The daemon calls this
    once per configuration (its :class:`~nightstack.pipeline.prepare.Preparer`), not per session."""
    paths = {kind: getattr(settings, kind) for kind in KINDS}
    try:
        masters = load_masters(paths, ram_cap_bytes=settings.ram_cap_mb * 2**20)
    except CalibrationError as err:
        raise ConfigError(f"calibration master: {err.reason}") from err
    library = None
    if settings.calibration_dir is not None:
        try:
            library = Library(
                settings.calibration_dir,
                temperature_tolerance_c=settings.temperature_tolerance_c,
                dark_scaling=settings.dark_scaling,
                ram_cap_bytes=settings.ram_cap_mb * 2**20,
            )
        except CalibrationError as err:
            raise ConfigError(f"invalid setting 'calibration_dir': {err.reason}") from err
    return masters, library
