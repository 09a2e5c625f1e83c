"""Reliability under load and misuse (issue 9): searches never wait for writers and always see
one consistent state, dropped handles clean up, callbacks cannot deadlock, compaction does not
block searches, a failed write leaves memory and the WAL as they were, extreme rows do not slow
later searches, and the contract's order of checks."""

from __future__ import annotations

import errno
import gc
import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faultfs import ErrorFs

import iqdb
from iqdb import Closed, InvalidArgument, Poisoned, Record
from iqdb._fs import OsFileSystem
from iqdb._store import ColumnStore

STORAGES = ["memory", "durable"]


def _open(storage: str, tmp_path: Path, **kw: Any) -> iqdb.Iqdb:
    return iqdb.open_in_memory(**kw) if storage == "memory" else iqdb.open(tmp_path / "db", **kw)


def _run_until(threads: list[threading.Thread], deadline: float) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))


# -- 1. searches make progress under any write rate ------------------------------------------------
@pytest.mark.parametrize("storage", STORAGES)
def test_searches_finish_while_a_thread_writes_in_a_loop(storage: str, tmp_path: Path) -> None:
    """The reported case: a writer upserting and deleting in a tight loop next to 4 threads of 5
    searches each on 16 records. Before, 3 (memory) or 9 (durable) of the 20 searches finished in
    40 s; now all of them finish, and quickly."""
    db = _open(storage, tmp_path)
    rng = np.random.default_rng(0)
    db.upsert_many(range(16), rng.standard_normal((16, 8), dtype=np.float32))
    stop = threading.Event()
    writes = [0]
    done: list[float] = []

    def writer() -> None:
        v = np.ones(8, dtype=np.float32)
        while not stop.is_set():
            db.upsert(Record(99, v))
            db.delete(99)
            writes[0] += 2

    def searcher() -> None:
        for _ in range(5):
            t0 = time.perf_counter()
            assert len(db.search(np.ones(8), 3, "l2")) == 3
            done.append(time.perf_counter() - t0)

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    started = time.monotonic()
    while writes[0] == 0 and time.monotonic() - started < 10:
        time.sleep(0.001)  # the searches start once the writer is writing
    try:
        _run_until([threading.Thread(target=searcher, daemon=True) for _ in range(4)], time.monotonic() + 30)
    finally:
        stop.set()
        w.join(10)
    db.close()
    assert len(done) == 20, f"only {len(done)} of 20 searches finished in 30 s"
    assert writes[0] > 0, "the writer made no progress"


def _phase(fn: Callable[[], None], threads: int, seconds: float) -> tuple[int, list[float]]:
    stop = time.monotonic() + seconds
    lat: list[float] = []
    lock = threading.Lock()

    def loop() -> None:
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            fn()
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    _run_until(ts, stop + 30)
    return len(lat), lat


@pytest.mark.slow
def test_readers_and_a_writer_keep_most_of_their_rates_together() -> None:
    """The benchmark's shape (bench/bench_concurrency.py: one thread writing single records as
    fast as it can, 8 search threads on 100,000 x 128) with generous bounds, so that it cannot
    flake on a noisy machine: each side keeps at least a twentieth of its rate alone (starvation,
    as before this design, leaves one side under 1 %), and the search p99 stays within 20x of
    its p99 alone (the benchmark's targets are 1/2 and 5x; it measures about 0.35 and 0.48 on
    2 vCPUs, and one CI run of this test saw the searches at 0.094 with 2 s phases)."""
    n, d, seconds = 100_000, 128, 3.0
    rng = np.random.default_rng(1)
    db = iqdb.open_in_memory()
    db.upsert_many(np.arange(n), rng.standard_normal((n, d), dtype=np.float32))
    q = rng.standard_normal(d, dtype=np.float32)
    vecs = rng.standard_normal((4096, d), dtype=np.float32)
    counter = iter(range(10**9))

    def write() -> None:
        i = next(counter)
        db.upsert(Record(i % n, vecs[i % 4096]))

    def search() -> None:
        db.search(q, 10, "l2")

    searches_alone, lat_alone = _phase(search, 8, seconds)
    writes_alone, _ = _phase(write, 1, seconds)
    box: dict[str, Any] = {}
    wt = threading.Thread(target=lambda: box.update(w=_phase(write, 1, seconds)), daemon=True)
    wt.start()
    searches_both, lat_both = _phase(search, 8, seconds)
    wt.join(30)
    writes_both = box["w"][0]
    db.close()
    p99 = float(np.percentile(lat_alone, 99)), float(np.percentile(lat_both, 99))
    assert searches_both >= 0.05 * searches_alone, (searches_alone, searches_both)
    assert writes_both >= 0.05 * writes_alone, (writes_alone, writes_both)
    assert p99[1] <= 20 * p99[0], p99


