"""``Iqdb.search_arrays`` and the ``working_set`` option, on every backend.

``search_arrays`` must give, row for row, exactly what ``search_batch`` gives (ids and scores bit
for bit, NaN where it gives NaN) as two ``(m, c)`` arrays; ``working_set`` must be validated when
a database is opened and must never change a result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import iqdb
from iqdb import (
    Closed,
    DimensionMismatch,
    DistanceMetric,
    InvalidArgument,
    InvalidConfig,
    InvalidVector,
    Iqdb,
    Record,
    SearchResult,
    Vector,
)
from iqdb.kernels import flat_topk

MakeDb = Callable[[], Iqdb]
Reopen = Callable[[Iqdb], Iqdb]
Predicate = Callable[[Record], object]
METRICS = ["l2", "cosine", "dot"]
DEFAULT_WORKING_SET = 16 << 20


def as_arrays(batch: list[list[SearchResult]], c: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """``search_batch``'s answer as the ``(m, c)`` arrays ``search_arrays`` must return."""
    assert all(len(row) == c for row in batch), [len(row) for row in batch]
    ids = np.array([[int(r.id) for r in row] for row in batch], dtype=np.uint64).reshape(len(batch), c)
    scores = np.array([[r.score for r in row] for row in batch], dtype=np.float64).reshape(len(batch), c)
    return ids, scores


def check_matches_batch(
    db: Iqdb, queries: Any, k: int, metric: str, predicate: Predicate | None = None, *, c: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Assert that ``search_arrays`` equals ``search_batch`` exactly, with ``c`` columns; return it."""
    ids, scores = db.search_arrays(queries, k, metric, predicate)
    m = len(queries)
    assert isinstance(ids, np.ndarray)
    assert isinstance(scores, np.ndarray)
    assert ids.dtype == np.uint64
    assert scores.dtype == np.float64
    assert ids.shape == (m, c)
    assert scores.shape == (m, c)
    want_ids, want_scores = as_arrays(db.search_batch(queries, k, metric, predicate), c)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)  # NaN equals NaN here
    assert np.array_equal(np.isnan(scores), np.isnan(want_scores))
    return ids, scores


def tricky(make_db: MakeDb, n: int = 40, d: int = 4, seed: int = 0) -> tuple[Iqdb, list[int]]:
    """Small-integer rows under shuffled ids: exact duplicate rows (ties), a zero vector (NaN
    under COSINE) and a few deleted records; the ids still stored, sorted."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.permutation(1000)[:n]]
    X = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    X[np.all(X == 0, axis=1), 0] = 1.0
    X[5] = X[6] = X[7] = X[8] = [1.0, 2.0, -1.0, 0.0][:d] + [0.0] * max(0, d - 4)  # exact duplicates
    X[9] = X[3]
    X[11] = 0.0  # the zero vector
    db = make_db()
    db.upsert_many(ids, X, [{"i": i, "even": i % 2 == 0} for i in ids])
    for gone in (ids[0], ids[7], ids[-1], ids[20]):  # deleted records (rows move)
        assert db.delete(gone)
    return db, sorted(set(ids) - {ids[0], ids[7], ids[-1], ids[20]})


@pytest.fixture
def open_with(backend: tuple[str, str], tmp_path: Path) -> Iterator[Callable[[int], Iqdb]]:
    """Open a fresh database of the current cell with a given ``working_set``; closed at teardown."""
    storage, device = backend
    opened: list[Iqdb] = []
    counter = iter(range(1_000_000))

    def factory(working_set: int) -> Iqdb:
        if storage == "memory":
            db = iqdb.open_in_memory(device=device, working_set=working_set)
        else:
            db = iqdb.open(tmp_path / f"ws{next(counter)}", device=device, working_set=working_set)
        opened.append(db)
        return db

    yield factory
    for db in opened:
        db.close()


# --- search_arrays: the example and the shape of the answer ----------------------------------------------


def test_search_arrays_doc_example(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([7, 8, 9], np.eye(3))
    ids, scores = db.search_arrays([[1, 0, 0], [0, 0, 1]], 2, "l2")
    assert ids.tolist() == [[7, 8], [9, 7]]
    assert scores.round(3).tolist() == [[0.0, 1.414], [0.0, 1.414]]
    assert scores[0, 1] == math.sqrt(2.0)


@pytest.mark.parametrize("k", [1, 3, 5, 6, 100])
def test_search_arrays_dtypes_and_shapes(make_db: MakeDb, k: int) -> None:
    db = make_db()
    db.upsert_many([10, 2**64 - 1, 2**63, 0, 5], [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]])
    Q = np.array([[0.0, 0.0], [6.0, 0.0], [3.0, 1.0]], dtype=np.float32)
    ids, scores = db.search_arrays(Q, k, "l2")
    c = min(k, 5)
    assert (ids.dtype, scores.dtype) == (np.dtype(np.uint64), np.dtype(np.float64))
    assert ids.shape == scores.shape == (3, c)
    full = [10, 2**64 - 1, 2**63, 0, 5]  # the stored order by distance from [0, 0]
    assert [int(i) for i in ids[0]] == full[:c]  # ids beyond int64 come back exactly
    assert [int(i) for i in ids[1]] == full[::-1][:c]
    np.testing.assert_array_equal(scores[0], [1.0, 2.0, 3.0, 4.0, 5.0][:c])
    check_matches_batch(db, Q, k, "l2", c=c)


def test_search_arrays_metric_defaults_to_cosine(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2, 3], [[10.0, 9.0], [0.0, 1.0], [100.0, 0.0]])
    q = [[1.0, 0.9]]
    assert db.search_arrays(q, 3, "l2")[0].tolist() == [[2, 1, 3]]
    assert db.search_arrays(q, 3, "dot")[0].tolist() == [[3, 1, 2]]
    for metric in (None, "cosine", DistanceMetric.COSINE):
        ids, scores = db.search_arrays(q, 3) if metric is None else db.search_arrays(q, 3, metric)
        assert ids.tolist() == [[1, 3, 2]]
        np.testing.assert_array_equal(scores, as_arrays(db.search_batch(q, 3, "cosine"), 3)[1])


