"""The live stack's crash state on disk: a checkpoint that a resume restores bit for bit.

``checkpoint/live/``: the arrays of :class:`~nightstack.stacking.live.LiveState` as
``<name>.<generation>.npy`` and ``live.json`` naming the generation. Arrays go to new files
first, then ``live.json`` is replaced atomically, then older generations are deleted: a crash at
any point leaves a loadable checkpoint (the old one or the new one). A checkpoint writes the
live state, 4 + 2 + 2 / C bytes per pixel and channel (6.67 for RGB: 480 MB at 24 MP); between
checkpoints a resume re-adds the later frames from the frame store.

Format version 2 (per-pixel counts and coded variances); a checkpoint of another version (an
older nightstack's 10-byte state) is refused with a ``ValueError``, like a damaged one, and the
session rebuilds its live stack from the frame store.

A live drizzle (:class:`~nightstack.stacking.live_drizzle.LiveDrizzle`) is checkpointed the same
way (format ``nightstack-livedrizzle``): its mean, weight and pooled variance codes (6.67 bytes
a sample of the output grid, as the live stack's) and, store-less during its warm-up, the
pending frames' mosaics (``codesN``, 2 bytes a sensor pixel) with their records in
``live.json``. :func:`load_live` gives back whichever kind was saved.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from nightstack.io.writers import atomic_path, write_json
from nightstack.stacking.drizzle import Drizzle
from nightstack.stacking.live import LiveStack, LiveState
from nightstack.stacking.live_drizzle import DrizzleState, Live, LiveDrizzle
from nightstack.stacking.store import FrameStore, StoredFrame

_LIVE_MANIFEST = "live.json"
_LIVE_FILE = re.compile(r"^(mean|spread|m2|count|weight|warm\d+|warmfp\d+|codes\d+)\.(\d+)\.npy$")
"""The arrays' files (``m2``: version 1's, deleted by the next save)."""

_VERSION = 2
"""Checkpoint format: 2 = mean, coded variance ("spread") and per-pixel count (1 = M2 and
counts per sample, unreadable now)."""

_DRIZZLE_FORMAT = "nightstack-livedrizzle"

_DRIZZLE_VERSION = 1
"""A live drizzle's checkpoint format: 1 = mean, coded weight sums, coded pooled variance."""


