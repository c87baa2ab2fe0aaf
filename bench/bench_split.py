"""Issue 23, item 4: sessions that follow the night.

The night of ``nightstack.simulate.targets.three_targets`` (three targets; A -> B a slew with
the same exposure, B -> C a slew with 30 s -> 60 s, a 25-minute pause on C; the pause is in the
files' capture times and mtimes) is written as DNG raws, then stacked as a backlog by
``nightstack watch`` (a child process), once with the split rules (the default) and once with
``split_enabled = false`` (what the daemon did before), in one run.

Measured: the sessions made, the frames each starts at against the truth, frames rejected (and
how many for alignment), and the latency a split adds: from the log's time stamps, the time from
the previous frame's journal line to the split frame's, against the median between two frames
of one session; the old session's close (its final combine, which the idle timeout would also
have cost) is shown apart. No solver: B is recognised by ``split_unaligned_frames`` (3) frames
that fail against A and align with each other, and stacked again (decoded a second time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from _common import OUT, PYTHON, fmt_s, log, median, table
from nightstack.config import load_settings
from nightstack.simulate.targets import expected_splits, on_the_sky, three_targets, write_night
from nightstack.solve.solver import Solver

SIZE = (3000, 2000, 1500)  # width, height, stars: 6 MP frames
QUICK_SIZE = (1200, 800, 400)
GAP_S = 1200.0  # split_gap_s's default
SKY_SCALE = 3.0  # "/px of the night on the real sky (its fields: the Tycho-2 stars there)
TIMEOUT_S = 900.0

_LINE = re.compile(r"^(\S+ \S+) \w+ (N_(\d+)\.DNG) (accepted|rejected)")
_CLOSING = re.compile(r"^(\S+ \S+) \w+ closing session \S+: (.*)$")
_CLOSED = re.compile(r"^(\S+ \S+) \w+ session \S+ closed")
ALIGN_WORDS = ("match", "align", "reference stars", "too few stars (")
"""Words of the alignment's rejection reasons (``registration.align``)."""


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _run(
    watch: Path, root: Path, frames: int, split: bool, solve: float | None = None
) -> dict[str, Any]:
    """Stack the night in ``watch`` as a backlog; the journals, the sessions' names and the
    log's times. ``solve``: the plate solver on, hinted by this scale ("/px)."""
    out = root / ("sky" if solve else "split" if split else "nosplit")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env.update({"NIGHTSTACK_WEB_ENABLED": "false", "NIGHTSTACK_STABLE_S": "0.5",
                "NIGHTSTACK_SPLIT_ENABLED": "true" if split else "false",
                "NIGHTSTACK_SOLVE_ENABLED": "true" if solve else "false"})  # fmt: skip
    if solve:
        env["NIGHTSTACK_SOLVE_SCALE_ARCSEC"] = str(solve)
    log_path = out / "daemon.log"
    t0 = time.monotonic()
    with log_path.open("w") as sink:
        proc = subprocess.Popen(
            [PYTHON, "-m", "nightstack.cli", "watch", str(watch), "--output-dir",
             str(out / "sessions")],
            stdout=sink, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            while time.monotonic() - t0 < TIMEOUT_S:
                seen = set()
                for line in log_path.read_text(errors="replace").splitlines():
                    found = _LINE.match(line)
                    if found:
                        seen.add(found.group(2))
                if len(seen) >= frames or proc.poll() is not None:
                    break
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    sessions, names = [], []
    for journal in sorted((out / "sessions").glob("*/journal.jsonl")):
        lines = [json.loads(x) for x in journal.read_text().splitlines()]
        sessions.append([{k: r.get(k) for k in ("file", "status", "reason", "split")}
                         for r in lines])  # fmt: skip
        names.append(json.loads((journal.parent / "session.json").read_text()).get("target"))
    text = log_path.read_text(errors="replace").splitlines()
    journaled, closes = [], []
    closing: tuple[float, str] | None = None
    for line in text:
        if found := _LINE.match(line):
            journaled.append({"t": _stamp(found.group(1)), "index": int(found.group(3)),
                              "status": found.group(4)})  # fmt: skip
        elif found := _CLOSING.match(line):
            closing = (_stamp(found.group(1)), found.group(2))
        elif (found := _CLOSED.match(line)) and closing is not None:
            closes.append({"why": closing[1], "s": _stamp(found.group(1)) - closing[0]})
            closing = None
    return {"sessions": sessions, "names": names, "journaled": journaled, "closes": closes}


def measure(quick: bool) -> dict[str, Any]:
    width, height, stars = QUICK_SIZE if quick else SIZE
    legs = three_targets()
    root = OUT / "split"
    watch = root / f"night-{width}x{height}"
    frames = sum(leg.frames for leg in legs)
    if not (watch / "targets.json").exists():
        shutil.rmtree(watch, ignore_errors=True)
        log(f"writing the three-target night, {frames} frames {width}x{height}")
        write_night(watch, legs, width=width, height=height, stars=stars)
    data: dict[str, Any] = {"size": [width, height], "frames": frames,
                            "truth": expected_splits(legs, GAP_S)}  # fmt: skip
    for split in (True, False):
        log(f"stacking it with split_enabled = {split}")
        data["split" if split else "nosplit"] = _run(watch, root, frames, split)
    if Solver(load_settings(None, {"solve_enabled": True}, use_default=False)).available:
        sky = root / f"sky-{width}x{height}"
        if not (sky / "targets.json").exists():
            shutil.rmtree(sky, ignore_errors=True)
            log(f"writing the night on the real sky ({SKY_SCALE}\"/px)")
            write_night(sky, on_the_sky(legs, SKY_SCALE, width, height), width=width,
                        height=height, stars=0)  # fmt: skip
        log("stacking it with the plate solver")
        data["sky"] = _run(sky, root, frames, True, solve=SKY_SCALE)
        data["targets"] = [leg.target.replace(" ", "") for leg in legs for _ in range(leg.frames)]
    return data


def _index(file: str) -> int:
    return int(Path(file).stem.split("_")[1])


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    lines = [r for s in run["sessions"] for r in s]
    rejected = [r for r in lines if r["status"] != "accepted"]
    aligned = [r for r in rejected if any(w in (r["reason"] or "") for w in ALIGN_WORDS)]
    return {
        "sessions": len(run["sessions"]),
        "starts": [_index(s[0]["file"]) for s in run["sessions"] if s],
        "accepted": len(lines) - len(rejected),
        "rejected": len(rejected),
        "rejected_align": len(aligned),
    }


def _latencies(run: dict[str, Any], starts: list[int]) -> tuple[float, list[dict[str, Any]]]:
    """(median time between two journal lines in one session, per split: its frame, the time
    from the previous journal line to its own)."""
    gaps, at_split = [], []
    for before, now in pairwise(run["journaled"]):  # log order; a held frame's line comes once
        step = now["t"] - before["t"]
        if now["index"] in starts:
            at_split.append({"index": now["index"], "s": step})
        else:
            gaps.append(step)
    return median(gaps), at_split


def report(data: dict[str, Any]) -> str:
    width, height = data["size"]
    truth = data["truth"]
    rows = []
    for key, label in (("split", "split rules on (default)"),
                       ("nosplit", "split_enabled = false (before)"),
                       ("sky", "on the real sky, plate solver on")):  # fmt: skip
        if key not in data:
            continue
        s = _summary(data[key])
        names = ", ".join(str(n) for n in data[key].get("names", [])) if key == "sky" else "-"
        rows.append((label, s["sessions"], ", ".join(map(str, s["starts"])),
                     ", ".join(map(str, truth)), f"{s['accepted']} / {data['frames']}",
                     s["rejected"], s["rejected_align"], names))  # fmt: skip
    out = [
        f"The night of `simulate.targets.three_targets`: {data['frames']} DNG frames "
        f"{width}x{height}; A (6 frames) -> slew, same exposure -> B (6) -> slew, 30 s -> 60 s "
        "-> C (5) -> 25-minute pause -> C (4). Stacked as a backlog by `nightstack watch`; "
        "no plate solver (B is found by 3 frames that fail against A and align with each "
        "other).",
        "",
        table(
            ("run", "sessions", "first frames", "truth", "accepted", "rejected",
             "rejected for alignment", "sessions named"),
            rows,
        ),
        "",
        f"On the real sky: the same legs showing the Tycho-2 stars at their targets' pointings "
        f"(`simulate.targets.on_the_sky`, {SKY_SCALE}\"/px), `solve_enabled` on: a frame that "
        "fails to align is plate-solved at once, so the slew splits at its first frame, and "
        "each session is named by its reference's solve.",
        "",
    ]
    run = data["split"]
    steady, at_split = _latencies(run, truth)
    reasons = [s[0]["split"] for s in run["sessions"][1:]]
    closes = run["closes"]
    lat_rows = []
    for n, split in enumerate(at_split):
        close = closes[n]["s"] if n < len(closes) else float("nan")
        why = reasons[n] if n < len(reasons) else "?"
        extra = split["s"] - steady
        lat_rows.append((split["index"], why, fmt_s(split["s"]), fmt_s(close), fmt_s(extra),
                         fmt_s(extra - close)))  # fmt: skip
    out += [
        f"Latency at a split (from the log's time stamps): the time from the previous frame's "
        f"journal line to the split frame's, against the median between two frames of one "
        f"session ({fmt_s(steady)}). The close (the old session's final combine and files) "
        "is what the idle timeout would cost anyway; the rest is the split's own (below 0: the "
        "next frame's decode overlapped the close). The held run's split decodes its three "
        "frames again. Live, a new target found by the alignment alone is stacked once its "
        "third frame has arrived: its first waits two of the camera's frame intervals (64 s "
        "at 30 s exposures); a solver, a setting change or a pause splits at the first frame.",
        "",
        table(
            ("frame", "why (journal `split`)", "previous line -> this", "old session's close",
             "extra", "extra beyond the close"),
            lat_rows,
        ),
    ]
    return "\n".join(out)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    s = _summary(data["split"])
    right = s["starts"] == data["truth"]
    out = [
        (
            "three-target night: 3 or 4 sessions split at the right frames, 0 frames rejected "
            "for alignment",
            f"{s['sessions']} sessions at frames {', '.join(map(str, s['starts']))} "
            f"(truth {', '.join(map(str, data['truth']))}); {s['rejected_align']} rejected "
            "for alignment",
            s["sessions"] in (3, 4) and right and s["rejected_align"] == 0,
        )
    ]
    if "sky" in data:
        sky = _summary(data["sky"])
        starts = [_index(x[0]["file"]) for x in data["sky"]["sessions"] if x]
        want = [data["targets"][i] for i in starts]  # each frame's target
        names = data["sky"]["names"]
        out.append((
            "the same night on the real sky: split right, 0 rejected for alignment, each "
            "session named after its target",
            f"{sky['sessions']} sessions at {', '.join(map(str, sky['starts']))}, "
            f"{sky['rejected_align']} rejected for alignment, named {', '.join(map(str, names))}",
            sky["starts"] == data["truth"] and sky["rejected_align"] == 0 and names == want,
        ))  # fmt: skip
    return out

