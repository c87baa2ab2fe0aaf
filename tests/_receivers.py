"""Real local receivers for the notification tests and benchmark: an HTTP server that records
what it is sent (ntfy, webhook), receivers that never answer or refuse, a mosquitto broker
started on a free loopback port (optionally with TLS and a password file) and a paho
subscriber that records what the broker delivers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when the request was complete

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 recording each request; ``refuse`` maps a method to the
    status it answers (e.g. ``{"PUT": 400}``: an ntfy server without attachments)."""

    port: int = 0
    refuse: dict[str, int] = field(default_factory=dict)
    got: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                item = Received(
                    self.command, self.path, dict(self.headers.items()), body, time.time()
                )
                status = receiver.refuse.get(self.command, 200)
                if status == 200:  # recorded before the answer: the sender's next request,
                    with receiver._cond:  # on another connection and thread, comes after it
                        receiver.got.append(item)
                        receiver._cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_POST = do_PUT = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", auth: str = "") -> str:
        return f"http://{auth}127.0.0.1:{self.port}{path}"

    def wait(self, count: int, timeout: float = 5.0) -> list[Received]:
        """At least ``count`` requests, waiting at most ``timeout`` s (else what came)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.got) >= count, timeout)
            return list(self.got)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Silent:
    """A receiver that accepts connections (the kernel's backlog) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def mosquitto_binary() -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return shutil.which("mosquitto", path=path)


@dataclass
class Broker:
    """mosquitto on loopback: ``port`` anonymous; ``tls_port`` (when made with ``tls``) TLS with
    the password file's user only. ``ca`` is the CA file the clients trust."""

    port: int
    tls_port: int | None
    ca: Path | None
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 / localhost signed by it (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    ca_key, ca, key, csr, cert = (folder / n for n in names)
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=nightstack test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


@contextlib.contextmanager
def broker(
    folder: Path, *, tls: bool = False, user: str = "", password: str = "", port: int = 0
) -> Iterator[Broker]:
    """A mosquitto started for the test (see :class:`Broker`) on ``port`` (0: a free one),
    stopped after it."""
    binary = mosquitto_binary()
    assert binary is not None
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    lines = ["per_listener_settings true", "user root", f"listener {port} 127.0.0.1",
             "allow_anonymous true"]  # fmt: skip
    tls_port, ca = None, None
    if tls:
        ca, cert, key = make_certs(folder / "certs")
        passwords = folder / "passwords"
        subprocess.run(
            [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", "-c", str(passwords),
             user, password], check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        tls_port = free_port()
        lines += [f"listener {tls_port} 127.0.0.1", "allow_anonymous false",
                  f"password_file {passwords}", f"cafile {ca}", f"certfile {cert}",
                  f"keyfile {key}"]  # fmt: skip
    conf = folder / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    log = folder / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "-c", str(conf), "-v"], stdout=out, stderr=out)
    found = Broker(port, tls_port, ca, proc, log)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start:\n" + log.read_text())
            time.sleep(0.05)
        yield found
    finally:
        found.stop()


class Subscriber:
    """A paho client subscribed to ``topics`` on ``port``: the last payload of each topic,
    whether it came retained, and every message in order."""

    def __init__(self, port: int, topics: list[str]) -> None:
        import paho.mqtt.client as mqtt

        self._cond = threading.Condition()
        self.last: dict[str, tuple[bytes, bool]] = {}
        self.messages: list[tuple[str, bytes, float]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{id(self):x}")
        ready = threading.Event()

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            for topic in topics:
                client.subscribe(topic, qos=1)
            ready.set()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self._cond:
                self.last[msg.topic] = (msg.payload, bool(msg.retain))
                self.messages.append((msg.topic, msg.payload, time.time()))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10), "the test's subscriber did not connect"

    def wait(self, predicate: Any, timeout: float = 5.0) -> bool:
        with self._cond:
            return bool(self._cond.wait_for(lambda: predicate(self), timeout))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
