"""Small value types passed between the pipeline stages.

Conventions used everywhere:
- arrays are (rows, cols[, channels]); pixel coordinates are (x = column, y = row) with pixel
  centres at integers, in the full-resolution decoded frame;
- image data is linear float32, integer inputs scaled to [0, 1] by their full scale;
- a transform is a 2x3 matrix ``[[a, b, tx], [c, d, ty]]`` mapping a frame's pixel (x, y) to the
  reference frame's pixel coordinates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class FrameMeta:
    """What the file says about how it was taken; ``None`` where the file does not say."""

    exposure_s: float | None = None
    iso: float | None = None  # ISO for cameras, gain for astro cameras
    capture_time: datetime | None = None
    camera: str | None = None
    temperature_c: float | None = None  # sensor (or, failing that, camera) temperature, Celsius


BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
"""The four phases of a 2x2 Bayer tile, named row by row from the tile's top-left site."""


@dataclass(frozen=True, eq=False)
class Mosaic:
    """A decoded light (or calibration) frame still in the sensor's colour filter mosaic.

    ``data``: (rows, cols) float32, linear, the visible area in sensor orientation (row 0 at
    the top). Units: per CFA site ``(adu - black_c) / (white_c - black_c)``, i.e. the sensor's
    black level of that site's colour is 0 and its white (clipping) level is 1.0 -- the same
    units as :attr:`Frame.image` before white balance. Noise below the black level stays negative
    (nothing is clipped), so the mean of many dark frames is unbiased. FITS files, which carry no
    black level, are ``value / full scale`` (see :mod:`nightstack.loaders`).

    ``pattern``: the colours of the 2x2 tile whose top-left site is visible pixel (0, 0), row by
    row, one of :data:`BAYER_PATTERNS`; e.g. ``"RGGB"``: (x=0, y=0) red, (1, 0) and (0, 1) green,
    (1, 1) blue. ``white_balance``: (r, g, b) multipliers normalised to green 1, applied at
    demosaic (the data itself is not white balanced). ``saturation``: the level (in ``data``
    units) at and above which the sensor clipped; calibration keeps such pixels at or above it so
    they stay recognisably saturated. ``meta``: what the file says about the exposure.
    """

    path: Path
    data: FloatArray
    pattern: str
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)
    saturation: float = 1.0
    meta: FrameMeta = field(default_factory=FrameMeta)

    def __post_init__(self) -> None:
        if self.pattern not in BAYER_PATTERNS:
            raise ValueError(f"pattern must be one of {BAYER_PATTERNS}, not {self.pattern!r}")
        if self.data.ndim != 2:
            raise ValueError(f"mosaic data must be 2-D (rows, cols), not {self.data.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the mosaic."""
        return (int(self.data.shape[0]), int(self.data.shape[1]))

    def replace(self, data: FloatArray) -> Mosaic:
        """The same frame with new ``data`` of the same shape (e.g. after calibration)."""
        if data.shape != self.data.shape:
            raise ValueError(f"data shape {data.shape} differs from the mosaic's {self.shape}")
        return dataclasses.replace(self, data=data)


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
    (:mod:`nightstack.demosaic`: ``value = code / MOSAIC_SCALE + MOSAIC_LOW``); ``pattern`` and
    ``white_balance`` as in :class:`Mosaic`; ``demosaic`` the OpenCV method that turns it into
    RGB (``nightstack.demosaic.METHODS``); ``luminance`` and ``bin`` as in :class:`Frame` (the
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
