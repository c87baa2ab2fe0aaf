"""nightstack.io.loaders: real frames (ALS M27 FITS, Blackmagic DNG, truncated CR3s) and synthetic
FITS/TIFF/PNG/JPEG files with known pixel values. Tolerances are stated where not exact."""

from __future__ import annotations

import os
import resource
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import rawpy
import tifffile
from astropy.io import fits
from numpy.testing import assert_allclose, assert_array_equal

from nightstack.errors import DecodeError
from nightstack.io.decoder import Decoder
from nightstack.io.loaders import SUPPORTED_EXTENSIONS, load

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
M27 = REALDATA / "seq_als_m27_asi224mc" / "Light_1069.fits"
DNG = REALDATA / "raw_camera" / "Blackmagic.dng"
TRUNCATED_CR3 = sorted((REALDATA / "negative_truncated_cr3").glob("*.cr3"))

needs_m27 = pytest.mark.skipif(not M27.is_file(), reason="real data absent: " + str(M27))
needs_dng = pytest.mark.skipif(not DNG.is_file(), reason="real data absent: " + str(DNG))

RED_ON = 60000  # CFA value at the lit sites of the synthetic Bayer frames


def _block_mean(a: np.ndarray, b: int) -> np.ndarray:
    """Oracle: float64 reshape-mean over b x b blocks, trailing rows/cols dropped."""
    r, c = a.shape[0] // b, a.shape[1] // b
    return a[: r * b, : c * b].astype(np.float64).reshape(r, b, c, b).mean(axis=(1, 3))


def _write_fits(path: Path, data: np.ndarray, **cards: object) -> Path:
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key] = value
    hdu.writeto(path)
    return path


# --- real frames -----------------------------------------------------------------------------


@needs_m27
def test_m27_bayer_fits_shapes_bzero_and_superpixel() -> None:
    frame = load(M27)
    with fits.open(M27) as hdul:
        cfa = np.asarray(hdul[0].data)  # astropy applies BZERO 32768 -> uint16
    assert cfa.dtype == np.uint16
    assert frame.image.shape == (976, 1304, 3)
    assert frame.luminance.shape == (488, 652)
    assert frame.image.dtype == np.float32 and frame.luminance.dtype == np.float32
    assert frame.image.flags.c_contiguous
    # BZERO honoured: sky ~200 ADU of 65535; a wrapped int16 reading would be ~0.5 or negative.
    assert frame.image.min() >= 0.0 and frame.image.max() <= 1.0
    assert 0.001 < float(np.median(frame.luminance)) < 0.02
    # Luminance is the 2x2 superpixel of the CFA (float32 rounding only).
    assert_allclose(frame.luminance, _block_mean(cfa, 2) / 65535, rtol=0, atol=1e-7)
    # RGGB: away from the border the native samples survive demosaicing unchanged.
    inner = np.s_[2:-2:2, 2:-2:2]
    assert_array_equal(frame.image[2:-2:2, 2:-2:2, 0], np.float32(cfa[inner]) / np.float32(65535))
    blue = np.s_[3:-2:2, 3:-2:2]
    assert_array_equal(frame.image[blue][..., 2], np.float32(cfa[blue]) / np.float32(65535))
    assert frame.bin == 2
    assert frame.meta.exposure_s == 6.0
    assert frame.meta.iso == 180.0
    assert frame.meta.camera == "ZWO CCD ASI224MC"
    assert frame.meta.capture_time == datetime(2018, 9, 7, 22, 31, 45, 431000, tzinfo=UTC)


@needs_m27
def test_m27_bin4_is_2x2_mean_of_bin2() -> None:
    lum2 = load(M27).luminance
    lum4 = load(M27, bin=4).luminance
    assert lum4.shape == (244, 326)
    assert_allclose(lum4, _block_mean(lum2, 2), rtol=0, atol=1e-7)