@pytest.mark.parametrize(
    "queries",
    [
        [[1.0, 2.0, -1.0, 0.0], [0.0, 0.0, 1.0, 1.0]],
        ((1, 2, -1, 0), (0, 0, 1, 1)),
        [Vector([1.0, 2.0, -1.0, 0.0]), Vector([0.0, 0.0, 1.0, 1.0])],
        np.array([[1.0, 2.0, -1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]),
        np.array([[1, 2, -1, 0], [0, 0, 1, 1]], dtype=np.int32),
    ],
    ids=["lists", "tuples", "vectors", "float64-array", "int-array"],
)
def test_search_arrays_accepts_every_query_form(make_db: MakeDb, queries: Any) -> None:
    db, _ = tricky(make_db)
    ids, scores = check_matches_batch(db, queries, 5, "l2", c=5)
    again_ids, again_scores = db.search_arrays(np.array([[1, 2, -1, 0], [0, 0, 1, 1]], np.float32), 5, "l2")
    np.testing.assert_array_equal(ids, again_ids)
    np.testing.assert_array_equal(scores, again_scores)


def test_search_arrays_returns_fresh_arrays(make_db: MakeDb) -> None:
    db, _ = tricky(make_db)
    Q = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]
    ids, scores = db.search_arrays(Q, 6, "dot")
    kept_ids, kept_scores = ids.copy(), scores.copy()
    ids[:] = 0
    scores[:] = -1.0
    again_ids, again_scores = db.search_arrays(Q, 6, "dot")
    np.testing.assert_array_equal(again_ids, kept_ids)
    np.testing.assert_array_equal(again_scores, kept_scores)
    assert [int(r.id) for r in db.search(Q[0], 6, "dot")] == kept_ids[0].tolist()


