"""Device memory that grows in place, so that growth never re-uploads the mirror (issue 10).

The store's device mirror grows with the store. With CUDA virtual memory (``kernels/_vmm.py``),
each column is one reserved address range that growth backs with more memory in place: the rows
on the device stay where they are, the next search uploads only the rows written since, and the
device holds the matrix once plus the growth step. The store side runs on the stand-in
(``tests/standin.py``: a reserved host range whose committed start counts as device memory); the
driver calls are checked against a recording fake and their structures against ``cuda.h``.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import standin
from standin import GRANULARITY, device_memory, ledger, standin_backend

import iqdb._store
from iqdb._store import ColumnStore
from iqdb.kernels import _vmm, cpu_backend, flat_topk

D = 16
ROW_BYTES = D * 4 + 8 + 4 + 4 + 8  # a row's upload: vector, norm (f64), norm (f32), 1/|x|, id
MIRROR_ROW_BYTES = ROW_BYTES + 8  # and room for its entry in the dead log
SLACK = 6 * GRANULARITY  # each of the six columns rounds its commit up once


def search(
    store: ColumnStore, Q: np.ndarray, k: int = 5, version: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """What ``Iqdb._search`` does with a version (the store's newest unless given)."""
    v, be = version or store.version, store.backend
    X, norms, norms32, inv32, ids = v.device_columns()
    out = flat_topk(
        be.xp, X, norms, ids, be.asarray(Q), k, "l2", dead=v.device_dead_rows(), norms32=norms32,
        inv_norms32=inv32, norm_bounds=v.bounds, matvec=be.matvec,
    )  # fmt: skip
    return be.to_host(out.rows), be.to_host(out.scores)


def grow_one_write_at_a_time(store: ColumnStore, cpu: ColumnStore, writes: int, step: int) -> Any:
    """``writes`` inserts of ``step`` rows into both stores, a search after each (the device
    answers as the CPU); the ledger's tally of it all."""
    rng = np.random.default_rng(7)
    Q = rng.standard_normal((3, D)).astype(np.float32)
    with ledger.record() as t:
        for w in range(writes):
            ids = np.arange(w * step, (w + 1) * step, dtype=np.uint64)
            V = rng.standard_normal((step, D)).astype(np.float32)
            for s in (store, cpu):
                s.upsert(ids, V, [None] * step)
            got, want = search(store, Q), search(cpu, Q)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1].view(np.uint64), want[1].view(np.uint64))
    return t, Q


def test_growth_uploads_each_row_once_and_peaks_at_the_capacity() -> None:
    """From empty to 6,000 rows in 60 writes, a search after each: every row is uploaded once in
    all (the growths upload nothing again), and the device memory never exceeds the final
    capacity (1x the rows plus the growth step) plus one granule per column."""
    gc.collect()
    device_memory.reset_peak()
    base = device_memory.live
    store, cpu = ColumnStore(standin_backend()), ColumnStore(cpu_backend())
    t, Q = grow_one_write_at_a_time(store, cpu, 60, 100)
    n, cap = store.version.n, store.version.layout.capacity
    searches = 60 * Q.nbytes
    print(
        f"\n{n} rows, capacity {cap}: uploaded {t.upload_bytes - searches} B of rows ({n * ROW_BYTES} B once)"
    )
    assert t.upload_bytes == searches + n * ROW_BYTES, t.sites("uploads")
    assert device_memory.peak - base <= cap * MIRROR_ROW_BYTES + SLACK
    assert store.memory_usage()["device"] == device_memory.live - base >= n * ROW_BYTES
    assert t.committed_bytes == device_memory.live - base  # each growth mapped only its new part


def test_without_growable_memory_each_growth_uploads_the_whole_matrix_again() -> None:
    """The fallback (a device without CUDA virtual memory) answers the same, at the price the
    growable buffers avoid: each growth uploads every row again."""
    store, cpu = ColumnStore(standin_backend(growable=False)), ColumnStore(cpu_backend())
    t, Q = grow_one_write_at_a_time(store, cpu, 60, 100)
    rows = (t.upload_bytes - 60 * Q.nbytes) / (store.version.n * ROW_BYTES)
    print(f"\nplain allocations: {rows:.1f}x the rows uploaded")
    assert rows > 3
    assert t.committed_bytes == 0


