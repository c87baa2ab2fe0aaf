"""Fuzz the frame loaders with mutated real headers, for a bounded time (not part of the tests).

Every input goes through the daemon's own isolation, a :class:`nightstack.io.decoder.Decoder`
child process running ``nightstack.io.loaders:load``, so a LibRaw segfault or hang is caught and
reported instead of killing the fuzzer. The property is the loaders' contract:

- a decoded frame has ``image`` (rows, cols, 1 | 3) float32 and ``luminance``
  (rows // bin, cols // bin) float32;
- anything else is a ``DecodeError`` with a one-line reason, never another exception
  (``"decoder error (TypeError ...)"``), a crash (``"decoder crashed (signal SIGSEGV)"``) or a
  hang (``"decode timed out"``).

Seeds: small simulated DNGs, FITS (mono, Bayer, cube), TIFF, JPEG and PNG files written here,
plus, where ``../shared/realdata`` exists, the real truncated CR3s, the head of the real
Blackmagic DNG and a real ASI224MC FITS. Mutations (drawn by hypothesis): byte flips, 16/32-bit
"interesting" integers over header fields (sizes, offsets, counts), truncation, insertion,
chunk duplication, and FITS header card rewrites. Findings are written to
``bench/out/fuzz-findings/`` with the reason; turn each into a regression test in
``tests/test_loaders.py`` (or ``tests/test_reliability.py``) and fix it.

Usage::

    .venv/bin/pip install hypothesis
    .venv/bin/python bench/fuzz_loaders.py --seconds 300
"""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from astropy.io import fits

from nightstack.errors import DecodeError
from nightstack.io.decoder import Decoder
from nightstack.simulate import simulate_night

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - a bench-only dependency
    sys.exit("bench/fuzz_loaders.py needs hypothesis: .venv/bin/pip install hypothesis")

BENCH = Path(__file__).resolve().parent
FINDINGS = BENCH / "out" / "fuzz-findings"
REALDATA = BENCH.parent.parent / "shared" / "realdata"
DECODE_TIMEOUT_S = 20.0  # a fuzzed input that takes longer is reported as a hang
REAL_HEAD_BYTES = 256 * 1024  # the part of a large real file that is kept as a seed
BAD_REASONS = ("decoder error", "decoder crashed", "decoder exited", "decode timed out")
INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 2**32 - 1)
"""Integers that break size, offset and count fields: zero, one, sign and width boundaries."""


@dataclass(frozen=True)
class Seed:
    name: str
    suffix: str
    data: bytes


def _seeds(work: Path) -> list[Seed]:
    seeds: list[Seed] = []
    simulate_night(work / "sim", frames=1, width=160, height=112, seed=3, stars=30, nebula=False)
    seeds.append(Seed("sim.dng", ".DNG", next((work / "sim").glob("*.DNG")).read_bytes()))
    rng = np.random.default_rng(5)
    for name, data, header in (
        ("mono.fits", rng.integers(0, 4000, (24, 32), dtype=np.uint16), {}),
        ("bayer.fits", rng.integers(0, 4000, (24, 32), dtype=np.uint16), {"BAYERPAT": "RGGB"}),
        ("cube.fits", rng.random((3, 24, 32), dtype=np.float32), {"ROWORDER": "BOTTOM-UP"}),
    ):
        hdu = fits.PrimaryHDU(data)
        for key, value in header.items():
            hdu.header[key] = value
        buffer = io.BytesIO()
        hdu.writeto(buffer)
        seeds.append(Seed(name, ".fits", buffer.getvalue()))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rng.integers(0, 65535, (24, 32, 3), dtype=np.uint16))
    seeds.append(Seed("rgb.tif", ".tif", buffer.getvalue()))
    image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    for suffix in (".jpg", ".png"):
        ok, encoded = cv2.imencode(suffix, image)
        assert ok
        seeds.append(Seed(f"small{suffix}", suffix, encoded.tobytes()))
    if REALDATA.is_dir():
        for cr3 in sorted((REALDATA / "negative_truncated_cr3").glob("*.cr3")):
            seeds.append(Seed(cr3.name, ".CR3", cr3.read_bytes()[:REAL_HEAD_BYTES]))
        dng = REALDATA / "raw_camera" / "Blackmagic.dng"
        if dng.exists():
            seeds.append(Seed(dng.name, ".DNG", dng.read_bytes()[:REAL_HEAD_BYTES]))
        m27 = sorted((REALDATA / "seq_als_m27_asi224mc").glob("*.fits"))
        if m27:
            seeds.append(Seed(m27[0].name, ".fits", m27[0].read_bytes()[: 2880 * 3 + 65536]))
    return seeds


# --- mutations -------------------------------------------------------------------------------

Mutation = Callable[[bytearray], None]