@pytest.mark.parametrize("storage", STORAGES)
def test_every_search_sees_the_state_after_one_write(storage: str, tmp_path: Path) -> None:
    """Linearizability with a witness: each search reports the version it read; its results
    equal a serial model (dict + float64 brute force) at that version, the version lies between
    the last write finished before the search began and the first one finished after it ended,
    and a thread never sees versions go backwards. The writer mixes single upserts, batches
    (one version each: never half seen), replacements and deletes."""
    d = 3
    db = _open(storage, tmp_path, wal_limit=1 << 16) if storage == "durable" else _open(storage, tmp_path)
    rng = np.random.default_rng(2)
    states: dict[int, dict[int, tuple[float, ...]]] = {}
    model: dict[int, tuple[float, ...]] = {}
    v0 = db._store.version.seq
    states[v0] = {}
    finished: list[int] = [v0]  # seqs of finished writes, in order
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for step in range(1500):
                kind = step % 5
                if kind in (0, 1):
                    rid = int(rng.integers(0, 40))
                    vec = tuple(float(x) for x in rng.integers(-5, 6, d))
                    db.upsert(Record(rid, vec))
                    model[rid] = vec
                elif kind == 2:
                    ids = rng.integers(0, 60, 6)
                    vecs = rng.integers(-5, 6, (6, d)).astype(np.float32)
                    db.upsert_many(ids, vecs)
                    for i, v in zip(ids.tolist(), vecs.tolist()):
                        model[i] = tuple(v)
                else:
                    rid = int(rng.integers(0, 60))
                    if not db.delete(rid):
                        continue
                    model.pop(rid)
                seq = db._store.version.seq
                states[seq] = dict(model)
                finished.append(seq)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    def reader(seed: int) -> None:
        r = np.random.default_rng(seed)
        last = -1
        try:
            while not stop.is_set():
                q = r.integers(-5, 6, d).astype(np.float32)
                lo = finished[-1]
                res = db.search(q, 100, "l2")
                seq = db._local.seq
                hi = finished[-1]
                assert seq >= last, "a thread saw versions go backwards"
                last = seq
                assert lo <= seq, (lo, seq)
                # The version's state: the first recorded state at or after seq (a compaction
                # may publish an unchanged version just after a write).
                known = [s for s in list(finished) if s >= seq]
                state = states[known[0]] if known else None
                assert seq <= hi or state is None
                if state is None:
                    continue
                want = sorted(
                    (float(np.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(vec, q)))), rid)
                    for rid, vec in state.items()
                )
                got = [(r_.score, int(r_.id)) for r_ in res]
                assert [i for _, i in got] == [i for _, i in want], f"search at seq {seq} saw another state"
                np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-12, atol=1e-12)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, daemon=True)] + [
        threading.Thread(target=reader, args=(i,), daemon=True) for i in range(3)
    ]
    _run_until(threads, time.monotonic() + 120)
    stop.set()
    db.close()
    assert not errors, errors[0]


# -- 2. a dropped handle releases its lock and files -------------------------------------------------
def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors")
def test_a_dropped_handle_releases_its_lock_and_files_without_compacting(tmp_path: Path) -> None:
    before = _fds()
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, [1.0, 2.0]))
    with pytest.warns(ResourceWarning, match="unclosed iqdb database"):
        del db
        gc.collect()
    assert _fds() == before
    assert not (tmp_path / "snap").exists(), "a dropped handle must not compact"
    assert (tmp_path / "wal").stat().st_size > 0
    with iqdb.open(tmp_path) as again:  # not Locked
        assert again.get(1) == Record(1, [1.0, 2.0])


