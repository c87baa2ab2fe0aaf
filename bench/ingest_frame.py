"""The ingest path of one Bayer frame (issue 12): stage times and the memory of both processes.

    PYTHONPATH=TREE/daemon python bench/ingest_frame.py frames RAW [RAW ...]
    PYTHONPATH=TREE/daemon python bench/ingest_frame.py decode RAW [--repeat N]

``frames``: a real :class:`~nightstack.io.decoder.Decoder` and ``Stacker.prepare`` (hash, decode in
the child, calibrate, mosaic, detect) of each file after one warm-up, one JSON line a file: the
stage times (``ms``, as ``nightstack stack --report`` records them), each process's resident
set before and its peak during the frame (VmHWM, reset through ``/proc/PID/clear_refs`` just
before), and the largest sum of the two processes' PSS sampled every 5 ms. ``decode``: medians
of ``--repeat`` in-process calls of ``load(demosaic=AHD | bilinear | edge-aware)`` and
``load_mosaic``, and the ratios to AHD (bench/bench_mosaic.py's ``_decode``). Point PYTHONPATH
at another tree (e.g. a ``git archive`` of main) to compare before and after in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLL_S = 0.005  # PSS sampling interval: the mosaic stage of a 24 MP frame lasts ~50 ms


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS


def _poll_pss(pids: tuple[int, int], stop: threading.Event, peak: list[float]) -> None:
    """Until ``stop``: ``peak[0]`` = the largest sum of the processes' PSS seen."""
    while not stop.is_set():
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], sum(_pss_mb(pid) for pid in pids))
        time.sleep(POLL_S)


def frames(paths: list[Path]) -> list[dict[str, Any]]:
    from nightstack.config import Settings
    from nightstack.io.decoder import Decoder
    from nightstack.pipeline.prepare import Preparer

    rows = []
    with Decoder() as decoder:
        preparer = Preparer(Settings(), decoder)
        preparer.prepare(paths[0])  # warm: imports, the child's first decode
        for path in paths:
            parent, child = os.getpid(), decoder.pid
            assert child is not None
            before = {"parent": _status_mb(parent, "VmRSS"), "child": _status_mb(child, "VmRSS")}
            _reset_peak(parent)
            _reset_peak(child)
            stop = threading.Event()
            peak: list[float] = [0.0]
            thread = threading.Thread(target=_poll_pss, args=((parent, child), stop, peak))
            thread.start()
            prepared = preparer.prepare(path)
            stop.set()
            thread.join()
            rows.append(
                {
                    "file": str(path),
                    "error": prepared.error,
                    "ms": prepared.ms,
                    "rss_before_mb": before,
                    "peak_rss_mb": {
                        "parent": _status_mb(parent, "VmHWM"),
                        "child": _status_mb(child, "VmHWM"),
                    },
                    "tree_pss_peak_mb": peak[0],
                }
            )
            del prepared
    return rows


def decode(path: Path, repeat: int) -> dict[str, float]:
    from nightstack.io.loaders import load, load_mosaic

    calls: dict[str, Callable[[], object]] = {
        "ahd": lambda: load(path, demosaic="AHD"),
        "mosaic": lambda: load_mosaic(path),
        "bilinear": lambda: load(path, demosaic="bilinear"),
        "edge-aware": lambda: load(path, demosaic="edge-aware"),
    }
    out: dict[str, float] = {}
    for name, fn in calls.items():
        fn()  # warm the file cache and imports
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    for name in ("mosaic", "bilinear", "edge-aware"):
        out[f"{name}/ahd"] = out[name] / out["ahd"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["frames", "decode"])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    import nightstack

    print(f"# nightstack from {Path(nightstack.__file__).parent}", file=sys.stderr)
    if args.what == "decode":
        print(json.dumps(decode(args.paths[0], args.repeat)))
    else:
        for row in frames(args.paths):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