def test_a_version_from_before_a_growth_reads_its_rows_from_the_shared_columns() -> None:
    """A search that holds the version from before a growth, and runs after it (even after a
    search of the new layout uploaded more rows), reads exactly that version's rows."""
    store = ColumnStore(standin_backend())
    rng = np.random.default_rng(2)
    V = rng.standard_normal((400, D)).astype(np.float32)
    store.upsert(np.arange(200, dtype=np.uint64), V[:200], [None] * 200)
    old = store.version
    search(store, V[:2])
    store.upsert(np.arange(200, 210, dtype=np.uint64), V[200:210], [None] * 10)  # not searched yet
    mid = store.version
    store.upsert(np.arange(210, 400, dtype=np.uint64), V[210:400], [None] * 190)  # grows
    assert store.version.layout is not mid.layout
    assert store.version.layout.mirror is mid.layout.mirror  # type: ignore[union-attr]
    for v in (store.version, mid, old):  # the newest first: the older ones read what it uploaded
        cols = v.device_columns()
        np.testing.assert_array_equal(store.backend.to_host(cols[0]), V[: v.n])
        np.testing.assert_array_equal(store.backend.to_host(cols[4]), np.arange(v.n, dtype=np.uint64))
    mid_first = ColumnStore(standin_backend())  # the other order: the old version uploads first
    mid_first.upsert(np.arange(200, dtype=np.uint64), V[:200], [None] * 200)
    search(mid_first, V[:2])
    before = mid_first.version
    mid_first.upsert(np.arange(200, 400, dtype=np.uint64), V[200:400], [None] * 200)
    for v in (before, mid_first.version):
        np.testing.assert_array_equal(mid_first.backend.to_host(v.device_columns()[0]), V[: v.n])


def test_a_vacuum_starts_new_device_columns_and_the_old_ones_are_freed() -> None:
    """Rows move in a vacuum, so its layout cannot share the device columns: it gets new ones
    (filled from the host), and the old ones go with the old layout's last version."""
    gc.collect()
    base = device_memory.live
    store, cpu = ColumnStore(standin_backend()), ColumnStore(cpu_backend())
    rng = np.random.default_rng(5)
    V = rng.standard_normal((3000, D)).astype(np.float32)
    Q = V[:4]
    for s in (store, cpu):
        s.upsert(np.arange(3000, dtype=np.uint64), V, [None] * 3000)
    search(store, Q)
    before = store.version.layout.mirror  # type: ignore[union-attr]
    for s in (store, cpu):
        s.delete_many(np.arange(0, 3000, 2, dtype=np.uint64))
        s.vacuum()
        s._publish()
    assert store.version.layout.mirror is not before  # type: ignore[union-attr]
    del before
    got, want = search(store, Q), search(cpu, Q)
    np.testing.assert_array_equal(got[0], want[0])
    gc.collect()
    assert device_memory.live - base == store.memory_usage()["device"]
    assert device_memory.live - base <= store.version.layout.capacity * MIRROR_ROW_BYTES + SLACK


def test_a_device_that_cannot_grow_memory_falls_back_to_plain_allocations() -> None:
    """``growable_columns`` answering ``None`` (what the CUDA binding answers where the driver
    refuses) gives the plain mirror, which answers the same."""
    calls = []

    def refuse(widths: Any) -> None:
        calls.append(list(widths))
        return None

    be = standin_backend()
    be = type(be)(**{**be.__dict__, "growable_columns": refuse})
    store, cpu = ColumnStore(be), ColumnStore(cpu_backend())
    t, _Q = grow_one_write_at_a_time(store, cpu, 12, 100)
    assert calls and all(c == [D * 4, 8, 4, 4, 8, 8] for c in calls)
    assert t.committed_bytes == 0 and store.memory_usage()["device"] > 0


