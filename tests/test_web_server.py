"""The web server in this process over session folders a test writes: real HTTP on a real
socket, real FITS files read back, real JPEGs decoded. What needs no daemon: the stretch
renders against ``writers.stretch`` as the oracle, the journal reader on torn lines, path
traversal, request bounds, the token and loopback rules, and that nothing is polled while no
event client is connected. (``test_web_api.py`` runs the same server inside a real daemon.)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from _web import EventStream, request, sky_stack, write_fits
from nightstack.address import is_loopback_host, is_loopback_ip, parse_listen
from nightstack.config import load_settings
from nightstack.errors import ConfigError
from nightstack.io.writers import stretch
from nightstack.service.folder import read_journal
from nightstack.web.server import WebServer

SID = "20261130-214502"
ROWS, COLS = 400, 600


class Daemonish:
    """What the server needs of a daemon: a status snapshot (counting its calls) and close."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {
            "state": "stacking",
            "session": SID,
            "accepted": 2,
            "rejected": 1,
            "last_frame": None,
            "queue": 0,
            "uptime_s": 1.0,
        }
        self.calls = 0
        self.closes = 0
        self.lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
            return dict(self.snapshot)

    def close(self) -> None:
        self.closes += 1


def _sky(seed: int = 3, cast: float = 1.0) -> np.ndarray:
    return sky_stack(ROWS, COLS, seed=seed, cast=cast)


def _session(out: Path, sid: str = SID, records: int = 3) -> Path:
    directory = out / sid
    directory.mkdir(parents=True)
    (directory / "session.json").write_text(json.dumps({"session": sid, "state": "open"}))
    lines = [
        {"file": f"/cam/IMG_{i:04d}.DNG", "status": "accepted", "stars": 100 + i}
        for i in range(records)
    ]
    (directory / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return directory


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, Daemonish, WebServer]]:
    out = tmp_path / "out"
    _session(out)
    daemon = Daemonish()
    server = WebServer(out, "127.0.0.1:0", token=None, status=daemon.status, close=daemon.close)
    server.start()
    try:
        yield server.url.rstrip("/"), out, daemon, server
    finally:
        server.stop()


def _decode(body: bytes) -> np.ndarray:
    """A JPEG or PNG answer as float (rows, cols, 3) RGB in [0, 1]."""
    pixels = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert pixels is not None, "not an image"
    return pixels[:, :, ::-1].astype(np.float64) / 255.0


def _block_mean(chw: np.ndarray, f: int) -> np.ndarray:
    """The oracle shrink: f x f block means, (rows // f, cols // f, C)."""
    c, rows, cols = chw.shape
    r, k = rows // f, cols // f
    blocks = chw[:, : r * f, : k * f].astype(np.float64).reshape(c, r, f, k, f)
    return np.moveaxis(blocks.mean(axis=(2, 4)), 0, 2).astype(np.float32)


def _mtf(m: float, x: np.ndarray) -> np.ndarray:
    return (m - 1) * x / ((2 * m - 1) * x - m)


