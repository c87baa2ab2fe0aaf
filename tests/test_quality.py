"""The quality gate: one test per limit, on measures built from real Stars / Alignment values."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from nightstack.frames import Alignment, Stars
from nightstack.registration.quality import Quality, QualityLimits, gate


def _stars(n: int = 120, **summaries: float) -> Stars:
    values = {
        "fwhm_px": 3.5,
        "roundness": 0.05,
        "elongation": 1.05,
        "background": 0.05,
        "noise": 0.002,
    }
    values.update(summaries)
    return Stars(xy=np.zeros((n, 2)), flux=np.ones(n), **values)


def _alignment(residual_px: float) -> Alignment:
    return Alignment(
        matrix=np.eye(2, 3), pairs=np.zeros((40, 2, 2)), inliers=40, residual_px=residual_px
    )


REFERENCE = Quality.of(_stars())
LIMITS = QualityLimits(max_background_ratio=3.0)


def test_quality_of_stars_and_alignment() -> None:
    q = Quality.of(_stars(n=77, fwhm_px=4.2), _alignment(0.31))
    assert (q.stars, q.fwhm_px, q.residual_px) == (77, 4.2, 0.31)
    assert Quality.of(_stars()).residual_px is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.stars = 3  # type: ignore[misc]


def test_a_good_frame_is_accepted() -> None:
    good = Quality.of(_stars(fwhm_px=4.0, elongation=1.2, background=0.1), _alignment(0.4))
    assert gate(good, LIMITS, REFERENCE) is None


def test_too_few_stars() -> None:
    assert gate(Quality.of(_stars(n=4)), LIMITS, REFERENCE) == "too few stars (4 < 15)"
    assert gate(Quality.of(_stars(n=15)), LIMITS) is None


def test_too_few_stars_relative_to_the_reference() -> None:
    reason = gate(Quality.of(_stars(n=35)), LIMITS, REFERENCE)
    assert reason == "too few stars (35 < 0.3 x reference 120; cloud or haze?)"
    assert gate(Quality.of(_stars(n=36)), LIMITS, REFERENCE) is None
    relaxed = dataclasses.replace(LIMITS, min_star_fraction=None)
    assert gate(Quality.of(_stars(n=15)), relaxed, REFERENCE) is None


def test_trailed() -> None:
    reason = gate(Quality.of(_stars(elongation=2.3)), LIMITS, REFERENCE)
    assert reason == "trailed: elongation 2.30 > 2.00"


def test_fwhm_relative_to_the_reference() -> None:
    reason = gate(Quality.of(_stars(fwhm_px=7.9)), LIMITS, REFERENCE)
    assert reason == "FWHM 7.9 px > 1.5 x reference 3.5 px"
    assert gate(Quality.of(_stars(fwhm_px=5.2)), LIMITS, REFERENCE) is None
    assert gate(Quality.of(_stars(fwhm_px=7.9)), LIMITS, None) is None  # no reference yet


def test_fwhm_absolute() -> None:
    limits = QualityLimits(max_fwhm_px=6.0, max_fwhm_ratio=None)
    assert gate(Quality.of(_stars(fwhm_px=6.5)), limits) == "FWHM 6.5 px > 6.0 px"
    assert gate(Quality.of(_stars(fwhm_px=5.5)), limits, REFERENCE) is None


def test_background_relative_to_the_reference() -> None:
    reason = gate(Quality.of(_stars(background=0.2)), LIMITS, REFERENCE)
    assert reason == "bright sky: background 0.2 > 3 x reference 0.05"
    assert gate(Quality.of(_stars(background=0.2)), QualityLimits(), REFERENCE) is None  # off


def test_alignment_residual() -> None:
    reason = gate(Quality.of(_stars(), _alignment(1.4)), LIMITS, REFERENCE)
    assert reason == "poor alignment: residual 1.40 px > 1.00 px"


def test_unmeasured_values_do_not_reject() -> None:
    nan = math.nan
    q = Quality.of(_stars(fwhm_px=nan, elongation=nan, roundness=nan))
    assert gate(q, QualityLimits(max_fwhm_px=5.0), REFERENCE) is None
    assert gate(Quality.of(_stars(n=0, fwhm_px=nan)), LIMITS) == "too few stars (0 < 15)"


def test_reasons_are_checked_in_order_and_are_one_line() -> None:
    worst = Quality.of(_stars(n=3, fwhm_px=9.0, elongation=3.0, background=1.0), _alignment(5.0))
    reason = gate(worst, LIMITS, REFERENCE)
    assert reason is not None and reason.startswith("too few stars") and "\n" not in reason


def test_as_dict_is_json_ready() -> None:
    q = Quality.of(_stars(fwhm_px=math.nan))
    data = json.loads(json.dumps(q.as_dict(), allow_nan=False))
    assert data["fwhm_px"] is None and data["stars"] == 120 and data["residual_px"] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_stars": -1},
        {"max_fwhm_ratio": 0.0},
        {"max_elongation": 0.9},
        {"max_residual_px": -1.0},
        {"max_background_ratio": 0.0},
    ],
)
def test_invalid_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        QualityLimits(**kwargs)  # type: ignore[arg-type]
