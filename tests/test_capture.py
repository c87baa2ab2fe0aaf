"""``nightstack capture`` against libgphoto2's own virtual camera (tests/_vcam.py).

Each test runs the command as a real process with ``VCAMERADIR`` in its environment (libgphoto2
reads it when the module is first imported), so the whole PTP stack runs as with a camera on
USB: detection, settings, capture, download, delete, events.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from _daemon import Daemon, journal, wait_for
from _vcam import FRAME_BYTES, Feeder, VirtualCamera, star_jpeg
from _web import EventStream, get_json, request, web_base

NIGHTSTACK = [sys.executable, "-m", "nightstack.cli"]
LAUNCH = [sys.executable, "-m", "_capture_launch"]


def _capture(camera: VirtualCamera, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NIGHTSTACK, "capture", *args], env=camera.env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _fed(
    camera: VirtualCamera, watch: Path, journal: Path, *args: str, faults: tuple[int, ...] = ()
) -> subprocess.CompletedProcess:
    """``nightstack capture WATCH ARGS --journal JOURNAL``, the camera shown a new sky before
    each exposure (and failing first at the frames in ``faults``) by tests/_capture_launch.py."""
    return subprocess.run(
        [*LAUNCH, "--faults", *map(str, faults), "--", str(watch), *args, "--journal",
         str(journal)],
        env=_launch_env(camera), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _launch_env(camera: VirtualCamera) -> dict[str, str]:
    tests = str(Path(__file__).resolve().parent)
    return {
        **camera.env(),
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }


def _journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _frames(watch: Path) -> list[Path]:
    return sorted(watch.glob("*.jpg"))


@pytest.fixture
def camera(tmp_path: Path) -> VirtualCamera:
    return VirtualCamera(tmp_path / "vcamera")


def test_frames_land_complete_distinct_journaled_on_time(tmp_path, camera):
    watch, journal = tmp_path / "incoming", tmp_path / "capture.jsonl"
    done = _fed(
        camera,
        watch,
        journal,
        "--count",
        "4",
        "--exposure",
        "0.1",
        "--interval",
        "1.0",
        "--delay",
        "0.5",
    )
    assert done.returncode == 0, done.stderr
    assert "captured 4 frame(s)" in done.stdout
    frames = _frames(watch)
    assert len(frames) == 4
    assert [p for p in watch.iterdir() if p.name.startswith(".")] == []  # no temporary left
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in frames}
    assert len(digests) == 4  # four exposures, not one file four times
    for path in frames:
        assert path.stat().st_size == FRAME_BYTES
        image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
        assert image is not None and image.shape == (360, 480)
    lines = _journal(journal)
    shots = [line for line in lines if line["event"] == "frame"]
    assert [s["frame"] for s in shots] == [1, 2, 3, 4]
    assert [s["file"] for s in shots] == [p.name for p in frames]
    assert all(s["model"] == "VC" and s["serial"] == "0.1" for s in shots)
    # the default target: the camera's RAM (Canon's capt0000.cr3), downloaded at once
    ram = {"shutterspeed": "0.1000s", "capturetarget": "Internal RAM"}
    assert all(s["settings"] == ram for s in shots)
    assert all(s["camera_clock"] and s["camera_file"].endswith(".JPG") for s in shots)
    assert lines[-1] == {"at": lines[-1]["at"], "event": "done", "frames": 4}
    starts = [datetime.fromisoformat(s["time"]).timestamp() for s in shots]
    gaps = np.diff(starts)
    assert np.all(np.abs(gaps - 1.0) < 0.5), gaps  # start to start, within 0.5 s


def test_camera_faults_mid_sequence_reconnect_nothing_lost_or_doubled(tmp_path, camera):
    """At frame 3 the camera fails its capture (a real PTP error in libgphoto2) until the
    sequence has noticed: it closes the camera, finds it again by model and serial, and takes
    frame 3. At its 27th capture since it was opened (frame 29) the virtual camera declares its
    store full (libgphoto2 -3: its capture counter, 98 stepping by 2, passed 150): a reconnect
    frees libgphoto2's camera and port driver, which starts it afresh (main kept the driver
    loaded across reconnects, so every capture after the 26th failed for good)."""
    watch, journal = tmp_path / "incoming", tmp_path / "capture.jsonl"
    done = _fed(
        camera, watch, journal, "--count", "30", "--exposure", "0.01", "--reconnect", "30",
        faults=(3,),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    frames = _frames(watch)
    assert len(frames) == 30
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in frames}) == 30
    lines = _journal(journal)
    events = [line["event"] for line in lines]
    expected = ["frame"] * 2 + ["lost", "reconnected"] + ["frame"] * 26
    assert events == [*expected, "lost", "reconnected", "frame", "frame", "done"]
    assert lines[2]["frame"] == 3 and "libgphoto2 -1" in lines[2]["reason"]
    assert lines[30]["frame"] == 29 and "libgphoto2 -3" in lines[30]["reason"]
    assert [x["frame"] for x in lines if x["event"] == "frame"] == list(range(1, 31))
    assert "finding the camera again" in done.stderr


def test_list_reports_the_camera(camera):
    done = _capture(camera, "--list")
    assert done.returncode == 0, done.stderr
    assert "VC serial 0.1 on usb:001,001: battery 50%" in done.stdout
    assert "capturetarget Internal RAM" in done.stdout


def test_card_target_keeps_the_file_on_the_card(tmp_path, camera):
    watch, journal = tmp_path / "incoming", tmp_path / "capture.jsonl"
    done = _capture(
        camera,
        str(watch),
        "--count",
        "1",
        "--exposure",
        "1",
        "--target",
        "card",
        "--keep-on-card",
        "--journal",
        str(journal),
    )
    assert done.returncode == 0, done.stderr
    (shot,) = [x for x in _journal(journal) if x["event"] == "frame"]
    assert shot["settings"] == {"shutterspeed": "1.0000s", "capturetarget": "Memory card"}


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        # over the longest timed speed (1 s): bulb; the virtual camera has a 'bulb' setting but
        # refuses to open the exposure (no InitiateOpenCapture)
        (["--exposure", "2"], "the camera refused to open a bulb exposure"),
        (["--exposure", "0.3"], "the camera has no shutter speed of 0.3 s (nearest:"),
        (["--exposure", "0.1", "--serial", "12345"], "no camera serial 12345 on USB (found: VC"),
        (["--exposure", "-1"], "exposure: 0 to 3600 s, not -1"),
    ],
)
def test_refusals_are_one_line_reasons(tmp_path, camera, args, reason):
    done = _capture(camera, str(tmp_path / "incoming"), "--count", "1", *args)
    assert done.returncode in (1, 2)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nightstack capture: ") and reason in last, done.stderr
    assert _frames(tmp_path / "incoming") == [] if (tmp_path / "incoming").exists() else True


def test_sigterm_stops_an_endless_sequence_cleanly(tmp_path, camera):
    watch, journal = tmp_path / "incoming", tmp_path / "capture.jsonl"
    proc = subprocess.Popen(
        [*NIGHTSTACK, "capture", str(watch), "--exposure", "0.01", "--interval", "0.2",
         "--journal", str(journal)],
        env=camera.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(_frames(watch)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "(stopped)" in out
    lines = _journal(journal)
    shots = [x for x in lines if x["event"] == "frame"]
    assert lines[-1]["event"] == "stopped" and lines[-1]["frames"] == len(shots) >= 2
    assert len(_frames(watch)) == len(shots)


def test_the_daemon_does_not_load_libgphoto2():
    code = (
        "import sys, nightstack.cli, nightstack.capture, nightstack.capture.status;"
        "sys.exit('gphoto2' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_real_camera_if_one_is_plugged_in(tmp_path):
    """Runs only with a real camera on USB (no VCAMERADIR): one frame of 1 s."""
    env = {k: v for k, v in os.environ.items() if k != "VCAMERADIR"}
    listed = subprocess.run(
        [*NIGHTSTACK, "capture", "--list"], env=env, capture_output=True, text=True, timeout=60
    )
    if listed.returncode != 0:
        pytest.skip("no real camera on USB")
    done = subprocess.run(
        [*NIGHTSTACK, "capture", str(tmp_path), "--count", "1", "--exposure", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len([p for p in tmp_path.iterdir() if not p.name.endswith(".jsonl")]) == 1


# --- inside `nightstack watch`: one service shoots and stacks --------------------------------
def test_watch_shoots_and_stacks_and_the_page_drives_the_camera(tmp_path, camera):
    """``capture_*`` settings start a sequence in the daemon; its frames are stacked; the
    page's API reports it (also in the event stream), starts another (until stopped), pauses,
    resumes and stops it, behind the action rules; a bad start is a one-line 400, a second
    start a 409, and the daemon goes on."""
    watch, out = tmp_path / "incoming", tmp_path / "out"
    watch.mkdir()
    out.mkdir()
    env = {
        **camera.env(),
        "NIGHTSTACK_EXTENSIONS": ".jpg",
        "NIGHTSTACK_CAPTURE_EXPOSURE_S": "0.1",
        "NIGHTSTACK_CAPTURE_COUNT": "3",
        "NIGHTSTACK_CAPTURE_INTERVAL_S": "0.5",
    }
    feeder = Feeder(camera, watch)
    feeder.start()
    daemon = Daemon(watch, out, "--web", "127.0.0.1:0", env=env)
    try:
        base = web_base(daemon)
        events = EventStream(base)
        try:
            done = events.find("status", 60, lambda s: s.get("capture", {}).get("state") == "done")
            assert done["capture"]["frame"] == 3
            wait_for(lambda: _all_stacked(out, watch), 60, "the 3 frames stacked", daemon)
            status = get_json(base, "/api/capture")
            assert status["state"] == "done" and not status["running"]
            assert status["camera"]["model"] == "VC" and status["camera"]["battery"] == "50%"
            assert status["plan"]["count"] == 3

            bad = request(base, "/api/capture/start", method="POST", body=b'{"exposure_s": "x"}')
            assert bad.status == 400 and "exposure_s: a number" in bad.json()["error"]
            foreign = request(
                base,
                "/api/capture/start",
                method="POST",
                body=b"{}",
                headers={"Origin": "http://evil.example"},
            )
            assert foreign.status == 403
            started = request(
                base,
                "/api/capture/start",
                method="POST",
                body=b'{"count": 0, "exposure_s": 0.01, "interval_s": 0.5}',  # until stopped
            )
            assert started.status == 202, started.body
            again = request(base, "/api/capture/start", method="POST", body=b"{}")
            assert again.status == 409
            wait_for(lambda: len(_frames(watch)) >= 4, 60, "a 4th frame", daemon)
            assert _post(base, "pause") == 202
            wait_for(lambda: _state(base) == "paused", 10, "paused", daemon)
            held = get_json(base, "/api/capture")["frame"]
            time.sleep(1.5)  # three intervals
            assert get_json(base, "/api/capture")["frame"] == held
            assert _post(base, "resume") == 202
            wait_for(lambda: get_json(base, "/api/capture")["frame"] > held, 10, "a frame", daemon)
            assert _post(base, "stop") == 202
            wait_for(lambda: _state(base) == "stopped", 10, "stopped", daemon)
            assert _post(base, "stop") == 409  # nothing runs
            total = 3 + get_json(base, "/api/capture")["frame"]
            assert len(_frames(watch)) == total
            wait_for(lambda: _all_stacked(out, watch), 60, f"{total} frames stacked", daemon)
        finally:
            events.close()
        assert daemon.alive()
    finally:
        assert daemon.stop() == 0
        feeder.close()
    # every distinct frame captured is stacked (the test's feeder shows the camera a new sky
    # after each frame: a feeder late on a loaded machine makes a frame of the same bytes,
    # which the daemon skips as a duplicate; normally all are distinct)
    records = journal(out)
    distinct = _distinct(watch)
    assert [r["status"] for r in records] == ["accepted"] * distinct
    assert distinct >= total - 1
    shots = [x for j in sorted((out / "capture").glob("*.jsonl")) for x in _journal(j)]
    numbers = [x["frame"] for x in shots if x["event"] == "frame"]
    assert numbers == [1, 2, 3, *range(1, total - 2)]


def _distinct(watch: Path) -> int:
    return len({hashlib.sha256(p.read_bytes()).hexdigest() for p in _frames(watch)})


def _all_stacked(out: Path, watch: Path) -> bool:
    return len([r for r in journal(out) if r["status"] == "accepted"]) == _distinct(watch)


def _post(base: str, action: str) -> int:
    return request(base, f"/api/capture/{action}", method="POST", body=b"").status


def _state(base: str) -> str:
    return str(get_json(base, "/api/capture")["state"])


def test_a_frame_never_replaces_a_file(tmp_path):
    from nightstack.capture.files import place, rename_noreplace

    (tmp_path / "n_0001.cr3").write_bytes(b"theirs")
    temp = tmp_path / ".n_0001.cr3.part"
    temp.write_bytes(b"ours")
    final = place(temp, tmp_path, "n_0001", ".cr3")
    assert final.name == "n_0001-2.cr3" and final.read_bytes() == b"ours"
    assert (tmp_path / "n_0001.cr3").read_bytes() == b"theirs" and not temp.exists()
    with pytest.raises(FileExistsError):
        rename_noreplace(final, tmp_path / "n_0001.cr3")


def test_a_capture_that_fails_costs_the_daemon_nothing(tmp_path, camera):
    watch, out = tmp_path / "incoming", tmp_path / "out"
    watch.mkdir()
    out.mkdir()
    env = {**camera.env(), "NIGHTSTACK_CAPTURE_EXPOSURE_S": "0.3"}  # no such shutter speed
    daemon = Daemon(watch, out, "--web", "127.0.0.1:0", env=env)
    try:
        base = web_base(daemon)
        reason = "the camera has no shutter speed of 0.3 s (nearest: 0.1000s, 0.0500s"
        wait_for(lambda: reason in daemon.text(), 30, "the capture's reason", daemon)
        status = get_json(base, "/api/capture")
        assert status["state"] == "failed" and reason in status["reason"]
        assert get_json(base, "/api/status")["capture"]["state"] == "failed"
        assert daemon.alive()
    finally:
        assert daemon.stop() == 0


def test_libgphoto2_errors_read_as_one_line_reasons():
    """A desktop's gvfs holding the camera, a camera gone, a full card (libgphoto2's codes, in
    a process of their own: importing gphoto2 sets its library paths for the process)."""
    code = (
        "import gphoto2 as gp\n"
        "from nightstack.capture.camera import CameraLost, explain\n"
        "for c in (-53, -7, -3, -115, -6):\n"
        "    e = explain(gp.GPhoto2Error(c), 'the capture failed')\n"
        "    print(type(e) is CameraLost, e.reason)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    claim, io, memory, full, unsupported = done.stdout.splitlines()
    assert claim.startswith("True the capture failed: could not claim the USB device: another")
    assert "gio mount -s gphoto2" in claim
    assert io == "True the capture failed: I/O problem (libgphoto2 -7)"
    assert memory.startswith("True ") and "(libgphoto2 -3)" in memory
    assert full == "False the capture failed: the camera's card is full"
    assert unsupported.startswith("False ") and "(libgphoto2 -6)" in unsupported


def test_without_python_gphoto2_a_one_line_reason(tmp_path):
    code = (
        "import sys; sys.modules['gphoto2'] = None\n"  # as if it were not installed
        "from nightstack.cli import main\n"
        f"sys.exit(main(['capture', {str(tmp_path)!r}, '--exposure', '1']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(
        "nightstack capture: capture needs python-gphoto2: pip install 'nightstack[capture]'"
    )
    assert len(done.stderr.strip().splitlines()) == 1


def test_watch_waits_for_a_camera_plugged_in_later_and_stacks_meanwhile(tmp_path, camera):
    """``nightstack watch`` with capture settings and no camera on USB (tests/_usb_plug.py:
    libgphoto2 finds no port until the test plugs the virtual camera in): one log line, the
    page says it waits; a frame copied into the folder meanwhile is stacked; once plugged in,
    the sequence starts by itself and its frames are stacked too."""
    from _usb_plug import plug, unplugged

    watch, out, ports = tmp_path / "incoming", tmp_path / "out", unplugged(tmp_path / "ports")
    watch.mkdir()
    out.mkdir()
    env = {
        **camera.env(),
        "NIGHTSTACK_EXTENSIONS": ".jpg",
        "NIGHTSTACK_CAPTURE_EXPOSURE_S": "0.1",
        "NIGHTSTACK_CAPTURE_COUNT": "2",
        "NIGHTSTACK_CAPTURE_INTERVAL_S": "0.5",
    }
    wrap = [sys.executable, "-m", "_usb_plug", str(ports), "--"]
    daemon = Daemon(watch, out, "--web", "127.0.0.1:0", env=env, wrap=wrap)
    feeder = None
    try:
        base = web_base(daemon)
        reason = "no camera at all on USB; waiting for the camera"
        wait_for(lambda: reason in daemon.text(), 30, "the wait's log line", daemon)
        status = get_json(base, "/api/capture")
        assert status["state"] == "reconnecting" and status["running"], status
        assert status["reason"] == "waiting for the camera: no camera at all on USB"
        (watch / "by-hand.jpg").write_bytes(star_jpeg(40))  # another program's frame
        wait_for(lambda: len(journal(out)) == 1, 60, "the frame stacked meanwhile", daemon)
        time.sleep(3.5)  # backoff 1 + 2 s: more attempts, still one line
        assert daemon.text().count("waiting for the camera") == 1
        camera.show(0)
        feeder = Feeder(camera, watch)  # a new sky after each frame
        feeder.start()
        plug(ports)
        wait_for(lambda: _state(base) == "done", 60, "the sequence, done", daemon)
        assert "the camera is here after" in daemon.text()
        wait_for(lambda: _all_stacked(out, watch), 60, "3 frames stacked", daemon)
    finally:
        assert daemon.stop() == 0
        if feeder is not None:
            feeder.close()
    assert [r["status"] for r in journal(out)] == ["accepted"] * 3
    (shots,) = [_journal(j) for j in (out / "capture").glob("*.jsonl")]
    assert [x["event"] for x in shots] == ["frame", "frame", "done"]


def test_bulb_press_hold_release_and_the_file_it_makes():
    """The bulb handshake (the virtual camera has no open capture: tests/_bulb_camera.py stands
    in for libgphoto2's camera object): 'bulb' 1, held the exposure, 0, then the FILE_ADDED;
    Canon's eosremoterelease the same; a stop ends the exposure early; a camera without bulb
    is refused above its longest timed speed. In a process of its own (gphoto2 is imported)."""
    code = """
import threading, time
from pathlib import Path
from _bulb_camera import BulbCamera
from nightstack.capture.camera import Camera, CaptureError, Detected
from nightstack.capture.sequence import Sequence
from nightstack.capture.status import Plan

for release, press, let_go in (("bulb", 1, 0), ("eosremoterelease", "Press Full", "Release Full")):
    stand_in = BulbCamera(release, readout_s=0.2)
    camera = Camera(stand_in, Detected("Test", "usb:001,002"))
    t0 = time.monotonic()
    found = camera.capture_bulb(1.0, threading.Event())
    (t1, n1, v1), (t2, n2, v2) = stand_in.writes
    print(release, found, n1 == n2 == release, v1 == press, v2 == let_go,
          round(t2 - t1, 2), round(time.monotonic() - t2, 2))

stand_in = BulbCamera("bulb")
stop = threading.Event()
threading.Timer(0.3, stop.set).start()
Camera(stand_in, Detected("Test", "usb:001,002")).capture_bulb(5.0, stop)
(t1, _, _), (t2, _, _) = stand_in.writes
print("stopped", round(t2 - t1, 2))

timed = BulbCamera("none", timed=("1/100", "1", "30"))
camera = Camera(timed, Detected("Test", "usb:001,002"))
sequence = Sequence(Plan(exposure_s=60), Path("."), Path("j.jsonl"))
try:
    sequence._apply_shutter(camera)
except CaptureError as err:
    print("refused", err.reason)
print("bulb", sequence._apply_shutter(Camera(BulbCamera("bulb", timed=("1", "30")),
                                              Detected("Test", "usb:001,002"))))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plain, canon, stopped, refused, bulb = done.stdout.splitlines()
    folder = "('/store_00010001/DCIM/100CANON', 'IMG_0001.CR3')"
    for line, release in ((plain, "bulb"), (canon, "eosremoterelease")):
        assert line.startswith(f"{release} {folder} True True True "), line
        held, readout = map(float, line.split()[-2:])
        assert abs(held - 1.0) < 0.15 and 0.15 < readout < 0.45, line  # the file after 0.2 s
    assert abs(float(stopped.split()[1]) - 0.3) < 0.15, stopped  # a 5 s exposure, stopped
    assert refused == (
        "refused an exposure of 60 s needs bulb, which this camera cannot do over USB: its "
        "longest timed speed is 30 s"
    )
    assert bulb == "bulb {'shutterspeed': 'bulb', 'bulb_s': 60}"


CLOSE_WATCH = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
int close(int fd) {
  static int (*real)(int);
  if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "close");
  int done = real(fd);
  if (done == -1 && errno == EBADF) dprintf(2, "closed twice: fd %d\n", fd);
  return done;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the close() watcher")
def test_a_download_closes_its_file_once(tmp_path, camera):
    """libgphoto2 owns the descriptor a CameraFile is made from and closes it when the file is
    freed; main closed it too, so each download closed a descriptor number twice, the second
    time possibly another thread's file (a 200-frame run lost its journal's descriptor that
    way). A close() that finds its descriptor closed already is reported by an LD_PRELOAD
    watcher: main reported one per frame."""
    (tmp_path / "watch.c").write_text(CLOSE_WATCH)
    library = tmp_path / "watch.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(library), str(tmp_path / "watch.c"), "-ldl"],
        check=True, timeout=60,
    )  # fmt: skip
    done = subprocess.run(
        [*NIGHTSTACK, "capture", str(tmp_path / "incoming"), "--count", "3", "--exposure",
         "0.01"],
        env={**camera.env(), "LD_PRELOAD": str(library)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "closed twice" not in done.stderr, done.stderr
    frames = _frames(tmp_path / "incoming")
    assert [p.stat().st_size for p in frames] == [FRAME_BYTES] * 3


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (the capture's reserve: MIN_FREE_BYTES); skips where mounting is not
    allowed (not root)."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True, timeout=60)


def test_a_full_watch_disk_stops_the_sequence_with_a_reason(tmp_path, camera, small_disk):
    """The watch folder's disk keeps the capture's reserve (64 MiB, or two frames): the frame
    that would eat into it is not taken, the sequence stops with the reason, nothing half
    written is left."""
    watch, journal = small_disk / "incoming", tmp_path / "capture.jsonl"
    done = _capture(
        camera, str(watch), "--count", "5", "--exposure", "0.01", "--journal", str(journal)
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nightstack capture: the watch folder's disk is full: "), last
    assert f"MiB free in {watch}" in last
    lines = _journal(journal)
    assert [x["event"] for x in lines] == ["frame", "failed"]  # 64 MiB free before frame 1 only
    assert [p.name for p in watch.iterdir()] == [lines[0]["file"]]
