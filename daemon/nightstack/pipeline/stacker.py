"""The second half: a session's :class:`Stacker` chooses or uses the reference, aligns, gates,
normalizes, warps and adds each prepared frame to the frame store and the live stack."""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from nightstack import __version__
from nightstack.arrays import FloatArray
from nightstack.config import Settings
from nightstack.errors import AlignmentError
from nightstack.frames import IDENTITY, Alignment, Frame, MosaicFrame, Stars
from nightstack.io.demosaic import TileSamples
from nightstack.pipeline.prepare import Prepared, Stopwatch
from nightstack.pipeline.records import FrameRecord, Tally, finite
from nightstack.products.extras import Products
from nightstack.products.landscape import Landscape
from nightstack.registration.align import align
from nightstack.registration.detect import SkyArea
from nightstack.registration.normalize import Normalization, SkySamples, estimate
from nightstack.registration.quality import Quality, QualityLimits, ShapeHistory, gate, transparency
from nightstack.registration.warp import warp
from nightstack.solve.wcs import SolvedField
from nightstack.stacking.budget import DiskBudget, close_reserve, live_drizzle_refusal
from nightstack.stacking.combine import combine
from nightstack.stacking.drizzle import SCALES as DRIZZLE_SCALES
from nightstack.stacking.drizzle import Drizzle, drizzle_combine, drizzle_holes
from nightstack.stacking.live import LiveStack
from nightstack.stacking.live_drizzle import Live, LiveDrizzle
from nightstack.stacking.store import FrameStore, MosaicLayout, warp_mosaic

REFERENCE_PROBATION = 5
"""While fewer frames than this are accepted, a new frame the reference would be rejected against
(it has > 1 / min_star_fraction times its stars, sharper stars or a much darker sky) replaces the
reference: see :meth:`Stacker.better_reference`. Afterwards the reference is fixed, since the
frames stacked on it would all have to be redone."""


class OffTarget(Exception):
    """Raised by :meth:`Stacker.stack`, when it follows the pointing (:attr:`Stacker.follow`),
    for a frame that may show another target: it failed to align (``moved_px`` None; ``record``
    is its rejection, not journaled yet), or its centre lands ``moved_px`` from the last
    accepted frame's, beyond the limit (a jump: a slow drift, or a tripod's turning sky, never
    is one). Nothing of the session changed; the caller decides (``service.split``)."""

    def __init__(self, record: FrameRecord, moved_px: float | None = None) -> None:
        super().__init__(record.reason if moved_px is None else f"moved {moved_px:.0f} px")
        self.record = record
        self.moved_px = moved_px


@dataclass(frozen=True, eq=False)
class Reference:
    """The session's reference frame: every transform maps onto its pixel grid, every frame's
    sky is matched to its ``sky`` samples, its stars' fluxes define transparency 1."""

    file: str
    stars: Stars
    quality: Quality
    shape: tuple[int, int]
    channels: int
    sky: SkySamples
    exposure_s: float | None = None


def quality_limits(settings: Settings) -> QualityLimits:
    return QualityLimits(
        min_stars=settings.min_stars,
        min_star_fraction=settings.min_star_fraction,
        max_fwhm_ratio=settings.max_fwhm_ratio,
        max_elongation=settings.max_elongation,
        max_trail_ratio=settings.max_trail_ratio,
        max_background_ratio=settings.max_background_ratio,
        max_residual_px=settings.max_residual_px,
        min_transparency=settings.min_transparency or None,
    )


