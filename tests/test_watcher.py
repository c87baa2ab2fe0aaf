"""FrameWatcher against real watchdog observers (inotify and polling) on real temp folders.

Nothing is mocked. Every wait is a ``queue.Queue.get`` with a timeout; negative checks ("nothing
reported") use either a sentinel file written after the ignored ones (the inotify observer
dispatches in order, so once the sentinel arrives everything before it has been routed) or a
timed ``get`` that must raise ``queue.Empty``.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nightstack.service.watcher import FrameWatcher, natural_key

EXTS = [".cr3", ".dng", ".fits"]
WAIT_S = 5.0  # generous upper bound for an event that must arrive (busy 2-core machine)
STABLE_S = 0.3  # small stability window keeps the file fast
FRAME = b"\x00raw" * 256  # 1 KiB stand-in for a raw frame; the watcher never decodes


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """Fail the test if it leaves a thread behind (after a short grace period to finish)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    for thread in threading.enumerate():
        if thread not in before:
            thread.join(max(0.0, deadline - time.monotonic()))
    leaked = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads leaked: {leaked}"


class Events:
    """on_ready / on_problem sinks: queues of (path, monotonic time) and messages."""

    def __init__(self) -> None:
        self.ready: queue.Queue[tuple[Path, float]] = queue.Queue()
        self.problems: queue.Queue[str] = queue.Queue()
        self._n = 0

    def on_ready(self, path: Path) -> None:
        self.ready.put((path, time.monotonic()))

    def on_problem(self, message: str) -> None:
        self.problems.put(message)

    def next(self, timeout: float = WAIT_S) -> Path:
        return self.ready.get(timeout=timeout)[0]

    def drain_until_sentinel(self, folder: Path) -> list[Path]:
        """Write a sentinel frame, return the paths reported before it (inotify order)."""
        self._n += 1
        sentinel = folder / f"zz_sentinel_{self._n}.dng"
        write(sentinel)
        seen = []
        while (path := self.next()) != sentinel:
            seen.append(path)
        return seen

    def assert_quiet(self, for_s: float) -> None:
        with pytest.raises(queue.Empty):
            got = self.ready.get(timeout=for_s)
            pytest.fail(f"unexpected report {got}")

    def problem(self, contains: str) -> str:
        while True:
            message = self.problems.get(timeout=WAIT_S)
            if contains in message:
                return message


