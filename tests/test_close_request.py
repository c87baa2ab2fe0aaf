"""``nightstack close`` and the daemon's close request (issue 20, item 9), with a real daemon.

The request file is created with O_NOFOLLOW and never truncated; the command says when no daemon
is there (exit 1) and names a missing folder in one line (exit 2); a directory (or anything but
a regular file) named ``close-request`` is ignored by the daemon with one log line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _daemon import Daemon, journal, wait_for
from nightstack.cli import main
from nightstack.simulate import simulate_night

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def frame(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("camera")
    simulate_night(outdir, frames=1, width=600, height=400, seed=3)
    return sorted(outdir.glob("*.DNG"))[0]


def test_close_without_a_daemon_says_so_and_a_missing_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert main(["close", "--output-dir", str(out)]) == 1
    assert "no daemon is writing into" in capsys.readouterr().err
    assert not (out / "close-request").exists()  # nothing left to close the next session
    assert main(["close", "--output-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_a_planted_symlink_is_refused_and_a_directory_never_crashes_the_daemon(
    frame: Path, tmp_path: Path, daemons: list[Daemon], capsys: pytest.CaptureFixture[str]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out, log_dir=tmp_path)
    daemons.append(d)
    wait_for(lambda: "watching" in d.text(), 60, "start-up", d)
    shutil.copy(frame, watch / frame.name)
    wait_for(lambda: journal(out), 60, "the frame", d)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (out / "close-request").symlink_to(victim)
    assert main(["close", "--output-dir", str(out)]) == 2
    assert "symlink: refused" in capsys.readouterr().err
    assert victim.read_text() == "keep me"
    (out / "close-request").unlink()
    (out / "close-request").mkdir()  # a directory of that name: ignored, no crash
    wait_for(lambda: "is not a regular file: ignored" in d.text(), 10, "the complaint", d)
    d.stop()
    again = Daemon(watch, out, log_dir=tmp_path)  # a restart with the directory still there
    daemons.append(again)
    wait_for(lambda: "is not a regular file: ignored" in again.text(), 30, "restart", again)
    assert again.alive()
    assert again.text().count("is not a regular file") == 1  # once, not every tick
    (out / "close-request").rmdir()
    shutil.copy(frame, watch / "again.DNG")  # already processed: the session stays as it is
    assert main(["close", "--output-dir", str(out)]) == 0
    sessions = sorted(out.glob("*/session.json"))

    def closed() -> bool:
        return all(json.loads(p.read_text())["state"] == "closed" for p in sessions)

    wait_for(closed, 30, "the close", again)
    assert again.stop() == 0
