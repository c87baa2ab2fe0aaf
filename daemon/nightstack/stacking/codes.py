"""16-bit stochastically rounded float codes: how a live stack stores a variance (and a live
drizzle its weight sums) in half the memory of a float32.

A code is a float32's top 16 bits without the sign (values are never negative): 5 bits of
exponent from 2^-30 and 11 of mantissa. The 12 dropped bits are rounded *stochastically* from a
fixed pseudo-random table (:func:`dither`; each (frame, band) reads it from its own start,
:func:`dither_start`), so a state is reproducible bit for bit and a slowly changing statistic
does not stall on a rounding step (see :func:`encode`). Users: :mod:`nightstack.stacking.live`
(per-sample variances) and :mod:`nightstack.stacking.live_drizzle` (pooled variances and
weight sums, scaled into the code's range).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_SPREAD_DROP = 12
"""Low mantissa bits of a float32 variance not stored: the code keeps 11 of its 23 (0.05 % at
worst, 0.024 % on average, stochastically rounded: see :func:`encode`)."""

_SPREAD_MIN_EXPONENT = -30
"""Code 0 is the variance 2^-30 (a std of 3.1e-5, an eighth of a 12-bit ADU): smaller variances
are stored as it. They never matter: the rejection floor is at least 1/4096 (a variance of
2^-24) and the floor's median is then that floor. The 5 exponent bits of the code reach up to
a variance of 4 (a std of 2 in mosaic units, where data lie in 0 .. 1)."""

_SPREAD_OFFSET = (127 + _SPREAD_MIN_EXPONENT) << 23
"""float32 bits of 2^-30: a code is (bits - this) >> _SPREAD_DROP."""

_SPREAD_MAX_BITS = (int(np.iinfo(np.uint16).max) << _SPREAD_DROP) | ((1 << _SPREAD_DROP) - 1)
"""The largest offset float32 bits that code to a uint16 (the code 65535, a variance < 4)."""

_DITHER_PERIOD = 1 << 16
"""Length of the table of stochastic-rounding offsets; each (frame, band) reads it from its own
pseudo-random start (256 KB of int32 and a band's worth more, shared by every stack: it stays
in the CPU cache; a 4 MB table made the encoding's first pass twice as slow)."""

_DITHER_SEED = 20261201
"""Fixed seed: the offsets, hence a stack's state, are the same in every run (resume bit-exact)."""


_TABLE_TAIL = 1 << 17
"""The table's repeated head: a band of up to this many samples (a live stack's are 2^16) reads
it without wrapping."""


_dither_table: npt.NDArray[np.int32] | None = None


def dither(start: int, size: int) -> npt.NDArray[np.int32]:
    """(size,) int32 stochastic-rounding offsets for :func:`encode`, from a fixed table
    (a shuffle of 0 .. 2^_SPREAD_DROP - 1, each 16 times, minus :data:`_SPREAD_OFFSET`), from
    ``start`` on (cyclically, for a band longer than the table)."""
    global _dither_table
    if _dither_table is None:
        rng = np.random.default_rng(_DITHER_SEED)
        # each offset equally often: the rounding is unbiased over the table, not only in
        # expectation (a random table's mean, 1e-3 of a step off, biased the variance by +6e-4
        # after 3000 frames)
        steps = np.arange(1 << _SPREAD_DROP, dtype=np.int32)
        table = rng.permutation(np.tile(steps, _DITHER_PERIOD >> _SPREAD_DROP))
        table -= np.int32(_SPREAD_OFFSET)
        _dither_table = np.concatenate([table, table[:_TABLE_TAIL]])
    start %= _DITHER_PERIOD
    if start + size <= _dither_table.size:
        return _dither_table[start : start + size]
    return np.resize(np.roll(_dither_table[:_DITHER_PERIOD], -start), size)


def dither_start(frame: int, row: int) -> int:
    """Pseudo-random start in the dither table for frame number ``frame``, band row ``row``
    (Knuth's multiplicative hashes: unrelated starts for neighbouring frames and bands)."""
    return (frame * 2654435761 + row * 40503 + (frame * row) * 97) % _DITHER_PERIOD


def decode(code: npt.NDArray[np.uint16], out: npt.NDArray[np.float32]) -> None:
    """Population variances (float32, exact) of the uint16 ``code`` into ``out`` (same shape)."""
    bits = out.view(np.int32)
    np.copyto(bits, code)  # three plain passes: faster than one casting ufunc
    np.left_shift(bits, _SPREAD_DROP, out=bits)
    np.add(bits, _SPREAD_OFFSET, out=bits)


def encode(
    var: npt.NDArray[np.float32], dither: npt.NDArray[np.int32], out: npt.NDArray[np.uint16]
) -> None:
    """Code the float32 population variances ``var`` (>= 0) into ``out``; ``var`` is clobbered.

    The code is a 16-bit unsigned float: the float32's top bits without the sign (a variance is
    never negative), 5 bits of exponent from 2^-30 and 11 of mantissa. The dropped 12 bits are
    rounded *stochastically*: up with a probability equal to their value (``dither`` adds a
    uniform 0 .. 4095 to them before truncation). Rounding to nearest would be biased here: a
    variance changes by ~1/n of itself a frame, less than half a step after ~2000 frames, so
    most updates round back to the old code and the statistic stalls, a bias measured at -2 %
    after 3000 frames of 0.5 +- 1e-3 (and +30 % in a simulation of IEEE float16 holding the
    std, 10 mantissa bits). A value already exactly coded (a pixel the frame did not touch)
    keeps its code.
    """
    bits = var.view(np.int32)
    np.add(bits, dither, out=bits)
    np.clip(bits, 0, _SPREAD_MAX_BITS, out=bits)
    np.right_shift(bits, _SPREAD_DROP, out=bits)
    np.copyto(out, bits, casting="unsafe")  # exact: 0 .. 65535
