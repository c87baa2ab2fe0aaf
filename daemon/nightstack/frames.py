"""Small value types passed between the pipeline stages.

Conventions used everywhere:
- arrays are (rows, cols[, channels]); pixel coordinates are (x = column, y = row) with pixel
  centres at integers, in the full-resolution decoded frame;
- image data is linear float32, integer inputs scaled to [0, 1] by their full scale;
- a transform is a 2x3 matrix ``[[a, b, tx], [c, d, ty]]`` mapping a frame's pixel (x, y) to the
  reference frame's pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from nightstack.arrays import FloatArray


@dataclass(frozen=True)
class FrameMeta:
    """What the file says about how it was taken; ``None`` where the file does not say."""

    exposure_s: float | None = None
    iso: float | None = None  # ISO for cameras, gain for astro cameras
    capture_time: datetime | None = None
    camera: str | None = None
    temperature_c: float | None = None  # sensor (or, failing that, camera) temperature, Celsius
    filter: str | None = None  # the filter in the light path (FITS FILTER), e.g. "Ha"


BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
"""The four phases of a 2x2 Bayer tile, named row by row from the tile's top-left site."""


SiteLevels = tuple[float, float, float, float]
"""One number per site of the 2x2 Bayer tile, in the order (0, 0), (0, 1), (1, 0), (1, 1) as
(row, column) offsets from the tile's top-left site (the same order as a pattern's letters)."""


