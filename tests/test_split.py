"""Sessions that follow the night (``service.split``): a real daemon on simulated nights of
several targets splits at the right frames and rejects no frame of a new target for alignment;
clouds and stray frames do not split; a plate solver's answer splits at once."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from _daemon import Daemon, journal, wait_for
from nightstack.config import load_settings
from nightstack.frames import Frame, FrameMeta
from nightstack.io.loaders import load
from nightstack.pipeline.prepare import Prepared
from nightstack.registration.quality import Quality
from nightstack.service.daemon import Daemon as LiveDaemon
from nightstack.service.split import Splitter, _separation_deg
from nightstack.simulate.sky import SkyModel
from nightstack.simulate.targets import (
    Leg,
    expected_splits,
    on_the_sky,
    three_targets,
    write_night,
)
from nightstack.solve.solver import Solver

pytestmark = pytest.mark.slow

GAP_S = 1200.0  # split_gap_s's default
REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
M27 = REALDATA / "seq_als_m27_asi224mc" / "Light_1069.fits"


def _sessions(out: Path) -> list[list[dict[str, Any]]]:
    """Each session's journal lines, sessions in order."""
    by: dict[str, list[dict[str, Any]]] = {}
    for line in journal(out):
        by.setdefault(line["session"], []).append(line)
    return [by[k] for k in sorted(by)]


def _index(line: dict[str, Any]) -> int:
    return int(Path(line["file"]).stem.split("_")[1])


def _closed(out: Path, sessions: int) -> bool:
    metas = sorted(out.glob("*/session.json"))
    states = [json.loads(p.read_text()).get("state") for p in metas]
    return len(states) == sessions and all(s == "closed" for s in states)


# --- the rules on their own ---------------------------------------------------------------------
CLEAR = Quality(stars=200, fwhm_px=3.0, elongation=1.1, roundness=0.05, background=0.1,
                noise=0.01)  # fmt: skip
"""A frame that could be a reference (enough round stars)."""


def _prepared(tmp_path: Path, name: str, quality: Quality = CLEAR, **meta: Any) -> Prepared:
    path = tmp_path / name
    path.write_bytes(b"x")
    image = np.zeros((40, 60, 1), np.float32)
    frame = Frame(path, image, image[::2, ::2, 0], 2, FrameMeta(**meta))
    return Prepared(path, None, frame, None, quality, None, {})


def test_settings_changes_and_gaps_are_named_in_one_line(tmp_path: Path) -> None:
    split = Splitter(load_settings(None, {}, use_default=False))
    split.watch("a")
    t0 = datetime(2024, 8, 10, 22, 0, tzinfo=UTC).timestamp()

    def at(s: float) -> datetime:
        return datetime.fromtimestamp(t0 + s, tz=UTC)

    first = _prepared(tmp_path, "1", exposure_s=30.0, iso=800, capture_time=at(0), filter="L")
    assert split.before(first) is None
    same = _prepared(tmp_path, "2", exposure_s=30.0, iso=800, capture_time=at(32), filter="l")
    assert split.before(same) is None  # filter names compare without case
    assert split.before(_prepared(tmp_path, "3", exposure_s=60.0, iso=800,
                                  capture_time=at(64))) == "exposure 30 s -> 60 s"  # fmt: skip
    # the frame that split is the new first: the next at 60 s does not split again
    assert split.before(_prepared(tmp_path, "4", exposure_s=60.0, iso=800,
                                  capture_time=at(126))) is None  # fmt: skip
    assert split.before(_prepared(tmp_path, "5", exposure_s=60.0, iso=1600,
                                  capture_time=at(188))) == "ISO/gain 800 -> 1600"  # fmt: skip
    assert split.before(_prepared(tmp_path, "6", exposure_s=60.0, iso=1600, filter="Ha",
                                  capture_time=at(250))) is None  # no filter before: no change
    assert split.before(_prepared(tmp_path, "7", exposure_s=60.0, iso=1600, filter="OIII",
                                  capture_time=at(312))) is None  # the first's filter unknown
    # a gap: from the end of the last exposure (312 + 60) to this start, 25 min
    late = _prepared(tmp_path, "8", exposure_s=60.0, iso=1600, capture_time=at(372 + 1500))
    assert split.before(late) == "25 min since the last frame (> 20 min)"
    # 19 min is a pause, not a new session
    assert split.before(_prepared(tmp_path, "9", exposure_s=60.0, iso=1600,
                                  capture_time=at(1932 + 1140))) is None  # fmt: skip


