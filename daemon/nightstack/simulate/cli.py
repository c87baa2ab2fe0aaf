"""The ``nightstack simulate`` command: its arguments and what they turn into.

Only the standard library is imported at module level: ``nightstack``'s parser defines these
arguments for every command, and the simulator (numpy, scipy) loads only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_CFA_CHOICES = ("RGGB", "BGGR", "GRBG", "GBRG")  # as nightstack.simulate.dng.CFA_PATTERNS


def _frame_list(text: str) -> list[int]:
    """``"3"`` or ``"3,7"`` -> frame indices."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected frame indices like 3 or 3,7, got {text!r}"
        ) from None


def _pairs(text: str) -> list[tuple[int, float]]:
    """``"I:V"`` or ``"I:V,J:W"`` -> [(frame, value), ...]."""
    out = []
    for item in text.split(","):
        frame, sep, value = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(frame), float(value)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected FRAME:VALUE pairs like 8:1.4 or 3:0.3,4:0.85, got {text!r}"
            ) from None
    return out


def _span(text: str) -> tuple[float, float]:
    """``"F"`` (constant) or ``"A:B"`` (linear from A at the first frame to B at the last)."""
    start, sep, end = text.partition(":")
    try:
        return (float(start), float(end)) if sep else (float(start), float(start))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected F or START:END, got {text!r}") from None


def _floats(text: str) -> list[float]:
    """``"3.2,3.5,4.1"`` -> [3.2, 3.5, 4.1]."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Define ``nightstack simulate``'s arguments on its subparser ``p``."""
    p.add_argument("outdir", type=Path)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.0, help="seconds between frames")
    p.add_argument(
        "--satellite", type=_frame_list, default=None, help="frame(s) with a satellite: I[,J]"
    )
    p.add_argument("--cloudy", type=_frame_list, default=None, help="cloudy frame(s): I[,J]")
    p.add_argument(
        "--trailed", type=_frame_list, default=None, help="frame(s) trailed by wind: I[,J]"
    )
    p.add_argument("--stars", type=int, default=400, help="stars in the reference frame")
    p.add_argument(
        "--field", type=_floats, default=None, metavar="RA,DEC,SCALE[,ROT]",
        help="real Tycho-2 stars (astrometry.net's index files) instead of random ones: the "
        "field centred on RA, DEC (degrees) at SCALE arcsec/px, its up ROT degrees east of north",
    )  # fmt: skip
    p.add_argument(
        "--milky-way", type=float, default=0.0, metavar="C",
        help="a Milky Way band with C times more stars on its centre line",
    )  # fmt: skip
    p.add_argument(
        "--sky-step", type=_pairs, action="append", default=[], metavar="I:F",
        help="the sky background is F times brighter from frame I on (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--sky-ramp", type=float, default=None, metavar="F",
        help="the sky background brightens linearly to F times at the last frame",
    )  # fmt: skip
    p.add_argument(
        "--glow", type=_span, default=None, metavar="A[:B]",
        help="moon glow amplitude (fraction of the sky), constant or from A to B",
    )  # fmt: skip
    p.add_argument(
        "--haze", type=_pairs, action="append", default=[], metavar="I:T",
        help="frame I lets through T of the starlight, e.g. 5:0.3 (repeatable or I:T,J:U)",
    )  # fmt: skip
    p.add_argument("--fwhm", type=float, default=3.5, help="star FWHM in px")
    p.add_argument(
        "--seeing-jitter", type=float, default=None, metavar="S",
        help="seeded seeing that wanders: log-FWHM standard deviation S (e.g. 0.15)",
    )  # fmt: skip
    p.add_argument(
        "--seeing", type=_floats, default=None, metavar="F1,F2,...",
        help="star FWHM of every frame, px (one a frame)",
    )  # fmt: skip
    p.add_argument("--cfa", choices=_CFA_CHOICES, default="RGGB", help="the sensor's Bayer tile")
    p.add_argument(
        "--calibration", type=int, nargs="?", const=20, default=0, metavar="N",
        help="a sensor with dark current, amp glow, hot pixels, PRNU, vignetting and dust, and "
        "N (20) bias, dark, flat and dark-flat frames each under OUTDIR/calibration/",
    )  # fmt: skip
    p.add_argument(
        "--temperature", type=float, default=20.0, help="--calibration: sensor temperature, C"
    )


