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

import io
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
from astropy.stats import sigma_clip

from nightstack.demosaic import check_method, demosaic_rows
from nightstack.normalize import Normalization
from nightstack.warp import (
    Interpolation,
    footprint,
    footprint_spans,
    source_rows,
    warp_crop_rows,
    warp_rows,
)
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

_READ_CHUNK_SAMPLES = 1 << 18
"""Samples read from a frame file at a time: a 512 KB uint16 buffer, converted while in cache."""

_PREVIEW_BAND_SAMPLES = 1 << 20
"""Full-size samples per band in LiveStack.preview_image: 4 MB float32 of the mean at a time."""

_ADD_BAND_SAMPLES = 1 << 18
"""Samples per band in LiveStack.add: the band's state and scratch (~6 MB) stay in cache
(measured best of 2^16 .. 2^20 at 24 MP)."""

_DENSE_FRACTION = 0.05
"""Above this fraction of candidate samples in a band, its threshold is computed for every
sample (a few whole-band passes) rather than gathered per candidate (measured break-even)."""

_WARMUP_CAP_BYTES = 32 * 2**20
"""RAM for the warm-up batch (the W frames of one band and their working copies)."""

_WARMUP_BYTES_PER_SAMPLE = 10
"""Warm-up batch bytes per (frame, pixel, channel): float32 cube and deviations, two masks."""

_WARMUP_BAND_SAMPLES = 1 << 16
"""Samples per frame in one warm-up band: its working set stays in the CPU cache."""

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

_MOSAIC_BLOCK_ROWS = 64
"""Reference rows a mosaic frame is demosaiced and warped in at a time (see _MosaicReader):
the mosaic rows a block needs are re-read for its neighbour, so a block much taller than the
rows a rotation spans wastes little (64 rows at 1 degree over 6000 columns: 105 + 64 read)."""

_DEMOSAIC_CONTEXT = 8
"""Mosaic rows read beyond a block's source rows for the demosaic's own context (it needs 4)."""

_LIVE_MANIFEST = "live.json"
_LIVE_FILE = re.compile(r"^(mean|m2|count|warm\d+|warmfp\d+)\.(\d+)\.npy$")


# --------------------------------------------------------------------------- frame store


@dataclass(frozen=True)
class StoredFrame:
    """What the store knows about one frame: enough to read it back and rebuild its footprint.

    ``matrix``: (2, 3) frame -> reference transform; ``src_shape``: (rows, cols) of the frame
    before warping; ``weight``: its weight in a weighted combine; ``interpolation``: kernel used
    to warp it (sets the footprint margin); ``normalization``: the background normalization
    applied before it was stored (:meth:`Normalization.as_json`), None for none.
    """

    file: str
    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    src_shape: tuple[int, int]
    weight: float
    name: str
    interpolation: Interpolation
    normalization: dict[str, Any] | None = None
    mosaic: MosaicLayout | None = None

    def as_json(self) -> dict[str, Any]:
        data = {
            "file": self.file,
            "matrix": [list(row) for row in self.matrix],
            "src_shape": list(self.src_shape),
            "weight": self.weight,
            "name": self.name,
            "interpolation": self.interpolation,
            "normalization": self.normalization,
        }
        if self.mosaic is not None:
            data["mosaic"] = self.mosaic.as_json()
        return data

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
            normalization=obj.get("normalization"),
            mosaic=MosaicLayout.from_json(obj["mosaic"]) if obj.get("mosaic") else None,
        )