def test_only_a_frame_that_could_be_a_reference_starts_a_session(tmp_path: Path) -> None:
    """A stray frame of other settings that could not be a reference (daylight, cloud) is no
    new session; a pause before such a frame is owed to the next clear frame."""
    split = Splitter(load_settings(None, {}, use_default=False))
    split.watch("a")
    t0 = datetime(2024, 8, 10, 22, 0, tzinfo=UTC).timestamp()

    def at(s: float) -> datetime:
        return datetime.fromtimestamp(t0 + s, tz=UTC)

    cloud = replace(CLEAR, stars=6)
    assert split.before(_prepared(tmp_path, "1", exposure_s=30.0, capture_time=at(0))) is None
    stray = _prepared(tmp_path, "2", cloud, exposure_s=5.0, capture_time=at(32))
    assert split.before(stray) is None  # a rejected frame, not a session of its own
    assert split.before(_prepared(tmp_path, "3", exposure_s=30.0, capture_time=at(64))) is None
    late = _prepared(tmp_path, "4", cloud, exposure_s=30.0, capture_time=at(94 + 1800))
    assert split.before(late) is None
    after = _prepared(tmp_path, "5", exposure_s=30.0, capture_time=at(1926))
    assert split.before(after) == "30 min since the last frame (> 20 min)"
    assert split.before(_prepared(tmp_path, "6", exposure_s=30.0, capture_time=at(1958))) is None
    # a stray frame from another day (daylight, a year later), then the night goes on
    other_day = _prepared(tmp_path, "7", cloud, exposure_s=30.0, capture_time=at(3e7))
    assert split.before(other_day) is None
    assert split.before(_prepared(tmp_path, "8", cloud, exposure_s=30.0,
                                  capture_time=at(1990))) is None  # fmt: skip
    assert split.before(_prepared(tmp_path, "9", exposure_s=30.0, capture_time=at(2022))) is None


def test_without_capture_times_the_gap_is_read_from_the_files_mtimes(tmp_path: Path) -> None:
    split = Splitter(load_settings(None, {"split_gap_s": 600}, use_default=False))
    split.watch("a")
    a, b = _prepared(tmp_path, "a", exposure_s=30.0), _prepared(tmp_path, "b", exposure_s=30.0)
    os.utime(a.path, (1000.0, 1000.0))
    os.utime(b.path, (1000.0 + 30 + 700, 1000.0 + 30 + 700))  # ends 730 s later: 700 s gap
    assert split.before(a) is None
    assert split.before(b) == "12 min since the last frame (> 10 min)"
    off = Splitter(load_settings(None, {"split_enabled": False}, use_default=False))
    off.watch("a")
    assert off.before(a) is None and off.before(b) is None and off.follow_px((40, 60)) is None


def test_the_filter_is_read_from_a_fits_header_and_a_new_filter_splits(tmp_path: Path) -> None:
    def frame(name: str, **cards: object) -> Path:
        hdu = fits.PrimaryHDU(np.full((64, 64), 1000, np.uint16))
        for key, value in cards.items():
            hdu.header[key] = value
        hdu.writeto(tmp_path / name)
        return tmp_path / name

    ha = load(frame("ha.fits", FILTER="Ha      ", EXPTIME=300.0))
    assert ha.meta.filter == "Ha" and ha.meta.exposure_s == 300.0
    assert load(frame("blank.fits", FILTER="  ")).meta.filter is None
    assert load(frame("none.fits")).meta.filter is None
    if M27.is_file():  # a real ASI224MC frame (ALS) says FILTER = 'Luminance'
        lum = load(M27)
        assert lum.meta.filter == "Luminance"
        split = Splitter(load_settings(None, {}, use_default=False))
        split.watch("a")
        assert split.before(Prepared(M27, None, lum, None, CLEAR, None, {})) is None
        oiii = load(frame("oiii.fits", FILTER="OIII", EXPTIME=6.0, GAIN=180.0))
        moved = Prepared(oiii.path, None, oiii, None, CLEAR, None, {})
        assert split.before(moved) == "filter Luminance -> OIII"


def test_move_limits_follow_the_field() -> None:
    settings = load_settings(None, {}, use_default=False)
    assert Splitter(settings).follow_px((3000, 4000)) == 1500.0  # half the short side
    assert Splitter(settings).move_limit_deg((3000, 4000)) == 0.5
    scaled = Splitter(settings, scale_arcsec=2.0)  # 4000 x 3000 px at 2"/px: 2.2 x 1.7 deg
    assert scaled.move_limit_deg((3000, 4000)) == pytest.approx(1500 * 2.0 / 3600)
    fixed = Splitter(load_settings(None, {"split_move_deg": 0.2}, use_default=False),
                     scale_arcsec=2.0)  # fmt: skip
    assert fixed.follow_px((3000, 4000)) == pytest.approx(360.0)
    assert _separation_deg((10.0, 89.9), (190.0, 89.9)) == pytest.approx(0.2, abs=1e-9)
    # M 27 to M 57: 17.8228 degrees (astropy's SkyCoord.separation)
    assert _separation_deg((299.90, 22.72), (283.40, 33.03)) == pytest.approx(17.8228, abs=1e-4)


