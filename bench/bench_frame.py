"""Issue 2: the cost of each pipeline stage for one 24 MP frame, as a ratio to its decode.

Frames 0..K-1 of the benchmark night (6000 x 4000 DNG) go through the stages one after another,
in process, the way ``Stacker`` runs them: decode (``loaders.load``), detect (``StarFinder`` on
the binned luminance), align (against frame 0's stars), warp (``warp.warp``, full frame, for
reference) and the streamed warp into the frame store (``FrameStore.add_warped``, what the
pipeline does), then ``LiveStack.catch_up`` (the live accumulator). The live stack's warm-up
is 5 frames, so frames 5.. are steady-state frames. Then the preview of the live stack at
1600 px, the isolated ``Decoder`` and the batch script's detection (photutils DAOStarFinder +
sigma_clipped_stats on the full-resolution grayscale) for contrast.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from _common import (
    OUT,
    decode_seconds,
    ensure_night,
    fmt_s,
    log,
    median,
    table,
    timed,
)

WARMUP = 5  # the default live_warmup: frames after it are steady state


def _batch_script_detection(image: np.ndarray) -> int:
    """The batch script's way: DAOStarFinder on the full-resolution grayscale, top 90 % sky."""
    from astropy.stats import sigma_clipped_stats
    from photutils.detection import DAOStarFinder

    gray = image.mean(axis=2)
    sky = gray[: int(0.9 * gray.shape[0])]
    _, med, std = sigma_clipped_stats(sky, sigma=3.0)
    found = DAOStarFinder(fwhm=4.0, threshold=6.0 * std)(sky - med)
    return 0 if found is None else len(found)


def measure(quick: bool) -> dict[str, Any]:
    from nightstack.io.decoder import Decoder
    from nightstack.io.frameio import file_sha256
    from nightstack.io.loaders import load
    from nightstack.io.writers import write_preview
    from nightstack.registration.align import align
    from nightstack.registration.detect import StarFinder
    from nightstack.registration.warp import warp
    from nightstack.stacking.checkpoint import save_live
    from nightstack.stacking.live import LiveStack
    from nightstack.stacking.store import FrameStore

    frames = WARMUP + (2 if quick else 4)
    paths = ensure_night(frames)
    work = OUT / "frame_bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    finder = StarFinder()
    names = ("hash", "decode", "detect", "align", "warp", "add_warped", "accumulate_warmup")
    t: dict[str, list[float]] = {k: [] for k in (*names, "accumulate", "stars")}
    ref_stars = store = live = None
    for i, path in enumerate(paths):
        log(f"frame {i}: {path.name}")
        with timed(t["hash"]):
            file_sha256(path)
        with timed(t["decode"]):
            frame = load(path)
        with timed(t["detect"]):
            stars = finder(frame.luminance, frame.bin)
        t["stars"].append(len(stars))
        if ref_stars is None or store is None or live is None:
            ref_stars = stars
            matrix = np.array([[1.0, 0, 0], [0, 1.0, 0]])
            store = FrameStore(work / "store", frame.shape, 3)
            live = LiveStack(frame.shape, 3, warmup=WARMUP, store=store)
        else:
            with timed(t["align"]):
                matrix = align(stars, ref_stars).matrix
            with timed(t["warp"]):
                warp(frame.image, matrix, frame.shape)
        with timed(t["add_warped"]):
            store.add_warped(frame.image, matrix)
        with timed(t["accumulate" if i >= WARMUP else "accumulate_warmup"]):
            live.catch_up()
    assert ref_stars is not None and live is not None and store is not None
    # more repeats of the cheap stages on the last frame, for stabler medians
    for _ in range(3):
        with timed(t["detect"]):
            stars = finder(frame.luminance, frame.bin)
        with timed(t["align"]):
            align(stars, ref_stars)
    log("preview")
    t["result"], t["preview"], t["result+preview"] = [], [], []
    for _ in range(3):
        with timed(t["result"]):
            image = live.result()
        with timed(t["preview"]):
            write_preview(work / "preview.jpg", image, width=1600)
        with timed(t["result+preview"]):
            write_preview(work / "preview.jpg", live.result(), width=1600)
    del image
    t["preview_image"] = []
    if hasattr(live, "preview_image"):  # the shrunk stack built band by band (newer LiveStack)
        for _ in range(3):
            with timed(t["preview_image"]):
                write_preview(work / "preview.jpg", live.preview_image(1600), width=1600)
    t["read_back"], t["checkpoint"] = [], []
    for k in range(3):
        with timed(t["read_back"]):
            store.read_band(len(store) - 1 - k, 0, store.shape[0])
    for k in range(2):
        with timed(t["checkpoint"]):
            save_live(live, work / f"checkpoint{k}")
    log("isolated decoder")
    t["decoder_first"], t["decoder"] = [], []
    with Decoder() as dec:
        with timed(t["decoder_first"]):
            dec.decode(paths[0])
        for path in paths[1:4]:
            with timed(t["decoder"]):
                dec.decode(path)
    t["decode"] += [decode_seconds(paths[0], 2)]
    t["batch_detect"], found = [], 0
    if not quick:
        log("batch script detection (photutils on the full frame)")
        for _ in range(2):
            with timed(t["batch_detect"]):
                found = _batch_script_detection(frame.image)
    shutil.rmtree(work, ignore_errors=True)
    return {"t": t, "frames": frames, "batch_found": found}


