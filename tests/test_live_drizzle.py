"""The live Bayer drizzle (nightstack.stacking.live_drizzle): a Bayer session's live stack when
``drizzle`` is on. Oracles: without rejection it is the final drizzle of the same store (float
rounding and the 16-bit weight codes apart); a satellite trail and a hot pixel are rejected as
they arrive; a checkpoint restored and caught up is the uninterrupted state bit for bit (with a
store, and store-less during the warm-up); its state is the demosaic live stack's bytes; the
memory budget refuses a 2x state that does not fit; a real daemon with ``drizzle = "1x"`` writes
a drizzled live.fits and resumes it exactly after a kill -9."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from _daemon import Daemon, journal, wait_for
from nightstack.config import load_settings
from nightstack.io.decoder import Decoder, load_kwargs
from nightstack.io.demosaic import quantise
from nightstack.pipeline.prepare import Preparer
from nightstack.pipeline.stacker import Stacker
from nightstack.simulate import simulate_night
from nightstack.stacking.budget import live_drizzle_refusal
from nightstack.stacking.checkpoint import load_live, save_live
from nightstack.stacking.drizzle import Drizzle, StoredCodes, drizzle_combine
from nightstack.stacking.live import LiveStack
from nightstack.stacking.live_drizzle import LiveDrizzle
from nightstack.stacking.store import FrameStore, MosaicLayout

WB = (1.8, 1.0, 1.4)
LAYOUT = MosaicLayout("RGGB", WB, "mhc")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A drifting simulated night (10 frames of 320 x 240)."""
    root = tmp_path_factory.mktemp("drift")
    simulate_night(root, frames=10, width=320, height=240, seed=12, drift_px=6.0, stars=150,
                   nebula=False)  # fmt: skip
    return root


def _stack(night: Path, work: Path, **values: object) -> Stacker:
    settings = load_settings(None, values, use_default=False)
    work.mkdir()
    with Decoder(timeout_s=60, load_kwargs=load_kwargs(settings)) as decoder:
        preparer = Preparer(settings, decoder)
        stacker = Stacker(settings, work, sky=preparer.sky)
        for path in sorted(night.glob("*.DNG")):
            record = stacker.stack(preparer.prepare(path, sky=stacker.sky))
            assert record.status == "accepted", record.reason
    return stacker


@pytest.mark.parametrize("drizzle", ["1x", "2x"])
def test_without_rejection_the_live_drizzle_is_the_final_drizzle(
    night: Path, tmp_path: Path, drizzle: str
) -> None:
    """The real pipeline (decode, align, normalize, store) with ``drizzle`` and no rejection
    (kappa 1e6): the live stack is a LiveDrizzle on the output grid, and its image is the final
    drizzle of the same store (``sigma`` None) within 2e-4 everywhere and 2e-6 rms (data 0 .. 1:
    the float32 running mean and the 11-bit weight codes; measured 6e-5 and 8e-7 at 1x), empty
    exactly where the final is (but for slivers of a drop below 2^-13 of a pixel)."""
    stacker = _stack(night, tmp_path / "work", drizzle=drizzle, live_kappa=1e6)
    scale = int(drizzle[0])
    live = stacker.live
    assert isinstance(live, LiveDrizzle) and live.frames == 10
    assert live.shape == (240 * scale, 320 * scale)
    assert stacker.store is not None
    final = drizzle_combine(stacker.store, Drizzle(scale, 1.0), sigma=None)
    image = live.result()
    assert image.shape == final.shape
    assert np.mean(np.isfinite(image) != np.isfinite(final)) < 1e-4
    both = np.isfinite(image) & np.isfinite(final)
    diff = np.abs(image - final)[both]
    assert diff.max() < 2e-4 and np.sqrt(np.mean(diff**2)) < 2e-6, (diff.max(), diff.std())
    assert live.rejected == 0
    # the preview and live.fits' bands come from the same image
    np.testing.assert_array_equal(live.result_band(7, 19), image[7:19])
    assert live.preview_image(160).shape == (120, 160, 3)


