#!/bin/sh
# Install nightstack as a systemd service on Debian 12 / Raspberry Pi OS (bookworm).
#
#   sudo sh deploy/install.sh [--start] [--gphoto2] [--solver[=SET]]   system service, user
#                                                     "nightstack"
#   sh deploy/install.sh --user [--start]             per-user service (a laptop)
#   sudo sh deploy/install.sh --uninstall             remove the unit and the venv
#
# System install: Debian packages, a venv in /opt/nightstack/venv with nightstack[systemd],
# the system user nightstack (no login shell, home /var/lib/nightstack, group plugdev), the
# watch folder /srv/nightstack/incoming (group nightstack, setgid), the config
# /etc/nightstack/nightstack.toml (0640 root:nightstack: it may hold web_token; an existing one
# is never overwritten), the unit
# /etc/systemd/system/nightstack.service, enabled but only started with --start.
# --user: venv in ~/.local/share/nightstack/venv, config in ~/.config/nightstack/ (watching
# ~/nightstack/incoming, writing ~/nightstack/sessions), unit in ~/.config/systemd/user/.
# --uninstall (with or without --user) removes the unit and the venv and keeps the config,
# the sessions, the watch folder and the nightstack user.
# Re-running is safe: it upgrades the venv and the unit and keeps the config.
#
# Options:
#   --user         per-user install instead of the system service
#   --start        start the service after enabling it
#   --gphoto2      also install gphoto2 (with libgphoto2's udev rules) and python-gphoto2
#                  (tethered capture: nightstack capture, capture_* settings; docs/capture.md)
#                  and, system install, the udev rule /etc/udev/rules.d/61-nightstack-camera.rules
#                  that gives cameras to the group plugdev
#   --solver       also install astrometry.net's solve-field and all its Tycho-2 index files
#                  (plate solving, docs/solving.md: about 190 MB to download, 260 MB on disk)
#   --solver=SET   only the index files for your field: a comma list of 07 (fields of
#                  22'-30', 88 MB), 08 (30'-44', 51 MB), 09 (44'-60', 27 MB), 10-19 (1-33 deg,
#                  22 MB); e.g. --solver=08,09 for a 0.5-1 degree field
#   --uninstall    remove instead of install
#   --prefix DIR   staging root, like DESTDIR: every installed path goes under DIR; file
#                  contents, the user's home and systemd keep the final paths
#   --dry-run      print the commands that change the system (apt-get, useradd, chown, pip,
#                  systemctl) instead of running them; files are still written under --prefix
#                  (without --prefix nothing is written and the file operations are printed)
#   -h, --help     this text
# Environment: PYTHON (default python3) creates the venv.
set -eu
umask 022

repo=$(cd "$(dirname "$0")/.." && pwd)
invocation="$0 $*"
mode=system
action=install
start=0
gphoto2=0
solver=""
dry_run=0
prefix=""

say() { printf 'nightstack-install: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
usage() { sed -n '2,/^set -eu/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# Print the arguments as one shell command line, quoting where needed.
quote() {
  line=""
  for arg in "$@"; do
    case $arg in
      "" | *[!A-Za-z0-9_./:=,@%+-]*) arg="'$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")'" ;;
    esac
    line="$line${line:+ }$arg"
  done
  printf '%s\n' "$line"
}

# A command that changes the system: printed under --dry-run, else run.
run() {
  if [ "$dry_run" = 1 ]; then
    printf '+ '
    quote "$@"
  else
    "$@"
  fi
}

# A file operation on an installed path: done when the files go somewhere real (a normal run,
# or a dry run with --prefix), printed under a plain --dry-run.
fsrun() {
  if [ "$dry_run" = 1 ] && [ -z "$prefix" ]; then
    printf '+ '
    quote "$@"
  else
    "$@"
  fi
}

# run, with stdout discarded when it really runs (under --dry-run the command is printed).
run_quiet() {
  if [ "$dry_run" = 1 ]; then run "$@"; else "$@" >/dev/null; fi
}

