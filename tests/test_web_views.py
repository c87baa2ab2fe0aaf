"""The page's views of a night (issue 24) in a real headless Chromium: against a real
``nightstack watch``, the stretched view follows the stack frame by frame (from the linear
preview written with every preview, not the paced live.fits) and the last single frame shows;
against the server alone over session folders written here, the morning after (no session
open: the newest session with a picture, its frames and charts), the charts' axes, the name,
field and counts over the image and the plate solve's objects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from astropy.io import fits

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

        # over the image: the frames' folder (DNGs have no OBJECT), count and exposure
        texts = _until(driver, "the overlay", 30, lambda b: (t := _texts(b))["count"] and t)
        assert texts["name"] == "watch"
        exposure = sum(r["exposure_s"] for r in journal(out) if r["status"] == "accepted")
        assert texts["count"].startswith(f"4 frames · {int(exposure // 60)} min")
        # the last single frame: its luminance (binned 2x2), stretched, in place of the stack
        driver.find_element("id", "show-last").click()
        last = _loaded(driver, "the last frame", first["src"])
        assert f"/api/sessions/{session.name}/last.jpg?" in last["src"]
        assert last["width"] == 600
        assert request(base, last["src"]).body == (session / "last.jpg").read_bytes()
        assert not driver.find_element("id", "stretch").is_displayed()
        assert driver.find_element("id", "ov-mode").is_displayed()
        driver.find_element("id", "show-last").click()
        _loaded(driver, "the stack again", last["src"])
        assert "stretch.jpg?strength=2" in _image(driver)["src"]
    assert d.stop() == 0


def _write_session(
    out: Path, sid: str, meta: dict[str, Any], records: list[dict[str, Any]] | None
) -> Path:
    folder = out / sid
    folder.mkdir(parents=True)
    (folder / "session.json").write_text(json.dumps({"session": sid, **meta}))
    if records is not None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (folder / "journal.jsonl").write_text(lines)
    return folder


def _record(i: int, fwhm: float, status: str = "accepted") -> dict[str, Any]:
    return {
        "file": f"/lights/IMG_{i:04d}.fits",
        "status": status,
        "reason": None if status == "accepted" else "clouds",
        "reference": i == 0,
        "transform": [[1, 0, 0.5 * i], [0, 1, 0.2 * i]],
        "stars": 150 + i,
        "fwhm": fwhm,
        "background": 0.037 + 0.0002 * i,
        "transparency": 0.98 - 0.01 * i,
        "exposure_s": 30.0,
        "capture_time": f"2026-11-30T22:{i:02d}:00+00:00",
    }


def _texts(driver: Any) -> dict[str, Any]:
    result: dict[str, Any] = driver.execute_script(
        "const t = (id) => { const e = document.getElementById(id);"
        " return e && !e.hidden && e.offsetParent !== null ? e.textContent : null; };"
        "return {session: t('session-name'), name: t('ov-name'), count: t('ov-count'),"
        " overlay: !document.getElementById('overlay').hidden,"
        " rows: document.querySelectorAll('#frames tbody tr').length,"
        " src: document.getElementById('preview').getAttribute('src') || '',"
        " width: document.getElementById('preview').naturalWidth};"
    )
    return result


def _axis(driver: Any, metric: str) -> tuple[float, float]:
    lo, hi = driver.execute_script(
        "const s = document.querySelector(arguments[0]); return [s.dataset.lo, s.dataset.hi];",
        f'#charts svg[data-metric="{metric}"]',
    )
    return float(lo), float(hi)


def test_the_morning_after_opens_the_last_night_with_its_name_axes_and_objects(
    tmp_path: Path,
) -> None:
    """No session open: the page opens on the newest session with a picture (a later empty
    one is skipped), with its preview, frames and charts; FWHM 3.67-3.72 px is drawn on a
    0-5 px axis; the name comes from session.json's target (plate solving), else the frames'
    FITS OBJECT, else their folder; the solve's objects are drawn where they are."""
    from nightstack.web.server import WebServer

    out = tmp_path / "out"
    lights = tmp_path / "M 27 lights"
    lights.mkdir()
    reference = lights / "IMG_0000.fits"
    hdu = fits.PrimaryHDU(np.zeros((4, 6), np.float32))
    hdu.header["OBJECT"] = "M27 Dumbbell"
    hdu.writeto(reference)
    fwhms = [3.67, 3.72, 3.69, 3.70, 3.68]
    records = [_record(i, f) for i, f in enumerate(fwhms)]
    records[1]["transparency"] = 1.004  # a little clearer than the reference
    records.append(_record(5, 3.71, "rejected"))
    solve = {
        "ra_deg": 299.9, "dec_deg": 22.72, "scale_arcsec": 3.6, "rotation_deg": 1.0,
        "field_w_deg": 1.2, "field_h_deg": 0.8,  # 1200 x 800 px at 3.6"/px
        "objects": [{"name": "M 27", "kind": "PN", "x": 600.0, "y": 400.0, "radius_px": 40.0}],
    }  # fmt: skip
    night = _write_session(
        out,
        "20261130-214502",
        {"state": "closed", "started": "2026-11-30T21:45:02+00:00", "accepted": 5,
         "rejected": 1, "reference": str(reference), "target": "M 27", "solve": solve},
        records,
    )  # fmt: skip
    picture = np.zeros((400, 600, 3), np.uint8)
    picture[150:250, 250:350] = (90, 160, 220)
    cv2.imwrite(str(night / "preview.jpg"), picture)
    _write_session(
        out, "20261129-200000", {"state": "closed", "started": "2026-11-29T20:00:00"}, []
    )
    _write_session(  # the newest: opened by a stray file and closed with nothing stacked
        out, "20261201-060000", {"state": "closed", "started": "2026-12-01T06:00:00"}, []
    )
    status = {"state": "waiting", "session": None, "accepted": 0, "rejected": 0, "queue": 0}
    server = WebServer(
        out, "127.0.0.1:0", token=None, status=lambda: dict(status, uptime_s=1.0, last_frame=None),
        close=lambda: None,
    )  # fmt: skip
    server.start()
    try:
        with chromium(390, 844) as driver:
            driver.get(server.url)
            shown = _until(
                driver,
                "the last night",
                30,
                lambda b: (t := _texts(b))["width"] and t["rows"] == 6 and t["overlay"] and t,
            )
            assert shown["session"] == "20261130-214502"
            assert "/20261130-214502/preview.jpg" in shown["src"] and shown["width"] == 600
            assert shown["name"] == "M 27 · 1.2° × 0.8°"
            assert shown["count"] == "5 frames · 2 min 30 s"  # accepted only
            # axes from sensible ranges in their units, not the data's own min-max
            assert _axis(driver, "fwhm") == (0, 5)
            assert _axis(driver, "transparency") == (0, 120)  # not 200: a round top near
            assert _axis(driver, "background") == (0, 5)  # % of full scale
            assert _axis(driver, "stars") == (0, 200)
            heads = driver.execute_script(
                "return [...document.querySelectorAll('#charts h3')].map(h => h.firstChild"
                ".textContent)"
            )
            assert heads[0] == "FWHM (px)" and "Transparency (%)" in heads
            # the plate solve's objects, scaled from 1200 x 800 stack px to the preview
            assert not driver.find_element("id", "objects").is_displayed()
            driver.find_element("id", "show-objects").click()
            circle = _until(
                driver,
                "the objects",
                10,
                lambda b: b.execute_script(
                    "const c = document.querySelector('#objects circle');"
                    "if (!c) return null; const r = c.getBoundingClientRect(),"
                    " i = document.getElementById('preview').getBoundingClientRect();"
                    "return {x: (r.left + r.width / 2 - i.left) / i.width,"
                    " y: (r.top + r.height / 2 - i.top) / i.height, w: r.width / i.width,"
                    " name: c.parentNode.dataset.name};"
                ),
            )
            assert circle["name"] == "M 27"
            assert abs(circle["x"] - 0.5) < 0.01 and abs(circle["y"] - 0.5) < 0.01
            assert abs(circle["w"] - 80 / 1200) < 0.01

            # without a solve: the reference frame's OBJECT, then its folder's name
            meta = json.loads((night / "session.json").read_text())
            del meta["target"], meta["solve"]
            meta["updated"] = "later"
            (night / "session.json").write_text(json.dumps(meta))
            driver.refresh()
            _until(driver, "the OBJECT", 30, lambda b: _texts(b)["name"] == "M27 Dumbbell")
            assert not driver.find_element("id", "objects-toggle").is_displayed()
            reference.unlink()
            meta["reference"] = str(lights / "IMG_0001.cr2")
            (night / "session.json").write_text(json.dumps(meta))
            driver.refresh()
            _until(driver, "the folder", 30, lambda b: _texts(b)["name"] == "M 27 lights")
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        server.stop()


