"""The sky model of a seeded synthetic night: what is where, how bright, in every frame.

Every later test and the demo rely on it, so it states its truth exactly:

- Frame 0 is the reference. ``SkyModel.transform(i)`` is the 2x3 matrix mapping a pixel (x, y) of
  frame ``i`` to frame 0's pixel (x, y) (full-resolution decoded coordinates, pixel centres at
  integers), the same convention as ``nightstack.frames.Alignment.matrix``.
- Stars live in reference coordinates. Frame ``i`` sees them through the inverse transform: the
  field drifts by ``drift_px`` per frame and turns by ``rotation_deg`` per frame about ``pivot``
  (an untracked or alt-az mount).
- Things on the ground do not move with the sky: hot pixels, the landscape silhouette with its lit
  windows, the light-pollution gradient and the moon glow (whose direction turns over the
  night) are fixed in frame coordinates.
- The night changes: a per-frame sky level scales the whole sky background, transparency scales
  all light from beyond the atmosphere (stars, nebula, satellites), and the seeing (FWHM) may
  change from frame to frame.
- Signal is in electrons; a pixel records ``electrons / gain + black_level`` ADU, 14-bit, after
  Poisson shot noise and Gaussian read noise. A star's ``flux_e`` is the electrons it puts into the
  green channel (summed over a fully green-sampled plane); red and blue sites see ``flux_e`` times
  the star's colour weights. The sensor's Bayer tile is ``cfa_pattern`` (RGGB, BGGR, GRBG or
  GBRG), written as the DNG's CFAPattern. The DNG's colour matrix makes camera RGB equal linear
  sRGB and its ``AsShotNeutral`` is (1, 1, 1), so LibRaw decodes a pixel of ``v`` ADU to
  ``(v - black) / (white - black)`` of full scale in its own colour channel, provided LibRaw's
  ``adjust_maximum_thr`` is 0: by default (0.75) LibRaw takes a frame's brightest pixel as white
  when it lies between 0.75 and 1 of the white level, so a frame with no saturated star (haze,
  few stars) decodes up to 1.33x brighter.

Rendering (``nightstack.simulate.render``) is pure in (model, frame index): ``render(i)``
always returns the same array.

Why one module of this size: the sky model is the one seeded truth every rendered frame and
every test's oracle reads.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import erf

from nightstack.arrays import FloatArray, IntArray, UInt16Array
from nightstack.simulate.dng import CFA_PATTERNS
from nightstack.simulate.render import PSF_RADIUS_SIGMA, SKY_RGB, expected_electrons, raw_frame

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # Gaussian FWHM / sigma
_STAR_CELL_PX = 256  # stars are drawn per sky cell, so a patch of sky keeps its stars whatever
# the frame count or motion (only the covered region grows)
_CELL_OFFSET = 1 << 20  # keeps cell indices non-negative for SeedSequence
_FLUX_SLOPE = 0.6  # N(>F) ∝ F^-0.6: many faint stars, few bright ones
_FAINTEST_PEAK_SNR = 2.0  # the faintest stars sit below detection, as on a real sky
_BRIGHTEST_PEAK_SNR = 20_000.0  # the brightest ones saturate hard
_STAR_COLOUR_SPREAD = 0.35  # colour weights (1 + s c, 1, 1 - s c) with c in [-1, 1]
_APERTURE_FWHM = 1.0  # aperture radius (in FWHM) of the flux-to-noise ratio in the truth
_NEBULA_RGB = (1.5, 0.7, 0.9)  # emission nebula: H-alpha red with some OIII
_NEBULA_PEAK = 0.25  # nebula peak as a fraction of the sky level: faint, needs a stretch
_GROUND_LEVEL = 0.02  # the landscape's own glow as a fraction of the sky: a dark silhouette
_HOT_PIXEL_DENSITY = 1 / 30_000  # one hot pixel per 30,000 pixels (a warm DSLR sensor)
_HOT_PIXEL_ADU = (1500, 12_000)  # excess ADU of a hot pixel, uniform in this range
_CLOUD_STAR_FACTOR = 0.05  # cloud dims stars (and nebula, satellites) 20x
_CLOUD_SKY_FACTOR = 1.8  # and brightens the sky (scattered light pollution)
_CLOUD_LUMP = 0.8  # peak of the lumpy cloud glow as a fraction of the sky level
_CLOUD_BLOBS = 7  # Gaussian lumps making up the cloud glow
_SATELLITE_LINEAR_E = 8000.0  # electrons per pixel of trail length: a bright trail
_SATELLITE_SIGMA_PX = 1.0  # trail cross-section sigma: FWHM 2.35 px
_FRAME_GAP_S = 2.0  # camera dead time between exposures, for the capture times
_MILKY_WAY_SIGMA = 0.12  # band profile sigma, frame diagonals: a band a third of the frame wide
_GLOW_DISTANCE = 1.0  # the moon sits this many frame diagonals from the frame centre
_GLOW_SCALE = 1.0  # glow falls off as a Gaussian of this many diagonals: smooth, low-order
_GLOW_SWEEP_DEG = (30.0, 70.0)  # the moon's bearing turns by this much over the session
_STREAM_STARS, _STREAM_LANDSCAPE, _STREAM_HOT, _STREAM_NOISE = 1, 2, 3, 4  # independent
_STREAM_SATELLITE, _STREAM_CLOUD, _STREAM_TRAIL, _STREAM_NEBULA = 5, 6, 7, 8  # random streams
_STREAM_GLOW, _STREAM_MILKY_WAY = 9, 11  # the moon's path, the band (10: seeing_jitter)
_STREAM_SCENERY = 12  # the textured landscape (simulate.landscape)
# per-frame schedules (SkyModel fields) and the values each allows
_SCHEDULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "sky_levels": (lambda v: v > 0, "> 0"),
    "glow": (lambda v: v >= 0, ">= 0"),
    "transparency": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "fwhm_schedule": (lambda v: v > 0.5, "> 0.5"),
}


def frame_indices(value: int | Iterable[int] | None) -> tuple[int, ...]:
    """Frame indices from None, one int or an iterable of ints, sorted and unique."""
    if value is None:
        return ()
    if isinstance(value, int | np.integer):
        return (int(value),)
    return tuple(sorted({int(v) for v in value}))


def cfa_channels(pattern: str) -> IntArray:
    """(2, 2) colour index (0 red, 1 green, 2 blue) of each site of a Bayer ``pattern`` such as
    ``"RGGB"``, by (row % 2, col % 2)."""
    if pattern not in CFA_PATTERNS:
        raise ValueError(f"cfa_pattern must be one of {', '.join(CFA_PATTERNS)}, got {pattern!r}")
    return np.array(["RGB".index(c) for c in pattern], dtype=np.intp).reshape(2, 2)


def _band_profile(band: dict[str, Any], xy: FloatArray) -> FloatArray:
    """The Milky Way band's density profile (1 on its centre line) at (n, 2) reference xy."""
    angle = math.radians(band["angle_deg"])
    px, py = band["point"]
    distance = (xy[:, 1] - py) * math.cos(angle) - (xy[:, 0] - px) * math.sin(angle)
    return np.exp(-0.5 * (distance / band["sigma_px"]) ** 2)


