"""Image quality as a photographer sees it: star FWHM and faint-star S/N on chosen stars.

Two measures decide between methods (demosaic, warp, drizzle, frame selection):

- **FWHM**: an elliptical 2-D Gaussian (with a constant sky) fitted to each of a fixed set of
  stars; the FWHM is that of the circle of the same area, ``2 sqrt(2 ln 2) sqrt(sx sy)``.
- **Faint-star S/N**: forced aperture photometry at given positions (the aperture sum less the
  annulus median times the area) against the spread (1.4826 MAD) of the same measurement at
  random star-free positions of the same image. Interpolation correlates neighbouring pixels,
  so the pixel-to-pixel noise understates an aperture's noise by a factor that depends on the
  method; the random apertures see the true noise of a star-sized area.

Colour noise is measured the same way on the colour differences R - G and B - G, as a ratio to
the luminance's aperture noise (unitless, comparable across pipelines of any scale).

Positions are (x, y) in pixels of the image (x = column, pixel centres at integers); images are
(rows, cols) or (rows, cols, 3) float, linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage, optimize

from nightstack.arrays import Float64Array, FloatArray

SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
_MAD_TO_SIGMA = 1.4826


def fit_fwhm(
    image: FloatArray,
    xy: FloatArray,
    half: int = 7,
    *,
    sites: npt.NDArray[np.bool_] | None = None,
) -> Float64Array:
    """FWHM (px) of each star at ``xy`` ((N, 2) x, y) in a 2-D ``image``: an elliptical Gaussian
    plus a constant fitted to the (2 half + 1)^2 box around it. NaN where the box leaves the
    image or the fit fails or lands off the star.

    ``sites``: (rows, cols) bool, fit only the pixels where it is True, e.g. one colour's sites
    of a raw mosaic: that colour's own PSF, nothing interpolated or borrowed from the others."""
    data = np.asarray(image, np.float64)
    chosen = None if sites is None else np.asarray(sites, bool)
    size = 2 * half + 1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.full(len(xy), np.nan)
    for i, (x, y) in enumerate(np.asarray(xy, np.float64)):
        cx, cy, box = _box(data, x, y, half)
        if box is None:
            continue
        if chosen is None:
            use = np.ones(box.shape, bool)
            sky = float(np.median(np.concatenate([box[0], box[-1], box[:, 0], box[:, -1]])))
            peak = float(box[half, half])
        else:
            use = chosen[cy - half : cy + half + 1, cx - half : cx + half + 1]
            rim = np.maximum(abs(yy - half), abs(xx - half)) >= half - 1  # two pixels wide:
            sky = float(np.median(box[rim & use]))  # every colour has sites in it
            core = (slice(half - 1, half + 2), slice(half - 1, half + 2))
            peak = float(box[core][use[core]].max())
        if not peak - sky > 0:
            continue

        def residual(
            p: Float64Array, box: Float64Array = box, use: npt.NDArray[np.bool_] = use
        ) -> Float64Array:
            amp, x0, y0, a, b, c, bg = p  # inverse covariance [[a, b], [b, c]]
            dx, dy = xx[use] - x0, yy[use] - y0
            model = bg + amp * np.exp(-0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy))
            return model - box[use]

        start = np.array([peak - sky, x - cx + half, y - cy + half, 0.5, 0.0, 0.5, sky])
        try:
            fit = optimize.least_squares(residual, start, method="lm", max_nfev=400)
        except (ValueError, RuntimeError):
            continue
        amp, x0, y0, a, b, c, _ = fit.x
        det = a * c - b * b
        if not (fit.success and amp > 0 and a > 0 and c > 0 and det > 0):
            continue
        if abs(x0 - half) > 2 or abs(y0 - half) > 2:
            continue  # the fit wandered off to a neighbour
        out[i] = SIGMA_TO_FWHM * det ** -0.25  # sqrt(sx sy) = det(cov)^(1/4) = det(inv)^(-1/4)
    return out


@dataclass(frozen=True)
class Apertures:
    """Forced aperture photometry of one image: ``flux`` (N,) of the stars, ``noise`` the
    robust spread of the same aperture at random star-free positions, ``snr`` = flux / noise,
    and ``samples`` the random apertures' values (for other statistics)."""

    flux: Float64Array
    noise: float
    snr: Float64Array
    samples: Float64Array