def _exact(got: np.ndarray, want: np.ndarray) -> None:
    """A PNG answer against the float oracle: equal after rounding to 8 bits (a level off
    where float32 sums in another order land on the other side of a rounding boundary)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    levels = np.abs(np.rint(got * 255) - np.rint(np.clip(want, 0, 1) * 255))
    assert levels.max() <= 1 and (levels > 0).mean() < 0.01, (levels.max(), (levels > 0).mean())


def _smooth(image: np.ndarray) -> np.ndarray:
    return np.asarray(cv2.blur(image.astype(np.float32), (7, 7)), dtype=np.float64)


def _close_to(got: np.ndarray, want: np.ndarray) -> None:
    """A JPEG answer against the float oracle: JPEG (quality 88) keeps the picture and smears
    the stretched pixel noise (~30 levels rms here), so compare 7 x 7 local means."""
    assert got.shape == want.shape, (got.shape, want.shape)
    error = np.abs(_smooth(got) - _smooth(want))
    assert error.mean() < 2.0 / 255, error.mean() * 255
    assert np.percentile(error, 99) < 10 / 255, np.percentile(error, 99) * 255


# --- stretch renders from live.fits ------------------------------------------------------------
def test_stretch_render_is_the_preview_stretch_of_the_shrunk_stack(
    served: tuple[str, Path, Daemonish, WebServer],
) -> None:
    base, out, _, _ = served
    sky = _sky()
    write_fits(out / SID / "live.fits", sky)
    want = stretch(_block_mean(sky, 3))  # ceil(600 / 200) = 3 -> 200 x 133
    answer = request(base, f"/api/sessions/{SID}/stretch.jpg?width=200")  # the page's JPEG
    assert answer.status == 200 and answer.headers["content-type"] == "image/jpeg"
    _close_to(_decode(answer.body), want)
    answer = request(base, f"/api/sessions/{SID}/stretch.jpg?width=200&format=png")
    assert answer.headers["content-type"] == "image/png"
    got = _decode(answer.body)
    _exact(got, want)
    # top-down: the bright block is at the top left of the picture
    assert got[:10, :15].mean() > 0.95 and got[-10:, :15].mean() < 0.6

    # strength: a midtones transfer with balance 0.5 ** strength on top of the auto-stretch
    levels = {}
    for strength in (0.5, 1.0, 2.0):
        query = f"width=200&strength={strength}&format=png"
        shown = _decode(request(base, f"/api/sessions/{SID}/stretch.jpg?{query}").body)
        _exact(shown, _mtf(0.5**strength, want))
        levels[strength] = float(np.median(shown))
    assert levels[0.5] < levels[1.0] < levels[2.0]
    assert abs(levels[1.0] - 0.25) < 0.01  # the auto-stretch puts the sky at 0.25


def test_unlinked_colour_stretches_each_channel_alone(
    served: tuple[str, Path, Daemonish, WebServer],
) -> None:
    base, out, _, _ = served
    sky = _sky(cast=3.0)  # red stars and noise three times as strong
    write_fits(out / SID / "live.fits", sky)
    small = _block_mean(sky, 3)
    linked = stretch(small)
    unlinked = np.dstack([stretch(small[:, :, c]) for c in range(3)])
    assert np.abs(linked - unlinked).mean() > 5 / 255  # the two views really differ
    url = f"/api/sessions/{SID}/stretch.jpg?width=200&format=png"
    _exact(_decode(request(base, url).body), linked)
    _exact(_decode(request(base, url + "&linked=0").body), unlinked)


def test_crop_is_one_to_one_and_a_mono_stack_renders(
    served: tuple[str, Path, Daemonish, WebServer],
) -> None:
    base, out, _, _ = served
    sky = _sky()
    write_fits(out / SID / "live.fits", sky)
    answer = request(base, f"/api/sessions/{SID}/crop.jpg?cx=0.25&cy=0.5&size=128&format=png")
    assert answer.status == 200
    x0, y0 = round(0.25 * COLS - 64), round(0.5 * ROWS - 64)  # centred on the point
    window = np.moveaxis(sky[:, y0 : y0 + 128, x0 : x0 + 128], 0, 2)
    _exact(_decode(answer.body), stretch(window))
    # a crop at the corner is clamped inside the image: the bright block is there, 1:1
    corner = _decode(request(base, f"/api/sessions/{SID}/crop.jpg?cx=0&cy=0&size=256").body)
    assert corner.shape == (256, 256, 3) and corner[:40, :60].mean() > 0.95

    write_fits(out / SID / "live.fits", sky[1])  # mono: (rows, cols)
    url = f"/api/sessions/{SID}/stretch.jpg?width=300&format=png"
    mono = _decode(request(base, url).body)
    want = stretch(_block_mean(sky[1][np.newaxis], 2))
    _exact(mono, np.repeat(want, 3, axis=2))


def test_renders_are_cached_until_live_fits_changes(
    served: tuple[str, Path, Daemonish, WebServer],
) -> None:
    base, out, _, server = served
    path = out / SID / "live.fits"
    write_fits(path, _sky(seed=1))
    first = request(base, f"/api/sessions/{SID}/stretch.jpg?width=300").body
    renderer = _renderer(server)
    assert renderer.reads == 1
    for strength in (1.0, 1.5, 1.0):  # the encoded images are cached, not the shrunk stack
        request(base, f"/api/sessions/{SID}/stretch.jpg?width=300&strength={strength}")
    assert renderer.reads == 2
    assert request(base, f"/api/sessions/{SID}/stretch.jpg?width=300").body == first
    write_fits(path, _sky(seed=2))  # a new live stack (new inode and mtime)
    second = request(base, f"/api/sessions/{SID}/stretch.jpg?width=300").body
    assert renderer.reads == 3 and second != first


def _renderer(server: WebServer) -> Any:
    """The running app's renderer (to count its file reads)."""
    from nightstack.web.api import RENDER_KEY

    assert server.app is not None
    return server.app[RENDER_KEY]


