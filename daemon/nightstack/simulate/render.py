"""Rendering: a ``SkyModel`` frame to electrons on the sensor's CFA sites, then to raw ADU.

Pure in (model, frame index): the sky model (``nightstack.simulate.sky``) says what is where
and how bright; this module puts it on pixels: the sky background through the CFA colours, the
nebula, the stars as pixel-integrated Gaussian stamps (smeared along a wind trail), the
satellite trail, the landscape hiding the sky, then shot and read noise, the gain, the black
level, 14-bit clipping and the hot pixels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy.special import erf

from nightstack.arrays import FloatArray, IntArray, UInt16Array

if TYPE_CHECKING:
    from nightstack.simulate.sensor import SensorModel
    from nightstack.simulate.sky import SkyModel

_STAMP_BATCH = 1024  # stars per vectorised stamp batch (bounds temporary memory)
_TRAIL_STEP_PX = 0.5  # trailed stars are summed from PSFs this far apart: a smooth line
_NEBULA_RADIUS_SIGMA = 3.5  # nebula drawn within this many major-axis sigmas
_WINDOW_E = 6000.0  # electrons per pixel of a lit window (bright, below saturation)
_WINDOW_RGB = (1.3, 1.0, 0.5)  # warm tungsten light
_BAND_ROWS = 256  # rows of noise (or nebula) computed at a time (bounds temporary memory)
PSF_RADIUS_SIGMA = 6.0  # star stamp half-size, sigmas: the Gaussian beyond holds < 1e-8 of the flux
SKY_RGB = (1.1, 1.0, 0.8)  # light-polluted sky: a little warm (sky colour weights r, g, b)


def expected_electrons(model: SkyModel, i: int) -> FloatArray:
    """Noise-free expected signal of frame ``i``: (height, width) float32 electrons per CFA
    site (``model.cfa_pattern``), hot pixels not included."""
    defects = model.defects(i)
    image = model.sky_background(i)
    _mosaic_inplace(image, SKY_RGB, model.cfa)
    factor = model.star_factor(i)
    if model.nebula_shape is not None:
        _add_nebula(model, image, i, factor)
    _add_stars(model, image, i, factor, defects.get("trailed"))
    if "satellite" in defects:
        _add_satellite(image, defects["satellite"], factor)
    _add_ground(model, image, i)
    return image


def raw_frame(
    model: SkyModel, i: int, *, noise: bool = True, sensor: SensorModel | None = None
) -> UInt16Array:
    """Raw CFA of frame ``i``: (height, width) uint16 ADU laid out as ``model.cfa_pattern``,
    black level included, clipped at the white level; hot pixels added. ``noise=False`` gives
    the rounded expectation (no shot or read noise). ``sensor``: the light passes through its
    response and gains its dark current, glow and bias structure
    (``nightstack.simulate.sensor``)."""
    expected = expected_electrons(model, i)
    offset = None
    if sensor is not None:
        expected = sensor.light(model, i, expected)
        offset = sensor.bias_adu(model)
    raw = digitize(model, expected, model.noise_rng(i), noise=noise, offset_adu=offset)
    x, y = model.hot_pixel_xy.T
    raw[y, x] = np.minimum(raw[y, x].astype(np.int64) + model.hot_pixel_adu, model.white_level)
    return raw


def digitize(
    model: SkyModel,
    expected: FloatArray,
    rng: np.random.Generator,
    *,
    noise: bool = True,
    offset_adu: FloatArray | None = None,
) -> UInt16Array:
    """Expected electrons (height, width) to raw ADU: Poisson shot noise and Gaussian read
    noise (``noise``), the gain, the black level (+ ``offset_adu``), rounding, clipping."""
    raw = np.empty(expected.shape, dtype=np.uint16)
    for r0 in range(0, model.height, _BAND_ROWS):
        block = expected[r0 : r0 + _BAND_ROWS]
        if noise:
            signal = rng.poisson(block).astype(np.float32)
            signal += rng.normal(0.0, model.read_noise_e, block.shape).astype(np.float32)
        else:
            signal = block
        adu = signal / np.float32(model.gain_e_per_adu) + np.float32(model.black_level)
        if offset_adu is not None:
            adu += offset_adu[r0 : r0 + _BAND_ROWS]
        raw[r0 : r0 + _BAND_ROWS] = np.clip(np.rint(adu), 0, model.white_level)
    return raw


# ---- the CFA ---------------------------------------------------------------------------------


def _channel_weights(
    rows: npt.ArrayLike, cols: npt.ArrayLike, rgb: FloatArray, cfa: IntArray
) -> FloatArray:
    """Colour weight of each CFA site: ``rgb[..., channel(row, col)]`` broadcast over the rows
    and cols index arrays; ``rgb`` has shape (..., 3), ``cfa`` is ``cfa_channels(pattern)``."""
    channel = cfa[np.asarray(rows) % 2, np.asarray(cols) % 2]
    return np.take_along_axis(rgb, channel, axis=-1) if rgb.ndim > 1 else rgb[channel]


def _mosaic_inplace(image: FloatArray, rgb: tuple[float, float, float], cfa: IntArray) -> None:
    """Multiply an even-sized, even-origin (rows, cols) block by the colour weights of its CFA
    sites (``cfa`` is ``cfa_channels(pattern)``)."""
    rows, cols = image.shape
    tile = np.asarray(rgb, dtype=image.dtype)[cfa]
    image.reshape(rows // 2, 2, cols // 2, 2)[...] *= tile[None, :, None, :]


# ---- what the sky holds ----------------------------------------------------------------------


def _pixel_profile(edges: FloatArray, centre: FloatArray, sigma: float) -> FloatArray:
    """Gaussian integrated over pixels: ``edges`` (..., S + 1) pixel edges, ``centre``
    broadcastable to (..., 1); returns (..., S) fractions of a unit flux."""
    cdf = erf((edges - centre) / (math.sqrt(2.0) * sigma))
    return 0.5 * np.diff(cdf, axis=-1)


def _add_nebula(model: SkyModel, image: FloatArray, i: int, factor: float) -> None:
    """Add the nebula (a Gaussian fixed to the stars) to frame ``i``'s CFA electrons."""
    neb = model.nebula_shape
    assert neb is not None
    centre = np.asarray(neb["centre"], dtype=np.float64)
    sx, sy = neb["sigma_px"]
    theta = math.radians(neb["angle_deg"])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inv_cov = rot @ np.diag([1 / sx**2, 1 / sy**2]) @ rot.T  # reference coordinates
    cx, cy = model.to_frame(i, centre)[0]
    r = _NEBULA_RADIUS_SIGMA * max(sx, sy)
    x0, x1 = max(0, int(cx - r) & ~1), min(model.width, (int(cx + r) + 2) & ~1)
    y0, y1 = max(0, int(cy - r) & ~1), min(model.height, (int(cy + r) + 2) & ~1)
    if x1 <= x0 or y1 <= y0:
        return
    m = model.transform(i).astype(np.float32)
    k = inv_cov.astype(np.float32)
    px = np.arange(x0, x1, dtype=np.float32)
    peak = np.float32(neb["peak_e"] * factor)
    for r0 in range(y0, y1, _BAND_ROWS):  # row bands bound the temporaries
        py = np.arange(r0, min(r0 + _BAND_ROWS, y1), dtype=np.float32)
        qx = (m[0, 0] * px)[None, :] + (m[0, 1] * py + m[0, 2] - centre[0])[:, None]
        qy = (m[1, 0] * px)[None, :] + (m[1, 1] * py + m[1, 2] - centre[1])[:, None]
        q = k[0, 0] * qx * qx
        q += 2 * k[0, 1] * qx * qy
        q += k[1, 1] * qy * qy
        glow = np.exp(np.float32(-0.5) * q)
        glow *= peak
        _mosaic_inplace(glow, tuple(neb["rgb"]), model.cfa)
        image[r0 : r0 + len(py), x0:x1] += glow