# --- a real daemon on simulated nights ----------------------------------------------------------
def _stack_night(
    tmp_path: Path, daemons: list[Daemon], legs: list[Leg], frames: int
) -> tuple[Daemon, Path, list[list[dict[str, Any]]]]:
    """Write ``legs`` into a watch folder, stack them as a backlog with ``nightstack watch``
    until ``frames`` journal lines, stop it (closing the last session); the daemon, its
    output folder and its sessions' journals."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    write_night(watch, legs)
    d = Daemon(watch, out)
    daemons.append(d)
    wait_for(lambda: len(journal(out)) >= frames, 120, f"{frames} journal lines", d)
    assert d.stop() == 0
    return d, out, _sessions(out)


def test_a_night_of_three_targets_splits_at_the_right_frames(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Slew A -> B (same exposure: only the alignment tells), slew B -> C with 30 s -> 60 s,
    a 25-minute pause on C: four sessions starting at the truth's frames, every frame
    accepted (none rejected as "cannot align" against the old target), one line each."""
    legs = three_targets()
    truth = expected_splits(legs, GAP_S)
    assert truth == [0, 6, 12, 17]
    total = sum(leg.frames for leg in legs)
    d, out, sessions = _stack_night(tmp_path, daemons, legs, total)
    assert [_index(s[0]) for s in sessions] == truth
    lines = [line for s in sessions for line in s]
    assert sorted(_index(line) for line in lines) == list(range(total))  # each frame once
    assert [line for line in lines if line["status"] != "accepted"] == []
    assert all(s[0]["reference"] for s in sessions)
    why = [s[0].get("split") for s in sessions]
    assert why == [
        None,
        "3 frames in a row do not align with the reference but align with each other",
        "exposure 30 s -> 60 s",
        "25 min since the last frame (> 20 min)",
    ]
    log = d.text()
    for reason in why[1:]:
        assert log.count(f"new session: {reason}") == 1, log
    assert _closed(out, 4)
    opened = [json.loads((out / s[0]["session"] / "session.json").read_text()) for s in sessions]
    assert [m.get("opened_by") for m in opened] == why


