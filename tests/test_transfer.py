"""Rows to the device in bounded chunks through page-locked buffers, and snapshots loaded in one pass.

Issue 10: opening a durable database copies the snapshot's vectors from the memory map into a
preallocated device matrix in bounded chunks, through a small pinned buffer, with no second
full-size host copy and no full-size pinned allocation. The device side runs on the CuPy-like
stand-in (``tests/standin.py``), which records page-locked allocations and where each upload read
from.
"""

from __future__ import annotations

import gc
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standin import ledger, standin_backend

import iqdb
from iqdb.kernels import _transfer, cpu_backend
from iqdb.kernels._transfer import copy_rows

D = 64


@pytest.fixture
def on_standin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Handles opened with ``device="cuda"`` run on the stand-in; ``"cpu"`` stays NumPy."""
    monkeypatch.setattr(
        "iqdb._db.resolve_device", lambda device: cpu_backend() if device == "cpu" else standin_backend()
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    width=st.sampled_from([1, 3, 16, 33]),
    dtype=st.sampled_from([np.float32, np.float64, np.uint64]),
    stage=st.integers(1, 4096),
    host=st.booleans(),
)
def test_any_chunking_copies_every_row_and_gives_zlibs_crc(
    n: int, width: int, dtype: Any, stage: int, host: bool
) -> None:
    """Host and device copies and the running CRC do not depend on where chunks are cut (a chunk
    is at least one row, whatever the buffer size)."""
    rng = np.random.default_rng(n * 31 + width)
    src = (rng.random((n, width)) * 1000).astype(dtype)
    if width == 1 and n % 2:
        src = src.reshape(n)  # 1-D columns too (norms, ids)
    be = standin_backend()
    dev = be.xp.empty(src.shape, dtype=src.dtype)
    dst = np.empty_like(src) if host else None
    with ledger.record() as t:
        crc = copy_rows(be, src, host=dst, device=dev, crc=7, stage_bytes=stage)
    assert crc == zlib.crc32(src.tobytes(), 7)
    np.testing.assert_array_equal(be.to_host(dev), src)
    if dst is not None:
        np.testing.assert_array_equal(dst, src)
    row = max(1, src.nbytes // max(1, n))
    step = max(1, stage // row)
    assert t.uploads == -(-n // step)  # one copy per chunk
    assert t.pageable_upload_bytes == 0  # every byte went through page-locked memory
    assert t.pinned_peak == (2 * min(step * row, src.nbytes) if n else 0)
    # the CPU: host copy and CRC only
    dst2 = np.empty_like(src)
    assert copy_rows(cpu_backend(), src, host=dst2, crc=7, stage_bytes=stage) == crc
    np.testing.assert_array_equal(dst2, src)


def test_a_buffer_is_refilled_only_after_the_device_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Double buffering: before chunk i is staged into buffer i % 2, the event recorded after chunk
    i - 2's copy is waited on (otherwise an asynchronous copy could read a half-overwritten
    buffer)."""
    xp = standin_backend().xp
    log: list[str] = []

    class Event:
        def __init__(self, i: int) -> None:
            self.i = i

        def synchronize(self) -> None:
            log.append(f"wait {self.i}")

    class Stream:
        def __init__(self, **kw: Any) -> None:
            self.copies = 0

        def record(self) -> Event:
            self.copies += 1
            return Event(self.copies - 1)

        def synchronize(self) -> None:
            log.append("drain")

    monkeypatch.setattr(xp.cuda, "Stream", Stream)
    real_set = type(xp.empty(1)).set

    def set_(self: Any, arr: np.ndarray, stream: Any = None) -> None:
        log.append(f"copy {stream.copies}")
        real_set(self, arr, stream)

    monkeypatch.setattr(type(xp.empty(1)), "set", set_)
    src = np.arange(40, dtype=np.float32).reshape(10, 4)
    dev = xp.empty(src.shape, dtype=src.dtype)
    copy_rows(standin_backend(), src, device=dev, stage_bytes=2 * 16)  # 2 rows a chunk: 5 chunks
    assert log == ["copy 0", "copy 1", "wait 0", "copy 2", "wait 1", "copy 3", "wait 2", "copy 4", "drain"]


def _build(path: Path, n: int, payloads: bool = False) -> np.ndarray:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, D)).astype(np.float32)
    with iqdb.open(path, device="cpu") as db:
        p = [{"i": i} for i in range(n)] if payloads else None
        db.upsert_many(np.arange(n, dtype=np.uint64), X, p)
    return X  # close() compacts: everything is in the snapshot


