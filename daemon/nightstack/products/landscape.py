"""Landscape astrophotography: the sky mask (ratio, image or automatic) and the freeze-ground
composite.

On a tripod the ground stays put in the camera frame while the stars turn overhead. Aligning
the frames on the stars sharpens the sky and smears the ground ("blur", the plain stack);
"freeze" stacks the ground as well, in the camera frame (which is the reference's grid: the
reference is stacked unwarped), and blends the two along the horizon.

- :class:`SkyMask`: True = sky, full resolution, and the per-column horizon (the first ground
  row) that the fill, the feather and the ground rows derive from.
- :class:`HorizonFinder`: the automatic mask. Over the first frames it accumulates, on a coarse
  grid of the detection luminance, the temporal variance of the frames as they come (camera
  frame) and as aligned to the reference. Stars move in the camera frame and stand still when
  aligned; the ground does the opposite. The log ratio of the two variances is evidence of sky
  (> 0) or ground (< 0); the horizon is the one connected line (a dynamic programme over the
  columns, with a cost per row of change between neighbours) that puts the most sky evidence
  above and ground evidence below; each column is then refined to a fraction of a pixel on the
  camera-frame mean, where the static ground's edge is sharp. A night where nothing moves
  (a tracked mount, or too few frames) gives no answer: the caller falls back to the ratio.
- :class:`GroundStack`: rows ``top:`` of every accepted frame, unwarped, normalized like the
  sky, in their own frame store (exact final: the same sigma clip as the sky) and live stack.
- :func:`blend_weights`, :func:`composite`, :func:`fill_ground`: the feathered blend (sky
  weight 0 on the ground, rising to 1 over ``feather_px`` on the sky side, so no sky-stack
  light lands on the ground) and the fill that keeps the moving ground out of the sky stack.

Why one module of this size: the automatic sky mask, the frozen ground and their composite share
one mask geometry and one life cycle (start, add, resume, final).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from scipy.ndimage import median_filter

from nightstack.arrays import BoolArray, FloatArray
from nightstack.config import Settings
from nightstack.frames import IDENTITY, Frame, MosaicFrame
from nightstack.io.writers import write_bytes
from nightstack.registration.normalize import Normalization
from nightstack.stacking.combine import combine
from nightstack.stacking.live import LiveStack
from nightstack.stacking.live_drizzle import Live
from nightstack.stacking.store import FrameStore, MosaicLayout

log = logging.getLogger("nightstack.products.landscape")


GRID_COLS = 384
"""The automatic mask's evidence grid is at most this many cells wide: a few hundred columns
resolve a skyline's trees and roofs, and each frame costs a warp of ~0.1 MP."""

MIN_FRAMES = 3
"""Frames (the reference included) before the automatic mask is estimated: a variance needs
at least three samples to tell a star's motion from noise."""

REFINE_FRAMES = 12
"""The automatic mask is re-estimated with every accepted frame up to this many, then fixed:
more frames only repeat what the first ones said, and the ground stack's rows are fixed."""

MIN_MOTION_CELLS = 2.0
"""The sky must have moved this many grid cells (at the frame's corners, relative to the
reference) before the variances can separate ground from sky; a tracked mount never gets there."""

MIN_CONTRAST = 0.3
"""Mean evidence above the horizon minus below it (log variance ratio) needed to accept an
automatic mask: less is no clear answer."""

JUMP_COST = 0.03
"""Cost, in evidence units, of one grid row of change of the horizon between neighbouring
columns: a skyline is connected, but trees and roofs rise steeply."""

_EVIDENCE_CLIP = 3.0  # |log variance ratio| beyond this is certain either way
_EDGE_PX = 3  # luminance rows either side of the edge used to refine a column's horizon
_SEARCH_CELLS = 2  # a column's horizon is refined within the motion and this many cells more
_STRONG_EDGE = 0.4  # an edge is strong at this fraction of the strongest in the search window
_PERSIST = 5  # ... and what is below it stays unlike the sky for this many edge widths
_SKY_EVIDENCE = 0.5  # ... and the evidence just below it is not that of moving stars
_EDGE_SIGMA = 8.0  # ... and at least this many noise sigmas of a step (else search further down)
_MIN_COMBINE_CAP = 64 * 2**20  # the ground's combine gets at least this RAM
_COLUMN_CHUNK = 256  # luminance columns refined at a time (a few MB of row arrays)
_NOISE_STRIDE = 4  # the minimum's noise from every 4th column
_PREVIEW_CHUNK = 16  # preview rows composited at a time (~20 MB at 24 MP)
_FILL_BAND_PX = 150  # the sky this far above the horizon is fitted to fill the ground
_FILL_SAMPLES = 40_000  # sky samples of the whole frame's grid (a few thousand in the band)
_FILL_BAND_ROWS = 128  # ground rows filled at a time
_FILL_ITERATIONS = 3  # fits, each clipping the samples beyond 3 sigma


# --------------------------------------------------------------------------- the mask


