"""Shared pieces of the benchmarks: machine facts, timing, peak memory, data, RESULTS.md.

Every figure a benchmark reports is a median of several runs in the same process run, and a
speed is reported as a ratio to the decode time of the same file measured in the same run, so
the numbers survive a busy or slower machine (the goals are ratios too).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"  # gitignored: simulated frames, frame stores, stacks
RESULTS = BENCH / "RESULTS.md"
PYTHON = sys.executable

FULL_W, FULL_H = 6000, 4000
"""A 24 MP frame, the size of the issue's camera (Canon R-series class)."""

NIGHT_FRAMES = 100
"""The simulated night every 24 MP benchmark draws its frames from (the star field covers all)."""

NIGHT_SEED = 11


# ----------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """nproc, CPU model, RAM and software versions of this machine."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(meminfo()["MemTotal"] / 2**20, 1),
        "python": platform.python_version(),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def machine_line() -> str:
    m = machine()
    return (
        f"nproc={m['nproc']}, CPU {m['cpu']}, RAM {m['ram_gb']} GB, Python {m['python']}, "
        f"1-min load average {m['load_1min']} at the start"
    )


def code_version() -> str:
    """The nightstack source benchmarked: the commit of the imported package's repository and
    whether it had uncommitted changes, or the ``COMMIT`` file of an exported snapshot (run
    with ``PYTHONPATH=SNAPSHOT/daemon`` to benchmark a fixed commit while the tree changes)."""
    import nightstack

    root = Path(nightstack.__file__).resolve().parents[2]
    if (root / "COMMIT").exists():
        return f"snapshot of {(root / 'COMMIT').read_text().strip()}"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "daemon/")
    except OSError:
        return "unknown"
    return head + (" + uncommitted changes in daemon/" if dirty else "")


