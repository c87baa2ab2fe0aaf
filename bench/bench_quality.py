"""Image quality as a photographer sees it (issue 19): star FWHM fitted on the same stars and
faint-star S/N by forced aperture photometry against random star-free apertures, on the real
sequences of ../shared/realdata, for nightstack's defaults, its former defaults, a reference
pipeline and Siril, in one run.

- ``nightstack``: `nightstack stack` with default settings (``mhc-sharp`` demosaic, clamped cubic
  warp); ``mhc``: the same with Malvar-He-Cutler's published gains (``--demosaic mhc``).
- ``former``: the same with ``--demosaic bilinear --interpolation bilinear`` (the defaults before
  issue 19) and ``--max-elongation 1.6`` standing for the old fixed trail gate.
- ``reference``: Menon's demosaic (colour-demosaicing), a Lanczos-4 warp through nightstack's own
  transforms (from the ``former`` run's report, so registration is equal), astropy's sigma clip
  (3, 3) of the mean, each frame's median matched to the reference frame's per channel.
- ``siril``: ``siril-cli``: convert -debayer, register, stack rej 3 3 (no normalization).
- ``drizzle 1x`` / ``drizzle 2x`` (colour sets): `nightstack stack` with ``drizzle`` set (drop 1);
  the 2x stack's FWHM is given in sensor pixels (halved) and its S/N measured with an aperture
  twice as wide.

Per colour (colour sets): each stack's R, G, B planes fitted at the same stars, and each colour's
own PSF fitted on its raw sites alone in the first three frames (no interpolation: a demosaic
lends every plane the other colours' detail, a drizzle keeps each colour's own samples).

Stars: detected on the reference pipeline's stack (nightstack's StarFinder), the brightest third
(unsaturated: peak below half the stack's maximum) for the FWHM, the rest for the S/N. Every other
stack's star positions come through a similarity fit of its own detections onto those.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _common import OUT, log, siril_stack, table

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
SETS = {
    "Seestar S50 M94 (GRBG, 16 x 10 s)": ("seq_seestar_s50_m94", "*.fit"),
    "ASI224MC M27 (RGGB, 6 x 6 s)": ("seq_als_m27_asi224mc", "*.fits"),
    "ASI290MM Arp 186 (mono, alt-az, 24 x 20 s)": ("seq_asi290mm_arp186", "*.fit"),
}
APERTURE_PX = 3.0


def _paths(folder: str, glob: str) -> list[Path]:
    def natural(p: Path) -> tuple[str, int]:
        digits = "".join(c for c in p.stem.split("_")[-1] if c.isdigit())
        return (p.stem.rstrip("0123456789"), int(digits or 0))

    return sorted((REALDATA / folder).glob(glob), key=natural)


def _read(path: Path) -> np.ndarray:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
    return np.moveaxis(data, 0, 2) if data.ndim == 3 else data[:, :, np.newaxis]


def _nightstack(paths: list[Path], out: Path, *extra: str) -> tuple[Path, Path]:
    report = out.with_suffix(".jsonl")
    subprocess.run(
        [sys.executable, "-m", "nightstack.cli", "stack", *map(str, paths), "-o", str(out),
         "--report", str(report), *extra],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out, report


def _reference(paths: list[Path], report: Path) -> np.ndarray:
    """Menon + Lanczos-4 + astropy sigma clip, through the report's transforms."""
    import cv2
    from astropy.stats import sigma_clip
    from colour_demosaicing import demosaicing_CFA_Bayer_Menon2007

    _drop_mocks()
    from nightstack.io.loaders import load_mosaic

    records = {Path(r["file"]).name: r for r in map(json.loads, report.read_text().splitlines())}
    planes, ref_level = [], None
    for path in paths:
        record = records.get(path.name)
        if record is None or record["status"] != "accepted":
            continue
        try:
            mosaic = load_mosaic(path)
            cfa = np.asarray(mosaic.data, np.float64)
            image = demosaicing_CFA_Bayer_Menon2007(cfa, mosaic.pattern).astype(np.float32)
        except Exception:  # a mono frame: no mosaic
            from nightstack.io.loaders import load

            image = load(path).image
        matrix = np.asarray(record["transform"], np.float64)
        rows, cols = image.shape[:2]
        warped = cv2.warpAffine(image, matrix, (cols, rows), flags=cv2.INTER_LANCZOS4,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)  # fmt: skip
        warped = warped.reshape(rows, cols, -1)
        level = np.nanmedian(warped, axis=(0, 1))
        ref_level = level if ref_level is None else ref_level
        planes.append(warped - level + ref_level)
    cube = np.stack(planes)
    return np.asarray(sigma_clip(cube, sigma=3, maxiters=5, axis=0).mean(axis=0).filled(np.nan),
                      np.float32)  # fmt: skip


