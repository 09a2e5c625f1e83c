"""``iqdb.AsyncIqdb``: the same answers as the synchronous handle, off the event loop, shared by
many tasks, and cancellation that never half-applies a write."""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import errno
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

import iqdb
import iqdb._async
from iqdb import AsyncIqdb, Closed, Iqdb, Record
from iqdb._fs import OsFileSystem

T = TypeVar("T")
DIM = 16
BASE = 3000  # records every search sees
SENTINEL = 50_000  # the id of the write made after a cancelled one
FAR = 10.0  # written records start this far out: never in an L2 top-k of a query in [0, 1)^d


def run(coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def until(flag: threading.Event, timeout: float = 30) -> None:
    """Wait for a flag a worker thread sets, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not flag.is_set():
        assert time.monotonic() < deadline, "timed out waiting for a worker thread"
        await asyncio.sleep(0.001)


def base_data(seed: int = 7) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any] | None]]:
    rng = np.random.default_rng(seed)
    ids = np.arange(BASE, dtype=np.uint64)
    vectors = rng.random((BASE, DIM), dtype=np.float32)
    payloads: list[dict[str, Any] | None] = [
        {"i": i, "even": i % 2 == 0} if i % 3 else None for i in range(BASE)
    ]
    return ids, vectors, payloads


def far_batch(first: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    ids = np.arange(first, first + n, dtype=np.uint64)
    return ids, FAR + rng.random((n, DIM), dtype=np.float32), [{"w": int(i)} for i in ids]


@pytest.fixture(params=["memory", "durable"])
def storage(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def open_sync(storage: str, path: Path, **options: Any) -> Iqdb:
    if storage == "memory":
        return iqdb.open_in_memory(device="cpu")
    return iqdb.open(path, device="cpu", **options)


def open_async(storage: str, path: Path, **options: Any) -> Awaitable[AsyncIqdb]:
    if storage == "memory":
        return AsyncIqdb.open_in_memory(device="cpu", **options)
    return AsyncIqdb.open(path, device="cpu", **options)


class GateFs(OsFileSystem):
    """Stops the next call to the armed method in its worker thread until released, then lets
    it run or fail with ``fail``."""

    def __init__(self) -> None:
        self.armed: str | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: OSError | None = None

    def _gate(self, name: str) -> None:
        if self.armed != name:
            return
        self.armed = None
        self.entered.set()
        assert self.release.wait(60), "the test never released the gate"
        if self.fail is not None:
            raise self.fail

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._gate("write")
        return super().write(fd, data)

    def lock(self, fd: int) -> None:
        self._gate("lock")
        super().lock(fd)


# -- the surface ------------------------------------------------------------------------------
def test_module_example_runs() -> None:
    failed, attempted = doctest.testmod(iqdb._async)
    assert attempted > 0 and failed == 0


def test_every_public_method_of_iqdb_has_a_coroutine_twin() -> None:
    missing, not_coroutines = [], []
    for name, member in inspect.getmembers(Iqdb):
        if name.startswith("_") or name in ("open", "open_in_memory"):
            continue
        twin = getattr(AsyncIqdb, name, None)
        if twin is None:
            missing.append(name)
        elif isinstance(member, property):
            if not isinstance(twin, property):
                not_coroutines.append(name)
        elif not inspect.iscoroutinefunction(twin):
            not_coroutines.append(name)
    assert missing == [], "add these to iqdb/_async.py"
    assert not_coroutines == []
    # The contract's additions are there too, ready for when they land on Iqdb.
    for name in ("count", "delete_where", "upsert_arrow", "to_arrow"):
        assert inspect.iscoroutinefunction(getattr(AsyncIqdb, name))


def test_wrapping_something_else_is_refused() -> None:
    with pytest.raises(iqdb.InvalidArgument, match="dict"):
        AsyncIqdb({})  # type: ignore[arg-type]


def test_results_equal_the_synchronous_handle(storage: str, tmp_path: Path) -> None:
    ids, vectors, payloads = base_data()
    queries = np.random.default_rng(1).random((7, DIM), dtype=np.float32)
    sync = open_sync(storage, tmp_path / "sync")
    sync.upsert_many(ids, vectors, payloads)
    sync.upsert(Record(BASE, [0.5] * DIM, {"one": 1}))
    sync.delete(5)

    async def main() -> None:
        async with open_async(storage, tmp_path / "async") as db:
            assert await db.is_empty()
            assert db.dim is None
            await db.upsert_many(ids, vectors, payloads)
            await db.upsert(Record(BASE, [0.5] * DIM, {"one": 1}))
            assert await db.delete(5) is True
            assert await db.delete(5) is False
            assert len(db) == len(sync) == BASE
            assert 7 in db and 5 not in db
            assert db.dim == DIM and db.device == sync.device == "cpu"
            assert not await db.is_empty()
            for rid in (0, 1, 5, BASE, 10**9):
                assert await db.get(rid) == sync.get(rid)
            for metric in ("l2", "cosine", "dot"):
                assert await db.search(queries[0], 10, metric) == sync.search(queries[0], 10, metric)
                assert await db.search_batch(queries, 5, metric) == sync.search_batch(queries, 5, metric)
                got_ids, got_scores = await db.search_arrays(queries, 5, metric)
                want_ids, want_scores = sync.search_arrays(queries, 5, metric)
                np.testing.assert_array_equal(got_ids, want_ids)
                np.testing.assert_array_equal(got_scores, want_scores)

            def even(r: Record) -> bool:
                return bool(r.payload and r.payload.get("even"))

            assert await db.search_with(queries[1], 4, "l2", even) == sync.search_with(
                queries[1], 4, "l2", even
            )
            assert await db.search_batch(queries, 3, "l2", even) == sync.search_batch(queries, 3, "l2", even)
            usage = await db.memory_usage()
            assert set(usage) == {"host", "device"} and usage["host"] > 0
            await db.flush()
            await db.compact()
            assert (await db.check())["ok"] is True
            # Errors arrive typed, from the worker thread.
            with pytest.raises(iqdb.InvalidArgument):
                await db.search(queries[0], -1)
            with pytest.raises(iqdb.DimensionMismatch) as info:
                await db.search([1.0, 2.0], 3)
            assert (info.value.left, info.value.right) == (2, DIM)
            with pytest.raises(iqdb.InvalidArgument, match="position 1"):
                await db.upsert_many([1, -1], np.zeros((2, DIM)))

    run(main())
    want = sync.search_batch(queries, 5, "l2")
    sync.close()
    if storage == "durable":
        with iqdb.open(tmp_path / "async", device="cpu") as again:
            assert again.search_batch(queries, 5, "l2") == want
            assert len(again) == BASE
            assert again.get(BASE) == Record(BASE, [0.5] * DIM, {"one": 1})


@pytest.mark.skipif(not hasattr(iqdb, "Filter"), reason="filters land with issue 11")
def test_filter_keywords_pass_through() -> None:
    ids, vectors, payloads = base_data()
    query = np.full(DIM, 0.5, dtype=np.float32)
    where = {"even": True}

    async def main() -> None:
        async with AsyncIqdb.open_in_memory(device="cpu") as db:
            await db.upsert_many(ids, vectors, payloads)
            sync = db.handle
            assert await db.search(query, 5, "l2", filter=where) == sync.search(query, 5, "l2", filter=where)
            assert await db.count(where) == sync.count(where)
            removed = await db.delete_where(where)
            assert removed > 0 and await db.count(where) == 0

    run(main())


@pytest.mark.skipif(not hasattr(Iqdb, "to_arrow"), reason="Arrow in and out land with issue 12 part 1")
def test_arrow_in_and_out_pass_through(tmp_path: Path) -> None:
    ids, vectors, payloads = base_data()

    async def main() -> None:
        async with AsyncIqdb.open_in_memory(device="cpu") as source:
            await source.upsert_many(ids, vectors, payloads)
            table = await source.to_arrow()
            assert table.num_rows == BASE
            async with AsyncIqdb.open(tmp_path / "copy", device="cpu") as copy:
                assert await copy.upsert_arrow(table.to_reader(max_chunksize=1000)) == BASE
                for rid in (0, 1, 2, BASE - 1):
                    assert await copy.get(rid) == await source.get(rid)
                query = vectors[17]
                assert await copy.search(query, 5, "l2") == await source.search(query, 5, "l2")

    run(main())


# -- off the event loop, shared by many tasks -------------------------------------------------
def test_a_search_runs_off_the_event_loop() -> None:
    # The predicate blocks its search until the loop lets it go: if the search ran on the loop's
    # thread, the loop could never do so, and the predicate's wait would time out.
    started, go = threading.Event(), threading.Event()

    def gated(r: Record) -> bool:
        started.set()
        return go.wait(10)

    async def main() -> None:
        async with AsyncIqdb.open_in_memory(device="cpu") as db:
            await db.upsert_many([1, 2, 3], np.eye(3))
            search = asyncio.ensure_future(db.search_with([1, 0, 0], 2, "l2", gated))
            await until(started)
            assert not search.done()
            go.set()
            assert [int(h.id) for h in await search] == [1, 2]

    run(main())


def test_searches_from_many_tasks_run_at_the_same_time() -> None:
    # Each search's predicate waits at a barrier for the others: it is only passed if that
    # many searches are in flight together (a serialising handle breaks the barrier).
    parties = 4
    barrier = threading.Barrier(parties, timeout=20)

    def meet(r: Record) -> bool:
        if r.id == 0:
            barrier.wait()
        return True

    async def main() -> None:
        async with AsyncIqdb.open_in_memory(device="cpu") as db:
            await db.upsert_many(range(50), np.random.default_rng(0).random((50, 4)))
            results = await asyncio.gather(
                *(db.search_with([0.5] * 4, 3, "l2", meet) for _ in range(parties))
            )
            assert all(r == results[0] and len(r) == 3 for r in results)

    run(main())


def test_100_concurrent_tasks_mixing_searches_and_writes(storage: str, tmp_path: Path) -> None:
    ids, vectors, payloads = base_data()
    rng = np.random.default_rng(3)
    queries = rng.random((60, DIM), dtype=np.float32)
    batches = rng.random((30, 8, DIM), dtype=np.float32)
    # The reference: the synchronous handle over the base data. The writes add records far
    # from every query, so each search's answer is the same whenever it runs between them.
    with iqdb.open_in_memory(device="cpu") as ref:
        ref.upsert_many(ids, vectors, payloads)
        want_single = [ref.search(q, 10, "l2") for q in queries]
        want_batch = [ref.search_batch(b, 5, "l2") for b in batches[:15]]
        want_arrays = [ref.search_arrays(b, 5, "l2") for b in batches[15:]]
        want_get = [ref.get(i) for i in range(0, BASE, 97)]

    writes = [far_batch(10_000 + 100 * w, 20, seed=w) for w in range(25)]
    singles = [Record(20_000 + w, [FAR + w] * DIM, {"single": w}) for w in range(5)]

    async def writer(w: int, db: AsyncIqdb) -> None:
        wid, wvec, wpay = writes[w]
        await db.upsert_many(wid, wvec, wpay)
        assert await db.delete(int(wid[0])) is True  # the task's own earlier write is there

    async def main() -> None:
        async with open_async(storage, tmp_path / "db") as db:
            await db.upsert_many(ids, vectors, payloads)
            tasks: list[Awaitable[Any]] = []
            tasks += [db.search(q, 10, "l2") for q in queries[:40]]  # 40
            tasks += [db.search_batch(b, 5, "l2") for b in batches[:15]]  # 15
            tasks += [db.search_arrays(b, 5, "l2") for b in batches[15:]]  # 15
            tasks += [writer(w, db) for w in range(25)]  # 25
            tasks += [db.upsert(r) for r in singles]  # 5
            assert len(tasks) == 100
            order = np.random.default_rng(5).permutation(len(tasks))
            shuffled = [tasks[i] for i in order]
            done = await asyncio.gather(*shuffled)
            results = [None] * len(tasks)
            for slot, value in zip(order, done):
                results[slot] = value
            assert results[:40] == want_single[:40]
            assert results[40:55] == want_batch
            for (got_ids, got_scores), (want_i, want_s) in zip(results[55:70], want_arrays):
                np.testing.assert_array_equal(got_ids, want_i)
                np.testing.assert_array_equal(got_scores, want_s)
            # After the storm, the database equals the synchronous one that made the same writes.
            assert [await db.get(i) for i in range(0, BASE, 97)] == want_get
            late = await asyncio.gather(*(db.search(q, 10, "l2") for q in queries[40:]))
            assert late == want_single[40:]
            with iqdb.open_in_memory(device="cpu") as model:
                model.upsert_many(ids, vectors, payloads)
                for wid, wvec, wpay in writes:
                    model.upsert_many(wid, wvec, wpay)
                    model.delete(int(wid[0]))
                for r in singles:
                    model.upsert(r)
                assert len(db) == len(model) == BASE + 25 * 19 + 5
                near_far = np.full((3, DIM), FAR, dtype=np.float32)
                assert await db.search_batch(near_far, 600, "l2") == model.search_batch(near_far, 600, "l2")

    run(main())


# -- cancellation -----------------------------------------------------------------------------
def _prepared(path: Path, fs: GateFs) -> tuple[Awaitable[AsyncIqdb], int]:
    """A durable database holding the base data, reopened over ``fs``."""
    ids, vectors, payloads = base_data()
    with iqdb.open(path, device="cpu") as db:
        db.upsert_many(ids, vectors, payloads)
    return AsyncIqdb.open(path, device="cpu", fs=fs), BASE


def _assert_batch_is(
    db: Iqdb, batch: tuple[np.ndarray, np.ndarray, list[dict[str, Any]]], there: bool
) -> None:
    bid, bvec, bpay = batch
    assert len(db) == BASE + (len(bid) if there else 0) + 1  # + the write made afterwards
    present = [int(i) in db for i in bid]
    assert all(present) if there else not any(present)
    if there:
        sample = np.arange(0, len(bid), 997)
        for j in sample:
            assert db.get(int(bid[j])) == Record(int(bid[j]), bvec[j], bpay[j])
        got, _ = db.search_arrays(bvec[sample], 1, "l2")
        np.testing.assert_array_equal(got[:, 0], bid[sample])
    assert db.check()["ok"]


@pytest.mark.parametrize("outcome", ["completes", "fails"])
def test_cancelling_a_write_that_started_applies_it_whole_or_not_at_all(outcome: str, tmp_path: Path) -> None:
    fs = GateFs()
    opening, _ = _prepared(tmp_path / "db", fs)
    batch = far_batch(100_000, 20_000, seed=11)  # one WAL frame of several pieces
    if outcome == "fails":
        fs.fail = OSError(errno.ENOSPC, "No space left on device")

    async def main() -> None:
        db = await opening
        fs.armed = "write"
        write = asyncio.ensure_future(db.upsert_many(*batch))
        await until(fs.entered)  # the write is inside its thread, part way into the WAL append
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write  # the task is cancelled at once, while its thread still waits
        fs.release.set()
        # The cancelled write holds the writer mutex: this one runs after it ends.
        await db.upsert(Record(SENTINEL, [0.25] * DIM))
        _assert_batch_is(db.handle, batch, there=outcome == "completes")
        await db.close()

    run(main())
    with iqdb.open(tmp_path / "db", device="cpu") as again:  # and so it stays on disk
        _assert_batch_is(again, batch, there=outcome == "completes")


def test_cancelling_a_write_that_has_not_started_never_runs_it(storage: str, tmp_path: Path) -> None:
    ids, vectors, payloads = base_data()
    batch = far_batch(100_000, 5_000, seed=12)
    busy, free = threading.Event(), threading.Event()

    def occupy() -> None:
        busy.set()
        assert free.wait(30)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            async with open_async(storage, tmp_path / "db", executor=pool) as db:
                await db.upsert_many(ids, vectors, payloads)
                blocker = asyncio.get_running_loop().run_in_executor(pool, occupy)
                await until(busy)
                write = asyncio.ensure_future(db.upsert_many(*batch))
                await asyncio.sleep(0.01)
                write.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await write
                free.set()
                await blocker
                await db.upsert(Record(SENTINEL, [0.25] * DIM))
                _assert_batch_is(db.handle, batch, there=False)

    run(main())
    if storage == "durable":
        with iqdb.open(tmp_path / "db", device="cpu") as again:
            _assert_batch_is(again, batch, there=False)


def test_cancelling_large_writes_at_random_moments_keeps_the_database_consistent(
    storage: str, tmp_path: Path
) -> None:
    ids, vectors, payloads = base_data()
    rounds = 6
    # Each round queues a write A and then a large write B, and cancels B a moment later: in
    # even rounds at once (B is still queued behind A: it must never run), in odd rounds a
    # random moment after A has ended (B has started, or is about to: whole or not at all).
    firsts = [far_batch(900_000 + 20_000 * r, 5_000, seed=100 + r) for r in range(rounds)]
    batches = [far_batch(100_000 * (r + 1), 20_000, seed=r) for r in range(rounds)]
    delays = np.random.default_rng(9).uniform(0.0, 0.01, rounds)
    outcomes: list[bool] = []

    async def main() -> None:
        # One worker: each call starts after the one before it has ended, so the state can be
        # read right after a cancelled write (which may still be running) is over.
        with ThreadPoolExecutor(1) as pool:
            async with open_async(storage, tmp_path / "db", executor=pool) as db:
                await db.upsert_many(ids, vectors, payloads)
                expected = BASE
                for first, batch, delay in zip(firsts, batches, delays):
                    before = asyncio.ensure_future(db.upsert_many(*first))
                    write = asyncio.ensure_future(db.upsert_many(*batch))
                    if len(outcomes) % 2:
                        await before
                        await asyncio.sleep(float(delay))
                    write.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await write
                    await before
                    # A call through the one worker: the cancelled write (if it started) is over.
                    await db.is_empty()
                    expected += len(first[0])
                    count = len(db)
                    landed = count == expected + len(batch[0])
                    assert landed or count == expected, (count, expected)
                    assert [int(i) in db for i in batch[0][::997]] == [landed] * len(batch[0][::997])
                    assert (int(batch[0][-1]) in db) is landed
                    expected = count
                    outcomes.append(landed)
                # Still usable and consistent: searches see exactly the batches that landed.
                ref = iqdb.open_in_memory(device="cpu")
                ref.upsert_many(ids, vectors, payloads)
                for first, batch, landed in zip(firsts, batches, outcomes):
                    ref.upsert_many(*first)
                    if landed:
                        ref.upsert_many(*batch)
                probes = np.concatenate([b[1][:3] for b in batches + firsts] + [vectors[:3]])
                assert await db.search_batch(probes, 3, "l2") == ref.search_batch(probes, 3, "l2")
                await db.upsert(Record(1, [0.5] * DIM))
                ref.upsert(Record(1, [0.5] * DIM))
                assert (await db.check())["ok"]
        if storage == "durable":
            with iqdb.open(tmp_path / "db", device="cpu") as again:
                assert len(again) == len(ref)
                assert again.search_batch(probes, 3, "l2") == ref.search_batch(probes, 3, "l2")
        ref.close()

    run(main())
    assert outcomes[0::2] == [False] * (rounds // 2)


def test_a_cancelled_open_does_not_leave_the_directory_locked(tmp_path: Path) -> None:
    fs = GateFs()
    fs.armed = "lock"

    async def main() -> None:
        opening = asyncio.ensure_future(AsyncIqdb.open(tmp_path / "db", device="cpu", fs=fs))
        await until(fs.entered)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        fs.release.set()
        # The open completes in its thread and the handle it made is closed for it.
        deadline = time.monotonic() + 30
        while True:
            try:
                async with AsyncIqdb.open(tmp_path / "db", device="cpu") as db:
                    await db.upsert(Record(1, [1.0, 2.0]))
                    break
            except iqdb.Locked:
                assert time.monotonic() < deadline, "the abandoned handle still holds the lock"
                await asyncio.sleep(0.01)

    run(main())
    with iqdb.open(tmp_path / "db", device="cpu") as db:
        assert len(db) == 1


# -- closing ----------------------------------------------------------------------------------
def test_a_closed_handle_raises_closed(storage: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with open_async(storage, tmp_path / "db") as db:
            await db.upsert(Record(1, [1.0, 0.0]))
        assert db.handle.__repr__() == "<Iqdb closed>"  # async with closed the handle
        assert repr(db) == "<AsyncIqdb closed>"
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "upsert": lambda: db.upsert("not even a record"),  # type: ignore[arg-type]
            "upsert_many": lambda: db.upsert_many([1], [[1.0, 0.0]]),
            "upsert_arrow": lambda: db.upsert_arrow(None),
            "get": lambda: db.get(1),
            "delete": lambda: db.delete(-1),
            "delete_where": lambda: db.delete_where({}),
            "count": lambda: db.count(),
            "flush": db.flush,
            "compact": db.compact,
            "memory_usage": db.memory_usage,
            "check": db.check,
            "is_empty": db.is_empty,
            "to_arrow": db.to_arrow,
            "search": lambda: db.search([1.0, 0.0], -5),
            "search_with": lambda: db.search_with([1.0, 0.0], 1, "l2", lambda r: True),
            "search_batch": lambda: db.search_batch([[1.0, 0.0]], 1),
            "search_arrays": lambda: db.search_arrays([[1.0, 0.0]], 1),
        }
        for name, call in calls.items():
            with pytest.raises(Closed):
                await call()
            assert name
        for read in (lambda: db.device, lambda: db.dim, lambda: len(db), lambda: 1 in db):
            with pytest.raises(Closed):
                read()
        with pytest.raises(Closed):
            async with db:
                pass
        await db.close()  # again: nothing happens

    run(main())
    if storage == "durable":
        with iqdb.open(tmp_path / "db", device="cpu") as again:
            assert again.get(1) == Record(1, [1.0, 0.0])


def test_await_then_async_with_and_wrapping_a_handle(tmp_path: Path) -> None:
    async def main() -> None:
        db = await AsyncIqdb.open(tmp_path / "db", device="cpu", sync="always")
        async with db:
            await db.upsert(Record(3, [0.0, 1.0]))
        with pytest.raises(Closed):
            await db.get(3)
        sync = iqdb.open(tmp_path / "db", device="cpu")
        wrapped = AsyncIqdb(sync)
        assert (await wrapped.get(3)) == Record(3, [0.0, 1.0])
        assert wrapped.handle is sync
        await wrapped.close()
        with pytest.raises(Closed):
            sync.get(3)

    run(main())


def test_errors_on_open_arrive_when_awaited(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")

    async def main() -> None:
        with pytest.raises(iqdb.InvalidConfig):
            await AsyncIqdb.open(tmp_path / "file")
        with pytest.raises(iqdb.InvalidConfig, match="device"):
            await AsyncIqdb.open_in_memory(device="tpu")
        async with AsyncIqdb.open(tmp_path / "db", device="cpu"):
            with pytest.raises(iqdb.Locked):
                await AsyncIqdb.open(tmp_path / "db", device="cpu")

    run(main())
