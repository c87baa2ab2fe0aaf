"""What the web server may take from the process: connections (file descriptors), log lines.

Every accepted connection is a file descriptor, and the frame path needs descriptors too (the
frame, the decoder's pipes, the store, the outputs). Without a cap, 1100 half-sent requests
from one client held a daemon at its limit of 1024 and good frames were rejected "Too many
open files". :class:`ConnectionGate` admits a connection only while its client has fewer than
:data:`PER_CLIENT` open and all clients fewer than :func:`total_cap` (below the descriptor
limit, :data:`FD_RESERVE` kept for the rest of the daemon); any other is closed at once.

:class:`RepeatFilter` rate-limits repeated log lines (asyncio's "socket.accept() out of system
resource" came 4400 times a second with a traceback each).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import web

PER_CLIENT = 32
"""Connections one client address may hold open (a browser opens about 6 per server)."""

MAX_CONNECTIONS = 256
"""Connections open at once, all clients together, when the descriptor limit allows."""

FD_RESERVE = 256
"""Descriptors kept for the frame path and outputs (the daemon uses ~60 at rest; a decode,
a store write and a final add a few each)."""

BACKLOG = 32
"""Listen backlog, also the most connections asyncio accepts at once before the gate sees
them: the descriptors a burst can hold for a moment beyond the caps."""

REPEAT_WINDOW_S = 60.0
"""A log line repeated within this many seconds is dropped (a count of them follows later)."""


def total_cap() -> int:
    """Connections open at once: :data:`MAX_CONNECTIONS`, or fewer when the soft
    ``RLIMIT_NOFILE`` minus :data:`FD_RESERVE` is lower (at least 8)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft - FD_RESERVE))


def _client(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class _Gatekeeper(asyncio.Protocol):
    """The first protocol of every connection: hands an admitted one to aiohttp's handler,
    closes the rest."""

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.gate.admit(transport):
            assert isinstance(transport, asyncio.Transport)
            transport.abort()  # the descriptor is released at once, nothing is read
            return
        handler = self.gate.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        pass  # only for refused connections: admitted ones report to their handler


class ConnectionGate:
    """Counts open connections per client address and admits new ones under the caps.

    Parameters
    ----------
    server : aiohttp.web.Server
        The runner's server (``AppRunner.server``): makes the handler of each connection.
    per_client, total : int
        The caps (see :data:`PER_CLIENT`, :func:`total_cap`).
    """

    def __init__(self, server: web.Server, *, per_client: int, total: int) -> None:
        self.server = server
        self.per_client, self.total = per_client, total
        self._open: dict[str, set[asyncio.BaseTransport]] = {}
        self.refused = 0  # connections closed at once, for the log and the tests

    def open_connections(self) -> int:
        """Connections open now (closed ones forgotten)."""
        for client in list(self._open):
            live = {t for t in self._open[client] if not t.is_closing()}
            if live:
                self._open[client] = live
            else:
                del self._open[client]
        return sum(len(s) for s in self._open.values())

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        client = _client(transport)
        total = self.open_connections()
        if total >= self.total or len(self._open.get(client, ())) >= self.per_client:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                logging.getLogger("nightstack.web").warning(
                    "web: connection from %s refused (%d open from it, %d in all; caps %d and "
                    "%d); %d refused so far",
                    client, len(self._open.get(client, ())), total, self.per_client,
                    self.total, self.refused,
                )  # fmt: skip
            return False
        self._open.setdefault(client, set()).add(transport)
        return True

    def factory(self) -> asyncio.Protocol:
        """The protocol factory for ``loop.create_server``."""
        return _Gatekeeper(self)


class GatedSite(web.BaseSite):
    """A TCP site whose connections pass a :class:`ConnectionGate` first."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, gate_kwargs: Any) -> None:
        super().__init__(runner)
        self._host, self._port = host, port
        self._gate_kwargs = gate_kwargs
        self.gate: ConnectionGate | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self.gate = ConnectionGate(server, **self._gate_kwargs)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.gate.factory, self._host, self._port, reuse_address=True, backlog=BACKLOG
        )


class RepeatFilter(logging.Filter):
    """Drops a log line whose message (its format string) was logged within the last
    :data:`REPEAT_WINDOW_S` seconds; the next one let through says how many were dropped."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (last let through, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{str(record.msg).split(chr(10), 1)[0]}"  # its first line
        now = time.monotonic()
        last, dropped = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.window_s:
            self._seen[key] = (last, dropped + 1)
            return False
        if len(self._seen) > 1000:  # bounded: forget everything older than the window
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
        self._seen[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} like it in the last {self.window_s:g} s)"
        return True
