"""A night of several targets on disk: legs of frames, each its own star field, exposure and
pointing, with slews and pauses between them, and the truth of where sessions should split.

Each :class:`Leg` is a :class:`~nightstack.simulate.sky.SkyModel` of its own seed (a slew: a
field that shares no star with the last), written as DNG raws named in night order, their EXIF
capture times and file modification times (the end of each exposure) following the night's
clock: a pause is in the files' times, nothing sleeps. ``targets.json`` holds every frame's
leg, target, pointing (RA, Dec of the target the leg shows, degrees) and the frames where a new
session must start (:func:`expected_splits`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

from nightstack.io.writers import write_json
from nightstack.simulate.night import write_frame
from nightstack.simulate.sky import SkyModel, frame_indices

START = datetime(2024, 8, 10, 21, 30, 0)
"""The first frame's capture time (the camera's wall clock)."""

FRAME_GAP_S = 2.0  # the camera's dead time between exposures (as SkyModel.capture_time)


@dataclass(frozen=True)
class Leg:
    """Frames of one target with one setting. ``seed`` is the star field (a new seed: a slew);
    ``pause_s`` the time between the previous leg's last exposure and this leg's first."""

    target: str
    seed: int
    frames: int
    pointing: tuple[float, float]  # RA, Dec (degrees) of the field's centre
    exposure_s: float = 30.0
    iso: int = 1600
    pause_s: float = 60.0
    cloudy: tuple[int, ...] = ()  # frames (of this leg) behind cloud: few or no stars
    first: int = 0
    """The leg's first frame of its model: a leg of the last one's seed that does not continue
    its frames shows the same sky moved by the drift between them (a mosaic panel)."""
    model: dict[str, Any] = field(default_factory=dict)  # more SkyModel fields


def three_targets() -> list[Leg]:
    """The night of issue 23: three targets with slews, an exposure change and a 25-minute
    pause. Sessions split at B's first frame (a slew, same exposure: only the alignment tells),
    C's first (a slew with the exposure 30 s -> 60 s) and the first frame after the pause."""
    return [
        Leg("M 27", 11, 6, (299.90, 22.72)),
        Leg("M 57", 22, 6, (283.40, 33.03)),
        Leg("M 13", 33, 5, (250.42, 36.46), exposure_s=60.0),
        Leg("M 13", 33, 4, (250.42, 36.46), exposure_s=60.0, pause_s=25 * 60.0, first=5),
    ]


def on_the_sky(
    legs: Sequence[Leg], scale_arcsec: float, width: int, height: int
) -> list[Leg]:
    """``legs`` showing the real sky at their pointings: each leg's field is the catalogue's
    stars there (:func:`nightstack.simulate.catalog.planted_stars`, from the installed Tycho-2
    index files) at ``scale_arcsec``, so a plate solver places and names it. Write them with
    ``write_night(..., width=width, height=height, stars=0)``."""
    from nightstack.simulate.catalog import planted_stars

    fields: dict[tuple[float, float], Any] = {}
    out = []
    for leg in legs:
        if leg.pointing not in fields:
            fields[leg.pointing] = planted_stars(*leg.pointing, scale_arcsec, 0.0, width, height)
        model = {"planted_stars": fields[leg.pointing], "nebula": False, "landscape_fraction": 0.0,
                 **leg.model}  # fmt: skip
        out.append(replace(leg, model=model))
    return out


def expected_splits(legs: Sequence[Leg], gap_s: float) -> list[int]:
    """Night frame indices where a session must start: the first frame, and each leg that
    changes the field, the exposure or ISO, or follows a pause longer than ``gap_s``."""
    starts, index = [0], 0
    for before, leg in pairwise(legs):
        index += before.frames
        changed = (before.seed, before.exposure_s, before.iso) != (leg.seed, leg.exposure_s,
                                                                   leg.iso)  # fmt: skip
        moved = leg.seed == before.seed and leg.first != before.first + before.frames
        if changed or moved or leg.pause_s > gap_s:
            starts.append(index)
    return starts


def write_night(
    outdir: str | os.PathLike[str],
    legs: Sequence[Leg],
    *,
    width: int = 480,
    height: int = 320,
    stars: int = 300,
    name_pattern: str = "N_{:04d}.DNG",
) -> Path:
    """Write ``legs`` as one night of DNG raws into ``outdir``; returns ``targets.json``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    frames: list[dict[str, Any]] = []
    clock = START
    index = 0
    for n, leg in enumerate(legs):
        if n:
            clock += timedelta(seconds=leg.pause_s - FRAME_GAP_S)
        model = SkyModel(
            width=width,
            height=height,
            frames=leg.frames,
            seed=leg.seed,
            stars=stars,
            exposure_s=leg.exposure_s,
            iso=leg.iso,
            start_time=clock - timedelta(seconds=leg.first * (leg.exposure_s + FRAME_GAP_S)),
            cloudy=frame_indices([leg.first + c for c in leg.cloudy]),
            **leg.model,
        )
        for i in range(leg.first, leg.first + leg.frames):
            path = write_frame(model, i, out / name_pattern.format(index))
            end = model.capture_time(i) + timedelta(seconds=leg.exposure_s)
            stamp = end.timestamp()
            os.utime(path, (stamp, stamp))
            frames.append({"index": index, "file": path.name, "leg": n, "target": leg.target,
                           "pointing": list(leg.pointing), "exposure_s": leg.exposure_s,
                           "capture_time": model.capture_time(i).isoformat(),
                           "cloudy": i - leg.first in leg.cloudy})  # fmt: skip
            index += 1
        last = model.capture_time(leg.first + leg.frames - 1)
        clock = last + timedelta(seconds=leg.exposure_s + FRAME_GAP_S)
    truth_path = out / "targets.json"
    write_json(truth_path, {"legs": [asdict(leg) for leg in legs], "frames": frames})
    return truth_path
