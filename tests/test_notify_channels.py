"""Notifications against real local receivers: ntfy- and webhook-like HTTP servers, a real
mosquitto broker (anonymous, and TLS with a password file), receivers that never answer and
closed ports. Each delivery is timed from the event to its receipt (at most 2 s)."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _receivers import Receiver, Silent, Subscriber, broker, free_port, mosquitto_binary
from nightstack.capture.status import CaptureStatus
from nightstack.config import Settings, describe, redacted
from nightstack.service import channels as channels_module
from nightstack.service.alerts import Alerts, ErrorForwarder
from nightstack.service.channels import Channels, Event, discovery_configs, node_name, where

SECRET = "s3cret-Pa55"
LATENCY_S = 2.0

needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None,
    reason="mosquitto is not installed (Debian package 'mosquitto'; deploy/dev.sh test "
    "installs it)",
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _settings(**values: object) -> Settings:
    return Settings(notify_timeout_s=1.0, **values)  # type: ignore[arg-type]


def test_ntfy_gets_title_priority_tags_click_auth_and_the_preview(
    receiver: Receiver, tmp_path: Path
) -> None:
    preview = tmp_path / "preview.jpg"
    preview.write_bytes(b"\xff\xd8jpeg bytes\xff\xd9")
    url = receiver.url("/night-topic", auth=f"me:{SECRET}@")
    ch = Channels.from_settings(_settings(notify_ntfy_url=url, notify_page_url="http://pi.lan/"))
    try:
        plain = Event("rejected_in_row", "5 frames rejected", "clouds?", priority=4,
                      tags=("cloud",), session="s1")  # fmt: skip
        ch.event(plain)
        closed = Event("session_closed", "Séance fermée", "120 frames stacked.",
                       tags=("white_check_mark",), attachment=preview)  # fmt: skip
        ch.event(closed)
        got = receiver.wait(2)
    finally:
        ch.close(5)
    assert len(got) == 2
    first, second = got
    assert (first.method, first.path, first.body) == ("POST", "/night-topic", b"clouds?")
    assert first.headers["Title"] == "5 frames rejected"
    assert first.headers["Priority"] == "4" and first.headers["Tags"] == "cloud"
    assert first.headers["Click"] == "http://pi.lan/"
    expected = "Basic " + base64.b64encode(f"me:{SECRET}".encode()).decode()
    assert first.headers["Authorization"] == expected
    assert first.at - plain.time < LATENCY_S
    # the preview attached: PUT, its name, the text in Message; a non-ASCII title in RFC 2047
    assert (second.method, second.body) == ("PUT", preview.read_bytes())
    assert second.headers["Filename"] == "preview.jpg"
    assert second.headers["Message"] == "120 frames stacked."
    title = second.headers["Title"]
    assert title.startswith("=?UTF-8?B?")
    assert base64.b64decode(title[10:-2]).decode() == "Séance fermée"


def test_ntfy_without_attachments_gets_the_text(receiver: Receiver, tmp_path: Path) -> None:
    receiver.refuse["PUT"] = 400  # a server with no attachment cache refuses attachments
    preview = tmp_path / "preview.jpg"
    preview.write_bytes(b"jpeg")
    ch = Channels.from_settings(_settings(notify_ntfy_url=receiver.url("/t")))
    try:
        ch.event(Event("session_closed", "Session closed", "done.", attachment=preview))
        got = receiver.wait(1)
    finally:
        ch.close(5)
    assert [(g.method, g.body) for g in got] == [("POST", b"done.")]


def test_webhook_gets_the_event_as_json(receiver: Receiver) -> None:
    ch = Channels.from_settings(
        _settings(notify_webhook_url=receiver.url(), notify_page_url="http://pi.lan:8080/")
    )
    try:
        event = Event("session_opened", "Session opened", "on IMG_0001.DNG", session="20261206",
                      data={"first": "IMG_0001.DNG"})  # fmt: skip
        ch.event(event)
        got = receiver.wait(1)
    finally:
        ch.close(5)
    assert len(got) == 1 and got[0].headers["Content-Type"] == "application/json"
    body = got[0].json()
    assert body["event"] == "session_opened" and body["title"] == "Session opened"
    assert body["message"] == "on IMG_0001.DNG" and body["session"] == "20261206"
    assert body["data"] == {"first": "IMG_0001.DNG"} and body["page"] == "http://pi.lan:8080/"
    assert body["time"].endswith("Z") and abs(body["timestamp"] - event.time) < 1e-3
    assert got[0].at - event.time < LATENCY_S


def test_a_receiver_that_comes_back_gets_the_event_after_a_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens yet: refused
    ch = Channels.from_settings(
        _settings(notify_webhook_url=f"http://u:{SECRET}@127.0.0.1:{port}/hook")
    )
    try:
        with caplog.at_level(logging.INFO, logger="nightstack"):
            ch.event(Event("error", "nightstack error", "first"))
            ch.event(Event("error", "nightstack error", "second"))
            time.sleep(0.5)
            later = Receiver(port=port)
            try:
                got = later.wait(2, timeout=10)
            finally:
                later.close()
    finally:
        ch.close(5)
    assert [g.json()["message"] for g in got] == ["first", "second"]  # kept, in order
    lines = [r.getMessage() for r in caplog.records if r.name == "nightstack.notify"]
    assert sum("cannot deliver" in line for line in lines) == 1, lines  # said once
    assert any("delivering again" in line for line in lines), lines
    assert all(SECRET not in line for line in caplog.text.splitlines())
    assert f"http://127.0.0.1:{port}" in caplog.text


def test_dead_receivers_hold_up_neither_the_caller_nor_the_live_channel(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    silent = Silent()  # ntfy: accepts and never answers
    closed = free_port()  # MQTT: nothing listens
    settings = _settings(
        notify_ntfy_url=f"http://me:{SECRET}@127.0.0.1:{silent.port}/topic",
        notify_mqtt_url=f"mqtt://me:{SECRET}@127.0.0.1:{closed}",
        notify_webhook_url=receiver.url(),
    )
    try:
        with caplog.at_level(logging.INFO, logger="nightstack"):
            ch = Channels.from_settings(settings)
            assert len(ch.senders) == 3
            calls, events = [], []
            for n in range(6):
                event = Event("frame", f"event {n}", "x")
                start = time.perf_counter()
                ch.event(event)
                ch.state({"queue": n, "fwhm": 3.1})
                calls.append(time.perf_counter() - start)
                events.append(event)
                got = receiver.wait(n + 1, timeout=LATENCY_S)
                assert len(got) == n + 1, f"event {n} not at the live webhook in {LATENCY_S} s"
                assert got[n].at - event.time < LATENCY_S
                time.sleep(0.2)
            start = time.monotonic()
            ch.close(3)
            assert time.monotonic() - start < 4  # bounded, whatever the dead receivers do
    finally:
        silent.close()
    # the caller (the worker loop) never waits: a call that blocked on the silent receiver
    # would take its timeout (seconds); the cost itself is the notify benchmark's (~40 us)
    assert max(calls) < 0.2, calls
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("ntfy http://127.0.0.1" in w and "no answer" in w for w in warnings) == 1, warnings
    assert sum(w.startswith("MQTT mqtt://127.0.0.1") and "cannot" in w for w in warnings) == 1, (
        warnings
    )
    assert SECRET not in caplog.text


def test_secret_urls_are_not_in_session_json_nor_the_log_form() -> None:
    settings = _settings(
        notify_ntfy_url=f"https://me:{SECRET}@ntfy.example/topic",
        notify_mqtt_url=f"mqtts://me:{SECRET}@broker.lan:8883",
        notify_webhook_url=f"https://hooks.example/{SECRET}",
    )
    assert SECRET not in json.dumps(redacted(settings))  # what session.json and the page get
    assert SECRET not in describe(settings)  # nightstack config show
    assert where(settings.notify_webhook_url or "") == "https://hooks.example"
    assert where(settings.notify_mqtt_url or "") == "mqtts://broker.lan:8883"


def test_a_bad_url_is_refused_without_echoing_it() -> None:
    from nightstack.config import load_settings
    from nightstack.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_settings(None, {"notify_mqtt_url": f"http://me:{SECRET}@broker"})
    assert "notify_mqtt_url" in str(err.value) and SECRET not in str(err.value)


@needs_mosquitto
def test_mqtt_state_events_and_home_assistant_discovery(tmp_path: Path) -> None:
    with broker(tmp_path / "broker") as b:
        settings = _settings(notify_mqtt_url=f"mqtt://127.0.0.1:{b.port}",
                             notify_mqtt_topic="nightstack/test")  # fmt: skip
        ch = Channels.from_settings(settings)
        try:
            ch.state({"state": "stacking", "accepted": 12, "rejected": 3, "fwhm": 3.2341,
                      "background": 1021.5, "transparency": 97.5, "queue": 0,
                      "free_disk": 41.25, "camera": "off", "session": "s1"})  # fmt: skip
            live = Subscriber(b.port, ["nightstack/test/#"])
            assert live.wait(lambda s: "nightstack/test/fwhm" in s.last)
            event = Event("rejected_in_row", "5 rejected", "clouds", priority=4)
            ch.event(event)
            assert live.wait(lambda s: "nightstack/test/event" in s.last)
            payload, retained = live.last["nightstack/test/event"]
            received = next(t for topic, _, t in live.messages if topic.endswith("/event"))
            live.close()
            assert not retained and json.loads(payload)["event"] == "rejected_in_row"
            assert received - event.time < LATENCY_S
            # a late subscriber (Home Assistant starting) gets the state and configs retained
            late = Subscriber(b.port, ["nightstack/test/#", "homeassistant/#"])
            node = node_name()
            topics = list(discovery_configs("nightstack/test", node))
            assert late.wait(lambda s: all(t in s.last for t in topics))
            assert late.wait(lambda s: "nightstack/test/camera" in s.last)
            last = late.last
            late.close()
        finally:
            ch.close(5)
    assert last["nightstack/test/state"] == (b"stacking", True)
    assert last["nightstack/test/accepted"] == (b"12", True)
    assert last["nightstack/test/fwhm"] == (b"3.234", True)
    assert last["nightstack/test/free_disk"] == (b"41.25", True)
    assert last["nightstack/test/availability"] == (b"online", True)
    fwhm = json.loads(last[f"homeassistant/sensor/{node}/fwhm/config"][0])
    assert fwhm["state_topic"] == "nightstack/test/fwhm"
    assert fwhm["unit_of_measurement"] == "px" and fwhm["state_class"] == "measurement"
    assert fwhm["availability_topic"] == "nightstack/test/availability"
    assert fwhm["unique_id"] == f"nightstack_{node}_fwhm"
    assert fwhm["device"]["identifiers"] == [f"nightstack_{node}"]
    assert "nightstack/test/event" not in last  # events are not retained


@needs_mosquitto
def test_a_broker_that_starts_late_gets_the_events_and_the_state(tmp_path: Path) -> None:
    port = free_port()  # nothing listens yet
    settings = _settings(notify_mqtt_url=f"mqtt://127.0.0.1:{port}", notify_mqtt_topic="late")
    ch = Channels.from_settings(settings)
    try:
        ch.event(Event("session_opened", "Session opened", "before the broker"))
        for n in range(20):  # frames go on meanwhile: the state is kept, the event waits
            ch.state({"accepted": n})
            time.sleep(0.05)
        with broker(tmp_path / "broker", port=port):
            watch = Subscriber(port, ["late/#"])
            try:
                assert watch.wait(lambda s: "late/event" in s.last, timeout=15)
                assert watch.wait(lambda s: s.last.get("late/accepted", (b"",))[0] == b"19")
                last = watch.last
            finally:
                watch.close()
    finally:
        ch.close(3)
    assert json.loads(last["late/event"][0])["message"] == "before the broker"
    assert last["late/availability"][0] == b"online"


@needs_mosquitto
def test_mqtts_with_a_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with broker(tmp_path / "broker", tls=True, user="scope", password=SECRET) as b:
        url = f"mqtts://scope:{SECRET}@127.0.0.1:{b.tls_port}"
        wrong = f"mqtts://scope:not-{SECRET}@127.0.0.1:{b.tls_port}"
        watch = Subscriber(b.port, ["tls/#"])  # the anonymous listener shares the topics
        with caplog.at_level(logging.INFO, logger="nightstack"):
            good = Channels.from_settings(
                _settings(notify_mqtt_url=url, notify_mqtt_topic="tls/good", notify_mqtt_ca=b.ca)
            )
            bad = Channels.from_settings(
                _settings(notify_mqtt_url=wrong, notify_mqtt_topic="tls/bad", notify_mqtt_ca=b.ca)
            )
            try:
                good.state({"state": "waiting"})
                bad.state({"state": "waiting"})
                event = Event("session_opened", "Session opened", "over TLS")
                good.event(event)
                bad.event(event)
                assert watch.wait(lambda s: "tls/good/event" in s.last)
                time.sleep(0.5)
            finally:
                good.close(3)
                bad.close(3)
        last = watch.last
        watch.close()
    assert last["tls/good/state"] == (b"waiting", False)
    assert not any(topic.startswith("tls/bad") for topic in last)  # refused by the broker
    refused = [r.getMessage() for r in caplog.records if "tls/bad" not in r.getMessage()]
    assert any("MQTT mqtts://127.0.0.1" in line and "refused" in line for line in refused)
    assert SECRET not in caplog.text


def test_a_full_queue_drops_the_oldest() -> None:
    silent = Silent()
    ch = Channels.from_settings(_settings(notify_webhook_url=f"http://127.0.0.1:{silent.port}/"))
    try:
        sender = ch.senders[0]
        for n in range(channels_module.QUEUE_MAX + 10):
            ch.event(Event("frame", "x", str(n)))
        assert sender.dropped >= 9
    finally:
        ch.close(2)
        silent.close()


def _alerts(receiver: Receiver, **values: object) -> Alerts:
    return Alerts.start(_settings(notify_webhook_url=receiver.url(), **values), None)


def test_capture_events_camera_lost_back_and_done(receiver: Receiver) -> None:
    alerts = _alerts(receiver)
    try:
        for status in (
            CaptureStatus("exposing", frame=3, count=10),
            CaptureStatus("exposing", frame=4, count=10),  # no change of state: nothing
            CaptureStatus("reconnecting", frame=4, count=10, reason="USB: no camera"),
            CaptureStatus("exposing", frame=5, count=10),
            CaptureStatus("done", frame=10, count=10),
        ):
            alerts.capture(status)
        got = receiver.wait(3)
    finally:
        alerts.close()
    bodies = [g.json() for g in got]
    assert [b["event"] for b in bodies] == ["camera_lost", "camera_back", "capture_done"]
    assert "USB: no camera" in bodies[0]["message"] and bodies[0]["priority"] == 4
    assert bodies[2]["data"]["frame"] == 10


def test_errors_are_forwarded_and_rate_limited(receiver: Receiver) -> None:
    alerts = _alerts(receiver, notify_min_interval_s=0.5)
    forwarder = ErrorForwarder(alerts)
    logger = logging.getLogger("nightstack")
    logger.addHandler(forwarder)
    try:
        logger.error("preview not written: %s", "No space left on device")
        logger.error("a second error at once: held back")
        logger.warning("a warning: not an event")
        logging.getLogger("nightstack.notify").error("the notifier's own: never forwarded")
        logger.error("disk full: IMG_0001.DNG not stacked", extra={"ALERT": "disk_full"})
        time.sleep(0.6)
        logger.error("a third, after the interval")
        got = receiver.wait(2)
        time.sleep(0.2)
        got = receiver.wait(3, 0)
    finally:
        logger.removeHandler(forwarder)
        alerts.close()
    bodies = [g.json() for g in got]
    assert [b["message"] for b in bodies] == [
        "preview not written: No space left on device", "a third, after the interval"
    ]
    assert bodies[1]["data"] == {"suppressed": 1}