_GOALS = {
    "detect": (1.0, None, "well under 1 s for 24 MP"),
    "preview": (0.5, None, "<= 0.5 s at 1600 px"),
    "result+preview": (0.5, None, "<= 0.5 s at 1600 px"),
    "preview_image": (0.5, None, "<= 0.5 s at 1600 px"),
    "accumulate": (None, 0.15, "<= 0.15x decode"),
}


def _verdict(name: str, seconds: float, ratio: float) -> str:
    goal = _GOALS.get(name)
    if goal is None:
        return ""
    limit_s, limit_ratio, text = goal
    ok = (limit_s is None or seconds <= limit_s) and (limit_ratio is None or ratio <= limit_ratio)
    return f"{'met' if ok else '**missed**'} ({text})"


_ROWS = (
    ("hash", "sha256 of the 48 MB file (`pipeline.file_sha256`)"),
    ("decode", "decode in process (`loaders.load`, LibRaw AHD, bin 2)"),
    ("decoder", "decode through the isolated `Decoder` (spawned child + shared memory)"),
    ("decoder_first", "first `Decoder.decode` after start (child imports)"),
    ("detect", "detect (`StarFinder` on the 3000x2000 luminance)"),
    ("align", "align (`align.align` against frame 0's stars)"),
    ("warp", "warp (`warp.warp`, full frame + footprint, not used by the pipeline)"),
    ("add_warped", "warp + store (`FrameStore.add_warped`, streamed, 144 MB written)"),
    ("accumulate_warmup", "accumulate, warm-up frames 1-5 (`LiveStack.catch_up`)"),
    ("accumulate", "accumulate, steady state (`LiveStack.catch_up`, frames 6+)"),
    ("read_back", "of which: read one stored frame back (`FrameStore.read_band`, all rows)"),
    ("result", "live stack image (`LiveStack.result`)"),
    ("preview", "preview 1600 px (`write_preview` of that image)"),
    ("result+preview", "preview from the full-size stack (`result` + `write_preview`)"),
    ("checkpoint", "checkpoint the live stack (`checkpoint.save_live`, 720 MB, atomic)"),
    ("preview_image", "preview from `LiveStack.preview_image(1600)` + `write_preview`"),
    ("batch_detect", "batch script detection: photutils `DAOStarFinder` + stats, full res"),
)


def report(data: dict[str, Any]) -> str:
    t = data["t"]
    decode = median(t["decode"])
    rows: list[tuple[Any, ...]] = []
    for key, label in _ROWS:
        values = t[key]
        if not values:
            why = "not available in this version" if key == "preview_image" else "skipped (--quick)"
            rows.append((label, why, "", "", ""))
            continue
        s = median(values)
        rows.append(
            (label, fmt_s(s), f"{s / decode:.3f}x", len(values), _verdict(key, s, s / decode))
        )
    per_frame = sum(
        median(t[k]) for k in ("hash", "decode", "detect", "align", "add_warped", "accumulate")
    )
    stars = int(median(t["stars"]))
    body = [
        f"{data['frames']} frames of the simulated night (6000x4000 DNG, 14-bit RGGB, "
        f"~{stars} stars found per frame), each stage timed once per frame plus repeats; "
        "the ratio is the stage's median over the median in-process decode of the same "
        "night's files in this run (all files are the same size and content type).",
        "",
        table(("stage", "median", "x decode", "runs", "goal"), rows),
        "",
        f"Sum of one steady-state frame's stages (hash + decode + detect + align + warp/store + "
        f"accumulate), run one after another: {fmt_s(per_frame)} = {per_frame / decode:.2f}x "
        "decode. The daemon overlaps hash/decode/detect of frame N+1 with the rest of frame N.",
    ]
    if t.get("batch_detect"):
        b = median(t["batch_detect"])
        d = median(t["detect"])
        body += [
            "",
            f"The batch script's detection found {data['batch_found']} sources on the full frame "
            f"in {fmt_s(b)} ({b / decode:.2f}x decode); `StarFinder` is {b / d:.0f}x faster.",
        ]
    return "\n".join(body)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for the summary."""
    t = data["t"]
    decode = median(t["decode"])
    detect, preview = median(t["detect"]), median(t["result+preview"])
    acc = median(t["accumulate"])
    return [
        ("detection well under 1 s (24 MP)", f"{fmt_s(detect)}", detect < 1.0),
        ("preview <= 0.5 s at 1600 px", f"{fmt_s(preview)} (result + write)", preview <= 0.5),
        ("accumulate <= 0.15x decode", f"{acc / decode:.2f}x ({fmt_s(acc)})", acc <= 0.15 * decode),
    ]
