"""The web server's life: an aiohttp application on its own thread and event loop.

aiohttp (not Starlette + uvicorn): one well-kept library for the server and the streamed
Server-Sent Events, bounded request parsing (line, header and body sizes) built in, and an idle
event loop with no timers at all, where uvicorn's server loop wakes ten times a second: with no
client connected the web thread sleeps in ``epoll_wait`` and costs no CPU.

The worker never waits for this thread: the server reads the sessions' files and takes the live
state from a snapshot callable (a lock held only to copy a small dict); its one action, closing
the session, goes through the same close-request file as ``nightstack close``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nightstack.address import is_loopback_host, parse_listen
from nightstack.config import Settings, web_token
from nightstack.service.control import request_close
from nightstack.web.api import build_app
from nightstack.web.auth import Auth
from nightstack.web.limits import PER_CLIENT, GatedSite, RepeatFilter, total_cap
from nightstack.web.sessions import SessionFiles

if TYPE_CHECKING:
    from nightstack.capture.control import CaptureControl

log = logging.getLogger("nightstack.web")

_EXECUTOR_THREADS = 3
"""Threads for file work and renders: a render never holds up the JSON answers."""

_START_TIMEOUT_S = 30.0  # bind and start-up; far more than it takes
_STOP_TIMEOUT_S = 10.0
_KEEPALIVE_S = 75.0  # an idle HTTP connection is closed after this
_MAX_LINE = 4096  # request line (method, path, query), bytes: 400 beyond
_MAX_FIELD = 8190  # one header line, bytes
_MAX_HEADERS = 64  # header lines


THREAD_NAME = "nightstack-web"
"""The server thread's name, also given to the OS thread (``top -H``, /proc/PID/task/*/comm)."""


def _name_os_thread(name: str) -> None:
    """Name the calling OS thread (Linux ``prctl(PR_SET_NAME)``, 15 bytes); elsewhere nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):
        pass


class WebServer:
    """``nightstack watch``'s web page and API.

    Parameters
    ----------
    output : Path
        The daemon's output folder (the sessions).
    listen : str
        ``HOST:PORT`` (port 0: any free port; :attr:`port` tells which).
    token : str or None
        ``web_token``: reading and actions need it (see ``auth.py``).
    status : callable
        Thread-safe snapshot of the daemon (see ``api.build_app``).
    close : callable
        Asks the daemon to close its open session.
    hosts : iterable of str
        ``web_hosts``: extra host names the page is reached by.
    per_client, total : int or None
        Connection caps (default :data:`~nightstack.web.limits.PER_CLIENT` and
        :func:`~nightstack.web.limits.total_cap`).
    capture : CaptureControl or None
        The tethered capture, for its routes (``web/capture.py``).
    """

    def __init__(
        self,
        output: Path,
        listen: str,
        *,
        token: str | None,
        status: Callable[[], dict[str, Any]],
        close: Callable[[], None],
        hosts: tuple[str, ...] | list[str] = (),
        per_client: int | None = None,
        total: int | None = None,
        capture: CaptureControl | None = None,
    ) -> None:
        self.host, self.port = parse_listen(listen)
        self.auth = Auth(token, frozenset(hosts))
        self.caps = {
            "per_client": per_client or PER_CLIENT,
            "total": total or total_cap(),
        }
        self.site: GatedSite | None = None
        self.sessions = SessionFiles(output)
        self._status, self._close = status, close
        self.capture = capture  # --- capture ---
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.app: web.Application | None = None  # while serving

    @property
    def token(self) -> str | None:
        return self.auth.token

    def reconfigure(self, token: str | None, hosts: tuple[str, ...] | list[str]) -> None:
        """New access rules from any thread (SIGHUP); the next request follows them."""
        self.auth = Auth(token, frozenset(hosts), self.auth.names)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Bind and serve on a new thread; returns once it listens. Raises OSError when the
        address cannot be bound (in use, not this machine's)."""
        self._thread = threading.Thread(target=self._serve, name=THREAD_NAME, daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise OSError(f"the web server did not start within {_START_TIMEOUT_S:g} s")
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join(_STOP_TIMEOUT_S)
            raise error
        log.info("web page at %s", self.url)
        log.info(
            "web: at most %d connections per client, %d in all",
            self.caps["per_client"], self.caps["total"],
        )  # fmt: skip
        if not self.token and not is_loopback_host(self.host):
            log.warning(
                "web page open to the network on %s without web_token: anyone there can see "
                "the sessions; closing a session is allowed only from this machine",
                self.url,
            )

    def stop(self) -> None:
        """End the event streams, close the connections and the thread (idempotent)."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                log.warning("the web server did not stop within %g s", _STOP_TIMEOUT_S)
        self._thread = None

    # --- the thread -----------------------------------------------------------------------
    def _serve(self) -> None:
        _name_os_thread(THREAD_NAME)
        for name in ("asyncio", "nightstack.web"):  # no flood of one line (accept errors)
            logger = logging.getLogger(name)
            if not any(isinstance(f, RepeatFilter) for f in logger.filters):
                logger.addFilter(RepeatFilter())
        try:
            asyncio.run(self._main())
        except BaseException as err:  # a start-up failure is reported to start()
            if not self._ready.is_set():
                self._error = err
                self._ready.set()
            else:
                log.exception("the web server stopped on an error")

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        executor = concurrent.futures.ThreadPoolExecutor(
            _EXECUTOR_THREADS, thread_name_prefix="nightstack-web-io"
        )
        loop.set_default_executor(executor)
        app = build_app(
            self.sessions, status=self._status, close=self._close, auth=lambda: self.auth,
            capture=self.capture,
        )  # fmt: skip
        self.app = app
        runner = web.AppRunner(
            app,
            handle_signals=False,
            handler_cancellation=True,  # a client that hangs up ends its event stream at once
            access_log=None,
            keepalive_timeout=_KEEPALIVE_S,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_FIELD,
            max_headers=_MAX_HEADERS,
            shutdown_timeout=2.0,
        )
        await runner.setup()
        try:
            site = GatedSite(runner, self.host, self.port, self.caps)
            self.site = site
            await site.start()
            if self.port == 0 and runner.addresses:
                self.port = int(runner.addresses[0][1])  # the port the system chose
            self._stop = asyncio.Event()
            self._loop = loop
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            executor.shutdown(wait=False, cancel_futures=True)


def start_web(
    settings: Settings,
    output: Path,
    status: Callable[[], dict[str, Any]],
    capture: CaptureControl | None = None,
) -> WebServer | None:
    """Serve the page and API of the daemon writing into ``output`` (and of its tethered
    ``capture``) on their own thread (None with ``web_enabled`` false). A port that cannot be
    bound costs the page, not the night: the error is logged and stacking goes on (None)."""
    if not settings.web_enabled:
        return None
    server = WebServer(
        output,
        settings.web_listen,
        token=web_token(settings),
        hosts=settings.web_hosts,
        status=status,
        close=lambda: request_close(output),
        capture=capture,
    )
    try:
        server.start()
    except OSError as err:
        log.error(
            "web page not started: cannot listen on %s (%s); stacking goes on without it",
            settings.web_listen,
            err.strerror or err,
        )
        return None
    return server
