"""Products of the same night besides the stack: star trails and a timelapse, built live.

- :class:`StarTrails`: the lighten (maximum) blend of the unaligned, calibrated frames in the
  camera frame, kept as uint16 (2 bytes a sample, the frame store's quantisation: the maximum
  of quantised values is the quantised maximum), so memory is one image whatever the night's
  length. Optional gap filling: between two frames the sky turned by the motion their
  alignments give; the newer frame's star pixels (``GAP_SIGMA`` above their background, the
  ground left out) are also drawn at intermediate positions at most ``GAP_STEP_PX`` apart, so
  trails are unbroken lines.
- :class:`Timelapse`: one auto-stretched frame per light, shrunk to ``width`` with area
  averaging, appended to ``timelapse.mp4`` as it comes, and finalized at close. H.264 (x264 in
  PyAV's wheels, which carry it for x86-64 and aarch64 alike) in an MP4 container with its
  index at the front (``+faststart``), 4:2:0: what every browser's ``<video>`` plays (Chromium,
  Firefox, Safari; tested in headless Chromium), as do VLC, mpv and the phones' players. The
  encoder is set for the frame path (:data:`X264_OPTIONS`): ``superfast``, ``zerolatency``
  (no lookahead and no B-frames: it holds no queue of frames, a few MB whatever the width),
  one thread, CRF 20. Each frame is also kept as a JPEG in ``timelapse/`` so a restarted
  session re-encodes the video so far and goes on.
- :class:`Products`: the ones a session asked for, fed each accepted frame and closed once.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from nightstack.arrays import FloatArray
from nightstack.io.writers import atomic_path, stretch, write_bytes, write_preview, write_tiff
from nightstack.products.landscape import SkyMask
from nightstack.stacking.store import QUANT_MAX

log = logging.getLogger("nightstack.products.extras")

PRODUCTS = ("stack", "trails", "timelapse")

_BAND_SAMPLES = 1 << 20
"""Samples blended at a time: 4 MB float32 temporaries stay in cache."""

GAP_STEP_PX = 1.5
"""Gap filling draws the sky every this many pixels of its motion between frames (about half
a typical FWHM: a continuous line)."""

GAP_MAX_STEPS = 32
"""At most this many positions per frame gap (a star moving farther leaves dotted lines)."""

GAP_SIGMA = 5.0
"""Gap filling moves the pixels this many background sigmas above their background: the
stars' cores and bright wings; the rest is background, the same at every position."""

_GAP_BLOCK = 64  # background blocks of the star-pixel threshold, luminance px
_GAP_STRIDE = 2  # their statistics from every 2nd pixel each way

CODEC = "libx264"
"""The timelapse's encoder: H.264, as PyAV's wheels ship it (see the module notes)."""

X264_OPTIONS = {"preset": "superfast", "tune": "zerolatency", "crf": "20", "threads": "1"}
"""x264's settings: cheap on the frame path, no frames held back (see the module notes)."""

_SPOOL = "timelapse"  # the timelapse's kept frames (JPEG), for a restart
TIMELAPSE = "timelapse.mp4"
_JPEG_QUALITY = 92