def run_meta(command: str) -> dict[str, str]:
    """What a section states about the run that produced it (taken when the run starts)."""
    return {
        "command": command,
        "machine": machine_line(),
        "code": code_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def available_gb() -> float:
    return meminfo()["MemAvailable"] / 2**20


def free_disk_gb(path: Path = OUT) -> float:
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**30


# ----------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@contextmanager
def timed(sink: list[float]) -> Iterator[None]:
    """Append the wall seconds of the ``with`` block to ``sink``."""
    t0 = time.perf_counter()
    yield
    sink.append(time.perf_counter() - t0)


def time_calls(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- memory


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class MemoryWatch:
    """Peak memory of a process tree, polled from /proc while it runs.

    - ``hwm_mb[pid]``: the kernel's own peak resident set (VmHWM) of each process, last value
      read before it exited (VmHWM only grows, so this misses at most the last poll interval);
    - ``pss_peak_mb``: the largest sum over the tree of PSS (proportional set size: a page
      shared by two processes, like the decoder's shared-memory frame, counts half in each)
      seen at any one poll (every 50 ms): the tree's real simultaneous footprint, sampled, so
      a peak shorter than the interval can be missed;
    - with ``phase`` (a callable naming the current phase of the job, e.g. "ingest" or
      "combine"): ``phase_rss_mb[phase]``, the main process's largest sampled VmRSS in each
      phase, and ``phase_pss_mb[phase]``, the tree's largest sampled PSS in each phase.
    """

    pid: int
    interval_s: float = 0.05
    phase: Callable[[], str] | None = None
    hwm_mb: dict[int, float] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    pss_peak_mb: float = 0.0
    phase_rss_mb: dict[str, float] = field(default_factory=dict)
    phase_pss_mb: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            phase = self.phase() if self.phase is not None else "run"
            pids = [self.pid, *_children(self.pid)]
            for p in pids:
                hwm = _status_kb(p, "VmHWM")
                if hwm is not None:
                    self.hwm_mb[p] = max(self.hwm_mb.get(p, 0.0), hwm / 1024)
                    if "spawn_main" not in self.names.get(p, ""):  # a fresh child may not
                        self.names[p] = _cmdline(p)  # have exec'd yet: read it until it has
            rss = _status_kb(self.pid, "VmRSS")
            if rss is not None:
                self.phase_rss_mb[phase] = max(self.phase_rss_mb.get(phase, 0.0), rss / 1024)
            total = sum(v for p in pids if (v := _pss_kb(p)) is not None) / 1024
            self.pss_peak_mb = max(self.pss_peak_mb, total)
            self.phase_pss_mb[phase] = max(self.phase_pss_mb.get(phase, 0.0), total)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def main_mb(self) -> float:
        return self.hwm_mb.get(self.pid, 0.0)

    def decoder_mb(self) -> float:
        """Largest VmHWM among the tree's decoder children (multiprocessing spawn)."""
        peaks = [
            mb
            for p, mb in self.hwm_mb.items()
            if p != self.pid and "spawn_main" in self.names.get(p, "")
        ]
        return max(peaks, default=0.0)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class RunResult:
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    memory: MemoryWatch


def run_watched(
    cmd: Sequence[str],
    *,
    timeout_s: float = 3600,
    phase: Callable[[], str] | None = None,
    interval_s: float = 0.05,
    **kwargs: Any,
) -> RunResult:
    """Run a command, polling its tree's memory every ``interval_s`` (see ``MemoryWatch``);
    wall time spawn -> exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )
    watch = MemoryWatch(proc.pid, interval_s=interval_s, phase=phase)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    watch.stop()
    return RunResult(seconds, proc.returncode, stdout, stderr, watch)


# ----------------------------------------------------------------------------- Siril

SIRIL_STACK_SCRIPT = """requires 1.0.0
cd {lights}
convert light -debayer -out={process}
cd {process}
register light
stack r_light rej s 3 3 -nonorm -out={result}
close
"""
"""The peer's batch job: convert (debayer), register, stack with a 3/3 sigma rejection."""


@dataclass
class SirilRun:
    """One ``siril-cli`` run of :data:`SIRIL_STACK_SCRIPT` in ``root``: its version, the run,
    the result file (None if it made none), the folder of its intermediates, and why it
    failed (None when it worked)."""

    version: str
    run: RunResult
    result: Path | None
    process: Path
    failure: str | None


def siril_stack(paths: Sequence[Path], root: Path, *, timeout_s: float) -> SirilRun | str:
    """Siril's convert + register + stack of ``paths`` in a fresh ``root`` (the raws linked
    into ``root/lights``), or the reason it cannot run (``siril-cli`` missing)."""
    if shutil.which("siril-cli") is None:
        return "siril-cli not installed (`apt-get install siril` failed or not run)"
    version = subprocess.run(
        ["siril-cli", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    shutil.rmtree(root, ignore_errors=True)
    lights, process = root / "lights", root / "process"
    lights.mkdir(parents=True)
    for path in paths:  # Siril converts every raw of the folder
        (lights / path.name).symlink_to(path)
    script = root / "stack.ssf"
    script.write_text(
        SIRIL_STACK_SCRIPT.format(lights=lights, process=process, result=root / "result")
    )
    run = run_watched(["siril-cli", "-s", str(script)], timeout_s=timeout_s, cwd=root)
    result = next(iter(sorted(root.glob("result.f*"))), None)
    failure = None
    if run.returncode != 0 or result is None:
        tail = " | ".join(run.stdout.strip().splitlines()[-3:])
        failure = f"Siril failed ({run.returncode}): {tail[:300]}"
    return SirilRun(version, run, result, process, failure)


# ----------------------------------------------------------------------------- data


def night_dir(width: int = FULL_W, height: int = FULL_H) -> Path:
    return OUT / "data" / f"night_{width}x{height}_s{NIGHT_SEED}"


def ensure_night(n: int, width: int = FULL_W, height: int = FULL_H) -> list[Path]:
    """The first ``n`` frames of the benchmark night as DNG raws (simulated once, then reused).

    The model always has ``NIGHT_FRAMES`` frames (100 unless more are asked), so frame i is the
    same file whichever benchmark asks first.
    """
    from nightstack.simulate import SkyModel
    from nightstack.simulate.dng import write_dng

    total = max(NIGHT_FRAMES, n)
    directory = night_dir(width, height)
    directory.mkdir(parents=True, exist_ok=True)
    model = SkyModel(width=width, height=height, frames=total, seed=NIGHT_SEED)
    truth = directory / "truth.json"
    if not truth.exists():
        truth.write_text(json.dumps(model.truth()))
    paths = []
    for i in range(n):
        path = directory / f"IMG_{i:04d}.DNG"
        if not path.exists():
            if free_disk_gb() < 5:
                raise RuntimeError("less than 5 GB free disk: not simulating more frames")
            part = path.with_suffix(".part")
            write_dng(
                part,
                model.render(i),
                black_level=model.black_level,
                white_level=model.white_level,
                exposure_s=model.exposure_s,
                iso=model.iso,
                capture_time=model.capture_time(i),
            )
            part.rename(path)
        paths.append(path)
    return paths


def decode_seconds(path: Path, repeat: int) -> float:
    """Median in-process decode (``loaders.load``) time of ``path``: the unit of every ratio."""
    from nightstack.io.loaders import load

    return median(time_calls(lambda: load(path), repeat))


# ----------------------------------------------------------------------------- RESULTS.md


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_HEAD = """# Benchmark results

Produced by `.venv/bin/python bench/run.py` (see `bench/README.md`); each section names the
exact command that wrote it, the machine and the date. Speeds are ratios to the decode time of
the same file measured in the same run (medians of several runs), because this machine's two
cores are shared with other work while the benchmarks run; the absolute seconds are given
beside them for orientation only.
"""

SECTIONS = ("summary", "frame", "stack", "daemon", "peers", "mosaic")
"""RESULTS.md sections, in order; a benchmark rewrites only its own."""


def write_section(name: str, title: str, body: str, meta: dict[str, str]) -> None:
    """Replace (or insert) the section ``name`` of RESULTS.md, leaving the others as they are.

    ``meta`` (see :func:`run_meta`) names the command, machine, code and date of the run.
    """
    code = meta["code"]
    if meta.get("code_after", code) != code:
        code += f" (**changed during the run**, to {meta['code_after']})"
    block = (
        f"<!-- bench:{name} start -->\n## {title}\n\n"
        f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \n"
        f"Code: {code}  \nDate: {meta['date']}\n\n"
        f"{body.strip()}\n<!-- bench:{name} end -->"
    )
    if RESULTS.exists():
        text = RESULTS.read_text()
    else:
        empty = (
            f"<!-- bench:{n} start -->\n(not run yet)\n<!-- bench:{n} end -->" for n in SECTIONS
        )
        text = _HEAD + "\n" + "\n\n".join(empty) + "\n"
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} start -->.*?<!-- bench:{re.escape(name)} end -->", re.S
    )
    later = SECTIONS[SECTIONS.index(name) + 1 :] if name in SECTIONS else ()
    following = [f"<!-- bench:{n} start -->" for n in later if f"<!-- bench:{n} start -->" in text]
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif following:  # keep the sections in SECTIONS order
        at = text.index(following[0])
        text = text[:at] + block + "\n\n" + text[at:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")


def standalone(
    name: str,
    title: str,
    measure: Callable[[bool], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    *,
    quick: bool,
    report_only: bool,
) -> int:
    """A benchmark run on its own (``python bench/bench_NAME.py``), as ``run.py --only NAME``
    runs it: measure (or read ``bench/out/NAME.json`` back), record, rewrite its section."""
    path = OUT / f"{name}.json"
    if report_only:
        data = json.loads(path.read_text())
    else:
        meta = run_meta(f".venv/bin/python bench/bench_{name}.py" + (" --quick" if quick else ""))
        t0 = time.monotonic()
        data = measure(quick)
        data["_meta"] = {**meta, "code_after": code_version(), "quick": quick}
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str))
        log(f"{name} done in {time.monotonic() - t0:.0f} s")
    body = report(data)
    if data["_meta"].get("quick"):
        body = "**Quick run (`--quick`): fewer frames and repeats.**\n\n" + body
    write_section(name, title, body, data["_meta"])
    print(body, flush=True)
    return 0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
