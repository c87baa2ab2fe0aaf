"""The live Bayer drizzle: a Bayer session's live stack when ``drizzle`` is on, O(pixels) a frame.

Each stored frame's sensor sites are dropped onto the output grid as the final drizzle drops
them (:func:`nightstack.stacking.drizzle.drop_rows`, band by band, read straight from the frame
store's file: no demosaic, no warped copy), so the live preview, the page, ``live.fits`` and a
live-only final show the drizzled image, ``scale`` times the reference grid.

State (whatever the number of frames): per output pixel and channel a float32 running *weighted*
mean of the frames' drizzled values (a frame's value there is its drops' weighted mean, its
weight their overlap) and the sum of the weights (``W``); per output pixel one *pooled relative
variance* ``rho``: the channels' weighted population variances over their squared floors,
averaged (``v_c = rho floor_c^2`` is what a channel is judged against). The weights and ``rho``
are the live stack's 16-bit stochastically rounded float codes
(:mod:`nightstack.stacking.codes`; ``W`` scaled by 2^-17 into the code's range, so it reaches
2^19 and 0 stays 0; ``rho`` by 2^-16, up to a std 512 times the floor). 4 + 2 + 2 / 3 = 6.67
bytes a sample, the demosaic live stack's: 480 MB at 24 MP for ``1x``, 1.92 GB for ``2x`` (4x
the pixels; :func:`nightstack.stacking.budget.live_drizzle_refusal` says when it does not fit).
The channels keep separate weights because a frame drops different amounts of each colour on a
pixel (a red site covers a quarter of the sensor); the variance is pooled to stay within the
demosaic stack's memory (a per-channel variance code would make it 8 bytes, 576 MB): on the sky
every channel's variance is its floor's (the noise), so nothing is lost; at a coloured star the
strongest channel is judged against the channels' mean relative spread, a little tighter than
its own.

Update of a pixel's channel with weight sum ``W``, mean ``m``, variance ``v`` by a value ``x``
of weight ``w`` (West's weighted Welford): ``r = w / (W + w)``, ``m += r (x - m)``,
``v = (v + r (x - m_old)^2) (1 - r)``, ``W += w``; in float32 from the decoded state, per
channel, ``rho`` then the mean over the channels of ``v / floor^2`` (a channel the frame does not
reach counts ``rho`` itself). The variance is kept from the warm-up on (it is judged against
only then). A pixel a frame does not reach keeps its state bit for bit.

Rejection, per channel (a drop carries one colour; a satellite or a hot pixel is high in each
colour it touches): once warmed up, a value is rejected when ``(x - m)^2 > kappa^2 (1 + 1 / W)
max(v (1 + 1 / W), floor^2)`` where ``W`` is at least :data:`_MIN_WEIGHT` (every weight being at
most 1, the values are at least ``W``, and most frames leave one on a pixel, so at least ``W +
1``: the unbiased variance is at most ``v (1 + 1 / W)``, the mean's own variance at most ``v /
W``), ``floor`` per channel the median std of the warm-up frames' values (at least live.py's
absolute floor). Measured on a simulated drifting night (14 frames, 1x, a satellite in frame 9):
0.62 % of the values of its sky rows (stars and trail included) rejected after the warm-up (the
demosaic live stack: 0.8 to 0.9 % of the samples of 16-frame simulated nights); 13 % on its
foreground, fixed to the camera while the sky drifts.

The first ``warmup`` frames are clipped as a batch by the final drizzle's own band clip
(:func:`~nightstack.stacking.drizzle.clip_band`: each value against the *other* frames' weighted
mean and spread), read back from the store, or held as their 16-bit mosaics (2 bytes a sensor
pixel each) without one.

Crash state: :mod:`nightstack.stacking.checkpoint` saves and restores it bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nightstack.arrays import FloatArray
from nightstack.registration.normalize import Normalization
from nightstack.stacking.codes import decode, dither, dither_start, encode
from nightstack.stacking.drizzle import (
    Codes,
    Drizzle,
    StoredCodes,
    clip_band,
    drop_rows,
    frame_rows,
)
from nightstack.stacking.live import FLOOR_ABS, LiveStack, check_state, shrink_bands
from nightstack.stacking.store import FrameStore, MosaicLayout, StoredFrame

BYTES_PER_SAMPLE = 4 + 2 + 2 / 3
"""State bytes per output pixel and channel: float32 mean and 16-bit weight code per channel,
a 16-bit pooled variance code per pixel."""

_BAND_ROWS = 16
"""Output rows dropped and updated at a time: ~20 MB of float64 temporaries at 6000 columns
(a 24 MP frame), freed after each band."""

_WARMUP_BAND_ROWS = 16
"""Output rows of the warm-up batch clip at a time (its accumulators: ~5 float64 bands)."""

_WEIGHT_SCALE = 2.0**-17
"""A weight sum ``W`` is coded as ``W x 2^-17`` with the variance's code (2^-30 .. 4): up to
2^19 (65535 frames at 2x drop 1 reach 65535), and below 2^-13 (a sliver of a corner) it is 0."""

_RHO_SCALE = 2.0**-16
"""``rho`` (a variance over the floor's) is coded as ``rho x 2^-16``: up to 2^18 (a std 512
times the floor: a star's core), down to 2^-14."""

_WEIGHT_DITHER = 7919
"""Offset of the weight codes' stochastic-rounding start from the variances' (uncorrelated)."""

_MIN_WEIGHT = 1.0
"""A channel is judged only once its weight sum reaches a whole drop (at 1x drop 1 a red or
blue pixel gets a quarter of a drop a frame on average: about 4 frames, the warm-up's; green
about 2)."""

_FLOOR_BAND_STEP = 8
"""The floor is measured on every 8th band of the warm-up batch (an eighth of its time)."""


@dataclass
class DrizzleState:
    """A live drizzle's whole state: ``mean`` (rows, cols, 3) float32, ``weight`` the same shape
    uint16 codes (weight sum x 2^-17), ``spread`` (rows, cols) uint16 codes (pooled relative
    variance x 2^-16), ``floor`` (3,) float32, the
    warm-up frames still ``pending`` (a store-less stack) as (record, (rows, cols) uint16
    mosaic codes), and the two counters (all on the output grid)."""

    mean: npt.NDArray[np.float32]
    spread: npt.NDArray[np.uint16]
    weight: npt.NDArray[np.uint16]
    floor: npt.NDArray[np.float32]
    pending: list[tuple[StoredFrame, npt.NDArray[np.uint16]]]
    frames: int
    rejected: int


class LiveDrizzle:
    """Running weighted drizzle with per-channel rejection (see the module docstring).

    The interface of :class:`~nightstack.stacking.live.LiveStack` the session, the checkpoint
    and the previews use, on the output grid (``shape`` is ``drizzle.scale`` x the reference's;
    ``channels`` is 3). Frames come from ``store`` (:meth:`catch_up`; frame k of this stack is
    frame k of the store) or, live-only, as mosaics (:meth:`add_mosaic`, :meth:`add_stored`).

    Parameters
    ----------
    reference : (int, int)
        (rows, cols) of the reference grid.
    drizzle : Drizzle
        Output scale and drop size.
    kappa : float
        Rejection threshold in standard deviations (> 0).
    warmup : int
        Frames clipped as a batch before running rejection starts (>= 1; 1 = no batch).
    store : FrameStore, optional
        The session's store of mosaics.
    """

    channels = 3

    def __init__(
        self,
        reference: tuple[int, int],
        drizzle: Drizzle,
        *,
        kappa: float = 3.0,
        warmup: int = 5,
        store: FrameStore | None = None,
    ) -> None:
        self.reference = (int(reference[0]), int(reference[1]))
        if self.reference[0] < 1 or self.reference[1] < 1:
            raise ValueError(f"bad reference geometry {self.reference}")
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be > 0, not {kappa}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, not {warmup}")
        if store is not None and (store.shape != self.reference or store.channels != 3):
            raise ValueError("the store's geometry differs from the stack's")
        self.drizzle = drizzle
        self.shape = drizzle.shape(self.reference)
        """(rows, cols) of the output grid."""
        self.kappa = float(kappa)
        self.warmup = int(warmup)
        self.store = store
        full = (*self.shape, 3)
        self._mean = np.zeros(full, np.float32)
        self._spread = np.zeros(self.shape, np.uint16)
        self._weight = np.zeros(full, np.uint16)
        self._floor = np.zeros(3, np.float32)
        self._pending: list[tuple[StoredFrame, npt.NDArray[np.uint16]]] = []
        self.frames = 0
        """Frames added so far."""
        self.rejected = 0
        """Values (output pixel x channel x frame) rejected so far, warm-up batch included."""

    # ----------------------------------------------------------------- public

    @property
    def warmed_up(self) -> bool:
        """True once running rejection is active."""
        return self.frames >= self.warmup

    @property
    def state_bytes(self) -> int:
        """Bytes of the state arrays (mean, spread, weight), i.e. of a checkpoint: 6.67 a
        sample."""
        return self._mean.nbytes + self._spread.nbytes + self._weight.nbytes

    @property
    def floor(self) -> npt.NDArray[np.float32]:
        """(3,) float32 per-channel std floor used for rejection (0 before warm-up)."""
        return self._floor.copy()

    @property
    def weight(self) -> npt.NDArray[np.float64]:
        """(rows, cols, 3) float64 sum of the kept values' weights (as coded; 0 where none)."""
        return self._weights(self._weight)

    @property
    def variance(self) -> npt.NDArray[np.float32]:
        """(rows, cols, 3) float32 weighted population variance each channel is judged against
        (``rho floor^2``, as coded; 0 where no value was kept, and before the warm-up)."""
        rho = np.empty(self.shape, np.float32)
        decode(self._spread, rho)
        rho *= np.float32(1.0 / _RHO_SCALE)
        rho *= self._spread != 0
        out = rho[..., np.newaxis] * np.square(self._floor)
        np.copyto(out, 0.0, where=self._weight == 0)
        return out

    def catch_up(self) -> int:
        """Add the store's frames this stack has not seen yet; returns how many."""
        if self.store is None:
            raise ValueError("catch_up needs a store")
        added = 0
        while self.frames < len(self.store):
            self._add(self.store.frame(self.frames), StoredCodes(self.store, self.frames))
            added += 1
        return added

    def add_mosaic(
        self,
        codes: npt.NDArray[np.uint16],
        layout: MosaicLayout,
        matrix: FloatArray,
        normalization: Normalization | None = None,
        *,
        weight: float = 1.0,
        name: str = "",
    ) -> int:
        """Add one frame held in memory (a live-only session): its (rows, cols) uint16 mosaic
        ``codes`` (:func:`nightstack.io.demosaic.quantise`), as the store would hold it;
        returns its rejected values. Held until the warm-up batch needs them: then a copy."""
        pending = self.store is None and not self.warmed_up
        data = np.array(codes, np.uint16, copy=True) if pending else np.asarray(codes, np.uint16)
        record = StoredFrame(
            file="",
            matrix=(
                (float(matrix[0][0]), float(matrix[0][1]), float(matrix[0][2])),
                (float(matrix[1][0]), float(matrix[1][1]), float(matrix[1][2])),
            ),
            src_shape=(int(data.shape[0]), int(data.shape[1])),
            weight=float(weight),
            name=name,
            interpolation="bilinear",
            normalization=None if normalization is None else normalization.as_json(),
            mosaic=layout,
        )
        return self._add_held(record, data)

    def add_stored(self, store: FrameStore, i: int) -> int:
        """Add frame ``i`` of ``store`` as a frame of its own (a live-only session's resume:
        this stack has no store); returns its rejected values."""
        record = store.frame(i)
        return self._add_held(record, StoredCodes(store, i)[0 : record.src_shape[0]])

    def detach_store(self) -> None:
        """Go on without the store (live-only): the warm-up frames the batch clip still needs
        are read back into memory first (their mosaics, at most ``warmup`` - 1)."""
        store = self.store
        if store is None:
            return
        if not self.warmed_up:
            for i in range(self.frames):
                record = store.frame(i)
                self._pending.append((record, StoredCodes(store, i)[0 : record.src_shape[0]]))
        self.store = None

    def result(self) -> npt.NDArray[np.float32]:
        """(rows, cols, 3) float32 current drizzle; NaN where no value was kept."""
        return self.result_band(0, self.shape[0])

    def result_band(self, row_start: int, row_stop: int) -> npt.NDArray[np.float32]:
        """Rows ``row_start:row_stop`` of :meth:`result` (a copy; for streaming writers)."""
        out = self._mean[row_start:row_stop].copy()
        np.copyto(out, np.nan, where=self._weight[row_start:row_stop] == 0)
        return out

    def preview_image(self, width: int) -> npt.NDArray[np.float32]:
        """The current drizzle shrunk to ``width`` columns (see
        :func:`~nightstack.stacking.live.shrink_bands`)."""
        return shrink_bands(self.result_band, self.shape, 3, width)

    def state(self) -> DrizzleState:
        """The state (views of its arrays, not copies), for a checkpoint."""
        return DrizzleState(
            self._mean,
            self._spread,
            self._weight,
            self._floor.copy(),
            list(self._pending),
            self.frames,
            self.rejected,
        )

    def restore(self, state: DrizzleState) -> None:
        """Take over ``state`` (its arrays, not copies), shapes and dtypes checked."""
        full = (*self.shape, 3)
        check_state(
            "drizzle state",
            ("mean", state.mean, np.float32, full),
            ("spread", state.spread, np.uint16, self.shape),
            ("weight", state.weight, np.uint16, full),
        )
        for record, codes in state.pending:
            if codes.shape != tuple(record.src_shape) or codes.dtype != np.uint16:
                raise ValueError(f"drizzle state warm-up frame {codes.shape} is not its record's")
        self._mean, self._spread, self._weight = state.mean, state.spread, state.weight
        self._floor = np.asarray(state.floor, np.float32).copy()
        self._pending = list(state.pending)
        self.frames, self.rejected = int(state.frames), int(state.rejected)

    # ----------------------------------------------------------------- internals

    def _add_held(self, record: StoredFrame, codes: npt.NDArray[np.uint16]) -> int:
        if self.store is not None:
            raise ValueError("a stack with a store adds its frames by catch_up")
        if not self.warmed_up:
            self._pending.append((record, codes))
        return self._add(record, codes)

    def _add(self, record: StoredFrame, codes: Codes) -> int:
        """Add the next frame, dropped band by band from its ``codes``."""
        if record.mosaic is None:
            raise ValueError("a live drizzle needs frames stored as their mosaic (Bayer)")
        if self.frames >= np.iinfo(np.uint16).max:
            raise ValueError("a live drizzle holds at most 65535 frames")
        number = self.frames + 1
        if number == self.warmup:
            self.frames = number
            rejected = self._rebuild_from_warmup()
        else:
            testing = self.warmed_up
            rejected = 0
            for r0 in range(0, self.shape[0], _BAND_ROWS):
                r1 = min(r0 + _BAND_ROWS, self.shape[0])
                first, stop = frame_rows(record, self.reference, self.drizzle, r0, r1)
                if stop <= first:
                    continue
                t, w = drop_rows(codes[first:stop], first, record, self.reference,
                                 self.drizzle, r0, r1)  # fmt: skip
                rejected += self._update_band(r0, r1, t, w, testing, number)
            self.frames = number
        self.rejected += rejected
        return rejected

    @staticmethod
    def _weights(code: npt.NDArray[np.uint16]) -> npt.NDArray[np.float64]:
        """Weight sums (float64) of their codes: 0 for code 0."""
        scaled = np.empty(code.shape, np.float32)
        decode(code, scaled)
        out = scaled.astype(np.float64) / _WEIGHT_SCALE
        np.copyto(out, 0.0, where=code == 0)
        return out

    def _store_band(
        self,
        r0: int,
        r1: int,
        mean: npt.NDArray[np.floating[Any]] | None,
        rho: npt.NDArray[np.floating[Any]] | None,
        weight: npt.NDArray[np.floating[Any]],
        number: int,
    ) -> None:
        """Write rows r0:r1's new mean (None: already in place), pooled relative variance
        (None: unchanged) and weight sums (codes with frame ``number``'s dither)."""
        if mean is not None:
            self._mean[r0:r1] = mean
        start = dither_start(number, r0)
        if rho is not None:
            v = np.asarray(rho, np.float32) * np.float32(_RHO_SCALE)
            encode(v, dither(start, v.size).reshape(v.shape), self._spread[r0:r1])
        w = np.asarray(weight, np.float32) * np.float32(_WEIGHT_SCALE)
        encode(w, dither(start + _WEIGHT_DITHER, w.size).reshape(w.shape),
                       self._weight[r0:r1])  # fmt: skip

    def _update_band(
        self,
        r0: int,
        r1: int,
        total: npt.NDArray[np.float64],
        weight: npt.NDArray[np.float64],
        testing: bool,
        number: int,
    ) -> int:
        """The weighted update of rows r0:r1 by one frame's ``total`` and ``weight`` (its
        drops' sums there), with rejection when ``testing``; returns the values rejected.

        In float32, without dividing by a weight that may be 0: with ``e = total - w m``
        (``w (x - m)``) and ``N = max(W + w, tiny)``: ``m += e / N``, ``v = (v + (e / w') (e /
        N)) (W / N)`` (``w' = max(w, tiny)``), i.e. the module docstring's update; a pixel the
        frame does not reach (``w = 0``, so ``e = 0``) keeps its mean, and ``W / N = 1``
        keeps its variance, bit for bit. Rejected where ``e^2 > w^2 kappa^2 (1 + 1 / W)
        max(v (1 + 1 / W), floor^2)``, ``W >= _MIN_WEIGHT``."""
        mean = self._mean[r0:r1]  # updated in place
        shape = mean.shape
        held = np.empty(shape, np.float32)
        code = self._weight[r0:r1]
        decode(code, held)
        held *= np.float32(1.0 / _WEIGHT_SCALE)
        held *= code != 0
        w = weight.astype(np.float32)
        e = total.astype(np.float32)
        e -= w * mean
        rejected = 0
        rho = None
        floor_sq = np.square(self._floor)
        if testing:
            rho = np.empty(self._spread[r0:r1].shape, np.float32)
            decode(self._spread[r0:r1], rho)
            rho *= np.float32(1.0 / _RHO_SCALE)
            rho *= self._spread[r0:r1] != 0
            with np.errstate(divide="ignore", invalid="ignore"):
                # each weight <= 1, so the effective number of values n is at least W: the
                # unbiased variance v n / (n - 1) at most v (1 + 1 / W) for W >= 1 (n >= W +
                # 1 then: every frame leaves a value on most pixels), the mean's variance v / W
                grow = np.float32(1.0) + np.float32(1.0) / held
                bound = rho[..., np.newaxis] * grow
                np.maximum(bound, np.float32(1.0), out=bound)
                bound *= floor_sq  # max(v (1 + 1 / W), floor^2), v = rho floor^2
                bound *= grow
                bound *= np.float32(self.kappa**2)
                bound *= w * w
            reject = e * e > bound
            reject &= held >= np.float32(_MIN_WEIGHT)
            reject &= w > 0
            rejected = int(np.count_nonzero(reject))
            if rejected:
                w[reject] = 0.0
                e[reject] = 0.0
        tiny = np.float32(1e-20)
        new = held + w
        safe = np.maximum(new, tiny)
        step = e / safe
        mean += step
        if rho is not None:
            # per channel (rho + (e / w) (e / N) / floor^2) W / N; rho where not reached
            e /= np.maximum(w, tiny)
            e *= step
            e /= floor_sq
            e += rho[..., np.newaxis]
            held /= safe
            e *= held
            np.copyto(e, rho[..., np.newaxis], where=w == 0)
            rho = e[..., 0] + e[..., 1]
            rho += e[..., 2]
            rho /= np.float32(3.0)
        self._store_band(r0, r1, None, rho, new, number)
        return rejected

    def _rebuild_from_warmup(self) -> int:
        """Clip the warm-up frames as a batch (the final drizzle's band clip, its spread at
        least the floor), rebuild mean, variance and weight sums from the kept values; returns
        the values rejected."""
        n = self.warmup
        records: list[StoredFrame]
        codes: list[Codes]
        if self.store is not None:
            records = [self.store.frame(i) for i in range(n)]
            codes = [StoredCodes(self.store, i) for i in range(n)]
        else:
            records = [record for record, _ in self._pending]
            codes = [held for _, held in self._pending]
        self._floor = self._batch_floor(codes, records)
        floor = self._floor.astype(np.float64)
        rejected = 0
        for r0 in range(0, self.shape[0], _WARMUP_BAND_ROWS):
            r1 = min(r0 + _WARMUP_BAND_ROWS, self.shape[0])
            clip = clip_band(codes, records, self.reference, self.drizzle, r0, r1, self.kappa,
                             floor, keep_drops=True)  # fmt: skip
            weight, total, square = clip.kept_weight, clip.kept_total, clip.kept_square
            every = (weight <= 0) & (clip.weight > 0)  # all rejected: the mean of all, as final
            with np.errstate(divide="ignore", invalid="ignore"):  # where() computes 0 / 0 too
                if every.any():
                    weight = np.where(every, clip.weight, weight)
                    total = np.where(every, clip.total, total)
                    square = np.where(every, clip.total * clip.total / clip.weight, square)
                mean = np.where(weight > 0, total / weight, 0.0)
                var = np.where(weight > 0, np.maximum(square / weight - mean * mean, 0.0), 0.0)
            has = weight > 0  # rho: the mean over the channels with values
            rho = np.sum(var / np.square(floor), axis=2) / np.maximum(np.sum(has, axis=2), 1)
            self._store_band(r0, r1, mean, rho, weight, n)
            rejected += clip.rejected
        self._pending.clear()
        return rejected

    def _batch_floor(
        self, codes: list[Codes], records: list[StoredFrame]
    ) -> npt.NDArray[np.float32]:
        """Per channel max(live.py's absolute floor, the median std of the warm-up frames'
        values): every :data:`_FLOOR_BAND_STEP`-th band of the batch, unclipped, each pixel's
        weighted variance made unbiased (x ``n / (n - 1)``, ``n = W^2 / sum w^2`` the
        effective number of values) where ``n >= 3``."""
        stds: list[list[npt.NDArray[np.float64]]] = [[], [], []]
        step = _WARMUP_BAND_ROWS * _FLOOR_BAND_STEP
        for r0 in range(0, self.shape[0], step):
            r1 = min(r0 + _WARMUP_BAND_ROWS, self.shape[0])
            clip = clip_band(codes, records, self.reference, self.drizzle, r0, r1, None)
            with np.errstate(divide="ignore", invalid="ignore"):
                n = clip.weight**2 / clip.kept_weight_sq
                mean = clip.total / clip.weight
                var = (clip.kept_square / clip.weight - mean * mean) * n / (n - 1.0)
            for c in range(3):
                ok = n[..., c] >= 3.0
                stds[c].append(np.sqrt(np.maximum(var[..., c][ok], 0.0)))
        floor = np.full(3, FLOOR_ABS, np.float32)
        for c in range(3):
            values = np.concatenate(stds[c]) if stds[c] else np.zeros(0)
            if values.size:
                floor[c] = max(FLOOR_ABS, float(np.median(values)))
        return floor


Live = LiveStack | LiveDrizzle
"""A session's live stack: demosaiced, or drizzled."""
