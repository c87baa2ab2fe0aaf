"""The small files the page shows (products/views.py): the linear preview's size budget and
its round trip through FITS, the last frame's JPEG, and a session writing both (only when
the web page is on)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from astropy.io import fits

from nightstack.config import load_settings
from nightstack.io.decoder import Decoder, load_kwargs
from nightstack.io.writers import stretch
from nightstack.pipeline.prepare import Preparer
from nightstack.products.views import (
    LAST_FRAME,
    LINEAR_MIN_WIDTH,
    LINEAR_PREVIEW,
    LINEAR_RATIO,
    linear_width,
    write_last_frame,
    write_linear_preview,
)
from nightstack.service.session import Session
from nightstack.simulate import simulate_night


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


def test_a_session_writes_them_with_its_preview_for_the_page_only(tmp_path: Path) -> None:
    raws = tmp_path / "raws"
    simulate_night(raws, frames=2, width=600, height=400, seed=3)
    sessions = {}
    for web in (True, False):
        settings = load_settings(
            None, {"output_dir": tmp_path / str(web), "web_enabled": web}, use_default=False
        )
        with Decoder(timeout_s=60, load_kwargs=load_kwargs(settings)) as decoder:
            preparer = Preparer(settings, decoder)
            session = Session.create(tmp_path / str(web), settings)
            for path in sorted(raws.glob("*.DNG")):
                assert session.ingest(preparer.prepare(path)).status == "accepted"
            session.write_preview()
            session.abandon()
        sessions[web] = session
    assert not (sessions[False].dir / LINEAR_PREVIEW).exists()  # no page, no extra writes
    assert not (sessions[False].dir / LAST_FRAME).exists()
    session = sessions[True]
    live = session.stacker.live
    assert live is not None
    image = live.preview_image(1600)
    # the live stack as the preview shows it, linear: its stretch is the preview's
    linear = np.moveaxis(fits.getdata(session.dir / LINEAR_PREVIEW).astype(np.float32), 0, 2)
    assert linear.shape == image.shape == (400, 600, 3)  # a small stack: not shrunk
    assert fits.getheader(session.dir / LINEAR_PREVIEW)["NCOMBINE"] == 2
    assert np.abs(stretch(linear) - stretch(image)).max() < 0.01
    last = cv2.imread(str(session.dir / LAST_FRAME), cv2.IMREAD_UNCHANGED)
    assert last.ndim == 2 and last.shape == (200, 300)  # the 2x2 binned luminance
