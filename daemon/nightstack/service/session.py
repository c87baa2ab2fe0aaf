"""A live-stacking session on disk: journal, checkpoint, resume, preview and close.

The folder's files and the journal's reading rule: :mod:`nightstack.service.folder`.

Order of work per accepted frame: frame store (atomic file) -> live stack -> journal line
(fsync) -> every K frames a checkpoint. After a crash, ``Session.resume`` restores the
checkpoint, drops store entries the journal never confirmed and re-adds from the store the
accepted frames journaled after the checkpoint: no frame lost, none counted twice. Frames the
journal never saw are re-reported by the watcher's start-up scan and processed normally.

A failed write (disk full, I/O error) raises ``OSError`` out of :meth:`Session.ingest` or
:meth:`Session.close` and leaves the disk as a crash at that point would: a journal line is
written whole or not at all (a partial append is cut off again), every other file is replaced
atomically. The daemon then drops the Session object and later reloads it with
:meth:`Session.resume`, exactly as after a kill -9; temporary files a crash left are removed there.

Why one module of this size: resume and salvage must mirror, step for step, the write order of
``ingest`` and ``close`` in the same class; split apart they would drift.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nightstack import __version__
from nightstack.config import Settings, redacted
from nightstack.io.writers import (
    remove_temporaries,
    write_bytes,
    write_fits_bands,
    write_json,
    write_preview,
)
from nightstack.pipeline.finish import Target, finish
from nightstack.pipeline.prepare import Prepared, load_sky_mask
from nightstack.pipeline.records import FrameRecord, Tally
from nightstack.pipeline.stacker import Reference, Stacker
from nightstack.products.views import (
    LAST_FRAME,
    LINEAR_PREVIEW,
    linear_width,
    write_last_frame,
    write_linear_preview,
)
from nightstack.registration.detect import SkyArea
from nightstack.service.folder import (
    CHECKPOINT,
    FRAMES,
    GROUND,
    JOURNAL,
    LIVE_FITS,
    PREVIEW,
    REFERENCE,
    SESSION,
    SKY_MASK_PNG,
    SNAPSHOTS,
    STACK_FITS,
    STACK_TIF,
    load_reference,
    new_session_dir,
    read_journal,
    read_journal_file,
    read_meta,
    save_reference,
)
from nightstack.service.solving import Solving
from nightstack.solve.wcs import SolvedField, from_entry
from nightstack.stacking.budget import DiskBudget
from nightstack.stacking.checkpoint import load_live, save_live
from nightstack.stacking.live_drizzle import Live, LiveDrizzle
from nightstack.stacking.store import FrameStore

log = logging.getLogger("nightstack.service.session")

class Session:
    """One night (or part of one): frames in, journal + live preview out, final stack at close."""

    def __init__(self, directory: Path, settings: Settings) -> None:
        self.dir = directory
        self.settings = settings
        self.budget = DiskBudget(directory, settings.min_free_frames)
        self.stacker = Stacker(
            settings,
            directory,
            sky=SkyArea(settings.landscape_mask_ratio, load_sky_mask(settings)),
            catch_up=False,  # the live stack takes a stored frame after its journal line
            budget=self.budget,
        )
        self.tally = Tally()
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.state = "open"
        self.records = 0  # journal lines written
        self.counted_at_checkpoint = 0
        self.since_preview = 0
        self.last_preview = 0.0
        self.last_live_fits = -math.inf
        self.last_checkpoint = -math.inf
        self.stored_since_checkpoint = 0
        """Bytes written to the frame store since the last checkpoint (its write pacing)."""
        self.stored_since_live_fits = 0
        """...and since the last live.fits (its write pacing)."""
        self.last_frame = time.monotonic()
        self.opened_by: str | None = None
        """Why the session split itself from the last (``service.split``): journaled on its
        first frame's line, in session.json; None for a session opened by the first frame."""
        self.accumulate_ms: float | None = None
        """How long the live stack took to add the last stored frame (after its journal line)."""
        self._held: dict[str, int] = {}
        """Accepted journal lines not taken back by a ``lost`` line, by content hash (resume)."""
        self._journal = os.open(directory / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._outputs: dict[str, Any] = {}
        self._meta_lock = threading.Lock()  # session.json is also written by the solve thread
        self.solving = Solving(settings, self.id, self._solved)

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def low_space(self) -> str | None:
        """A warning while the disk holds fewer than ``min_free_frames`` frames, else None."""
        return self.budget.warning

    @property
    def sky(self) -> SkyArea:
        """Where the stars are for the next frame (an automatic landscape mask once learned)."""
        return self.stacker.sky

    @property
    def frame_bytes(self) -> int:
        """The bytes of one frame-store entry (0 before the reference)."""
        store = self.stacker.store
        return store.frame_bytes if store is not None else 0

    @property
    def notes(self) -> list[str]:
        """What the status line must say besides the counts: low disk, live-only."""
        return [n for n in (self.low_space, self.stacker.live_only) if n]

    @property
    def reference_fwhm(self) -> float | None:
        """The reference's star FWHM (px), once there is one."""
        ref = self.stacker.reference
        return ref.stars.fwhm_px if ref is not None else None

    def better_reference(self, prepared: Prepared) -> str | None:
        """Why ``prepared`` should start the session over as its reference, or None
        (:meth:`Stacker.better_reference`)."""
        return self.stacker.better_reference(prepared, self.tally.accepted)

    # --- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, output_dir: Path, settings: Settings) -> Session:
        directory = new_session_dir(output_dir)
        try:
            session = cls(directory, settings)
            session._write_meta()
        except OSError:
            shutil.rmtree(directory, ignore_errors=True)  # no half-made session left behind
            raise
        log.info("session %s opened", session.id)
        return session

    @classmethod
    def resume(cls, directory: Path, settings: Settings) -> Session:
        """Reopen a session after a crash or restart (see the module docstring).

        A damaged session is salvaged: an unreadable session.json is rebuilt from the journal,
        garbage journal lines are dropped, frames whose stored data is missing or truncated are
        journaled as ``lost`` (and stacked again if their raw file comes back: the watcher's
        start-up scan), and the live stack is rebuilt from the intact frames when its
        checkpoint is unreadable or no longer matches the store. What cannot be salvaged
        raises (the daemon then quarantines the session); OSError means the disk (full, I/O).
        """
        notes: list[str] = []
        found = read_meta(directory)
        if found is None:
            notes.append("session.json unreadable: rebuilt from the journal")
        meta = found or {"state": "open"}
        settings = _own_settings(directory.name, meta.get("settings"), settings)
        removed = remove_temporaries(directory)
        journal = directory / JOURNAL
        records, good, garbage = read_journal_file(journal)
        if garbage:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            write_bytes(journal, text.encode("utf-8", "surrogateescape"))
            notes.append(f"{garbage} garbage journal line(s) dropped")
        elif journal.exists() and journal.stat().st_size != good:
            os.truncate(journal, good)  # drop a torn tail before appending (needs no space)
        session = cls(directory, settings)
        try:
            session._restore(meta, records, removed, notes)
        except BaseException:
            session.abandon()
            raise
        if notes:
            log.warning("session %s salvaged: %s", session.id, "; ".join(notes))
            session._write_meta(note="salvaged: " + "; ".join(notes))
        return session

    def _restore(
        self,
        meta: dict[str, Any],
        records: list[dict[str, Any]],
        removed: int,
        notes: list[str],
    ) -> None:
        """Resume's second half: state, reference, frame store, live stack and counters."""
        directory, settings, stacker = self.dir, self.settings, self.stacker
        self.started = meta.get("started", self.started)
        self.opened_by = meta.get("opened_by")
        self.state = meta.get("state", "open")
        self.records = len(records)
        if removed:
            log.info(
                "session %s: removed %d temporary file(s) of an interrupted write", self.id, removed
            )
        ref_file = directory / REFERENCE
        if not ref_file.exists():
            # stopped before the reference was saved: whatever the store holds was never
            # journaled (the frames are re-reported and stacked again)
            shutil.rmtree(directory / FRAMES, ignore_errors=True)
            shutil.rmtree(directory / CHECKPOINT, ignore_errors=True)
            log.info(
                "session %s resumed: %d journal lines, no reference yet", self.id, len(records)
            )
        else:
            reference = load_reference(ref_file)
            live_only = meta.get("live_only") or (
                "final = 'live': no frame store" if settings.final == "live" else None
            )
            store = FrameStore(
                directory / FRAMES, reference.shape, reference.channels, salvage=True
            )
            stored = _stored_records(records)  # store position i holds stored[i]
            held = len(store)
            damaged = [i for i in store.damaged if i < len(stored)]
            damaged += [
                i for i in range(min(len(store), len(stored)))
                if store.frame(i).name != Path(stored[i]["file"]).name and i not in damaged
            ]  # fmt: skip
            # entries stored but never journaled, and the damaged ones, go
            store.drop([*damaged, *range(len(stored), len(store))])
            damaged += range(held, len(stored))  # journaled, never indexed: lost as well
            stacker.reference, stacker.store = reference, store
            self._restore_solve(meta.get("solve"), reference)
            stacker.start_landscape(settings.bin)  # landscape and products: reopened
            journal_lines = len(records)
            for i in damaged:  # journal their loss: the final counts each frame once
                self._journal_lost(
                    stored[i], "stored data lost (frame store file missing or truncated)", records
                )
            if damaged:
                notes.append(f"{len(damaged)} frame(s) with damaged stored data journaled as lost")
            if stacker.landscape.ground is not None:  # the ground keeps the sky store's frames
                stacker.landscape.ground.keep([store.frame(i).name for i in range(len(store))])
            if live_only is not None:
                self._restore_live_only(live_only, store, stored, records[:journal_lines], records)
                for record in records:
                    self._count(record)
                return
            if self.state == "closing":  # only the final combine is left: it reads the store
                log.info("session %s resumed to finish closing", self.id)
                for record in records:
                    self._count(record)
                return
            checkpoint = directory / CHECKPOINT
            state = _read_checkpoint(checkpoint)
            live: Live | None = None
            if state is not None and not damaged:
                try:
                    live = load_live(checkpoint / "live", store=store)
                except (OSError, ValueError, KeyError, EOFError) as err:
                    notes.append(
                        f"checkpoint unreadable ({err}): live stack rebuilt from the store"
                    )
                if live is not None and live.frames > len(store):
                    notes.append("checkpoint ahead of the store: live stack rebuilt from the store")
                    live = None
            if live is None:
                live = stacker.new_live(store)
            stacker.live = live
            self.counted_at_checkpoint = live.frames
            replayed = live.catch_up()  # the accepted frames journaled after the checkpoint
            log.info(
                "session %s resumed: %d journal lines, %d frames from checkpoint, %d replayed",
                self.id,
                len(records),
                live.frames - replayed,
                replayed,
            )
        for record in records:
            self._count(record)

    def _journal_lost(
        self, record: dict[str, Any], reason: str, records: list[dict[str, Any]]
    ) -> None:
        """Journal that an accepted frame's data is lost (stacked again if its raw comes back)."""
        loss = FrameRecord(
            file=record["file"],
            status="lost",
            reason=reason,
            sha256=record.get("sha256"),
            exposure_s=record.get("exposure_s"),
        )
        self._append(loss)
        records.append(json.loads(loss.to_json()))

    def _restore_live_only(
        self,
        why: str,
        store: FrameStore,
        stored: list[dict[str, Any]],
        journaled: list[dict[str, Any]],
        records: list[dict[str, Any]],
    ) -> None:
        """Resume a live-only session: its live stack holds frames the store does not, so it
        comes from the checkpoint; accepted frames journaled after it are added again from the
        store when stored, and journaled as lost (stacked again from their raw file when it is
        still there) when not."""
        stacker = self.stacker
        reference = stacker.reference
        assert reference is not None
        checkpoint = self.dir / CHECKPOINT
        state = _read_checkpoint(checkpoint)
        live, since = None, 0
        if state is not None:
            try:
                live = load_live(checkpoint / "live")
                since = int(state["records"])
            except (OSError, ValueError, KeyError, EOFError):
                live = None
        if live is None:
            live = stacker.new_live(None)
        position = {id(r): i for i, r in enumerate(stored)}
        replayed = lost = 0
        for record in _not_taken_back(journaled[since:]):
            i = position.get(id(record))
            if i is None or i >= len(store):
                self._journal_lost(record, "not stored (live-only) and not in the checkpoint",
                                   records)  # fmt: skip
                lost += 1
            else:
                live.add_stored(store, i)
                replayed += 1
        stacker.store, stacker.live, stacker.live_only = store, live, why
        self.counted_at_checkpoint = live.frames
        log.info(
            "session %s resumed live-only (%s): %d frames from checkpoint, %d replayed, %d lost",
            self.id, why, live.frames - replayed, replayed, lost,
        )  # fmt: skip

    def _count(self, record: dict[str, Any]) -> None:
        """Count a journaled frame into the session's tallies (a first attempt waiting for its
        retry is not counted: see :meth:`journal_attempt`). A ``lost`` line takes back only a
        frame counted as accepted (a repeated one, as an older nightstack wrote at each resume,
        counts nothing): the tallies never go negative."""
        if record.get("retry") is True:
            return
        key = str(record.get("sha256") or record["file"])
        if record["status"] == "accepted":
            self._held[key] = self._held.get(key, 0) + 1
        elif record["status"] == "lost":
            if not self._held.get(key):
                return
            self._held[key] -= 1
        self.tally.count(FrameRecord.from_json(record))

    # --- per frame --------------------------------------------------------------------------
    def ingest(
        self, prepared: Prepared, journaled: Callable[[FrameRecord], None] | None = None
    ) -> FrameRecord:
        """Stack one prepared frame and journal it (fsync'd); ``journaled(record)`` is called
        once its line is written, before the live stack reads a stored frame (the daemon's
        status follows the journal, not the live add)."""
        had_reference = self.stacker.reference is not None
        was_live_only = self.stacker.live_only
        record = self.stacker.stack(prepared)
        if self.records == 0:
            record.split = self.opened_by
        self.tally.count(record)
        if record.status == "accepted" and not had_reference:
            ref = self.stacker.reference
            assert ref is not None
            save_reference(self.dir / REFERENCE, ref)
            self._write_meta()
            self.solving.solve_reference(ref.file, ref.stars, ref.shape, self._keep_solve)
        elif record.status == "accepted" and self.solving.frame_due():
            stars, ref = prepared.stars, self.stacker.reference
            if stars is not None and ref is not None:  # where the mount points now
                self.solving.solve_frame(prepared.path, stars, ref.shape)
        if self.stacker.live_only is not None and was_live_only is None and had_reference:
            log.error(
                "session %s goes live-only from %s: %s; frames are still aligned and stacked "
                "live, and the final will be the live stack (every accepted frame)",
                self.id, Path(record.file).name, self.stacker.live_only,
            )  # fmt: skip
            self._write_meta()
            self._checkpoint_now()  # from now on the checkpoint is the live stack's only copy
        if record.status == "accepted" and self.low_space:
            record.warning = self.low_space
        store = self.stacker.store
        if record.stored and store is not None and len(store):
            stored = store.stored_bytes(len(store) - 1)
            self.stored_since_checkpoint += stored
            self.stored_since_live_fits += stored
        self._append(record)
        self.last_frame = time.monotonic()
        if journaled is not None:
            journaled(record)
        if record.status == "accepted":
            self.since_preview += 1
            live = self.stacker.live
            assert live is not None
            if self.settings.web_enabled:
                self._write_last_frame(prepared)
            if record.stored:
                prepared.frame = None  # stored and journaled: its pixels go before the live add
                self._catch_up(live)
            every = self.settings.snapshot_every_frames
            if every and live.frames % every == 0:
                self._snapshot(live.frames)
            if self._checkpoint_due(live.frames):
                self._checkpoint_now()  # the frame is journaled: only the checkpoint waits
        return record

    def _catch_up(self, live: Live) -> None:
        """Add the stored frames the live stack has not seen (the one just journaled). A failure
        (a read error of the store) is logged, not raised: the frame is journaled and stored,
        the next frame's catch-up or a resume adds it."""
        start = time.perf_counter()
        try:
            live.catch_up()
        except (OSError, ValueError) as err:
            log.error("session %s: live stack behind the store (%s)", self.id, err)
            return
        self.accumulate_ms = round((time.perf_counter() - start) * 1000.0, 1)

    def _snapshot(self, frames: int) -> None:
        """snapshots/live-NNNN.fits: the live stack after its NNNN-th frame, kept."""
        try:
            self.write_live_fits(self.dir / SNAPSHOTS / f"live-{frames:04d}.fits")
        except OSError as err:  # the frame is journaled: a missing snapshot loses nothing
            log.error("session %s: snapshot not written (%s)", self.id, err.strerror or err)

    def reject(self, record: FrameRecord) -> None:
        """Journal a frame rejected outside the pipeline (and count it)."""
        self._append(record)
        self.tally.count(record)

    def journal_attempt(self, record: FrameRecord) -> None:
        """Journal a first attempt that waits for its retry (``retries.RetryRecord``): not
        counted, the tallies count files, not attempts."""
        self._append(record)

    def _append(self, record: FrameRecord) -> None:
        """Append one journal line and fsync it: the frame's commit point. All or nothing: a
        write cut short (disk full) is truncated away again before the error propagates."""
        data = (record.to_json() + "\n").encode("utf-8")
        before = os.fstat(self._journal).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._journal, view) :]
            os.fsync(self._journal)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal, before)
            raise
        self.records += 1

    def reserve_bytes(self) -> int:
        """Disk kept for what the close needs (:meth:`Stacker.reserve_bytes`)."""
        return self.stacker.reserve_bytes()

    def _checkpoint_now(self) -> None:
        """Checkpoint; a failure (disk full, I/O) is logged, not raised: the previous checkpoint
        stays valid and the next one tries again."""
        try:
            self.checkpoint()
        except OSError as err:
            log.error(
                "session %s: checkpoint not written (%s); the previous one stays valid and the "
                "next one tries again",
                self.id,
                err.strerror or err,
            )

    def _checkpoint_due(self, frames: int) -> bool:
        """Every ``checkpoint_every_frames`` frames, but at most once every
        ``checkpoint_min_interval_s``, and only once the frame store has written
        1 / ``checkpoint_write_ratio`` times the checkpoint's bytes since the last: a backlog or
        a fast camera does not rewrite the live state (:attr:`LiveStack.state_bytes`: 6.67 bytes
        per pixel and channel, 480 MB at 24 MP) every few frames, and a night writes at most
        1 + ratio times what its store needs (an SD card's wear); a resume replays the frames
        since from the store."""
        if frames - self.counted_at_checkpoint < self.settings.checkpoint_every_frames:
            return False
        if time.monotonic() - self.last_checkpoint < self.settings.checkpoint_min_interval_s:
            return False
        live = self.stacker.live
        if self.stacker.live_only is not None or live is None:
            return True  # live-only: the checkpoint is the live stack's only copy
        ratio = self.settings.checkpoint_write_ratio
        return _paid_for(self.stored_since_checkpoint, ratio, live.state_bytes)

    def checkpoint(self) -> None:
        """Save the live accumulator atomically (old checkpoint stays valid until the swap)."""
        live = self.stacker.live
        if live is None:
            return
        checkpoint = self.dir / CHECKPOINT
        checkpoint.mkdir(exist_ok=True)
        save_live(live, checkpoint / "live")
        if self.stacker.products is not None:
            self.stacker.products.checkpoint()  # the star trails so far
        write_json(checkpoint / "state.json", {"records": self.records, "frames": live.frames})
        self.counted_at_checkpoint = live.frames
        self.last_checkpoint = time.monotonic()
        self.stored_since_checkpoint = 0

    def preview_due(self) -> bool:
        if self.stacker.live is None or self.since_preview == 0:
            return False
        elapsed = time.monotonic() - self.last_preview
        return (
            self.since_preview >= self.settings.preview_every_frames
            or elapsed >= self.settings.preview_every_s
        )

    def write_preview(self) -> None:
        """preview.jpg (and, for the web page, preview_linear.fits), and live.fits when
        ``live_fits_every_s`` has passed since the last."""
        live = self.stacker.live
        assert live is not None
        width = self.settings.preview_width
        image = self.stacker.landscape.preview(live.preview_image(width), live)  # freeze ground
        if self.settings.web_enabled:  # the page's stretch data first: it finds both new
            narrow = linear_width(*live.shape, live.channels, width)
            header = {"NCOMBINE": live.frames, "STACKMTH": "live"}
            write_linear_preview(self.dir / LINEAR_PREVIEW, image, width=narrow, header=header)
        write_preview(self.dir / PREVIEW, image, width=width)
        self.since_preview = 0
        self.last_preview = time.monotonic()
        if self._live_fits_due(live):
            self.write_live_fits(self.dir / LIVE_FITS)
            self.last_live_fits = self.last_preview
            self.stored_since_live_fits = 0

    def _write_last_frame(self, prepared: Prepared) -> None:
        """last.jpg: the frame just accepted, for the page's "last frame" view (a failed
        write is logged: the frame is journaled)."""
        frame = prepared.frame
        if frame is None:
            return
        try:
            write_last_frame(
                self.dir / LAST_FRAME, frame.luminance, width=self.settings.preview_width
            )
        except (OSError, ValueError) as err:
            log.error("session %s: last.jpg not written (%s)", self.id, err)

    def _live_fits_due(self, live: Live) -> bool:
        """live.fits with this preview: ``live_fits_every_s`` since the last, and the store has
        written 1 / ``live_fits_write_ratio`` times its bytes (float32, 12 bytes a pixel: 288 MB
        at 24 MP, ~6 stored frames) since, so it adds at most that ratio to the night's writes.
        The first is written at once; live-only sessions pace it by time alone."""
        if self.last_preview - self.last_live_fits < self.settings.live_fits_every_s:
            return False
        if math.isinf(self.last_live_fits) or self.stacker.live_only is not None:
            return True
        size = live.shape[0] * live.shape[1] * live.channels * 4
        return _paid_for(self.stored_since_live_fits, self.settings.live_fits_write_ratio, size)

    def write_live_fits(self, path: Path) -> None:
        """The live stack as linear float32 FITS (stack.fits' grid and header conventions, with
        NCOMBINE and EXPTIME of the frames in it and STACKMTH = 'live'), band by band."""
        live = self.stacker.live
        assert live is not None
        path.parent.mkdir(exist_ok=True)
        ref = self.stacker.reference
        scale = 1 if ref is None else max(1, live.shape[0] // ref.shape[0])  # a drizzle 2x: 2
        header = {
            **self.stacker.header(self.tally, scale),
            "NCOMBINE": live.frames,
            "STACKMTH": "live",
        }
        if not isinstance(live, LiveDrizzle):  # drizzle on, but its live state did not fit
            header["DEMOSAIC"] = self.settings.demosaic
        shape = (*live.shape, live.channels)
        write_fits_bands(path, shape, live.result_band, header)

    # --- close ------------------------------------------------------------------------------
    def close(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Finalize: exact combine -> stack.fits, stack.tif, preview; session.json closed.

        ``progress(done, total)`` is called as the combine goes (the daemon pings systemd's
        watchdog from it: the combine of a long night takes minutes on a Pi).

        The outputs are written in this order, each as far as the disk allows: the final (the
        FITS, or the TIFF without ``write_fits``), then the TIFF, the preview and the products.
        The final must be written (an ``OSError`` propagates and the session stays "closing":
        nothing is deleted); a later output that cannot be written (a full disk) is skipped,
        said so in the log and under ``outputs.skipped``. The frame store and checkpoint are
        deleted only once a final that holds their frames exists.
        """
        self.solving.wait()  # a solve under way: the final gets its WCS
        self.state = "closing"
        self._write_meta()
        stacker = self.stacker
        if stacker.live_only is not None and stacker.live is not None:
            self._checkpoint_now()  # a close cut short (disk, kill) finishes from it
        stack = "stack" in self.settings.products
        has_stack = stacker.store is not None or stacker.live is not None
        targets: list[Target] = []
        if stack and self.tally.accepted >= 1 and has_stack:
            targets = [Target("tiff", self.dir / STACK_TIF), Target("preview", self.dir / PREVIEW)]
            if self.settings.write_fits:
                targets.insert(0, Target("fits", self.dir / STACK_FITS))
        method = "live" if stacker.live_only is not None else self.settings.stack_method
        final = {"method": method, "why": stacker.live_only}
        store_bytes = stacker.store.disk_bytes() if stacker.store is not None else None
        # the final first, as far as the disk allows (see above), then the products
        outputs, skipped = finish(
            stacker,
            self.tally,
            targets,
            progress=progress,
            keep_frames=self.settings.keep_frame_store,
        )
        if targets:
            outputs["final"] = final
            if store_bytes is not None:
                outputs["frame_store_bytes"] = store_bytes
        outputs.update(stacker.landscape.describe())
        if (self.dir / SKY_MASK_PNG).exists():
            outputs["sky_mask_png"] = str(self.dir / SKY_MASK_PNG)
        if skipped:
            outputs["skipped"] = skipped
            log.error("session %s: the final is written, these are not: %s", self.id,
                      "; ".join(skipped))  # fmt: skip
        self.state = "closed"
        self._write_meta(outputs)
        self._close_journal()
        final_written = "fits" in outputs or "tiff" in outputs or not stack
        if not self.settings.keep_frame_store and (final_written or self.tally.accepted < 1):
            shutil.rmtree(self.dir / FRAMES, ignore_errors=True)
            shutil.rmtree(self.dir / GROUND, ignore_errors=True)
            shutil.rmtree(self.dir / CHECKPOINT, ignore_errors=True)
        log.info("session %s closed: %s", self.id, outputs or "nothing stacked")
        return outputs

    def abandon(self) -> None:
        """Release files without finalizing (the session stays open for a later resume)."""
        self._close_journal()

    def supersede(self, reason: str) -> list[str]:
        """Give up this session for a new one with a better reference (see
        :meth:`Stacker.better_reference`); return the files it journaled, in journal order, to
        be stacked again there. Its journal and session.json stay as a record; the frame store
        and checkpoint are deleted. Once session.json says "superseded" (the commit point) its
        frames no longer count as processed."""
        files = [str(r["file"]) for r in read_journal(self.dir / JOURNAL)]
        self.state = "superseded"
        self._write_meta(note=f"superseded: {reason}")
        self._close_journal()
        shutil.rmtree(self.dir / FRAMES, ignore_errors=True)
        shutil.rmtree(self.dir / GROUND, ignore_errors=True)  # landscape = "freeze"
        shutil.rmtree(self.dir / CHECKPOINT, ignore_errors=True)
        (self.dir / REFERENCE).unlink(missing_ok=True)
        log.info("session %s superseded: %s", self.id, reason)
        return files

    def _close_journal(self) -> None:
        if self._journal >= 0:
            os.close(self._journal)
            self._journal = -1

    def _write_meta(self, outputs: dict[str, Any] | None = None, note: str | None = None) -> None:
        with self._meta_lock:  # the solve thread writes it too: one whole, current state at once
            self._write_meta_locked(outputs, note)

    def _write_meta_locked(self, outputs: dict[str, Any] | None, note: str | None) -> None:
        stacker = self.stacker
        meta = {
            "session": self.id,
            "software": f"nightstack {__version__}",
            "state": self.state,
            "started": self.started,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "reference": stacker.reference.file if stacker.reference else None,
            "accepted": self.tally.accepted,
            "rejected": self.tally.rejected_total,
            "rejected_by_reason": dict(self.tally.rejected),
            "lost": list(self.tally.lost.values()),
            "live_only": stacker.live_only,
            "disk": {"warning": self.low_space, "reserve_bytes": self.reserve_bytes()},
            "total_exposure_s": round(self.tally.exposure_s, 3),
            "first_frame_time": self.tally.first_time,
            "last_frame_time": self.tally.last_time,
            "outputs": outputs or {},
            "settings": redacted(self.settings),  # no secret in a world-readable file
        }
        if note is not None:
            meta["note"] = note
        if self.opened_by is not None:
            meta["opened_by"] = self.opened_by
        solved = stacker.solved
        if solved is not None:
            meta["target"] = solved.target
            meta["solve"] = solved.entry()
        if self.solving.pointing is not None:
            meta["pointing"] = self.solving.pointing
        self._outputs = outputs or {}
        write_json(self.dir / SESSION, meta)

    # --- plate solving (service.solving) ------------------------------------------------------
    def _keep_solve(self, solved: SolvedField) -> None:
        """The reference is solved (the solve thread): its WCS goes into the stack's header."""
        self.stacker.solved = solved

    def _solved(self) -> None:
        """A solve's result is kept (the solve thread): session.json says it, while open."""
        if self.state != "open":
            return
        try:
            self._write_meta(self._outputs)
        except OSError as err:
            log.error("session %s: plate solve not written to session.json (%s)", self.id,
                      err.strerror or err)  # fmt: skip

    def _restore_solve(self, entry: object, reference: Reference) -> None:
        """A resumed session's solve from its session.json; solved again when it has none."""
        solved = from_entry(entry, reference.shape) if isinstance(entry, dict) else None
        if solved is not None:
            self.stacker.solved = self.solving.reference = solved
        else:
            self.solving.solve_reference(reference.file, reference.stars, reference.shape,
                                         self._keep_solve)  # fmt: skip


_SESSION_ONLY_FIELDS = frozenset(
    {
        "watch_dir",
        "output_dir",
        "log_level",
        "idle_timeout_s",
        "web_enabled",
        "web_listen",
        "web_token",
        "web_token_file",
        "web_hosts",
    }
)
"""Settings of the daemon, not of a session's stack: a resumed session takes today's (and a
secret, redacted in session.json, is never compared with its redaction)."""


def _own_settings(session: str, saved: Any, current: Settings) -> Settings:
    """The settings a session started with (its session.json), so that a resumed session
    stacks its last frame as it stacked its first; ``current`` (the config as edited since)
    applies from the next session. Settings that no longer exist are ignored, and a saved set
    that is no longer valid falls back to ``current`` (one log line either way)."""
    if not isinstance(saved, dict):
        return current
    known = {k: v for k, v in saved.items() if k in Settings.model_fields}
    known.update({k: getattr(current, k) for k in _SESSION_ONLY_FIELDS})
    try:
        own = Settings(**known)
    except ValueError as err:
        log.warning("session %s: its saved settings are not valid any more (%s); resumed with "
                    "the current ones", session, str(err).splitlines()[0])  # fmt: skip
        return current
    edited = sorted(k for k in Settings.model_fields if getattr(own, k) != getattr(current, k))
    if edited:
        log.info(
            "session %s resumed with its own settings; the config's edits (%s) apply from the "
            "next session", session, ", ".join(edited),
        )  # fmt: skip
    return own


def _stored_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The accepted records whose frames the store holds, in store order: every accepted
    record, less those a later ``lost`` record (same content hash) took back."""
    stored: list[dict[str, Any]] = []
    for record in records:
        if record["status"] == "accepted":
            if record.get("stored") is not False:  # live-only frames are not in the store
                stored.append(record)
        elif record["status"] == "lost":
            for i in range(len(stored) - 1, -1, -1):
                if stored[i].get("sha256") == record.get("sha256"):
                    del stored[i]
                    break
    return stored


def _not_taken_back(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The accepted records no later ``lost`` record (same content hash) took back, in journal
    order: a resume journals a frame's loss once, however often it runs."""
    open_: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        key = str(record.get("sha256") or record["file"])
        if record["status"] == "accepted" and record.get("retry") is not True:
            open_.setdefault(key, []).append(record)
        elif record["status"] == "lost" and open_.get(key):
            open_[key].pop()
    kept = {id(r) for group in open_.values() for r in group}
    return [r for r in records if id(r) in kept]


def _paid_for(stored: int, ratio: float, size: int) -> bool:
    """Whether a rewrite of ``size`` bytes keeps within ``ratio`` x the ``stored`` bytes the
    frame store wrote since the last one (ratio 0: no byte pacing)."""
    return ratio <= 0 or stored * ratio >= size


def _read_checkpoint(checkpoint: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return state if (checkpoint / "live").exists() else None
