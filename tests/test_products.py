"""Star trails and the timelapse, made from a simulated night (real DNG raws) through
``nightstack stack`` and a session, checked against the night's truth."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
import tifffile

from nightstack.cli import main
from nightstack.config import load_settings
from nightstack.io.decoder import Decoder, load_kwargs
from nightstack.pipeline.prepare import Preparer
from nightstack.service.session import Session
from nightstack.simulate import SkyModel, simulate_night

FRAMES = 6
ROTATION_DEG = 3.0  # a frame: 8 px a step at 150 px from the pole, more than a star (FWHM 3.5)
PIVOT = (300.0, 200.0)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    raws = tmp_path_factory.mktemp("products") / "night"
    truth = simulate_night(
        raws,
        frames=FRAMES,
        width=600,
        height=400,
        seed=11,
        rotation_deg=ROTATION_DEG,
        drift_px=0.0,
        pivot=PIVOT,
        stars=350,
        nebula=False,
        landscape_fraction=0.0,
    )
    return raws, json.loads(truth.read_text())


def _stack(raws: Path, out: Path, *flags: str) -> Path:
    out.mkdir()
    code = main(
        ["stack", str(raws), "-o", str(out / "stack.tif"), "--products", "stack,trails,timelapse",
         "--timelapse-width", "320", "--timelapse-fps", "12", *flags]
    )  # fmt: skip
    assert code == 0
    return out


def _arc_star(truth: dict[str, Any]) -> tuple[np.ndarray, float]:
    """A bright, unsaturated star 120-180 px from the pole, in the frame all night: its
    reference position and its distance from the pole."""
    model = SkyModel.from_truth(truth)
    xy = np.column_stack([truth["stars"]["x"], truth["stars"]["y"]])
    radius = np.hypot(xy[:, 0] - PIVOT[0], xy[:, 1] - PIVOT[1])
    snr = np.array(truth["stars"]["peak_snr"])
    ok = (radius > 120) & (radius < 180) & (snr > 30) & ~np.array(truth["stars"]["saturated"])
    for i in np.flatnonzero(ok)[np.argsort(-snr[ok])]:
        path = np.concatenate([model.to_frame(k, xy[i]) for k in range(FRAMES)])
        if (path > 10).all() and (path[:, 0] < 590).all() and (path[:, 1] < 390).all():
            return xy[i], float(radius[i])
    raise AssertionError("no star for the arc")


def _arc_profile(trails: np.ndarray, truth: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """(angles in degrees from the star's frame-0 position, trails luminance along the
    star's circle about the pole at those angles, the sky's level there)."""
    star, radius = _arc_star(truth)
    lum = trails.astype(np.float32).mean(axis=2)
    start = math.degrees(math.atan2(star[1] - PIVOT[1], star[0] - PIVOT[0]))
    angles = np.arange(-12.0, ROTATION_DEG * (FRAMES - 1) + 12.0, 0.1)
    phi = np.radians(start + angles)
    x = (PIVOT[0] + radius * np.cos(phi)).astype(np.float32)
    y = (PIVOT[1] + radius * np.sin(phi)).astype(np.float32)
    values = cv2.remap(lum, x[None, :], y[None, :], cv2.INTER_LINEAR)[0]
    return angles, values, float(np.median(lum))


def _bright_span(angles: np.ndarray, values: np.ndarray, sky: float) -> tuple[float, float]:
    peak = float(values.max())
    bright = angles[values > sky + 0.25 * (peak - sky)]
    return float(bright.min()), float(bright.max())


def test_star_trails_span_the_simulated_rotation(
    night: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    raws, truth = night
    plain = _stack(raws, tmp_path / "plain")
    filled = _stack(raws, tmp_path / "filled", "--trails-gap-fill")
    for out in (plain, filled):
        assert (out / "trails.tif").exists() and (out / "trails.jpg").exists()
    span = ROTATION_DEG * (FRAMES - 1)
    _, radius = _arc_star(truth)
    star_deg = math.degrees(3.5 / radius)  # a star's FWHM, as an angle on its circle
    for out in (plain, filled):
        angles, values, sky = _arc_profile(tifffile.imread(out / "trails.tif"), truth)
        first, last = _bright_span(angles, values, sky)
        # the arc begins at the first frame's star and ends at the last one's
        assert abs(first - 0.0) <= star_deg and abs(last - span) <= star_deg, (first, last)
    # between two frames' stars: dark without gap filling, lit with it
    for out, lit in ((plain, False), (filled, True)):
        angles, values, sky = _arc_profile(tifffile.imread(out / "trails.tif"), truth)
        peak = float(values.max())
        middles = [ROTATION_DEG * (k + 0.5) for k in range(FRAMES - 1)]
        between = np.array([values[np.argmin(np.abs(angles - m))] for m in middles])
        share = (between - sky) / (peak - sky)
        if lit:
            assert (share > 0.25).all(), share
        else:
            assert (share < 0.2).all(), share


def test_the_timelapse_has_one_decodable_frame_per_light(
    night: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    raws, _ = night
    out = _stack(raws, tmp_path / "video")
    video = out / "timelapse.mp4"
    data = video.read_bytes()
    assert data[4:8] == b"ftyp" and b"moov" in data  # a finalized MP4 (its index written)
    assert data.index(b"moov") < data.index(b"mdat")  # at the front: a browser starts at once
    with av.open(str(video)) as container:  # H.264, 4:2:0: what browsers play
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.format.name == "yuv420p"
        assert stream.frames == FRAMES
    capture = cv2.VideoCapture(str(video))
    try:
        assert capture.isOpened()
        assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        capture.release()
    assert len(frames) == FRAMES
    assert frames[0].shape == (212, 320, 3)  # 600x400 to 320 wide: 213 rows, made even
    # the sky turns: the first and last frames differ well beyond the codec's error
    moved = np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean()
    same = np.abs(frames[1].astype(int) - frames[1].astype(int)).mean()
    assert moved > 1.0 and same == 0


def test_a_session_lists_its_products_and_can_skip_the_stack(
    night: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    raws, _ = night
    settings = load_settings(
        None,
        {"products": ["trails", "timelapse"], "output_dir": tmp_path, "timelapse_width": 200},
        use_default=False,
    )
    with Decoder(timeout_s=60, load_kwargs=load_kwargs(settings)) as decoder:
        preparer = Preparer(settings, decoder)
        session = Session.create(tmp_path, settings)
        for path in sorted(raws.glob("*.DNG")):
            assert session.ingest(preparer.prepare(path)).status == "accepted"
        session.close()
    meta = json.loads((session.dir / "session.json").read_text())
    outputs = meta["outputs"]
    assert outputs["trails_frames"] == FRAMES and outputs["timelapse_frames"] == FRAMES
    for key in ("trails_tiff", "trails_jpg", "timelapse"):
        assert Path(outputs[key]).exists()
    assert meta["settings"]["products"] == ["trails", "timelapse"]
    assert not (session.dir / "stack.tif").exists() and "tiff" not in outputs
    assert not (session.dir / "timelapse").exists()  # the kept frames go at close


def test_a_resumed_session_keeps_its_products_and_its_ground(
    night: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Killed after 5 frames (the last checkpoint after 4), resumed, one more frame, closed:
    the timelapse and the ground have every frame; the trails lose the frame after the
    checkpoint (its camera-frame data is not stored)."""
    raws, _ = night
    settings = load_settings(
        None,
        {
            "products": ["stack", "trails", "timelapse"],
            "output_dir": tmp_path,
            "timelapse_width": 200,
            "checkpoint_every_frames": 2,
            "checkpoint_min_interval_s": 0,
            "checkpoint_write_ratio": 0,
            "landscape": "freeze",
        },
        use_default=False,
    )
    paths = sorted(raws.glob("*.DNG"))
    with Decoder(timeout_s=60, load_kwargs=load_kwargs(settings)) as decoder:
        preparer = Preparer(settings, decoder)
        session = Session.create(tmp_path, settings)
        for path in paths[:5]:
            assert session.ingest(preparer.prepare(path)).status == "accepted"
        session.abandon()  # as a kill -9 would leave it
        resumed = Session.resume(session.dir, settings)
        ground = resumed.stacker.landscape.ground
        assert ground is not None and len(ground.store) == 5
        assert resumed.stacker.products is not None
        assert resumed.stacker.products.timelapse is not None
        assert resumed.stacker.products.timelapse.frames == 5
        assert resumed.ingest(preparer.prepare(paths[5])).status == "accepted"
        outputs = resumed.close()
    assert outputs["timelapse_frames"] == FRAMES and outputs["ground_frames"] == FRAMES
    assert outputs["trails_frames"] == FRAMES - 1
    capture = cv2.VideoCapture(outputs["timelapse"])
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    assert count == FRAMES
    assert not list(session.dir.glob(".timelapse.mp4.*"))
