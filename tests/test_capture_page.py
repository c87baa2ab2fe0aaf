"""The page's camera panel in a real headless Chromium against a real ``nightstack watch``
driving libgphoto2's virtual camera (tests/_vcam.py): the panel shows the camera, the start
button with the page's fields starts a sequence, and the panel follows it to its end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from _daemon import Daemon, wait_for
from _vcam import VirtualCamera
from _web import browser_missing, chromium, page_until, web_base

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())),
]


def _text(driver: Any, element: str) -> str:
    return str(driver.find_element("id", element).text)


def test_the_page_starts_a_sequence_and_follows_it(tmp_path: Path) -> None:
    camera = VirtualCamera(tmp_path / "vcamera")
    watch, out = tmp_path / "incoming", tmp_path / "out"
    watch.mkdir()
    out.mkdir()
    env = {**camera.env(), "NIGHTSTACK_EXTENSIONS": ".jpg"}  # capture off until the page asks
    daemon = Daemon(watch, out, "--web", "127.0.0.1:0", env=env)
    try:
        base = web_base(daemon)
        with chromium(390, 844) as driver:
            driver.get(base + "/")
            page_until(
                driver,
                "the camera panel",
                30,
                lambda d: d.find_element("id", "capture-section").is_displayed(),
            )
            assert _text(driver, "cap-state") == "off"
            assert driver.find_element("id", "cap-start").is_displayed()
            for field, value in (
                ("cap-exposure", "0.01"),
                ("cap-count", "2"),
                ("cap-interval", "0.5"),
            ):
                box = driver.find_element("id", field)
                box.clear()
                box.send_keys(value)
            driver.find_element("id", "cap-start").click()
            page_until(driver, "the sequence's end", 30, lambda d: _text(d, "cap-state") == "done")
            assert _text(driver, "cap-frame") == "2 of 2"
            assert _text(driver, "cap-camera").startswith("VC (serial 0.1)")
            assert _text(driver, "cap-battery") == "50%"
            assert _text(driver, "cap-card") == "530 MB"  # the virtual camera's free space
            assert driver.find_element("id", "cap-start").is_displayed()
            assert not driver.find_element("id", "cap-stop").is_displayed()
        wait_for(lambda: len(list(watch.glob("*.jpg"))) == 2, 10, "2 frames", daemon)
    finally:
        assert daemon.stop() == 0
