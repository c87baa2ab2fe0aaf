"""Issue 14: the web page's cost: API latency while stacking, page weight, idle CPU.

- **API latency while stacking.** ``nightstack watch --web 127.0.0.1:0`` on an empty folder;
  frames of the 24 MP benchmark night are dropped into it back to back (``.part`` + rename), so
  the worker stacks without a pause, while this process (a separate process, like a phone)
  asks the API in a loop, one new connection per request, with one Server-Sent Events client
  connected throughout: ``/api/status``, ``/api/sessions``, the session's frames (all, and
  ``?since=`` the last one), its ``preview.jpg`` and ``/api/preview.jpg``, and the page ``/``.
  Only requests made while the daemon was stacking (first to last journal line) count.
- **Stretch renders** of a 24 MP ``live.fits`` (float32, 3 planes, written here): the first
  request (memory-mapped read + shrink + stretch), and the next with another strength (the
  shrunk stack cached).
- **Page weight**: the bytes of the page's own files as served (HTML, CSS, JavaScript, icon).
- **Idle CPU**: a daemon with the web server and no client, a daemon with ``--no-web``, and one
  with an event client connected, each left idle; CPU time (user + system, from
  ``/proc/PID/task/*/stat``) of the whole process and of the web threads (OS name
  ``nightstack-web``: the server thread and the executor threads it starts) over the window.

Run alone: ``.venv/bin/python bench/bench_web.py [--quick]`` (writes its RESULTS.md section).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    FULL_H,
    FULL_W,
    OUT,
    ensure_night,
    fmt_s,
    log,
    standalone,
    table,
)

TITLE = "Web page: API latency while stacking, page weight, idle CPU, 24 MP (issue 14)"
P95_GOAL_MS = 50.0
WEIGHT_GOAL_KB = 300.0
IDLE_TICKS_GOAL = 1  # "no measurable CPU": at most one clock tick (10 ms) of web threads
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAUSE_S = 0.05  # between two API requests of the client loop (~10-15 requests a second)
ENDPOINTS = ("status", "sessions", "frames", "frames?since", "preview.jpg", "api/preview.jpg", "/")


def _env() -> dict[str, str]:
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["NIGHTSTACK_IDLE_TIMEOUT_S"] = "3600"
    return env


class _Daemon:
    def __init__(self, watch: Path, out: Path, *args: str) -> None:
        self.log = out.parent / f"daemon-{time.monotonic_ns()}.log"
        cmd = [
            sys.executable,
            "-m",
            "nightstack.cli",
            "watch",
            str(watch),
            "--output-dir",
            str(out),
        ]
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(
                [*cmd, *args], stdout=fh, stderr=subprocess.STDOUT, env=_env()
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout_s: float = 120) -> re.Match[str]:
        end = time.time() + timeout_s
        while time.time() < end:
            found = re.search(pattern, self.text(), re.M)
            if found:
                return found
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + self.text()[-2000:])
            time.sleep(0.05)
        raise TimeoutError(f"no {pattern!r} in the daemon's log")

    def port(self) -> int:
        return int(self.wait_log(r"web page at http://127\.0\.0\.1:(\d+)/").group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=600)


def _get(port: int, path: str) -> tuple[int, int, float]:
    """(status, body bytes, seconds) of one GET on a new connection."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, len(body), time.perf_counter() - t0


