"""systemd notifications and journal logging, through real sockets and real processes.

A datagram socket bound in a temporary directory plays the service manager (``NOTIFY_SOCKET``);
for the journal, a child process in a private mount namespace binds its own
/run/systemd/journal/socket and reads what libsystemd sends there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nightstack.service.notify import Notifier, running_under_systemd, setup_logging

HAVE_LIBRARY = importlib.util.find_spec("systemd") is not None
ROOT = Path(__file__).resolve().parents[1]
RECV_TIMEOUT_S = 5.0  # generous: a datagram to a local socket arrives in microseconds

BACKENDS = [
    pytest.param(
        True,
        id="libsystemd",
        marks=pytest.mark.skipif(not HAVE_LIBRARY, reason="systemd-python not installed"),
    ),
    pytest.param(False, id="socket"),
]


class Manager:
    """The service manager's end: a bound AF_UNIX datagram socket that collects messages."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self) -> str:
        return self.sock.recv(4096).decode("utf-8")

    def pending(self) -> bool:
        """True if a datagram is waiting (checked without blocking)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
        "INVOCATION_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def manager(clean_env: pytest.MonkeyPatch) -> Iterator[Manager]:
    # A short directory: sockaddr_un paths have 107 bytes at most; pytest's tmp_path may be longer.
    directory = tempfile.mkdtemp(prefix="ns-notify-")
    path = os.path.join(directory, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT_S)
    clean_env.setenv("NOTIFY_SOCKET", path)
    try:
        yield Manager(sock, path)
    finally:
        sock.close()
        shutil.rmtree(directory)


@pytest.fixture
def abstract_manager(clean_env: pytest.MonkeyPatch) -> Iterator[Manager]:
    name = f"nightstack-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(RECV_TIMEOUT_S)
    clean_env.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield Manager(sock, "@" + name)
    finally:
        sock.close()


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored afterwards (setup_logging reconfigures it)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


# --- notifications -------------------------------------------------------------------------
@pytest.mark.parametrize("use_library", BACKENDS)
def test_messages_reach_the_socket(manager: Manager, use_library: bool) -> None:
    notifier = Notifier(use_library=use_library)
    assert notifier.enabled
    assert notifier.backend == ("libsystemd" if use_library else "socket")

    assert notifier.ready()
    assert manager.recv() == "READY=1"
    assert notifier.status("frame 12: accepted (41 stars, FWHM 3.1 px)")
    assert manager.recv() == "STATUS=frame 12: accepted (41 stars, FWHM 3.1 px)"
    assert notifier.status("two\nlines")
    assert manager.recv() == "STATUS=two lines"
    assert notifier.stopping("combining 120 frames")
    assert manager.recv() == "STOPPING=1\nSTATUS=combining 120 frames"
    assert notifier.extend_timeout(90)
    assert manager.recv() == "EXTEND_TIMEOUT_USEC=90000000"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = manager.recv().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize("use_library", BACKENDS)
def test_abstract_socket(abstract_manager: Manager, use_library: bool) -> None:
    notifier = Notifier(use_library=use_library)
    assert notifier.ready(status="watching /srv/nightstack/incoming")
    assert abstract_manager.recv() == "READY=1\nSTATUS=watching /srv/nightstack/incoming"


@pytest.mark.parametrize("use_library", BACKENDS)
def test_watchdog_with_watchdog_usec(
    manager: Manager, clean_env: pytest.MonkeyPatch, use_library: bool
) -> None:
    clean_env.setenv("WATCHDOG_USEC", "120000000")  # WatchdogSec=120
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier(use_library=use_library)
    assert notifier.watchdog_interval_s == 60.0
    assert notifier.watchdog()
    assert manager.recv() == "WATCHDOG=1"


@pytest.mark.parametrize("use_library", BACKENDS)
def test_watchdog_is_silent_without_watchdog_usec(manager: Manager, use_library: bool) -> None:
    notifier = Notifier(use_library=use_library)
    assert notifier.watchdog_interval_s is None
    assert not notifier.watchdog()
    assert notifier.ready()
    assert manager.recv() == "READY=1"  # the first datagram: no WATCHDOG=1 was sent
    assert not manager.pending()


def test_watchdog_of_another_process_is_not_ours(
    manager: Manager, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("WATCHDOG_USEC", "120000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getppid()))  # inherited from the main process
    notifier = Notifier()
    assert notifier.watchdog_interval_s is None
    assert not notifier.watchdog()
    assert not manager.pending()


@pytest.mark.parametrize("use_library", BACKENDS)
def test_without_notify_socket_every_call_is_a_no_op(
    clean_env: pytest.MonkeyPatch, use_library: bool
) -> None:
    clean_env.setenv("WATCHDOG_USEC", "120000000")
    notifier = Notifier(use_library=use_library)
    assert not notifier.enabled
    assert notifier.backend == "none"
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not notifier.reloading()
    assert not notifier.extend_timeout(10)


@pytest.mark.parametrize("value", ["", "relative/notify.sock", "@", "vsock:2:1234"])
def test_unusable_notify_socket_values_disable(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("NOTIFY_SOCKET", value)
    notifier = Notifier(use_library=False)
    assert not notifier.enabled
    assert not notifier.ready()


@pytest.mark.parametrize("use_library", BACKENDS)
def test_a_vanished_manager_is_logged_once_and_never_raises(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, use_library: bool
) -> None:
    directory = tempfile.mkdtemp(prefix="ns-notify-")
    try:
        clean_env.setenv("NOTIFY_SOCKET", os.path.join(directory, "gone.sock"))
        notifier = Notifier(use_library=use_library)
        with caplog.at_level(logging.WARNING, logger="nightstack.service.notify"):
            assert not notifier.ready()
            assert not notifier.status("still running")
    finally:
        shutil.rmtree(directory)
    warnings = [r for r in caplog.records if r.name == "nightstack.service.notify"]
    assert len(warnings) == 1
    assert "notification failed" in warnings[0].getMessage()


_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from nightstack.service.notify import Notifier
    notifier = Notifier(use_library=sys.argv[1] == "1")
    result = {
        "pid": os.getpid(),
        "backend": notifier.backend,
        "interval": notifier.watchdog_interval_s,
        "watchdog": notifier.watchdog(),
        "ready": notifier.ready(status="started"),
    }
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("use_library", BACKENDS)
def test_a_separate_process_delivers_ready(manager: Manager, use_library: bool) -> None:
    # The manager learns the sender's pid from SCM_CREDENTIALS, as systemd does to enforce
    # NotifyAccess=main: READY=1 must come from the daemon process itself.
    manager.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    env = dict(os.environ)
    env["WATCHDOG_USEC"] = "120000000"
    env["WATCHDOG_PID"] = str(os.getpid())  # the parent's watchdog: the child must not ping
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, "1" if use_library else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(proc.stdout)
    child_pid = result.pop("pid")
    assert result == {
        "backend": "libsystemd" if use_library else "socket",
        "interval": None,
        "watchdog": False,
        "ready": True,
    }
    creds_size = struct.calcsize("3i")
    data, ancillary, _, _ = manager.sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
    assert data == b"READY=1\nSTATUS=started"
    ((level, kind, creds),) = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    pid, uid, _gid = struct.unpack("3i", creds[:creds_size])
    assert pid == child_pid != os.getpid()
    assert uid == os.getuid()
    assert not manager.pending()


# --- logging -------------------------------------------------------------------------------
def test_plain_text_on_stderr_without_systemd(
    clean_env: pytest.MonkeyPatch, root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not running_under_systemd()
    handler = setup_logging("info")
    assert type(handler) is logging.StreamHandler
    log = logging.getLogger("nightstack.test")
    log.debug("not shown at INFO")
    log.info("frame %d accepted", 7, extra={"SESSION": "s1", "FRAME": 7, "STATUS": "accepted"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO frame 7 accepted", lines[0])


def test_setup_logging_replaces_console_handlers(
    clean_env: pytest.MonkeyPatch, root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    root_logger.addHandler(logging.StreamHandler(sys.stderr))  # what basicConfig installs
    setup_logging("WARNING")
    setup_logging("warning")  # twice: still one handler
    logging.getLogger("nightstack.test").warning("once")
    assert capsys.readouterr().err.count("once") == 1
    assert root_logger.level == logging.WARNING


def test_unknown_level_is_refused(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("LOUD", under_systemd=False)


def test_systemd_detection_compares_journal_stream_with_stderr(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        clean_env.setattr(sys, "stderr", stream)
        st = os.fstat(stream.fileno())
        clean_env.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert running_under_systemd()
        clean_env.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # inherited, stale
        assert not running_under_systemd()
        clean_env.delenv("JOURNAL_STREAM")
        clean_env.setenv("INVOCATION_ID", uuid.uuid4().hex)  # started by systemd, stderr a file
        assert running_under_systemd()


@pytest.mark.skipif(not HAVE_LIBRARY, reason="systemd-python not installed")
def test_journal_handler_under_systemd(root_logger: logging.Logger) -> None:
    from systemd import journal

    handler = setup_logging("DEBUG", under_systemd=True)
    assert isinstance(handler, journal.JournalHandler)
    assert root_logger.level == logging.DEBUG


def test_without_library_under_systemd_stderr_has_priority_prefix(
    clean_env: pytest.MonkeyPatch, root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    # systemd-python missing: the one fault here that cannot be caused for real.
    clean_env.setitem(sys.modules, "systemd.journal", None)
    setup_logging("INFO", under_systemd=True)
    log = logging.getLogger("nightstack.test")
    log.info("resumed session")
    log.error("decoder crashed")
    assert capsys.readouterr().err.splitlines() == ["<6>resumed session", "<3>decoder crashed"]


_JOURNAL_CHILD = textwrap.dedent(
    """
    import json, logging, os, socket
    os.makedirs("/run/systemd/journal")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/run/systemd/journal/socket")
    sock.settimeout(5)
    from nightstack.service.notify import setup_logging
    setup_logging("INFO")  # detected: INVOCATION_ID is set and stderr is a pipe
    log = logging.getLogger("nightstack.service.daemon")
    log.info("frame %d accepted", 7,
             extra={"SESSION": "2024-08-12T21-40", "FRAME": 7, "STATUS": "accepted"})
    log.warning("frame 8 rejected: trailed")
    print(json.dumps([sock.recv(65536).hex(), sock.recv(65536).hex()]))
    """
)


def _journal_fields(datagram: bytes) -> dict[str, str]:
    """Parse journald's native protocol; keep only the field names journald accepts."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:  # binary-safe form: NAME\n<uint64 le length><value>\n
            key = line
            (size,) = struct.unpack("<Q", datagram[end + 1 : end + 9])
            value = datagram[end + 9 : end + 9 + size]
            pos = end + 9 + size + 1
        name = key.decode()
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            fields[name] = value.decode()
    return fields


