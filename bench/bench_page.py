"""Issue 24: what the page's new views cost the frame path at 24 MP.

- **Linear preview** (``preview_linear.fits``, behind the stretch controls, written with every
  preview): a 24 MP benchmark frame (6000 x 4000 DNG) is decoded in process and shrunk to the
  1600 px preview image, as ``LiveStack.preview_image`` gives it; the linear preview is then
  written the way ``Session.write_preview`` writes it (:func:`linear_width`,
  :func:`write_linear_preview`), and the bytes of the file (what one preview adds to the disk's
  writes) are compared with the frame's 16-bit mosaic (48 MB). Goal: <= 0.05x.
- **Its render**: what the page asks for when the strength slider moves (``stretch.jpg``,
  1600 px, strength 2, linked) rendered from that file by ``web/render.StretchRenderer`` (a
  new file each preview: no cache hit), the stretched view's delay after a preview.
- **Last frame** (``last.jpg``): the frame's luminance shrunk to 1600 px, stretched, JPEG,
  per accepted frame; its time as a ratio to the decode.
- **Timelapse** (``Timelapse.add`` at the default 1920 px): the frame shrunk, stretched, kept
  as a JPEG and encoded in H.264 (PyAV's x264, ``X264_OPTIONS``); the encoder's share alone
  (``Timelapse._write``: the BGR frame into the video) and the whole call, as ratios to the
  decode. Goal: the encoding <= 0.1x the decode. Each decoded frame is encoded ``REPEAT`` more
  times, shifted and with new noise (3 DN: as hard to predict as a new frame's sky), so the
  encoder's cost is a median over many frames, not the first ones (an I-frame's). OpenCV's
  mp4v writer, the encoder before, encodes the same frames for comparison.

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
TIMELAPSE_WIDTH = 1920
ENCODE_GOAL = 0.1  # x the decode of a 24 MP frame
REPEAT = 6  # timelapse frames encoded per decoded frame


def measure(quick: bool) -> dict[str, Any]:
    import cv2
    import numpy as np

    from nightstack.io.loaders import load
    from nightstack.products.extras import Timelapse
    from nightstack.products.views import linear_width, write_last_frame, write_linear_preview
    from nightstack.web.render import StretchRenderer

    frames = 2 if quick else FRAMES
    paths = ensure_night(frames)
    work = OUT / "page_bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    names = ("decode", "linear", "render", "last", "timelapse", "encode", "mp4v")
    mp4v: cv2.VideoWriter | None = None
    t: dict[str, list[float]] = {k: [] for k in names}
    timelapse: Timelapse | None = None
    rng = np.random.default_rng(24)
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
        renderer = StretchRenderer()  # a fresh one: no cached statistics or image
        with timed(t["render"]):
            renderer.render(
                work / "preview_linear.fits", width=PREVIEW_WIDTH, strength=2.0, linked=True
            )
        with timed(t["last"]):
            write_last_frame(work / "last.jpg", frame.luminance, width=PREVIEW_WIDTH)
        if timelapse is None:
            timelapse = Timelapse(work, (rows, cols), width=TIMELAPSE_WIDTH, fps=24.0)
        with timed(t["timelapse"]):
            timelapse.add(frame.image)
        kept = cv2.imread(str(work / "timelapse" / f"frame_{timelapse.frames - 1:06d}.jpg"))
        for k in range(REPEAT):  # the encoder alone: this frame shifted, with new noise
            noise = rng.normal(0.0, 3.0, kept.shape)
            shifted = np.roll(kept, 4 * (k + 1), axis=1) + noise
            shifted = np.clip(shifted, 0, 255).astype(np.uint8)
            with timed(t["encode"]):
                timelapse._write(shifted)
            if mp4v is None:
                mp4v = cv2.VideoWriter(
                    str(work / "mp4v.mp4"), cv2.VideoWriter.fourcc(*"mp4v"), 24.0, timelapse.size
                )
            with timed(t["mp4v"]):  # the encoder before issue 24, on the same frames
                mp4v.write(shifted)
    assert timelapse is not None and mp4v is not None
    mp4v.release()
    video = timelapse.close()
    rows, cols, channels = shape
    return {
        "times": t,
        "linear_bytes": written,
        "linear_width": linear_width(rows, cols, channels, PREVIEW_WIDTH),
        "mosaic_bytes": rows * cols * 2,
        "shape": list(shape),
        "last_jpg_bytes": (work / "last.jpg").stat().st_size,
        "timelapse_size": list(timelapse.size),
        "timelapse_frames": video["timelapse_frames"],
        "timelapse_bytes": (work / "timelapse.mp4").stat().st_size,
    }


def _linear_ratio(data: dict[str, Any]) -> float:
    return float(max(data["linear_bytes"]) / data["mosaic_bytes"])


def report(data: dict[str, Any]) -> str:
    t = data["times"]
    decode = median(t["decode"])
    rows, cols, channels = data["shape"]
    ratio = _linear_ratio(data)
    tw, th = data["timelapse_size"]
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
                    "its render: `stretch.jpg` at strength 2 (`StretchRenderer.render`)",
                    "",
                    "",
                    fmt_s(median(t["render"])),
                    f"{median(t['render']) / decode:.3f}x",
                    len(t["render"]),
                ),
                (
                    f"timelapse: H.264 encode alone ({tw} x {th}, `Timelapse._write`)",
                    "",
                    "",
                    fmt_s(median(t["encode"])),
                    f"{_encode_ratio(data):.3f}x",
                    len(t["encode"]),
                ),
                (
                    "(before: OpenCV's mp4v, same frames; no browser plays it)",
                    "",
                    "",
                    fmt_s(median(t["mp4v"])),
                    f"{median(t['mp4v']) / decode:.3f}x",
                    len(t["mp4v"]),
                ),
                (
                    "timelapse: the whole `Timelapse.add` (shrink, stretch, JPEG kept, encode)",
                    "",
                    "",
                    fmt_s(median(t["timelapse"])),
                    f"{median(t['timelapse']) / decode:.3f}x",
                    len(t["timelapse"]),
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
        "`preview.jpg`; `last.jpg` with every accepted frame. The timelapse: "
        f"{data['timelapse_frames']} frames, {data['timelapse_bytes'] / 1e6:.1f} MB "
        f"({data['timelapse_bytes'] / data['timelapse_frames'] / 1e3:.0f} KB a frame; the "
        "encoded frames beyond the decoded ones are the same frame shifted, with new noise). "
        "Goals: "
        + "; ".join(f"{g}: {'met' if ok else '**missed**'} ({m})" for g, m, ok in goals(data))
        + ".",
    ]
    return "\n".join(body)


def _encode_ratio(data: dict[str, Any]) -> float:
    return float(median(data["times"]["encode"]) / median(data["times"]["decode"]))


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    ratio = _linear_ratio(data)
    encode = _encode_ratio(data)
    return [
        (
            f"timelapse H.264 encode <= {ENCODE_GOAL}x the decode of a 24 MP frame",
            f"{encode:.3f}x ({fmt_s(median(data['times']['encode']))})",
            encode <= ENCODE_GOAL,
        ),
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