def test_a_live_only_session_s_drizzle_is_the_stored_session_s_live_drizzle(
    night: Path, tmp_path: Path
) -> None:
    """``final = "live"`` (no frame store: frames reach the live drizzle as in-memory mosaics,
    the warm-up ones held): its final is the live drizzle a stored session builds from the
    same frames, bit for bit, on the drizzle's grid."""
    stored = _stack(night, tmp_path / "stored", drizzle="1x")
    alone = _stack(night, tmp_path / "alone", drizzle="1x", final="live")
    assert alone.store is None and isinstance(alone.live, LiveDrizzle)
    assert isinstance(stored.live, LiveDrizzle)
    expected = stored.live.result()
    np.testing.assert_array_equal(alone.final(), expected)


def _sky_store(
    tmp_path: Path, n: int, defects: dict[int, tuple[slice, slice, float]]
) -> FrameStore:
    """``n`` noisy frames of a smooth sky (0.1 +- 0.005) drifting by (0.37, -0.61) px a frame;
    ``defects``: frame -> (rows, cols, added level)."""
    rng = np.random.default_rng(4)
    store = FrameStore(tmp_path / "frames", (60, 60), 3)
    for i in range(n):
        sky = 0.1 + rng.normal(0, 0.005, (60, 60))
        if i in defects:
            rows, cols, level = defects[i]
            sky[rows, cols] += level
        matrix = np.array([[1.0, 0.0, 0.37 * i], [0.0, 1.0, -0.61 * i]])
        store.add_mosaic(quantise(sky.astype(np.float32)), LAYOUT, matrix)
    return store


def test_a_satellite_trail_and_a_hot_pixel_are_rejected_as_they_arrive(tmp_path: Path) -> None:
    """Twelve frames; frame 2 (in the warm-up batch) and frame 8 (after it) each crossed by a
    satellite, frame 9 with one hot sensor site: the live drizzle keeps none of them (within 4
    sigma of the sky's mean over the frames), where a stack without rejection shows each."""
    trail_early = (slice(14, 16), slice(0, 60), 0.5)
    trail = (slice(28, 31), slice(0, 60), 0.5)
    hot = (slice(41, 42), slice(40, 41), 0.8)
    store = _sky_store(tmp_path, 12, {2: trail_early, 8: trail, 9: hot})
    clean = LiveDrizzle(store.shape, Drizzle(1, 1.0), kappa=1e6, store=store)
    clean.catch_up()
    live = LiveDrizzle(store.shape, Drizzle(1, 1.0), kappa=3.0, store=store)
    live.catch_up()
    sky = 0.1 * np.array(WB)
    # a pixel's mean over the frames: its values' noise 0.005 x WB over at least ~3 values
    inner = (slice(10, 50), slice(10, 50))
    assert np.nanmax(np.abs(live.result()[inner] - sky) / np.array(WB)) < 4 * 0.005 / np.sqrt(3)
    trails = clean.result()[inner] - sky
    assert np.nanmax(trails[:, :, 1]) > 0.05  # the trails show without rejection
    assert live.rejected > 0
    # the hot site (green: row 41, column 40 of RGGB): frame 9 drifted it to (43.3, 35.5)
    spot = live.result()[33:38, 41:46, 1]
    plain = clean.result()[33:38, 41:46, 1]
    assert np.nanmax(plain) - 0.1 > 0.04
    assert np.nanmax(np.abs(spot - 0.1)) < 0.01


def _states_equal(a: LiveDrizzle, b: LiveDrizzle) -> None:
    sa, sb = a.state(), b.state()
    for name in ("mean", "spread", "weight"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name), err_msg=name)
    np.testing.assert_array_equal(sa.floor, sb.floor)
    assert (sa.frames, sa.rejected) == (sb.frames, sb.rejected)


