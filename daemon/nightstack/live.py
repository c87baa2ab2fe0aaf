"""The live stack: running per-pixel statistics with k-sigma rejection, O(pixels) a frame.

A few image-sized arrays whatever the number of frames (see :class:`LiveStack`); frames come
from a :class:`~nightstack.store.FrameStore` (band by band, never a full warped copy) or, without
a store (live-only sessions), as in-memory warped frames (:meth:`LiveStack.add`). Its crash
state goes to disk through :mod:`nightstack.checkpoint`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from nightstack.store import FrameStore, Reader

FloatArray = npt.NDArray[np.floating]
BoolArray = npt.NDArray[np.bool_]

_PREVIEW_BAND_SAMPLES = 1 << 18
"""Full-size samples per band shrunk across in LiveStack.preview_image: 1 MB of the mean."""

_ADD_BAND_SAMPLES = 1 << 18
"""Samples per band in LiveStack.add: the band's state and scratch (~6 MB) stay in cache
(measured best of 2^16 .. 2^20 at 24 MP)."""

_DENSE_FRACTION = 0.05
"""Above this fraction of candidate samples in a band, its threshold is computed for every
sample (a few whole-band passes) rather than gathered per candidate (measured break-even)."""

_WARMUP_CAP_BYTES = 32 * 2**20
"""RAM for the warm-up batch (the W frames of one band and their working copies)."""

_WARMUP_BYTES_PER_SAMPLE = 10
"""Warm-up batch bytes per (frame, pixel, channel): float32 cube and deviations, two masks."""

_WARMUP_BAND_SAMPLES = 1 << 16
"""Samples per frame in one warm-up band: its working set stays in the CPU cache."""

_MIN_TEST_COUNT = 3
"""A sample is judged only against at least this many other samples of its pixel: with fewer,
the spread is too uncertain to reject anything (the sample variance of 2 values is chi2 with 1
degree of freedom)."""

_FLOOR_FRACTION = 1.0
"""Rejection floor = this fraction of the typical (median) pixel std: no pixel is quieter than
the sky, so a std below it is a chance low estimate from few frames, or a constant pixel
(saturated core, std 0) that would otherwise reject every sample differing by one ADU."""

_FLOOR_ABS = 1.0 / 4096
"""Absolute rejection floor: one ADU of a 12-bit camera, for noise-free (synthetic, saturated)
data where the typical std is 0."""

_FLOOR_SAMPLES = 250_000
"""Pixels sampled per channel to find the typical std for the floor."""

_MAX_FRAMES = np.iinfo(np.uint16).max
"""Per-sample counts are uint16 (half the memory of uint32): at most 65535 frames per stack."""


@dataclass
class LiveState:
    """A live stack's whole state: ``mean``, ``m2`` (rows, cols, C) float32, ``count``
    (rows, cols, C) uint16, ``floor`` (C,) float32, the warm-up frames still ``pending`` as
    (frame (rows, cols, C) float32, footprint (rows, cols) bool), and the two counters."""

    mean: npt.NDArray[np.float32]
    m2: npt.NDArray[np.float32]
    count: npt.NDArray[np.uint16]
    floor: npt.NDArray[np.float32]
    pending: list[tuple[npt.NDArray[np.float32], BoolArray]]
    frames: int
    rejected: int


class LiveStack:
    """Running stack with per-pixel k-sigma rejection, O(pixels) per frame, bounded memory.

    State (whatever the number of frames): per sample (pixel, channel) a float32 Welford mean,
    a float32 sum of squared deviations ``M2`` and a uint16 count of accepted samples: 10 bytes
    per sample, 720 MB for 24 MP RGB. float32 ``M2`` suffices because Welford's update never
    subtracts large sums: measured against a float64 two-pass, the variance is within 6e-5
    (relative) after 600 to 3000 frames of a 0.5 level with 1e-3 noise, the mean within 1.5e-6,
    far below their statistical errors (sqrt(2/n) and 1e-3/sqrt(n)); float64 would add 288 MB
    at 24 MP. Counts are uint16: at most 65535 frames.

    Rejection test of a sample ``x`` against ``n`` other samples of its pixel (mean ``m``, sum
    of squared deviations ``M2``): reject when

        (x - m)^2 > kappa^2 * (1 + 1/n) * max(M2 / (n - 1), floor^2)

    i.e. outside ``kappa`` standard deviations of ``x - m`` for a new sample (the sample
    variance, at least ``floor^2``, plus the uncertainty of the mean itself, which matters for
    small ``n``), and only when ``n >= 3`` (:data:`_MIN_TEST_COUNT`). ``floor`` is per channel:
    max(1/4096, the median over pixels of the sample std), fixed when the warm-up completes
    (see :data:`_FLOOR_FRACTION`). On Gaussian noise this rejects ~0.4 % of good samples
    (simulated, 5..30 frames), against 0.27 % for a 3-sigma cut with the true sigma.

    - Frames 1 .. ``warmup`` - 1 are accumulated without rejection.
    - When the ``warmup``-th frame arrives, the ``warmup`` frames are judged as a batch: each
      sample with the test above against the *other* warm-up samples of its pixel (the floor
      taken from the first ``warmup`` - 1 frames), and the statistics are rebuilt from the
      survivors. The final combine's median-centred sigma clip is not used here because it
      cannot reject anything in so few frames: a lone outlier among ``n`` samples lies at most
      ``n / sqrt(n - 1)`` population stds from the median (2.5 for n = 5, < 3 for n < 9). The
      frames are read back from ``store`` band by band (frame k of this stack must be frame k of
      the store: append each frame to the store before adding it here); without a store they
      are kept in RAM until then.
    - Afterwards each new sample is judged against its pixel's running statistics, and added
      when it passes. ``rejected`` counts every rejected sample.

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) of the reference grid.
    channels : int
        1 or 3.
    kappa : float
        Rejection threshold in standard deviations (> 0).
    warmup : int
        Frames clipped as a batch before running rejection starts (>= 1; 1 = no batch).
    store : FrameStore, optional
        Where the warm-up frames are read back from.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        channels: int,
        *,
        kappa: float = 3.0,
        warmup: int = 5,
        store: FrameStore | None = None,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = int(channels)
        if self.shape[0] < 1 or self.shape[1] < 1 or self.channels not in (1, 3):
            raise ValueError(f"bad stack geometry {self.shape} x {self.channels}")
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be > 0, not {kappa}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, not {warmup}")
        if store is not None and (store.shape != self.shape or store.channels != self.channels):
            raise ValueError("the store's geometry differs from the stack's")
        self.kappa = float(kappa)
        self.warmup = int(warmup)
        self.store = store
        full = (*self.shape, self.channels)
        self._mean = np.zeros(full, dtype=np.float32)
        self._m2 = np.zeros(full, dtype=np.float32)
        self._count = np.zeros(full, dtype=np.uint16)
        self._floor = np.zeros(self.channels, dtype=np.float32)
        self._floor_sq_row = np.zeros(self.shape[1] * self.channels, dtype=np.float32)
        self._pending: list[tuple[npt.NDArray[np.float32], BoolArray]] = []
        self.frames = 0
        """Frames added so far."""
        self.rejected = 0
        """Samples (pixel x channel x frame) rejected so far, warm-up batch included."""

    # ----------------------------------------------------------------- public

    @property
    def count(self) -> npt.NDArray[np.uint16]:
        """(rows, cols, C) uint16 accepted samples per pixel and channel (read-only view)."""
        view = self._count.view()
        view.flags.writeable = False
        return view

    @property
    def floor(self) -> npt.NDArray[np.float32]:
        """(C,) float32 per-channel std floor used for rejection (0 before warm-up)."""
        return self._floor.copy()

    @property
    def warmed_up(self) -> bool:
        """True once running rejection is active."""
        return self.frames >= self.warmup

    def add(self, warped: FloatArray, footprint: BoolArray) -> int:
        """Add one aligned frame; return the number of its samples rejected.

        Parameters
        ----------
        warped : ndarray
            (rows, cols, C) float32 on the reference grid, finite inside the footprint.
        footprint : ndarray
            (rows, cols) bool, True where the frame covers the pixel.

        Returns
        -------
        int
            Samples of this frame rejected (at the warm-up frame: all rejected by the batch clip).
        """
        data = np.asarray(warped)
        fp = np.asarray(footprint, dtype=bool)
        if data.shape != (*self.shape, self.channels):
            raise ValueError(f"frame shape {data.shape} does not match the stack's")
        if fp.shape != self.shape:
            raise ValueError(f"footprint shape {fp.shape} does not match the stack's {self.shape}")
        if self.store is not None and len(self.store) < self.frames + 1:
            raise ValueError(
                f"the store holds {len(self.store)} frames but this would be frame "
                f"{self.frames + 1}: append each frame to the store before adding it"
            )
        if self.store is None and not self.warmed_up:
            self._pending.append((data.astype(np.float32, copy=True), fp.copy()))
        return self._add(_ArraySource(data, fp))

    def catch_up(self) -> int:
        """Add the store's frames this stack has not seen yet (after resuming from a checkpoint).

        Returns the number of frames added.
        """
        if self.store is None:
            raise ValueError("catch_up needs a store")
        store = self.store
        added = 0
        while self.frames < len(store):
            with _StoreSource(store, self.frames) as source:
                self._add(source)
            added += 1
        return added

    def result(self) -> npt.NDArray[np.float32]:
        """(rows, cols, C) float32 current stack; NaN where no sample was accepted."""
        out = self._mean.copy()
        band = self._band_rows()
        for r0 in range(0, self.shape[0], band):
            np.copyto(out[r0 : r0 + band], np.nan, where=self._count[r0 : r0 + band] == 0)
        return out

    def detach_store(self) -> None:
        """Go on without the store (live-only: the disk cannot hold more frames): frames come
        through :meth:`add` from now on. Warm-up frames the batch clip still needs are read back
        into memory first (at most ``warmup`` - 1 frames)."""
        store = self.store
        if store is None:
            return
        if not self.warmed_up:
            rows = self.shape[0]
            for i in range(self.frames):
                data, fp = store.read_band(i, 0, rows), store.footprint_band(i, 0, rows)
                self._pending.append((data, fp))
        self.store = None

    def result_band(self, row_start: int, row_stop: int) -> npt.NDArray[np.float32]:
        """Rows ``row_start:row_stop`` of :meth:`result` (a copy; for streaming writers)."""
        out = self._mean[row_start:row_stop].copy()
        np.copyto(out, np.nan, where=self._count[row_start:row_stop] == 0)
        return out

    def preview_image(self, width: int) -> npt.NDArray[np.float32]:
        """The current stack shrunk to ``width`` columns by OpenCV's ``INTER_AREA``.

        Area averaging is separable: rows are shrunk across band by band (a few MB at a time)
        into a (rows, width, C) image, then that is shrunk down, both by ``cv2.resize`` with
        ``INTER_AREA``, to ``height = max(1, round(rows * width / cols))`` rows. The full-size
        :meth:`result` (288 MB at 24 MP RGB) is never formed; the intermediate is width / cols
        of it (77 MB at 24 MP for 1600 px). NaN wherever an averaged pixel had no accepted
        sample, as OpenCV propagates it. Never enlarges: for ``width >= cols`` this is
        :meth:`result`.

        Returns
        -------
        ndarray
            (height, width, C) float32, linear.
        """
        if width < 1:
            raise ValueError(f"preview width must be >= 1, not {width}")
        rows, cols = self.shape
        channels = self.channels
        if width >= cols:
            return self.result()
        height = max(1, round(rows * width / cols))
        across = np.empty((rows, width, channels), dtype=np.float32)
        band = max(1, _PREVIEW_BAND_SAMPLES // (cols * channels))
        for r0 in range(0, rows, band):
            r1 = min(r0 + band, rows)
            mean = self.result_band(r0, r1)
            shrunk = cv2.resize(mean, (width, r1 - r0), interpolation=cv2.INTER_AREA)
            across[r0:r1] = np.asarray(shrunk, np.float32).reshape(r1 - r0, width, channels)
        down = cv2.resize(across, (width, height), interpolation=cv2.INTER_AREA)
        return np.asarray(down, np.float32).reshape(height, width, channels)

    def save(self, directory: str | Path) -> None:
        """Checkpoint the exact state into ``directory``: :func:`nightstack.checkpoint.save`."""
        from nightstack.checkpoint import save  # the checkpoint module builds on this one

        save(self, directory)

    @classmethod
    def load(cls, directory: str | Path, store: FrameStore | None = None) -> LiveStack:
        """Restore a stack saved by :meth:`save`, bit for bit: ``checkpoint.load``."""
        from nightstack.checkpoint import load

        return load(directory, store)

    def state(self) -> LiveState:
        """The stack's state (views of its arrays, not copies), for a checkpoint."""
        return LiveState(
            self._mean,
            self._m2,
            self._count,
            self._floor.copy(),
            list(self._pending),
            self.frames,
            self.rejected,
        )

    def restore(self, state: LiveState) -> None:
        """Take over ``state`` (its arrays, not copies), shapes and dtypes checked."""
        full = (*self.shape, self.channels)
        for name, array, dtype in (
            ("mean", state.mean, np.float32),
            ("m2", state.m2, np.float32),
            ("count", state.count, np.uint16),
        ):
            if array.dtype != dtype or array.shape != full:
                raise ValueError(f"live state {name} is {array.dtype} {array.shape}, not {full}")
        for frame, fp in state.pending:
            if frame.shape != full or fp.shape != self.shape:
                raise ValueError(f"live state warm-up frame {frame.shape} does not fit {full}")
        self._mean, self._m2, self._count = state.mean, state.m2, state.count
        self._set_floor(np.asarray(state.floor, dtype=np.float32))
        self._pending = list(state.pending)
        self.frames, self.rejected = int(state.frames), int(state.rejected)

    # ----------------------------------------------------------------- internals

    def _band_rows(self) -> int:
        return max(1, _ADD_BAND_SAMPLES // (self.shape[1] * self.channels))

    def _add(self, source: Callable[[int, int, _Scratch], tuple[FloatArray, _Cover]]) -> int:
        """Add the next frame, delivered band by band by ``source(row_start, row_stop, scratch)``.

        The source returns the band's (band_rows, cols * C) float32 samples and its coverage.
        """
        if self.frames >= _MAX_FRAMES:
            raise ValueError(f"a live stack holds at most {_MAX_FRAMES} frames")
        number = self.frames + 1
        if number == self.warmup:
            self.frames = number
            rejected = self._rebuild_from_warmup()
        else:
            testing = self.warmed_up
            rows = self._band_rows()
            scratch = _Scratch(rows, self.shape[1] * self.channels)
            if testing:
                scratch.sure = self._sure_row(self.frames)
            rejected = 0
            for r0 in range(0, self.shape[0], rows):
                r1 = min(r0 + rows, self.shape[0])
                x, cover = source(r0, r1, scratch)
                rejected += self._update_band(r0, r1, x, cover, testing, scratch)
            self.frames = number
        self.rejected += rejected
        return rejected

    def _update_band(
        self,
        r0: int,
        r1: int,
        x: npt.NDArray[np.float32],
        cover: _Cover,
        testing: bool,
        scratch: _Scratch,
    ) -> int:
        """Welford update of rows r0:r1 with rejection; all work in the band's scratch buffers.

        ``x`` is the band's (band_rows, cols * C) float32 samples, finite everywhere. Every
        sample goes through the same few whole-band operations (no masked ufunc: those are
        several times slower); absent and rejected samples get a zero deviation, so their mean
        and ``M2`` change by +-0, i.e. not at all, and their count is taken back. The divisor
        is ``n + 1`` everywhere (>= 1, no 0/0), which is the new count wherever the sample is
        accepted: bit for bit the same as updating the accepted samples alone.
        """
        rows = r1 - r0
        width = self.shape[1] * self.channels
        mean = self._mean[r0:r1].reshape(rows, width)
        m2 = self._m2[r0:r1].reshape(rows, width)
        count = self._count[r0:r1].reshape(rows, width)
        delta, t = scratch.delta[:rows], scratch.t[:rows]
        np.subtract(x, mean, out=delta)
        cover.zero_outside(delta)
        rejects = _NO_INDEX
        if testing:
            np.square(delta, out=t)
            rejects = self._judge(t, count, m2, scratch)
        np.add(count, 1, out=count)
        np.copyto(t, count)  # n + 1: the new count of every accepted sample, >= 1 everywhere
        cover.uncount(count)
        if rejects.size:
            count.reshape(-1)[rejects] -= 1
            delta.reshape(-1)[rejects] = 0.0
        np.divide(delta, t, out=t)
        np.add(mean, t, out=mean)
        np.subtract(x, mean, out=t)  # x - new mean
        t *= delta  # +-0 where delta is 0: x is finite everywhere
        np.add(m2, t, out=m2)
        return int(rejects.size)

    def _sure_row(self, frames: int) -> npt.NDArray[np.float32]:
        """(cols * C,) float32 bound at or below which no sample's (x - mean)^2 is rejected.

        The threshold ``kappa^2 (1 + 1/n) max(M2 / (n - 1), floor^2)``, computed in float32 as
        ``((1/n + 1) * max(...)) * kappa^2``, is never below ``((1/N + 1) * floor^2) * kappa^2``
        for ``n <= N`` (every operand is positive and float rounding is monotonic), and no count
        exceeds ``N`` = the frames added so far.
        """
        inverse = np.reciprocal(np.float32(max(frames, 1)))
        factor = np.float32(inverse + np.float32(1))
        sure = np.multiply(self._floor_sq_row, factor)
        sure *= np.float32(self.kappa**2)
        return sure

    def _judge(
        self,
        d2: npt.NDArray[np.float32],
        count: npt.NDArray[np.uint16],
        m2: npt.NDArray[np.float32],
        scratch: _Scratch,
    ) -> npt.NDArray[np.intp]:
        """Flat indices of the band's samples the rejection test rejects (ascending).

        ``d2`` is (x - mean)^2, 0 for absent samples. Only the samples above
        :meth:`_sure_row` can be rejected; the exact threshold is computed for them alone (for
        the whole band when they are many), with the same float32 operations in the same order
        as for every sample, so the decisions are those of the documented test, bit for bit.
        """
        flag = scratch.flag[: d2.shape[0]]
        np.greater(d2, scratch.sure, out=flag)
        candidates = np.flatnonzero(flag)
        if candidates.size == 0:
            return _NO_INDEX
        kappa_sq = np.float32(self.kappa**2)
        if candidates.size > _DENSE_FRACTION * d2.size:
            u, v = scratch.u[: d2.shape[0]], scratch.v[: d2.shape[0]]
            np.copyto(u, count)
            np.maximum(u, 2, out=u)  # pixels with fewer than 3 others are not judged
            np.subtract(u, 1, out=v)
            np.divide(m2, v, out=v)
            np.maximum(v, self._floor_sq_row, out=v)
            np.reciprocal(u, out=u)
            u += 1
            u *= v
            u *= kappa_sq
            np.greater(d2, u, out=flag)
            judged = scratch.judged[: d2.shape[0]]
            np.greater_equal(count, _MIN_TEST_COUNT, out=judged)
            flag &= judged
            return np.flatnonzero(flag)
        n_old = count.reshape(-1)[candidates]
        n = np.maximum(n_old, 2).astype(np.float32)
        var = m2.reshape(-1)[candidates] / (n - 1)
        np.maximum(var, self._floor_sq_row[candidates % d2.shape[1]], out=var)
        threshold = np.reciprocal(n)
        threshold += 1
        threshold *= var
        threshold *= kappa_sq
        outside = d2.reshape(-1)[candidates] > threshold
        outside &= n_old >= _MIN_TEST_COUNT
        rejects: npt.NDArray[np.intp] = candidates[outside]
        return rejects

    def _rebuild_from_warmup(self) -> int:
        """Judge the warm-up frames as a batch, rebuild mean, M2 and count from the survivors."""
        n = self.warmup
        rows, cols = self.shape
        channels = self.channels
        width = cols * channels
        # the floor comes from the first warmup - 1 frames, accumulated plainly
        floor_sq_row = np.tile(np.square(self._typical_std_floor()), cols)
        per_plane = min(_WARMUP_BAND_SAMPLES, _WARMUP_CAP_BYTES // (n * _WARMUP_BYTES_PER_SAMPLE))
        band = max(1, per_plane // width)
        work = _BatchScratch(n, band, width)
        spans = None
        readers: list[Reader] = []
        if self.store is not None:
            spans = [self.store.footprint_spans(i, 0, rows) for i in range(n)]
            readers = [self.store.reader(i) for i in range(n)]
        rejected = 0
        for r0 in range(0, rows, band):
            r1 = min(r0 + band, rows)
            cube, valid = work.cube[:, : r1 - r0], work.valid[:, : r1 - r0]
            for i in range(n):
                if spans is not None:
                    first, stop = spans[i][0][r0:r1], spans[i][1][r0:r1]
                    if np.any(stop > first):
                        readers[i].read(r0, r1, cube[i].reshape(-1, cols, channels))
                    cover = _SpanCover(first, stop, cols, channels)
                    valid[i].fill(True)
                    cover.zero_outside(valid[i])
                    cover.zero_outside(cube[i])  # absent samples are exactly 0 in every sum
                    continue
                frame, frame_fp = self._pending[i]
                np.copyto(cube[i].reshape(-1, cols, channels), frame[r0:r1])
                plane = valid[i].reshape(-1, cols, channels)
                for c in range(channels):  # broadcasting along the 3-long channel axis is slow
                    plane[:, :, c] = frame_fp[r0:r1]
                cube[i] *= valid[i]  # absent samples are exactly 0 in every sum below
            rejected += _batch_clip(
                cube,
                valid,
                self.kappa,
                floor_sq_row,
                work,
                self._mean[r0:r1].reshape(r1 - r0, width),
                self._m2[r0:r1].reshape(r1 - r0, width),
                self._count[r0:r1].reshape(r1 - r0, width),
            )
        for reader in readers:
            reader.__exit__()
        self._pending.clear()
        self._set_floor(self._typical_std_floor())
        return rejected

    def _set_floor(self, floor: npt.NDArray[np.float32]) -> None:
        self._floor = floor.astype(np.float32)
        self._floor_sq_row = np.tile(np.square(self._floor), self.shape[1])

    def _typical_std_floor(self) -> npt.NDArray[np.float32]:
        """Per channel max(_FLOOR_ABS, _FLOOR_FRACTION x median sample std), pixels with n >= 2."""
        rows, cols = self.shape
        step = max(1, int(math.sqrt(rows * cols / _FLOOR_SAMPLES)))
        count = self._count[::step, ::step].reshape(-1, self.channels)
        m2 = self._m2[::step, ::step].reshape(-1, self.channels)
        floor = np.full(self.channels, _FLOOR_ABS, dtype=np.float32)
        for c in range(self.channels):
            ok = count[:, c] >= 2
            if ok.any():
                std = np.sqrt(m2[ok, c].astype(np.float64) / (count[ok, c] - 1.0))
                floor[c] = max(_FLOOR_ABS, _FLOOR_FRACTION * float(np.median(std)))
        return floor


class _BatchScratch:
    """Buffers for :func:`_batch_clip` on bands of up to ``rows`` rows of ``n`` frames."""

    def __init__(self, n: int, rows: int, width: int) -> None:
        self.cube = np.empty((n, rows, width), dtype=np.float32)
        self.d2 = np.empty((n, rows, width), dtype=np.float32)
        self.valid = np.empty((n, rows, width), dtype=bool)
        self.keep = np.empty((n, rows, width), dtype=bool)
        plane = (rows, width)
        self.flag = np.empty(plane, dtype=bool)
        self.tally = np.empty(plane, dtype=np.uint16)
        self.count, self.mean, self.q = (np.empty(plane, dtype=np.float32) for _ in range(3))
        self.others, self.others_m1 = (np.empty(plane, dtype=np.float32) for _ in range(2))
        self.ratio, self.ratio_sq = (np.empty(plane, dtype=np.float32) for _ in range(2))
        self.factor, self.sure, self.t = (np.empty(plane, dtype=np.float32) for _ in range(3))


def _batch_clip(
    cube: npt.NDArray[np.float32],
    valid: BoolArray,
    kappa: float,
    floor_sq: npt.NDArray[np.float32],
    work: _BatchScratch,
    mean_out: npt.NDArray[np.float32],
    m2_out: npt.NDArray[np.float32],
    count_out: npt.NDArray[np.uint16],
) -> int:
    """The warm-up batch clip of one band; writes the survivors' statistics, returns rejections.

    Each sample is judged with the live rejection test against the other samples of its pixel.
    With ``d`` a sample's deviation from the mean of all ``c`` samples of its pixel, ``Q`` the
    sum of squared deviations and ``k = c - 1`` the others: the others' mean is ``-d / k`` (the
    deviations sum to 0), so ``x - mean_others = d c / k`` and the others' ``M2 = Q - d^2 c / k``.
    A sample is rejected when ``k >= 3`` (:data:`_MIN_TEST_COUNT`) and
    ``(d c / k)^2 > kappa^2 (1 + 1/k) max(M2 / (k - 1), floor^2)``, the running test. Then the
    mean, sum of squared deviations and count of the survivors (0, 0, 0 if none).

    In float32, in this order: ``mean = sum(x) / max(c, 1)``; ``Q = sum(d^2)``; threshold
    ``((Q - d^2 (c / k)) / (k - 1)`` at least ``floor^2``, times ``fl(kappa^2 (k + 1)) / k``,
    against ``d^2 (c / k)^2``; survivors' ``mean = sum(x) / max(n, 1)``,
    ``M2 = sum((x - mean)^2)``. The threshold is never below ``floor^2`` times its factor
    (rounding is monotonic), so it is computed only for the few samples above that; a pixel
    without rejections keeps the first mean and ``Q`` (the same sums).

    Parameters
    ----------
    cube : ndarray
        (n, rows, K) float32 samples along axis 0, absent ones exactly 0.
    valid : ndarray
        (n, rows, K) bool, False for absent samples.
    kappa : float
        Threshold in standard deviations.
    floor_sq : ndarray
        (K,) float32 squared std floor per column (> 0).
    work : _BatchScratch
        Buffers of at least these sizes.
    mean_out, m2_out, count_out : ndarray
        (rows, K) float32, float32, uint16: the band's statistics, overwritten.
    """
    n, rows = cube.shape[0], cube.shape[1]
    d2, keep = work.d2[:, :rows], work.keep[:, :rows]
    flag, tally = work.flag[:rows], work.tally[:rows]
    count, mean, q = work.count[:rows], work.mean[:rows], work.q[:rows]
    others, others_m1 = work.others[:rows], work.others_m1[:rows]
    ratio, ratio_sq = work.ratio[:rows], work.ratio_sq[:rows]
    factor, sure, t = work.factor[:rows], work.sure[:rows], work.t[:rows]
    # sums run over the frames in order, as numpy's sum along axis 0 does
    tally.fill(0)
    for j in range(n):
        np.add(tally, valid[j], out=tally)
    np.copyto(mean, cube[0])
    for j in range(1, n):
        mean += cube[j]
    np.copyto(count, tally)
    np.maximum(count, 1, out=t)
    mean /= t
    q.fill(0.0)
    for j in range(n):
        np.subtract(cube[j], mean, out=d2[j])
        d2[j] *= valid[j]
        np.square(d2[j], out=d2[j])
        q += d2[j]
    np.subtract(count, 1, out=others)
    np.maximum(others, 2, out=others)  # pixels with fewer than 3 others are not judged
    np.subtract(others, 1, out=others_m1)
    np.divide(count, others, out=ratio)
    np.square(ratio, out=ratio_sq)
    np.add(others, 1, out=factor)
    factor *= np.float32(kappa**2)
    factor /= others
    np.multiply(factor, floor_sq, out=sure)
    np.copyto(sure, np.inf, where=others < _MIN_TEST_COUNT)  # not judged: never a candidate
    np.copyto(keep, valid)
    flat_q, flat_ratio, flat_ratio_sq = q.reshape(-1), ratio.reshape(-1), ratio_sq.reshape(-1)
    flat_om1, flat_factor = others_m1.reshape(-1), factor.reshape(-1)
    touched: list[npt.NDArray[np.intp]] = []
    for j in range(n):
        np.multiply(d2[j], ratio_sq, out=t)  # (x - mean_others)^2
        np.greater(t, sure, out=flag)  # 0 for an absent sample: never
        candidates = np.flatnonzero(flag)
        if candidates.size == 0:
            continue
        dd = d2[j].reshape(-1)[candidates]
        threshold = dd * flat_ratio[candidates]
        threshold = flat_q[candidates] - threshold  # the others' M2
        threshold /= flat_om1[candidates]
        # no max(., floor^2) needed here: where it would apply, the threshold is `sure`,
        # which every candidate exceeds, and without it the threshold is only lower
        threshold *= flat_factor[candidates]
        dd *= flat_ratio_sq[candidates]
        rejects = candidates[dd > threshold]
        keep[j].reshape(-1)[rejects] = False
        touched.append(rejects)
    np.copyto(mean_out, mean)
    np.copyto(m2_out, q)
    np.copyto(count_out, tally)
    if not touched:
        return 0
    flag.fill(False)
    for rejects in touched:
        flag.reshape(-1)[rejects] = True
    pixels = np.flatnonzero(flag)
    # the survivors' statistics where some sample was rejected (a masked sum starts from 0)
    x = cube.reshape(n, -1)[:, pixels]
    kept = keep.reshape(n, -1)[:, pixels]
    survivors = np.count_nonzero(kept, axis=0)
    total = np.zeros(pixels.size, dtype=np.float32)
    for j in range(n):
        total += x[j] * kept[j]
    total /= np.maximum(survivors, 1).astype(np.float32)  # 0 where no survivor: the sum is 0
    m2 = np.zeros(pixels.size, dtype=np.float32)
    for j in range(n):
        dev = x[j] - total
        dev *= kept[j]
        m2 += np.square(dev)
    mean_out.reshape(-1)[pixels] = total
    m2_out.reshape(-1)[pixels] = m2
    count_out.reshape(-1)[pixels] = survivors
    return int(sum(r.size for r in touched))


class _SpanCover:
    """A band's coverage as one run of columns per row (a stored frame's footprint)."""

    def __init__(
        self, first: npt.NDArray[np.int64], stop: npt.NDArray[np.int64], cols: int, channels: int
    ) -> None:
        width = cols * channels
        lo = first * channels
        hi = stop * channels
        self._left = int(lo.max(initial=0))
        self._right = int(hi.min(initial=width))
        # absent samples: columns before the run (left strip) or from its end (right strip);
        # the two conditions are disjoint since stop >= first
        self._left_mask = np.arange(self._left) < lo[:, np.newaxis]
        self._right_mask = np.arange(self._right, width) >= hi[:, np.newaxis]

    def zero_outside(self, a: npt.NDArray[Any]) -> None:
        """Set the absent samples of the (band_rows, cols * C) array ``a`` to 0 (False)."""
        if self._left:
            a[:, : self._left][self._left_mask] = 0.0
        if self._right < a.shape[1]:
            a[:, self._right :][self._right_mask] = 0.0

    def uncount(self, count: npt.NDArray[np.uint16]) -> None:
        """Subtract 1 from the absent samples of the (band_rows, cols * C) ``count``."""
        if self._left:
            left = count[:, : self._left]
            np.subtract(left, self._left_mask, out=left)
        if self._right < count.shape[1]:
            right = count[:, self._right :]
            np.subtract(right, self._right_mask, out=right)


class _MaskCover:
    """A band's coverage as a (band_rows, cols) bool footprint (any shape)."""

    def __init__(self, fp: BoolArray, channels: int) -> None:
        rows, cols = fp.shape
        self._absent: BoolArray | None = None
        if not fp.all():
            absent = np.empty((rows, cols, channels), dtype=bool)
            for c in range(channels):  # broadcasting along the 3-long channel axis is slow
                np.logical_not(fp, out=absent[:, :, c])
            self._absent = absent.reshape(rows, cols * channels)

    def zero_outside(self, a: npt.NDArray[np.float32]) -> None:
        if self._absent is not None:
            np.copyto(a, 0.0, where=self._absent)

    def uncount(self, count: npt.NDArray[np.uint16]) -> None:
        if self._absent is not None:
            np.subtract(count, self._absent, out=count)


_Cover = _SpanCover | _MaskCover

_NO_INDEX: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)


class _StoreSource:
    """Band source for ``LiveStack._add`` reading frame ``i`` back from a store.

    A context manager: the frame's file stays open for the bands of one add.
    """

    def __init__(self, store: FrameStore, i: int) -> None:
        self._cols, self._channels = store.shape[1], store.channels
        self._first, self._stop = store.footprint_spans(i, 0, store.shape[0])
        self._reader = store.reader(i)

    def __enter__(self) -> _StoreSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.__exit__()

    def __call__(self, r0: int, r1: int, scratch: _Scratch) -> tuple[FloatArray, _Cover]:
        x = scratch.x[: r1 - r0]
        self._reader.read(r0, r1, x.reshape(r1 - r0, self._cols, self._channels))
        cover = _SpanCover(self._first[r0:r1], self._stop[r0:r1], self._cols, self._channels)
        return x, cover


class _ArraySource:
    """Band source for ``LiveStack._add`` from an in-memory frame and its footprint mask.

    The band is copied (as float32) so that it can be zeroed outside the footprint.
    """

    def __init__(self, data: FloatArray, fp: BoolArray) -> None:
        self.data = data
        self.fp = fp

    def __call__(self, r0: int, r1: int, scratch: _Scratch) -> tuple[FloatArray, _Cover]:
        x = scratch.x[: r1 - r0]
        np.copyto(x.reshape(self.data[r0:r1].shape), self.data[r0:r1], casting="same_kind")
        cover = _MaskCover(self.fp[r0:r1], self.data.shape[2])
        cover.zero_outside(x)  # the caller's values there may be anything, even NaN
        return x, cover


class _Scratch:
    """Band-sized (band_rows, cols * C) working buffers reused across the bands of one add.

    ``u`` and ``v`` are touched only by bands judged densely, so usually never paged in.
    """

    def __init__(self, rows: int, width: int) -> None:
        shape = (rows, width)
        self.x = np.empty(shape, dtype=np.float32)
        self.delta = np.empty(shape, dtype=np.float32)
        self.t = np.empty(shape, dtype=np.float32)
        self.u = np.empty(shape, dtype=np.float32)
        self.v = np.empty(shape, dtype=np.float32)
        self.flag = np.empty(shape, dtype=bool)
        self.judged = np.empty(shape, dtype=bool)
        self.sure = np.zeros(width, dtype=np.float32)
        """:meth:`LiveStack._sure_row` of this add."""
