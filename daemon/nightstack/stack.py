"""The stack engine: a disk-backed store of aligned frames, a live accumulator, the final combine.

All images are (rows, cols, C) on the reference grid, float32 linear, C = 1 or 3. A frame's
footprint (:mod:`nightstack.warp`) says which reference pixels it covers; outside it the frame is
*absent* from a pixel's sample (not zero). Output pixels that no frame covers are NaN.

- :class:`FrameStore` keeps every aligned frame on disk (uint16, 2 bytes per sample: 144 MB per
  24 MP RGB frame) so that the final combine can read them back band by band.
- :class:`LiveStack` is the O(pixels)-per-frame running stack with k-sigma rejection: a few
  image-sized arrays whatever the number of frames.
- :func:`combine` is the exact batch result (astropy ``sigma_clip`` + mean, or mean, median,
  winsorized clip) computed in row bands under a RAM cap.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from astropy.stats import sigma_clip

from nightstack.warp import Interpolation, footprint, warp_rows
from nightstack.writers import atomic_path, write_json

FloatArray = npt.NDArray[np.floating]
BoolArray = npt.NDArray[np.bool_]
Method = Literal["sigma_clip", "mean", "median", "winsorized"]

QUANT_MAX = 65535
"""Stored sample = round(clip(value, 0, 1) * 65535): a step of 1.5e-5, 4x finer than a 14-bit
camera's ADU (1/16383), so quantisation (<= 7.6e-6) stays well below the camera's own."""

_DEQUANT = np.float32(1.0 / QUANT_MAX)
"""Reading back: value = float32(raw) * float32(1/65535), computed in float32 everywhere."""

_STORE_FORMAT = "nightstack-framestore"
_STORE_VERSION = 1
_WRITE_BAND_SAMPLES = 1 << 20
"""Samples quantised at a time when storing a frame: 4 MB float32 temporaries."""

_ADD_BAND_SAMPLES = 1 << 18
"""Samples per band in LiveStack.add: the five scratch buffers (3 MB) stay in cache."""

_WARMUP_CAP_BYTES = 32 * 2**20
"""RAM for the warm-up batch (the W frames of one band and their working copies)."""

_WARMUP_BYTES_PER_SAMPLE = 12
"""Warm-up batch bytes per (frame, pixel, channel): float32 cube and deviations, two masks."""

_MIN_TEST_COUNT = 3
"""A sample is judged only against at least this many other samples of its pixel: with fewer,
the spread is too uncertain to reject anything (the sample variance of 2 values is chi2 with 1
degree of freedom)."""

_FLOOR_FRACTION = 1.0
"""Rejection floor = this fraction of the typical (median) pixel std: no pixel is quieter than
the sky, so a std below it is a chance low estimate from few frames, or a constant pixel
(saturated core, std 0) that would otherwise reject every sample differing by one ADU."""

_FLOOR_ABS = 1.0 / 4096
"""Absolute rejection floor: one ADU of a 12-bit camera, for noise-free (synthetic, saturated)
data where the typical std is 0."""

_FLOOR_SAMPLES = 250_000
"""Pixels sampled per channel to find the typical std for the floor."""

_MAX_FRAMES = np.iinfo(np.uint16).max
"""Per-sample counts are uint16 (half the memory of uint32): at most 65535 frames per stack."""

_COMBINE_BYTES_PER_SAMPLE: dict[str, int] = {
    "sigma_clip": 16,
    "mean": 12,
    "median": 16,
    "winsorized": 36,
}
"""Peak working bytes per (frame, pixel, channel) sample of one band in :func:`combine`, measured
with tracemalloc (tests/test_stack.py checks the cap): float64 cube 8 B + validity mask 1 B +
the method's working copies (astropy's masks; sorted and winsorized copies)."""

_COMBINE_BYTES_PER_PIXEL = 48
"""Per (pixel, channel) of one band, independent of the number of frames: accumulators, bounds."""

_LIVE_MANIFEST = "live.json"
_LIVE_FILE = re.compile(r"^(mean|m2|count|warm\d+|warmfp\d+)\.(\d+)\.npy$")


# --------------------------------------------------------------------------- frame store


@dataclass(frozen=True)
class StoredFrame:
    """What the store knows about one frame: enough to read it back and rebuild its footprint.

    ``matrix``: (2, 3) frame -> reference transform; ``src_shape``: (rows, cols) of the frame
    before warping; ``weight``: its weight in a weighted combine; ``interpolation``: kernel used
    to warp it (sets the footprint margin).
    """

    file: str
    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    src_shape: tuple[int, int]
    weight: float
    name: str
    interpolation: Interpolation

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "matrix": [list(row) for row in self.matrix],
            "src_shape": list(self.src_shape),
            "weight": self.weight,
            "name": self.name,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StoredFrame:
        m = obj["matrix"]
        return cls(
            file=str(obj["file"]),
            matrix=(
                (float(m[0][0]), float(m[0][1]), float(m[0][2])),
                (float(m[1][0]), float(m[1][1]), float(m[1][2])),
            ),
            src_shape=(int(obj["src_shape"][0]), int(obj["src_shape"][1])),
            weight=float(obj["weight"]),
            name=str(obj["name"]),
            interpolation=obj.get("interpolation", "bilinear"),
        )


class FrameStore:
    """Append-only disk store of aligned frames, read back band by band.

    One raw file per frame (``frame_000000.u16``...): C-order (rows, cols, C) native-endian
    uint16, sample = round-half-even(clip(value, 0, 1) * 65535) (see :data:`QUANT_MAX`), values
    outside the footprint 0. ``index.json`` lists each frame's transform, source shape, weight,
    name and interpolation. Every file is written atomically, the raw file before the index, so
    after a crash the index names only complete frames; reopening the directory restores the
    store (an unindexed raw file left by a crash is overwritten by the next ``add``).

    Parameters
    ----------
    directory : path-like
        Created if missing. If it already holds a store, that store is reopened; its shape and
        channels must match.
    shape : (int, int)
        (rows, cols) of the reference grid.
    channels : int
        1 or 3.
    """

    def __init__(self, directory: str | Path, shape: tuple[int, int], channels: int) -> None:
        self.directory = Path(directory)
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = int(channels)
        if self.shape[0] < 1 or self.shape[1] < 1 or self.channels not in (1, 3):
            raise ValueError(f"bad store geometry {self.shape} x {self.channels}")
        self._frames: list[StoredFrame] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        index = self.directory / "index.json"
        if index.exists():
            self._load_index(index)
        else:
            self._write_index()

    @classmethod
    def open(cls, directory: str | Path) -> FrameStore:
        """Reopen an existing store, taking its geometry from the index."""
        obj = json.loads((Path(directory) / "index.json").read_text())
        return cls(directory, (obj["shape"][0], obj["shape"][1]), obj["channels"])

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def frame_bytes(self) -> int:
        """Bytes of one stored frame."""
        return self.shape[0] * self.shape[1] * self.channels * 2

    def frame(self, i: int) -> StoredFrame:
        """The record of frame ``i``."""
        return self._frames[i]

    def weights(self) -> npt.NDArray[np.float64]:
        """(n,) float64 per-frame weights recorded at ``add``."""
        return np.array([f.weight for f in self._frames], dtype=np.float64)

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` frames (no-op if ``n >= len(self)``).

        For a resume where frames were stored but never journaled: the index is rewritten
        atomically first, then the dropped frames' files are deleted.
        """
        if n < 0:
            raise ValueError(f"cannot truncate to {n} frames")
        if n >= len(self._frames):
            return
        dropped = self._frames[n:]
        self._frames = self._frames[:n]
        self._write_index()
        for record in dropped:
            (self.directory / record.file).unlink(missing_ok=True)

    def add(
        self,
        warped: FloatArray,
        matrix: FloatArray,
        src_shape: tuple[int, int],
        weight: float = 1.0,
        name: str = "",
        *,
        interpolation: Interpolation = "bilinear",
    ) -> int:
        """Append a warped frame; return its index.

        Parameters
        ----------
        warped : ndarray
            (rows, cols, C) float, on the reference grid, 0 outside the footprint.
        matrix : ndarray
            (2, 3) frame -> reference transform used to warp it.
        src_shape : (int, int)
            (rows, cols) of the frame before warping.
        weight : float
            > 0, the frame's weight in a weighted combine.
        name : str
            Free text, e.g. the raw file name.
        interpolation : str
            Kernel the frame was warped with (sets the footprint margin).
        """
        data = np.asarray(warped)
        expected = (*self.shape, self.channels)
        if data.shape != expected:
            raise ValueError(f"frame shape {data.shape} does not match the store's {expected}")
        band = max(1, _WRITE_BAND_SAMPLES // (self.shape[1] * self.channels))
        bands = (data[r0 : r0 + band] for r0 in range(0, self.shape[0], band))
        return self._append(bands, matrix, src_shape, weight, name, interpolation)

    def add_warped(
        self,
        image: FloatArray,
        matrix: FloatArray,
        weight: float = 1.0,
        name: str = "",
        *,
        interpolation: Interpolation = "bilinear",
    ) -> int:
        """Warp a frame onto the reference grid band by band straight into the store.

        Same result as ``add(*warp(image, matrix, ...)[:1], matrix, image.shape[:2], ...)`` (up to
        float rounding of the band offsets, ~1e-7) without ever holding the full warped frame:
        for 24 MP RGB it saves 288 MB of peak memory. Follow with :meth:`LiveStack.catch_up`
        to add the stored frame to a live stack.

        Parameters
        ----------
        image : ndarray
            (rows, cols, C) float32 frame before warping.
        matrix, weight, name, interpolation
            As for :meth:`add`.
        """
        src = np.asarray(image)
        src_shape = (int(src.shape[0]), int(src.shape[1]))
        band = max(1, _WRITE_BAND_SAMPLES // (self.shape[1] * self.channels))
        bands = (
            warp_rows(src, matrix, self.shape, r0, r0 + band, interpolation=interpolation)[0]
            for r0 in range(0, self.shape[0], band)
        )
        return self._append(bands, matrix, src_shape, weight, name, interpolation)

    def _append(
        self,
        bands: Iterator[FloatArray],
        matrix: FloatArray,
        src_shape: tuple[int, int],
        weight: float,
        name: str,
        interpolation: Interpolation,
    ) -> int:
        """Write a frame delivered as consecutive row bands, then index it."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and > 0, not {weight}")
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (2, 3):
            raise ValueError(f"matrix must be (2, 3), not {m.shape}")
        footprint(m, src_shape, self.shape, 0, 0, interpolation=interpolation)  # validates
        index = len(self._frames)
        record = StoredFrame(
            file=f"frame_{index:06d}.u16",
            matrix=(
                (float(m[0, 0]), float(m[0, 1]), float(m[0, 2])),
                (float(m[1, 0]), float(m[1, 1]), float(m[1, 2])),
            ),
            src_shape=(int(src_shape[0]), int(src_shape[1])),
            weight=float(weight),
            name=str(name),
            interpolation=interpolation,
        )
        written = 0
        with atomic_path(self.directory / record.file) as tmp, open(tmp, "wb") as fh:
            for band in bands:
                if band.shape[1:] != (self.shape[1], self.channels):
                    raise ValueError(f"band shape {band.shape} does not fit the store")
                _quantise(band).tofile(fh)
                written += band.shape[0]
            if written != self.shape[0]:
                raise ValueError(f"frame has {written} rows, the store {self.shape[0]}")
        self._frames.append(record)
        try:
            self._write_index()
        except BaseException:
            self._frames.pop()
            raise
        return index

    def read_band(
        self,
        i: int,
        row_start: int,
        row_stop: int,
        out: FloatArray | None = None,
    ) -> FloatArray:
        """Frame ``i``'s reference rows ``row_start:row_stop`` as float (0 outside the footprint).

        Parameters
        ----------
        out : ndarray, optional
            (band_rows, cols, C) float32 or float64 array to fill; the values are the float32
            ``raw * (1/65535)`` either way.

        Returns
        -------
        ndarray
            (band_rows, cols, C), float32 unless ``out`` is given.
        """
        record = self._frames[i]
        start, stop, _ = slice(row_start, row_stop).indices(self.shape[0])
        stop = max(stop, start)
        cols, channels = self.shape[1], self.channels
        if out is None:
            out = np.empty((stop - start, cols, channels), dtype=np.float32)
        elif out.shape != (stop - start, cols, channels):
            expected = (stop - start, cols, channels)
            raise ValueError(f"out has shape {out.shape}, expected {expected}")
        if stop == start:
            return out
        raw = np.memmap(
            self.directory / record.file,
            dtype=np.uint16,
            mode="r",
            offset=start * cols * channels * 2,
            shape=(stop - start, cols, channels),
        )
        try:
            np.multiply(raw, _DEQUANT, out=out, dtype=np.float32)
        finally:
            del raw
        return out

    def footprint_band(self, i: int, row_start: int, row_stop: int) -> BoolArray:
        """(band_rows, cols) bool coverage of frame ``i`` on reference rows row_start:row_stop."""
        record = self._frames[i]
        return footprint(
            np.array(record.matrix),
            record.src_shape,
            self.shape,
            row_start,
            row_stop,
            interpolation=record.interpolation,
        )

    def disk_bytes(self) -> int:
        """Bytes used by every file in the store directory."""
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    def _write_index(self) -> None:
        write_json(
            self.directory / "index.json",
            {
                "format": _STORE_FORMAT,
                "version": _STORE_VERSION,
                "shape": list(self.shape),
                "channels": self.channels,
                "sample": "uint16, native byte order, value = raw / 65535",
                "frames": [f.as_json() for f in self._frames],
            },
        )

    def _load_index(self, index: Path) -> None:
        obj = json.loads(index.read_text())
        if obj.get("format") != _STORE_FORMAT or obj.get("version") != _STORE_VERSION:
            raise ValueError(f"{index} is not a nightstack frame store (version {_STORE_VERSION})")
        shape = (int(obj["shape"][0]), int(obj["shape"][1]))
        if shape != self.shape or int(obj["channels"]) != self.channels:
            raise ValueError(
                f"store {self.directory} holds {shape} x {obj['channels']} frames, "
                f"not {self.shape} x {self.channels}"
            )
        frames = [StoredFrame.from_json(f) for f in obj["frames"]]
        for record in frames:
            path = self.directory / record.file
            if not path.is_file() or path.stat().st_size != self.frame_bytes:
                raise ValueError(f"store {self.directory}: {record.file} is missing or truncated")
        self._frames = frames


def _quantise(values: FloatArray) -> npt.NDArray[np.uint16]:
    """round(clip(v, 0, 1) * 65535) as uint16; NaN -> 0."""
    scaled = np.multiply(values, np.float32(QUANT_MAX), dtype=np.float32)
    np.nan_to_num(scaled, copy=False, nan=0.0, posinf=QUANT_MAX, neginf=0.0)
    np.clip(scaled, 0, QUANT_MAX, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint16)


# --------------------------------------------------------------------------- live stack


class LiveStack:
    """Running stack with per-pixel k-sigma rejection, O(pixels) per frame, bounded memory.

    State (whatever the number of frames): per sample (pixel, channel) a float32 Welford mean,
    a float32 sum of squared deviations ``M2`` and a uint16 count of accepted samples: 10 bytes
    per sample, 720 MB for 24 MP RGB. float32 ``M2`` suffices because Welford's update never
    subtracts large sums: measured against a float64 two-pass, the variance is within 6e-5
    (relative) after 600 to 3000 frames of a 0.5 level with 1e-3 noise, the mean within 1.5e-6,
    far below their statistical errors (sqrt(2/n) and 1e-3/sqrt(n)); float64 would add 288 MB
    at 24 MP. Counts are uint16: at most 65535 frames.

    Rejection test of a sample ``x`` against ``n`` other samples of its pixel (mean ``m``, sum
    of squared deviations ``M2``): reject when

        (x - m)^2 > kappa^2 * (1 + 1/n) * max(M2 / (n - 1), floor^2)

    i.e. outside ``kappa`` standard deviations of ``x - m`` for a new sample (the sample
    variance, at least ``floor^2``, plus the uncertainty of the mean itself, which matters for
    small ``n``), and only when ``n >= 3`` (:data:`_MIN_TEST_COUNT`). ``floor`` is per channel:
    max(1/4096, the median over pixels of the sample std), fixed when the warm-up completes
    (see :data:`_FLOOR_FRACTION`). On Gaussian noise this rejects ~0.4 % of good samples
    (simulated, 5..30 frames), against 0.27 % for a 3-sigma cut with the true sigma.

    - Frames 1 .. ``warmup`` - 1 are accumulated without rejection.
    - When the ``warmup``-th frame arrives, the ``warmup`` frames are judged as a batch: each
      sample with the test above against the *other* warm-up samples of its pixel (the floor
      taken from the first ``warmup`` - 1 frames), and the statistics are rebuilt from the
      survivors. The final combine's median-centred sigma clip is not used here because it
      cannot reject anything in so few frames: a lone outlier among ``n`` samples lies at most
      ``n / sqrt(n - 1)`` population stds from the median (2.5 for n = 5, < 3 for n < 9). The
      frames are read back from ``store`` band by band (frame k of this stack must be frame k of
      the store: append each frame to the store before adding it here); without a store they
      are kept in RAM until then.
    - Afterwards each new sample is judged against its pixel's running statistics, and added
      when it passes. ``rejected`` counts every rejected sample.

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) of the reference grid.
    channels : int
        1 or 3.
    kappa : float
        Rejection threshold in standard deviations (> 0).
    warmup : int
        Frames clipped as a batch before running rejection starts (>= 1; 1 = no batch).
    store : FrameStore, optional
        Where the warm-up frames are read back from.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        channels: int,
        *,
        kappa: float = 3.0,
        warmup: int = 5,
        store: FrameStore | None = None,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = int(channels)
        if self.shape[0] < 1 or self.shape[1] < 1 or self.channels not in (1, 3):
            raise ValueError(f"bad stack geometry {self.shape} x {self.channels}")
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be > 0, not {kappa}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, not {warmup}")
        if store is not None and (store.shape != self.shape or store.channels != self.channels):
            raise ValueError("the store's geometry differs from the stack's")
        self.kappa = float(kappa)
        self.warmup = int(warmup)
        self.store = store
        full = (*self.shape, self.channels)
        self._mean = np.zeros(full, dtype=np.float32)
        self._m2 = np.zeros(full, dtype=np.float32)
        self._count = np.zeros(full, dtype=np.uint16)
        self._floor = np.zeros(self.channels, dtype=np.float32)
        self._floor_sq_row = np.zeros(self.shape[1] * self.channels, dtype=np.float32)
        self._pending: list[tuple[npt.NDArray[np.float32], BoolArray]] = []
        self.frames = 0
        """Frames added so far."""
        self.rejected = 0
        """Samples (pixel x channel x frame) rejected so far, warm-up batch included."""

    # ----------------------------------------------------------------- public

    @property
    def count(self) -> npt.NDArray[np.uint16]:
        """(rows, cols, C) uint16 accepted samples per pixel and channel (read-only view)."""
        view = self._count.view()
        view.flags.writeable = False
        return view

    @property
    def floor(self) -> npt.NDArray[np.float32]:
        """(C,) float32 per-channel std floor used for rejection (0 before warm-up)."""
        return self._floor.copy()

    @property
    def warmed_up(self) -> bool:
        """True once running rejection is active."""
        return self.frames >= self.warmup

    def add(self, warped: FloatArray, footprint: BoolArray) -> int:
        """Add one aligned frame; return the number of its samples rejected.

        Parameters
        ----------
        warped : ndarray
            (rows, cols, C) float32 on the reference grid, finite inside the footprint.
        footprint : ndarray
            (rows, cols) bool, True where the frame covers the pixel.

        Returns
        -------
        int
            Samples of this frame rejected (at the warm-up frame: all rejected by the batch clip).
        """
        data = np.asarray(warped)
        fp = np.asarray(footprint, dtype=bool)
        if data.shape != (*self.shape, self.channels):
            raise ValueError(f"frame shape {data.shape} does not match the stack's")
        if fp.shape != self.shape:
            raise ValueError(f"footprint shape {fp.shape} does not match the stack's {self.shape}")
        if self.store is not None and len(self.store) < self.frames + 1:
            raise ValueError(
                f"the store holds {len(self.store)} frames but this would be frame "
                f"{self.frames + 1}: append each frame to the store before adding it"
            )
        if self.store is None and not self.warmed_up:
            self._pending.append((data.astype(np.float32, copy=True), fp.copy()))
        return self._add(lambda r0, r1: (data[r0:r1], fp[r0:r1]))

    def catch_up(self) -> int:
        """Add the store's frames this stack has not seen yet (after resuming from a checkpoint).

        Returns the number of frames added.
        """
        if self.store is None:
            raise ValueError("catch_up needs a store")
        store = self.store
        added = 0
        while self.frames < len(store):
            self._add(_StoreSource(store, self.frames))
            added += 1
        return added

    def result(self) -> npt.NDArray[np.float32]:
        """(rows, cols, C) float32 current stack; NaN where no sample was accepted."""
        out = self._mean.copy()
        band = self._band_rows()
        for r0 in range(0, self.shape[0], band):
            np.copyto(out[r0 : r0 + band], np.nan, where=self._count[r0 : r0 + band] == 0)
        return out

    def save(self, directory: str | Path) -> None:
        """Checkpoint the exact state into ``directory`` (created if missing).

        Arrays go to new ``<name>.<generation>.npy`` files, then ``live.json`` naming the new
        generation is replaced atomically, then older generations are deleted: a crash at any
        point leaves a loadable checkpoint (the old one or the new one).
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        manifest = d / _LIVE_MANIFEST
        generation = 1
        if manifest.exists():
            generation = int(json.loads(manifest.read_text())["generation"]) + 1
        arrays: dict[str, npt.NDArray[Any]] = {
            "mean": self._mean,
            "m2": self._m2,
            "count": self._count,
        }
        for j, (frame, fp) in enumerate(self._pending):
            arrays[f"warm{j}"] = frame
            arrays[f"warmfp{j}"] = fp
        files = {}
        for key, array in arrays.items():
            files[key] = f"{key}.{generation}.npy"
            with atomic_path(d / files[key]) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
        write_json(
            manifest,
            {
                "format": "nightstack-livestack",
                "version": 1,
                "generation": generation,
                "shape": list(self.shape),
                "channels": self.channels,
                "kappa": self.kappa,
                "warmup": self.warmup,
                "frames": self.frames,
                "rejected": self.rejected,
                "floor": [float(v) for v in self._floor],
                "pending": len(self._pending),
                "files": files,
            },
        )
        for path in d.iterdir():
            match = _LIVE_FILE.match(path.name)
            if match and int(match.group(2)) != generation:
                path.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | Path, store: FrameStore | None = None) -> LiveStack:
        """Restore a stack saved by :meth:`save`, bit for bit.

        Parameters
        ----------
        directory : path-like
            The checkpoint directory.
        store : FrameStore, optional
            The session's store (not part of the checkpoint). It must hold at least the frames
            the checkpoint has seen; :meth:`catch_up` adds any later ones.
        """
        d = Path(directory)
        meta = json.loads((d / _LIVE_MANIFEST).read_text())
        if meta.get("format") != "nightstack-livestack" or meta.get("version") != 1:
            raise ValueError(f"{d} does not hold a nightstack live-stack checkpoint")
        stack = cls(
            (meta["shape"][0], meta["shape"][1]),
            meta["channels"],
            kappa=meta["kappa"],
            warmup=meta["warmup"],
            store=store,
        )
        files = meta["files"]
        full = (*stack.shape, stack.channels)

        def load_array(key: str, dtype: type, shape: tuple[int, ...]) -> npt.NDArray[Any]:
            array = np.load(d / files[key], allow_pickle=False)
            if array.dtype != dtype or array.shape != shape:
                raise ValueError(f"checkpoint {d}: {files[key]} is {array.dtype} {array.shape}")
            return array

        stack._mean = load_array("mean", np.float32, full)
        stack._m2 = load_array("m2", np.float32, full)
        stack._count = load_array("count", np.uint16, full)
        stack._set_floor(np.array(meta["floor"], dtype=np.float32))
        stack.frames = int(meta["frames"])
        stack.rejected = int(meta["rejected"])
        stack._pending = [
            (
                load_array(f"warm{j}", np.float32, full),
                load_array(f"warmfp{j}", np.bool_, stack.shape),
            )
            for j in range(int(meta["pending"]))
        ]
        if store is not None and len(store) < stack.frames:
            raise ValueError(
                f"the store holds {len(store)} frames, fewer than the checkpoint's {stack.frames}"
            )
        return stack

    # ----------------------------------------------------------------- internals

    def _band_rows(self) -> int:
        return max(1, _ADD_BAND_SAMPLES // (self.shape[1] * self.channels))

    def _add(self, source: Callable[[int, int], tuple[FloatArray, BoolArray]]) -> int:
        """Add the next frame, delivered band by band by ``source(row_start, row_stop)``."""
        if self.frames >= _MAX_FRAMES:
            raise ValueError(f"a live stack holds at most {_MAX_FRAMES} frames")
        number = self.frames + 1
        if number == self.warmup:
            self.frames = number
            rejected = self._rebuild_from_warmup()
        else:
            testing = self.warmed_up
            rows = self._band_rows()
            scratch = _Scratch((rows, self.shape[1], self.channels))
            rejected = 0
            for r0 in range(0, self.shape[0], rows):
                r1 = min(r0 + rows, self.shape[0])
                x, fp = source(r0, r1)
                rejected += self._update_band(r0, r1, x, fp, testing, scratch)
            self.frames = number
        self.rejected += rejected
        return rejected

    def _update_band(
        self,
        r0: int,
        r1: int,
        x: FloatArray,
        fp: BoolArray,
        testing: bool,
        scratch: _Scratch,
    ) -> int:
        """Welford update of rows r0:r1 with rejection; all work in the band's scratch buffers."""
        mean = self._mean[r0:r1]
        m2 = self._m2[r0:r1]
        count = self._count[r0:r1]
        rows = r1 - r0
        t1, t2, accept, flag, judged = scratch.views(rows)
        # Broadcasting along the short channel axis makes numpy loop 3 elements at a time: fill
        # channel by channel, and compare against a (cols * C) row pattern instead.
        for c in range(self.channels):
            accept[:, :, c] = fp
        rejected = 0
        if testing:
            # t1 = kappa^2 (1 + 1/n) max(M2 / (n - 1), floor^2); n >= 2 where it matters
            np.copyto(t1, count)
            np.maximum(t1, 2, out=t1)
            np.subtract(t1, 1, out=t2)
            np.divide(m2, t2, out=t2)
            flat = t2.reshape(rows, -1)
            np.maximum(flat, self._floor_sq_row, out=flat)
            np.reciprocal(t1, out=t1)
            t1 += 1
            t1 *= t2
            t1 *= np.float32(self.kappa**2)
            # t2 = (x - mean)^2
            np.subtract(x, mean, out=t2)
            np.square(t2, out=t2)
            np.greater(t2, t1, out=flag)
            np.greater_equal(count, _MIN_TEST_COUNT, out=judged)
            flag &= judged
            flag &= accept
            rejected = int(np.count_nonzero(flag))
            if rejected:
                accept ^= flag
        np.add(count, accept, out=count)
        np.subtract(x, mean, out=t2)  # delta = x - old mean
        np.copyto(t1, count)
        np.maximum(t1, 1, out=t1)
        np.divide(t2, t1, out=t1)
        np.add(mean, t1, out=mean, where=accept)
        np.subtract(x, mean, out=t1)  # x - new mean
        t1 *= t2
        np.add(m2, t1, out=m2, where=accept)
        return rejected

    def _rebuild_from_warmup(self) -> int:
        """Judge the warm-up frames as a batch, rebuild mean, M2 and count from the survivors."""
        n = self.warmup
        rows, cols = self.shape
        channels = self.channels
        width = cols * channels
        # the floor comes from the first warmup - 1 frames, accumulated plainly
        floor_sq_row = np.tile(np.square(self._typical_std_floor()), cols)
        band = max(1, _WARMUP_CAP_BYTES // (n * width * _WARMUP_BYTES_PER_SAMPLE))
        rejected = 0
        for r0 in range(0, rows, band):
            r1 = min(r0 + band, rows)
            cube = np.zeros((n, r1 - r0, cols, channels), dtype=np.float32)
            valid = np.zeros(cube.shape, dtype=bool)
            for i in range(n):
                if self.store is not None:
                    fp = self.store.footprint_band(i, r0, r1)
                    if fp.any():
                        self.store.read_band(i, r0, r1, out=cube[i])
                else:
                    frame, frame_fp = self._pending[i]
                    cube[i] = frame[r0:r1]
                    fp = frame_fp[r0:r1]
                for c in range(channels):
                    valid[i, :, :, c] = fp
            flat = cube.reshape(n, r1 - r0, width)
            flat_valid = valid.reshape(n, r1 - r0, width)
            flat *= flat_valid  # absent samples are exactly 0 in every sum below
            keep = _leave_one_out_keep(flat, flat_valid, self.kappa, floor_sq_row)
            rejected += int(np.count_nonzero(flat_valid)) - int(np.count_nonzero(keep))
            del valid, flat_valid
            mean, m2, count = _masked_stats(flat, keep)
            self._mean[r0:r1] = mean.reshape(r1 - r0, cols, channels)
            self._m2[r0:r1] = m2.reshape(r1 - r0, cols, channels)
            self._count[r0:r1] = count.reshape(r1 - r0, cols, channels)
        self._pending.clear()
        self._set_floor(self._typical_std_floor())
        return rejected

    def _set_floor(self, floor: npt.NDArray[np.float32]) -> None:
        self._floor = floor.astype(np.float32)
        self._floor_sq_row = np.tile(np.square(self._floor), self.shape[1])

    def _typical_std_floor(self) -> npt.NDArray[np.float32]:
        """Per channel max(_FLOOR_ABS, _FLOOR_FRACTION x median sample std), pixels with n >= 2."""
        rows, cols = self.shape
        step = max(1, int(math.sqrt(rows * cols / _FLOOR_SAMPLES)))
        count = self._count[::step, ::step].reshape(-1, self.channels)
        m2 = self._m2[::step, ::step].reshape(-1, self.channels)
        floor = np.full(self.channels, _FLOOR_ABS, dtype=np.float32)
        for c in range(self.channels):
            ok = count[:, c] >= 2
            if ok.any():
                std = np.sqrt(m2[ok, c].astype(np.float64) / (count[ok, c] - 1.0))
                floor[c] = max(_FLOOR_ABS, _FLOOR_FRACTION * float(np.median(std)))
        return floor


def _leave_one_out_keep(
    cube: npt.NDArray[np.float32],
    valid: BoolArray,
    kappa: float,
    floor_sq: npt.NDArray[np.float32],
) -> BoolArray:
    """The live rejection test applied to every sample against the other samples of its pixel.

    With ``d`` a sample's deviation from the mean of all ``c`` samples of its pixel, ``Q`` the
    sum of squared deviations and ``k = c - 1`` the others: the others' mean is ``-d / k`` (the
    deviations sum to 0), so ``x - mean_others = d c / k`` and the others' ``M2 = Q - d^2 c / k``.
    A sample is rejected when ``k >= 3`` (:data:`_MIN_TEST_COUNT`) and
    ``(d c / k)^2 > kappa^2 (1 + 1/k) max(M2 / (k - 1), floor^2)``, the running test.

    Parameters
    ----------
    cube : ndarray
        (n, rows, K) float32 samples along axis 0, absent ones exactly 0.
    valid : ndarray
        (n, rows, K) bool, False for absent samples.
    kappa : float
        Threshold in standard deviations.
    floor_sq : ndarray
        (K,) float32 squared std floor per column.

    Returns
    -------
    ndarray
        (n, rows, K) bool survivors.
    """
    count = np.count_nonzero(valid, axis=0).astype(np.float32)
    mean = cube.sum(axis=0)
    mean /= np.maximum(count, 1)
    dev = cube - mean
    dev *= valid
    q = np.zeros(count.shape, dtype=np.float32)
    d2 = np.empty(count.shape, dtype=np.float32)
    for j in range(cube.shape[0]):
        np.square(dev[j], out=d2)
        q += d2
    others = np.maximum(count - 1, 2)  # pixels with fewer than 3 others are not judged
    judged = count - 1 >= _MIN_TEST_COUNT
    ratio = count / others
    ratio_sq = np.square(ratio)
    factor = (kappa**2 * (others + 1) / others).astype(np.float32)
    keep = valid.copy()
    threshold = np.empty(count.shape, dtype=np.float32)
    for j in range(cube.shape[0]):
        np.square(dev[j], out=d2)
        np.multiply(d2, ratio, out=threshold)
        np.subtract(q, threshold, out=threshold)  # the others' M2
        threshold /= others - 1
        np.maximum(threshold, floor_sq, out=threshold)
        threshold *= factor
        d2 *= ratio_sq  # (x - mean_others)^2
        outside = d2 > threshold
        outside &= judged
        keep[j] &= ~outside
    return keep


def _masked_stats(
    cube: npt.NDArray[np.float32], keep: BoolArray
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.intp]]:
    """Mean, sum of squared deviations and count of the kept samples along axis 0 (0 if none)."""
    count = np.count_nonzero(keep, axis=0)
    mean = np.sum(cube, axis=0, where=keep)
    np.divide(mean, count, out=mean, where=count > 0)
    mean[count == 0] = 0.0
    m2 = np.zeros(count.shape, dtype=np.float32)
    dev = np.empty(count.shape, dtype=np.float32)
    for j in range(cube.shape[0]):
        np.subtract(cube[j], mean, out=dev)
        np.square(dev, out=dev)
        np.add(m2, dev, out=m2, where=keep[j])
    return mean, m2, count


class _StoreSource:
    """Band source for ``LiveStack._add`` reading frame ``i`` back from a store."""

    def __init__(self, store: FrameStore, i: int) -> None:
        self.store = store
        self.i = i

    def __call__(self, r0: int, r1: int) -> tuple[FloatArray, BoolArray]:
        return self.store.read_band(self.i, r0, r1), self.store.footprint_band(self.i, r0, r1)


class _Scratch:
    """Band-sized working buffers reused across the bands of one ``add``."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.t1 = np.empty(shape, dtype=np.float32)
        self.t2 = np.empty(shape, dtype=np.float32)
        self.accept = np.empty(shape, dtype=bool)
        self.flag = np.empty(shape, dtype=bool)
        self.judged = np.empty(shape, dtype=bool)

    def views(
        self, rows: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], BoolArray, BoolArray, BoolArray]:
        return (
            self.t1[:rows],
            self.t2[:rows],
            self.accept[:rows],
            self.flag[:rows],
            self.judged[:rows],
        )


# --------------------------------------------------------------------------- final combine


def combine(
    store: FrameStore,
    *,
    method: Method = "sigma_clip",
    sigma: float = 3.0,
    maxiters: int = 5,
    weights: FloatArray | None = None,
    ram_cap_bytes: int = 512 * 2**20,
    progress: Callable[[int, int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Combine every frame of ``store``, band of rows by band of rows, under a RAM cap.

    Each pixel's sample is the frames whose footprint covers it (absent elsewhere, not zero).

    Methods:

    - ``"sigma_clip"``: exactly astropy ``sigma_clip(cube, sigma=sigma, maxiters=maxiters,
      cenfunc='median', stdfunc='std', axis=0)`` (called per band; the clip is per pixel, so
      banding does not change it), then the mean of the survivors.
    - ``"mean"``: mean of the sample.
    - ``"median"``: median of the sample (mean of the two middle values for an even count);
      weights are ignored.
    - ``"winsorized"``: winsorized sigma clip, per pixel with sample X:
      (1) W = X; at most ``maxiters`` times: m = median(W), s = std(W) (population std about the
      mean), W' = clip(W, m - sigma s, m + sigma s), stop if W' == W, else W = W';
      (2) m = median(W), s = std(W) of the final W;
      (3) survivors = the x in X with m - sigma s <= x <= m + sigma s; result = their mean.
      Outliers cannot inflate s, unlike a plain sigma clip's first iteration.

    The mean of survivors is ``sum(w_i x_i) / sum(w_i)`` in float64 (rounded to float32 at the
    end), ``w`` the per-frame weights; the clip itself is unweighted.

    Parameters
    ----------
    store : FrameStore
        The aligned frames.
    method : {"sigma_clip", "mean", "median", "winsorized"}
    sigma : float
        Clipping threshold in standard deviations (> 0).
    maxiters : int
        Maximum clipping iterations (>= 1).
    weights : array-like, optional
        (n,) per-frame weights > 0 (e.g. ``store.weights()``); default: all equal.
    ram_cap_bytes : int
        Working memory allowed for one band (cube and working copies); the (rows, cols, C)
        float32 result is extra.
    progress : callable, optional
        Called as ``progress(rows_done, rows_total)`` after each band.

    Returns
    -------
    ndarray
        (rows, cols, C) float32; NaN where no frame covers the pixel (and wherever the clip
        rejects the whole sample, as astropy does, possible only for sigma < 1).
    """
    if method not in _COMBINE_BYTES_PER_SAMPLE:
        methods = sorted(_COMBINE_BYTES_PER_SAMPLE)
        raise ValueError(f"method must be one of {methods}, not {method!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be > 0, not {sigma}")
    if maxiters < 1:
        raise ValueError(f"maxiters must be >= 1, not {maxiters}")
    n = len(store)
    rows, cols = store.shape
    channels = store.channels
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError(f"weights must be {n} finite values > 0")
    out = np.full((rows, cols, channels), np.nan, dtype=np.float32)
    if n == 0:
        return out
    per_row = cols * channels * (n * _COMBINE_BYTES_PER_SAMPLE[method] + _COMBINE_BYTES_PER_PIXEL)
    band = ram_cap_bytes // per_row
    if band < 1:
        raise ValueError(
            f"ram_cap_bytes={ram_cap_bytes} is too small: "
            f"one row of {n} frames needs {per_row} bytes"
        )
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        cube = np.zeros((n, r1 - r0, cols, channels), dtype=np.float64)
        valid = np.zeros(cube.shape, dtype=bool)
        for i in range(n):
            fp = store.footprint_band(i, r0, r1)
            if fp.any():
                store.read_band(i, r0, r1, out=cube[i])
                for c in range(channels):  # not a broadcast along the 3-long channel axis: slow
                    valid[i, :, :, c] = fp
        if method == "sigma_clip":
            keep = _clip_keep(cube, valid, sigma, maxiters)
        elif method == "winsorized":
            keep = _winsorized_keep(cube, valid, sigma, maxiters)
        elif method == "mean":
            keep = valid
        else:
            out[r0:r1] = _median(cube, valid)
            del cube, valid
            if progress is not None:
                progress(r1, rows)
            continue
        del valid
        out[r0:r1] = _weighted_mean(cube, keep, w)
        del cube, keep
        if progress is not None:
            progress(r1, rows)
    return out


def _clip_keep(cube: FloatArray, valid: BoolArray, sigma: float, maxiters: int) -> BoolArray:
    """Survivors of astropy's sigma_clip (median centre, std) along axis 0 of (n, ...) ``cube``.

    Absent samples (``valid`` False) must hold finite filler values (astropy warns on NaN).
    """
    clipped = sigma_clip(
        np.ma.MaskedArray(cube, mask=~valid, copy=False),
        sigma=sigma,
        maxiters=maxiters,
        cenfunc="median",
        stdfunc="std",
        axis=0,
        copy=False,
    )
    keep: BoolArray = ~np.ma.getmaskarray(clipped)
    return keep


def _weighted_mean(
    cube: FloatArray, keep: BoolArray, weights: npt.NDArray[np.float64]
) -> npt.NDArray[np.float32]:
    """sum_i w_i x_i / sum_i w_i over kept samples, float64 accumulation; NaN where none."""
    total = np.zeros(cube.shape[1:], dtype=np.float64)
    wsum = np.zeros(cube.shape[1:], dtype=np.float64)
    unit = bool(np.all(weights == 1.0))
    term = None if unit else np.empty(cube.shape[1:], dtype=np.float64)
    for i in range(cube.shape[0]):
        if term is None:
            np.add(total, cube[i], out=total, where=keep[i])
        else:
            np.multiply(cube[i], weights[i], out=term)
            np.add(total, term, out=total, where=keep[i])
        np.add(wsum, weights[i], out=wsum, where=keep[i])
    result = np.full(total.shape, np.nan, dtype=np.float32)
    np.divide(total, wsum, out=total, where=wsum > 0)
    np.copyto(result, total, where=wsum > 0, casting="same_kind")
    return result


def _median(cube: FloatArray, valid: BoolArray) -> npt.NDArray[np.float32]:
    """Median of the valid samples along axis 0 (as np.nanmedian), NaN where none; sorts cube."""
    cube[~valid] = np.inf
    cube.sort(axis=0)
    count = np.count_nonzero(valid, axis=0)
    med = _sorted_median(cube, count)
    result = np.full(med.shape, np.nan, dtype=np.float32)
    np.copyto(result, med, where=count > 0, casting="same_kind")
    return result


def _sorted_median(values: FloatArray, count: npt.NDArray[np.intp]) -> FloatArray:
    """Median along axis 0 of ``values`` sorted ascending with the ``count`` valid values first.

    Even counts average the two middle values, as np.median; a zero count gives values[0].
    """
    safe = np.maximum(count, 1)
    lo = np.take_along_axis(values, ((safe - 1) // 2)[np.newaxis], axis=0)[0]
    hi = np.take_along_axis(values, (safe // 2)[np.newaxis], axis=0)[0]
    median: FloatArray = np.where(safe % 2 == 1, lo, 0.5 * (lo + hi))
    return median


def _sorted_stats(
    values: FloatArray, inside: BoolArray, count: npt.NDArray[np.intp]
) -> tuple[FloatArray, FloatArray]:
    """Median and population std along axis 0 of sorted ``values`` (valid first, ``count`` each)."""
    safe = np.maximum(count, 1)
    median = _sorted_median(values, count)
    mean = np.sum(values, axis=0, where=inside) / safe
    dev = values - mean
    dev *= dev
    std = np.sqrt(np.sum(dev, axis=0, where=inside) / safe)
    return median, std


def _winsorized_keep(cube: FloatArray, valid: BoolArray, sigma: float, maxiters: int) -> BoolArray:
    """Survivors of the winsorized sigma clip documented in :func:`combine`."""
    n = cube.shape[0]
    count = np.count_nonzero(valid, axis=0)
    wins = np.where(valid, cube, np.inf)
    wins.sort(axis=0)  # valid values first, ascending; clamping keeps the order
    inside = np.arange(n).reshape((n,) + (1,) * (cube.ndim - 1)) < count
    wins[~inside] = 0.0
    for _ in range(maxiters):
        median, std = _sorted_stats(wins, inside, count)
        lo = median - sigma * std
        hi = median + sigma * std
        clamped = np.clip(wins, lo, hi)
        clamped[~inside] = 0.0
        changed = not np.array_equal(clamped, wins)
        wins = clamped
        if not changed:
            break
    median, std = _sorted_stats(wins, inside, count)
    lo = median - sigma * std
    hi = median + sigma * std
    keep: BoolArray = valid & (cube >= lo) & (cube <= hi)
    return keep
