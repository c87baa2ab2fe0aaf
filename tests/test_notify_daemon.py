"""``nightstack watch`` with notifications on, end to end: a small simulated night with three
cloudy frames in a row, to a real webhook and ntfy receiver (and a real mosquitto when
installed). Each event reaches its receiver within 2 s of its timestamp; the secrets are
nowhere on disk or in the log."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

from _daemon import Daemon, journal, tmpfs, wait_for
from _receivers import Received, Receiver, Subscriber, broker, mosquitto_binary
from _vcam import Feeder, VirtualCamera
from nightstack.simulate import simulate_night
from test_reliability import fill

pytestmark = pytest.mark.slow

SECRET = "hook-pa55word"
CLOUDY = (2, 3, 4)
LATENCY_S = 2.0


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    outdir = tmp_path_factory.mktemp("cloudy-night")
    simulate_night(outdir, frames=7, width=600, height=400, seed=42, cloudy=CLOUDY)
    return sorted(outdir.glob("*.DNG"))


def test_a_cloudy_night_notifies_open_rejections_and_close(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    hook, ntfy = Receiver(), Receiver()
    with contextlib.ExitStack() as stack:
        stack.callback(hook.close)
        stack.callback(ntfy.close)
        mqtt_port = None
        if mosquitto_binary() is not None:
            mqtt_port = stack.enter_context(broker(tmp_path / "broker")).port
        _night(frames, tmp_path, daemons, hook, ntfy, mqtt_port)


def _night(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon], hook: Receiver, ntfy: Receiver,
    mqtt_port: int | None,
) -> None:  # fmt: skip
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    env = {
        "NIGHTSTACK_NOTIFY_WEBHOOK_URL": hook.url("/hook", auth=f"nightstack:{SECRET}@"),
        "NIGHTSTACK_NOTIFY_NTFY_URL": ntfy.url("/observatory", auth=f"me:{SECRET}@"),
        "NIGHTSTACK_NOTIFY_REJECTED_IN_ROW": "3",
        "NIGHTSTACK_NOTIFY_PAGE_URL": "http://scope.lan:8080/",
        "NIGHTSTACK_IDLE_TIMEOUT_S": "3",
        "NIGHTSTACK_LOG_LEVEL": "DEBUG",
    }
    if mqtt_port is not None:
        env["NIGHTSTACK_NOTIFY_MQTT_URL"] = f"mqtt://me:{SECRET}@127.0.0.1:{mqtt_port}"
        env["NIGHTSTACK_NOTIFY_MQTT_TOPIC"] = "observatory"
    d = Daemon(watch, out, env=env)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    _feed(frames, watch, out, d)
    got = wait_for(lambda: _kinds(hook.wait(0, 0)).count("session_closed"), 30, "the close", d)
    assert got
    events = {g.json()["event"]: g for g in hook.wait(0, 0)}
    lines = journal(out)
    statuses = [line["status"] for line in lines]
    assert statuses == ["accepted", "accepted", "rejected", "rejected", "rejected", "accepted",
                        "accepted"], lines  # fmt: skip
    kinds = _kinds(hook.wait(0, 0))
    for kind in ("session_opened", "rejected_in_row", "frames_accepted_again", "session_closed"):
        assert kinds.count(kind) == 1, kinds
    assert kinds.index("session_opened") < kinds.index("rejected_in_row")
    assert kinds.index("rejected_in_row") < kinds.index("frames_accepted_again")
    for kind, got_at in events.items():  # each within 2 s of its event
        delay = got_at.at - got_at.json()["timestamp"]
        assert 0 <= delay < LATENCY_S, (kind, delay)

    session = lines[0]["session"]
    opened = events["session_opened"].json()
    assert opened["session"] == session and opened["data"]["first"] == frames[0].name
    row = events["rejected_in_row"].json()
    assert row["data"]["file"] == frames[CLOUDY[-1]].name and row["priority"] == 4
    assert row["data"]["reason"] == lines[CLOUDY[-1]]["reason"]
    closed = events["session_closed"].json()
    assert closed["data"]["accepted"] == 4 and closed["data"]["rejected"] == 3
    assert "4 frames stacked" in closed["message"] and closed["data"]["why"].startswith("idle")
    assert "stack.tif" in closed["data"]["files"] and closed["page"] == "http://scope.lan:8080/"
    assert closed["data"]["preview_url"] == (
        f"http://scope.lan:8080/api/sessions/{session}/preview.jpg"
    )

    # ntfy: the same events; the close with the session's preview attached
    at_ntfy = ntfy.wait(len(kinds), 5)
    titles = [g.headers["Title"] for g in at_ntfy]
    assert "3 frames rejected in a row" in titles and "Session closed" in titles
    attached = [g for g in at_ntfy if g.method == "PUT"]
    assert len(attached) == 1 and attached[0].headers["Filename"] == "preview.jpg"
    assert attached[0].body == (out / session / "preview.jpg").read_bytes()
    assert all(g.headers["Click"] == "http://scope.lan:8080/" for g in at_ntfy)

    if mqtt_port is not None:  # the retained state a phone (Home Assistant) reads
        sub = Subscriber(mqtt_port, ["observatory/#"])
        try:
            assert sub.wait(lambda s: "observatory/rejected" in s.last
                            and "observatory/accepted" in s.last)  # fmt: skip
            last = sub.last
        finally:
            sub.close()
        assert last["observatory/accepted"] == (b"4", True)
        assert last["observatory/rejected"] == (b"3", True)
        assert last["observatory/state"][0] == b"waiting"
        assert last["observatory/session"][0] in (session.encode(), b"None")

    assert d.stop() == 0
    assert SECRET not in d.text()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".txt", ".log"):
            assert SECRET not in path.read_text(errors="replace"), path
    meta = json.loads((out / session / "session.json").read_text())
    assert meta["state"] == "closed"


def _feed(frames: list[Path], watch: Path, out: Path, d: Daemon) -> None:
    """One frame at a time, as a camera writes them (a temporary name, then a rename), each
    journaled before the next: the order is the night's."""
    for n, frame in enumerate(frames):
        part = watch / (frame.name + ".part")
        shutil.copy(frame, part)
        part.rename(watch / frame.name)
        wait_for(lambda n=n: len(journal(out)) > n, 60, f"frame {n}", d)


