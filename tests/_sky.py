"""In-memory synthetic star fields with known truth, for the detect / align / quality tests.

Stars (Gaussian, Moffat, elongated or trailed) are integrated over full-resolution pixels by
supersampling, multiplied by an RGGB-like colour filter array, given Gaussian noise, then binned
2x2 (mean of each block) the way the loader makes a superpixel luminance. Optional sky gradient,
hot pixels (single CFA pixels), and a dark landscape band at the bottom with bright star-like
lit windows. Coordinates are full-resolution (x = column, y = row), pixel centres at integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BIN = 2

CFA_GAINS = np.array([[0.6, 1.0], [1.0, 0.6]])
"""Response of R G / G B to a grey star. R = B keeps the 2x2 superpixel centroid unbiased."""

SUPERSAMPLE = 5
"""Sub-pixels per full-resolution pixel side when integrating a star over its pixels."""

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class Psf:
    """A star image: ``fwhm`` full-resolution px (minor axis); ``kind`` "gaussian" or "moffat";
    ``ratio`` >= 1 major/minor axis ratio at position angle ``angle_deg``; ``trail_px``: length of
    a linear trail (tracking error) at ``angle_deg``."""

    fwhm: float = 4.0
    kind: str = "gaussian"
    beta: float = 3.0
    ratio: float = 1.0
    angle_deg: float = 0.0
    trail_px: float = 0.0

    def elongation(self) -> float:
        """Major / minor axis ratio from second moments (Gaussian core + trail)."""
        if self.kind != "gaussian":
            return self.ratio
        s2 = (self.fwhm * FWHM_TO_SIGMA) ** 2
        major = s2 * self.ratio**2 + self.trail_px**2 / 12.0
        return math.sqrt(major / s2)


@dataclass(frozen=True)
class Field:
    """A rendered field and its truth.

    ``luminance``: (rows // 2, cols // 2) float32, the 2x2 superpixel mean;
    ``xy``: (n, 2) true full-res positions of the rendered stars (inside the frame);
    ``flux``: (n,) total grey flux; ``peak_snr``: (n,) noiseless peak of each star in the
    binned luminance divided by the binned sky noise ``noise``; ``shape``: full-res (rows, cols).
    """

    luminance: np.ndarray
    xy: np.ndarray
    flux: np.ndarray
    peak_snr: np.ndarray
    noise: float
    sky: float
    shape: tuple[int, int]
    windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    hot: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    full: np.ndarray | None = None  # (rows, cols) float32 full-resolution frame (mono only)


def catalogue(
    rng: np.random.Generator,
    n: int,
    width: float,
    height: float,
    *,
    x0: float = 0.0,
    y0: float = 0.0,
    snr_min: float = 8.0,
    snr_max: float = 400.0,
    slope: float = 0.6,
    fwhm: float = 4.0,
    noise: float = 0.002,
) -> tuple[np.ndarray, np.ndarray]:
    """Random stars: (n, 2) positions uniform in [x0, x0 + width) x [y0, y0 + height) and (n,)
    grey fluxes with a power-law count N(>F) ~ F^-slope such that the peak S/N in the binned
    luminance (Gaussian ``fwhm``, full-res per-pixel noise ``noise``) spans [snr_min, snr_max]."""
    xy = np.column_stack([x0 + rng.uniform(0, width, n), y0 + rng.uniform(0, height, n)])
    u = rng.uniform(0, 1, n)
    lo, hi = snr_min**-slope, snr_max**-slope
    snr = (lo + u * (hi - lo)) ** (-1.0 / slope)
    return xy, snr * flux_per_snr(fwhm, noise)


def flux_per_snr(fwhm: float, noise: float) -> float:
    """Grey flux of a Gaussian star of ``fwhm`` (full-res px) whose binned peak, centred on a
    superpixel, is one binned noise sigma (full-res noise ``noise``, binned noise noise / 2)."""
    s = fwhm * FWHM_TO_SIGMA
    # fraction of the flux in the central 2x2 superpixel, times the mean CFA gain, / 4 pixels
    frac = math.erf(1.0 / (s * math.sqrt(2.0))) ** 2
    return (noise / BIN) / (frac * float(CFA_GAINS.mean()) / (BIN * BIN))


def _star_stamp(dx: float, dy: float, psf: Psf, half: int) -> np.ndarray:
    """Unit-flux star integrated over the pixels of a (2 half + 1)^2 stamp; the star is at
    (dx, dy) from the stamp's centre pixel."""
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    grid = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    gx = grid[None, :] - dx
    gy = grid[:, None] - dy
    a = math.radians(psf.angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    steps = max(1, math.ceil(psf.trail_px * 2)) if psf.trail_px > 0 else 1
    along = np.linspace(-psf.trail_px / 2, psf.trail_px / 2, steps) if steps > 1 else [0.0]
    total = np.zeros((grid.size, grid.size))
    for t in along:
        px, py = gx - t * ca, gy - t * sa
        u = px * ca + py * sa  # major axis
        v = -px * sa + py * ca
        if psf.kind == "gaussian":
            s = psf.fwhm * FWHM_TO_SIGMA
            r2 = (u / (s * psf.ratio)) ** 2 + (v / s) ** 2
            prof = np.exp(-0.5 * r2) / (2 * math.pi * s * s * psf.ratio)
        elif psf.kind == "moffat":
            alpha = psf.fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / psf.beta) - 1.0))
            r2 = (u / psf.ratio) ** 2 + v**2
            prof = (psf.beta - 1) / (math.pi * alpha * alpha * psf.ratio)
            prof = prof * (1 + r2 / (alpha * alpha)) ** -psf.beta
        else:
            raise ValueError(psf.kind)
        total += prof
    total /= len(along)
    n = 2 * half + 1
    pix = total.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))
    return pix  # density per unit area averaged over the pixel = flux in the pixel


