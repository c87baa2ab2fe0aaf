"""A live-stacking session on disk: journal, checkpoint, resume, preview and close.

Layout of ``OUTPUT_DIR/<session-id>/``::

    session.json    settings used, reference, counts, state ("open", "closing", "closed")
    journal.jsonl   one fsync'd JSON line per frame (the ``nightstack stack --report`` fields)
    reference.npz   the reference frame's stars (written once, when the reference is chosen)
    frames/         the aligned-frame store (uint16) the exact final combine reads back
    checkpoint/     the live accumulator + counters, rewritten atomically every few frames
    preview.jpg     auto-stretched live preview, rewritten atomically
    stack.tif, stack.fits   the final exact combine, at close

Order of work per accepted frame: frame store (atomic file) -> live stack -> journal line
(fsync) -> every K frames a checkpoint. After a crash, ``Session.resume`` restores the
checkpoint, drops store entries the journal never confirmed and re-adds from the store the
accepted frames journaled after the checkpoint: no frame lost, none counted twice. Frames the
journal never saw are re-reported by the watcher's start-up scan and processed normally.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import Settings
from .decoder import Decoder
from .frames import Stars
from .pipeline import FrameRecord, Prepared, Reference, Stacker, write_output
from .quality import Quality
from .stack import FrameStore, LiveStack
from .writers import atomic_path, write_json, write_preview

log = logging.getLogger("nightstack.session")

JOURNAL = "journal.jsonl"
SESSION = "session.json"


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's complete lines; a torn last line (crash mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # torn tail: the frame was not confirmed
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def known_hashes(output_dir: Path) -> set[str]:
    """Content hashes of every frame any session in ``output_dir`` has journaled.

    Grows by one 64-character string per frame ever seen (about 100 bytes): the only
    per-frame memory the daemon keeps, for exactly-once processing across sessions.
    """
    hashes: set[str] = set()
    for journal in sorted(output_dir.glob(f"*/{JOURNAL}")):
        hashes.update(r["sha256"] for r in read_journal(journal) if r.get("sha256"))
    return hashes


def find_open(output_dir: Path) -> Path | None:
    """The newest session directory that was not closed, if any."""
    candidates = []
    for meta in output_dir.glob(f"*/{SESSION}"):
        try:
            state = json.loads(meta.read_text(encoding="utf-8")).get("state")
        except (OSError, json.JSONDecodeError):
            continue
        if state in ("open", "closing"):
            candidates.append(meta.parent)
    return max(candidates, default=None)


class Session:
    """One night (or part of one): frames in, journal + live preview out, final stack at close."""

    def __init__(self, directory: Path, settings: Settings, decoder: Decoder) -> None:
        self.dir = directory
        self.settings = settings
        self.stacker = Stacker(settings, directory, decoder)
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.state = "open"
        self.records = 0  # journal lines written
        self.counted_at_checkpoint = 0
        self.since_preview = 0
        self.last_preview = 0.0
        self.last_frame = time.monotonic()
        self._journal = (directory / JOURNAL).open("a", encoding="utf-8")

    @property
    def id(self) -> str:
        return self.dir.name

    # --- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, output_dir: Path, settings: Settings, decoder: Decoder) -> Session:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        directory = output_dir / stamp
        n = 1
        while directory.exists():
            n += 1
            directory = output_dir / f"{stamp}-{n}"
        directory.mkdir(parents=True)
        session = cls(directory, settings, decoder)
        session._write_meta()
        log.info("session %s opened", session.id)
        return session

    @classmethod
    def resume(cls, directory: Path, settings: Settings, decoder: Decoder) -> Session:
        """Reopen a session after a crash or restart (see the module docstring)."""
        meta = json.loads((directory / SESSION).read_text(encoding="utf-8"))
        session = cls(directory, settings, decoder)
        session.started = meta.get("started", session.started)
        session.state = meta.get("state", "open")
        records = read_journal(directory / JOURNAL)
        session._rewrite_journal(records)  # drop a torn tail before appending
        session.records = len(records)
        stacker = session.stacker
        ref_file = directory / "reference.npz"
        if ref_file.exists():
            reference = _load_reference(ref_file)
            store = FrameStore(directory / "frames", reference.shape, reference.channels)
            accepted = [r for r in records if r["status"] == "accepted"]
            store.truncate(len(accepted))  # entries stored but never journaled
            checkpoint = directory / "checkpoint"
            state = _read_checkpoint(checkpoint)
            if state is not None:
                live = LiveStack.load(checkpoint / "live", store=store)
                counted = int(state["records"])
            else:
                live = LiveStack(
                    reference.shape,
                    reference.channels,
                    kappa=settings.live_kappa,
                    warmup=settings.live_warmup,
                    store=store,
                )
                counted = 0
            stacker.reference, stacker.store, stacker.live = reference, store, live
            replayed = live.catch_up()  # the accepted frames journaled after the checkpoint
            session.counted_at_checkpoint = counted
            log.info(
                "session %s resumed: %d journal lines, %d frames from checkpoint, %d replayed",
                session.id,
                len(records),
                live.frames - replayed,
                replayed,
            )
        for record in records:
            session._count(record)
        return session

    def _count(self, record: dict[str, Any]) -> None:
        stacker = self.stacker
        if record["status"] == "accepted":
            stacker.accepted += 1
            stacker.exposure_s += record.get("exposure_s") or 0.0
            when = record.get("capture_time")
            if when:
                stacker.first_time = min(stacker.first_time or when, when)
                stacker.last_time = max(stacker.last_time or when, when)
        else:
            key = _reason_key(record.get("reason") or "rejected")
            stacker.rejected[key] = stacker.rejected.get(key, 0) + 1

    # --- per frame --------------------------------------------------------------------------
    def ingest(self, prepared: Prepared) -> FrameRecord:
        """Stack one prepared frame and journal it (fsync'd)."""
        had_reference = self.stacker.reference is not None
        record = self.stacker.stack(prepared)
        if record.status == "accepted" and not had_reference:
            _save_reference(self.dir / "reference.npz", self.stacker)
            self._write_meta()
        self._append(record)
        self.last_frame = time.monotonic()
        if record.status == "accepted":
            self.since_preview += 1
            live = self.stacker.live
            assert live is not None
            if live.frames - self.counted_at_checkpoint >= self.settings.checkpoint_every_frames:
                self.checkpoint()
        return record

    def _append(self, record: FrameRecord) -> None:
        self._journal.write(record.to_json() + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self.records += 1

    def _rewrite_journal(self, records: list[dict[str, Any]]) -> None:
        self._journal.close()
        with atomic_path(self.dir / JOURNAL) as tmp:
            tmp.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
            )
        self._journal = (self.dir / JOURNAL).open("a", encoding="utf-8")

    def checkpoint(self) -> None:
        """Save the live accumulator atomically (old checkpoint stays valid until the swap)."""
        live = self.stacker.live
        if live is None:
            return
        checkpoint = self.dir / "checkpoint"
        checkpoint.mkdir(exist_ok=True)
        live.save(checkpoint / "live")
        write_json(checkpoint / "state.json", {"records": self.records, "frames": live.frames})
        self.counted_at_checkpoint = live.frames

    def preview_due(self) -> bool:
        if self.stacker.live is None or self.since_preview == 0:
            return False
        elapsed = time.monotonic() - self.last_preview
        return (
            self.since_preview >= self.settings.preview_every_frames
            or elapsed >= self.settings.preview_every_s
        )

    def write_preview(self) -> None:
        live = self.stacker.live
        assert live is not None
        write_preview(self.dir / "preview.jpg", live.result(), width=self.settings.preview_width)
        self.since_preview = 0
        self.last_preview = time.monotonic()

    # --- close ------------------------------------------------------------------------------
    def close(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Finalize: exact combine -> stack.tif, stack.fits, preview; session.json closed.

        ``progress(done, total)`` is called as the combine goes (the daemon pings systemd's
        watchdog from it: the combine of a long night takes minutes on a Pi).
        """
        self.state = "closing"
        self._write_meta()
        stacker = self.stacker
        outputs: dict[str, Any] = {}
        if stacker.accepted >= 1 and stacker.store is not None:
            image = stacker.final(progress)
            header = stacker.header()
            write_output(self.dir / "stack.tif", image, header, self.settings)
            outputs["tiff"] = str(self.dir / "stack.tif")
            if self.settings.write_fits:
                write_output(self.dir / "stack.fits", image, header, self.settings)
                outputs["fits"] = str(self.dir / "stack.fits")
            write_preview(self.dir / "preview.jpg", image, width=self.settings.preview_width)
            outputs["preview"] = str(self.dir / "preview.jpg")
            outputs["frame_store_bytes"] = stacker.store.disk_bytes()
        self.state = "closed"
        self._write_meta(outputs)
        self._journal.close()
        if not self.settings.keep_frame_store:
            shutil.rmtree(self.dir / "frames", ignore_errors=True)
            shutil.rmtree(self.dir / "checkpoint", ignore_errors=True)
        log.info("session %s closed: %s", self.id, outputs or "nothing stacked")
        return outputs

    def abandon(self) -> None:
        """Release files without finalizing (the session stays open for a later resume)."""
        self._journal.close()

    def _write_meta(self, outputs: dict[str, Any] | None = None) -> None:
        stacker = self.stacker
        meta = {
            "session": self.id,
            "software": f"nightstack {__version__}",
            "state": self.state,
            "started": self.started,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "reference": stacker.reference.file if stacker.reference else None,
            "accepted": stacker.accepted,
            "rejected": sum(stacker.rejected.values()),
            "rejected_by_reason": dict(stacker.rejected),
            "total_exposure_s": round(stacker.exposure_s, 3),
            "first_frame_time": stacker.first_time,
            "last_frame_time": stacker.last_time,
            "outputs": outputs or {},
            "settings": json.loads(self.settings.model_dump_json()),
        }
        write_json(self.dir / SESSION, meta)


def _reason_key(reason: str) -> str:
    return reason.split(":")[0].split("(")[0].strip()


def _read_checkpoint(checkpoint: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return state if (checkpoint / "live").exists() else None


def _save_reference(path: Path, stacker: Stacker) -> None:
    ref = stacker.reference
    assert ref is not None
    s = ref.stars
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(
            fh,
            xy=s.xy,
            flux=s.flux,
            summary=np.array([s.fwhm_px, s.roundness, s.elongation, s.background, s.noise]),
            shape=np.array([*ref.shape, ref.channels]),
            reference_file=np.array(ref.file),
        )


def _load_reference(path: Path) -> Reference:
    with np.load(path) as data:
        fwhm, roundness, elongation, background, noise = (float(v) for v in data["summary"])
        stars = Stars(data["xy"], data["flux"], fwhm, roundness, elongation, background, noise)
        rows, cols, channels = (int(v) for v in data["shape"])
        file = str(data["reference_file"])
    return Reference(file, stars, Quality.of(stars), (rows, cols), channels)
