"""The capture's routes: its status, and start / pause / resume / stop from the page.

``GET /api/capture`` reads like every other route (the Host rule, the token when one is set);
the actions are ``POST`` and follow the page's action rules (``api._authorize``, handed over by
the app: the token, or this machine only without one; never another site's page).
``/api/status`` (and so the event stream's ``status`` events) carries the same object under
``capture``: the page sees a frame land, the exposure's end and the next start within the
stream's half-second poll.

``POST /api/capture/start`` takes an optional JSON object with any of ``exposure_s``, ``iso``,
``count``, ``interval_s``, ``delay_s`` (numbers): they change the ``capture_*`` settings' plan.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from nightstack.capture.control import CaptureControl

Authorize = Callable[[web.Request], None]
"""Raises 401/403 unless a request may take an action (the page's rules: ``api._authorize``)."""

CAPTURE_KEY = web.AppKey("capture", CaptureControl)
AUTHORIZE_KEY: web.AppKey[Authorize] = web.AppKey("capture_authorize")

FIELDS: dict[str, type] = {
    "exposure_s": float, "iso": int, "count": int, "interval_s": float, "delay_s": float,
}  # fmt: skip
"""What a start may change, and each one's type."""


def add_capture_routes(
    app: web.Application,
    capture: CaptureControl,
    status: Callable[[], dict[str, Any]],
    authorize: Authorize,
) -> Callable[[], dict[str, Any]]:
    """Register the routes, the actions behind ``authorize``; return ``status`` with the
    capture's under ``capture``."""
    app[CAPTURE_KEY] = capture
    app[AUTHORIZE_KEY] = authorize
    app.router.add_get("/api/capture", _status)
    app.router.add_post("/api/capture/start", _start)
    for action in ("pause", "resume", "stop"):
        app.router.add_post(f"/api/capture/{action}", _action)

    def with_capture() -> dict[str, Any]:
        return {**status(), "capture": capture.status()}

    return with_capture


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[CAPTURE_KEY].status())


def parse_changes(body: bytes) -> dict[str, Any]:
    """The plan changes of a start request; ValueError with a one-line reason."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the body is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}: only {', '.join(FIELDS)}")
    changes: dict[str, Any] = {}
    for name, value in data.items():
        if value is None and name == "iso":
            changes[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: a number, not {json.dumps(value)[:40]}")
        if not math.isfinite(value) or (FIELDS[name] is int and value != int(value)):
            raise ValueError(f"{name}: a finite {FIELDS[name].__name__}, not {value}")
        changes[name] = FIELDS[name](value)
    return changes


async def _start(request: web.Request) -> web.Response:
    request.app[AUTHORIZE_KEY](request)
    try:
        changes = parse_changes(await request.read())
    except ValueError as err:
        raise web.HTTPBadRequest(reason=str(err)) from err
    control = request.app[CAPTURE_KEY]
    if control.running():
        raise web.HTTPConflict(reason="a capture sequence is running already: stop it first")
    try:
        await asyncio.to_thread(control.start, **changes)
    except ValueError as err:
        raise web.HTTPBadRequest(reason=str(err)) from err
    return web.json_response(control.status(), status=202)


async def _action(request: web.Request) -> web.Response:
    request.app[AUTHORIZE_KEY](request)
    control = request.app[CAPTURE_KEY]
    action = request.path.rsplit("/", 1)[1]
    if not control.running():
        raise web.HTTPConflict(reason="no capture sequence is running")
    getattr(control, action)()
    return web.json_response(control.status(), status=202)
