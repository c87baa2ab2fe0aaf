#!/bin/sh
# Set up a development venv and run one job in it.
#   sh deploy/dev.sh demo    simulate a night and stack it live (the main job, embedded data)
#   sh deploy/dev.sh test    lint, type-check and run the whole test suite
# Installs what it needs: Debian packages when run as root (else prints the apt line),
# a venv in .venv, the package with its test extras.
set -eu
cd "$(dirname "$0")/.."
job=${1:-}
case "$job" in
  demo|test) ;;
  *) echo "usage: sh deploy/dev.sh demo|test" >&2; exit 2 ;;
esac
shift

# Debian packages: a venv, a compiler and headers for wheels that may need building
# (photutils and systemd-python on aarch64), libsystemd for systemd-python; for the tests also
# chromium and chromium-driver (the web page's browser tests, tests/test_web_browser.py), mosquitto
# and openssl (the MQTT notifications' broker, with TLS, tests/test_notify_channels.py), and
# astrometry.net with its Tycho-2 index files (the plate-solving tests, tests/test_solve.py:
# about 290 MB to download, 260 MB installed).
pkgs="python3-venv python3-dev build-essential pkg-config libsystemd-dev"
if [ "$job" = test ]; then
  pkgs="$pkgs chromium chromium-driver mosquitto openssl astrometry.net astrometry-data-tycho2"
fi
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || missing="$missing $p"
  done
fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    # the package lists may be old or absent (a fresh container): refresh them first
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
  else
    echo "nightstack: missing Debian packages; please run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y$missing" >&2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extras="test"
# systemd-python needs libsystemd-dev; without it everything else still works.
if pkg-config --exists libsystemd 2>/dev/null; then extras="$extras,systemd"; fi
stamp=".venv/.installed-$(cksum < pyproject.toml | cut -d' ' -f1)-$extras"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi

case "$job" in
  demo)
    exec .venv/bin/nightstack demo "$@" ;;
  test)
    .venv/bin/ruff check daemon tests bench
    .venv/bin/mypy
    # two workers, each test file in one of them (its module fixtures built once)
    exec .venv/bin/pytest -n 2 --dist loadfile "$@" ;;
esac
