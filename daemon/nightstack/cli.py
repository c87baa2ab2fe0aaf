"""The ``nightstack`` command: simulate, stack, watch, demo, close, capture, config."""

from __future__ import annotations

import argparse
import glob
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nightstack import __version__
from nightstack.capture import cli as capture_cli
from nightstack.config import Settings, describe, load_settings
from nightstack.errors import ConfigError, NightstackError
from nightstack.formats import CALIBRATION_EXTENSIONS
from nightstack.service.watcher import natural_key
from nightstack.simulate import cli as simulate_cli

if TYPE_CHECKING:
    from nightstack.pipeline.stacker import Stacker
    from nightstack.service.daemon import Hooks

log = logging.getLogger("nightstack")

# CLI flags that map one-to-one onto settings (flag -> setting name); given flags win.
_SETTING_FLAGS: dict[str, tuple[str, type, str]] = {
    "--landscape-mask-ratio": ("landscape_mask_ratio", float, "top fraction of frame that is sky"),
    "--sky-mask": ("sky_mask", Path, "mask image, white = sky, or 'auto'"),
    "--fwhm": ("star_fwhm_px", float, "DAOStarFinder FWHM in px"),
    "--threshold": ("star_threshold_sigma", float, "detection threshold in sigma"),
    "--sigma": ("stack_sigma", float, "sigma of the final sigma clip"),
    "--method": ("stack_method", str, "sigma_clip, mean, median or winsorized"),
    "--transform": ("transform_model", str, "similarity or affine"),
    "--interpolation": ("interpolation", str, "bilinear, cubic or lanczos4 (the frames' warp)"),
    "--demosaic": (
        "demosaic",
        str,
        "bilinear or edge-aware (OpenCV, on the mosaic), or LibRaw AHD, LINEAR, DHT, ...",
    ),
    "--white-balance": ("white_balance", str, "camera, daylight, auto or 4 multipliers"),
    "--decode-timeout": ("decode_timeout_s", float, "abandon a decode after this many seconds"),
    "--ram-cap-mb": ("ram_cap_mb", int, "RAM cap of the final combine"),
    "--preview-width": ("preview_width", int, "preview width in px"),
    "--normalize": ("normalize", str, "sky normalization: add, addscale, gradient or none"),
    "--min-transparency": ("min_transparency", float, "reject hazier frames (0 = off)"),
    "--tiff-scale": ("tiff_scale", str, "linear TIFF scale: fixed (65535 = full scale) or range"),
    # --- calibration ---
    "--bias": ("bias", Path, "master bias (or a folder of bias frames)"),
    "--dark": ("dark", Path, "master dark (or a folder of dark frames)"),
    "--flat": ("flat", Path, "master flat (or a folder of flat frames)"),
    "--darkflat": ("darkflat", Path, "master dark-flat (or folder): removed from a flat folder"),
    "--calibration-dir": ("calibration_dir", Path, "calibration library matched per light"),
}


# --- landscape and products (stack and watch) ---
def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


_PRODUCT_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--landscape": ("landscape", str, "blur (ground stacked with the sky) or freeze (sharp)"),
    "--products": ("products", _names, "comma-separated: stack, trails, timelapse"),
    "--trails-gap-fill": ("trails_gap_fill", "store_true", "star trails: fill the gaps"),
    "--timelapse-width": ("timelapse_width", int, "timelapse width in px"),
    "--timelapse-fps": ("timelapse_fps", float, "timelapse frames per second"),
}


