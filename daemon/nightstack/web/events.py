"""Server-Sent Events: one event per journaled frame, per new preview, per change of status.

The hub watches only while at least one client listens: the first subscriber starts a task
that every :data:`POLL_S` seconds takes the daemon's status snapshot, reads what was appended to
the watched session's journal and stats its ``preview.jpg``; the last one to leave ends it.
With no client there is no task, no timer and no file access (no CPU). The watched session is
the open one, or, after it closed, the last one that was open (its final preview still comes).

Events (``event:`` name, ``data:`` one JSON object):

- ``frame``: ``{"session", "index", "record"}``, ``index`` the record's position in the journal;
- ``preview``: ``{"session", "version"}``, ``version`` changing with each new preview;
- ``status``: the ``/api/status`` object, when anything but the uptime changed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Callable
from typing import Any

from nightstack.web.sessions import SessionFiles

POLL_S = 0.5
"""How often the journal and the preview are looked at while a client listens: a new frame
shows within half a second, for a few stat calls a second."""

QUEUE_EVENTS = 512
"""Events a slow client may fall behind by before it is dropped (it reconnects and catches up
from the API)."""

MAX_STREAMS = 16
"""Event streams open at once (each is a connection and a queue). A new one beyond ends the
oldest stream of the client holding the most: a newcomer is never locked out."""

STREAMS_PER_CLIENT = 4
"""Event streams of one client address (a phone and a laptop behind one NAT, or a page open
in a few tabs); a new one beyond ends that client's oldest."""


def encode(name: str, data: dict[str, Any]) -> bytes:
    """One SSE message (the JSON has no newline, so one ``data:`` line)."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventHub:
    """Fans events out to the connected clients; lives on the server's event loop.

    Parameters
    ----------
    sessions : SessionFiles
        Where journals and previews are read.
    status : callable
        The ``/api/status`` object now (cheap, thread-safe).
    """

    def __init__(self, sessions: SessionFiles, status: Callable[[], dict[str, Any]]) -> None:
        self.sessions = sessions
        self.status = status
        # the queues of the streams, oldest first, with each one's client address
        self._clients: dict[asyncio.Queue[bytes | None], str] = {}
        self._task: asyncio.Task[None] | None = None
        self._watched: str | None = None  # session id
        self._count = 0  # journal records of the watched session already announced
        self._preview: tuple[int, int] | None = None  # (mtime_ns, size) announced
        self._status: dict[str, Any] | None = None

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def subscribe(self, client: str = "") -> asyncio.Queue[bytes | None]:
        """A new stream's queue for ``client`` (its address); events after this call are
        delivered to it. Ends an older stream when the bounds above are reached."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_EVENTS)
        if self._task is None or self._task.done():
            await asyncio.to_thread(self._baseline)  # what exists now is not news
            self._task = asyncio.get_running_loop().create_task(self._watch())
        own = [q for q, c in self._clients.items() if c == client]
        if len(own) >= STREAMS_PER_CLIENT:
            self._end(own[0])
        elif len(self._clients) >= MAX_STREAMS:
            counts = collections.Counter(self._clients.values())
            greedy = max(counts, key=lambda c: counts[c])  # first of the most: oldest stream
            self._end(next(q for q, c in self._clients.items() if c == greedy))
        self._clients[queue] = client
        return queue

    def _end(self, queue: asyncio.Queue[bytes | None]) -> None:
        """End one stream: its handler reads the None and returns."""
        self._clients.pop(queue, None)
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                queue.get_nowait()
        queue.put_nowait(None)

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._clients.pop(queue, None)
        if not self._clients and self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        """End every stream (server shutdown)."""
        for queue in list(self._clients):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._clients.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- watching ---------------------------------------------------------------------------
    def _baseline(self) -> None:
        status = self.status()
        self._status = _comparable(status)
        self._watched = status.get("session") or self._watched
        self._count = self.sessions.count(self._watched) if self._watched else 0
        self._preview = self._preview_version(self._watched)

    def _preview_version(self, session_id: str | None) -> tuple[int, int] | None:
        if session_id is None:
            return None
        path = self.sessions.file(session_id, "preview.jpg")
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _scan(self) -> list[bytes]:
        """One look (on an executor thread): the events since the last look."""
        events: list[bytes] = []
        status = self.status()
        now = _comparable(status)
        if now != self._status:
            self._status = now
            events.append(encode("status", status))
        current = status.get("session")
        if current is not None and current != self._watched:
            self._watched, self._count, self._preview = current, 0, None
        session = self._watched
        if session is None:
            return events
        records = self.sessions.frames(session, self._count) or []
        for offset, record in enumerate(records):
            index = self._count + offset
            events.append(encode("frame", {"session": session, "index": index, "record": record}))
        self._count += len(records)
        version = self._preview_version(session)
        if version is not None and version != self._preview:
            self._preview = version
            events.append(encode("preview", {"session": session, "version": f"{version[0]}"}))
        return events

    async def _watch(self) -> None:
        while self._clients:
            await asyncio.sleep(POLL_S)
            for event in await asyncio.to_thread(self._scan):
                for queue in list(self._clients):
                    try:
                        queue.put_nowait(event)
                    except asyncio.QueueFull:  # too slow: drop it, it reconnects
                        self._end(queue)


def _comparable(status: dict[str, Any]) -> dict[str, Any]:
    """The status without what changes on its own (uptime, free disk)."""
    return {k: v for k, v in status.items() if k not in ("uptime_s", "disk_free_bytes")}