def star_free_mask(image: FloatArray, margin: int, nsigma: float = 2.5) -> npt.NDArray[np.bool_]:
    """(rows, cols) bool, True where no source lies within ``margin`` px: pixels of a
    Gaussian-smoothed copy (sigma 1.5 px) above its median + ``nsigma`` x its robust spread,
    grown by ``margin``, and non-finite pixels, are excluded."""
    data = np.nan_to_num(np.asarray(image, np.float32), nan=np.inf)
    finite = np.isfinite(data)
    smooth = ndimage.gaussian_filter(np.where(finite, data, 0.0).astype(np.float32), 1.5)
    sky = smooth[finite]
    level = float(np.median(sky))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(sky - level)))
    sources = (smooth > level + nsigma * spread) | ~finite
    grown = ndimage.binary_dilation(sources, iterations=max(1, margin))
    return np.asarray(~grown, bool)


def aperture_photometry(
    image: FloatArray,
    xy: FloatArray,
    radius: float,
    *,
    free: npt.NDArray[np.bool_] | None = None,
    n_random: int = 3000,
    seed: int = 0,
) -> Apertures:
    """Forced photometry of 2-D ``image`` at ``xy`` with an aperture of ``radius`` px and a sky
    annulus from ``radius + 3`` to ``radius + 8`` px; the noise from ``n_random`` apertures at
    random positions where ``free`` (default :func:`star_free_mask`) is True."""
    data = np.asarray(image, np.float64)
    outer = _reach(radius)
    if free is None:
        free = star_free_mask(image, outer)
    inside = np.zeros_like(free)
    inside[outer:-outer, outer:-outer] = True
    rows, cols = np.nonzero(free & inside)
    if rows.size == 0:
        raise ValueError("no star-free position for the random apertures")
    rng = np.random.default_rng(seed)
    pick = rng.choice(rows.size, size=min(n_random, rows.size), replace=False)
    random_xy = np.column_stack([cols[pick], rows[pick]]).astype(np.float64)
    samples = _aperture_sums(data, random_xy, radius, outer)
    samples = samples[np.isfinite(samples)]
    noise = _MAD_TO_SIGMA * float(np.median(np.abs(samples - np.median(samples))))
    flux = _aperture_sums(data, np.asarray(xy, np.float64), radius, outer)
    return Apertures(flux, noise, flux / noise if noise > 0 else flux * np.nan, samples)


def colour_noise(
    rgb: FloatArray,
    radius: float,
    *,
    free: npt.NDArray[np.bool_] | None = None,
    n_random: int = 3000,
    seed: int = 0,
) -> float:
    """Aperture-scale colour noise of a (rows, cols, 3) image: the random-aperture spread of
    R - G and B - G (their quadratic mean) over that of the luminance (R + G + B) / 3."""
    image = np.asarray(rgb, np.float64)
    lum = image.mean(axis=2)
    outer = _reach(radius)
    if free is None:
        free = star_free_mask(lum, outer)
    none = np.zeros((0, 2))

    def spread(plane: Float64Array) -> float:
        found = aperture_photometry(plane, none, radius, free=free, n_random=n_random, seed=seed)
        return found.noise

    chroma = [spread(image[..., 0] - image[..., 1]), spread(image[..., 2] - image[..., 1])]
    return math.sqrt((chroma[0] ** 2 + chroma[1] ** 2) / 2) / spread(lum)


def _reach(radius: float) -> int:
    """Pixels an aperture of ``radius`` and its sky annulus (to ``radius + 8``) reach."""
    return math.ceil(radius + 8)


def _aperture_sums(data: Float64Array, xy: Float64Array, radius: float, outer: int) -> Float64Array:
    """Aperture sums less the annulus median x the aperture's pixel count (centre-in-pixel
    membership on a grid of ``outer`` px around each integer-rounded centre's sub-pixel
    position); NaN where the box leaves the image or holds a non-finite pixel."""
    size = 2 * outer + 1
    grid = np.arange(size, dtype=np.float64) - outer
    out = np.full(len(xy), np.nan)
    for i, (x, y) in enumerate(xy):
        cx, cy, box = _box(data, x, y, outer)
        if box is None:
            continue
        r = np.hypot(grid[np.newaxis, :] - (x - cx), grid[:, np.newaxis] - (y - cy))
        ring = (r >= radius + 3) & (r <= radius + 8)
        disc = r <= radius
        out[i] = float(box[disc].sum() - np.median(box[ring]) * disc.sum())
    return out


def _box(data: Float64Array, x: float, y: float, half: int) -> tuple[int, int, Float64Array | None]:
    """(cx, cy, the (2 half + 1)^2 box around the pixel nearest (x, y)), the box None where it
    leaves the image or holds a non-finite pixel."""
    cx, cy = round(x), round(y)
    if cx < half or cy < half or cx + half >= data.shape[1] or cy + half >= data.shape[0]:
        return cx, cy, None
    box = data[cy - half : cy + half + 1, cx - half : cx + half + 1]
    return cx, cy, box if np.all(np.isfinite(box)) else None
