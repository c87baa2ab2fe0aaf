"""Seeded synthetic nights written as real DNG raws, with their exact truth.

The package keeps its jobs apart:

- ``sky``: the sky model (``SkyModel``): geometry, star catalogue, the changing sky (level,
  moon glow, transparency, seeing), ground, defects, and the truth they imply;
- ``schedules``: per-frame schedules (``sky_step``, ``sky_ramp``, ``seeing_jitter``);
- ``render``: a model frame to CFA electrons and raw ADU;
- ``night``: a night on disk, ``truth.json`` then one DNG a frame (``simulate_night``);
- ``cli``: the ``nightstack simulate`` command's arguments.

Names are imported lazily (PEP 562), so that building the ``nightstack`` command line, which
defines the ``simulate`` arguments, does not import numpy and scipy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nightstack.simulate.night import simulate_night, write_frame
    from nightstack.simulate.schedules import seeing_jitter, sky_ramp, sky_step
    from nightstack.simulate.sky import CFA_PATTERNS, SKY_RGB, SkyModel, cfa_channels

_EXPORTS = {
    "SkyModel": "sky",
    "SKY_RGB": "sky",
    "CFA_PATTERNS": "sky",
    "cfa_channels": "sky",
    "sky_step": "schedules",
    "sky_ramp": "schedules",
    "seeing_jitter": "schedules",
    "simulate_night": "night",
    "write_frame": "night",
}

__all__ = [
    "CFA_PATTERNS",
    "SKY_RGB",
    "SkyModel",
    "cfa_channels",
    "seeing_jitter",
    "simulate_night",
    "sky_ramp",
    "sky_step",
    "write_frame",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
