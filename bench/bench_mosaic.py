"""Issue 12: the frame path in the sensor's mosaic, measured in one run.

- decode: on one 24 MP DNG of the benchmark night, in process, the fastest of ``repeat``
  round-robin calls: LibRaw's full ``postprocess`` (AHD, ``load(demosaic="AHD")``), the mosaic alone
  (``load_mosaic``: LibRaw unpack, black/white levels), and decode to the demosaiced frame the
  pipeline uses (``load(demosaic="bilinear" | "edge-aware")``: mosaic, 16-bit codes, OpenCV
  demosaic, white balance, superpixel luminance); ratios to the AHD postprocess;
- ``nightstack stack`` of 12 x 24 MP (its wall time, per-frame stages from ``--report``, the
  final combine's seconds a frame = wall time after the last report line / frames, the frame
  store's size from its summary line, the process tree's PSS peak), the same pinned to one
  core (``taskset -c 0``, a Raspberry Pi proxy), and Siril's convert + register + stack
  (``rej s 3 3``) of the same 12 files;
- ``nightstack watch`` fed frames one at a time (``.part`` + rename), each after the previous
  one's journal line: ingest latency (file complete -> journal line) after the warm-up, the
  process tree's PSS peak while stacking and while finalizing, and bytes the daemon wrote to
  disk per frame (``/proc/PID/io`` write_bytes: store + checkpoint + journal + previews), at
  24 MP and on a 61 MP night (9504 x 6336).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    OUT,
    MemoryWatch,
    ensure_night,
    fmt_s,
    log,
    median,
    run_meta,
    run_watched,
    siril_stack,
    table,
    time_calls,
    write_section,
)

NIGHTSTACK = [sys.executable, "-m", "nightstack.cli"]  # this interpreter, its PYTHONPATH
STACK_N = 12
WARMUP = 5  # the live stack's default warm-up: later frames are the steady state
BIG_W, BIG_H = 9504, 6336  # a 61 MP sensor (Sony A7R IV / V)
POLL_S = 0.05


def _decode(path: Path, repeat: int) -> dict[str, float]:
    from nightstack.io.loaders import load, load_mosaic

    calls = {
        "mosaic": lambda: load_mosaic(path),
        "mhc": lambda: load(path, demosaic="mhc-sharp"),
        "bilinear": lambda: load(path, demosaic="bilinear"),
        "edge-aware": lambda: load(path, demosaic="edge-aware"),
        "ahd": lambda: load(path, demosaic="AHD"),
    }
    for fn in calls.values():
        fn()  # warm the file cache and imports
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):  # round robin: a slow spell of the machine hits every method alike
        for name, fn in calls.items():
            times[name] += time_calls(fn, 1)
    # the fastest of the repeats (as timeit): a 288 MB result's fresh pages made single calls
    # of any method 2-4x slower at random (measured), which a median of few does not remove
    return {name: min(t) for name, t in times.items()}


def _stack(paths: list[Path], tag: str, pin: bool = False) -> dict[str, Any]:
    work = OUT / f"mosaic_work_{tag}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = work / "report.jsonl"
    cmd = [*NIGHTSTACK, "stack", *map(str, paths), "-o", str(work / "stack.fits")]
    cmd += ["--report", str(report), "--work-dir", str(work)]
    if pin:
        cmd = ["taskset", "-c", "0", *cmd]
    marks: dict[str, float] = {}

    def phase() -> str:
        try:
            done = report.read_bytes().count(b"\n")
        except FileNotFoundError:
            done = 0
        if done >= len(paths):
            marks.setdefault("ingested", time.perf_counter())
            return "combine"
        return "ingest"

    t0 = time.perf_counter()
    # memory polled every 0.25 s, not 0.05: reading smaps_rollup of a 1 GB process 20 times a
    # second cost the 2-core machine ~12 % of the combine's time (5.8 s unwatched, 6.6 s)
    run = run_watched(cmd, timeout_s=7200, phase=phase, interval_s=0.25)
    if run.returncode != 0:
        raise RuntimeError(f"nightstack stack failed ({run.returncode}): {run.stderr[-2000:]}")
    records = [json.loads(line) for line in report.read_text().splitlines()]
    accepted = [r for r in records if r["status"] == "accepted"]
    stages = sorted({k for r in accepted for k in r["ms"]})
    steady = accepted[WARMUP:] or accepted
    ingest_s = marks.get("ingested", t0 + run.seconds) - t0
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    sharpness = _fwhm_of(work / "stack.fits", paths[0]) if not pin else {}
    shutil.rmtree(work, ignore_errors=True)
    return {
        "n": len(paths),
        "accepted": len(accepted),
        "seconds": run.seconds,
        "ingest_s": ingest_s,
        "combine_s": run.seconds - ingest_s,
        "combine_only_s": float(m.group(1))
        if (m := re.search(r"final combine ([\d.]+) s", summary))
        else None,
        "stage_s": {k: median([r["ms"].get(k, 0.0) / 1000 for r in steady]) for k in stages},
        "pss_peak_mb": run.memory.pss_peak_mb,
        "phase_pss_mb": run.memory.phase_pss_mb,
        "summary": summary,
        "fwhm": sharpness,
    }


def _fwhm_of(stack: Path, reference: Path) -> dict[str, float]:
    """The median star FWHM (px) found by the pipeline's own detection on the channel mean of
    the stack and of its reference frame decoded alone (the same demosaic): how much the warps
    of the other frames blur the stack."""
    import numpy as np
    from astropy.io import fits

    from nightstack.config import Settings
    from nightstack.io.loaders import load
    from nightstack.pipeline.prepare import star_finder

    settings = Settings()
    finder = star_finder(settings)

    def fwhm(image: Any) -> float:
        grey = np.nan_to_num(np.asarray(image, np.float32).mean(axis=2))
        rows, cols = grey.shape[0] // 2 * 2, grey.shape[1] // 2 * 2
        binned = grey[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))
        return float(finder(binned.astype(np.float32), 2).fwhm_px)

    data = np.moveaxis(np.asarray(fits.getdata(stack), np.float32), 0, -1)
    return {"stack": fwhm(data), "single": fwhm(load(reference, demosaic="mhc-sharp").image)}


def _siril(paths: list[Path]) -> dict[str, Any]:
    root = OUT / "mosaic_siril"
    siril = siril_stack(paths, root, timeout_s=7200)
    if isinstance(siril, str):
        return {"skipped": siril}
    run = siril.run
    (OUT / "mosaic_siril.log").write_text(run.stdout + run.stderr)
    shutil.rmtree(root, ignore_errors=True)
    if siril.failure is not None:
        return {"skipped": siril.failure, "version": siril.version}
    return {"version": siril.version, "seconds": run.seconds, "pss_peak_mb": run.memory.pss_peak_mb}


def _io_write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _daemon(paths: list[Path], tag: str, *, wait_idle: bool = True) -> dict[str, Any]:
    """``wait_idle``: each frame dropped once the daemon is done with the last (its live add
    logged, then 1 s), as at a camera's cadence longer than the frame's work; else the moment
    the last frame's journal line appears (back to back: its live add still running)."""
    root = OUT / f"mosaic_daemon_{tag}"
    shutil.rmtree(root, ignore_errors=True)
    watch, out = root / "watch", root / "out"
    watch.mkdir(parents=True)
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    cmd = [*NIGHTSTACK, "watch", str(watch), "--output-dir", str(out), "--idle-timeout", "3600"]
    with open(root / "daemon.log", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    phase = {"now": "start"}
    memory = MemoryWatch(proc.pid, phase=lambda: phase["now"])
    latencies: list[float] = []
    live_fits: set[tuple[int, int]] = set()
    written_before = store = 0
    try:
        time.sleep(3)  # the decoder child starts
        phase["now"] = "stack"
        for i, src in enumerate(paths):
            part = watch / (src.name + ".part")
            shutil.copyfile(src, part)
            os.rename(part, watch / src.name)
            dropped = time.time()
            while True:
                for live in out.glob("*/live.fits"):  # each rewrite once: (mtime, size)
                    with contextlib.suppress(FileNotFoundError):
                        st = live.stat()
                        live_fits.add((st.st_mtime_ns, st.st_size))
                journals = sorted(out.glob("*/journal.jsonl"))
                if journals and journals[0].read_bytes().count(b"\n") > i:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited: {(root / 'daemon.log').read_text()[-800:]}")
                time.sleep(POLL_S)
            latencies.append(time.time() - dropped)
            deadline = time.time() + 120
            while wait_idle and time.time() < deadline:
                if (root / "daemon.log").read_text().count(" live=") > i:
                    time.sleep(1.0)  # the preview after it
                    break
                time.sleep(POLL_S)
        written_before = _io_write_bytes(proc.pid)
        store = sum(f.stat().st_size for f in out.glob("*/frames/frame_*"))  # before the close
        journal = sorted(out.glob("*/journal.jsonl"))[0]
        records = [json.loads(line) for line in journal.read_text().splitlines()]
        phase["now"] = "finalize"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=7200)
    finally:
        if proc.poll() is None:
            proc.kill()
        memory.stop()
    size = paths[0].stat().st_size
    # the live stack adds a stored frame after its journal line: its time is in the log line
    live_ms = [float(v) for v in re.findall(r" live=(\d+)ms", (root / "daemon.log").read_text())]
    shutil.rmtree(root, ignore_errors=True)
    accepted = sum(r["status"] == "accepted" for r in records)
    steady = [r for r in records[WARMUP:] if r["status"] == "accepted"] or records
    return {
        "n": len(paths),
        "accepted": accepted,
        "latency_s": latencies,
        "steady_latency_s": median(latencies[WARMUP:] or latencies),
        "pss_mb": memory.phase_pss_mb,
        "written_per_frame_mb": written_before / len(paths) / 2**20,
        "live_fits_per_frame_mb": sum(size for _, size in live_fits) / len(paths) / 2**20,
        "store_per_frame_mb": store / max(accepted, 1) / 2**20,
        "raw_mb": size / 2**20,
        "stages_ms": {
            **{
                k: median([r["ms"].get(k, 0.0) for r in steady])
                for k in sorted({k for r in records for k in r["ms"]})
            },
            "live (after the journal line)": median(live_ms[WARMUP:] or live_ms or [0.0]),
        },
    }