def test_the_timelapse_plays_in_the_page(tmp_path: Path) -> None:
    """A session's timelapse, encoded by the session's own encoder (H.264 in MP4), plays in
    the page's <video> in Chromium: its data loads and its time advances."""
    from nightstack.products.extras import TIMELAPSE, Timelapse
    from nightstack.web.server import WebServer

    sid = "20261130-214502"
    folder = _write_session(tmp_path, sid, {"state": "closed", "updated": "1"}, [])
    video = Timelapse(folder, (400, 600), width=320, fps=12.0)
    rng = np.random.default_rng(7)
    for i in range(24):  # two seconds: a bright block crossing a noisy sky
        sky = rng.normal(0.1, 0.01, (400, 600, 3)).astype(np.float32)
        sky[150:250, 20 * i : 20 * i + 60] = 0.8
        video.add(sky)
    assert video.close()["timelapse_frames"] == 24
    assert (folder / TIMELAPSE).exists()
    cv2.imwrite(str(folder / "preview.jpg"), np.zeros((200, 300, 3), np.uint8))
    status = {"state": "waiting", "session": None, "accepted": 0, "rejected": 0, "queue": 0}
    server = WebServer(
        tmp_path,
        "127.0.0.1:0",
        token=None,
        status=lambda: dict(status, uptime_s=1.0, last_frame=None),
        close=lambda: None,
    )
    server.start()
    try:
        with chromium(390, 844) as driver:
            driver.get(server.url)
            _until(driver, "the player", 30, lambda b: b.find_element("id", "timelapse")
                   .is_displayed())  # fmt: skip
            state = _until(
                driver,
                "the video's data",
                30,
                lambda b: b.execute_script(
                    "const v = document.getElementById('timelapse');"
                    "return v.readyState >= 2 && {src: v.currentSrc, w: v.videoWidth,"
                    " h: v.videoHeight, duration: v.duration,"
                    " mp4: v.canPlayType('video/mp4; codecs=\"avc1.64001E\"')};"
                ),
            )
            assert f"/api/sessions/{sid}/{TIMELAPSE}?" in state["src"]
            assert (state["w"], state["h"]) == (320, 212)
            assert state["duration"] == pytest.approx(2.0, abs=0.1)
            assert state["mp4"] in ("probably", "maybe")
            driver.execute_script("document.getElementById('timelapse').play()")
            played = _until(
                driver,
                "the video playing",
                20,
                lambda b: b.execute_script(
                    "const v = document.getElementById('timelapse');"
                    "return !v.error && v.currentTime > 0.5 && v.currentTime;"
                ),
            )
            assert played > 0.5
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        server.stop()
