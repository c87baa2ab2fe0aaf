"""Per-frame schedules for a changing night: sky level steps and ramps, seeing that wanders.

Each helper returns a plain list with one value a frame, for ``SkyModel``'s ``sky_levels`` and
``fwhm_schedule`` (or ``simulate_night``'s arguments of the same names).
"""

from __future__ import annotations

import math

import numpy as np

_STREAM_SEEING = 10  # seeing_jitter's random stream (the sky model's streams are 1 .. 11)
_SEEING_CORRELATION = 0.6  # frame-to-frame correlation of log FWHM: seeing drifts
_MIN_FWHM_PX = 0.6  # the sky model refuses a FWHM at or below 0.5 px


def sky_step(frames: int, at: int, factor: float) -> list[float]:
    """Sky levels for ``frames`` frames: 1 before frame ``at``, ``factor`` from it on (a
    neighbour's light going on, the Moon rising over a ridge)."""
    return [1.0 if i < at else float(factor) for i in range(frames)]


def sky_ramp(frames: int, end: float) -> list[float]:
    """Sky levels for ``frames`` frames rising (or falling) linearly from 1 at the first frame
    to ``end`` at the last (twilight, a rising Moon)."""
    if frames == 1:
        return [1.0]
    return [1.0 + (float(end) - 1.0) * i / (frames - 1) for i in range(frames)]


def seeing_jitter(frames: int, fwhm_px: float, spread: float, seed: int = 0) -> list[float]:
    """A seeded FWHM schedule of ``frames`` values that wanders around ``fwhm_px``.

    log(FWHM / fwhm_px) is a stationary AR(1) series with standard deviation ``spread`` and
    frame-to-frame correlation 0.6 (seeing drifts rather than jumps), clipped at 0.6 px.
    """
    rng = np.random.default_rng([seed, _STREAM_SEEING])
    rho = _SEEING_CORRELATION
    values, state = [], 0.0
    for i, shock in enumerate(rng.normal(0.0, spread, frames)):
        state = shock if i == 0 else rho * state + math.sqrt(1 - rho * rho) * shock
        values.append(max(_MIN_FWHM_PX, float(fwhm_px * math.exp(state))))
    return values