class Stacker:
    """A session's frames in, its stack out: owns the reference, the frame store, the live
    stack, the landscape and the products. Built with everything it uses; it calls nothing
    back."""

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        sky: SkyArea,
        live: bool = True,
        catch_up: bool = True,
        budget: DiskBudget | None = None,
    ) -> None:
        """``sky``: where the sky is at the start (the :class:`Preparer`'s); an automatic
        landscape mask, once learned, replaces it (:attr:`sky`: pass it to the preparer).
        ``live=False`` (``nightstack stack``): no live stack, only the store for the final
        combine (saves its 6.67 bytes per pixel and channel and its per-frame time).
        ``catch_up=False`` (a session): a stored frame is not added to the live stack here but
        by the caller after its journal line (:meth:`LiveStack.catch_up`): the frame is safe
        once stored and journaled, and a resume adds it from the store anyway.
        ``budget``: the disk's, asked before each frame is stored (else nothing is checked)."""
        self.settings = settings
        self.workdir = workdir
        self.with_live = live
        self.catch_up = catch_up
        self.budget = budget
        self.sky = sky
        # --- landscape and products (landscape.py, products.py) ---
        self.landscape = Landscape(settings, workdir, image_mask=sky.mask, live=live)
        self.products: Products | None = None
        self.limits = quality_limits(settings)
        self.shapes = ShapeHistory()  # the session's recent elongations, for the trail gate
        self.reference: Reference | None = None
        self.store: FrameStore | None = None
        self.live: Live | None = None
        self.mosaic: bool | None = None
        """Whether the session's frames are Bayer mosaics (known from its reference on)."""
        self.live_only: str | None = None
        """Why frames are no longer stored (the final is then the live stack), or None."""
        self.follow: float | None = None
        """None: a frame that fails to align is rejected. A number (pixels, may be inf): such a
        frame, and one whose centre jumped more than this from the last accepted frame's,
        raise :class:`OffTarget`."""
        self.centre: tuple[float, float] | None = None
        """Where the last accepted frame's centre lands on the reference (px), once known."""
        self.solved: SolvedField | None = None
        """Where the reference points (a plate solve), set by whoever solves it, from any thread
        (swapped whole): :meth:`header` adds its WCS, OBJECT, RA and DEC."""

    def stack(self, prepared: Prepared) -> FrameRecord:
        """Align, gate, warp and add one prepared frame; returns its record."""
        record = FrameRecord(file=str(prepared.path), status="rejected", sha256=prepared.sha256)
        record.ms.update(prepared.ms)
        record.calibration = prepared.calibration
        if prepared.error is not None or prepared.frame is None or prepared.stars is None:
            return self._reject(record, prepared.error or "not decoded")
        frame, stars, quality = prepared.frame, prepared.stars, prepared.quality
        assert quality is not None
        record.stars, record.fwhm = stars.detected, finite(round(stars.fwhm_px, 3))
        record.elongation = finite(round(stars.elongation, 3))
        record.background = finite(float(stars.background))
        record.exposure_s = frame.meta.exposure_s
        if frame.meta.capture_time is not None:
            record.capture_time = frame.meta.capture_time.isoformat()

        watch = Stopwatch()
        if self.reference is None:
            reason = reference_flaw(quality, self.limits)
            if reason is not None:
                return self._reject(record, reason)
            self._start(prepared)
            alignment = Alignment(IDENTITY.copy(), np.zeros((0, 2, 2)), len(stars), 0.0)
            record.reference = True
            record.transparency = 1.0
            norm = Normalization.identity(self.reference_channels, self.settings.normalize)
        else:
            if frame.shape != self.reference.shape:
                rows, cols = frame.shape
                ref_rows, ref_cols = self.reference.shape
                return self._reject(
                    record, f"frame size {cols}x{rows} differs from reference {ref_cols}x{ref_rows}"
                )
            channels = _channels(frame)
            if channels != self.reference.channels:
                return self._reject(
                    record,
                    f"frame channels: {channels} differ from the reference's "
                    f"{self.reference.channels} (mono and colour frames do not mix)",
                )
            if self._drizzled_session() and not isinstance(frame, MosaicFrame):
                return self._reject(
                    record, "frame kind: not a Bayer mosaic, the session drizzles mosaics"
                )
            if not len(self.shapes):  # a resumed session: the reference's shape to start from
                self.shapes.add(self.reference.quality)
            reason = gate(quality, self.limits, self.reference.quality, self.shapes)
            if reason is not None:
                return self._reject(record, reason)
            try:
                with watch.stage("align"):
                    alignment = align(
                        stars,
                        self.reference.stars,
                        model=self.settings.transform_model,
                        min_inliers=self.settings.min_inliers,
                    )
            except AlignmentError as err:
                record.ms.update(watch.ms)
                if self.follow is not None:
                    raise OffTarget(self._reject(record, err.reason)) from err
                return self._reject(record, err.reason)
            centre = _centre(alignment.matrix, frame.shape)
            last = self.centre or _centre(IDENTITY, self.reference.shape)
            moved = math.hypot(centre[0] - last[0], centre[1] - last[1])
            if self.follow is not None and moved > self.follow:
                record.ms.update(watch.ms)
                raise OffTarget(record, moved)
            record.residual_px = round(alignment.residual_px, 4)
            record.transform = alignment.as_list()
            clarity = self._transparency(frame, stars, alignment)
            record.transparency = None if clarity is None else round(clarity, 4)
            reason = gate(
                Quality.of(stars, alignment, clarity), self.limits, self.reference.quality
            )
            if reason is not None:  # the residual and transparency limits
                record.ms.update(watch.ms)
                return self._reject(record, reason)
            with watch.stage("normalize"):
                norm = estimate(
                    self.settings.normalize,
                    _samples(frame),
                    alignment.matrix,
                    self.reference.sky,
                    self._sky_test(frame.shape[0]),
                    clarity,
                )
            record.ms.update(watch.ms)
        record.transform = alignment.as_list()
        record.residual_px = round(alignment.residual_px, 4)
        record.normalization = norm.as_json()
        weight = _weight(self.settings, stars, norm)
        if self.settings.weights != "none":
            record.weight = float(f"{weight:.6g}")
        record.stored = self._add(frame, alignment.matrix, weight, norm, watch)
        record.ms.update(watch.ms)
        record.status = "accepted"
        self.shapes.add(quality)
        self.centre = _centre(alignment.matrix, frame.shape)
        return record

    def better_reference(self, prepared: Prepared, accepted: int) -> str | None:
        """Why ``prepared`` should replace the reference, or None (the usual answer).

        Only while the reference is young (``accepted``, the frames stacked on it, fewer than
        ``REFERENCE_PROBATION``):
        when ``prepared`` would itself be a valid reference, passes the gates against the
        reference, and the reference would be rejected against it by the relative gates, the
        first frame was a poor choice (thin cloud, haze, dew, twilight: enough stars to pass on
        its own, far fewer than a clear frame). The caller then starts the session over with
        ``prepared`` first. Requiring both directions means two frames that are each better in
        one way (more stars, but softer) never displace each other back and forth.
        """
        ref = self.reference
        quality = prepared.quality
        if ref is None or quality is None or prepared.frame is None or prepared.error is not None:
            return None
        if accepted >= REFERENCE_PROBATION or prepared.frame.shape != ref.shape:
            return None
        if reference_flaw(quality, self.limits) is not None:
            return None
        if gate(quality, self.limits, ref.quality) is not None:
            return None  # the two are not comparable (e.g. more stars but softer): keep it
        flaw = gate(ref.quality, self.limits, quality)
        if flaw is None:
            return None
        return f"reference {Path(ref.file).name} is worse than {prepared.path.name}: {flaw}"

    # --- helpers --------------------------------------------------------------------------
    @property
    def reference_channels(self) -> int:
        assert self.reference is not None
        return self.reference.channels

    def _sky_test(self, rows: int) -> Callable[[FloatArray, FloatArray], np.ndarray]:
        """Sky (not ground) at full-resolution frame positions, for the normalization."""
        sky = self.sky
        return lambda x, y: sky.in_sky(x, y, rows)

    def _transparency(
        self, frame: Frame | MosaicFrame, stars: Stars, alignment: Alignment
    ) -> float | None:
        """Starlight let through relative to the reference, exposure-corrected when both
        exposures are known."""
        assert self.reference is not None
        ratio = 1.0
        mine, theirs = frame.meta.exposure_s, self.reference.exposure_s
        if mine and theirs and mine > 0 and theirs > 0:
            ratio = mine / theirs
        return transparency(stars, self.reference.stars, alignment, ratio)

    def _reject(self, record: FrameRecord, reason: str) -> FrameRecord:
        record.status, record.reason = "rejected", reason
        return record

    def _start(self, prepared: Prepared) -> None:
        frame = prepared.frame
        assert frame is not None and prepared.stars is not None and prepared.quality is not None
        channels = _channels(frame)
        self.mosaic = isinstance(frame, MosaicFrame)
        self.reference = Reference(
            str(prepared.path),
            prepared.stars,
            prepared.quality,
            frame.shape,
            channels,
            SkySamples.of(_samples(frame), self._sky_test(frame.shape[0])),
            frame.meta.exposure_s,
        )
        if self.settings.final == "live" and self.with_live:
            self.live_only = "final = 'live': no frame store"
        else:
            self.store = FrameStore(self.workdir / "frames", frame.shape, channels)
        self.start_landscape(frame.bin)
        if not self.with_live:
            return
        self.live = self.new_live(self.store)

    def reserve_bytes(self) -> int:
        """Disk kept for what this stack's close needs (:func:`budget.close_reserve`)."""
        ref = self.reference
        if ref is None:
            return close_reserve(None, 0, 1)
        warmed = self.live is not None and self.live.warmed_up
        scale = DRIZZLE_SCALES[self.settings.drizzle] if self._drizzled_session() else 0
        warmup = 1 if warmed else self.settings.live_warmup
        return close_reserve(ref.shape, ref.channels, warmup, drizzle=scale)

    def _drizzled_session(self) -> bool:
        """``drizzle`` is on and the session's frames are mosaics (from its reference, or, in a
        resumed session, its store)."""
        if self.settings.drizzle == "off":
            return False
        if self.mosaic is None and self.store is not None and len(self.store):
            self.mosaic = self.store.frame(0).mosaic is not None
        return bool(self.mosaic)

    def new_live(self, store: FrameStore | None) -> Live:
        """An empty live stack with the session's rejection settings: a live drizzle (on its
        output grid) when the session drizzles and its state fits in memory
        (:func:`live_drizzle_refusal`; else said in one log line), else on the reference grid."""
        assert self.reference is not None
        s = self.settings
        if self._drizzled_session():
            plan = Drizzle(DRIZZLE_SCALES[s.drizzle], s.drizzle_drop)
            why = live_drizzle_refusal(self.reference.shape, plan.scale)
            if why is None:
                return LiveDrizzle(self.reference.shape, plan, kappa=s.live_kappa,
                                   warmup=s.live_warmup, store=store)  # fmt: skip
            logging.getLogger(__name__).warning(
                "drizzle %s: %s; the live stack demosaics (the final still drizzles)",
                s.drizzle, why,
            )  # fmt: skip
        return LiveStack(
            self.reference.shape,
            self.reference.channels,
            kappa=self.settings.live_kappa,
            warmup=self.settings.live_warmup,
            store=store,
        )

    def go_live_only(self, reason: str) -> None:
        """Stop storing frames (the disk cannot hold more): the live stack goes on alone and
        becomes the final, so the result still holds every accepted frame."""
        if self.live_only is not None:
            return
        self.live_only = reason
        if self.live is not None:
            self.live.detach_store()

    def _add(
        self,
        frame: Frame | MosaicFrame,
        matrix: FloatArray,
        weight: float,
        norm: Normalization,
        watch: Stopwatch,
    ) -> bool:
        """Store the frame (with its combine ``weight``), then add the stored frame live;
        returns whether it was stored.

        A mosaic frame is stored as its 16-bit mosaic (demosaiced and warped band by band when
        read); a full frame is warped band by band straight into the store. Either way nothing
        holds a full warped copy beside the live state, and the live stack reads exactly what
        the final combine will read, so a resume that re-adds frames from the store reproduces
        it bit for bit. In live-only mode (``final = "live"``, or the disk could not hold more
        frames: :attr:`live_only` says why) the frame is warped whole and goes to the live stack
        only, the same values it would have read back from the store.
        """
        assert self.reference is not None
        # --- landscape and products: the frame in the camera frame, before its sky is stored
        self._landscape_hook(frame, matrix, norm, weight, watch)
        if self.live_only is None and self.store is not None:
            bytes_needed = self.store.frame_bytes
            if isinstance(frame, MosaicFrame):
                bytes_needed = int(frame.codes.size) * 2
            why = self.budget.check(bytes_needed, self.reserve_bytes()) if self.budget else None
            if why is None:
                try:
                    self._store(frame, matrix, weight, norm, watch)
                except OSError as err:
                    if err.errno not in (errno.ENOSPC, errno.EDQUOT) or self.live is None:
                        raise
                    why = f"disk full while storing {frame.path.name}"
            if why is None:
                if self.live is not None and self.catch_up:
                    with watch.stage("accumulate"):
                        self.live.catch_up()
                return True
            self.go_live_only(why)
        assert self.live is not None
        if isinstance(self.live, LiveDrizzle):
            if not isinstance(frame, MosaicFrame):
                raise ValueError("a live drizzle takes mosaics only")  # the gate keeps them out
            layout = MosaicLayout(frame.pattern, frame.white_balance, frame.demosaic)
            with watch.stage("accumulate"):
                self.live.add_mosaic(frame.codes, layout, matrix, norm, weight=weight,
                                     name=frame.path.name)  # fmt: skip
            return False
        shape = self.reference.shape
        kernel = self.settings.interpolation
        with watch.stage("warp"):
            if isinstance(frame, MosaicFrame):
                layout = MosaicLayout(frame.pattern, frame.white_balance, frame.demosaic)
                warped, fp = warp_mosaic(
                    frame.codes, layout, matrix, shape, interpolation=kernel, normalization=norm
                )
            else:
                warped, fp = warp(frame.image, matrix, shape, interpolation=kernel)
                norm.apply_inside(warped, 0, shape, fp)
        with watch.stage("accumulate"):
            self.live.add(warped, fp)
        return False

    def _store(
        self,
        frame: Frame | MosaicFrame,
        matrix: FloatArray,
        weight: float,
        norm: Normalization,
        watch: Stopwatch,
    ) -> None:
        """Append the frame to the store: its mosaic, or the frame warped band by band."""
        assert self.store is not None
        if isinstance(frame, MosaicFrame):
            layout = MosaicLayout(frame.pattern, frame.white_balance, frame.demosaic)
            with watch.stage("store"):
                self.store.add_mosaic(
                    frame.codes,
                    layout,
                    matrix,
                    weight,
                    frame.path.name,
                    interpolation=self.settings.interpolation,
                    normalization=norm,
                )
        else:
            with watch.stage("warp+store"):
                self.store.add_warped(
                    frame.image,
                    matrix,
                    weight=weight,
                    name=frame.path.name,
                    interpolation=self.settings.interpolation,
                    normalization=norm,
                )

    # --- landscape and products ----------------------------------------------------------
    def _landscape_hook(
        self,
        frame: Frame | MosaicFrame,
        matrix: FloatArray,
        norm: Normalization,
        weight: float,
        watch: Stopwatch,
    ) -> None:
        """Products fed with the camera-frame frame; the ground stacked (freeze) and filled
        before the sky is stored; an automatic mask learnt. A mosaic frame is demosaiced in the
        camera frame only when the products need RGB."""
        if self.products is not None:
            with watch.stage("products"):
                image = frame.image if isinstance(frame, Frame) else _camera_rgb(frame)
                mask = self.landscape.mask
                self.products.add(image, matrix, mask, frame.luminance, frame.bin)
        with watch.stage("ground"):
            if self.landscape.add(frame, matrix, norm, weight):
                self._follow_mask()

    def start_landscape(self, bin: int) -> None:
        """The sky mask, the ground stack and the products, once the reference's geometry is
        known (at the reference, and when a session resumes)."""
        ref = self.reference
        assert ref is not None
        self.landscape.start(ref.shape, ref.channels, bin)
        if self.landscape.auto and self.landscape.mask is not None:
            self._follow_mask()
        wanted = [p for p in self.settings.products if p != "stack"]
        if wanted:
            s = self.settings
            self.products = Products(
                wanted,
                self.workdir,
                ref.shape,
                ref.channels,
                gap_fill=s.trails_gap_fill,
                timelapse_width=s.timelapse_width,
                timelapse_fps=s.timelapse_fps,
            )

    def _follow_mask(self) -> None:
        """An automatic sky mask was found or refined: detection and the reference's sky
        samples follow it (the ratio stays until then, and where it falls back)."""
        mask = self.landscape.mask
        if mask is None or mask.source != "auto" or self.reference is None:
            return
        self.sky = SkyArea(1.0, mask.sky)
        ref = self.reference
        gx, gy = np.meshgrid(ref.sky.xs.astype(np.float64), ref.sky.ys.astype(np.float64))
        inside = mask.in_sky(gx.ravel(), gy.ravel()).reshape(gx.shape)
        sky = replace(ref.sky, sky=ref.sky.sky & inside)
        self.reference = replace(ref, sky=sky)

    def header(self, tally: Tally, scale: int = 1) -> dict[str, Any]:
        """FITS header cards describing the stack of ``tally``'s frames (NCOMBINE, EXPTIME,
        dates, settings) and, once solved, where it points (the WCS of a stack ``scale`` times
        finer than the reference: a drizzle)."""
        assert self.reference is not None
        s = self.settings
        cards: dict[str, Any] = {
            "NCOMBINE": tally.accepted,
            "EXPTIME": round(tally.exposure_s, 3),
            "SWCREATE": f"nightstack {__version__}",
            "REFFRAME": Path(self.reference.file).name[:68],
            "STACKMTH": "live" if self.live_only is not None else s.stack_method,
            "STACKSIG": s.stack_sigma,
            "STACKITR": s.stack_maxiters,
            "XFMODEL": s.transform_model,
            "DEMOSAIC": s.demosaic if s.drizzle == "off" else f"drizzle {s.drizzle}",
            "NORMALIZ": s.normalize,
        }
        if tally.first_time is not None:
            cards["DATE-OBS"] = tally.first_time
        if tally.last_time is not None:
            cards["DATE-END"] = tally.last_time
        solved = self.solved
        if solved is not None:
            cards.update(solved.cards(scale))
        return cards

    def final(self, progress: Callable[[int, int], None] | None = None) -> FloatArray:
        """The exact combine over every accepted frame (bounded RAM).

        Releases the live stack first: the combine reads only the frame store, and the live
        state (6.67 bytes per pixel and channel, 480 MB at 24 MP) would sit idle beside it. A
        daemon that resumes rebuilds it from the checkpoint and the store.
        """
        if self.live_only is not None or self.store is None:
            return self._live_final()
        self.live = None
        if self.settings.drizzle != "off" and self.store.frame(0).mosaic is not None:
            return self._drizzled(progress)
        weights = None
        if self.settings.weights != "none":
            weights = self.store.weights()
        return combine(
            self.store,
            method=self.settings.stack_method,
            sigma=self.settings.stack_sigma,
            maxiters=self.settings.stack_maxiters,
            weights=weights,
            ram_cap_bytes=self.settings.ram_cap_mb * 2**20,
            progress=progress,
        )

    def _drizzled(self, progress: Callable[[int, int], None] | None) -> FloatArray:
        """The Bayer drizzle of the store (``drizzle``), rejection as the stack method asks."""
        assert self.store is not None
        s = self.settings
        plan = Drizzle(DRIZZLE_SCALES[s.drizzle], s.drizzle_drop)
        clip = s.stack_sigma if s.stack_method in ("sigma_clip", "winsorized") else None
        image = drizzle_combine(self.store, plan, sigma=clip, progress=progress)
        holes = drizzle_holes(image, self.store, plan)
        if holes.any():
            logging.getLogger(__name__).warning(
                "drizzle: no sample fell on %s of the output pixels (red, green, blue): too "
                "little dither for drop %g; a larger drop or a smaller scale fills them",
                ", ".join(f"{h:.1%}" for h in holes),
                s.drizzle_drop,
            )
        return image

    def _live_final(self) -> FloatArray:
        """The live stack as the final (live-only sessions), released after."""
        assert self.live is not None, "a live-only final needs its live stack"
        image = self.live.result()
        self.live = None
        return image


