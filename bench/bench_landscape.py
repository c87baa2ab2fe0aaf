"""Issue 15: the per-frame cost of the landscape products at 24 MP, as a ratio to the decode.

Frames of the benchmark night (6000 x 4000 DNG) are decoded in process, then fed, the way
``Stacker._add`` does, to: the star trails (``StarTrails.add``: the lighten blend into uint16;
and with gap filling, the sky warped to the intermediate positions), the timelapse
(``Timelapse.add`` at 1920 px: shrink, stretch, JPEG kept, mp4v encode), the freeze-ground
stack (``GroundStack.add``: the ground rows unwarped into their frame store + live stack) for a
landscape covering the bottom quarter of the frame, the fill of the ground before the sky is
stored (``fill_ground``), the automatic mask's accumulation (``HorizonFinder.add``) and its
estimate (run on each of the first 12 frames only), and the live preview's composite. Memory:
the bytes each product holds whatever the night's length, and the peak of one call
(tracemalloc: numpy's allocations).
"""

from __future__ import annotations

import shutil
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from _common import OUT, ensure_night, fmt_s, log, median, table, timed

GROUND_FRACTION = 0.25  # the bottom quarter is ground: a generous landscape
FRAMES = 7


def _peak_mb(call: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def measure(quick: bool) -> dict[str, Any]:
    import cv2

    from nightstack.io.loaders import load
    from nightstack.products.extras import StarTrails, Timelapse
    from nightstack.products.landscape import (
        GroundStack,
        HorizonFinder,
        SkyMask,
        fill_ground,
        ground_top,
        preview_composite,
    )
    from nightstack.registration.normalize import Normalization
    from nightstack.simulate import SkyModel

    frames = 4 if quick else FRAMES
    paths = ensure_night(frames)
    model = SkyModel.from_truth(paths[0].parent / "truth.json")
    work = OUT / "landscape_bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    names = ("decode", "trails", "trails_gap", "timelapse", "ground", "fill", "horizon_add")
    t: dict[str, list[float]] = {
        k: [] for k in (*names, "horizon_estimate", "preview", "ground_eighth")
    }
    trails = gap = timelapse = ground = finder = mask = None
    gap_steps: list[int] = []
    peaks: dict[str, float] = {}
    for i, path in enumerate(paths):
        log(f"frame {i}: {path.name}")
        with timed(t["decode"]):
            frame = load(path)
        image, rows = frame.image, frame.shape[0]
        matrix = model.transform(i)
        if trails is None:
            shape = frame.shape
            mask = SkyMask.from_ratio(shape, 1.0 - GROUND_FRACTION)
            trails = StarTrails(shape, 3)
            gap = StarTrails(shape, 3, gap_fill=True)
            timelapse = Timelapse(work, shape, width=1920, fps=24.0)
            ground = GroundStack(
                work / "ground", shape, 3, ground_top(mask, 12.0), kappa=3.0, warmup=5
            )
            eighth = SkyMask.from_ratio(shape, 1.0 - GROUND_FRACTION / 2)
            small_ground = GroundStack(
                work / "ground8", shape, 3, ground_top(eighth, 12.0), kappa=3.0, warmup=5
            )
            finder = HorizonFinder(shape, frame.bin)
        assert gap is not None and timelapse is not None and ground is not None
        assert finder is not None and mask is not None
        with timed(t["trails"]):
            trails.add(image)
        with timed(t["trails_gap"]):
            gap.add(image, matrix, mask, frame.luminance, frame.bin)
        if i:
            m = np.vstack([matrix, [0, 0, 1]])
            p = np.vstack([model.transform(i - 1), [0, 0, 1]])
            step = np.linalg.inv(p) @ m
            corners = np.array([[0, 0, 1], [5999, 0, 1], [0, 3999, 1], [5999, 3999, 1]])
            moved = np.hypot(*(corners @ step[:2].T - corners[:, :2]).T).max()
            gap_steps.append(int(min(16, np.ceil(moved / 1.5))))
        with timed(t["timelapse"]):
            timelapse.add(image)
        with timed(t["horizon_add"]):
            finder.add(frame.luminance, model.transform(10 * i))  # motion: an answer
        with timed(t["horizon_estimate"]):
            finder.estimate()
        with timed(t["ground"]):
            ground.add(frame, Normalization.identity(3), 1.0, path.name)
        with timed(t["ground_eighth"]):
            small_ground.add(frame, Normalization.identity(3), 1.0, path.name)
        with timed(t["fill"]):
            fill_ground(image, mask)
    assert trails is not None and ground is not None and ground.live is not None
    assert mask is not None and finder is not None and timelapse is not None
    peaks["trails"] = _peak_mb(lambda: trails.add(image))
    beyond = model.transform(frames)  # one more gap, for the peak memory of a gap filled
    peaks["trails_gap"] = _peak_mb(lambda: gap.add(image, beyond, mask, frame.luminance, 2))
    peaks["timelapse"] = _peak_mb(lambda: timelapse.add(image))
    peaks["fill"] = _peak_mb(lambda: fill_ground(image, mask))
    peaks["horizon_estimate"] = _peak_mb(finder.estimate)
    from nightstack.io.writers import write_preview
    from nightstack.products.landscape import blend_weights

    weight = blend_weights(mask, ground.top, 12.0)
    small = np.asarray(cv2.resize(image, (1600, 1067), interpolation=cv2.INTER_AREA))
    live = ground.live
    for _ in range(3):
        with timed(t["preview"]):
            shown = preview_composite(
                small, lambda r0, r1: image[r0:r1], live, weight, ground.top, rows
            )
            write_preview(work / "preview.jpg", shown, width=1600)
    peaks["preview"] = _peak_mb(
        lambda: preview_composite(
            small, lambda r0, r1: image[r0:r1], live, weight, ground.top, rows
        )
    )
    timelapse.close()
    held = {
        "trails": trails.image.nbytes,
        "ground_live": 10 * live.shape[0] * live.shape[1] * live.channels,
        "ground_store_frame": ground.store.frame_bytes,
        "sky_store_frame": 6000 * 4000 * 3 * 2,
        "horizon_finder": finder.state_bytes,
        "blend_weights": weight.nbytes,
        "timelapse_mp4": (work / "timelapse.mp4").stat().st_size,
    }
    shutil.rmtree(work, ignore_errors=True)
    return {
        "t": t,
        "frames": frames,
        "peaks": peaks,
        "held": held,
        "gap_steps": gap_steps,
        "ground_top": ground.top,
    }


_ROWS = (
    ("trails", "star trails, lighten blend into uint16 (`StarTrails.add`)", 0.1),
    ("trails_gap", "star trails with gap filling (star pixels moved)", None),
    ("timelapse", "timelapse frame at 1920 px: shrink, stretch, JPEG kept, mp4v", 0.1),
    ("ground", "freeze: ground rows unwarped into store + live (`GroundStack.add`)", 0.1),
    ("ground_eighth", "the same with the bottom eighth as ground", 0.1),
    ("fill", "freeze: the ground filled with the sky's surface (`fill_ground`)", None),
    ("horizon_add", "auto mask: accumulate a frame (`HorizonFinder.add`)", None),
    ("horizon_estimate", "auto mask: estimate (frames 3-12 only)", None),
    ("preview", "live preview with the frozen ground, 1600 px (composite + JPEG)", None),
)


def report(data: dict[str, Any]) -> str:
    t = data["t"]
    decode = median(t["decode"])
    rows: list[tuple[Any, ...]] = [
        ("decode in process (`loaders.load`)", fmt_s(decode), "1", len(t["decode"]), "", "")
    ]
    for key, label, goal in _ROWS:
        s = median(t[key])
        verdict = ""
        if goal is not None:
            verdict = f"{'met' if s / decode <= goal else '**missed**'} (<= {goal}x decode)"
        peak = data["peaks"].get(key)
        rows.append(
            (
                label,
                fmt_s(s),
                f"{s / decode:.3f}x",
                len(t[key]),
                "" if peak is None else f"{peak:.0f} MB",
                verdict,
            )
        )
    held = data["held"]
    mb = {k: v / 2**20 for k, v in held.items()}
    steps = data["gap_steps"]
    body = [
        f"{data['frames']} frames of the simulated night (6000x4000 DNG); the ground is the "
        f"bottom quarter (ground stack rows {data['ground_top']}..3999, the feather included). "
        "Ratios are medians over the median in-process decode of the same files in this run; "
        "peak = tracemalloc's peak of numpy allocations during one call (the frame itself, "
        "288 MB, not counted).",
        "",
        table(("stage", "median", "x decode", "runs", "peak", "goal"), rows),
        "",
        "Memory held whatever the night's length (the daemon's live sky stack is 720 MB, the "
        "decoded frame 288 MB):",
        "",
        table(
            ("what", "MB"),
            [
                ("star trails (uint16, camera frame)", f"{mb['trails']:.0f}"),
                (
                    "freeze: ground live stack (a quarter of the rows)",
                    f"{mb['ground_live']:.0f}",
                ),
                ("freeze: blend weights (float32, ground rows)", f"{mb['blend_weights']:.0f}"),
                (
                    "auto mask: accumulators (first 12 frames; luminance minimum + grid)",
                    f"{mb['horizon_finder']:.0f}",
                ),
            ],
        ),
        "",
        f"Disk per frame: the ground's store {mb['ground_store_frame']:.0f} MB beside the sky "
        f"store's {mb['sky_store_frame']:.0f} MB; the timelapse {mb['timelapse_mp4']:.1f} MB for "
        f"{data['frames'] + 1} frames. Gap filling drew {', '.join(map(str, steps))} positions "
        "per gap on this night (drift 3 px, 0.05 degree a frame); only the star pixels (5 sigma "
        "above their background) are moved, so its cost grows with the stars and the sky's "
        "motion (at most 32 positions). The automatic mask is given 10x the night's motion so "
        "that its estimate runs (at 0.05 degree a frame it waits for motion, at no cost).",
    ]
    return "\n".join(body)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    t = data["t"]
    decode = median(t["decode"])
    out = []
    for key, _label, goal in _ROWS:
        if goal is None:
            continue
        s = median(t[key])
        out.append(
            (
                f"{key} <= {goal}x decode (24 MP)",
                f"{s / decode:.3f}x ({fmt_s(s)})",
                s <= goal * decode,
            )
        )
    return out
