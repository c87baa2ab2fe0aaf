"""Where notifications go: ntfy, MQTT (retained state, events, Home Assistant discovery) and a
webhook. The event rules are in ``alerts.py``; ``notify.py`` is systemd's sd_notify, not this.

Each configured channel has a :class:`Sender`: a bounded queue of events (the oldest dropped when
full) and the latest state (replaced, never queued), delivered by one background thread per
channel. The worker loop only appends to a queue under a lock: it never waits on a receiver,
and a receiver that hangs holds up only its own channel, not the others (one shared thread
would make a dead ntfy server delay the webhook by a timeout per event). A delivery that fails
for a reason that may pass (refused, timed out, a 5xx) keeps its event and is tried again after
a back-off (2 s doubling to 5 min); the first failure is logged once (warning), the recovery
once (info). An event a receiver refuses for good (a 4xx) is dropped, said once.

URLs may hold credentials (``user:password@``, ntfy's ``:token@``): they are secrets
(``config.SECRET_SETTINGS``) and a URL appears in the log only as :func:`where` gives it,
scheme, host and port.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from nightstack.config import Settings

log = logging.getLogger("nightstack.notify")

QUEUE_MAX = 64
"""Events waiting per channel; past this the oldest is dropped (a receiver down all night)."""
BACKOFF_MIN_S = 2.0
BACKOFF_MAX_S = 300.0
ATTACH_MAX_BYTES = 4 << 20
"""The largest preview attached to an ntfy message (a preview JPEG is ~0.3 MB)."""


@dataclass(frozen=True)
class Event:
    """One notification. ``priority`` is ntfy's 1 (min) to 5 (urgent); ``tags`` ntfy's emoji
    short codes; ``time`` Unix seconds of the event; ``attachment`` a file to attach (ntfy)."""

    kind: str
    title: str
    message: str
    priority: int = 3
    tags: tuple[str, ...] = ()
    session: str | None = None
    time: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)
    attachment: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The webhook's body and the MQTT event payload."""
        when = datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds")
        return {
            "event": self.kind,
            "title": self.title,
            "message": self.message,
            "priority": self.priority,
            "tags": list(self.tags),
            "session": self.session,
            "time": when.replace("+00:00", "Z"),
            "timestamp": round(self.time, 3),
            "data": self.data,
        }


class Refused(Exception):
    """The receiver refused this event for good (an HTTP 4xx): drop it, do not retry."""


class Down(ConnectionError):
    """Not connected, as the channel has logged already: retry, without a second line."""


def where(url: str) -> str:
    """``url`` without credentials, path or query: what the log may show."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def _split_credentials(url: str) -> tuple[str, str | None]:
    """The URL without ``user:password@`` and a Basic ``Authorization`` header for them."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    plain = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return plain, "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _header(text: str) -> str:
    """A header value: as is when ASCII, else RFC 2047 (ntfy decodes it)."""
    flat = " ".join(text.split())
    if flat.isascii():
        return flat
    return "=?UTF-8?B?" + base64.b64encode(flat.encode()).decode("ascii") + "?="


class Channel:
    """One receiver. :meth:`send` raises :class:`Refused` (drop) or another exception (retry)."""

    name = "channel"

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url, timeout_s

    def send(self, event: Event) -> None:
        raise NotImplementedError

    def state(self, values: dict[str, Any]) -> None:
        """The daemon's latest state (only MQTT keeps one)."""

    def close(self) -> None:
        """Release the connection (the sender's thread has stopped)."""

    def describe(self) -> str:
        return f"{self.name} {where(self.url)}"


