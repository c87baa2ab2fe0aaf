"""The live daemon as a real process on real folders: readiness, backlog, crash-resume, systemd.

Every test starts ``nightstack watch`` as a subprocess (real inotify through watchdog, real
decoder child process, real signals) and judges it by what it leaves on disk and sends to a
real ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from _daemon import Daemon, journal, wait_for
from nightstack.cli import main
from nightstack.simulate import simulate_night

pytestmark = pytest.mark.slow

N_FRAMES = 7


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    outdir = tmp_path_factory.mktemp("camera")
    simulate_night(outdir, frames=N_FRAMES, width=900, height=600, seed=5)
    return sorted(outdir.glob("*.DNG"))


def test_chunked_write_is_not_decoded_early_and_rename_works(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)

    # a slow writer: ~3 s of chunks; the daemon must wait for the close
    data = frames[0].read_bytes()
    target = watch / "IMG_0100.DNG"
    chunks = np.array_split(np.frombuffer(data, dtype=np.uint8), 12)
    with target.open("wb") as fh:
        for chunk in chunks:
            fh.write(chunk.tobytes())
            fh.flush()
            time.sleep(0.25)
        closed_at = time.time()
    lines = wait_for(lambda: journal(out), 60, "first journal line", d)
    assert len(lines) == 1 and lines[0]["status"] == "accepted", lines
    assert Path(lines[0]["file"]).name == "IMG_0100.DNG"
    assert (out / lines[0]["session"] / "journal.jsonl").stat().st_mtime >= closed_at

    # tmp-then-rename writer (tether tools): reported once, under its final name
    part = watch / "IMG_0101.DNG.part"
    part.write_bytes(frames[1].read_bytes())
    part.rename(watch / "IMG_0101.DNG")
    lines = wait_for(lambda: len(journal(out)) >= 2 and journal(out), 60, "renamed frame", d)
    assert Path(lines[1]["file"]).name == "IMG_0101.DNG" and lines[1]["status"] == "accepted"

    # the same content under another name is processed exactly once (content hash)
    shutil.copy(frames[1], watch / "copy_of_IMG_0101.DNG")
    wait_for(lambda: "already processed" in d.text(), 60, "duplicate skipped", d)
    assert len(journal(out)) == 2
    assert d.stop() == 0
    # SIGTERM finalized the session
    meta = json.loads((out / lines[0]["session"] / "session.json").read_text())
    assert meta["state"] == "closed" and meta["accepted"] == 2
    assert (out / lines[0]["session"] / "stack.tif").exists()


def test_kill_9_then_restart_resumes_exactly(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in frames:  # the backlog: processed first, in name order
        shutil.copy(f, watch / f.name)
    env = {"NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "2", "NIGHTSTACK_KEEP_FRAME_STORE": "true"}
    first = Daemon(watch, out, env=env)
    daemons.append(first)
    wait_for(lambda: len(journal(out)) >= 4, 120, "four frames", first)
    first.stop(signal.SIGKILL)
    before = journal(out)
    assert [Path(r["file"]).name for r in before] == [f.name for f in frames[: len(before)]]

    second = Daemon(watch, out, env=env)
    daemons.append(second)
    wait_for(lambda: len(journal(out)) >= N_FRAMES, 120, "all frames", second)
    wait_for(lambda: "resumed" in second.text(), 10, "resume log line", second)
    assert second.stop() == 0
    lines = journal(out)
    assert len({r["session"] for r in lines}) == 1  # the same session, resumed
    assert sorted(Path(r["file"]).name for r in lines) == [f.name for f in frames]
    assert all(r["status"] == "accepted" for r in lines)
    session = out / lines[0]["session"]
    meta = json.loads((session / "session.json").read_text())
    assert meta["state"] == "closed" and meta["accepted"] == N_FRAMES
    with fits.open(session / "stack.fits") as hdul:
        daemon_stack = np.asarray(hdul[0].data, dtype=np.float32)
        assert hdul[0].header["NCOMBINE"] == N_FRAMES

    # the daemon's final stack equals `nightstack stack` on the same files
    batch = tmp_path / "batch.fits"
    assert main(["stack", *map(str, frames), "-o", str(batch)]) == 0
    with fits.open(batch) as hdul:
        batch_stack = np.asarray(hdul[0].data, dtype=np.float32)
    np.testing.assert_array_equal(np.isnan(daemon_stack), np.isnan(batch_stack))
    np.testing.assert_allclose(daemon_stack, batch_stack, rtol=0, atol=1e-6, equal_nan=True)


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    return sock, path


def _collect(sock: socket.socket, into: list[tuple[float, str]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        for line in data.decode().splitlines():
            into.append((time.monotonic(), line))


def _wait_message(
    sock: socket.socket, into: list[tuple[float, str]], prefix: str, timeout: float, daemon: Daemon
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, line in into:
            if line.startswith(prefix):
                return line
        _collect(sock, into, 0.3)
        if daemon.proc.poll() is not None and not any(m.startswith(prefix) for _, m in into):
            raise AssertionError(f"daemon exited before {prefix}: {daemon.text()[-2000:]}")
    raise AssertionError(f"no {prefix} in {into}\n{daemon.text()[-2000:]}")


def test_systemd_notifications_from_a_real_daemon(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    sock, path = _notify_socket(tmp_path)
    messages: list[tuple[float, str]] = []
    d = Daemon(watch, out, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    daemons.append(d)
    _wait_message(sock, messages, "READY=1", 60, d)
    _wait_message(sock, messages, "WATCHDOG=1", 5, d)
    shutil.copy(frames[0], watch / frames[0].name)
    status = _wait_message(sock, messages, "STATUS=1 stacked", 60, d)
    assert "0 rejected" in status and "queue" in status and "FWHM" in status
    d.proc.send_signal(signal.SIGTERM)
    _wait_message(sock, messages, "STOPPING=1", 30, d)
    assert d.proc.wait(timeout=60) == 0
    sock.close()


def test_a_stalled_worker_stops_the_watchdog_pings(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    sock, path = _notify_socket(tmp_path)
    messages: list[tuple[float, str]] = []
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    d = Daemon(watch, out, env=env, stall_s=60)
    daemons.append(d)
    _wait_message(sock, messages, "READY=1", 60, d)
    _collect(sock, messages, 2.0)
    pings = [t for t, m in messages if m == "WATCHDOG=1"]
    assert len(pings) >= 3  # healthy: every 0.5 s
    shutil.copy(frames[0], watch / frames[0].name)
    _collect(sock, messages, 8.0)
    last_ping = max(t for t, m in messages if m == "WATCHDOG=1")
    assert time.monotonic() - last_ping >= 4.0, "pings went on while the worker was stuck"
    d.proc.kill()
    d.proc.wait(timeout=10)
    sock.close()


def test_sighup_reloads_for_the_next_session_and_close_starts_a_new_one(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    config = tmp_path / "nightstack.toml"
    config.write_text("star_threshold_sigma = 6.0\n")
    sock, path = _notify_socket(tmp_path)
    messages: list[tuple[float, str]] = []
    d = Daemon(watch, out, "--config", str(config), env={"NOTIFY_SOCKET": path})
    daemons.append(d)
    _wait_message(sock, messages, "READY=1", 60, d)
    shutil.copy(frames[0], watch / frames[0].name)
    wait_for(lambda: len(journal(out)) == 1, 60, "first frame", d)

    config.write_text("star_threshold_sigma = = broken\n")  # a bad edit is refused...
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in d.text(), 30, "refused reload", d)
    assert "star_threshold_sigma" in d.text() or "not valid TOML" in d.text()
    config.write_text("star_threshold_sigma = 8.0\n")  # ...a good one is taken
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in d.text(), 30, "reload", d)
    _wait_message(sock, messages, "RELOADING=1", 10, d)

    assert main(["close", "--output-dir", str(out)]) == 0
    first = out / journal(out)[0]["session"]
    wait_for(
        lambda: json.loads((first / "session.json").read_text())["state"] == "closed",
        60,
        "close",
        d,
    )
    meta = json.loads((first / "session.json").read_text())
    assert meta["settings"]["star_threshold_sigma"] == 6.0  # the session kept its settings
    assert (first / "stack.tif").exists()

    shutil.copy(frames[1], watch / frames[1].name)  # a frame after the close: a new session
    wait_for(lambda: len(journal(out)) == 2, 60, "second frame", d)
    lines = journal(out)
    assert lines[1]["session"] != lines[0]["session"]
    second = out / lines[1]["session"]
    meta = json.loads((second / "session.json").read_text())
    assert meta["state"] == "open" and meta["settings"]["star_threshold_sigma"] == 8.0
    # and its frames are detected with the new threshold: fewer faint stars pass
    assert lines[1]["stars"] < 0.95 * lines[0]["stars"], (lines[0]["stars"], lines[1]["stars"])
    assert d.stop() == 0
    sock.close()


BACKLOG = 40
PREVIEW_EVERY_S = 0.5  # several previews in a backlog that takes seconds here


def test_a_backlog_refreshes_the_preview_every_preview_every_s(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    camera, watch, out = tmp_path / "camera", tmp_path / "watch", tmp_path / "out"
    simulate_night(camera, frames=BACKLOG, width=480, height=320, seed=9, stars=300)
    watch.mkdir()
    for f in sorted(camera.glob("*.DNG")):  # the backlog: all waiting at start
        shutil.copy(f, watch / f.name)
    env = {"NIGHTSTACK_PREVIEW_EVERY_S": str(PREVIEW_EVERY_S)}  # preview_every_frames stays 1
    d = Daemon(watch, out, env=env)
    daemons.append(d)
    line_times: list[float] = []  # when each journal line was first seen (wall clock)
    previews: list[float] = []  # mtime of each preview.jpg the daemon wrote (wall clock)
    deadline = time.monotonic() + 240
    while len(line_times) < BACKLOG and time.monotonic() < deadline and d.alive():
        now = time.time()
        found = sorted(out.glob("*/journal.jsonl"))
        if found:
            count = found[0].read_bytes().count(b"\n")
            line_times += [now] * (count - len(line_times))
            with contextlib.suppress(FileNotFoundError):
                mtime = (found[0].parent / "preview.jpg").stat().st_mtime_ns / 1e9
                if not previews or mtime != previews[-1]:
                    previews.append(mtime)
        time.sleep(0.005)
    assert len(line_times) == BACKLOG, d.text()[-3000:]
    lines = journal(out)
    assert all(r["status"] == "accepted" for r in lines)
    first, last = line_times[0], line_times[-1]
    during = [t for t in previews if t <= last]
    assert last - first >= 3 * PREVIEW_EVERY_S, "backlog too quick to judge the cadence"
    frame_s = max(b - a for a, b in itertools.pairwise(line_times))  # the slowest frame
    slack_s = 0.25  # the preview's own write and this loop's polling
    gaps = [b - a for a, b in itertools.pairwise([first, *during, last])]
    assert max(gaps) <= PREVIEW_EVERY_S + frame_s + slack_s, (gaps, frame_s)
    # ... and no more often than the clock says (not every frame): cheap while behind
    assert len(during) <= (last - first) / PREVIEW_EVERY_S + 2, (len(during), last - first)
    print(
        f"backlog of {BACKLOG}: {last - first:.1f} s, {len(during)} previews, gaps "
        f"{min(gaps):.2f}-{max(gaps):.2f} s (bound {PREVIEW_EVERY_S + frame_s + slack_s:.2f} s)"
    )
    assert d.stop() == 0
    waited = [int(m) for m in re.findall(r" queue=(\d+)", d.text())]
    assert len(waited) == BACKLOG and sum(q > 0 for q in waited) >= BACKLOG - 3  # it was behind


def test_the_watchdog_is_fed_while_a_long_frame_is_stacked(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A frame whose store write and accumulation take longer than the watchdog period: the
    pings continue from the feeder thread (without it the gap is the whole frame)."""
    camera = tmp_path / "camera"
    simulate_night(camera, frames=2, width=6000, height=4000, seed=8, nebula=False)
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    sock, path = _notify_socket(tmp_path)
    messages: list[tuple[float, str]] = []
    interval = 0.05  # WatchdogSec = 0.1 s: pings every 0.05 s
    d = Daemon(watch, out, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    daemons.append(d)
    _wait_message(sock, messages, "READY=1", 60, d)
    done = threading.Event()  # read the socket all along, as systemd does: a full socket blocks

    def read() -> None:
        while not done.is_set():
            _collect(sock, messages, 0.2)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for f in sorted(camera.glob("*.DNG")):
            shutil.copy(f, watch / f.name)
        wait_for(lambda: len(journal(out)) >= 2, 180, "two 24 MP frames", d)
        assert d.stop() == 0
    finally:
        done.set()
        reader.join()
    sock.close()
    stacked = [r for r in journal(out) if r["status"] == "accepted"]
    # the live stack takes a stored frame after its journal line: its time is in the log line
    live = [float(ms) for ms in re.findall(r" live=(\d+)ms", d.text())]
    store = max(r["ms"].get("warp+store", 0) + r["ms"].get("store", 0) for r in stacked)
    slow = store + max(live, default=0.0)
    assert slow > 10 * interval * 1000, slow  # the frame is long against the watchdog period
    pings = [t for t, m in messages if m == "WATCHDOG=1"]
    gaps = np.diff(pings)
    # without the feeder the longest gap is the whole frame (measured 1.5 s vs 0.18 s at 6 MP)
    assert len(pings) > 10 and gaps.max() < min(0.5 * slow / 1000, 0.4), (gaps.max(), slow)


def test_a_resumed_session_keeps_its_own_settings_after_a_config_edit(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    config = tmp_path / "nightstack.toml"
    config.write_text('normalize = "add"\nstack_sigma = 3.0\n')
    for f in frames[:4]:
        shutil.copy(f, watch / f.name)
    first = Daemon(watch, out, "--config", str(config))
    daemons.append(first)
    wait_for(lambda: len(journal(out)) >= 4, 120, "four frames", first)
    first.stop(signal.SIGKILL)
    config.write_text('normalize = "none"\nstack_sigma = 2.5\n')  # edited during the night
    second = Daemon(watch, out, "--config", str(config))
    daemons.append(second)
    wait_for(lambda: "watching" in second.text(), 60, "start-up", second)
    for f in frames[4:]:
        shutil.copy(f, watch / f.name)
    wait_for(lambda: len(journal(out)) >= N_FRAMES, 120, "all frames", second)
    assert second.stop() == 0
    assert "apply from the next session" in second.text()
    assert "normalize" in second.text() and "stack_sigma" in second.text()
    lines = journal(out)
    assert len({r["session"] for r in lines}) == 1
    assert all(r["normalization"]["mode"] == "add" for r in lines)  # after the restart too
    session = out / lines[0]["session"]
    header = fits.getheader(session / "stack.fits")
    assert header["STACKSIG"] == 3.0 and header["NORMALIZ"] == "add"
    meta = json.loads((session / "session.json").read_text())
    assert meta["settings"]["stack_sigma"] == 3.0 and meta["settings"]["normalize"] == "add"


def test_checkpoints_are_paced_by_time(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in frames:
        shutil.copy(f, watch / f.name)
    env = {
        "NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "1",
        "NIGHTSTACK_CHECKPOINT_MIN_INTERVAL_S": "3600",
    }
    d = Daemon(watch, out, env=env)
    daemons.append(d)
    wait_for(lambda: len(journal(out)) >= N_FRAMES, 120, "all frames", d)
    (manifest,) = out.glob("*/checkpoint/live/live.json")
    state = json.loads((manifest.parent.parent / "state.json").read_text())
    d.stop(signal.SIGKILL)
    assert state["frames"] == 1  # one checkpoint, after the first frame; then none for an hour


def _live_fits_after(out: Path, frames: int) -> np.ndarray | None:
    """The session's live.fits once it holds ``frames`` frames, else None."""
    for path in out.glob("*/live.fits"):
        try:
            with fits.open(path) as hdul:
                if hdul[0].header["NCOMBINE"] == frames:
                    return np.asarray(hdul[0].data, dtype=np.float32)
        except (OSError, KeyError):
            continue
    return None


def test_the_live_stack_resumed_after_kill_9_equals_an_uninterrupted_one(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    env = {"NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "2", "NIGHTSTACK_LIVE_FITS_EVERY_S": "0"}
    stacks = []
    for run, kill_after in (("plain", None), ("killed", 4)):
        watch, out = tmp_path / run / "watch", tmp_path / run / "out"
        watch.mkdir(parents=True)
        for f in frames:
            shutil.copy(f, watch / f.name)
        d = Daemon(watch, out, env=env)
        daemons.append(d)
        if kill_after is not None:
            wait_for(lambda out=out, n=kill_after: len(journal(out)) >= n, 120, "frames", d)
            d.stop(signal.SIGKILL)
            d = Daemon(watch, out, env=env)
            daemons.append(d)
        found: list[np.ndarray] = []

        def complete(out: Path = out, found: list[np.ndarray] = found) -> bool:
            stack = _live_fits_after(out, N_FRAMES)
            if stack is not None:
                found.append(stack)
            return stack is not None

        wait_for(complete, 120, "live.fits of every frame", d)
        d.stop(signal.SIGKILL)
        stacks.append(found[0])
    plain, resumed = stacks
    np.testing.assert_array_equal(resumed, plain)  # bit for bit, NaN where nothing covers


def test_checkpoints_are_paced_by_the_bytes_the_store_wrote(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """With checkpoint_write_ratio 0.5 a checkpoint (6.67 bytes per pixel and channel, 10x a
    stored mosaic's 2 bytes a pixel) waits until the store wrote twice its size: none in these
    7 frames; with ratio 0 (the control) one every frame."""
    seen = {}
    for ratio in ("0.5", "0"):
        watch, out = tmp_path / ratio / "watch", tmp_path / ratio / "out"
        watch.mkdir(parents=True)
        for f in frames:
            shutil.copy(f, watch / f.name)
        env = {
            "NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "1",
            "NIGHTSTACK_CHECKPOINT_WRITE_RATIO": ratio,
        }
        d = Daemon(watch, out, env=env)
        daemons.append(d)
        wait_for(lambda out=out: len(journal(out)) >= N_FRAMES, 120, "all frames", d)
        states = list(out.glob("*/checkpoint/state.json"))
        seen[ratio] = json.loads(states[0].read_text())["frames"] if states else 0
        d.stop(signal.SIGKILL)
    assert seen["0.5"] == 0  # 7 x 1.1 MB stored, a checkpoint is 10.7 MB: not yet
    assert seen["0"] >= N_FRAMES - 1  # the control: frame pacing alone


def test_live_fits_is_paced_by_the_bytes_the_store_wrote(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """With live_fits_write_ratio 0.5 live.fits (12 bytes a pixel, 6x a stored mosaic) is
    written with the first preview and then waits until the store wrote twice its size: not
    within these 7 frames; with ratio 0 (the control) it follows every preview."""
    seen = {}
    for ratio in ("0.5", "0"):
        watch, out = tmp_path / ratio / "watch", tmp_path / ratio / "out"
        watch.mkdir(parents=True)
        for f in frames:
            shutil.copy(f, watch / f.name)
        env = {"NIGHTSTACK_LIVE_FITS_EVERY_S": "0", "NIGHTSTACK_LIVE_FITS_WRITE_RATIO": ratio}
        d = Daemon(watch, out, env=env)
        daemons.append(d)
        wait_for(lambda out=out: len(journal(out)) >= N_FRAMES, 120, "all frames", d)
        live = next(out.glob("*/live.fits"))
        # the last frame's preview follows its journal line
        if ratio == "0":
            wait_for(lambda live=live: fits.getheader(live)["NCOMBINE"] == N_FRAMES, 60, "", d)
        seen[ratio] = fits.getheader(live)["NCOMBINE"]
        d.stop(signal.SIGKILL)
    assert seen["0.5"] < 3  # the first preview's, never rewritten: 7 x 2 B < 12 B / 0.5
    assert seen["0"] == N_FRAMES
