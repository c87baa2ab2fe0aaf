"""Per-frame quality measures and the accept / reject gate.

``Quality.of(stars, alignment)`` gathers what detection and alignment measured; ``gate`` compares
it with ``QualityLimits`` (absolute, relative to the reference frame's ``Quality``, and for
trailing relative to the session's own recent frames, a :class:`ShapeHistory`) and returns a
one-line reason to reject the frame, or None to accept it. A measure that could not be taken
(NaN, or no alignment) does not reject a frame by itself.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from nightstack.frames import Alignment, Stars


@dataclass(frozen=True)
class Quality:
    """What one frame measured.

    ``stars``: stars detected; ``fwhm_px``: median FWHM, full-resolution pixels;
    ``elongation``: median major/minor axis ratio (1 = round); ``roundness``: median |DAOFind
    roundness2| (0 = round); ``background``, ``noise``: sky level and sky standard deviation,
    luminance units; ``residual_px``: RMS residual of the alignment, full-resolution pixels, None
    when the frame was not aligned (e.g. the reference itself); ``transparency``: starlight
    let through relative to the reference (:func:`transparency`), None when not measured.
    ``stars`` counts every star the frame shows (``Stars.detected``), not the capped list
    kept for alignment, so that the count still falls behind haze in a dense field.
    """

    stars: int
    fwhm_px: float
    elongation: float
    roundness: float
    background: float
    noise: float
    residual_px: float | None = None
    transparency: float | None = None

    @classmethod
    def of(
        cls, stars: Stars, alignment: Alignment | None = None, transparency: float | None = None
    ) -> Quality:
        """Quality of a frame from its stars and, when aligned, its alignment."""
        return cls(
            stars=stars.detected,
            fwhm_px=float(stars.fwhm_px),
            elongation=float(stars.elongation),
            roundness=float(stars.roundness),
            background=float(stars.background),
            noise=float(stars.noise),
            residual_px=None if alignment is None else float(alignment.residual_px),
            transparency=transparency,
        )

    def as_dict(self) -> dict[str, float | int | None]:
        """The measures for a JSON journal line (NaN becomes None)."""
        out: dict[str, float | int | None] = {}
        for key, value in asdict(self).items():
            out[key] = None if isinstance(value, float) and math.isnan(value) else value
        return out


@dataclass(frozen=True)
class QualityLimits:
    """Limits of an acceptable frame; None disables a limit.

    ``min_stars``: fewer stars is a cloud, dew or a lost target. ``max_fwhm_px``: absolute
    FWHM limit, full-res px. ``max_fwhm_ratio``: FWHM limit relative to the reference frame's
    (bad seeing, focus drift). ``max_elongation``: trailed stars (wind, guiding, a bumped mount).
    ``max_background_ratio``: sky level limit relative to the reference (thin cloud lit by a
    town, twilight, the Moon rising). ``min_star_fraction``: star count limit relative to the
    reference's (thin cloud, dew, haze dim the faint stars first). ``max_residual_px``:
    alignment RMS residual, full-res px. ``min_transparency``: starlight let through relative to
    the reference (haze, thin cloud, dew on the lens), whatever the star density.
    """

    min_stars: int = 15
    min_star_fraction: float | None = 0.3
    max_fwhm_px: float | None = None
    max_fwhm_ratio: float | None = 1.5
    max_elongation: float | None = 2.0
    max_trail_ratio: float | None = 1.6
    max_background_ratio: float | None = None
    max_residual_px: float | None = 1.0
    min_transparency: float | None = 0.6

    def __post_init__(self) -> None:
        if self.min_stars < 0:
            raise ValueError(f"min_stars must be >= 0, got {self.min_stars}")
        positive = {
            "max_fwhm_px": self.max_fwhm_px,
            "max_fwhm_ratio": self.max_fwhm_ratio,
            "max_residual_px": self.max_residual_px,
            "max_background_ratio": self.max_background_ratio,
            "min_star_fraction": self.min_star_fraction,
            "min_transparency": self.min_transparency,
            "max_trail_ratio": self.max_trail_ratio,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if self.max_elongation is not None and not self.max_elongation >= 1:
            raise ValueError(f"max_elongation must be >= 1 or None, got {self.max_elongation}")


TRAIL_Z = 3.0
"""Robust z-scores above the session's median elongation a frame must also lie to be trailed:
a trail that stands out of the night's own scatter, not one more draw from it."""
TRAIL_SPREAD_FLOOR = 0.05
"""Least spread (elongation units) of the z-score: a steady night's frame-to-frame scatter of the
median elongation (0.03-0.06 on the real Seestar frames), so the first frames, or a night of
identical frames, do not make any wobble a trail."""
SHAPE_HISTORY_FRAMES = 50
"""Accepted frames the session's elongation statistics remember (fixed memory; follows drifts
in seeing or balance over a long night)."""


