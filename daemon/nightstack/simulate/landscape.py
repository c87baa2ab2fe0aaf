"""A textured landscape for a simulated night: hills with grass, trees, rocks and a building
with lit windows, static in the camera frame under the rotating sky.

``scenery`` is pure in its arguments (the generator is seeded by the caller). What it returns
becomes the model's ``Landscape``: the skyline (the ground's top edge per column, trees and the
roof included), the ground's brightness per pixel as a fraction of the sky level (so a brighter
sky lights it more), and the lit windows. The texture has sharp edges at many scales (rock
rims, brick courses, window frames, grass), so a stack that smears the ground loses much of
its gradient energy, while a frozen ground keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from nightstack.arrays import FloatArray

GRASS_LEVEL = 0.22
"""The lit grass' brightness as a fraction of the sky level: a moonlit field, darker than the
sky so the horizon is a visible edge, bright enough for its texture to stand above the noise."""

_GRASS_OCTAVES = ((2.0, 0.05), (6.0, 0.05), (20.0, 0.04))  # (smoothing sigma px, amplitude)
_TREE_LEVEL = 0.07  # dark foliage
_TREE_GRAIN = 0.03  # needles and branches: fine grain on the foliage
_ROCK_LEVEL = 0.42  # pale rock, lit from the upper left
_ROCK_SHADE = 0.22  # brightness change across a rock from the lit to the shaded side
_ROCK_RIM = 0.06  # the dark crack around a rock
_WALL_LEVEL = 0.33  # the building's wall
_BRICK_PX = 4  # brick course height
_MORTAR = 0.12  # mortar lines are this much darker than the bricks
_ROOF_LEVEL = 0.12  # dark roof
_DARK_WINDOW = 0.03  # an unlit window
_WINDOW_PX = 3  # a window is this many pixels a side, with one pixel of wall between


@dataclass(frozen=True, eq=False)
class Scenery:
    """A landscape in frame pixels.

    ``skyline``: (cols,) float64 row coordinate of the ground's top edge per column (ground
    below it); ``brightness``: (rows - top_row, cols) float32 the ground's light at each pixel
    as a fraction of the sky level (only meaningful below the skyline); ``top_row``: the first
    row holding any ground; ``windows``: (n, 4) int64 lit windows as [x0, y0, x1, y1) boxes.
    """

    skyline: FloatArray
    brightness: npt.NDArray[np.float32]
    top_row: int
    windows: npt.NDArray[np.int64]


def scenery(
    width: int, height: int, fraction: float, lit_windows: int, rng: np.random.Generator
) -> Scenery:
    """Build hills, trees, rocks and a building for a ``width`` x ``height`` frame.

    Parameters
    ----------
    width, height : int
        Frame size in pixels.
    fraction : float
        Mean fraction of the frame height the hills cover (trees and the building rise above).
    lit_windows : int
        Number of lit windows in the building's facade (at most the facade's windows).
    rng : numpy Generator
        The landscape's own random stream.
    """
    w, h = width, height
    x = np.arange(w, dtype=np.float64)
    depth = fraction * h
    hills = np.zeros(w)
    for k in range(3):  # rolling hills: a few long waves
        period = w / rng.uniform(0.5 + k, 1.2 + 1.5 * k)
        hills += (
            rng.uniform(0.1, 0.25)
            / (k + 1)
            * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
        )
    ground = h - depth * (1.0 + hills)
    skyline = ground.copy()
    kind = np.zeros(w, dtype=np.int8)  # what the skyline is in each column: 0 hill, 1 tree, 2 roof

    # a building with a pitched roof, its facade a grid of windows
    bw = int(rng.uniform(0.08, 0.12) * w)
    bx0 = int(rng.uniform(0.55, 0.8) * w)
    bx1 = min(w - 2, bx0 + bw)
    wall_top = float(ground[bx0:bx1].min()) - rng.uniform(0.7, 1.0) * depth
    roof_rise = 0.25 * depth
    mid = 0.5 * (bx0 + bx1)
    roof = wall_top - roof_rise * (1.0 - np.abs(x[bx0:bx1] - mid) / (0.5 * (bx1 - bx0)))
    skyline[bx0:bx1] = roof
    kind[bx0:bx1] = 2

    # clumps of conical trees, left of the building
    trees: list[tuple[float, float, float]] = []
    for _clump in range(3):
        cx = rng.uniform(0.05, 0.5) * w
        for _tree in range(int(rng.integers(3, 7))):
            tx = cx + rng.normal(0.0, 0.03 * w)
            th = rng.uniform(0.6, 1.6) * depth
            tw = rng.uniform(0.15, 0.25) * th
            trees.append((tx, th, tw))
    for tx, th, tw in trees:
        lo, hi = max(0, int(tx - tw)), min(w, int(tx + tw) + 1)
        if hi <= lo:
            continue
        dx = np.abs(x[lo:hi] - tx)
        base = ground[int(np.clip(tx, 0, w - 1))]
        layers = 0.06 * th * (np.sin(dx * 2.5) ** 2)  # branch tiers: a ragged edge
        top = base - th * (1.0 - dx / tw) + layers
        top += rng.normal(0.0, 0.6, hi - lo)
        higher = top < skyline[lo:hi]
        skyline[lo:hi] = np.where(higher, top, skyline[lo:hi])
        kind[lo:hi] = np.where(higher, 1, kind[lo:hi])
    skyline = np.clip(skyline, 2.0, h - 1.0)
    top_row = int(np.floor(skyline.min() + 0.5))

    rows = np.arange(top_row, h, dtype=np.float64)[:, None]
    shape = (h - top_row, w)
    grass = np.full(shape, GRASS_LEVEL, dtype=np.float32)
    for sigma, amplitude in _GRASS_OCTAVES:
        white = rng.normal(0.0, 1.0, shape).astype(np.float32)
        noise = np.asarray(cv2.GaussianBlur(white, (0, 0), sigma), dtype=np.float32)
        noise *= np.float32(amplitude / max(float(noise.std()), 1e-9))
        grass += noise
    brightness = grass

    # trees: dark grainy foliage wherever a tree is above the hill
    tree_cols = kind == 1
    foliage = (rows < ground[None, :]) & tree_cols[None, :]
    grain = _TREE_LEVEL + _TREE_GRAIN * rng.standard_normal(shape).astype(np.float32)
    brightness = np.where(foliage, grain, brightness).astype(np.float32)

    # rocks in the field: shaded ellipses with a dark rim
    yy, xx = np.mgrid[top_row:h, 0:w].astype(np.float32)
    for _rock in range(max(3, w // 150)):
        rx, ry = rng.uniform(8, 30), rng.uniform(5, 16)
        cx = rng.uniform(0.02, 0.98) * w
        floor = float(ground[int(np.clip(cx, 0, w - 1))])
        if floor + 2 * ry >= h - 2:
            continue
        cy = rng.uniform(floor + ry + 2, h - ry - 2)
        u, v = (xx - cx) / rx, (yy - cy) / ry
        r2 = u * u + v * v
        inside = r2 <= 1.0
        shade = _ROCK_LEVEL + _ROCK_SHADE * 0.5 * (-u - v) / math.sqrt(2.0)
        brightness = np.where(inside, shade, brightness)
        rim = (r2 > 1.0) & (r2 <= 1.25)
        brightness = np.where(rim, _ROCK_RIM, brightness).astype(np.float32)

    # the building: brick wall, dark roof, a grid of windows (some lit)
    windows = np.zeros((0, 4), dtype=np.int64)
    wall_rows = (rows >= wall_top) & (rows < ground[None, :])
    wall = wall_rows & (kind == 2)[None, :]
    bricks = np.where((rows.astype(np.int64) % _BRICK_PX) == 0, _WALL_LEVEL - _MORTAR, _WALL_LEVEL)
    brightness = np.where(wall, np.broadcast_to(bricks, shape), brightness).astype(np.float32)
    roof_px = (rows < wall_top) & (rows >= skyline[None, :]) & (kind == 2)[None, :]
    brightness = np.where(roof_px, _ROOF_LEVEL, brightness).astype(np.float32)
    pitch = _WINDOW_PX + 2
    y_lo = math.ceil(wall_top) + 2
    y_hi = int(min(ground[bx0:bx1].min(), h)) - _WINDOW_PX - 2
    boxes = [
        (wx, wy, wx + _WINDOW_PX, wy + _WINDOW_PX)
        for wy in range(y_lo, y_hi, pitch)
        for wx in range(bx0 + 2, bx1 - _WINDOW_PX - 1, pitch)
    ]
    for x0, y0, x1, y1 in boxes:
        brightness[y0 - top_row : y1 - top_row, x0:x1] = _DARK_WINDOW
    if boxes and lit_windows > 0:
        pick = rng.choice(len(boxes), size=min(lit_windows, len(boxes)), replace=False)
        windows = np.array([boxes[i] for i in sorted(pick)], dtype=np.int64)
    np.clip(brightness, 0.0, None, out=brightness)
    return Scenery(skyline, brightness, top_row, windows)
