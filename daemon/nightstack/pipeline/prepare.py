"""The first half of a frame's way: decode, calibrate, detect (:class:`Preparer`, one per
process, configured once; where the sky is comes with each call)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nightstack.calibration.calibrate import calibrator_from_settings
from nightstack.config import Settings
from nightstack.errors import DecodeError
from nightstack.frames import Frame, Mosaic, MosaicFrame, Stars
from nightstack.io.decoder import Decoder, TransientDecodeError
from nightstack.io.demosaic import demosaic, mosaic_codes, superpixel_luminance
from nightstack.io.frameio import file_sha256, transient_error
from nightstack.registration.detect import SkyArea, StarFinder
from nightstack.registration.quality import Quality

Calibration = Callable[[Mosaic], tuple[Mosaic, dict[str, Any] | None]]
"""The calibration stage: a decoded light's mosaic in, the calibrated mosaic out (same shape,
pattern and units; see :class:`~nightstack.frames.Mosaic`) with what the journal says of it
(``calibrate.Calibrator``: the masters used, the pixels repaired, warnings). It runs before
anything else looks at the pixels; raising rejects the frame with the exception's message as
the reason."""


def no_calibration(mosaic: Mosaic) -> tuple[Mosaic, dict[str, Any] | None]:
    """The identity calibration (nothing configured)."""
    return mosaic, None


@dataclass(eq=False)
class Prepared:
    """A decoded frame with its stars: the output of ``Stacker.prepare``."""

    path: Path
    sha256: str | None
    frame: Frame | MosaicFrame | None
    stars: Stars | None
    quality: Quality | None
    error: str | None
    ms: dict[str, float]
    calibration: dict[str, Any] | None = None
    transient: bool = False
    """``error`` may pass another time (a decode timeout, a read error of the card, no file
    descriptor left: :class:`~nightstack.io.decoder.TransientDecodeError`); the daemon retries."""


class Stopwatch:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def stage(self, name: str) -> _Stage:
        return _Stage(self.ms, name)


class _Stage:
    def __init__(self, sink: dict[str, float], name: str) -> None:
        self.sink, self.name = sink, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.sink[self.name] = round((time.perf_counter() - self.start) * 1000.0, 1)


def _mono_plane(frame: Frame | MosaicFrame) -> np.ndarray | None:
    """A mono frame's full-resolution plane (its star shapes are measured there), else None."""
    if isinstance(frame, Frame) and frame.image.ndim == 3 and frame.image.shape[2] == 1:
        return frame.image[:, :, 0]
    return None


def load_sky_mask(settings: Settings) -> np.ndarray | None:
    """The optional sky-mask image as a bool (rows, cols) array, True = sky."""
    if settings.sky_mask is None or settings.sky_mask == "auto":
        return None
    from nightstack.io.loaders import load

    frame = load(settings.sky_mask, bin=1)
    return np.asarray(frame.image.mean(axis=2) > 0.5)