@st.composite
def _mutation(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["flip", "int", "truncate", "insert", "duplicate", "card"]))
    where = draw(st.floats(0, 1))
    # header fields live near the start: bias half the offsets into the first 4 KiB
    head = draw(st.booleans())
    value = draw(st.sampled_from(INTERESTING) | st.integers(0, 0xFFFFFFFF))
    width = draw(st.sampled_from([1, 2, 4]))
    endian = draw(st.sampled_from(["<", ">"]))
    blob = draw(st.binary(min_size=1, max_size=64))

    def offset(data: bytearray) -> int:
        span = min(len(data), 4096) if head else len(data)
        return min(int(where * span), max(len(data) - 1, 0))

    def apply(data: bytearray) -> None:
        if not data:
            return
        at = offset(data)
        if kind == "flip":
            data[at] ^= 1 << (value % 8)
        elif kind == "int":
            fmt = {1: "B", 2: "H", 4: "I"}[width]
            packed = struct.pack(endian + fmt, value & ((1 << (8 * width)) - 1))
            data[at : at + width] = packed
        elif kind == "truncate":
            del data[max(at, 1) :]
        elif kind == "insert":
            data[at:at] = blob
        elif kind == "duplicate":
            data[at:at] = data[at : at + len(blob) * 64]
        else:  # a FITS header card, or any 80 bytes, rewritten
            card = at - at % 80
            text = (
                draw_card(value, blob).encode("ascii", "replace")[:80].ljust(80)
                if card + 80 <= len(data)
                else b""
            )
            data[card : card + len(text)] = text

    return apply


def draw_card(value: int, blob: bytes) -> str:
    keys = ("NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "BITPIX", "BZERO", "BSCALE", "BAYERPAT", "END")
    key = keys[value % len(keys)]
    payloads = (str(value), str(-value), "'RGGB'", "'XYZW'", "T", "1E400", blob.hex()[:20], "")
    return f"{key:<8}= {payloads[(value >> 4) % len(payloads)]}"


# --- the property ----------------------------------------------------------------------------


class _Run:
    def __init__(self, decoder: Decoder, work: Path, seeds: list[Seed]) -> None:
        self.decoder, self.work, self.seeds = decoder, work, seeds
        self.inputs = 0
        self.decoded = 0
        self.findings: dict[str, str] = {}

    def check(self, seed_index: int, mutations: list[Mutation]) -> None:
        seed = self.seeds[seed_index % len(self.seeds)]
        data = bytearray(seed.data)
        for mutate in mutations:
            mutate(data)
        path = self.work / f"input{seed.suffix}"
        path.write_bytes(bytes(data))
        self.inputs += 1
        try:
            frame = self.decoder.decode(path)
        except DecodeError as err:
            problem = err.reason if err.reason.startswith(BAD_REASONS) else None
            if "\n" in err.reason:
                problem = f"reason is not one line: {err.reason!r}"
        else:
            self.decoded += 1
            problem = _frame_problem(frame.image, frame.luminance, frame.bin)
        if problem is not None:
            self._record(seed, bytes(data), problem)

    def _record(self, seed: Seed, data: bytes, problem: str) -> None:
        digest = hashlib.sha256(data).hexdigest()[:16]
        if digest in self.findings:
            return
        self.findings[digest] = problem
        FINDINGS.mkdir(parents=True, exist_ok=True)
        (FINDINGS / f"{digest}{seed.suffix}").write_bytes(data)
        (FINDINGS / f"{digest}.txt").write_text(f"seed {seed.name}\n{problem}\n")
        print(f"FINDING {digest}{seed.suffix} (from {seed.name}): {problem}", flush=True)


def _frame_problem(image: np.ndarray, luminance: np.ndarray, bin: int) -> str | None:
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.dtype != np.float32:
        return f"bad image {image.shape} {image.dtype}"
    rows, cols = image.shape[:2]
    if luminance.dtype != np.float32 or luminance.shape != (rows // bin, cols // bin):
        return f"bad luminance {luminance.shape} {luminance.dtype} for image {image.shape}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="time budget")
    parser.add_argument("--examples", type=int, default=200, help="inputs per hypothesis round")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="nightstack-fuzz-") as tmp,
        Decoder(timeout_s=DECODE_TIMEOUT_S, load_kwargs={"bin": 2}) as decoder,
    ):
        work = Path(tmp)
        seeds = _seeds(work)
        run = _Run(decoder, work, seeds)

        @settings(
            max_examples=args.examples,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            st.integers(0, len(seeds) - 1),
            st.lists(_mutation(), min_size=1, max_size=6),
        )
        def fuzz(seed_index: int, mutations: list[Mutation]) -> None:
            run.check(seed_index, mutations)

        rounds = 0
        while time.monotonic() - started < args.seconds:
            fuzz()
            rounds += 1
        took = time.monotonic() - started
    print(
        f"fuzzed {run.inputs} inputs from {len(seeds)} seeds in {took:.0f} s "
        f"({rounds} rounds): {run.decoded} decoded, {run.inputs - run.decoded} rejected with a "
        f"DecodeError, {len(run.findings)} finding(s)" + (f" in {FINDINGS}" if run.findings else "")
    )
    return 1 if run.findings else 0


if __name__ == "__main__":
    sys.exit(main())
