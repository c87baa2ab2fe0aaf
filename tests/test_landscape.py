"""Landscape astrophotography on a simulated night with truth: the automatic sky mask, the
freeze-ground composite against the plain (blur) stack, and the fallback when nothing moves.

The night (real DNG raws, decoded by LibRaw) has a textured landscape (grass, rocks, trees, a
building with lit windows) fixed in the camera frame under a sky turning 0.3 degrees a frame.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from _daemon import Daemon, journal, wait_for
from nightstack.cli import main
from nightstack.config import Settings, load_settings
from nightstack.frames import Frame
from nightstack.io.decoder import Decoder, load_kwargs
from nightstack.io.loaders import load
from nightstack.pipeline.prepare import Preparer
from nightstack.pipeline.stacker import Stacker
from nightstack.products.landscape import (
    REFINE_FRAMES,
    HorizonFinder,
    Landscape,
    SkyMask,
    blend_weights,
    rebase,
)
from nightstack.registration.detect import SkyArea, StarFinder
from nightstack.registration.normalize import Normalization
from nightstack.simulate import SkyModel, simulate_night
from nightstack.simulate.dng import write_dng

FRAMES = 10
WIDTH, HEIGHT = 1000, 700


def _settings(**extra: Any) -> Settings:
    values = {"sky_mask": "auto", "landscape_mask_ratio": 0.6, **extra}
    return load_settings(None, values, use_default=False)


def _stack(night: Path, work: Path, settings: Settings) -> tuple[Stacker, np.ndarray]:
    work.mkdir()
    with Decoder(timeout_s=60, load_kwargs=load_kwargs(settings)) as decoder:
        preparer = Preparer(settings, decoder)
        stacker = Stacker(settings, work, sky=preparer.sky)
        for path in sorted(night.glob("*.DNG")):
            record = stacker.stack(preparer.prepare(path, sky=stacker.sky))
            assert record.status == "accepted", record.reason
        image = stacker.final()
        stacker.landscape.freeze_final(image)
    return stacker, image


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("landscape")
    raws = root / "night"
    truth_path = simulate_night(
        raws,
        frames=FRAMES,
        width=WIDTH,
        height=HEIGHT,
        seed=5,
        rotation_deg=0.3,
        drift_px=0.0,
        stars=450,
        nebula=False,
        scenery=True,
        landscape_fraction=0.15,
    )
    truth = json.loads(truth_path.read_text())
    model = SkyModel.from_truth(truth)
    settings = _settings()
    # a single frame without noise: the ground's own sharpness, decoded the same way
    clean = write_dng(
        root / "clean.dng",
        model.render(0, noise=False),
        black_level=model.black_level,
        white_level=model.white_level,
        exposure_s=model.exposure_s,
        iso=model.iso,
        capture_time=model.capture_time(0),
        cfa_pattern=model.cfa_pattern,
    )
    single = load(clean, **load_kwargs(settings)).image
    reference = load(raws / truth["frames"][0]["file"], **load_kwargs(settings))
    freeze, frozen = _stack(raws, root / "freeze", _settings(landscape="freeze"))
    blur, blurred = _stack(raws, root / "blur", _settings(landscape="blur"))
    return {
        "truth": truth,
        "model": model,
        "single": single,
        "reference": reference,
        "freeze": (freeze, frozen),
        "blur": (blur, blurred),
        "root": root,
    }


def _true_sky(truth: dict[str, Any]) -> np.ndarray:
    skyline = np.array(truth["landscape"]["skyline"])
    return np.arange(truth["height"])[:, None] < skyline[None, :]


def _distance_to_horizon(sky: np.ndarray) -> np.ndarray:
    """Signed distance (px) of every pixel from the true horizon: > 0 sky, < 0 ground."""
    d_sky = cv2.distanceTransform(sky.astype(np.uint8), cv2.DIST_L2, 5)
    d_ground = cv2.distanceTransform((~sky).astype(np.uint8), cv2.DIST_L2, 5)
    return np.where(sky, d_sky, -d_ground)


def _gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lum = np.nan_to_num(image.mean(axis=2))
    gx = np.zeros_like(lum)
    gy = np.zeros_like(lum)
    gx[:, :-1] = np.diff(lum, axis=1)
    gy[:-1] = np.diff(lum, axis=0)
    return gx, gy


def _gradient_energy(image: np.ndarray, single: np.ndarray, where: np.ndarray) -> float:
    """The gradient energy of ``image`` that is the single frame's (the projection of its
    gradients on the noise-free single frame's, over the single frame's own energy): 1 for
    the same edges, less when they are smeared; the stack's residual noise, uncorrelated with
    the truth, averages out."""
    ix, iy = _gradients(image)
    sx, sy = _gradients(single)
    return float(np.sum((ix * sx + iy * sy)[where]) / np.sum((sx * sx + sy * sy)[where]))


def _fwhm(image: np.ndarray, sky: np.ndarray) -> float:
    lum = np.nan_to_num(image.mean(axis=2)).astype(np.float32)
    rows, cols = (lum.shape[0] // 2) * 2, (lum.shape[1] // 2) * 2
    binned = lum[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))
    stars = StarFinder(fwhm_px=3.5, landscape_mask_ratio=1.0, sky_mask=sky)(binned, 2)
    return stars.fwhm_px


def test_the_automatic_sky_mask_matches_the_true_horizon(night: dict[str, Any]) -> None:
    stacker, _ = night["freeze"]
    written = cv2.imread(str(stacker.workdir / "sky_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert written is not None and written.shape == (HEIGHT, WIDTH)
    mask = written > 127
    sky = _true_sky(night["truth"])
    distance = np.abs(_distance_to_horizon(sky))
    wrong = mask != sky
    # every misclassified pixel lies within 3 px of the true skyline (trees, roof, walls)
    assert wrong.any() and distance[wrong].max() <= 3.0
    assert stacker.landscape.mask is not None and stacker.landscape.mask.source == "auto"
    # detection follows it: no star found on the ground of the last frame
    assert stacker.sky.mask is not None and (stacker.sky.mask == mask).all()


def test_freeze_keeps_the_ground_sharp_where_blur_smears_it(night: dict[str, Any]) -> None:
    sky = _true_sky(night["truth"])
    distance = _distance_to_horizon(sky)
    ground = distance <= -4
    single = night["single"]
    frozen = _gradient_energy(night["freeze"][1], single, ground)
    blurred = _gradient_energy(night["blur"][1], single, ground)
    assert 0.95 <= frozen <= 1.05, frozen
    assert blurred < 0.5, blurred


def test_freeze_leaves_the_sky_stars_as_sharp_as_the_aligned_stack(night: dict[str, Any]) -> None:
    """The composite's sky is the aligned sky stack's, star for star, and within 4 % of a single
    frame's (3.2 % wider with the former bilinear warp, whose sub-pixel blur adds up to 1/4
    px^2 of variance; the clamped cubic default adds far less)."""
    sky = _distance_to_horizon(_true_sky(night["truth"])) > 30
    single = _fwhm(night["reference"].image, sky)
    frozen = _fwhm(night["freeze"][1], sky)
    blurred = _fwhm(night["blur"][1], sky)
    assert abs(frozen / blurred - 1.0) <= 0.01, (frozen, blurred)
    assert abs(frozen / single - 1.0) <= 0.04, (frozen, single)


def _rising_stars(night: dict[str, Any]) -> np.ndarray:
    """Reference positions of stars below the horizon of the reference that some frame shows
    clearly above its horizon: the aligned sky stack puts their light on the ground side."""
    truth, model = night["truth"], night["model"]
    skyline = np.array(truth["landscape"]["skyline"])
    xy = np.column_stack([truth["stars"]["x"], truth["stars"]["y"]])
    bright = np.array(truth["stars"]["peak_snr"]) > 10
    inside = (xy[:, 0] > 8) & (xy[:, 0] < WIDTH - 8) & (xy[:, 1] < HEIGHT - 8)
    col = np.clip(np.rint(xy[:, 0]).astype(int), 0, WIDTH - 1)
    below = xy[:, 1] > skyline[col] + 8
    chosen = []
    for i in np.flatnonzero(bright & inside & below):
        for k in range(FRAMES):
            fx, fy = model.to_frame(k, xy[i])[0]
            c = int(np.clip(round(fx), 0, WIDTH - 1))
            if 0 <= fx < WIDTH and fy < skyline[c] - 8:
                chosen.append(xy[i])
                break
    return np.array(chosen).reshape(-1, 2)


def _star_z(image: np.ndarray, expected: np.ndarray, xy: np.ndarray, sigma: float) -> np.ndarray:
    """Excess light in a 5x5 box at each position over the median of the 17x17 box around it
    (the local level), in sigmas of the box sum's noise."""
    residual = np.nan_to_num(image.mean(axis=2) - expected.mean(axis=2))
    z = []
    for x, y in np.rint(xy).astype(int):
        box = residual[y - 2 : y + 3, x - 2 : x + 3]
        level = np.median(residual[max(0, y - 8) : y + 9, max(0, x - 8) : x + 9])
        z.append((box - level).sum() / (sigma * 5.0))
    return np.array(z)