def night_options(args: argparse.Namespace) -> dict[str, Any]:
    """``simulate_night`` keyword arguments from parsed ``nightstack simulate`` arguments.

    Raises
    ------
    ValueError
        The options contradict each other or the night (a frame index out of range, both
        ``--seeing`` and ``--seeing-jitter``).
    """
    from nightstack.simulate.schedules import seeing_jitter, sky_ramp, sky_step

    n = args.frames
    if n < 1:
        raise ValueError(f"--frames must be >= 1, got {n}")
    options: dict[str, Any] = {
        "frames": n, "width": args.width, "height": args.height, "seed": args.seed,
        "interval_s": args.interval, "satellite": args.satellite, "cloudy": args.cloudy,
        "trailed": args.trailed, "stars": args.stars, "fwhm_px": args.fwhm,
        "milky_way": args.milky_way, "cfa_pattern": args.cfa,
    }  # fmt: skip
    steps = [pair for group in args.sky_step for pair in group]
    if steps or args.sky_ramp is not None:
        levels = sky_ramp(n, args.sky_ramp) if args.sky_ramp is not None else [1.0] * n
        for at, factor in steps:
            if not 0 <= at < n:
                raise ValueError(f"--sky-step frame {at} is outside 0..{n - 1}")
            levels = [a * b for a, b in zip(levels, sky_step(n, at, factor), strict=True)]
        options["sky_levels"] = levels
    if args.glow is not None:
        start, end = args.glow
        options["glow"] = [start + (end - start) * i / max(n - 1, 1) for i in range(n)]
    hazes = [pair for group in args.haze for pair in group]
    if hazes:
        transparency = [1.0] * n
        for frame, value in hazes:
            if not 0 <= frame < n:
                raise ValueError(f"--haze frame {frame} is outside 0..{n - 1}")
            transparency[frame] = value
        options["transparency"] = transparency
    if args.calibration:
        from nightstack.simulate.sensor import SensorModel

        options["sensor"] = SensorModel(seed=args.seed, temperature_c=args.temperature)
        options["calibration_frames"] = args.calibration
    if args.field is not None:
        from nightstack.simulate.catalog import planted_stars

        if len(args.field) not in (3, 4):
            raise ValueError("--field takes RA,DEC,SCALE[,ROT]")
        try:
            ra, dec, scale, *rotation = args.field
            options["planted_stars"] = planted_stars(
                ra, dec, scale, rotation[0] if rotation else 0.0, args.width, args.height
            )
        except (FileNotFoundError, OSError) as err:
            raise ValueError(f"--field: {err}") from err
        options["stars"] = 0
    if args.seeing is not None and args.seeing_jitter is not None:
        raise ValueError("give --seeing or --seeing-jitter, not both")
    if args.seeing is not None:
        options["fwhm_schedule"] = args.seeing
    elif args.seeing_jitter is not None:
        options["fwhm_schedule"] = seeing_jitter(n, args.fwhm, args.seeing_jitter, args.seed)
    return options


def run(args: argparse.Namespace) -> int:
    """Write the night ``args`` describe; print where. Returns the exit status (2: bad
    options, with a one-line reason on stderr)."""
    from nightstack.simulate.night import simulate_night

    try:
        options = night_options(args)
        truth = simulate_night(args.outdir, **options)
    except ValueError as err:
        print(f"nightstack simulate: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.frames} frames and {truth}")
    return 0
