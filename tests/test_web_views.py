"""The page's views of a night (issue 24) in a real headless Chromium against a real
``nightstack watch``: the stretched view follows the stack frame by frame (from the linear
preview written with every preview, not the paced live.fits).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from _daemon import Daemon, journal, wait_for
from _web import browser_missing, chromium, request, web_base
from _web import page_until as _until
from nightstack.products.views import LINEAR_PREVIEW
from nightstack.simulate import simulate_night

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())),
]


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    outdir = tmp_path_factory.mktemp("camera")
    simulate_night(outdir, frames=6, width=1200, height=800, seed=24)
    return sorted(outdir.glob("*.DNG"))


def _image(driver: Any) -> dict[str, Any]:
    result: dict[str, Any] = driver.execute_script(
        "const i = document.getElementById('preview');"
        "return {src: i.getAttribute('src'), done: i.complete, width: i.naturalWidth};"
    )
    return result


def _loaded(driver: Any, what: str, old: str | None = None) -> dict[str, Any]:
    """Wait for the page's image to be loaded from a src other than ``old``."""
    return dict(
        _until(
            driver,
            what,
            60,
            lambda b: (p := _image(b))["src"] != old and p["done"] and p["width"] and p,
        )
    )


def test_the_stretched_view_follows_every_frame(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    # live.fits written once, then not for an hour: the stretch must not wait for it
    env = {"NIGHTSTACK_LIVE_FITS_EVERY_S": "3600"}
    d = Daemon(watch, out, "--web", "127.0.0.1:0", env=env)
    daemons.append(d)
    base = web_base(d)
    for f in frames[:2]:
        shutil.copy(f, watch / f.name)
    lines = wait_for(lambda: len(journal(out)) == 2 and journal(out), 120, "two frames", d)
    session = out / lines[0]["session"]
    wait_for(lambda: (session / "preview.jpg").exists(), 60, "a preview", d)
    live = (session / "live.fits").stat().st_mtime_ns

    with chromium(390, 844) as driver:
        driver.get(base + "/")
        _until(driver, "the stretch controls", 60, lambda b: b.find_element("id", "stretch")
               .is_displayed())  # fmt: skip
        driver.execute_script(
            "const s = document.getElementById('stretch-strength');"
            "s.value = '2'; s.dispatchEvent(new Event('change'));"
        )
        shown = _until(driver, "the stretch", 30, lambda b: "stretch.jpg" in _image(b)["src"])
        first = _loaded(driver, "the stretched view") if shown else {}
        pictures = [request(base, first["src"]).body]
        for n, frame in enumerate(frames[2:4], start=3):
            shutil.copy(frame, watch / frame.name)
            wait_for(lambda n=n: len(journal(out)) == n, 120, f"frame {n}", d)
            now = _loaded(driver, f"the stretch after frame {n}", first["src"])
            assert "stretch.jpg?strength=2" in now["src"]
            pictures.append(request(base, now["src"]).body)
            first = now
        assert len(set(pictures)) == 3  # the picture changed twice
        assert (session / "live.fits").stat().st_mtime_ns == live  # not from live.fits
        assert (session / LINEAR_PREVIEW).exists()
    assert d.stop() == 0