def _drop_mocks() -> None:
    """colour-science stands mock modules in for a missing matplotlib; photutils then fails
    reading their ``__version__``: take them out of ``sys.modules`` again."""
    from unittest import mock

    for name, module in list(sys.modules.items()):
        if isinstance(module, mock.Mock):
            del sys.modules[name]


def _positions(
    base: np.ndarray, image: np.ndarray, xy: np.ndarray, scale: int = 1
) -> np.ndarray | None:
    """``xy`` of the base stack mapped into ``image`` (``scale`` x finer, for a drizzle) by a
    similarity fit of their stars."""
    from nightstack.registration.align import align
    from nightstack.registration.detect import StarFinder

    finder = StarFinder(landscape_mask_ratio=1.0, fwhm_px=4.0 * scale)
    try:
        found = align(StarFinder(landscape_mask_ratio=1.0)(np.nan_to_num(base), 1),
                      finder(np.nan_to_num(image), 1), max_scale_change=scale)  # fmt: skip
    except Exception:
        return None
    m = found.matrix
    return xy @ m[:, :2].T + m[:, 2]


def _measure_set(name: str, folder: str, glob: str) -> dict[str, Any]:
    from nightstack.products.photometry import (
        aperture_photometry,
        colour_noise,
        fit_fwhm,
        star_free_mask,
    )
    from nightstack.registration.detect import StarFinder

    paths = _paths(folder, glob)
    if not paths:
        return {"skipped": f"{REALDATA / folder} not present"}
    work = OUT / "quality" / folder
    work.mkdir(parents=True, exist_ok=True)
    log(f"quality: {name}: nightstack (defaults, former)")
    stacks: dict[str, np.ndarray] = {}
    counts: dict[str, str] = {}
    reports = {}
    former = work / "former.toml"
    former.write_text("max_elongation = 1.6\nmax_trail_ratio = 100.0\n")
    runs: list[tuple[str, tuple[str, ...]]] = [
        ("nightstack", ()),
        ("former", ("--demosaic", "bilinear", "--interpolation", "bilinear",
                    "--config", str(former))),
    ]  # fmt: skip
    if "mono" not in name:
        runs.append(("mhc", ("--demosaic", "mhc")))
        for drizzle in ("1x", "2x"):
            config = work / f"drizzle_{drizzle}.toml"
            config.write_text(f'drizzle = "{drizzle}"\n')
            runs.append((f"drizzle {drizzle}", ("--config", str(config))))
    for label, extra in runs:
        out, report = _nightstack(paths, work / f"{label.replace(' ', '_')}.fits", *extra)
        stacks[label], reports[label] = _read(out), report
        lines = [json.loads(x) for x in report.read_text().splitlines()]
        counts[label] = f"{sum(r['status'] == 'accepted' for r in lines)}/{len(lines)}"
    log(f"quality: {name}: reference pipeline")
    stacks["reference"] = _reference(paths, reports["nightstack"])
    counts["reference"] = counts["nightstack"]
    log(f"quality: {name}: Siril")
    siril = siril_stack(paths, work / "siril", timeout_s=1800)
    if not isinstance(siril, str) and siril.result is not None:
        stacks["siril"] = _read(siril.result)
        counts["siril"] = f"{len(paths)} (its own)"
    base = stacks["reference"].mean(axis=2)
    stars = StarFinder(landscape_mask_ratio=1.0)(np.nan_to_num(base), 1)
    xy = np.asarray(stars.xy)
    top = float(np.nanmax(base))
    peaks = np.array([base[round(y), round(x)] for x, y in xy])
    bright = xy[: len(xy) // 3][peaks[: len(xy) // 3] < 0.5 * top]
    faint = xy[len(xy) // 3 :]
    results: dict[str, Any] = {"stars": [len(bright), len(faint)], "methods": {}}
    # the same star-free positions for every stack (each stack's own mask would draw another
    # sample: the estimate moved 10 % between two near-identical images that way)
    free = star_free_mask(base, math.ceil(APERTURE_PX + 8))
    ref_snr = None
    labels = ("reference", "nightstack", "mhc", "former", "siril", "drizzle 1x", "drizzle 2x")
    for label in labels:
        if label not in stacks:
            continue
        image = stacks[label]
        scale = image.shape[0] // base.shape[0]
        lum = np.nan_to_num(image.mean(axis=2))
        if label == "reference":
            at_b, at_f = bright, faint
        else:
            mapped = _positions(base, lum, np.vstack([bright, faint]), scale)
            if mapped is None:
                results["methods"][label] = {"failed": "its stars do not match the reference's"}
                continue
            at_b, at_f = mapped[: len(bright)], mapped[len(bright) :]
        fwhm = fit_fwhm(lum, at_b, half=7 * scale) / scale
        per_colour = None
        if image.shape[2] == 3 and "mono" not in name:
            per_colour = [float(np.nanmedian(fit_fwhm(np.nan_to_num(image[..., c]), at_b,
                                                      half=7 * scale) / scale))
                          for c in range(3)]  # fmt: skip
        grown = np.repeat(np.repeat(free, scale, 0), scale, 1)
        snr = aperture_photometry(lum, at_f, APERTURE_PX * scale, free=grown).snr
        if ref_snr is None:
            ref_snr = snr
        ratio = snr / ref_snr
        ok = np.isfinite(ratio) & (ref_snr > 3)
        results["methods"][label] = {
            "frames": counts[label],
            "fwhm_px": float(np.nanmedian(fwhm)),
            "fwhm_stars": int(np.isfinite(fwhm).sum()),
            "snr_median": float(np.nanmedian(snr[ok])) if ok.any() else math.nan,
            "snr_vs_reference": float(np.median(ratio[ok])) if ok.any() else math.nan,
            "fwhm_rgb": per_colour,
            "colour_noise": (
                colour_noise(image, APERTURE_PX * scale, free=grown)
                if image.shape[2] == 3 and "mono" not in name
                else None
            ),
        }
    if "mono" not in name:
        results["raw_sites_fwhm"] = _raw_site_fwhm(paths[:3])
    return results


def _raw_site_fwhm(paths: list[Path]) -> list[float]:
    """Each colour's own star FWHM (px): a fit on that colour's sites of the raw mosaic alone
    (nothing interpolated, nothing lent by the other colours), median over the stars of
    ``paths`` (unsaturated ones, found on the frame's own MHC luminance)."""
    from nightstack.io.demosaic import mhc
    from nightstack.io.loaders import load_mosaic
    from nightstack.products.photometry import fit_fwhm
    from nightstack.registration.detect import StarFinder

    found: list[list[float]] = [[], [], []]
    for path in paths:
        mosaic = load_mosaic(path)
        cfa = np.asarray(mosaic.data, np.float32)
        lum = mhc(cfa, mosaic.pattern).mean(axis=2)
        xy = np.asarray(StarFinder(landscape_mask_ratio=1.0)(lum, 1).xy)
        peaks = np.array([lum[round(y), round(x)] for x, y in xy])
        xy = xy[peaks < 0.5 * float(lum.max())][:60]
        for c, colour in enumerate("RGB"):
            sites = np.zeros(cfa.shape, bool)
            for i, site in enumerate(mosaic.pattern):
                sites[i // 2 :: 2, i % 2 :: 2] |= site == colour
            found[c].extend(fit_fwhm(cfa, xy, sites=sites))
    return [float(np.nanmedian(values)) for values in found]


def measure(quick: bool) -> dict[str, Any]:
    sets = dict(list(SETS.items())[:2]) if quick else SETS
    return {name: _measure_set(name, *where) for name, where in sets.items()}


def report(data: dict[str, Any]) -> str:
    parts = []
    for name, result in _sets(data):
        if "skipped" in result:
            parts.append(f"**{name}**: skipped ({result['skipped']})\n")
            continue
        rows = []
        ref_fwhm = result["methods"]["reference"]["fwhm_px"]
        for label, m in result["methods"].items():
            if "failed" in m:
                rows.append([label, "-", m["failed"], "", "", ""])
                continue
            mono = result["methods"]["reference"]["colour_noise"] is None
            colour = "-" if mono or m["colour_noise"] is None else f"{m['colour_noise']:.2f}"
            rows.append([
                label, m["frames"], f"{m['fwhm_px']:.2f} ({m['fwhm_px'] / ref_fwhm:.2f}x)",
                f"{m['snr_median']:.1f}", f"{m['snr_vs_reference']:.2f}", colour,
            ])  # fmt: skip
        bright, faint = result["stars"]
        parts.append(
            f"**{name}** ({bright} stars for the FWHM, {faint} for the S/N)\n\n"
            + table(["stack", "frames", "star FWHM px (vs reference)", "faint-star S/N",
                     "S/N vs reference (median per star)", "colour noise / luminance"], rows)
        )  # fmt: skip
        raw = result.get("raw_sites_fwhm")
        if raw:
            colours = [["raw sites (3 frames, each colour alone)", *(f"{v:.2f}" for v in raw)]]
            colours += [[label, *(f"{v:.2f}" for v in m["fwhm_rgb"])]
                        for label, m in result["methods"].items() if m.get("fwhm_rgb")]  # fmt: skip
            parts.append(f"Star FWHM per colour, px ({name.split(' (')[0]})\n\n"
                         + table(["measured on", "red", "green", "blue"], colours))  # fmt: skip
    return "\n\n".join(parts) + (
        "\nSiril's `convert -debayer` also debayers the mono ASI290MM frames (its FWHM and S/N "
        "are of that image's luminance). Pixel-to-pixel noise is not reported: it rewards blur.\n"
    )


def _sets(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, v) for k, v in data.items() if not k.startswith("_")]


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 19's numbers: (goal, measured, met) per set."""
    out = []
    for name, result in _sets(data):
        methods = result.get("methods", {})
        ours, ref, siril = methods.get("nightstack"), methods.get("reference"), methods.get("siril")
        if not ours or not ref or "failed" in ours:
            continue
        short = name.split(" (")[0]
        mono = ref["colour_noise"] is None
        ratio = ours["fwhm_px"] / ref["fwhm_px"]
        limit = 1.02 if mono else 1.03
        out.append((f"{short}: stack FWHM <= {limit}x the reference's", f"{ratio:.3f}x",
                    ratio <= limit))  # fmt: skip
        snr = ours["snr_vs_reference"]
        out.append((f"{short}: faint-star S/N >= 0.97x the reference's", f"{snr:.2f}x",
                    snr >= 0.97))  # fmt: skip
        if not mono and siril and "failed" not in siril:
            mine, theirs = ours["fwhm_px"], siril["fwhm_px"]
            out.append((f"{short}: FWHM below Siril's", f"{mine:.2f} vs {theirs:.2f} px",
                        mine < theirs))  # fmt: skip
            out.append((f"{short}: colour noise at aperture scale <= Siril's",
                        f"{ours['colour_noise']:.2f} vs {siril['colour_noise']:.2f}",
                        ours["colour_noise"] <= siril["colour_noise"]))  # fmt: skip
        drizzled = methods.get("drizzle 1x")
        if drizzled and "failed" not in drizzled:
            ratio = drizzled["snr_vs_reference"] / ours["snr_vs_reference"]
            out.append((f"{short}: drizzle 1x FWHM below the default's at S/N >= 0.9x",
                        f"{drizzled['fwhm_px']:.2f} vs {ours['fwhm_px']:.2f} px, S/N {ratio:.2f}x",
                        drizzled["fwhm_px"] < ours["fwhm_px"] and ratio >= 0.9))  # fmt: skip
        if short.startswith("Seestar"):
            frames = ours["frames"]
            done, total = (int(v) for v in frames.split("/"))
            out.append(("Seestar: every frame accepted", frames, done == total))
    return out
