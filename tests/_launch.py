"""Test-only entry point: ``nightstack`` with faults injected into the daemon.

``python -m _launch [--decode-fn MODULE:FUNCTION] [--stall-s SECONDS] -- watch WATCH_DIR ...``
runs the CLI's own code path (``nightstack.cli.main``) with a ``Daemon`` built with those
``service.Hooks``. The hooks are not settings: the package reads them from nowhere, so only a
test can set them (tests/_daemon.py starts this module when a test asks for a hook).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nightstack.cli import main
from nightstack.service.daemon import Hooks


def launch(argv: Sequence[str] | None = None) -> int:
    """Parse the hooks, then run ``nightstack`` on the arguments after ``--``."""
    parser = argparse.ArgumentParser(prog="python -m _launch")
    parser.add_argument("--decode-fn", default=Hooks.decode_fn, help="the decoder child's load")
    parser.add_argument("--stall-s", type=float, default=0.0, help="worker sleep per frame")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then nightstack's arguments")
    known = parser.parse_args(argv)
    rest = known.args[1:] if known.args[:1] == ["--"] else known.args
    return main(rest, hooks=Hooks(decode_fn=known.decode_fn, stall_s=known.stall_s))


if __name__ == "__main__":
    sys.exit(launch())
