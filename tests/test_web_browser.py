"""The page in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by
Selenium) against a real ``nightstack watch`` stacking simulated DNGs.

The preview appears and changes by itself after a new frame; a rejected frame's reason and a
frame named like an HTML tag show as text in the table; each chart has one point per frame;
night mode turns the page red; the close button closes the session. Screenshots at phone
(390 px) and desktop width are taken on the way; with ``NIGHTSTACK_SCREENSHOTS=1`` they are
written to ``docs/`` (the pictures of README.md and docs/web.md), else next to the test's other
files.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from _daemon import Daemon, journal, wait_for
from _web import browser_missing, chromium, request, web_base
from _web import page_until as _until
from nightstack.products.views import linear_width
from nightstack.simulate import simulate_night
from nightstack.web.render import CROPS, listed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())),
]

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOSTILE = "<img src=x onerror=alert(1)>.dng"  # a frame name that is also HTML
CLOUDY = 3


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    outdir = tmp_path_factory.mktemp("camera")
    simulate_night(outdir, frames=6, width=1200, height=800, seed=21, cloudy=CLOUDY)
    return sorted(outdir.glob("*.DNG"))


def _preview(driver: Any) -> dict[str, Any]:
    result: dict[str, Any] = driver.execute_script(
        "const i = document.getElementById('preview');"
        "return {src: i.getAttribute('src'), done: i.complete, width: i.naturalWidth,"
        " hidden: i.hidden};"
    )
    return result


def _zoom(driver: Any) -> dict[str, Any]:
    result: dict[str, Any] = driver.execute_script(
        "const z = document.getElementById('zoom'), i = document.getElementById('zoom-img');"
        "return {visible: !z.hidden, src: i.getAttribute('src') || '', width: i.naturalWidth,"
        " height: i.naturalHeight, css_width: parseFloat(i.style.width),"
        " ratio: window.devicePixelRatio, side: Math.max(innerWidth, innerHeight)};"
    )
    return result


def _rows(driver: Any) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = driver.execute_script(
        "return [...document.querySelectorAll('#frames tbody tr')].map(r => ({"
        " index: r.dataset.index, file: r.cells[2].textContent, result: r.cells[3].textContent,"
        " stars: r.cells[4].textContent }));"
    )
    return rows


def _points(driver: Any, metric: str) -> list[int]:
    found: list[int] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(c => Number(c.dataset.index));",
        f'#charts svg[data-metric="{metric}"] circle',
    )
    return sorted(found)


def _screenshot(driver: Any, path: Path, full_page: bool = False) -> np.ndarray:
    """A PNG of the page (the viewport, or the whole page), written small."""
    if full_page:
        metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics["cssContentSize"]
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": size["height"],
                    "scale": 1,
                },
            },
        )
        data = base64.b64decode(shot["data"])
    else:
        data = driver.get_screenshot_as_png()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = (image & 0xF8) | 0x04  # 5 bits a channel: half the bytes, no visible change
    cv2.imwrite(str(path), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return np.asarray(image)


def test_the_page_follows_a_night_and_closes_it(
    frames: list[Path], tmp_path: Path, daemons: list[Daemon]
) -> None:
    shots = DOCS if os.environ.get("NIGHTSTACK_SCREENSHOTS") else tmp_path / "screenshots"
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    d = Daemon(watch, out, "--web", "127.0.0.1:0")
    daemons.append(d)
    base = web_base(d)
    for f in frames[:3]:
        shutil.copy(f, watch / f.name)
    lines = wait_for(lambda: len(journal(out)) == 3 and journal(out), 120, "three frames", d)
    session = out / lines[0]["session"]
    wait_for(lambda: (session / "preview.jpg").exists(), 60, "a preview", d)

    with chromium(390, 844) as driver:
        driver.get(base + "/")
        # the current preview appears
        first = _until(
            driver,
            "the preview",
            30,
            lambda b: (p := _preview(b))["width"] and not p["hidden"] and p,
        )
        assert first["src"].startswith(f"/api/sessions/{session.name}/preview.jpg")
        before = request(base, first["src"]).body
        _until(driver, "three rows", 30, lambda b: len(_rows(b)) == 3)

        # ...and changes by itself after a new frame
        shutil.copy(frames[4], watch / frames[4].name)
        second = _until(
            driver,
            "a new preview",
            90,
            lambda b: (p := _preview(b))["src"] != first["src"] and p["done"] and p["width"] and p,
        )
        assert second["width"] == first["width"]
        assert request(base, second["src"]).body != before  # a new picture, not a new URL only

        # a rejected frame's reason, as the journal says it
        shutil.copy(frames[CLOUDY], watch / frames[CLOUDY].name)
        cloudy = wait_for(lambda: len(journal(out)) == 5 and journal(out)[4], 90, "cloudy", d)
        assert cloudy["status"] == "rejected" and cloudy["reason"]
        row = _until(
            driver,
            "the rejected row",
            30,
            lambda b: next((r for r in _rows(b) if r["file"] == frames[CLOUDY].name), None),
        )
        assert row["result"] == cloudy["reason"]

        # a frame named like HTML is text, not markup (and no script ran)
        shutil.copy(frames[5], watch / HOSTILE)
        _until(driver, "the odd name", 90, lambda b: any(r["file"] == HOSTILE for r in _rows(b)))
        assert driver.execute_script("return document.querySelectorAll('#frames img').length") == 0
        assert driver.execute_script(
            "return [...document.querySelectorAll('img')].every(i => i.getAttribute('src') !== 'x')"
        )

        # one chart point per frame (every frame here has stars and a background)
        records = wait_for(lambda: len(journal(out)) == 6 and journal(out), 60, "six lines", d)
        _until(driver, "six rows", 30, lambda b: len(_rows(b)) == 6)
        assert _points(driver, "stars") == list(range(6))
        assert _points(driver, "background") == list(range(6))
        with_fwhm = [i for i, r in enumerate(records) if r["fwhm"] is not None]
        assert _points(driver, "fwhm") == with_fwhm
        with_transform = [i for i, r in enumerate(records) if r["transform"] is not None]
        assert _points(driver, "drift") == with_transform
        transparency = [i for i, r in enumerate(records) if r.get("transparency") is not None]
        assert _points(driver, "transparency") == transparency  # blank until the daemon has it
        stars = [r["stars"] for r in _rows(driver)][::-1]  # the table is newest first
        assert stars == [str(r["stars"]) for r in records]

        # the daemon's live.fits: the stretch controls render on the server, and a tap shows
        # a 1:1 crop of the live stack
        assert (session / "live.fits").exists()
        _until(
            driver,
            "the stretch controls",
            60,
            lambda b: b.find_element("id", "stretch").is_displayed(),
        )
        driver.execute_script(
            "const s = document.getElementById('stretch-strength');"
            "s.value = '2'; s.dispatchEvent(new Event('change'));"
        )
        stretched = _until(
            driver,
            "the stronger stretch",
            30,
            lambda b: (
                "stretch.jpg?strength=2&linked=1" in (p := _preview(b))["src"]
                and p["done"]
                and p["width"]
                and p
            ),
        )
        # from the linear preview written with every preview (products/views.py), not enlarged
        assert stretched["width"] == linear_width(800, 1200, 3, 1600) == 640
        driver.find_element("id", "stretch-linked").click()
        _until(driver, "unlinked", 30, lambda b: "linked=0" in _preview(b)["src"])
        driver.find_element("id", "preview").click()
        crop = _until(
            driver,
            "the 1:1 crop",
            30,
            lambda b: (z := _zoom(b))["visible"] and z["width"] and z["css_width"] and z,
        )
        assert "/crop.jpg?cx=" in crop["src"] and "linked=0" in crop["src"]
        size = int(crop["src"].split("size=")[1].split("&")[0])
        side = min(1024, round(crop["side"] * crop["ratio"]))  # the screen's longer side
        assert size == listed(side, CROPS)  # rounded up to a listed side
        assert crop["width"] == crop["height"] == size  # served at the stack's own pixels
        assert crop["css_width"] == size / crop["ratio"]  # one stack pixel per screen pixel
        driver.find_element("id", "zoom").click()
        driver.find_element("id", "stretch-auto").click()
        _until(driver, "auto again", 30, lambda b: "/preview.jpg?" in _preview(b)["src"])

        # everything came from the daemon: no outside request, no console error
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert resources and all(name.startswith(base + "/") for name in resources), resources
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors

        _until(driver, "the last preview", 60, lambda b: _preview(b)["done"])
        driver.execute_script("window.scrollTo(0, 0)")
        phone = _screenshot(driver, shots / "web-phone.png", full_page=True)
        assert phone.shape[1] == 390 and phone.shape[0] > 844

        # red night-vision mode
        driver.find_element("id", "night").click()
        colour = driver.execute_script("return getComputedStyle(document.body).color")
        r, g, b = (int(v) for v in colour[colour.index("(") + 1 : colour.index(")")].split(",")[:3])
        assert r > 150 and g < 40 and b < 40, colour
        night = _screenshot(driver, shots / "web-night.png")
        assert night[:, :, 1].mean() < 10 and night[:, :, 0].mean() < 10  # no green, no blue
        driver.find_element("id", "night").click()

        # desktop width
        driver.set_window_size(1280, 900)
        time.sleep(0.5)
        desktop = _screenshot(driver, shots / "web-desktop.png")
        assert desktop.shape[1] >= 1200

        # the close button (two taps) closes the session
        close = driver.find_element("id", "close")
        close.click()
        assert "again" in close.text
        close.click()
        wait_for(
            lambda: json.loads((session / "session.json").read_text())["state"] == "closed",
            60,
            "the session closed",
            d,
        )
        note = driver.find_element("id", "close-note").text
        assert f"Closing session {session.name}" in note, note
        _until(
            driver,
            "the closed state",
            30,
            lambda b: "closed" in b.find_element("id", "session-state").text,
        )
        assert (session / "stack.tif").exists()
    assert d.stop() == 0


def test_the_page_asks_for_the_token_once(tmp_path: Path) -> None:
    """With web_token set, reading needs it too (issue 20 item 1): the page asks for it once,
    trades it for a read cookie, shows the session, and closes with it without asking again,
    also on a new visit; a session without live.fits zooms into its preview. (The server
    runs in this process; a stand-in daemon counts the close requests.)"""
    from nightstack.web.server import WebServer

    sid = "20261130-214502"
    (tmp_path / sid).mkdir()
    (tmp_path / sid / "session.json").write_text(json.dumps({"session": sid, "state": "open"}))
    picture = np.zeros((533, 800, 3), np.uint8)
    picture[:, :400] = (40, 80, 160)
    cv2.imwrite(str(tmp_path / sid / "preview.jpg"), picture)  # no live.fits in this session
    closes: list[float] = []
    status = {"state": "stacking", "session": sid, "accepted": 0, "rejected": 0, "queue": 0}
    token = "phone-token-5678"
    server = WebServer(
        tmp_path,
        "127.0.0.1:0",
        token=token,
        status=lambda: dict(status, uptime_s=1.0, last_frame=None),
        close=lambda: closes.append(time.monotonic()),
    )
    server.start()
    try:
        with chromium(390, 844) as driver:
            driver.get(server.url)
            form = _until(
                driver,
                "the token form",
                30,
                lambda b: (f := b.find_element("id", "token-form")).is_displayed() and f,
            )
            assert "web token" in driver.find_element("id", "close-note").text
            assert _preview(driver)["width"] == 0  # nothing read without it
            driver.find_element("id", "token").send_keys(token)
            form.submit()
            # no live.fits: no stretch controls, and a tap shows the preview at its full size
            _until(driver, "the preview", 30, lambda b: _preview(b)["width"] == 800)
            assert not driver.find_element("id", "stretch").is_displayed()
            assert driver.find_element("id", "stretch-note").is_displayed()
            driver.find_element("id", "preview").click()
            shown = _until(
                driver,
                "the zoom",
                30,
                lambda b: (z := _zoom(b))["visible"] and z["width"] and z["css_width"] and z,
            )
            assert "/preview.jpg?" in shown["src"] and shown["width"] == 800
            assert shown["css_width"] == 800 / shown["ratio"]  # its own pixels, not fitted
            driver.find_element("id", "zoom").click()
            _until(driver, "the zoom closed", 10, lambda b: not _zoom(b)["visible"])
            for expected in (1, 2):
                close = _until(
                    driver,
                    "the close button",
                    30,
                    lambda b: (c := b.find_element("id", "close")).is_displayed() and c,
                )
                close.click()
                close.click()
                _until(driver, "the close", 30, lambda b, n=expected: len(closes) == n)
                _until(
                    driver,
                    "the answer",
                    30,
                    lambda b: "Closing session" in b.find_element("id", "close-note").text,
                )
                assert not driver.find_element("id", "token-form").is_displayed()
                driver.refresh()  # a new visit: the token is remembered
    finally:
        server.stop()
