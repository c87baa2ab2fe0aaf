"""systemd integration: service notifications (sd_notify(3)) and journal logging.

Inert outside systemd: without ``NOTIFY_SOCKET`` every :class:`Notifier` call is a no-op and
:func:`setup_logging` writes plain text to stderr.

Notification backend: systemd-python's ``daemon.notify`` (libsystemd ``sd_notify``) when it is
importable, else the same datagram written here to ``NOTIFY_SOCKET`` over ``AF_UNIX`` /
``SOCK_DGRAM`` (a filesystem path, or an abstract socket written ``@name``). The environment
variables read here (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``, ``JOURNAL_STREAM``,
``INVOCATION_ID``) are systemd's protocol, not settings.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import time
from types import ModuleType
from typing import Literal

log = logging.getLogger(__name__)

SYSLOG_IDENTIFIER = "nightstack"
"""The journal's SYSLOG_IDENTIFIER: ``journalctl -t nightstack`` finds the daemon's messages."""

_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_JOURNAL_FORMAT = "%(message)s"  # the journal stores time, priority and identifier itself
_HANDLER_NAME = "nightstack-main"  # marks the handler setup_logging installed

# syslog priorities (journald PRIORITY=) of the logging levels, highest level first.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7

Backend = Literal["libsystemd", "socket", "none"]


def _systemd_module(name: str) -> ModuleType | None:
    """``systemd.<name>`` from systemd-python, or None when it is not installed."""
    try:
        return importlib.import_module(f"systemd.{name}")
    except ImportError:
        return None


def _socket_address(value: str) -> bytes | None:
    """The sockaddr_un path of ``NOTIFY_SOCKET``; None when unset or not an AF_UNIX socket.

    ``/run/...`` is a filesystem socket, ``@name`` the abstract socket ``\\0name``. Other forms
    (systemd >= 254 also accepts ``vsock:CID:PORT``) are not supported by the fallback.
    """
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def _watchdog_usec(usec: str | None, pid: str | None) -> int | None:
    """``WATCHDOG_USEC`` in microseconds if it applies to this process, else None.

    systemd sets ``WATCHDOG_PID`` to the main process; a child that inherited the environment
    must not ping (its pings would be rejected with ``NotifyAccess=main`` anyway).
    """
    if not usec:
        return None
    try:
        value = int(usec)
        owner = int(pid) if pid else os.getpid()
    except ValueError:
        return None
    if value <= 0 or owner != os.getpid():
        return None
    return value


def _one_line(text: str) -> str:
    """A notification value: the protocol is newline-separated KEY=VALUE assignments."""
    return " ".join(text.splitlines())


class Notifier:
    """Tells the service manager how the daemon is doing (``Type=notify`` services).

    Reads the environment once, at construction: create it in the main process after start-up
    (systemd sets the variables before exec). Every method returns True when a message was sent
    and False when it was not (not under systemd, or the send failed: a failed send is logged
    once at WARNING and never raises, so a notification cannot take the daemon down). Safe to
    call from any thread: each message is one datagram.

    ``use_library=False`` forces the built-in datagram writer even when systemd-python is
    installed (the fallback path, for tests).
    """

    def __init__(self, *, use_library: bool = True) -> None:
        self._address = _socket_address(os.environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(
            os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
        )
        daemon = _systemd_module("daemon") if use_library else None
        self._daemon = daemon if self._address is not None else None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens (``NOTIFY_SOCKET`` usable)."""
        return self._address is not None

    @property
    def backend(self) -> Backend:
        """How messages are sent: ``"libsystemd"`` (systemd-python), ``"socket"`` or ``"none"``."""
        if self._address is None:
            return "none"
        return "libsystemd" if self._daemon is not None else "socket"

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between :meth:`watchdog` pings: half of ``WatchdogSec=``; None if no watchdog."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up checks passed (after config and session resume, before work)."""
        return self._send("READY=1", status)

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status`` (newlines become spaces)."""
        return self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1`` keep-alive; sent only when the unit has ``WatchdogSec=`` set."""
        if self._watchdog_usec is None:
            return False
        return self._send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown began (the final combine may follow; see extend_timeout)."""
        return self._send("STOPPING=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1``: a reload (SIGHUP) began; call :meth:`ready` when it is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}", status)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more of the start or stop timeout.

        While stopping, the watchdog no longer applies and ``TimeoutStopSec=`` bounds the final
        combine; a long combine can call this every few tiles to stay within it.
        """
        return self._send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1e6))}")

    def _send(self, message: str, status: str | None = None) -> bool:
        if self._address is None:
            return False
        if status is not None:
            message += f"\nSTATUS={_one_line(status)}"
        try:
            if self._daemon is not None:
                return bool(self._daemon.notify(message))
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8"), self._address)
            return True
        except OSError as err:
            if not self._warned:
                self._warned = True
                log.warning("systemd notification failed (%s); further failures are silent", err)
            return False


