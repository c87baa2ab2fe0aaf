"""Reliability of the live daemon under real faults: bad files, decoder hangs and crashes, wrong
frames, a burst of files, a full disk, a pulled card, kill -9, permissions, odd paths.

Every test runs ``nightstack watch`` as a real subprocess on real folders (real inotify, real
decoder child, real signals, real file systems) and judges it by what it leaves on disk: the
journal, ``session.json``, the outputs, the log, and the files it was given (which it must never
change). The outcome is recorded in ``bench/RELIABILITY.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
from astropy.io import fits

from _daemon import Daemon, journal, tmpfs, wait_for
from nightstack.simulate import simulate_night
from nightstack.simulate.dng import write_dng

pytestmark = pytest.mark.slow

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
TRUNCATED_CR3 = REALDATA / "negative_truncated_cr3"
WIDTH, HEIGHT = 600, 400  # small frames: ~0.1 s each through the whole pipeline
FAULTY = "_faulty_decode:load"  # tests/_faulty_decode.py, importable in the decoder child


def by_name(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {Path(r["file"]).name: r for r in lines}


def sessions(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/session.json"))]


def fingerprint(path: Path) -> tuple[str, int, int]:
    """(sha256, size, mtime_ns) of a file without following a symlink's target's mtime."""
    data = path.read_bytes()
    st = path.stat()
    return hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime_ns


def leftovers(out: Path) -> list[Path]:
    """Temporary or partial files anywhere under ``out``."""
    return [
        p
        for p in out.rglob("*")
        if p.is_file() and (p.name.endswith((".tmp", ".part")) or p.name.startswith(".write-test"))
    ]


def assert_outputs_readable(session_dir: Path) -> None:
    """Every output file of a closed session opens and holds what it should."""
    meta = json.loads((session_dir / "session.json").read_text())
    assert meta["state"] == "closed", meta
    image = tifffile.imread(session_dir / "stack.tif")
    assert image.shape[:2] == (HEIGHT, WIDTH) and image.dtype == np.uint16 and image.max() > 0
    with fits.open(session_dir / "stack.fits") as hdul:
        data = np.asarray(hdul[0].data)
        assert data.shape[-2:] == (HEIGHT, WIDTH)
        assert hdul[0].header["NCOMBINE"] == meta["accepted"]
    preview = cv2.imread(str(session_dir / "preview.jpg"))
    assert preview is not None and preview.shape[:2] == (HEIGHT, WIDTH)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# --------------------------------------------------------------------------- frames


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight clear frames of one night, 600 x 400."""
    outdir = tmp_path_factory.mktemp("night")
    simulate_night(outdir, frames=8, width=WIDTH, height=HEIGHT, seed=41)
    return sorted(outdir.glob("*.DNG"))