def write(path: Path, data: bytes = FRAME, *, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def watcher(folder: Path, events: Events, **kwargs: Any) -> FrameWatcher:
    kwargs.setdefault("extensions", EXTS)
    kwargs.setdefault("stable_s", STABLE_S)
    kwargs.setdefault("poll_interval_s", 0.1)
    return FrameWatcher(folder, events.on_ready, on_problem=events.on_problem, **kwargs)


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    watched = tmp_path / "frames"
    watched.mkdir()
    return watched


# ---------------------------------------------------------------------------- completeness


def test_slow_write_reported_only_after_close(folder: Path, events: Events) -> None:
    path = folder / "IMG_0001.CR3"
    with watcher(folder, events):
        with open(path, "wb") as f:
            for _ in range(6):  # ~2.4 s of a slow writer (USB tether)
                f.write(FRAME)
                f.flush()
                os.fsync(f.fileno())
                events.assert_quiet(0.4)  # nothing while the file is open for writing
            closing_at = time.monotonic()
        reported, at = events.ready.get(timeout=WAIT_S)
        assert reported == path
        assert at >= closing_at
        assert path.stat().st_size == 6 * len(FRAME)
        assert events.drain_until_sentinel(folder) == []  # reported once


def test_tmp_then_rename_reported_once_with_final_name(
    tmp_path: Path, folder: Path, events: Events
) -> None:
    staging = tmp_path / "staging"
    with watcher(folder, events):
        part = write(folder / "IMG_0001.DNG.part")
        os.rename(part, folder / "IMG_0001.DNG")
        assert events.next() == folder / "IMG_0001.DNG"
        # moved in from a folder that is not watched (unpaired IN_MOVED_TO)
        os.rename(write(staging / "IMG_0002.CR3"), folder / "IMG_0002.CR3")
        assert events.next() == folder / "IMG_0002.CR3"
        assert events.drain_until_sentinel(folder) == []


def test_filter_names_and_case_insensitive_extensions(folder: Path, events: Events) -> None:
    with watcher(folder, events):
        wanted = [write(folder / n) for n in ("a.CR3", "b.cr3", "c.Dng", "d.FITS")]
        for name in (
            "e.jpg",
            "f.cr3.tmp",
            "g.CR3.part",
            ".h.cr3",
            "i.cr3~",
            "j.cr3.crdownload",
            "k.tmp",
            "cr3",
        ):
            write(folder / name)
        (folder / "l.cr3").mkdir()  # a directory with a frame's name
        write(folder / "m.cr3", b"")  # empty: a writer that creates, closes, then reopens
        assert events.drain_until_sentinel(folder) == wanted


def test_read_only_open_does_not_rereport_but_rewrite_does(folder: Path, events: Events) -> None:
    path = folder / "IMG_0007.CR3"
    with watcher(folder, events):
        write(path)
        assert events.next() == path
        with open(path, "rb") as f:  # the daemon (or a viewer) reading it: IN_CLOSE_NOWRITE
            f.read()
        with open(path, "ab"):  # opened for writing, nothing written: same size and mtime
            pass
        assert events.drain_until_sentinel(folder) == []
        write(path, FRAME * 2)  # rewritten with new content
        assert events.next() == path
        assert events.drain_until_sentinel(folder) == []


# ---------------------------------------------------------------------------- existing files


def test_existing_files_first_in_natural_order(folder: Path, events: Events) -> None:
    names = ["IMG_10.CR3", "IMG_2.CR3", "img_1.cr3", "IMG_100.CR3", "IMG_9.dng"]
    for name in names:
        write(folder / name, age_s=600)
    live = folder / "IMG_0.CR3"
    with watcher(folder, events):
        write(live)
        got = [events.next() for _ in range(len(names) + 1)]
    expected = ["img_1.cr3", "IMG_2.CR3", "IMG_9.dng", "IMG_10.CR3", "IMG_100.CR3"]
    assert got == [folder / n for n in expected] + [live]


def test_ignore_existing(folder: Path, events: Events) -> None:
    write(folder / "old.cr3", age_s=600)
    write(folder / "recent.cr3")  # young but complete: present at start, so ignored too
    with watcher(folder, events, ignore_existing=True):
        new = write(folder / "new.cr3")
        assert events.next() == new
        events.assert_quiet(STABLE_S * 2 + 0.3)  # 'recent' is not reported after stable_s


def test_young_existing_file_reported_once_stable(folder: Path, events: Events) -> None:
    # just written: it may still be open in the camera's tether tool, so it waits for stable_s
    path = write(folder / "IMG_0001.CR3")
    started = time.monotonic()
    with watcher(folder, events):
        reported, at = events.ready.get(timeout=WAIT_S)
        assert reported == path
        assert at - started >= STABLE_S
        events.assert_quiet(STABLE_S * 2)


def test_files_appearing_during_scan_neither_lost_nor_duplicated(
    folder: Path, events: Events
) -> None:
    existing = [write(folder / f"IMG_{i}.CR3", age_s=600) for i in range(300)]
    fresh = [folder / f"NEW_{i}.CR3" for i in range(30)]
    writer = threading.Thread(target=lambda: [write(p) for p in fresh])
    w = watcher(folder, events)
    writer.start()
    try:
        w.start()
        writer.join()
        got = [events.next() for _ in range(len(existing) + len(fresh))]
        events.assert_quiet(STABLE_S * 2 + 0.3)
    finally:
        writer.join()
        w.stop()
    assert got[: len(existing)] == sorted(existing, key=natural_key)
    assert sorted(got[len(existing) :]) == sorted(fresh)


# ---------------------------------------------------------------------------- recursive


# watchdog quirk: on `mkdir -p a/b` its inotify reader registers a/b while handling a's IN_CREATE,
# then again on b's own IN_CREATE, and warns "Callback with id ... already exists" from its
# reader thread. Harmless, but `filterwarnings = error` would turn it into an exception that
# kills that thread (the watcher would then restart the watch; see _observer_trouble).
@pytest.mark.filterwarnings("ignore:Callback with id .* already exists:RuntimeWarning")
def test_recursive_new_subfolders_are_watched(folder: Path, events: Events) -> None:
    old = write(folder / "DCIM" / "100CANON" / "IMG_0001.CR3", age_s=600)
    with watcher(folder, events, recursive=True):
        assert events.next() == old
        new_dir = folder / "DCIM" / "101CANON"
        new_dir.mkdir()  # then written at once: may beat the new inotify watch (rescan covers it)
        first = write(new_dir / "IMG_0002.CR3")
        assert events.next() == first
        deep = write(folder / "DCIM" / "102CANON" / "x" / "IMG_0003.CR3")  # makedirs + write
        assert events.next() == deep
        write(folder / ".thumbnails" / "IMG_0004.CR3")  # hidden folder
        events.assert_quiet(STABLE_S * 2 + 0.3)


def test_not_recursive_ignores_subfolders(folder: Path, events: Events) -> None:
    write(folder / "sub" / "old.cr3", age_s=600)
    with watcher(folder, events):
        write(folder / "sub" / "new.cr3")
        assert events.drain_until_sentinel(folder) == []


# ---------------------------------------------------------------------------- polling


def test_polling_reports_growing_file_only_once_stable(folder: Path, events: Events) -> None:
    stable_s = 0.5
    path = folder / "IMG_0001.DNG"
    with watcher(folder, events, polling=True, poll_interval_s=0.1, stable_s=stable_s):
        with open(path, "wb") as f:
            for _ in range(8):  # grows every ~0.25 s for 2 s: never stable for 0.5 s
                f.write(FRAME)
                f.flush()
                last_write = time.monotonic()
                events.assert_quiet(0.25)
        reported, at = events.ready.get(timeout=WAIT_S)
        assert reported == path
        assert at - last_write >= stable_s
        events.assert_quiet(stable_s + 0.3)


def test_polling_rename_and_filters(folder: Path, events: Events) -> None:
    old = write(folder / "IMG_0001.CR3", age_s=600)
    with watcher(folder, events, polling=True):
        assert events.next() == old
        write(folder / "skip.jpg")
        write(folder / ".hidden.cr3")
        os.rename(write(folder / "IMG_0002.CR3.part"), folder / "IMG_0002.CR3")
        assert events.next() == folder / "IMG_0002.CR3"
        events.assert_quiet(STABLE_S * 2 + 0.3)


# ---------------------------------------------------------------------------- symlinks


def test_symlinks_inside_ok_outside_ignored(tmp_path: Path, folder: Path, events: Events) -> None:
    outside = write(tmp_path / "elsewhere" / "far.cr3")
    os.symlink(outside, folder / "old_link.cr3")  # present at start
    with watcher(folder, events):
        assert "points outside" in events.problem("old_link.cr3")
        target = write(folder / "real.cr3")
        assert events.next() == target
        os.symlink(target, folder / "alias.cr3")
        os.symlink(outside, folder / "far_link.cr3")
        assert events.drain_until_sentinel(folder) == [folder / "alias.cr3"]
        assert "far_link.cr3" in events.problem("points outside")


def test_symlink_outside_followed_when_configured(
    tmp_path: Path, folder: Path, events: Events
) -> None:
    outside = write(tmp_path / "elsewhere" / "far.cr3")
    with watcher(folder, events, follow_symlinks=True):
        os.symlink(outside, folder / "far_link.cr3")
        assert events.next() == folder / "far_link.cr3"
    assert events.problems.empty()


# ---------------------------------------------------------------------------- folder comes and goes


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_watch_folder_removed_and_recreated(folder: Path, events: Events, polling: bool) -> None:
    with watcher(folder, events, polling=polling):
        first = write(folder / "IMG_0001.CR3")
        assert events.next() == first
        shutil.rmtree(folder)  # card pulled
        assert "disappeared; waiting for it" in events.problem("disappeared")
        folder.mkdir()  # card back
        again = write(folder / "IMG_0002.CR3")  # may land before the observer is re-armed
        assert events.next() == again
        later = write(folder / "IMG_0003.CR3")
        assert events.next() == later
        events.assert_quiet(STABLE_S * 2)


def test_watch_folder_missing_at_start(tmp_path: Path, events: Events) -> None:
    folder = tmp_path / "card"
    with watcher(folder, events):
        assert "does not exist" in events.problem(str(folder))
        folder.mkdir()
        path = write(folder / "IMG_0001.CR3")
        assert events.next() == path


# ---------------------------------------------------------------------------- odd names, errors


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_odd_file_names(folder: Path, events: Events, polling: bool) -> None:
    names = ["IMG 0001 copy.CR3", "Orion ü 星雲.dng", "two\nlines.cr3", "tab\tand 'quote'.fits"]
    with watcher(folder, events, polling=polling):
        for name in names:
            write(folder / name)
        got = {events.next() for _ in names}
    assert got == {folder / n for n in names}


def test_on_ready_exception_is_logged_not_fatal(
    folder: Path, events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    def explode_once(path: Path) -> None:
        if path.name == "bad.cr3":
            raise RuntimeError("queue full")
        events.on_ready(path)

    with (
        caplog.at_level(logging.ERROR, logger="nightstack.service.watcher"),
        FrameWatcher(folder, explode_once, extensions=EXTS, stable_s=STABLE_S),
    ):
        write(folder / "bad.cr3")
        good = write(folder / "good.cr3")
        assert events.next() == good
    assert any("bad.cr3" in r.getMessage() and r.exc_info for r in caplog.records)


def test_stop_is_idempotent_and_callable_from_on_ready(folder: Path, events: Events) -> None:
    holder: list[FrameWatcher] = []

    def stop_on_first(path: Path) -> None:
        holder[0].stop()  # from the observer thread: only signals
        events.on_ready(path)

    w = FrameWatcher(folder, stop_on_first, extensions=EXTS)
    holder.append(w)
    w.start()
    write(folder / "IMG_0001.CR3")
    assert events.next() == folder / "IMG_0001.CR3"
    w.stop()
    w.stop()
    with pytest.raises(RuntimeError, match="twice"):
        w.start()


def test_invalid_arguments(folder: Path) -> None:
    with pytest.raises(ValueError, match="extensions"):
        FrameWatcher(folder, print, extensions=["cr3"])
    with pytest.raises(ValueError, match="extensions"):
        FrameWatcher(folder, print, extensions=[])
    with pytest.raises(ValueError, match="stable_s"):
        FrameWatcher(folder, print, extensions=EXTS, stable_s=-1)
    with pytest.raises(ValueError, match="poll_interval_s"):
        FrameWatcher(folder, print, extensions=EXTS, poll_interval_s=0)


def test_natural_key() -> None:
    names = ["IMG_10.CR3", "img_2.cr3", "IMG_1.CR3", "IMG_1a.CR3", "a/IMG_3.CR3", "IMG_02.CR3"]
    ordered = sorted(names, key=natural_key)
    assert ordered == [
        "a/IMG_3.CR3",
        "IMG_1.CR3",
        "IMG_1a.CR3",
        "IMG_02.CR3",
        "img_2.cr3",
        "IMG_10.CR3",
    ]
