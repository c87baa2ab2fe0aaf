"""Tethered capture: nightstack drives the camera over USB (libgphoto2) and shoots into the
watch folder, frame by frame (issue 22).

- :mod:`.status`: the plan of a sequence and its status (plain values, no libgphoto2);
- :mod:`.camera`: the libgphoto2 session (the only module importing :mod:`gphoto2`);
- :mod:`.sequence`: the sequence engine (timing, download + rename, journal, reconnect);
- :mod:`.control`: one sequence at a time on its own thread, for ``nightstack watch`` and the
  web page.

Importing this package does not import libgphoto2: a daemon without a camera never loads it.
"""

from nightstack.capture.status import CaptureStatus, Plan

__all__ = ["CaptureStatus", "Plan"]