class StarTrails:
    """Lighten blend of frames (rows, cols, C) in the camera frame.

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) of the frames.
    channels : int
        1 or 3.
    gap_fill : bool
        Also draw each frame's sky at intermediate positions towards the previous frame's.
    """

    def __init__(self, shape: tuple[int, int], channels: int, *, gap_fill: bool = False) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = int(channels)
        self.gap_fill = gap_fill
        self.image = np.zeros((*self.shape, self.channels), dtype=np.uint16)
        self.frames = 0
        self._previous: npt.NDArray[np.float64] | None = None  # last frame's (2, 3) transform

    def add(
        self,
        image: FloatArray,
        matrix: FloatArray | None = None,
        sky: SkyMask | None = None,
        luminance: FloatArray | None = None,
        bin: int = 1,
    ) -> None:
        """Blend one frame ((rows, cols, C) float, linear, camera frame).

        For gap filling: ``matrix``, its (2, 3) frame -> reference transform; ``sky``, the sky
        mask (the ground is not moved); ``luminance``, its (rows // bin, cols // bin) binned
        luminance where its stars are found (the channel mean of ``image`` when not given)."""
        data = np.asarray(image)
        if data.shape != self.image.shape:
            raise ValueError(
                f"frame shape {data.shape} differs from the trails' {self.image.shape}"
            )
        _max_into(self.image, data)
        if self.gap_fill and matrix is not None:
            m = np.asarray(matrix, dtype=np.float64)
            if self._previous is not None:
                if luminance is None:
                    luminance, bin = data.mean(axis=2), 1
                self._fill_gap(data, m, self._previous, sky, luminance, bin)
            self._previous = m
        self.frames += 1

    def _fill_gap(
        self,
        data: FloatArray,
        matrix: npt.NDArray[np.float64],
        previous: npt.NDArray[np.float64],
        sky: SkyMask | None,
        luminance: FloatArray,
        bin: int,
    ) -> None:
        """Draw this frame's stars moved 1/n .. (n-1)/n of the way to the previous frame's.

        Only the star pixels move (the sky's background is the same at every position, and the
        ground stays put): the pixels more than ``GAP_SIGMA`` background sigmas above their
        block's background, splatted at their moved positions (nearest pixel, at most
        ``GAP_STEP_PX`` apart, so each star leaves a continuous line)."""
        step = _motion(matrix, previous)  # this frame -> previous frame, (3, 3)
        rows, cols = self.shape
        corners = np.array([[0, 0, 1], [cols - 1, 0, 1], [0, rows - 1, 1], [cols - 1, rows - 1, 1]])
        moved = float(np.hypot(*(corners @ step[:2].T - corners[:, :2]).T).max())
        steps = min(GAP_MAX_STEPS, math.ceil(moved / GAP_STEP_PX))
        if steps < 2:
            return
        ys, xs = _star_pixels(luminance, bin, None if sky is None else sky.sky)
        if ys.size == 0:
            return
        values = _quantised(np.asarray(data[ys, xs], dtype=np.float32))  # (n, C)
        channels = self.channels
        flat = self.image.reshape(-1)
        px, py = xs.astype(np.float64), ys.astype(np.float64)
        identity = np.eye(3)
        for k in range(1, steps):
            partial = identity + (k / steps) * (step - identity)  # small motion: linear path
            x = np.rint(partial[0, 0] * px + partial[0, 1] * py + partial[0, 2]).astype(np.intp)
            y = np.rint(partial[1, 0] * px + partial[1, 1] * py + partial[1, 2]).astype(np.intp)
            inside = (x >= 0) & (x < cols) & (y >= 0) & (y < rows)
            base = (y[inside] * cols + x[inside]) * channels
            for c in range(channels):
                np.maximum.at(flat, base + c, values[inside, c])

    def result(self) -> npt.NDArray[np.float32]:
        """(rows, cols, C) float32 linear trails image."""
        return self.image.astype(np.float32) * np.float32(1.0 / QUANT_MAX)

    def save(self, path: Path) -> None:
        """The state (uint16 image, frame count) for a restart, atomically."""
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.savez(fh, image=self.image, frames=np.array(self.frames))

    def load(self, path: Path) -> None:
        """Restore :meth:`save`'s state (same shape)."""
        with np.load(path) as data:
            image = data["image"]
            if image.shape != self.image.shape or image.dtype != np.uint16:
                raise ValueError(f"trails state {path} is {image.dtype} {image.shape}")
            self.image = image
            self.frames = int(data["frames"])

    def write(self, directory: Path, *, preview_width: int, tiff_scale: str) -> dict[str, str]:
        """trails.tif (16-bit linear, the stack's scale) and trails.jpg (stretched)."""
        image = self.result()
        write_tiff(directory / "trails.tif", image, scale=tiff_scale)
        write_preview(directory / "trails.jpg", image, width=preview_width)
        return {
            "trails_tiff": str(directory / "trails.tif"),
            "trails_jpg": str(directory / "trails.jpg"),
        }