@pytest.mark.skipif(not HAVE_LIBRARY, reason="systemd-python not installed")
def test_structured_fields_reach_the_journal_socket() -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not installed")
    # A private mount namespace with a fresh /run, so the child's journal socket is its own.
    namespace = [unshare, "--user", "--map-root-user", "--mount", "--propagation=private"]
    remount = ["sh", "-c", 'mount -t tmpfs tmpfs /run && exec "$0" "$@"']
    command = [*namespace, *remount, sys.executable, "-c", _JOURNAL_CHILD]
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env["INVOCATION_ID"] = uuid.uuid4().hex
    probe = subprocess.run([*namespace, *remount, "true"], capture_output=True, text=True)
    if probe.returncode != 0:  # user namespaces disabled, or a seccomp'd container
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()[:200]}")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = (_journal_fields(bytes.fromhex(h)) for h in json.loads(proc.stdout))
    assert first["MESSAGE"] == "frame 7 accepted"
    assert first["PRIORITY"] == "6"
    assert first["SYSLOG_IDENTIFIER"] == "nightstack"
    assert first["LOGGER"] == "nightstack.service.daemon"
    assert (first["SESSION"], first["FRAME"], first["STATUS"]) == (
        "2024-08-12T21-40",
        "7",
        "accepted",
    )
    assert second["MESSAGE"] == "frame 8 rejected: trailed"
    assert second["PRIORITY"] == "4"
    assert "FRAME" not in second
