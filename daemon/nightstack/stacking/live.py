"""The live stack: running per-pixel statistics with k-sigma rejection, O(pixels) a frame.

A few image-sized arrays whatever the number of frames (see :class:`LiveStack`); frames come
from a :class:`~nightstack.stacking.store.FrameStore` (band by band, never a full warped copy)
or, without a store (live-only sessions), as in-memory warped frames (:meth:`LiveStack.add`).
Its crash state goes to disk through :mod:`nightstack.stacking.checkpoint`.

Why one module of this size: the live stack's state and its arithmetic (the warm-up batch clip,
the running k-sigma, the catch-up from the store) keep one invariant together.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from scipy.stats import f as f_dist

from nightstack.arrays import BoolArray, FloatArray
from nightstack.stacking import codes
from nightstack.stacking.store import FrameStore, Reader

_PREVIEW_BAND_SAMPLES = 1 << 18
"""Full-size samples per band shrunk across in LiveStack.preview_image: 1 MB of the mean."""

_ADD_BAND_SAMPLES = 1 << 16
"""Samples per band in LiveStack.add: the band's state and scratch (~1.5 MB) stay in the CPU's
L2 cache (measured best of 2^16 .. 2^18 at 24 MP; smaller bands cost more in per-call
overhead)."""

_DENSE_FRACTION = 0.05
"""Above this fraction of candidate pixels in a band, the exact test is computed for every
pixel (a few whole-band passes) rather than gathered per candidate (measured break-even)."""

_WARMUP_CAP_BYTES = 32 * 2**20
"""RAM for the warm-up batch (the W frames of one band and their working copies)."""

_WARMUP_BYTES_PER_SAMPLE = 14
"""Warm-up batch bytes per (frame, pixel, channel): float32 cube, deviations and screen, two
masks."""

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

FLOOR_ABS = 1.0 / 4096
"""Absolute rejection floor: one ADU of a 12-bit camera, for noise-free (synthetic, saturated)
data where the typical std is 0."""

_FLOOR_SAMPLES = 250_000
"""Pixels sampled per channel to find the typical std for the floor."""

_MAX_FRAMES = np.iinfo(np.uint16).max
"""Per-pixel counts are uint16 (half the memory of uint32): at most 65535 frames per stack."""

_SCREEN_MARGIN = np.float32(1 - 2.0**-16)
"""The running test's cheap screen (per-channel weights multiplied, see ``LiveStack._judge``)
keeps every pixel whose screened statistic exceeds this fraction of the quantile: the
screen's own rounding (a few float32 ulps, 2^-21 relative) can never hide a rejection."""


@functools.lru_cache(maxsize=8)
def _quantiles(kappa: float, channels: int) -> npt.NDArray[np.float32]:
    """(65536,) float32 rejection quantile of a pixel's statistic, by the number ``n`` of
    samples it is judged against (inf for ``n`` < :data:`_MIN_TEST_COUNT`; read-only).

    The false-rejection probability is the per-sample ``kappa``-sigma test's with ``n``
    samples: each term ``d^2 / ((1 + 1/n) s^2)`` is then F(1, n - 1) distributed (t^2), so
    ``p_n = P(F(1, n - 1) > kappa^2)`` (1.3 % at n = 11, 0.27 % as n grows: a Gaussian's
    two-sided ``kappa``-sigma tail). ``q_n = C x`` the F(C, n - 1) quantile of ``p_n``: the
    statistic's exact quantile were the channels' variances one estimate, and ``kappa^2``
    itself for one channel; it tends to the chi2(C) quantile (14.16 for kappa 3 and C = 3).
    The channels' variances being estimated separately, the statistic's tail is a little
    lighter: simulated 0.97 % instead of 1.33 % at n = 11, 0.33 instead of 0.39 % at n = 61.
    The chi2(C) quantile at every ``n`` would double the false rejections of few-frame stacks
    (measured 2.7 % of the samples instead of 1.3 % on 16-frame simulated nights).
    """
    table = np.full(_MAX_FRAMES + 1, np.inf, dtype=np.float64)
    dof = np.arange(_MIN_TEST_COUNT, _MAX_FRAMES + 1, dtype=np.float64) - 1
    tail = f_dist.sf(kappa**2, 1, dof)
    table[_MIN_TEST_COUNT:] = channels * f_dist.isf(tail, channels, dof)
    out = table.astype(np.float32)
    out.flags.writeable = False
    return out


def check_state(what: str, *arrays: tuple[str, npt.NDArray[Any], type, tuple[int, ...]]) -> None:
    """Refuse a state to restore (``what``: its kind, for the message) whose arrays, given as
    (name, array, dtype, shape), are not of their dtype and shape: a damaged checkpoint."""
    for name, array, dtype, shape in arrays:
        if array.dtype != dtype or array.shape != shape:
            raise ValueError(f"{what} {name} is {array.dtype} {array.shape}, not {shape}")


