"""writers.py: atomic files, 16-bit TIFF, float FITS, the auto-stretch and the preview."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from astropy.io import fits
from numpy.testing import assert_allclose

from nightstack.io.writers import atomic_path, stretch, write_fits, write_preview, write_tiff


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _image(rows: int = 40, cols: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = (0.05 + 0.3 * rng.random((rows, cols, 3))).astype(np.float32)
    image[:5, :7] = np.nan  # no coverage
    return image


# --------------------------------------------------------------------------- atomic files


def test_atomic_path_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "stack.tif"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".stack.tif.")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # untouched until the block succeeds
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_a_failure_inside_the_block_keeps_the_old_file_and_removes_the_temp(
    tmp_path: Path,
) -> None:
    target = tmp_path / "preview.jpg"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a ")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.jpg"]


@pytest.mark.parametrize("name", ["stack.tif", "stack.fits", "preview.jpg"])
def test_a_writer_failing_after_its_temp_file_exists_leaves_no_temp(
    tmp_path: Path, name: str
) -> None:
    # A real fault at the last step: the destination is a directory, so os.replace fails after
    # the data were written to the temporary file.
    target = tmp_path / name
    target.mkdir()
    with pytest.raises(OSError):
        if name.endswith(".tif"):
            write_tiff(target, _image())
        elif name.endswith(".fits"):
            write_fits(target, _image(), {"NCOMBINE": 1})
        else:
            write_preview(target, _image())
    assert _leftovers(tmp_path) == []
    assert target.is_dir() and list(target.iterdir()) == []


def test_a_refused_fits_card_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ASCII"):
        write_fits(tmp_path / "stack.fits", _image(), {"OBJECT": "M27 \u00e9"})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- TIFF


def test_linear_tiff_fixed_scale_maps_full_scale_to_65535_and_keeps_0_for_no_coverage(
    tmp_path: Path,
) -> None:
    image = _image()
    image[0, 0, :] = 0.0  # a covered pixel at the black level
    image[0, 1, :] = 1.7  # above full scale (a clipped highlight)
    write_tiff(tmp_path / "stack.tif", image)  # fixed is the default
    with tifffile.TiffFile(tmp_path / "stack.tif") as tif:
        pixels = tif.asarray()
        info = json.loads(tif.pages[0].description)  # type: ignore[union-attr]
    assert info["data_min"] == 0.0 and info["data_max"] == 1.0 and info["scale"] == 65535
    finite = np.isfinite(image)
    expected = np.clip(np.rint(np.nan_to_num(image).astype(np.float64) * 65535), 1, 65535)
    assert np.array_equal(pixels[finite], expected[finite].astype(np.uint16))
    assert np.all(pixels[~finite] == 0) and pixels[finite].min() >= 1
    assert np.all(pixels[0, 1] == 65535) and np.all(pixels[0, 0] == 1)
    # two images with the same data give the same pixels whatever else they hold
    dimmer = image.copy()
    dimmer[5:, :, :] *= 0.5
    write_tiff(tmp_path / "other.tif", dimmer)
    other = tifffile.imread(tmp_path / "other.tif")
    assert np.array_equal(other[:5], pixels[:5])


def test_linear_tiff_range_scale_maps_the_finite_range_onto_16_bits(tmp_path: Path) -> None:
    image = _image()
    write_tiff(tmp_path / "stack.tif", image, scale="range")
    with tifffile.TiffFile(tmp_path / "stack.tif") as tif:
        pixels = tif.asarray()
        info = json.loads(tif.pages[0].description)  # type: ignore[union-attr]
    assert pixels.shape == (40, 60, 3) and pixels.dtype == np.uint16
    lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    assert info["data_min"] == lo and info["data_max"] == hi
    assert info["stretched"] is False
    assert_allclose(info["scale"], 65535 / (hi - lo))
    finite = np.isfinite(image)
    assert pixels.max() == 65535 and pixels[finite].min() == 0  # no clipping: full range used
    assert np.all(pixels[~finite] == 0)  # no coverage
    # linear: value = data_min + pixel / scale, to half a 16-bit step
    back = info["data_min"] + pixels / info["scale"]
    assert_allclose(back[finite], image[finite], rtol=0, atol=0.5 / info["scale"] + 1e-7)
    assert _leftovers(tmp_path) == []


def test_mono_tiff_is_two_dimensional_and_stretched_option_is_recorded(tmp_path: Path) -> None:
    mono = _image()[:, :, :1]
    write_tiff(tmp_path / "mono.tif", mono)
    assert tifffile.imread(tmp_path / "mono.tif").shape == (40, 60)
    write_tiff(tmp_path / "shown.tif", mono, stretched=True)
    with tifffile.TiffFile(tmp_path / "shown.tif") as tif:
        pixels = tif.asarray()
        info = json.loads(tif.pages[0].description)  # type: ignore[union-attr]
    assert info["stretched"] is True
    expected = np.rint(stretch(mono)[:, :, 0].astype(np.float64) * 65535)
    assert np.array_equal(pixels, expected.astype(np.uint16))


# --------------------------------------------------------------------------- FITS


def test_fits_is_float32_top_down_colour_cube_with_the_header(tmp_path: Path) -> None:
    image = _image()
    image[10, :, 0] = 0.9  # a marked row to check orientation
    header = {
        "NCOMBINE": 12,
        "EXPTIME": 720.0,
        "DATE-OBS": datetime(2024, 8, 1, 22, 31, 5, tzinfo=UTC),
        "DATE-END": "2024-08-01T23:31:05",
        "SWCREATE": ("nightstack 0.1.0", "software"),
        "STACKMTH": "sigma_clip",
        "NIGHTSTACK_SETTINGS": json.dumps({"sigma": 3.0, "maxiters": 5, "notes": "x" * 120}),
        "SKIPPED": None,
    }
    write_fits(tmp_path / "stack.fits", image, header)
    with fits.open(tmp_path / "stack.fits") as hdul:
        data = hdul[0].data
        hdr = hdul[0].header
    assert data.dtype == np.dtype(">f4") and data.shape == (3, 40, 60)
    assert (hdr["NAXIS"], hdr["NAXIS1"], hdr["NAXIS2"], hdr["NAXIS3"]) == (3, 60, 40, 3)
    assert hdr["ROWORDER"] == "TOP-DOWN"
    assert np.array_equal(np.moveaxis(data, 0, 2), image, equal_nan=True)
    assert np.all(data[0, 10] == np.float32(0.9))  # row 0 of the array is written first
    assert np.isnan(data[:, :5, :7]).all() and not np.isnan(data[:, 5:, :]).any()
    assert hdr["NCOMBINE"] == 12 and hdr["EXPTIME"] == 720.0
    assert hdr["DATE-OBS"] == "2024-08-01T22:31:05+00:00"
    assert hdr["DATE-END"] == "2024-08-01T23:31:05"
    assert hdr["SWCREATE"] == "nightstack 0.1.0" and hdr.comments["SWCREATE"] == "software"
    assert json.loads(hdr["NIGHTSTACK_SETTINGS"])["notes"] == "x" * 120  # HIERARCH + CONTINUE
    assert "SKIPPED" not in hdr


def test_mono_fits_is_two_dimensional(tmp_path: Path) -> None:
    write_fits(tmp_path / "mono.fits", _image()[:, :, 1], {"NCOMBINE": 1})
    with fits.open(tmp_path / "mono.fits") as hdul:
        assert hdul[0].data.shape == (40, 60) and hdul[0].header["NAXIS"] == 2


# --------------------------------------------------------------------------- stretch, preview


def _faint_blob_sky(rows: int = 300, cols: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Linear sky with different channel backgrounds and a faint (1.5 sigma peak) galaxy."""
    rng = np.random.default_rng(4)
    noise = 0.002
    y, x = np.mgrid[0:rows, 0:cols]
    blob = 1.5 * noise * np.exp(-((x - 200) ** 2 + (y - 150) ** 2) / (2 * 25.0**2))
    background = np.array([0.05, 0.08, 0.03])
    image = background + blob[..., None] + noise * rng.standard_normal((rows, cols, 3))
    core = (x - 200) ** 2 + (y - 150) ** 2 < 10**2
    return image.astype(np.float32), core