class ShapeHistory:
    """The elongations of the session's recent accepted frames, the reference's first: what a
    new frame's trailing is judged against. Holds at most :data:`SHAPE_HISTORY_FRAMES`."""

    def __init__(self, size: int = SHAPE_HISTORY_FRAMES) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, quality: Quality) -> None:
        """Remember an accepted frame's elongation (an unmeasured one is skipped)."""
        if math.isfinite(quality.elongation):
            self._values.append(float(quality.elongation))

    def trailed(self, elongation: float, max_ratio: float) -> str | None:
        """Why a frame of this ``elongation`` is trailed compared with the session, or None.

        Trailed means both: its stars' stretch beyond round (``elongation - 1``) is more than
        ``max_ratio`` x the session's median stretch, and its elongation lies more than
        :data:`TRAIL_Z` robust standard deviations (1.4826 MAD, at least
        :data:`TRAIL_SPREAD_FLOOR`) above the median."""
        if not self._values or not math.isfinite(elongation):
            return None
        values = np.fromiter(self._values, float)
        median = float(np.median(values))
        spread = max(1.4826 * float(np.median(np.abs(values - median))), TRAIL_SPREAD_FLOOR)
        z = (elongation - median) / spread
        ratio = (elongation - 1.0) / max(median - 1.0, 1e-3)
        if ratio <= max_ratio or z <= TRAIL_Z:
            return None
        return (
            f"trailed: elongation {elongation:.2f} vs the session's median {median:.2f} "
            f"({ratio:.1f}x its stretch > {max_ratio:g}, z {z:.1f} > {TRAIL_Z:g})"
        )


def gate(
    quality: Quality,
    limits: QualityLimits,
    reference: Quality | None = None,
    history: ShapeHistory | None = None,
) -> str | None:
    """Return a one-line reason to reject the frame, or None to accept it.

    Parameters
    ----------
    quality : Quality
        The frame's measures.
    limits : QualityLimits
        What is acceptable.
    reference : Quality or None
        The reference frame's measures, for the relative limits (skipped when None).
    history : ShapeHistory or None
        The session's recent elongations, for ``max_trail_ratio`` (skipped when None).
    """
    if quality.stars < limits.min_stars:
        return f"too few stars ({quality.stars} < {limits.min_stars})"
    if _above(quality.elongation, limits.max_elongation):
        return f"trailed: elongation {quality.elongation:.2f} > {limits.max_elongation:.2f}"
    if history is not None and limits.max_trail_ratio is not None:
        reason = history.trailed(quality.elongation, limits.max_trail_ratio)
        if reason is not None:
            return reason
    if _above(quality.fwhm_px, limits.max_fwhm_px):
        return f"FWHM {quality.fwhm_px:.1f} px > {limits.max_fwhm_px:.1f} px"
    if reference is not None:
        fraction = limits.min_star_fraction
        if fraction is not None and quality.stars < fraction * reference.stars:
            return (
                f"too few stars ({quality.stars} < {fraction:g} x reference {reference.stars}; "
                "cloud or haze?)"
            )
        ratio = limits.max_fwhm_ratio
        if ratio is not None and _above(quality.fwhm_px, ratio * reference.fwhm_px):
            return (
                f"FWHM {quality.fwhm_px:.1f} px > {ratio:g} x reference {reference.fwhm_px:.1f} px"
            )
        ratio = limits.max_background_ratio
        if ratio is not None and _above(quality.background, ratio * reference.background):
            return (
                f"bright sky: background {quality.background:.4g} > {ratio:g} x reference "
                f"{reference.background:.4g}"
            )
    residual, limit = quality.residual_px, limits.max_residual_px
    if residual is not None and _above(residual, limit):
        return f"poor alignment: residual {residual:.2f} px > {limit:.2f} px"
    seen, least = quality.transparency, limits.min_transparency
    if seen is not None and least is not None and _above(least, seen):
        return f"haze: transparency {seen:.2f} < {least:.2f}"
    return None


TRANSPARENCY_MIN_PAIRS = 5
"""Matched unsaturated stars needed to measure a transparency (a median of fewer is noise)."""

TRANSPARENCY_BRIGHT_SKIP = 0.1
"""Fraction of the brightest matched stars left out: near saturation, their flux no longer
follows the sky's transparency (saturated ones are NaN already)."""


def transparency(
    stars: Stars,
    reference: Stars,
    alignment: Alignment,
    exposure_ratio: float = 1.0,
) -> float | None:
    """Starlight the frame lets through relative to the reference: the median aperture-flux
    ratio (frame / reference) of the stars matched by the alignment, divided by
    ``exposure_ratio`` (frame exposure / reference exposure). 1 = as clear as the reference,
    0.3 = haze lets through 30 %. None when fewer than :data:`TRANSPARENCY_MIN_PAIRS`
    unsaturated pairs were matched (or no aperture fluxes were measured).

    Uses the matched pairs, so it does not depend on how many stars the field has: in a dense
    Milky Way field, the capped star lists of a clear and a hazy frame hold the same number of
    stars, but the stars in them are dimmer behind haze.
    """
    if stars.aperture_flux is None or reference.aperture_flux is None:
        return None
    pairs = alignment.indices
    if pairs.shape[0] == 0:
        return None
    frame_flux = stars.aperture_flux[pairs[:, 0]]
    ref_flux = reference.aperture_flux[pairs[:, 1]]
    ok = np.isfinite(frame_flux) & np.isfinite(ref_flux) & (ref_flux > 0)
    frame_flux, ref_flux = frame_flux[ok], ref_flux[ok]
    order = np.argsort(-ref_flux, kind="stable")
    keep = order[int(TRANSPARENCY_BRIGHT_SKIP * order.size) :]
    if keep.size < TRANSPARENCY_MIN_PAIRS:
        return None
    ratio = float(np.median(frame_flux[keep] / ref_flux[keep]))
    return ratio / exposure_ratio if exposure_ratio > 0 else ratio


def _above(value: float, limit: float | None) -> bool:
    """Whether a measured value exceeds a limit; an unmeasured (NaN) value or limit never does."""
    return limit is not None and not math.isnan(value) and not math.isnan(limit) and value > limit