def _clip_line(
    point: tuple[float, float], angle: float, width: int, height: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where the line through ``point`` at ``angle`` (radians) enters and leaves the frame box
    [-0.5, width - 0.5] x [-0.5, height - 0.5] (Liang-Barsky)."""
    direction = (math.cos(angle), math.sin(angle))
    t_min, t_max = -math.inf, math.inf
    for p0, d, lo, hi in (
        (point[0], direction[0], -0.5, width - 0.5),
        (point[1], direction[1], -0.5, height - 0.5),
    ):
        if abs(d) < 1e-12:
            continue
        t0, t1 = sorted(((lo - p0) / d, (hi - p0) / d))
        t_min, t_max = max(t_min, t0), min(t_max, t1)
    start = (point[0] + t_min * direction[0], point[1] + t_min * direction[1])
    end = (point[0] + t_max * direction[0], point[1] + t_max * direction[1])
    return start, end


@dataclass(frozen=True, eq=False)
class _Catalogue:
    """Stars in reference coordinates, brightest first: xy (n, 2), flux_e (n,), rgb (n, 3)."""

    xy: FloatArray
    flux_e: FloatArray
    rgb: FloatArray


@dataclass(frozen=True, eq=False)
class Landscape:
    """Ground fixed in frame coordinates.

    ``skyline``: (cols,) float, the row coordinate of the ground's top edge in each column (a
    pixel is ground below it); ``top_row``: first row holding any ground; ``sky_cover``:
    (rows - top_row, cols) float32, the fraction of each pixel that shows sky; ``windows``:
    (n, 4) int, lit windows as [x0, y0, x1, y1) pixel boxes; ``brightness``: with ``scenery``,
    (rows - top_row, cols) float32 the ground's light as a fraction of the sky level (else None:
    a uniform faint glow).
    """

    skyline: FloatArray
    top_row: int
    sky_cover: FloatArray
    windows: npt.NDArray[np.int64]
    brightness: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class SkyModel:
    """A seeded synthetic night: what the sky, the ground and the camera do in every frame.

    Every quantity is in full-resolution frame pixels, electrons or ADU as named. All random
    choices are drawn from independent streams of ``seed``, so a model is fully determined by
    its fields and ``render(i)`` is a pure function of (model, i).

    Attributes
    ----------
    width, height
        Frame size in pixels (both even: the CFA tiles in 2x2).
    frames
        Night length; the star field is generated to cover frames 0 .. frames - 1 fully.
    seed
        Non-negative seed of every random choice.
    stars
        Expected number of stars inside the reference frame (more are drawn around it).
    fwhm_px
        FWHM of the Gaussian PSF, full-resolution pixels.
    drift_px, drift_angle_deg
        Field translation per frame and its direction (degrees from +x towards +y).
    rotation_deg
        Field rotation per frame, degrees, turning +x towards +y, about ``pivot``.
    pivot
        Rotation centre (x, y) in frame pixels; ``None``: the pole sits one frame height above
        the top edge, at (width / 2, -height).
    sky_e, gradient, gradient_angle_deg
        Sky level at the frame centre (electrons per green pixel), its linear change from one
        side of the frame to the other (fraction of ``sky_e``) and that side's direction.
    read_noise_e, gain_e_per_adu, black_level, white_level
        Camera: read noise (electrons RMS), gain, 14-bit raw levels.
    hot_pixels
        Number of hot pixels; ``None``: one per 30,000 pixels.
    landscape_fraction, windows
        Mean fraction of the frame height covered by the landscape (0 disables it) and the
        number of lit windows in it.
    scenery
        A textured landscape (``nightstack.simulate.landscape``: grass, trees, rocks, a
        building whose ``windows`` are lit) instead of a dark silhouette.
    nebula
        Add a faint, soft emission nebula (moves with the stars).
    exposure_s, iso, start_time
        Exposure metadata; frame i starts at ``start_time + i * (exposure_s + 2 s)``.
    satellite, cloudy, trailed
        Frame indices with a satellite trail, cloud, or wind-trailed stars.
    trail_px
        Length of a wind-trailed star's smear, pixels.
    sky_levels
        Per-frame multiplier of the whole sky background (light pollution, moon, twilight):
        ``frames`` values > 0, or empty for 1 throughout (see ``sky_step``, ``sky_ramp``).
    glow
        Per-frame amplitude of a moon glow, a smooth gradient whose direction turns over the
        session, as a fraction of the frame's sky level at its brightest point in the frame
        (see ``moon_glow``): ``frames`` values >= 0, or empty for none.
    transparency
        Per-frame multiplier of all light from beyond the atmosphere (stars, nebula,
        satellites), in [0, 1]: 0.3 is a thin haze, 0.85 a 15 % dip; empty for 1 throughout.
    fwhm_schedule
        Per-frame star FWHM, pixels (seeing that varies, see ``seeing_jitter``); empty for
        ``fwhm_px`` throughout. Catalogue properties (``star_peak_snr``, ``star_snr``,
        ``star_saturated``) stay those of ``fwhm_px``.
    milky_way
        Star density contrast of a Milky Way band across the field (``milky_way_band``): 0
        for none; 10 puts 11x the ``stars`` density on the band's centre line.
    cfa_pattern
        The sensor's Bayer tile from pixel (0, 0), one of ``CFA_PATTERNS``: each colour is
        rendered on its own sites and the DNG's CFAPattern tag says the same.
    planted_stars
        Extra stars of known colour, each (x, y, flux_e, r, g, b): reference pixels, electrons
        in a green-weight-1 channel, and the colour weights of the red, green and blue sites
        (a catalogue star has (1 + 0.35 c, 1, 1 - 0.35 c), c in [-1, 1]). They join the
        catalogue (``star_xy`` etc., sorted by flux) like any other star.
    """

    width: int = 1200
    height: int = 800
    frames: int = 10
    seed: int = 1
    stars: int = 400
    fwhm_px: float = 3.5
    drift_px: float = 3.0
    drift_angle_deg: float = 195.0
    rotation_deg: float = 0.05
    pivot: tuple[float, float] | None = None
    sky_e: float = 600.0
    gradient: float = 0.3
    gradient_angle_deg: float = 60.0
    read_noise_e: float = 3.0
    gain_e_per_adu: float = 1.0
    black_level: int = 512
    white_level: int = 16383
    hot_pixels: int | None = None
    landscape_fraction: float = 0.08
    windows: int = 4
    scenery: bool = False
    nebula: bool = True
    exposure_s: float = 30.0
    iso: int = 1600
    start_time: datetime = datetime(2024, 8, 10, 22, 0, 0)
    satellite: tuple[int, ...] = ()
    cloudy: tuple[int, ...] = ()
    trailed: tuple[int, ...] = ()
    trail_px: float = 15.0
    sky_levels: tuple[float, ...] = ()
    glow: tuple[float, ...] = ()
    transparency: tuple[float, ...] = ()
    fwhm_schedule: tuple[float, ...] = ()
    milky_way: float = 0.0
    cfa_pattern: str = "RGGB"
    planted_stars: tuple[tuple[float, ...], ...] = ()  # each (x, y, flux_e, r, g, b)

    def __post_init__(self) -> None:
        for name in ("satellite", "cloudy", "trailed"):
            object.__setattr__(self, name, frame_indices(getattr(self, name)))
        for name in _SCHEDULES:
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name) or ()))
        planted = tuple(tuple(float(v) for v in star) for star in self.planted_stars)
        object.__setattr__(self, "planted_stars", planted)
        if self.pivot is not None:
            object.__setattr__(self, "pivot", (float(self.pivot[0]), float(self.pivot[1])))
        if isinstance(self.start_time, str):
            object.__setattr__(self, "start_time", datetime.fromisoformat(self.start_time))
        problems = []
        if self.width < 64 or self.height < 64 or self.width % 2 or self.height % 2:
            problems.append(
                f"width and height must be even and >= 64, got {self.width}x{self.height}"
            )
        if self.frames < 1:
            problems.append(f"frames must be >= 1, got {self.frames}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if self.stars < 0:
            problems.append(f"stars must be >= 0, got {self.stars}")
        if not self.fwhm_px > 0.5:
            problems.append(f"fwhm_px must be > 0.5, got {self.fwhm_px}")
        if not self.sky_e > 0 or self.read_noise_e < 0 or not self.gain_e_per_adu > 0:
            problems.append("sky_e and gain_e_per_adu must be > 0 and read_noise_e >= 0")
        if not 0 <= abs(self.gradient) < 2:
            problems.append(f"gradient must be in (-2, 2), got {self.gradient}")
        if not 0 <= self.black_level < self.white_level <= 65535:
            problems.append("need 0 <= black_level < white_level <= 65535")
        if not 0 <= self.landscape_fraction <= 0.5:
            problems.append(
                f"landscape_fraction must be in [0, 0.5], got {self.landscape_fraction}"
            )
        if self.trail_px < 0 or self.windows < 0 or (self.hot_pixels or 0) < 0:
            problems.append("trail_px, windows and hot_pixels must be >= 0")
        for name, (allowed, text) in _SCHEDULES.items():
            values = getattr(self, name)
            if values and len(values) != self.frames:
                problems.append(
                    f"{name} needs {self.frames} values (one a frame), got {len(values)}"
                )
            elif not all(math.isfinite(v) and allowed(v) for v in values):
                problems.append(f"{name} values must be {text}")
        if any(len(star) != 6 or min(star[2:]) < 0 for star in self.planted_stars):
            problems.append("planted_stars are (x, y, flux_e, r, g, b) with flux and colour >= 0")
        if not 0 <= self.milky_way <= 1000:
            problems.append(f"milky_way must be in [0, 1000], got {self.milky_way}")
        if self.cfa_pattern not in CFA_PATTERNS:
            problems.append(
                f"cfa_pattern must be one of {', '.join(CFA_PATTERNS)}, got {self.cfa_pattern!r}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    # ---- construction helpers ---------------------------------------------------------------

    @classmethod
    def from_truth(cls, truth: dict[str, Any] | str | os.PathLike[str]) -> SkyModel:
        """The model a ``truth.json`` (path or loaded dict) was written from."""
        data = truth if isinstance(truth, dict) else json.loads(Path(truth).read_text())
        return cls(**data["parameters"])

    def parameters(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``SkyModel(**model.parameters())`` == model)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @cached_property
    def cfa(self) -> IntArray:
        """(2, 2) colour index (0 red, 1 green, 2 blue) by (row % 2, col % 2)."""
        return cfa_channels(self.cfa_pattern)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    # ---- geometry --------------------------------------------------------------------------

    @property
    def pivot_xy(self) -> tuple[float, float]:
        """The rotation centre (x, y) in frame pixels."""
        return self.pivot if self.pivot is not None else (self.width / 2.0, -float(self.height))

    @property
    def psf_sigma_px(self) -> float:
        """Gaussian sigma of the PSF, pixels."""
        return self.fwhm_px / _FWHM_PER_SIGMA

    def _forward(self, i: int) -> FloatArray:
        """(3, 3) homogeneous matrix mapping reference (x, y) to frame ``i`` (x, y)."""
        phi = math.radians(self.rotation_deg * i)
        c, s = math.cos(phi), math.sin(phi)
        drift = math.radians(self.drift_angle_deg)
        px, py = self.pivot_xy
        rot = np.array([[c, -s], [s, c]])
        shift = np.array([px, py]) - rot @ np.array([px, py])
        shift += i * self.drift_px * np.array([math.cos(drift), math.sin(drift)])
        forward = np.eye(3)
        forward[:2, :2] = rot
        forward[:2, 2] = shift
        return forward

    def transform(self, i: int) -> FloatArray:
        """(2, 3) float64 matrix mapping frame ``i`` pixel (x, y) to reference pixel (x, y)."""
        return np.linalg.inv(self._forward(i))[:2].copy()

    def to_frame(self, i: int, xy: npt.ArrayLike) -> FloatArray:
        """Reference (x, y) points, shape (n, 2), as seen in frame ``i``; returns (n, 2)."""
        points = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        forward = self._forward(i)
        return points @ forward[:2, :2].T + forward[:2, 2]

    def fwhm(self, i: int) -> float:
        """Star FWHM of frame ``i``, pixels (``fwhm_schedule``, else ``fwhm_px``)."""
        return self.fwhm_schedule[i] if self.fwhm_schedule else self.fwhm_px

    def psf_sigma(self, i: int) -> float:
        """Gaussian sigma of frame ``i``'s PSF, pixels."""
        return self.fwhm(i) / _FWHM_PER_SIGMA

    def _star_margin(self) -> float:
        """How far outside the frame a star can still put light into it, pixels."""
        sigma = max((self.fwhm_px, *self.fwhm_schedule)) / _FWHM_PER_SIGMA
        return PSF_RADIUS_SIGMA * sigma + self.trail_px / 2.0 + 2.0

    @cached_property
    def sky_region(self) -> tuple[float, float, float, float]:
        """Reference-coordinate box (x0, y0, x1, y1) holding every star that can light any of
        frames 0 .. frames - 1."""
        w, h, m = self.width, self.height, self._star_margin()
        corners = np.array([[-m, -m], [w - 1 + m, -m], [-m, h - 1 + m], [w - 1 + m, h - 1 + m]])
        ref = np.concatenate(
            [corners @ t[:, :2].T + t[:, 2] for t in map(self.transform, range(self.frames))]
        )
        x0, y0 = ref.min(axis=0)
        x1, y1 = ref.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    # ---- noise-free levels -----------------------------------------------------------------

    @property
    def pixel_noise_e(self) -> float:
        """Noise of one sky pixel at the frame centre, electrons (shot + read)."""
        return math.sqrt(self.sky_e + self.read_noise_e**2)

    @property
    def _peak_fraction(self) -> float:
        """Fraction of a star's flux in its brightest pixel when centred on it."""
        return float(erf(0.5 / (math.sqrt(2.0) * self.psf_sigma_px)) ** 2)

    # ---- the star catalogue ----------------------------------------------------------------

    @cached_property
    def _catalogue(self) -> _Catalogue:
        x0, y0, x1, y1 = self.sky_region
        cell = _STAR_CELL_PX
        per_cell = self.stars * cell * cell / (self.width * self.height)
        band = self.milky_way_band
        contrast = self.milky_way
        if contrast > 0:  # draw the band centre's density, then thin towards the edges
            per_cell *= 1.0 + contrast
        f_min = _FAINTEST_PEAK_SNR * self.pixel_noise_e / self._peak_fraction
        f_max = _BRIGHTEST_PEAK_SNR * self.pixel_noise_e / self._peak_fraction
        tail = 1.0 - (f_min / f_max) ** _FLUX_SLOPE
        xy, flux, colour = [], [], []
        for cy in range(math.floor(y0 / cell), math.floor(y1 / cell) + 1):
            for cx in range(math.floor(x0 / cell), math.floor(x1 / cell) + 1):
                rng = self._rng(_STREAM_STARS, cx + _CELL_OFFSET, cy + _CELL_OFFSET)
                n = int(rng.poisson(per_cell))
                xy.append((np.array([cx, cy]) + rng.random((n, 2))) * cell - 0.5)
                u = rng.random(n)
                flux.append(f_min * (1.0 - u * tail) ** (-1.0 / _FLUX_SLOPE))
                colour.append(np.clip(rng.normal(0.0, 0.4, n), -1.0, 1.0))
                if contrast > 0:
                    accept = (1.0 + contrast * _band_profile(band, xy[-1])) / (1.0 + contrast)
                    kept = rng.random(n) < accept
                    xy[-1], flux[-1], colour[-1] = xy[-1][kept], flux[-1][kept], colour[-1][kept]
        all_xy = np.concatenate(xy) if xy else np.zeros((0, 2))
        all_flux = np.concatenate(flux) if flux else np.zeros(0)
        c = np.concatenate(colour) if colour else np.zeros(0)
        keep = (
            (all_xy[:, 0] >= x0)
            & (all_xy[:, 0] <= x1)
            & (all_xy[:, 1] >= y0)
            & (all_xy[:, 1] <= y1)
        )
        rgb = np.stack(
            [1 + _STAR_COLOUR_SPREAD * c, np.ones_like(c), 1 - _STAR_COLOUR_SPREAD * c], 1
        )
        all_xy, all_flux, rgb = all_xy[keep], all_flux[keep], rgb[keep]
        if self.planted_stars:
            planted = np.array(self.planted_stars, dtype=np.float64).reshape(-1, 6)
            all_xy = np.concatenate([all_xy, planted[:, :2]])
            all_flux = np.concatenate([all_flux, planted[:, 2]])
            rgb = np.concatenate([rgb, planted[:, 3:]])
        order = np.argsort(-all_flux, kind="stable")
        return _Catalogue(all_xy[order], all_flux[order], rgb[order])

    @cached_property
    def milky_way_band(self) -> dict[str, Any]:
        """Where the Milky Way crosses the sky, reference pixels: the band's centre line passes
        through ``point`` at ``angle_deg``; star density is ``1 + milky_way * exp(-d**2 / (2
        sigma_px**2))`` times the background's at distance d from it (drawn even when
        ``milky_way`` is 0, so the truth is stable)."""
        rng = self._rng(_STREAM_MILKY_WAY)
        w, h = self.width, self.height
        return {
            "contrast": self.milky_way,
            "point": [w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)],
            "angle_deg": float(rng.uniform(0.0, 180.0)),
            "sigma_px": _MILKY_WAY_SIGMA * math.hypot(w, h),
        }

    @property
    def star_xy(self) -> FloatArray:
        """(n, 2) float64 reference (x, y) of every star in the sky region, brightest first."""
        return self._catalogue.xy

    @property
    def star_flux_e(self) -> FloatArray:
        """(n,) float64 star fluxes, electrons in the green channel, brightest first."""
        return self._catalogue.flux_e

    @property
    def star_rgb(self) -> FloatArray:
        """(n, 3) float64 colour weights of each star's red, green, blue CFA sites (green 1)."""
        return self._catalogue.rgb

    @property
    def star_peak_snr(self) -> FloatArray:
        """(n,) peak-pixel signal of a centred star over the sky pixel noise at frame centre."""
        return self.star_flux_e * self._peak_fraction / self.pixel_noise_e

    @property
    def star_snr(self) -> FloatArray:
        """(n,) flux-to-noise ratio in an aperture of radius FWHM on a clear sky."""
        radius = _APERTURE_FWHM * self.fwhm_px
        inside = self.star_flux_e * (1.0 - math.exp(-(radius**2) / (2 * self.psf_sigma_px**2)))
        return inside / np.sqrt(inside + math.pi * radius**2 * self.pixel_noise_e**2)

    @property
    def star_saturated(self) -> npt.NDArray[np.bool_]:
        """(n,) whether a centred star's brightest CFA site would clip at the white level."""
        full_e = (self.white_level - self.black_level) * self.gain_e_per_adu
        peak = self.star_flux_e * self._peak_fraction * self.star_rgb.max(axis=1)
        sky = self.sky_e * max(SKY_RGB) * (1.0 + abs(self.gradient) / 2.0)
        return np.asarray(peak + sky > full_e)

    def star_factor(self, i: int) -> float:
        """Transmission of frame ``i`` for light from beyond the atmosphere (stars, nebula,
        satellites): ``transparency_of(i)`` times the cloud factor in a cloudy frame."""
        cloud = _CLOUD_STAR_FACTOR if i in self.cloudy else 1.0
        return cloud * self.transparency_of(i)

    # ---- the changing night ----------------------------------------------------------------

    def sky_level(self, i: int) -> float:
        """Multiplier of frame ``i``'s whole sky background (``sky_levels``; 1 by default)."""
        return self.sky_levels[i] if self.sky_levels else 1.0

    def transparency_of(self, i: int) -> float:
        """Frame ``i``'s atmospheric transparency (``transparency``; 1 by default)."""
        return self.transparency[i] if self.transparency else 1.0

    def moon_glow(self, i: int) -> dict[str, Any]:
        """Geometry of frame ``i``'s moon glow, in frame pixels (fixed to the ground).

        The glow adds ``amplitude * sky_e * sky_level(i) * g(x, y)`` electrons per green pixel
        (times the sky colour at red and blue sites), with
        ``g = exp(-(|p - centre|**2 - near_px**2) / (2 scale_px**2))``: 1 at the frame point
        nearest the moon (``near_px`` from ``centre``), smoothly lower across the frame.
        ``centre`` is the moon, outside the frame, ``_GLOW_DISTANCE`` diagonals from the
        frame centre on a bearing that turns over the session. ``amplitude`` is ``glow[i]``
        (0 by default: the geometry is still drawn, nothing is rendered).
        """
        w, h = self.width, self.height
        rng = self._rng(_STREAM_GLOW)
        start = rng.uniform(0.0, 2.0 * math.pi)
        sweep = math.radians(rng.uniform(*_GLOW_SWEEP_DEG)) * (1 if rng.random() < 0.5 else -1)
        bearing = start + sweep * i / max(self.frames - 1, 1)
        diagonal = math.hypot(w, h)
        cx = (w - 1) / 2 + _GLOW_DISTANCE * diagonal * math.cos(bearing)
        cy = (h - 1) / 2 + _GLOW_DISTANCE * diagonal * math.sin(bearing)
        nx, ny = min(max(cx, 0.0), w - 1.0), min(max(cy, 0.0), h - 1.0)
        return {
            "amplitude": self.glow[i] if self.glow else 0.0,
            "centre": [cx, cy],
            "scale_px": _GLOW_SCALE * diagonal,
            "near_px": math.hypot(cx - nx, cy - ny),
            "bearing_deg": math.degrees(bearing) % 360.0,
        }

    def visible_stars(self, i: int, *, margin: float = 0.0, min_peak_snr: float = 0.0) -> IntArray:
        """Catalogue indices of stars whose centre is inside frame ``i`` at least ``margin``
        pixels from the edge and one FWHM above the landscape, brightest first; ``min_peak_snr``
        filters on ``star_peak_snr`` (a clear-sky property: cloud is not taken into account)."""
        xy = self.to_frame(i, self.star_xy)
        x, y = xy[:, 0], xy[:, 1]
        inside = (x >= margin) & (x <= self.width - 1 - margin)
        inside &= (y >= margin) & (y <= self.height - 1 - margin)
        column = np.clip(np.rint(x), 0, self.width - 1).astype(np.intp)
        inside &= y + self.fwhm(i) < self.landscape.skyline[column]
        inside &= self.star_peak_snr >= min_peak_snr
        return np.flatnonzero(inside)

    def stars_in_frame(
        self, i: int, *, margin: float = 0.0, min_peak_snr: float = 0.0
    ) -> tuple[FloatArray, FloatArray]:
        """Expected stars of frame ``i``: (xy (n, 2) frame pixels, flux (n,) electrons in green,
        cloud attenuation included), brightest first; selection as in ``visible_stars``."""
        index = self.visible_stars(i, margin=margin, min_peak_snr=min_peak_snr)
        xy = self.to_frame(i, self.star_xy[index])
        return xy, self.star_flux_e[index] * self.star_factor(i)

    # ---- things fixed on the ground --------------------------------------------------------

    @cached_property
    def landscape(self) -> Landscape:
        w, h = self.width, self.height
        x = np.arange(w, dtype=np.float64)
        if self.landscape_fraction <= 0:
            return Landscape(
                np.full(w, h + 1.0), h, np.ones((0, w), np.float32), np.zeros((0, 4), np.int64)
            )
        if self.scenery:
            from nightstack.simulate.landscape import scenery

            view = scenery(w, h, self.landscape_fraction, self.windows, self._rng(_STREAM_SCENERY))
            rows = np.arange(view.top_row, h, dtype=np.float64)[:, None]
            cover = np.clip(view.skyline[None, :] - (rows - 0.5), 0.0, 1.0).astype(np.float32)
            return Landscape(view.skyline, view.top_row, cover, view.windows, view.brightness)
        rng = self._rng(_STREAM_LANDSCAPE)
        depth = self.landscape_fraction * h
        hills = np.zeros(w)
        for k in range(4):  # rolling hills: a few long waves
            period = w / rng.uniform(0.6 + k, 1.5 + 2 * k)
            hills += (
                rng.uniform(0.15, 0.35)
                / (k + 1)
                * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
            )
        walk = np.cumsum(rng.normal(0.0, 1.0, w))  # trees and roofs: short-scale roughness
        kernel = np.hanning(9)
        rough = np.convolve(
            walk - np.convolve(walk, np.ones(101) / 101, "same"), kernel / kernel.sum(), "same"
        )
        rough *= 0.08 / max(float(np.std(rough)), 1e-9)
        skyline = h - depth * (1.0 + hills + rough)
        skyline = np.clip(skyline, h - 2.0 * depth, h - 1.0)
        top_row = int(np.floor(skyline.min() + 0.5))  # first row whose pixel reaches below it
        rows = np.arange(top_row, h, dtype=np.float64)[:, None]
        cover = np.clip(skyline[None, :] - (rows - 0.5), 0.0, 1.0).astype(np.float32)
        boxes = []
        for _ in range(self.windows):
            for _attempt in range(50):
                wx, wy = int(rng.integers(2, 4)), int(rng.integers(2, 4))
                x0 = int(rng.integers(4, w - 4 - wx))
                ground_top = int(np.ceil(skyline[x0 : x0 + wx].max())) + 3
                if ground_top + wy + 2 < h:
                    y0 = int(rng.integers(ground_top, h - wy - 1))
                    boxes.append((x0, y0, x0 + wx, y0 + wy))
                    break
        windows = np.array(boxes, dtype=np.int64).reshape(-1, 4)
        return Landscape(skyline, top_row, cover, windows)

    @property
    def landscape_top_row(self) -> int:
        """First (topmost) row holding any ground; ``height`` when there is no landscape."""
        return self.landscape.top_row

    @property
    def skyline(self) -> FloatArray:
        """(width,) row coordinate of the ground's top edge per column (ground below it)."""
        return self.landscape.skyline

    @property
    def windows_xyxy(self) -> npt.NDArray[np.int64]:
        """(n, 4) lit windows as [x0, y0, x1, y1) pixel boxes, fixed in frame coordinates."""
        return self.landscape.windows

    @cached_property
    def _hot(self) -> tuple[IntArray, IntArray, IntArray]:
        rng = self._rng(_STREAM_HOT)
        count = self.hot_pixels
        if count is None:
            count = max(4, round(self.width * self.height * _HOT_PIXEL_DENSITY))
        flat = np.sort(rng.choice(self.width * self.height, size=count, replace=False))
        adu = rng.integers(*_HOT_PIXEL_ADU, size=count)
        return (flat % self.width).astype(np.intp), (flat // self.width).astype(np.intp), adu

    @property
    def hot_pixel_xy(self) -> IntArray:
        """(n, 2) integer (x, y) of the hot pixels, fixed in frame coordinates."""
        x, y, _ = self._hot
        return np.stack([x, y], axis=1)

    @property
    def hot_pixel_adu(self) -> IntArray:
        """(n,) ADU each hot pixel adds to its reading in every frame (clipped at white)."""
        return self._hot[2]

    # ---- per-frame defects -----------------------------------------------------------------

    @cached_property
    def nebula_shape(self) -> dict[str, Any] | None:
        """The nebula (moves with the stars; ``None`` without one): a Gaussian in reference
        coordinates, ``centre`` (x, y), ``sigma_px`` (major, minor), ``angle_deg`` of the major
        axis, ``peak_e`` electrons per green pixel at the centre, ``rgb`` colour weights."""
        if not self.nebula:
            return None
        rng = self._rng(_STREAM_NEBULA)
        return {
            "centre": [self.width * rng.uniform(0.3, 0.6), self.height * rng.uniform(0.3, 0.5)],
            "sigma_px": [0.09 * self.width, 0.05 * self.width],
            "angle_deg": float(rng.uniform(0.0, 180.0)),
            "peak_e": _NEBULA_PEAK * self.sky_e,
            "rgb": list(_NEBULA_RGB),
        }

    def defects(self, i: int) -> dict[str, dict[str, Any]]:
        """Defects of frame ``i`` and their parameters (frame coordinates); empty when clean.

        ``satellite``: the trail passes through ``point`` at ``angle_deg``, entering the frame at
        ``start`` and leaving at ``end``, Gaussian cross-section ``fwhm_px`` (``sigma_px``),
        ``peak_e`` electrons (before cloud and transparency), ``linear_e`` electrons per pixel of
        trail length. ``cloudy``: star and sky factors. ``trailed``: every star smeared into a
        line of ``length_px`` at ``angle_deg`` centred on its position.
        """
        out: dict[str, dict[str, Any]] = {}
        if i in self.satellite:
            rng = self._rng(_STREAM_SATELLITE, i)
            point = (self.width * rng.uniform(0.15, 0.85), self.height * rng.uniform(0.15, 0.6))
            angle = rng.uniform(0.0, math.pi)
            start, end = _clip_line(point, angle, self.width, self.height)
            out["satellite"] = {
                "point": list(point),
                "angle_deg": math.degrees(angle),
                "start": list(start),
                "end": list(end),
                "fwhm_px": _SATELLITE_SIGMA_PX * _FWHM_PER_SIGMA,
                "peak_e": _SATELLITE_LINEAR_E / (math.sqrt(2 * math.pi) * _SATELLITE_SIGMA_PX),
                "sigma_px": _SATELLITE_SIGMA_PX,
                "linear_e": _SATELLITE_LINEAR_E,
            }
        if i in self.cloudy:
            out["cloudy"] = {
                "star_factor": _CLOUD_STAR_FACTOR,
                "sky_factor": _CLOUD_SKY_FACTOR,
                "lump_peak_e": _CLOUD_LUMP * self.sky_e,
            }
        if i in self.trailed:
            rng = self._rng(_STREAM_TRAIL, i)
            out["trailed"] = {
                "length_px": self.trail_px,
                "angle_deg": float(rng.uniform(0.0, 180.0)),
            }
        return out

    def capture_time(self, i: int) -> datetime:
        """Start of frame ``i``'s exposure (camera wall-clock time)."""
        return self.start_time + timedelta(seconds=i * (self.exposure_s + _FRAME_GAP_S))

    def ground_glow_e(self, i: int) -> float:
        """Electrons per green pixel of the landscape's own faint glow in frame ``i`` (it is
        lit by the sky above it, so it follows the sky level)."""
        return _GROUND_LEVEL * self.sky_e * self.sky_level(i)

    def noise_rng(self, i: int) -> np.random.Generator:
        """The random stream of frame ``i``'s shot and read noise."""
        return self._rng(_STREAM_NOISE, i)

    # ---- pixels (rendering lives in ``nightstack.simulate.render``) ------------------------

    def electrons(self, i: int) -> FloatArray:
        """Noise-free expected signal of frame ``i``, (height, width) float32 electrons per CFA
        site (``cfa_pattern``), hot pixels not included."""
        return expected_electrons(self, i)

    def render(self, i: int, *, noise: bool = True) -> UInt16Array:
        """Raw CFA of frame ``i``: (height, width) uint16 ADU laid out as ``cfa_pattern``,
        black level included, clipped at the white level; hot pixels added. ``noise=False``
        gives the rounded expectation (no shot or read noise)."""
        return raw_frame(self, i, noise=noise)

    # ---- the sky background ----------------------------------------------------------------

    def sky_background(self, i: int) -> FloatArray:
        """The sky of frame ``i`` before its colour: (height, width) float32 electrons per
        green pixel, the landscape not applied (see ``sky_surface``)."""
        h, w = self.height, self.width
        # light-pollution gradient, fixed to the ground
        angle = math.radians(self.gradient_angle_deg)
        c, s = math.cos(angle), math.sin(angle)
        extent = abs(w * c) + abs(h * s)
        ax = (np.arange(w, dtype=np.float32) - (w - 1) / 2) * np.float32(c / extent)
        ay = (np.arange(h, dtype=np.float32) - (h - 1) / 2) * np.float32(s / extent)
        image = np.empty((h, w), dtype=np.float32)
        np.add(ay[:, None], ax, out=image)
        image *= np.float32(self.gradient)
        image += np.float32(1.0)
        image *= np.float32(self.sky_e)
        level = self.sky_level(i)
        if level != 1.0:
            image *= np.float32(level)
        moon = self.moon_glow(i)
        if moon["amplitude"] > 0:
            gx, gy = self._glow_profiles(moon, np.arange(w), np.arange(h))
            scale = moon["amplitude"] * self.sky_e * level
            image += np.outer(gy * scale, gx).astype(np.float32)
        if i in self.cloudy:
            image *= np.float32(_CLOUD_SKY_FACTOR)
            image += self._cloud_glow(i)
        return image

    @staticmethod
    def _glow_profiles(
        moon: dict[str, Any], x: FloatArray | IntArray, y: FloatArray | IntArray
    ) -> tuple[FloatArray, FloatArray]:
        """The moon glow's separable factors: ``g(x, y) = gx(x) * gy(y)`` (float64)."""
        cx, cy = moon["centre"]
        two_s2 = 2.0 * moon["scale_px"] ** 2
        gx = np.exp(-((np.asarray(x) - cx) ** 2 - moon["near_px"] ** 2) / two_s2)
        gy = np.exp(-((np.asarray(y) - cy) ** 2) / two_s2)
        return gx, gy

    def sky_surface(self, i: int, *, grid: str = "frame") -> FloatArray:
        """The true additive sky of frame ``i``: electrons per green pixel, float64.

        Multiply by the sky colour (``SKY_RGB``, also in truth as ``sky_rgb``) for the red
        and blue channels, divide by ``gain_e_per_adu`` for ADU above black, and further by
        ``white_level - black_level`` for ``nightstack.io.loaders.load``'s units. It holds the
        light-pollution gradient, the sky level, the moon glow and a cloudy frame's glow; not
        stars, nebula, satellites, hot pixels, or the landscape that hides the sky.

        Parameters
        ----------
        i
            Frame index.
        grid
            ``"frame"``: (height, width) over frame ``i``'s own pixels, exactly the sky that
            ``render(i)`` used. ``"reference"``: (height, width) over the reference frame's
            pixel grid, i.e. the value at reference pixel q is the sky of frame ``i`` at the
            frame pixel that maps onto q (``transform(i)``), evaluated analytically there
            (also where it falls outside frame ``i``).
        """
        if grid == "frame":
            return self.sky_background(i).astype(np.float64)
        if grid != "reference":
            raise ValueError(f"grid must be 'frame' or 'reference', got {grid!r}")
        ys, xs = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64)
        frame_xy = self.to_frame(i, np.stack([xs.ravel(), ys.ravel()], axis=1))
        return self.sky_at(i, frame_xy[:, 0], frame_xy[:, 1]).reshape(self.height, self.width)

    def sky_at(self, i: int, x: npt.ArrayLike, y: npt.ArrayLike) -> FloatArray:
        """Frame ``i``'s sky (as ``sky_surface``) at frame pixel coordinates ``x``, ``y``
        (broadcast arrays), evaluated analytically in float64."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        w, h = self.width, self.height
        angle = math.radians(self.gradient_angle_deg)
        c, s = math.cos(angle), math.sin(angle)
        extent = abs(w * c) + abs(h * s)
        plane = ((x - (w - 1) / 2) * c + (y - (h - 1) / 2) * s) / extent
        level = self.sky_level(i)
        sky = (1.0 + self.gradient * plane) * self.sky_e * level
        moon = self.moon_glow(i)
        if moon["amplitude"] > 0:
            gx, gy = self._glow_profiles(moon, x, y)
            sky = sky + moon["amplitude"] * self.sky_e * level * gx * gy
        if i in self.cloudy:
            centre, sigma, amplitude = self._cloud_blobs(i)
            sky = sky * _CLOUD_SKY_FACTOR
            for (bx, by), sb, ab in zip(centre, sigma[:, 0], amplitude, strict=True):
                sky = sky + ab * np.exp(-0.5 * (((x - bx) / sb) ** 2 + ((y - by) / sb) ** 2))
        return np.asarray(sky, dtype=np.float64)

    def _cloud_blobs(self, i: int) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Cloud lumps of frame ``i``: centres (blobs, 2) frame (x, y), sigmas (blobs, 1) px
        and peak electrons (blobs,), the sky level included."""
        rng = self._rng(_STREAM_CLOUD, i)
        h, w = self.height, self.width
        centre = rng.uniform([0.0, 0.0], [w, h], (_CLOUD_BLOBS, 2))
        sigma = rng.uniform(0.08, 0.25, (_CLOUD_BLOBS, 1)) * max(w, h)
        amplitude = rng.uniform(0.3, 1.0, _CLOUD_BLOBS) * _CLOUD_LUMP * self.sky_e
        return centre, sigma, amplitude * self.sky_level(i)

    def _cloud_glow(self, i: int) -> FloatArray:
        """Lumpy cloud glow: (height, width) float32 electrons, a sum of Gaussian blobs."""
        h, w = self.height, self.width
        centre, sigma, amplitude = self._cloud_blobs(i)
        gx = np.exp(-0.5 * ((np.arange(w) - centre[:, :1]) / sigma) ** 2)  # (blobs, w)
        gy = np.exp(-0.5 * ((np.arange(h) - centre[:, 1:]) / sigma) ** 2)  # (blobs, h)
        glow = (gy.T * amplitude).astype(np.float32) @ gx.astype(np.float32)
        return glow

    # ---- truth -----------------------------------------------------------------------------

    def truth(self, name_pattern: str = "IMG_{:04d}.DNG") -> dict[str, Any]:
        """Everything known about the night, JSON-ready (see ``simulate_night``)."""
        hot_xy = self.hot_pixel_xy
        frames = []
        for i in range(self.frames):
            defects = self.defects(i)
            frames.append(
                {
                    "index": i,
                    "file": name_pattern.format(i),
                    "matrix": [[float(v) for v in row] for row in self.transform(i)],
                    "defects": sorted(defects),
                    **defects,
                    "exposure_s": self.exposure_s,
                    "iso": self.iso,
                    "capture_time": self.capture_time(i).isoformat(),
                    "sky_level": self.sky_level(i),
                    "glow": self.moon_glow(i),
                    "transparency": self.transparency_of(i),
                    "fwhm_px": self.fwhm(i),
                }
            )
        return {
            "schema": 2,
            "generator": "nightstack.simulate",
            "seed": self.seed,
            "parameters": self.parameters(),
            "width": self.width,
            "height": self.height,
            "cfa_pattern": self.cfa_pattern,
            "black_level": self.black_level,
            "white_level": self.white_level,
            "gain_e_per_adu": self.gain_e_per_adu,
            "read_noise_e": self.read_noise_e,
            "sky_e": self.sky_e,
            "sky_rgb": list(SKY_RGB),
            "gradient": {"amplitude": self.gradient, "angle_deg": self.gradient_angle_deg},
            "pixel_noise_e": self.pixel_noise_e,
            "psf": {"model": "gaussian", "fwhm_px": self.fwhm_px, "sigma_px": self.psf_sigma_px},
            "pivot": list(self.pivot_xy),
            "sky_region": list(self.sky_region),
            "landscape": {
                "top_row": self.landscape_top_row,
                "skyline": [round(float(v), 3) for v in self.skyline],
                "windows": self.windows_xyxy.tolist(),
            },
            "hot_pixels": {
                "x": hot_xy[:, 0].tolist(),
                "y": hot_xy[:, 1].tolist(),
                "adu": self.hot_pixel_adu.tolist(),
            },
            "nebula": self.nebula_shape,
            "milky_way": self.milky_way_band,
            "stars": {
                "x": self.star_xy[:, 0].tolist(),
                "y": self.star_xy[:, 1].tolist(),
                "flux_e": self.star_flux_e.tolist(),
                "peak_snr": self.star_peak_snr.tolist(),
                "snr": self.star_snr.tolist(),
                "saturated": self.star_saturated.tolist(),
                "rgb": self.star_rgb.round(6).tolist(),
            },
            "frames": frames,
        }
