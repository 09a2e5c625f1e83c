"""Thread safety: readers never see a half-applied write; concurrent writers serialise.

The writer writes batches in which every vector equals a batch-specific constant and every
payload names the batch, so any mix of two writes is visible: a vector from one batch with a
payload from another, a batch only partly applied, or a length no write sequence produces.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import iqdb
from iqdb import Record, SearchResult

D = 4
BASE = list(range(16))  # always present; rewritten as one batch by every upsert_many
EXTRA = list(range(100, 108))  # added as one batch, then deleted one at a time
SOLO = 1000  # rewritten with single upserts
ZERO = np.zeros(D, dtype=np.float32)
RUN_SECONDS = 1.5


def vec(batch: int) -> np.ndarray[Any, Any]:
    return np.full(D, float(batch + 1), dtype=np.float32)


def dist(batch: int) -> float:
    # L2 distance of vec(batch) from the origin: sqrt(4 (b+1)^2) = 2 (b+1), exact in float64.
    return 2.0 * (batch + 1)


def _run(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"


def _guard(errors: list[BaseException], fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    return run


def _check_results(results: list[SearchResult], seen: set[int]) -> None:
    """One consistent snapshot: see the module docstring for what a torn write looks like."""
    by_id = {int(r.id): r for r in results}
    assert len(by_id) == len(results), "duplicate id in one result list"
    for r in results:
        assert r.payload is not None
        batch = r.payload["batch"]
        assert isinstance(batch, int)
        assert r.score == dist(batch), f"id {int(r.id)}: vector of another batch than its payload"
    assert set(BASE) <= set(by_id), "a base record is missing"
    base_batches = {by_id[i].payload["batch"] for i in BASE}  # type: ignore[index]
    assert len(base_batches) == 1, f"upsert_many half applied: {sorted(base_batches)}"  # type: ignore[type-var]
    (b,) = base_batches
    extras = [by_id[i] for i in EXTRA if i in by_id]
    extra_batches = {r.payload["batch"] for r in extras}  # type: ignore[index]
    assert len(extra_batches) <= 1, f"extra batch half applied: {sorted(extra_batches)}"  # type: ignore[type-var]
    if extras:
        (e,) = extra_batches
        assert isinstance(e, int)
        assert e % 2 == 0
        assert isinstance(b, int)
        assert e in (b, b - 1)
    assert SOLO in by_id
    keys = [(r.score, int(r.id)) for r in results]
    assert keys == sorted(keys)
    assert isinstance(b, int)
    seen.add(b)


def test_readers_never_see_a_half_applied_write() -> None:
    db = iqdb.open_in_memory()
    db.upsert_many(BASE + EXTRA, np.tile(vec(0), (len(BASE) + len(EXTRA), 1)), [{"batch": 0}] * 24)
    db.upsert(Record(SOLO, vec(0), {"batch": 0, "solo": True}))
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[int] = set()
    reads = [0] * 8
    writes = [0]
    k = len(BASE) + len(EXTRA) + 5

    def writer() -> None:
        b = 0
        deadline = time.monotonic() + RUN_SECONDS
        try:
            while time.monotonic() < deadline:
                b += 1
                if b % 2 == 0:
                    ids = BASE + EXTRA
                    db.upsert_many(ids, np.tile(vec(b), (len(ids), 1)), [{"batch": b}] * len(ids))
                else:
                    db.upsert_many(BASE, np.tile(vec(b), (len(BASE), 1)), [{"batch": b}] * len(BASE))
                    for i in EXTRA:
                        db.delete(i)
                db.upsert(Record(SOLO, vec(b), {"batch": b, "solo": True}))
                writes[0] = b
        finally:
            stop.set()

    def reader(slot: int) -> None:
        rng = random.Random(slot)
        while not stop.is_set():
            mode = (slot + reads[slot]) % 4
            if mode == 0:
                _check_results(db.search(ZERO, k, "l2"), seen)
            elif mode == 1:
                first, second = db.search_batch(np.stack([ZERO, ZERO]), k, "l2")
                assert first == second, "one search_batch call saw two states"
                _check_results(first, seen)
            elif mode == 2:
                hits = db.search_with(ZERO, k, "l2", lambda r: int(r.id) in BASE)
                assert sorted(int(r.id) for r in hits) == BASE
                assert len({r.payload["batch"] for r in hits}) == 1  # type: ignore[index]
            else:
                n = len(db)
                assert len(BASE) + 1 <= n <= len(BASE) + len(EXTRA) + 1
                rid = rng.choice(BASE + EXTRA + [SOLO])
                rec = db.get(rid)
                if rec is None:
                    assert rid in EXTRA
                else:
                    assert rec.payload is not None
                    batch = rec.payload["batch"]
                    assert isinstance(batch, int)
                    assert rec.vector == iqdb.Vector(vec(batch)), "get: vector and payload from two writes"
            reads[slot] += 1

    threads = [threading.Thread(target=_guard(errors, writer))]
    threads += [threading.Thread(target=_guard(errors, lambda s=s: reader(s))) for s in range(8)]
    _run(threads)
    if errors:
        raise errors[0]
    assert writes[0] >= 5, "the writer barely ran"
    assert all(r > 0 for r in reads), f"a reader never ran: {reads}"
    assert len(seen) >= 2, "readers saw a single state: no concurrency was exercised"
    _check_results(db.search(ZERO, k, "l2"), seen)
    db.close()


def test_two_writers_to_the_same_ids_end_in_a_serial_state() -> None:
    db = iqdb.open_in_memory()
    ids = [1, 2, 3]
    rounds = 1000
    observed = [0]
    errors: list[BaseException] = []
    start = threading.Barrier(3)
    done = threading.Event()

    def v(who: int, i: int) -> np.ndarray[Any, Any]:
        return np.array([who, i, 1.0, -1.0], dtype=np.float32)

    def writer(who: int) -> None:
        start.wait()
        for i in range(rounds):
            db.upsert_many(ids, np.tile(v(who, i), (3, 1)), [{"w": who, "i": i}] * 3)
            db.upsert(Record(4, v(who, i), {"w": who, "i": i}))
            if i % 10 == 0:
                db.delete(5)
                db.upsert(Record(5, v(who, i), {"w": who, "i": i}))

    def consistent(r: Record | SearchResult, vector: iqdb.Vector | None = None) -> tuple[int, int]:
        assert r.payload is not None
        who, i = r.payload["w"], r.payload["i"]
        assert isinstance(who, int)
        assert isinstance(i, int)
        if vector is not None:
            assert vector == iqdb.Vector(v(who, i)), "vector and payload from different writes"
        return who, i

    def reader() -> None:
        start.wait()
        while not done.is_set():
            hits = db.search_with(ZERO, 3, "l2", lambda r: int(r.id) in ids)
            assert len(hits) in (0, 3), "ids 1-3 are written together"
            if not hits:
                continue  # before the first write
            observed[0] += 1
            marks = {consistent(r) for r in hits}
            assert len(marks) == 1, f"upsert_many interleaved with another: {marks}"
            (who, i) = marks.pop()
            assert {r.score for r in hits} == {math.sqrt(who * who + i * i + 2)}
            for rid in (4, 5):
                rec = db.get(rid)
                if rec is not None:
                    consistent(rec, rec.vector)

    writers = [threading.Thread(target=_guard(errors, lambda w=w: writer(w))) for w in (7, 9)]
    watcher = threading.Thread(target=_guard(errors, reader))
    for t in [*writers, watcher]:
        t.start()
    for t in writers:
        t.join(timeout=60)
    done.set()
    watcher.join(timeout=60)
    assert not any(t.is_alive() for t in [*writers, watcher]), "a thread hung (deadlock?)"
    if errors:
        raise errors[0]

    assert observed[0] > 0, "the reader never overlapped the writers"
    # Some serial order of the two writers' calls leaves exactly this.
    assert len(db) == 5
    final = {rid: db.get(rid) for rid in (1, 2, 3, 4, 5)}
    marks = {consistent(rec, rec.vector) for rec in final.values() if rec is not None}  # type: ignore[arg-type]
    ids_marks = {consistent(final[rid], final[rid].vector) for rid in ids}  # type: ignore[arg-type, union-attr]
    assert len(ids_marks) == 1, f"ids 1-3 mix two writers: {ids_marks}"
    (who, i) = ids_marks.pop()
    assert who in (7, 9)
    assert i == rounds - 1
    who4, i4 = consistent(final[4], final[4].vector)  # type: ignore[arg-type, union-attr]
    assert who4 in (7, 9)
    assert i4 == rounds - 1
    assert {m[0] for m in marks} <= {7, 9}
    assert final[5] is not None
    assert consistent(final[5], final[5].vector)[1] == (rounds - 1) // 10 * 10
    assert sorted(int(r.id) for r in db.search(ZERO, 10, "l2")) == [1, 2, 3, 4, 5]
    db.close()