def test_deletes_upload_only_their_own_entries_and_each_version_sees_its_own() -> None:
    """The dead log is mirrored like the rows: after 1,000 deletes, each single delete costs the
    next search 8 bytes (its entry), not the whole dead list; a version from before later
    deletes still sees exactly its own dead rows (sorted on the device)."""
    store, cpu = ColumnStore(standin_backend()), ColumnStore(cpu_backend())
    rng = np.random.default_rng(9)
    V = rng.standard_normal((5000, D)).astype(np.float32)
    Q = V[:3]
    gone = rng.permutation(5000)[:1000].astype(np.uint64)
    for s in (store, cpu):
        s.upsert(np.arange(5000, dtype=np.uint64), V, [None] * 5000)
        s.delete_many(gone)
    search(store, Q)
    old = store.version
    old._dead_dev = None  # as if no search had read it yet: the newer versions upload past it first
    for i in range(20):
        victim = np.array([int(cpu.version.ids[cpu.version.live_rows()[i * 7]])], dtype=np.uint64)
        for s in (store, cpu):
            assert s.delete_many(victim) == 1
        with ledger.record() as t:
            got = search(store, Q)
        assert t.upload_bytes == Q.nbytes + 8, t.sites("uploads")
        want = search(cpu, Q)
        np.testing.assert_array_equal(got[0], want[0])
    assert store.version.layout is old.layout  # no vacuum: 1,020 of 5,000 dead
    np.testing.assert_array_equal(store.backend.to_host(old.device_dead_rows()), old.dead_rows())
    np.testing.assert_array_equal(
        store.backend.to_host(store.version.device_dead_rows()), store.version.dead_rows()
    )