class _Events:
    """One SSE client that reads and counts events on a thread."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.conn.request("GET", "/api/events")
        self.response = self.conn.getresponse()
        self.count = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while line := self.response.readline():
                if line.startswith(b"event:"):
                    self.count += 1
        except Exception:  # closed
            return

    def close(self) -> None:
        try:
            if self.conn.sock is not None:
                self.conn.sock.shutdown(2)
        except OSError:
            pass
        self.conn.close()


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """(ticks of the whole process, ticks of its threads named nightstack-web)."""
    total = web = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        total += ticks
        if comm == "nightstack-web":
            web += ticks
    return total, web


def _latency(quick: bool, work: Path) -> dict[str, Any]:
    n = 4 if quick else 12
    frames = ensure_night(n)
    watch, out = work / "watch", work / "out"
    watch.mkdir()
    daemon = _Daemon(watch, out, "--web", "127.0.0.1:0")
    try:
        port = daemon.port()
        daemon.wait_log("watching")
        events = _Events(port)
        samples: list[tuple[float, str, int, int, float]] = []  # (time, endpoint, status, bytes, s)
        stop = threading.Event()
        session: list[str] = []

        def client() -> None:
            i = 0
            while not stop.is_set():
                name = ENDPOINTS[i % len(ENDPOINTS)]
                i += 1
                if name in ("frames", "frames?since", "preview.jpg") and not session:
                    status = json.loads(_http_body(port, "/api/status"))
                    if status["session"]:
                        session.append(status["session"])
                    stop.wait(PAUSE_S)
                    continue
                sid = session[0] if session else ""
                path = {
                    "status": "/api/status",
                    "sessions": "/api/sessions",
                    "frames": f"/api/sessions/{sid}/frames",
                    "frames?since": f"/api/sessions/{sid}/frames?since=1000000",
                    "preview.jpg": f"/api/sessions/{sid}/preview.jpg",
                    "api/preview.jpg": "/api/preview.jpg",
                    "/": "/",
                }[name]
                code, size, seconds = _get(port, path)
                samples.append((time.time(), name, code, size, seconds))
                stop.wait(PAUSE_S)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        journal_times: list[float] = []
        for i, f in enumerate(frames):  # the next frame as soon as this one is journaled
            part = watch / (f.name + ".part")
            shutil.copyfile(f, part)
            os.rename(part, watch / f.name)
            journal_times = _wait_journal(out, i + 1, daemon, journal_times)
        stop.set()
        thread.join(timeout=30)
        events.close()
        first, last = journal_times[0], journal_times[-1]
        during = [s for s in samples if first <= s[0] <= last]
        lines = [json.loads(x) for x in next(out.glob("*/journal.jsonl")).read_text().splitlines()]
        return {
            "frames": n,
            "width": FULL_W,
            "height": FULL_H,
            "stacking_s": last - first,
            "accepted": sum(r["status"] == "accepted" for r in lines),
            "requests": [list(s) for s in during],
            "all_requests": len(samples),
            "errors": sum(1 for s in during if s[2] >= 500),
            "not_found": sum(1 for s in during if s[2] == 404),
            "events_received": events.count,
            "stage_ms": {
                k: float(np.median([r["ms"].get(k, 0) for r in lines[1:]]))
                for k in ("decode", "detect", "warp+store", "accumulate")
            },
        }
    finally:
        daemon.stop()


def _http_body(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def _wait_journal(
    out: Path, n: int, daemon: _Daemon, seen: list[float], timeout_s: float = 600
) -> list[float]:
    """``seen`` plus the times the journal lines up to the ``n``-th were seen (every 10 ms)."""
    seen = list(seen)
    end = time.time() + timeout_s
    while len(seen) < n:
        if time.time() > end or daemon.proc.poll() is not None:
            raise RuntimeError("frames not stacked:\n" + daemon.text()[-2000:])
        found = sorted(out.glob("*/journal.jsonl"))
        if found:
            count = found[0].read_bytes().count(b"\n")
            seen += [time.time()] * (count - len(seen))
        time.sleep(0.01)
    return seen


def _renders(work: Path) -> dict[str, Any]:
    """A 24 MP live.fits through the server's stretch endpoint (in this process)."""
    from astropy.io import fits

    from nightstack.web.server import WebServer

    out = work / "render"
    directory = out / "20261201-000000"
    directory.mkdir(parents=True)
    (directory / "session.json").write_text(json.dumps({"state": "open"}))
    rng = np.random.default_rng(1)
    cube = rng.normal(0.05, 0.002, (3, FULL_H, FULL_W)).astype(np.float32)
    fits.PrimaryHDU(cube).writeto(directory / "live.fits")
    del cube
    server = WebServer(out, "127.0.0.1:0", token=None, status=lambda: {}, close=lambda: None)
    server.start()
    try:
        base = f"/api/sessions/{directory.name}"
        cold = _get(server.port, f"{base}/stretch.jpg")
        warm = _get(server.port, f"{base}/stretch.jpg?strength=1.5")
        crop = _get(server.port, f"{base}/crop.jpg?cx=0.5&cy=0.5&size=1024")
    finally:
        server.stop()
    return {
        "live_fits_mb": (directory / "live.fits").stat().st_size / 2**20,
        "cold_s": cold[2],
        "warm_s": warm[2],
        "crop_s": crop[2],
        "jpeg_kb": cold[1] / 1024,
    }


