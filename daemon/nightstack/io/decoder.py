"""Decode frames in a child process, so a LibRaw hang or crash cannot take the daemon down.

A :class:`Decoder` owns one persistent child process (multiprocessing "spawn" context: the parent
has threads, and fork would copy their locks). The child imports the decode function once and
then serves requests one at a time:

- parent -> child over a pipe: the file path and the names of two shared-memory files;
- the child decodes, writes ``image`` and ``luminance`` into those files (in ``/dev/shm``, i.e.
  RAM) with one ``write`` each, and replies with the small rest (shapes, dtypes, path, meta);
  a raw's :class:`~nightstack.frames.Mosaic` goes as its uint16 ADU (one file, half the bytes
  of its float32 values) and per-site black and white levels, the values formed in the parent
  only if something needs them;
- the parent maps the files, unlinks them at once and wraps the mappings as numpy arrays. That
  is the only copy of the pixels after decoding; the pages are freed when the arrays are.

A child that does not answer within ``timeout_s`` is killed (SIGKILL) and restarted; one that
dies (SIGSEGV, SIGABRT, OOM kill, ...) is restarted. Either way the caller gets a
:class:`~nightstack.errors.DecodeError` and the next ``decode`` works normally. A failure that
may not happen again is a :class:`TransientDecodeError`: a timeout (a busy machine, a slow card), a
child killed by SIGKILL (the kernel's OOM killer, an operator) and a read error (``EIO``, or no
file descriptor left: ``EMFILE`` / ``ENFILE``, see :mod:`nightstack.io.frameio`); a
crash by another signal (SIGSEGV: LibRaw on a corrupt file) and every reason about the file's
content are not. Shared-memory files
are named after the parent's pid and unlinked on every path; files left by a parent that was
itself killed are swept when the next :class:`Decoder` starts.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import mmap
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import count
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from nightstack.errors import DecodeError
from nightstack.frames import Frame, FrameMeta, Mosaic
from nightstack.io.frameio import NotAFrameFile, open_frame, transient_error

if TYPE_CHECKING:
    from nightstack.config import Settings  # not at run time: the child need not load it

DEFAULT_DECODE_FN = "nightstack.io.loaders:decode_light"
SHM_PREFIX = "nightstack-decode-"
"""Shared-memory file names: ``nightstack-decode-<parent pid>-<n>-<array>``."""

STARTUP_TIMEOUT_S = 120.0
"""Time a new child gets to import numpy, astropy, OpenCV and rawpy (a Pi with a cold SD card
can take tens of seconds); not counted in ``timeout_s``."""
STOP_GRACE_S = 5.0
"""close(): time the child gets to leave its loop on its own before it is killed."""
_ORPHAN_POLL_S = 1.0  # the child checks this often whether its parent is still alive
_ARRAYS = ("image", "luminance")
"""A Frame's arrays, in segment order; a Mosaic has one, ``adu`` (or ``data``), in the first."""
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
"""Map a decoded frame's pages at once (Linux): one bulk fault instead of one per 4 KB page
when the frame is first read (~10 ms of 24 MP at 2 bytes a pixel)."""
_WRITE_BAND_BYTES = 4 << 20  # a strided array is copied out this much at a time
_DECODE_FN_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TransientDecodeError(DecodeError):
    """A decode that failed for a reason that may pass (see the module docstring): worth one
    more try later, unlike a file that is truncated or not an image."""


@dataclass
class _Child:
    """The current child process and the parent's end of its pipe (None when not running)."""

    process: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    names: list[Path] = field(default_factory=list)  # shm files of the request in flight


