"""Issue 24: what the page's new views cost the frame path at 24 MP.

- **Linear preview** (``preview_linear.fits``, behind the stretch controls, written with every
  preview): a 24 MP benchmark frame (6000 x 4000 DNG) is decoded in process and shrunk to the
  1600 px preview image, as ``LiveStack.preview_image`` gives it; the linear preview is then
  written the way ``Session.write_preview`` writes it (:func:`linear_width`,
  :func:`write_linear_preview`), and the bytes of the file (what one preview adds to the disk's
  writes) are compared with the frame's 16-bit mosaic (48 MB). Goal: <= 0.05x.
- **Last frame** (``last.jpg``): the frame's luminance shrunk to 1600 px, stretched, JPEG,
  per accepted frame; its time as a ratio to the decode.

Run alone: ``.venv/bin/python bench/bench_page.py [--quick]`` (writes its RESULTS.md section).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from _common import OUT, ensure_night, fmt_s, log, median, standalone, table, timed

TITLE = "Web page views: linear preview writes, last frame, timelapse encode, 24 MP (issue 24)"
LINEAR_GOAL = 0.05  # x the frame's mosaic bytes, a frame
FRAMES = 4
PREVIEW_WIDTH = 1600


def measure(quick: bool) -> dict[str, Any]:
    import cv2
    import numpy as np

    from nightstack.io.loaders import load
    from nightstack.products.views import linear_width, write_last_frame, write_linear_preview

    frames = 2 if quick else FRAMES
    paths = ensure_night(frames)
    work = OUT / "page_bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t: dict[str, list[float]] = {k: [] for k in ("decode", "linear", "last")}
    written: list[int] = []
    shape: tuple[int, int, int] = (0, 0, 0)
    for i, path in enumerate(paths):
        log(f"frame {i}: {path.name}")
        with timed(t["decode"]):
            frame = load(path)
        rows, cols = frame.shape
        shape = (rows, cols, int(frame.image.shape[2]))
        height = round(rows * PREVIEW_WIDTH / cols)
        image = np.asarray(
            cv2.resize(frame.image, (PREVIEW_WIDTH, height), interpolation=cv2.INTER_AREA),
            np.float32,
        )
        width = linear_width(rows, cols, shape[2], PREVIEW_WIDTH)
        with timed(t["linear"]):
            written.append(
                write_linear_preview(work / "preview_linear.fits", image, width=width, header={})
            )
        with timed(t["last"]):
            write_last_frame(work / "last.jpg", frame.luminance, width=PREVIEW_WIDTH)
    rows, cols, channels = shape
    return {
        "times": t,
        "linear_bytes": written,
        "linear_width": linear_width(rows, cols, channels, PREVIEW_WIDTH),
        "mosaic_bytes": rows * cols * 2,
        "shape": list(shape),
        "last_jpg_bytes": (work / "last.jpg").stat().st_size,
    }


def _linear_ratio(data: dict[str, Any]) -> float:
    return float(max(data["linear_bytes"]) / data["mosaic_bytes"])


def report(data: dict[str, Any]) -> str:
    t = data["times"]
    decode = median(t["decode"])
    rows, cols, channels = data["shape"]
    ratio = _linear_ratio(data)
    body = [
        f"A {cols} x {rows} frame ({channels} channels after demosaic; its 16-bit mosaic "
        f"{data['mosaic_bytes'] / 1e6:.0f} MB), decoded in process; the preview image at "
        f"{PREVIEW_WIDTH} px.",
        "",
        table(
            ("per frame", "bytes written", "x mosaic", "median time", "x decode", "runs"),
            [
                (
                    "decode in process (`loaders.load`)",
                    "",
                    "",
                    fmt_s(decode),
                    "1",
                    len(t["decode"]),
                ),
                (
                    f"`preview_linear.fits` ({data['linear_width']} px, 16-bit)",
                    f"{max(data['linear_bytes']) / 1e6:.2f} MB",
                    f"{ratio:.4f}x",
                    fmt_s(median(t["linear"])),
                    f"{median(t['linear']) / decode:.3f}x",
                    len(t["linear"]),
                ),
                (
                    f"`last.jpg` (luminance, {PREVIEW_WIDTH} px)",
                    f"{data['last_jpg_bytes'] / 1e6:.2f} MB",
                    "",
                    fmt_s(median(t["last"])),
                    f"{median(t['last']) / decode:.3f}x",
                    len(t["last"]),
                ),
            ],
        ),
        "",
        "`preview_linear.fits` is written with every preview (by default every frame), before "
        "`preview.jpg`; `last.jpg` with every accepted frame. Goals: "
        + "; ".join(f"{g}: {'met' if ok else '**missed**'} ({m})" for g, m, ok in goals(data))
        + ".",
    ]
    return "\n".join(body)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    ratio = _linear_ratio(data)
    return [
        (
            f"stretch view's extra writes <= {LINEAR_GOAL}x the mosaic a frame (24 MP)",
            f"{ratio:.4f}x ({max(data['linear_bytes']) / 1e6:.2f} MB)",
            ratio <= LINEAR_GOAL,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames")
    parser.add_argument("--report-only", action="store_true", help="from bench/out/page.json")
    args = parser.parse_args(argv)
    return standalone(
        "page", TITLE, measure, report, quick=args.quick, report_only=args.report_only
    )


if __name__ == "__main__":
    sys.exit(main())
