"""The README's main job, ``nightstack demo``, end to end as a real process: a simulated night
stacked live by the daemon, closed when the camera goes quiet, the final written and readable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits


def test_the_demo_stacks_a_night_and_writes_its_final(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "nightstack.cli", "demo", "--output-dir", str(out),
               "--frames", "4", "--interval", "0.3", "--width", "800",
               "--height", "534"]  # fmt: skip
    env = {**os.environ, "NIGHTSTACK_WEB_ENABLED": "false"}  # no port 8080 taken from other tests
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, check=False, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (session,) = [p for p in out.iterdir() if (p / "session.json").exists()]
    meta = json.loads((session / "session.json").read_text())
    assert meta["state"] == "closed" and meta["accepted"] == 4, meta
    with fits.open(session / "stack.fits") as hdus:
        assert hdus[0].header["NCOMBINE"] == 4
        image = np.asarray(hdus[0].data)
    assert image.shape == (3, 534, 800) and np.isfinite(image).mean() > 0.9
    tiff = session / "stack.tif"
    assert tiff.stat().st_size > 0 and f"{tiff.name}" in done.stdout.split("stack:", 1)[1]
