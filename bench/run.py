"""Run the benchmarks and rewrite their sections of bench/RESULTS.md.

    .venv/bin/python bench/run.py [--quick] [--only NAME ...]

NAME is one of: frame (issue 2, per-frame stages), stack (issue 3, `nightstack stack` memory
and time vs an in-RAM sigma clip), daemon (issue 4, `nightstack watch` latency and
throughput), peers (issue 6, alignment vs astroalign; Siril if installed), skies (background
normalization and transparency per frame), mosaic (issue 12), calibrate (issue 13, master
building and calibration's per-frame cost), landscape (issue 15: trails, timelapse, the frozen
ground, the automatic mask per frame), hardening (issue 20: frames, `/api/status`, memory
and log under 2000 idle or slow connections and looping renders), capture (issue 22:
a sequence with injected camera faults, capture-to-file latency, CPU while waiting, with
libgphoto2's virtual camera), page (issue 24: the page's linear preview, last frame and
timelapse costs), notify (issue 24: notifications' cost per frame with receivers that never
answer, event-to-receipt latency), split (issue 23: a three-target night's sessions, split
frames vs truth, frames rejected for alignment, latency at a split), solve (issue 23: plate
solving's time and accuracy, the WCS residual of stack.fits), live_drizzle (issue 19: the
daemon's memory and live add time with drizzle 1x against the demosaic live stack). ``--quick`` runs
fewer frames and repeats (a smoke run; its figures are marked as such). Simulated frames are
cached in bench/out/ (gitignored); a full run needs ~25 GB of free disk.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import OUT, RESULTS, code_version, log, run_meta, table, write_section

BENCHMARKS = {
    "frame": ("Per-frame pipeline stages, 24 MP (issue 2)", "bench_frame"),
    "stack": ("Stacking: peak memory and time vs N, 24 MP (issue 3)", "bench_stack"),
    "daemon": ("Daemon latency and throughput, 24 MP (issue 4)", "bench_daemon"),
    "peers": ("Alignment and stacking vs peers (issue 6)", "bench_peers"),
    "skies": ("Real skies: normalization and transparency per frame, 24 MP", "bench_skies"),
    "mosaic": (
        "The frame path in the mosaic: decode, store, memory, writes, speed (issue 12)",
        "bench_mosaic",
    ),
    "calibrate": (
        "Calibration: master building and per-frame cost, 24 MP (issue 13)",
        "bench_calibrate",
    ),
    "landscape": (
        "Landscape products: trails, timelapse, freeze ground, 24 MP (issue 15)",
        "bench_landscape",
    ),
    "quality": (
        "Image quality on real frames: star FWHM and faint-star S/N vs a reference and Siril "
        "(issue 19)",
        "bench_quality",
    ),
    "hardening": (
        "Hardening under attack: 2000 idle or slow connections and looping renders while "
        "stacking, 24 MP (issue 20)",
        "bench_hardening",
    ),
    "capture": (
        "Tethered capture against libgphoto2's virtual camera: faults; latency; CPU (issue 22)",
        "bench_capture",
    ),
    "page": (
        "Web page views: linear preview writes, last frame, timelapse encode, 24 MP (issue 24)",
        "bench_page",
    ),
    "notify": ("Notifications: cost on the frame path, latency (issue 24)", "bench_notify"),
    "split": (
        "Sessions that follow the night: a three-target night split by itself (issue 23)",
        "bench_split",
    ),
    "solve": (
        "Plate solving: solve time and accuracy, 24 MP; WCS residual of stack.fits (issue 23)",
        "bench_solve",
    ),
    "live_drizzle": (
        "Live Bayer drizzle: daemon memory and live add time, 24 MP (issue 19)",
        "bench_live_drizzle",
    ),
}
"""Name -> (RESULTS.md section title, module with ``measure(quick)`` and ``report(data)``)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md from the last runs recorded in bench/out/NAME.json",
    )
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    command = ".venv/bin/python bench/run.py" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(names)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        title, module_name = BENCHMARKS[name]
        module = importlib.import_module(module_name)
        path = OUT / f"{name}.json"
        if args.report_only:
            if not path.exists():
                continue
            data = json.loads(path.read_text())
        else:
            log(f"=== {name}: {title}")
            t0 = time.monotonic()
            meta = run_meta(command)
            measure: Callable[[bool], dict[str, Any]] = module.measure
            data = measure(args.quick)
            data["_meta"] = {**meta, "code_after": code_version(), "quick": args.quick}
            path.write_text(json.dumps(data, indent=1, default=str))
            log(f"=== {name} done in {time.monotonic() - t0:.0f} s")
        body = module.report(data)
        if data["_meta"].get("quick"):
            body = "**Quick run (`--quick`): fewer frames and repeats.**\n\n" + body
        write_section(name, title, body, data["_meta"])
        print(body, flush=True)
    _write_summary()
    return 0


def _write_summary() -> None:
    """The goals table, from the last recorded run of each benchmark (bench/out/NAME.json)."""
    rows = []
    dates = []
    earlier = _summary_rows()
    for name, (title, module_name) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        path = OUT / f"{name}.json"
        if not hasattr(module, "goals"):
            continue
        if not path.exists():  # not run on this machine: keep its rows from RESULTS.md
            kept = [r for r in earlier if r[3].startswith(title.split(",")[0] + ",")]
            rows += kept
            dates += [r[3].rsplit(", ", 1)[1] for r in kept]
            continue
        data = json.loads(path.read_text())
        dates.append(data["_meta"]["date"])
        for goal, measured, met in module.goals(data):
            when = f"{title.split(',')[0]}, {data['_meta']['date']}"
            rows.append((goal, measured, "met" if met else "**missed**", when))
    if rows:
        body = (
            "Each goal's verdict from the latest run of its benchmark (command, machine, code "
            "and the reasons in the sections below).\n\n"
            + table(("goal", "measured", "verdict", "section, run"), rows)
        )
        meta = run_meta("any bench/run.py, from the latest bench/out/NAME.json of each")
        meta["machine"] = meta["code"] = "see each section"
        meta["date"] = f"latest run {max(dates)}"
        write_section("summary", "Summary: goals", body, meta)


def _summary_rows() -> list[tuple[str, ...]]:
    """The goal rows of the summary now in RESULTS.md: (goal, measured, verdict, section)."""
    if not RESULTS.exists():
        return []
    text = RESULTS.read_text()
    match = re.search(r"<!-- bench:summary start -->(.*?)<!-- bench:summary end -->", text, re.S)
    if match is None:
        return []
    rows = []
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("goal", "---"):
            rows.append(tuple(cells))
    return rows


if __name__ == "__main__":
    sys.exit(main())
