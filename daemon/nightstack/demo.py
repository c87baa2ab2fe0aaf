"""``nightstack demo``: a simulated night written at a camera's pace while the daemon stacks it."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from nightstack.config import load_settings
from nightstack.service.daemon import Daemon
from nightstack.service.session import Session
from nightstack.simulate import simulate_night
from nightstack.web.server import start_web

log = logging.getLogger("nightstack.demo")


def run_demo(
    output_dir: Path,
    *,
    frames: int = 12,
    interval_s: float = 1.0,
    width: int = 1600,
    height: int = 1066,
    seed: int = 7,
) -> int:
    """Simulate ``frames`` DNGs into a temporary watch folder, stack them live, close, report."""
    watch = Path(tempfile.mkdtemp(prefix="nightstack-demo-watch-"))
    settings = load_settings(
        None,
        {
            "watch_dir": watch,
            "output_dir": output_dir,
            # the session closes once the simulated camera has been quiet for a while
            "idle_timeout_s": max(5.0, 4 * interval_s),
            "preview_every_frames": 2,
            "solve_enabled": False,  # random stars: no sky to find (a blind solve's minute)
        },
        use_default=False,
    )
    satellite = frames // 2 if frames >= 4 else None

    def camera() -> None:
        simulate_night(
            watch,
            frames=frames,
            width=width,
            height=height,
            seed=seed,
            interval_s=interval_s,
            satellite=satellite,
        )

    closed: dict[str, Any] = {}

    def on_close(session: Session, outputs: dict[str, Any]) -> None:
        closed.update(outputs, session=str(session.dir))

    print(
        f"simulating {frames} frames into {watch} (one every {interval_s:g} s); "
        f"satellite trail in frame {satellite}; sessions in {output_dir}"
    )
    shooter = threading.Thread(target=camera, name="nightstack-demo-camera", daemon=True)
    shooter.start()
    try:
        daemon = Daemon(settings, exit_when_closed=True, on_close=on_close, web=start_web)
        code = daemon.run()
    finally:
        shooter.join(timeout=5)
        shutil.rmtree(watch, ignore_errors=True)
    if not closed.get("tiff"):
        print("demo: no stack was produced", flush=True)
        return 1
    print(f"session:  {closed['session']}")
    print(f"preview:  {closed['preview']}")
    print(f"stack:    {closed['tiff']}")
    if "fits" in closed:
        print(f"fits:     {closed['fits']}")
    print(f"journal:  {Path(closed['session']) / 'journal.jsonl'}")
    return code
