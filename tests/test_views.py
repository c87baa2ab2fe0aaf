"""The small files the page shows (products/views.py): the linear preview's size budget and
its round trip through FITS, and the last frame's JPEG."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from astropy.io import fits

from nightstack.products.views import (
    LINEAR_MIN_WIDTH,
    LINEAR_RATIO,
    linear_width,
    write_last_frame,
    write_linear_preview,
)


def test_the_linear_preview_of_a_24_mp_stack_costs_at_most_a_twentieth_of_its_mosaic(
    tmp_path: Path,
) -> None:
    mosaic = 6000 * 4000 * 2
    for channels in (1, 3):
        width = linear_width(4000, 6000, channels, 1600)
        image = np.ones((1067, 1600, channels), np.float32)
        written = write_linear_preview(tmp_path / "p.fits", image, width=width, header={})
        assert written == (tmp_path / "p.fits").stat().st_size
        assert written <= LINEAR_RATIO * mosaic
        bigger = write_linear_preview(tmp_path / "q.fits", image, width=width + 8, header={})
        assert bigger > LINEAR_RATIO * mosaic  # the widest that fits, near enough
    assert linear_width(4000, 6000, 3, 1600) == 773
    # a small sensor keeps a usable view; never wider than the preview or the stack
    assert linear_width(800, 1200, 3, 1600) == LINEAR_MIN_WIDTH
    assert linear_width(400, 500, 3, 1600) == 500
    assert linear_width(4000, 6000, 1, 600) == 600


def test_the_linear_preview_reads_back_within_a_quantum_with_its_gaps(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    image = rng.normal(0.1, 0.01, (60, 90, 3)).astype(np.float32)
    image[:5, :, :] = np.nan  # no frame covered it
    before = image.copy()
    write_linear_preview(tmp_path / "p.fits", image, width=90, header={"NCOMBINE": 7})
    assert np.array_equal(image, before, equal_nan=True)  # the caller's image is untouched
    header = fits.getheader(tmp_path / "p.fits")
    data = np.moveaxis(fits.getdata(tmp_path / "p.fits").astype(np.float32), 0, 2)
    assert header["BITPIX"] == 16 and header["NCOMBINE"] == 7
    assert header["ROWORDER"] == "TOP-DOWN"
    assert np.isnan(data[:5]).all() and np.isfinite(data[5:]).all()
    finite = before[5:]
    quantum = (finite.max() - finite.min()) / 65534
    assert np.abs(data[5:] - finite).max() <= quantum * 0.51 + 1e-7


def test_the_last_frame_is_a_stretched_preview_wide_jpeg(tmp_path: Path) -> None:
    plane = np.full((500, 800), 0.1, np.float32)
    plane[200:210, 300:310] = 0.9  # a star
    write_last_frame(tmp_path / "last.jpg", plane, width=400)
    shown = cv2.imread(str(tmp_path / "last.jpg"), cv2.IMREAD_UNCHANGED)
    assert shown.shape == (250, 400)
    assert shown[102, 152] > 200 and shown[20, 20] < 120