@dataclass(frozen=True, eq=False, init=False)
class Mosaic:
    """A decoded light (or calibration) frame still in the sensor's colour filter mosaic.

    ``data``: (rows, cols) float32, linear, the visible area in sensor orientation (row 0 at
    the top). Units: per CFA site ``(adu - black_c) / (white_c - black_c)``, i.e. the sensor's
    black level of that site's colour is 0 and its white (clipping) level is 1.0 -- the same
    units as :attr:`Frame.image` before white balance. Noise below the black level stays negative
    (nothing is clipped), so the mean of many dark frames is unbiased. FITS files, which carry no
    black level, are ``value / full scale`` (see :mod:`nightstack.io.loaders`).

    A camera raw's mosaic is held as what the sensor gave (:meth:`from_adu`): ``adu`` (rows,
    cols) uint16 with ``black`` and ``span`` (white - black) per site of the 2x2 tile
    (:data:`SiteLevels`), 2 bytes a pixel. ``data`` is then formed from them on first use, in
    float32 exactly as ``(float32(adu) - float32(black)) / float32(span)``, and kept (a caller
    may change it in place, e.g. calibration); :meth:`values` gives a band of rows without
    forming the whole. A mosaic made from ``data`` has ``adu`` None.

    ``pattern``: the colours of the 2x2 tile whose top-left site is visible pixel (0, 0), row by
    row, one of :data:`BAYER_PATTERNS`; e.g. ``"RGGB"``: (x=0, y=0) red, (1, 0) and (0, 1) green,
    (1, 1) blue. ``white_balance``: (r, g, b) multipliers normalised to green 1, applied at
    demosaic (the data itself is not white balanced). ``saturation``: the level (in ``data``
    units) at and above which the sensor clipped; calibration keeps such pixels at or above it so
    they stay recognisably saturated. ``meta``: what the file says about the exposure.
    """

    path: Path
    pattern: str
    white_balance: tuple[float, float, float]
    saturation: float
    meta: FrameMeta
    adu: npt.NDArray[np.uint16] | None
    black: SiteLevels | None
    span: SiteLevels | None
    _data: FloatArray | None

    def __init__(
        self,
        path: Path,
        data: FloatArray,
        pattern: str,
        white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0),
        saturation: float = 1.0,
        meta: FrameMeta | None = None,
    ) -> None:
        self._set(path, pattern, white_balance, saturation, meta, data, None, None, None)

    @classmethod
    def from_adu(
        cls,
        path: Path,
        adu: npt.NDArray[np.uint16],
        black: SiteLevels,
        span: SiteLevels,
        pattern: str,
        white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0),
        saturation: float = 1.0,
        meta: FrameMeta | None = None,
    ) -> Mosaic:
        """A raw's mosaic from its (rows, cols) uint16 ADU and per-site ``black`` and ``span``
        (each > 0, :data:`SiteLevels` order); ``data`` is not formed until asked for."""
        if adu.dtype != np.uint16:
            raise ValueError(f"adu must be uint16, not {adu.dtype}")
        black = _site_levels(black, "black")
        span = _site_levels(span, "span")
        if min(span) <= 0:
            raise ValueError(f"span must be > 0 at every site, not {span}")
        mosaic = cls.__new__(cls)
        mosaic._set(path, pattern, white_balance, saturation, meta, None, adu, black, span)
        return mosaic

    def _set(
        self,
        path: Path,
        pattern: str,
        white_balance: tuple[float, float, float],
        saturation: float,
        meta: FrameMeta | None,
        data: FloatArray | None,
        adu: npt.NDArray[np.uint16] | None,
        black: SiteLevels | None,
        span: SiteLevels | None,
    ) -> None:
        if pattern not in BAYER_PATTERNS:
            raise ValueError(f"pattern must be one of {BAYER_PATTERNS}, not {pattern!r}")
        pixels = data if data is not None else adu
        if pixels is None or pixels.ndim != 2:
            shape = None if pixels is None else pixels.shape
            raise ValueError(f"mosaic data must be 2-D (rows, cols), not {shape}")
        for name, value in (
            ("path", path),
            ("pattern", pattern),
            ("white_balance", tuple(white_balance)),
            ("saturation", saturation),
            ("meta", meta if meta is not None else FrameMeta()),
            ("adu", adu),
            ("black", black),
            ("span", span),
            ("_data", data),
        ):
            object.__setattr__(self, name, value)

    @property
    def data(self) -> FloatArray:
        """(rows, cols) float32 values (see the class docstring); formed once from ``adu``."""
        if self._data is None:
            object.__setattr__(self, "_data", self.values(0, self.shape[0]))
        assert self._data is not None
        return self._data

    @property
    def has_data(self) -> bool:
        """Whether ``data`` exists as an array (a FITS mosaic, a calibrated one, or a raw's once
        asked for): then it, not ``adu``, holds the values."""
        return self._data is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the mosaic."""
        pixels = self._data if self._data is not None else self.adu
        assert pixels is not None
        return (int(pixels.shape[0]), int(pixels.shape[1]))

    def values(self, row_start: int, row_stop: int, out: FloatArray | None = None) -> FloatArray:
        """Rows ``row_start:row_stop`` (clipped to the frame) of ``data`` without forming the
        whole: (n, cols), a view of ``data`` when it exists, else float32 computed from ``adu``
        (into ``out``, a float32 array of at least n rows, if given), equal to those rows of
        ``data`` bit for bit."""
        start, stop, _ = slice(row_start, row_stop).indices(self.shape[0])
        stop = max(start, stop)
        if self._data is not None:
            return self._data[start:stop]
        assert self.adu is not None and self.black is not None and self.span is not None
        adu = self.adu[start:stop]
        band = np.empty(adu.shape, np.float32) if out is None else out[: stop - start]
        if band.shape != adu.shape or band.dtype != np.float32:
            raise ValueError(f"out must be float32 with {adu.shape[1]} columns, not {band.shape}")
        cols = adu.shape[1]
        if len(set(self.black)) == 1 and len(set(self.span)) == 1:  # one level: whole rows
            np.subtract(adu, np.float32(self.black[0]), out=band, dtype=np.float32)
            band /= np.float32(self.span[0])
            return band
        for dy in (0, 1):  # per row parity: each row alternates two sites along its columns
            site_row = (start + dy) % 2
            black = np.empty(cols, np.float32)
            span = np.empty(cols, np.float32)
            for dx in (0, 1):
                black[dx::2] = self.black[2 * site_row + dx]
                span[dx::2] = self.span[2 * site_row + dx]
            np.subtract(adu[dy::2], black, out=band[dy::2], dtype=np.float32)
            band[dy::2] /= span
        return band

    def replace(self, data: FloatArray) -> Mosaic:
        """The same frame with new ``data`` of the same shape (e.g. after calibration)."""
        if data.shape != self.shape:
            raise ValueError(f"data shape {data.shape} differs from the mosaic's {self.shape}")
        return Mosaic(self.path, data, self.pattern, self.white_balance, self.saturation, self.meta)


def _site_levels(values: SiteLevels, name: str) -> SiteLevels:
    levels = tuple(float(v) for v in values)
    if len(levels) != 4 or not all(np.isfinite(levels)):
        raise ValueError(f"{name} must be four finite numbers (one per 2x2 site), not {values}")
    return (levels[0], levels[1], levels[2], levels[3])


@dataclass(frozen=True, eq=False)
class Frame:
    """A decoded light frame.

    ``image``: (rows, cols, channels) float32 linear, channels 3 (RGB) or 1 (mono).
    ``luminance``: (rows // bin, cols // bin) float32, the binned luminance used for detection;
    a luminance pixel (u, v) is centred on full-resolution (bin * u + (bin - 1) / 2, same for v).
    """

    path: Path
    image: FloatArray
    luminance: FloatArray
    bin: int
    meta: FrameMeta = field(default_factory=FrameMeta)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full-resolution image."""
        return (int(self.image.shape[0]), int(self.image.shape[1]))


@dataclass(frozen=True, eq=False)
class MosaicFrame:
    """A calibrated light kept in its sensor mosaic: what the pipeline stacks for Bayer sensors.

    ``codes``: (rows, cols) uint16, the calibrated mosaic quantised as the frame store keeps it
    (:mod:`nightstack.io.demosaic`: ``value = code / MOSAIC_SCALE + MOSAIC_LOW``); ``pattern`` and
    ``white_balance`` as in :class:`Mosaic`; ``demosaic`` the OpenCV method that turns it into
    RGB (``nightstack.io.demosaic.METHODS``); ``luminance`` and ``bin`` as in :class:`Frame` (the
    2x2 superpixel mean of the calibrated mosaic for ``bin=2``). Demosaiced it is 3 channels.
    """

    path: Path
    codes: npt.NDArray[np.uint16]
    pattern: str
    white_balance: tuple[float, float, float]
    demosaic: str
    luminance: FloatArray
    bin: int
    meta: FrameMeta = field(default_factory=FrameMeta)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full-resolution frame."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))


@dataclass(frozen=True, eq=False)
class Stars:
    """Stars found in one frame, brightest first, in full-resolution (x, y) pixel coordinates.

    ``xy``: (n, 2) float64; ``flux``: (n,) float64 in luminance units (background subtracted).
    Per-frame summaries: ``fwhm_px`` median FWHM in full-resolution pixels, ``roundness`` median
    DAOFind roundness (0 = round), ``elongation`` median major/minor axis ratio (1 = round),
    ``background`` and ``noise``: sky level and sigma-clipped sky standard deviation of the
    luminance. Star summaries (FWHM, roundness, elongation) are NaN when there are no stars;
    background and noise are still measured (a cloudy frame shows there).

    The list is capped (``max_stars``, for alignment); ``detected`` is the number of stars the
    frame shows before the cap (the quality gates compare it, so a dense Milky Way field still
    shows haze). ``aperture_flux``: (n,) float64 background-subtracted flux in an aperture of
    radius ``APERTURE_FWHM`` x the frame's FWHM (so it holds the same fraction of every star's
    light whatever the seeing), NaN for saturated stars; the transparency compares it.
    """

    xy: FloatArray
    flux: FloatArray
    fwhm_px: float
    roundness: float
    elongation: float
    background: float
    noise: float
    detected: int = -1
    aperture_flux: FloatArray | None = None

    def __post_init__(self) -> None:
        if self.detected < 0:
            object.__setattr__(self, "detected", int(self.xy.shape[0]))

    def __len__(self) -> int:
        return int(self.xy.shape[0])


@dataclass(frozen=True, eq=False)
class Alignment:
    """A frame registered to the reference.

    ``matrix``: (2, 3) float64, frame (x, y) -> reference (x, y).
    ``pairs``: (m, 2, 2) float64, the inlier pairs ``[[frame x, y], [reference x, y]]``.
    ``residual_px``: RMS distance of the inliers after the fit, full-resolution pixels.
    ``indices``: (m, 2) int, the inlier pairs as (frame star index, reference star index).
    """

    matrix: FloatArray
    pairs: FloatArray
    inliers: int
    residual_px: float
    indices: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros((0, 2), np.intp))

    def as_list(self) -> list[list[float]]:
        """The matrix as nested lists, for JSON."""
        return [[float(v) for v in row] for row in self.matrix]


IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
