"""Issue 4: how long after a frame is complete it is in the journal and in the preview.

``nightstack watch`` runs as a child process on an empty temporary watch folder. Frames of the
24 MP benchmark night are written into it the way a careful tether tool does: copied to
``NAME.part``, then renamed to ``NAME`` (the rename is the "file complete" time). The bench
polls (every 10 ms) the session's ``journal.jsonl`` for the frame's line and ``preview.jpg``'s
modification time.

- Paced: one frame at a time, the next only after the previous one's preview (a camera slower
  than the pipeline): latency file complete -> journal line, and -> preview updated.
- Burst: frames dropped back to back (a camera faster than the pipeline, or a card dumped into
  the folder): sustained throughput from the first to the last journal line.
- Previews while behind (issue 11): a backlog already in the folder at start, stacked by fresh
  daemons with and without timed previews (``preview_every_s`` = ``PREVIEW_EVERY_S`` or never),
  alternated A B B A in one run: the ratio of their throughputs is what the previews cost.

Each figure is also given as a ratio to the decode time of the same file: the median
in-process ``loaders.load`` of the night's frames measured just before, and the frame's own
``decode`` time in the journal (through the daemon's decoder, contended by the rest of the
pipeline).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    OUT,
    PYTHON,
    MemoryWatch,
    decode_seconds,
    ensure_night,
    fmt_s,
    log,
    median,
    table,
)

POLL_S = 0.01
FRAME_TIMEOUT_S = 120.0
WARMUP = 5  # the live stack's default warm-up: frames after it are steady state
PREVIEW_EVERY_S = 5.0  # timed previews 6x as often as the default 30 s: a demanding cadence
NEVER_S = 1e9  # preview_every_s that never comes due while frames wait (the old behaviour)


def _child_env() -> dict[str, str]:
    """This environment without systemd's variables: the daemon logs to its stderr file."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _drop(src: Path, watch: Path) -> float:
    """Copy ``src`` into ``watch`` as .part, rename it into place; return the rename time."""
    part = watch / (src.name + ".part")
    shutil.copyfile(src, part)
    os.rename(part, watch / src.name)
    return time.time()


