"""A decoder child that takes ``SLOW_START_S`` seconds (environment, default 20) to start.

``decode_fn="_slow_start:load"``: the child sleeps while importing this module, as a Pi with a
cold SD card may; the first frame's prepare stage waits for it longer than its deadline (a stuck
stage for the watchdog test), then decodes normally.
"""

from __future__ import annotations

import os
import time

from nightstack.io.loaders import decode_light as load

time.sleep(float(os.environ.get("SLOW_START_S", "20")))

__all__ = ["load"]