@dataclass(frozen=True)
class MosaicLayout:
    """How a frame stored as its mosaic becomes RGB: its Bayer ``pattern`` at pixel (0, 0),
    ``white_balance`` (r, g, b) and OpenCV ``demosaic`` method (:mod:`nightstack.demosaic`)."""

    pattern: str
    white_balance: tuple[float, float, float]
    demosaic: str

    def as_json(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "white_balance": list(self.white_balance),
            "demosaic": self.demosaic,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MosaicLayout:
        r, g, b = (float(v) for v in obj["white_balance"])
        return cls(str(obj["pattern"]), (r, g, b), str(obj["demosaic"]))


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

    def __init__(
        self, directory: str | Path, shape: tuple[int, int], channels: int, *, salvage: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = int(channels)
        if self.shape[0] < 1 or self.shape[1] < 1 or self.channels not in (1, 3):
            raise ValueError(f"bad store geometry {self.shape} x {self.channels}")
        self._frames: list[StoredFrame] = []
        self.damaged: list[int] = []
        """With ``salvage``: positions of indexed frames whose file is missing or truncated (a
        power cut); they stay indexed until :meth:`drop` removes them. Without it they raise."""
        self.directory.mkdir(parents=True, exist_ok=True)
        index = self.directory / "index.json"
        if index.exists():
            self._load_index(index, salvage)
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
        """Bytes of one frame stored warped (:meth:`add`, :meth:`add_warped`)."""
        return self.shape[0] * self.shape[1] * self.channels * 2

    def stored_bytes(self, i: int) -> int:
        """Bytes of frame ``i``'s file: a mosaic is its source's rows x cols x 2."""
        record = self._frames[i]
        if record.mosaic is not None:
            return record.src_shape[0] * record.src_shape[1] * 2
        return self.frame_bytes

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
        self.drop(range(n, len(self._frames)))

    def drop(self, positions: Iterable[int]) -> None:
        """Remove the frames at ``positions`` (damaged, or stored but never journaled): the
        index is rewritten atomically first, then their files are deleted."""
        gone = set(positions)
        if not gone:
            return
        dropped = [f for i, f in enumerate(self._frames) if i in gone]
        self._frames = [f for i, f in enumerate(self._frames) if i not in gone]
        self.damaged = []
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
        normalization: Normalization | None = None,
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
        normalization : Normalization, optional
            Applied to the warped samples (inside the footprint) before they are stored, so the
            live stack and the final combine, which both read the store, see the same values.
        """
        src = np.asarray(image)
        src_shape = (int(src.shape[0]), int(src.shape[1]))
        band = max(1, _WRITE_BAND_SAMPLES // (self.shape[1] * self.channels))

        def bands() -> Iterator[FloatArray]:
            for r0 in range(0, self.shape[0], band):
                warped, fp = warp_rows(
                    src, matrix, self.shape, r0, r0 + band, interpolation=interpolation
                )
                if normalization is not None and not normalization.is_identity:
                    normalization.apply(warped, r0, self.shape)
                    np.copyto(warped, 0.0, where=~fp[:, :, np.newaxis])
                yield warped

        record = None if normalization is None else normalization.as_json()
        return self._append(bands(), matrix, src_shape, weight, name, interpolation, record)

    def add_mosaic(
        self,
        codes: npt.NDArray[np.uint16],
        layout: MosaicLayout,
        matrix: FloatArray,
        weight: float = 1.0,
        name: str = "",
        *,
        interpolation: Interpolation = "bilinear",
        normalization: Normalization | None = None,
    ) -> int:
        """Store a calibrated frame as its mosaic (2 bytes a sensor pixel, unwarped).

        Reading it back (:meth:`read_band`, the live stack, :func:`combine`) demosaics, warps
        and normalizes it band by band, the same way for every reader (see :class:`_MosaicReader`),
        so the final combine sees exactly the values the live stack saw. Needs a 3-channel store.

        Parameters
        ----------
        codes : ndarray
            (rows, cols) uint16 mosaic codes (:func:`nightstack.demosaic.quantise`).
        layout : MosaicLayout
            Pattern, white balance and demosaic method.
        matrix, weight, name, interpolation
            As for :meth:`add`.
        normalization : Normalization, optional
            Applied to the warped values at read time.
        """
        if self.channels != 3:
            raise ValueError("a mosaic demosaics to RGB: the store must have 3 channels")
        data = np.ascontiguousarray(codes, dtype=np.uint16)
        if data.ndim != 2:
            raise ValueError(f"mosaic codes must be 2-D, not {data.shape}")
        check_method(layout.demosaic)
        src_shape = (int(data.shape[0]), int(data.shape[1]))
        record = None if normalization is None else normalization.as_json()
        return self._append(
            iter([data]), matrix, src_shape, weight, name, interpolation, record, layout
        )

    def reader(self, i: int) -> _FrameReader | _MosaicReader:
        """An open reader of frame ``i``: ``read(start, stop, out)`` fills reference rows
        ``start:stop`` (valid, ``start < stop``) into ``out`` (float32 or float64). Close it
        (a context manager)."""
        if self._frames[i].mosaic is not None:
            return _MosaicReader(self, i)
        return _FrameReader(self, i)

    def _append(
        self,
        bands: Iterator[npt.NDArray[Any]],
        matrix: FloatArray,
        src_shape: tuple[int, int],
        weight: float,
        name: str,
        interpolation: Interpolation,
        normalization: dict[str, Any] | None = None,
        mosaic: MosaicLayout | None = None,
    ) -> int:
        """Write a frame delivered as consecutive row bands (or, for a mosaic, its codes in one
        piece), then index it."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and > 0, not {weight}")
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (2, 3):
            raise ValueError(f"matrix must be (2, 3), not {m.shape}")
        footprint(m, src_shape, self.shape, 0, 0, interpolation=interpolation)  # validates
        index = len(self._frames)
        # numbered after the highest file indexed: after a salvage dropped a frame, numbers and
        # positions differ, and a new frame must never overwrite a kept one
        number = 1 + max((_file_number(f.file) for f in self._frames), default=-1)
        record = StoredFrame(
            file=f"frame_{number:06d}.u16",
            matrix=(
                (float(m[0, 0]), float(m[0, 1]), float(m[0, 2])),
                (float(m[1, 0]), float(m[1, 1]), float(m[1, 2])),
            ),
            src_shape=(int(src_shape[0]), int(src_shape[1])),
            weight=float(weight),
            name=str(name),
            interpolation=interpolation,
            normalization=normalization,
            mosaic=mosaic,
        )
        written = 0
        with atomic_path(self.directory / record.file) as tmp, open(tmp, "wb") as fh:
            if mosaic is not None:
                fh.write(next(bands).data)
                written = self.shape[0]
                bands = iter(())
            for band in bands:
                if band.shape[1:] != (self.shape[1], self.channels):
                    raise ValueError(f"band shape {band.shape} does not fit the store")
                # fh.write, not ndarray.tofile: a full disk then raises OSError(ENOSPC)
                fh.write(_quantise(band).data)
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
        with self.reader(i) as reader:
            reader.read(start, stop, out)
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

    def footprint_spans(
        self, i: int, row_start: int, row_stop: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Frame ``i``'s coverage of reference rows row_start:row_stop as one run per row.

        Returns ``(first, stop)``, each (band_rows,) int64: row ``r`` is covered on columns
        ``first[r]:stop[r]`` (empty when equal), exactly :meth:`footprint_band`'s True pixels,
        in O(rows) without the (band_rows, cols) mask.
        """
        record = self._frames[i]
        start, stop, _ = slice(row_start, row_stop).indices(self.shape[0])
        return footprint_spans(
            np.array(record.matrix),
            record.src_shape,
            self.shape[1],
            start,
            max(stop, start),
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

    def _load_index(self, index: Path, salvage: bool) -> None:
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
        for i, record in enumerate(frames):
            path = self.directory / record.file
            size = record.src_shape[0] * record.src_shape[1] * 2 if record.mosaic else None
            if not path.is_file() or path.stat().st_size != (size or self.frame_bytes):
                if not salvage:
                    raise ValueError(
                        f"store {self.directory}: {record.file} is missing or truncated"
                    )
                self.damaged.append(i)
        self._frames = frames


def _file_number(name: str) -> int:
    """The number of a stored frame's file, ``frame_000012.u16`` -> 12 (-1 if not one)."""
    match = re.fullmatch(r"frame_(\d+)\.u16", name)
    return int(match.group(1)) if match else -1


class _FrameReader:
    """An open stored frame, read in row chunks through one small reused uint16 buffer."""

    def __init__(self, store: FrameStore, i: int) -> None:
        self._cols, self._channels = store.shape[1], store.channels
        self._chunk = min(
            store.shape[0], max(1, _READ_CHUNK_SAMPLES // (self._cols * self._channels))
        )
        self._raw = np.empty((self._chunk, self._cols, self._channels), dtype=np.uint16)
        self._fh = open(store.directory / store.frame(i).file, "rb", buffering=0)  # noqa: SIM115

    def __enter__(self) -> _FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def read(self, start: int, stop: int, out: FloatArray) -> None:
        """Rows start:stop (valid, start < stop) into ``out``, (stop - start, cols, C) float."""
        self._fh.seek(start * self._cols * self._channels * 2)
        for a in range(0, stop - start, self._chunk):
            b = min(a + self._chunk, stop - start)
            part = self._raw[: b - a]
            _read_exactly(self._fh, part)
            if out.dtype == np.float32:
                np.copyto(out[a:b], part)  # exact, then one float32 multiply in place
                np.multiply(out[a:b], _DEQUANT, out=out[a:b])
            else:
                np.multiply(part, _DEQUANT, out=out[a:b], dtype=np.float32)


class _MosaicReader:
    """An open frame stored as its mosaic: demosaiced, warped and normalized when read.

    Reference rows are computed in fixed blocks of :data:`_MOSAIC_BLOCK_ROWS` (block ``k`` is
    rows ``k * B .. (k + 1) * B``), each from the mosaic rows it needs, and the last block is
    kept: whatever bands a reader asks for, every reference row comes out of the same
    computation, bit for bit (the live stack's bands and the final combine's differ).
    """

    def __init__(self, store: FrameStore, i: int) -> None:
        record = store.frame(i)
        assert record.mosaic is not None
        self._record, self._layout = record, record.mosaic
        self._shape, self._cols = store.shape, store.shape[1]
        self._matrix = np.array(record.matrix)
        self._norm = (
            Normalization.from_json(record.normalization, 3) if record.normalization else None
        )
        self._fh = open(store.directory / record.file, "rb", buffering=0)  # noqa: SIM115
        self._block: tuple[int, npt.NDArray[np.float32]] | None = None

    def __enter__(self) -> _MosaicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def read(self, start: int, stop: int, out: FloatArray) -> None:
        """Reference rows start:stop into ``out``, (stop - start, cols, 3) float32 or float64."""
        rows = _MOSAIC_BLOCK_ROWS
        for k in range(start // rows, (stop - 1) // rows + 1):
            block = self._compute(k)
            a, b = max(start, k * rows), min(stop, (k + 1) * rows)
            out[a - start : b - start] = block[a - k * rows : b - k * rows]

    def _compute(self, k: int) -> npt.NDArray[np.float32]:
        if self._block is not None and self._block[0] == k:
            return self._block[1]
        rows, cols = self._shape
        r0, r1 = k * _MOSAIC_BLOCK_ROWS, min(rows, (k + 1) * _MOSAIC_BLOCK_ROWS)
        src_rows, src_cols = self._record.src_shape
        interpolation = self._record.interpolation
        y0, y1 = source_rows(
            self._matrix, (src_rows, src_cols), cols, r0, r1, interpolation=interpolation
        )
        if y1 <= y0:
            block = np.zeros((r1 - r0, cols, 3), np.float32)
        else:
            # the demosaic's own context rows around y0:y1, from an even row (the phase)
            w0, w1 = max(0, y0 - _DEMOSAIC_CONTEXT) & ~1, min(src_rows, y1 + _DEMOSAIC_CONTEXT)
            codes = np.empty((w1 - w0, src_cols), np.uint16)
            self._fh.seek(w0 * src_cols * 2)
            _read_exactly(self._fh, codes)
            layout = self._layout
            rgb = demosaic_rows(
                codes, layout.pattern, layout.white_balance, layout.demosaic, y0 - w0, y1 - w0
            )
            block = warp_crop_rows(
                rgb,
                y0,
                (src_rows, src_cols),
                self._matrix,
                self._shape,
                r0,
                r1,
                interpolation=interpolation,
            )
            if self._norm is not None and not self._norm.is_identity:
                self._norm.apply(block, r0, self._shape)
                first, end = footprint_spans(
                    self._matrix, (src_rows, src_cols), cols, r0, r1, interpolation=interpolation
                )
                for r in range(r1 - r0):
                    block[r, : first[r]] = 0.0
                    block[r, end[r] :] = 0.0
        self._block = (k, block)
        return block


def _read_exactly(fh: io.FileIO, buffer: npt.NDArray[np.uint16]) -> None:
    """Fill ``buffer`` (C-contiguous) from ``fh``; a short file is an error, not zeros."""
    view = buffer.data.cast("B")
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise ValueError(f"{fh.name}: frame file is truncated")
        done += got


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
        return self._add(_ArraySource(data, fp))

    def catch_up(self) -> int:
        """Add the store's frames this stack has not seen yet (after resuming from a checkpoint).

        Returns the number of frames added.
        """
        if self.store is None:
            raise ValueError("catch_up needs a store")
        store = self.store
        added = 0
        while self.frames < len(store):
            with _StoreSource(store, self.frames) as source:
                self._add(source)
            added += 1
        return added

    def result(self) -> npt.NDArray[np.float32]:
        """(rows, cols, C) float32 current stack; NaN where no sample was accepted."""
        out = self._mean.copy()
        band = self._band_rows()
        for r0 in range(0, self.shape[0], band):
            np.copyto(out[r0 : r0 + band], np.nan, where=self._count[r0 : r0 + band] == 0)
        return out

    def result_band(self, row_start: int, row_stop: int) -> npt.NDArray[np.float32]:
        """Rows ``row_start:row_stop`` of :meth:`result` (a copy; for streaming writers)."""
        out = self._mean[row_start:row_stop].copy()
        np.copyto(out, np.nan, where=self._count[row_start:row_stop] == 0)
        return out

    def preview_image(self, width: int) -> npt.NDArray[np.float32]:
        """The current stack shrunk to ``width`` columns, built band by band (a few MB).

        Equals ``cv2.resize(self.result(), (width, height), interpolation=cv2.INTER_AREA)``
        with ``height = max(1, round(rows * width / cols))`` (what
        :func:`nightstack.writers.write_preview` does to a full-size image) up to float32
        rounding (measured: identical except where OpenCV takes its integer-factor shortcut,
        within 1e-6 relative there), NaN wherever an averaged pixel had no accepted sample, as
        OpenCV propagates it. The full-size :meth:`result` (288 MB at 24 MP RGB) is never
        formed: rows are averaged across with OpenCV band by band, and down with OpenCV's own
        area weights. Never enlarges: for ``width >= cols`` this is :meth:`result`.

        Returns
        -------
        ndarray
            (height, width, C) float32, linear.
        """
        if width < 1:
            raise ValueError(f"preview width must be >= 1, not {width}")
        rows, cols = self.shape
        channels = self.channels
        if width >= cols:
            return self.result()
        height = max(1, round(rows * width / cols))
        first, weights = _area_weights(rows, height)
        taps = np.count_nonzero(weights, axis=1)
        out = np.empty((height, width, channels), dtype=np.float32)
        per_band = max(1, _PREVIEW_BAND_SAMPLES * height // (rows * cols * channels))
        for d0 in range(0, height, per_band):
            d1 = min(d0 + per_band, height)
            s0, s1 = int(first[d0]), int(np.max(first[d0:d1] + taps[d0:d1]))
            mean = self._mean[s0:s1].copy()
            np.copyto(mean, np.nan, where=self._count[s0:s1] == 0)
            across = cv2.resize(mean, (width, s1 - s0), interpolation=cv2.INTER_AREA)
            across = np.asarray(across, dtype=np.float32).reshape(s1 - s0, width, channels)
            del mean
            # down, in OpenCV's order per output row: sum = w0 row0, sum += w1 row1, ...
            for k in range(int(taps[d0:d1].max())):
                dst = d0 + np.flatnonzero(taps[d0:d1] > k)
                term = across[first[dst] + k - s0]
                term *= weights[dst, k][:, np.newaxis, np.newaxis]
                if k == 0:
                    out[dst] = term
                else:
                    out[dst] += term
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

    def _add(self, source: Callable[[int, int, _Scratch], tuple[FloatArray, _Cover]]) -> int:
        """Add the next frame, delivered band by band by ``source(row_start, row_stop, scratch)``.

        The source returns the band's (band_rows, cols * C) float32 samples and its coverage.
        """
        if self.frames >= _MAX_FRAMES:
            raise ValueError(f"a live stack holds at most {_MAX_FRAMES} frames")
        number = self.frames + 1
        if number == self.warmup:
            self.frames = number
            rejected = self._rebuild_from_warmup()
        else:
            testing = self.warmed_up
            rows = self._band_rows()
            scratch = _Scratch(rows, self.shape[1] * self.channels)
            if testing:
                scratch.sure = self._sure_row(self.frames)
            rejected = 0
            for r0 in range(0, self.shape[0], rows):
                r1 = min(r0 + rows, self.shape[0])
                x, cover = source(r0, r1, scratch)
                rejected += self._update_band(r0, r1, x, cover, testing, scratch)
            self.frames = number
        self.rejected += rejected
        return rejected

    def _update_band(
        self,
        r0: int,
        r1: int,
        x: npt.NDArray[np.float32],
        cover: _Cover,
        testing: bool,
        scratch: _Scratch,
    ) -> int:
        """Welford update of rows r0:r1 with rejection; all work in the band's scratch buffers.

        ``x`` is the band's (band_rows, cols * C) float32 samples, finite everywhere. Every
        sample goes through the same few whole-band operations (no masked ufunc: those are
        several times slower); absent and rejected samples get a zero deviation, so their mean
        and ``M2`` change by +-0, i.e. not at all, and their count is taken back. The divisor
        is ``n + 1`` everywhere (>= 1, no 0/0), which is the new count wherever the sample is
        accepted: bit for bit the same as updating the accepted samples alone.
        """
        rows = r1 - r0
        width = self.shape[1] * self.channels
        mean = self._mean[r0:r1].reshape(rows, width)
        m2 = self._m2[r0:r1].reshape(rows, width)
        count = self._count[r0:r1].reshape(rows, width)
        delta, t = scratch.delta[:rows], scratch.t[:rows]
        np.subtract(x, mean, out=delta)
        cover.zero_outside(delta)
        rejects = _NO_INDEX
        if testing:
            np.square(delta, out=t)
            rejects = self._judge(t, count, m2, scratch)
        np.add(count, 1, out=count)
        np.copyto(t, count)  # n + 1: the new count of every accepted sample, >= 1 everywhere
        cover.uncount(count)
        if rejects.size:
            count.reshape(-1)[rejects] -= 1
            delta.reshape(-1)[rejects] = 0.0
        np.divide(delta, t, out=t)
        np.add(mean, t, out=mean)
        np.subtract(x, mean, out=t)  # x - new mean
        t *= delta  # +-0 where delta is 0: x is finite everywhere
        np.add(m2, t, out=m2)
        return int(rejects.size)

    def _sure_row(self, frames: int) -> npt.NDArray[np.float32]:
        """(cols * C,) float32 bound at or below which no sample's (x - mean)^2 is rejected.

        The threshold ``kappa^2 (1 + 1/n) max(M2 / (n - 1), floor^2)``, computed in float32 as
        ``((1/n + 1) * max(...)) * kappa^2``, is never below ``((1/N + 1) * floor^2) * kappa^2``
        for ``n <= N`` (every operand is positive and float rounding is monotonic), and no count
        exceeds ``N`` = the frames added so far.
        """
        inverse = np.reciprocal(np.float32(max(frames, 1)))
        factor = np.float32(inverse + np.float32(1))
        sure = np.multiply(self._floor_sq_row, factor)
        sure *= np.float32(self.kappa**2)
        return sure

    def _judge(
        self,
        d2: npt.NDArray[np.float32],
        count: npt.NDArray[np.uint16],
        m2: npt.NDArray[np.float32],
        scratch: _Scratch,
    ) -> npt.NDArray[np.intp]:
        """Flat indices of the band's samples the rejection test rejects (ascending).

        ``d2`` is (x - mean)^2, 0 for absent samples. Only the samples above
        :meth:`_sure_row` can be rejected; the exact threshold is computed for them alone (for
        the whole band when they are many), with the same float32 operations in the same order
        as for every sample, so the decisions are those of the documented test, bit for bit.
        """
        flag = scratch.flag[: d2.shape[0]]
        np.greater(d2, scratch.sure, out=flag)
        candidates = np.flatnonzero(flag)
        if candidates.size == 0:
            return _NO_INDEX
        kappa_sq = np.float32(self.kappa**2)
        if candidates.size > _DENSE_FRACTION * d2.size:
            u, v = scratch.u[: d2.shape[0]], scratch.v[: d2.shape[0]]
            np.copyto(u, count)
            np.maximum(u, 2, out=u)  # pixels with fewer than 3 others are not judged
            np.subtract(u, 1, out=v)
            np.divide(m2, v, out=v)
            np.maximum(v, self._floor_sq_row, out=v)
            np.reciprocal(u, out=u)
            u += 1
            u *= v
            u *= kappa_sq
            np.greater(d2, u, out=flag)
            judged = scratch.judged[: d2.shape[0]]
            np.greater_equal(count, _MIN_TEST_COUNT, out=judged)
            flag &= judged
            return np.flatnonzero(flag)
        n_old = count.reshape(-1)[candidates]
        n = np.maximum(n_old, 2).astype(np.float32)
        var = m2.reshape(-1)[candidates] / (n - 1)
        np.maximum(var, self._floor_sq_row[candidates % d2.shape[1]], out=var)
        threshold = np.reciprocal(n)
        threshold += 1
        threshold *= var
        threshold *= kappa_sq
        outside = d2.reshape(-1)[candidates] > threshold
        outside &= n_old >= _MIN_TEST_COUNT
        rejects: npt.NDArray[np.intp] = candidates[outside]
        return rejects

    def _rebuild_from_warmup(self) -> int:
        """Judge the warm-up frames as a batch, rebuild mean, M2 and count from the survivors."""
        n = self.warmup
        rows, cols = self.shape
        channels = self.channels
        width = cols * channels
        # the floor comes from the first warmup - 1 frames, accumulated plainly
        floor_sq_row = np.tile(np.square(self._typical_std_floor()), cols)
        per_plane = min(_WARMUP_BAND_SAMPLES, _WARMUP_CAP_BYTES // (n * _WARMUP_BYTES_PER_SAMPLE))
        band = max(1, per_plane // width)
        work = _BatchScratch(n, band, width)
        spans = None
        readers: list[_FrameReader | _MosaicReader] = []
        if self.store is not None:
            spans = [self.store.footprint_spans(i, 0, rows) for i in range(n)]
            readers = [self.store.reader(i) for i in range(n)]
        rejected = 0
        for r0 in range(0, rows, band):
            r1 = min(r0 + band, rows)
            cube, valid = work.cube[:, : r1 - r0], work.valid[:, : r1 - r0]
            for i in range(n):
                if spans is not None:
                    first, stop = spans[i][0][r0:r1], spans[i][1][r0:r1]
                    if np.any(stop > first):
                        readers[i].read(r0, r1, cube[i].reshape(-1, cols, channels))
                    cover = _SpanCover(first, stop, cols, channels)
                    valid[i].fill(True)
                    cover.zero_outside(valid[i])
                    cover.zero_outside(cube[i])  # absent samples are exactly 0 in every sum
                    continue
                frame, frame_fp = self._pending[i]
                np.copyto(cube[i].reshape(-1, cols, channels), frame[r0:r1])
                plane = valid[i].reshape(-1, cols, channels)
                for c in range(channels):  # broadcasting along the 3-long channel axis is slow
                    plane[:, :, c] = frame_fp[r0:r1]
                cube[i] *= valid[i]  # absent samples are exactly 0 in every sum below
            rejected += _batch_clip(
                cube,
                valid,
                self.kappa,
                floor_sq_row,
                work,
                self._mean[r0:r1].reshape(r1 - r0, width),
                self._m2[r0:r1].reshape(r1 - r0, width),
                self._count[r0:r1].reshape(r1 - r0, width),
            )
        for reader in readers:
            reader.__exit__()
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


def _area_weights(src: int, dst: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """OpenCV's INTER_AREA weights for shrinking ``src`` samples to ``dst`` (``dst <= src``).

    Output sample ``j`` is ``sum_k weights[j, k] * input[first[j] + k]`` over its nonzero
    weights, which are consecutive: the input interval ``[j s, (j + 1) s)``, ``s = src / dst``,
    each sample weighted by its overlap, normalised by the interval's length; overlaps of 1e-3
    or less are dropped. As OpenCV's ``computeResizeAreaTab`` (same double arithmetic, weights
    rounded to float32).
    """
    scale = 1.0 / (dst / src)
    taps = math.ceil(scale) + 1
    first = np.zeros(dst, dtype=np.intp)
    weights = np.zeros((dst, taps), dtype=np.float32)
    for j in range(dst):
        f1 = j * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s2 = min(math.floor(f2), src - 1)
        s1 = min(math.ceil(f1), s2)
        row: list[float] = []
        first[j] = s1
        if s1 - f1 > 1e-3:
            first[j] = s1 - 1
            row.append((s1 - f1) / cell)
        row.extend(1.0 / cell for _ in range(s1, s2))
        if f2 - s2 > 1e-3:
            row.append(min(min(f2 - s2, 1.0), cell) / cell)
        weights[j, : len(row)] = row
    return first, weights


class _BatchScratch:
    """Buffers for :func:`_batch_clip` on bands of up to ``rows`` rows of ``n`` frames."""

    def __init__(self, n: int, rows: int, width: int) -> None:
        self.cube = np.empty((n, rows, width), dtype=np.float32)
        self.d2 = np.empty((n, rows, width), dtype=np.float32)
        self.valid = np.empty((n, rows, width), dtype=bool)
        self.keep = np.empty((n, rows, width), dtype=bool)
        plane = (rows, width)
        self.flag = np.empty(plane, dtype=bool)
        self.tally = np.empty(plane, dtype=np.uint16)
        self.count, self.mean, self.q = (np.empty(plane, dtype=np.float32) for _ in range(3))
        self.others, self.others_m1 = (np.empty(plane, dtype=np.float32) for _ in range(2))
        self.ratio, self.ratio_sq = (np.empty(plane, dtype=np.float32) for _ in range(2))
        self.factor, self.sure, self.t = (np.empty(plane, dtype=np.float32) for _ in range(3))


def _batch_clip(
    cube: npt.NDArray[np.float32],
    valid: BoolArray,
    kappa: float,
    floor_sq: npt.NDArray[np.float32],
    work: _BatchScratch,
    mean_out: npt.NDArray[np.float32],
    m2_out: npt.NDArray[np.float32],
    count_out: npt.NDArray[np.uint16],
) -> int:
    """The warm-up batch clip of one band; writes the survivors' statistics, returns rejections.

    Each sample is judged with the live rejection test against the other samples of its pixel.
    With ``d`` a sample's deviation from the mean of all ``c`` samples of its pixel, ``Q`` the
    sum of squared deviations and ``k = c - 1`` the others: the others' mean is ``-d / k`` (the
    deviations sum to 0), so ``x - mean_others = d c / k`` and the others' ``M2 = Q - d^2 c / k``.
    A sample is rejected when ``k >= 3`` (:data:`_MIN_TEST_COUNT`) and
    ``(d c / k)^2 > kappa^2 (1 + 1/k) max(M2 / (k - 1), floor^2)``, the running test. Then the
    mean, sum of squared deviations and count of the survivors (0, 0, 0 if none).

    In float32, in this order: ``mean = sum(x) / max(c, 1)``; ``Q = sum(d^2)``; threshold
    ``((Q - d^2 (c / k)) / (k - 1)`` at least ``floor^2``, times ``fl(kappa^2 (k + 1)) / k``,
    against ``d^2 (c / k)^2``; survivors' ``mean = sum(x) / max(n, 1)``,
    ``M2 = sum((x - mean)^2)``. The threshold is never below ``floor^2`` times its factor
    (rounding is monotonic), so it is computed only for the few samples above that; a pixel
    without rejections keeps the first mean and ``Q`` (the same sums).

    Parameters
    ----------
    cube : ndarray
        (n, rows, K) float32 samples along axis 0, absent ones exactly 0.
    valid : ndarray
        (n, rows, K) bool, False for absent samples.
    kappa : float
        Threshold in standard deviations.
    floor_sq : ndarray
        (K,) float32 squared std floor per column (> 0).
    work : _BatchScratch
        Buffers of at least these sizes.
    mean_out, m2_out, count_out : ndarray
        (rows, K) float32, float32, uint16: the band's statistics, overwritten.
    """
    n, rows = cube.shape[0], cube.shape[1]
    d2, keep = work.d2[:, :rows], work.keep[:, :rows]
    flag, tally = work.flag[:rows], work.tally[:rows]
    count, mean, q = work.count[:rows], work.mean[:rows], work.q[:rows]
    others, others_m1 = work.others[:rows], work.others_m1[:rows]
    ratio, ratio_sq = work.ratio[:rows], work.ratio_sq[:rows]
    factor, sure, t = work.factor[:rows], work.sure[:rows], work.t[:rows]
    # sums run over the frames in order, as numpy's sum along axis 0 does
    tally.fill(0)
    for j in range(n):
        np.add(tally, valid[j], out=tally)
    np.copyto(mean, cube[0])
    for j in range(1, n):
        mean += cube[j]
    np.copyto(count, tally)
    np.maximum(count, 1, out=t)
    mean /= t
    q.fill(0.0)
    for j in range(n):
        np.subtract(cube[j], mean, out=d2[j])
        d2[j] *= valid[j]
        np.square(d2[j], out=d2[j])
        q += d2[j]
    np.subtract(count, 1, out=others)
    np.maximum(others, 2, out=others)  # pixels with fewer than 3 others are not judged
    np.subtract(others, 1, out=others_m1)
    np.divide(count, others, out=ratio)
    np.square(ratio, out=ratio_sq)
    np.add(others, 1, out=factor)
    factor *= np.float32(kappa**2)
    factor /= others
    np.multiply(factor, floor_sq, out=sure)
    np.copyto(sure, np.inf, where=others < _MIN_TEST_COUNT)  # not judged: never a candidate
    np.copyto(keep, valid)
    flat_q, flat_ratio, flat_ratio_sq = q.reshape(-1), ratio.reshape(-1), ratio_sq.reshape(-1)
    flat_om1, flat_factor = others_m1.reshape(-1), factor.reshape(-1)
    touched: list[npt.NDArray[np.intp]] = []
    for j in range(n):
        np.multiply(d2[j], ratio_sq, out=t)  # (x - mean_others)^2
        np.greater(t, sure, out=flag)  # 0 for an absent sample: never
        candidates = np.flatnonzero(flag)
        if candidates.size == 0:
            continue
        dd = d2[j].reshape(-1)[candidates]
        threshold = dd * flat_ratio[candidates]
        threshold = flat_q[candidates] - threshold  # the others' M2
        threshold /= flat_om1[candidates]
        # no max(., floor^2) needed here: where it would apply, the threshold is `sure`,
        # which every candidate exceeds, and without it the threshold is only lower
        threshold *= flat_factor[candidates]
        dd *= flat_ratio_sq[candidates]
        rejects = candidates[dd > threshold]
        keep[j].reshape(-1)[rejects] = False
        touched.append(rejects)
    np.copyto(mean_out, mean)
    np.copyto(m2_out, q)
    np.copyto(count_out, tally)
    if not touched:
        return 0
    flag.fill(False)
    for rejects in touched:
        flag.reshape(-1)[rejects] = True
    pixels = np.flatnonzero(flag)
    # the survivors' statistics where some sample was rejected (a masked sum starts from 0)
    x = cube.reshape(n, -1)[:, pixels]
    kept = keep.reshape(n, -1)[:, pixels]
    survivors = np.count_nonzero(kept, axis=0)
    total = np.zeros(pixels.size, dtype=np.float32)
    for j in range(n):
        total += x[j] * kept[j]
    total /= np.maximum(survivors, 1).astype(np.float32)  # 0 where no survivor: the sum is 0
    m2 = np.zeros(pixels.size, dtype=np.float32)
    for j in range(n):
        dev = x[j] - total
        dev *= kept[j]
        m2 += np.square(dev)
    mean_out.reshape(-1)[pixels] = total
    m2_out.reshape(-1)[pixels] = m2
    count_out.reshape(-1)[pixels] = survivors
    return int(sum(r.size for r in touched))


class _SpanCover:
    """A band's coverage as one run of columns per row (a stored frame's footprint)."""

    def __init__(
        self, first: npt.NDArray[np.int64], stop: npt.NDArray[np.int64], cols: int, channels: int
    ) -> None:
        width = cols * channels
        lo = first * channels
        hi = stop * channels
        self._left = int(lo.max(initial=0))
        self._right = int(hi.min(initial=width))
        # absent samples: columns before the run (left strip) or from its end (right strip);
        # the two conditions are disjoint since stop >= first
        self._left_mask = np.arange(self._left) < lo[:, np.newaxis]
        self._right_mask = np.arange(self._right, width) >= hi[:, np.newaxis]

    def zero_outside(self, a: npt.NDArray[Any]) -> None:
        """Set the absent samples of the (band_rows, cols * C) array ``a`` to 0 (False)."""
        if self._left:
            a[:, : self._left][self._left_mask] = 0.0
        if self._right < a.shape[1]:
            a[:, self._right :][self._right_mask] = 0.0

    def uncount(self, count: npt.NDArray[np.uint16]) -> None:
        """Subtract 1 from the absent samples of the (band_rows, cols * C) ``count``."""
        if self._left:
            left = count[:, : self._left]
            np.subtract(left, self._left_mask, out=left)
        if self._right < count.shape[1]:
            right = count[:, self._right :]
            np.subtract(right, self._right_mask, out=right)


class _MaskCover:
    """A band's coverage as a (band_rows, cols) bool footprint (any shape)."""

    def __init__(self, fp: BoolArray, channels: int) -> None:
        rows, cols = fp.shape
        self._absent: BoolArray | None = None
        if not fp.all():
            absent = np.empty((rows, cols, channels), dtype=bool)
            for c in range(channels):  # broadcasting along the 3-long channel axis is slow
                np.logical_not(fp, out=absent[:, :, c])
            self._absent = absent.reshape(rows, cols * channels)

    def zero_outside(self, a: npt.NDArray[np.float32]) -> None:
        if self._absent is not None:
            np.copyto(a, 0.0, where=self._absent)

    def uncount(self, count: npt.NDArray[np.uint16]) -> None:
        if self._absent is not None:
            np.subtract(count, self._absent, out=count)


_Cover = _SpanCover | _MaskCover

_NO_INDEX: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)


class _StoreSource:
    """Band source for ``LiveStack._add`` reading frame ``i`` back from a store.

    A context manager: the frame's file stays open for the bands of one add.
    """

    def __init__(self, store: FrameStore, i: int) -> None:
        self._cols, self._channels = store.shape[1], store.channels
        self._first, self._stop = store.footprint_spans(i, 0, store.shape[0])
        self._reader = store.reader(i)

    def __enter__(self) -> _StoreSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.__exit__()

    def __call__(self, r0: int, r1: int, scratch: _Scratch) -> tuple[FloatArray, _Cover]:
        x = scratch.x[: r1 - r0]
        self._reader.read(r0, r1, x.reshape(r1 - r0, self._cols, self._channels))
        cover = _SpanCover(self._first[r0:r1], self._stop[r0:r1], self._cols, self._channels)
        return x, cover


class _ArraySource:
    """Band source for ``LiveStack._add`` from an in-memory frame and its footprint mask.

    The band is copied (as float32) so that it can be zeroed outside the footprint.
    """

    def __init__(self, data: FloatArray, fp: BoolArray) -> None:
        self.data = data
        self.fp = fp

    def __call__(self, r0: int, r1: int, scratch: _Scratch) -> tuple[FloatArray, _Cover]:
        x = scratch.x[: r1 - r0]
        np.copyto(x.reshape(self.data[r0:r1].shape), self.data[r0:r1], casting="same_kind")
        cover = _MaskCover(self.fp[r0:r1], self.data.shape[2])
        cover.zero_outside(x)  # the caller's values there may be anything, even NaN
        return x, cover


class _Scratch:
    """Band-sized (band_rows, cols * C) working buffers reused across the bands of one add.

    ``u`` and ``v`` are touched only by bands judged densely, so usually never paged in.
    """

    def __init__(self, rows: int, width: int) -> None:
        shape = (rows, width)
        self.x = np.empty(shape, dtype=np.float32)
        self.delta = np.empty(shape, dtype=np.float32)
        self.t = np.empty(shape, dtype=np.float32)
        self.u = np.empty(shape, dtype=np.float32)
        self.v = np.empty(shape, dtype=np.float32)
        self.flag = np.empty(shape, dtype=bool)
        self.judged = np.empty(shape, dtype=bool)
        self.sure = np.zeros(width, dtype=np.float32)
        """:meth:`LiveStack._sure_row` of this add."""


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
