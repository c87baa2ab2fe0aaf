"""The batch script's way of stacking, as a baseline: every frame in RAM, then astropy sigma_clip.

    python bench/naive_stack.py REPORT.jsonl OUT.npy [--limit-gb G]

Reads the accepted frames and their transforms from a ``nightstack stack --report`` file,
decodes each (``loaders.load``), warps it with the same transform (``warp.warp``, NaN outside
its footprint), holds all of them in one (N, rows, cols, 3) float32 array, then
``sigma_clip(cube, sigma=3, maxiters=5, cenfunc="median", stdfunc="std", axis=0)`` and the mean
of the survivors, saved as (rows, cols, 3) float32 .npy (NaN where no frame covers a pixel).
``--limit-gb`` caps the address space (RLIMIT_AS) so that running out of memory is a clean
MemoryError here, never the machine's OOM killer.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit-gb", type=float, default=None)
    args = parser.parse_args(argv)
    if args.limit_gb:
        limit = int(args.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    from astropy.stats import sigma_clip

    from nightstack.io.loaders import load
    from nightstack.registration.warp import warp

    records = [json.loads(line) for line in args.report.read_text().splitlines()]
    accepted = [r for r in records if r["status"] == "accepted"]
    t0 = time.perf_counter()
    cube: np.ndarray | None = None
    for i, record in enumerate(accepted):
        frame = load(record["file"])
        if cube is None:
            cube = np.empty((len(accepted), *frame.image.shape), dtype=np.float32)
        warped, footprint = warp(frame.image, np.array(record["transform"]), frame.shape)
        warped[~footprint] = np.nan
        cube[i] = warped
        del frame, warped, footprint
    assert cube is not None
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels outside every footprint
        clipped = sigma_clip(cube, sigma=3, maxiters=5, cenfunc="median", stdfunc="std", axis=0)
        result = clipped.mean(axis=0).filled(np.nan).astype(np.float32)
    t2 = time.perf_counter()
    np.save(args.out, result)
    print(json.dumps({"frames": len(accepted), "load_warp_s": t1 - t0, "clip_mean_s": t2 - t1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