def test_opening_streams_the_snapshot_through_small_pinned_buffers(
    on_standin: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open onto the device uploads each snapshot row once, every byte from the two page-locked
    buffers, whose size stays bounded whatever the snapshot's (no full-size staging block)."""
    n = 20_000  # 5 MiB of vectors
    X = _build(tmp_path / "db", n)
    monkeypatch.setattr(_transfer, "STAGE_BYTES", 64 << 10)
    with ledger.record() as t:
        db = iqdb.open(tmp_path / "db", device="cuda")
    with db:
        assert db.device == "cuda:0"
        assert t.upload_bytes == n * (D * 4 + 8 + 4 + 4 + 8)  # vector, norms (f64, f32), 1/|x|, id
        assert t.pageable_upload_bytes == 0, t.sites("uploads")
        assert t.pinned_peak <= 2 * (64 << 10)
        assert t.syncs == 0 and t.implicit == 0
        rows_per_chunk = (64 << 10) // (4 * D)
        assert t.uploads >= n // rows_per_chunk  # bounded chunks, not one block
        # the device matrix holds the snapshot, and the first search uploads only its query
        with ledger.record() as t2:
            ids, _ = db.search_arrays(X[5:6], 3, "l2")
        assert ids[0][0] == 5
        assert t2.upload_bytes == X[5:6].nbytes, t2.sites("uploads")


def _open_peak(path: Path, device: str) -> tuple[int, int, int]:
    """(traced host peak during the open, the store's host column bytes, its device bytes)."""
    gc.collect()
    tracemalloc.start()
    try:
        db = iqdb.open(path, device=device, readonly=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with db:
        usage = db.memory_usage()
        return peak, db._store.nbytes(), usage["device"]


def test_opening_makes_no_second_full_size_host_copy(
    on_standin: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host memory during an open: the host columns (the truth) plus bounded buffers, on the CPU
    and on the device. A second full-size copy of the vectors (a staging copy, or the checksum
    pass materialising them) would add about the matrix's size again."""
    n = 60_000  # 15 MiB of vectors
    _build(tmp_path / "db", n)
    matrix = n * D * 4
    monkeypatch.setattr(_transfer, "STAGE_BYTES", 256 << 10)
    cpu_peak, cpu_cols, cpu_dev = _open_peak(tmp_path / "db", "cpu")
    print(
        f"\nopen of {matrix >> 20} MiB of vectors: host peak {cpu_peak / matrix:.2f}x the matrix on the CPU",
        end="",
    )
    assert cpu_dev == 0
    # The CPU: the store's own columns and index, and a little more (Arrow's reader, the ids).
    assert cpu_peak <= cpu_cols + matrix // 4, (cpu_peak, cpu_cols)
    dev_peak, dev_cols, dev_bytes = _open_peak(tmp_path / "db", "cuda")
    assert dev_cols == cpu_cols and dev_bytes > 0
    print(f", {(dev_peak - dev_bytes) / matrix:.2f}x on the device (stand-in; its device arrays subtracted)")
    # On the stand-in, "device" arrays are host NumPy arrays, traced too: subtract them.
    assert dev_peak - dev_bytes <= cpu_peak + 2 * _transfer.STAGE_BYTES + matrix // 8, (
        dev_peak,
        dev_bytes,
        cpu_peak,
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_damaged_vectors_are_caught_during_the_copy(on_standin: None, tmp_path: Path, device: str) -> None:
    """The vectors' checksum is checked while they are copied (one pass over the map): a flipped
    bit in them refuses the open with Corrupt, and ``check()`` (a full verification) reports it."""
    n = 3_000
    X = _build(tmp_path / "db", n)
    raw = bytearray((tmp_path / "db" / "snap").read_bytes())
    at = bytes(raw).find(X[1234].tobytes())
    assert at > 0
    raw[at + 5] ^= 0x10
    (tmp_path / "db" / "snap").write_bytes(bytes(raw))
    with pytest.raises(iqdb.Corrupt, match="vectors checksum"):
        iqdb.open(tmp_path / "db", device=device)
    with pytest.raises(iqdb.Corrupt, match="vectors checksum"):
        iqdb.open(tmp_path / "db", device=device, readonly=True)
    raw[at + 5] ^= 0x10  # repaired: it opens, on the same files
    (tmp_path / "db" / "snap").write_bytes(bytes(raw))
    with iqdb.open(tmp_path / "db", device=device) as db:
        assert len(db) == n


def test_a_snapshot_with_payloads_opens_onto_the_device_as_on_the_cpu(
    on_standin: None, tmp_path: Path
) -> None:
    """Payloads, ids and norms come with the vectors: the same answers on both."""
    X = _build(tmp_path / "db", 2_000, payloads=True)
    got = {}
    for device in ("cpu", "cuda"):
        with iqdb.open(tmp_path / "db", device=device, readonly=True) as db:
            hits = db.search(X[7], 5, "cosine", filter=iqdb.Field("i") < 100)
            got[device] = [(h.id, h.score, dict(h.payload or {})) for h in hits]
    assert got["cuda"] == got["cpu"]
    assert got["cpu"][0][0] == 7


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [1 << 10, 1 << 20, None])
def test_copy_rows_on_a_real_gpu(stage: int | None) -> None:
    """The pinned double buffer with CuPy's own stream, events and ``ndarray.set``: every row
    arrives, the host copy and the CRC are the CPU's."""
    import cupy

    from iqdb.kernels import gpu_backend

    be = gpu_backend(0)
    rng = np.random.default_rng(4)
    for shape, dtype in (((30_001, 96), np.float32), ((30_001,), np.float64), ((77,), np.uint64)):
        src = (rng.random(shape) * 1e6).astype(dtype)
        host = np.empty_like(src)
        with cupy.cuda.Device(0):
            dev = cupy.empty(src.shape, dtype=src.dtype)
        crc = copy_rows(be, src, host=host, device=dev, crc=0, stage_bytes=stage)
        assert crc == zlib.crc32(src.tobytes())
        np.testing.assert_array_equal(host, src)
        np.testing.assert_array_equal(cupy.asnumpy(dev), src)
