"""nightstack.io.decoder: decoding in a child process, with real hangs, real SIGSEGVs and real
process/shared-memory bookkeeping (the faults come from tests/_faulty_decode.py, run in the child).
"""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from nightstack.errors import DecodeError
from nightstack.frames import Frame, Mosaic
from nightstack.io.decoder import SHM_PREFIX, Decoder, TransientDecodeError, _child_main
from nightstack.io.loaders import decode_light, load

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
M27 = REALDATA / "seq_als_m27_asi224mc" / "Light_1069.fits"
DNG = REALDATA / "raw_camera" / "Blackmagic.dng"
CANON = REALDATA / "raw_canon_550d" / "colorchart.dng"
TRUNCATED_CR3 = REALDATA / "negative_truncated_cr3" / "nomexif_canon-r6_truncated.cr3"
FAULTY = "_faulty_decode:load"  # tests/ is on sys.path in the parent, and so in the child
SHORT_TIMEOUT_S = 2.0


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _our_shm_files() -> list[str]:
    prefix = f"{SHM_PREFIX}{os.getpid()}-"
    return [p.name for p in Path("/dev/shm").glob(prefix + "*")]


def _mapped_segments() -> list[str]:
    return [ln for ln in Path("/proc/self/maps").read_text().splitlines() if SHM_PREFIX in ln]