def measure(quick: bool) -> dict[str, Any]:
    """Every figure; each part is kept in ``bench/out/mosaic_partial.json`` as it completes, so
    a run that fails later resumes where it stopped (delete the file for a fresh run)."""
    repeat = 2 if quick else 5
    n = 6 if quick else STACK_N
    partial = OUT / "mosaic_partial.json"
    data: dict[str, Any] = json.loads(partial.read_text()) if partial.exists() else {}
    paths = ensure_night(n)
    big = ensure_night(3 if quick else 4, BIG_W, BIG_H)
    parts = {
        "decode": (f"decode ratios on {paths[0].name}", lambda: _decode(paths[0], repeat)),
        "stack": (f"nightstack stack {n} x 24 MP", lambda: _stack(paths, "24")),
        "siril": (f"Siril {n} x 24 MP", lambda: _siril(paths)),
        "stack_pinned": (f"taskset -c 0 stack {n} x 24 MP", lambda: _stack(paths, "p", True)),
        "daemon_24": (f"daemon, {n} x 24 MP one at a time", lambda: _daemon(paths, "24")),
        "daemon_61": (f"daemon, {len(big)} x 61 MP one at a time", lambda: _daemon(big, "61")),
        "daemon_24_b2b": (
            f"daemon, {n} x 24 MP back to back",
            lambda: _daemon(paths, "24b", wait_idle=False),
        ),
        "decode_61": (f"decode ratios on the 61 MP {big[0].name}", lambda: _decode(big[0], 1)),
    }
    for key, (what, fn) in parts.items():
        if key in data:
            continue
        log(what)
        data[key] = fn()
        partial.write_text(json.dumps(data, indent=1, default=str))
    partial.unlink()
    return data