def _weight(work: Path) -> dict[str, int]:
    from nightstack.web.api import STATIC
    from nightstack.web.server import WebServer

    server = WebServer(work, "127.0.0.1:0", token=None, status=lambda: {}, close=lambda: None)
    server.start()
    try:
        return {path: _get(server.port, path)[1] for path in STATIC}
    finally:
        server.stop()


def _idle(quick: bool, work: Path) -> dict[str, Any]:
    window = 10.0 if quick else 30.0
    results = {}
    for label, args, client in (
        ("web, no client", ["--web", "127.0.0.1:0"], False),
        ("--no-web", ["--no-web"], False),
        ("web, one event client", ["--web", "127.0.0.1:0"], True),
    ):
        watch, out = work / f"idle-{len(results)}" / "watch", work / f"idle-{len(results)}" / "out"
        watch.mkdir(parents=True)
        daemon = _Daemon(watch, out, *args)
        events = None
        try:
            daemon.wait_log("watching")
            if client:
                events = _Events(daemon.port())
            time.sleep(3.0)  # start-up settles (imports done, decoder child up)
            before = _cpu_ticks(daemon.proc.pid)
            t0 = time.monotonic()
            time.sleep(window)
            after = _cpu_ticks(daemon.proc.pid)
            seconds = time.monotonic() - t0
        finally:
            if events is not None:
                events.close()
            daemon.stop()
        results[label] = {
            "window_s": seconds,
            "process_ticks": after[0] - before[0],
            "web_ticks": after[1] - before[1],
        }
    return {"clk_tck": CLK_TCK, "runs": results}


def measure(quick: bool) -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="web-", dir=OUT))
    try:
        log("web: page weight")
        weight = _weight(work)
        log("web: idle CPU (three daemons, one after the other)")
        idle = _idle(quick, work)
        log("web: API latency while stacking 24 MP frames")
        latency = _latency(quick, work)
        log("web: stretch renders of a 24 MP live.fits")
        renders = _renders(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"weight": weight, "idle": idle, "latency": latency, "renders": renders}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _p95_ms(data: dict[str, Any]) -> float:
    return 1000 * _percentile([s[4] for s in data["latency"]["requests"]], 95)


