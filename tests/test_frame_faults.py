"""Faults of a frame's file and of the machine while it is read (issue 20, items 3, 5, 11).

A real daemon (``nightstack watch`` as a subprocess, real inotify, real decoder child): a
process out of file descriptors (its ``RLIMIT_NOFILE`` lowered for real with ``prlimit``), a
queued file replaced by a FIFO, a queued symlink re-pointed to ``/dev/zero``, and a stage that
is stuck while a real ``NOTIFY_SOCKET`` listens for ``WATCHDOG=1``.
"""

from __future__ import annotations

import itertools
import os
import resource
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _daemon import Daemon, journal, wait_for
from nightstack.simulate import simulate_night

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    outdir = tmp_path_factory.mktemp("camera")
    simulate_night(outdir, frames=5, width=600, height=400, seed=11, drift_px=1.0)
    return sorted(outdir.glob("*.DNG"))


def _put(frame: Path, watch: Path, name: str | None = None) -> Path:
    """Copy ``frame`` beside the watch folder, then rename it in (complete at once)."""
    target = watch / (name or frame.name)
    tmp = watch.parent / f".{target.name}.part"
    shutil.copy(frame, tmp)
    tmp.rename(target)
    return target


def _start(watch: Path, out: Path, daemons: list[Daemon], **kwargs: object) -> Daemon:
    d = Daemon(watch, out, **kwargs)  # type: ignore[arg-type]
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    return d


def test_no_file_descriptor_left_waits_and_never_rejects_the_frame(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Item 3: the daemon's RLIMIT_NOFILE lowered to the descriptors it holds, so the next
    open fails with a real EMFILE: the frame waits (one log line), is not journaled, and is
    accepted once descriptors are free again."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = _start(watch, out, daemons)
    _put(frames[0], watch)
    wait_for(lambda: len(journal(out)) == 1, 60, "the reference", d)
    time.sleep(0.5)  # the preview written: the descriptors in use settle
    soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{d.pid}/fd"))
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (in_use, hard))
    try:
        _put(frames[1], watch)
        wait_for(lambda: "no file descriptor left" in d.text(), 30, "the EMFILE line", d)
        time.sleep(2.5)  # tried again every second: still waiting, never rejected
        assert len(journal(out)) == 1
    finally:
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_for(lambda: len(journal(out)) == 2, 60, "the frame after the limit is raised", d)
    assert [r["status"] for r in journal(out)] == ["accepted", "accepted"]
    assert d.text().count("no file descriptor left") == 1  # one line, not one per try
    assert "file descriptors free again" in d.text()
    assert d.stop() == 0


def test_a_fifo_and_a_link_to_dev_zero_are_refused_and_later_frames_stacked(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Item 5: a queued frame replaced by a FIFO, a queued symlink re-pointed to /dev/zero:
    each rejected with a one-line reason, the frames after them stacked, SIGTERM prompt."""
    watch, out, elsewhere = tmp_path / "watch", tmp_path / "out", tmp_path / "elsewhere"
    watch.mkdir()
    elsewhere.mkdir()
    d = _start(watch, out, daemons, decode_fn="_slow_decode:load",
               env={"NIGHTSTACK_FOLLOW_SYMLINKS": "true"})  # fmt: skip
    _put(frames[0], watch)  # the reference: the decoder child's start (~2 s) + 0.4 s
    fifo = _put(frames[1], watch)
    target = shutil.copy(frames[2], elsewhere / "real.DNG")
    link = watch / "link.DNG"
    link.symlink_to(target)
    time.sleep(1.0)  # both queued by the watcher, the reference still decoding
    assert not journal(out)
    fifo.unlink()
    os.mkfifo(fifo)
    tmp_link = watch.parent / "zero-link"
    tmp_link.symlink_to("/dev/zero")
    tmp_link.replace(link)
    for frame in frames[3:]:
        _put(frame, watch)
    wait_for(lambda: len(journal(out)) >= 5, 60, "every file journaled", d)
    by_name = {Path(r["file"]).name: r for r in journal(out)}
    assert by_name[fifo.name]["status"] == "rejected"
    assert by_name[fifo.name]["reason"] == "cannot read file: not a regular file (a FIFO)"
    assert by_name["link.DNG"]["status"] == "rejected"
    assert "not a regular file (a character device)" in by_name["link.DNG"]["reason"]
    assert [by_name[f.name]["status"] for f in (frames[0], *frames[3:])] == ["accepted"] * 3
    started = time.monotonic()
    assert d.stop(timeout=30) == 0
    assert time.monotonic() - started < 15


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock, path
    finally:
        sock.close()


def test_the_watchdog_starves_while_a_stage_is_stuck(
    frames: list[Path],
    tmp_path: Path,
    daemons: list[Daemon],
    notify_socket: tuple[socket.socket, Path],
) -> None:
    """Item 5: the first frame waits for a decoder child that takes 22 s to start, past the
    prepare stage's deadline (decode timeout 1 s + 10 s): WATCHDOG=1 stops, then comes back
    once the frame is through."""
    sock, path = notify_socket
    pings: list[float] = []
    stop = threading.Event()

    def listen() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if b"WATCHDOG=1" in data.split(b"\n"):
                pings.append(time.monotonic())

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    env = {
        "NOTIFY_SOCKET": str(path),
        "WATCHDOG_USEC": "400000",
        "NIGHTSTACK_DECODE_TIMEOUT_S": "1",
        "SLOW_START_S": "22",
    }
    try:
        d = _start(watch, out, daemons, env=env, decode_fn="_slow_start:load")
        dropped = time.monotonic()
        _put(frames[0], watch)
        wait_for(lambda: len(journal(out)) == 1, 90, "the first frame", d)
        time.sleep(1.0)
        assert d.stop() == 0
    finally:
        stop.set()
        listener.join()
    gaps = [(b - a, a - dropped) for a, b in itertools.pairwise(pings)]
    longest, at = max(gaps)
    assert longest > 5.0, gaps  # starved while stuck...
    assert 9.0 < at < 14.0, gaps  # ...from the stage's deadline on (1 s + 10 s after the drop)
    assert any(t > dropped + at + longest for t in pings)  # ...and fed again after
    assert "stuck on one frame" in d.text()
    assert journal(out)[0]["status"] == "accepted"


def test_a_writer_that_closes_after_every_chunk_gets_one_journal_line(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Item 11: a DNG appended in 30 steps, the file opened and closed for each (a real
    IN_CLOSE_WRITE every 60 ms): no "truncated" line, the whole file accepted once."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = _start(watch, out, daemons)
    _put(frames[0], watch)
    wait_for(lambda: len(journal(out)) == 1, 60, "the reference", d)
    data = frames[1].read_bytes()
    target = watch / frames[1].name
    steps = 30
    for k in range(steps):
        with target.open("ab") as fh:
            fh.write(data[k * len(data) // steps : (k + 1) * len(data) // steps])
        time.sleep(0.06)
    wait_for(lambda: len(journal(out)) >= 2, 60, "the whole file", d)
    time.sleep(1.5)  # any late report of a part would be journaled by now
    lines = journal(out)
    assert [(Path(r["file"]).name, r["status"]) for r in lines] == [
        (frames[0].name, "accepted"),
        (frames[1].name, "accepted"),
    ], [r.get("reason") for r in lines]
    assert d.stop() == 0