def _star_pixels(
    luminance: FloatArray, bin: int, sky: npt.NDArray[np.bool_] | None
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Full-resolution (rows, cols) of the pixels whose binned ``luminance`` ((rows // bin,
    cols // bin) float) is more than ``GAP_SIGMA`` sigmas above the background of its block
    (median and MAD of every ``_GAP_STRIDE``-th pixel of ``_GAP_BLOCK`` luminance pixels
    square), inside ``sky`` ((rows, cols) bool) when given."""
    lum = np.asarray(luminance, dtype=np.float32)
    b, stride = _GAP_BLOCK, _GAP_STRIDE
    per = b // stride
    sample = lum[::stride, ::stride]
    nbr, nbc = max(1, sample.shape[0] // per), max(1, sample.shape[1] // per)
    blocks = sample[: nbr * per, : nbc * per].reshape(nbr, per, nbc, per)
    level = np.median(blocks, axis=(1, 3))
    spread = 1.4826 * np.median(np.abs(blocks - level[:, None, :, None]), axis=(1, 3))
    threshold = (level + GAP_SIGMA * np.maximum(spread, 1e-6)).astype(np.float32)
    full = cv2.resize(threshold, (lum.shape[1], lum.shape[0]), interpolation=cv2.INTER_NEAREST)
    bright = lum > np.asarray(full, dtype=np.float32).reshape(lum.shape)
    v, u = np.nonzero(bright)
    ys = (bin * v[:, None] + np.arange(bin)[None, :]).repeat(bin, axis=1).reshape(-1)
    xs = np.tile(bin * u[:, None] + np.arange(bin)[None, :], (1, bin)).reshape(-1)
    if sky is not None:
        keep = sky[ys, xs]
        ys, xs = ys[keep], xs[keep]
    return ys.astype(np.intp), xs.astype(np.intp)


def _quantised(values: FloatArray) -> npt.NDArray[np.uint16]:
    scale = np.float32(QUANT_MAX)
    part = np.multiply(values, scale, dtype=np.float32)
    np.clip(part, 0.0, scale, out=part)
    np.rint(part, out=part)
    return part.astype(np.uint16)


def _max_into(trails: npt.NDArray[np.uint16], data: FloatArray) -> None:
    """``trails = max(trails, quantise(data))`` band by band."""
    rows = trails.shape[0]
    band = max(1, _BAND_SAMPLES // (trails.shape[1] * trails.shape[2]))
    for r0 in range(0, rows, band):
        part = _quantised(data[r0 : r0 + band])
        np.maximum(trails[r0 : r0 + band], part, out=trails[r0 : r0 + band])


def _motion(
    matrix: npt.NDArray[np.float64], previous: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """(3, 3) map of this frame's pixels to where the same sky was in the previous frame."""
    current = np.vstack([matrix, [0.0, 0.0, 1.0]])
    before = np.vstack([previous, [0.0, 0.0, 1.0]])
    return np.asarray(np.linalg.inv(before) @ current)


class Timelapse:
    """One stretched frame per light into ``directory / timelapse.mp4``.

    Parameters
    ----------
    directory : Path
        The session directory.
    shape : (int, int)
        (rows, cols) of the frames.
    width : int
        Video width in pixels (never more than the frames'; rounded to even, as encoders want).
    fps : float
        Frames per second of the video.
    """

    def __init__(self, directory: Path, shape: tuple[int, int], *, width: int, fps: float) -> None:
        rows, cols = int(shape[0]), int(shape[1])
        w = min(int(width), cols)
        w -= w % 2
        h = max(2, round(rows * w / cols))
        h -= h % 2
        self.size = (w, h)
        self.fps = float(fps)
        self.directory = directory
        self.spool = directory / _SPOOL
        self.spool.mkdir(exist_ok=True)
        for stale in directory.glob(f".{TIMELAPSE}.*.partial.mp4"):  # a crashed process's
            stale.unlink(missing_ok=True)
        # a name of its own: a writer a crash left behind never shares this file
        self.partial = directory / f".{TIMELAPSE}.{os.getpid()}-{time.monotonic_ns()}.partial.mp4"
        self._video: Any = None  # (PyAV container, its stream) once the first frame comes
        self.frames = 0
        kept = sorted(self.spool.glob("frame_*.jpg"))
        if kept:  # a restart: the video so far from the kept frames
            for path in kept:
                frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if frame is None or frame.shape[:2] != (h, w):
                    log.warning("timelapse frame %s unreadable: left out", path.name)
                    continue
                self._write(np.asarray(frame, dtype=np.uint8))

    def add(self, image: FloatArray) -> None:
        """Shrink, stretch and append one frame ((rows, cols, C) float, linear)."""
        data = np.ascontiguousarray(image, dtype=np.float32)
        w, h = self.size
        small = np.asarray(cv2.resize(data, (w, h), interpolation=cv2.INTER_AREA), dtype=np.float32)
        small = small.reshape(h, w, -1)
        shown = stretch(small)
        shown *= 255.0
        np.rint(shown, out=shown)
        pixels = shown.astype(np.uint8)
        bgr = (
            np.ascontiguousarray(pixels[:, :, ::-1])
            if pixels.shape[2] == 3
            else np.repeat(pixels, 3, axis=2)
        )
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if ok:
            write_bytes(self.spool / f"frame_{self.frames:06d}.jpg", encoded.tobytes())
        self._write(bgr)

    def _write(self, bgr: npt.NDArray[np.uint8]) -> None:
        import av  # PyAV: imported by the sessions that make a timelapse only

        if self._video is None:
            try:
                container = av.open(
                    str(self.partial), mode="w", format="mp4", options={"movflags": "+faststart"}
                )
                rate = Fraction(self.fps).limit_denominator(1001)
                stream = container.add_stream(CODEC, rate=rate, options=X264_OPTIONS)
                if not isinstance(stream, av.VideoStream):
                    raise ValueError(f"{CODEC} is not a video encoder")
            except (av.FFmpegError, ValueError) as err:
                raise OSError(f"cannot write H.264 video to {self.partial}: {err}") from err
            stream.width, stream.height = self.size
            stream.pix_fmt = "yuv420p"
            self._video = (container, stream)
        container, stream = self._video
        # OpenCV's BT.601 limited-range I420 (what players assume untagged): 15x faster
        # than FFmpeg's own conversion of bgr24 (swscale), a tenth of the encode
        yuv = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = self.frames
        frame.time_base = 1 / Fraction(stream.average_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        self.frames += 1

    def close(self, *, keep_frames: bool = False) -> dict[str, Any]:
        """Finalize the video (the encoder flushed, its index written) and move it into place
        as timelapse.mp4."""
        out: dict[str, Any] = {}
        if self._video is not None:
            container, stream = self._video
            for packet in stream.encode():
                container.mux(packet)
            container.close()
            self._video = None
            self.partial.replace(self.directory / TIMELAPSE)
            out = {"timelapse": str(self.directory / TIMELAPSE), "timelapse_frames": self.frames}
        if not keep_frames:
            shutil.rmtree(self.spool, ignore_errors=True)
        return out


class Products:
    """The products a session makes besides the stack, fed every accepted frame.

    Parameters
    ----------
    names : sequence of str
        From ``PRODUCTS``: "trails", "timelapse" ("stack" is the session's own).
    directory : Path
        The session directory.
    shape, channels
        Geometry of the frames.
    gap_fill : bool
        Star trails with gap filling.
    timelapse_width, timelapse_fps
        The video's size and rate.
    """

    def __init__(
        self,
        names: Sequence[str],
        directory: Path,
        shape: tuple[int, int],
        channels: int,
        *,
        gap_fill: bool = False,
        timelapse_width: int = 1920,
        timelapse_fps: float = 24.0,
    ) -> None:
        self.directory = directory
        self.trails = StarTrails(shape, channels, gap_fill=gap_fill) if "trails" in names else None
        self.timelapse = (
            Timelapse(directory, shape, width=timelapse_width, fps=timelapse_fps)
            if "timelapse" in names
            else None
        )
        state = directory / "checkpoint" / "trails.npz"
        if self.trails is not None and state.exists():
            try:
                self.trails.load(state)
            except (OSError, ValueError, KeyError) as err:
                log.warning("star trails state unreadable (%s): trails start again", err)

    def add(
        self,
        image: FloatArray,
        matrix: FloatArray,
        sky: SkyMask | None,
        luminance: FloatArray | None = None,
        bin: int = 1,
    ) -> None:
        """Feed one accepted frame: (rows, cols, C) float32 camera frame, its transform, the
        sky mask and its binned luminance (``Frame.luminance``, ``Frame.bin``)."""
        if self.trails is not None:
            self.trails.add(image, matrix, sky, luminance, bin)
        if self.timelapse is not None:
            self.timelapse.add(image)

    def checkpoint(self) -> None:
        """Save the trails with the session's checkpoint (the timelapse keeps its frames)."""
        if self.trails is not None:
            (self.directory / "checkpoint").mkdir(exist_ok=True)
            self.trails.save(self.directory / "checkpoint" / "trails.npz")

    def close(
        self, *, preview_width: int, tiff_scale: str, keep_frames: bool = False
    ) -> dict[str, Any]:
        """Write every product; returns their paths for session.json."""
        out: dict[str, Any] = {}
        if self.trails is not None and self.trails.frames:
            out.update(
                self.trails.write(
                    self.directory, preview_width=preview_width, tiff_scale=tiff_scale
                )
            )
            out["trails_frames"] = self.trails.frames
        if self.timelapse is not None:
            out.update(self.timelapse.close(keep_frames=keep_frames))
        return out