def test_close_releases_the_memory_of_the_records() -> None:
    db = iqdb.open_in_memory()
    db.upsert_many(np.arange(20_000), np.ones((20_000, 64), dtype=np.float32))
    assert db._store.nbytes() > 20_000 * 64 * 4
    db.close()
    assert db._store.nbytes() < 4096


# -- 3. predicates cannot change the handle --------------------------------------------------------
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("call", ["upsert", "upsert_many", "delete", "compact", "close"])
def test_a_predicate_that_writes_raises_at_once(storage: str, call: str, tmp_path: Path) -> None:
    db = _open(storage, tmp_path)
    db.upsert_many([1, 2, 3], np.eye(3, dtype=np.float32))
    actions: dict[str, Callable[[], object]] = {
        "upsert": lambda: db.upsert(Record(9, [1, 1, 1])),
        "upsert_many": lambda: db.upsert_many([9], [[1, 1, 1]]),
        "delete": lambda: db.delete(1),
        "compact": db.compact,
        "close": db.close,
    }
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            db.search_with([1, 0, 0], 2, "l2", lambda rec: actions[call]() or True)
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the predicate deadlocked"
    assert isinstance(box.get("exc"), InvalidArgument)
    assert "cannot be changed from inside a search predicate" in str(box["exc"])
    assert len(db) == 3 and 9 not in db  # nothing changed, the handle is open
    db.close()


def test_a_predicate_may_read_the_handle() -> None:
    db = iqdb.open_in_memory()
    db.upsert_many([1, 2, 3], np.eye(3, dtype=np.float32), [{"keep": True}, {"keep": False}, {"keep": True}])

    def pred(rec: Record) -> bool:
        got = db.get(rec.id)
        return got is not None and len(db) == 3 and rec.id in db and bool(got.payload and got.payload["keep"])

    assert [int(r.id) for r in db.search_with([1, 0, 0], 3, "l2", pred)] == [1, 3]
    db.close()


# -- 4. compaction does not block searches ---------------------------------------------------------
@pytest.mark.slow
def test_searches_go_on_during_a_compaction(tmp_path: Path) -> None:
    n, d = 300_000, 128
    rng = np.random.default_rng(3)

    class SlowSync(OsFileSystem):
        """The compaction's fsyncs take 0.15 s more (a slow disk), so that the compaction lasts
        long enough to tell on any machine (it took 0.19 s once in CI, under the 0.2 s needed)."""

        slow = False

        def fsync(self, fd: int) -> None:
            if self.slow:
                time.sleep(0.15)
            super().fsync(fd)

    fs = SlowSync()
    db = iqdb.open(tmp_path, fs=fs)
    for start in range(0, n, 50_000):
        db.upsert_many(np.arange(start, start + 50_000), rng.standard_normal((50_000, d), dtype=np.float32))
    q = rng.standard_normal(d, dtype=np.float32)
    expect = [int(r.id) for r in db.search(q, 5, "l2")]
    worst = [0.0]
    took = [0.0]
    started = threading.Event()

    def compact() -> None:
        started.set()
        t0 = time.perf_counter()
        db.compact()
        took[0] = time.perf_counter() - t0

    fs.slow = True
    t = threading.Thread(target=compact)
    t.start()
    started.wait()
    searches = 0
    while t.is_alive():
        t0 = time.perf_counter()
        assert [int(r.id) for r in db.search(q, 5, "l2")] == expect
        worst[0] = max(worst[0], time.perf_counter() - t0)
        searches += 1
    t.join()
    fs.slow = False
    db.close()
    assert took[0] > 0.2, f"compaction took only {took[0]:.3f} s: too small to tell"
    assert searches >= 3
    assert worst[0] < took[0] / 3, f"a search took {worst[0]:.3f} s during a {took[0]:.3f} s compaction"


