"""libgphoto2's virtual camera for the capture tests: its folder, its frames, its faults.

python-gphoto2's wheel bundles libgphoto2's ``vusb`` port driver: with ``VCAMERADIR=<folder>``
set before ``import gphoto2``, libgphoto2 sees one PTP camera at ``usb:001,001`` (model "VC",
serial "0.1", battery 50 %, shutter speeds 1/10000 to 1 s, ``bulb`` and ``capturetarget``
settings, no ISO, no image format). A capture returns a copy of the ``.JPG`` in that folder,
read at capture time, at the size the file had when the camera was opened. So:

- :meth:`VirtualCamera.show` replaces the picture (temp + rename) by another of the same size:
  the next capture is a new frame;
- :meth:`VirtualCamera.fault` shows a smaller picture: the next capture fails inside
  libgphoto2's PTP driver (error -1), and so does every capture until the picture has its
  size again (:meth:`show`): a camera that stopped answering until it is back. Put it right
  before the camera is opened again (the driver reads the sizes when it is loaded);
- by itself, it declares its store full at its 27th capture since it was opened (libgphoto2
  -3, then -1): a reconnection that frees libgphoto2's camera and port driver (as
  ``Camera.close`` does) starts it afresh.

Frames are JPEGs of a star field drifting a little per frame, padded with JPEG comment segments
to one byte size, so they stack (``extensions = [".jpg"]``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

FRAME_BYTES = 120_000
"""Every frame's size (the virtual camera needs one size from its opening on)."""

SHAPE = (360, 480)  # (rows, cols)
PICTURE = "sky.JPG"


def star_jpeg(index: int, size: int = FRAME_BYTES, seed: int = 5) -> bytes:
    """Frame ``index`` of a night: 60 Gaussian stars drifting (x, y) = (1.3, 0.6) px a frame
    over a noisy sky, as a JPEG of exactly ``size`` bytes (COM segments after SOI)."""
    rng = np.random.default_rng(seed)
    rows, cols = SHAPE
    xy = rng.uniform((20, 20), (cols - 40, rows - 40), size=(60, 2))
    flux = rng.uniform(800, 6000, size=60)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    sky = np.full(SHAPE, 20.0, np.float32)
    drift = np.array([1.3, 0.6]) * index
    for (sx, sy), f in zip(xy + drift, flux, strict=True):
        sky += f / (2 * np.pi * 1.5**2) * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * 1.5**2))
    sky += np.random.default_rng(1000 + index).normal(0, 2.0, SHAPE)
    ok, encoded = cv2.imencode(
        ".jpg", np.clip(sky, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 92]
    )
    assert ok
    return _pad(encoded.tobytes(), size)


def _pad(jpeg: bytes, size: int) -> bytes:
    missing = size - len(jpeg)
    if missing < 0:
        raise ValueError(f"the JPEG is {len(jpeg)} bytes, over {size}")
    segments = []
    while missing > 0:
        body = min(missing - 4, 65533)
        if body < 0:  # fewer than 4 bytes left: no segment fits; pad the last one instead
            raise ValueError("cannot pad by fewer than 4 bytes")
        if 0 < missing - (body + 4) < 4:
            body -= 4
        segments.append(b"\xff\xfe" + (body + 2).to_bytes(2, "big") + b"\0" * body)
        missing -= body + 4
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


class VirtualCamera:
    """The virtual camera's folder (``VCAMERADIR``) and what it shows next."""

    def __init__(self, folder: Path, seed: int = 5) -> None:
        self.folder, self.seed = folder, seed
        folder.mkdir(parents=True, exist_ok=True)
        self.shown = 0
        self.show(0)

    def env(self) -> dict[str, str]:
        """The environment of a process that should see this camera."""
        return {**os.environ, "VCAMERADIR": str(self.folder)}

    def _put(self, data: bytes) -> None:
        temp = self.folder / ".next"
        temp.write_bytes(data)
        os.replace(temp, self.folder / PICTURE)

    def show(self, index: int) -> None:
        """The next capture is frame ``index`` of the night."""
        self._put(star_jpeg(index, seed=self.seed))
        self.shown = index

    def fault(self) -> None:
        """Captures fail in libgphoto2 until the next :meth:`show`."""
        self._put(star_jpeg(self.shown, FRAME_BYTES - 1000, self.seed))


class Feeder(threading.Thread):
    """Shows frame k once k frames are in ``watch_dir`` (the camera sees a new sky each time).
    ``faults``: after these frame counts the camera fails instead, until the sequence has
    journaled the loss (``"event": "lost"`` in ``journal``) ``lost_for`` times; then it shows
    frame k. Stop with :meth:`close`."""

    def __init__(
        self,
        camera: VirtualCamera,
        watch_dir: Path,
        *,
        faults: tuple[int, ...] = (),
        journal: Path | None = None,
        lost_for: int = 1,
    ) -> None:
        super().__init__(daemon=True)
        self.camera, self.watch_dir, self.faults = camera, watch_dir, set(faults)
        self.journal, self.lost_for = journal, lost_for
        self.done = threading.Event()

    def _losses(self) -> int:
        if self.journal is None or not self.journal.exists():
            return 0
        return self.journal.read_text().count('"event": "lost"')

    def run(self) -> None:
        seen, cure_at = 0, None
        while not self.done.is_set():
            count = len(list(self.watch_dir.glob("*.jpg"))) if self.watch_dir.is_dir() else 0
            if count > seen:
                seen = count
                if seen in self.faults:
                    self.camera.fault()
                    cure_at = self._losses() + self.lost_for
                else:
                    self.camera.show(seen)
            if cure_at is not None and self._losses() >= cure_at:
                self.camera.show(seen)
                cure_at = None
            time.sleep(0.005)

    def close(self) -> None:
        self.done.set()
        self.join(5)