def test_stretch_puts_the_sky_at_a_quarter_neutral_and_shows_a_faint_blob() -> None:
    image, core = _faint_blob_sky()
    image[:20, :20] = np.nan
    shown = stretch(image)
    assert shown.dtype == np.float32 and shown.shape == image.shape
    assert shown.min() >= 0 and shown.max() <= 1
    sky = ~core
    sky[:20, :20] = False
    medians = [float(np.median(shown[..., c][sky])) for c in range(3)]
    assert_allclose(medians, 0.25, atol=0.02)  # each channel's sky at 0.25: neutral grey
    assert np.all(shown[:20, :20] == 0)  # NaN -> 0
    # The blob (1.5 sigma in linear units, invisible in a linear 8-bit view: 0.003 of full
    # scale) lifts well above the sky once stretched.
    blob = float(np.mean(shown[core]))
    sky_spread = float(np.std(np.mean(shown, axis=2)[sky]))
    assert blob > 0.25 + 0.1 and blob - 0.25 > 3 * sky_spread / np.sqrt(3)
    linear8 = np.rint(image[150, 200] * 255) - np.rint(image[5, 300] * 255)
    assert np.abs(linear8).max() <= 2


def test_stretch_of_a_flat_or_empty_image_is_defined() -> None:
    assert np.all(stretch(np.full((5, 6, 3), 0.2, np.float32)) == 0)
    assert np.all(stretch(np.full((5, 6), np.nan, np.float32)) == 0)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_preview_is_resized_stretched_and_in_rgb_order(tmp_path: Path, suffix: str) -> None:
    image, _ = _faint_blob_sky(300, 400)
    image[:, :200, 0] += 0.2  # left half much redder
    path = tmp_path / f"preview{suffix}"
    write_preview(path, image, width=200)
    shown = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # BGR
    assert shown.shape == (150, 200, 3) and shown.dtype == np.uint8
    red, blue = shown[:, :, 2].astype(int), shown[:, :, 0].astype(int)
    assert red[:, :90].mean() > red[:, 110:].mean() + 50
    assert abs(blue[:, :90].mean() - blue[:, 110:].mean()) < 20
    assert _leftovers(tmp_path) == []


