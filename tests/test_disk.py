"""Disk space as a resource: the frame store fills a real small filesystem (issue: resilience).

The output folder is a tmpfs of a fixed size mounted by the test (root only; skipped otherwise):
the daemon keeps a reserve for the final outputs, goes live-only when the store cannot grow,
keeps accepting frames, and on SIGTERM writes a final that holds every accepted frame.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from _daemon import Daemon, journal, tmpfs, wait_for
from nightstack.cli import main
from nightstack.simulate import simulate_night

pytestmark = pytest.mark.slow

N_FRAMES = 24
WIDTH, HEIGHT = 900, 600  # 3.2 MB a stored frame; the reserve for the final outputs ~64 MB


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    outdir = tmp_path_factory.mktemp("camera")
    simulate_night(outdir, frames=N_FRAMES, width=WIDTH, height=HEIGHT, seed=41, drift_px=1.0)
    return sorted(outdir.glob("*.DNG"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 120 MB tmpfs, mounted for the test and unmounted after it."""
    with tmpfs(tmp_path / "small", 120) as mount:
        yield mount


def _copy_all(frames: list[Path], watch: Path) -> None:
    for f in frames:
        shutil.copy(f, watch / f.name)


def test_a_store_that_fills_the_disk_goes_live_only_and_the_final_holds_every_frame(
    frames: list[Path], tmp_path: Path, small_disk: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", small_disk / "sessions"
    watch.mkdir()
    d = Daemon(watch, out, env={"NIGHTSTACK_MIN_FREE_FRAMES": "5"}, log_dir=tmp_path)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    _copy_all(frames, watch)
    wait_for(lambda: len(journal(out)) >= N_FRAMES, 240, "every frame journaled", d)
    lines = journal(out)
    assert all(r["status"] == "accepted" for r in lines), [r["reason"] for r in lines]
    stored = [r["stored"] for r in lines]
    assert stored[0] is True and stored[-1] is False  # the store filled, frames went on
    assert stored == sorted(stored, reverse=True)  # once live-only, live-only
    assert any(r.get("warning", "") and "room for" in r["warning"] for r in lines)
    assert "goes live-only" in d.text()
    started = time.monotonic()
    assert d.stop(timeout=60) == 0
    assert time.monotonic() - started < 60
    session = out / lines[0]["session"]
    meta = json.loads((session / "session.json").read_text())
    assert meta["state"] == "closed" and meta["accepted"] == N_FRAMES
    assert meta["outputs"]["final"]["method"] == "live" and "disk" in meta["live_only"]
    with fits.open(session / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == N_FRAMES
        assert hdul[0].header["STACKMTH"] == "live"
        live_final = np.asarray(hdul[0].data, np.float32)
    assert (session / "stack.tif").stat().st_size > 0
    # the live final is the stack of every frame: close to the exact batch stack of them all
    batch = tmp_path / "batch.fits"
    assert main(["stack", *map(str, frames), "-o", str(batch)]) == 0
    exact = fits.getdata(batch).astype(np.float32)
    sky = (slice(None), slice(20, int(0.8 * HEIGHT)), slice(20, -20))
    noise = np.nanstd(exact[sky] - np.nanmedian(exact[sky]))
    assert np.nanmedian(np.abs(live_final[sky] - exact[sky])) < 0.1 * noise


def test_final_live_keeps_no_frame_store(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out, env={"NIGHTSTACK_FINAL": "live"})
    daemons.append(d)
    _copy_all(frames[:8], watch)
    wait_for(lambda: len(journal(out)) >= 8, 120, "eight frames", d)
    (session,) = {out / r["session"] for r in journal(out)}
    assert not (session / "frames").exists()
    assert all(r["stored"] is False for r in journal(out)[1:])
    assert d.stop() == 0
    header = fits.getheader(session / "stack.fits")
    assert header["NCOMBINE"] == 8 and header["STACKMTH"] == "live"


def test_a_live_only_session_killed_resumes_and_counts_every_frame_once(
    frames: list[Path], tmp_path: Path, small_disk: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", small_disk / "sessions"
    watch.mkdir()
    env = {"NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "3"}
    first = Daemon(watch, out, env=env, log_dir=tmp_path)
    daemons.append(first)
    _copy_all(frames, watch)

    def live_only_for_a_while() -> bool:
        return sum(r.get("stored") is False for r in journal(out)) >= 4

    wait_for(live_only_for_a_while, 240, "live-only frames", first)
    first.stop(signal.SIGKILL)
    second = Daemon(watch, out, env=env, log_dir=tmp_path)
    daemons.append(second)
    wait_for(lambda: "resumed live-only" in second.text(), 60, "live-only resume", second)

    def all_stacked() -> bool:
        done = {Path(r["file"]).name for r in journal(out) if r["status"] == "accepted"}
        return done >= {f.name for f in frames}

    wait_for(all_stacked, 240, "every frame", second)
    assert second.stop(timeout=60) == 0
    (session,) = {out / r["session"] for r in journal(out)}
    meta = json.loads((session / "session.json").read_text())
    assert meta["accepted"] == N_FRAMES and meta["lost"] == []
    assert fits.getheader(session / "stack.fits")["NCOMBINE"] == N_FRAMES