# Run as root: directly when root (or printing only), else through sudo.
root_run() {
  if [ "$(id -u)" = 0 ] || [ "$dry_run" = 1 ]; then run "$@"; else run sudo "$@"; fi
}

while [ $# -gt 0 ]; do
  case $1 in
    --user) mode=user ;;
    --start) start=1 ;;
    --gphoto2) gphoto2=1 ;;
    --solver) solver=all ;;
    --solver=*) solver=${1#--solver=} ;;
    --uninstall) action=uninstall ;;
    --dry-run) dry_run=1 ;;
    --prefix)
      [ $# -ge 2 ] || die "--prefix needs a directory"
      prefix=$2
      shift ;;
    --prefix=*) prefix=${1#--prefix=} ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

if [ -n "$prefix" ]; then
  mkdir -p "$prefix"
  prefix=$(cd "$prefix" && pwd)
  [ "$prefix" = / ] && prefix=""
fi

# --- paths (final locations; $prefix is added where files are written) ---------------------
if [ "$mode" = system ]; then
  venv=/opt/nightstack/venv
  config=/etc/nightstack/nightstack.toml
  unit_src=$repo/deploy/nightstack.service
  unit=/etc/systemd/system/nightstack.service
  watch_dir=/srv/nightstack/incoming
  systemctl_mode=""
else
  [ -n "${HOME:-}" ] || die "HOME is not set"
  case $HOME in *\"* | *\\*) die "HOME contains a quote or a backslash: install by hand" ;; esac
  config_home=${XDG_CONFIG_HOME:-$HOME/.config}
  venv=$HOME/.local/share/nightstack/venv
  config=$config_home/nightstack/nightstack.toml
  unit_src=$repo/deploy/nightstack-user.service
  unit=$config_home/systemd/user/nightstack.service
  watch_dir=$HOME/nightstack/incoming
  output_dir=$HOME/nightstack/sessions
  systemctl_mode="--user"
fi

# systemctl with or without --user, if a service manager is there to talk to.
sctl() {
  if [ -n "$systemctl_mode" ]; then run systemctl --user "$@"; else run systemctl "$@"; fi
}
have_systemd() {
  [ "$dry_run" = 1 ] && return 0
  [ -z "$prefix" ] || return 1  # a staged unit is not where systemd looks
  if [ "$mode" = system ]; then
    [ -d /run/systemd/system ]  # sd_booted(3)
  else
    systemctl --user show-environment >/dev/null 2>&1
  fi
}

# Debian packages among the arguments that are not installed (all of them without dpkg).
missing_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    printf '%s ' "$@"
    return 0
  fi
  for pkg in "$@"; do
    # shellcheck disable=SC2016 # ${Status} is dpkg-query's field, not a shell variable
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || printf '%s ' "$pkg"
  done
}

# Copy a file unless the destination already has the same content.
install_file() {  # src dst
  if [ -f "$prefix$2" ] && cmp -s "$1" "$prefix$2"; then
    say "unchanged: $2"
  else
    fsrun mkdir -p "$(dirname "$prefix$2")"
    fsrun cp "$1" "$prefix$2.new"
    fsrun chmod 0644 "$prefix$2.new"
    fsrun mv -f "$prefix$2.new" "$prefix$2"
    say "installed: $2"
  fi
}

# The example config, once: an existing config is the user's and is never touched.
install_config() {
  if [ -e "$prefix$config" ]; then
    say "kept existing config: $config"
    return 0
  fi
  fsrun mkdir -p "$(dirname "$prefix$config")"
  if [ "$mode" = system ]; then
    fsrun cp "$repo/deploy/nightstack.toml" "$prefix$config.new"
  elif [ "$dry_run" = 1 ] && [ -z "$prefix" ]; then
    printf '+ %s\n' "write $config (example, watch_dir = $watch_dir, output_dir = $output_dir)"
  else
    NS_WATCH=$watch_dir NS_OUTPUT=$output_dir awk '
      /^watch_dir = / { print "watch_dir = \"" ENVIRON["NS_WATCH"] "\""; next }
      /^output_dir = / { print "output_dir = \"" ENVIRON["NS_OUTPUT"] "\""; next }
      { print }' "$repo/deploy/nightstack.toml" >"$prefix$config.new"
  fi
  # It may hold web_token: readable by the service's group (system) or the user only.
  if [ "$mode" = system ]; then
    fsrun chmod 0640 "$prefix$config.new"
    run chown root:nightstack "$prefix$config.new"
  else
    fsrun chmod 0600 "$prefix$config.new"
  fi
  fsrun mv "$prefix$config.new" "$prefix$config"
  say "installed config: $config (edit watch_dir / output_dir)"
}

