"""The camera over USB: one libgphoto2 session (python-gphoto2).

The only module that imports :mod:`gphoto2`; nothing imports it until a capture starts, so the
daemon runs on a machine without a camera or the library. Find a camera by model and serial
(bus and device numbers change after a USB reset), open it, report what it is and how it is set,
apply ISO, shutter speed or bulb, RAW and capture target, take one frame, and download a file
straight into a folder under a temporary name.

libgphoto2's errors become one-line reasons (:func:`explain`): :class:`CameraLost` for faults a
reconnect may cure (unplugged, asleep, busy, an I/O error), :class:`CaptureError` for the rest.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gphoto2 as gp

from nightstack.errors import NightstackError

log = logging.getLogger("nightstack.capture")

BULB_EVENT_TIMEOUT_S = 30.0
"""After a bulb release, how long to wait for the camera's FILE_ADDED (a raw's readout and a
long-exposure noise reduction can take as long as the exposure: this is added to it)."""

EVENT_POLL_MS = 1000
"""One wait on the camera's event queue; libgphoto2 blocks in the USB read meanwhile (no CPU)."""

_SPEED_TOLERANCE = 0.02  # 2 %: '1/3' is 0.333..., the camera's table is rounded

_TRANSIENT_CODES = {
    gp.GP_ERROR_IO,  # -7: the cable pulled mid-transfer, the camera switched off
    gp.GP_ERROR_TIMEOUT,  # -10: the camera asleep or stuck
    gp.GP_ERROR_IO_USB_FIND,  # -52: gone from the bus
    gp.GP_ERROR_IO_USB_CLAIM,  # -53: someone else holds it (gvfs)
    gp.GP_ERROR_IO_READ,  # -34
    gp.GP_ERROR_IO_WRITE,  # -35
    gp.GP_ERROR_CAMERA_BUSY,  # -110: busy writing the card
    gp.GP_ERROR_MODEL_NOT_FOUND,  # -105: not on the bus (any more)
    gp.GP_ERROR_CORRUPTED_DATA,  # -102: a USB transfer cut short
    gp.GP_ERROR,  # -1: a PTP error the camera gave no name
    gp.GP_ERROR_NO_MEMORY,  # -3: libgphoto2's session state (a new session cures it)
}


class CaptureError(NightstackError):
    """The capture cannot go on: a setting the camera refuses, a full card or disk."""


class CameraLost(CaptureError):
    """The camera stopped answering (unplugged, switched off, asleep, busy): reconnect."""


def explain(err: Exception, what: str, port: str | None = None) -> CaptureError:
    """A libgphoto2 error while doing ``what`` as one-line :class:`CaptureError` (or
    :class:`CameraLost` when a reconnect may cure it), with the usual cure where one is known."""
    if not isinstance(err, gp.GPhoto2Error):
        return CaptureError(f"{what}: {err}")
    code, said = err.code, err.string
    if code == gp.GP_ERROR_IO_USB_CLAIM:
        return CameraLost(
            f"{what}: could not claim the USB device: another program holds the camera (a "
            "desktop's gvfs mounts it: 'gio mount -s gphoto2', see docs/capture.md)"
        )
    node = _device_node(port)
    if code in (gp.GP_ERROR_IO, gp.GP_ERROR_IO_USB_FIND) and node and not os.access(node, os.W_OK):
        return CaptureError(
            f"{what}: no permission to open {node}: add the user to the 'plugdev' group (and "
            "log in again; the service unit has SupplementaryGroups=plugdev)"
        )
    if code == gp.GP_ERROR_NO_SPACE:
        return CaptureError(f"{what}: the camera's card is full")
    if code in _TRANSIENT_CODES:
        return CameraLost(f"{what}: {said} (libgphoto2 {code})")
    return CaptureError(f"{what}: {said} (libgphoto2 {code})")


def _device_node(port: str | None) -> str | None:
    """'usb:001,005' -> '/dev/bus/usb/001/005' (if it exists)."""
    match = re.fullmatch(r"usb:(\d{3}),(\d{3})", port or "")
    if match is None:
        return None
    node = f"/dev/bus/usb/{match[1]}/{match[2]}"
    return node if os.path.exists(node) else None


# --- what the camera is -----------------------------------------------------------------------
@dataclass(frozen=True)
class Detected:
    """A camera on the bus: libgphoto2's driver name for it and its port ('usb:001,005')."""

    driver: str
    port: str


@dataclass(frozen=True)
class CameraInfo:
    """What the camera says about itself. ``free_bytes``/``free_images``: the card (or RAM
    store) with the most room, None when the camera does not say; ``battery``: as the camera
    words it ('50%', 'Full'); ``settings``: the capture settings it offers, by libgphoto2 name."""

    model: str
    serial: str
    port: str
    battery: str | None
    lens: str | None
    free_bytes: int | None
    free_images: int | None
    settings: dict[str, str] = field(default_factory=dict)
    clock: str | None = None  # the camera's clock, ISO 8601 UTC

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "serial": self.serial, "port": self.port,
            "battery": self.battery, "lens": self.lens, "free_bytes": self.free_bytes,
            "free_images": self.free_images, "settings": dict(self.settings),
            "clock": self.clock,
        }  # fmt: skip