def _camera_rgb(frame: MosaicFrame) -> FloatArray:
    """A mosaic frame demosaiced on its own (camera) grid: (rows, cols, 3) float32."""
    layout = MosaicLayout(frame.pattern, frame.white_balance, frame.demosaic)
    image, _ = warp_mosaic(frame.codes, layout, IDENTITY, frame.shape)
    return image


def reference_flaw(quality: Quality, limits: QualityLimits) -> str | None:
    """Why a frame cannot be a reference (the absolute gates, and star shapes that could be
    measured: a badly trailed frame can show enough detections with no measurable FWHM or
    elongation), or None."""
    reason = gate(quality, limits)
    measured = math.isfinite(quality.fwhm_px) and math.isfinite(quality.elongation)
    if reason is None and not measured:
        reason = "no measurable star shapes for a reference (trailed or out of focus?)"
    return reason


def _centre(matrix: FloatArray, shape: tuple[int, int]) -> tuple[float, float]:
    """Where the centre of a frame of ``shape`` lands on the reference through ``matrix``."""
    x, y = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
    return (float(matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]),
            float(matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2]))  # fmt: skip


def _channels(frame: Frame | MosaicFrame) -> int:
    """3 for a mosaic (it demosaics to RGB), else the image's channels."""
    return 3 if isinstance(frame, MosaicFrame) else int(frame.image.shape[2])


def _samples(frame: Frame | MosaicFrame) -> FloatArray | TileSamples:
    """What the sky normalization samples: the image, or a mosaic's superpixel colours."""
    if isinstance(frame, MosaicFrame):
        return TileSamples(frame.codes, frame.pattern, frame.white_balance)
    return frame.image


def _weight(settings: Settings, stars: Stars, norm: Normalization) -> float:
    """Per-frame weight: 1; ``"fwhm"``: 1 / FWHM^2 (sharper frames count more); ``"noise"``:
    1 / sigma^2 of the sky after the frame's normalization (its mean scale: deeper frames count
    more, as Siril's noise weighting)."""
    if settings.weights == "fwhm" and math.isfinite(stars.fwhm_px) and stars.fwhm_px > 0:
        return 1.0 / stars.fwhm_px**2
    if settings.weights == "noise" and math.isfinite(stars.noise) and stars.noise > 0:
        sigma = stars.noise * float(np.mean(np.abs(norm.scale)))
        return 1.0 / sigma**2 if sigma > 0 else 1.0
    return 1.0