# --- uninstall -----------------------------------------------------------------------------
if [ "$action" = uninstall ]; then
  if [ "$mode" = system ] && [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root: sudo sh $invocation"
  fi
  if have_systemd; then
    sctl disable --now nightstack.service || say "the unit was not enabled"
  fi
  if [ -e "$prefix$unit" ]; then
    fsrun rm -f "$prefix$unit"
    say "removed: $unit"
  fi
  if have_systemd; then sctl daemon-reload; fi
  if [ "$mode" = system ] && [ -e "$prefix/etc/udev/rules.d/61-nightstack-camera.rules" ]; then
    fsrun rm -f "$prefix/etc/udev/rules.d/61-nightstack-camera.rules"
    say "removed: /etc/udev/rules.d/61-nightstack-camera.rules"
  fi
  if [ -e "$prefix$venv" ]; then
    fsrun rm -rf "$prefix$venv"
    say "removed: $venv"
  fi
  if [ "$mode" = system ]; then
    say "kept: $config, /var/lib/nightstack (sessions), /srv/nightstack, user nightstack"
    say "  (remove the user with: userdel nightstack)"
  else
    say "kept: $config and $HOME/nightstack"
  fi
  exit 0
fi

# --- install -------------------------------------------------------------------------------
if [ "$mode" = system ] && [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
  die "run as root: sudo sh $invocation  (or --user for a per-user install)"
fi

# 1. Debian packages: a venv, a compiler and headers for wheels that may be built from source,
#    libsystemd for systemd-python (notifications and structured journal logging).
pkgs="python3-venv python3-dev build-essential pkg-config libsystemd-dev"
[ "$gphoto2" = 0 ] || pkgs="$pkgs gphoto2"
# plate solving: solve-field and the Tycho-2 index files (all, or the sets named)
if [ "$solver" = all ]; then
  pkgs="$pkgs astrometry.net astrometry-data-tycho2"
elif [ -n "$solver" ]; then
  pkgs="$pkgs astrometry.net"
  for set in $(printf '%s' "$solver" | tr ',' ' '); do
    case $set in
      07 | 08 | 09 | 10-19) pkgs="$pkgs astrometry-data-tycho2-$set" ;;
      *) die "--solver: unknown index set '$set' (07, 08, 09, 10-19)" ;;
    esac
  done
fi
# shellcheck disable=SC2086 # the package list is split on purpose
missing=$(missing_packages $pkgs)
if ! command -v apt-get >/dev/null 2>&1 && [ "$dry_run" = 0 ]; then
  say "no apt-get (not Debian?): install the equivalents of: $pkgs"
elif [ "$mode" = system ]; then
  # Always "install": a no-op for installed packages; update the lists only when needed.
  [ -z "$missing" ] || run apt-get update -q
  # shellcheck disable=SC2086
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs
elif [ -n "$missing" ]; then
  root_run apt-get update -q
  # shellcheck disable=SC2086
  root_run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    $missing
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  if [ "$dry_run" = 1 ]; then
    say "warning: $python is missing or older than 3.11"
  else
    die "nightstack needs Python >= 3.11 ($python)"
  fi
fi