def _add_product_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (dest, kind, text) in _PRODUCT_FLAGS.items():
        if kind == "store_true":
            parser.add_argument(flag, dest=dest, action="store_const", const=True, help=text)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file")
    for flag in names:
        dest, kind, text = _SETTING_FLAGS[flag]
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def _overrides(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    values = {dest: getattr(args, dest, None) for dest, _, _ in _SETTING_FLAGS.values()}
    values.update({dest: getattr(args, dest, None) for dest, _, _ in _PRODUCT_FLAGS.values()})
    values.update(extra or {})
    return values


def _settings(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    return load_settings(args.config, _overrides(args, extra))


def expand_inputs(inputs: Sequence[str], extensions: Sequence[str]) -> list[Path]:
    """Files, directories (their frames) and globs, naturally ordered, without duplicates."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.update(
                p for p in path.iterdir() if p.suffix.lower() in extensions and p.is_file()
            )
        elif path.exists():
            found.add(path)
        else:
            found.update(Path(p) for p in glob.glob(item) if Path(p).is_file())
    return sorted(found, key=natural_key)


# --- simulate ------------------------------------------------------------------------------
def _cmd_simulate(args: argparse.Namespace) -> int:
    return simulate_cli.run(args)


# --- stack ---------------------------------------------------------------------------------
class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.tty = total, label, sys.stderr.isatty()

    def __call__(self, done: int, total: int | None = None, note: str = "") -> None:
        if not self.tty:
            return
        self.total = total or self.total
        width = 30
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total} {note[:40]:<40}")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _solve_reference(stacker: Stacker, settings: Settings) -> None:
    """Plate-solve the reference (when a solver is there): the final's WCS, OBJECT, RA, DEC."""
    from nightstack.solve.solver import Solver
    from nightstack.solve.wcs import solve_stars

    solver = Solver(settings)
    ref = stacker.reference
    if ref is None or not solver.available:
        if settings.solve_enabled is True:
            log.warning("no plate solve: %s", solver.reason)
        return
    stacker.solved = solve_stars(solver, ref.file, ref.stars, ref.shape)
    if stacker.solved is not None:
        s = stacker.solved.solution
        log.info("reference solved in %.1f s: %s, RA %.4f Dec %+.4f, %.3f\"/px",
                 s.seconds, stacker.solved.target, s.ra_deg, s.dec_deg, s.scale_arcsec)  # fmt: skip


def _cmd_stack(args: argparse.Namespace) -> int:
    from nightstack.io.decoder import Decoder, load_kwargs
    from nightstack.pipeline.finish import Target, finish
    from nightstack.pipeline.prepare import Preparer
    from nightstack.pipeline.records import Tally
    from nightstack.pipeline.stacker import Stacker

    settings = _settings(args)
    files = expand_inputs(args.inputs, settings.extensions)
    if args.reference is not None:
        ref = Path(args.reference)
        files = [ref] + [f for f in files if f.resolve() != ref.resolve()]
    if len(files) < 2:
        print(f"nightstack stack: need at least two frames, found {len(files)}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if args.work_dir is not None and not Path(args.work_dir).is_dir():
        print(f"nightstack stack: --work-dir {args.work_dir} is not a folder", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix=".nightstack-", dir=args.work_dir or output.parent))
    report = args.report.open("w", encoding="utf-8") if args.report else None
    tally = Tally()
    solve_wait: _Waiter | None = None
    try:
        with Decoder(timeout_s=settings.decode_timeout_s, load_kwargs=load_kwargs(settings)) as dec:
            preparer = Preparer(settings, dec)
            stacker = Stacker(settings, workdir, sky=preparer.sky, live=False)  # the final only
            progress = _Progress(len(files), "stacking")
            solving: threading.Thread | None = None  # the reference's plate solve, beside
            for n, path in enumerate(files, 1):
                record = stacker.stack(preparer.prepare(path, sky=stacker.sky))
                tally.count(record)
                if record.reference and solving is None:
                    solving = threading.Thread(target=_solve_reference, args=(stacker, settings),
                                               name="plate-solve", daemon=True)  # fmt: skip
                    solving.start()
                if args.reference is not None and n == 1 and not record.reference:
                    print(
                        f"nightstack stack: reference {path} unusable: {record.reason}",
                        file=sys.stderr,
                    )
                    return 1
                if report is not None:
                    report.write(record.to_json() + "\n")
                    report.flush()
                note = record.status if record.reason is None else record.reason
                log.info("%s: %s", path.name, note)
                progress(n, note=f"{path.name}: {note}")
        if tally.accepted < 2:
            print(
                f"nightstack stack: only {tally.accepted} frame(s) could be stacked; "
                f"rejected: {_reasons(tally.rejected)}",
                file=sys.stderr,
            )
            return 1
        assert stacker.store is not None and stacker.reference is not None
        disk = stacker.store.disk_bytes()
        if solving is not None:
            solve_wait = _Waiter(solving)
        combining = time.monotonic()
        targets = [Target("stack", output, stretched=args.stretched)]
        made, _ = finish(
            stacker,
            tally,
            targets if "stack" in settings.products else [],
            progress=_Progress(1, "combining") if sys.stderr.isatty() else None,
            before_header=solve_wait.join if solve_wait is not None else None,  # its WCS
        )
        combined = time.monotonic() - combining - (solve_wait.waited if solve_wait else 0.0)
        for key, value in made.items():  # trails.tif/.jpg, timelapse.mp4 beside the output
            if key != "stack" and isinstance(value, str):
                moved = output.parent / Path(value).name
                shutil.move(value, moved)
                log.info("%s: %s", key, moved)
    finally:
        if report is not None:
            report.close()
        shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - start
    waited = solve_wait.waited if solve_wait is not None else 0.0
    print(
        f"stacked {tally.accepted} of {len(files)} frames into {output}; "
        f"rejected {tally.rejected_total} ({_reasons(tally.rejected)}); "
        f"total exposure {tally.exposure_s:.0f} s; frame store {disk / 2**20:.0f} MiB; "
        f"{took:.1f} s (final combine {combined:.1f} s"
        + (f"; then {waited:.1f} s for the plate solve)" if waited >= 0.1 else ")")
    )
    return 0


class _Waiter:
    """Joins a thread once, keeping how long that took (the plate solve the final waits for)."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread, self.waited = thread, 0.0

    def join(self) -> None:
        start = time.monotonic()
        self.thread.join()
        self.waited = time.monotonic() - start


def _reasons(rejected: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items())) or "none"


# --- master ------------------------------------------------------------------------------
def _cmd_master(args: argparse.Namespace) -> int:
    from nightstack.calibration.calibrate import load_masters
    from nightstack.calibration.masters import build_master, write_master

    start = time.monotonic()
    extensions = load_settings(args.config).extensions if args.config else None
    files = expand_inputs(args.inputs, extensions or CALIBRATION_EXTENSIONS)
    offsets = load_masters({"bias": args.bias, "darkflat": args.darkflat})
    offset = offsets.get("darkflat") or offsets.get("bias")
    if offset is not None and args.kind != "flat":
        print("nightstack master: --bias/--darkflat only apply to flats", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    progress = _Progress(len(files), f"{args.kind} master")
    master = build_master(
        args.kind,
        files,
        offset=offset,
        sigma=args.sigma,
        ram_cap_bytes=args.ram_cap_mb * 2**20,
        spill_dir=output.parent,
        progress=lambda done, total, note: progress(done, total, note),
    )
    write_master(output, master)
    info = master.info
    removed = f", {offset.info.kind} removed" if offset is not None else ""
    print(
        f"wrote {output}: {info.kind} master of {info.ncombine} frames, {info.describe()}"
        f"{removed}; {time.monotonic() - start:.1f} s"
    )
    return 0


# --- watch / close / demo ----------------------------------------------------------------
_WATCH_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--recursive": ("recursive", "store_true", "also watch sub-folders (DCIM/100CANON/...)"),
    "--polling": ("polling", "store_true", "poll (network shares, FUSE, MTP) instead of inotify"),
    "--ignore-existing": ("ignore_existing", "store_true", "skip files already present"),
    "--idle-timeout": ("idle_timeout_s", float, "close the session after this many idle seconds"),
    "--stable": ("stable_s", float, "polling: seconds a file must be unchanged"),
}


def _watch_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {"watch_dir": args.watch_dir, "output_dir": args.output_dir}
    for dest, kind, _ in _WATCH_FLAGS.values():
        value = getattr(args, dest)
        values[dest] = (value or None) if kind == "store_true" else value
    # --- web ---
    values["web_listen"] = args.web
    values["web_enabled"] = False if args.no_web else (True if args.web else None)
    # --- end web ---
    return values


def _cmd_watch(args: argparse.Namespace) -> int:
    from nightstack.service.daemon import Daemon
    from nightstack.service.notify import setup_logging
    from nightstack.web.server import start_web

    extra = _watch_overrides(args)
    settings = _settings(args, extra)
    setup_logging("DEBUG" if args.verbose else settings.log_level)
    overrides = _overrides(args, extra)
    daemon = Daemon(
        settings, config=args.config, overrides=overrides, hooks=args.hooks, web=start_web
    )
    return daemon.run()


def _cmd_close(args: argparse.Namespace) -> int:
    from nightstack.service.control import daemon_running, request_close

    output = args.output_dir or _settings(args).output_dir
    if output is None:
        raise ConfigError("no output folder: give --output-dir or set 'output_dir'")
    output = Path(output)
    if not output.is_dir():
        raise ConfigError(f"output folder {output} does not exist")
    if not daemon_running(output):
        print(f"nightstack: no daemon is writing into {output}: nothing to close", file=sys.stderr)
        return 1
    try:
        request_close(output)
    except OSError as err:
        raise ConfigError(f"cannot ask the daemon in {output}: {err.strerror}") from err
    print(f"asked the daemon writing into {output} to close its session")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nightstack.demo import run_demo
    from nightstack.service.notify import setup_logging

    setup_logging("DEBUG" if args.verbose else "INFO")
    return run_demo(
        args.output_dir,
        frames=args.frames,
        interval_s=args.interval,
        width=args.width,
        height=args.height,
        seed=args.seed,
    )


# --- config --------------------------------------------------------------------------------
def _cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(describe(_settings(args)))
    return 0


# --- entry point ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightstack", description="Live stacking of astrophotography frames."
    )
    parser.add_argument("--version", action="version", version=f"nightstack {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write a synthetic night of DNG raws + truth.json")
    simulate_cli.add_arguments(p)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("stack", help="stack files, folders or globs into one image")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True, help=".tif/.tiff, .fits/.fit, .jpg/.png")
    p.add_argument("--report", type=Path, help="write one JSON line per input here")
    p.add_argument("--reference", help="use this frame as the reference")
    p.add_argument("--work-dir", type=Path, help="where the aligned-frame store goes")
    p.add_argument("--stretched", action="store_true", help="TIFF: auto-stretched, not linear")
    _add_setting_flags(p, list(_SETTING_FLAGS))
    _add_product_flags(p)
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser(
        "master", help="combine bias, dark, flat or dark-flat frames into a master FITS"
    )
    p.add_argument("kind", choices=["bias", "dark", "flat", "darkflat"])
    p.add_argument("inputs", nargs="+", help="frames: files, folders or globs")
    p.add_argument("-o", "--output", required=True, help="the master .fits")
    p.add_argument("--bias", type=Path, help="flats: master bias (or folder) to remove")
    p.add_argument("--darkflat", type=Path, help="flats: master dark-flat (or folder) to remove")
    p.add_argument("--sigma", type=float, default=3.0, help="sigma of the clip (median centre)")
    p.add_argument("--ram-cap-mb", type=int, default=384, help="memory of the band combine")
    p.add_argument("--config", type=Path, help="TOML config file (its extensions)")
    p.set_defaults(func=_cmd_master)

    p = sub.add_parser("watch", help="watch a folder and stack new frames live (the daemon)")
    p.add_argument("watch_dir", type=Path, nargs="?", default=None)
    p.add_argument("--output-dir", type=Path, default=None, help="where sessions are written")
    for flag, (dest, kind, text) in _WATCH_FLAGS.items():
        if kind == "store_true":
            p.add_argument(flag, dest=dest, action="store_true", help=text)
        else:
            p.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    # --- web ---
    p.add_argument("--web", metavar="HOST:PORT", default=None, help="serve the web page here")
    p.add_argument("--no-web", action="store_true", help="no web page or API")
    # --- end web ---
    _add_setting_flags(p, list(_SETTING_FLAGS))
    _add_product_flags(p)
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("close", help="ask the running daemon to close (finalize) its session")
    p.add_argument("--output-dir", type=Path, default=None)
    p.add_argument("--config", type=Path, help="TOML config file")
    p.set_defaults(func=_cmd_close)

    p = sub.add_parser("demo", help="simulate a night and stack it live (the embedded demo)")
    p.add_argument("--output-dir", type=Path, default=Path("nightstack-demo"))
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1066)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=_cmd_demo)

    # --- capture (issue 22) ---
    p = sub.add_parser("capture", help="shoot a sequence over USB into a folder (gphoto2)")
    capture_cli.add_arguments(p)
    p.set_defaults(func=capture_cli.run)
    # --- end capture ---

    p = sub.add_parser("config", help="configuration")
    p.add_argument("action", choices=["show"])
    _add_setting_flags(p, list(_SETTING_FLAGS))
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None, *, hooks: Hooks | None = None) -> int:
    """Run ``nightstack ARGV``; return the exit code. ``hooks``: faults a test injects into the
    daemon of ``nightstack watch`` (see ``service.Hooks``); never settings."""
    args = build_parser().parse_args(argv)
    args.hooks = hooks
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args))
    except NightstackError as err:
        print(f"nightstack: {err.reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