class Decoder:
    """Decode frames in one persistent, restartable child process.

    Parameters
    ----------
    timeout_s
        A decode that takes longer is abandoned: the child is killed and restarted, and
        ``decode`` raises ``DecodeError("decode timed out after 60 s")``.
    load_kwargs
        Keyword arguments for the decode function (e.g. ``demosaic``, ``white_balance``,
        ``bin``); they must be picklable.
    decode_fn
        ``"module:function"`` importable in the child, called as ``fn(path, **load_kwargs)`` and
        returning a :class:`~nightstack.frames.Frame` or :class:`~nightstack.frames.Mosaic`.
    shm_dir
        Where the shared-memory files go; default ``/dev/shm`` (RAM), else the temp directory.
    address_space_bytes
        The child's ``RLIMIT_AS`` (bytes of virtual memory; None: no limit): a decode that
        needs more fails with a one-line ``DecodeError`` instead of taking the machine's RAM.

    Use as a context manager or call :meth:`close`; one ``decode`` runs at a time (a lock
    serialises callers).
    """

    def __init__(
        self,
        timeout_s: float = 60.0,
        load_kwargs: Mapping[str, Any] | None = None,
        decode_fn: str = DEFAULT_DECODE_FN,
        *,
        shm_dir: str | Path | None = None,
        address_space_bytes: int | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s!r}")
        if not _DECODE_FN_RE.match(decode_fn):
            raise ValueError(f"decode_fn must be 'module:function', not {decode_fn!r}")
        module = decode_fn.partition(":")[0]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"decode_fn module {module!r} cannot be found")
        self.timeout_s = float(timeout_s)
        self.decode_fn = decode_fn
        self.load_kwargs = dict(load_kwargs or {})
        self.address_space_bytes = address_space_bytes
        self.shm_dir = Path(shm_dir) if shm_dir is not None else _default_shm_dir()
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._child = _Child()
        self._closed = False
        self._requests = count()
        self._last = threading.local()  # .error: what the calling thread's last decode raised
        _sweep_stale_segments(self.shm_dir)
        # Stops the child if the Decoder is dropped or the interpreter exits without close().
        self._finalizer = weakref.finalize(self, _stop_child, self._child, 0.0)
        self._start()

    # --- public ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The child's process id, None while no child is running."""
        process = self._child.process
        return process.pid if process is not None and process.is_alive() else None

    def decode(self, path: str | Path) -> Frame | Mosaic:
        """Decode ``path`` in the child and return the frame (arrays backed by shared memory):
        a :class:`~nightstack.frames.Mosaic` when the decode function gives one (the default,
        ``loaders.decode_light``, does for Bayer raws and FITS), else a ``Frame``.

        Raises
        ------
        TransientDecodeError
            The decode timed out, the child was killed (SIGKILL) or reading the file failed
            (EIO): it may work another time. After a timeout or a kill the child has already
            been restarted.
        DecodeError
            The file cannot be decoded (same reason as in-process), or the child crashed (then
            it has already been restarted).
        RuntimeError
            The decoder is closed.
        """
        self._last.error = None
        try:
            return self._decode(path)
        except DecodeError as err:
            self._last.error = err
            raise

    def last_error(self) -> DecodeError | None:
        """The DecodeError the calling thread's last :meth:`decode` raised, None if it
        succeeded (or none ran): callers that keep only the reason can still tell a
        :class:`TransientDecodeError`."""
        error: DecodeError | None = getattr(self._last, "error", None)
        return error

    def _decode(self, path: str | Path) -> Frame | Mosaic:
        with self._lock:
            if self._closed:
                raise RuntimeError("Decoder is closed")
            if self._child.process is None:
                self._start()
            self._wait_ready()
            request = next(self._requests)
            names = [
                self.shm_dir / f"{SHM_PREFIX}{os.getpid()}-{request}-{array}" for array in _ARRAYS
            ]
            self._child.names = names
            try:
                return self._request(str(path), names)
            finally:
                # On success the files are already unlinked; after a timeout or crash the child
                # is dead by now, so nothing can recreate them.
                for name in names:
                    name.unlink(missing_ok=True)
                self._child.names = []

    def close(self) -> None:
        """Stop the child (politely, then SIGKILL after ``STOP_GRACE_S``); idempotent."""
        with self._lock:
            self._closed = True
            self._finalizer.detach()
            _stop_child(self._child, STOP_GRACE_S)

    def __enter__(self) -> Decoder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- parent side -------------------------------------------------------------------------

    def _start(self) -> None:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main,
            args=(
                child_conn, self.decode_fn, self.load_kwargs, os.getpid(),
                self.address_space_bytes,
            ),
            name="nightstack-decoder",
            daemon=True,  # never outlives an interpreter that forgot close()
        )
        process.start()
        child_conn.close()  # only the child holds its end: its death shows up as EOF here
        self._child.process, self._child.conn, self._child.ready = process, parent_conn, False

    def _restart(self) -> None:
        _stop_child(self._child, 0.0)
        self._start()

    def _wait_ready(self) -> None:
        if self._child.ready:
            return
        reply = self._receive(STARTUP_TIMEOUT_S)
        if reply is None:
            _stop_child(self._child, 0.0)  # started again lazily by the next decode
            raise TransientDecodeError(f"decoder did not start within {STARTUP_TIMEOUT_S:g} s")
        if isinstance(reply, DecodeError):
            _stop_child(self._child, 0.0)
            raise DecodeError(f"decoder failed to start: {reply.reason}")
        if reply[0] != "ready":
            _stop_child(self._child, 0.0)
            raise DecodeError(f"decoder failed to start: {reply[1]}")
        self._child.ready = True

    def _request(self, path: str, names: list[Path]) -> Frame | Mosaic:
        assert self._child.conn is not None
        with contextlib.suppress(OSError, EOFError):  # a dead child: _receive says how it died
            self._child.conn.send((path, [str(n) for n in names]))
        reply = self._receive(self.timeout_s)
        if reply is None:
            self._restart()
            raise TransientDecodeError(f"decode timed out after {self.timeout_s:g} s")
        if isinstance(reply, DecodeError):
            self._restart()
            raise reply
        kind, payload = reply
        if kind == "error":
            raise DecodeError(payload)
        if kind == "transient":
            raise TransientDecodeError(payload)
        try:
            arrays = [
                _map_segment(name, *spec)
                for name, spec in zip(names, payload["arrays"], strict=False)
            ]
        except OSError as err:
            kind = TransientDecodeError if transient_error(err) else DecodeError
            raise kind(f"cannot map decoded frame ({type(err).__name__}: {err})") from err
        if "pattern" in payload:
            common = (payload["pattern"], payload["white_balance"], payload["saturation"])
            if "black" in payload:  # a raw: its ADU and levels, values formed when needed
                return Mosaic.from_adu(
                    Path(payload["path"]),
                    arrays[0],
                    payload["black"],
                    payload["span"],
                    *common,
                    payload["meta"],
                )
            return Mosaic(Path(payload["path"]), arrays[0], *common, payload["meta"])
        return Frame(
            path=Path(payload["path"]),
            image=arrays[0],
            luminance=arrays[1],
            bin=payload["bin"],
            meta=payload["meta"],
        )

    def _receive(self, timeout_s: float) -> Any:
        """The child's next message; None on timeout; a DecodeError if the child died."""
        process, conn = self._child.process, self._child.conn
        assert process is not None and conn is not None
        ready = multiprocessing.connection.wait([conn, process.sentinel], timeout_s)
        if conn in ready:
            try:
                return conn.recv()
            except (EOFError, OSError):
                pass  # died: the pipe closed with it
        elif not ready:
            return None
        process.join(STOP_GRACE_S)
        killed = process.exitcode == -signal.SIGKILL  # the OOM killer's signal
        return (TransientDecodeError if killed else DecodeError)(_death_reason(process.exitcode))


