"""The shipped deployment files: example config, systemd units, install.sh.

The units are checked with ``systemd-analyze verify``, which exits 0 on unknown directives and
unparsable values (it only warns, as systemd does at load time) but fails on a missing ExecStart
binary; so the check here is "exit 0 and no message about the unit", and each test first proves
it catches a planted typo. install.sh runs for real with ``--prefix TMP --dry-run``: files are
written under TMP, system-changing commands are printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nightstack.config import SYSTEM_CONFIG, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "nightstack.toml"
SYSTEM_UNIT = DEPLOY / "nightstack.service"
USER_UNIT = DEPLOY / "nightstack-user.service"
INSTALL = DEPLOY / "install.sh"
VENV_NIGHTSTACK = Path(sys.executable).parent / "nightstack"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed"
)
# Planted faults that systemd only warns about: each must make the check fail.
TYPOS = [
    ("WatchdogSec=120", "WatchdogSek=120"),  # unknown directive
    ("MemoryMax=2500M", "MemoryMax=2500Q"),  # unparsable value
    ("Type=notify", "Type=notfy"),  # invalid enum value
]


@pytest.fixture(autouse=True)
def _no_nightstack_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NIGHTSTACK_"):
            monkeypatch.delenv(name)


# --- example config ------------------------------------------------------------------------
def _keys_in_example(text: str) -> list[str]:
    """Every key the example sets or shows commented out (``# name = value``)."""
    return re.findall(r"^#? ?([a-z_][a-z0-9_]*) = ", text, flags=re.MULTILINE)


def test_example_config_loads_and_covers_every_setting() -> None:
    settings = load_settings(EXAMPLE)
    keys = _keys_in_example(EXAMPLE.read_text(encoding="utf-8"))
    assert len(keys) == len(set(keys)), "a setting appears twice"
    assert set(keys) == set(Settings.model_fields), "example and Settings differ"
    assert settings.watch_dir == Path("/srv/nightstack/incoming")
    assert settings.output_dir == Path("/var/lib/nightstack/sessions")


def test_example_config_documents_the_defaults() -> None:
    # Sections are flattened by the loader: a key in two sections would silently override.
    with EXAMPLE.open("rb") as fh:
        data = tomllib.load(fh)
    flat = [k for v in data.values() for k in (v if isinstance(v, dict) else [v])]
    assert len(flat) == len(set(flat))
    example, defaults = load_settings(EXAMPLE), Settings()
    differ = [n for n in Settings.model_fields if getattr(example, n) != getattr(defaults, n)]
    assert differ == ["watch_dir", "output_dir"]


def test_example_output_dir_is_writable_by_the_sandboxed_service() -> None:
    unit = _directives(SYSTEM_UNIT)
    output_dir = load_settings(EXAMPLE).output_dir
    assert output_dir is not None
    writable = [Path(p.lstrip("-")) for p in unit["ReadWritePaths"][0].split()]
    writable += [Path("/var/lib") / d for d in unit["StateDirectory"][0].split()]
    assert any(output_dir.is_relative_to(p) for p in writable)


# --- units ---------------------------------------------------------------------------------
def _directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def _verify(unit: Path, *, user: bool = False, env: dict[str, str] | None = None) -> list[str]:
    """Problems ``systemd-analyze verify`` reports for ``unit`` (empty: it is clean)."""
    assert SYSTEMD_ANALYZE is not None
    command = [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify", "--man=no"]
    command += ["--recursive-errors=no", str(unit)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if unit.name in line]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}: {proc.stderr.strip()}")
    return problems


def _system_unit_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointing at this venv's real ``nightstack`` (verify needs it)."""
    final = "ExecStart=/opt/nightstack/venv/bin/nightstack "
    assert final in text
    unit = tmp_path / "nightstack.service"
    unit.write_text(text.replace(final, f"ExecStart={VENV_NIGHTSTACK} "), encoding="utf-8")
    return unit


@needs_systemd_analyze
def test_system_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = SYSTEM_UNIT.read_text(encoding="utf-8")
    for good, typo in TYPOS:
        assert good in text
        assert _verify(_system_unit_copy(tmp_path, text.replace(good, typo))), typo
    assert _verify(_system_unit_copy(tmp_path, text)) == []


@needs_systemd_analyze
def test_system_unit_fails_verify_without_its_binary(tmp_path: Path) -> None:
    unit = tmp_path / "nightstack.service"
    shutil.copy(SYSTEM_UNIT, unit)  # /opt/nightstack/venv/bin/nightstack is not installed here
    if Path("/opt/nightstack/venv/bin/nightstack").exists():
        pytest.skip("nightstack is installed in /opt on this machine")
    assert any("not executable" in p for p in _verify(unit))


@needs_systemd_analyze
def test_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # %h is $HOME for the user manager: a home holding the venv makes ExecStart real, unedited.
    home = tmp_path / "home"
    venv_bin = home / ".local/share/nightstack/venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "nightstack").symlink_to(VENV_NIGHTSTACK)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    text = USER_UNIT.read_text(encoding="utf-8")
    unit = tmp_path / "nightstack.service"
    for good, typo in TYPOS:
        assert good in text
        unit.write_text(text.replace(good, typo), encoding="utf-8")
        assert _verify(unit, user=True, env=env), typo
    unit.write_text(text, encoding="utf-8")
    assert _verify(unit, user=True, env=env) == []
    assert "User" not in _directives(USER_UNIT)


def test_units_agree_with_the_installer_and_the_config_loader() -> None:
    system, user = _directives(SYSTEM_UNIT), _directives(USER_UNIT)
    script = INSTALL.read_text(encoding="utf-8")
    assert system["ExecStart"] == [
        f"/opt/nightstack/venv/bin/nightstack watch --config {SYSTEM_CONFIG}"
    ]
    assert "venv=/opt/nightstack/venv\n" in script
    assert f"config={SYSTEM_CONFIG}\n" in script
    assert user["ExecStart"] == [
        "%h/.local/share/nightstack/venv/bin/nightstack watch"
        " --config %E/nightstack/nightstack.toml"
    ]
    assert "venv=$HOME/.local/share/nightstack/venv\n" in script
    for unit in (system, user):
        assert unit["Type"] == ["notify"]
        assert unit["NotifyAccess"] == ["main"]
        assert unit["WatchdogSec"] == ["120"]
    assert (system["User"], system["StateDirectory"]) == (["nightstack"], ["nightstack"])


# --- install.sh ----------------------------------------------------------------------------
def _install(*args: str, home: Path | None = None) -> tuple[list[str], str]:
    """Run install.sh; returns the printed commands (without "+ ") and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    if home is not None:
        env["HOME"] = str(home)
    proc = subprocess.run(
        ["sh", str(INSTALL), *args], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == len(proc.stdout.splitlines()), "stdout holds only commands"
    return commands, proc.stderr


def _has(commands: list[str], *words: str) -> bool:
    return any(all(w in c.split() for w in words) for c in commands)


def _user_exists(name: str) -> bool:
    return subprocess.run(["getent", "passwd", name], capture_output=True).returncode == 0


def test_install_dry_run_writes_files_under_prefix_and_prints_commands(tmp_path: Path) -> None:
    commands, _ = _install("--prefix", str(tmp_path), "--dry-run")

    config = tmp_path / "etc/nightstack/nightstack.toml"
    unit = tmp_path / "etc/systemd/system/nightstack.service"
    assert config.read_bytes() == EXAMPLE.read_bytes()
    assert unit.read_bytes() == SYSTEM_UNIT.read_bytes()
    assert (tmp_path / "srv/nightstack/incoming").is_dir()
    assert not (tmp_path / "opt").exists()  # the venv is only printed
    assert load_settings(config).output_dir == Path("/var/lib/nightstack/sessions")

    packages = ["python3-venv", "python3-dev", "build-essential", "pkg-config", "libsystemd-dev"]
    assert _has(commands, "apt-get", "install", *packages)
    assert not _has(commands, "gphoto2")
    assert not _has(commands, "astrometry.net")
    if _user_exists("nightstack"):
        assert _has(commands, "usermod", "nightstack")
    else:
        assert _has(commands, "useradd", "--system", "--groups", "plugdev", "nightstack")
    venv = tmp_path / "opt/nightstack/venv"
    assert _has(commands, "-m", "venv", str(venv))
    assert _has(commands, str(venv / "bin/python"), "pip", "install", f"'{ROOT}[systemd]'")
    assert _has(commands, "systemctl", "daemon-reload")
    assert _has(commands, "systemctl", "enable", "nightstack.service")
    assert not _has(commands, "systemctl", "start", "nightstack.service")


def test_install_is_idempotent_and_keeps_an_edited_config(tmp_path: Path) -> None:
    _install("--prefix", str(tmp_path), "--dry-run")
    config = tmp_path / "etc/nightstack/nightstack.toml"
    unit = tmp_path / "etc/systemd/system/nightstack.service"
    edited = config.read_text(encoding="utf-8").replace('log_level = "INFO"', 'log_level = "DEBUG"')
    config.write_text(edited, encoding="utf-8")
    unit_mtime = unit.stat().st_mtime_ns
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    commands, messages = _install(
        "--prefix", str(tmp_path), "--dry-run", "--start", "--gphoto2", "--solver=08,10-19"
    )
    assert config.read_text(encoding="utf-8") == edited
    assert load_settings(config).log_level == "DEBUG"
    assert unit.stat().st_mtime_ns == unit_mtime  # identical content: not rewritten
    rules = Path("etc/udev/rules.d/61-nightstack-camera.rules")  # --gphoto2's one new file
    added = {*(rules.parents[i] for i in range(2)), rules}
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == sorted({*files, *added})
    assert "kept existing config" in messages
    assert _has(commands, "apt-get", "install", "gphoto2")
    assert _has(commands, "astrometry.net", "astrometry-data-tycho2-08",
                "astrometry-data-tycho2-10-19")  # fmt: skip
    assert _has(commands, "pip", "install", f"'{ROOT}[systemd,capture]'")  # nightstack capture
    assert _has(commands, "systemctl", "start", "nightstack.service")

    unit.write_text("[Service]\nExecStart=/bin/false\n", encoding="utf-8")  # a stale unit
    _install("--prefix", str(tmp_path), "--dry-run")
    assert unit.read_bytes() == SYSTEM_UNIT.read_bytes()


def test_uninstall_removes_unit_and_venv_and_keeps_config(tmp_path: Path) -> None:
    _install("--prefix", str(tmp_path), "--dry-run")
    venv_python = tmp_path / "opt/nightstack/venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("a venv left by a real install\n", encoding="utf-8")
    config = tmp_path / "etc/nightstack/nightstack.toml"

    commands, _ = _install("--uninstall", "--prefix", str(tmp_path), "--dry-run")
    assert not (tmp_path / "etc/systemd/system/nightstack.service").exists()
    assert not (tmp_path / "opt/nightstack/venv").exists()
    assert config.read_bytes() == EXAMPLE.read_bytes()
    assert (tmp_path / "srv/nightstack/incoming").is_dir()
    assert _has(commands, "systemctl", "disable", "--now", "nightstack.service")
    assert not _has(commands, "userdel")


def test_user_install_under_prefix(tmp_path: Path) -> None:
    home, prefix = tmp_path / "home", tmp_path / "stage"
    home.mkdir()
    commands, _ = _install("--user", "--prefix", str(prefix), "--dry-run", home=home)

    staged = prefix / home.relative_to("/")
    unit = staged / ".config/systemd/user/nightstack.service"
    assert unit.read_bytes() == USER_UNIT.read_bytes()
    settings = load_settings(staged / ".config/nightstack/nightstack.toml")
    assert settings.watch_dir == home / "nightstack/incoming"
    assert settings.output_dir == home / "nightstack/sessions"
    assert (staged / "nightstack/incoming").is_dir()
    assert list(home.iterdir()) == []  # everything went under the prefix
    assert _has(commands, "-m", "venv", str(staged / ".local/share/nightstack/venv"))
    assert _has(commands, "systemctl", "--user", "enable", "nightstack.service")
    assert not _has(commands, "useradd")


def test_dry_run_without_prefix_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    commands, _ = _install("--user", "--dry-run", home=home)
    assert list(home.iterdir()) == []
    assert _has(commands, "mkdir", "-p", str(home / ".config/nightstack"))
    assert _has(commands, "mv", "-f", str(home / ".config/systemd/user/nightstack.service"))

    commands, _ = _install("--uninstall", "--user", "--dry-run", home=home)
    assert _has(commands, "systemctl", "--user", "disable", "--now", "nightstack.service")


def test_install_rejects_an_unknown_option() -> None:
    proc = subprocess.run(
        ["sh", str(INSTALL), "--prefx", "/tmp/x"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "unknown option '--prefx'" in proc.stderr


def test_install_help_describes_the_options() -> None:
    proc = subprocess.run(["sh", str(INSTALL), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for option in ("--user", "--start", "--gphoto2", "--solver", "--uninstall", "--prefix",
                   "--dry-run"):  # fmt: skip
        assert option in proc.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_script_is_shellcheck_clean() -> None:
    proc = subprocess.run(
        ["shellcheck", "--shell=sh", str(INSTALL)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout


# --- issue 20: the config may hold the token; descriptors; the user unit's sandbox -------------
def test_the_installed_config_is_not_world_readable(tmp_path: Path) -> None:
    commands, _ = _install("--prefix", str(tmp_path / "sys"), "--dry-run")
    config = tmp_path / "sys/etc/nightstack/nightstack.toml"
    assert config.stat().st_mode & 0o777 == 0o640  # main: 0644, token and all
    assert _has(commands, "chown", "root:nightstack")
    home = tmp_path / "home"
    home.mkdir()
    _install("--user", "--prefix", str(tmp_path / "user"), "--dry-run", home=home)
    staged = tmp_path / "user" / home.relative_to("/") / ".config/nightstack/nightstack.toml"
    assert staged.stat().st_mode & 0o777 == 0o600


def test_units_set_a_descriptor_limit_and_keep_files_from_other_users() -> None:
    for unit in (SYSTEM_UNIT, USER_UNIT):
        limit = _directives(unit)["LimitNOFILE"]
        assert len(limit) == 1 and int(limit[0]) >= 2048, unit  # main: systemd's 1024
        assert _directives(unit)["UMask"][0] in ("0027", "0077"), unit


@needs_systemd_analyze
def test_user_unit_sandbox_exposure(tmp_path: Path) -> None:
    """`systemd-analyze --user security` scored the user unit 9.4-9.6 UNSAFE on main."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    shutil.copy(USER_UNIT, tmp_path / "nightstack.service")
    proc = subprocess.run(
        [str(SYSTEMD_ANALYZE), "--user", "security", "--offline=true", "nightstack.service"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        check=False,
    )
    found = re.search(r"Overall exposure level for nightstack.service: ([0-9.]+)", proc.stdout)
    assert found is not None, proc.stdout[-500:] + proc.stderr[-500:]
    assert float(found.group(1)) <= 2.0, proc.stdout


# --- issue 22: the service captures from a camera on USB ------------------------------------
CAMERA_RULES = DEPLOY / "61-nightstack-camera.rules"


def test_units_let_the_capture_open_a_usb_camera() -> None:
    """The capture inside the service opens /dev/bus/usb/BBB/DDD (group plugdev) read-write and
    libusb needs a netlink socket for udev's events (without one, libgphoto2 lists no usb: port
    at all: checked with socket(AF_NETLINK) failing under LD_PRELOAD). Main's units had
    PrivateDevices=yes, which hides /dev/bus/usb."""
    system = _directives(SYSTEM_UNIT)
    assert system["SupplementaryGroups"] == ["plugdev"]
    assert system["PrivateDevices"] == ["no"]
    assert system["DevicePolicy"] == ["closed"]  # the pseudo devices and what DeviceAllow= lists
    assert system["DeviceAllow"] == ["char-usb_device rw"]
    watch = load_settings(EXAMPLE).watch_dir
    assert watch is not None
    writable = [Path(p.lstrip("-")) for p in system["ReadWritePaths"][0].split()]
    assert watch in writable  # the frames are downloaded into it
    user = _directives(USER_UNIT)
    assert user["PrivateDevices"] == ["no"]
    for unit in (system, user):
        assert "AF_NETLINK" in unit["RestrictAddressFamilies"][0].split()


def test_the_camera_udev_rule_is_well_formed() -> None:
    """Every rule line is KEY[{attr}] OP "value" items, comma-separated; the labels match; the
    rule gives PTP-class and libgphoto2-known devices to plugdev."""
    item = re.compile(r'\s*[A-Z]+(\{[A-Za-z0-9_]+\})?(==|!=|=|\+=)"[^"]*"\s*')
    labels, gotos = set(), set()
    for line in CAMERA_RULES.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        for part in line.split(","):
            assert item.fullmatch(part), f"not a udev match or assignment: {part!r}"
        labels.update(re.findall(r'LABEL="([^"]+)"', line))
        gotos.update(re.findall(r'GOTO="([^"]+)"', line))
    assert gotos == labels == {"nightstack_camera_end"}
    text = CAMERA_RULES.read_text(encoding="utf-8")
    assert 'ENV{ID_USB_INTERFACES}=="*:060101:*", ENV{ID_GPHOTO2}="1"' in text
    assert 'ENV{ID_GPHOTO2}=="1", MODE="0664", GROUP="plugdev"' in text


def test_install_gphoto2_installs_the_camera_rule(tmp_path: Path) -> None:
    rules = tmp_path / "etc/udev/rules.d/61-nightstack-camera.rules"
    _install("--prefix", str(tmp_path), "--dry-run")
    assert not rules.exists()  # no capture asked for: no rule
    _install("--prefix", str(tmp_path), "--dry-run", "--gphoto2")
    assert rules.read_bytes() == CAMERA_RULES.read_bytes()
    commands, _ = _install("--dry-run", "--gphoto2")  # no prefix: udev is told, nothing written
    assert _has(commands, "udevadm", "control", "--reload-rules")
    assert _has(commands, "udevadm", "trigger", "--subsystem-match=usb", "--action=add")
    _install("--uninstall", "--prefix", str(tmp_path), "--dry-run")
    assert not rules.exists()