def render(
    xy: np.ndarray,
    flux: np.ndarray,
    shape: tuple[int, int] = (1200, 1800),
    *,
    psf: Psf | None = None,
    seed: int = 0,
    sky: float = 0.05,
    noise: float = 0.002,
    gradient: tuple[float, float] = (0.0, 0.0),
    hot_pixels: int = 0,
    hot_xy: np.ndarray | None = None,
    hot_value: float = 0.5,
    landscape_rows: int = 0,
    windows: np.ndarray | None = None,
    window_flux: float = 5.0,
    mono: bool = False,
) -> Field:
    """Render stars at full-res ``xy`` (n, 2) with grey ``flux`` into a CFA frame of ``shape``
    (rows, cols), add noise and features, bin 2x2.

    ``gradient``: sky rises by these fractions of ``sky`` across the width and height.
    ``hot_pixels``: that many random single hot CFA pixels (or the given ``hot_xy``), each
    ``hot_value`` above its neighbours.
    ``landscape_rows``: the bottom rows are a dark landscape (stars hidden behind it) with
    star-like lit ``windows`` (k, 2) of ``window_flux``.
    ``mono``: no colour filter array (every pixel sees the grey star); the full-resolution frame
    is kept in ``Field.full``.
    """
    psf = psf or Psf()
    rng = np.random.default_rng(seed)
    rows, cols = shape
    image = np.zeros(shape, dtype=np.float64)
    half = math.ceil(4 * psf.fwhm * max(psf.ratio, 1.0) + psf.trail_px / 2 + 2)
    if psf.kind == "moffat":
        half = math.ceil(half * 2)
    inside = (xy[:, 0] > -half) & (xy[:, 0] < cols + half) & (xy[:, 1] > -half)
    inside &= xy[:, 1] < rows + half
    peaks = np.zeros(len(xy))
    for i in np.flatnonzero(inside):
        peaks[i] = _add_star(image, xy[i], flux[i], psf, half)
    yy, xx = np.mgrid[0:rows, 0:cols]
    background = sky * (1 + gradient[0] * xx / cols + gradient[1] * yy / rows)
    gains = np.ones(shape) if mono else np.tile(CFA_GAINS, (rows // 2, cols // 2))
    frame = background + image * gains
    windows_xy = np.zeros((0, 2)) if windows is None else np.asarray(windows, dtype=float)
    if landscape_rows:
        frame[rows - landscape_rows :] = 0.2 * sky
        lit = np.zeros(shape)
        for w in windows_xy:
            _add_star(lit, w, window_flux, Psf(fwhm=psf.fwhm), 12)
        frame += lit * gains
    frame += rng.normal(0.0, noise, shape)
    hot = np.zeros((0, 2)) if hot_xy is None else np.asarray(hot_xy, dtype=float)
    if hot_pixels:
        hot = np.column_stack(
            [rng.integers(10, cols - 10, hot_pixels), rng.integers(10, rows - 10, hot_pixels)]
        ).astype(float)
    for hx, hy in hot.astype(int):
        frame[hy, hx] += hot_value
    lum = frame.reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3)).astype(np.float32)
    visible = (xy[:, 0] >= 0) & (xy[:, 0] <= cols - 1) & (xy[:, 1] >= 0)
    visible &= xy[:, 1] <= rows - 1 - landscape_rows
    return Field(
        luminance=lum,
        xy=xy[visible],
        flux=flux[visible],
        peak_snr=peaks[visible] / (noise / 2),
        noise=noise / 2,
        sky=sky,
        shape=(rows, cols),
        windows=windows_xy,
        hot=hot,
        full=frame.astype(np.float32) if mono else None,
    )