@needs_dng
def test_blackmagic_dng_image_luminance_and_meta() -> None:
    frame = load(DNG)
    assert frame.image.shape == (2176, 4128, 3)
    assert frame.luminance.shape == (1088, 2064)
    assert frame.image.dtype == np.float32 and frame.luminance.dtype == np.float32
    assert np.isfinite(frame.image).all()
    assert frame.image.min() >= 0.0 and frame.image.max() <= 1.0
    assert 0.01 < float(frame.image.mean()) < 0.9  # a daytime scene, not black or white
    # Oracle: (2x2 mean of the visible CFA - black 512) / (white - black), straight from rawpy.
    with rawpy.imread(str(DNG)) as raw:
        cfa = raw.raw_image_visible.copy()
        black = float(np.mean(raw.black_level_per_channel))
        white = float(raw.white_level)
    assert_allclose(frame.luminance, (_block_mean(cfa, 2) - black) / (white - black), atol=1e-6)
    # user_flip=0: the CFA luminance and the demosaiced image share coordinates. The image's
    # own binned brightness matches the luminance far better than its mirror images do.
    binned = _block_mean(frame.image.mean(axis=2), 2).ravel()
    same = np.corrcoef(binned, frame.luminance.ravel())[0, 1]
    mirrored = np.corrcoef(binned, frame.luminance[::-1, ::-1].ravel())[0, 1]
    assert same > 0.97 and same > mirrored + 0.2
    assert frame.meta.camera == "Blackmagic Pocket Cinema Camera 4K"
    assert frame.meta.capture_time is None  # the file carries no time (LibRaw reports epoch 0)
    assert frame.meta.exposure_s is None


@needs_dng
def test_dng_white_balance_modes_match_their_multipliers() -> None:
    # LibRaw applies the colour matrix after white balance, so output ratios do not follow the
    # multipliers; instead each named mode must equal its multipliers passed explicitly.
    with rawpy.imread(str(DNG)) as raw:
        as_shot = [m if m > 0 else raw.camera_whitebalance[1] for m in raw.camera_whitebalance]
        daylight = [m if m > 0 else raw.daylight_whitebalance[1] for m in raw.daylight_whitebalance]
    camera = load(DNG, demosaic="LINEAR", white_balance="camera").image
    assert_array_equal(camera, load(DNG, demosaic="LINEAR", white_balance=as_shot).image)
    sunlit = load(DNG, demosaic="LINEAR", white_balance="daylight").image
    assert_array_equal(sunlit, load(DNG, demosaic="LINEAR", white_balance=daylight).image)
    # and the two differ where they should: as-shot red gain 2.21 vs daylight 2.83
    assert float(np.median(sunlit[..., 0] - camera[..., 0])) > 0.005


def _write_tiny_dng(path: Path, cfa: np.ndarray, black: int, white: int) -> Path:
    """A minimal uncompressed RGGB DNG that LibRaw reads, with a few EXIF-ish IFD0 tags."""
    unit_matrix = [1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1]  # SRATIONAL identity
    tags = [
        (271, "s", 0, "Canon", True),  # Make
        (272, "s", 0, "Canon EOS Ra", True),  # Model
        (306, "s", 0, "2024:03:01 21:00:00", True),  # DateTime, camera wall clock
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern RGGB
        (33434, "2I", 1, (30, 1), True),  # ExposureTime 30 s
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50714, "H", 1, black, True),  # BlackLevel
        (50717, "H", 1, white, True),  # WhiteLevel
        (50721, "2i", 9, unit_matrix, True),  # ColorMatrix1
        (50728, "2I", 3, [1, 1, 1, 1, 1, 1], True),  # AsShotNeutral
    ]
    tifffile.imwrite(path, cfa, photometric=32803, extratags=tags, subfiletype=0)
    return path


