"""Background normalization: each frame's sky matched to the reference's, per channel.

The sky changes over a night (the Moon rises, twilight fades, a light goes on, haze comes and
goes) while the stars do not. Before a frame enters the stack its samples become

    x' = scale[c] * x + offset[c] + surface_c(x_ref, y_ref)

on the reference grid, so that its sky sits at the reference's level: the live rejection and the
final sigma clip then compare like with like (a brighter frame is not rejected wholesale, and a
clipped satellite trail does not leave a dark line where the others' mean is taken). The
reference defines the level of the stack: its own normalization is the identity.

Modes (``Settings.normalize``):

- ``"none"``: identity.
- ``"add"`` (default): offset = sky(reference) - sky(frame), the sigma-clipped medians of the two
  over the same sky samples.
- ``"addscale"``: scale = 1 / transparency (the stars' flux ratio to the reference, measured by
  :func:`nightstack.registration.quality.transparency`: it restores the celestial signal that
  haze or airmass dimmed), then the offset that matches the scaled sky to the reference's.
- ``"gradient"``: scale 1 and a smooth surface (a 2-D polynomial of degree 2 in the reference's
  pixel coordinates) fitted robustly to the difference of the two skies' block medians: a moon
  glow that moves, light pollution that changes with altitude.

Estimates use a sparse grid of sky samples (about :data:`TARGET_SAMPLES` reference pixels, kept
with the reference, 1.2 MB for 3 channels) inside the sky mask of both frames and on their
overlap: the frame is read at the grid points mapped through its transform (nearest pixel), so
the estimate costs a few milliseconds whatever the sensor size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from nightstack.arrays import BoolArray, FloatArray

Mode = Literal["none", "add", "addscale", "gradient"]
SkyTest = Callable[[FloatArray, FloatArray], BoolArray]
"""``sky(x, y) -> bool array``: whether full-resolution frame positions are sky (not ground)."""

MODES: tuple[str, ...] = ("none", "add", "addscale", "gradient")


class Sampled(Protocol):
    """What the estimates read a frame through: a (rows, cols, C) ``shape`` and point samples
    ``image[iy, ix]`` with broadcasting integer index arrays -> (..., C). A numpy image is one;
    so is :class:`nightstack.io.demosaic.TileSamples` (a mosaic, never demosaiced whole)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any, /) -> Any: ...


TARGET_SAMPLES = 100_000
"""At most this many sky samples per frame: the sky level's median is then known to ~0.005
sigma of a pixel."""

BLOCK_SAMPLES = 8
"""Side of a block of samples (8 x 8 = 64) whose median is one point of the gradient fit."""

MIN_SAMPLES = 200
"""Fewer valid samples on the overlap (a tiny overlap, an all-ground frame): identity."""

MIN_BLOCKS = 12
"""A gradient fit needs at least this many blocks (twice its 6 terms); else it falls back to an
offset only."""

_CLIP_SIGMA = 3.0
_CLIP_ITERS = 5


