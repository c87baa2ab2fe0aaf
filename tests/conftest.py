"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from _daemon import Daemon

# The simulated nights' random stars are on no sky: a blind plate solve would spend its minute
# on each session. The solving tests turn it on (test_solve.py).
os.environ.setdefault("NIGHTSTACK_SOLVE_ENABLED", "false")


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=10)