@pytest.fixture(scope="module")
def wrong(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Frames that must not be stacked (and must not become the reference)."""
    outdir = tmp_path_factory.mktemp("wrong")
    simulate_night(
        outdir / "n", frames=8, width=WIDTH, height=HEIGHT, seed=42, cloudy=(0, 5), trailed=(1, 6)
    )
    n = sorted((outdir / "n").glob("*.DNG"))
    simulate_night(outdir / "p", frames=1, width=HEIGHT, height=WIDTH, seed=43)
    simulate_night(outdir / "w", frames=1, width=WIDTH + 40, height=HEIGHT, seed=44)
    return {
        "cloudy_first": n[0],
        "trailed_second": n[1],
        "good_a": n[2],
        "good_b": n[3],
        "good_c": n[4],
        "cloudy": n[5],
        "trailed": n[6],
        "good_d": n[7],
        "portrait": next((outdir / "p").glob("*.DNG")),
        "wider": next((outdir / "w").glob("*.DNG")),
        "daylight_first": _daylight(outdir / "day1.DNG", seed=1),
        "daylight": _daylight(outdir / "day2.DNG", seed=2),
    }


def _daylight(path: Path, seed: int) -> Path:
    """An overexposed daytime frame: a bright sky gradient, a third of it clipped."""
    rng = np.random.default_rng(seed)
    black, white = 512, 16383
    ramp = np.linspace(0.6, 1.3, WIDTH)[np.newaxis, :] * np.ones((HEIGHT, 1))
    level = black + np.clip(ramp, 0, 1) * (white - black)
    cfa = np.clip(level + rng.normal(0, 40, (HEIGHT, WIDTH)), 0, white).astype(np.uint16)
    capture = datetime(2025, 6, 1, 12, 0, seed, tzinfo=UTC)
    return write_dng(
        path, cfa, black_level=black, white_level=white, exposure_s=30.0, iso=800,
        capture_time=capture,
    )  # fmt: skip


def copy_and_wait(src: Path, dst: Path, out: Path, count: int, daemon: Daemon) -> dict[str, Any]:
    """Copy a frame into the watch folder and wait for its journal line."""
    shutil.copy(src, dst)
    lines = wait_for(lambda: len(journal(out)) >= count and journal(out), 60, dst.name, daemon)
    assert len(lines) == count, lines
    assert Path(lines[-1]["file"]).name == dst.name, lines[-1]
    return dict(lines[-1])


def log_line(text: str, name: str) -> str:
    """The one log line about frame ``name`` that says accepted or rejected."""
    hits = [
        ln for ln in text.splitlines() if f" {name} accepted" in ln or f" {name} rejected" in ln
    ]
    assert len(hits) == 1, (name, hits, text[-3000:])
    return hits[0]


# --------------------------------------------------------------------------- bad files


def _bad_files(source: Path, into: Path, seed: int, real: bool) -> dict[str, str]:
    """Write the bad inputs into ``into`` (cut from the DNG ``source``, other contents from
    ``seed``; with ``real``, the real truncated CR3s too); return {name: a word their reason
    must contain}."""
    expected: dict[str, str] = {}
    dng = source.read_bytes()
    # the first few KiB of the simulated DNGs are alike: cut the live set after them
    cuts = (64, 4096, len(dng) // 2, len(dng) - 100) if real else (len(dng) // 3, len(dng) - 9)
    for n in cuts:
        (into / f"cut_{n}.DNG").write_bytes(dng[:n])
        expected[f"cut_{n}.DNG"] = "truncated"
    rng = np.random.default_rng(seed)
    (into / "noise.CR3").write_bytes(rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    expected["noise.CR3"] = "unsupported raw format"
    (into / "empty.CR3").write_bytes(b"")
    expected["empty.CR3"] = "empty file"
    ok, jpeg = cv2.imencode(".jpg", rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    assert ok
    (into / "holiday.NEF").write_bytes(jpeg.tobytes())
    expected["holiday.NEF"] = "JPEG"
    good = fits.PrimaryHDU(np.full((40, 60), seed, np.uint16))
    good.header["BAYERPAT"] = "RGGB"
    fits_path = into / "broken.fits"
    good.writeto(fits_path)
    raw = bytearray(fits_path.read_bytes())
    card = raw.find(b"NAXIS1")
    raw[card : card + 80] = b"NAXIS1  = 'sixty'  / a broken header".ljust(80)
    fits_path.write_bytes(bytes(raw))
    expected["broken.fits"] = "FITS"
    for cr3 in sorted(TRUNCATED_CR3.glob("*.cr3")) if real and TRUNCATED_CR3.is_dir() else []:
        shutil.copy(cr3, into / cr3.name)
        expected[cr3.name] = "truncated or corrupt raw data"
    return expected


def test_bad_files_are_rejected_untouched_and_the_daemon_goes_on(
    night: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    shutil.copy(night[0], watch / "IMG_0000.DNG")  # a good frame first: the reference
    expected = _bad_files(night[0], watch, seed=7, real=True)  # the backlog: bad files at start
    before = {p.name: fingerprint(p) for p in watch.iterdir()}
    d = Daemon(watch, out)
    daemons.append(d)
    wait_for(lambda: len(journal(out)) >= len(before), 90, "the backlog", d)
    # more bad files while it runs, then a good frame: still stacked
    live = tmp_path / "live"
    live.mkdir()
    bad_live = _bad_files(night[2], live, seed=8, real=False)
    expected_live = {f"live_{k}": v for k, v in bad_live.items()}
    for p in sorted(live.iterdir()):
        shutil.copy(p, watch / f"live_{p.name}")
    before.update({f"live_{p.name}": fingerprint(watch / f"live_{p.name}") for p in live.iterdir()})
    expected.update(expected_live)
    wait_for(lambda: len(journal(out)) >= len(before), 90, "the live bad files", d)
    copy_and_wait(night[1], watch / "IMG_0001.DNG", out, len(before) + 1, d)

    lines = by_name(journal(out))
    assert lines["IMG_0000.DNG"]["status"] == "accepted" and lines["IMG_0000.DNG"]["reference"]
    assert lines["IMG_0001.DNG"]["status"] == "accepted"
    for name, word in expected.items():
        record = lines[name]
        assert record["status"] == "rejected" and word in record["reason"], record
        assert "\n" not in record["reason"]
        assert f"rejected ({record['reason']})" in log_line(d.text(), name)
    assert len(journal(out)) == len(before) + 1  # each file exactly once
    for name, print_before in before.items():
        assert fingerprint(watch / name) == print_before, f"{name} was changed"
    assert d.alive()
    assert d.stop() == 0
    (meta,) = sessions(out)
    assert meta["accepted"] == 2 and meta["rejected"] == len(expected)
    assert_outputs_readable(out / meta["session"])
    assert leftovers(out) == []


# --------------------------------------------------------------------------- decoder faults


def test_a_hanging_or_crashing_decoder_costs_one_frame(
    night: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out, env={"NIGHTSTACK_DECODE_TIMEOUT_S": "3"}, decode_fn=FAULTY)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    assert copy_and_wait(night[0], watch / "IMG_0000.DNG", out, 1, d)["status"] == "accepted"
    started = time.monotonic()
    hung = copy_and_wait(night[1], watch / "IMG_0001_hang.DNG", out, 2, d)
    timed_out = "decode timed out after 3 s"
    assert hung["status"] == "rejected" and hung["reason"].startswith(f"{timed_out}; retried")
    assert time.monotonic() - started < 30
    # a timeout may pass: retried once the queue is empty, it hangs again and is given up
    again = wait_for(lambda: len(journal(out)) >= 3 and journal(out), 60, "the retry", d)[-1]
    assert Path(again["file"]).name == "IMG_0001_hang.DNG"
    assert again["status"] == "rejected" and again["reason"] == f"{timed_out}, again on the retry"
    after_hang = copy_and_wait(night[2], watch / "IMG_0002.DNG", out, 4, d)
    assert after_hang["status"] == "accepted"
    crashed = copy_and_wait(night[3], watch / "IMG_0003_crash.DNG", out, 5, d)
    assert crashed["status"] == "rejected"
    assert crashed["reason"] == "decoder crashed (signal SIGSEGV)"  # would crash again: no retry
    assert copy_and_wait(night[4], watch / "IMG_0004.DNG", out, 6, d)["status"] == "accepted"
    assert d.alive() and d.pid == d.proc.pid
    log = d.text()
    assert f"IMG_0001_hang.DNG rejected ({timed_out}; retried once the queue is empty)" in log
    assert "IMG_0003_crash.DNG rejected (decoder crashed (signal SIGSEGV))" in log
    assert d.stop() == 0
    assert len(lines_of(journal(out), "IMG_0003_crash.DNG")) == 1
    (meta,) = sessions(out)
    assert meta["accepted"] == 3 and meta["rejected"] == 2  # files: the hang once, the crash


# --------------------------------------------------------------------------- transient faults


def lines_of(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in lines if Path(r["file"]).name == name]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_first_attempt(record: dict[str, Any], reason: str, content: str | None) -> None:
    """``record`` is the journal line of a first attempt kept for its retry."""
    assert record["status"] == "rejected" and record["retry"] is True, record
    assert record["reason"].startswith(reason), record
    assert record["reason"].endswith("; retried once the queue is empty"), record
    assert record["sha256"] is None and record["retry_sha256"] == content, record


def test_transient_faults_are_retried_once_when_the_queue_is_empty(
    night: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out, state, staging = (tmp_path / n for n in ("watch", "out", "state", "staging"))
    for folder in (watch, state, staging):
        folder.mkdir()
    env = {
        "NIGHTSTACK_DECODE_TIMEOUT_S": "5",  # more than a stalled decode (2 s) takes
        "NIGHTSTACK_FOLLOW_SYMLINKS": "true",
        "FAULTY_DECODE_STATE": str(state),  # read by tests/_faulty_decode.py in the child
    }
    d = Daemon(watch, out, env=env, decode_fn=FAULTY)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    copy_and_wait(night[0], watch / "IMG_0000.DNG", out, 1, d)  # the reference
    sources = {
        "IMG_0001_hangonce.DNG": night[1],  # the first decode hangs: timed out
        "IMG_0002_stall.DNG": night[2],  # its decoder child is killed with SIGKILL, below
        "IMG_0003_eioonce.DNG": night[3],  # the first read fails with EIO
        "IMG_0004_eio.DNG": night[4],  # every read fails with EIO
        "IMG_0005_crash.DNG": night[5],  # SIGSEGV in LibRaw's place: not transient
        "IMG_0006_lag.DNG": night[6],
        "IMG_0007_lag.DNG": night[7],
    }
    for name, src in sources.items():
        shutil.copy(src, staging / name)
    dng = night[1].read_bytes()
    (staging / "IMG_0008_cut.DNG").write_bytes(dng[: len(dng) // 2])  # truncated: not retried
    noise = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (staging / "IMG_0009_noise.DNG").write_bytes(noise)  # not an image: not retried
    for p in sorted(staging.iterdir()):  # all at once: the later frames wait behind the faults
        os.rename(p, watch / p.name)
    # a real EIO while hashing: a read of /proc/self/mem at offset 0 fails with EIO
    (watch / "IMG_0010_mem.DNG").symlink_to("/proc/self/mem")
    names = [*sorted(sources), "IMG_0008_cut.DNG", "IMG_0009_noise.DNG", "IMG_0010_mem.DNG"]

    marker = state / "IMG_0002_stall.DNG.decoding"
    wait_for(marker.exists, 60, "the stalled decode", d)
    os.kill(int(marker.read_text()), signal.SIGKILL)  # what the kernel's OOM killer does
    retried = ["IMG_0001_hangonce.DNG", "IMG_0002_stall.DNG", "IMG_0003_eioonce.DNG"]
    retried += ["IMG_0004_eio.DNG", "IMG_0010_mem.DNG"]
    total = 1 + len(names) + len(retried)
    lines = wait_for(lambda: len(journal(out)) >= total and journal(out), 120, "retries", d)
    assert len(lines) == total, [(Path(r["file"]).name, r["reason"]) for r in lines]
    order = [Path(r["file"]).name for r in lines]
    # every first attempt came before any retry: the retries waited for an empty queue
    assert sorted(order[1 : 1 + len(names)]) == sorted(names), order
    assert sorted(order[1 + len(names) :]) == sorted(retried), order
    assert "retrying" in d.text()

    hang, stall, eio_once, eio, mem = (lines_of(lines, n) for n in retried)
    assert_first_attempt(hang[0], "decode timed out after 5 s", sha256_of(watch / retried[0]))
    assert_first_attempt(
        stall[0], "decoder killed (signal SIGKILL: out of memory?)", sha256_of(watch / retried[1])
    )
    assert_first_attempt(
        eio_once[0],
        "cannot read file (OSError: [Errno 5] Input/output error",
        sha256_of(watch / retried[2]),
    )
    assert_first_attempt(
        eio[0], "cannot read file (OSError: [Errno 5]", sha256_of(watch / retried[3])
    )
    assert_first_attempt(mem[0], "cannot read file: Input/output error", None)
    for second, name in ((hang[1], retried[0]), (stall[1], retried[1]), (eio_once[1], retried[2])):
        assert second["status"] == "accepted" and second["sha256"] == sha256_of(watch / name)
        assert "retry" not in second
    assert eio[1]["status"] == "rejected" and eio[1]["reason"].endswith(", again on the retry")
    assert eio[1]["sha256"] == sha256_of(watch / retried[3])  # now processed for good
    assert mem[1]["status"] == "rejected" and mem[1]["sha256"] is None
    for name, reason in (
        ("IMG_0005_crash.DNG", "decoder crashed (signal SIGSEGV)"),
        ("IMG_0008_cut.DNG", "truncated"),
        ("IMG_0009_noise.DNG", "unsupported raw format"),
    ):
        (only,) = lines_of(lines, name)
        assert only["status"] == "rejected" and reason in only["reason"] and "retry" not in only
    assert [r["status"] for r in lines_of(lines, "IMG_0006_lag.DNG")] == ["accepted"]
    assert d.stop() == 0
    (meta,) = sessions(out)
    assert meta["accepted"] == 6  # the reference, two lag frames, three on their retry

    # a restart: every frame with a content hash was processed for good, none is tried again
    again = Daemon(watch, out, env=env, decode_fn=FAULTY)
    daemons.append(again)
    known = 1 + len(names) - 1  # all but the unreadable symlink
    wait_for(lambda: again.text().count("already processed") >= known, 60, "the scan", again)
    wait_for(lambda: len(journal(out)) > total, 60, "the unreadable file's new try", again)
    assert again.stop() == 0
    (new,) = journal(out)[total:]
    assert Path(new["file"]).name == "IMG_0010_mem.DNG" and new["status"] == "rejected"
    assert new["reason"].endswith("again on the retry")  # no content hash: tried once a start


def test_a_retry_cut_short_by_kill_9_happens_once_after_the_restart(
    night: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    state.mkdir()
    names = ["IMG_0000.DNG", "IMG_0001_eioonce.DNG", "IMG_0002_eio.DNG"]
    names += [f"IMG_{i:04d}_lag.DNG" for i in range(3, 8)]  # they keep the queue busy
    for name, src in zip(names, night, strict=True):  # the backlog
        shutil.copy(src, watch / name)
    env = {"FAULTY_DECODE_STATE": str(state)}
    first = Daemon(watch, out, env=env, decode_fn=FAULTY)
    daemons.append(first)

    def both_failed_once() -> bool:
        lines = journal(out)
        return all(len(lines_of(lines, n)) == 1 for n in names[1:3])

    wait_for(both_failed_once, 90, "the two first attempts", first)
    first.stop(signal.SIGKILL)  # frames still wait: the retries have not come yet
    lines = journal(out)
    assert all(len(lines_of(lines, n)) == 1 for n in names[1:3]), lines
    assert not any(Path(r["file"]).name == names[-1] for r in lines), "the queue was empty"

    second = Daemon(watch, out, env=env, decode_fn=FAULTY)
    daemons.append(second)
    wait_for(lambda: len(journal(out)) >= len(names) + 2, 90, "every frame and retry", second)
    assert second.stop() == 0
    lines = journal(out)
    assert len(lines) == len(names) + 2 and len({r["session"] for r in lines}) == 1  # resumed
    once, always = lines_of(lines, names[1]), lines_of(lines, names[2])
    assert_first_attempt(once[0], "cannot read file", sha256_of(watch / names[1]))
    assert once[1]["status"] == "accepted" and once[1]["sha256"] == sha256_of(watch / names[1])
    assert_first_attempt(always[0], "cannot read file", sha256_of(watch / names[2]))
    assert always[1]["status"] == "rejected" and always[1]["reason"].endswith("on the retry")
    for name in [names[0], *names[3:]]:
        assert [r["status"] for r in lines_of(lines, name)] == ["accepted"], name
    (meta,) = sessions(out)
    assert meta["accepted"] == len(names) - 1

    third = Daemon(watch, out, env=env, decode_fn=FAULTY)  # and never again
    daemons.append(third)
    scan = len(names)
    wait_for(lambda: third.text().count("already processed") >= scan, 60, "the scan", third)
    assert third.stop() == 0
    assert len(journal(out)) == len(names) + 2


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_truncated_file_that_is_completed_later_is_stacked(
    night: list[Path], tmp_path: Path, daemons: list[Daemon], polling: bool
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out, *(["--polling"] if polling else []))
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    copy_and_wait(night[0], watch / "IMG_0000.DNG", out, 1, d)
    dng = night[1].read_bytes()
    target = watch / "IMG_0001.DNG"
    with target.open("wb") as fh:  # a writer that stops half-way and closes the file
        fh.write(dng[: len(dng) // 2])
    half = sha256_of(target)
    lines = wait_for(lambda: len(journal(out)) >= 2 and journal(out), 60, "the half file", d)
    assert lines[1]["status"] == "rejected" and "truncated" in lines[1]["reason"], lines[1]
    assert lines[1]["sha256"] == half and "retry" not in lines[1]  # not retried
    time.sleep(1.0)  # nothing more happens to it on its own
    assert len(journal(out)) == 2
    with target.open("ab") as fh:  # ... then opens it again and appends the rest
        fh.write(dng[len(dng) // 2 :])
    lines = wait_for(lambda: len(journal(out)) >= 3 and journal(out), 60, "the whole file", d)
    assert lines[2]["status"] == "accepted" and lines[2]["sha256"] == sha256_of(night[1])
    assert Path(lines[2]["file"]) == target
    assert d.stop() == 0
    (meta,) = sessions(out)
    assert meta["accepted"] == 2 and meta["rejected"] == 1


# --------------------------------------------------------------------------- wrong frames


def test_wrong_frames_are_rejected_and_never_become_the_reference(
    wrong: dict[str, Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    order = [
        "daylight_first",
        "cloudy_first",
        "trailed_second",
        "good_a",
        "good_b",
        "portrait",
        "wider",
        "daylight",
        "cloudy",
        "trailed",
        "good_c",
        "good_d",
    ]
    records = {}
    for i, key in enumerate(order):
        records[key] = copy_and_wait(wrong[key], watch / f"F{i:02d}_{key}.DNG", out, i + 1, d)
    status = {k: (r["status"], r["reason"]) for k, r in records.items()}
    assert [k for k, r in records.items() if r["reference"]] == ["good_a"], status
    assert {k for k, r in records.items() if r["status"] == "accepted"} == {
        "good_a",
        "good_b",
        "good_c",
        "good_d",
    }, status
    reasons = {k: r["reason"] or "" for k, r in records.items()}
    assert reasons["daylight_first"].startswith("too few stars"), status
    assert reasons["cloudy_first"].startswith("too few stars"), status
    assert reasons["trailed_second"].startswith("trailed"), status
    assert reasons["portrait"] == "frame size 400x600 differs from reference 600x400"
    assert reasons["wider"] == "frame size 640x400 differs from reference 600x400"
    assert reasons["daylight"].startswith(("too few stars", "bright sky")), status
    assert reasons["cloudy"].startswith("too few stars"), status
    assert reasons["trailed"].startswith(("trailed", "too few stars")), status
    assert d.stop() == 0
    (meta,) = sessions(out)
    assert meta["accepted"] == 4 and Path(meta["reference"]).name == "F03_good_a.DNG"
    assert_outputs_readable(out / meta["session"])


def test_a_hazy_first_frame_that_passes_alone_is_replaced_as_reference(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    # a rich field: the cloudy first frame keeps ~60 stars (enough on its own), a clear one ~300
    camera = tmp_path / "camera"
    simulate_night(camera, frames=5, width=WIDTH, height=HEIGHT, seed=47, cloudy=0, stars=1500)
    files = sorted(camera.glob("*.DNG"))
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    first = copy_and_wait(files[0], watch / files[0].name, out, 1, d)
    assert first["status"] == "accepted" and first["reference"]  # nothing better known yet
    for f in files[1:]:
        shutil.copy(f, watch / f.name)
    wait_for(lambda: len(sessions(out)) == 2 and len(journal(out)) >= 1 + 5, 60, "restart", d)
    assert "starting the session over" in d.text()
    assert d.stop() == 0
    old, new = sessions(out)
    assert old["state"] == "superseded" and "IMG_0000.DNG is worse than IMG_0001" in old["note"]
    assert not (out / old["session"] / "frames").exists()
    lines = [r for r in journal(out) if r["session"] == new["session"]]
    records = by_name(lines)
    assert len(lines) == 5 and Path(new["reference"]).name == "IMG_0001.DNG"
    assert records["IMG_0001.DNG"]["reference"]
    assert records["IMG_0000.DNG"]["status"] == "rejected"
    assert "cloud or haze" in records["IMG_0000.DNG"]["reason"]
    assert new["state"] == "closed" and new["accepted"] == 4
    assert_outputs_readable(out / new["session"])


def test_a_reference_needs_measurable_star_shapes() -> None:
    from nightstack.pipeline.stacker import reference_flaw
    from nightstack.registration.quality import Quality, QualityLimits

    limits = QualityLimits()
    # a wind-trailed 2400 x 1600 frame: 31 detections, no FWHM or elongation could be measured
    trailed = Quality(stars=31, fwhm_px=np.nan, elongation=np.nan, roundness=np.nan,
                      background=0.037, noise=0.002)  # fmt: skip
    assert reference_flaw(trailed, limits) == (
        "no measurable star shapes for a reference (trailed or out of focus?)"
    )
    clear = Quality(stars=500, fwhm_px=3.5, elongation=1.02, roundness=0.05,
                    background=0.037, noise=0.002)  # fmt: skip
    assert reference_flaw(clear, limits) is None


# --------------------------------------------------------------------------- a burst of files


def test_a_burst_of_200_files_each_once_with_flat_memory(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    frames = 200
    camera = tmp_path / "camera"
    simulate_night(
        camera, frames=frames, width=360, height=240, seed=45, stars=300, drift_px=0.2,
        rotation_deg=0.004,
    )  # fmt: skip
    watch, out, staging = tmp_path / "watch", tmp_path / "out", tmp_path / "staging"
    watch.mkdir()
    staging.mkdir()
    for p in camera.glob("*.DNG"):
        shutil.copy(p, staging / p.name)
    d = Daemon(watch, out, env={"NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "10"})
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    for p in sorted(staging.iterdir()):  # all at once: renamed into place (atomic arrival)
        os.rename(p, watch / p.name)
    samples: list[tuple[int, int, int]] = []  # (journal lines, VmRSS KiB, VmHWM KiB)
    deadline = time.monotonic() + 240
    done = 0
    while done < frames and time.monotonic() < deadline and d.alive():
        done = sum(p.read_bytes().count(b"\n") for p in out.glob("*/journal.jsonl"))
        samples.append((done, *rss_kib(d.pid)))
        time.sleep(0.25)
    assert done == frames, d.text()[-3000:]
    lines = journal(out)
    names = [Path(r["file"]).name for r in lines]
    assert sorted(names) == sorted(p.name for p in camera.glob("*.DNG"))  # each exactly once
    assert all(r["status"] == "accepted" for r in lines), [r["reason"] for r in lines]
    # memory: after the first 20 frames (imports, arrays, caches warmed), RSS stays flat
    warm = [rss for n, rss, _ in samples if 20 <= n < 60]
    late = [rss for n, rss, _ in samples if n >= 140]
    assert warm and late
    growth_mib = (max(late) - max(warm)) / 1024
    print(
        f"burst: RSS warm max {max(warm) / 1024:.0f} MiB, late max {max(late) / 1024:.0f} MiB, "
        f"growth {growth_mib:.1f} MiB, peak (VmHWM) {samples[-1][2] / 1024:.0f} MiB"
    )
    curve = {n // 20 * 20: rss // 1024 for n, rss, _ in samples}
    print("burst: RSS MiB by frames done:", curve)
    assert growth_mib < 8, samples
    assert d.stop() == 0
    (meta,) = sessions(out)
    assert meta["accepted"] == frames


# --------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs the test can fill (skips where mounting is not allowed)."""
    with tmpfs(tmp_path / "disk", 48) as mount:
        yield mount


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` with one file, to the last byte or leaving about ``leave`` bytes free;
    return it (delete it to free the space)."""
    filler = disk / "filler.bin"
    chunk = b"\0" * (1 << 20)
    if leave:
        st = os.statvfs(disk)
        with filler.open("wb") as fh:
            fh.truncate(0)
            os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize - leave)
        return filler
    with filler.open("ab", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(chunk)
        with contextlib.suppress(OSError):
            while True:  # the last partial MiB
                fh.write(b"\0" * 4096)
    return filler


def test_disk_full_loses_nothing_and_recovers(
    night: list[Path], small_disk: Path, tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", small_disk / "out"
    watch.mkdir()
    d = Daemon(watch, out, log_dir=tmp_path)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    for i in range(3):
        copy_and_wait(night[i], watch / night[i].name, out, i + 1, d)
    (session,) = [p.parent for p in out.glob("*/session.json")]

    def preview_of_the_last_frame() -> bool:  # written after that frame's journal line
        with contextlib.suppress(FileNotFoundError):
            written = (session / "preview.jpg").stat().st_mtime_ns
            return written >= (session / "journal.jsonl").stat().st_mtime_ns
        return False

    wait_for(preview_of_the_last_frame, 30, "the third frame's preview", d)
    preview = fingerprint(session / "preview.jpg")
    journal_before = (session / "journal.jsonl").read_bytes()

    filler = fill(small_disk)
    for i in range(3, 6):  # frames arriving on a full disk
        shutil.copy(night[i], watch / night[i].name)
    wait_for(lambda: "disk full" in d.text(), 60, "the disk-full log line", d)
    time.sleep(3)  # it keeps running, retrying
    assert d.alive()
    assert (session / "journal.jsonl").read_bytes() == journal_before  # nothing half-written
    # a good preview stays: the last one, or (a preview written in the instant before the
    # filler took the last bytes, seen once under load) a newer complete one
    if fingerprint(session / "preview.jpg") != preview:
        shown = cv2.imdecode(np.frombuffer((session / "preview.jpg").read_bytes(), np.uint8), 1)
        assert shown is not None and shown.size > 0
    full_lines = [ln for ln in d.text().splitlines() if "disk full" in ln]
    assert 1 <= len(full_lines) <= 3, full_lines  # said clearly, not once per retry

    filler.unlink()  # space returns
    wait_for(lambda: len(journal(out)) >= 6, 90, "the deferred frames", d)
    lines = journal(out)
    assert sorted(Path(r["file"]).name for r in lines) == [p.name for p in night[:6]]
    assert all(r["status"] == "accepted" for r in lines)

    # full again at the final write (room for session.json, not for the 1.4 MB TIFF): the
    # session stays "closing" and is finished on restart
    filler = fill(small_disk, leave=256 * 1024)
    assert d.stop() == 0
    assert "not finalized" in d.text() or "could not" in d.text(), d.text()[-2000:]
    meta = json.loads((session / "session.json").read_text())
    assert meta["state"] == "closing", meta
    assert leftovers(out) == []
    filler.unlink()
    again = Daemon(watch, out, log_dir=tmp_path)
    daemons.append(again)
    wait_for(lambda: sessions(out)[0]["state"] == "closed", 90, "the resumed close", again)
    assert again.stop() == 0
    (meta,) = sessions(out)
    assert meta["accepted"] == 6
    assert_outputs_readable(session)
    assert leftovers(out) == []
    assert len(journal(out)) == 6


# --------------------------------------------------------------------------- the card is pulled


def test_watch_folder_removed_and_recreated(
    night: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "card", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    copy_and_wait(night[0], watch / "IMG_0000.DNG", out, 1, d)
    shutil.rmtree(watch)  # the card is pulled
    wait_for(lambda: "disappeared" in d.text(), 30, "the missing folder reported", d)
    staging = tmp_path / "staging"
    staging.mkdir()
    shutil.copy(night[0], staging / "IMG_0000.DNG")  # the card comes back with the old frame
    shutil.copy(night[1], staging / "IMG_0001.DNG")  # and a new one
    staging.rename(watch)
    wait_for(lambda: len(journal(out)) >= 2, 60, "the new frame", d)
    copy_and_wait(night[2], watch / "IMG_0002.DNG", out, 3, d)  # and it keeps watching
    lines = journal(out)
    assert [Path(r["file"]).name for r in lines] == ["IMG_0000.DNG", "IMG_0001.DNG", "IMG_0002.DNG"]
    assert all(r["status"] == "accepted" for r in lines)
    assert "IMG_0000.DNG: already processed" in d.text()
    assert d.stop() == 0


# --------------------------------------------------------------------------- kill -9


class _Killer:
    """Kill -9 the daemon the moment a temporary file whose path contains ``marker`` appears
    under the output folder (inotify in this process), i.e. in the middle of that write."""

    def __init__(self, out: Path, daemon: Daemon, marker: str) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver

        self.hit = ""
        killer = self

        class Handler(FileSystemEventHandler):
            def on_created(self, event: FileSystemEvent) -> None:
                path = os.fsdecode(event.src_path)
                if path.endswith(".tmp") and marker in path and not killer.hit:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(daemon.pid, signal.SIGKILL)
                    killer.hit = path

        out.mkdir(parents=True, exist_ok=True)
        self.observer = InotifyObserver()
        self.observer.schedule(Handler(), str(out), recursive=True)
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(10)


def _decoder_children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_kill_9_at_random_points_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    frames = int(os.environ.get("NIGHTSTACK_TEST_KILL_FRAMES", 12))
    camera = tmp_path / "camera"
    simulate_night(
        camera, frames=frames, width=WIDTH, height=HEIGHT, seed=46, drift_px=0.5, rotation_deg=0.01
    )
    files = sorted(camera.glob("*.DNG"))
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in files:
        shutil.copy(f, watch / f.name)
    env = {"NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "2", "NIGHTSTACK_KEEP_FRAME_STORE": "true"}
    slow = "_slow_decode:load"
    rng = random.Random(46)
    # where each run is killed: a random moment (often mid-decode: decodes take 0.4 s here),
    # or the moment a checkpoint / frame-store / journal-side / final-output write begins
    base = ["random", "checkpoint", "random", "frames", "random", "checkpoint", "random", "random"]
    runs = int(os.environ.get("NIGHTSTACK_TEST_KILL_RUNS", len(base)))  # more: a longer soak
    plan = [base[i % len(base)] for i in range(runs)]
    hits: list[str] = []
    for where in plan:
        d = Daemon(watch, out, env=env, log_dir=tmp_path, decode_fn=slow)
        daemons.append(d)
        wait_for(lambda d=d: "watching" in d.text(), 60, "start-up", d)
        if len(journal(out)) >= frames:
            d.stop()
            break
        child = _decoder_children(d.pid)
        if where == "random":
            time.sleep(rng.uniform(0.05, 1.5))
            d.proc.kill()
            hits.append(f"random, after {len(journal(out))} journal lines")
        else:
            killer = _Killer(out, d, f"/{where}/")
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.proc.wait(timeout=20)
            killer.stop()
            if d.alive():
                d.proc.kill()
            hits.append(f"{where}: {Path(killer.hit).name or 'missed'}")
        d.proc.wait(timeout=10)
        hits[-1] += f" ({len(leftovers(out))} temporary file(s) left for the restart)"
        deadline = time.monotonic() + 5  # the orphaned decoder child leaves on its own
        while child and not all(_gone(c) for c in child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(c) for c in child), "decoder child outlived its parent"

    # finish the frames, then kill during the final TIFF write, then (the restart finishes
    # the close at once) during the FITS write
    for target in ("stack.tif", "stack.fits"):
        d = Daemon(watch, out, env=env, log_dir=tmp_path, decode_fn=slow)
        daemons.append(d)
        killer = _Killer(out, d, f"/.{target}.")
        deadline = time.monotonic() + 120
        while d.alive() and time.monotonic() < deadline:
            if len(journal(out)) >= frames and "watching" in d.text():
                d.proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            d.proc.wait(timeout=30)
        killer.stop()
        hits.append(f"final: {Path(killer.hit).name or 'missed'}")
        if d.alive():
            d.proc.kill()
        d.proc.wait(timeout=10)
        hits[-1] += f" ({len(leftovers(out))} temporary file(s) left for the restart)"
    last = Daemon(watch, out, env=env, log_dir=tmp_path, decode_fn=slow)
    daemons.append(last)
    wait_for(lambda: all(m["state"] == "closed" for m in sessions(out)), 120, "closed", last)
    assert last.stop() == 0
    print("kill -9 points:", hits)

    lines = journal(out)
    assert sorted(Path(r["file"]).name for r in lines) == [f.name for f in files]  # once each
    assert all(r["status"] == "accepted" for r in lines)
    (meta,) = sessions(out)
    assert meta["accepted"] == frames
    session = out / meta["session"]
    index = json.loads((session / "frames" / "index.json").read_text())
    assert len(index["frames"]) == frames  # the store holds each frame once
    assert sorted(f["name"] for f in index["frames"]) == [f.name for f in files]
    assert_outputs_readable(session)
    assert leftovers(out) == []
    assert sum("tmp (" in h for h in hits) >= 3, hits  # killed mid-write at least 3 times
    # the daemon's stack equals a batch stack of the same files: nothing lost or doubled
    batch = tmp_path / "batch.fits"
    from nightstack.cli import main

    assert main(["stack", *map(str, files), "-o", str(batch)]) == 0
    with fits.open(batch) as a, fits.open(session / "stack.fits") as b:
        np.testing.assert_allclose(
            np.asarray(b[0].data, np.float32), np.asarray(a[0].data, np.float32),
            rtol=0, atol=1e-6, equal_nan=True,
        )  # fmt: skip


# --------------------------------------------------------------------------- permissions


NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
"""Root without the capabilities that bypass file permissions: mode bits apply to it as to anyone
(a plain setuid to ``nobody`` is not possible here: the interpreter lives under /root)."""
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def test_read_only_watch_folder_and_an_unreadable_file(
    night: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux setpriv to run the daemon without DAC override")
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for i in range(3):
        shutil.copy(night[i], watch / night[i].name)
    secret = watch / "IMG_0001b_secret.DNG"
    shutil.copy(night[3], secret)
    secret.chmod(0o000)
    watch.chmod(0o555)  # read-only, and the daemon cannot override it
    try:
        d = Daemon(watch, out, wrap=NO_DAC)
        daemons.append(d)
        wait_for(lambda: len(journal(out)) >= 4, 60, "the frames", d)
        caps = Path(f"/proc/{d.pid}/status").read_text().split("CapEff:")[1].split()[0]
        assert not int(caps, 16) & (1 << _CAP_DAC_OVERRIDE | 1 << _CAP_DAC_READ_SEARCH)
        lines = by_name(journal(out))
        assert lines["IMG_0001b_secret.DNG"]["status"] == "rejected"
        assert lines["IMG_0001b_secret.DNG"]["reason"] == "cannot read file: Permission denied"
        assert [lines[f.name]["status"] for f in night[:3]] == ["accepted"] * 3
        assert "IMG_0001b_secret.DNG rejected (cannot read file: Permission denied)" in d.text()
        assert d.alive()
        assert d.stop() == 0
        assert sessions(out)[0]["state"] == "closed"
        assert sorted(p.name for p in watch.iterdir()) == sorted(
            [secret.name, *(f.name for f in night[:3])]
        )  # nothing written into the watch folder
    finally:
        watch.chmod(0o755)
        secret.chmod(0o644)


# --------------------------------------------------------------------------- paths


def test_symlinks_outside_are_not_followed_and_odd_names_work(
    night: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out, outside = tmp_path / "watch", tmp_path / "out", tmp_path / "outside"
    watch.mkdir()
    outside.mkdir()
    shutil.copy(night[7], outside / "elsewhere.DNG")
    d = Daemon(watch, out)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    odd = [
        "IMG 0000 with spaces.DNG",
        "Étoile-ü-星雲.DNG",
        "two\nlines.DNG",
        os.fsdecode(b"IMG_\xff\xfe latin1.DNG"),  # not UTF-8: a FAT card written elsewhere
        "-rf; $(echo pwned) 'quoted'.DNG",
    ]
    for i, name in enumerate(odd):
        copy_and_wait(night[i], watch / name, out, i + 1, d)
    (watch / "link_outside.DNG").symlink_to(outside / "elsewhere.DNG")
    (watch / "link_inside.DNG").symlink_to(watch / odd[0])
    wait_for(lambda: "points outside the watch folder" in d.text(), 30, "the symlink warning", d)
    wait_for(lambda: "link_inside.DNG: already processed" in d.text(), 30, "inside link", d)
    copy_and_wait(night[6], watch / "IMG_0006.DNG", out, len(odd) + 1, d)
    lines = journal(out)
    assert [r["file"] for r in lines] == [str(watch / n) for n in [*odd, "IMG_0006.DNG"]]
    assert all(r["status"] == "accepted" for r in lines)
    log = d.text()
    assert "\nlines.DNG" not in log  # a newline in a name does not split a log line
    assert d.stop() == 0
    assert_outputs_readable(out / lines[0]["session"])

    # configured to follow symlinks: the outside frame is stacked
    again = Daemon(watch, out, env={"NIGHTSTACK_FOLLOW_SYMLINKS": "true"})
    daemons.append(again)
    wait_for(lambda: len(journal(out)) >= len(odd) + 2, 60, "the followed symlink", again)
    assert Path(journal(out)[-1]["file"]).name == "link_outside.DNG"
    assert again.stop() == 0
