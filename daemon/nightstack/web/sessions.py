"""Sessions as the web server sees them: read-only, from their files in the output folder.

A session is addressed only by its id, the name of its folder directly under the output folder
(``20261130-214502`` or ``20261130-214502-2``); a file only by one of the fixed names in
:data:`DOWNLOADS`. Nothing a client sends becomes part of a path: an id that is not a plain
folder name holding a ``session.json`` (``..``, an encoded slash, a symlink) is simply not found.

Safe to call from several threads at once (the server's executor threads).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from astropy.io import fits

from nightstack.formats import FITS_EXTENSIONS
from nightstack.products.extras import TIMELAPSE
from nightstack.products.views import LAST_FRAME, LINEAR_PREVIEW
from nightstack.service.folder import (
    JOURNAL,
    LIVE_FITS,
    PREVIEW,
    SESSION,
    SESSION_ID,
    STACK_FITS,
    STACK_TIF,
    parse_journal,
)

DOWNLOADS = {
    PREVIEW: "image/jpeg",
    LIVE_FITS: "application/fits",
    STACK_TIF: "image/tiff",
    STACK_FITS: "application/fits",
}
"""The files of a session the server hands out as downloads, with their media types."""

VIEWS = {
    LAST_FRAME: "image/jpeg",
    TIMELAPSE: "video/mp4",
}
"""Files the page shows inline besides the downloads (listed under ``views``)."""

SERVED = {**DOWNLOADS, **VIEWS}
"""Every file of a session the server hands out: nothing else is ever read for a client."""

_JOURNALS_CACHED = 4
"""Journals whose parsed records are kept (the open session and a few being browsed): about
1 KB per frame each."""

_READ_CHUNK = 1 << 20  # bytes of new journal read at a time

log = logging.getLogger("nightstack.web")

_NAME_CHARS = 80  # a target name longer than this is cut (it is shown on the image)


class _Journal:
    """The parsed complete lines of one ``journal.jsonl``, read on from where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.offset = 0  # bytes of the file up to the end of the last complete record
        self.inode: int | None = None
        self.lock = threading.Lock()

    def refresh(self) -> list[dict[str, Any]]:
        """The records now, reading only what was appended since the last call.

        The journal's one reading rule (:func:`nightstack.service.folder.parse_journal`): a torn
        tail waits for its newline, garbage lines are skipped. A journal that shrank or was replaced
        (a resume cuts a torn tail off or drops garbage lines) is read again from the top.
        """
        with self.lock:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                self.records, self.offset, self.inode = [], 0, None
                return []
            try:
                st = os.fstat(fd)
                if st.st_ino != self.inode or st.st_size < self.offset:
                    self.records, self.offset, self.inode = [], 0, st.st_ino
                pending = b""
                position = self.offset
                while position < st.st_size:
                    chunk = os.pread(fd, min(_READ_CHUNK, st.st_size - position), position)
                    if not chunk:
                        break
                    position += len(chunk)
                    records, good, _ = parse_journal(pending + chunk)
                    self.records.extend(records)
                    self.offset += good
                    pending = (pending + chunk)[good:]
            finally:
                os.close(fd)
            return self.records


