"""What one render of live.fits costs in memory, and that the band-by-band render is the
whole-image stretch to the bit.

A render used to hold four float copies of its shrunk image (the shrink, the stretch, the
strength's denominator, the encoder's clip: 4 x 31 MB at 2400 px of a 24 MP stack) and to read a
200 px render's bands 1920 stack rows at a time (46 MB, twice): the daemon's RSS grew by 253 MB
under looping renders (bench_hardening). Peaks are traced allocations (``tracemalloc`` sees
numpy's), not timings.
"""

from __future__ import annotations

import functools
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits

from _web import sky_stack, write_fits
from nightstack.io.writers import stretch
from nightstack.web import render
from nightstack.web.render import StretchRenderer

MB = 2**20


def _peak(fn: Callable[[], bytes]) -> tuple[int, bytes]:
    """The peak of traced allocations while ``fn`` runs, bytes, and its answer."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        answer = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, answer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2400 x 2000 colour live.fits (sky noise, NaN where nothing was stacked, a bright
    corner): a 2400 px render of it is not shrunk (f = 1), so the render's own float image
    would be as large as the stack (58 MB)."""
    rng = np.random.default_rng(4)
    data = rng.normal(0.1, 0.01, (3, 2000, 2400)).astype(np.float32)
    data[:, :300, -400:] = np.nan
    data[:, -50:, :80] = 0.9
    path = tmp_path_factory.mktemp("render") / "live.fits"
    write_fits(path, data)
    return path


def test_a_2400_px_render_holds_no_float_copy_of_its_image(stack: Path) -> None:
    """The peak of one 2400 px render (PNG, strength != 1, linked and not: every step at
    work) stays below one float32 copy of its image: the 8-bit image, a sample for the
    statistics and bands (the former render held four float copies and more)."""
    values = 2000 * 2400 * 3  # the output's pixels x channels: f = 1
    for linked in (True, False):
        render_it = functools.partial(
            StretchRenderer().render, stack, width=2400, strength=1.7, linked=linked, fmt="png"
        )
        peak, body = _peak(render_it)
        shown = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
        assert shown.shape == (2000, 2400, 3)
        assert values < peak < values * 4, (linked, peak / MB)  # 8-bit image < peak < float


def test_a_small_render_reads_a_few_rows_at_a_time(stack: Path) -> None:
    """A 200 px render (f = 12) reads at most 128 stack rows at a time, into buffers it
    reuses (the former render read 768 rows a band, twice over: 15 MB here, 92 MB at 24 MP)."""
    band = 128 * 2400 * 4  # 128 rows of one plane, float32
    peak, _ = _peak(
        functools.partial(StretchRenderer().render, stack, width=200, strength=1.0, linked=True)
    )
    assert peak < 2 * band + 2 * MB, peak / MB  # and a 200 px image, 0.4 MB as float32


def test_another_view_of_the_same_stack_is_one_pass(
    stack: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render passes over the file twice (statistics, then pixels); the statistics are kept
    per file and width, so another strength or the unlinked view reads the file once."""
    reads: list[int] = []
    rows = render.LiveFits.rows

    def counted(self: render.LiveFits, c: int, r0: int, r1: int) -> np.ndarray:
        reads.append(r1 - r0)
        return rows(self, c, r0, r1)

    monkeypatch.setattr(render.LiveFits, "rows", counted)
    renderer = StretchRenderer()
    renderer.render(stack, width=600, strength=1.0, linked=True)
    first = sum(reads)
    assert first == 2 * 3 * 2000  # two passes over three planes
    renderer.render(stack, width=600, strength=2.2, linked=False)
    assert sum(reads) - first == 3 * 2000


def test_a_live_fits_of_another_type_renders_the_same(tmp_path: Path) -> None:
    """Stacks nightstack did not write (float64 here) are read through astropy's section:
    the same picture as the float32 file."""
    data = np.moveaxis(_sky_with_holes(150, 330), 2, 0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_fits(tmp_path / "a" / "live.fits", data)
    fits.PrimaryHDU(data=data.astype(np.float64)).writeto(tmp_path / "b" / "live.fits")
    for fmt in ("png", "jpeg"):
        a, b = (
            StretchRenderer().render(
                tmp_path / d / "live.fits", width=200, strength=1.4, linked=False, fmt=fmt
            )
            for d in "ab"
        )
        assert a == b


def _sky_with_holes(rows: int, cols: int) -> np.ndarray:
    """A linear (rows, cols, 3) image with NaN (no coverage) in a corner and a saturated
    block, as a shrunk live.fits can be."""
    image = np.moveaxis(sky_stack(rows, cols, seed=5, cast=2.5), 0, 2).copy()
    image[: rows // 5, -cols // 4 :] = np.nan
    image[-20:, :30] = 4.0
    return image


@pytest.mark.parametrize("rows", [1, 127, 300])  # a band, under one, over two (128 rows each)
def test_the_band_by_band_pixels_are_the_whole_image_stretch(rows: int) -> None:
    """:func:`render.pixels` equals :func:`nightstack.io.writers.stretch` of the whole image, the
    strength's midtones transfer and the rounding to 8 bits, to the bit: linked, unlinked,
    mono, strength 1 and not."""
    image = _sky_with_holes(max(rows, 40), 90)[:rows]

    def want(linear: np.ndarray, strength: float, linked: bool) -> np.ndarray:
        if linked or linear.shape[2] == 1:
            shown = stretch(linear)
        else:
            shown = np.dstack([stretch(linear[:, :, c]) for c in range(linear.shape[2])])
        if strength != 1.0:
            m = np.float32(0.5**strength)
            den = shown * np.float32(2.0 * m - 1.0) - m
            shown = shown * np.float32(m - 1.0) / den
        values = np.rint(np.clip(shown, np.float32(0.0), np.float32(1.0)) * np.float32(255.0))
        pixels = values.astype(np.uint8)
        return pixels[:, :, ::-1] if pixels.shape[2] == 3 else pixels[:, :, 0]

    for strength in (1.0, 0.4, 2.7):
        for linked in (True, False):
            got = render.pixels(image, strength=strength, linked=linked)
            np.testing.assert_array_equal(got, want(image, strength, linked))
        mono = image[:, :, 1:2]
        np.testing.assert_array_equal(
            render.pixels(mono, strength=strength), want(mono, strength, True)
        )
    empty = np.full((rows, 7, 3), np.nan, dtype=np.float32)  # no coverage at all: black
    assert not render.pixels(empty, strength=2.0, linked=False).any()
