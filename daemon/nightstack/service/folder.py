"""The session folder's format: its file names, the journal's reading rule, the session states
on disk, the reference file. Everything that reads or writes a session folder (``session.py``,
``retries.py``, the web page's ``web/sessions.py``) goes through here, so they agree.

Layout of ``OUTPUT_DIR/<session-id>/``::

    session.json    settings used (secrets redacted), reference, counts, outputs, and the state:
                    "open", "closing", "closed", "superseded" (started over with a better
                    reference, its frames re-stacked in a new session) or "quarantined" (could
                    not be salvaged; its frames count as not processed)
    journal.jsonl   one fsync'd JSON line per frame (the ``nightstack stack --report`` fields)
    reference.npz   the reference frame's stars and sky samples (written once)
    frames/         the frame store the exact final combine reads back
    checkpoint/     the live stack and counters, rewritten atomically every few frames
    preview.jpg     auto-stretched live preview; live.fits the live stack, linear
    stack.tif, stack.fits   the final, at close

The journal's one reading rule (:func:`parse_journal`): only newline-terminated lines count
(bytes after the last newline are a torn tail, never confirmed); a line that is not UTF-8 JSON
of a frame record (an object with ``file`` and ``status``) is garbage, skipped and counted, and
the records after it still count.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nightstack.frames import Stars
from nightstack.io.writers import atomic_path, write_json
from nightstack.pipeline.stacker import Reference
from nightstack.registration.normalize import SkySamples
from nightstack.registration.quality import Quality

log = logging.getLogger("nightstack.service.session")

SESSION = "session.json"
JOURNAL = "journal.jsonl"
REFERENCE = "reference.npz"
FRAMES = "frames"
CHECKPOINT = "checkpoint"
GROUND = "ground"
SNAPSHOTS = "snapshots"
PREVIEW = "preview.jpg"
LIVE_FITS = "live.fits"
STACK_TIF = "stack.tif"
STACK_FITS = "stack.fits"
SKY_MASK_PNG = "sky_mask.png"

SESSION_ID = re.compile(r"\A[0-9A-Za-z][0-9A-Za-z_-]{0,63}\Z")
"""What a session id (its folder's name) looks like: :func:`new_session_dir` makes
``YYYYmmdd-HHMMSS[-n]``."""

NOT_PROCESSED = ("superseded", "quarantined")
"""States whose frames count as not processed (handed to another session, or to stack again)."""


def new_session_dir(output_dir: Path) -> Path:
    """Create and return a new, empty session folder named after the UTC time."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    directory = output_dir / stamp
    n = 1
    while directory.exists():
        n += 1
        directory = output_dir / f"{stamp}-{n}"
    directory.mkdir(parents=True)
    return directory


# --- the journal ------------------------------------------------------------------------------
def parse_journal(data: bytes | memoryview) -> tuple[list[dict[str, Any]], int, int]:
    """(records, bytes up to the end of the last newline-terminated line, garbage lines) of
    journal bytes, by the module's reading rule."""
    raw = bytes(data)
    records: list[dict[str, Any]] = []
    good = garbage = 0
    while True:
        end = raw.find(b"\n", good)
        if end < 0:
            return records, good, garbage
        try:
            record = json.loads(raw[good:end].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and "file" in record and "status" in record:
            records.append(record)
        else:
            garbage += 1
        good = end + 1


def read_journal_file(path: Path) -> tuple[list[dict[str, Any]], int, int]:
    """:func:`parse_journal` of the journal at ``path`` (nothing when it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, 0
    return parse_journal(data)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's records (torn tail and garbage lines skipped)."""
    return read_journal_file(path)[0]


def journals(
    output_dir: Path, *, processed: bool = True
) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """(session folder, its records) of every session in ``output_dir``, oldest first; with
    ``processed``, not those whose frames count as not processed (:data:`NOT_PROCESSED`)."""
    for journal in sorted(output_dir.glob(f"*/{JOURNAL}")):
        if not processed or state_of(journal.parent) not in NOT_PROCESSED:
            yield journal.parent, read_journal(journal)


def known_hashes(output_dir: Path) -> set[str]:
    """Content hashes of every frame a session in ``output_dir`` has processed for good.

    Grows by one 64-character string per frame ever seen (about 100 bytes): the only
    per-frame memory the daemon keeps, for exactly-once processing across sessions.
    """
    hashes: set[str] = set()
    for _, records in journals(output_dir):
        for record in records:
            digest = record.get("sha256")
            if not digest:
                continue
            if record.get("status") == "lost":
                hashes.discard(digest)  # its stored data was lost: stack it again if it comes
            else:
                hashes.add(digest)
    return hashes


# --- session.json -----------------------------------------------------------------------------
def read_meta(directory: Path) -> dict[str, Any] | None:
    """A session's ``session.json`` as a dict, or None when missing or unreadable."""
    try:
        meta = json.loads((directory / SESSION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def state_of(directory: Path) -> str | None:
    """A session's state (None: no readable session.json)."""
    state = (read_meta(directory) or {}).get("state")
    return str(state) if state is not None else None


def find_open(output_dir: Path) -> Path | None:
    """The newest session folder that was not closed, if any: state "open" or "closing", or a
    journal beside a missing or unreadable session.json (salvaged by the resume)."""
    candidates = [
        journal.parent
        for journal in output_dir.glob(f"*/{JOURNAL}")
        if state_of(journal.parent) in ("open", "closing", None)
    ]
    return max(candidates, default=None)


def quarantine(directory: Path, reason: str) -> None:
    """Mark a session that cannot be salvaged: session.json state "quarantined" with the reason
    (its files stay as they are, for a human to look at). Its frames no longer count as
    processed, so those still in the watch folder are stacked in a new session."""
    meta = read_meta(directory) or {}
    meta.update(
        session=directory.name,
        state="quarantined",
        note=f"quarantined: {reason}",
        updated=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_json(directory / SESSION, meta)
    log.error("session %s quarantined: %s; a new session takes the next frames", directory.name,
              reason)  # fmt: skip


# --- reference.npz ----------------------------------------------------------------------------
def save_reference(path: Path, ref: Reference) -> None:
    """The reference's stars, sky samples and geometry, atomically."""
    s = ref.stars
    aperture = s.aperture_flux if s.aperture_flux is not None else np.full(len(s), np.nan)
    arrays: dict[str, Any] = {
        "xy": s.xy,
        "flux": s.flux,
        "aperture_flux": aperture,
        "summary": np.array([s.fwhm_px, s.roundness, s.elongation, s.background, s.noise]),
        "detected": np.array(s.detected),
        "exposure_s": np.array(np.nan if ref.exposure_s is None else ref.exposure_s),
        "shape": np.array([*ref.shape, ref.channels]),
        "reference_file": np.array(ref.file),
        **ref.sky.arrays(),
    }
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)


def load_reference(path: Path) -> Reference:
    """The reference :func:`save_reference` wrote."""
    with np.load(path) as data:
        fwhm, roundness, elongation, background, noise = (float(v) for v in data["summary"])
        stars = Stars(
            data["xy"],
            data["flux"],
            fwhm,
            roundness,
            elongation,
            background,
            noise,
            detected=int(data["detected"]),
            aperture_flux=data["aperture_flux"],
        )
        rows, cols, channels = (int(v) for v in data["shape"])
        file = str(data["reference_file"])
        exposure = float(data["exposure_s"])
        sky = SkySamples.from_arrays(data)
    return Reference(
        file,
        stars,
        Quality.of(stars),
        (rows, cols),
        channels,
        sky,
        exposure if np.isfinite(exposure) else None,
    )
