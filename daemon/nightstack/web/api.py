"""The routes: the JSON API, downloads, Server-Sent Events, the page, and their security.

Every response carries a strict Content-Security-Policy (scripts, styles, images and
connections from this server only), ``nosniff``, no referrer and no framing; there are no CORS
headers, so a page from elsewhere cannot read any answer. Only the fixed routes below exist:
no directory is ever listed and nothing a client sends is joined into a path (see
``sessions.py``). Request lines, headers and bodies are bounded. File work (journals, stats,
renders) runs on executor threads so the event loop always answers.

Who may read and act is ``auth.py``'s: the ``Host`` must name this machine on every request;
with a token, reads need it too (header or the page's cookie), actions need the header;
without one, actions come only from this machine. A request another site's page sends
(``Origin`` of another host, ``Sec-Fetch-Site: cross-site``) is refused either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nightstack import __version__
from nightstack.address import is_loopback_host, is_loopback_ip
from nightstack.io.frameio import free_bytes
from nightstack.web.auth import COOKIE, COOKIE_MAX_AGE_S, Auth
from nightstack.web.capture import add_capture_routes
from nightstack.web.events import EventHub
from nightstack.web.render import (
    CROPS,
    FORMATS,
    STRENGTH_RANGE,
    WIDTHS,
    RenderQueue,
    StretchRenderer,
    listed,
)
from nightstack.web.sessions import DOWNLOADS, SERVED, SessionFiles

if TYPE_CHECKING:
    from nightstack.capture.control import CaptureControl

log = logging.getLogger("nightstack.web")

MAX_BODY = 4096
"""Largest request body accepted (the API's one action has none): 413 beyond."""

KEEPALIVE_S = 15.0
"""An SSE comment this often keeps proxies and phones from dropping an idle stream."""

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/icon.svg": ("icon.svg", "image/svg+xml"),
}
"""The page's files (``static/``), served from memory under these paths only."""

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "media-src 'self'; "
        "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_KEPT_ERROR_HEADERS = ("WWW-Authenticate", "Allow", "Retry-After")  # an error answer says them

StatusFn = Callable[[], dict[str, Any]]

STATUS_KEY: web.AppKey[StatusFn] = web.AppKey("status")
CLOSE_KEY: web.AppKey[Callable[[], None]] = web.AppKey("close")
AUTH_KEY: web.AppKey[Callable[[], Auth]] = web.AppKey("auth")
SESSIONS_KEY = web.AppKey("sessions", SessionFiles)
HUB_KEY = web.AppKey("hub", EventHub)
RENDER_KEY = web.AppKey("render", StretchRenderer)
RENDERS_KEY = web.AppKey("renders", RenderQueue)
STATIC_KEY: web.AppKey[dict[str, bytes]] = web.AppKey("static")


def build_app(
    sessions: SessionFiles,
    *,
    status: StatusFn,
    close: Callable[[], None],
    auth: Callable[[], Auth],
    capture: CaptureControl | None = None,
) -> web.Application:
    """The aiohttp application over ``sessions``.

    Parameters
    ----------
    sessions : SessionFiles
        The output folder's sessions.
    status : callable
        The daemon's snapshot: ``state``, ``session``, ``accepted``, ``rejected``, ``queue``,
        ``last_frame``, ``uptime_s`` (thread-safe; never blocks on the worker).
    close : callable
        Asks the daemon to close its open session (returns at once).
    auth : callable
        The access rules now (:class:`~nightstack.web.auth.Auth`; replaced on SIGHUP).
    capture : CaptureControl or None
        The tethered capture: its routes and its status under ``capture`` (``web/capture.py``).
    """
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY)

    def full_status() -> dict[str, Any]:
        return _full_status(status, sessions)

    if capture is not None:  # --- capture ---
        full_status = add_capture_routes(app, capture, full_status, _authorize)

    app[STATUS_KEY] = full_status
    app[CLOSE_KEY] = close
    app[AUTH_KEY] = auth
    app[SESSIONS_KEY] = sessions
    app[HUB_KEY] = EventHub(sessions, full_status)
    app[RENDER_KEY] = StretchRenderer()
    app[RENDERS_KEY] = RenderQueue()
    app[STATIC_KEY] = _load_static()
    app.router.add_get("/api/status", _status)
    app.router.add_get("/api/sessions", _sessions)
    app.router.add_get("/api/sessions/{sid}", _session)
    app.router.add_get("/api/sessions/{sid}/frames", _frames)
    app.router.add_get("/api/sessions/{sid}/stretch.jpg", _stretch)
    app.router.add_get("/api/sessions/{sid}/crop.jpg", _crop)
    app.router.add_get("/api/sessions/{sid}/{name}", _download)
    app.router.add_get("/api/preview.jpg", _open_preview)
    app.router.add_get("/api/events", _events)
    app.router.add_post("/api/close", _close)
    app.router.add_post("/api/login", _login)
    for path in STATIC:
        app.router.add_get(path, _static)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    return app


def _load_static() -> dict[str, bytes]:
    folder = resources.files("nightstack.web") / "static"
    return {path: (folder / name).read_bytes() for path, (name, _) in STATIC.items()}