def report(data: dict[str, Any]) -> str:
    d = data["decode"]
    ahd = d["ahd"]
    rows = [
        ("LibRaw full postprocess (AHD, sRGB)", fmt_s(ahd), "1.00x"),
        (
            "mosaic only (`load_mosaic`: unpack, levels)",
            fmt_s(d["mosaic"]),
            f"{d['mosaic'] / ahd:.2f}x",
        ),
        (
            "decode to the demosaiced frame, mhc-sharp (the default)",
            fmt_s(d["mhc"]),
            f"{d['mhc'] / ahd:.2f}x",
        ),
        (
            "decode to the demosaiced frame, bilinear",
            fmt_s(d["bilinear"]),
            f"{d['bilinear'] / ahd:.2f}x",
        ),
        (
            "decode to the demosaiced frame, edge-aware",
            fmt_s(d["edge-aware"]),
            f"{d['edge-aware'] / ahd:.2f}x",
        ),
    ]
    out = ["### Decode, one 24 MP DNG, in process (fastest of 5 round-robin repeats)", ""]
    out += [table(("decode", "time", "x AHD postprocess"), rows), ""]
    s, p = data["stack"], data["stack_pinned"]
    n = s["n"]
    out += [f"### `nightstack stack` of {n} x 24 MP", ""]
    srow = [
        ("wall time", fmt_s(s["seconds"]), fmt_s(p["seconds"])),
        ("s a frame (wall / frames)", fmt_s(s["seconds"] / n), fmt_s(p["seconds"] / n)),
        ("ingest (until the last report line)", fmt_s(s["ingest_s"]), fmt_s(p["ingest_s"])),
        (
            "after the last frame (combine, output written), s a frame",
            fmt_s(s["combine_s"] / s["accepted"]),
            fmt_s(p["combine_s"] / p["accepted"]),
        ),
        (
            "of which the combine itself (its own clock), s a frame",
            fmt_s((s.get("combine_only_s") or 0) / s["accepted"]),
            fmt_s((p.get("combine_only_s") or 0) / p["accepted"]),
        ),
        ("process tree PSS peak", f"{s['pss_peak_mb']:.0f} MB", f"{p['pss_peak_mb']:.0f} MB"),
    ]
    for k, v in s["stage_s"].items():
        srow.append(
            (f"stage `{k}` (median, steady state)", fmt_s(v), fmt_s(p["stage_s"].get(k, 0)))
        )
    out += [table(("", "2 cores", "`taskset -c 0`"), srow), ""]
    out += [f"Summary lines: `{s['summary']}`; pinned: `{p['summary']}`.", ""]
    if s.get("fwhm"):
        f = s["fwhm"]
        out += [
            f"Sharpness: median star FWHM {f['stack']:.3f} px in the stack vs {f['single']:.3f} px "
            f"in its reference frame alone ({f['stack'] / f['single'] - 1:+.1%}; the pipeline's "
            "detection on the channel mean, 2x2 binned).",
            "",
        ]
    siril = data["siril"]
    if "skipped" in siril:
        out += [f"Siril: skipped ({siril['skipped']}).", ""]
    else:
        ratio = s["seconds"] / siril["seconds"]
        out += [
            f"Siril {siril['version']} convert + register + stack `rej s 3 3` of the same {n} "
            f"files: {fmt_s(siril['seconds'])} (PSS peak {siril['pss_peak_mb']:.0f} MB); "
            f"`nightstack stack` took {ratio:.2f}x Siril's time.",
            "",
        ]
    out += ["### `nightstack watch`, frames one at a time", ""]
    drow = []
    for key, label, dec in (("daemon_24", "24 MP", d), ("daemon_61", "61 MP", data["decode_61"])):
        m = data[key]
        drow.append(
            (
                f"{label} ({m['accepted']}/{m['n']} accepted)",
                f"{fmt_s(m['steady_latency_s'])} ({m['steady_latency_s'] / dec['ahd']:.2f}x)",
                f"{m['pss_mb'].get('stack', 0):.0f} MB",
                f"{m['pss_mb'].get('finalize', 0):.0f} MB",
                f"{m['store_per_frame_mb']:.0f} MB",
                f"{m['written_per_frame_mb']:.0f} MB "
                f"({m['written_per_frame_mb'] / m['store_per_frame_mb']:.2f}x the mosaic; "
                f"live.fits {m.get('live_fits_per_frame_mb', 0) / m['store_per_frame_mb']:.2f}x)",
            )
        )
    out += [
        table(
            (
                "night",
                "ingest latency after warm-up (x AHD of the same size)",
                "PSS peak stacking",
                "PSS peak finalizing",
                "store a frame",
                "written a frame",
            ),
            drow,
        ),
        "",
        "Ingest latency: file renamed into the watch folder -> its journal line, median of the "
        "frames after the warm-up, each frame dropped once the daemon was done with the last "
        "(a camera whose exposures outlast a frame's work); back to back (each dropped at the "
        "last one's journal line, its live add still running) at 24 MP: "
        f"{fmt_s(data['daemon_24_b2b']['steady_latency_s'])} "
        f"({data['daemon_24_b2b']['steady_latency_s'] / d['ahd']:.2f}x). "
        "The 61 MP ratio is to that night's own AHD postprocess "
        f"({fmt_s(data['decode_61']['ahd'])}). Written: the daemon's `write_bytes` "
        "(/proc/PID/io) until the last frame's journal line, over the frames.",
        "",
    ]
    for key, label in (("daemon_24", "24 MP"), ("daemon_61", "61 MP")):
        stages = ", ".join(f"{k} {v:.0f} ms" for k, v in data[key]["stages_ms"].items() if v)
        out.append(f"Daemon stages at {label} (medians after the warm-up): {stages}.")
    out.append(
        "The journal line follows the store write; the live stack reads the stored frame after it "
        "(`live`), while the next frame is already being decoded."
    )
    return "\n".join(out)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    d, s = data["decode"], data["stack"]
    combine = s["combine_s"] / s["accepted"]
    own = (s.get("combine_only_s") or s["combine_s"]) / s["accepted"]
    d24, d61 = data["daemon_24"], data["daemon_61"]
    ingest = d24["steady_latency_s"] / d["ahd"]
    out = [
        (
            "decode to demosaiced <= 0.3x AHD (the default, mhc-sharp)",
            f"{d['mhc'] / d['ahd']:.2f}x (bilinear {d['bilinear'] / d['ahd']:.2f}x)",
            d["mhc"] / d["ahd"] <= 0.3,
        ),
        (
            "ingest <= 0.6x AHD (daemon idle on arrival)",
            f"{ingest:.2f}x (back to back "
            f"{data['daemon_24_b2b']['steady_latency_s'] / d['ahd']:.2f}x)",
            ingest <= 0.6,
        ),
        (
            "final combine <= 0.5 s a frame (its own clock)",
            f"{fmt_s(own)}; {fmt_s(combine)} until the output is written",
            own <= 0.5,
        ),
        (
            "store <= 50 MB a 24 MP frame",
            f"{d24['store_per_frame_mb']:.0f} MB",
            d24["store_per_frame_mb"] <= 50,
        ),
        (
            "daemon PSS <= 1.0 GB at 24 MP",
            f"{max(d24['pss_mb'].values()):.0f} MB",
            max(d24["pss_mb"].values()) <= 1024,
        ),
        (
            "daemon PSS <= 2.0 GB at 61 MP",
            f"{max(d61['pss_mb'].values()):.0f} MB",
            max(d61["pss_mb"].values()) <= 2048,
        ),
    ]
    for label, d in (("24 MP", d24), ("61 MP", d61)):
        # the writes: store + checkpoint + journal (+ previews), live.fits apart
        core = d["written_per_frame_mb"] - d.get("live_fits_per_frame_mb", 0.0)
        ratio = core / d["store_per_frame_mb"]
        total = d["written_per_frame_mb"] / d["store_per_frame_mb"]
        out.append(
            (
                f"writes but live.fits <= 1.5x the mosaic a frame, {label}",
                f"{ratio:.2f}x ({total:.2f}x with live.fits)",
                ratio <= 1.5,
            )
        )
    if data["stack"].get("fwhm"):
        f = data["stack"]["fwhm"]
        out.append(
            (
                "stack FWHM within 2 % of a single frame's",
                f"{f['stack'] / f['single'] - 1:+.1%}",
                f["stack"] <= 1.02 * f["single"],
            )
        )
    if "skipped" not in data["siril"]:
        out.append(
            (
                "`nightstack stack` faster than Siril",
                f"{s['seconds'] / data['siril']['seconds']:.2f}x",
                s["seconds"] < data["siril"]["seconds"],
            )
        )
    return out


TITLE = "The frame path in the mosaic: decode, store, memory, writes, speed (issue 12)"

if __name__ == "__main__":
    quick = "--quick" in sys.argv
    OUT.mkdir(parents=True, exist_ok=True)
    meta = run_meta(".venv/bin/python bench/bench_mosaic.py" + (" --quick" if quick else ""))
    data = measure(quick)
    data["_meta"] = {**meta, "quick": quick}
    (OUT / "mosaic.json").write_text(json.dumps(data, indent=1, default=str))
    write_section("mosaic", TITLE, report(data), data["_meta"])
    print(report(data))
    for goal, measured, met in goals(data):
        print(f"{'met' if met else 'MISSED'}: {goal}: {measured}")