def _assert_same_frame(a: Frame | Mosaic, b: Frame | Mosaic) -> None:
    assert type(a) is type(b) and a.path == b.path and a.meta == b.meta
    if isinstance(a, Mosaic) and isinstance(b, Mosaic):
        assert (a.pattern, a.white_balance, a.saturation) == (
            b.pattern,
            b.white_balance,
            b.saturation,
        )
        assert (a.adu is None, a.black, a.span) == (b.adu is None, b.black, b.span)
        if a.adu is not None and b.adu is not None:
            assert a.adu.dtype == b.adu.dtype == np.uint16 and not a.has_data
            assert_array_equal(a.adu, b.adu)
        assert a.data.dtype == b.data.dtype
        assert_array_equal(a.data, b.data)
        return
    assert isinstance(a, Frame) and isinstance(b, Frame)
    assert a.bin == b.bin
    assert a.image.dtype == b.image.dtype and a.luminance.dtype == b.luminance.dtype
    assert_array_equal(a.image, b.image)
    assert_array_equal(a.luminance, b.luminance)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Every test must leave no child process and no shared-memory file behind."""
    yield
    gc.collect()
    assert multiprocessing.active_children() == []
    assert _our_shm_files() == []


@pytest.fixture
def fits_frame(tmp_path: Path) -> Path:
    """A small real FITS written here, so the decoder tests run without the real data too."""
    from astropy.io import fits

    path = tmp_path / "light.fits"
    data = np.random.default_rng(11).integers(0, 65536, (64, 96), dtype=np.uint16)
    hdu = fits.PrimaryHDU(data)
    hdu.header["BAYERPAT"] = "RGGB"
    hdu.header["EXPTIME"] = 30.0
    hdu.writeto(path)
    return path


def test_decode_equals_in_process_load(fits_frame: Path) -> None:
    kwargs = {"bin": 4, "demosaic": "AHD"}  # load() demosaics a Bayer FITS by MHC whatever the
    load_fn = "nightstack.io.loaders:load"
    with Decoder(timeout_s=30, load_kwargs=kwargs, decode_fn=load_fn) as decoder:
        frame = decoder.decode(fits_frame)  # LibRaw name (decode_light refuses it: the setting)
        _assert_same_frame(frame, load(fits_frame, bin=4))
        assert isinstance(frame, Frame)
        assert frame.image.flags.c_contiguous and frame.image.flags.writeable
        assert frame.luminance.shape == (16, 24)


def test_decode_mosaic_equals_in_process_decode(fits_frame: Path) -> None:
    with Decoder(timeout_s=30) as decoder:  # the default: the mosaic of a Bayer file
        mosaic = decoder.decode(fits_frame)
        _assert_same_frame(mosaic, decode_light(fits_frame))
        assert isinstance(mosaic, Mosaic) and mosaic.pattern == "RGGB"
        assert mosaic.data.flags.c_contiguous and mosaic.data.flags.writeable


@pytest.mark.skipif(not DNG.is_file(), reason="real data absent")
def test_decode_real_dng_equals_in_process_load() -> None:
    with Decoder(timeout_s=60) as decoder:
        mosaic = decoder.decode(DNG)
        assert isinstance(mosaic, Mosaic) and mosaic.shape == (2176, 4128)
        _assert_same_frame(mosaic, decode_light(DNG))


def test_raw_mosaic_crosses_as_adu(tmp_path: Path) -> None:
    """A raw's mosaic crosses from the child as its uint16 ADU (half the bytes of float32):
    the one shared-memory segment mapped is 2 bytes a pixel, and the values match in-process."""
    from nightstack.simulate.dng import write_dng

    cfa = np.random.default_rng(4).integers(0, 16384, (64, 1000), dtype=np.uint16)
    path = write_dng(tmp_path / "light.dng", cfa, cfa_pattern="BGGR")
    with Decoder(timeout_s=30) as decoder:
        mosaic = decoder.decode(path)
        assert isinstance(mosaic, Mosaic) and mosaic.adu is not None
        assert mosaic.adu.nbytes == cfa.size * 2
        mapped = [ln.split() for ln in _mapped_segments()]
        assert len(mapped) == 1
        start, stop = (int(v, 16) for v in mapped[0][0].split("-"))
        assert stop - start == -(-cfa.size * 2 // mmap.PAGESIZE) * mmap.PAGESIZE
        _assert_same_frame(mosaic, decode_light(path))
        assert_array_equal(mosaic.adu, cfa)


@pytest.mark.skipif(not CANON.is_file(), reason="real data absent")
def test_decode_raw_with_margins_equals_in_process_load() -> None:
    """The Canon's visible area lies inside LibRaw's larger buffer (a strided view, written to
    shared memory band by band): it arrives whole and exact."""
    in_process = decode_light(CANON)
    assert isinstance(in_process, Mosaic) and in_process.adu is not None
    assert not in_process.adu.flags.c_contiguous
    with Decoder(timeout_s=60) as decoder:
        mosaic = decoder.decode(CANON)
        assert isinstance(mosaic, Mosaic) and mosaic.shape == (1156, 1734)
        _assert_same_frame(mosaic, in_process)


def test_hang_times_out_and_next_file_decodes(fits_frame: Path, tmp_path: Path) -> None:
    with Decoder(timeout_s=SHORT_TIMEOUT_S, decode_fn=FAULTY) as decoder:
        decoder.decode(fits_frame)  # child up and warm: the timeout measures the decode only
        hung_pid = decoder.pid
        assert hung_pid is not None
        start = time.monotonic()
        with pytest.raises(TransientDecodeError, match=r"^decode timed out after 2 s$"):
            decoder.decode(tmp_path / "frame_hang.fits")  # transient: worth one more try
        elapsed = time.monotonic() - start
        assert SHORT_TIMEOUT_S <= elapsed < SHORT_TIMEOUT_S + 3.0
        assert _gone(hung_pid)  # killed, not left spinning
        _assert_same_frame(decoder.decode(fits_frame), decode_light(fits_frame))
        assert decoder.pid not in (None, hung_pid)


def test_sigsegv_is_reported_and_next_file_decodes(fits_frame: Path, tmp_path: Path) -> None:
    with Decoder(timeout_s=30, decode_fn=FAULTY) as decoder:
        with pytest.raises(DecodeError, match=r"^decoder crashed \(signal SIGSEGV\)$") as err:
            decoder.decode(tmp_path / "frame_crash.fits")
        assert not isinstance(err.value, TransientDecodeError)  # LibRaw would crash again
        _assert_same_frame(decoder.decode(fits_frame), decode_light(fits_frame))
        with pytest.raises(DecodeError, match="SIGSEGV"):  # and again: restarts are repeatable
            decoder.decode(tmp_path / "again_crash.fits")
        _assert_same_frame(decoder.decode(fits_frame), decode_light(fits_frame))


def test_decode_error_in_child_keeps_its_reason(tmp_path: Path, fits_frame: Path) -> None:
    bad = [tmp_path / "missing.CR3", tmp_path / "frame.xyz"]
    bad[1].write_bytes(b"data")
    if TRUNCATED_CR3.is_file():
        bad.append(TRUNCATED_CR3)
    with Decoder(timeout_s=30) as decoder:
        pid = decoder.pid
        for path in bad:
            with pytest.raises(DecodeError) as in_child:
                decoder.decode(path)
            with pytest.raises(DecodeError) as in_process:
                decode_light(path)
            assert in_child.value.reason == in_process.value.reason
            assert not isinstance(in_child.value, TransientDecodeError)  # the content is bad
            assert decoder.last_error() is in_child.value
        assert decoder.pid == pid  # an ordinary bad file does not cost a restart
        decoder.decode(fits_frame)


def test_a_child_killed_by_sigkill_is_transient_and_restarted(
    fits_frame: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAULTY_DECODE_STATE", str(tmp_path))  # inherited by the child
    with Decoder(timeout_s=30, decode_fn=FAULTY) as decoder:
        decoder.decode(fits_frame)
        pid = decoder.pid
        assert pid is not None
        raised: list[BaseException] = []

        def decode_stalled() -> None:
            try:
                decoder.decode(tmp_path / "frame_stall.fits")
            except DecodeError as err:
                raised.append(err)

        worker = threading.Thread(target=decode_stalled)
        worker.start()
        deadline = time.monotonic() + 20
        while not (tmp_path / "frame_stall.fits.decoding").exists():
            assert time.monotonic() < deadline, "the stalled decode never began"
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer does, mid-decode
        worker.join(20)
        (err,) = raised
        assert isinstance(err, TransientDecodeError)
        assert err.reason == "decoder killed (signal SIGKILL: out of memory?)"
        assert decoder.last_error() is None  # per thread: this one's last decode succeeded
        _assert_same_frame(decoder.decode(fits_frame), decode_light(fits_frame))
        assert decoder.pid not in (None, pid)


def test_a_read_error_in_the_child_is_transient(
    fits_frame: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAULTY_DECODE_STATE", str(tmp_path))
    with Decoder(timeout_s=30, decode_fn=FAULTY) as decoder:
        pid = decoder.pid
        with pytest.raises(
            TransientDecodeError, match=r"^cannot read file \(OSError: .*Input/output"
        ) as err:
            decoder.decode(tmp_path / "frame_eio.fits")
        assert decoder.last_error() is err.value
        assert decoder.pid == pid  # the child survives a read error
        once = tmp_path / "frame_eioonce.fits"
        once.write_bytes(fits_frame.read_bytes())
        with pytest.raises(TransientDecodeError):
            decoder.decode(once)
        _assert_same_frame(decoder.decode(once), decode_light(once))  # the second attempt works
        assert decoder.last_error() is None


def test_close_leaves_no_process_and_no_mapping(fits_frame: Path) -> None:
    decoder = Decoder(timeout_s=30)
    frame = decoder.decode(fits_frame)
    pid = decoder.pid
    assert pid is not None
    assert _our_shm_files() == []  # unlinked as soon as mapped
    assert len(_mapped_segments()) == 1  # the mosaic's data, alive with the frame
    decoder.close()
    decoder.close()  # idempotent
    assert _gone(pid)
    assert decoder.pid is None
    assert isinstance(frame, Mosaic)
    assert float(frame.data.sum()) > 0  # the frame outlives the decoder
    del frame
    gc.collect()
    assert _mapped_segments() == []  # memory returned with the arrays
    with pytest.raises(RuntimeError, match="closed"):
        decoder.decode(fits_frame)


def test_stale_segments_of_dead_parents_are_swept(tmp_path: Path) -> None:
    dead_pid = 4_194_304 + 17  # above Linux's largest pid_max: never a live process
    stale = tmp_path / f"{SHM_PREFIX}{dead_pid}-3-image"
    ours = tmp_path / f"{SHM_PREFIX}{os.getpid()}-99-image"
    stale.write_bytes(b"x" * 10)
    ours.write_bytes(b"x" * 10)
    with Decoder(shm_dir=tmp_path):
        assert not stale.exists()
        assert ours.exists()  # a live parent's files are left alone
    ours.unlink()


def test_child_exits_when_parent_is_killed_mid_hang(tmp_path: Path) -> None:
    script = (
        "import contextlib\n"
        "from nightstack.io.decoder import Decoder\n"
        "from nightstack.errors import DecodeError\n"
        "if __name__ == '__main__':\n"
        f"    d = Decoder(timeout_s=600, decode_fn={FAULTY!r})\n"
        "    with contextlib.suppress(DecodeError):\n"
        "        d.decode('missing.fits')  # returns once the child is up\n"
        "    print(d.pid, flush=True)\n"
        "    d.decode('frame_hang.fits')\n"
    )
    (tmp_path / "parent.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    parent = subprocess.Popen(
        [sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        time.sleep(0.5)  # let the request reach the child and the hang begin
        assert not _gone(child_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 5.0
    while not _gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child_pid)
    for leftover in Path("/dev/shm").glob(f"{SHM_PREFIX}{parent.pid}-*"):
        leftover.unlink()  # a file the killed parent could not clean: the next Decoder's sweep


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="module:function"):
        Decoder(decode_fn="nightstack.io.loaders.load")
    with pytest.raises(ValueError, match="cannot be found"):
        Decoder(decode_fn="no_such_module_here:load")
    with pytest.raises(ValueError, match="timeout_s"):
        Decoder(timeout_s=0)


def test_unimportable_function_fails_decode_with_reason(fits_frame: Path) -> None:
    with (
        Decoder(decode_fn="nightstack.io.loaders:no_such_function") as decoder,
        pytest.raises(DecodeError, match=r"^decoder failed to start: cannot import"),
    ):
        decoder.decode(fits_frame)



def test_a_child_whose_parent_is_gone_at_start_up_leaves_quietly(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 item 12: the decoder child finishes starting after its parent's end of the pipe
    is gone (the daemon stopped or killed while the child imported its libraries): its
    "ready" meets a real EPIPE. Before: a BrokenPipeError traceback on the shared stderr (the
    journal). Now it leaves quietly, exit code 0."""
    monkeypatch.setenv("SLOW_START_S", "1")
    spawn = multiprocessing.get_context("spawn")
    parent_end, child_end = spawn.Pipe(duplex=True)
    child = spawn.Process(
        target=_child_main, args=(child_end, "_slow_start:load", {}, os.getpid()), daemon=True
    )
    child.start()
    child_end.close()
    parent_end.close()  # gone before the child says "ready"
    child.join(30)
    assert child.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err
