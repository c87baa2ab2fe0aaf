"""What a client may take from the daemon (issue 20 items 3 and 6): connections (file
descriptors) per client and in all, renders (sizes, bytes of cache, one at a time), log lines.
The web server in this process; real sockets on loopback (127.0.0.2 is another client)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from _web import request, sky_stack, write_fits
from nightstack.web.limits import RepeatFilter
from nightstack.web.server import WebServer

SID = "20261130-214502"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _serve(out: Path, **caps: int) -> WebServer:
    directory = out / SID
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "session.json").write_text(json.dumps({"session": SID, "state": "open"}))
    server = WebServer(
        out,
        "127.0.0.1:0",
        token=None,
        status=lambda: {"state": "stacking", "session": SID},
        close=lambda: None,
        **caps,
    )
    server.start()
    return server


@pytest.fixture
def served(tmp_path: Path) -> Iterator[WebServer]:
    server = _serve(tmp_path / "out", per_client=8, total=20)
    yield server
    server.stop()


def _partial(port: int, source: str, count: int) -> list[socket.socket]:
    """``count`` connections from ``source`` that send half a request and wait."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        held.append(sock)
    return held


def _open_on_server(server: WebServer) -> int:
    assert server.site is not None and server.site.gate is not None
    return server.site.gate.open_connections()


def test_idle_connections_are_capped_per_client_and_in_all(served: WebServer) -> None:
    """Main accepted every connection: 1100 half-sent requests from one client held the
    daemon at its descriptor limit. Now one client holds at most 8 here, all clients 20; the
    rest are closed at once, and other clients are still served."""
    base, port = served.url.rstrip("/"), served.port
    before = _fds()
    held = _partial(port, "127.0.0.1", 300)
    try:
        time.sleep(0.5)
        # this process holds both ends: 300 client sockets + at most 8 server ones
        assert _fds() - before <= 300 + 8 + 4, _fds() - before
        assert _open_on_server(served) <= 8
        assert request(base, "/api/status", source="127.0.0.2").status == 200  # another client
        others = [s for n in range(3, 8) for s in _partial(port, f"127.0.0.{n}", 8)]
        held += others
        time.sleep(0.5)
        assert _open_on_server(served) <= 20
        assert _fds() - before <= len(held) + 20 + 4
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10  # once they hang up, the first client is served again
    while request(base, "/api/status").status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert request(base, "/api/status").status == 200


def test_repeated_log_lines_are_rate_limited() -> None:
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("nightstack.test-repeats")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.addFilter(RepeatFilter(window_s=0.5))
    try:
        for _ in range(10_000):
            logger.error("socket.accept() out of system resource\nsocket: <fd=%d>", 6)
        time.sleep(0.6)
        logger.error("socket.accept() out of system resource\nsocket: <fd=%d>", 7)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2
    assert "9999 like it" in records[1].getMessage()


# --- renders -------------------------------------------------------------------------------
def _width(body: bytes) -> int:
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    return int(image.shape[1])


def test_render_sizes_come_from_a_short_list(served: WebServer, tmp_path: Path) -> None:
    """Main rendered any width up to 4096 (30 PNGs of 17 MB grew the daemon by 650 MB)."""
    from nightstack.web.render import CROPS, WIDTHS

    base = served.url.rstrip("/")
    write_fits(tmp_path / "out" / SID / "live.fits", sky_stack(600, 4800))
    url = f"/api/sessions/{SID}/stretch.jpg"
    assert request(base, f"{url}?width=4096").status == 400  # beyond the list
    for asked, listed in ((64, 200), (250, 300), (1000, 1200), (2400, 2400)):
        answer = request(base, f"{url}?width={asked}")
        assert answer.status == 200
        assert _width(answer.body) == 4800 // -(-4800 // listed), (asked, listed)
    assert request(base, f"/api/sessions/{SID}/crop.jpg?size={CROPS[-1] + 1}").status == 400
    crop = request(base, f"/api/sessions/{SID}/crop.jpg?size=300&format=png")
    assert _width(crop.body) == 512  # 300 rounded up to the next listed side
    assert WIDTHS[-1] <= 2400 and len(WIDTHS) <= 8


def test_the_render_cache_is_bounded_in_bytes(tmp_path: Path) -> None:
    from nightstack.web.api import RENDER_KEY

    server = _serve(tmp_path / "out")
    try:
        assert server.app is not None
        renderer = server.app[RENDER_KEY]
        renderer.cache.limit = 2 * 2**20  # small, to fill it with a few renders
        write_fits(tmp_path / "out" / SID / "live.fits", sky_stack(400, 1200))
        base = server.url.rstrip("/")
        for strength in np.linspace(0.5, 2.5, 12):
            query = f"width=1200&format=png&strength={strength:.3f}"
            assert request(base, f"/api/sessions/{SID}/stretch.jpg?{query}").status == 200
            assert renderer.cache.bytes <= 2 * 2**20
    finally:
        server.stop()


def test_one_render_at_a_time_per_session_and_json_answers_meanwhile(
    served: WebServer, tmp_path: Path
) -> None:
    """Renders run on their own thread: the JSON API answers while several clients loop on
    renders; renders of one session beyond the running one and two waiting get 503."""
    base = served.url.rstrip("/")
    write_fits(tmp_path / "out" / SID / "live.fits", sky_stack(1500, 2400))
    statuses: list[int] = []
    lock = threading.Lock()

    def render(n: int) -> None:
        for i in range(3):
            query = f"width=2400&format=png&strength={0.3 + 0.01 * (n * 3 + i):.3f}"
            answer = request(base, f"/api/sessions/{SID}/stretch.jpg?{query}", source="127.0.0.2")
            with lock:
                statuses.append(answer.status)

    threads = [threading.Thread(target=render, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    times = []
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert request(base, "/api/status").status == 200
        times.append(time.monotonic() - t0)
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) <= {200, 503}
    assert sorted(times)[int(0.95 * (len(times) - 1))] < 0.25, max(times)


def test_the_page_asks_for_listed_crop_sizes() -> None:
    from importlib import resources

    from nightstack.web.render import CROPS

    script = (resources.files("nightstack.web") / "static" / "app.js").read_text()
    line = next(x for x in script.splitlines() if x.startswith("const CROP_SIZES"))
    assert line.split("[", 1)[1].split("]", 1)[0] == ", ".join(str(c) for c in CROPS)


def test_a_render_reads_bands_from_the_file_never_a_memory_map(tmp_path: Path) -> None:
    """A render's pages of live.fits would count in the daemon's RSS while it runs (+274 MB of
    mapped file under looping renders, bench_hardening): the renderer reads the bands it needs
    through astropy's section. While it reads, the file is in no mapping of this process, and
    the shrink equals the one from the whole array."""
    from nightstack.web.render import StretchRenderer, shrink

    data = np.random.default_rng(2).uniform(0, 1, (3, 300, 420)).astype(np.float32)
    path = tmp_path / "live.fits"
    write_fits(path, data)
    renderer = StretchRenderer()
    seen: list[bool] = []

    def take(section: object) -> np.ndarray:
        with open("/proc/self/maps") as fh:
            seen.append(str(path) in fh.read())
        return shrink(section, 100)

    small = renderer._read(path, take)
    assert seen == [False]
    np.testing.assert_array_equal(small, shrink(data, 100))
    assert renderer.render(path, width=300, strength=1.0, linked=True)[:2] == b"\xff\xd8"