def test_render_without_or_with_a_broken_live_fits(
    served: tuple[str, Path, Daemonish, WebServer],
) -> None:
    base, out, _, _ = served
    for path in ("stretch.jpg", "crop.jpg", "live.fits"):
        assert request(base, f"/api/sessions/{SID}/{path}").status == 404
    (out / SID / "live.fits").write_bytes(b"SIMPLE  = T" + b" " * 100)
    answer = request(base, f"/api/sessions/{SID}/stretch.jpg")
    assert answer.status == 422 and "live.fits" in answer.json()["error"]
    for query in ("width=10", "width=abc", "strength=9", "strength=nan", "linked=maybe"):
        assert request(base, f"/api/sessions/{SID}/stretch.jpg?{query}").status == 400, query
    assert request(base, f"/api/sessions/{SID}/crop.jpg?size=5000").status == 400


# --- the journal as it grows ---------------------------------------------------------------
def test_frames_wait_for_a_torn_line_skip_garbage_and_read_on(
    served: tuple[str, Path, Daemonish, WebServer],
) -> None:
    base, out, _, _ = served
    journal = out / SID / "journal.jsonl"
    with journal.open("ab") as fh:
        fh.write(b'{"file": "/cam/IMG_0003.DNG", "status": "rej')  # torn: no newline yet
    frames = request(base, f"/api/sessions/{SID}/frames").json()
    assert [f["stars"] for f in frames] == [100, 101, 102]
    with journal.open("ab") as fh:
        fh.write(b'ected", "reason": "cloud"}\n')
    frames = request(base, f"/api/sessions/{SID}/frames?since=2").json()
    assert [f.get("stars") for f in frames] == [102, None]
    assert frames[1]["reason"] == "cloud"
    with journal.open("ab") as fh:
        fh.write(b"not json\n" + json.dumps({"file": "x", "status": "accepted"}).encode() + b"\n")
    served_frames = request(base, f"/api/sessions/{SID}/frames").json()
    assert len(served_frames) == 5  # the garbage line is skipped, the record after it counts
    assert served_frames == read_journal(journal)  # the daemon's rule, the same records
    journal.write_bytes(journal.read_bytes()[:20])  # cut short (a resume truncates): read anew
    assert request(base, f"/api/sessions/{SID}/frames").json() == []
    for bad in ("x", "-1", "%C2%B2", "1" * 12):  # %C2%B2: a superscript two, a digit to str
        assert request(base, f"/api/sessions/{SID}/frames?since={bad}").status == 400, bad


# --- security ----------------------------------------------------------------------------------
TRAVERSALS = [
    "/api/sessions/../../../etc/passwd",
    "/api/sessions/..%2f..%2fetc%2fpasswd",
    "/api/sessions/%2e%2e/%2e%2e/etc/passwd",
    "/api/sessions/%2e%2e%2f%2e%2e%2fetc%2fpasswd/frames",
    "/api/sessions/..%252f..%252fetc/frames",
    "/api/sessions/..%5c..%5cetc/frames",
    "/api/sessions/%2fetc/frames",
    "/api/sessions//etc/frames",
    "/api/sessions/.%2e/frames",
    "/api/sessions/{sid}/..%2fsession.json",
    "/api/sessions/{sid}/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/api/sessions/{sid}/..%255csecret.txt",
    "/api/sessions/{sid}/..",
    "/api/sessions/{sid}/session.json",
    "/api/sessions/{sid}/journal.jsonl",
    "/api/sessions/{sid}/checkpoint",
    "/api/sessions/{sid}%00/frames",
    "/api/sessions/{sid}/frames/../../../secret.txt",
    "/api/sessions/outside/frames",
    "/api/sessions/outside/preview.jpg",
    "/api/sessions/.hidden/frames",
    "/app.js/../../secret.txt",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/..%2fsecret.txt",
    "/secret.txt",
    "/static/",
    "/static/app.js",
    "/api/",
    "/api/sessions/",
    "/api/sessions/{sid}/",
    "/index.html",
]


