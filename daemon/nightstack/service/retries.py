"""One more try for a frame that failed for a reason that may pass.

A decode that timed out (a busy machine, a slow card), a decoder child killed by SIGKILL (the
kernel's OOM killer) or a read error (``EIO``) may work another time
(:class:`~nightstack.io.decoder.TransientDecodeError`); a file that is truncated or not an
image would fail the same way again and is rejected at once. The daemon retries a transient
failure once, when its queue is empty (frames that wait go first).

Exactly-once bookkeeping, also across a restart. A frame's *key* is its content hash (or
``file:PATH`` when the file could not even be read to hash).

- First attempt: journaled as ``rejected`` with its reason + ``"; retried once the queue is
  empty"``, ``retry: true``, and its hash under ``retry_sha256`` — not ``sha256``, so
  ``folder.known_hashes`` (the frames processed for good) does not hold it and the retry is not
  skipped as a duplicate. Its key joins :attr:`Retries.tried`.
- Second attempt (the key is in ``tried``): journaled as any frame, with its ``sha256``:
  accepted, or rejected for good. Either way the frame is then known and never tried again.
- At start ``tried`` is rebuilt from the journals (:func:`first_attempts`): a frame whose retry
  a stop or a crash prevented is found again by the watcher's start-up scan and gets its second
  attempt then, not another first one.

A frame whose first attempt counted as rejected in the session's tallies (``session.json``
counts attempts) and is accepted on the retry has two journal lines: the marker and the
accepted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nightstack.pipeline.prepare import Prepared
from nightstack.pipeline.records import FrameRecord
from nightstack.service.folder import journals

RETRY_NOTE = "retried once the queue is empty"  # appended to a first attempt's reason
AGAIN_NOTE = "again on the retry"  # appended to a second attempt's transient reason


@dataclass
class RetryRecord(FrameRecord):
    """The journal line of a first attempt that failed transiently (see the module doc)."""

    retry: bool = True
    retry_sha256: str | None = None


def retry_key(sha256: str | None, path: Path) -> str:
    """A frame's identity for the retry bookkeeping: its content hash, else its path."""
    return sha256 or f"file:{path}"


def first_attempts(output_dir: Path) -> set[str]:
    """Keys of every frame whose first, transient attempt a journal in ``output_dir`` holds."""
    keys: set[str] = set()
    for _, records in journals(output_dir, processed=False):
        for record in records:
            if record.get("retry") is True and isinstance(record.get("file"), str):
                keys.add(retry_key(record.get("retry_sha256"), Path(record["file"])))
    return keys


class Retries:
    """The frames that failed transiently: which had their first attempt, which wait.

    Used by the daemon's worker thread only.
    """

    def __init__(self, tried: set[str]) -> None:
        self.tried = tried
        self.waiting: dict[Path, str] = {}  # path -> key, in order of failure

    def first(self, prepared: Prepared) -> RetryRecord | None:
        """The journal line for ``prepared``'s first attempt, or None if this is its retry
        (then its reason says so, and it is journaled as usual)."""
        key = retry_key(prepared.sha256, prepared.path)
        if key in self.tried:
            prepared.error = f"{prepared.error}, {AGAIN_NOTE}"
            return None
        return RetryRecord(
            file=str(prepared.path),
            status="rejected",
            reason=f"{prepared.error}; {RETRY_NOTE}",
            ms=dict(prepared.ms),
            retry_sha256=prepared.sha256,
        )

    def wait(self, record: RetryRecord) -> None:
        """``record`` is journaled: its frame waits for the retry."""
        key = retry_key(record.retry_sha256, Path(record.file))
        self.tried.add(key)
        self.waiting[Path(record.file)] = key

    def take(self) -> list[Path]:
        """The frames to retry now (each once), oldest failure first."""
        paths = list(self.waiting)
        self.waiting.clear()
        return paths