class Preparer:
    """Decode, calibrate and detect one frame at a time: one per process (the daemon's prepare
    thread, a batch run), configured once from the settings.

    Owns the calibration (masters read once; defects learned from the lights kept until
    :meth:`new_session`) and the star finder; where the sky is comes with each call
    (:meth:`prepare`'s ``sky``: a session's learned mask), the configured one by default.
    """

    def __init__(
        self, settings: Settings, decoder: Decoder, *, calibration: Calibration | None = None
    ) -> None:
        """``calibration``: applied to every Bayer light's mosaic (default: the settings'
        masters, library and cosmetic correction, ``calibrate.calibrator_from_settings``, which
        raises ``ConfigError`` for one that cannot be used)."""
        self.settings = settings
        self.decoder = decoder
        self.calibrator = calibrator_from_settings(settings) if calibration is None else None
        self.calibration: Calibration = calibration or self.calibrator or no_calibration
        self.sky = SkyArea(settings.landscape_mask_ratio, load_sky_mask(settings))
        """The configured sky (``landscape_mask_ratio``, ``sky_mask``)."""
        self.finder = star_finder(settings)

    def new_session(self) -> None:
        """Forget what was learned from the last session's lights (their defect map)."""
        if self.calibrator is not None:
            self.calibrator.new_session()

    def prepare(
        self, path: Path, digest: str | None = None, sky: SkyArea | None = None
    ) -> Prepared:
        """Hash (unless ``digest`` is given), decode, calibrate and detect stars inside ``sky``
        (default: the configured one); never raises for a bad file."""
        watch = Stopwatch()
        if digest is None:
            try:
                with watch.stage("hash"):
                    digest = file_sha256(path)
            except OSError as err:
                reason = f"cannot read file: {err.strerror}"
                transient = transient_error(err) is not None
                return Prepared(path, None, None, None, None, reason, watch.ms, None, transient)
        try:
            with watch.stage("decode"):
                decoded = self.decoder.decode(path)
        except DecodeError as err:
            transient = isinstance(err, TransientDecodeError)
            return Prepared(path, digest, None, None, None, err.reason, watch.ms, None, transient)
        frame: Frame | MosaicFrame
        calibration: dict[str, Any] | None = None
        if isinstance(decoded, Mosaic):
            try:
                with watch.stage("calibrate"):
                    calibrated, calibration = self.calibration(decoded)
            except Exception as err:
                reason = f"calibration failed ({type(err).__name__}: {err})"
                return Prepared(path, digest, None, None, None, reason, watch.ms)
            with watch.stage("mosaic"):
                frame = mosaic_frame(calibrated, self.settings)
            del decoded, calibrated
        else:
            frame = decoded
        try:
            with watch.stage("detect"):
                stars = self.detect(frame, sky)
        except Exception as err:  # e.g. a sky mask of another size: reject, never stall
            reason = f"star detection failed ({type(err).__name__}: {err})"
            return Prepared(path, digest, None, None, None, reason, watch.ms)
        return Prepared(path, digest, frame, stars, Quality.of(stars), None, watch.ms, calibration)

    def detect(self, frame: Frame | MosaicFrame, sky: SkyArea | None = None) -> Stars:
        """The stars of a decoded frame inside ``sky`` (default: the configured one)."""
        return self.finder(frame.luminance, frame.bin, _mono_plane(frame), sky or self.sky)


def mosaic_frame(mosaic: Mosaic, settings: Settings) -> MosaicFrame:
        """The calibrated mosaic as the store keeps it (16-bit codes) and its luminance, made
        band by band (an uncalibrated raw's straight from its ADU, no float32 frame formed)."""
        bin = settings.bin
        codes, luminance = mosaic_codes(mosaic, bin if bin % 2 == 0 else None)
        method = settings.demosaic
        if luminance is None:  # an odd bin splits Bayer tiles: bin the demosaiced channel mean
            rgb = demosaic(codes, mosaic.pattern, (1.0, 1.0, 1.0), method)
            luminance = superpixel_luminance(
                np.repeat(np.repeat(rgb.mean(axis=2), 2, 0), 2, 1), 2 * bin
            )
            del rgb
        return MosaicFrame(
            path=mosaic.path,
            codes=codes,
            pattern=mosaic.pattern,
            white_balance=mosaic.white_balance,
            demosaic=method,
            luminance=luminance,
            bin=bin,
            meta=mosaic.meta,
        )


def star_finder(settings: Settings) -> StarFinder:
    """The detection of ``settings`` (the sky comes with each call: :class:`SkyArea`)."""
    return StarFinder(
        fwhm_px=settings.star_fwhm_px,
        threshold_sigma=settings.star_threshold_sigma,
        sigma_clip=settings.detection_sigma_clip,
        landscape_mask_ratio=settings.landscape_mask_ratio,
        max_stars=settings.max_stars,
    )