def test_preview_never_enlarges_and_refuses_unknown_formats(tmp_path: Path) -> None:
    write_preview(tmp_path / "small.jpg", _image()[:, :, :1], width=1600)
    assert cv2.imread(str(tmp_path / "small.jpg"), cv2.IMREAD_UNCHANGED).shape == (40, 60)
    with pytest.raises(ValueError, match="jpg"):
        write_preview(tmp_path / "preview.gif", _image())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.jpg"]


def test_an_already_reduced_image_is_written_without_resampling(tmp_path: Path) -> None:
    image = _image(30, 50)
    for width in (50, 80):  # exactly the width, or narrower
        write_preview(tmp_path / "p.png", image, width=width)
        shown = cv2.imread(str(tmp_path / "p.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
        assert np.array_equal(shown, np.rint(stretch(image) * 255).astype(np.uint8))


@pytest.mark.slow
def test_the_preview_of_a_24_mp_stack_is_1600_px_wide(tmp_path: Path) -> None:
    """(Its time is the pipeline benchmark's, never a unit test's.)"""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((4000, 6000, 3), dtype=np.float32)
    image *= 0.002
    image += 0.05
    write_preview(tmp_path / "preview.jpg", image)
    assert cv2.imread(str(tmp_path / "preview.jpg")).shape == (1067, 1600, 3)
