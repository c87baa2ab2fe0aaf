"""The disk budget of a session: what the close needs is kept free; the frame store gets the rest.

A session's frame store grows by one entry a frame; at close the final outputs are written
beside it. :func:`close_reserve` is what the close needs at most; :class:`DiskBudget` says,
before each frame is stored, whether storing it would touch that reserve (the session then goes
live-only and still writes a final) and warns while fewer than ``min_free_frames`` frames fit.
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


def close_reserve(shape: tuple[int, int] | None, channels: int, warmup: int) -> int:
    """Disk kept for what the close of a stack of ``shape`` needs (bytes): the FITS (4 bytes per
    sample), the TIFF (2) and live.fits (4, its swap), one more checkpoint generation at its
    largest (a live-only checkpoint written during warm-up holds up to ``warmup`` - 1 float32
    frames beside the live state; once warmed up, ``warmup`` is 1), and a margin. Without a
    reference yet (``shape`` None), the margin."""
    if shape is None:
        return RESERVE_MARGIN
    pixels = shape[0] * shape[1]
    samples = pixels * channels
    return samples * (4 + 2 + 4) + checkpoint_bytes(pixels, channels, warmup) + RESERVE_MARGIN


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