# --- child side ----------------------------------------------------------------------------------


def _child_main(
    conn: Connection,
    decode_fn: str,
    load_kwargs: dict[str, Any],
    parent_pid: int,
    address_space_bytes: int | None = None,
) -> None:
    """The child's loop: import ``decode_fn``, then decode requests until told to stop."""
    # The parent decides when the child ends: a Ctrl-C or systemd's SIGTERM to the whole group
    # must not kill a decode the parent still waits for (e.g. while finalising a session).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no 500 MB core files on an SD card
        if address_space_bytes is not None:  # a bomb fails here, not in the machine's RAM
            resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes, address_space_bytes))
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        fn = _resolve(decode_fn)
    except Exception as err:
        _reply(conn, ("failed", f"cannot import {decode_fn} ({type(err).__name__}: {err})"))
        return
    if not _reply(conn, ("ready", os.getpid())):
        return
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # parent gone
        if request is None:
            return
        path, names = request
        if not _reply(conn, _serve(fn, path, [Path(n) for n in names], load_kwargs)):
            return


def _reply(conn: Connection, message: tuple[str, Any]) -> bool:
    """Send ``message`` to the parent; False (quietly, no traceback) if it is gone."""
    try:
        conn.send(message)
    except (OSError, EOFError):  # BrokenPipeError: the parent was killed or stopped us
        return False
    return True


def _serve(
    fn: Callable[..., Frame | Mosaic], path: str, names: list[Path], load_kwargs: dict[str, Any]
) -> tuple[str, Any]:
    """Decode one file and export its arrays; ("ok", header), or ("error", reason), or
    ("transient", reason) for a read error (EIO)."""
    try:
        with contextlib.suppress(FileNotFoundError):  # the decode function says it its way
            os.close(open_frame(path))  # a FIFO or a device in its place: never waited on
        frame = fn(path, **load_kwargs)
        meta: FrameMeta = frame.meta
        if isinstance(frame, Mosaic):
            header = {
                "path": str(frame.path),
                "pattern": frame.pattern,
                "white_balance": frame.white_balance,
                "saturation": frame.saturation,
                "meta": meta,
            }
            if frame.has_data or frame.adu is None:
                return "ok", {"arrays": [_write_segment(names[0], frame.data)], **header}
            segment = _write_segment(names[0], frame.adu)  # 2 bytes a pixel, not 4
            return "ok", {"arrays": [segment], "black": frame.black, "span": frame.span, **header}
        specs = [
            _write_segment(name, getattr(frame, a)) for name, a in zip(names, _ARRAYS, strict=True)
        ]
        return "ok", {"arrays": specs, "path": str(frame.path), "bin": frame.bin, "meta": meta}
    except NotAFrameFile as err:
        return "error", str(err.strerror)
    except Exception as err:
        for name in names:
            name.unlink(missing_ok=True)
        kind = "transient" if transient_error(err) is not None else "error"
        if isinstance(err, DecodeError):
            return kind, err.reason
        if kind == "transient":
            return kind, f"cannot read file ({type(err).__name__}: {err})"
        if isinstance(err, MemoryError) or "MemoryError" in str(err):
            return "error", "out of memory while decoding (the decoder's address-space limit)"
        if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
            return "error", f"no room for the decoded frame in {names[0].parent} ({err})"
        return "error", f"decoder error ({type(err).__name__}: {err})"


