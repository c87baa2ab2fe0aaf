"""The simulated camera's sensor: what calibration frames exist to remove, with its truth.

A ``SensorModel`` adds to a ``SkyModel`` night what a real DSLR or astro camera adds to every
light, all fixed in sensor coordinates and seeded:

- **dark current**: ``dark_e_per_s`` electrons per second per pixel at ``reference_c``, doubling
  every ``doubling_c`` degrees (silicon's rule of thumb);
- **amp glow**: a readout amplifier's glow in one corner, ``glow_e_per_s`` at the corner pixel,
  falling off as ``exp(-d / glow_scale_px)`` with the distance d from it (temperature-scaled too);
- **hot pixels**: ``hot_pixels`` sites with their own dark current, ``hot_e_per_s`` (uniform in a
  range), temperature-scaled, so their excess grows with exposure (unlike the sky model's
  constant ``hot_pixels``, which stay as stuck offsets);
- **pixel response non-uniformity** (PRNU): a per-pixel gain, 1 + N(0, ``prnu``);
- **vignetting**: the lens passes ``1 - vignetting * (r / r_corner)**2`` of the light (r from the
  centre, so the corners get ``1 - vignetting``);
- **dust shadows**: out-of-focus dust on the sensor window, each a soft disc multiplying the light
  by ``1 - depth`` inside a radius of ``dust_radius`` (a range, fractions of the frame's
  shorter side), with a soft edge a quarter of the radius wide;
- **bias structure**: a fixed column pattern (``bias_columns_adu`` rms) on top of the black level.

The light a pixel records is ``sky electrons * response + dark rate * exposure``, then shot and
read noise, the gain, the black level plus the bias structure, clipping at white (see
``nightstack.simulate.render.digitize``). ``response`` (PRNU x vignetting x dust) is exactly what a
master flat measures, the dark rate what a master dark measures.

``write_calibration`` writes the bias, dark, flat and dark-flat sets beside a night's lights,
and their truth.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from nightstack.arrays import FloatArray, IntArray, UInt16Array
from nightstack.simulate.dng import write_dng
from nightstack.simulate.render import digitize
from nightstack.simulate.sky import SkyModel

_STREAM_SENSOR = 20  # the sensor's random streams (the sky uses 1..11)
_STREAM_HOT, _STREAM_PRNU, _STREAM_DUST, _STREAM_BIAS, _STREAM_FRAMES = 1, 2, 3, 4, 5
_KIND_STREAM = {"bias": 0, "dark": 1, "flat": 2, "darkflat": 3}  # each kind's noise stream
_CORNERS = {"top-left": (0, 0), "top-right": (1, 0), "bottom-left": (0, 1), "bottom-right": (1, 1)}
_DUST_EDGE = 0.25  # a dust shadow's soft edge, as a fraction of its radius
_FLAT_EXPOSURE_S = 1.0  # a flat panel exposure: short, so its dark-flat is mostly bias
_BIAS_EXPOSURE_S = 1 / 4000  # the shortest shutter speed


@dataclass(frozen=True)
class SensorModel:
    """A seeded sensor (see the module docstring); every field is in its truth.

    ``temperature_c`` is the lights' sensor temperature: one value, or one a frame
    (``temperatures``). The size and CFA pattern are the night's (``SkyModel``).
    """

    seed: int = 1
    temperature_c: float = 20.0
    temperatures: tuple[float, ...] = ()
    reference_c: float = 20.0
    doubling_c: float = 6.0
    dark_e_per_s: float = 0.05
    glow_e_per_s: float = 1.5
    glow_corner: str = "top-right"
    glow_scale_px: float = 60.0
    hot_pixels: int = 60
    hot_e_per_s: tuple[float, float] = (10.0, 60.0)
    prnu: float = 0.01
    vignetting: float = 0.3
    dust: int = 4
    dust_radius: tuple[float, float] = (0.02, 0.05)
    dust_depth: tuple[float, float] = (0.05, 0.15)
    bias_columns_adu: float = 1.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        object.__setattr__(self, "hot_e_per_s", tuple(float(v) for v in self.hot_e_per_s))
        object.__setattr__(self, "dust_radius", tuple(float(v) for v in self.dust_radius))
        object.__setattr__(self, "dust_depth", tuple(float(v) for v in self.dust_depth))
        if self.glow_corner not in _CORNERS:
            raise ValueError(f"glow_corner must be one of {', '.join(_CORNERS)}")
        if not 0 <= self.vignetting < 1 or self.prnu < 0 or self.doubling_c <= 0:
            raise ValueError("need 0 <= vignetting < 1, prnu >= 0, doubling_c > 0")

    def frame_temperature(self, i: int) -> float:
        """Sensor temperature of light ``i``, Celsius."""
        return self.temperatures[i] if self.temperatures else self.temperature_c

    def thermal_factor(self, temperature_c: float) -> float:
        """Dark current at ``temperature_c`` relative to ``reference_c``."""
        return float(2.0 ** ((temperature_c - self.reference_c) / self.doubling_c))

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAM_SENSOR, *key])

    # ---- fixed patterns (need the frame size: a SkyModel) -------------------------------------

    def hot(self, model: SkyModel) -> tuple[IntArray, IntArray, FloatArray]:
        """The hot pixels: x, y (int) and their dark current at ``reference_c``, e/s."""
        rng = self._rng(_STREAM_HOT)
        flat = rng.choice(model.width * model.height, size=self.hot_pixels, replace=False)
        rate = rng.uniform(*self.hot_e_per_s, size=self.hot_pixels)
        return (flat % model.width).astype(np.intp), (flat // model.width).astype(np.intp), rate

    def dust_spots(self, model: SkyModel) -> list[dict[str, float]]:
        """Dust shadows: centre x, y (frame pixels), radius_px, depth."""
        rng = self._rng(_STREAM_DUST)
        spots = []
        for _ in range(self.dust):
            radius = rng.uniform(*self.dust_radius) * min(model.width, model.height)
            spots.append(
                {
                    "x": float(rng.uniform(2 * radius, model.width - 2 * radius)),
                    "y": float(rng.uniform(2 * radius, model.height * 0.8 - 2 * radius)),
                    "radius_px": float(radius),
                    "depth": float(rng.uniform(*self.dust_depth)),
                }
            )
        return spots

    def response(self, model: SkyModel) -> FloatArray:
        """(height, width) float32: the fraction of the light each pixel records (PRNU x
        vignetting x dust), the truth a master flat measures (up to its per-colour level).
        Read-only (cached)."""
        return _response(self, model)

    def _response(self, model: SkyModel) -> FloatArray:
        h, w = model.height, model.width
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        r2 = ((x - cx) ** 2 + (y - cy) ** 2) / np.float32(cx**2 + cy**2)
        out = 1 - np.float32(self.vignetting) * r2
        for spot in self.dust_spots(model):
            d = np.hypot(x - spot["x"], y - spot["y"])
            edge = _DUST_EDGE * spot["radius_px"]
            inside = 0.5 * (1 - np.tanh((d - spot["radius_px"]) / edge))
            out *= 1 - np.float32(spot["depth"]) * inside.astype(np.float32)
        out *= 1 + self._rng(_STREAM_PRNU).normal(0, self.prnu, (h, w)).astype(np.float32)
        out = out.astype(np.float32)
        out.flags.writeable = False
        return out

    def dark_rate(self, model: SkyModel, temperature_c: float) -> FloatArray:
        """(height, width) float32 dark electrons per second at ``temperature_c``: dark current,
        amp glow and hot pixels (not the sky model's stuck hot pixels, which are ADU)."""
        return _dark_rate(self, model) * np.float32(self.thermal_factor(temperature_c))

    def _dark_rate(self, model: SkyModel) -> FloatArray:
        h, w = model.height, model.width
        cx, cy = _CORNERS[self.glow_corner]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        d = np.hypot(x - cx * (w - 1), y - cy * (h - 1))
        rate = np.float32(self.glow_e_per_s) * np.exp(-d / np.float32(self.glow_scale_px))
        rate += np.float32(self.dark_e_per_s)
        hx, hy, hot = self.hot(model)
        rate[hy, hx] += hot.astype(np.float32)
        rate.flags.writeable = False
        return rate

    def bias_adu(self, model: SkyModel) -> FloatArray:
        """(height, width) float32 ADU above the black level: the fixed column pattern."""
        columns = self._rng(_STREAM_BIAS).normal(0, self.bias_columns_adu, model.width)
        return np.broadcast_to(columns.astype(np.float32), (model.height, model.width))

    # ---- frames ---------------------------------------------------------------------------

    def light(self, model: SkyModel, i: int, expected_e: FloatArray) -> FloatArray:
        """Light ``i``'s expected electrons through the sensor: sky x response + dark."""
        out = expected_e * self.response(model)
        out += self.dark_rate(model, self.frame_temperature(i)) * np.float32(model.exposure_s)
        return out

    def calibration_frame(
        self,
        model: SkyModel,
        kind: str,
        index: int,
        *,
        exposure_s: float,
        temperature_c: float,
        flat_e: float = 6000.0,
    ) -> UInt16Array:
        """One raw calibration frame: ``kind`` bias, dark, flat (an even panel of ``flat_e``
        electrons per pixel through the response) or darkflat; ``index`` seeds its noise."""
        expected = self.dark_rate(model, temperature_c) * np.float32(exposure_s)
        if kind == "flat":
            expected += np.float32(flat_e) * self.response(model)
        rng = self._rng(_STREAM_FRAMES, _KIND_STREAM[kind], index)
        raw = digitize(model, expected, rng, offset_adu=self.bias_adu(model))
        x, y = model.hot_pixel_xy.T  # the sky model's stuck pixels are in every frame
        raw[y, x] = np.minimum(raw[y, x].astype(np.int64) + model.hot_pixel_adu, model.white_level)
        return raw

    def truth(self, model: SkyModel) -> dict[str, Any]:
        """The sensor, JSON-ready: parameters, glow corner pixel, hot pixels, dust spots."""
        hx, hy, rate = self.hot(model)
        cx, cy = _CORNERS[self.glow_corner]
        return {
            "parameters": {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
            },
            "glow_corner_xy": [cx * (model.width - 1), cy * (model.height - 1)],
            "hot_pixels": {"x": hx.tolist(), "y": hy.tolist(), "e_per_s": rate.round(4).tolist()},
            "dust": self.dust_spots(model),
            "vignetting_corner": 1 - self.vignetting,
        }


@lru_cache(maxsize=2)
def _response(sensor: SensorModel, model: SkyModel) -> FloatArray:
    return sensor._response(model)


@lru_cache(maxsize=2)
def _dark_rate(sensor: SensorModel, model: SkyModel) -> FloatArray:
    """At ``reference_c``."""
    return sensor._dark_rate(model)


def write_calibration(
    outdir: str | os.PathLike[str],
    model: SkyModel,
    sensor: SensorModel,
    *,
    frames: int = 20,
    dark_exposures: Sequence[float] | None = None,
    dark_temperatures: Sequence[float] | None = None,
    flat_e: float = 6000.0,
) -> dict[str, Any]:
    """Write bias, dark, flat and dark-flat sets as DNGs in ``outdir``'s ``bias/``, ``darks/``
    (``darks_<exposure>s_<temperature>C/`` when several), ``flats/``, ``darkflats/``; returns
    their truth (folder -> kind, exposure, temperature, files).

    Darks are taken at the lights' exposure and temperature unless ``dark_exposures`` /
    ``dark_temperatures`` say which (every combination is written); flats and dark-flats at
    ``_FLAT_EXPOSURE_S``, bias at ``_BIAS_EXPOSURE_S``, all at the lights' ISO.
    """
    out = Path(outdir)
    exposures = list(dark_exposures or [model.exposure_s])
    temperatures = list(dark_temperatures or [sensor.temperature_c])
    sets: list[tuple[str, str, float, float]] = [
        ("bias", "bias", _BIAS_EXPOSURE_S, sensor.temperature_c),
        ("flat", "flats", _FLAT_EXPOSURE_S, sensor.temperature_c),
        ("darkflat", "darkflats", _FLAT_EXPOSURE_S, sensor.temperature_c),
    ]
    several = len(exposures) * len(temperatures) > 1
    for t in exposures:
        for c in temperatures:
            name = f"darks_{t:g}s_{c:g}C" if several else "darks"
            sets.append(("dark", name, t, c))
    truth: dict[str, Any] = {}
    for n_set, (kind, folder, exposure, temperature) in enumerate(sets):
        (out / folder).mkdir(parents=True, exist_ok=True)
        files = []
        for k in range(frames):
            raw = sensor.calibration_frame(
                model,
                kind,
                n_set * 1000 + k,
                exposure_s=exposure,
                temperature_c=temperature,
                flat_e=flat_e,
            )
            path = out / folder / f"{kind.upper()}_{k:04d}.DNG"
            write_dng(
                path,
                raw,
                black_level=model.black_level,
                white_level=model.white_level,
                exposure_s=exposure,
                iso=model.iso,
                cfa_pattern=model.cfa_pattern,
                temperature_c=temperature,
            )
            files.append(path.name)
        truth[folder] = {
            "kind": kind,
            "exposure_s": exposure,
            "temperature_c": temperature,
            "files": files,
        }
    return truth


def expected_dark_adu(
    model: SkyModel, sensor: SensorModel, exposure_s: float, temperature_c: float
) -> FloatArray:
    """(height, width) float32: a dark's noise-free excess over the black level in ADU (dark
    current, glow, hot pixels and bias structure; the sky model's stuck pixels not included)."""
    return sensor.dark_rate(model, temperature_c) * np.float32(
        exposure_s / model.gain_e_per_adu
    ) + sensor.bias_adu(model)