@dataclass(frozen=True, eq=False)
class SkyMask:
    """Which pixels of the camera frame are sky.

    ``sky``: (rows, cols) bool, True = sky, full resolution. ``horizon``: (cols,) float64, the
    row coordinate of the ground's top edge per column (pixel centres at integers: a pixel whose
    centre is below it is ground; ``rows - 0.5`` where a column holds no ground). ``source``:
    "ratio", "image" or "auto". ``note``: why the auto mask fell back, or None.
    """

    sky: BoolArray
    horizon: npt.NDArray[np.float64]
    source: str
    note: str | None = None

    @classmethod
    def from_horizon(
        cls, horizon: npt.ArrayLike, rows: int, source: str = "auto", note: str | None = None
    ) -> SkyMask:
        """The mask of a horizon line: sky where the pixel centre is above ``horizon[col]``."""
        line = np.asarray(horizon, dtype=np.float64)
        sky = np.arange(rows, dtype=np.float64)[:, None] < line[None, :]
        return cls(sky, line, source, note)

    @classmethod
    def from_ratio(cls, shape: tuple[int, int], ratio: float, note: str | None = None) -> SkyMask:
        """The top ``ratio`` of the rows are sky (``landscape_mask_ratio``)."""
        rows, cols = shape
        return cls.from_horizon(np.full(cols, ratio * rows - 0.5), rows, "ratio", note)

    @classmethod
    def from_image(cls, sky: npt.ArrayLike) -> SkyMask:
        """A mask image (True = sky); the horizon is each column's first ground row."""
        mask = np.asarray(sky, dtype=bool)
        rows = mask.shape[0]
        ground = ~mask
        first = np.where(ground.any(axis=0), ground.argmax(axis=0), rows).astype(np.float64)
        return cls(mask, first - 0.5, "image")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.sky.shape[0]), int(self.sky.shape[1]))

    @property
    def ground_top(self) -> int:
        """The first row holding any ground (``rows`` when there is none)."""
        ground = ~self.sky
        has = ground.any(axis=1)
        return int(np.argmax(has)) if has.any() else self.shape[0]

    def in_sky(self, x: FloatArray, y: FloatArray) -> BoolArray:
        """Whether full-resolution positions (x, y) are sky (nearest pixel)."""
        rows, cols = self.shape
        col = np.clip(np.rint(np.asarray(x)).astype(np.intp), 0, cols - 1)
        row = np.clip(np.rint(np.asarray(y)).astype(np.intp), 0, rows - 1)
        inside = (np.asarray(y) >= -0.5) & (np.asarray(y) <= rows - 0.5)
        return np.asarray(self.sky[row, col] & inside)

    def clamped(self, first_ground_row: int) -> SkyMask:
        """The mask with no ground above ``first_ground_row`` (the ground stack's rows)."""
        if self.ground_top >= first_ground_row:
            return self
        sky = self.sky.copy()
        sky[:first_ground_row] = True
        horizon = np.maximum(self.horizon, first_ground_row - 0.5)
        return SkyMask(sky, horizon, self.source, self.note)

    def png(self) -> bytes:
        """The mask as an 8-bit PNG, white = sky (loadable again as ``sky_mask``)."""
        ok, encoded = cv2.imencode(".png", self.sky.astype(np.uint8) * 255)
        if not ok:
            raise OSError("OpenCV could not encode the sky mask as PNG")
        return bytes(encoded.tobytes())


# --------------------------------------------------------------------------- automatic mask


