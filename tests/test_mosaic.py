"""nightstack.io.loaders.load_mosaic: the sensor mosaic of simulated DNGs (every Bayer phase),
Bayer FITS (offsets, bottom-up rows), the real Canon 550D and ALS M27 frames, and the files that
hold no mosaic. Values are exact (float32 of an integer difference over an integer span)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rawpy
import tifffile
from astropy.io import fits
from numpy.testing import assert_allclose, assert_array_equal

from nightstack.errors import DecodeError, NotMosaicError
from nightstack.frames import BAYER_PATTERNS, Mosaic
from nightstack.io.loaders import load, load_mosaic
from nightstack.simulate.dng import write_dng

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
CANON = REALDATA / "raw_canon_550d" / "colorchart.dng"
M27 = REALDATA / "seq_als_m27_asi224mc" / "Light_1069.fits"

BLACK, WHITE = 512, 16383


def _sites(pattern: str, colour: str) -> list[tuple[int, int]]:
    """(dy, dx) of ``colour`` in the 2x2 tile ``pattern``."""
    return [(i // 2, i % 2) for i, c in enumerate(pattern) if c == colour]


def _cfa(pattern: str, levels: dict[str, int], shape: tuple[int, int] = (34, 46)) -> np.ndarray:
    cfa = np.zeros(shape, np.uint16)
    for colour, adu in levels.items():
        for dy, dx in _sites(pattern, colour):
            cfa[dy::2, dx::2] = adu
    return cfa


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_dng_mosaic_every_pattern_exact_units(tmp_path: Path, pattern: str) -> None:
    levels = {"R": BLACK + 3000, "G": BLACK + 700, "B": BLACK - 20}  # blue below black: kept < 0
    cfa = _cfa(pattern, levels)
    path = write_dng(
        tmp_path / "f.dng",
        cfa,
        black_level=BLACK,
        white_level=WHITE,
        cfa_pattern=pattern,
        as_shot_neutral=(0.5, 1.0, 0.8),
        exposure_s=30.0,
    )
    mosaic = load_mosaic(path)
    assert mosaic.pattern == pattern
    assert mosaic.data.dtype == np.float32 and mosaic.shape == (34, 46)
    expected = (cfa.astype(np.float64) - BLACK) / (WHITE - BLACK)
    assert_allclose(mosaic.data, expected, rtol=1e-7, atol=0)
    assert float(mosaic.data.min()) < 0  # not clipped at black
    # AsShotNeutral (0.5, 1, 0.8) -> multipliers 1 / neutral, green 1
    assert_allclose(mosaic.white_balance, (2.0, 1.0, 1.25), rtol=1e-6)
    assert mosaic.saturation == 1.0
    assert mosaic.meta.exposure_s == 30.0
    assert load_mosaic(path, white_balance=[3, 2, 1, 2]).white_balance == (1.5, 1.0, 0.5)


def test_mosaic_grey_world_white_balance(tmp_path: Path) -> None:
    cfa = _cfa("GRBG", {"R": BLACK + 400, "G": BLACK + 1600, "B": BLACK + 800}, (64, 64))
    path = write_dng(
        tmp_path / "g.dng", cfa, black_level=BLACK, white_level=WHITE, cfa_pattern="GRBG"
    )
    assert_allclose(load_mosaic(path, white_balance="auto").white_balance, (4.0, 1.0, 2.0))


def test_raw_mosaic_is_held_as_its_adu(tmp_path: Path) -> None:
    """A raw's mosaic keeps LibRaw's visible ADU and levels (2 bytes a pixel); its float32
    values, formed on demand, and the grey-world balance computed from the ADU alone, are those
    of the formula over the whole float frame."""
    rng = np.random.default_rng(3)
    cfa = rng.integers(BLACK - 60, WHITE + 1, (66, 90), dtype=np.uint16)
    cfa[1::2, 0::2] //= 3  # the GRBG tile's blue, darker: a real balance to find
    path = write_dng(
        tmp_path / "n.dng", cfa, black_level=BLACK, white_level=WHITE, cfa_pattern="GRBG"
    )
    mosaic = load_mosaic(path, white_balance="auto")
    assert not mosaic.has_data and mosaic.adu is not None and mosaic.adu.dtype == np.uint16
    assert_array_equal(mosaic.adu, cfa)
    assert mosaic.black == (BLACK,) * 4 and mosaic.span == (WHITE - BLACK,) * 4
    expected = (cfa.astype(np.float32) - np.float32(BLACK)) / np.float32(WHITE - BLACK)
    assert_array_equal(mosaic.data, expected)
    assert mosaic.has_data and mosaic.data is mosaic.data  # formed once, kept
    means = {}
    for colour in "RB":
        ((dy, dx),) = _sites("GRBG", colour)
        plane = expected[dy::8, dx::8]
        means[colour] = float(plane[plane < 1.0].mean())
    greens = [expected[dy::8, dx::8] for dy, dx in _sites("GRBG", "G")]
    green = float(np.mean([float(g[g < 1.0].mean()) for g in greens]))
    wb = (green / means["R"], 1.0, green / means["B"])
    assert mosaic.white_balance == wb and wb[2] > 2.0


@pytest.mark.parametrize(("x_offset", "y_offset"), [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("bottom_up", [False, True])
def test_fits_mosaic_offsets_and_row_order(
    tmp_path: Path, x_offset: int, y_offset: int, bottom_up: bool
) -> None:
    # 11 rows, odd: a bottom-up flip keeps the parity of rows 0 and 10 but the test is exact
    # either way; stored sensor pixel (x + XBAYROFF, y + YBAYROFF) is RGGB.
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 65535, (11, 14), dtype=np.uint16)
    hdu = fits.PrimaryHDU(stored)
    hdu.header.update(BAYERPAT="RGGB", XBAYROFF=x_offset, YBAYROFF=y_offset, EXPTIME=6.0)
    hdu.header["CCD-TEMP"] = -9.5
    if bottom_up:
        hdu.header["ROWORDER"] = "BOTTOM-UP"
    hdu.writeto(tmp_path / "b.fits")
    mosaic = load_mosaic(tmp_path / "b.fits")
    top_down = stored[::-1] if bottom_up else stored
    assert_array_equal(mosaic.data, top_down.astype(np.float32) / np.float32(65535))
    # Truth: which stored pixels are red. Stored row r, col c is red when both sensor coordinates
    # (c + XBAYROFF, r + YBAYROFF) are even.
    rows = np.arange(11)[::-1] if bottom_up else np.arange(11)
    red = ((rows[:, None] + y_offset) % 2 == 0) & ((np.arange(14)[None, :] + x_offset) % 2 == 0)
    ((dy, dx),) = _sites(mosaic.pattern, "R")
    found = np.zeros_like(red)
    found[dy::2, dx::2] = True
    assert_array_equal(found, red)
    assert mosaic.meta.temperature_c == -9.5 and mosaic.meta.exposure_s == 6.0


def test_fits_mosaic_demosaics_like_load(tmp_path: Path) -> None:
    """The mosaic of a Bayer FITS holds the samples ``load`` demosaics (same units)."""
    cfa = _cfa("GBRG", {"R": 60000, "G": 0, "B": 0}, (12, 16))
    fits.PrimaryHDU(cfa, header=fits.Header({"BAYERPAT": "GBRG"})).writeto(tmp_path / "r.fits")
    mosaic = load_mosaic(tmp_path / "r.fits")
    frame = load(tmp_path / "r.fits")
    ((dy, dx),) = _sites("GBRG", "R")
    assert_allclose(frame.image[dy::2, dx::2, 0], mosaic.data[dy::2, dx::2], atol=1e-6)


def test_files_without_a_mosaic(tmp_path: Path) -> None:
    fits.PrimaryHDU(np.zeros((8, 8), np.uint16)).writeto(tmp_path / "mono.fits")
    fits.PrimaryHDU(np.zeros((3, 8, 8), np.uint16)).writeto(tmp_path / "rgb.fits")
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((8, 8, 3), np.uint16))
    for name, reason in [
        ("mono.fits", "mono image"),
        ("rgb.fits", r"shape \(3, 8, 8\)"),
        ("t.tif", "TIF file holds no sensor mosaic"),
    ]:
        with pytest.raises(NotMosaicError, match=reason):
            load_mosaic(tmp_path / name)
    # a linear (demosaiced) DNG: LibRaw decodes it, but there is no mosaic
    unit_matrix = [1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1]  # SRATIONAL identity
    tags = [
        (271, "s", 0, "Canon", True),  # Make
        (272, "s", 0, "Linear", True),  # Model
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50717, "H", 1, 4095, True),  # WhiteLevel
        (50721, "2i", 9, unit_matrix, True),  # ColorMatrix1
        (50728, "2I", 3, [1, 1, 1, 1, 1, 1], True),  # AsShotNeutral
    ]
    linear = np.full((64, 64, 3), 1000, np.uint16)
    tifffile.imwrite(tmp_path / "lin.dng", linear, photometric=34892, extratags=tags, subfiletype=0)
    assert load(tmp_path / "lin.dng").image.shape == (64, 64, 3)  # LibRaw's own path reads it
    with pytest.raises(NotMosaicError, match="no colour filter mosaic"):
        load_mosaic(tmp_path / "lin.dng")


def test_bad_files_keep_their_reason(tmp_path: Path) -> None:
    (tmp_path / "empty.dng").write_bytes(b"")
    (tmp_path / "cut.dng").write_bytes(b"II*\x00" + b"\x00" * 20)
    (tmp_path / "x.fits").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    with pytest.raises(DecodeError, match=r"^empty file"):
        load_mosaic(tmp_path / "empty.dng")
    with pytest.raises(DecodeError) as err:
        load_mosaic(tmp_path / "cut.dng")
    assert not isinstance(err.value, NotMosaicError) and "\n" not in err.value.reason
    with pytest.raises(DecodeError, match="not a FITS file: content is a JPEG image"):
        load_mosaic(tmp_path / "x.fits")
    with pytest.raises(ValueError, match="white_balance"):
        load_mosaic(tmp_path / "x.fits", white_balance="tungsten")


def test_mosaic_value_checks() -> None:
    with pytest.raises(ValueError, match="pattern"):
        Mosaic(path=Path("x"), data=np.zeros((2, 2), np.float32), pattern="RGBG")
    mosaic = Mosaic(path=Path("x"), data=np.zeros((2, 2), np.float32), pattern="BGGR")
    assert mosaic.replace(np.ones((2, 2), np.float32)).data.sum() == 4
    with pytest.raises(ValueError, match="shape"):
        mosaic.replace(np.ones((2, 3), np.float32))


@pytest.mark.skipif(not CANON.is_file(), reason="real data absent: " + str(CANON))
def test_real_canon_550d_mosaic() -> None:
    mosaic = load_mosaic(CANON)
    with rawpy.imread(str(CANON)) as raw:
        visible = raw.raw_image_visible.astype(np.float64)
        colours = raw.raw_colors_visible.copy()
        black = np.asarray(raw.black_level_per_channel, np.float64)[colours]
        white = float(raw.white_level)
        camera = raw.camera_whitebalance
    assert mosaic.pattern == "RGGB" and mosaic.shape == (1156, 1734)
    assert_allclose(mosaic.data, (visible - black) / (white - black), rtol=1e-6, atol=1e-7)
    assert_allclose(mosaic.white_balance, (camera[0] / camera[1], 1.0, camera[2] / camera[1]))
    assert mosaic.meta.camera == "Canon EOS Kiss X4"


@pytest.mark.skipif(not M27.is_file(), reason="real data absent: " + str(M27))
def test_real_m27_mosaic() -> None:
    mosaic = load_mosaic(M27)
    raw = fits.getdata(M27)
    assert mosaic.pattern == "RGGB" and mosaic.shape == (976, 1304)
    assert_array_equal(mosaic.data, raw.astype(np.float32) / np.float32(65535))
    assert mosaic.meta.iso == 180.0
