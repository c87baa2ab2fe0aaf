"""Issue 19: the live Bayer drizzle's memory and time, against the demosaic live stack.

``nightstack watch`` fed the benchmark night's 24 MP frames one at a time, as the mosaic
benchmark feeds them (:func:`bench_mosaic._daemon`: each after the previous one's live add),
twice in one run: with the default demosaic live stack and with ``drizzle = "1x"`` (the
live stack a drizzle too, the final a drizzle). Reported: the process tree's PSS peak while
stacking and while finalizing, the live add's time a frame after the warm-up (the daemon's
``live=`` log field), ingest latency, the live state's bytes a sample.
"""

from __future__ import annotations

import os
from typing import Any

from _common import ensure_night, log, table
from bench_mosaic import _daemon

N = 12
QUICK_N = 6
STATE_BYTES = {"off": 4 + 2 + 2 / 3, "1x": 4 + 2 + 2 / 3}
"""The live state per sample (the demosaic stack's mean, variance code and a shared count; the
drizzle's mean and weight code, and a shared variance code: stacking/live_drizzle.py)."""


def measure(quick: bool) -> dict[str, Any]:
    paths = ensure_night(QUICK_N if quick else N)
    data: dict[str, Any] = {"n": len(paths)}
    for drizzle in ("off", "1x"):
        log(f"daemon, {len(paths)} x 24 MP one at a time, drizzle {drizzle}")
        before = os.environ.get("NIGHTSTACK_DRIZZLE")
        os.environ["NIGHTSTACK_DRIZZLE"] = drizzle
        try:
            data[drizzle] = _daemon(paths, f"ld_{drizzle}")
        finally:
            if before is None:
                os.environ.pop("NIGHTSTACK_DRIZZLE", None)
            else:
                os.environ["NIGHTSTACK_DRIZZLE"] = before
    return data


def report(data: dict[str, Any]) -> str:
    rows = []
    for drizzle, name in (("off", "demosaic live stack (default)"), ("1x", "drizzle 1x")):
        d = data[drizzle]
        state_mb = STATE_BYTES[drizzle] * 6000 * 4000 * 3 / 2**20
        rows.append(
            (
                name,
                f"{d['accepted']}/{d['n']}",
                f"{STATE_BYTES[drizzle]:.2f} B ({state_mb:.0f} MB)",
                f"{d['pss_mb'].get('stack', 0):.0f} MB",
                f"{d['pss_mb'].get('finalize', 0):.0f} MB",
                f"{d['stages_ms']['live (after the journal line)'] / 1000:.2f} s",
                f"{d['steady_latency_s']:.2f} s",
            )
        )
    off, on = data["off"], data["1x"]
    ratio = on["stages_ms"]["live (after the journal line)"] / max(
        off["stages_ms"]["live (after the journal line)"], 1e-9
    )
    out = [
        table(
            (
                "live stack",
                "accepted",
                "state a sample (24 MP)",
                "PSS peak stacking",
                "PSS peak finalizing",
                "live add a frame (median after warm-up)",
                "ingest latency",
            ),
            rows,
        ),
        "",
        f"The drizzle's live add takes {ratio:.1f}x the demosaic live stack's a frame (numpy "
        "drops of every sensor site: four overlaps a site, two bincounts each, bands of 16 "
        "output rows; the demosaic stack's add is a few fused OpenCV passes). PSS: the process "
        "tree (daemon and decoder child), sampled every 50 ms; finalizing: the exact final (a "
        "drizzle with `drizzle = \"1x\"`, reading each stored frame a few rows at a time).",
    ]
    return "\n".join(out)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    peak = max(data["1x"]["pss_mb"].values())
    return [("daemon PSS <= 1.0 GB at 24 MP with drizzle 1x", f"{peak:.0f} MB", peak <= 1024)]