# --- search_arrays equals search_batch ------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_search_arrays_equals_search_batch(make_db: MakeDb, metric: str) -> None:
    db, stored = tricky(make_db)
    n = len(stored)
    rng = np.random.default_rng(1)
    Q = rng.integers(-3, 4, size=(25, 4)).astype(np.float32)
    Q[0] = [1.0, 2.0, -1.0, 0.0]  # on the duplicates: exact ties at distance 0
    Q[1] = 0.0  # the zero query: every COSINE score is NaN
    Q[2] = [2.0, 4.0, -2.0, 0.0]  # parallel to the duplicates
    for k in (1, 2, 3, 4, 7, n - 1, n, n + 1, 1000):
        check_matches_batch(db, Q, k, metric, c=min(k, n))


def test_search_arrays_ties_go_to_the_smaller_ids(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([50, 3, 41, 17, 8, 99], [[1.0, 1.0]] * 5 + [[5.0, 5.0]])
    for metric in METRICS:
        for k in (1, 2, 4, 5, 6):
            ids, _ = check_matches_batch(db, [[1.0, 1.0], [2.0, 2.0]], k, metric, c=k)
            want = [99, 3, 8, 17, 41, 50] if metric == "dot" else [3, 8, 17, 41, 50, 99]
            assert ids[0].tolist() == want[:k], metric
    ids, scores = db.search_arrays([[1.0, 1.0]], 3, "l2")
    assert ids.tolist() == [[3, 8, 17]]
    assert scores.tolist() == [[0.0, 0.0, 0.0]]


def test_search_arrays_cosine_nan_scores(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([4, 2, 9, 1], [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    ids, scores = check_matches_batch(db, [[1.0, 0.0], [0.0, 0.0]], 4, "cosine", c=4)
    assert ids.tolist() == [[2, 1, 4, 9], [1, 2, 4, 9]]  # zero rows last by id; zero query: all by id
    assert np.isnan(scores).tolist() == [[False, False, True, True], [True] * 4]
    np.testing.assert_array_equal(scores[0, :2], [0.0, 1.0])
    ids, scores = check_matches_batch(db, [[0.0, 0.0]], 2, "cosine", c=2)
    assert ids.tolist() == [[1, 2]]
    assert np.isnan(scores).all()


def test_search_arrays_with_large_k_and_many_queries(make_db: MakeDb) -> None:
    rng = np.random.default_rng(5)
    n, d = 3000, 8
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[100:110] = X[7]  # duplicates
    X[200] = 0.0
    ids = rng.permutation(10 * n)[:n].astype(np.uint64)
    db = make_db()
    db.upsert_many(ids, X)
    Q = rng.standard_normal((50, d)).astype(np.float32)
    Q[3] = X[7]
    for metric in METRICS:
        check_matches_batch(db, Q, 150, metric, c=150)
    many = rng.standard_normal((600, d)).astype(np.float32)
    check_matches_batch(db, many, 10, "cosine", c=10)


# --- predicates --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_search_arrays_with_a_predicate(make_db: MakeDb, metric: str) -> None:
    db, stored = tricky(make_db)
    rng = np.random.default_rng(2)
    Q = rng.integers(-3, 4, size=(9, 4)).astype(np.float32)
    Q[0] = 0.0
    Q[1] = [1.0, 2.0, -1.0, 0.0]

    def is_even(r: Record) -> bool:
        return r.payload is not None and r.payload["even"] is True

    def few(r: Record) -> bool:
        return r.payload is not None and r.payload["i"] in chosen

    evens = [i for i in stored if i % 2 == 0]
    chosen = set(stored[3:8])
    for k in (1, 3, len(evens) - 1, len(evens), len(evens) + 5):
        ids, _ = check_matches_batch(db, Q, k, metric, is_even, c=min(k, len(evens)))
        assert all(int(i) % 2 == 0 for i in ids.ravel())
    ids, _ = check_matches_batch(db, Q, 20, metric, few, c=5)  # fewer pass than k: c = 5
    assert all(set(row) == chosen for row in ids.tolist())
    check_matches_batch(db, Q, 20, metric, lambda r: True, c=min(20, len(stored)))


def test_search_arrays_predicate_passing_nothing(make_db: MakeDb) -> None:
    db, _ = tricky(make_db)
    calls: list[int] = []

    def nothing(r: Record) -> bool:
        calls.append(int(r.id))
        return False

    ids, scores = check_matches_batch(db, [[1.0, 0.0, 0.0, 0.0]] * 3, 5, "l2", nothing, c=0)
    assert ids.shape == scores.shape == (3, 0)
    assert calls  # the predicate did run


def test_search_arrays_predicate_sees_payloads(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2, 3, 4], [[1.0, 0.0]] * 4, [{"tag": "a"}, {"tag": "b"}, None, {"tag": "a"}])
    ids, scores = db.search_arrays([[1.0, 0.0]], 10, "l2", lambda r: r.payload and r.payload["tag"] == "a")
    assert ids.tolist() == [[1, 4]]
    assert scores.tolist() == [[0.0, 0.0]]


# --- writes followed by search_arrays ----------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_search_arrays_after_updates_and_deletes(make_db: MakeDb, reopen: Reopen, metric: str) -> None:
    rng = np.random.default_rng(21)
    ids = [int(i) for i in rng.permutation(100)[:15]]
    X = rng.integers(-4, 5, size=(15, 3)).astype(np.float32)
    X[np.all(X == 0, axis=1), 0] = 1.0
    db = make_db()
    db.upsert_many(ids, X, [{"v": i} for i in ids])
    live = set(ids)
    Q = [[1.0, -2.0, 2.0], [0.0, 0.0, 0.0], [4.0, 4.0, 4.0]]

    def check(handle: Iqdb) -> None:
        got, _ = check_matches_batch(handle, Q, 10, metric, c=min(10, len(live)))
        assert set(got.ravel().tolist()) <= live
        check_matches_batch(handle, Q, 100, metric, c=len(live))
        full, _ = handle.search_arrays(Q, 100, metric)
        assert set(full[0].tolist()) == live

    check(db)
    assert db.delete(ids[-1])  # the last row
    live.discard(ids[-1])
    check(db)
    assert db.delete(ids[0])  # the first row: the last one moves into its place
    live.discard(ids[0])
    check(db)
    db.upsert(Record(ids[5], [1.0, -2.0, 2.0], {"v": "replaced"}))  # now an exact match
    got, scores = db.search_arrays(Q, 1, "l2")
    assert (int(got[0, 0]), float(scores[0, 0])) == (ids[5], 0.0)
    check(db)
    db.upsert(Record(ids[-1], [4.0, 4.0, 4.0], None))  # a deleted id comes back
    live.add(ids[-1])
    check(db)
    db.upsert_many([ids[0], 5000], [[0.0, 0.0, 0.0], [4.0, 4.0, 4.0]])  # a zero vector comes in
    live |= {ids[0], 5000}
    check(db)
    for gone in ids[3:9]:
        db.delete(gone)
        live.discard(gone)
    check(db)
    check(reopen(db))


# --- early answers ------------------------------------------------------------------------------------------


def test_search_arrays_on_a_database_that_never_held_a_vector(make_db: MakeDb) -> None:
    db = make_db()
    for queries, k in (([[1.0, 2.0], [3.0, 4.0]], 5), ([[1.0, 2.0, 3.0]], 1), (np.ones((4, 7)), 3)):
        ids, scores = db.search_arrays(queries, k, "l2")
        assert ids.shape == scores.shape == (len(queries), 0)
        assert (ids.dtype, scores.dtype) == (np.dtype(np.uint64), np.dtype(np.float64))
    ids, scores = db.search_arrays([[1.0]], 3, "dot", lambda r: True)
    assert ids.shape == scores.shape == (1, 0)
    assert db.search_batch([[1.0], [2.0]], 3) == [[], []]


def test_search_arrays_on_a_database_emptied_by_deletes(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    db.delete(1)
    db.delete(2)
    ids, scores = db.search_arrays([[1.0, 2.0], [0.0, 1.0]], 5, "cosine")
    assert ids.shape == scores.shape == (2, 0)
    assert (ids.dtype, scores.dtype) == (np.dtype(np.uint64), np.dtype(np.float64))
    with pytest.raises(DimensionMismatch) as info:
        db.search_arrays([[1.0, 2.0, 3.0]], 5)
    assert (info.value.left, info.value.right) == (3, 2)


def test_search_arrays_k_zero(make_db: MakeDb) -> None:
    db = make_db()
    ids, scores = db.search_arrays([[1.0, 2.0]], 0)
    assert ids.shape == scores.shape == (1, 0)
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    for queries in ([[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.zeros((4, 2))):
        ids, scores = db.search_arrays(queries, 0, "l2")
        assert ids.shape == scores.shape == (len(queries), 0)
        assert (ids.dtype, scores.dtype) == (np.dtype(np.uint64), np.dtype(np.float64))
        assert db.search_batch(queries, 0, "l2") == [[]] * len(queries)
    # As search_batch with k == 0: neither the dimension nor the values are checked.
    assert db.search_arrays([[1.0, 2.0, 3.0]], 0)[0].shape == (1, 0)
    assert db.search_arrays([[math.nan, 1.0]], 0)[1].shape == (1, 0)
    zero: Any = np.int64(0)
    assert db.search_arrays([[1.0, 2.0]], zero)[0].shape == (1, 0)


def test_search_arrays_of_no_queries(make_db: MakeDb) -> None:
    db = make_db()
    none: list[Any] = [[], (), np.empty((0, 2), dtype=np.float32), np.empty((0, 5))]
    for queries in none:
        ids, scores = db.search_arrays(queries, 3, "l2")
        assert ids.shape == scores.shape == (0, 0)
        assert (ids.dtype, scores.dtype) == (np.dtype(np.uint64), np.dtype(np.float64))
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    for queries in ([], np.empty((0, 2)), np.empty((0, 5))):
        ids, scores = db.search_arrays(queries, 3, "l2")
        assert ids.shape == scores.shape == (0, 0)
        assert (ids.dtype, scores.dtype) == (np.dtype(np.uint64), np.dtype(np.float64))
        assert db.search_batch(queries, 3, "l2") == []


# --- errors ---------------------------------------------------------------------------------------------------


def test_search_arrays_on_a_closed_handle_raises_closed(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    db.close()
    with pytest.raises(Closed):
        db.search_arrays([[1.0, 2.0]], 1)
    with pytest.raises(Closed):
        db.search_arrays([[1.0, 2.0]], 0)
    with pytest.raises(Closed):
        db.search_arrays([], 3)
    with pytest.raises(Closed):
        db.search_batch([[1.0, 2.0]], 1)


@pytest.mark.parametrize(
    "k", [-1, -100, 1.0, 2.5, True, False, np.bool_(True), "3", None], ids=lambda k: f"{type(k).__name__}-{k}"
)
def test_search_arrays_bad_k_raises_invalid_argument(make_db: MakeDb, k: Any) -> None:
    db = make_db()
    with pytest.raises(InvalidArgument, match="k must be"):
        db.search_arrays([[1.0, 2.0]], k)  # on a database that never held a vector too
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(InvalidArgument, match="k must be"):
        db.search_arrays([[1.0, 2.0]], k)
    with pytest.raises(InvalidArgument, match="k must be"):
        db.search_arrays([], k)
    with pytest.raises(InvalidArgument, match="k must be"):
        db.search_batch([[1.0, 2.0]], k)


@pytest.mark.parametrize("k", [np.int64(2), np.uint8(2), np.int32(2)], ids=["int64", "uint8", "int32"])
def test_search_arrays_accepts_numpy_integer_k(make_db: MakeDb, k: Any) -> None:
    db, _ = tricky(make_db)
    ids, scores = db.search_arrays([[1.0, 0.0, 0.0, 0.0]], k)
    assert ids.shape == scores.shape == (1, 2)
    check_matches_batch(db, [[1.0, 0.0, 0.0, 0.0]], k, "cosine", c=2)


@pytest.mark.parametrize("metric", ["euclid", "", "L2 ", 3, None])
def test_search_arrays_unknown_metric_raises_invalid_argument(make_db: MakeDb, metric: Any) -> None:
    db, _ = tricky(make_db)
    with pytest.raises(InvalidArgument, match="metric"):
        db.search_arrays([[1.0, 0.0, 0.0, 0.0]], 1, metric)
    with pytest.raises(InvalidArgument, match="metric"):
        db.search_batch([[1.0, 0.0, 0.0, 0.0]], 1, metric)


def test_search_arrays_wrong_dimension_raises_dimension_mismatch(make_db: MakeDb) -> None:
    db, _ = tricky(make_db, d=4)
    with pytest.raises(DimensionMismatch) as info:
        db.search_arrays([[1.0, 2.0]], 1)
    assert (info.value.left, info.value.right) == (2, 4)
    with pytest.raises(DimensionMismatch) as info:
        db.search_arrays(np.ones((4, 7)), 2, "dot")
    assert (info.value.left, info.value.right) == (7, 4)
    with pytest.raises(DimensionMismatch) as info:
        db.search_arrays(np.ones((3, 5)), 2, "l2", lambda r: True)
    assert (info.value.left, info.value.right) == (5, 4)


@pytest.mark.parametrize("predicate", [1, "even", {"even": True}, [lambda r: True]], ids=repr)
def test_search_arrays_non_callable_predicate_raises_invalid_argument(
    make_db: MakeDb, predicate: Any
) -> None:
    db, _ = tricky(make_db)
    with pytest.raises(InvalidArgument, match="predicate"):
        db.search_arrays([[1.0, 0.0, 0.0, 0.0]], 3, "l2", predicate)
    with pytest.raises(InvalidArgument, match="predicate"):
        db.search_batch([[1.0, 0.0, 0.0, 0.0]], 3, "l2", predicate)


@pytest.mark.parametrize(
    ("query", "reason"),
    [([math.nan, 0.0, 0.0, 0.0], "non-finite"), ([0.0, math.inf, 0.0, 0.0], "non-finite")],
    ids=["nan", "inf"],
)
def test_search_arrays_invalid_query_raises_invalid_vector(
    make_db: MakeDb, query: list[float], reason: str
) -> None:
    db, _ = tricky(make_db)
    with pytest.raises(InvalidVector, match=reason):
        db.search_arrays([[1.0, 0.0, 0.0, 0.0], query], 3)
    with pytest.raises(InvalidVector, match=reason):
        db.search_batch([[1.0, 0.0, 0.0, 0.0], query], 3)
    empty = make_db()
    with pytest.raises(InvalidVector):
        empty.search_arrays([query], 3)  # checked on a database that never held a vector too


def test_search_arrays_rejects_a_single_vector_and_ragged_rows(make_db: MakeDb) -> None:
    db, _ = tricky(make_db)
    with pytest.raises(InvalidVector):
        db.search_arrays(Vector([1.0, 0.0, 0.0, 0.0]), 3)
    with pytest.raises(InvalidVector):
        db.search_arrays(np.ones(4), 3)
    with pytest.raises(InvalidVector):
        db.search_arrays([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], 3)


# --- working_set ---------------------------------------------------------------------------------------------

_OPENERS = [
    pytest.param("memory-classmethod", id="Iqdb.open_in_memory"),
    pytest.param("memory-module", id="iqdb.open_in_memory"),
    pytest.param("durable-classmethod", id="Iqdb.open"),
    pytest.param("durable-module", id="iqdb.open"),
]


def _open(how: str, path: Path, **kwargs: Any) -> Iqdb:
    if how == "memory-classmethod":
        return Iqdb.open_in_memory(device="cpu", **kwargs)
    if how == "memory-module":
        return iqdb.open_in_memory(device="cpu", **kwargs)
    if how == "durable-classmethod":
        return Iqdb.open(path, device="cpu", **kwargs)
    return iqdb.open(path, device="cpu", **kwargs)


@pytest.mark.parametrize("how", _OPENERS)
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (65535, "65535"),
        (0, "0"),
        (-1, "-1"),
        (-(1 << 40), str(-(1 << 40))),
        (np.int64(1000), "1000"),
        (True, "True"),
        (False, "False"),
        (np.bool_(True), repr(np.bool_(True))),
        (65536.0, "65536.0"),
        (float(1 << 24), "16777216.0"),
        ("65536", "'65536'"),
        (None, "None"),
    ],
    ids=lambda v: f"{type(v).__name__}-{v}",
)
def test_bad_working_set_raises_invalid_config(how: str, value: Any, shown: str, tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "db"
    with pytest.raises(InvalidConfig, match="working_set") as info:
        _open(how, path, working_set=value)
    assert re.search(rf"(?<![\w.]){re.escape(shown)}(?![\w.])", str(info.value)), str(info.value)
    assert not path.exists()  # checked before the directory is created
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("how", _OPENERS)
@pytest.mark.parametrize(
    "value",
    [65536, 1 << 20, DEFAULT_WORKING_SET, 1 << 40, np.int64(65536), np.uint32(1 << 20), np.uint64(1 << 17)],
    ids=lambda v: f"{type(v).__name__}-{v}",
)
def test_good_working_set_is_accepted(how: str, value: Any, tmp_path: Path) -> None:
    with _open(how, tmp_path / "db", working_set=value) as db:
        db.upsert_many([3, 1, 2], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        ids, scores = db.search_arrays([[1.0, 0.1]], 2)
        assert ids.tolist() == [[3, 2]]
        np.testing.assert_array_equal(scores, as_arrays(db.search_batch([[1.0, 0.1]], 2), 2)[1])


@pytest.mark.parametrize("how", _OPENERS)
def test_working_set_reaches_the_kernel(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = flat_topk

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["working_set"])
        return real(*args, **kwargs)

    monkeypatch.setattr("iqdb._search.flat_topk", spy)
    for value in (65536, np.int64(1 << 21)):
        with _open(how, tmp_path / f"db{value}", working_set=value) as db:
            db.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]])
            db.search_arrays([[1.0, 0.0]], 1)
            db.search_batch([[1.0, 0.0]], 1)
    with _open(how, tmp_path / "default") as db:
        db.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]])
        db.search([1.0, 0.0], 1)
    assert seen == [65536, 65536, 1 << 21, 1 << 21, DEFAULT_WORKING_SET]
    assert all(type(v) is int for v in seen)


def test_working_set_does_not_stop_a_durable_database_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with iqdb.open(path, device="cpu", working_set=65536) as db:
        db.upsert_many([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(InvalidConfig, match="working_set"):
        iqdb.open(path, device="cpu", working_set=1024)
    with iqdb.open(path, device="cpu", working_set=1 << 22) as db:
        assert len(db) == 3
        assert db.search_arrays([[1.0, 0.0]], 3, "l2")[0].tolist() == [[1, 3, 2]]


def _working_set_data(seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    n, d = 3000, 16
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[500:520] = X[3]  # exact duplicates: ties
    X[1000:1004] = rng.integers(-2, 3, size=(4, d)).astype(np.float32)
    X[1004:1008] = X[1000:1004]
    X[2000] = 0.0  # a zero vector: NaN under COSINE
    ids = rng.permutation(100_000)[:n].astype(np.uint64)
    return ids, X


@pytest.mark.parametrize("metric", METRICS)
def test_results_do_not_depend_on_the_working_set(open_with: Callable[[int], Iqdb], metric: str) -> None:
    ids, X = _working_set_data(7)
    rng = np.random.default_rng(8)
    Q50 = rng.standard_normal((50, X.shape[1])).astype(np.float32)
    Q50[0] = X[3]
    Q50[1] = 0.0
    Q600 = rng.standard_normal((600, X.shape[1])).astype(np.float32)
    Q600[::97] = X[1000]
    payloads = [{"odd": int(i) % 2 == 1} for i in ids]

    def odd(r: Record) -> bool:
        return r.payload is not None and r.payload["odd"] is True

    n_odd = sum(p["odd"] for p in payloads)
    answers = []
    for working_set in (65536, 1 << 20, DEFAULT_WORKING_SET, 1 << 30):
        db = open_with(working_set)
        db.upsert_many(ids, X, payloads)
        for gone in ids[::250]:
            db.delete(gone)
        n = len(db)
        answers.append(
            [
                check_matches_batch(db, Q50, 150, metric, c=150),
                check_matches_batch(db, Q600, 10, metric, c=10),
                check_matches_batch(db, Q600[:40], n + 3, metric, c=n),
                check_matches_batch(db, Q50, 150, metric, odd, c=150),
                check_matches_batch(
                    db, Q50[:5], 5000, metric, odd, c=n_odd - sum(int(i) % 2 for i in ids[::250])
                ),
            ]
        )
    first = answers[0]
    for other in answers[1:]:
        for (a_ids, a_scores), (b_ids, b_scores) in zip(first, other):
            np.testing.assert_array_equal(a_ids, b_ids)
            np.testing.assert_array_equal(a_scores, b_scores)


def test_search_with_working_set_matches_brute_force(open_with: Callable[[int], Iqdb]) -> None:
    # Small integers: every score is exact in float64, so the answer is known independently.
    rng = np.random.default_rng(9)
    n, d, m, k = 3000, 4, 120, 150
    X = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    ids = rng.permutation(10 * n)[:n].astype(np.uint64)
    Q = rng.integers(-3, 4, size=(m, d)).astype(np.float32)
    for working_set in (65536, 1 << 20):
        db = open_with(working_set)
        db.upsert_many(ids, X)
        got_ids, got_scores = db.search_arrays(Q, k, "l2")
        for i in range(0, m, 7):
            s = np.sqrt(np.sum((X.astype(np.float64) - Q[i].astype(np.float64)) ** 2, axis=1))
            order = np.lexsort((ids, s))[:k]
            np.testing.assert_array_equal(got_ids[i], ids[order])
            np.testing.assert_array_equal(got_scores[i], s[order])


def test_search_arrays_with_k_zero_answers_before_checking_metric_and_predicate() -> None:
    """As search_batch: ``k == 0`` returns before any other check."""
    db = iqdb.open_in_memory()
    db.upsert_many([1, 2], np.eye(2))
    assert db.search_batch([[1.0, 2.0]], 0, "bogus") == [[]]
    ids, scores = db.search_arrays([[1.0, 2.0]], 0, "bogus")
    assert ids.shape == scores.shape == (1, 0)
    ids, scores = db.search_arrays([[1.0, 2.0]], 0, "l2", 5)  # type: ignore[arg-type]
    assert ids.shape == (1, 0)


def test_a_search_out_of_memory_retries_with_smaller_tiles(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A MemoryError in the kernel (CuPy's OutOfMemoryError is one) is retried with tiles 4x
    smaller, down to 1 MiB; the answer is the one a search with room gives."""
    seen: list[int] = []
    real = flat_topk

    def tight(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["working_set"])
        if kwargs["working_set"] > 2 << 20:
            raise MemoryError("out of memory (simulated)")
        return real(*args, **kwargs)

    with iqdb.open_in_memory(device="cpu", working_set=32 << 20) as db:
        db.upsert_many([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        want = db.search_arrays([[1.0, 0.0]], 2, "l2")
        monkeypatch.setattr("iqdb._search.flat_topk", tight)
        got = db.search_arrays([[1.0, 0.0]], 2, "l2")
    assert seen == [32 << 20, 8 << 20, 2 << 20]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert sum("retrying with" in r.getMessage() for r in caplog.records) == 2


def test_a_search_out_of_memory_at_the_smallest_tiles_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("out of memory (simulated)")

    with iqdb.open_in_memory(device="cpu") as db:
        db.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]])
        monkeypatch.setattr("iqdb._search.flat_topk", never)
        with pytest.raises(MemoryError, match=r"out of memory searching 1 queries over 2 rows on cpu"):
            db.search([1.0, 0.0], 1)
        monkeypatch.undo()
        assert [int(r.id) for r in db.search([1.0, 0.0], 1, "l2")] == [1]  # nothing left broken
