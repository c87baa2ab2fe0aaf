"""A simulated night on disk: ``truth.json`` first, then one DNG raw a frame, like a camera."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nightstack.io.writers import write_json
from nightstack.simulate.dng import write_dng
from nightstack.simulate.sky import SkyModel, frame_indices

if TYPE_CHECKING:
    from nightstack.simulate.sensor import SensorModel


def write_frame(
    model: SkyModel, i: int, path: str | os.PathLike[str], sensor: SensorModel | None = None
) -> Path:
    """Write frame ``i`` of ``model`` as a DNG at ``path`` (one open, write, close), with the
    model's levels, exposure metadata and CFA pattern; returns the path. ``sensor``: through
    that sensor (``nightstack.simulate.sensor``), its temperature in the EXIF."""
    if sensor is not None:
        from nightstack.simulate.render import raw_frame

        raw = raw_frame(model, i, sensor=sensor)
    return write_dng(
        path,
        raw if sensor is not None else model.render(i),
        black_level=model.black_level,
        white_level=model.white_level,
        exposure_s=model.exposure_s,
        iso=model.iso,
        capture_time=model.capture_time(i),
        cfa_pattern=model.cfa_pattern,
        temperature_c=None if sensor is None else sensor.frame_temperature(i),
    )


def simulate_night(
    outdir: str | os.PathLike[str],
    *,
    frames: int = 10,
    width: int = 1200,
    height: int = 800,
    seed: int = 1,
    interval_s: float = 0.0,
    satellite: int | Iterable[int] | None = None,
    cloudy: int | Iterable[int] | None = None,
    trailed: int | Iterable[int] | None = None,
    stars: int = 400,
    drift_px: float = 3.0,
    rotation_deg: float = 0.05,
    fwhm_px: float = 3.5,
    nebula: bool = True,
    sky_levels: Sequence[float] | None = None,
    glow: Sequence[float] | None = None,
    transparency: Sequence[float] | None = None,
    fwhm_schedule: Sequence[float] | None = None,
    milky_way: float = 0.0,
    cfa_pattern: str = "RGGB",
    planted_stars: Sequence[Sequence[float]] = (),
    scenery: bool = False,
    landscape_fraction: float = 0.08,
    pivot: tuple[float, float] | None = None,
    name_pattern: str = "IMG_{:04d}.DNG",
    progress: Callable[[int, Path], None] | None = None,
    sensor: SensorModel | None = None,
    calibration_frames: int = 0,
) -> Path:
    """Write a synthetic night as DNG raws plus ``truth.json``, like a camera would.

    ``truth.json`` is written first (atomically: temporary file + rename), since every frame's
    truth is known in advance; then frames ``name_pattern.format(i)`` for i = 0 .. frames - 1 are
    written one by one, each complete when its file closes, ``interval_s`` seconds apart.
    ``progress(i, path)`` is called after each frame.

    The other arguments are ``SkyModel`` fields of the same names. Per-frame schedules (one
    value a frame; ``None``: constant): ``sky_levels`` multiplies the whole sky background
    (``sky_step`` and ``sky_ramp`` build common ones), ``glow`` is the moon glow's amplitude
    (a fraction of the sky level), ``transparency`` multiplies all light from beyond the
    atmosphere (0.3: thin haze), ``fwhm_schedule`` is each frame's star FWHM in pixels
    (``seeing_jitter`` builds a wandering one). ``milky_way`` is the star density contrast of
    a Milky Way band; ``cfa_pattern`` the sensor's Bayer tile (RGGB, BGGR, GRBG, GBRG);
    ``planted_stars`` adds stars of known colour, each (x, y, flux_e, r, g, b). ``scenery``
    draws a textured landscape (trees, rocks, a building with lit windows) covering about
    ``landscape_fraction`` of the frame height; ``pivot`` is the sky's rotation centre.

    ``sensor`` (a ``nightstack.simulate.sensor.SensorModel``) puts the lights through a sensor
    with dark current, amp glow, hot pixels, PRNU, vignetting, dust and bias structure; with
    ``calibration_frames`` > 0 bias, dark, flat and dark-flat sets of that many frames are
    written first under ``calibration/`` (``sensor.write_calibration``). truth.json then has
    ``sensor`` (``SensorModel.truth``, with ``frame_temperatures``) and ``calibration`` (the
    sets).

    truth.json (schema 2)
    ---------------------
    Top level: ``schema``, ``generator``, ``seed``, ``parameters`` (the ``SkyModel`` fields;
    ``SkyModel.from_truth`` rebuilds the model), ``width``, ``height``, ``cfa_pattern`` (the
    Bayer tile from pixel (0, 0), as the DNG's CFAPattern), ``black_level``, ``white_level``,
    ``gain_e_per_adu``, ``read_noise_e``, ``sky_e`` (electrons per green pixel at the frame
    centre at sky level 1), ``sky_rgb`` (the sky's colour weights r, g, b), ``gradient``
    {amplitude, angle_deg} (the light-pollution plane, fixed to the ground),
    ``pixel_noise_e`` (sky pixel noise at sky level 1), ``psf`` {model, fwhm_px, sigma_px}
    (nominal; see the per-frame ``fwhm_px``), ``pivot``, ``sky_region``; ``landscape``
    {top_row, skyline (per column, ground below), windows [[x0, y0, x1, y1)]};
    ``hot_pixels`` {x, y, adu}; ``nebula`` (``SkyModel.nebula_shape``, or null);
    ``milky_way`` {contrast, point, angle_deg, sigma_px} (the band, reference pixels);
    ``stars`` {x, y (reference pixels), flux_e, peak_snr, snr, saturated, rgb}, brightest
    first, planted stars included.

    ``frames``, one a frame: ``index``, ``file``, ``matrix`` (2x3, frame -> reference),
    ``defects`` (names) and one entry per defect with its parameters (``satellite``,
    ``cloudy``, ``trailed``: ``SkyModel.defects``), ``exposure_s``, ``iso``,
    ``capture_time``, ``sky_level`` (multiplier of the whole sky background: gradient, glow
    and cloud), ``glow`` {amplitude (fraction of the frame's sky level at the glow's
    brightest point in the frame), centre (the moon, frame pixels), scale_px, near_px,
    bearing_deg} (``SkyModel.moon_glow``: the surface is ``amplitude * sky_e * sky_level *
    exp(-(|p - centre|**2 - near_px**2) / (2 scale_px**2))``), ``transparency`` (multiplier
    of star, nebula and satellite light; a cloudy frame's ``star_factor`` multiplies on top),
    ``fwhm_px`` (the frame's star FWHM). ``SkyModel.sky_surface(i, grid=...)`` rebuilds a
    frame's whole additive sky in electrons on the frame or the reference grid.

    Schema 2 added ``sky_rgb``, ``gradient``, ``milky_way``, the satellite's ``sigma_px`` and
    ``linear_e``, and the per-frame ``sky_level``, ``glow``, ``transparency`` and ``fwhm_px``;
    ``cfa_pattern`` may now be other than RGGB. Schema 1 fields keep their meaning.

    Returns
    -------
    Path
        The ``truth.json`` path.
    """
    model = SkyModel(
        width=width,
        height=height,
        frames=frames,
        seed=seed,
        stars=stars,
        fwhm_px=fwhm_px,
        drift_px=drift_px,
        rotation_deg=rotation_deg,
        nebula=nebula,
        sky_levels=tuple(sky_levels or ()),
        glow=tuple(glow or ()),
        transparency=tuple(transparency or ()),
        fwhm_schedule=tuple(fwhm_schedule or ()),
        milky_way=milky_way,
        cfa_pattern=cfa_pattern,
        planted_stars=tuple(tuple(star) for star in planted_stars),
        scenery=scenery,
        landscape_fraction=landscape_fraction,
        pivot=pivot,
        satellite=frame_indices(satellite),
        cloudy=frame_indices(cloudy),
        trailed=frame_indices(trailed),
    )
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    truth_path = out / "truth.json"
    truth = model.truth(name_pattern)
    if sensor is not None:
        from nightstack.simulate.sensor import write_calibration

        truth["sensor"] = sensor.truth(model)
        truth["sensor"]["frame_temperatures"] = [sensor.frame_temperature(i) for i in range(frames)]
        if calibration_frames > 0:
            sets = write_calibration(out / "calibration", model, sensor, frames=calibration_frames)
            truth["calibration"] = sets
    write_json(truth_path, truth)
    for i in range(frames):
        if i and interval_s > 0:
            time.sleep(interval_s)
        path = write_frame(model, i, out / name_pattern.format(i), sensor)
        if progress is not None:
            progress(i, path)
    return truth_path
