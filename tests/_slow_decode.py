"""A decode function that takes 0.4 s longer, like a Raspberry Pi decoding a 24 MP raw.

tests/test_reliability.py runs the daemon with the hook ``decode_fn="_slow_decode:load"`` so that
a kill -9 at a random moment often lands while a frame is being decoded in the child process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nightstack.frames import Frame, Mosaic
from nightstack.io import loaders

DELAY_S = 0.4  # a Pi decodes a 24 MP CR3 in a few seconds; 0.4 s is enough to be hit


def load(path: str | Path, **kwargs: Any) -> Frame | Mosaic:
    """``loaders.decode_light`` after a pause of ``DELAY_S``."""
    time.sleep(DELAY_S)
    return loaders.decode_light(path, **kwargs)
