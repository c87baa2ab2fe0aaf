"""Issue 20's numbers: a daemon stacking 24 MP frames under 2000 idle or slow connections from
one client and looping renders.

``nightstack watch --web 127.0.0.1:0`` on an empty folder, under ``prlimit --nofile=4096`` (the
units' ``LimitNOFILE=4096``), with the default settings otherwise (no token). Frames of the
24 MP benchmark night are dropped one at a time (``.part`` + rename, the next as soon as the
previous one is journaled), in three phases:

- **warm-up**: the first frames (the reference, the live warm-up batch; ``live.fits`` and a
  preview appear);
- **calm**: as many frames as the attack, with only the ``/api/status`` probe running: the
  baseline of memory, log growth, status latency and frame time with the same work and no
  attack (as long as the attack, since the frame pipeline's own peak still rises over the first
  frames after the warm-up: measured without any attack, 873-878 MB over frames 7-10 and 924 MB
  over frames 11-40);
- **attack**: more frames while
  - one client, 127.0.0.1, tries to hold :data:`CONNECTIONS` connections: half idle (connected,
    nothing sent), half slow (a half-sent request, one more header line every
    :data:`TRICKLE_S`); every :data:`RECONNECT_S` it opens again each one the daemon closed
    (a slowloris keeps its count up), with non-blocking connects;
  - another client, 127.0.0.3, runs :data:`RENDER_THREADS` threads looping on renders of the
    open session (``stretch.jpg`` at the listed widths with a random strength, some as PNG,
    1:1 crops, ``preview.jpg``), a new connection each, with the ``Host`` the daemon accepts
    (``127.0.0.1:PORT``) and no token, until at least :data:`RENDERS` were answered 200,
    the attack frames are journaled and :data:`ATTACK_MIN_S` passed (the renders come from
    their own address: from the attacker's, the per-client cap would refuse them before they
    cost anything);
- throughout calm and attack, a third client, 127.0.0.2, asks ``/api/status`` every
  :data:`STATUS_PAUSE_S` (a new connection each; connect to last byte, a failure counted at
  its elapsed time).

Memory: the daemon's main-process VmRSS from ``/proc`` (``_common.MemoryWatch``, every 0.1 s),
its largest value per phase, and idle samples before and after the attack; the growth the goal
speaks of is the attack's peak minus the calm phase's peak (the same frame work without the
attack: a 24 MP frame's own transients are hundreds of MB). The log's growth is measured over
each phase; the journal's outcomes over the run.

Run alone: ``.venv/bin/python bench/bench_hardening.py [--quick]`` (writes its RESULTS.md
section); in the suite: ``.venv/bin/python bench/run.py --only hardening``.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
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
    MemoryWatch,
    ensure_night,
    log,
    standalone,
    table,
)
from bench_web import _env

TITLE = (
    "Hardening under attack: 2000 idle or slow connections and looping renders while "
    "stacking, 24 MP (issue 20)"
)
CONNECTIONS = 2000
RENDERS = 200
RENDER_THREADS = 4
NOFILE = 4096  # LimitNOFILE= of deploy/nightstack.service and nightstack-user.service
RECONNECT_S = 5.0
TRICKLE_S = 10.0
CONNECT_TIMEOUT_S = 10.0
ATTACK_MIN_S = 90.0
"""The attack lasts at least this long (full run): past the server's 75 s timeout of a slow
request, so the admitted slow connections are closed and opened again during it."""
STATUS_PAUSE_S = 0.05
STATUS_TIMEOUT_S = 10.0
ATTACKER, PROBE, RENDERER = "127.0.0.1", "127.0.0.2", "127.0.0.3"
HALF_REQUEST = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"

P95_GOAL_MS = 50.0
RSS_GOAL_MB = 100.0
LOG_GOAL_MB = 1.0
PHASES = ("warm-up", "calm", "attack")


class _Daemon:
    """``nightstack watch`` under ``prlimit``, its output into a log file."""

    def __init__(self, watch: Path, out: Path) -> None:
        self.log = out.parent / "daemon.log"
        cmd = [
            "prlimit",
            f"--nofile={NOFILE}:{NOFILE}",  # prlimit execs the daemon: same pid
            sys.executable,
            "-m",
            "nightstack.cli",
            "watch",
            str(watch),
            "--output-dir",
            str(out),
            "--web",
            "127.0.0.1:0",
        ]
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env())

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_text(self, needle: str, timeout_s: float = 120) -> str:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            text = self.text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + text[-2000:])
            time.sleep(0.05)
        raise TimeoutError(f"no {needle!r} in the daemon's log")

    def port(self) -> int:
        text = self.wait_text("web page at http://127.0.0.1:")
        return int(text.split("web page at http://127.0.0.1:", 1)[1].split("/", 1)[0])


def _journal(out: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(out.glob("*/journal.jsonl")):
        lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines


def _feed(frame: Path, watch: Path, out: Path, daemon: _Daemon, timeout_s: float = 600) -> float:
    """Drop ``frame`` into ``watch`` and wait for its journal line; seconds it took."""
    before = len(_journal(out))
    t0 = time.monotonic()
    part = watch / (frame.name + ".part")
    shutil.copyfile(frame, part)
    os.rename(part, watch / frame.name)
    while len(_journal(out)) <= before:
        if time.monotonic() - t0 > timeout_s or daemon.proc.poll() is not None:
            raise RuntimeError(f"{frame.name} not journaled:\n" + daemon.text()[-2000:])
        time.sleep(0.02)
    return time.monotonic() - t0


def _rss_kinds_mb(pid: int) -> dict[str, float]:
    """RssAnon and RssFile of ``pid`` in MB (file pages: e.g. a memory-mapped live.fits)."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Attacker:
    """One client (:data:`ATTACKER`) trying to hold ``n`` connections, half idle and half
    slow, opening again every :data:`RECONNECT_S` each one that was closed (non-blocking
    connects on one thread, ``poll`` for the answers)."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.stop = threading.Event()
        self.counts = {
            "attempts": 0,  # connects started
            "established": 0,  # connects that completed
            "connect_failed": 0,  # refused, reset or timed out while connecting
            "reset": 0,  # established, then reset by the server
            "closed": 0,  # established, then closed by the server (EOF)
            "answered": 0,  # established, then the server sent bytes (e.g. 408) and we closed
            "trickled": 0,  # header lines sent by slow connections
        }
        self.rounds: list[tuple[float, int, int]] = []  # (time, established held, opened)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        socks: dict[int, tuple[socket.socket, int, str, float]] = {}  # fd -> (s, i, state, t)
        slots: list[int | None] = [None] * self.n  # slot -> fd
        next_round = next_trickle = time.monotonic()
        next_trickle += TRICKLE_S

        def drop(fd: int) -> None:
            sock, i, _, _ = socks.pop(fd)
            poller.unregister(fd)
            sock.close()
            slots[i] = None

        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_round:
                    opened = 0
                    for i in range(self.n):
                        if slots[i] is not None:
                            continue
                        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        sock.setblocking(False)
                        self.counts["attempts"] += 1
                        code = sock.connect_ex(("127.0.0.1", self.port))
                        if code not in (0, errno.EINPROGRESS):
                            self.counts["connect_failed"] += 1
                            sock.close()
                            continue
                        socks[sock.fileno()] = (sock, i, "connecting", now)
                        slots[i] = sock.fileno()
                        poller.register(sock.fileno(), select.POLLOUT)
                        opened += 1
                    held = sum(1 for s in socks.values() if s[2] == "open")
                    self.rounds.append((time.time(), held, opened))
                    next_round = now + RECONNECT_S
                if now >= next_trickle:
                    for fd, (sock, i, state, _) in list(socks.items()):
                        if state == "open" and i % 2:
                            try:
                                sock.send(b"X-Slow: 1\r\n")
                                self.counts["trickled"] += 1
                            except OSError:
                                self.counts["reset"] += 1
                                drop(fd)
                    next_trickle = now + TRICKLE_S
                for fd, _ in poller.poll(200):
                    if fd not in socks:
                        continue
                    sock, i, state, t = socks[fd]
                    if state == "connecting":
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            self.counts["connect_failed"] += 1
                            drop(fd)
                            continue
                        self.counts["established"] += 1
                        if i % 2:  # slow: a request without its end
                            try:
                                sock.send(HALF_REQUEST)
                            except OSError:
                                self.counts["reset"] += 1
                                drop(fd)
                                continue
                        socks[fd] = (sock, i, "open", t)
                        poller.modify(fd, select.POLLIN)
                        continue
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        self.counts["reset"] += 1
                    else:
                        self.counts["answered" if data else "closed"] += 1
                    drop(fd)
                now = time.monotonic()
                for fd, (_, _, state, t) in list(socks.items()):
                    if state == "connecting" and now - t > CONNECT_TIMEOUT_S:
                        self.counts["connect_failed"] += 1
                        drop(fd)
        finally:
            for fd in list(socks):
                drop(fd)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def _get(port: int, path: str, source: str, timeout: float) -> tuple[int, int, float]:
    """(status or -1 on a failure, body bytes, seconds) of one GET on a new connection from
    ``source``."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout, source_address=(source, 0)
    )
    try:
        conn.request("GET", path)  # Host: 127.0.0.1:PORT, accepted without a token
        response = conn.getresponse()
        body = response.read()
        return response.status, len(body), time.perf_counter() - t0
    except (OSError, http.client.HTTPException):
        return -1, 0, time.perf_counter() - t0
    finally:
        conn.close()