def test_traversal_and_listings_are_404(
    served: tuple[str, Path, Daemonish, WebServer], tmp_path: Path
) -> None:
    base, out, _, _ = served
    (out / "secret.txt").write_text("SECRET-CONTENT")
    (out / SID / "preview.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    outside = tmp_path / "elsewhere"
    _session(outside, "s1")
    (outside / "s1" / "preview.jpg").write_text("OUTSIDE-CONTENT")
    (out / "outside").symlink_to(outside / "s1")  # a session folder that points elsewhere
    _session(out, ".hidden")
    for template in TRAVERSALS:
        path = template.format(sid=SID)
        answer = request(base, path)
        assert answer.status == 404, (path, answer.status, answer.body[:200])
        assert b"SECRET" not in answer.body and b"OUTSIDE" not in answer.body
        assert b"/cam/IMG" not in answer.body, path  # no journal through a side door
        assert answer.headers["content-type"].startswith("application/json"), path
    # the real thing next to them works
    assert request(base, f"/api/sessions/{SID}/preview.jpg").status == 200
    assert [s["session"] for s in request(base, "/api/sessions").json()] == [SID]


def test_request_bounds_and_no_cors(served: tuple[str, Path, Daemonish, WebServer]) -> None:
    base, _, daemon, _ = served
    big = request(base, "/api/close", method="POST", body=b"x" * 10_000)
    assert big.status == 413 and daemon.closes == 0
    chunked = request(
        base,
        "/api/close",
        method="POST",
        headers={"Transfer-Encoding": "chunked"},
        body=b"5\r\nhello\r\n0\r\n\r\n",
    )
    assert chunked.status == 413
    assert request(base, "/api/status?" + "a" * 6000).status in (400, 414)
    assert request(base, "/api/status", headers={"X-Long": "v" * 9000}).status in (400, 431)
    many = {f"X-H{i}": "1" for i in range(100)}
    assert request(base, "/api/status", headers=many).status in (400, 431)
    answer = request(base, "/api/status", headers={"Origin": "http://evil.example"})
    assert answer.status == 200
    assert not any(k.startswith("access-control-") for k in answer.headers)
    preflight = request(
        base,
        "/api/close",
        method="OPTIONS",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status == 405
    assert not any(k.startswith("access-control-") for k in preflight.headers)
    page = request(base, "/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert request(base, "/api/status").status == 200  # still serving after all that


def test_close_rules_without_a_token(served: tuple[str, Path, Daemonish, WebServer]) -> None:
    base, _, daemon, _ = served
    # another site's page (cross-site form or fetch) and DNS rebinding are refused
    for headers in (
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Host": "evil.example:8080"},
    ):
        answer = request(base, "/api/close", method="POST", headers=headers)
        assert answer.status == 403, (headers, answer.status)
    assert daemon.closes == 0
    ok = request(base, "/api/close", method="POST", headers={"Origin": base})
    assert ok.status == 202 and ok.json() == {"closing": SID} and daemon.closes == 1
    daemon.snapshot["session"] = None
    assert request(base, "/api/close", method="POST").status == 409
    assert request(base, "/api/close").status == 405  # actions are POST only


def test_close_with_a_token(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _session(out)
    daemon = Daemonish()
    token = "s3cret-token-for-tests"
    server = WebServer(
        out,
        "127.0.0.1:0",
        token=token,
        status=daemon.status,
        close=daemon.close,
        hosts=["raspberrypi.local"],
    )
    server.start()
    base = server.url.rstrip("/")
    try:
        for auth in (None, "Bearer wrong", f"Basic {token}", f"Bearer {token}x", "Bearer "):
            headers = {"Authorization": auth} if auth else {}
            answer = request(base, "/api/close", method="POST", headers=headers)
            assert answer.status == 401, (auth, answer.status)
            assert answer.headers["www-authenticate"].startswith("Bearer")
        assert daemon.closes == 0
        # with the token the Host may be a name of web_hosts (a phone on the hotspot)
        headers = {"Authorization": f"Bearer {token}", "Host": "raspberrypi.local:8080"}
        answer = request(base, "/api/close", method="POST", headers=headers)
        assert answer.status == 202 and daemon.closes == 1
        assert request(base, "/api/status").status == 401  # reading needs the token too
    finally:
        server.stop()


# --- events and idleness -------------------------------------------------------------------------
def test_events_only_watch_while_a_client_listens(
    served: tuple[str, Path, Daemonish, WebServer],
) -> None:
    base, out, daemon, _ = served
    request(base, "/api/status")
    calls = daemon.calls
    time.sleep(1.5)
    assert daemon.calls == calls  # nobody listens: nothing is polled

    stream = EventStream(base)
    try:
        journal = out / SID / "journal.jsonl"
        with journal.open("a") as fh:
            fh.write(json.dumps({"file": "/cam/<b>IMG_0003</b>.DNG", "status": "accepted"}) + "\n")
        event = stream.next("frame", 10)
        assert event["session"] == SID and event["index"] == 3
        assert event["record"]["file"] == "/cam/<b>IMG_0003</b>.DNG"
        (out / SID / "preview.jpg").write_bytes(b"\xff\xd8new")
        assert stream.next("preview", 10)["session"] == SID
        with daemon.lock:
            daemon.snapshot["accepted"] = 3
        assert stream.next("status", 10)["accepted"] == 3
        assert daemon.calls > calls
    finally:
        stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server notices the hang-up at its next write
        before = daemon.calls
        time.sleep(1.2)
        if daemon.calls == before:
            break
    else:
        raise AssertionError("the server kept polling after the client left")


def test_stopping_ends_open_event_streams(tmp_path: Path) -> None:
    daemon = Daemonish()
    server = WebServer(
        tmp_path, "127.0.0.1:0", token=None, status=daemon.status, close=daemon.close
    )
    server.start()
    stream = EventStream(server.url.rstrip("/"))
    assert stream.response.status == 200
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 5
    stream.thread.join(timeout=5)
    assert not stream.thread.is_alive()  # the server ended the stream
    stream.close()


def test_event_streams_are_bounded_per_client_and_never_lock_a_newcomer_out(
    served: tuple[str, Path, Daemonish, WebServer],
) -> None:
    """Issue 20 item 8: 16 idle streams answered every new client 503. Now one client holds
    at most 4 (its oldest is ended) and a newcomer ends the oldest stream of the client that
    holds the most: every new stream is served."""
    from nightstack.web.events import MAX_STREAMS, STREAMS_PER_CLIENT

    base, _, _, server = served
    clients = [f"127.0.0.{n}" for n in range(1, MAX_STREAMS // STREAMS_PER_CLIENT + 1)]
    streams = [EventStream(base, source=c) for c in clients for _ in range(STREAMS_PER_CLIENT)]
    try:
        assert all(s.response.status == 200 for s in streams)
        newcomer = EventStream(base, source="127.0.0.99")
        streams.append(newcomer)
        assert newcomer.response.status == 200
        streams[0].thread.join(timeout=10)  # the oldest stream of the first client: ended
        assert not streams[0].thread.is_alive()
        assert all(s.thread.is_alive() for s in streams[1:])
        again = EventStream(base, source=clients[1])  # a fifth of that client: its oldest ends
        streams.append(again)
        assert again.response.status == 200
        streams[STREAMS_PER_CLIENT].thread.join(timeout=10)
        assert not streams[STREAMS_PER_CLIENT].thread.is_alive()
        assert server.app is not None
        from nightstack.web.api import HUB_KEY

        assert server.app[HUB_KEY].clients <= MAX_STREAMS
    finally:
        for stream in streams:
            stream.close()


def test_a_port_in_use_raises_and_listen_values_are_checked(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = Daemonish()
        server = WebServer(
            tmp_path, f"127.0.0.1:{port}", token=None, status=daemon.status, close=daemon.close
        )
        with pytest.raises(OSError):
            server.start()
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", ":8080", "::1:8080", "a b:80", "h:70000", "h:-1"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    with pytest.raises(ConfigError, match="web_listen"):
        load_settings(None, {"web_listen": "localhost"}, use_default=False)
    with pytest.raises(ConfigError, match="web_token"):
        load_settings(None, {"web_token": "short"}, use_default=False)
    assert load_settings(None, {"web_token": ""}, use_default=False).web_token is None
    assert is_loopback_ip("::ffff:127.0.0.1") and not is_loopback_ip("192.0.2.2")
    assert is_loopback_host("localhost:8080") and is_loopback_host("[::1]:80")
    assert not is_loopback_host("127.0.0.1.evil.example") and not is_loopback_host(None)