def test_tiny_dng_superpixel_black_level_and_meta(tmp_path: Path) -> None:
    # 65 x 97: the odd trailing row and column are dropped from the luminance.
    cfa = np.full((65, 97), 256, np.uint16)
    cfa[0::2, 0::2] += 400  # red sites 400 ADU above black
    frame = load(_write_tiny_dng(tmp_path / "tiny.dng", cfa, black=256, white=4095))
    assert frame.image.shape == (65, 97, 3)
    assert frame.luminance.shape == (32, 48)
    assert_allclose(frame.luminance, 400 / 4 / (4095 - 256), rtol=0, atol=1e-7)
    red, green, blue = frame.image[2:-2, 2:-2].mean(axis=(0, 1))
    assert red > 0.25 and green < 1e-4 and blue < 0.1 * red  # sensor red stays red
    assert frame.meta.exposure_s == 30.0
    assert frame.meta.camera == "Canon EOS Ra"  # the Model already names the Make
    assert frame.meta.capture_time is not None and frame.meta.capture_time.tzinfo is not None
    # EXIF time has no zone: it is read as this machine's local wall clock.
    local = frame.meta.capture_time.astimezone().replace(tzinfo=None)
    assert local == datetime(2024, 3, 1, 21, 0)
    frame4 = load(tmp_path / "tiny.dng", bin=4)
    assert frame4.luminance.shape == (16, 24)
    assert_allclose(frame4.luminance, 400 / 4 / (4095 - 256), rtol=0, atol=1e-7)


@pytest.mark.parametrize("path", TRUNCATED_CR3, ids=lambda p: p.name)
def test_truncated_cr3_is_a_decode_error(path: Path) -> None:
    with pytest.raises(DecodeError, match=r"^truncated or corrupt raw data \(LibRawIOError"):
        load(path)


def test_truncated_cr3_samples_present_or_skipped() -> None:
    if not REALDATA.is_dir():
        pytest.skip("real data absent")
    assert len(TRUNCATED_CR3) == 2


def test_sample_cr3_from_environment() -> None:
    sample = os.environ.get("NIGHTSTACK_SAMPLE_CR3")
    if not sample or not Path(sample).is_file():
        pytest.skip("set NIGHTSTACK_SAMPLE_CR3=/path/IMG_0001.CR3 to decode a real CR3")
    frame = load(sample)
    rows, cols = frame.shape
    assert frame.image.shape == (rows, cols, 3) and frame.image.dtype == np.float32
    assert frame.luminance.shape == (rows // 2, cols // 2)
    assert frame.image.min() >= 0.0 and frame.image.max() <= 1.0
    assert frame.meta.exposure_s is not None and frame.meta.exposure_s > 0


# --- bad input -------------------------------------------------------------------------------


def _jpeg_bytes() -> bytes:
    ok, encoded = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    assert ok
    return encoded.tobytes()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.CR3", b"", r"^empty file \(0 bytes\)$"),
        (
            "noise.CR3",
            np.random.default_rng(7).bytes(65536),
            r"^unsupported raw format \(LibRawFileUnsupportedError: .*\); content not recognised",
        ),
        ("photo.NEF", _jpeg_bytes(), r"^file content is a JPEG image, not a NEF raw"),
        ("frame.xyz", b"some bytes", r"^unsupported file extension '\.xyz'$"),
        ("noext", b"some bytes", r"^unsupported file extension \(none\)$"),
        ("photo.fits", _jpeg_bytes(), r"^not a FITS file: content is a JPEG image$"),
        ("noise.tif", b"\x00" * 100, r"^not a TIFF file: content is not recognised"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, r"^OpenCV could not decode"),
    ],
)
def test_bad_files_raise_decode_error(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason) as info:
        load(path)
    assert "\n" not in info.value.reason


def _good_fits_bytes(tmp_path: Path) -> bytes:
    path = _write_fits(tmp_path / "good.fits", np.arange(100, dtype=np.uint16).reshape(10, 10))
    return path.read_bytes()


def test_fits_with_unparsable_header_card(tmp_path: Path) -> None:
    good = _good_fits_bytes(tmp_path)
    card = next(good[i : i + 80] for i in range(0, 2880, 80) if good[i : i + 8] == b"NAXIS1  ")
    broken = tmp_path / "broken.fits"
    broken.write_bytes(good.replace(card, b"NAXIS1  = 'ten' +" + b" " * 63))
    with pytest.raises(DecodeError, match=r"^corrupt FITS file"):
        load(broken)


def test_fits_cut_inside_header_or_data(tmp_path: Path) -> None:
    good = _good_fits_bytes(tmp_path)
    cut_header, cut_data = tmp_path / "h.fits", tmp_path / "d.fits"
    cut_header.write_bytes(good[:1000])
    cut_data.write_bytes(good[: 2880 + 50])
    with pytest.raises(DecodeError, match=r"^corrupt FITS file .*not multiple of 2880"):
        load(cut_header)
    with pytest.raises(DecodeError, match=r"^truncated FITS file"):
        load(cut_data)