def _render_path(sid: str, rng: random.Random) -> tuple[str, str]:
    """(kind, path) of one render request at the listed sizes."""
    from nightstack.web.render import CROPS, WIDTHS

    base = f"/api/sessions/{sid}"
    strength = f"{rng.uniform(0.3, 2.8):.2f}"
    pick = rng.random()
    if pick < 0.6:
        linked = rng.choice(("true", "false"))
        width = rng.choice(WIDTHS)
        return (
            "stretch.jpg",
            f"{base}/stretch.jpg?width={width}&strength={strength}&linked={linked}",
        )
    if pick < 0.75:
        width = rng.choice(WIDTHS[-3:])
        return "stretch png", f"{base}/stretch.jpg?width={width}&strength={strength}&format=png"
    if pick < 0.9:
        cx, cy, size = rng.random(), rng.random(), rng.choice(CROPS)
        return (
            "crop.jpg",
            f"{base}/crop.jpg?cx={cx:.3f}&cy={cy:.3f}&size={size}&strength={strength}",
        )
    return "preview.jpg", f"{base}/preview.jpg"


def measure(quick: bool) -> dict[str, Any]:
    warm, calm, attack = (6, 4, 4) if quick else (6, 30, 30)
    attack_min_s = 0.0 if quick else ATTACK_MIN_S
    frames = ensure_night(warm + calm + attack)
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hardening-", dir=OUT))
    watch, out = work / "watch", work / "out"
    watch.mkdir()
    phase = ["start"]
    daemon = _Daemon(watch, out)
    memory = MemoryWatch(daemon.proc.pid, interval_s=0.1, phase=lambda: phase[0])
    stop_probe, stop_renders = threading.Event(), threading.Event()  # fd watch, renders
    threads: list[threading.Thread] = []
    children: list[subprocess.Popen[str]] = []
    try:
        port = daemon.port()
        daemon.wait_text("watching")
        log_size: dict[str, int] = {}
        fds: dict[str, int] = {}
        rss_kinds: dict[str, dict[str, float]] = {}  # phase -> RssAnon / RssFile peaks, MB
        frame_s: dict[str, list[float]] = {p: [] for p in PHASES}
        bounds: dict[str, float] = {}  # phase -> wall time it began
        renders: list[tuple[str, int, int, float]] = []  # (kind, status, bytes, seconds)

        def proc_watch() -> None:  # descriptors, RssAnon and RssFile every 0.1 s
            while not stop_probe.is_set():
                try:
                    n = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
                    kinds = _rss_kinds_mb(daemon.proc.pid)
                except OSError:
                    return
                fds[phase[0]] = max(fds.get(phase[0], 0), n)
                for kind, mb in kinds.items():
                    peaks = rss_kinds.setdefault(phase[0], {})
                    peaks[kind] = max(peaks.get(kind, 0.0), mb)
                stop_probe.wait(0.1)

        def begin(name: str) -> None:
            log_size[name] = daemon.log.stat().st_size
            bounds[name] = time.time()
            phase[0] = name

        log(f"hardening: warm-up, {warm} frames of 24 MP")
        begin("warm-up")
        threads.append(threading.Thread(target=proc_watch, daemon=True))
        threads[-1].start()
        for f in frames[:warm]:
            frame_s["warm-up"].append(_feed(f, watch, out, daemon))
        sid = json.loads(_status_body(port))["session"]
        live = out / sid / "live.fits"
        end = time.monotonic() + 120
        while not live.exists() and time.monotonic() < end:
            time.sleep(0.2)
        if not live.exists():
            raise RuntimeError(f"no live.fits in {out / sid}:\n" + daemon.text()[-2000:])
        log(f"hardening: calm, {calm} frames with the /api/status probe")
        begin("calm")
        children.append(_child("probe", port))
        for f in frames[warm : warm + calm]:
            frame_s["calm"].append(_feed(f, watch, out, daemon))
        time.sleep(3.0)  # the last frame's preview, checkpoint and live.fits written
        rss_before = _rss_mb(daemon.proc.pid)
        log(f"hardening: attack, {attack} frames, {CONNECTIONS} connections, renders")
        begin("attack")
        t_attack = time.monotonic()
        children.append(_child("attacker", port))

        def render_loop(seed: int) -> None:
            rng = random.Random(seed)
            while not stop_renders.is_set():
                kind, path = _render_path(sid, rng)
                code, size, seconds = _get(port, path, RENDERER, 120)
                renders.append((kind, code, size, seconds))
                if code != 200:
                    stop_renders.wait(0.1)

        for k in range(RENDER_THREADS):
            threads.append(threading.Thread(target=render_loop, args=(k,), daemon=True))
            threads[-1].start()
        for f in frames[warm + calm :]:
            frame_s["attack"].append(_feed(f, watch, out, daemon))
        end = time.monotonic() + 300
        while (
            sum(r[1] == 200 for r in renders) < RENDERS
            or time.monotonic() - t_attack < attack_min_s
        ) and time.monotonic() < end:
            time.sleep(0.2)
        stop_renders.set()
        for t in threads[-RENDER_THREADS:]:
            t.join(timeout=150)
        attack_s = time.monotonic() - t_attack
        attacker = _finish(children[1])
        log_size["attack end"] = daemon.log.stat().st_size
        bounds["after"] = time.time()
        phase[0] = "after"
        samples = _finish(children[0])
        stop_probe.set()
        threads[0].join(timeout=30)
        time.sleep(3.0)
        rss_after = _rss_mb(daemon.proc.pid)
        log("hardening: SIGTERM (the session's final)")
        daemon.proc.send_signal(signal.SIGTERM)
        exit_code = daemon.proc.wait(timeout=900)
        memory.stop()
        text = daemon.text()
        journal = _journal(out)
        return {
            "frames": {"warm-up": warm, "calm": calm, "attack": attack},
            "width": FULL_W,
            "height": FULL_H,
            "nofile": NOFILE,
            "connections": CONNECTIONS,
            "render_threads": RENDER_THREADS,
            "attack_s": attack_s,
            "frame_s": frame_s,
            "journal": [
                {"file": r.get("file"), "status": r.get("status"), "reason": r.get("reason")}
                for r in journal
            ],
            "status": [(_phase_at(t, bounds), code, sec) for t, code, sec in samples],
            "renders": renders,
            "attacker": attacker,
            "fds_max": fds,
            "rss_mb": {
                "idle before attack": rss_before,
                "idle after attack": rss_after,
                **{f"peak {p}": v for p, v in memory.phase_rss_mb.items()},
            },
            "rss_kinds_peak_mb": rss_kinds,
            "tree_pss_peak_mb": memory.phase_pss_mb,
            "log_bytes": {
                "warm-up": log_size["calm"] - log_size["warm-up"],
                "calm": log_size["attack"] - log_size["calm"],
                "attack": log_size["attack end"] - log_size["attack"],
                "total": len(text.encode()),
            },
            "log_refused_lines": sum(
                "connection from" in x and "refused" in x for x in text.splitlines()
            ),
            "log_fd_errors": sum(
                ("Too many open files" in x or "out of system resource" in x)
                for x in text.splitlines()
            ),
            "log_tracebacks": text.count("Traceback"),
            "exit_code": exit_code,
        }
    finally:
        stop_probe.set()
        stop_renders.set()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
        memory.stop()
        keep = work / "daemon.log"
        if keep.exists():
            shutil.copyfile(keep, OUT / "hardening-daemon.log")
        shutil.rmtree(work, ignore_errors=True)


