"""Configuration: precedence TOML < environment < flags, validation naming the setting, and the
start-up checks of the folders (the real CLI refuses overlapping folders before READY=1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nightstack.cli import main
from nightstack.config import Settings, describe, load_settings
from nightstack.errors import ConfigError
from nightstack.service import check_startup


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nightstack.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_keep_the_batch_scripts_parameters() -> None:
    s = load_settings(use_default=False)
    assert (s.landscape_mask_ratio, s.star_fwhm_px, s.star_threshold_sigma) == (0.9, 4.0, 6.0)
    assert (s.detection_sigma_clip, s.stack_sigma, s.stack_maxiters) == (3.0, 3.0, 5)


def test_precedence_toml_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(
        tmp_path,
        "[detection]\nstar_fwhm_px = 5.0\nlandscape_mask_ratio = 0.8\n"
        "[stacking]\nstack_sigma = 2.5\nlive_kappa = 4.0\n",
    )
    monkeypatch.setenv("NIGHTSTACK_STACK_SIGMA", "2.0")
    monkeypatch.setenv("NIGHTSTACK_LIVE_KAPPA", "3.5")
    s = load_settings(config, {"live_kappa": 2.8, "star_threshold_sigma": None})
    assert s.star_fwhm_px == 5.0  # TOML over default
    assert s.stack_sigma == 2.0  # environment over TOML
    assert s.live_kappa == 2.8  # flag over environment
    assert s.star_threshold_sigma == 6.0  # a flag not given changes nothing


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("stack_sigma = -1\n", "stack_sigma"),
        ("landscape_mask_ratio = 1.5\n", "landscape_mask_ratio"),
        ("white_balance = 'purple'\n", "white_balance"),
        ("no_such_setting = 1\n", "no_such_setting"),
    ],
)
def test_invalid_values_name_the_setting(tmp_path: Path, text: str, name: str) -> None:
    with pytest.raises(ConfigError, match=f"'{name}'"):
        load_settings(_toml(tmp_path, text))


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(_toml(tmp_path, "stack_sigma = = 3\n"))


def test_describe_round_trips_through_toml(tmp_path: Path) -> None:
    s = load_settings(use_default=False, overrides={"output_dir": tmp_path, "stack_sigma": 2.25})
    again = load_settings(_toml(tmp_path, describe(s)))
    assert again == s
    assert all(f.description for f in Settings.model_fields.values())


def test_config_show_prints_effective_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _toml(tmp_path, "star_fwhm_px = 3.25\n")
    assert main(["config", "show", "--config", str(config), "--sigma", "2.75"]) == 0
    out = capsys.readouterr().out
    assert "star_fwhm_px = 3.25" in out and "stack_sigma = 2.75" in out


@pytest.mark.parametrize("name", ["decode_fn", "debug_stall_s"])
def test_test_hooks_are_not_settings(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the decoder child's function and a stalled worker are test hooks (service.Hooks): a user
    # cannot set them in the TOML file, the environment, or see them in `config show`
    assert name not in Settings.model_fields
    with pytest.raises(ConfigError, match=f"'{name}'"):
        load_settings(_toml(tmp_path, f"{name} = 1\n"))
    monkeypatch.setenv(f"NIGHTSTACK_{name.upper()}", "_faulty_decode:load")
    assert not hasattr(load_settings(use_default=False), name)  # the variable means nothing
    assert main(["config", "show"]) == 0
    assert name not in capsys.readouterr().out


def _watch_cli(watch: Path, out: Path, *flags: str, env: dict[str, str] | None = None) -> Any:
    """``nightstack watch`` as a real process (it must refuse to start: a short timeout)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSTACK_")}
    environment.update(env or {})
    cmd = [sys.executable, "-m", "nightstack.cli", "watch", str(watch), "--output-dir", str(out)]
    return subprocess.run(
        [*cmd, *flags], capture_output=True, text=True, timeout=60, env=environment
    )


@pytest.mark.parametrize(
    ("layout", "flags", "words"),
    [
        ("same", (), "is the watch folder"),
        ("output_inside", ("--recursive",), "is inside the watch folder"),
        ("watch_inside", (), "is inside the output folder"),
        ("watch_inside", ("--recursive",), "is inside the output folder"),
        ("symlink_to_watch", (), "is the watch folder"),
    ],
)
def test_overlapping_folders_are_refused_before_ready(
    tmp_path: Path, layout: str, flags: tuple[str, ...], words: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    if layout == "same":
        watch = out = root / "captures"
    elif layout == "output_inside":
        watch, out = root / "captures", root / "captures" / "sessions"
    elif layout == "watch_inside":
        watch, out = root / "sessions" / "incoming", root / "sessions"
    else:
        watch, out = root / "captures", root / "link"
        out.symlink_to(watch)
    watch.mkdir(parents=True)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    try:
        done = _watch_cli(watch, out, *flags, env={"NOTIFY_SOCKET": sock_path})
        with pytest.raises(TimeoutError):
            sock.recv(4096)  # nothing sent: no READY=1
    finally:
        sock.close()
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, naming both folders
    assert lines[0].startswith("nightstack: ") and words in lines[0]
    assert f" {watch}" in lines[0] and f" {out}" in lines[0]
    if layout == "output_inside":
        assert not out.exists()  # refused before the output folder is created
    assert sorted(p.name for p in watch.iterdir()) == []  # nothing written into the watch folder


def test_a_sub_folder_of_a_watch_folder_not_watched_recursively_is_fine(tmp_path: Path) -> None:
    watch = tmp_path / "captures"
    watch.mkdir()
    out = watch / "sessions"  # not watched: the watcher only sees watch/*
    settings = load_settings(use_default=False, overrides={"watch_dir": watch, "output_dir": out})
    assert check_startup(settings) == (watch, out)
    sibling = tmp_path / "captures-sessions"  # a common prefix is not "inside"
    settings = load_settings(
        use_default=False, overrides={"watch_dir": watch, "output_dir": sibling, "recursive": True}
    )
    assert check_startup(settings) == (watch, sibling)
