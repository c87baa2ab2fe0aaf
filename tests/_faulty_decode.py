"""A decode function with real faults, for tests/test_decoder.py; it runs in the decoder's child.

Files whose name contains ``hang`` never finish (like LibRaw looping on a corrupt file), files
whose name contains ``crash`` kill the child with a real SIGSEGV; everything else is decoded by
``nightstack.loaders.decode_light``. The files need not exist for the faults.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from nightstack import loaders
from nightstack.frames import Frame, Mosaic


def load(path: str | Path, **kwargs: Any) -> Frame | Mosaic:
    """``loaders.decode_light`` with a hang or a segmentation fault on request (module doc)."""
    name = Path(path).name
    if "hang" in name:
        while True:
            time.sleep(3600)
    if "crash" in name:
        os.kill(os.getpid(), signal.SIGSEGV)
    return loaders.decode_light(path, **kwargs)
