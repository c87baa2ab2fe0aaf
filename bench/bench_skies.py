"""Real skies: the per-frame cost of background normalization and transparency, 24 MP.

Frames 1..K of the benchmark night (6000 x 4000 DNG) are decoded in process, detected and
aligned against frame 0 (the reference) as ``Stacker`` does; then, each timed on the same
frame: the transparency (matched-star flux ratio), the normalization estimate for each mode
(``normalize.estimate``), and the streamed warp into the frame store with and without applying
a normalization (``FrameStore.add_warped``). Every figure is a ratio to the median in-process
decode of the same files in this run.
"""

from __future__ import annotations

import shutil
from typing import Any

from _common import OUT, ensure_night, fmt_s, log, median, table, timed

MODES = ("add", "addscale", "gradient")


def measure(quick: bool) -> dict[str, Any]:
    from nightstack.io.loaders import load
    from nightstack.registration.align import align
    from nightstack.registration.detect import StarFinder
    from nightstack.registration.normalize import SkySamples, estimate
    from nightstack.registration.quality import transparency
    from nightstack.stacking.store import FrameStore

    frames = 3 if quick else 5
    paths = ensure_night(frames)
    work = OUT / "skies_bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    finder = StarFinder()
    t: dict[str, list[float]] = {
        k: [] for k in ("decode", "samples", "transparency", *MODES, "store", "store+add",
                        "store+gradient")
    }  # fmt: skip
    reference = load(paths[0])
    ref_stars = finder(reference.luminance, reference.bin)
    rows = reference.shape[0]

    def sky(x: Any, y: Any) -> Any:
        return finder.in_sky(x, y, rows)

    with timed(t["samples"]):
        samples = SkySamples.of(reference.image, sky)
    store = FrameStore(work / "frames", reference.shape, 3)
    for path in paths[1:]:
        log(f"skies: {path.name}")
        with timed(t["decode"]):
            frame = load(path)
        stars = finder(frame.luminance, frame.bin)
        alignment = align(stars, ref_stars)
        with timed(t["transparency"]):
            clarity = transparency(stars, ref_stars, alignment)
        norms = {}
        for mode in MODES:
            with timed(t[mode]):
                norms[mode] = estimate(mode, frame.image, alignment.matrix, samples, sky, clarity)
        for key, norm in (("store", None), ("store+add", norms["add"]),
                          ("store+gradient", norms["gradient"])):  # fmt: skip
            with timed(t[key]):
                store.add_warped(frame.image, alignment.matrix, normalization=norm)
            store.truncate(0)
        del frame
    shutil.rmtree(work, ignore_errors=True)
    return {"frames": frames - 1, "t": t, "stars": len(ref_stars), "detected": ref_stars.detected}


_ROWS = (
    ("decode", "decode in process (`loaders.load`, LibRaw AHD)"),
    ("samples", "reference sky samples, once per session (`SkySamples.of`)"),
    ("transparency", "transparency (`quality.transparency`, matched stars)"),
    ("add", "normalization estimate, `add`"),
    ("addscale", "normalization estimate, `addscale`"),
    ("gradient", "normalization estimate, `gradient`"),
    ("store", "warp + store, no normalization (`FrameStore.add_warped`)"),
    ("store+add", "warp + store + apply `add`"),
    ("store+gradient", "warp + store + apply `gradient`"),
)


def report(data: dict[str, Any]) -> str:
    t = data["t"]
    decode = median(t["decode"])
    rows = []
    for key, label in _ROWS:
        s = median(t[key])
        rows.append((label, fmt_s(s), f"{s / decode:.3f}x", len(t[key])))
    add = median(t["add"]) + median(t["transparency"])
    apply_add = median(t["store+add"]) - median(t["store"])
    apply_grad = median(t["store+gradient"]) - median(t["store"])
    return "\n".join(
        [
            f"{data['frames']} frames of the simulated 24 MP night (6000x4000 DNG), aligned to "
            f"frame 0 ({data['detected']} stars detected, {data['stars']} kept for alignment); "
            "each figure is the median over the frames, the ratio is to the median in-process "
            "decode of the same files in this run.",
            "",
            table(("stage", "median", "x decode", "runs"), rows),
            "",
            f"Estimate (`add` + transparency): {fmt_s(add)} = {add / decode:.3f}x decode "
            "(goal <= 0.05x). Applying it while the frame is warped into the store adds "
            f"{fmt_s(apply_add)} (`add`, {apply_add / decode:.3f}x) or {fmt_s(apply_grad)} "
            f"(`gradient`, {apply_grad / decode:.3f}x).",
        ]
    )


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    t = data["t"]
    decode = median(t["decode"])
    worst = max(median(t[m]) for m in MODES) + median(t["transparency"])
    return [
        (
            "normalization estimate <= 0.05x decode (24 MP)",
            f"{worst / decode:.3f}x ({fmt_s(worst)}, slowest mode + transparency)",
            worst <= 0.05 * decode,
        )
    ]