def test_no_star_light_on_the_ground_side_and_no_seam(night: dict[str, Any]) -> None:
    sky = _true_sky(night["truth"])
    distance = _distance_to_horizon(sky)
    expected = night["single"]  # the reference frame without noise (stack level = reference)
    frozen, blurred = night["freeze"][1], night["blur"][1]
    ground = distance <= -3
    residual = (frozen.mean(axis=2) - expected.mean(axis=2))[ground]
    sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    rising = _rising_stars(night)
    assert len(rising) >= 5
    z_frozen = _star_z(frozen, expected, rising, sigma)
    z_blurred = _star_z(blurred, expected, rising, sigma)
    assert z_frozen.max() < 3.0, z_frozen.round(1)
    assert np.median(z_blurred) > 3.0, z_blurred.round(1)  # the control: blur puts them there

    # no seam: the level of star-free pixels (less the truth), by distance from the horizon,
    # goes from the ground's to the sky's without a dip or bump beyond either (both sides
    # carry offsets of ~0.3 sigma of their own: noise bias of the decode, normalization); the
    # 2 px either side of the edge are left out: there the single frame's demosaic mixes
    # ground into sky, which the composite (ground and sky stacked apart) does not
    truth = night["truth"]
    stars = np.column_stack([truth["stars"]["x"], truth["stars"]["y"]])
    near_star = np.zeros(sky.shape, np.uint8)
    for x, y in np.rint(stars).astype(int):
        if 0 <= x < WIDTH and 0 <= y < HEIGHT:
            cv2.circle(near_star, (int(x), int(y)), 8, 1, -1)
    seams = {}
    for name, image in (("freeze", frozen), ("blur", blurred)):
        diff = np.nan_to_num(image.mean(axis=2) - expected.mean(axis=2))

        def level(lo: float, hi: float, diff: np.ndarray = diff) -> float:
            band = (distance > lo) & (distance <= hi) & (near_star == 0)
            return float(np.median(diff[band]))

        sides = (level(-40, -20), level(30, 50))
        worst = 0.0
        for d in range(-20, 30, 2):
            if -2 <= d <= 0:
                continue  # within the demosaic's reach of the edge (the truth's own bleed)
            value = level(d, d + 2)
            worst = max(worst, value - max(sides), min(sides) - value)
        seams[name] = worst / sigma
    assert seams["freeze"] < 0.25, seams
    assert seams["blur"] > 1.0, seams  # the control: the moving ground darkens the sky edge


