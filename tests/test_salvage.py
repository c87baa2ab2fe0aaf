"""A damaged session after kill -9 is salvaged, never a crash loop (real processes).

Each test runs ``nightstack watch`` as a real subprocess, kills it with SIGKILL mid-session,
damages the session's files the way a power cut on an SD card does (a store file cut in half, a
truncated checkpoint, garbage journal lines, an unreadable reference), restarts it, adds frames,
and judges by what is on disk: the daemon comes up, stacks the next frames, and the final
counts every accepted frame exactly once.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from _daemon import Daemon, journal, wait_for
from nightstack.simulate import simulate_night

pytestmark = pytest.mark.slow

N_FRAMES = 8
FIRST = 5  # frames in the watch folder before the kill


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    outdir = tmp_path_factory.mktemp("camera")
    simulate_night(outdir, frames=N_FRAMES, width=640, height=426, seed=31)
    return sorted(outdir.glob("*.DNG"))


ENV = {"NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "2"}


def _killed_session(frames: list[Path], tmp_path: Path, daemons: list[Daemon]) -> tuple[Path, Path]:
    """A session of FIRST frames, its daemon killed with SIGKILL; returns (watch, session)."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in frames[:FIRST]:
        shutil.copy(f, watch / f.name)
    d = Daemon(watch, out, env=ENV)
    daemons.append(d)
    wait_for(lambda: len(journal(out)) >= FIRST, 120, "the first frames", d)
    wait_for(lambda: list(out.glob("*/checkpoint/live/live.json")), 30, "a checkpoint", d)
    d.stop(signal.SIGKILL)
    (session,) = [p.parent for p in out.glob("*/journal.jsonl")]
    return watch, session


def _finish(watch: Path, out: Path, frames: list[Path], daemons: list[Daemon]) -> Daemon:
    """Restart, add the remaining frames, stop with SIGTERM; returns the daemon."""
    d = Daemon(watch, out, env=ENV)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up after the damage", d)
    for f in frames[FIRST:]:
        shutil.copy(f, watch / f.name)
    names = {f.name for f in frames}

    def stacked() -> bool:
        done = {Path(r["file"]).name for r in journal(out) if r["status"] == "accepted"}
        return done >= names

    wait_for(stacked, 180, "every frame stacked", d)
    assert d.stop() == 0
    return d


def _final_count(session: Path) -> int:
    with fits.open(session / "stack.fits") as hdul:
        return int(hdul[0].header["NCOMBINE"])


def test_a_store_file_cut_in_half_is_restacked_from_its_raw(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, session = _killed_session(frames, tmp_path, daemons)
    victim = session / "frames" / "frame_000002.u16"
    size = victim.stat().st_size
    with victim.open("r+b") as fh:
        fh.truncate(size // 2)
    d = _finish(watch, session.parent, frames, daemons)
    assert "salvaged" in d.text() and "journaled as lost" in d.text()
    lines = [r for r in journal(session.parent) if r["session"] == session.name]
    lost = [r for r in lines if r["status"] == "lost"]
    assert [Path(r["file"]).name for r in lost] == [frames[2].name]
    accepted = [Path(r["file"]).name for r in lines if r["status"] == "accepted"]
    assert sorted(accepted) == sorted([f.name for f in frames] + [frames[2].name])
    meta = json.loads((session / "session.json").read_text())
    assert meta["state"] == "closed" and meta["accepted"] == N_FRAMES and meta["lost"] == []
    assert _final_count(session) == N_FRAMES  # frame 2 once: re-stacked from its raw file


def test_a_lost_frame_whose_raw_is_gone_is_counted_as_lost(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, session = _killed_session(frames, tmp_path, daemons)
    (session / "frames" / "frame_000001.u16").unlink()
    (watch / frames[1].name).unlink()  # the user moved it away
    d = Daemon(watch, session.parent, env=ENV)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    for f in frames[FIRST:]:
        shutil.copy(f, watch / f.name)
    wait_for(lambda: len(journal(session.parent)) >= N_FRAMES + 1, 120, "the new frames", d)
    assert d.stop() == 0
    meta = json.loads((session / "session.json").read_text())
    assert meta["accepted"] == N_FRAMES - 1
    assert [Path(x["file"]).name for x in meta["lost"]] == [frames[1].name]
    assert "stored data lost" in meta["lost"][0]["reason"]
    assert _final_count(session) == N_FRAMES - 1


def test_a_truncated_checkpoint_and_garbage_journal_lines_are_salvaged(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, session = _killed_session(frames, tmp_path, daemons)
    for npy in (session / "checkpoint" / "live").glob("mean.*.npy"):
        with npy.open("r+b") as fh:
            fh.truncate(npy.stat().st_size // 3)
    with (session / "journal.jsonl").open("ab") as fh:
        fh.write(b"\x00\x00garbage after a power cut\n{not json}\n[1, 2]\n")
    d = _finish(watch, session.parent, frames, daemons)
    assert "garbage journal line(s) dropped" in d.text()
    assert "live stack rebuilt from the store" in d.text()
    lines = [r for r in journal(session.parent) if r["session"] == session.name]
    assert sorted(Path(r["file"]).name for r in lines) == [f.name for f in frames]
    assert _final_count(session) == N_FRAMES
    meta = json.loads((session / "session.json").read_text())
    assert meta["state"] == "closed" and meta["accepted"] == N_FRAMES


def test_an_old_format_checkpoint_is_rebuilt_from_the_store(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A checkpoint of format version 1 (an older nightstack: float32 M2 and a count per
    sample) is not read: the live stack is rebuilt from the store and every frame is
    stacked once."""
    watch, session = _killed_session(frames, tmp_path, daemons)
    live = session / "checkpoint" / "live"
    meta = json.loads((live / "live.json").read_text())
    generation = meta["generation"]
    mean = np.load(live / meta["files"]["mean"])
    for key in ("spread", "count"):
        (live / meta["files"].pop(key)).unlink()
    np.save(live / f"m2.{generation}.npy", np.zeros_like(mean))
    np.save(live / f"count.{generation}.npy", np.zeros(mean.shape, np.uint16))
    meta["files"].update(m2=f"m2.{generation}.npy", count=f"count.{generation}.npy")
    meta["version"] = 1
    (live / "live.json").write_text(json.dumps(meta))
    d = _finish(watch, session.parent, frames, daemons)
    assert "version 1 live-stack checkpoint" in d.text()
    assert "live stack rebuilt from the store" in d.text()
    assert _final_count(session) == N_FRAMES
    meta = json.loads((session / "session.json").read_text())
    assert meta["state"] == "closed" and meta["accepted"] == N_FRAMES


def test_an_unsalvageable_session_is_quarantined_and_a_new_one_takes_the_frames(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, session = _killed_session(frames, tmp_path, daemons)
    (session / "reference.npz").write_bytes(b"PK\x03\x04 not a zip any more")
    out = session.parent
    d = Daemon(watch, out, env=ENV)
    daemons.append(d)
    wait_for(lambda: "quarantined" in d.text(), 60, "the quarantine", d)
    for f in frames[FIRST:]:
        shutil.copy(f, watch / f.name)
    wait_for(
        lambda: len([r for r in journal(out) if r["session"] != session.name]) >= N_FRAMES,
        180, "every frame in a new session", d,
    )  # fmt: skip
    assert d.stop() == 0
    meta = json.loads((session / "session.json").read_text())
    assert meta["state"] == "quarantined" and "BadZipFile" in meta["note"]
    (new,) = [p for p in out.iterdir() if p.is_dir() and p != session]
    assert _final_count(new) == N_FRAMES
