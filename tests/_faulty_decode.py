"""A decode function with real faults, for the decoder and daemon tests; it runs in the
decoder's child process.

By the file's name (the files need not exist for the faults):

- ``hang``: never finishes (like LibRaw looping on a corrupt file); ``hangonce``: hangs on the
  first attempt only (the decode times out), then decodes normally;
- ``crash``: kills the child with a real SIGSEGV;
- ``eio``: the read fails with a real ``OSError(EIO)`` raised in the child, every time;
  ``eioonce``: on the first attempt only;
- ``stall``: writes its process id into ``<name>.decoding`` in the state folder, then takes
  ``STALL_S`` longer (a test waits for that file and kills the child with SIGKILL meanwhile);
- ``lag``: takes ``LAG_S`` longer (frames that keep a queue waiting).

Everything else is decoded by ``nightstack.io.loaders.decode_light``. "First attempt" is
remembered in the folder named by the environment variable ``FAULTY_DECODE_STATE`` (the child is
restarted after a timeout, so memory would not do); it is read here only, never by nightstack.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

from nightstack.frames import Frame, Mosaic
from nightstack.io import loaders

STATE_ENV = "FAULTY_DECODE_STATE"
STALL_S = 2.0  # long enough for a test to see the marker and kill the child
LAG_S = 0.3  # a few of these keep the queue busy for a second or two


def _first_time(name: str, what: str) -> bool:
    """True the first time ``what`` happens to ``name`` (across child restarts)."""
    mark = Path(os.environ[STATE_ENV]) / f"{name}.{what}"
    if mark.exists():
        return False
    mark.write_bytes(b"")
    return True


def load(path: str | Path, **kwargs: Any) -> Frame | Mosaic:
    """``loaders.decode_light`` with the faults the file's name asks for (see the module doc)."""
    name = Path(path).name
    if "hang" in name and ("hangonce" not in name or _first_time(name, "hung")):
        while True:
            time.sleep(3600)
    if "crash" in name:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "eio" in name and ("eioonce" not in name or _first_time(name, "eio")):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
    if "stall" in name:
        (Path(os.environ[STATE_ENV]) / f"{name}.decoding").write_text(str(os.getpid()))
        time.sleep(STALL_S)
    if "lag" in name:
        time.sleep(LAG_S)
    return loaders.decode_light(path, **kwargs)
