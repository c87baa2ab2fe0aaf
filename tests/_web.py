"""Helpers of the web tests: plain HTTP (http.client), an SSE reader, a headless Chromium."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from astropy.io import fits

from _daemon import Daemon, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    base: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
    source: str | None = None,
) -> Answer:
    """One HTTP request to ``base`` (``http://host:port``), ``path`` sent exactly as given
    (no normalisation, so traversal attempts reach the server as written); ``source``: the
    client's own address (another loopback address, 127.0.0.2, is another client)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        given = {k.lower() for k in headers or {}}
        conn.putrequest(method, path, skip_host="host" in given, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body is not None and "transfer-encoding" not in given:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def get_json(base: str, path: str) -> Any:
    answer = request(base, path)
    assert answer.status == 200, (path, answer.status, answer.body[:300])
    assert answer.headers["content-type"].startswith("application/json")
    return answer.json()


def web_base(daemon: Daemon, timeout: float = 60.0) -> str:
    """``http://host:port`` of the daemon's web page, from its log line."""
    pattern = re.compile(r"web page at (http://\S+?)/?$", re.M)
    found = wait_for(lambda: pattern.search(daemon.text()), timeout, "the web page", daemon)
    return str(found.group(1)).rstrip("/")


def other_address() -> str | None:
    """One of this machine's non-loopback IPv4 addresses, or None (a UDP connect sends
    nothing; it only picks the source address of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


class EventStream:
    """Reads ``GET /api/events`` on a thread; ``events`` gets (name, data) as they arrive;
    ``raw`` every byte. ``source``: the client's address (see :func:`request`)."""

    def __init__(
        self, base: str, source: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        parts = urlsplit(base)
        self.conn = http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=120, source_address=(source, 0) if source else None
        )
        self.raw = bytearray()
        self.conn.request(
            "GET", "/api/events", headers={"Accept": "text/event-stream", **(headers or {})}
        )
        self.response = self.conn.getresponse()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.received: list[tuple[str, Any]] = []  # every event, in arrival order
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        name, data = "message", ""
        with contextlib.suppress(Exception):  # the stream ends or close() cuts it
            while True:
                raw = self.response.readline()
                if not raw:
                    return
                self.raw += raw
                line = raw.decode("utf-8").rstrip("\n")
                if line == "":
                    if data:
                        self.received.append((name, json.loads(data)))
                        self.events.put(self.received[-1])
                    name, data = "message", ""
                elif line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data += line[6:]

    def next(self, name: str, timeout: float, where: dict[str, Any] | None = None) -> Any:
        """The next event called ``name`` (whose data match ``where``), skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no '{name}' event within {timeout} s")
            try:
                got, data = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if got == name and all(data.get(k) == v for k, v in (where or {}).items()):
                return data

    def find(self, name: str, timeout: float, where: Callable[[Any], bool]) -> Any:
        """Any event called ``name`` received so far or within ``timeout`` s whose data
        satisfy ``where`` (whatever ``next`` skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for got, data in list(self.received):
                if got == name and where(data):
                    return data
            time.sleep(0.05)
        raise AssertionError(f"no matching '{name}' event within {timeout} s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        self.conn.close()
        self.thread.join(timeout=10)


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not Path(path).exists():
            return (
                f"{name} is not installed: apt-get install chromium chromium-driver "
                "(sh deploy/dev.sh test does it as root)"
            )
    return None


@contextlib.contextmanager
def chromium(width: int = 390, height: int = 844) -> Iterator[Any]:
    """A headless Debian Chromium under chromedriver, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nightstack-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(width, height)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def sky_stack(rows: int, cols: int, *, seed: int = 3, cast: float = 1.0) -> np.ndarray:
    """A linear colour stack as live.fits holds it, (3, rows, cols) float32 top-down: sky,
    noise, 60 stars and a bright block in the top-left corner (40 x 60 px) to tell up from
    down. ``cast`` scales the red channel's signal and noise (a colour cast)."""
    rng = np.random.default_rng(seed)
    image = np.empty((3, rows, cols), dtype=np.float32)
    yy, xx = np.mgrid[0:rows, 0:cols]
    stars = np.zeros((rows, cols), dtype=np.float32)
    for x, y, flux in zip(
        rng.uniform(0, cols, 60), rng.uniform(0, rows, 60), rng.uniform(0.05, 0.6, 60), strict=True
    ):
        stars += flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
    stars[:40, :60] = 0.8
    for c, (sky, gain) in enumerate([(0.12, cast), (0.10, 1.0), (0.08, 0.9)]):
        image[c] = sky + gain * (stars + rng.normal(0, 0.004, (rows, cols)))
    return image


def write_fits(path: Path, data: np.ndarray) -> None:
    """``data`` as a float32 FITS with ROWORDER TOP-DOWN, replacing ``path`` atomically."""
    hdu = fits.PrimaryHDU(data=data.astype(np.float32))
    hdu.header["ROWORDER"] = "TOP-DOWN"
    tmp = path.with_name(f".{path.name}.tmp")
    hdu.writeto(tmp, overwrite=True)
    tmp.replace(path)


def page_until(driver: Any, what: str, timeout: float, check: Any) -> Any:
    """Poll ``check(driver)`` until it is truthy; the page's state in the failure message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check(driver)
        if value:
            return value
        time.sleep(0.1)
    body = driver.execute_script("return document.body.innerText")
    raise AssertionError(f"page: timed out waiting for {what}; it shows:\n{body[:3000]}")