@dataclass(frozen=True, eq=False)
class SkySamples:
    """The reference's sky at a grid of its pixels: what every frame is matched to.

    ``xs``: (nx,) and ``ys``: (ny,) int64 reference pixel columns and rows of the grid;
    ``values``: (ny, nx, C) float32 the reference's samples there; ``sky``: (ny, nx) bool, inside
    the reference's sky mask; ``shape``: (rows, cols) of the reference.
    """

    xs: npt.NDArray[np.int64]
    ys: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]
    sky: BoolArray
    shape: tuple[int, int]

    @classmethod
    def of(cls, image: Sampled, sky: SkyTest) -> SkySamples:
        """Sample ``image`` ((rows, cols, C) float) on the grid; ``sky`` tells ground apart."""
        rows, cols = int(image.shape[0]), int(image.shape[1])
        xs, ys = sample_grid((rows, cols))
        values = np.ascontiguousarray(image[np.ix_(ys, xs)], dtype=np.float32)
        gx, gy = np.meshgrid(xs.astype(np.float64), ys.astype(np.float64))
        inside = np.asarray(sky(gx.ravel(), gy.ravel()), dtype=bool).reshape(gx.shape)
        return cls(xs, ys, values, inside, (rows, cols))

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The samples as named arrays (for ``np.savez``); :meth:`from_arrays` reads them."""
        return {
            "sky_xs": self.xs,
            "sky_ys": self.ys,
            "sky_values": self.values,
            "sky_inside": self.sky,
            "sky_shape": np.array(self.shape),
        }

    @classmethod
    def from_arrays(cls, data: Any) -> SkySamples:
        rows, cols = (int(v) for v in data["sky_shape"])
        return cls(
            np.asarray(data["sky_xs"], dtype=np.int64),
            np.asarray(data["sky_ys"], dtype=np.int64),
            np.asarray(data["sky_values"], dtype=np.float32),
            np.asarray(data["sky_inside"], dtype=bool),
            (rows, cols),
        )


def sample_grid(shape: tuple[int, int]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(xs, ys): the sample columns and rows of a (rows, cols) frame, one every ``step`` px."""
    rows, cols = shape
    step = max(1, math.ceil(math.sqrt(rows * cols / TARGET_SAMPLES)))
    xs = np.arange(step // 2, cols, step, dtype=np.int64)
    ys = np.arange(step // 2, rows, step, dtype=np.int64)
    return xs, ys


@dataclass(frozen=True)
class Normalization:
    """``x' = scale[c] * x + offset[c] + surface_c(u, v)`` for channel ``c``.

    ``surface``: per channel the coefficients ``(a, b, c, d, e)`` of
    ``a u + b v + c u^2 + d u v + e v^2`` with ``u = 2 x / (cols - 1) - 1`` and
    ``v = 2 y / (rows - 1) - 1`` on the reference grid (x = column, y = row), or None.
    """

    mode: str
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    surface: tuple[tuple[float, ...], ...] | None = None
    note: str | None = None

    @classmethod
    def identity(cls, channels: int, mode: str = "none", note: str | None = None) -> Normalization:
        return cls(mode, (1.0,) * channels, (0.0,) * channels, None, note)

    @property
    def is_identity(self) -> bool:
        return (
            all(s == 1.0 for s in self.scale)
            and all(o == 0.0 for o in self.offset)
            and self.surface is None
        )

    def apply(self, band: npt.NDArray[np.float32], row_start: int, shape: tuple[int, int]) -> None:
        """Normalize reference rows ``row_start:row_start + len(band)`` in place.

        ``band``: (band_rows, cols, C) float32 on the reference grid of ``shape`` (rows, cols).
        """
        if self.is_identity:
            return
        cols = shape[1]
        channels = band.shape[2]
        # one (cols * C,) row broadcast down the band: broadcasting along the 3-long channel
        # axis instead is several times slower
        flat = band.reshape(band.shape[0], cols * channels)
        if any(s != 1.0 for s in self.scale):
            flat *= np.tile(np.asarray(self.scale, dtype=np.float32), cols)
        flat += np.tile(np.asarray(self.offset, dtype=np.float32), cols)
        self.apply_surface(band, row_start, shape)

    def surface_at(
        self,
        x: npt.NDArray[np.float64],
        y: npt.NDArray[np.float64],
        shape: tuple[int, int],
        channel: npt.NDArray[np.intp],
    ) -> npt.NDArray[np.float64]:
        """The surface's value at reference positions (x, y) for each point's ``channel``
        (arrays of one shape); zeros without a surface."""
        if self.surface is None:
            return np.zeros(np.shape(x))
        rows, cols = shape
        u = 2.0 * x / max(cols - 1, 1) - 1.0
        v = 2.0 * y / max(rows - 1, 1) - 1.0
        a, b, c, d, e = np.asarray(self.surface, dtype=np.float64)[channel].T
        return np.asarray(a * u + b * v + c * u * u + d * u * v + e * v * v, np.float64)

    def apply_surface(
        self, band: npt.NDArray[np.float32], row_start: int, shape: tuple[int, int]
    ) -> None:
        """Add the gradient surface alone (no scale or offset) to reference rows
        ``row_start:row_start + len(band)`` in place; nothing without a surface. For readers that
        fold the per-channel scale and offset into their own conversion."""
        if self.surface is None:
            return
        rows, cols = shape
        channels = band.shape[2]
        flat = band.reshape(band.shape[0], cols * channels)
        u = np.linspace(-1.0, 1.0, cols) if cols > 1 else np.zeros(1)
        y = np.arange(row_start, row_start + band.shape[0], dtype=np.float64)
        v = 2.0 * y / max(rows - 1, 1) - 1.0
        k = np.asarray(self.surface, dtype=np.float64)  # (C, 5): a, b, c, d, e
        slope = k[:, 0] + np.outer(v, k[:, 3])  # (band_rows, C): a + d v
        level = np.outer(v, k[:, 1]) + np.outer(v * v, k[:, 4])  # b v + e v^2
        # term = slope u + c u^2 + level, built as (band_rows, cols * C) rows
        term = np.tile(slope.astype(np.float32), (1, cols))
        term *= np.repeat(u, channels).astype(np.float32)
        term += np.tile(level.astype(np.float32), (1, cols))
        term += np.tile(k[:, 2], cols).astype(np.float32) * np.repeat(u * u, channels).astype(
            np.float32
        )
        flat += term

    def apply_inside(
        self,
        band: npt.NDArray[np.float32],
        row_start: int,
        shape: tuple[int, int],
        footprint: BoolArray,
    ) -> None:
        """:meth:`apply`, keeping the samples outside the (band_rows, cols) ``footprint`` 0."""
        if self.is_identity:
            return
        self.apply(band, row_start, shape)
        np.copyto(band, 0.0, where=~footprint[:, :, np.newaxis])

    def as_json(self) -> dict[str, Any]:
        """The journal's and the frame store's record of it."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "scale": [round(s, 6) for s in self.scale],
            "offset": [round(o, 8) for o in self.offset],
        }
        if self.surface is not None:
            out["surface"] = [[round(k, 8) for k in coeffs] for coeffs in self.surface]
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None, channels: int) -> Normalization:
        if not obj:
            return cls.identity(channels)
        surface = obj.get("surface")
        return cls(
            str(obj.get("mode", "none")),
            tuple(float(s) for s in obj["scale"]),
            tuple(float(o) for o in obj["offset"]),
            None if surface is None else tuple(tuple(float(k) for k in c) for c in surface),
            obj.get("note"),
        )


def estimate(
    mode: str,
    image: Sampled,
    matrix: FloatArray,
    reference: SkySamples,
    sky: SkyTest,
    transparency: float | None = None,
) -> Normalization:
    """The normalization of one frame (see the module docstring).

    Parameters
    ----------
    mode : {"none", "add", "addscale", "gradient"}
    image : ndarray or Sampled
        (rows, cols, C) float32 frame before warping (or its point samples).
    matrix : ndarray
        (2, 3) frame -> reference transform.
    reference : SkySamples
        The reference's sky samples.
    sky : callable
        ``sky(x, y)`` in the frame's own pixel coordinates (the ground stays put in the camera).
    transparency : float, optional
        The frame's transparency relative to the reference (``"addscale"``).
    """
    if mode not in MODES:
        raise ValueError(f"normalize must be one of {MODES}, not {mode!r}")
    channels = int(image.shape[2])
    if mode == "none":
        return Normalization.identity(channels)
    frame, ref, valid = _pair_samples(image, matrix, reference, sky)
    if np.count_nonzero(valid) < MIN_SAMPLES:
        return Normalization.identity(channels, mode, "too little sky overlap: not normalized")
    f, r = frame[valid], ref[valid]
    note: str | None
    if mode == "gradient":
        surface = _fit_surface(frame, ref, valid, reference)
        if surface is not None:
            offsets = tuple(float(coeffs[0]) for coeffs in surface)
            rest = tuple(tuple(float(k) for k in coeffs[1:]) for coeffs in surface)
            return Normalization(mode, (1.0,) * channels, offsets, rest)
        note = "too few sky blocks for a gradient: offset only"
        scale = 1.0
    elif mode == "addscale":
        ok = transparency is not None and math.isfinite(transparency) and transparency > 0
        scale = 1.0 / transparency if ok and transparency is not None else 1.0
        note = None if ok else "no transparency measured: scale 1"
    else:
        scale, note = 1.0, None
    offsets = tuple(
        clipped_median(r[:, c]) - scale * clipped_median(f[:, c]) for c in range(channels)
    )
    return Normalization(mode, (scale,) * channels, offsets, None, note)


def _pair_samples(
    image: Sampled, matrix: FloatArray, reference: SkySamples, sky: SkyTest
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], BoolArray]:
    """The frame read at the reference's grid points: (frame, reference, valid), the first two
    (ny, nx, C) float32, ``valid`` (ny, nx) where both are sky and the frame covers the point."""
    m = np.asarray(matrix, dtype=np.float64)
    inverse = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    gx, gy = np.meshgrid(reference.xs.astype(np.float64), reference.ys.astype(np.float64))
    fx = inverse[0, 0] * gx + inverse[0, 1] * gy + inverse[0, 2]
    fy = inverse[1, 0] * gx + inverse[1, 1] * gy + inverse[1, 2]
    rows, cols = int(image.shape[0]), int(image.shape[1])
    ix, iy = np.rint(fx), np.rint(fy)
    valid = (ix >= 0) & (ix <= cols - 1) & (iy >= 0) & (iy <= rows - 1) & reference.sky
    ix = np.clip(ix, 0, cols - 1).astype(np.intp)
    iy = np.clip(iy, 0, rows - 1).astype(np.intp)
    valid &= np.asarray(sky(fx.ravel(), fy.ravel()), dtype=bool).reshape(valid.shape)
    frame = np.asarray(image[iy, ix], dtype=np.float32)
    valid &= np.isfinite(frame).all(axis=-1)
    return frame, reference.values, valid


def clipped_median(values: FloatArray) -> float:
    """Median after iterative 3-sigma clipping about the median (stars, hot pixels, trails).

    The kept values are always a run of the sorted values, so after one sort each iteration
    costs two binary searches (prefix sums give the run's std).
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0:
        return math.nan
    total = np.concatenate([[0.0], np.cumsum(x)])
    squares = np.concatenate([[0.0], np.cumsum(x * x)])
    lo, hi = 0, x.size
    for _ in range(_CLIP_ITERS):
        n = hi - lo
        centre = 0.5 * (x[lo + (n - 1) // 2] + x[lo + n // 2])
        mean = (total[hi] - total[lo]) / n
        spread = math.sqrt(max((squares[hi] - squares[lo]) / n - mean * mean, 0.0))
        new_lo = int(np.searchsorted(x, centre - _CLIP_SIGMA * spread, side="left"))
        new_hi = int(np.searchsorted(x, centre + _CLIP_SIGMA * spread, side="right"))
        if (new_lo, new_hi) == (lo, hi) or new_hi <= new_lo:
            break
        lo, hi = new_lo, new_hi
    n = hi - lo
    return float(0.5 * (x[lo + (n - 1) // 2] + x[lo + n // 2]))


def _fit_surface(
    frame: npt.NDArray[np.float32],
    ref: npt.NDArray[np.float32],
    valid: BoolArray,
    reference: SkySamples,
) -> list[npt.NDArray[np.float64]] | None:
    """Per channel the 6 coefficients (1, u, v, u^2, u v, v^2) fitted to reference - frame
    block medians with a 3-sigma clip of the residuals; None with fewer than MIN_BLOCKS."""
    ny, nx = valid.shape
    by, bx = ny // BLOCK_SAMPLES, nx // BLOCK_SAMPLES
    if by * bx < MIN_BLOCKS:
        return None
    b = BLOCK_SAMPLES
    cut = (slice(0, by * b), slice(0, bx * b))
    diff = np.where(valid[..., None], ref - frame, np.nan)[cut]
    channels = diff.shape[-1]
    blocks = (
        diff.reshape(by, b, bx, b, channels)
        .transpose(0, 2, 4, 1, 3)
        .reshape(by, bx, channels, b * b)
    )
    enough = np.count_nonzero(np.isfinite(blocks[:, :, 0]), axis=-1) >= b * b // 2
    if np.count_nonzero(enough) < MIN_BLOCKS:
        return None
    medians = np.nanmedian(blocks[enough], axis=-1)  # (k, C)
    rows, cols = reference.shape
    xs = reference.xs[: bx * b].reshape(bx, b).mean(axis=1)
    ys = reference.ys[: by * b].reshape(by, b).mean(axis=1)
    gx, gy = np.meshgrid(xs, ys)
    u = 2.0 * gx[enough] / max(cols - 1, 1) - 1.0
    v = 2.0 * gy[enough] / max(rows - 1, 1) - 1.0
    design = np.column_stack([np.ones_like(u), u, v, u * u, u * v, v * v])
    out = []
    for c in range(channels):
        target = medians[:, c].astype(np.float64)
        use = np.isfinite(target)
        coeffs = np.zeros(6)
        for _ in range(_CLIP_ITERS):
            if np.count_nonzero(use) < MIN_BLOCKS:
                return None
            coeffs = np.linalg.lstsq(design[use], target[use], rcond=None)[0]
            resid = target - design @ coeffs
            spread = float(np.std(resid[use]))
            new = np.isfinite(target) & (np.abs(resid) <= _CLIP_SIGMA * max(spread, 1e-12))
            if np.array_equal(new, use):
                break
            use = new
        out.append(coeffs)
    return out