class HorizonFinder:
    """The automatic sky mask from the session's first frames (see the module docstring).

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) of the full-resolution frames.
    bin : int
        Binning of the detection luminance the frames are given in.
    """

    def __init__(self, shape: tuple[int, int], bin: int) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.bin = int(bin)
        lum_rows, lum_cols = self.shape[0] // self.bin, self.shape[1] // self.bin
        self.factor = max(1, math.ceil(lum_cols / GRID_COLS))
        self.cell = self.bin * self.factor  # full-resolution pixels per grid cell
        self.grid = (lum_rows // self.factor, lum_cols // self.factor)
        g = (*self.grid,)
        self._u = np.zeros(g, np.float64)  # camera frame: sum and sum of squares
        self._uu = np.zeros(g, np.float64)
        self._a = np.zeros(g, np.float64)  # aligned: sum, sum of squares, count
        self._aa = np.zeros(g, np.float64)
        self._an = np.zeros(g, np.float64)
        self._min = np.full((lum_rows, lum_cols), np.inf, np.float32)  # camera-frame minimum
        self.frames = 0
        self.motion_cells = 0.0

    @property
    def state_bytes(self) -> int:
        """Memory held by the accumulators."""
        grids = (self._u, self._uu, self._a, self._aa, self._an)
        return int(self._min.nbytes + sum(a.nbytes for a in grids))

    def add(self, luminance: FloatArray, matrix: FloatArray) -> None:
        """Accumulate one accepted frame: its binned luminance ((rows // bin, cols // bin)
        float) and its (2, 3) frame -> reference transform."""
        lum = np.asarray(luminance, dtype=np.float32)
        lum_rows, lum_cols = self._min.shape
        lum = lum[:lum_rows, :lum_cols]
        np.minimum(self._min, lum, out=self._min)
        gr, gc = self.grid
        f = self.factor
        small = lum[: gr * f, : gc * f].reshape(gr, f, gc, f).mean(axis=(1, 3), dtype=np.float64)
        self._u += small
        self._uu += small * small
        m = self._grid_matrix(matrix)
        flat = small.astype(np.float32)
        aligned = cv2.warpAffine(flat, m, (gc, gr), flags=cv2.INTER_LINEAR)
        cover = cv2.warpAffine(np.ones_like(flat), m, (gc, gr), flags=cv2.INTER_LINEAR)
        inside = cover > 0.999
        self._a += np.where(inside, aligned, 0.0)
        self._aa += np.where(inside, aligned.astype(np.float64) ** 2, 0.0)
        self._an += inside
        self.frames += 1
        corners = np.array([[0, 0, 1], [gc - 1, 0, 1], [0, gr - 1, 1], [gc - 1, gr - 1, 1]])
        moved = corners @ m.T - corners[:, :2]
        self.motion_cells = max(self.motion_cells, float(np.hypot(*moved.T).max()))

    def estimate(self) -> tuple[SkyMask | None, str]:
        """The mask, or None and why there is no clear answer yet."""
        if self.frames < MIN_FRAMES:
            return None, f"{self.frames} frame(s), {MIN_FRAMES} needed"
        if self.motion_cells < MIN_MOTION_CELLS:
            moved = self.motion_cells * self.cell
            return None, f"the sky moved {moved:.1f} px: nothing moves (tracked mount?)"
        evidence = self._evidence()
        coarse = _connected_horizon(evidence, JUMP_COST)  # per grid column, in grid rows
        rows_g = np.arange(self.grid[0])[:, None]
        above = evidence[rows_g < coarse[None, :]]
        below = evidence[rows_g >= coarse[None, :]]
        if above.size == 0 or below.size == 0:
            return SkyMask.from_horizon(
                np.full(self.shape[1], self.shape[0] - 0.5), self.shape[0]
            ), "no ground"
        contrast = float(above.mean() - below.mean())
        if contrast < MIN_CONTRAST:
            return None, f"no clear horizon (evidence contrast {contrast:.2f} < {MIN_CONTRAST})"
        horizon = self._refine(coarse, evidence)
        return SkyMask.from_horizon(horizon, self.shape[0]), f"contrast {contrast:.2f}"

    # --- helpers -------------------------------------------------------------------------

    def _grid_matrix(self, matrix: FloatArray) -> npt.NDArray[np.float64]:
        """The frame -> reference transform in grid cells (cell (u, v) is centred on
        full-resolution ``cell * u + (cell - 1) / 2``)."""
        m = np.asarray(matrix, dtype=np.float64)
        o = (self.cell - 1) / 2.0
        out = m.copy()
        out[:, 2] = (m[:, :2] @ np.array([o, o]) + m[:, 2] - o) / self.cell
        return out

    def _evidence(self) -> npt.NDArray[np.float64]:
        """(grid rows, grid cols) log(camera-frame variance / aligned variance), smoothed."""
        n = float(self.frames)
        var_u = np.maximum(self._uu / n - (self._u / n) ** 2, 0.0)
        an = np.maximum(self._an, 1.0)
        var_a = np.maximum(self._aa / an - (self._a / an) ** 2, 0.0)
        floor = float(np.median(np.minimum(var_u, var_a))) + 1e-12
        evidence = np.log((var_u + floor) / (var_a + floor))
        evidence[self._an < MIN_FRAMES] = 0.0  # too few aligned samples: no say
        np.clip(evidence, -_EVIDENCE_CLIP, _EVIDENCE_CLIP, out=evidence)
        return np.asarray(cv2.blur(evidence, (3, 3)), dtype=np.float64)

    def _edges(
        self,
        low: npt.NDArray[np.float32],
        cum: npt.NDArray[np.float64],
        v: npt.NDArray[np.int64],
        k: int,
        span_cols: tuple[int, int],
        top: npt.NDArray[np.int64],
        threshold: npt.NDArray[np.float64],
        active: BoolArray,
        evidence: npt.NDArray[np.float64],
        g: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.float64]:
        """The refined edge (luminance rows, sub-pixel) of columns ``c0:c1``; ``rows`` where
        none is found. Every column at once: (rows, columns) arrays of the chunk."""
        c0, c1 = span_cols
        lum_rows = low.shape[0]
        f = self.factor
        upper, lower, diff = _steps(cum, v, k, c0, c1)
        step = np.abs(diff)
        thr = threshold[None, c0:c1]
        candidate = (v[:, None] >= top[None, c0:c1]) & (step >= thr) & active[None, c0:c1]
        # the horizon persists below its edge (a star left in the minimum is a bump) ...
        start = np.maximum(v - 3 * k, 0)
        above = (cum[v, c0:c1] - cum[start, c0:c1]) / (v - start)[:, None]
        deep_end = np.minimum(v + _PERSIST * k, lum_rows)
        deep_start = np.minimum(v + k, lum_rows)
        depth = np.maximum(deep_end - deep_start, 1)[:, None]
        deep = (cum[deep_end, c0:c1] - cum[deep_start, c0:c1]) / depth
        persists = (deep - above) * np.sign(lower - above) >= 0.5 * thr
        persists |= (deep_end - deep_start <= 0)[:, None]
        # ... and a bright star's halo left there moves (sky evidence just below its edge)
        padded = np.vstack([evidence, np.zeros((3, evidence.shape[1]))])
        grid_rows = np.minimum(v // f, evidence.shape[0])
        below = 0.5 * (padded[grid_rows + 1] + padded[grid_rows + 2])[:, g[c0:c1]]
        candidate &= persists & (below < _SKY_EVIDENCE)
        found = candidate.any(axis=0)
        i = np.argmax(candidate, axis=0)
        cols = np.arange(c1 - c0)
        for _ in range(2 * k + 2):  # up to the local maximum of that edge
            nxt = np.minimum(i + 1, len(v) - 1)
            i = i + ((i + 1 < len(v)) & (step[nxt, cols] > step[i, cols]))
        best = v[i]
        sky_level, ground_level = upper[i, cols], lower[i, cols]
        rows = np.clip(best[:, None] + np.arange(-k, k)[None, :], 0, lum_rows - 1)
        span = low[rows, c0 + cols[:, None]].astype(np.float64)  # (columns, 2k)
        contrast = sky_level - ground_level
        safe = np.where(contrast == 0, 1.0, contrast)
        share = np.clip((span - ground_level[:, None]) / safe[:, None], 0.0, 1.0).sum(axis=1)
        edges = np.where(contrast == 0, best.astype(np.float64), best - k + share)
        return np.where(found, edges, float(lum_rows))

    def _refine(
        self, coarse: npt.NDArray[np.int64], evidence: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """Full-resolution horizon per column, from the camera-frame minimum of the frames
        (the moving stars gone, the static ground's edge sharp): the topmost strong step edge
        within the sky's motion of the coarse horizon (the coarse line is smoothed, and the
        moving ground biases the variances near it), located to a fraction of a pixel."""
        low = np.asarray(cv2.medianBlur(self._min, 3), dtype=np.float32)  # hot pixels
        lum_rows, lum_cols = low.shape
        bin, f, k = self.bin, self.factor, _EDGE_PX
        reach = math.ceil(self.motion_cells * f) + _SEARCH_CELLS * f  # luminance rows
        cum = np.vstack([np.zeros((1, lum_cols)), np.cumsum(low, axis=0, dtype=np.float64)])
        g = np.minimum(np.arange(lum_cols) // f, len(coarse) - 1)  # grid column of each column
        top = np.clip(np.asarray(coarse)[g] * f - reach, k, lum_rows - k)
        bottom = np.clip(np.asarray(coarse)[g] * f + reach, k, lum_rows - k)
        active = (np.asarray(coarse)[g] < self.grid[0]) & (bottom > top)
        diffs = np.diff(self._min[:, ::_NOISE_STRIDE].astype(np.float64), axis=0)  # unfiltered
        mad = float(np.median(np.abs(diffs - np.median(diffs))))
        noise = 1.4826 * mad / math.sqrt(2.0) * math.sqrt(2.0 / k)  # of a k-row step
        v = np.arange(k, lum_rows - k + 1)
        chunks = [
            (c0, min(c0 + _COLUMN_CHUNK, lum_cols)) for c0 in range(0, lum_cols, _COLUMN_CHUNK)
        ]
        near = np.zeros(lum_cols)
        for c0, c1 in chunks:  # the strongest step near the coarse horizon, per column
            step = np.abs(_steps(cum, v, k, c0, c1)[2])
            inside = (v[:, None] >= top[None, c0:c1]) & (v[:, None] <= bottom[None, c0:c1])
            near[c0:c1] = np.where(inside, step, 0.0).max(axis=0)
        # the typical horizon contrast: a lit window's far stronger edge below must not hide it
        typical = float(np.median(near[active])) if active.any() else 0.0
        threshold = np.maximum(_STRONG_EDGE * np.minimum(near, typical), _EDGE_SIGMA * noise)
        edges = np.full(lum_cols, float(lum_rows))
        for c0, c1 in chunks:
            edges[c0:c1] = self._edges(
                low, cum, v, k, (c0, c1), top, threshold, active, evidence, g
            )
        edges = median_filter(edges, size=3, mode="nearest")  # a lone wrong column
        horizon = np.repeat(bin * edges - 0.5, bin)
        if horizon.size < self.shape[1]:
            horizon = np.concatenate([horizon, np.full(self.shape[1] - horizon.size, horizon[-1])])
        horizon[horizon >= bin * lum_rows - 0.5 - 1e-9] = self.shape[0] - 0.5
        return horizon[: self.shape[1]]


def _steps(
    cum: npt.NDArray[np.float64], v: npt.NDArray[np.int64], k: int, c0: int, c1: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(upper, lower, lower - upper): the means of the ``k`` rows above and below each row
    ``v`` of columns ``c0:c1``, from the column sums ``cum`` ((rows + 1, cols))."""
    upper = (cum[v, c0:c1] - cum[v - k, c0:c1]) / k
    lower = (cum[v + k, c0:c1] - cum[v, c0:c1]) / k
    return upper, lower, lower - upper


def _connected_horizon(evidence: npt.NDArray[np.float64], jump: float) -> npt.NDArray[np.int64]:
    """The horizon (first ground row, 0 .. rows, per column) maximising the sky evidence above
    minus below, less ``jump`` per row of change between neighbouring columns (exact dynamic
    programme; the L1 transition is two running maxima per column)."""
    rows, cols = evidence.shape
    cum = np.vstack([np.zeros((1, cols)), np.cumsum(evidence, axis=0)])
    score = 2.0 * cum - cum[-1][None, :]  # (rows + 1, cols): above minus below
    h = np.arange(rows + 1, dtype=np.float64)
    values = np.empty_like(score)
    values[:, 0] = score[:, 0]
    for c in range(1, cols):
        prev = values[:, c - 1]
        up = np.maximum.accumulate(prev + jump * h) - jump * h
        down = (np.maximum.accumulate((prev - jump * h)[::-1]))[::-1] + jump * h
        values[:, c] = score[:, c] + np.maximum(up, down)
    line = np.empty(cols, dtype=np.int64)
    line[-1] = int(np.argmax(values[:, -1]))
    for c in range(cols - 2, -1, -1):
        line[c] = int(np.argmax(values[:, c] - jump * np.abs(h - line[c + 1])))
    return line


# --------------------------------------------------------------------------- the blend


def blend_weights(mask: SkyMask, top: int, feather_px: float) -> npt.NDArray[np.float32]:
    """(rows - top, cols) float32 weight of the sky stack in the composite, rows ``top:``:
    0 on the ground, rising linearly with the distance from the ground to 1 at
    ``feather_px`` on the sky side (the whole feather lies in the sky)."""
    sky = np.ascontiguousarray(mask.sky[top:], dtype=np.uint8)
    if not sky.size:
        return np.zeros(sky.shape, np.float32)
    distance = cv2.distanceTransform(sky, cv2.DIST_L2, 5)
    weight = np.asarray(distance, dtype=np.float32)
    weight /= np.float32(max(feather_px, 1e-6))
    np.minimum(weight, 1.0, out=weight)
    return weight


def composite(
    sky: FloatArray, ground: FloatArray, weight: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """``weight * sky + (1 - weight) * ground`` per pixel; the ground where the sky stack has
    no coverage (NaN). All (rows, cols, C) float except ``weight`` (rows, cols)."""
    s = np.asarray(sky, dtype=np.float32)
    g = np.asarray(ground, dtype=np.float32)
    w = weight[:, :, np.newaxis]
    out = g + w * (s - g)
    np.copyto(out, g, where=~np.isfinite(s))
    return np.asarray(out, dtype=np.float32)


def fill_ground(image: FloatArray | npt.NDArray[np.uint16], mask: SkyMask) -> None:
    """Replace the ground of a camera-frame image, in place, by the sky it hides: per channel
    (or, for a (rows, cols) uint16 sensor mosaic, per CFA site of the 2x2 tile) a quadratic
    surface fitted (stars clipped) to the sky in the ``_FILL_BAND_PX`` above the horizon,
    extrapolated down. Warped onto the reference with the stars, a frame then brings the sky's
    own background, not a dark moving ground, into the sky stack near the horizon (the
    background is fixed to the ground, so the surface is what the sky would show there)."""
    if mask.ground_top >= mask.shape[0]:
        return
    if image.ndim == 2:  # a mosaic: each CFA site is its own plane
        for y0 in (0, 1):
            for x0 in (0, 1):
                _fill_plane(image[y0::2, x0::2], mask, y0, x0, 2)
        return
    for c in range(image.shape[2]):
        _fill_plane(image[:, :, c], mask, 0, 0, 1)


def _fill_plane(
    plane: npt.NDArray[np.generic], mask: SkyMask, y0: int, x0: int, stride: int
) -> None:
    """:func:`fill_ground` of one plane whose pixel (i, j) is the frame's (y0 + stride i,
    x0 + stride j)."""
    rows, cols = mask.shape
    prow, pcol = plane.shape
    step = max(1, math.ceil(math.sqrt(prow * pcol / _FILL_SAMPLES)))
    iy, ix = np.mgrid[step // 2 : prow : step, step // 2 : pcol : step]
    fy, fx = y0 + stride * iy, x0 + stride * ix
    height = mask.horizon[fx] - fy  # px above the horizon
    near = (height > 2) & (height < _FILL_BAND_PX) & mask.sky[fy, fx]
    if np.count_nonzero(near) < 12:
        return
    u, v = fx[near] / max(cols - 1, 1), fy[near] / max(rows - 1, 1)
    design = np.column_stack([np.ones_like(u), u, v, u * u, u * v, v * v])
    values = np.asarray(plane[iy[near], ix[near]], dtype=np.float64)
    keep = np.ones(len(u), dtype=bool)
    coeffs = np.zeros(6)
    for _ in range(_FILL_ITERATIONS):  # stars, windows and hot pixels clipped
        coeffs = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        residual = values - design @ coeffs
        spread = 1.4826 * float(np.median(np.abs(residual[keep])))
        keep = np.abs(residual) <= 3.0 * max(spread, 1e-12)
    a, bu, bv, cuu, cuv, cvv = coeffs
    gu = (x0 + stride * np.arange(pcol)) / max(cols - 1, 1)
    flat = (a + bu * gu + cuu * gu * gu).astype(np.float32)  # per row: flat + slope v + cvv v^2
    slope = (bv + cuv * gu).astype(np.float32)
    sky = mask.sky[y0::stride, x0::stride][:prow, :pcol]
    first = max(0, (mask.ground_top - y0) // stride)
    integer = np.issubdtype(plane.dtype, np.integer)
    for r0 in range(first, prow, _FILL_BAND_ROWS):  # a few MB at a time
        r1 = min(prow, r0 + _FILL_BAND_ROWS)
        gv = ((y0 + stride * np.arange(r0, r1)) / max(rows - 1, 1)).astype(np.float32)[:, None]
        surface = flat + slope * gv + np.float32(cvv) * gv * gv
        if integer:  # mosaic codes
            surface = np.clip(np.rint(surface), 0, np.iinfo(np.uint16).max)
        np.copyto(plane[r0:r1], surface.astype(plane.dtype), where=~sky[r0:r1])


# --------------------------------------------------------------------------- the ground stack


def rebase(norm: Normalization, top: int, rows: int, ground_rows: int) -> Normalization:
    """The normalization ``norm`` (its surface on the full grid of ``rows`` rows) for a store
    of rows ``top:top + ground_rows``: the same values at the same pixels."""
    if norm.surface is None:
        return norm
    a = (ground_rows - 1) / max(rows - 1, 1)  # v_full = a v' + b
    b = (2.0 * top + ground_rows - 1) / max(rows - 1, 1) - 1.0
    surface = []
    offsets = []
    for (ku, kv, kuu, kuv, kvv), offset in zip(norm.surface, norm.offset, strict=True):
        surface.append((ku + kuv * b, kv * a + 2 * kvv * a * b, kuu, kuv * a, kvv * a * a))
        offsets.append(offset + kv * b + kvv * b * b)
    return Normalization(norm.mode, norm.scale, tuple(offsets), tuple(surface), norm.note)


class GroundStack:
    """The ground in the camera frame: rows ``top:`` of every accepted frame, unwarped.

    The frames go to their own :class:`FrameStore` (``directory``), normalized like the sky, so
    the final is the exact combine with the same rejection as the sky's; a :class:`LiveStack`
    over it gives the preview (rebuilt from the store after a restart).

    Parameters
    ----------
    directory : path-like
        The ground's frame store (reopened when it exists).
    shape : (int, int)
        (rows, cols) of the full frames.
    channels : int
        1 or 3.
    top : int
        First row stacked (rows above it are sky everywhere, feather included).
    kappa, warmup : float, int
        The live stack's rejection (as the sky's).
    live : bool
        Keep a live stack (False for the batch ``nightstack stack``).
    """

    def __init__(
        self,
        directory: str | Path,
        shape: tuple[int, int],
        channels: int,
        top: int,
        *,
        kappa: float,
        warmup: int,
        live: bool = True,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.top = int(top)
        if not 0 <= self.top < self.shape[0]:
            raise ValueError(f"ground top row {top} outside the frame's {self.shape[0]} rows")
        ground = (self.shape[0] - self.top, self.shape[1])
        self.kappa, self.warmup = kappa, warmup
        self.store = FrameStore(directory, ground, channels)
        self.live: LiveStack | None = None
        if live:
            self.live = LiveStack(ground, channels, kappa=kappa, warmup=warmup, store=self.store)
            self.live.catch_up()

    def add(
        self, frame: Frame | MosaicFrame, norm: Normalization, weight: float, name: str
    ) -> None:
        """Store rows ``top:`` of one frame (camera frame: its RGB image, or its sensor
        mosaic, ``top`` even so the CFA tile keeps its phase) with the frame's normalization,
        and add them live."""
        rows = self.shape[0]
        ground_rows = rows - self.top
        rebased = rebase(norm, self.top, rows, ground_rows)
        if isinstance(frame, MosaicFrame):
            layout = MosaicLayout(frame.pattern, frame.white_balance, frame.demosaic)
            codes = frame.codes[self.top :]
            self.store.add_mosaic(codes, layout, IDENTITY, weight, name, normalization=rebased)
        else:
            self.store.add_warped(
                frame.image[self.top :],
                IDENTITY,
                weight=weight,
                name=name,
                normalization=rebased,
            )
        if self.live is not None:
            self.live.catch_up()

    def cropped(self, directory: Path, top: int, *, live: bool) -> GroundStack:
        """This stack's frames from row ``top`` down, in a new store at ``directory`` (this
        one's files are replaced): for an automatic mask found after the first frames."""
        top = max(top - top % 2, self.top)
        if top == self.top and (self.live is not None) == live:
            return self
        staging = directory.with_name(directory.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        rows = self.shape[0]
        new = GroundStack(
            staging,
            self.shape,
            self.store.channels,
            top,
            kappa=self.kappa,
            warmup=self.warmup,
            live=False,
        )
        for i in range(len(self.store)):
            band = self.store.read_band(i, top - self.top, rows - self.top)
            record = self.store.frame(i)
            new.store.add(band, IDENTITY, band.shape[:2], weight=record.weight, name=record.name)
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
        return GroundStack(
            directory,
            self.shape,
            self.store.channels,
            top,
            kappa=self.kappa,
            warmup=self.warmup,
            live=live,
        )

    def keep(self, names: list[str]) -> None:
        """After a resume: keep only the frames the sky store holds (``names`` in store order;
        a frame stored here but never journaled goes), then rebuild the live stack."""
        wanted = list(names)
        drop = []
        j = 0
        for i in range(len(self.store)):
            if j < len(wanted) and self.store.frame(i).name == wanted[j]:
                j += 1
            else:
                drop.append(i)
        self.store.drop(drop)
        if self.live is not None:
            live = self.live
            self.live = LiveStack(
                live.shape, live.channels, kappa=live.kappa, warmup=live.warmup, store=self.store
            )
            self.live.catch_up()

    def final(
        self,
        *,
        method: str,
        sigma: float,
        maxiters: int,
        weighted: bool,
        ram_cap_bytes: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> FloatArray:
        """The exact combine of the ground rows: (rows - top, cols, C) float32."""
        self.live = None
        weights = self.store.weights() if weighted else None
        return combine(
            self.store,
            method=method,  # type: ignore[arg-type]
            sigma=sigma,
            maxiters=maxiters,
            weights=weights,
            ram_cap_bytes=ram_cap_bytes,
            progress=progress,
        )


def ground_top(mask: SkyMask, feather_px: float) -> int:
    """First row the ground stack must hold: the feather above the highest ground, 2 rows of
    margin for the distance transform's rounding; even, so a mosaic keeps its CFA phase."""
    top = max(0, mask.ground_top - math.ceil(feather_px) - 2)
    return top - top % 2


def preview_composite(
    sky_preview: npt.NDArray[np.float32],
    sky_band: Callable[[int, int], FloatArray],
    ground: LiveStack,
    weight: npt.NDArray[np.float32],
    top: int,
    rows: int,
) -> npt.NDArray[np.float32]:
    """The live preview with the frozen ground: ``sky_preview`` ((h, w, C), the sky live stack
    shrunk) with its rows from the ground's top down replaced by the composite, built at full
    resolution a few preview rows at a time (``_PREVIEW_CHUNK``: a few MB) and shrunk the same
    way (area average)."""
    height, width = sky_preview.shape[:2]
    first = min(height, top * height // rows)  # first preview row touching the ground rows
    out = sky_preview.copy()
    for i0 in range(first, height, _PREVIEW_CHUNK):
        i1 = min(height, i0 + _PREVIEW_CHUNK)
        r0, r1 = round(i0 * rows / height), round(i1 * rows / height) if i1 < height else rows
        r0 = min(max(r0, 0), r1 - 1)
        sky = np.asarray(sky_band(r0, r1), dtype=np.float32)
        g0 = max(r0, top)
        ground_rows = np.array(sky)  # rows above the ground's top: pure sky (weight 1)
        w = np.ones(sky.shape[:2], np.float32)
        ground_rows[g0 - r0 :] = ground.result_band(g0 - top, r1 - top)
        w[g0 - r0 :] = weight[g0 - top : r1 - top]
        mixed = np.nan_to_num(composite(sky, ground_rows, w), nan=0.0)
        small = cv2.resize(mixed, (width, i1 - i0), interpolation=cv2.INTER_AREA)
        out[i0:i1] = np.asarray(small, dtype=np.float32).reshape(i1 - i0, width, -1)
    return out


# --------------------------------------------------------------------------- a session's landscape


class Landscape:
    """A session's sky mask and, with ``landscape = "freeze"``, its ground stack.

    Parameters
    ----------
    settings : Settings
        ``sky_mask`` ("auto", an image, or None for the ratio), ``landscape_mask_ratio``,
        ``landscape``, ``landscape_feather_px`` and the live stack's ``live_kappa`` and
        ``live_warmup``.
    workdir : Path
        The session directory: ``sky_mask.png`` and the ground's store ``ground/`` go there.
    image_mask : bool ndarray, optional
        The ``sky_mask`` image (True = sky), when one is configured.
    live : bool
        Keep the ground's live stack (False for the batch ``nightstack stack``).
    """

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        image_mask: BoolArray | None = None,
        live: bool = True,
    ) -> None:
        self.settings = settings
        self.workdir = workdir
        self.freeze = settings.landscape == "freeze"
        self.auto = settings.sky_mask == "auto"
        self.feather = float(settings.landscape_feather_px)
        self.with_live = live
        self.image_mask = image_mask
        self.mask: SkyMask | None = None
        """The sky mask in use (None: not known yet; detection uses the ratio meanwhile)."""
        self.finder: HorizonFinder | None = None
        self.ground: GroundStack | None = None
        self.shape = (0, 0)
        self.channels = 0
        self._weight: npt.NDArray[np.float32] | None = None
        self.accepted = 0

    # --- life cycle ----------------------------------------------------------------------
    def start(self, shape: tuple[int, int], channels: int, bin: int) -> None:
        """The reference's geometry is known: set up the mask and the ground stack (reopening
        what a session directory already holds after a restart)."""
        self.shape, self.channels = (int(shape[0]), int(shape[1])), int(channels)
        ground_dir = self.workdir / "ground"
        kept = self.workdir / "sky_mask.png"
        if self.image_mask is not None:
            if self.image_mask.shape != self.shape:
                raise ValueError(
                    f"sky_mask image {self.image_mask.shape} differs from frames {self.shape}"
                )
            self.mask = SkyMask.from_image(self.image_mask)
        elif self.auto and kept.exists():  # a restart: the mask found before
            image = cv2.imread(str(kept), cv2.IMREAD_GRAYSCALE)
            if image is not None and image.shape == self.shape:
                self.mask = _as_auto(SkyMask.from_image(image > 127))
        elif not self.auto:
            self.mask = SkyMask.from_ratio(self.shape, self.settings.landscape_mask_ratio)
        if self.auto and self.mask is None:
            self.finder = HorizonFinder(self.shape, bin)
        if not self.freeze:
            return
        if (ground_dir / "index.json").exists():
            rows = FrameStore.open(ground_dir).shape[0]
            top = self.shape[0] - rows
        else:
            top = 0 if self.mask is None else ground_top(self.mask, self.feather)
        live = self.with_live and self.mask is not None
        self.ground = self._ground(ground_dir, min(top, self.shape[0] - 1), live)
        if self.mask is not None:
            self.mask = self.mask.clamped(self.ground.top + math.ceil(self.feather) + 2)
        self._write_mask()

    def _ground(self, directory: Path, top: int, live: bool) -> GroundStack:
        s = self.settings
        return GroundStack(
            directory,
            self.shape,
            self.channels,
            top,
            kappa=s.live_kappa,
            warmup=s.live_warmup,
            live=live,
        )

    # --- per frame -----------------------------------------------------------------------
    def add(
        self, frame: Frame | MosaicFrame, matrix: FloatArray, norm: Normalization, weight: float
    ) -> bool:
        """One accepted frame, before its sky is stored: learn the mask (auto), stack its
        ground (freeze) and fill the ground of ``image`` in place (freeze). Returns True when
        the mask changed (the caller's star detection must follow it)."""
        self.accepted += 1
        changed = False
        if self.finder is not None:
            changed = self._learn(frame.luminance, matrix)
        if self.ground is not None:
            self.ground.add(frame, norm, weight, frame.path.name)
            if self.mask is not None:
                fill_ground(
                    frame.codes if isinstance(frame, MosaicFrame) else frame.image, self.mask
                )
        return changed

    def _learn(self, luminance: FloatArray, matrix: FloatArray) -> bool:
        finder = self.finder
        assert finder is not None
        finder.add(luminance, matrix)
        mask, why = finder.estimate()
        if mask is None:
            if finder.frames >= REFINE_FRAMES:
                self.finder = None
                self.mask = SkyMask.from_ratio(
                    self.shape,
                    self.settings.landscape_mask_ratio,
                    note=f"automatic sky mask: {why}",
                )
                log.warning(
                    "automatic sky mask: no clear answer after %d frames (%s): ratio %.2f used",
                    finder.frames, why, self.settings.landscape_mask_ratio,
                )  # fmt: skip
                self._mask_known()
                return True
            return False
        first = self.mask is None
        self.mask = mask
        if finder.frames >= REFINE_FRAMES:
            self.finder = None  # fixed from now on
        if first:
            log.info("automatic sky mask: horizon found after %d frames (%s)", finder.frames, why)
            self._mask_known()
        elif self.ground is not None:
            self.mask = mask.clamped(self.ground.top + math.ceil(self.feather) + 2)
        self._weight = None
        self._write_mask()
        return True

    def _mask_known(self) -> None:
        """The first mask of an automatic session: crop the ground store to its rows."""
        assert self.mask is not None
        if self.ground is not None:
            top = ground_top(self.mask, self.feather)
            self.ground = self.ground.cropped(self.workdir / "ground", top, live=self.with_live)
            self.mask = self.mask.clamped(self.ground.top + math.ceil(self.feather) + 2)
        self._write_mask()

    def _write_mask(self) -> None:
        if self.mask is not None:
            write_bytes(self.workdir / "sky_mask.png", self.mask.png())

    # --- outputs -------------------------------------------------------------------------
    def weight(self) -> npt.NDArray[np.float32]:
        """The sky stack's weight over the ground stack's rows (cached per mask)."""
        assert self.ground is not None and self.mask is not None
        if self._weight is None:
            self._weight = blend_weights(self.mask, self.ground.top, self.feather)
        return self._weight

    def preview(
        self, sky_preview: npt.NDArray[np.float32], sky: Live
    ) -> npt.NDArray[np.float32]:
        """The live preview: with a frozen ground, the composite; else ``sky_preview``."""
        ground = self.ground
        if ground is None or ground.live is None or self.mask is None or ground.live.frames == 0:
            return sky_preview
        return preview_composite(
            sky_preview, sky.result_band, ground.live, self.weight(), ground.top, self.shape[0]
        )

    def freeze_final(
        self, image: FloatArray, progress: Callable[[int, int], None] | None = None
    ) -> npt.NDArray[np.float32] | None:
        """Blend the exact ground final into the exact sky final ``image`` (full grid) in place;
        returns the sky's own rows from the ground's top (for the aligned sky HDU), or None
        when there is no frozen ground."""
        ground = self.ground
        if ground is None or self.mask is None or len(ground.store) == 0:
            return None
        s = self.settings
        rows = ground.final(
            method=s.stack_method,
            sigma=s.stack_sigma,
            maxiters=s.stack_maxiters,
            weighted=s.weights != "none",
            # the sky's final is held meanwhile: the cap is what it leaves
            ram_cap_bytes=max(_MIN_COMBINE_CAP, s.ram_cap_mb * 2**20 - int(image.nbytes)),
            progress=progress,
        )
        sky_rows = np.array(image[ground.top :], dtype=np.float32)
        image[ground.top :] = composite(sky_rows, rows, self.weight())
        return sky_rows

    def describe(self) -> dict[str, Any]:
        """For session.json: the mask's source, its note, the ground's rows."""
        out: dict[str, Any] = {"landscape": self.settings.landscape}
        if self.mask is not None:
            out["sky_mask"] = self.mask.source
            if self.mask.note:
                out["sky_mask_note"] = self.mask.note
        if self.ground is not None:
            out["ground_top_row"] = self.ground.top
            out["ground_frames"] = len(self.ground.store)
        return out


def _as_auto(mask: SkyMask) -> SkyMask:
    return SkyMask(mask.sky, mask.horizon, "auto", mask.note)