# --- logging -------------------------------------------------------------------------------
def _stderr_is_journal() -> bool:
    """``JOURNAL_STREAM`` names stderr's device:inode when systemd connected it to the journal.

    Comparing them (as systemd.exec(5) advises) ignores a value inherited by, say, a terminal
    started from a service.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def running_under_systemd() -> bool:
    """True when started by systemd: stderr is the journal, or ``INVOCATION_ID`` is set and
    stderr is not a terminal."""
    if _stderr_is_journal():
        return True
    if not os.environ.get("INVOCATION_ID"):
        return False
    try:
        return not os.isatty(sys.stderr.fileno())
    except (OSError, AttributeError, ValueError):
        return True


def _priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


class _SyslogPrefixFormatter(logging.Formatter):
    """``<priority>message``: journald reads the prefix on a service's stderr (no library)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_priority(record.levelno)}>{super().format(record)}"


def setup_logging(level: str, *, under_systemd: bool | None = None) -> logging.Handler:
    """Send all logging (the root logger) to the journal under systemd, else to stderr.

    Under systemd (``under_systemd`` None: detected by :func:`running_under_systemd`) records go
    through systemd-python's ``JournalHandler`` with ``SYSLOG_IDENTIFIER=nightstack``; upper-case
    ``extra`` keys become journal fields, e.g.
    ``log.info("frame %s accepted", n, extra={"SESSION": s, "FRAME": n, "STATUS": "accepted"})``
    is found by ``journalctl -t nightstack STATUS=accepted``. Without systemd-python, stderr with a
    ``<priority>`` prefix journald understands (the extra fields are then lost). Otherwise plain
    ``time level message`` lines on stderr.

    Replaces a handler installed by an earlier call and a plain stderr/stdout ``StreamHandler``
    (``logging.basicConfig``); other handlers stay. ``level``: DEBUG, INFO, WARNING, ERROR or
    CRITICAL (any case). Returns the installed handler.
    """
    levels = logging.getLevelNamesMapping()
    name = level.upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}")
    if under_systemd is None:
        under_systemd = running_under_systemd()

    handler: logging.Handler
    journal = _systemd_module("journal") if under_systemd else None
    if journal is not None:
        handler = journal.JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
        handler.setFormatter(logging.Formatter(_JOURNAL_FORMAT))
    elif under_systemd:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_SyslogPrefixFormatter(_JOURNAL_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_PLAIN_FORMAT))
    handler.set_name(_HANDLER_NAME)

    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME or _is_console_handler(old):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levels[name])
    return handler


def _is_console_handler(handler: logging.Handler) -> bool:
    """A plain StreamHandler on stderr/stdout, as ``logging.basicConfig`` installs."""
    if type(handler) is not logging.StreamHandler:  # not a subclass (pytest's, a file's)
        return False
    return isinstance(handler, logging.StreamHandler) and handler.stream in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )


def shown(text: str) -> str:
    """``text`` fit for one log line: control characters (a newline in a file name) and bytes
    that were not UTF-8 are written as escapes."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))