# 2. The service user (system install): no login shell, home = the state directory, plugdev for
#    the camera's USB device (a tethering tool started as this user).
if [ "$mode" = system ]; then
  if getent passwd nightstack >/dev/null 2>&1; then
    say "user nightstack exists"
    if getent group plugdev >/dev/null 2>&1; then run usermod -a -G plugdev nightstack; fi
  elif getent group plugdev >/dev/null 2>&1; then
    run useradd --system --user-group --home-dir /var/lib/nightstack --no-create-home \
      --shell /usr/sbin/nologin --comment "nightstack live stacking" --groups plugdev nightstack
  else
    run useradd --system --user-group --home-dir /var/lib/nightstack --no-create-home \
      --shell /usr/sbin/nologin --comment "nightstack live stacking" nightstack
  fi
fi

# 3. The venv with nightstack and systemd-python.
case $(uname -m) in
  aarch64 | arm*)
    say "note: on $(uname -m) (Raspberry Pi) pip may build photutils and systemd-python from"
    say "source; the first install can take 10-20 minutes." ;;
esac
if [ -x "$prefix$venv/bin/python" ]; then
  say "venv exists: $venv (upgrading nightstack in it)"
else
  run "$python" -m venv "$prefix$venv"
fi
run "$prefix$venv/bin/python" -m pip install -q --upgrade pip
extras=systemd
[ "$gphoto2" = 0 ] || extras="systemd,capture"  # python-gphoto2: nightstack capture
run "$prefix$venv/bin/python" -m pip install -q "${repo}[$extras]"
run "$prefix$venv/bin/nightstack" --version

# 4. Config and folders.
install_config
if [ -d "$prefix$watch_dir" ]; then
  say "watch folder exists: $watch_dir"
else
  fsrun mkdir -p "$prefix$watch_dir"
  if [ "$mode" = system ]; then
    # Group nightstack, setgid: members of the group (the capturing user) write frames there,
    # new files stay readable by the service.
    run chown nightstack:nightstack "$prefix$watch_dir"
    fsrun chmod 2775 "$prefix$watch_dir"
  else
    fsrun mkdir -p "$prefix$output_dir"
  fi
  say "created watch folder: $watch_dir"
fi
# The config must parse (also a kept, older one): fail here, not at service start.
run_quiet "$prefix$venv/bin/nightstack" config show --config "$prefix$config"

# 5. The camera (--gphoto2, system install): its USB device node to plugdev, which the service
#    user is in; a desktop's gvfs would claim the camera first.
camera_rules=/etc/udev/rules.d/61-nightstack-camera.rules
if [ "$gphoto2" = 1 ] && [ "$mode" = system ]; then
  install_file "$repo/deploy/61-nightstack-camera.rules" "$camera_rules"
  if [ -z "$prefix" ] && { [ "$dry_run" = 1 ] || [ -d /run/udev ]; }; then
    run udevadm control --reload-rules
    run udevadm trigger --subsystem-match=usb --action=add
  fi
fi
if [ "$gphoto2" = 1 ] && [ -e /usr/libexec/gvfs-gphoto2-volume-monitor ]; then
  say "warning: gvfs is installed and claims cameras (\"Could not claim the USB device\");"
  say "  each desktop user: systemctl --user mask --now gvfs-gphoto2-volume-monitor.service"
  say "  (docs/capture.md, \"A desktop holding the camera\")"
fi

# 6. The unit.
install_file "$unit_src" "$unit"
if have_systemd; then
  sctl daemon-reload
  sctl enable nightstack.service
  if [ "$start" = 1 ]; then sctl start nightstack.service; fi
else
  say "no running systemd here: enable later with: systemctl $systemctl_mode enable --now nightstack"
fi

if [ "$mode" = system ]; then
  say "done. Let the capturing user write frames: sudo usermod -aG nightstack <user>"
  say "start: sudo systemctl start nightstack; logs: journalctl -t nightstack -f"
  say "after an upgrade: sudo systemctl restart nightstack (the open session is resumed)"
else
  say "done. start: systemctl --user start nightstack; logs: journalctl --user -t nightstack -f"
  say "to run without being logged in: loginctl enable-linger $(id -un)"
fi
