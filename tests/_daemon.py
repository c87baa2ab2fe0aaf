"""Shared harness for tests that run ``nightstack watch`` as a real subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent


class Daemon:
    """``nightstack watch`` in a subprocess, its log in a file next to the output folder.

    ``decode_fn`` (the decoder child's ``module:function``, e.g. ``_faulty_decode:load``) and
    ``stall_s`` (the worker sleeps this long before each frame) are the daemon's test hooks
    (``nightstack.service.daemon.Hooks``); with either, the daemon runs through
    ``tests/_launch.py``.
    """

    def __init__(
        self,
        watch: Path,
        out: Path,
        *args: str,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
        log_dir: Path | None = None,
        decode_fn: str | None = None,
        stall_s: float = 0.0,
    ) -> None:
        self.log = (log_dir or out.parent) / f"daemon-{time.monotonic_ns()}.log"
        environment = dict(os.environ)
        environment.update(
            {
                "NIGHTSTACK_STABLE_S": "0.5",  # backlog files count as complete sooner
                "NIGHTSTACK_IDLE_TIMEOUT_S": "600",
                "NIGHTSTACK_CHECKPOINT_MIN_INTERVAL_S": "0",  # checkpoints by frame count only
                "NIGHTSTACK_CHECKPOINT_WRITE_RATIO": "0",
                "NIGHTSTACK_LIVE_FITS_WRITE_RATIO": "0",
                "NIGHTSTACK_WEB_ENABLED": "false",  # the web tests turn it on (--web)
                "PYTHONPATH": os.pathsep.join(
                    [str(TESTS), *filter(None, [environment.get("PYTHONPATH")])]
                ),
            }
        )
        environment.update(env or {})
        entry = ["-m", "nightstack.cli"]
        if decode_fn is not None or stall_s:
            entry = ["-m", "_launch", "--stall-s", str(stall_s)]
            entry += ["--decode-fn", decode_fn] if decode_fn is not None else []
            entry += ["--"]
        cmd = [sys.executable, *entry, "watch", str(watch), "--output-dir", str(out)]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*(wrap or []), *cmd, *args], stdout=log, stderr=subprocess.STDOUT, env=environment
            )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, daemon: Daemon) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if daemon.proc.poll() is not None:
            raise AssertionError(
                f"daemon exited ({daemon.proc.returncode}) waiting for {what}:\n"
                + daemon.text()[-4000:]
            )
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n" + daemon.text()[-4000:])


def journal(out: Path) -> list[dict[str, Any]]:
    """Every journal line of every session; a line that is not JSON fails the test."""
    lines: list[dict[str, Any]] = []
    for path in sorted(out.glob("*/journal.jsonl")):
        raw = path.read_bytes()
        assert not raw or raw.endswith(b"\n"), f"{path} ends in a torn line"
        for line in raw.decode("utf-8").splitlines():
            record = json.loads(line)
            record["session"] = path.parent.name
            lines.append(record)
    return lines


@contextlib.contextmanager
def tmpfs(mount: Path, size_mb: int) -> Iterator[Path]:
    """A real small filesystem of ``size_mb`` MiB mounted at ``mount`` for a test, unmounted
    after it; skips the test where mounting is not allowed (not root, no tmpfs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