def _add_stars(
    model: SkyModel, image: FloatArray, i: int, factor: float, trail: dict[str, Any] | None
) -> None:
    """Add every star of frame ``i`` on local stamps, pixel-integrated Gaussian PSF."""
    h, w = model.height, model.width
    sigma = model.psf_sigma(i)
    half = trail["length_px"] / 2.0 if trail else 0.0
    radius = math.ceil(PSF_RADIUS_SIGMA * sigma + half)
    size = 2 * radius + 1
    if trail:
        steps = max(2, math.ceil(2 * half / _TRAIL_STEP_PX) + 1)
        along = np.linspace(-half, half, steps)
        phi = math.radians(trail["angle_deg"])
        offsets = np.stack([along * math.cos(phi), along * math.sin(phi)], axis=1)
    else:
        offsets = np.zeros((1, 2))
    xy = model.to_frame(i, model.star_xy)
    reach = radius + 1
    on = (xy[:, 0] > -reach) & (xy[:, 0] < w - 1 + reach)
    on &= (xy[:, 1] > -reach) & (xy[:, 1] < h - 1 + reach)
    index = np.flatnonzero(on)
    flat_image = image.reshape(-1)  # a view: sky_background() makes ``image`` C-contiguous
    for b0 in range(0, len(index), _STAMP_BATCH):
        sel = index[b0 : b0 + _STAMP_BATCH]
        pos = xy[sel]
        origin = np.rint(pos).astype(np.intp) - radius  # (n, 2) stamp corner (x, y)
        edge = np.arange(size + 1) - 0.5  # pixel edges relative to the stamp corner
        sub = pos[:, None, :] + offsets[None, :, :]  # (n, k, 2) PSF centres
        ex = _pixel_profile(origin[:, None, 0:1] + edge, sub[:, :, 0:1], sigma)  # (n,k,S)
        ey = _pixel_profile(origin[:, None, 1:2] + edge, sub[:, :, 1:2], sigma)
        stamp = np.einsum("nki,nkj->nij", ey, ex) / len(offsets)  # (n, S rows, S cols)
        cols = origin[:, 0:1] + np.arange(size)  # (n, S)
        rows = origin[:, 1:2] + np.arange(size)
        weight = _channel_weights(
            rows[:, :, None], cols[:, None, :], model.star_rgb[sel][:, None, :], model.cfa
        )
        stamp *= weight * (model.star_flux_e[sel] * factor)[:, None, None]
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        flat = rows[:, :, None] * w + cols[:, None, :]
        np.add.at(flat_image, flat[valid], stamp[valid].astype(np.float32))


