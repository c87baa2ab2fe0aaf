"""The frame store: every accepted frame on disk, read back band by band on the reference grid.

Two kinds of frame (one file each, ``frame_000000.u16``, and a line in ``index.json``):

- a *mosaic* (:meth:`FrameStore.add_mosaic`, Bayer sensors): the calibrated sensor mosaic as
  16-bit codes (:mod:`nightstack.io.demosaic`), unwarped, 2 bytes a sensor pixel (48 MB at 24 MP),
  with its transform, normalization, pattern, white balance and demosaic method. A reader
  demosaics, warps and normalizes it in fixed blocks of rows, so every reader (the live stack,
  the final combine, a resume) sees the same values bit for bit;
- a *warped* frame (:meth:`FrameStore.add`, :meth:`FrameStore.add_warped`: mono, RGB and
  LibRaw-demosaiced frames): the frame on the reference grid, 2 bytes a sample (144 MB for
  24 MP RGB), value = round(clip(v, 0, 1) * 65535).

All read-back images are (rows, cols, C) on the reference grid, float32 linear, C = 1 or 3, 0
outside the frame's footprint (:mod:`nightstack.registration.warp`), where the frame is *absent*.

Why one module of this size: the frame store's on-disk format, its writers and its band readers
(mosaic and warped frames) must agree byte for byte.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from nightstack.arrays import BoolArray, FloatArray
from nightstack.io.demosaic import check_method, code_gains, demosaic_codes
from nightstack.io.writers import atomic_path, write_json
from nightstack.registration.normalize import Normalization
from nightstack.registration.warp import (
    Interpolation,
    footprint,
    footprint_spans,
    source_rows,
    warp_crop_rows,
    warp_rows,
)

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

_MOSAIC_BLOCK_ROWS = 64
"""Reference rows a mosaic frame is demosaiced and warped in at a time (see MosaicReader):
the mosaic rows a block needs are re-read for its neighbour, so a block much taller than the
rows a rotation spans wastes little (64 rows at 1 degree over 6000 columns: 105 + 64 read)."""

_DEMOSAIC_CONTEXT = 8
"""Mosaic rows read beyond a block's source rows for the demosaic's own context (it needs 4)."""


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
    ``white_balance`` (r, g, b) and OpenCV ``demosaic`` method (:mod:`nightstack.io.demosaic`)."""

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
    def block_rows(self) -> int:
        """Reference rows a stored frame is computed in at a time: a reader asked for a band
        that is a whole number of these blocks (from a multiple of it) computes each block once
        (mosaic frames are demosaiced and warped per block; warped frames read any rows)."""
        return _MOSAIC_BLOCK_ROWS

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
                if normalization is not None:
                    normalization.apply_inside(warped, r0, self.shape, fp)
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
        and normalizes it band by band, the same way for every reader (see :class:`MosaicReader`),
        so the final combine sees exactly the values the live stack saw. Needs a 3-channel store.

        Parameters
        ----------
        codes : ndarray
            (rows, cols) uint16 mosaic codes (:func:`nightstack.io.demosaic.quantise`).
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

    def reader(self, i: int) -> WarpedReader | MosaicReader:
        """An open reader of frame ``i``: ``read(start, stop, out)`` fills reference rows
        ``start:stop`` (valid, ``start < stop``) into ``out`` (float32 or float64). Close it
        (a context manager)."""
        if self._frames[i].mosaic is not None:
            return MosaicReader(self, i)
        return WarpedReader(self, i)

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