def save_live(live: Live, directory: str | Path) -> None:
    """Checkpoint ``live``'s exact state into ``directory`` (created if missing)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    manifest = d / _LIVE_MANIFEST
    generation = 1
    if manifest.exists():
        generation = int(json.loads(manifest.read_text())["generation"]) + 1
    arrays: dict[str, npt.NDArray[Any]]
    if isinstance(live, LiveDrizzle):
        drizzled = live.state()
        arrays = {"mean": drizzled.mean, "spread": drizzled.spread, "weight": drizzled.weight}
        for j, (_, codes) in enumerate(drizzled.pending):
            arrays[f"codes{j}"] = codes
        commit = partial(_write_drizzle_manifest, manifest, live, generation)
    else:
        state = live.state()
        arrays = {"mean": state.mean, "spread": state.spread, "count": state.count}
        for j, (frame, fp) in enumerate(state.pending):
            arrays[f"warm{j}"] = frame
            arrays[f"warmfp{j}"] = fp
        commit = partial(_write_manifest, manifest, live, generation)
    files: dict[str, str] = {}
    try:
        for key, array in arrays.items():
            files[key] = f"{key}.{generation}.npy"
            with atomic_path(d / files[key]) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
    except BaseException:
        for name in files.values():  # a new generation cut short (disk full) frees its space
            (d / name).unlink(missing_ok=True)
        raise
    commit(files)  # the manifest: the commit point
    for path in d.iterdir():
        match = _LIVE_FILE.match(path.name)
        if match and int(match.group(2)) != generation:
            path.unlink(missing_ok=True)


def _write_manifest(
    manifest: Path, live: LiveStack, generation: int, files: dict[str, str]
) -> None:
    """``live.json``: the commit point of a checkpoint generation."""
    state = live.state()
    write_json(
        manifest,
        {
            "format": "nightstack-livestack",
            "version": _VERSION,
            "generation": generation,
            "shape": list(live.shape),
            "channels": live.channels,
            "kappa": live.kappa,
            "warmup": live.warmup,
            "frames": state.frames,
            "rejected": state.rejected,
            "floor": [float(v) for v in state.floor],
            "pending": len(state.pending),
            "files": files,
        },
    )


def _write_drizzle_manifest(
    manifest: Path, live: LiveDrizzle, generation: int, files: dict[str, str]
) -> None:
    """``live.json`` of a live drizzle: the commit point of a checkpoint generation."""
    state = live.state()
    write_json(
        manifest,
        {
            "format": _DRIZZLE_FORMAT,
            "version": _DRIZZLE_VERSION,
            "generation": generation,
            "reference": list(live.reference),
            "scale": live.drizzle.scale,
            "drop": live.drizzle.drop,
            "kappa": live.kappa,
            "warmup": live.warmup,
            "frames": state.frames,
            "rejected": state.rejected,
            "floor": [float(v) for v in state.floor],
            "pending": [record.as_json() for record, _ in state.pending],
            "files": files,
        },
    )


def _load_drizzle(d: Path, meta: dict[str, Any], store: FrameStore | None) -> LiveDrizzle:
    if meta.get("version") != _DRIZZLE_VERSION:
        raise ValueError(
            f"{d} holds a version {meta.get('version')} live-drizzle checkpoint, "
            f"not {_DRIZZLE_VERSION}"
        )
    stack = LiveDrizzle(
        (meta["reference"][0], meta["reference"][1]),
        Drizzle(int(meta["scale"]), float(meta["drop"])),
        kappa=meta["kappa"],
        warmup=meta["warmup"],
        store=store,
    )
    files = meta["files"]
    full = (*stack.shape, 3)
    records = [StoredFrame.from_json(obj) for obj in meta["pending"]]
    stack.restore(
        DrizzleState(
            _load_array(d, files["mean"], np.float32, full),
            _load_array(d, files["spread"], np.uint16, stack.shape),
            _load_array(d, files["weight"], np.uint16, full),
            np.array(meta["floor"], dtype=np.float32),
            [
                (record, _load_array(d, files[f"codes{j}"], np.uint16, tuple(record.src_shape)))
                for j, record in enumerate(records)
            ],
            int(meta["frames"]),
            int(meta["rejected"]),
        )
    )
    return stack


def _load_array(d: Path, name: str, dtype: type, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    array = np.load(d / name, allow_pickle=False)
    if array.dtype != dtype or array.shape != shape:
        raise ValueError(f"checkpoint {d}: {name} is {array.dtype} {array.shape}")
    return array


def load_live(directory: str | Path, store: FrameStore | None = None) -> Live:
    """Restore a stack saved by :func:`save_live`, bit for bit (a live stack or a live
    drizzle, whichever was saved).

    Parameters
    ----------
    directory : path-like
        The checkpoint directory.
    store : FrameStore, optional
        The session's store (not part of the checkpoint). It must hold at least the frames
        the checkpoint has seen; :meth:`LiveStack.catch_up` adds any later ones.
    """
    d = Path(directory)
    meta = json.loads((d / _LIVE_MANIFEST).read_text())
    live: Live
    if meta.get("format") == _DRIZZLE_FORMAT:
        live = _load_drizzle(d, meta, store)
    else:
        live = _load_stack(d, meta, store)
    if store is not None and len(store) < live.frames:
        raise ValueError(
            f"the store holds {len(store)} frames, fewer than the checkpoint's {live.frames}"
        )
    return live


def _load_stack(d: Path, meta: dict[str, Any], store: FrameStore | None) -> LiveStack:
    if meta.get("format") != "nightstack-livestack":
        raise ValueError(f"{d} does not hold a nightstack live-stack checkpoint")
    if meta.get("version") != _VERSION:
        raise ValueError(
            f"{d} holds a version {meta.get('version')} live-stack checkpoint, not {_VERSION}"
        )
    stack = LiveStack(
        (meta["shape"][0], meta["shape"][1]),
        meta["channels"],
        kappa=meta["kappa"],
        warmup=meta["warmup"],
        store=store,
    )
    files = meta["files"]
    full = (*stack.shape, stack.channels)

    def load_array(key: str, dtype: type, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        return _load_array(d, files[key], dtype, shape)

    pending = [
        (load_array(f"warm{j}", np.float32, full), load_array(f"warmfp{j}", np.bool_, stack.shape))
        for j in range(int(meta["pending"]))
    ]
    stack.restore(
        LiveState(
            load_array("mean", np.float32, full),
            load_array("spread", np.uint16, full),
            load_array("count", np.uint16, stack.shape),
            np.array(meta["floor"], dtype=np.float32),
            pending,
            int(meta["frames"]),
            int(meta["rejected"]),
        )
    )
    return stack
