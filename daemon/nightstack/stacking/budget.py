"""The disk budget of a session: what the close needs is kept free; the frame store gets the rest.

A session's frame store grows by one entry a frame; at close the final outputs are written
beside it. :func:`close_reserve` is what the close needs at most; :class:`DiskBudget` says,
before each frame is stored, whether storing it would touch that reserve (the session then goes
live-only and still writes a final) and warns while fewer than ``min_free_frames`` frames fit.

And the memory budget of a live drizzle (:func:`live_drizzle_refusal`): its state is 6.67 bytes
a sample of its output grid, as the live stack's, but 4x the pixels at ``2x``; when that does
not fit in the memory the machine has available, the session's live stack demosaics instead (the
final still drizzles).
"""

from __future__ import annotations

import logging
from pathlib import Path

from nightstack.io.frameio import free_bytes

log = logging.getLogger("nightstack.service.session")

JOURNAL_LINE_BYTES = 2048  # a journal line, generously
RESERVE_MARGIN = 4 * 2**20  # preview, session.json, journal lines, file system slack


def checkpoint_bytes(pixels: int, channels: int, warmup: int) -> int:
    """The largest checkpoint generation of a stack of ``pixels`` x ``channels`` (bytes): mean
    (float32) and spread (uint16) per sample, count (uint16) per pixel, and up to ``warmup`` - 1
    warm-up frames (float32 per sample, a bool footprint per pixel) when it is live-only."""
    state = pixels * (channels * (4 + 2) + 2)
    return state + (warmup - 1) * pixels * (channels * 4 + 1)


def drizzle_checkpoint_bytes(pixels: int, scale: int, warmup: int) -> int:
    """The largest checkpoint generation of a live drizzle over a reference of ``pixels``
    (bytes): :data:`DRIZZLE_STATE_BYTES` per pixel of its output grid (``scale``^2 x
    ``pixels``) and up to ``warmup`` - 1 warm-up mosaics (2 bytes a sensor pixel) when it is
    live-only."""
    return pixels * scale * scale * DRIZZLE_STATE_BYTES + (warmup - 1) * pixels * 2


def close_reserve(
    shape: tuple[int, int] | None, channels: int, warmup: int, *, drizzle: int = 0
) -> int:
    """Disk kept for what the close of a stack of ``shape`` needs (bytes): the FITS (4 bytes per
    sample), the TIFF (2) and live.fits (4, its swap), one more checkpoint generation at its
    largest (a live-only checkpoint written during warm-up holds up to ``warmup`` - 1 float32
    frames beside the live state; once warmed up, ``warmup`` is 1), and a margin. Without a
    reference yet (``shape`` None), the margin. ``drizzle``: the output scale of a drizzled
    session (1 or 2: outputs ``drizzle``^2 times the samples, a live drizzle's checkpoint), 0
    for none."""
    if shape is None:
        return RESERVE_MARGIN
    pixels = shape[0] * shape[1]
    samples = pixels * channels * max(drizzle, 1) ** 2
    checkpoint = (
        drizzle_checkpoint_bytes(pixels, drizzle, warmup)
        if drizzle
        else checkpoint_bytes(pixels, channels, warmup)
    )
    return samples * (4 + 2 + 4) + checkpoint + RESERVE_MARGIN


DRIZZLE_STATE_BYTES = 3 * (4 + 2) + 2
"""A live drizzle's state per pixel of its output grid (float32 mean and 16-bit weight code
per channel, a 16-bit pooled variance code: :mod:`nightstack.stacking.live_drizzle`)."""

DRIZZLE_HEADROOM = 512 * 2**20
"""Memory the daemon needs beside its live state (a 24 MP night: ~470 MB, measured as the
daemon's PSS while stacking less the live state), kept when a live drizzle's fit is judged."""


def memory_available() -> int | None:
    """The memory the kernel says can be had without swapping (``MemAvailable``), bytes; None
    where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def live_drizzle_refusal(
    shape: tuple[int, int], scale: int, available: int | None = None
) -> str | None:
    """Why a live drizzle of ``scale`` over a reference of ``shape`` does not fit (one line),
    or None: its state (:data:`DRIZZLE_STATE_BYTES` a pixel of the output grid, ``scale``^2
    times the reference's pixels) and :data:`DRIZZLE_HEADROOM` must fit in the memory
    ``available`` (:func:`memory_available` when not given; unknown: it fits)."""
    state = shape[0] * shape[1] * scale * scale * DRIZZLE_STATE_BYTES
    if available is None:
        available = memory_available()
    if available is None or state + DRIZZLE_HEADROOM <= available:
        return None
    return (
        f"a live drizzle {scale}x of {shape[1]}x{shape[0]} needs {state / 2**20:.0f} MB of "
        f"state, more than the {max(available - DRIZZLE_HEADROOM, 0) / 2**20:.0f} MB the "
        "machine has available beside the daemon"
    )


class DiskBudget:
    """Free space of one session folder against the close's reserve."""

    def __init__(self, directory: Path, min_free_frames: int) -> None:
        self.directory = directory
        self.min_free_frames = min_free_frames
        self.warning: str | None = None
        """A warning while the disk holds fewer than ``min_free_frames`` frames, else None."""

    def check(self, frame_bytes: int, reserve: int) -> str | None:
        """Before a frame of ``frame_bytes`` is stored: a reason not to (the ``reserve`` would
        be touched), or None. Sets or clears :attr:`warning` (logged once when it starts)."""
        free = free_bytes(self.directory)
        if free is None:
            return None
        room = (free - reserve) // max(frame_bytes + JOURNAL_LINE_BYTES, 1)
        if room < 1:
            return (
                f"disk: {free / 2**20:.0f} MB free, the final outputs' reserve is "
                f"{reserve / 2**20:.0f} MB"
            )
        warning = None
        if room < self.min_free_frames:
            warning = f"disk: room for {room} more frame(s) ({free / 2**20:.0f} MB free)"
            if self.warning is None:
                log.warning("session %s: %s", self.directory.name, warning)
        self.warning = warning
        return None