def _kinds(got: list[Received]) -> list[str]:
    return [g.json()["event"] for g in got]


def test_seeing_and_haze_trends_are_said_once_each_way(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    clear, bad = 3, 4  # frames of a clear start, then worse seeing under haze, then clear
    n = clear + 2 * bad
    camera = tmp_path / "camera"
    simulate_night(
        camera, frames=n, width=600, height=400, seed=9,
        fwhm_schedule=[3.5] * clear + [4.9] * bad + [3.5] * bad,  # 1.4 x: not rejected (1.5)
        transparency=[1.0] * clear + [0.7] * bad + [1.0] * bad,  # not rejected (0.6)
    )  # fmt: skip
    hook = Receiver()
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    try:
        d = Daemon(watch, out, env={"NIGHTSTACK_NOTIFY_WEBHOOK_URL": hook.url()})
        daemons.append(d)
        wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
        _feed(sorted(camera.glob("*.DNG")), watch, out, d)
        assert d.stop() == 0
        got = hook.wait(0, 0)
    finally:
        hook.close()
    lines = journal(out)
    assert [line["status"] for line in lines] == ["accepted"] * n, lines
    bodies = [g.json() for g in got]
    kinds = [b["event"] for b in bodies]
    trend = [k for k in kinds if k.startswith(("fwhm", "transparency"))]
    assert sorted(trend) == ["fwhm_ok", "fwhm_warning", "transparency_ok", "transparency_warning"]
    assert trend.index("fwhm_warning") < trend.index("fwhm_ok")
    assert trend.index("transparency_warning") < trend.index("transparency_ok")
    for body, at in zip(bodies, (g.at for g in got), strict=True):
        assert at - body["timestamp"] < LATENCY_S, body
    warned = next(b for b in bodies if b["event"] == "fwhm_warning")
    assert 1.3 < warned["data"]["fwhm_px"] / lines[0]["fwhm"] < 1.5, warned
    hazy = next(b for b in bodies if b["event"] == "transparency_warning")
    assert hazy["data"]["transparency"] < 0.8
    assert kinds[0] == "session_opened" and kinds[-1] == "session_closed", kinds


def test_a_full_disk_is_told_once_and_so_is_its_end(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    hook = Receiver()
    with contextlib.ExitStack() as stack:
        stack.callback(hook.close)
        disk = stack.enter_context(tmpfs(tmp_path / "disk", 48))  # less than 2 GB: disk_low
        watch, out = tmp_path / "watch", disk / "out"
        watch.mkdir()
        d = Daemon(watch, out, log_dir=tmp_path,
                   env={"NIGHTSTACK_NOTIFY_WEBHOOK_URL": hook.url()})  # fmt: skip
        daemons.append(d)
        wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
        _feed(frames[:1], watch, out, d)
        filler = fill(disk)
        shutil.copy(frames[1], watch / frames[1].name)
        wait_for(lambda: "disk_full" in _kinds(hook.wait(0, 0)), 60, "the disk_full event", d)
        filler.unlink()  # space returns
        wait_for(lambda: len(journal(out)) >= 2, 90, "the deferred frame", d)
        wait_for(lambda: "disk_ok" in _kinds(hook.wait(0, 0)), 30, "the disk_ok event", d)
        assert d.stop() == 0
    got = hook.wait(0, 0)
    kinds = _kinds(got)
    assert kinds.count("disk_full") == 1 and kinds.count("disk_ok") == 1, kinds
    assert kinds.count("disk_low") == 1, kinds  # said once, not at every frame
    assert kinds.index("disk_low") < kinds.index("disk_full") < kinds.index("disk_ok")
    full = next(g.json() for g in got if g.json()["event"] == "disk_full")
    assert full["priority"] == 5 and frames[1].name in full["message"]
    assert full["data"]["reason"] == "No space left on device"
    # the recovery's log line is not sent a second time as an 'error'
    errors = [g.json()["message"] for g in got if g.json()["event"] == "error"]
    assert not any(line.startswith("disk full") for line in errors), errors
    for g in got:
        assert g.at - g.json()["timestamp"] < LATENCY_S, g.json()


def test_capture_events_from_the_daemons_camera(tmp_path: Path, daemons: list[Daemon]) -> None:
    """libgphoto2's virtual camera fails its third capture and is unplugged (tests/_usb_plug.py:
    its port driver taken out of libgphoto2's folder, so no reconnection finds it again): the
    camera is lost, then the sequence fails (``capture_reconnect_s``)."""
    import sys

    from _usb_plug import plug, unplugged

    camera = VirtualCamera(tmp_path / "vcamera")
    watch, out, ports = tmp_path / "incoming", tmp_path / "out", unplugged(tmp_path / "ports")
    watch.mkdir()
    plug(ports)
    hook = Receiver()
    feeder = Feeder(camera, watch, faults=(2,))  # no journal: the fault is never cured
    feeder.start()
    try:
        env = {
            **camera.env(), "NIGHTSTACK_EXTENSIONS": ".jpg", "NIGHTSTACK_CAPTURE_EXPOSURE_S": "0.1",
            "NIGHTSTACK_CAPTURE_COUNT": "5", "NIGHTSTACK_CAPTURE_INTERVAL_S": "2",
            "NIGHTSTACK_CAPTURE_RECONNECT_S": "3", "NIGHTSTACK_NOTIFY_WEBHOOK_URL": hook.url(),
        }  # fmt: skip
        wrap = [sys.executable, "-m", "_usb_plug", str(ports), "--"]
        d = Daemon(watch, out, env=env, wrap=wrap)
        daemons.append(d)
        wait_for(lambda: len(list(watch.glob("*.jpg"))) == 2, 60, "two frames", d)
        (ports / "vusb.so").unlink()  # unplugged, 2 s before the next exposure fails
        wait_for(lambda: "capture_failed" in _kinds(hook.wait(0, 0)), 60, "capture_failed", d)
        assert d.stop() == 0
    finally:
        feeder.close()
        hook.close()
    got = hook.wait(0, 0)
    kinds = _kinds(got)
    assert kinds.count("camera_lost") == 1 and kinds.index("camera_lost") < kinds.index(
        "capture_failed"
    ), kinds
    lost = next(g.json() for g in got if g.json()["event"] == "camera_lost")
    assert lost["data"]["frame"] == 2 and lost["priority"] == 4
    for g in got:
        assert g.at - g.json()["timestamp"] < LATENCY_S, g.json()