def _add_satellite(image: FloatArray, sat: dict[str, Any], factor: float) -> None:
    """A straight trail with a Gaussian cross-section, sampled at pixel centres; ``sat`` is
    the frame's ``satellite`` defect."""
    h, w = image.shape
    px, py = sat["point"]
    angle = math.radians(sat["angle_deg"])
    c, s = math.cos(angle), math.sin(angle)
    sigma = sat["sigma_px"]
    norm = sat["linear_e"] * factor / (math.sqrt(2 * math.pi) * sigma)
    horizontal = abs(c) >= abs(s)
    reach = math.ceil(5 * sigma / max(abs(c), abs(s))) + 1
    span = np.arange(-reach, reach + 1)
    if horizontal:
        xs = np.arange(w)
        centre = py + (xs - px) * s / c
        ys = np.floor(centre).astype(np.intp)[:, None] + span  # (w, 2 reach + 1)
        xs2 = np.broadcast_to(xs[:, None], ys.shape)
    else:
        ys0 = np.arange(h)
        centre = px + (ys0 - py) * c / s
        xs2 = np.floor(centre).astype(np.intp)[:, None] + span
        ys = np.broadcast_to(ys0[:, None], xs2.shape)
    distance = (ys - py) * c - (xs2 - px) * s  # signed distance from the line
    value = norm * np.exp(-0.5 * (distance / sigma) ** 2)
    ok = (xs2 >= 0) & (xs2 < w) & (ys >= 0) & (ys < h)
    # a sunlit satellite is neutral: every CFA site gets the same electrons
    np.add.at(image.reshape(-1), ys[ok] * w + xs2[ok], value[ok].astype(np.float32))


def _add_ground(model: SkyModel, image: FloatArray, i: int) -> None:
    """Hide the sky behind the landscape; add its faint glow and the lit windows."""
    land = model.landscape
    if land.top_row >= model.height:
        return
    band = image[land.top_row :]
    if land.brightness is None:
        ground = np.full(band.shape, model.ground_glow_e(i), dtype=np.float32)
    else:  # the scenery: lit by the sky, in proportion to its level
        ground = land.brightness * np.float32(model.sky_e * model.sky_level(i))
    band *= land.sky_cover
    band += (1 - land.sky_cover) * ground
    rgb = np.array(_WINDOW_RGB)
    for x0, y0, x1, y1 in land.windows:
        ys, xs = np.mgrid[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = _WINDOW_E * _channel_weights(ys, xs, rgb, model.cfa)