def _phase_at(t: float, bounds: dict[str, float]) -> str:
    """The phase (see ``bounds``: name -> wall time it began) that wall time ``t`` falls in."""
    return max(((b, name) for name, b in bounds.items() if b <= t), default=(0.0, "start"))[1]


def _child(role: str, port: int) -> subprocess.Popen[str]:
    """This module run as ``--ROLE PORT`` (``probe`` or ``attacker``) in a process of its own
    (its own interpreter lock and descriptors, like another device); it stops when its stdin
    closes and prints its results as JSON (see :func:`_finish`)."""
    return subprocess.Popen(
        [sys.executable, __file__, f"--{role}", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _finish(child: subprocess.Popen[str]) -> Any:
    """Close a :func:`_child`'s stdin, wait for it and return what it printed."""
    out, _ = child.communicate(timeout=120)
    if child.returncode != 0:
        raise RuntimeError(f"{child.args} exited {child.returncode}")
    return json.loads(out)


def _probe_main(port: int) -> None:
    """``/api/status`` from :data:`PROBE` every :data:`STATUS_PAUSE_S` until stdin closes;
    prints [(wall time, status, seconds)]."""
    stop = threading.Event()
    samples: list[tuple[float, int, float]] = []

    def loop() -> None:
        while not stop.is_set():
            t = time.time()
            code, _, seconds = _get(port, "/api/status", PROBE, STATUS_TIMEOUT_S)
            samples.append((t, code, seconds))
            stop.wait(STATUS_PAUSE_S)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    sys.stdin.read()
    stop.set()
    thread.join(timeout=STATUS_TIMEOUT_S + 5)
    print(json.dumps(samples))


def _attacker_main(port: int) -> None:
    """:class:`_Attacker` with :data:`CONNECTIONS` until stdin closes; prints its counts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CONNECTIONS + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        raise SystemExit(f"needs {want} descriptors for the client side (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    attacker = _Attacker(port, CONNECTIONS)
    sys.stdin.read()
    attacker.close()
    print(json.dumps({"counts": attacker.counts, "rounds": attacker.rounds}))


def _status_body(port: int) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(PROBE, 0))
    try:
        conn.request("GET", "/api/status")
        return conn.getresponse().read()
    finally:
        conn.close()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _status_ms(data: dict[str, Any], phase: str) -> list[float]:
    """Seconds -> ms of every /api/status request of ``phase`` (failures at their elapsed time)."""
    return [1000 * s for p, _, s in data["status"] if p == phase]


def _rejected(data: dict[str, Any]) -> int:
    return sum(r["status"] == "rejected" for r in data["journal"])


def _accepted(data: dict[str, Any]) -> int:
    return sum(r["status"] == "accepted" for r in data["journal"])


def _rss_growth(data: dict[str, Any]) -> float:
    rss = data["rss_mb"]
    return float(rss.get("peak attack", float("nan")) - rss.get("peak calm", float("nan")))


def _log_mb(data: dict[str, Any]) -> float:
    return float(data["log_bytes"]["attack"] / 2**20)


def report(data: dict[str, Any]) -> str:
    n = data["frames"]
    att = data["attacker"]["counts"]
    rounds = data["attacker"]["rounds"]
    held = [r[1] for r in rounds[1:]] or [0]
    status_rows = []
    for phase in ("calm", "attack"):
        ms = _status_ms(data, phase)
        failed = sum(1 for p, c, _ in data["status"] if p == phase and c != 200)
        status_rows.append(
            (
                phase,
                len(ms),
                failed,
                f"{_pct(ms, 50):.1f} ms",
                f"{_pct(ms, 95):.1f} ms",
                f"{max(ms, default=float('nan')):.0f} ms",
            )
        )
    render_rows = []
    kinds = sorted({r[0] for r in data["renders"]})
    for kind in [*kinds, "all"]:
        rs = [r for r in data["renders"] if kind in ("all", r[0])]
        ok = [r for r in rs if r[1] == 200]
        codes = sorted({r[1] for r in rs})
        by_code = ", ".join(
            f"{c if c > 0 else 'failed'}: {sum(r[1] == c for r in rs)}" for c in codes
        )
        render_rows.append(
            (
                f"**{kind}**" if kind == "all" else kind,
                len(rs),
                by_code,
                f"{_pct([1000 * r[3] for r in ok], 50):.0f} ms",
                f"{_pct([1000 * r[3] for r in ok], 95):.0f} ms",
                f"{np.median([r[2] for r in ok]) / 1024:.0f} KB" if ok else "-",
            )
        )
    rss = data["rss_mb"]
    pss = data["tree_pss_peak_mb"]
    kinds = data.get("rss_kinds_peak_mb", {})
    mem_rows = [
        (
            phase,
            f"{rss.get('peak ' + phase, float('nan')):.0f} MB",
            f"{kinds.get(phase, {}).get('RssAnon', float('nan')):.0f} MB",
            f"{kinds.get(phase, {}).get('RssFile', float('nan')):.0f} MB",
            f"{pss.get(phase, float('nan')):.0f} MB",
            f"{data['fds_max'].get(phase, 0)}",
            f"{data['log_bytes'].get(phase, 0) / 1024:.1f} KB",
            f"{np.median(data['frame_s'][phase]):.2f} s" if data["frame_s"].get(phase) else "-",
        )
        for phase in PHASES
    ]
    outcomes: dict[str, int] = {}
    for r in data["journal"]:
        outcomes[str(r["status"])] = outcomes.get(str(r["status"]), 0) + 1
    reasons = sorted({str(r["reason"]) for r in data["journal"] if r["status"] == "rejected"})
    body = [
        f"`nightstack watch --web 127.0.0.1:0` under `prlimit --nofile={data['nofile']}` (the "
        "units' `LimitNOFILE`), default settings, no token, on an empty folder; frames of the "
        f"{data['width']} x {data['height']} (24 MP) benchmark night dropped one at a time, "
        "each as soon as the previous one was journaled: "
        f"{n['warm-up']} to warm up (reference, live warm-up, first `live.fits`), {n['calm']} "
        f"calm (the baseline: same work, no attack), {n['attack']} under attack "
        f"({data['attack_s']:.0f} s). During the attack one client (127.0.0.1) tried to hold "
        f"{data['connections']} connections, half idle, half a half-sent request trickling a "
        f"header line every {TRICKLE_S:.0f} s, re-opening every {RECONNECT_S:.0f} s each one "
        f"that was closed; another (127.0.0.3) looped on renders with {data['render_threads']} "
        f"threads; a third (127.0.0.2) asked `/api/status` every {1000 * STATUS_PAUSE_S:.0f} ms "
        "plus the previous answer's time (calm and attack; a new connection each, connect to "
        "last byte).",
        "",
        f"Journal: {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}"
        + (f" (reasons: {'; '.join(reasons)})" if reasons else "")
        + f". Daemon exit code after SIGTERM: {data['exit_code']}.",
        "",
        "`/api/status` from 127.0.0.2 (failures: no 200 answer, counted at their elapsed time):",
        "",
        table(("phase", "requests", "failed", "p50", "p95", "max"), status_rows),
        "",
        "Renders from 127.0.0.3 during the attack (503: the session's render queue full, the "
        "thread waits 0.1 s and goes on):",
        "",
        table(("request", "n", "answers", "p50 (200)", "p95 (200)", "size"), render_rows),
        "",
        f"The attacker (127.0.0.1): {att['attempts']} connects started, {att['established']} "
        f"established, {att['connect_failed']} failed to connect (refused or timed out after "
        f"{CONNECT_TIMEOUT_S:.0f} s), {att['reset']} reset by the daemon, {att['closed']} "
        f"closed by it, {att['answered']} answered (then closed by the client), "
        f"{att['trickled']} header lines trickled; connections the client saw open at the "
        f"start of each round (some already reset by the daemon but not yet read): median "
        f"{int(np.median(held))}, max {max(held)}. "
        f"Gate log lines: {data['log_refused_lines']} `connection ... refused` lines; "
        f"{data['log_fd_errors']} lines with `Too many open files` or `out of system "
        f"resource`; {data['log_tracebacks']} tracebacks.",
        "",
        "Per phase: the daemon's main-process VmRSS peak (sampled every 0.1 s) and, sampled "
        "apart, the peaks of its two parts, anonymous memory and mapped file pages (RssAnon, "
        "RssFile: a memory-mapped `live.fits` read by a render counts here), the process "
        "tree's PSS peak (with the decoder child), the daemon's open descriptors (peak, every "
        "0.1 s), the log's growth and the median time from a frame's drop to its journal line:",
        "",
        table(
            (
                "phase",
                "VmRSS peak",
                "RssAnon peak",
                "RssFile peak",
                "tree PSS peak",
                "descriptors",
                "log growth",
                "frame time",
            ),
            mem_rows,
        ),
        "",
        f"Idle VmRSS (3 s after the last frame) before the attack {rss['idle before attack']:.0f}"
        f" MB, after it (attack over, sockets closed) {rss['idle after attack']:.0f} MB. RSS "
        "growth = the attack's peak minus the calm phase's peak (a 24 MP frame's own "
        "transients are hundreds of MB, so the idle value is no baseline for a peak).",
        "",
        "Goals: "
        + "; ".join(f"{g}: {'met' if ok else '**missed**'} ({m})" for g, m, ok in goals(data))
        + ".",
    ]
    return "\n".join(body)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    p95 = _pct(_status_ms(data, "attack"), 95)
    growth = _rss_growth(data)
    log_mb = _log_mb(data)
    ok_renders = sum(r[1] == 200 for r in data["renders"])
    attack_note = f"{data['connections']} connections, {ok_renders} renders answered 200"
    return [
        (
            "0 frames rejected under 2000 idle/slow connections + 200 looping renders",
            f"{_rejected(data)} rejected, {_accepted(data)} accepted ({attack_note})",
            _rejected(data) == 0 and ok_renders >= RENDERS,
        ),
        (
            f"`/api/status` p95 <= {P95_GOAL_MS:.0f} ms under that attack",
            f"{p95:.1f} ms",
            p95 <= P95_GOAL_MS,
        ),
        (
            f"daemon RSS growth <= {RSS_GOAL_MB:.0f} MB under that attack",
            f"{growth:+.0f} MB (peak {data['rss_mb'].get('peak attack', 0):.0f} vs calm "
            f"{data['rss_mb'].get('peak calm', 0):.0f})",
            growth <= RSS_GOAL_MB,
        ),
        (
            f"log growth <= {LOG_GOAL_MB:.0f} MB under that attack",
            f"{1024 * log_mb:.1f} KB",
            log_mb <= LOG_GOAL_MB,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames")
    parser.add_argument("--report-only", action="store_true", help="from bench/out/hardening.json")
    parser.add_argument("--probe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--attacker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        _probe_main(args.probe)
        return 0
    if args.attacker:
        _attacker_main(args.attacker)
        return 0
    return standalone(
        "hardening", TITLE, measure, report, quick=args.quick, report_only=args.report_only
    )

if __name__ == "__main__":
    sys.exit(main())