class _Session:
    """Polls the daemon's output folder: journal lines and preview updates, with the time seen."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self.previews: list[float] = []
        self.checkpoints: list[float] = []
        self._mtime = 0.0
        self._checkpoint_mtime = 0.0
        self._journal: Path | None = None

    def poll(self) -> None:
        now = time.time()
        if self._journal is None:
            found = sorted(self.out.glob("*/journal.jsonl"))
            if not found:
                return
            self._journal = found[0]
        text = self._journal.read_text()
        complete = text.splitlines()[: text.count("\n")]
        for line in complete[len(self.lines) :]:
            self.lines.append((now, json.loads(line)))
        try:
            mtime = (self._journal.parent / "checkpoint" / "state.json").stat().st_mtime
            if mtime != self._checkpoint_mtime:
                self._checkpoint_mtime = mtime
                self.checkpoints.append(now)
        except FileNotFoundError:
            pass
        try:
            mtime = (self._journal.parent / "preview.jpg").stat().st_mtime
        except FileNotFoundError:
            return
        if mtime != self._mtime:
            self._mtime = mtime
            self.previews.append(now)

    def wait(self, lines: int, previews: int, timeout_s: float = FRAME_TIMEOUT_S) -> None:
        end = time.time() + timeout_s
        while len(self.lines) < lines or len(self.previews) < previews:
            if time.time() > end:
                raise TimeoutError(f"waited {timeout_s} s for journal line {lines}")
            time.sleep(POLL_S)
            self.poll()


def measure(quick: bool) -> dict[str, Any]:
    paced_n, burst_n = (7, 4) if quick else (10, 10)
    paths = ensure_night(paced_n + burst_n)
    log("decode time of the night's frames, in process")
    decode_seconds(paths[0], 1)  # warm the imports and the page cache
    root = OUT / "daemon_bench"
    shutil.rmtree(root, ignore_errors=True)
    watch, out = root / "watch", root / "out"
    watch.mkdir(parents=True)
    out.mkdir()
    stderr = (root / "daemon.log").open("w")
    cmd = [
        str(BENCH.parent / ".venv/bin/nightstack"),
        "watch",
        str(watch),
        "--output-dir",
        str(out),
        "--idle-timeout",
        "3600",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=_child_env())
    memory = MemoryWatch(proc.pid)
    try:
        deadline = time.time() + 60
        while "watching" not in (root / "daemon.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    "nightstack watch did not start: see " + str(root / "daemon.log")
                )
            time.sleep(0.1)
        time.sleep(2.0)  # let the decoder child finish importing
        session = _Session(out)
        paced = []
        for i in range(paced_n):
            log(f"paced frame {i}")
            decode = decode_seconds(paths[i], 1)  # the same file, just before, daemon idle
            checkpoints = len(session.checkpoints)
            done = _drop(paths[i], watch)
            session.wait(i + 1, i + 1)
            seen, record = session.lines[i]
            paced.append(
                {
                    "decode_here_s": decode,
                    "journal_s": seen - done,
                    "preview_s": session.previews[i] - done,
                    "checkpoint": len(session.checkpoints) > checkpoints,
                    "decode_s": record["ms"].get("decode", float("nan")) / 1000,
                    "status": record["status"],
                    "ms": record["ms"],
                }
            )
            time.sleep(1.0)
        log(f"burst of {burst_n} frames")
        completes = [_drop(p, watch) for p in paths[paced_n : paced_n + burst_n]]
        session.wait(paced_n + burst_n, 0, timeout_s=FRAME_TIMEOUT_S * burst_n)
        burst = session.lines[paced_n:]
        log("closing the session (SIGTERM: final combine)")
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=1800)
        close_s = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        memory.stop()
        stderr.close()
    from nightstack.config import Settings

    result = {
        "checkpoint_every": Settings.model_fields["checkpoint_every_frames"].default,
        "decode_s": median([f["decode_here_s"] for f in paced]),
        "paced": paced,
        "burst_completes": completes,
        "burst_seen": [seen for seen, _ in burst],
        "burst_ms": [r["ms"] for _, r in burst],
        "burst_status": [r["status"] for _, r in burst],
        "close_s": close_s,
        "main_mb": memory.main_mb(),
        "decoder_mb": memory.decoder_mb(),
        "pss_peak_mb": memory.pss_peak_mb,
        "frames": paced_n + burst_n,
        "burst_previews": _between(session.previews, [seen for seen, _ in burst]),
    }
    shutil.rmtree(root, ignore_errors=True)
    # A: no preview while frames wait, B: timed previews; alternated so a drift in the machine's
    # load falls on both
    order = "AB" if quick else "ABBAABBA"
    result["backlog"] = measure_previews(paths[: 6 if quick else 12], order)
    return result


def _between(previews: list[float], seen: list[float]) -> int:
    """How many previews appeared after the first journal line of ``seen``, before the last."""
    return sum(seen[0] < t < seen[-1] for t in previews) if seen else 0


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its child processes (the
    decoder), from /proc: on a shared machine, less changed by other jobs than wall time."""
    pids, ticks = [pid], 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def _backlog_run(paths: list[Path], root: Path, preview_every_s: float) -> dict[str, Any]:
    """A fresh daemon started on a folder holding ``paths`` (hard links): when each journal
    line and each preview appeared; the daemon is killed after the last line (no final)."""
    shutil.rmtree(root, ignore_errors=True)
    watch, out = root / "watch", root / "out"
    watch.mkdir(parents=True)
    for p in paths:
        os.link(p, watch / p.name)
    env = {**_child_env(), "NIGHTSTACK_PREVIEW_EVERY_S": repr(preview_every_s)}
    cmd = [PYTHON, "-m", "nightstack.cli", "watch", str(watch), "--output-dir", str(out)]
    with (root / "daemon.log").open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            session = _Session(out)
            session.wait(1, 0, timeout_s=FRAME_TIMEOUT_S * 2)
            cpu_first = _tree_cpu_s(proc.pid)
            session.wait(len(paths), 0, timeout_s=FRAME_TIMEOUT_S * len(paths))
            cpu_last = _tree_cpu_s(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    seen = [t for t, _ in session.lines]
    shutil.rmtree(root, ignore_errors=True)
    return {
        "preview_every_s": preview_every_s,
        "seen": seen,
        "previews": _between(session.previews, seen),
        "status": [r["status"] for _, r in session.lines],
        # frames after the first (the reference opens the session) per second
        "throughput": (len(seen) - 1) / (seen[-1] - seen[0]),
        "cpu_per_frame_s": (cpu_last - cpu_first) / (len(seen) - 1),
    }


def measure_previews(paths: list[Path], order: str) -> dict[str, Any]:
    """Backlog throughput without (A) and with (B) timed previews, runs in ``order``."""
    runs = []
    load_before = os.getloadavg()[0]
    for i, kind in enumerate(order):
        every = PREVIEW_EVERY_S if kind == "B" else NEVER_S
        log(f"backlog of {len(paths)} frames, preview_every_s={every:g} (run {i + 1}/{len(order)})")
        runs.append(_backlog_run(paths, OUT / "daemon_backlog", every))

    def med(key: str, every: float) -> float:
        return median([r[key] for r in runs if r["preview_every_s"] == every])

    off, on = med("throughput", NEVER_S), med("throughput", PREVIEW_EVERY_S)
    cpu_off, cpu_on = med("cpu_per_frame_s", NEVER_S), med("cpu_per_frame_s", PREVIEW_EVERY_S)
    return {
        "frames": len(paths),
        "load": (load_before, os.getloadavg()[0]),
        "runs": runs,
        "ratio": on / off,
        "on": on,
        "off": off,
        "cpu_on": cpu_on,
        "cpu_off": cpu_off,
        "cpu_ratio": cpu_on / cpu_off,
    }


_STAGES = ("decode", "detect", "align", "warp+store", "accumulate")


def _ratios(frames: list[dict[str, Any]], key: str) -> float:
    """Median over frames of ``key`` / the in-process decode of the same file just before."""
    return median([f[key] / f["decode_here_s"] for f in frames])


def report(data: dict[str, Any]) -> str:
    decode = data["decode_s"]
    paced = data["paced"]
    groups = (
        ("frame 1 (reference; opens the session)", paced[:1]),
        (f"frames 2-{WARMUP} (live warm-up; frame {WARMUP} clips the batch)", paced[1:WARMUP]),
        (f"frames {WARMUP + 1}-{len(paced)} (steady state)", paced[WARMUP:]),
    )
    rows = []
    for label, group in groups:
        if not group:
            continue
        j = median([f["journal_s"] for f in group])
        p = median([f["preview_s"] for f in group])
        rows.append(
            (
                label,
                len(group),
                f"{fmt_s(j)} = {_ratios(group, 'journal_s'):.2f}x",
                f"{median([f['journal_s'] / f['decode_s'] for f in group]):.2f}x",
                f"{fmt_s(p)} = {_ratios(group, 'preview_s'):.2f}x",
                fmt_s(max(f["preview_s"] for f in group)),
            )
        )
    steady = paced[WARMUP:] or paced[1:]
    stage_sum = median([sum(f["ms"].get(k, 0.0) for k in _STAGES) / 1000 for f in steady])
    with_cp = [f for f in steady if f.get("checkpoint")]
    without_cp = [f for f in steady if not f.get("checkpoint")]
    seen = data["burst_seen"]
    per_frame = (seen[-1] - seen[0]) / (len(seen) - 1)
    burst_ms = data["burst_ms"][1:]
    stages = {k: median([m[k] for m in burst_ms if k in m]) / 1000 for k in burst_ms[0]}
    header = (
        "paced frames",
        "n",
        "complete -> journal line (x decode)",
        "(x the frame's journaled decode)",
        "complete -> preview updated (x decode)",
        "worst preview",
    )
    body = [
        f"`nightstack watch WATCH --output-dir OUT --idle-timeout 3600` on a fresh folder; "
        f"{data['frames']} frames of the simulated 24 MP night dropped as `.part` + rename. "
        "Each paced frame's file is first decoded in the bench process (`loaders.load`, the "
        "daemon idle) and its latencies are divided by that decode time: 'x decode' is the "
        "median of those per-frame ratios (median decode in this run: "
        f"{fmt_s(decode)}). The second column divides by the frame's own `decode` in the "
        "journal (through the daemon's isolated decoder). Times are medians per group.",
        "",
        table(header, rows),
        "",
        "Where a steady-state frame's time goes: the journaled stages (decode in the decoder "
        f"child, detect, align, warp+store, accumulate) sum to {fmt_s(stage_sum)}, of a "
        f"{fmt_s(median([f['journal_s'] for f in steady]))} latency; the rest is the watcher, "
        "the content hash and the queue hand-off before the decode, and the journal fsync. "
        "After the journal line the worker writes a checkpoint of the live stack every "
        f"{data.get('checkpoint_every', '?')} accepted frames (`checkpoint_every_frames`), then "
        "the preview: complete -> preview "
        + (
            f"was {fmt_s(median([f['preview_s'] for f in with_cp]))} for frames with a "
            f"checkpoint and {fmt_s(median([f['preview_s'] for f in without_cp]))} without."
            if with_cp and without_cp
            else "(no split: every frame had the same checkpoint status)."
        ),
        "",
        f"Burst of {len(seen)} frames dropped back to back "
        f"({data['burst_completes'][-1] - data['burst_completes'][0]:.1f} s to drop them all): "
        f"sustained {60 / per_frame:.1f} frames/min = one frame every {fmt_s(per_frame)} = "
        f"{per_frame / decode:.2f}x decode (the paced frames' median); last frame's latency "
        f"{fmt_s(seen[-1] - data['burst_completes'][-1])}. Median stage times in the burst "
        "(journal `ms`): "
        + ", ".join(f"{k} {fmt_s(v)}" for k, v in stages.items())
        + f". While frames wait previews follow only the clock (every `preview_every_s`, 30 s by "
        f"default): the burst had {data.get('burst_previews', '?')}.",
        "",
        *_backlog_report(data.get("backlog")),
        "",
        f"Daemon peak memory over the whole run: main VmHWM {data['main_mb']:.0f} MB, decoder "
        f"child {data['decoder_mb']:.0f} MB, tree PSS peak {data['pss_peak_mb']:.0f} MB. "
        f"Closing the session (SIGTERM -> exact final combine of {data['frames']} frames, "
        f"TIFF + FITS + preview) took {fmt_s(data['close_s'])}.",
        "",
        "Goals: "
        + "; ".join(
            f"{goal}: {'met' if met else '**missed**'} ({measured})"
            for goal, measured, met in goals(data)
        )
        + ".",
    ]
    return "\n".join(body)


def _backlog_report(backlog: dict[str, Any] | None) -> list[str]:
    if not backlog:
        return []
    runs = backlog["runs"]
    with_previews = [r for r in runs if r["preview_every_s"] == PREVIEW_EVERY_S]
    return [
        f"Previews while behind: a backlog of {backlog['frames']} frames in the folder at start, "
        "stacked by a fresh daemon per run, runs alternated "
        + " ".join("B" if r["preview_every_s"] == PREVIEW_EVERY_S else "A" for r in runs)
        + f" in this run; A: no preview while frames wait, B: `preview_every_s = "
        f"{PREVIEW_EVERY_S:g}` ({', '.join(str(r['previews']) for r in with_previews)} "
        "previews during the backlog). Throughput (frames after the reference, first to last "
        f"journal line): A {60 * backlog['off']:.1f} frames/min, B {60 * backlog['on']:.1f} "
        f"frames/min (medians): **B / A = {backlog['ratio']:.3f}** (runs: "
        + ", ".join(f"{60 * r['throughput']:.1f}" for r in runs)
        + " frames/min; wall time on a shared machine varies from run to run). CPU time of the "
        f"daemon and its decoder per frame, which other jobs change less than wall time: A "
        f"{fmt_s(backlog['cpu_off'])}, B {fmt_s(backlog['cpu_on'])}: B / A = "
        f"{backlog['cpu_ratio']:.3f}. 1-min load average "
        + " -> ".join(f"{v:.1f}" for v in backlog.get("load", ()))
        + " over these runs.",
        "",
    ]


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for the summary."""
    steady = data["paced"][WARMUP:] or data["paced"][1:]
    latency = _ratios(steady, "journal_s")
    preview = _ratios(steady, "preview_s")
    own = median([f["journal_s"] / f["decode_s"] for f in steady])
    backlog = data.get("backlog")
    previews = (
        [
            (
                f"backlog with timed previews (every {PREVIEW_EVERY_S:g} s) >= 0.9x the "
                "throughput without",
                f"{backlog['ratio']:.3f}x",
                backlog["ratio"] >= 0.9,
            )
        ]
        if backlog
        else []
    )
    return [
        *previews,
        ("daemon: file complete -> journal line <= 1.5x decode", f"{latency:.2f}x", latency <= 1.5),
        (
            "(same, x the daemon's own journaled decode of the frame)",
            f"{own:.2f}x",
            own <= 1.5,
        ),
        ("(stricter) file complete -> preview <= 1.5x decode", f"{preview:.2f}x", preview <= 1.5),
    ]
