"""Test-only entry point: a camera plugged in after the start.

libgphoto2's virtual camera (``VCAMERADIR``) is always on its bus: python-gphoto2 points
libgphoto2's port drivers (``IOLIBS``) at a folder holding only the ``vusb`` driver, which
always lists ``usb:001,001``. ``python -m _usb_plug PORTS -- python -m nightstack.cli ARGS``
imports gphoto2 first, then points ``IOLIBS`` at ``PORTS``, a folder the test holds: libgphoto2
reads it at every detection (``gp_port_info_list_load``). With only the ``disk`` driver in it
(no disk mounted here) libgphoto2 finds no port and no camera, as on a Pi with the camera
unplugged; :func:`plug` links the virtual camera's driver in, and the next detection finds it.
Then ``nightstack ARGS`` runs in this process (``nightstack.cli.main``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

_SPEC = importlib.util.find_spec("gphoto2")  # not imported here: a test process must not set
assert _SPEC is not None and _SPEC.origin is not None  # libgphoto2's paths in its environment
DRIVERS = Path(_SPEC.origin).parent / "libgphoto2"


def unplugged(ports: Path) -> Path:
    """``ports`` made a folder of port drivers without the camera's (a driver that finds
    nothing: libgphoto2 refuses a folder without any)."""
    ports.mkdir(parents=True, exist_ok=True)
    (ports / "disk.so").symlink_to(DRIVERS / "iolibs" / "disk.so")
    return ports


def plug(ports: Path) -> None:
    """The virtual camera's driver into ``ports``: the camera is on USB from now on."""
    temp = ports / ".vusb.so"
    temp.symlink_to(DRIVERS / "vusb" / "vusb.so")
    os.replace(temp, ports / "vusb.so")


def launch(argv: list[str]) -> int:
    ports, dash, *command = argv
    if dash != "--" or command[:3] != [sys.executable, "-m", "nightstack.cli"]:
        raise SystemExit("usage: python -m _usb_plug PORTS -- python -m nightstack.cli ARGS")
    import gphoto2  # noqa: F401  (sets IOLIBS to the vusb driver's folder: VCAMERADIR is set)

    os.environ["IOLIBS"] = str(ports)
    from nightstack.cli import main

    return main(command[3:])


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