def test_fits_without_image_data(tmp_path: Path) -> None:
    path = tmp_path / "header_only.fits"
    fits.PrimaryHDU().writeto(path)
    with pytest.raises(DecodeError, match="no image data"):
        load(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match=r"^file not found$"):
        load(tmp_path / "gone.CR3")
    folder = tmp_path / "folder.fits"
    folder.mkdir()
    with pytest.raises(DecodeError, match="directory"):
        load(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _write_fits(tmp_path / "locked.fits", np.zeros((4, 4), np.uint16))
    path.chmod(0)
    with pytest.raises(DecodeError, match="permission denied"):
        load(path)


def test_invalid_options_are_value_errors(tmp_path: Path) -> None:
    path = tmp_path / "never_read.fits"  # options are checked before the file is touched
    for kwargs in (
        {"bin": 0},
        {"demosaic": "AMAZE"},
        {"white_balance": "sunny"},
        {"white_balance": (1, 1, 1)},
    ):
        with pytest.raises(ValueError):
            load(path, **kwargs)


def test_supported_extensions() -> None:
    assert all(e.startswith(".") and e == e.lower() for e in SUPPORTED_EXTENSIONS)
    for ext in (".cr3", ".cr2", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2", ".pef", ".fits",
                ".fit", ".fts", ".tif", ".tiff", ".jpg", ".jpeg", ".png"):  # fmt: skip
        assert ext in SUPPORTED_EXTENSIONS


# --- synthetic FITS --------------------------------------------------------------------------

PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


def _cfa_lit_at(pattern: str, colour: str, shape: tuple[int, int] = (12, 16)) -> np.ndarray:
    """A CFA with RED_ON at the sites of ``colour`` in ``pattern`` and 0 elsewhere."""
    cfa = np.zeros(shape, np.uint16)
    for i, site in enumerate(pattern):
        if site == colour:
            cfa[i // 2 :: 2, i % 2 :: 2] = RED_ON
    return cfa


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("colour", ["R", "B"])
def test_bayer_fits_colour_for_every_pattern(tmp_path: Path, pattern: str, colour: str) -> None:
    path = _write_fits(tmp_path / "bayer.fits", _cfa_lit_at(pattern, colour), BAYERPAT=pattern)
    frame = load(path)
    assert frame.image.shape == (12, 16, 3)
    lit = "RGB".index(colour)
    inner = frame.image[2:-2, 2:-2]  # bilinear at the border sees mirrored sites
    assert_allclose(inner[..., lit], RED_ON / 65535, rtol=0, atol=1e-6)
    for dark in {0, 1, 2} - {lit}:
        assert_allclose(inner[..., dark], 0.0, rtol=0, atol=1e-7)
    # The superpixel luminance is one lit site in four everywhere.
    assert_allclose(frame.luminance, RED_ON / 65535 / 4, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("x_offset", "y_offset"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_bayer_offsets_shift_the_pattern(tmp_path: Path, x_offset: int, y_offset: int) -> None:
    # Image pixel (x, y) is sensor pixel (x + XBAYROFF, y + YBAYROFF). The sensor is RGGB, red
    # where both sensor coordinates are even, so the image's red sites start at the offsets.
    cfa = np.zeros((12, 16), np.uint16)
    cfa[y_offset::2, x_offset::2] = RED_ON
    path = _write_fits(
        tmp_path / "offset.fits", cfa, BAYERPAT="RGGB", XBAYROFF=x_offset, YBAYROFF=y_offset
    )
    inner = load(path).image[2:-2, 2:-2]
    assert_allclose(inner[..., 0], RED_ON / 65535, rtol=0, atol=1e-6)
    assert_allclose(inner[..., 1:], 0.0, rtol=0, atol=1e-7)


def test_bottom_up_bayer_is_debayered_then_flipped(tmp_path: Path) -> None:
    # 12 rows: the flip moves every stored row to the other parity, so flipping before
    # demosaicing would read the red sites as green/blue and give no red at all.
    stored = _cfa_lit_at("RGGB", "R", shape=(12, 16))
    frame = load(_write_fits(tmp_path / "bu.fits", stored, BAYERPAT="RGGB", ROWORDER="BOTTOM-UP"))
    top_down = load(_write_fits(tmp_path / "td.fits", stored, BAYERPAT="RGGB"))
    assert_array_equal(frame.image, top_down.image[::-1])
    assert frame.image.flags.c_contiguous
    assert_allclose(frame.image[2:-2, 2:-2, 0], RED_ON / 65535, rtol=0, atol=1e-6)
    assert_allclose(frame.image[2:-2, 2:-2, 1:], 0.0, rtol=0, atol=1e-7)
    # luminance pixel (u, v) covers the flipped image's rows 2u, 2u + 1
    assert_allclose(frame.luminance, _block_mean(stored[::-1], 2) / 65535, rtol=0, atol=1e-7)


def test_float_bayer_fits_uses_float_demosaic(tmp_path: Path) -> None:
    cfa = _cfa_lit_at("GBRG", "R").astype(np.float32) / RED_ON * 0.5  # red sites 0.5, float
    frame = load(_write_fits(tmp_path / "f.fits", cfa, BAYERPAT="GBRG"))
    inner = frame.image[2:-2, 2:-2]
    assert_allclose(inner[..., 0], 0.5, atol=1e-6)
    assert_allclose(inner[..., 1:], 0.0, atol=1e-6)
    assert_allclose(frame.luminance, 0.125, atol=1e-7)


def test_three_plane_fits(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    planes = rng.integers(0, 65536, (3, 10, 14), dtype=np.uint16)
    frame = load(_write_fits(tmp_path / "rgb.fits", planes))
    assert frame.image.shape == (10, 14, 3) and frame.image.flags.c_contiguous
    for c in range(3):
        assert_array_equal(frame.image[..., c], planes[c].astype(np.float32) / np.float32(65535))
    assert_allclose(frame.luminance, _block_mean(planes.mean(axis=0), 2) / 65535, atol=1e-6)


def test_mono_fits_uint16_bzero_and_metadata(tmp_path: Path) -> None:
    data = np.array([[0, 1, 32767], [32768, 60000, 65535]], np.uint16)  # BZERO 32768 on disk
    path = _write_fits(
        tmp_path / "mono.fits", data, EXPOSURE=30.0, ISOSPEED=800, CAMERA="Canon EOS Ra",
        **{"DATE-OBS": "2024-03-01T21:00:00"},
    )  # fmt: skip
    assert b"BZERO   =                32768" in path.read_bytes()[:2880]
    frame = load(path)
    assert frame.image.shape == (2, 3, 1)
    assert_array_equal(frame.image[..., 0], data.astype(np.float32) / np.float32(65535))
    assert frame.luminance.shape == (1, 1)
    assert_allclose(frame.luminance[0, 0], (0 + 1 + 32768 + 60000) / 4 / 65535, rtol=1e-6)
    assert frame.meta.exposure_s == 30.0 and frame.meta.iso == 800.0
    assert frame.meta.camera == "Canon EOS Ra"
    assert frame.meta.capture_time == datetime(2024, 3, 1, 21, tzinfo=UTC)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (np.array([[0, 255]], np.uint8), [0.0, 1.0]),
        (np.array([[-100, 1000]], np.int16), [-100 / 65535, 1000 / 65535]),
        (np.array([[0, 2**31 - 1]], np.int32), [0.0, (2**31 - 1) / (2**32 - 1)]),
        (np.array([[0.25, 1.2]], np.float32), [0.25, 1.2]),  # max <= 1.5: already unit
        (np.array([[6553.5, 65535.0]], np.float64), [0.1, 1.0]),  # ADU floats
        (np.array([[np.nan, 0.5]], np.float32), [0.0, 0.5]),
    ],
)
def test_mono_fits_scaling(tmp_path: Path, data: np.ndarray, expected: list[float]) -> None:
    frame = load(_write_fits(tmp_path / "s.fits", data))
    assert_allclose(frame.image[0, :, 0], expected, rtol=1e-6, atol=1e-9)


def test_bottom_up_mono_fits(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.uint16).reshape(4, 3)
    frame = load(_write_fits(tmp_path / "m.fits", data, ROWORDER="BOTTOM-UP"))
    assert_array_equal(frame.image[..., 0], data[::-1].astype(np.float32) / np.float32(65535))


# --- TIFF, PNG, JPEG -------------------------------------------------------------------------


def test_tiff_16bit_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(5).integers(0, 65536, (6, 8, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    frame = load(tmp_path / "rgb.tif")
    assert_array_equal(frame.image, rgb.astype(np.float32) / np.float32(65535))
    assert_allclose(frame.luminance, _block_mean(rgb.mean(axis=2), 2) / 65535, atol=1e-6)
    assert frame.meta.camera is None


def test_tiff_planar_rgb_and_8bit_mono_and_float(tmp_path: Path) -> None:
    planar = np.random.default_rng(6).integers(0, 65536, (3, 4, 6), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "p.tiff", planar, photometric="rgb", planarconfig="separate")
    assert_array_equal(
        load(tmp_path / "p.tiff").image, np.moveaxis(planar, 0, -1) / np.float32(65535)
    )
    mono = np.array([[0, 51, 255]], np.uint8)
    tifffile.imwrite(tmp_path / "m.tif", mono, photometric="minisblack")
    frame = load(tmp_path / "m.tif")
    assert frame.image.shape == (1, 3, 1)
    assert_allclose(frame.image[0, :, 0], [0.0, 0.2, 1.0], rtol=1e-7)
    linear = np.array([[0.0, 0.3], [1.1, 0.7]], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", linear, photometric="minisblack")
    assert_array_equal(load(tmp_path / "f.tif").image[..., 0], linear)


def _srgb_decode(code: float) -> float:
    v = code / 255
    return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4


def test_png_is_rgb_ordered_and_srgb_linearised(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[:, 2:, 1] = 128  # plus mid green on the right half
    cv2.imwrite(str(tmp_path / "x.png"), rgb[..., ::-1])  # OpenCV writes BGR
    frame = load(tmp_path / "x.png")
    assert frame.image.shape == (4, 4, 3)
    assert_allclose(frame.image[..., 0], 1.0)
    assert_allclose(frame.image[:, :2, 1], 0.0)
    assert_allclose(frame.image[:, 2:, 1], _srgb_decode(128), rtol=1e-6)  # 0.2158605
    assert_allclose(frame.image[..., 2], 0.0)


def test_png_16bit_grey(tmp_path: Path) -> None:
    grey = np.array([[0, 65535], [32768, 10]], np.uint16)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    frame = load(tmp_path / "g.png")
    assert frame.image.shape == (2, 2, 1)
    assert frame.image[0, 1, 0] == 1.0 and frame.image[0, 0, 0] == 0.0
    assert_allclose(frame.image[1, 0, 0], ((32768 / 65535 + 0.055) / 1.055) ** 2.4, rtol=1e-6)


def test_jpeg_channel_order(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 2] = 200  # blue
    cv2.imwrite(str(tmp_path / "b.jpg"), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
    image = load(tmp_path / "b.jpg").image
    means = image.mean(axis=(0, 1))
    assert abs(means[2] - _srgb_decode(200)) < 0.01  # JPEG: a code or two of loss
    assert means[0] < 0.005 and means[1] < 0.005


def test_a_frame_without_saturated_pixels_is_not_rescaled_by_libraw(tmp_path: Path) -> None:
    """LibRaw's default adjust_maximum_thr takes the brightest pixel for white when it is above
    0.75 of the white level: a hazy frame (no saturated star) would decode brighter."""
    from nightstack.simulate import simulate_night

    simulate_night(
        tmp_path, frames=2, width=480, height=320, seed=3, stars=150, transparency=[1.0, 0.3],
        nebula=False, drift_px=0.0, rotation_deg=0.0,
    )  # fmt: skip
    clear, hazy = (load(tmp_path / f"IMG_{i:04d}.DNG").image for i in (0, 1))
    sky = (slice(20, 200), slice(20, 460))
    ratio = np.median(hazy[sky][..., 1]) / np.median(clear[sky][..., 1])
    assert ratio == pytest.approx(1.0, abs=0.02)  # the same sky (1.275 with LibRaw's default)


# --- issue 20, item 4: decompression bombs -----------------------------------------------------


def _tiff_bomb(path: Path, side: int = 16000) -> Path:
    """A deflate TIFF of ``side`` x ``side`` zeros (8-bit grey), written tile by tile: a file of
    a few hundred kB that decodes to ``side``² bytes."""
    tile = np.zeros((512, 512), np.uint8)
    count = ((side + 511) // 512) ** 2
    tifffile.imwrite(path, iter([tile] * count), shape=(side, side), dtype=np.uint8,
                     tile=(512, 512), compression="zlib")  # fmt: skip
    return path


def _fits_bomb(path: Path, side: int = 30000) -> Path:
    """A tile-compressed FITS whose header claims ``side`` x ``side`` pixels (a real 64 x 64
    compressed image, its ZNAXISn cards rewritten: what an attacker writes)."""
    hdu = fits.CompImageHDU(np.zeros((64, 64), np.uint16), compression_type="RICE_1")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    raw = bytearray(path.read_bytes())
    for key in (b"ZNAXIS1 =", b"ZNAXIS2 ="):
        at = raw.index(key)
        raw[at : at + 30] = f"{key.decode():9s}{side:>21d}".encode()
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    "make, claim", [(_tiff_bomb, "16000 x 16000"), (_fits_bomb, "30000 x 30000")]
)
def test_a_decompression_bomb_is_refused_from_its_header_in_the_decoder(
    tmp_path: Path, make: Any, claim: str
) -> None:
    """A small file claiming a huge image: refused in well under a second by the real decoder
    child, whose peak memory stays flat (the header is read, no pixel)."""
    name = "bomb.tif" if make is _tiff_bomb else "bomb.fits"
    bomb = make(tmp_path / name)
    assert bomb.stat().st_size < 2_000_000
    with Decoder(address_space_bytes=4 << 30) as decoder:
        _warm(decoder, tmp_path)
        pid = decoder.pid
        start = time.monotonic()
        with pytest.raises(DecodeError) as err:
            decoder.decode(bomb)
        elapsed = time.monotonic() - start
        peak_kb = _vm_hwm_kb(pid)
    assert elapsed < 2.0
    assert f"claims {claim} pixels" in err.value.reason and "\n" not in err.value.reason
    assert "max_frame_pixels" in err.value.reason
    assert peak_kb < 400_000, f"decoder peak RSS {peak_kb} kB"


def _vm_hwm_kb(pid: int | None) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _warm(decoder: Decoder, tmp_path: Path) -> None:
    """One small real decode: the child is up and its libraries are loaded."""
    small = tmp_path / "small.fits"
    fits.PrimaryHDU(np.full((64, 64), 1000, np.uint16)).writeto(small)
    decoder.decode(small)


def test_the_decoder_child_has_an_address_space_limit(tmp_path: Path) -> None:
    with Decoder(address_space_bytes=3 << 30) as decoder:
        _warm(decoder, tmp_path)
        assert decoder.pid is not None
        soft, hard = resource.prlimit(decoder.pid, resource.RLIMIT_AS)
    assert soft == hard == 3 << 30


def test_a_libraw_demosaic_on_a_bayer_fits_is_refused_by_name(tmp_path: Path) -> None:
    """The pipeline's decode (decode_light) does what the setting names or says why not: LibRaw
    cannot read a FITS, so AHD on a Bayer FITS is a one-line refusal naming the setting, not a
    silent other demosaic; a mono FITS has nothing to demosaic and decodes."""
    from nightstack.errors import DecodeError
    from nightstack.io.loaders import decode_light

    bayer = _write_fits(tmp_path / "bayer.fits", _cfa_lit_at("RGGB", "R"), BAYERPAT="RGGB")
    with pytest.raises(DecodeError, match=r"demosaic 'AHD' is LibRaw's.*'mhc'"):
        decode_light(bayer, demosaic="AHD")
    assert decode_light(bayer, demosaic="mhc").pattern == "RGGB"  # type: ignore[union-attr]
    mono = _write_fits(tmp_path / "mono.fits", _cfa_lit_at("RGGB", "R"))
    assert decode_light(mono, demosaic="AHD").image.shape[2] == 1  # type: ignore[union-attr]