class SessionFiles:
    """Read access to the sessions under ``output``.

    Parameters
    ----------
    output : Path
        The daemon's output folder; each session is a folder directly in it.
    """

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        self._journals: OrderedDict[str, _Journal] = OrderedDict()
        self._metas: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._objects: dict[str, tuple[str | None]] = {}  # reference file -> its OBJECT
        self._lock = threading.Lock()

    # --- lookup ---------------------------------------------------------------------------
    def directory(self, session_id: str) -> Path | None:
        """The folder of session ``session_id``, or None when there is no such session."""
        if not SESSION_ID.match(session_id):
            return None
        path = self.output / session_id
        if path.is_symlink() or not path.is_dir():
            return None
        meta = path / SESSION
        if meta.is_symlink() or not meta.is_file():
            return None
        return path

    def file(self, session_id: str, name: str) -> Path | None:
        """The file ``name`` (one of :data:`SERVED`) of a session, or None if absent."""
        directory = self.directory(session_id)
        if directory is None or name not in SERVED:
            return None
        return _regular(directory / name)

    def linear(self, session_id: str, *, full: bool = False) -> Path | None:
        """The linear image the stretch controls render: a closed session's ``stack.fits``
        (the final), else the ``preview_linear.fits`` written with every preview (as fresh as
        ``preview.jpg``), else ``live.fits``; with ``full`` (a 1:1 crop) the final or
        ``live.fits`` only. None when the session has none."""
        directory = self.directory(session_id)
        if directory is None:
            return None
        meta = self.meta(session_id) or {}
        names = [LINEAR_PREVIEW, LIVE_FITS] if not full else [LIVE_FITS]
        if meta.get("state") == "closed":
            names.insert(0, STACK_FITS)
        return next((p for n in names if (p := _regular(directory / n)) is not None), None)

    # --- content --------------------------------------------------------------------------
    def meta(self, session_id: str) -> dict[str, Any] | None:
        """The session's ``session.json`` as a dict (cached until the file changes)."""
        directory = self.directory(session_id)
        if directory is None:
            return None
        path = directory / SESSION
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._metas.get(session_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(meta, dict):
            return None
        with self._lock:
            self._metas[session_id] = (key, meta)
        return meta

    def target(self, session_id: str) -> dict[str, Any]:
        """What the page writes on the image: ``name`` (``session.json``'s ``target``, which
        plate solving writes; else the reference frame's FITS ``OBJECT``; else the name of the
        folder the frames came from; else None), where it came from (``name_from``), and the
        solved field ``field_deg`` ([width, height] in degrees, or None)."""
        meta = self.meta(session_id) or {}
        name, source = _text(meta.get("target")), "solve"
        reference = meta.get("reference")
        if name is None and isinstance(reference, str) and reference:
            with self._lock:
                cached = self._objects.get(reference)
            if cached is None:
                cached = (_fits_object(Path(reference)),)
                with self._lock:
                    self._objects[reference] = cached
            name, source = cached[0], "fits"
            if name is None:
                name, source = _text(Path(reference).parent.name), "folder"
        solve = meta.get("solve")
        field = None
        if isinstance(solve, dict):
            w, h = solve.get("field_w_deg"), solve.get("field_h_deg")
            if isinstance(w, int | float) and isinstance(h, int | float) and _positive(w, h):
                field = [float(w), float(h)]
        return {"name": name, "name_from": source if name else None, "field_deg": field}

    def frames(self, session_id: str, since: int = 0) -> list[dict[str, Any]] | None:
        """The journal records of a session from index ``since`` on (journal order), or None
        when there is no such session. A session without a journal yet has no records."""
        directory = self.directory(session_id)
        if directory is None:
            return None
        with self._lock:
            journal = self._journals.get(session_id)
            if journal is None:
                journal = _Journal(directory / JOURNAL)
                self._journals[session_id] = journal
                while len(self._journals) > _JOURNALS_CACHED:
                    self._journals.popitem(last=False)
            else:
                self._journals.move_to_end(session_id)
        records = journal.refresh()
        return records[since:]

    def count(self, session_id: str) -> int:
        """How many complete records the session's journal has."""
        records = self.frames(session_id)
        return 0 if records is None else len(records)

    def listing(self) -> list[dict[str, Any]]:
        """Every session, newest first: id, state, times, counts and the downloads present."""
        found = []
        try:
            entries = list(os.scandir(self.output))
        except OSError:
            return []
        for entry in entries:
            if not SESSION_ID.match(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            meta = self.meta(entry.name)
            if meta is None:
                continue
            files = [n for n in DOWNLOADS if self.file(entry.name, n) is not None]
            views = [n for n in VIEWS if self.file(entry.name, n) is not None]
            found.append(
                {
                    "session": entry.name,
                    "state": meta.get("state"),
                    "started": meta.get("started"),
                    "updated": meta.get("updated"),
                    "accepted": meta.get("accepted"),
                    "rejected": meta.get("rejected"),
                    "total_exposure_s": meta.get("total_exposure_s"),
                    "first_frame_time": meta.get("first_frame_time"),
                    "last_frame_time": meta.get("last_frame_time"),
                    "files": files,
                    "views": views,
                    "stretch": self.linear(entry.name) is not None,
                    "crop": self.linear(entry.name, full=True) is not None,
                    "target": self.target(entry.name),
                }
            )
        found.sort(key=lambda s: (str(s["started"] or ""), s["session"]), reverse=True)
        return found


def _regular(path: Path) -> Path | None:
    """``path`` if it is a regular file (not a symlink), else None."""
    if path.is_symlink() or not path.is_file():
        return None
    return path


def _text(value: Any) -> str | None:
    """A non-empty one-line string of at most ``_NAME_CHARS``, or None."""
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())[:_NAME_CHARS]
    return text or None


def _positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def _fits_object(path: Path) -> str | None:
    """The ``OBJECT`` card of a FITS frame's primary header, or None (not FITS, gone,
    unreadable: said once in the log, at debug level)."""
    if path.suffix.lower() not in FITS_EXTENSIONS:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = fits.getheader(path)
    except (OSError, ValueError, KeyError, IndexError) as err:
        log.debug("web: no OBJECT from %s (%s)", path.name, err)
        return None
    return _text(header.get("OBJECT"))