@dataclass
class LiveState:
    """A live stack's whole state: ``mean`` (rows, cols, C) float32, ``spread`` (rows, cols, C)
    uint16 coded population variances (see :class:`LiveStack`), ``count`` (rows, cols) uint16
    accepted frames per pixel, ``floor`` (C,) float32, the warm-up frames still ``pending`` as
    (frame (rows, cols, C) float32, footprint (rows, cols) bool), and the two counters."""

    mean: npt.NDArray[np.float32]
    spread: npt.NDArray[np.uint16]
    count: npt.NDArray[np.uint16]
    floor: npt.NDArray[np.float32]
    pending: list[tuple[npt.NDArray[np.float32], BoolArray]]
    frames: int
    rejected: int


class LiveStack:
    """Running stack with per-pixel k-sigma rejection, O(pixels) per frame, bounded memory.

    State (whatever the number of frames): per sample (pixel, channel) a float32 Welford mean
    and a 16-bit code of the population variance ``v = M2 / n``; per pixel a uint16 count of
    accepted frames, shared by the channels (a pixel's channels are accepted or rejected
    together). 4 + 2 + 2 / C bytes a sample: 6.67 for RGB, 480 MB at 24 MP (1.20 GB at 61 MP),
    against 10 with a float32 ``M2`` and a count per sample (720 MB and 1.81 GB). Counts are
    uint16: at most 65535 frames. The state is what a checkpoint writes.

    The variance code is a float without sign bit, 5 exponent bits (2^-30 .. 4) and 11 mantissa
    bits (the float32's top bits), rounded stochastically from a fixed pseudo-random table (so
    the state is reproducible bit for bit: :mod:`nightstack.stacking.codes`). Each frame decodes
    it exactly to float32, updates it as ``v = (v + w delta^2) (1 - w)`` with ``w = 1 / (n + 1)``
    (Welford's ``M2 += delta^2 n / (n + 1)`` over ``n + 1``) and re-codes it; the mean's update
    is Welford's in float32. Measured against a float64 two-pass on 6000 samples of a 0.5 level
    with 1e-3 noise (``test_running_statistics_match_a_float64_two_pass_after_300_and_3000_
    frames``): the variance's relative error is 1.6e-3 rms (max 7e-3, bias 1e-5) after 300
    frames and 6.0e-3 rms (max 2.2e-2, bias 2e-5) after 3000, 50 and 4.3 times below its own
    statistical error sqrt(2 / n) (8.2 % and 2.6 %), which it enlarges by 0.04 % and 2.7 % in
    quadrature; the mean is within 1.9e-6, as with float32 ``M2`` (the mean's precision is
    unchanged). A float32 ``M2`` was within 6e-5; rounding the code to nearest instead would
    bias the variance by -2 % after 3000 frames.

    Rejection of a new sample (its C values ``x_c``) of a pixel with ``n`` accepted samples
    (means ``m_c``, variances ``v_c``): reject the whole sample (all C values) when

        z = sum_c (x_c - m_c)^2 / ((1 + 1/n) max(v_c n / (n - 1), floor_c^2)) > q_n

    each term being a squared deviation over its expected variance (the sample variance, at
    least ``floor_c^2``, plus the uncertainty of the mean itself, which matters for small
    ``n``). ``q_n`` (:func:`_quantiles`; infinite for ``n < 3``, :data:`_MIN_TEST_COUNT`) has
    the false-rejection probability of the former per-channel ``kappa``-sigma test with ``n``
    samples: ``kappa^2`` for one channel, and for C = 3 from 17.9 at n = 11 down to the chi2(3)
    quantile 14.16 at which a known-variance Gaussian is rejected 0.27 % of the time for
    kappa 3. A satellite trail or a hot pixel, high in every channel, is caught at a lower
    per-channel deviation (2.17 sigma in each of 3 channels: z = 14.16) than one channel alone
    needs (3.76 sigma); a sample high in one channel by 3 to 3.76 sigma, which the per-channel
    test rejected, is now kept. ``floor`` is per channel: max(1/4096, the median over pixels of
    the sample std), fixed when the warm-up completes (see :data:`_FLOOR_FRACTION`). Measured
    on clean Gaussian noise: 0.26 % of the pixels rejected after 60 to 80 frames; 0.8 % and
    0.9 % of the samples on the 16-frame simulated nights of ``test_real_skies`` (1.3 and 1.8 %
    with the per-channel test).

    - Frames 1 .. ``warmup`` - 1 are accumulated without rejection.
    - When the ``warmup``-th frame arrives, the ``warmup`` frames are judged as a batch: each
      pixel's sample with the test above against the *other* warm-up samples of its pixel (the
      floor taken from the first ``warmup`` - 1 frames), and the statistics are rebuilt from
      the survivors. The final combine's median-centred sigma clip is not used here because it
      cannot reject anything in so few frames: a lone outlier among ``n`` samples lies at most
      ``n / sqrt(n - 1)`` population stds from the median (2.5 for n = 5, < 3 for n < 9). The
      frames are read back from ``store`` band by band (frame k of this stack must be frame k of
      the store: append each frame to the store before adding it here); without a store they
      are kept in RAM until then.
    - Afterwards each new sample is judged against its pixel's running statistics, and added
      when it passes. ``rejected`` counts every rejected sample (C a rejected pixel).

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
        self.quantiles = _quantiles(self.kappa, self.channels)
        """(65536,) float32 rejection quantile ``q_n`` of the pixel statistic by the number
        ``n`` of samples it is judged against (:func:`_quantiles`; read-only)."""
        full = (*self.shape, self.channels)
        self._mean = np.zeros(full, dtype=np.float32)
        self._spread = np.zeros(full, dtype=np.uint16)
        self._count = np.zeros(self.shape, dtype=np.uint16)
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
        """(rows, cols, C) uint16 accepted samples per pixel and channel (a read-only view: the
        channels of a pixel share one count)."""
        return np.broadcast_to(self._count[..., np.newaxis], (*self.shape, self.channels))

    @property
    def pixel_count(self) -> npt.NDArray[np.uint16]:
        """(rows, cols) uint16 accepted samples per pixel (read-only view)."""
        view = self._count.view()
        view.flags.writeable = False
        return view

    @property
    def variance(self) -> npt.NDArray[np.float32]:
        """(rows, cols, C) float32 population variance ``M2 / n`` of the accepted samples (as
        stored: 11 mantissa bits; at least 2^-30; 0 where no sample was accepted)."""
        out = np.empty((*self.shape, self.channels), dtype=np.float32)
        codes.decode(self._spread, out)
        for c in range(self.channels):
            np.copyto(out[..., c], 0.0, where=self._count == 0)
        return out

    @property
    def state_bytes(self) -> int:
        """Bytes of the state arrays (mean, spread, count), i.e. of a checkpoint."""
        return self._mean.nbytes + self._spread.nbytes + self._count.nbytes

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
            self._blank_empty(out[r0 : r0 + band], r0)
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
        self._blank_empty(out, row_start)
        return out

    def preview_image(self, width: int) -> npt.NDArray[np.float32]:
        """The current stack shrunk to ``width`` columns (:func:`shrink_bands` of
        :meth:`result_band`): (height, width, C) float32, linear."""
        return shrink_bands(self.result_band, self.shape, self.channels, width)

    def add_stored(self, store: FrameStore, i: int) -> int:
        """Add frame ``i`` of ``store`` as a frame of its own (a live-only session's resume:
        this stack has no store); returns its rejected samples."""
        rows = self.shape[0]
        return self.add(store.read_band(i, 0, rows), store.footprint_band(i, 0, rows))

    def state(self) -> LiveState:
        """The stack's state (views of its arrays, not copies), for a checkpoint."""
        return LiveState(
            self._mean,
            self._spread,
            self._count,
            self._floor.copy(),
            list(self._pending),
            self.frames,
            self.rejected,
        )

    def restore(self, state: LiveState) -> None:
        """Take over ``state`` (its arrays, not copies), shapes and dtypes checked."""
        full = (*self.shape, self.channels)
        check_state(
            "live state",
            ("mean", state.mean, np.float32, full),
            ("spread", state.spread, np.uint16, full),
            ("count", state.count, np.uint16, self.shape),
        )
        for frame, fp in state.pending:
            if frame.shape != full or fp.shape != self.shape:
                raise ValueError(f"live state warm-up frame {frame.shape} does not fit {full}")
        self._mean, self._spread, self._count = state.mean, state.spread, state.count
        self._set_floor(np.asarray(state.floor, dtype=np.float32))
        self._pending = list(state.pending)
        self.frames, self.rejected = int(state.frames), int(state.rejected)

    # ----------------------------------------------------------------- internals

    def _band_rows(self) -> int:
        return max(1, _ADD_BAND_SAMPLES // (self.shape[1] * self.channels))

    def _blank_empty(self, out: npt.NDArray[np.float32], row_start: int) -> None:
        """NaN in the (band_rows, cols, C) ``out`` where the rows from ``row_start`` on have no
        accepted sample."""
        empty = self._count[row_start : row_start + out.shape[0]] == 0
        if empty.any():
            for c in range(self.channels):  # broadcasting along the 3-long channel axis is slow
                np.copyto(out[:, :, c], np.nan, where=empty)

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
            scratch = _Scratch(rows, self.shape[1], self.channels)
            if testing:
                scratch.screen = self._screen_weights(self.frames)
            # q_n decreases with n, and no count exceeds the frames added so far
            scratch.limit = np.float32(self.quantiles[self.frames] * _SCREEN_MARGIN)
            rejected = 0
            for r0 in range(0, self.shape[0], rows):
                r1 = min(r0 + rows, self.shape[0])
                x, cover = source(r0, r1, scratch)
                rejected += self._update_band(r0, r1, x, cover, testing, scratch, number)
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
        number: int,
    ) -> int:
        """Welford update of rows r0:r1 with rejection; all work in the band's scratch buffers.

        ``x`` is the band's (band_rows, cols * C) float32 samples, finite everywhere. Every
        sample goes through the same few whole-band operations (no masked ufunc: those are
        several times slower) with a per-pixel weight ``w``: ``1 / (n + 1)`` where the sample
        is accepted, 0 where it is absent or rejected, so that there the mean and the variance
        change by +-0, i.e. not at all (the variance keeps its code), and the count is not
        incremented. In float32, in this order: ``delta = x - mean``; ``mean += delta * w`` and
        ``a = v + delta^2 * w`` each rounded once (a fused multiply-add); ``v = a * (1 - w)``
        (Welford's ``M2 += delta^2 n / (n + 1)``, divided by ``n + 1``), coded with frame
        ``number``'s dither. ``x`` is only read: it may be the caller's array.
        """
        rows = r1 - r0
        cols, channels = self.shape[1], self.channels
        width = cols * channels
        mean = self._mean[r0:r1].reshape(rows, width)
        spread = self._spread[r0:r1].reshape(rows, width)
        count = self._count[r0:r1]
        delta, d2, var = scratch.delta[:rows], scratch.t[:rows], scratch.var[:rows]
        weight, kept = scratch.weight[:rows], scratch.kept[:rows]
        np.subtract(x, mean, out=delta)
        cover.zero_outside(delta)  # x may be anything there, even NaN
        np.square(delta, out=d2)
        rejects = _NO_INDEX
        codes.decode(spread, var)
        if testing:
            rejects = self._judge(d2, count, var, scratch)
        np.add(count, 1, out=weight)  # n + 1, the new count of every accepted sample
        np.reciprocal(weight, out=weight)
        cover.zero_absent(weight)
        np.add(count, 1, out=count)
        cover.uncount(count)
        if rejects.size:
            count.reshape(-1)[rejects] -= 1
            weight.reshape(-1)[rejects] = 0.0
        np.subtract(1, weight, out=kept)
        if channels == 1:
            w, keep = weight, kept
        else:  # OpenCV replicates a plane several times faster than a strided numpy copy
            w, keep = scratch.u[:rows], scratch.x[:rows]
            cv2.cvtColor(weight, cv2.COLOR_GRAY2BGR, dst=w.reshape(rows, cols, channels))
        # OpenCV's multiply-add rounds once (the product is exact), and costs one pass
        band = (rows, cols, channels)
        cv2.accumulateProduct(delta.reshape(band), w.reshape(band), mean.reshape(band))
        cv2.accumulateProduct(d2.reshape(band), w.reshape(band), var.reshape(band))
        if channels != 1:
            cv2.cvtColor(kept, cv2.COLOR_GRAY2BGR, dst=keep.reshape(band))
        var *= keep
        dither = codes.dither(codes.dither_start(number, r0), rows * width).reshape(rows, width)
        codes.encode(var, dither, spread)
        return int(rejects.size) * channels

    def _screen_weights(self, frames: int) -> npt.NDArray[np.float32]:
        """(1, C) float32 per-channel weights ``1 / b_c`` of the running test's screen.

        The exact per-channel divisor ``(1/n + 1) max(v n / (n - 1), floor^2)``, computed in
        float32 as in :meth:`_judge`, is never below ``b = (1/N + 1) floor^2`` (same order) for
        ``n <= N`` (every operand is positive and float rounding is monotonic), and no count
        exceeds ``N`` = the frames added so far. So a pixel's ``sum_c d_c^2 / b_c`` bounds its
        statistic from above; weighted (by OpenCV, in float32 or better) instead of divided, it
        may be a few ulps low, which :data:`_SCREEN_MARGIN` covers.
        """
        inverse = np.reciprocal(np.float32(max(frames, 1)))
        factor = np.float32(inverse + np.float32(1))
        bound = np.multiply(self._floor_sq_row[: self.channels], factor)
        return np.reciprocal(bound).reshape(1, self.channels)

    def _judge(
        self,
        d2: npt.NDArray[np.float32],
        count: npt.NDArray[np.uint16],
        var: npt.NDArray[np.float32],
        scratch: _Scratch,
    ) -> npt.NDArray[np.intp]:
        """Flat indices of the band's pixels the rejection test rejects (ascending).

        ``d2`` is (band_rows, cols * C) (x - mean)^2, 0 for absent samples; ``count``
        (band_rows, cols); ``var`` the decoded variances like ``d2``. Only the pixels the
        screen (:meth:`_screen_weights`) keeps can be rejected; the exact statistic is computed
        for them alone (for the whole band when they are many), with the same float32
        operations in the same order as for every pixel, so the decisions are those of the
        documented test, bit for bit: ``r = n / (n - 1)``, ``i = 1 / n + 1`` with
        ``n = max(count, 2)``; per channel ``max(v * r, floor^2) * i``; ``d2`` over it;
        the channels' terms summed in order.
        """
        rows = d2.shape[0]
        channels = self.channels
        z, flag = scratch.z[:rows], scratch.flag[:rows]
        if channels == 1:
            np.multiply(d2, scratch.screen[0, 0], out=z)
        else:  # the weighted channel sum in one pass (a strided numpy sum is several times slower)
            cv2.transform(d2.reshape(rows, -1, channels), scratch.screen, dst=z[..., np.newaxis])
        np.greater(z, scratch.limit, out=flag)
        candidates = np.flatnonzero(flag)
        if candidates.size == 0:
            return _NO_INDEX
        floor_sq = self._floor_sq_row[:channels]
        if candidates.size > _DENSE_FRACTION * z.size:
            n, ratio, inc, thr = (
                a[:rows] for a in (scratch.n, scratch.ratio, scratch.inc, scratch.thr)
            )
            np.maximum(count, 2, out=n)  # pixels with fewer than 3 others are not judged
            np.subtract(n, 1, out=ratio)
            np.divide(n, ratio, out=ratio)
            np.reciprocal(n, out=inc)
            inc += 1
            for c in range(channels):
                np.multiply(var[:, c::channels], ratio, out=thr)
                np.maximum(thr, floor_sq[c], out=thr)
                thr *= inc
                np.divide(d2[:, c::channels], thr, out=thr)
                if c == 0:
                    np.copyto(z, thr)
                else:
                    z += thr
            np.take(self.quantiles, count, out=thr)  # inf below _MIN_TEST_COUNT: not judged
            np.greater(z, thr, out=flag)
            return np.flatnonzero(flag)
        n_old = count.reshape(-1)[candidates]
        n_c = np.maximum(n_old, 2).astype(np.float32)
        ratio_c = n_c / (n_c - np.float32(1))
        inc_c = np.reciprocal(n_c)
        inc_c += 1
        flat_var, flat_d2 = var.reshape(-1), d2.reshape(-1)
        z_c = np.zeros(0, dtype=np.float32)
        for c in range(channels):
            samples = candidates * channels + c
            thr_c = flat_var[samples] * ratio_c
            np.maximum(thr_c, floor_sq[c], out=thr_c)
            thr_c *= inc_c
            term = flat_d2[samples] / thr_c
            z_c = term if c == 0 else z_c + term
        outside = z_c > self.quantiles[n_old]  # inf below _MIN_TEST_COUNT: not judged
        rejects: npt.NDArray[np.intp] = candidates[outside]
        return rejects

    def _rebuild_from_warmup(self) -> int:
        """Judge the warm-up frames as a batch, rebuild mean, spread and count from the
        survivors."""
        n = self.warmup
        rows, cols = self.shape
        channels = self.channels
        width = cols * channels
        # the floor comes from the first warmup - 1 frames, accumulated plainly
        floor_sq_row = np.tile(np.square(self._typical_std_floor()), cols)
        band = _warmup_band_rows(n, width)
        work = _BatchScratch(n, band, cols, channels)
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
            dither = codes.dither(codes.dither_start(n, r0), (r1 - r0) * width)
            rejected += _batch_clip(
                cube,
                valid,
                self.quantiles,
                floor_sq_row,
                work,
                dither.reshape(r1 - r0, width),
                self._mean[r0:r1].reshape(r1 - r0, width),
                self._spread[r0:r1].reshape(r1 - r0, width),
                self._count[r0:r1],
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
        """Per channel max(FLOOR_ABS, _FLOOR_FRACTION x median sample std), pixels with n >= 2."""
        rows, cols = self.shape
        step = max(1, int(math.sqrt(rows * cols / _FLOOR_SAMPLES)))
        count = self._count[::step, ::step].reshape(-1)
        ok = count >= 2
        floor = np.full(self.channels, FLOOR_ABS, dtype=np.float32)
        if ok.any():
            code = self._spread[::step, ::step].reshape(-1, self.channels)[ok]
            var = np.empty(code.shape, dtype=np.float32)
            codes.decode(code, var)
            n = count[ok].astype(np.float64)
            for c in range(self.channels):
                std = np.sqrt(var[:, c].astype(np.float64) * n / (n - 1.0))
                floor[c] = max(FLOOR_ABS, _FLOOR_FRACTION * float(np.median(std)))
        return floor


def shrink_bands(
    result_band: Callable[[int, int], npt.NDArray[np.float32]],
    shape: tuple[int, int],
    channels: int,
    width: int,
) -> npt.NDArray[np.float32]:
    """A stack's image (its rows ``r0:r1`` given by ``result_band(r0, r1)``, (rows, cols, C)
    float32, NaN where empty) shrunk to ``width`` columns by area averaging (OpenCV's
    ``INTER_AREA``).

    Area averaging is separable, so it is done band by band (a few MB at a time): each band
    of rows is shrunk across by ``cv2.resize`` with ``INTER_AREA``, and its rows are added
    at once into the ``height = max(1, round(rows * width / cols))`` output rows they
    overlap, weighted by the overlap (OpenCV's area weights). Neither the full-size image
    (288 MB at 24 MP RGB) nor a (rows, width) intermediate (77 MB at 24 MP for 1600 px) is
    ever formed. NaN wherever an averaged pixel had no accepted sample, as OpenCV propagates
    it. Never enlarges: for ``width >= cols`` this is the whole image.

    Returns
    -------
    ndarray
        (height, width, C) float32, linear.
    """
    if width < 1:
        raise ValueError(f"preview width must be >= 1, not {width}")
    rows, cols = shape
    if width >= cols:
        return result_band(0, rows)
    height = max(1, round(rows * width / cols))
    out = np.zeros((height, width, channels), dtype=np.float32)
    step = height / rows  # an input row spans output rows [r * step, (r + 1) * step)
    band = max(1, _PREVIEW_BAND_SAMPLES // (cols * channels))
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        mean = result_band(r0, r1)
        shrunk = cv2.resize(mean, (width, r1 - r0), interpolation=cv2.INTER_AREA)
        shrunk = np.asarray(shrunk, np.float32).reshape(r1 - r0, width, channels)
        for r in range(r0, r1):
            top, bottom = r * step, (r + 1) * step
            for j in range(int(top), min(height, math.ceil(bottom))):
                weight = min(bottom, j + 1) - max(top, j)
                if weight > 0:
                    out[j] += np.float32(weight) * shrunk[r - r0]
    return out


def _warmup_band_rows(frames: int, width: int) -> int:
    """Rows per band of the warm-up batch of ``frames`` frames of ``width`` samples a row."""
    per_plane = min(_WARMUP_BAND_SAMPLES, _WARMUP_CAP_BYTES // (frames * _WARMUP_BYTES_PER_SAMPLE))
    return max(1, per_plane // width)


def _channel_sum(
    terms: npt.NDArray[np.float32], channels: int, out: npt.NDArray[np.float32]
) -> None:
    """Sum the (rows, cols * C) ``terms`` over each pixel's channels, in channel order, into
    the (rows, cols) ``out``."""
    if channels == 1:
        np.copyto(out, terms)
        return
    np.add(terms[:, 0::channels], terms[:, 1::channels], out=out)
    for c in range(2, channels):
        out += terms[:, c::channels]


class _BatchScratch:
    """Buffers for :func:`_batch_clip` on bands of up to ``rows`` rows of ``n`` frames."""

    def __init__(self, n: int, rows: int, cols: int, channels: int) -> None:
        width = cols * channels
        self.cube = np.empty((n, rows, width), dtype=np.float32)
        self.d2 = np.empty((n, rows, width), dtype=np.float32)
        self.valid = np.empty((n, rows, width), dtype=bool)
        self.keep = np.empty((n, rows, width), dtype=bool)
        plane = (rows, width)
        self.tally = np.empty(plane, dtype=np.uint16)
        self.count, self.mean, self.q = (np.empty(plane, dtype=np.float32) for _ in range(3))
        self.others, self.others_m1 = (np.empty(plane, dtype=np.float32) for _ in range(2))
        self.ratio, self.ratio_sq = (np.empty(plane, dtype=np.float32) for _ in range(2))
        self.factor, self.bound, self.t = (np.empty(plane, dtype=np.float32) for _ in range(3))
        self.z = np.empty((rows, cols), dtype=np.float32)
        self.flag = np.empty((rows, cols), dtype=bool)


def _batch_clip(
    cube: npt.NDArray[np.float32],
    valid: BoolArray,
    quantiles: npt.NDArray[np.float32],
    floor_sq: npt.NDArray[np.float32],
    work: _BatchScratch,
    dither: npt.NDArray[np.int32],
    mean_out: npt.NDArray[np.float32],
    spread_out: npt.NDArray[np.uint16],
    count_out: npt.NDArray[np.uint16],
) -> int:
    """The warm-up batch clip of one band; writes the survivors' statistics, returns rejections.

    Each pixel's sample is judged with the live rejection test against the other samples of
    its pixel. With ``d`` a value's deviation from the mean of all ``c`` samples of its pixel
    and channel, ``Q`` the sum of squared deviations and ``k = c - 1`` the others: the others'
    mean is ``-d / k`` (the deviations sum to 0), so ``x - mean_others = d c / k`` and the
    others' ``M2 = Q - d^2 c / k``. A pixel's sample is rejected (all its channels) when
    ``k >= 3`` (:data:`_MIN_TEST_COUNT`) and
    ``sum_c (d_c c / k)^2 / ((1 + 1/k) max(M2_c / (k - 1), floor_c^2)) > quantiles[k]``, the
    running test. Then the mean, variance (coded, with ``dither``) and count of the survivors
    (0, 0, 0 if none).

    In float32, in this order: ``mean = sum(x) / max(c, 1)``; ``Q = sum(d^2)``; per channel
    ``max((Q - d^2 (c / k)) / (k - 1), floor^2) * ((k + 1) / k)`` divides ``d^2 (c / k)^2``,
    the channels' terms summed in order; survivors' ``mean = sum(x) / max(n, 1)``,
    ``M2 = sum((x - mean)^2)``, variance ``M2 / max(n, 1)``. Each term is never above
    ``d^2 (c / k)^2 / (floor^2 (k + 1) / k)`` (rounding is monotonic), so the exact statistic
    is computed only for the few pixels whose sum of those exceeds ``quantiles[n - 1]``, the
    smallest for ``k < n`` (:func:`_quantiles` decreases); a pixel
    without rejections keeps the first mean and ``Q`` (the same sums).

    Parameters
    ----------
    cube : ndarray
        (n, rows, K) float32 samples along axis 0, K = cols * C, absent ones exactly 0.
    valid : ndarray
        (n, rows, K) bool, False for absent samples (all channels of a pixel alike).
    quantiles : ndarray
        (65536,) float32 rejection quantile by number of others (:func:`_quantiles`).
    floor_sq : ndarray
        (K,) float32 squared std floor per column (> 0).
    work : _BatchScratch
        Buffers of at least these sizes.
    dither : ndarray
        (rows, K) int32 offsets for :func:`~nightstack.stacking.codes.encode`.
    mean_out, spread_out : ndarray
        (rows, K) float32 and uint16: the band's statistics, overwritten.
    count_out : ndarray
        (rows, cols) uint16: the band's counts, overwritten.
    """
    n, rows = cube.shape[0], cube.shape[1]
    channels = cube.shape[2] // count_out.shape[1]
    limit = quantiles[n - 1]
    d2, keep = work.d2[:, :rows], work.keep[:, :rows]
    tally, z, flag = work.tally[:rows], work.z[:rows], work.flag[:rows]
    count, mean, q = work.count[:rows], work.mean[:rows], work.q[:rows]
    others, others_m1 = work.others[:rows], work.others_m1[:rows]
    ratio, ratio_sq = work.ratio[:rows], work.ratio_sq[:rows]
    factor, bound, t = work.factor[:rows], work.bound[:rows], work.t[:rows]
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
    factor /= others
    np.multiply(factor, floor_sq, out=bound)
    np.copyto(bound, np.inf, where=others < _MIN_TEST_COUNT)  # not judged: never a candidate
    np.copyto(keep, valid)
    flat_q, flat_ratio, flat_ratio_sq = q.reshape(-1), ratio.reshape(-1), ratio_sq.reshape(-1)
    flat_om1, flat_factor = others_m1.reshape(-1), factor.reshape(-1)
    flat_count = count.reshape(-1)
    width = floor_sq.size
    touched: list[npt.NDArray[np.intp]] = []
    for j in range(n):
        np.multiply(d2[j], ratio_sq, out=t)  # (x - mean_others)^2
        t /= bound  # 0 for an absent sample or one not judged
        _channel_sum(t, channels, z)
        np.greater(z, limit, out=flag)
        candidates = np.flatnonzero(flag)
        if candidates.size == 0:
            continue
        z_c = np.zeros(0, dtype=np.float32)
        for c in range(channels):
            samples = candidates * channels + c
            dd = d2[j].reshape(-1)[samples]
            threshold = dd * flat_ratio[samples]
            threshold = flat_q[samples] - threshold  # the others' M2
            threshold /= flat_om1[samples]
            np.maximum(threshold, floor_sq[samples % width], out=threshold)
            threshold *= flat_factor[samples]
            dd *= flat_ratio_sq[samples]
            term = dd / threshold
            z_c = term if c == 0 else z_c + term
        others_c = np.maximum(flat_count[candidates * channels] - 1, 0).astype(np.intp)
        rejects = candidates[z_c > quantiles[others_c]]
        for c in range(channels):
            keep[j].reshape(-1)[rejects * channels + c] = False
        touched.append(rejects)
    np.copyto(mean_out, mean)
    np.maximum(count, 1, out=t)
    np.divide(q, t, out=t)  # the population variance
    np.copyto(count_out, tally[:, ::channels])
    rejected = 0
    if touched:
        flag.fill(False)
        for rejects in touched:
            flag.reshape(-1)[rejects] = True
        pixels = np.flatnonzero(flag)
        samples = (pixels[:, np.newaxis] * channels + np.arange(channels)).reshape(-1)
        # the survivors' statistics where some sample was rejected (a masked sum starts from 0)
        x = cube.reshape(n, -1)[:, samples]
        kept = keep.reshape(n, -1)[:, samples]
        survivors = np.count_nonzero(kept, axis=0)
        total = np.zeros(samples.size, dtype=np.float32)
        for j in range(n):
            total += x[j] * kept[j]
        divisor = np.maximum(survivors, 1).astype(np.float32)
        total /= divisor  # 0 where no survivor: the sum is 0
        m2 = np.zeros(samples.size, dtype=np.float32)
        for j in range(n):
            dev = x[j] - total
            dev *= kept[j]
            m2 += np.square(dev)
        m2 /= divisor
        mean_out.reshape(-1)[samples] = total
        t.reshape(-1)[samples] = m2
        count_out.reshape(-1)[pixels] = survivors[::channels]
        rejected = int(sum(r.size for r in touched)) * channels
    codes.encode(t, dither, spread_out)
    return rejected


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
        # the same for pixels
        self._left_px = int(first.max(initial=0))
        self._right_px = int(stop.min(initial=cols))
        self._left_px_mask = np.arange(self._left_px) < first[:, np.newaxis]
        self._right_px_mask = np.arange(self._right_px, cols) >= stop[:, np.newaxis]

    def zero_outside(self, a: npt.NDArray[Any]) -> None:
        """Set the absent samples of the (band_rows, cols * C) array ``a`` to 0 (False)."""
        if self._left:
            a[:, : self._left][self._left_mask] = 0.0
        if self._right < a.shape[1]:
            a[:, self._right :][self._right_mask] = 0.0

    def zero_absent(self, a: npt.NDArray[np.float32]) -> None:
        """Set the absent pixels of the (band_rows, cols) array ``a`` to 0."""
        if self._left_px:
            a[:, : self._left_px][self._left_px_mask] = 0.0
        if self._right_px < a.shape[1]:
            a[:, self._right_px :][self._right_px_mask] = 0.0

    def uncount(self, count: npt.NDArray[np.uint16]) -> None:
        """Subtract 1 from the absent pixels of the (band_rows, cols) ``count``."""
        if self._left_px:
            left = count[:, : self._left_px]
            np.subtract(left, self._left_px_mask, out=left)
        if self._right_px < count.shape[1]:
            right = count[:, self._right_px :]
            np.subtract(right, self._right_px_mask, out=right)


class _MaskCover:
    """A band's coverage as a (band_rows, cols) bool footprint (any shape)."""

    def __init__(self, fp: BoolArray, channels: int) -> None:
        rows, cols = fp.shape
        self._absent: BoolArray | None = None
        self._absent_px: BoolArray | None = None
        if not fp.all():
            self._absent_px = np.logical_not(fp)
            absent = np.empty((rows, cols, channels), dtype=bool)
            for c in range(channels):  # broadcasting along the 3-long channel axis is slow
                absent[:, :, c] = self._absent_px
            self._absent = absent.reshape(rows, cols * channels)

    def zero_outside(self, a: npt.NDArray[np.float32]) -> None:
        if self._absent is not None:
            np.copyto(a, 0.0, where=self._absent)

    def zero_absent(self, a: npt.NDArray[np.float32]) -> None:
        if self._absent_px is not None:
            np.copyto(a, 0.0, where=self._absent_px)

    def uncount(self, count: npt.NDArray[np.uint16]) -> None:
        if self._absent_px is not None:
            np.subtract(count, self._absent_px, out=count)


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

    A float32 C-contiguous frame's band is returned as a view (the update only reads it and
    ignores its values outside the footprint); another is copied as float32.
    """

    def __init__(self, data: FloatArray, fp: BoolArray) -> None:
        self.data = data
        self.fp = fp

    def __call__(self, r0: int, r1: int, scratch: _Scratch) -> tuple[FloatArray, _Cover]:
        band = self.data[r0:r1]
        cover = _MaskCover(self.fp[r0:r1], self.data.shape[2])
        if band.dtype == np.float32 and band.flags.c_contiguous:
            return band.reshape(r1 - r0, -1), cover
        x = scratch.x[: r1 - r0]
        np.copyto(x.reshape(band.shape), band, casting="same_kind")
        return x, cover


class _Scratch:
    """Working buffers reused across the bands of one add: (band_rows, cols * C) per sample,
    (band_rows, cols) per pixel.

    ``n``, ``ratio``, ``inc`` and ``thr`` are touched only by bands judged densely, so usually
    never paged in.
    """

    def __init__(self, rows: int, cols: int, channels: int) -> None:
        shape, pixels = (rows, cols * channels), (rows, cols)
        self.x, self.delta, self.t, self.u, self.var = (
            np.empty(shape, dtype=np.float32) for _ in range(5)
        )
        self.weight, self.kept, self.z, self.n, self.ratio, self.inc, self.thr = (
            np.empty(pixels, dtype=np.float32) for _ in range(7)
        )
        self.flag = np.empty(pixels, dtype=bool)
        self.screen = np.zeros((1, channels), dtype=np.float32)
        """:meth:`LiveStack._screen_weights` of this add."""
        self.limit = np.float32(np.inf)
        """The screen's limit: the quantile times :data:`_SCREEN_MARGIN`."""
