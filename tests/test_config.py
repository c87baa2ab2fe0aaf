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
from nightstack.service.daemon import check_startup


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


# --- issue 20 item 10: what `config show` (the install script's check) must refuse -----------
@pytest.mark.parametrize(
    ("env", "text", "name"),
    [
        ({}, "extensions = []\n", "extensions"),
        ({}, 'extensions = ["."]\n', "extensions"),
        ({"NIGHTSTACK_EXTENSIONS": "[]"}, "", "extensions"),
        ({}, "poll_interval_s = inf\n", "poll_interval_s"),
        ({}, "stack_sigma = nan\n", "stack_sigma"),
        ({"NIGHTSTACK_POLL_INTERVAL_S": "inf"}, "", "poll_interval_s"),
        ({}, "idle_timeout_s = 1e300\n", "idle_timeout_s"),
        ({"NIGHTSTACK_WATCH_DIR": ""}, "", "watch_dir"),
        ({}, 'output_dir = ""\n', "output_dir"),
        ({}, 'sky_mask = "/no/such/mask.png"\n', "sky_mask"),
        ({"NIGHTSTACK_EXTENSIONS": '[".dng"'}, "", "extensions"),
    ],
)
def test_config_show_refuses_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    text: str,
    name: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["config", "show", "--config", str(_toml(tmp_path, text))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nightstack:") and name in err and "\n" not in err, err


def test_plain_strings_in_the_environment_for_list_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NIGHTSTACK_EXTENSIONS", ".dng")
    monkeypatch.setenv("NIGHTSTACK_PRODUCTS", "stack")
    s = load_settings(use_default=False)
    assert s.extensions == [".dng"] and s.products == ["stack"]
    monkeypatch.setenv("NIGHTSTACK_EXTENSIONS", "DNG, .cr3")
    monkeypatch.setenv("NIGHTSTACK_PRODUCTS", "trails,stack")
    s = load_settings(use_default=False)
    assert s.extensions == [".cr3", ".dng"] and s.products == ["stack", "trails"]
    monkeypatch.setenv("NIGHTSTACK_EXTENSIONS", '[".nef"]')  # JSON still works
    assert load_settings(use_default=False).extensions == [".nef"]
    assert main(["config", "show"]) == 0


def test_an_unknown_nightstack_variable_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NIGHTSTACK_WATCHDIR", "/srv/typo")  # watch_dir misspelt
    with caplog.at_level("WARNING", logger="nightstack"):
        load_settings(use_default=False)
    assert "NIGHTSTACK_WATCHDIR names no setting" in caplog.text


# --- issue 20 item 1: the token out of the config file ------------------------------------------
def test_the_web_token_from_a_file_or_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nightstack.config import redacted, web_token

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    secret = tmp_path / "token"
    secret.write_text("file-token-123456\n")
    s = load_settings(use_default=False, overrides={"web_token_file": secret})
    assert web_token(s) == "file-token-123456"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "web_token").write_text("credential-token-99\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert web_token(load_settings(use_default=False)) == "credential-token-99"
    assert web_token(s) == "file-token-123456"  # the setting wins over the credential
    secret.write_text("short\n")
    with pytest.raises(ConfigError, match="web_token_file"):
        load_settings(use_default=False, overrides={"web_token_file": secret})
    with pytest.raises(ConfigError, match="web_token_file"):
        load_settings(use_default=False, overrides={"web_token_file": tmp_path / "missing"})
    both = {"web_token": "inline-token-1", "web_token_file": creds / "web_token"}
    with pytest.raises(ConfigError, match="not both"):
        load_settings(use_default=False, overrides=both)
    s = load_settings(use_default=False, overrides={"web_token": "inline-token-1"})
    assert redacted(s)["web_token"] is None and "inline-token-1" not in describe(s)