def test_a_driver_that_refuses_a_later_growth_falls_back_to_plain_allocations(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A growth the driver refuses (not for lack of memory) turns the mirror into plain
    allocations filled from the host, says so once (new mirrors on that device start plain for
    the rest of the process), and the answers stay the CPU's."""
    monkeypatch.setattr(iqdb._store, "_GROWTH_REFUSED", set())

    class Refusing(standin.Growable):
        def ensure(self, nbytes: int) -> None:
            if self.committed and nbytes > self.committed:
                raise _vmm.CudaError("cuMemMap failed: CUDA_ERROR_NOT_SUPPORTED (801)")
            super().ensure(nbytes)

    def refusing_columns(widths: Any) -> tuple[Refusing, ...]:
        rows = standin.STANDIN_DEVICE_MEMORY // sum(widths)
        return tuple(Refusing(rows * w) for w in widths)

    be = standin_backend()
    be = type(be)(**{**be.__dict__, "growable_columns": refusing_columns})
    store, cpu = ColumnStore(be), ColumnStore(cpu_backend())
    with caplog.at_level("WARNING", logger="iqdb"):
        grow_one_write_at_a_time(store, cpu, 40, 100)
    told = [r.getMessage() for r in caplog.records if "cannot grow in place" in r.getMessage()]
    assert len(told) == 1 and "CUDA_ERROR_NOT_SUPPORTED" in told[0]
    assert store.version.layout.mirror.buffers is None  # type: ignore[union-attr]
    assert iqdb._store._GROWTH_REFUSED == {"cuda:0"}


# -- the driver binding (kernels/_vmm.py) ------------------------------------------------------------


class FakeDriver:
    """``_vmm._Driver``'s calls, recorded; ``fail`` maps a call name to the CUresult it returns."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail or {}
        self.next_handle = 100
        self.lib = SimpleNamespace(cuGetErrorName=lambda rc, out: 0)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("cu"):
            raise AttributeError(name)

        def call(*args: Any) -> int:
            self.calls.append((name, *[_plain(a) for a in args]))
            if name == "cuMemAddressReserve":
                args[0]._obj.value = 1 << 40
            if name == "cuMemCreate":
                args[0]._obj.value = self.next_handle
                self.next_handle += 1
            return self.fail.get(name, 0)

        return call

    check = _vmm._Driver.check


def _plain(a: Any) -> Any:
    return a if isinstance(a, int) else type(a).__name__


def fake_cupy() -> Any:
    class Device:
        def __init__(self, i: int) -> None:
            pass

        def __enter__(self) -> Device:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    runtime = SimpleNamespace(deviceSynchronize=lambda: None)
    return SimpleNamespace(cuda=SimpleNamespace(Device=Device, runtime=runtime))


def test_growth_maps_each_new_part_after_the_last_and_release_undoes_everything() -> None:
    drv = FakeDriver()
    g = _vmm.CudaGrowable(drv, fake_cupy(), 0, granularity=1 << 21, reserve=10 << 21)  # type: ignore[arg-type]
    assert g.reserved == 10 << 21 and g.ptr == 1 << 40
    g.ensure(1)
    g.ensure(1 << 21)  # within the first granule: nothing to do
    g.ensure((3 << 21) + 5)
    maps = [c for c in drv.calls if c[0] in ("cuMemCreate", "cuMemMap", "cuMemSetAccess")]
    assert maps == [
        ("cuMemCreate", "CArgObject", 1 << 21, "CArgObject", 0),
        ("cuMemMap", 1 << 40, 1 << 21, 0, 100, 0),
        ("cuMemSetAccess", 1 << 40, 1 << 21, "CArgObject", 1),
        ("cuMemCreate", "CArgObject", 3 << 21, "CArgObject", 0),
        ("cuMemMap", (1 << 40) + (1 << 21), 3 << 21, 0, 101, 0),
        ("cuMemSetAccess", (1 << 40) + (1 << 21), 3 << 21, "CArgObject", 1),
    ]
    assert g.committed == 4 << 21
    with pytest.raises(MemoryError, match="reserved"):
        g.ensure((10 << 21) + 1)
    drv.calls.clear()
    g.__del__()
    assert drv.calls == [
        ("cuMemUnmap", (1 << 40) + (1 << 21), 3 << 21),
        ("cuMemRelease", 101),
        ("cuMemUnmap", 1 << 40, 1 << 21),
        ("cuMemRelease", 100),
        ("cuMemAddressFree", 1 << 40, 10 << 21),
    ]


@pytest.mark.parametrize(
    ("fail", "error", "undo"),
    [
        ("cuMemCreate", MemoryError, []),
        ("cuMemMap", _vmm.CudaError, ["cuMemRelease"]),
        ("cuMemSetAccess", _vmm.CudaError, ["cuMemUnmap", "cuMemRelease"]),
    ],
)
def test_a_failed_growth_undoes_its_steps_and_keeps_what_was_there(
    fail: str, error: type, undo: list[str]
) -> None:
    drv = FakeDriver()
    g = _vmm.CudaGrowable(drv, fake_cupy(), 0, granularity=4096, reserve=1 << 20)  # type: ignore[arg-type]
    g.ensure(4096)
    drv.calls.clear()
    drv.fail[fail] = _vmm.CUDA_ERROR_OUT_OF_MEMORY if fail == "cuMemCreate" else 1
    with pytest.raises(error, match=fail):
        g.ensure(8192)
    names = [c[0] for c in drv.calls]
    assert names[names.index(fail) + 1 :] == undo
    assert g.committed == 4096 and len(g._maps) == 1


# -- the structures against cuda.h -------------------------------------------------------------------


def _cuda_h() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    venv = Path(__file__).resolve().parent.parent / ".venv-nvcc"
    found = [p for r in roots if r for p in [Path(r) / "include" / "cuda.h"] if p.exists()]
    found += sorted(venv.glob("lib/python*/site-packages/nvidia/*/include/cuda.h"))
    return found[0] if found else None


def test_the_ctypes_structures_match_cuda_h(tmp_path: Path) -> None:
    """Sizes, offsets and constants as the C compiler sees them in the installed ``cuda.h``, and
    every function the binding calls declared there under its own name (not a ``_v2`` macro)."""
    header = _cuda_h()
    cc = shutil.which("cc") or shutil.which("gcc")
    if header is None or cc is None:
        pytest.skip(f"needs cuda.h and a C compiler (cuda.h: {header}, cc: {cc})")
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <cuda.h>\n"
        '#define S(t) printf(#t " %zu\\n", sizeof(t));\n'
        '#define O(t, f) printf(#t "." #f " %zu\\n", offsetof(t, f));\n'
        '#define C(c) printf(#c " %d\\n", (int)(c));\n'
        "int main(void) {\n"
        "S(CUmemLocation) S(CUmemAllocationProp) S(CUmemAccessDesc) S(CUdeviceptr)"
        " S(CUmemGenericAllocationHandle)\n"
        "O(CUmemAllocationProp, location) O(CUmemAllocationProp, win32HandleMetaData)"
        " O(CUmemAllocationProp, allocFlags) O(CUmemAccessDesc, flags)\n"
        "C(CU_MEM_ALLOCATION_TYPE_PINNED) C(CU_MEM_LOCATION_TYPE_DEVICE)"
        " C(CU_MEM_ACCESS_FLAGS_PROT_READWRITE) C(CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)"
        " C(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) C(CUDA_ERROR_OUT_OF_MEMORY)\n"
        "return 0; }\n"
    )
    exe = tmp_path / "layout"
    subprocess.run([cc, f"-I{header.parent}", str(src), "-o", str(exe)], check=True, capture_output=True)
    c = dict(line.rsplit(" ", 1) for line in subprocess.check_output([str(exe)], text=True).splitlines())
    ours = {
        "CUmemLocation": ctypes.sizeof(_vmm.CUmemLocation),
        "CUmemAllocationProp": ctypes.sizeof(_vmm.CUmemAllocationProp),
        "CUmemAccessDesc": ctypes.sizeof(_vmm.CUmemAccessDesc),
        "CUdeviceptr": ctypes.sizeof(ctypes.c_uint64),
        "CUmemGenericAllocationHandle": ctypes.sizeof(ctypes.c_uint64),
        "CUmemAllocationProp.location": _vmm.CUmemAllocationProp.location.offset,
        "CUmemAllocationProp.win32HandleMetaData": _vmm.CUmemAllocationProp.win32HandleMetaData.offset,
        "CUmemAllocationProp.allocFlags": _vmm.CUmemAllocationProp.allocFlags.offset,
        "CUmemAccessDesc.flags": _vmm.CUmemAccessDesc.flags.offset,
        "CU_MEM_ALLOCATION_TYPE_PINNED": _vmm.CU_MEM_ALLOCATION_TYPE_PINNED,
        "CU_MEM_LOCATION_TYPE_DEVICE": _vmm.CU_MEM_LOCATION_TYPE_DEVICE,
        "CU_MEM_ACCESS_FLAGS_PROT_READWRITE": _vmm.CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        "CU_MEM_ALLOC_GRANULARITY_RECOMMENDED": _vmm.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
        "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED": (
            _vmm.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        ),
        "CUDA_ERROR_OUT_OF_MEMORY": _vmm.CUDA_ERROR_OUT_OF_MEMORY,
    }
    assert {k: int(v) for k, v in c.items()} == ours
    text = header.read_text(errors="replace")
    for name in _vmm._SIGNATURES:
        assert f"CUresult CUDAAPI {name}(" in text, name
        assert f"#define {name} " not in text, f"{name} is a macro for another symbol"


def test_without_a_driver_library_nothing_grows_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``libcuda`` (or one without the calls): the binding answers ``None``, so the store uses
    plain allocations, and says why once in the log."""
    _vmm._driver.cache_clear()
    monkeypatch.setattr(
        _vmm.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(f"{name}: not found"))
    )
    try:
        columns = _vmm.cuda_growable_columns(fake_cupy(), 0)
        assert columns([64, 8]) is None
    finally:
        _vmm._driver.cache_clear()