def _add_star(image: np.ndarray, xy: np.ndarray, flux: float, psf: Psf, half: int) -> float:
    """Add one star to the grey full-res ``image``; return its noiseless binned peak."""
    cx, cy = round(float(xy[0])), round(float(xy[1]))
    stamp = flux * _star_stamp(float(xy[0]) - cx, float(xy[1]) - cy, psf, half)
    r0, c0 = cy - half, cx - half
    r1, c1 = r0 + stamp.shape[0], c0 + stamp.shape[1]
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r1, image.shape[0]), min(c1, image.shape[1])
    if rr1 <= rr0 or cc1 <= cc0:
        return 0.0
    image[rr0:rr1, cc0:cc1] += stamp[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
    # binned peak: CFA-weighted 2x2 means on the frame's superpixel grid
    pr0, pc0 = r0 - (r0 % 2), c0 - (c0 % 2)
    pad = np.zeros((stamp.shape[0] + 2, stamp.shape[1] + 2))
    pad[r0 - pr0 : r0 - pr0 + stamp.shape[0], c0 - pc0 : c0 - pc0 + stamp.shape[1]] = stamp
    ph, pw = pad.shape[0] // 2 * 2, pad.shape[1] // 2 * 2
    weighted = pad[:ph, :pw] * np.tile(CFA_GAINS, (ph // 2, pw // 2))
    return float(weighted.reshape(ph // 2, 2, pw // 2, 2).mean(axis=(1, 3)).max())


def similarity(
    angle_deg: float, scale: float, shift: tuple[float, float], centre: tuple[float, float]
) -> np.ndarray:
    """2x3 matrix: rotate by ``angle_deg`` and scale about ``centre`` (x, y), then shift."""
    a = math.radians(angle_deg)
    lin = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.asarray(centre, dtype=float)
    t = c - lin @ c + np.asarray(shift, dtype=float)
    return np.column_stack([lin, t])


def apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 2x3 matrix to (n, 2) points."""
    return xy @ matrix[:, :2].T + matrix[:, 2]


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix."""
    lin = np.linalg.inv(matrix[:, :2])
    return np.column_stack([lin, -lin @ matrix[:, 2]])


def transform_error(estimate: np.ndarray, truth: np.ndarray, shape: tuple[int, int]) -> float:
    """RMS distance (px) between two 2x3 transforms over a 21x21 grid spanning a frame of
    full-res ``shape`` (rows, cols)."""
    gy, gx = np.meshgrid(np.linspace(0, shape[0] - 1, 21), np.linspace(0, shape[1] - 1, 21))
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    d = apply(estimate, pts) - apply(truth, pts)
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1))))