def test_a_jump_within_the_field_splits_a_slow_drift_does_not(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A: 4 frames; B: the same sky ~260 px away (a mosaic panel: it still aligns with A, half
    the field shared); C: a slew, then 25 px a frame for 10 frames (225 px in all, more than
    half the 320 px short side, as a tripod's turning sky): splits at B's and C's first frames
    only, every frame accepted."""
    legs = [
        Leg("A", 11, 4, (0.0, 0.0)),
        Leg("B", 11, 4, (0.0, 0.0), first=80),
        Leg("C", 44, 10, (0.0, 0.0), model={"drift_px": 25.0}),
    ]
    assert expected_splits(legs, GAP_S) == [0, 4, 8]
    _, _, sessions = _stack_night(tmp_path, daemons, legs, 18)
    assert [_index(s[0]) for s in sessions] == [0, 4, 8]
    assert all(line["status"] == "accepted" for s in sessions for line in s)
    moved = sessions[1][0]["split"]
    found = re.fullmatch(r"pointing moved (\d+) px \(> 160 px, half the frame's short side\)",
                         moved)  # fmt: skip
    model = SkyModel(width=480, height=320, seed=11)  # write_night's size; the truth's drift
    centre = np.array([[239.5, 159.5, 1.0]])
    truth = np.hypot(*((model.transform(80) - model.transform(3)) @ centre.T).ravel())
    assert found is not None and abs(int(found.group(1)) - truth) <= 2, (moved, truth)


def test_one_frame_of_another_exposure_is_a_session_of_its_own(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """30 s, one 60 s frame, 30 s again: the 60 s frame is the second session's reference and
    first frame for the rules, so the next 30 s frame splits again (one line each)."""
    legs = [Leg("A", 11, 3, (0.0, 0.0)), Leg("B", 12, 1, (0.0, 0.0), exposure_s=60.0),
            Leg("C", 13, 2, (0.0, 0.0))]  # fmt: skip
    assert expected_splits(legs, GAP_S) == [0, 3, 4]
    d, _, sessions = _stack_night(tmp_path, daemons, legs, 6)
    assert [_index(s[0]) for s in sessions] == [0, 3, 4]
    assert [s[0].get("split") for s in sessions] == [None, "exposure 30 s -> 60 s",
                                                     "exposure 60 s -> 30 s"]  # fmt: skip
    assert all(line["status"] == "accepted" for s in sessions for line in s)
    assert d.text().count("new session: exposure") == 2


def test_clouds_and_stray_frames_do_not_split(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A cloudy stretch (few stars) and three frames of three unrelated fields (they align
    neither with the reference nor with each other) stay rejected in the one session."""
    legs = [
        Leg("A", 11, 9, (0.0, 0.0), cloudy=(3, 4, 5, 6)),
        Leg("x", 91, 1, (0.0, 0.0)),
        Leg("y", 92, 1, (0.0, 0.0)),
        Leg("z", 93, 1, (0.0, 0.0)),
    ]
    # x is journaled once z shows the three fail among themselves; y and z at the close
    d, _, sessions = _stack_night(tmp_path, daemons, legs, 10)
    assert d.text().count("held, it may start a new target") == 3
    assert len(sessions) == 1, [s[0]["file"] for s in sessions]
    status = {_index(line): line for line in sessions[0]}
    assert sorted(status) == list(range(12))
    assert {i for i, line in status.items() if line["status"] == "accepted"} == {0, 1, 2, 7, 8}
    for i in (9, 10, 11):  # rejected with the alignment's own reason, as without the rules
        assert status[i]["status"] == "rejected" and "match" in status[i]["reason"], status[i]
    assert "new session" not in d.text()


@pytest.fixture
def live() -> Iterator[list[LiveDaemon]]:
    started: list[LiveDaemon] = []
    yield started
    for daemon in started:
        daemon.stop.set()


def test_a_located_jump_splits_at_once(tmp_path: Path, live: list[LiveDaemon]) -> None:
    """With a solver (here the simulator's truth: each file's pointing), the first frame of
    the new target is located, found 17.8 degrees away and starts the new session at once."""
    legs = [Leg("M 27", 11, 4, (299.90, 22.72)), Leg("M 57", 22, 4, (283.40, 33.03))]
    watch, out = tmp_path / "watch", tmp_path / "out"
    truth = json.loads(write_night(watch, legs).read_text())
    pointing = {f["file"]: tuple(f["pointing"]) for f in truth["frames"]}
    asked: list[str] = []

    def locate(prepared: Prepared) -> tuple[float, float] | None:
        asked.append(prepared.path.name)
        return pointing[prepared.path.name]

    settings = load_settings(
        None,
        {"watch_dir": watch, "output_dir": out, "stable_s": 0.5, "web_enabled": False},
        use_default=False,
    )
    daemon = LiveDaemon(settings, locate=locate)
    live.append(daemon)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    while len(journal(out)) < 8 and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.1)
    daemon.stop.set()
    runner.join(timeout=60)
    sessions = _sessions(out)
    assert [_index(s[0]) for s in sessions] == [0, 4]
    assert all(line["status"] == "accepted" for s in sessions for line in s)
    assert sessions[1][0]["split"] == "pointing moved 17.82° (> 0.5°)"
    # located: the first reference, and the one frame that failed to align (the second's)
    assert asked == ["N_0000.DNG", "N_0004.DNG"]  # the split frame is not solved twice


@pytest.mark.skipif(not Solver(load_settings(None, {"solve_enabled": True}, use_default=False))
                    .available, reason="no plate solver (astrometry.net and its index files)")
def test_a_night_of_three_real_targets_splits_and_names_each_session(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The three-target night on the real sky (the Tycho-2 stars at M27, M57 and M13, 3"/px)
    with the plate solver on: the same four sessions, every frame accepted, each session named
    after its target in session.json and stack.fits."""
    width, height = 1200, 800  # 1 x 0.67 degrees: M13's field holds 30 Tycho-2 stars
    legs = on_the_sky(three_targets(), 3.0, width, height)
    truth = expected_splits(legs, GAP_S)
    total = sum(leg.frames for leg in legs)
    watch, out = tmp_path / "watch", tmp_path / "out"
    write_night(watch, legs, width=width, height=height, stars=0)
    env = {"NIGHTSTACK_SOLVE_ENABLED": "true", "NIGHTSTACK_SOLVE_SCALE_ARCSEC": "3.0"}
    d = Daemon(watch, out, env=env)
    daemons.append(d)
    wait_for(lambda: len(journal(out)) >= total, 180, f"{total} journal lines", d)
    assert d.stop() == 0
    sessions = _sessions(out)
    assert [_index(s[0]) for s in sessions] == truth == [0, 6, 12, 17], d.text()
    lines = [line for s in sessions for line in s]
    assert [line for line in lines if line["status"] != "accepted"] == []
    names = [json.loads((out / s[0]["session"] / "session.json").read_text()).get("target")
             for s in sessions]  # fmt: skip
    assert names == ["M27", "M57", "M13", "M13"], names
    for s, name in zip(sessions, names, strict=True):
        assert fits.getheader(out / s[0]["session"] / "stack.fits")["OBJECT"] == name