def test_the_standin_growable_is_what_the_store_tests_assume() -> None:
    g = standin.Growable(10 * GRANULARITY)
    a = g.array(np.float32, (0,))
    g.ensure(GRANULARITY + 1)
    x = g.array(np.float32, (GRANULARITY // 4,))
    x[:] = 1.0
    g.ensure(3 * GRANULARITY)  # growth: the arrays over the start stay valid and keep their values
    y = g.array(np.float32, (3 * GRANULARITY // 4,))
    assert float(y[: GRANULARITY // 4].sum()) == GRANULARITY // 4
    assert g.committed == 3 * GRANULARITY and a.shape == (0,)


# -- on a GPU (skipped with the reason where there is none) ------------------------------------------


@pytest.mark.gpu
def test_on_the_gpu_growth_maps_memory_in_place_and_answers_as_the_cpu() -> None:
    """A database grown from empty on the GPU: the device matrix never moves (growth maps more
    memory after it), the mirror holds about the capacity, and every search answers as the CPU
    bit for bit."""
    import iqdb

    gpu, cpu = iqdb.open_in_memory(device="cuda"), iqdb.open_in_memory(device="cpu")
    rng = np.random.default_rng(11)
    Q = rng.standard_normal((8, 64)).astype(np.float32)
    first_ptr = None
    for w in range(30):
        V = rng.standard_normal((2000, 64)).astype(np.float32)
        for db in (gpu, cpu):
            db.upsert_many(np.arange(w * 2000, (w + 1) * 2000), V)
        got, want = gpu.search_arrays(Q, 10, "l2"), cpu.search_arrays(Q, 10, "l2")
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1].view(np.uint64), want[1].view(np.uint64))
        mirror = gpu._store.version.layout.mirror
        assert mirror.buffers is not None, "CUDA virtual memory was refused here: see the iqdb log"
        ptr = int(mirror.columns[0].data.ptr)
        first_ptr = first_ptr or ptr
        assert ptr == first_ptr, "the device matrix moved"
    cap = gpu._store.version.layout.capacity
    assert gpu.memory_usage()["device"] <= cap * (64 * 4 + 32) + 6 * (2 << 20)
    gpu.close()
    cpu.close()
