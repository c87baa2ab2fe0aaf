"""Who may read and act (issue 20 item 1): the Host rule on every request, reads behind the
token, the page's read cookie. The web server in this process over a session folder the test
writes; real HTTP on a real socket."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from _web import EventStream, request, sky_stack, write_fits
from nightstack.web.server import WebServer

SID = "20261130-214502"
TOKEN = "s3cret-token-for-tests"
READS = [
    "/api/status",
    "/api/sessions",
    f"/api/sessions/{SID}",
    f"/api/sessions/{SID}/frames",
    f"/api/sessions/{SID}/preview.jpg",
    f"/api/sessions/{SID}/live.fits",
    f"/api/sessions/{SID}/stretch.jpg?width=200",
    f"/api/sessions/{SID}/crop.jpg?size=128",
    "/api/preview.jpg",
]


class _Daemon:
    def __init__(self) -> None:
        self.closes = 0

    def status(self) -> dict[str, object]:
        return {"state": "stacking", "session": SID, "accepted": 1, "rejected": 0}

    def close(self) -> None:
        self.closes += 1


def _serve(out: Path, token: str | None, hosts: list[str] | None = None) -> WebServer:
    directory = out / SID
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "session.json").write_text(json.dumps({"session": SID, "state": "open"}))
    (directory / "journal.jsonl").write_text(json.dumps({"file": "a.dng", "status": "x"}) + "\n")
    (directory / "preview.jpg").write_bytes(b"\xff\xd8 a preview")
    write_fits(directory / "live.fits", sky_stack(300, 400))
    daemon = _Daemon()
    server = WebServer(
        out, "127.0.0.1:0", token=token, status=daemon.status, close=daemon.close,
        hosts=hosts or [],
    )  # fmt: skip
    server.start()
    return server


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[WebServer]:
    server = _serve(tmp_path / "out", None, ["nightstack.lan"])
    yield server
    server.stop()


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[WebServer]:
    server = _serve(tmp_path / "out", TOKEN)
    yield server
    server.stop()


REBOUND = ["rebind.attacker.example", "127.0.0.1.nip.io", "localhost.evil.example", "x"]


@pytest.mark.parametrize("token", [None, TOKEN])
def test_every_request_names_this_machine_whatever_the_token(
    tmp_path: Path, token: str | None
) -> None:
    """A DNS-rebinding page reaches the port under its own name: refused on reads (main
    served session.json with the token in it) and on actions (main took a close with the
    leaked token), with or without the right Bearer header."""
    server = _serve(tmp_path / "out", token, ["nightstack.lan"])
    base, port = server.url.rstrip("/"), server.port
    auth = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    try:
        for name in REBOUND:
            host = {"Host": f"{name}:{port}"}
            for path in [*READS, "/", "/app.js"]:
                answer = request(base, path, headers={**host, **auth})
                assert answer.status == 403, (name, path, answer.status)
                assert b"a preview" not in answer.body and b"SIMPLE" not in answer.body
            close = request(base, "/api/close", method="POST", headers={**host, **auth})
            assert close.status == 403
            stream = EventStream(base, headers={**host, **auth})
            assert stream.response.status == 403
            stream.close()
        # this machine's names: loopback, any IP address, its host name, NAME.local, web_hosts
        short = socket.gethostname().split(".")[0]
        for name in ("127.0.0.1", "localhost", "[::1]", "192.168.4.1", "10.1.2.3",
                     socket.gethostname(), f"{short}.local", "nightstack.lan"):  # fmt: skip
            answer = request(base, "/api/status", headers={"Host": f"{name}:{port}", **auth})
            assert answer.status == 200, (name, answer.status)
    finally:
        server.stop()


def test_reads_need_the_token_when_one_is_set(token_server: WebServer) -> None:
    base = token_server.url.rstrip("/")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in READS:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "nightstack=00"}):
            answer = request(base, path, headers=headers)
            assert answer.status == 401, (path, headers, answer.status)
            assert answer.headers["www-authenticate"].startswith("Bearer")
        assert request(base, path, headers=bearer).status == 200, path
    stream = EventStream(base)
    assert stream.response.status == 401
    stream.close()
    # the page's own files hold no data and load without it (the page then asks for it)
    for path in ("/", "/app.js", "/app.css", "/icon.svg"):
        assert request(base, path).status == 200, path


def test_the_page_reads_with_a_cookie_that_is_not_the_token(token_server: WebServer) -> None:
    base = token_server.url.rstrip("/")
    assert request(base, "/api/login", method="POST").status == 401
    login = request(base, "/api/login", method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    assert login.status == 200 and login.json() == {"token": True}
    cookie_line = login.headers["set-cookie"]
    assert TOKEN not in cookie_line
    assert "HttpOnly" in cookie_line and "SameSite=Strict" in cookie_line
    cookie = cookie_line.split(";", 1)[0]
    for path in READS:
        assert request(base, path, headers={"Cookie": cookie}).status == 200, path
    stream = EventStream(base, headers={"Cookie": cookie})
    assert stream.response.status == 200
    stream.close()
    # the cookie reads, it does not act: closing needs the header
    assert request(base, "/api/close", method="POST", headers={"Cookie": cookie}).status == 401
    # a new token (SIGHUP) voids the old cookie
    token_server.reconfigure("another-token-4567", [])
    assert request(base, "/api/status", headers={"Cookie": cookie}).status == 401
    bearer = {"Authorization": "Bearer another-token-4567"}
    assert request(base, "/api/status", headers=bearer).status == 200


def test_without_a_token_reads_are_open_and_login_says_so(open_server: WebServer) -> None:
    base = open_server.url.rstrip("/")
    for path in READS:
        assert request(base, path).status == 200, path
    answer = request(base, "/api/login", method="POST")
    assert answer.status == 200 and answer.json() == {"token": False}
    assert "set-cookie" not in answer.headers