def report(data: dict[str, Any]) -> str:
    lat = data["latency"]
    rows = []
    for name in ENDPOINTS:
        times = [s[4] for s in lat["requests"] if s[1] == name]
        sizes = [s[3] for s in lat["requests"] if s[1] == name]
        if times:
            rows.append(
                (
                    name,
                    len(times),
                    f"{1000 * _percentile(times, 50):.1f} ms",
                    f"{1000 * _percentile(times, 95):.1f} ms",
                    f"{1000 * max(times):.1f} ms",
                    f"{np.median(sizes) / 1024:.1f} KB",
                )
            )
    every = [s[4] for s in lat["requests"]]
    rows.append(
        (
            "**all**",
            len(every),
            f"{1000 * _percentile(every, 50):.1f} ms",
            f"**{_p95_ms(data):.1f} ms**",
            f"{1000 * max(every):.1f} ms",
            "",
        )
    )
    stages = ", ".join(f"{k} {v:.0f} ms" for k, v in lat["stage_ms"].items())
    weight = data["weight"]
    total_kb = sum(weight.values()) / 1024
    files = ", ".join(f"`{p}` {b / 1024:.1f} KB" for p, b in weight.items())
    idle = data["idle"]
    tick_ms = 1000 / idle["clk_tck"]
    idle_rows = []
    for label, r in idle["runs"].items():
        busy = r["process_ticks"] * tick_ms
        share = 100 * busy / 1000 / r["window_s"]
        idle_rows.append(
            (
                label,
                f"{r['window_s']:.0f} s",
                f"{busy:.0f} ms ({share:.2f} % of a core)",
                f"{r['web_ticks'] * tick_ms:.0f} ms",
            )
        )
    rend = data["renders"]
    body = [
        f"`nightstack watch --web 127.0.0.1:0` on an empty folder; {lat['frames']} frames of "
        f"the {lat['width']} x {lat['height']} (24 MP) benchmark night, each dropped as soon "
        "as the previous one was journaled (the worker never idle for long, and a preview "
        f"after every frame); {lat['stacking_s']:.0f} s from the first journal line to the "
        f"last ({lat['accepted']} accepted; median stages per frame: {stages}). "
        "Meanwhile a client in another process made one GET "
        f"every {1000 * PAUSE_S:.0f} ms plus the time of the previous (a new connection each), "
        f"with one Server-Sent Events client connected ({lat['events_received']} events "
        f"received). Latency = connect to last byte; only requests during the stacking count "
        f"({lat['errors']} answered 5xx; {lat['not_found']} answered 404: a preview asked for "
        "before the first one was written).",
        "",
        table(("request", "n", "p50", "p95", "max", "size"), rows),
        "",
        f"Stretch renders of a 24 MP `live.fits` ({rend['live_fits_mb']:.0f} MB, float32, 3 "
        f"planes, Gaussian noise: a worst case for JPEG; in the page cache) through "
        f"`/stretch.jpg` at 1600 px: first request {fmt_s(rend['cold_s'])} "
        f"(memory-mapped read, block-mean shrink, stretch, JPEG of {rend['jpeg_kb']:.0f} KB), "
        f"another strength {fmt_s(rend['warm_s'])} (the shrunk stack cached), a 1024 px 1:1 "
        f"crop {fmt_s(rend['crop_s'])}. Each new live.fits is read once, whatever the number "
        "of clients.",
        "",
        f"Page weight (without images): {total_kb:.1f} KB ({files}); nothing is loaded from "
        "elsewhere.",
        "",
        "Idle CPU (no frames): CPU time of the daemon process over the window, and of its web "
        "threads alone (OS thread name `nightstack-web`; 1 clock tick = "
        f"{tick_ms:.0f} ms). The process figure includes the worker loop's own ticks (signals, "
        "close requests, watchdog: twice a second).",
        "",
        table(("daemon", "window", "process CPU", "web threads CPU"), idle_rows),
        "",
        "Goals: "
        + "; ".join(f"{g}: {'met' if ok else '**missed**'} ({m})" for g, m, ok in goals(data))
        + ".",
    ]
    return "\n".join(body)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    p95 = _p95_ms(data)
    weight_kb = sum(data["weight"].values()) / 1024
    idle = data["idle"]["runs"]["web, no client"]
    return [
        (
            f"web API p95 <= {P95_GOAL_MS:.0f} ms while stacking 24 MP",
            f"{p95:.1f} ms",
            p95 <= P95_GOAL_MS,
        ),
        (
            f"page weight <= {WEIGHT_GOAL_KB:.0f} KB without images",
            f"{weight_kb:.1f} KB",
            weight_kb <= WEIGHT_GOAL_KB,
        ),
        (
            "no measurable CPU with no client (web threads)",
            f"{idle['web_ticks']} ticks in {idle['window_s']:.0f} s",
            idle["web_ticks"] <= IDLE_TICKS_GOAL,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames, shorter idle window")
    parser.add_argument("--report-only", action="store_true", help="from bench/out/web.json")
    args = parser.parse_args(argv)
    return standalone(
        "web", TITLE, measure, report, quick=args.quick, report_only=args.report_only
    )

if __name__ == "__main__":
    sys.exit(main())