# -- 5. a write that fails to apply is undone --------------------------------------------------------
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("where", ["_kill", "_set_norms", "_publish"])
def test_a_write_that_fails_in_memory_leaves_memory_and_the_wal_as_they_were(
    storage: str, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _open(storage, tmp_path)
    db.upsert_many([1, 2, 3], np.eye(3, dtype=np.float32), [{"a": 1}, None, None])
    wal = tmp_path / "db" / "wal"
    wal_before = wal.read_bytes() if storage == "durable" else b""
    hits_before = [(int(r.id), r.score) for r in db.search([1, 0, 0], 3, "l2")]

    def boom(*args: Any, **kw: Any) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(ColumnStore, where, boom)
    with pytest.raises(MemoryError):
        # Replaces id 1 and adds 4: both the index and the dead log are touched.
        db.upsert_many([1, 4], np.ones((2, 3), dtype=np.float32))
    monkeypatch.undo()
    if storage == "durable":
        assert wal.read_bytes() == wal_before
    assert len(db) == 3 and 4 not in db
    assert db.get(1) == Record(1, [1, 0, 0], {"a": 1})
    assert [(int(r.id), r.score) for r in db.search([1, 0, 0], 3, "l2")] == hits_before
    db.upsert(Record(5, [0, 0, 1]))  # the handle still works
    assert len(db) == 4
    if storage == "durable":
        db.close()
        with iqdb.open(tmp_path / "db") as again:  # what memory held is what a reopen sees
            assert sorted(int(r.id) for r in again.search([1, 0, 0], 9, "l2")) == [1, 2, 3, 5]
            assert again.get(1) == Record(1, [1, 0, 0], {"a": 1})
    else:
        db.close()


def test_a_failed_write_whose_wal_cannot_be_cut_poisons_the_handle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = ErrorFs(None, errno.EIO, "ftruncate")
    db = iqdb.open(tmp_path, fs=fs)
    db.upsert(Record(1, [1.0, 0.0]))

    def boom(*args: Any, **kw: Any) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(ColumnStore, "_publish", boom)
    fs.fail_at = fs.matched
    with pytest.raises(MemoryError):
        db.upsert(Record(2, [0.0, 1.0]))
    monkeypatch.undo()
    with pytest.raises(Poisoned) as info:
        db.upsert(Record(3, [1.0, 1.0]))
    assert info.value.errno == errno.EIO
    assert isinstance(info.value.__cause__, OSError)
    assert len(db) == 1 and db.get(1) is not None  # reads work
    db.close()


# -- 6. extreme rows --------------------------------------------------------------------------------
def test_norm_bounds_follow_deletes() -> None:
    db = iqdb.open_in_memory()
    rng = np.random.default_rng(4)
    db.upsert_many(np.arange(1000), rng.standard_normal((1000, 16), dtype=np.float32))
    normal = db._store.version.bounds
    db.upsert(Record(5000, np.full(16, 1e18, dtype=np.float32)))
    assert db._store.version.bounds[1] > 1e36
    db.delete(5000)
    assert db._store.version.bounds == normal
    db.upsert(Record(7, np.full(16, 1e18, dtype=np.float32)))  # a replacement of an extreme row
    db.upsert(Record(7, np.ones(16, dtype=np.float32)))
    assert db._store.version.bounds[1] == pytest.approx(max(normal[1], 16.0))
    db.close()


def test_a_search_over_extreme_rows_stays_within_the_working_set() -> None:
    """Rows beyond float32's safe range make the scan score in float64: the widened rows must
    come in tiles within the working set, not as one float64 copy of the matrix."""
    n, d = 20_000, 128  # a 10 MB matrix; 20 MB as float64
    rng = np.random.default_rng(5)
    ws = 1 << 20
    db = iqdb.open_in_memory(working_set=ws)
    X = rng.standard_normal((n, d), dtype=np.float32)
    db.upsert_many(np.arange(n), X)
    db.upsert(Record(n, np.full(d, 1e19, dtype=np.float32)))  # still in the database
    q = rng.standard_normal(d, dtype=np.float32)
    for metric in ("l2", "dot", "cosine"):
        db.search(q, 10, metric)
        tracemalloc.start()
        hits = db.search(q, 10, metric)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 6 * ws, f"{metric}: a single query used {peak / 2**20:.1f} MiB"
        assert len(hits) == 10
    db.close()


# -- 8. the contract's order of checks -------------------------------------------------------------
@pytest.mark.parametrize("storage", STORAGES)
def test_a_closed_handle_raises_closed_before_looking_at_arguments(storage: str, tmp_path: Path) -> None:
    db = _open(storage, tmp_path)
    db.close()
    calls: list[Callable[[], object]] = [
        lambda: db.get("x"),
        lambda: "x" in db,
        lambda: db.upsert(1),  # type: ignore[arg-type]
        lambda: db.upsert_many("bad", None),
        lambda: db.delete("x"),
        lambda: db.search("q", -1, "nope"),  # type: ignore[arg-type]
        lambda: db.search_with([1.0], 1, "l2", None),  # type: ignore[arg-type]
        lambda: db.search_batch("q", "k", "nope"),  # type: ignore[arg-type]
        lambda: db.search_arrays(None, 0),  # type: ignore[arg-type]
        lambda: len(db),
        lambda: db.dim,
        lambda: db.device,
        db.flush,
        db.compact,
        db.check,
        db.is_empty,
    ]
    for call in calls:
        with pytest.raises(Closed):
            call()
    db.close()  # again: nothing


def test_k_zero_answers_before_any_other_check() -> None:
    db = iqdb.open_in_memory()
    db.upsert(Record(1, [1.0, 2.0]))
    assert db.search("not a vector", 0, "nope") == []  # type: ignore[arg-type]
    assert db.search_with([1.0, 2.0, 3.0], 0, "nope", None) == []  # type: ignore[arg-type]
    assert db.search_batch("junk", 0, "nope", 5) == [[] for _ in "junk"]  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        db.search_with([1.0, 2.0], 1, "l2", None)  # type: ignore[arg-type]
    db.close()


def test_poisoned_carries_the_errno_filename_and_cause_of_the_failure(tmp_path: Path) -> None:
    fs = ErrorFs(None, errno.EIO, "fsync")
    db = iqdb.open(tmp_path, fs=fs)
    db.upsert(Record(1, [1.0]))
    fs.fail_at = fs.matched
    with pytest.raises(iqdb.StorageError):
        db.flush()
    for call in (lambda: db.upsert(Record(2, [2.0])), db.flush, lambda: db.delete(1)):
        with pytest.raises(Poisoned) as info:
            call()
        assert info.value.errno == errno.EIO
        assert info.value.filename == str(tmp_path / "wal")
        assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EIO
    db.close()


def test_memory_usage_counts_the_vectors_and_the_payloads() -> None:
    db = iqdb.open_in_memory()
    assert db.memory_usage() == {"host": db._store.nbytes(), "device": 0}
    n, d = 10_000, 32
    db.upsert_many(np.arange(n), np.ones((n, d), dtype=np.float32))
    bare = db.memory_usage()["host"]
    assert n * d * 4 <= bare <= 1.5 * n * (d * 4 + 40)
    db.upsert_many(np.arange(n), np.ones((n, d), dtype=np.float32), [{"text": "x" * 200}] * n)
    with_payloads = db.memory_usage()["host"]
    assert with_payloads - bare >= n * 200  # the payload strings are counted
    db.close()
    with pytest.raises(Closed):
        db.memory_usage()


def test_the_kernel_slots_serve_waiters_in_order_and_never_lose_a_slot() -> None:
    from iqdb._search import _FairSlots

    slots = _FairSlots(1)
    assert slots.acquire() is True
    order: list[int] = []

    def wait(i: int) -> None:
        slots.acquire()
        order.append(i)
        slots.release()

    threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # queue them in a known order
    slots.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert slots.acquire() is True  # every slot came back
    slots.release()
