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

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class FrameMeta:
    """What the file says about how it was taken; ``None`` where the file does not say."""

    exposure_s: float | None = None
    iso: float | None = None  # ISO for cameras, gain for astro cameras
    capture_time: datetime | None = None
    camera: str | None = None


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
