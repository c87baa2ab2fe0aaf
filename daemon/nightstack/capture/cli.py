"""``nightstack capture``: shoot a sequence into a folder, or list the cameras found."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from nightstack.capture.status import Plan

log = logging.getLogger("nightstack.capture")

NEEDS_GPHOTO2 = "capture needs python-gphoto2: pip install 'nightstack[capture]'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("watch_dir", type=Path, nargs="?", help="the folder the frames go into")
    p.add_argument("--list", action="store_true", help="list the cameras found and their state")
    p.add_argument("--count", type=int, default=0, help="frames to take (0: until stopped)")
    p.add_argument("--exposure", type=float, help="seconds (above the longest timed speed: bulb)")
    p.add_argument("--iso", type=int, default=None, help="ISO (default: as the camera is set)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds from start to start")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before the first frame")
    p.add_argument(
        "--target",
        choices=["ram", "card"],
        default="ram",
        help="where the camera keeps a frame until it is downloaded",
    )
    p.add_argument("--keep-on-card", action="store_true", help="leave each file on the card")
    p.add_argument(
        "--no-raw",
        dest="raw",
        action="store_false",
        help="keep the camera's image format (default: set RAW)",
    )
    p.add_argument("--model", default=None, help="the camera's model (default: the first found)")
    p.add_argument("--serial", default=None, help="the camera's serial number")
    p.add_argument(
        "--journal",
        type=Path,
        default=None,
        help="the journal file (default: WATCH_DIR/capture-START.jsonl)",
    )
    p.add_argument(
        "--reconnect",
        type=float,
        default=600.0,
        help="give up finding a lost camera after this many seconds",
    )


def run(
    args: argparse.Namespace, *, before_exposure: Callable[[int, int], None] | None = None
) -> int:
    """Run ``nightstack capture``; the exit code (0 done or stopped, 1 failed, 2 bad input).
    ``before_exposure``: a test's hook (see ``Sequence``); never a setting."""
    logging.getLogger("nightstack").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.list:
        return _list()
    if args.watch_dir is None or args.exposure is None:
        print("nightstack capture: give WATCH_DIR and --exposure (or --list)", file=sys.stderr)
        return 2
    try:
        plan = Plan(
            exposure_s=args.exposure, count=args.count, iso=args.iso,
            interval_s=args.interval, delay_s=args.delay, raw=args.raw, target=args.target,
            keep_on_card=args.keep_on_card, model=args.model, serial=args.serial,
        )  # fmt: skip
    except ValueError as err:
        print(f"nightstack capture: {err}", file=sys.stderr)
        return 2
    try:
        from nightstack.capture.sequence import Sequence  # imports libgphoto2
    except ImportError as err:
        print(f"nightstack capture: {NEEDS_GPHOTO2}: {err}", file=sys.stderr)
        return 2

    journal = args.journal or args.watch_dir / f"capture-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    sequence = Sequence(
        plan, args.watch_dir, journal, reconnect_s=args.reconnect, before_exposure=before_exposure
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        sequence.stop()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = sequence.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status.state == "failed":
        print(f"nightstack capture: {status.reason}", file=sys.stderr)
        return 1
    print(
        f"captured {status.frame} frame(s) into {args.watch_dir} ({status.state}); "
        f"journal {journal}"
    )
    return 0


def _list() -> int:
    try:
        from nightstack.capture.camera import Camera, CaptureError, list_cameras
    except ImportError as err:
        print(f"nightstack capture: {NEEDS_GPHOTO2}: {err}", file=sys.stderr)
        return 2

    found = list_cameras()
    if not found:
        print("no camera found on USB (switched on? in PTP mode? 'plugdev' group?)")
        return 1
    for det in found:
        try:
            camera = Camera.at(det)
        except CaptureError as err:
            print(f"{det.driver} on {det.port}: {err.reason}")
            continue
        try:
            info = camera.info()
        except CaptureError as err:
            print(f"{det.driver} on {det.port}: {err.reason}")
            continue
        finally:
            camera.close()
        free = "?" if info.free_bytes is None else f"{info.free_bytes / 2**20:.0f} MiB"
        settings = ", ".join(f"{k} {v}" for k, v in info.settings.items())
        print(
            f"{info.model} serial {info.serial or '?'} on {info.port}: battery "
            f"{info.battery or '?'}, {free} free, lens {info.lens or '?'}; {settings}"
        )
    return 0