@pytest.mark.parametrize("at", [3, 8])
def test_a_checkpoint_resumed_is_the_uninterrupted_state_bit_for_bit(
    tmp_path: Path, at: int
) -> None:
    """With the store: checkpoint after ``at`` frames (in the warm-up, after it), reload with
    the store, catch up: mean, variance and weight codes, floor and counters equal an
    uninterrupted run's. Store-less (live-only): the warm-up frames held as mosaics survive the
    checkpoint too."""
    store = _sky_store(tmp_path, 11, {8: (slice(28, 31), slice(0, 60), 0.5)})
    whole = LiveDrizzle(store.shape, Drizzle(1, 1.0), store=store)
    whole.catch_up()
    part = LiveDrizzle(store.shape, Drizzle(1, 1.0), store=store)
    while part.frames < at:
        part._add(store.frame(part.frames), np.fromfile(
            store.directory / store.frame(part.frames).file, np.uint16).reshape(60, 60))
    save_live(part, tmp_path / "checkpoint")
    resumed = load_live(tmp_path / "checkpoint", store=store)
    assert isinstance(resumed, LiveDrizzle)
    assert resumed.catch_up() == 11 - at
    _states_equal(resumed, whole)
    # store-less: frames come as mosaics, the first ones pending until the warm-up batch
    alone = LiveDrizzle(store.shape, Drizzle(1, 1.0))
    for i in range(11):
        alone.add_stored(store, i)
    held = LiveDrizzle(store.shape, Drizzle(1, 1.0))
    for i in range(at):
        held.add_stored(store, i)
    save_live(held, tmp_path / "alone")
    back = load_live(tmp_path / "alone")
    assert isinstance(back, LiveDrizzle) and len(back.state().pending) == (at if at < 5 else 0)
    for i in range(at, 11):
        back.add_stored(store, i)
    _states_equal(back, alone)
    _states_equal(alone, whole)  # the same frames from memory and from the store


@pytest.mark.parametrize("at", [3, 8])
def test_detached_from_its_store_it_goes_on_from_memory_as_before(tmp_path: Path, at: int) -> None:
    """The disk fills after ``at`` frames (in the warm-up, after it): the live drizzle lets go of
    the store (reading back the warm-up frames the batch still needs) and takes the next frames
    as mosaics; its state is the one it would have had with the store, bit for bit."""
    store = _sky_store(tmp_path, 11, {9: (slice(28, 31), slice(0, 60), 0.5)})
    whole = LiveDrizzle(store.shape, Drizzle(1, 1.0), store=store)
    whole.catch_up()
    live = LiveDrizzle(store.shape, Drizzle(1, 1.0), store=store)
    while live.frames < at:
        live._add(store.frame(live.frames), StoredCodes(store, live.frames))
    live.detach_store()
    assert live.store is None and len(live.state().pending) == (at if at < 5 else 0)
    for i in range(at, 11):
        record = store.frame(i)
        codes = np.fromfile(store.directory / record.file, np.uint16).reshape(60, 60)
        assert record.mosaic is not None
        live.add_mosaic(codes, record.mosaic, np.array(record.matrix))
    _states_equal(live, whole)


def test_the_state_is_the_demosaic_live_stack_s_bytes_and_2x_is_refused_when_it_cannot_fit(
) -> None:
    """6.67 bytes a sample at 1x (as LiveStack), 4x the pixels at 2x; at 24 MP the 2x state
    (1.92 GB) does not fit beside the daemon in 2 GB available, the 1x one does."""
    rows, cols = 40, 60
    assert LiveDrizzle((rows, cols), Drizzle(1, 1.0)).state_bytes == rows * cols * 20
    assert LiveStack((rows, cols), 3).state_bytes == rows * cols * 20
    assert LiveDrizzle((rows, cols), Drizzle(2, 0.7)).state_bytes == 4 * rows * cols * 20
    why = live_drizzle_refusal((4000, 6000), 2, available=2 * 2**30)
    assert why is not None and "1831 MB" in why
    assert live_drizzle_refusal((4000, 6000), 1, available=2 * 2**30) is None