def _write_segment(name: Path, array: np.ndarray) -> tuple[str, tuple[int, ...]]:
    """Write ``array``'s bytes (C order) to a new file ``name``; return (dtype string, shape).
    A strided array (a raw's visible area inside LibRaw's buffer) goes in bands of rows, so it
    is never copied whole."""
    with name.open("xb") as f:
        if array.flags.c_contiguous or array.ndim < 2:
            data = np.ascontiguousarray(array)
            if data.size:
                f.write(data.data.cast("B"))
        else:
            step = max(1, _WRITE_BAND_BYTES // max(array[0].nbytes, 1))
            for r0 in range(0, array.shape[0], step):
                f.write(np.ascontiguousarray(array[r0 : r0 + step]).data.cast("B"))
    return array.dtype.str, tuple(array.shape)


def _resolve(decode_fn: str) -> Callable[..., Frame | Mosaic]:
    module_name, _, function = decode_fn.partition(":")
    fn = getattr(importlib.import_module(module_name), function)
    if not callable(fn):
        raise TypeError(f"{decode_fn} is not callable")
    return fn


def _exit_when_orphaned(parent_pid: int) -> None:
    """Runs in a child thread: leave if the parent dies, even in the middle of a hung decode."""
    while True:
        time.sleep(_ORPHAN_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


# --- shared helpers ------------------------------------------------------------------------------


def _map_segment(name: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Map a file the child wrote, unlink it, and view it as an array (no copy).

    The mapping is shared and writable; it lives as long as the array (and its views) do, and
    since the file is already unlinked the memory is returned when the array is freed.
    """
    fd = os.open(name, os.O_RDWR)
    try:
        os.unlink(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise OSError(f"shared memory file holds {size} bytes, expected {nbytes}")
        buffer = mmap.mmap(fd, nbytes, flags=_MAP_FLAGS)
    finally:
        os.close(fd)
    return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _stop_child(child: _Child, grace_s: float) -> None:
    """Stop the child: ask it to leave if ``grace_s`` > 0, then SIGKILL; reap; clean up."""
    process, conn = child.process, child.conn
    child.process, child.conn, child.ready = None, None, False
    if process is not None:
        if grace_s > 0 and conn is not None and process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
            process.join(grace_s)
        if process.is_alive():
            process.kill()
        process.join()
        process.close()
    if conn is not None:
        conn.close()
    for name in child.names:  # a request in flight when the child was stopped
        name.unlink(missing_ok=True)


def _death_reason(exitcode: int | None) -> str:
    if exitcode == -signal.SIGKILL:
        return "decoder killed (signal SIGKILL: out of memory?)"
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"decoder crashed (signal {name})"
    return f"decoder exited unexpectedly (exit code {exitcode})"


def _default_shm_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def _sweep_stale_segments(directory: Path) -> None:
    """Remove shared-memory files left by decoders whose parent process no longer exists."""
    pattern = re.compile(rf"^{re.escape(SHM_PREFIX)}(\d+)-")
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            match = pattern.match(entry.name)
            if match and not _pid_alive(int(match.group(1))):
                entry.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


_DECODER_BASE_BYTES = 2 << 30  # the decoder child's virtual memory besides its frame


def load_kwargs(settings: Settings) -> dict[str, Any]:
    """The decoder options of a Settings."""
    wb = settings.white_balance
    balance: str | list[float] = (
        wb if wb in ("camera", "daylight", "auto") else [float(v) for v in wb.split(",")]
    )
    return {
        "demosaic": settings.demosaic,
        "white_balance": balance,
        "bin": settings.bin,
        "max_pixels": settings.max_frame_pixels,
    }


def decoder_memory(settings: Settings) -> int:
    """The decoder child's address-space limit (bytes): its libraries' mappings (0.75 GB on
    this machine; more threads, more stacks) plus 32 bytes per pixel of the largest frame
    allowed (LibRaw's buffers and the float32 RGB of its own demosaic: ~28)."""
    return _DECODER_BASE_BYTES + 32 * settings.max_frame_pixels