def _full_status(status: StatusFn, sessions: SessionFiles) -> dict[str, Any]:
    snapshot = status()
    free = free_bytes(sessions.output)
    return {
        "version": __version__,
        "state": snapshot.get("state"),
        "session": snapshot.get("session"),
        "accepted": snapshot.get("accepted", 0),
        "rejected": snapshot.get("rejected", 0),
        "queue": snapshot.get("queue", 0),
        "last_frame": snapshot.get("last_frame"),
        "disk_free_bytes": free,
        "uptime_s": snapshot.get("uptime_s"),
    }


# --- middleware ------------------------------------------------------------------------------
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The Host rule and the read token, bounds, JSON errors for everything, security headers
    on every answer."""
    auth = request.app[AUTH_KEY]()
    response: web.StreamResponse
    if not auth.host_allowed(request.host):
        response = _error(403, "this server is not known by that host name (add it to web_hosts)")
    elif (request.content_length or 0) > MAX_BODY or "Transfer-Encoding" in request.headers:
        response = _error(413, f"request body over {MAX_BODY} bytes")
    elif not (
        request.method == "POST"  # the actions check the header themselves
        or request.path in STATIC  # the page's own files: no data; it asks for the token
        or auth.may_read(request.headers.get("Authorization"), request.cookies.get(COOKIE))
    ):
        response = _error(401, _TOKEN_NEEDED, _CHALLENGE)
    else:
        try:
            response = await handler(request)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            kept = {k: v for k, v in err.headers.items() if k in _KEPT_ERROR_HEADERS}
            response = _error(err.status, err.reason, kept)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # a bug answers 500 and is logged; the server goes on
            log.exception("web: internal error answering %s %s", request.method, request.path)
            response = _error(500, "internal error (see the daemon's log)")
    if not response.prepared:
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.path.startswith("/api/") and "Cache-Control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
    return response


_TOKEN_NEEDED = "a valid 'Authorization: Bearer <web_token>' is needed"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="nightstack"'}


def _not_found() -> web.HTTPNotFound:
    return web.HTTPNotFound(reason="not found")


# --- reads -----------------------------------------------------------------------------------
async def _status(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STATUS_KEY]))


async def _sessions(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[SESSIONS_KEY].listing))


async def _session(request: web.Request) -> web.Response:
    meta = await asyncio.to_thread(request.app[SESSIONS_KEY].meta, request.match_info["sid"])
    if meta is None:
        raise _not_found()
    return web.json_response(meta)


def _int_arg(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or not lo <= int(text) <= hi:
        raise web.HTTPBadRequest(reason=f"'{name}' must be an integer from {lo} to {hi}")
    return int(text)


def _float_arg(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:  # also refuses NaN
        raise web.HTTPBadRequest(reason=f"'{name}' must be a number from {lo:g} to {hi:g}")
    return round(value, 3)


def _bool_arg(request: web.Request, name: str, default: bool) -> bool:
    text = request.query.get(name)
    if text is None:
        return default
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise web.HTTPBadRequest(reason=f"'{name}' must be true or false")


async def _frames(request: web.Request) -> web.Response:
    since = _int_arg(request, "since", 0, 0, 10**9)
    sessions = request.app[SESSIONS_KEY]
    records = await asyncio.to_thread(sessions.frames, request.match_info["sid"], since)
    if records is None:
        raise _not_found()
    return web.json_response(records)


_IN_MEMORY_BYTES = 16 << 20
"""Images up to this size are answered from memory, read and closed at once: aiohttp's
FileResponse can leave its file to the garbage collector when a client goes away mid-answer."""


async def _file_response(request: web.Request, path: Any, name: str) -> web.StreamResponse:
    headers = {"Content-Type": SERVED[name], "Cache-Control": "no-cache"}
    if name in DOWNLOADS and name != "preview.jpg":
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    if SERVED[name] == "image/jpeg":
        found = await asyncio.to_thread(_read_small, Path(path))
        if found is not None:
            tag, body = found
            headers["ETag"] = tag
            if request.headers.get("If-None-Match") == tag:
                return web.Response(status=304, headers=headers)
            return web.Response(body=body, headers=headers)
    return web.FileResponse(path, headers=headers)


def _read_small(path: Path) -> tuple[str, bytes] | None:
    """(an ETag, the bytes) of a file up to :data:`_IN_MEMORY_BYTES`; None when larger or gone."""
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size > _IN_MEMORY_BYTES:
                return None
            return f'"{st.st_mtime_ns:x}-{st.st_size:x}"', fh.read(_IN_MEMORY_BYTES + 1)
    except OSError:
        return None


async def _download(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = await asyncio.to_thread(request.app[SESSIONS_KEY].file, request.match_info["sid"], name)
    if path is None:
        raise _not_found()
    return await _file_response(request, path, name)


async def _open_preview(request: web.Request) -> web.StreamResponse:
    """The preview of the open session (404 when none is open or it has no preview yet)."""
    session = (await asyncio.to_thread(request.app[STATUS_KEY]))["session"]
    if session is None:
        raise _not_found()
    path = await asyncio.to_thread(request.app[SESSIONS_KEY].file, session, "preview.jpg")
    if path is None:
        raise _not_found()
    return await _file_response(request, path, "preview.jpg")


async def _rendered(
    request: web.Request, render: Callable[..., bytes], *, full: bool = False, **kwargs: Any
) -> Any:
    """Run a renderer of the session's linear image (:meth:`SessionFiles.linear`: the final,
    the linear preview or ``live.fits``; ``full``: at full resolution) on an executor thread
    (``?strength=``, ``linked=``, ``format=jpeg|png``); 404 when the session has none."""
    sessions = request.app[SESSIONS_KEY]
    path = await asyncio.to_thread(sessions.linear, request.match_info["sid"], full=full)
    if path is None:
        raise _not_found()
    strength = _float_arg(request, "strength", 1.0, *STRENGTH_RANGE)
    linked = _bool_arg(request, "linked", True)
    fmt = request.query.get("format", "jpeg")
    if fmt not in FORMATS:
        raise web.HTTPBadRequest(reason="'format' must be jpeg or png")
    renders = request.app[RENDERS_KEY]
    try:
        image = await renders.run(
            request.match_info["sid"], render, path, strength=strength, linked=linked, fmt=fmt,
            **kwargs,
        )  # fmt: skip
    except RenderQueue.Busy as err:
        raise web.HTTPServiceUnavailable(
            reason=f"{err}; try again in a moment", headers={"Retry-After": "2"}
        ) from err
    except FileNotFoundError as err:
        raise _not_found() from err
    except (OSError, ValueError) as err:  # a damaged or foreign file
        raise web.HTTPUnprocessableEntity(reason=f"{path.name} cannot be rendered: {err}") from err
    return web.Response(
        body=image, content_type=FORMATS[fmt], headers={"Cache-Control": "no-cache"}
    )


async def _stretch(request: web.Request) -> web.Response:
    width = listed(_int_arg(request, "width", 1600, 64, WIDTHS[-1]), WIDTHS)
    renderer = request.app[RENDER_KEY]
    response: web.Response = await _rendered(request, renderer.render, width=width)
    return response


async def _crop(request: web.Request) -> web.Response:
    cx = _float_arg(request, "cx", 0.5, 0.0, 1.0)
    cy = _float_arg(request, "cy", 0.5, 0.0, 1.0)
    size = listed(_int_arg(request, "size", 512, 16, CROPS[-1]), CROPS)
    renderer = request.app[RENDER_KEY]
    response: web.Response = await _rendered(
        request, renderer.crop, full=True, cx=cx, cy=cy, size=size
    )
    return response


async def _static(request: web.Request) -> web.Response:
    media_type = STATIC[request.path][1]
    body = request.app[STATIC_KEY][request.path]
    return web.Response(
        body=body, headers={"Content-Type": media_type, "Cache-Control": "no-cache"}
    )


# --- events ----------------------------------------------------------------------------------
async def _events(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    queue = await hub.subscribe(request.remote or "")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            **_SECURITY_HEADERS,
        }
    )
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is None:  # shutting down, or the client fell too far behind
                break
            await response.write(event)
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        hub.unsubscribe(queue)
    return response


async def _shutdown(app: web.Application) -> None:
    await app[HUB_KEY].close()


async def _cleanup(app: web.Application) -> None:
    app[RENDERS_KEY].close()


# --- actions ---------------------------------------------------------------------------------
def _authorize(request: web.Request) -> None:
    """Raise 401/403 unless ``request`` may take an action (see the module docstring)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise web.HTTPForbidden(reason="cross-site request refused")
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise web.HTTPForbidden(reason="cross-site request refused")
    auth = request.app[AUTH_KEY]()
    if auth.token:
        if not auth.bearer_ok(request.headers.get("Authorization")):
            raise web.HTTPUnauthorized(reason=_TOKEN_NEEDED, headers=_CHALLENGE)
    elif not (is_loopback_ip(request.remote) and is_loopback_host(request.host)):
        raise web.HTTPForbidden(
            reason="actions are taken only from this machine unless web_token is set"
        )


async def _close(request: web.Request) -> web.Response:
    _authorize(request)
    status = await asyncio.to_thread(request.app[STATUS_KEY])
    session = status["session"]
    if session is None or status["state"] in ("closing", "stopping"):
        raise web.HTTPConflict(reason="no open session to close")
    await asyncio.to_thread(request.app[CLOSE_KEY])
    return web.json_response({"closing": session}, status=202)


async def _login(request: web.Request) -> web.Response:
    """``POST /api/login`` with the Bearer header: sets the read cookie the page's images and
    event stream carry (``{"token": false}`` and no cookie when no token is set)."""
    auth = request.app[AUTH_KEY]()
    if not auth.token:
        return web.json_response({"token": False})
    _authorize(request)
    response = web.json_response({"token": True})
    response.set_cookie(
        COOKIE,
        auth.cookie_value(),
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="Strict",
    )
    return response