class WarpedReader:
    """An open stored frame, read in row chunks through one small reused uint16 buffer."""

    def __init__(self, store: FrameStore, i: int) -> None:
        self._cols, self._channels = store.shape[1], store.channels
        self._chunk = min(
            store.shape[0], max(1, _READ_CHUNK_SAMPLES // (self._cols * self._channels))
        )
        self._raw = np.empty((self._chunk, self._cols, self._channels), dtype=np.uint16)
        self._fh = open(store.directory / store.frame(i).file, "rb", buffering=0)  # noqa: SIM115

    def __enter__(self) -> WarpedReader:
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


def value_gains(
    white_balance: tuple[float, float, float], norm: Normalization | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(scale, offset), each (3,) float32: a stored mosaic frame's ``value = code * scale +
    offset`` per channel, its white balance and its normalization's scale and offset folded in
    (the surface, where there is one, is added apart)."""
    scale, offset = code_gains(white_balance)
    if norm is not None and not norm.is_identity:
        gain = np.asarray(norm.scale, np.float32)
        scale, offset = scale * gain, offset * gain + np.asarray(norm.offset, np.float32)
    return scale, offset


class MosaicReader:
    """An open frame stored as its mosaic: demosaiced, warped and normalized when read.

    Reference rows are computed in fixed blocks of :data:`_MOSAIC_BLOCK_ROWS` (block ``k`` is
    rows ``k * B .. (k + 1) * B``), each from the mosaic rows it needs, and the last block is
    kept: whatever bands a reader asks for, every reference row comes out of the same
    computation, bit for bit (the live stack's bands and the final combine's differ).
    """

    def __init__(
        self,
        store: FrameStore | None,
        i: int = 0,
        *,
        frame: tuple[StoredFrame, tuple[int, int], npt.NDArray[np.uint16]] | None = None,
    ) -> None:
        """Frame ``i`` of ``store``; or, with ``frame = (record, reference shape, codes)``, a
        frame held in memory (a live-only session: see :func:`warp_mosaic`)."""
        self._codes: npt.NDArray[np.uint16] | None = None
        self._fh: io.FileIO | None = None
        if frame is not None:
            record, shape, self._codes = frame
        else:
            assert store is not None
            record, shape = store.frame(i), store.shape
            self._fh = open(store.directory / record.file, "rb", buffering=0)  # noqa: SIM115
        assert record.mosaic is not None
        self._record, self._layout = record, record.mosaic
        self._shape, self._cols = shape, shape[1]
        self._matrix = np.array(record.matrix)
        self._norm = (
            Normalization.from_json(record.normalization, 3) if record.normalization else None
        )
        self._block: tuple[int, npt.NDArray[np.float32]] | None = None

    def __enter__(self) -> MosaicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()

    def _mosaic_rows(self, first: int, stop: int) -> npt.NDArray[np.uint16]:
        if self._codes is not None:
            return self._codes[first:stop]
        assert self._fh is not None
        codes = np.empty((stop - first, self._record.src_shape[1]), np.uint16)
        self._fh.seek(first * self._record.src_shape[1] * 2)
        _read_exactly(self._fh, codes)
        return codes

    def read(self, start: int, stop: int, out: FloatArray) -> None:
        """Reference rows start:stop into ``out``, (stop - start, cols, 3) float32 or float64.

        A whole block wanted in a float32 ``out`` is computed straight into it; the last block
        computed otherwise is kept for the next call (bands that split a block)."""
        rows = _MOSAIC_BLOCK_ROWS
        for k in range(start // rows, (stop - 1) // rows + 1):
            a, b = max(start, k * rows), min(stop, (k + 1) * rows)
            whole = a == k * rows and b == min(self._shape[0], (k + 1) * rows)
            cached = self._block is not None and self._block[0] == k
            if whole and out.dtype == np.float32 and not cached:
                self._compute(k, out[a - start : b - start])
                continue
            block = self._block_of(k)
            out[a - start : b - start] = block[a - k * rows : b - k * rows]

    def _block_of(self, k: int) -> npt.NDArray[np.float32]:
        if self._block is not None and self._block[0] == k:
            return self._block[1]
        r0, r1 = k * _MOSAIC_BLOCK_ROWS, min(self._shape[0], (k + 1) * _MOSAIC_BLOCK_ROWS)
        block = np.empty((r1 - r0, self._cols, 3), np.float32)
        self._compute(k, block)
        self._block = (k, block)
        return block

    def _compute(self, k: int, block: npt.NDArray[np.float32]) -> None:
        """Block ``k`` into ``block`` ((block rows, cols, 3) float32, C-contiguous)."""
        rows, cols = self._shape
        r0, r1 = k * _MOSAIC_BLOCK_ROWS, min(rows, (k + 1) * _MOSAIC_BLOCK_ROWS)
        src_rows, src_cols = self._record.src_shape
        interpolation = self._record.interpolation
        y0, y1 = source_rows(
            self._matrix, (src_rows, src_cols), cols, r0, r1, interpolation=interpolation
        )
        if y1 <= y0:
            block[...] = 0.0
            return
        # the demosaic's own context rows around y0:y1, from an even row (the phase)
        w0, w1 = max(0, y0 - _DEMOSAIC_CONTEXT) & ~1, min(src_rows, y1 + _DEMOSAIC_CONTEXT)
        codes = self._mosaic_rows(w0, w1)
        layout = self._layout
        # demosaic and warp the codes, then one per-channel multiply-add to values (both steps
        # are linear, and so is the normalization's offset and scale, folded into it)
        rgb = demosaic_codes(
            codes, layout.pattern, layout.white_balance, layout.demosaic, y0 - w0, y1 - w0
        )
        warped = warp_crop_rows(
            rgb,
            y0,
            (src_rows, src_cols),
            self._matrix,
            self._shape,
            r0,
            r1,
            interpolation=interpolation,
        )
        del rgb
        scale, offset = value_gains(layout.white_balance, self._norm)
        norm = self._norm
        matrix = np.zeros((3, 4), np.float64)
        matrix[[0, 1, 2], [0, 1, 2]] = scale
        matrix[:, 3] = offset
        if block.flags.c_contiguous:
            cv2.transform(warped, matrix, dst=block)  # OpenCV writes into block's buffer
        else:
            block[...] = cv2.transform(warped, matrix).reshape(block.shape)
        del warped
        if norm is not None and norm.surface is not None:
            norm.apply_surface(block, r0, self._shape)
        # the gains' offset made the pixels outside the footprint nonzero: zero them again
        first, end = footprint_spans(
            self._matrix, (src_rows, src_cols), cols, r0, r1, interpolation=interpolation
        )
        for r in range(r1 - r0):
            block[r, : first[r]] = 0.0
            block[r, end[r] :] = 0.0


def warp_mosaic(
    codes: npt.NDArray[np.uint16],
    layout: MosaicLayout,
    matrix: FloatArray,
    shape: tuple[int, int],
    *,
    interpolation: Interpolation = "bilinear",
    normalization: Normalization | None = None,
) -> tuple[npt.NDArray[np.float32], BoolArray]:
    """A mosaic frame demosaiced, warped onto the reference grid and normalized, as a whole:
    exactly what :meth:`FrameStore.read_band` gives for it once stored (the same blocks), for a
    live stack without a store (:meth:`nightstack.stacking.live.LiveStack.add`).

    Returns ``(warped, footprint)``: (rows, cols, 3) float32, 0 outside the footprint, and
    (rows, cols) bool.
    """
    m = np.asarray(matrix, np.float64)
    record = StoredFrame(
        file="",
        matrix=((m[0, 0], m[0, 1], m[0, 2]), (m[1, 0], m[1, 1], m[1, 2])),
        src_shape=(int(codes.shape[0]), int(codes.shape[1])),
        weight=1.0,
        name="",
        interpolation=interpolation,
        normalization=None if normalization is None else normalization.as_json(),
        mosaic=layout,
    )
    out = np.empty((*shape, 3), np.float32)
    reader = MosaicReader(None, frame=(record, shape, np.ascontiguousarray(codes)))
    reader.read(0, shape[0], out)
    fp = footprint(m, record.src_shape, shape, 0, shape[0], interpolation=interpolation)
    return out, fp


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


Reader = WarpedReader | MosaicReader
"""An open stored frame (:meth:`FrameStore.reader`)."""