def test_the_fits_keeps_the_aligned_sky_in_a_second_hdu(
    night: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from astropy.io import fits

    from nightstack.service.session import Session

    settings = _settings(landscape="freeze", products=["stack"], output_dir=tmp_path)
    raws = sorted((night["root"] / "night").glob("*.DNG"))[:5]
    with Decoder(timeout_s=60, load_kwargs=load_kwargs(settings)) as decoder:
        preparer = Preparer(settings, decoder)
        session = Session.create(tmp_path, settings)
        for path in raws:
            prepared = preparer.prepare(path, sky=session.stacker.sky)
            assert session.ingest(prepared).status == "accepted"
        session.write_preview()
        outputs = session.close()
    meta = json.loads((session.dir / "session.json").read_text())
    assert meta["outputs"]["landscape"] == "freeze" and meta["outputs"]["sky_mask"] == "auto"
    assert (session.dir / "sky_mask.png").exists() and not (session.dir / "ground").exists()
    top = outputs["ground_top_row"]
    with fits.open(session.dir / "stack.fits") as hdus:
        assert len(hdus) == 2 and hdus[1].name == "SKY"
        composite, aligned = hdus[0].data, hdus[1].data
        assert composite.shape == aligned.shape == (3, HEIGHT, WIDTH)
        np.testing.assert_array_equal(composite[:, :top], aligned[:, :top])
        ground = ~_true_sky(night["truth"])
        assert not np.allclose(composite[:, ground], aligned[:, ground], atol=1e-3)
        composite, aligned = composite.copy(), aligned.copy()
    tiff = cv2.imread(str(session.dir / "stack.tif"), cv2.IMREAD_UNCHANGED)
    linear = composite.transpose(1, 2, 0)[:, :, ::-1] * 65535
    assert np.abs(tiff.astype(float) - np.clip(np.rint(linear), 1, 65535)).max() <= 1
    # `nightstack stack` finishes the same way: the same two HDUs from the same frames
    monkeypatch.setenv("NIGHTSTACK_LANDSCAPE", "freeze")
    monkeypatch.setenv("NIGHTSTACK_SKY_MASK", "auto")
    monkeypatch.setenv("NIGHTSTACK_LANDSCAPE_MASK_RATIO", "0.6")
    batch = tmp_path / "batch.fits"
    assert main(["stack", *map(str, raws), "-o", str(batch)]) == 0
    with fits.open(batch) as hdus:
        assert [h.name for h in hdus] == ["PRIMARY", "SKY"]
        np.testing.assert_allclose(hdus[0].data, composite, atol=1e-6)
        np.testing.assert_allclose(hdus[1].data, aligned, atol=1e-6)


# --- units: no clear answer, the blend, the rebased normalization ---------------------------


def test_a_tracked_mount_gives_no_answer_and_the_ratio_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    shape = (400, 600)
    sky = np.full((200, 300), 0.1, np.float32)
    sky[150:] = 0.02  # a ground that does not move, and stars that do not either
    landscape = Landscape(_settings(), tmp_path)
    landscape.start(shape, 3, 2)
    assert landscape.mask is None
    image = np.zeros((*shape, 3), np.float32)
    with caplog.at_level(logging.WARNING, logger="nightstack.products.landscape"):
        for _ in range(REFINE_FRAMES):
            lum = sky + rng.normal(0, 0.003, sky.shape).astype(np.float32)
            frame = Frame(tmp_path / "f.dng", image, lum, 2)
            landscape.add(frame, np.eye(2, 3), Normalization.identity(3), 1.0)
    assert landscape.mask is not None and landscape.mask.source == "ratio"
    assert "nothing moves" in (landscape.mask.note or "")
    assert any("no clear answer" in r.getMessage() for r in caplog.records)
    assert (landscape.mask.sky[:239].all()) and not landscape.mask.sky[240:].any()


def test_a_horizon_finder_needs_motion() -> None:
    finder = HorizonFinder((400, 600), 2)
    for _ in range(5):
        finder.add(np.ones((200, 300), np.float32), np.eye(2, 3))
    mask, why = finder.estimate()
    assert mask is None and "nothing moves" in why


def test_the_blend_lies_on_the_sky_side_and_rises_over_the_feather() -> None:
    mask = SkyMask.from_horizon(np.full(50, 30.0), 60)
    weight = blend_weights(mask, 10, 8.0)
    column = weight[:, 20]
    assert (column[30 - 10 :] == 0).all()  # the ground: the ground stack alone
    assert column[29 - 10] == pytest.approx(1 / 8)
    assert column[22 - 10] == pytest.approx(1.0) and (column[: 22 - 10] == 1).all()


def test_a_rebased_gradient_normalization_gives_the_same_values() -> None:
    norm = Normalization("gradient", (1.0,), (0.01,), ((0.002, -0.003, 0.001, 0.0005, 0.004),))
    full = np.zeros((80, 40, 1), np.float32)
    norm.apply(full, 0, (80, 40))
    ground = np.zeros((30, 40, 1), np.float32)
    rebase(norm, 50, 80, 30).apply(ground, 0, (30, 40))
    np.testing.assert_allclose(ground, full[50:], atol=1e-7)


def test_the_preview_composite_is_the_shrunk_full_composite(tmp_path: Path) -> None:
    from nightstack.products.landscape import GroundStack, composite, preview_composite

    rng = np.random.default_rng(4)
    rows, cols, top = 300, 400, 180
    sky = rng.random((rows, cols, 3), dtype=np.float32)
    stack = GroundStack(tmp_path / "g", (rows, cols), 3, top, kappa=3.0, warmup=3)
    frame = rng.random((rows, cols, 3), dtype=np.float32) * 0.5
    stack.add(
        Frame(tmp_path / "f", frame, frame.mean(axis=2), 1), Normalization.identity(3), 1.0, "f"
    )
    assert stack.live is not None
    mask = SkyMask.from_horizon(np.full(cols, 220.0), rows)
    weight = blend_weights(mask, top, 12.0)
    full = sky.copy()
    full[top:] = composite(sky[top:], stack.live.result_band(0, rows - top), weight)
    expected = cv2.resize(full, (100, 75), interpolation=cv2.INTER_AREA)
    small = cv2.resize(sky, (100, 75), interpolation=cv2.INTER_AREA)
    shown = preview_composite(small, lambda r0, r1: sky[r0:r1], stack.live, weight, top, rows)
    np.testing.assert_allclose(shown, expected, atol=2e-3)  # exact up to uint16 storage


# --- the daemon's detection follows the learned mask ------------------------------------------


def test_the_daemon_detects_inside_the_learned_sky_mask(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """sky_mask = "auto" through the daemon (its own prepare thread): once the mask is fixed
    (after REFINE_FRAMES), a frame's stars are those inside the learned mask, not inside the
    configured landscape line (the control: that count differs)."""
    frames = REFINE_FRAMES + 3
    simulate_night(tmp_path / "raws", frames=frames, width=640, height=420, seed=9,
                   rotation_deg=0.3, drift_px=0.0, stars=300, nebula=False, scenery=True,
                   landscape_fraction=0.15)  # fmt: skip
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    raws = sorted((tmp_path / "raws").glob("*.DNG"))
    for raw in raws:
        shutil.copy(raw, watch / raw.name)
    daemon = Daemon(watch, out, env={"NIGHTSTACK_SKY_MASK": "auto",
                                     "NIGHTSTACK_LANDSCAPE_MASK_RATIO": "0.6"})  # fmt: skip
    daemons.append(daemon)
    wait_for(lambda: len(journal(out)) >= frames, 240, "every frame", daemon)
    assert daemon.stop() == 0
    last = journal(out)[-1]
    assert last["status"] == "accepted" and Path(last["file"]).name == raws[-1].name
    png = cv2.imread(str(next(out.glob("*/sky_mask.png"))), cv2.IMREAD_GRAYSCALE)
    settings = _settings()
    with Decoder(timeout_s=60, load_kwargs=load_kwargs(settings)) as decoder:
        preparer = Preparer(settings, decoder)
        frame = preparer.prepare(raws[-1]).frame
        assert frame is not None
        in_mask = preparer.detect(frame, SkyArea(1.0, png > 127)).detected
        below_line = preparer.detect(frame).detected
    assert in_mask != below_line, "the control: the mask must change the detection"
    assert last["stars"] == in_mask