REPORTED = ("iso", "shutterspeed", "imageformat", "capturetarget", "f-number", "aperture")
"""The settings a report names, when the camera has them (libgphoto2's names)."""


def parse_speed(text: str) -> float | None:
    """A shutter speed as libgphoto2 words it ('1/250', '30', '0.0100s', '2.5"') in seconds;
    None for 'bulb', 'Time' and anything else that is not a duration."""
    cleaned = text.strip().rstrip('s"').strip()
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            return float(num) / float(den)
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def list_cameras() -> list[Detected]:
    """The cameras libgphoto2 finds on the bus (no session is opened)."""
    try:
        found = gp.Camera.autodetect()
    except gp.GPhoto2Error as err:
        raise explain(err, "cannot list the cameras on USB") from err
    return [Detected(found.get_name(i), found.get_value(i)) for i in range(found.count())]


# --- the session ------------------------------------------------------------------------------
class Camera:
    """One open session with one camera. Not thread-safe: one thread drives it."""

    def __init__(self, camera: Any, detected: Detected) -> None:
        self._cam = camera
        self.detected = detected
        self.model = self._text("cameramodel") or detected.driver
        self.serial = self._text("serialnumber") or ""
        self.bulb_mode: str | None = None  # 'bulb' / 'eosremoterelease' while bulb is set

    @classmethod
    def open(cls, model: str | None = None, serial: str | None = None) -> Camera:
        """Open the first camera whose model (the camera's own name or libgphoto2's driver
        name) and serial match; None matches any. Raises CameraLost when none is found."""
        tried: list[str] = []
        for det in list_cameras():
            camera = cls.at(det)
            if model is not None and model not in (camera.model, det.driver):
                tried.append(f"{camera.model} on {det.port}")
                camera.close()
                continue
            if serial is not None and serial != camera.serial:
                tried.append(f"{camera.model} serial {camera.serial} on {det.port}")
                camera.close()
                continue
            return camera
        wanted = " ".join(x for x in (model, f"serial {serial}" if serial else None) if x)
        others = f" (found: {', '.join(tried)})" if tried else ""
        raise CameraLost(f"no camera {wanted or 'at all'} on USB{others}")

    @classmethod
    def at(cls, detected: Detected) -> Camera:
        """Open the camera ``detected`` on its port (``--list``: each camera once)."""
        cam = _open_port(detected)
        try:
            return cls(cam, detected)
        except gp.GPhoto2Error as err:
            _exit(cam)
            raise explain(err, f"cannot read the camera on {detected.port}", detected.port) from err

    def close(self) -> None:
        """End the session and let libgphoto2 free the camera and its port (the USB handle,
        libusb's context, the port driver): a camera opened again starts from scratch, as after
        a replug, not on the handle of a device that may be gone. Closing twice is harmless."""
        if self._cam is not None:
            _exit(self._cam)
            self._cam = None  # the last reference: gp_camera_free, gp_port_free

    # --- reading ---
    def _text(self, name: str) -> str | None:
        try:
            return str(self._cam.get_single_config(name).get_value())
        except gp.GPhoto2Error:
            return None  # the camera has no such setting

    def clock(self) -> str | None:
        """The camera's clock as ISO 8601 UTC, None when it has none."""
        try:
            value = self._cam.get_single_config("datetime").get_value()
        except gp.GPhoto2Error:
            return None
        if not isinstance(value, int | float):
            return str(value)
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))

    def free_space(self) -> tuple[int | None, int | None]:
        """(bytes, images) free on the store with the most room; (None, None) if unknown."""
        try:
            stores = self._cam.get_storageinfo()
        except gp.GPhoto2Error as err:
            raise explain(err, "cannot read the camera's storage", self.detected.port) from err
        best: tuple[int | None, int | None] = (None, None)
        for store in stores:
            has_kb = store.fields & gp.GP_STORAGEINFO_FREESPACEKBYTES
            has_images = store.fields & gp.GP_STORAGEINFO_FREESPACEIMAGES
            free = store.freekbytes * 1024 if has_kb else None
            images = store.freeimages if has_images else None
            if free is not None and (best[0] is None or free > best[0]):
                best = (free, images)
        return best

    def info(self) -> CameraInfo:
        """Model, serial, battery, lens, free space and the capture settings."""
        free, images = self.free_space()
        settings = {name: v for name in REPORTED if (v := self._text(name)) is not None}
        return CameraInfo(
            model=self.model,
            serial=self.serial,
            port=self.detected.port,
            battery=self._text("batterylevel"),
            lens=self._text("lensname"),
            free_bytes=free,
            free_images=images,
            settings=settings,
            clock=self.clock(),
        )

    def choices(self, name: str) -> list[str]:
        """The values a radio/menu setting offers; [] when the camera has no such setting."""
        try:
            widget = self._cam.get_single_config(name)
            return [widget.get_choice(i) for i in range(widget.count_choices())]
        except gp.GPhoto2Error:
            return []  # no such setting, or not one with choices (a toggle, a text)

    def has(self, name: str) -> bool:
        return self._text(name) is not None

    # --- setting ---
    def set(self, name: str, value: str | int) -> None:
        """Set one setting; CaptureError naming it and the camera's choices when refused."""
        try:
            widget = self._cam.get_single_config(name)
            widget.set_value(value)
            self._cam.set_single_config(name, widget)
        except gp.GPhoto2Error as err:
            offered = self.choices(name)
            hint = f" (offered: {', '.join(offered)})" if offered else ""
            raise explain(
                err, f"the camera refused {name} = {value}{hint}", self.detected.port
            ) from err

    def timed_speeds(self) -> dict[str, float]:
        """The camera's timed shutter speeds: its label -> seconds."""
        return {c: s for c in self.choices("shutterspeed") if (s := parse_speed(c)) is not None}

    def can_bulb(self) -> bool:
        return self.has("bulb") or self.has("eosremoterelease")

    # --- taking a frame ---
    def capture_timed(self) -> tuple[str, str]:
        """One exposure at the set shutter speed; the (folder, name) of the file on the camera.
        Blocks for the exposure (libgphoto2 waits in USB reads: no CPU, the GIL released)."""
        try:
            path = self._cam.capture(gp.GP_CAPTURE_IMAGE)
        except gp.GPhoto2Error as err:
            raise explain(err, "the capture failed", self.detected.port) from err
        return str(path.folder), str(path.name)

    def capture_bulb(self, seconds: float, cancel: threading.Event) -> tuple[str, str]:
        """A bulb exposure of ``seconds``: press, wait (``cancel`` ends it early), release, then
        wait for the camera's FILE_ADDED. Canon: ``eosremoterelease``; others ``bulb`` = 1/0."""
        canon = self.has("eosremoterelease")
        name = "eosremoterelease" if canon else "bulb"
        press, release = ("Press Full", "Release Full") if canon else (1, 0)
        try:
            self.set(name, press)
        except CameraLost as err:
            if self._text("serialnumber") is None:
                raise  # the camera is gone: a reconnect may cure it
            raise CaptureError(f"the camera refused to open a bulb exposure: {err.reason}") from err
        try:
            cancel.wait(seconds)
        finally:
            self.set(name, release)
        deadline = time.monotonic() + BULB_EVENT_TIMEOUT_S + seconds
        while time.monotonic() < deadline:
            try:
                kind, data = self._cam.wait_for_event(EVENT_POLL_MS)
            except gp.GPhoto2Error as err:
                raise explain(err, "waiting for the bulb frame", self.detected.port) from err
            if kind == gp.GP_EVENT_FILE_ADDED:
                return str(data.folder), str(data.name)
        raise CameraLost(
            f"no file from the camera {BULB_EVENT_TIMEOUT_S:.0f} s after the bulb exposure ended"
        )

    def download(self, folder: str, name: str, temp: Path) -> None:
        """Write the camera's file into ``temp`` (created, never overwritten), flushed to disk."""
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            target = gp.CameraFile(fd)
        except BaseException:
            os.close(fd)
            raise
        # libgphoto2 owns the descriptor now (gp_file_new_from_fd) and closes it when the
        # CameraFile is freed: closing it here too closed it twice, and the second close could
        # hit a file another thread had opened meanwhile under the same number (the session's
        # journal: seen as EBADF in a 200-frame run)
        try:
            self._cam.file_get(folder, name, gp.GP_FILE_TYPE_NORMAL, target)
            os.fsync(fd)
        except gp.GPhoto2Error as err:
            raise explain(err, f"the download of {name} failed", self.detected.port) from err
        finally:
            del target  # the last reference: gp_file_free closes fd, here, once

    def delete(self, folder: str, name: str) -> None:
        """Delete the file on the camera (a RAM capture is gone already: that is fine)."""
        try:
            self._cam.file_delete(folder, name)
        except gp.GPhoto2Error as err:
            log.debug("capture: %s/%s not deleted on the camera: %s", folder, name, err)

    def drain_events(self) -> None:
        """Read the events the camera queued (FILE_ADDED of a capture, property changes):
        left unread, some cameras stall."""
        for _ in range(50):
            try:
                kind, _data = self._cam.wait_for_event(1)
            except gp.GPhoto2Error:
                return
            if kind == gp.GP_EVENT_TIMEOUT:
                return


def _open_port(det: Detected) -> Any:
    abilities = gp.CameraAbilitiesList()
    abilities.load()
    ports = gp.PortInfoList()
    ports.load()
    cam = gp.Camera()
    try:
        cam.set_abilities(abilities[abilities.lookup_model(det.driver)])
        cam.set_port_info(ports[ports.lookup_path(det.port)])
        cam.init()
    except gp.GPhoto2Error as err:
        raise explain(err, f"cannot open the camera on {det.port}", det.port) from err
    return cam


def _exit(cam: Any) -> None:
    try:
        cam.exit()
    except gp.GPhoto2Error as err:
        log.debug("capture: closing the camera: %s", err)