def test_a_live_drizzle_that_does_not_fit_falls_back_to_the_demosaic_in_one_log_line(
    night: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The machine's available memory cannot be made small for real here: the budget's answer
    is replaced by a refusal. The session's live stack demosaics on the reference grid, the log
    says why once, and the final still drizzles at 2x."""
    import nightstack.pipeline.stacker as stacker_module

    monkeypatch.setattr(stacker_module, "live_drizzle_refusal", lambda shape, scale: "too big")
    with caplog.at_level("WARNING"):
        stacker = _stack(night, tmp_path / "work", drizzle="2x")
    assert isinstance(stacker.live, LiveStack) and stacker.live.shape == (240, 320)
    lines = [r.getMessage() for r in caplog.records if "the live stack demosaics" in r.getMessage()]
    assert lines == ["drizzle 2x: too big; the live stack demosaics (the final still drizzles)"]
    assert stacker.final().shape == (480, 640, 3)


def test_a_daemon_with_drizzle_1x_writes_a_drizzled_live_stack_and_resumes_it_exactly(
    night: Path, tmp_path: Path
) -> None:
    """`nightstack watch` with drizzle 1x (checkpoints every 2 frames): its live.fits of every
    frame is the drizzle of its own frame store (the final drizzle without rejection, within
    1e-6 at half the pixels and 1e-4 at 90 %: the rest had a value rejected), not the demosaic;
    killed (-9) after 4 frames and restarted, it writes the same live.fits bit for bit."""
    frames = sorted(night.glob("*.DNG"))[:7]
    env = {
        "NIGHTSTACK_DRIZZLE": "1x",
        "NIGHTSTACK_CHECKPOINT_EVERY_FRAMES": "2",
        "NIGHTSTACK_LIVE_FITS_EVERY_S": "0",
    }
    stacks, stores = [], []
    for run, kill_after in (("plain", None), ("killed", 4)):
        watch, out = tmp_path / run / "watch", tmp_path / run / "out"
        watch.mkdir(parents=True)
        for f in frames:
            shutil.copy(f, watch / f.name)
        d = Daemon(watch, out, env=env)
        try:
            if kill_after is not None:
                wait_for(lambda out=out, n=kill_after: len(journal(out)) >= n, 120, "frames", d)
                d.stop(signal.SIGKILL)
                d = Daemon(watch, out, env=env)
            found: list[np.ndarray] = []

            def complete(out: Path = out, found: list[np.ndarray] = found) -> bool:
                for path in out.glob("*/live.fits"):
                    try:
                        with fits.open(path) as hdul:
                            if hdul[0].header["NCOMBINE"] == len(frames):
                                assert hdul[0].header["DEMOSAIC"] == "drizzle 1x"
                                found.append(np.asarray(hdul[0].data, np.float32))
                                return True
                    except (OSError, KeyError):
                        continue
                return False

            wait_for(complete, 120, "live.fits of every frame", d)
            d.stop(signal.SIGKILL)
            preview = next(out.glob("*/preview.jpg"))  # written with live.fits, from the drizzle
            assert preview.stat().st_size > 0
        finally:
            if d.alive():
                d.stop(signal.SIGKILL)
        stacks.append(found[0])
        stores.append(next(out.glob("*/frames")))
    plain, resumed = stacks
    np.testing.assert_array_equal(resumed, plain)  # bit for bit, NaN where nothing covers
    store = FrameStore.open(stores[0])
    final = np.moveaxis(drizzle_combine(store, Drizzle(1, 1.0), sigma=None), 2, 0)  # top-down
    sky = (slice(None), slice(0, 200))  # the simulated ground (fixed, so clipped) from 216 on
    plain, final = plain[sky], final[sky]
    both = np.isfinite(plain) & np.isfinite(final)
    assert both.mean() > 0.9
    q = np.quantile(np.abs(plain - final)[both], [0.5, 0.9])
    assert q[0] < 1e-6 and q[1] < 1e-4, q  # the pixels without a rejected value: equal