class _Http(Channel):
    """A channel that POSTs (or PUTs) to an HTTP(S) URL, credentials as Basic auth."""

    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__(url, timeout_s)
        self.target, self.auth = _split_credentials(url)

    def request(self, body: bytes, headers: dict[str, str], method: str = "POST") -> None:
        if self.auth is not None:
            headers = {**headers, "Authorization": self.auth}
        req = urllib.request.Request(self.target, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as answer:
                answer.read(65536)
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500 and err.code not in (408, 429):
                raise Refused(f"HTTP {err.code} {err.reason}") from None
            raise OSError(f"HTTP {err.code} {err.reason}") from None


class Ntfy(_Http):
    """ntfy (https://ntfy.sh or self-hosted): POST to server/topic with Title, Priority, Tags,
    Click; with a preview, PUT the JPEG with ``Filename`` and the text in ``Message`` (a
    server without attachments refuses it: text only from then on)."""

    name = "ntfy"

    def __init__(self, url: str, timeout_s: float, click: str | None) -> None:
        super().__init__(url, timeout_s)
        self.click = click
        self.attach = True

    def send(self, event: Event) -> None:
        headers = {
            "Title": _header(event.title),
            "Priority": str(min(5, max(1, event.priority))),
        }
        if event.tags:
            headers["Tags"] = ",".join(event.tags)
        if self.click:
            headers["Click"] = self.click
        picture = self._attachment(event)
        if picture is not None:
            try:
                self.request(
                    picture,
                    {**headers, "Filename": event.attachment.name,  # type: ignore[union-attr]
                     "Message": _header(event.message)},
                    method="PUT",
                )  # fmt: skip
                return
            except Refused as err:
                self.attach = False
                log.warning("ntfy: the server refuses attachments (%s): text only from now", err)
        self.request(event.message.encode(), headers)

    def _attachment(self, event: Event) -> bytes | None:
        path = event.attachment
        if not self.attach or path is None:
            return None
        try:
            if path.stat().st_size > ATTACH_MAX_BYTES:
                return None
            return path.read_bytes()
        except OSError:
            return None


class Webhook(_Http):
    """A generic webhook: the event as a JSON POST (:meth:`Event.to_json`, plus ``page``)."""

    name = "webhook"

    def __init__(self, url: str, timeout_s: float, page: str | None) -> None:
        super().__init__(url, timeout_s)
        self.page = page

    def send(self, event: Event) -> None:
        body = {**event.to_json(), "page": self.page}
        self.request(json.dumps(body).encode(), {"Content-Type": "application/json"})


SENSORS: tuple[tuple[str, str, str | None, str], ...] = (
    # (object, name, unit, icon); a unit makes it a numeric sensor with a history graph
    ("state", "State", None, "mdi:telescope"),
    ("session", "Session", None, "mdi:folder-star"),
    ("accepted", "Frames accepted", "frames", "mdi:check-circle"),
    ("rejected", "Frames rejected", "frames", "mdi:close-circle"),
    ("fwhm", "FWHM", "px", "mdi:blur"),
    ("background", "Sky background", "ADU", "mdi:weather-night"),
    ("transparency", "Transparency", "%", "mdi:weather-fog"),
    ("queue", "Queue", "frames", "mdi:tray-full"),
    ("free_disk", "Free disk", "GB", "mdi:harddisk"),
    ("camera", "Camera", None, "mdi:camera"),
)
"""The retained state topics ``<prefix>/<object>`` and their Home Assistant sensors."""


class Mqtt(Channel):
    """MQTT through paho-mqtt: retained ``<prefix>/<object>`` state topics (:data:`SENSORS`),
    events as JSON on ``<prefix>/event``, ``<prefix>/availability`` online/offline (the will),
    and Home Assistant discovery configs ``homeassistant/sensor/<node>/<object>/config``.
    paho's own thread keeps the connection and reconnects; on each connect the configs and the
    whole state are published again."""

    name = "MQTT"

    def __init__(
        self, url: str, timeout_s: float, prefix: str, node: str, *,
        discovery: bool = True, ca: Path | None = None,
    ) -> None:  # fmt: skip
        import paho.mqtt.client as mqtt

        super().__init__(url, timeout_s)
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.prefix, self.node, self.discovery = prefix.rstrip("/"), node, discovery
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}
        self._sent: dict[str, str] = {}
        self._connected = threading.Event()
        self._down_said = False
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"nightstack-{node}-{id(self):x}"
        )
        if parts.username is not None:
            password = unquote(parts.password) if parts.password is not None else None
            client.username_pw_set(unquote(parts.username), password)
        if parts.scheme == "mqtts":
            client.tls_set(ca_certs=str(ca) if ca is not None else None)
        client.will_set(f"{self.prefix}/availability", "offline", qos=1, retain=True)
        client.reconnect_delay_set(1, 120)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.max_queued_messages_set(1000)
        client.connect_timeout = timeout_s
        self.client = client
        client.connect_async(self.host, self.port, keepalive=60)
        client.loop_start()

    def describe(self) -> str:
        return f"MQTT {where(self.url)} topic {self.prefix}"

    def send(self, event: Event) -> None:
        if not self._connected.is_set():
            raise Down("not connected to the broker")
        self.client.publish(f"{self.prefix}/event", json.dumps(event.to_json()), qos=1)

    def state(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._values.update({k: _payload(v) for k, v in values.items()})
            if self._connected.is_set():
                self._publish_state()

    def _publish_state(self) -> None:
        """Lock held: publish the values that changed since the last publish (retained)."""
        for key, value in self._values.items():
            if self._sent.get(key) != value:
                self.client.publish(f"{self.prefix}/{key}", value, qos=1, retain=True)
                self._sent[key] = value

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._down(f"refused: {reason}")
            return
        client.publish(f"{self.prefix}/availability", "online", qos=1, retain=True)
        if self.discovery:
            for topic, config in discovery_configs(self.prefix, self.node).items():
                client.publish(topic, json.dumps(config), qos=1, retain=True)
        with self._lock:
            self._sent.clear()
            self._publish_state()
            self._connected.set()
        if self._down_said:
            log.info("MQTT %s: connected again", where(self.url))
        self._down_said = False

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()
        if reason.is_failure:
            self._down(f"disconnected: {reason}")

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._down("cannot connect")

    def _down(self, why: str) -> None:
        self._connected.clear()
        if not self._down_said:
            self._down_said = True
            log.warning("MQTT %s: %s; paho keeps reconnecting", where(self.url), why)

    def close(self) -> None:
        if self._connected.is_set():
            info = self.client.publish(f"{self.prefix}/availability", "offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                info.wait_for_publish(min(self.timeout_s, 2.0))
        self.client.disconnect()
        self.client.loop_stop()


def _payload(value: Any) -> str:
    """An MQTT state payload: numbers as text, None as 'None' (Home Assistant: unknown)."""
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def discovery_configs(prefix: str, node: str) -> dict[str, dict[str, Any]]:
    """Home Assistant MQTT discovery: one sensor config per state topic, one device."""
    device = {
        "identifiers": [f"nightstack_{node}"],
        "name": f"nightstack {node}",
        "manufacturer": "nightstack",
        "model": "live stacker",
    }
    configs = {}
    for obj, name, unit, icon in SENSORS:
        config: dict[str, Any] = {
            "name": name,
            "unique_id": f"nightstack_{node}_{obj}",
            "state_topic": f"{prefix}/{obj}",
            "availability_topic": f"{prefix}/availability",
            "icon": icon,
            "device": device,
        }
        if unit is not None:
            config["unit_of_measurement"] = unit
            config["state_class"] = "measurement"
        configs[f"homeassistant/sensor/{node}/{obj}/config"] = config
    return configs


class Sender:
    """One channel's queue and thread (see the module's docstring)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._cond = threading.Condition()
        self._events: deque[Event] = deque()
        self._state: dict[str, Any] | None = None
        self._stopping = False
        self.dropped = 0
        self.sent = 0
        self._failing = False
        self._backoff = 0.0
        self._retry_at = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"nightstack-notify-{channel.name.lower()}", daemon=True
        )
        self._thread.start()

    def put(self, event: Event) -> None:
        """Any thread; never waits on the receiver."""
        with self._cond:
            if len(self._events) >= QUEUE_MAX:
                self._events.popleft()
                self.dropped += 1
            self._events.append(event)
            self._cond.notify()

    def put_state(self, values: dict[str, Any]) -> None:
        with self._cond:
            self._state = values if self._state is None else {**self._state, **values}
            self._cond.notify()

    def _next(self) -> tuple[Event | None, dict[str, Any] | None] | None:
        """Lock held: wait for work (None: stopping); the event stays queued until sent."""
        while True:
            if self._stopping and not (self._events or self._state):
                return None
            wait = self._retry_at - time.monotonic()
            if self._events and wait <= 0:
                state, self._state = self._state, None
                return self._events[0], state
            if self._state is not None:  # the state is kept, not sent (MQTT): never held back
                state, self._state = self._state, None
                return None, state
            if self._stopping and self._events:
                return None  # a receiver down at shutdown: do not wait out the back-off
            self._cond.wait(wait if self._events else None)

    def _run(self) -> None:
        while True:
            with self._cond:
                work = self._next()
                if work is None:
                    return
            event, state = work
            try:
                if state is not None:
                    self.channel.state(state)
                if event is not None:
                    self.channel.send(event)
            except Refused as err:
                log.warning("%s: %s refused (%s), dropped", self.channel.describe(),
                            event.kind if event else "state", err)  # fmt: skip
                self._done(event)
            except Exception as err:  # anything else may pass: keep the event, back off
                self._failed(err)
            else:
                self._done(event)
                if event is not None:  # a state kept is no sign the receiver is back
                    if self._failing:
                        log.info("%s: delivering again", self.channel.describe())
                    self._failing, self._backoff = False, 0.0

    def _done(self, event: Event | None) -> None:
        with self._cond:
            if event is not None and self._events and self._events[0] is event:
                self._events.popleft()
                self.sent += 1

    def _failed(self, err: Exception) -> None:
        self._backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self._backoff * 2))
        with self._cond:
            self._retry_at = time.monotonic() + self._backoff
        if not self._failing:
            self._failing = True
            if isinstance(err, Down):
                return
            reason = str(err) or type(err).__name__
            if isinstance(err, TimeoutError | socket.timeout):
                reason = f"no answer in {self.channel.timeout_s:g} s"
            elif isinstance(err, urllib.error.URLError):
                reason = str(err.reason)
            log.warning("%s: cannot deliver (%s); trying again with back-off",
                        self.channel.describe(), reason)  # fmt: skip

    def close(self, wait_s: float) -> None:
        """Deliver what is queued for at most ``wait_s`` seconds, then stop."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._events:
            log.warning("%s: %d event(s) not delivered before stopping",
                        self.channel.describe(), len(self._events))  # fmt: skip
        if not self._thread.is_alive():
            self.channel.close()


class Channels:
    """The configured channels; empty (every call a no-op) when none is set."""

    def __init__(self, senders: list[Sender]) -> None:
        self.senders = senders

    @classmethod
    def from_settings(cls, settings: Settings) -> Channels:
        """Start a sender per configured channel; one that cannot start is logged, skipped."""
        timeout = settings.notify_timeout_s
        page = settings.notify_page_url
        makers: list[tuple[str | None, Any]] = [
            (settings.notify_ntfy_url, lambda url: Ntfy(url, timeout, page)),
            (settings.notify_mqtt_url, lambda url: _mqtt(settings, url)),
            (settings.notify_webhook_url, lambda url: Webhook(url, timeout, page)),
        ]
        senders = []
        for url, make in makers:
            if not url:
                continue
            try:
                senders.append(Sender(make(url)))
            except (ImportError, OSError, ValueError, ssl.SSLError) as err:
                log.error("notifications to %s not started: %s", where(url), err)
        if senders:
            log.info("notifications: %s", ", ".join(s.channel.describe() for s in senders))
        return cls(senders)

    def event(self, event: Event) -> None:
        for sender in self.senders:
            sender.put(event)

    def state(self, values: dict[str, Any]) -> None:
        for sender in self.senders:
            if isinstance(sender.channel, Mqtt):
                sender.put_state(values)

    def close(self, wait_s: float) -> None:
        """Stop every sender, all together within ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        for sender in self.senders:
            sender.close(max(0.0, deadline - time.monotonic()))


def node_name(hostname: str | None = None) -> str:
    """The host's name as an MQTT topic level and Home Assistant node id ([a-z0-9_-])."""
    name = (hostname or socket.gethostname()).split(".")[0].lower()
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name) or "nightstack"


def _mqtt(settings: Settings, url: str) -> Mqtt:
    node = node_name()
    prefix = settings.notify_mqtt_topic or f"nightstack/{node}"
    return Mqtt(
        url, settings.notify_timeout_s, prefix, node,
        discovery=settings.notify_mqtt_discovery, ca=settings.notify_mqtt_ca,
    )  # fmt: skip
