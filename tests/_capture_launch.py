"""Test-only entry point: ``nightstack capture`` with the virtual camera shown its sky by the
sequence itself, before each exposure (no race with a feeder thread).

``python -m _capture_launch [--faults K ...] -- WATCH_DIR --count N ...`` runs the CLI's own
code path (``nightstack.capture.cli.run``) with a ``before_exposure`` hook: frame k is sky
k - 1 of tests/_vcam.py's night; a frame in ``--faults`` first finds the camera failing (a
picture of another size: libgphoto2's PTP driver fails the capture) until the sequence has
lost it once (its ``lost`` line in the journal, ``--journal`` required then): the picture is put
right at once, before the sequence opens the camera again (the virtual camera reads its
pictures' sizes when it is opened). ``VCAMERADIR`` must be set (the camera's folder).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from _vcam import VirtualCamera
from nightstack.cli import build_parser


def launch(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m _capture_launch")
    parser.add_argument("--faults", type=int, nargs="*", default=[], help="frames that fail once")
    parser.add_argument("--seed", type=int, default=5, help="the night's stars")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then capture's arguments")
    known = parser.parse_args(argv)
    rest = known.args[1:] if known.args[:1] == ["--"] else known.args
    camera = VirtualCamera(Path(os.environ["VCAMERADIR"]), seed=known.seed)
    faults = set(known.faults)

    def before_exposure(frame: int, failures: int) -> None:
        if frame in faults and failures == 0:
            camera.fault()
        else:
            camera.show(frame - 1)

    import nightstack.capture.cli as capture_cli

    args = build_parser().parse_args(["capture", *rest])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    done = threading.Event()
    if faults:
        if args.journal is None:
            parser.error("--faults needs capture's --journal")
        threading.Thread(target=_cure, args=(camera, args.journal, done), daemon=True).start()
    try:
        return capture_cli.run(args, before_exposure=before_exposure)
    finally:
        done.set()


def _cure(camera: VirtualCamera, journal: Path, done: threading.Event) -> None:
    """Put the picture right as soon as the journal has a new ``lost`` line (the sequence waits
    its backoff, >= 1 s, before it opens the camera again)."""
    cured = 0
    while not done.wait(0.005):
        lost = journal.read_text().count('"event": "lost"') if journal.exists() else 0
        if lost > cured:
            camera.show(camera.shown)
            cured = lost


if __name__ == "__main__":
    sys.exit(launch())
