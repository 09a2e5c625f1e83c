"""Search semantics (API.md): k, dimensions, order, ties, NaN, filters, batches, on every backend.

Most data here is small integers: every distance is then computed exactly in float64, so the
results must equal a brute-force reference exactly, ties included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from iqdb import (
    DimensionMismatch,
    DistanceMetric,
    InvalidArgument,
    InvalidVector,
    Iqdb,
    Payload,
    Record,
    RecordId,
    SearchResult,
    Vector,
)

MakeDb = Callable[[], Iqdb]
Reopen = Callable[[Iqdb], Iqdb]
METRICS = ["l2", "cosine", "dot"]


def scores_f64(X: Any, q: Any, metric: str) -> np.ndarray[Any, Any]:
    """Float64 distances of the float32 rows of ``X`` to ``q``: the contract's formulas."""
    A = np.asarray(X, dtype=np.float32).astype(np.float64).reshape(-1, np.asarray(q).shape[-1])
    v = np.asarray(q, dtype=np.float32).astype(np.float64)
    if metric == "l2":
        return np.sqrt(np.sum((A - v) ** 2, axis=1))
    dot = A @ v
    if metric == "dot":
        return -dot
    denom = np.sum(A * A, axis=1) * float(v @ v)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - dot / np.sqrt(denom)
    return np.where(denom == 0, np.nan, out)


def brute(ids: list[int], X: Any, q: Any, k: int, metric: str) -> list[tuple[int, float]]:
    """The contract's answer: ascending (score, id), NaN last by id, first k."""
    if not ids:
        return []
    s = scores_f64(X, q, metric)
    order = sorted(
        range(len(ids)), key=lambda i: (math.isnan(s[i]), 0.0 if math.isnan(s[i]) else s[i], ids[i])
    )
    return [(ids[i], float(s[i])) for i in order[:k]]


def pairs(results: list[SearchResult]) -> list[tuple[int, float]]:
    return [(int(r.id), r.score) for r in results]


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Equal ids and bit-equal scores (NaN equal to NaN)."""
    return len(got) == len(want) and all(
        gi == wi and (gs == ws or (math.isnan(gs) and math.isnan(ws)))
        for (gi, gs), (wi, ws) in zip(got, want)
    )


def model_brute(model: dict[int, list[float]], q: Any, k: int, metric: str) -> list[tuple[int, float]]:
    ids = sorted(model)
    return brute(ids, [model[i] for i in ids], q, k, metric)


def filled(make_db: MakeDb, n: int = 12, d: int = 3, seed: int = 0) -> tuple[Iqdb, dict[int, list[float]]]:
    """A database of n small-integer vectors under shuffled ids, and its model."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.permutation(10 * n)[:n]]
    X = rng.integers(-4, 5, size=(n, d)).astype(np.float32)
    X[np.all(X == 0, axis=1), 0] = 1.0  # no zero vectors here (NaN tests have their own data)
    db = make_db()
    db.upsert_many(ids, X, [{"id": i} for i in ids])
    return db, {i: X[j].tolist() for j, i in enumerate(ids)}


# --- k and the early answers ----------------------------------------------------------------------------


def test_k_zero_returns_empty_before_any_other_check(make_db: MakeDb) -> None:
    db = make_db()
    assert db.search([1.0], 0) == []
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    assert db.search([1.0, 2.0], 0) == []
    assert db.search([1.0, 2.0, 3.0], 0) == []  # wrong dimension
    assert db.search([1.0, 2.0], 0, "no-such-metric") == []
    assert db.search([math.nan, 1.0], 0) == []
    assert db.search_with([1.0, 2.0, 3.0], 0, "bogus", lambda r: True) == []
    assert db.search_batch([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], 0, "bogus") == [[], []]
    assert db.search_batch(np.zeros((3, 7)), 0) == [[], [], []]


@pytest.mark.parametrize(
    "k", [-1, -100, 1.0, 2.5, True, False, np.bool_(True), "3", None], ids=lambda k: f"{type(k).__name__}-{k}"
)
def test_bad_k_raises_invalid_argument(make_db: MakeDb, k: Any) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(InvalidArgument, match="k must be"):
        db.search([1.0, 2.0], k)
    with pytest.raises(InvalidArgument, match="k must be"):
        db.search_with([1.0, 2.0], k, "l2", lambda r: True)
    with pytest.raises(InvalidArgument, match="k must be"):
        db.search_batch([[1.0, 2.0]], k)


def test_bad_k_is_rejected_on_an_empty_database_too(make_db: MakeDb) -> None:
    db = make_db()
    with pytest.raises(InvalidArgument):
        db.search([1.0], -1)
    with pytest.raises(InvalidArgument):
        db.search([1.0], True)


@pytest.mark.parametrize("k", [np.int64(2), np.uint8(2), np.int32(2)], ids=["int64", "uint8", "int32"])
def test_numpy_integer_k_is_accepted(make_db: MakeDb, k: Any) -> None:
    db, _ = filled(make_db)
    assert len(db.search([1.0, 0.0, 0.0], k)) == 2
    assert [len(r) for r in db.search_batch([[1.0, 0.0, 0.0]], k)] == [2]


def test_a_database_that_never_held_a_vector_returns_nothing(make_db: MakeDb) -> None:
    db = make_db()
    assert db.search([1.0, 2.0], 5) == []
    assert db.search([1.0, 2.0, 3.0, 4.0], 1, "l2") == []
    assert db.search_with([1.0], 3, "dot", lambda r: True) == []
    assert db.search_batch([[1.0], [2.0]], 3) == [[], []]


def test_a_database_emptied_by_deletes_still_checks_the_dimension(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    db.delete(1)
    db.delete(2)
    assert db.search([1.0, 2.0], 5) == []
    assert db.search_batch([[1.0, 2.0]], 5) == [[]]
    with pytest.raises(DimensionMismatch) as info:
        db.search([1.0, 2.0, 3.0], 5)
    assert (info.value.left, info.value.right) == (3, 2)


def test_wrong_query_dimension_raises_dimension_mismatch(make_db: MakeDb) -> None:
    db, _ = filled(make_db, d=3)
    with pytest.raises(DimensionMismatch) as info:
        db.search([1.0, 2.0], 1)
    assert (info.value.left, info.value.right) == (2, 3)
    with pytest.raises(DimensionMismatch) as info:
        db.search_with([1.0, 2.0, 3.0, 4.0, 5.0], 1, "l2", lambda r: True)
    assert (info.value.left, info.value.right) == (5, 3)
    with pytest.raises(DimensionMismatch) as info:
        db.search_batch(np.ones((4, 7)), 2, "dot")
    assert (info.value.left, info.value.right) == (7, 3)


@pytest.mark.parametrize(
    ("query", "reason"),
    [([math.nan, 0.0, 0.0], "non-finite"), ([0.0, math.inf, 0.0], "non-finite"), ([], "vector is empty")],
    ids=["nan", "inf", "empty"],
)
def test_invalid_query_raises_invalid_vector(make_db: MakeDb, query: list[float], reason: str) -> None:
    db, _ = filled(make_db)
    with pytest.raises(InvalidVector, match=reason):
        db.search(query, 3)
    with pytest.raises(InvalidVector):
        db.search_batch([[1.0, 0.0, 0.0], query], 3)


def test_unknown_metric_raises_invalid_argument(make_db: MakeDb) -> None:
    db, _ = filled(make_db)
    with pytest.raises(InvalidArgument, match="metric"):
        db.search([1.0, 0.0, 0.0], 1, "euclid")
    with pytest.raises(InvalidArgument, match="metric"):
        db.search_batch([[1.0, 0.0, 0.0]], 1, 3)  # type: ignore[arg-type]


# --- results, order, scores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_k_of_one_n_and_more_than_n(make_db: MakeDb, metric: str) -> None:
    db, model = filled(make_db, n=12)
    q = [2.0, -1.0, 3.0]
    full = model_brute(model, q, 12, metric)
    for k in (1, 2, 11, 12, 13, 100):
        got = pairs(db.search(q, k, metric))
        assert same(got, full[:k]), k
        assert len(got) == min(k, 12)


@pytest.mark.parametrize("metric", METRICS)
def test_results_are_sorted_by_score_then_id(make_db: MakeDb, metric: str) -> None:
    db, model = filled(make_db, n=40, d=2, seed=3)  # 2-D small integers: many exact ties
    for q in ([1.0, 1.0], [3.0, -2.0], [0.0, 4.0]):
        got = pairs(db.search(q, 40, metric))
        assert same(got, model_brute(model, q, 40, metric))
        keys = [(s, i) for i, s in got]
        assert keys == sorted(keys)


def test_results_have_record_ids_python_floats_and_payloads(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([4, 5, 6], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [{"n": 4}, None, {}])
    results = db.search([1.0, 0.0], 3, "l2")
    assert [type(r.id) for r in results] == [RecordId] * 3
    assert [type(r.score) for r in results] == [float] * 3
    assert [r.id for r in results] == [4, 6, 5]
    assert results[0].payload == {"n": 4}
    assert isinstance(results[0].payload, Payload)
    assert results[1].payload == {}
    assert results[1].payload is not None
    assert results[2].payload is None


def test_l2_score_is_the_true_distance(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[3.0, 4.0], [6.0, 8.0]])
    assert pairs(db.search([0.0, 0.0], 2, "l2")) == [(1, 5.0), (2, 10.0)]


def test_cosine_and_dot_scores(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2, 3], [[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert pairs(db.search([1.0, 0.0], 3, "cosine")) == [(1, 0.0), (2, 1.0), (3, 2.0)]
    assert pairs(db.search([1.0, 0.0], 3, "dot")) == [(1, -2.0), (2, 0.0), (3, 1.0)]


@pytest.mark.parametrize("metric", METRICS)
def test_scores_equal_the_metric_distance(make_db: MakeDb, metric: str) -> None:
    rng = np.random.default_rng(11)
    X = rng.normal(size=(30, 5)).astype(np.float32)
    q = rng.normal(size=5)
    db = make_db()
    db.upsert_many(range(30), X)
    m = DistanceMetric(metric)
    for r in db.search(q, 30, metric):
        assert r.score == pytest.approx(m.distance(q, X[int(r.id)]), rel=1e-12, abs=1e-12)
        assert r.score == pytest.approx(float(scores_f64(X[int(r.id)], q, metric)[0]), rel=1e-12, abs=1e-12)


def test_metric_spellings_and_default(make_db: MakeDb) -> None:
    db, model = filled(make_db)
    q = [1.0, 2.0, -1.0]
    for metric in METRICS:
        want = model_brute(model, q, 5, metric)
        assert same(pairs(db.search(q, 5, metric)), want)
        assert same(pairs(db.search(q, 5, DistanceMetric(metric))), want)
        assert same(pairs(db.search(q, 5, metric=metric)), want)
    cosine = model_brute(model, q, 5, "cosine")
    assert same(pairs(db.search(q, 5)), cosine)
    assert same(pairs(db.search_batch([q], 5)[0]), cosine)


# --- ties -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n_dups", [3, 25], ids=["few", "many"])
def test_ties_at_the_kth_place_go_to_the_smaller_ids(make_db: MakeDb, metric: str, n_dups: int) -> None:
    rng = np.random.default_rng(5)
    dup_ids = [int(i) for i in rng.choice(np.arange(1000, 100_000), size=n_dups, replace=False)]
    dup_ids += [2**64 - 1, 2**64 - 2, 2**63]  # tie-break must not lose precision on big ids
    rng.shuffle(dup_ids)
    q = [1.0, 2.0, 0.0]
    near = {10: [1.0, 2.0, 0.0], 20_000_000: [1.0, 2.0, 1.0]}  # closer than the duplicates for every metric
    far = {5: [-3.0, -3.0, -3.0], 6: [-4.0, -4.0, -4.0]}
    dup = [1.0, 1.0, 4.0] if metric != "dot" else [1.0, 1.0, 0.5]
    db = make_db()
    db.upsert_many(list(far), list(far.values()))
    db.upsert_many(dup_ids, [dup] * len(dup_ids))  # shuffled ids: storage order is not id order
    db.upsert_many(list(near), list(near.values()))
    model = {**far, **near, **{i: dup for i in dup_ids}}
    for k in (len(near) + 1, len(near) + 2, len(near) + len(dup_ids) - 1):
        want = model_brute(model, q, k, metric)
        # The tie really is at the k-th place: some duplicates are in, some are out.
        assert want[-1][0] in dup_ids
        assert {i for i, _ in want[: len(near)]} == set(near)
        got = pairs(db.search(q, k, metric))
        assert same(got, want)
        kept = [i for i, _ in got if i in dup_ids]
        assert kept == sorted(dup_ids)[: len(kept)]
        assert same(pairs(db.search_batch([q, q], k, metric)[1]), want)
        assert same(pairs(db.search_with(q, k, metric, lambda r: True)), want)


@pytest.mark.parametrize("metric", METRICS)
def test_all_duplicates_give_the_smallest_ids_in_order(make_db: MakeDb, metric: str) -> None:
    ids = [907, 3, 2**64 - 1, 55, 8, 1_000_000, 2, 71, 40, 41, 39, 2**40, 6, 5, 4]
    db = make_db()
    db.upsert_many(ids, np.tile([0.5, -1.0, 2.0], (len(ids), 1)))
    db.delete(3)  # moves the last row into the hole: row order is scrambled again
    db.upsert(Record(3, [0.5, -1.0, 2.0]))
    for k in (1, 4, 9, len(ids)):
        assert [r.id for r in db.search([1.0, 1.0, 1.0], k, metric)] == sorted(ids)[:k]


# --- NaN ----------------------------------------------------------------------------------------------------


def test_cosine_nan_scores_come_last_by_id(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([11, 5, 3, 9, 7], [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    got = pairs(db.search([2.0, 0.0], 5, "cosine"))
    assert [i for i, _ in got] == [5, 9, 3, 7, 11]
    assert [s for _, s in got[:2]] == [0.0, 1.0]
    assert all(math.isnan(s) for _, s in got[2:])
    assert [i for i, _ in pairs(db.search([2.0, 0.0], 3, "cosine"))] == [5, 9, 3]
    assert [i for i, _ in pairs(db.search([2.0, 0.0], 4, "cosine"))] == [5, 9, 3, 7]
    assert [i for i, _ in pairs(db.search([2.0, 0.0], 1, "cosine"))] == [5]


def test_zero_query_under_cosine_is_all_nan_by_id(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([30, 10, 20, 40], [[1.0, 0.0], [0.0, 0.0], [3.0, 4.0], [-1.0, 2.0]])
    got = pairs(db.search([0.0, 0.0], 3, "cosine"))
    assert [i for i, _ in got] == [10, 20, 30]
    assert all(math.isnan(s) for _, s in got)
    assert all(isinstance(s, float) for _, s in got)
    batch = db.search_batch([[0.0, 0.0], [1.0, 0.0]], 4, "cosine")
    assert [int(r.id) for r in batch[0]] == [10, 20, 30, 40]
    assert [int(r.id) for r in batch[1]] == [30, 20, 40, 10]


def test_many_zero_vectors_with_cosine_match_brute_force(make_db: MakeDb) -> None:
    rng = np.random.default_rng(8)
    n = 60
    X = rng.integers(-2, 3, size=(n, 2)).astype(np.float32)
    X[rng.random(n) < 0.4] = 0.0
    ids = [int(i) for i in rng.permutation(1000)[:n]]
    db = make_db()
    db.upsert_many(ids, X)
    Q = np.array([[1.0, 0.0], [0.0, 0.0], [-2.0, 1.0]])
    for k in (1, 10, 40, 59, 60, 61):
        batch = db.search_batch(Q, k, "cosine")
        for q, res in zip(Q, batch):
            want = brute(ids, X, q, k, "cosine")
            assert same(pairs(db.search(q, k, "cosine")), want)
            assert same(pairs(res), want)


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_zero_vectors_are_ordinary_under_l2_and_dot(make_db: MakeDb, metric: str) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[0.0, 0.0], [3.0, 4.0]])
    got = pairs(db.search([0.0, 0.0], 2, metric))
    assert not any(math.isnan(s) for _, s in got)
    want = {"l2": [(1, 0.0), (2, 5.0)], "dot": [(1, -0.0), (2, -0.0)]}[metric]
    assert got == want


@pytest.mark.parametrize(
    ("ids", "vectors", "k", "want"),
    [
        ([1, 2], [[1.0, 0.0], [0.0, 1e-45]], 2, [(1, 0.0), (2, 1.0)]),
        ([1, 2, 3], [[0.0, 1e-45], [1.0, 0.0], [0.0, 0.0]], 3, [(2, 0.0), (1, 1.0), (3, math.nan)]),
        ([1, 2], [[1e-40, 0.0], [1.0, 0.0]], 2, [(1, 0.0), (2, 0.0)]),
    ],
    ids=["crash", "duplicate-id", "overflow-warning"],
)
def test_cosine_with_tiny_nonzero_vectors(
    make_db: MakeDb, ids: list[int], vectors: list[list[float]], k: int, want: list[tuple[int, float]]
) -> None:
    db = make_db()
    db.upsert_many(ids, vectors)
    assert same(pairs(db.search([1.0, 0.0], k, "cosine")), want)


@pytest.mark.parametrize("metric", METRICS)
def test_huge_vectors_search_without_warnings(make_db: MakeDb, metric: str) -> None:
    X = [[2e19, 0.0], [0.0, 3e19], [-2e19, 1e19]]
    db = make_db()
    db.upsert_many([1, 2, 3], X)
    q = [1e19, 1e19]
    got = pairs(db.search(q, 3, metric))
    want = brute([1, 2, 3], X, q, 3, metric)
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-12)


# --- search_with ----------------------------------------------------------------------------------------------


def _near_and_far(make_db: MakeDb) -> Iqdb:
    db = make_db()
    near = [[1.0, 0.0], [1.0, 0.5], [0.9, 0.1], [1.0, -0.5], [1.2, 0.0]]
    far = [[-5.0, 0.0], [-6.0, 1.0], [-7.0, 0.0], [-8.0, 0.5]]
    db.upsert_many(range(1, 6), near, [{"far": False, "i": i} for i in range(1, 6)])
    db.upsert_many(range(6, 10), far, [{"far": True, "i": i} for i in range(6, 10)])
    db.upsert(Record(10, [-9.0, 0.0]))  # no payload
    return db


@pytest.mark.parametrize("metric", METRICS)
def test_filter_applies_before_the_top_k_cut(make_db: MakeDb, metric: str) -> None:
    db = _near_and_far(make_db)
    q = [1.0, 0.0]

    def is_far(r: Record) -> bool:
        return r.payload is not None and r.payload["far"] is True

    got = db.search_with(q, 2, metric, is_far)
    assert len(got) == 2
    assert all(r.payload is not None and r.payload["far"] for r in got)
    ranked_far = [r for r in db.search(q, 10, metric) if r.id in (6, 7, 8, 9)]
    assert got == ranked_far[:2]
    assert db.search_with(q, 10, metric, is_far) == ranked_far


@pytest.mark.parametrize("metric", METRICS)
def test_filter_that_passes_everything_equals_search(make_db: MakeDb, metric: str) -> None:
    db = _near_and_far(make_db)
    for k in (1, 3, 10, 11):
        assert db.search_with([1.0, 0.0], k, metric, lambda r: True) == db.search([1.0, 0.0], k, metric)


def test_filter_that_passes_nothing_returns_empty(make_db: MakeDb) -> None:
    db = _near_and_far(make_db)
    assert db.search_with([1.0, 0.0], 5, "l2", lambda r: False) == []
    assert db.search_batch([[1.0, 0.0], [0.0, 1.0]], 5, "l2", lambda r: False) == [[], []]


def test_filter_uses_the_truth_of_what_the_predicate_returns(make_db: MakeDb) -> None:
    db = _near_and_far(make_db)
    got = db.search_with([1.0, 0.0], 10, "l2", lambda r: r.payload and r.payload.get("i") in (2, 7))
    assert [int(r.id) for r in got] == [2, 7]


def test_predicate_receives_each_record(make_db: MakeDb) -> None:
    db = _near_and_far(make_db)
    seen: list[Record] = []

    def spy(r: Record) -> bool:
        seen.append(r)
        return True

    db.search_with([1.0, 0.0], 1, "cosine", spy)
    assert all(isinstance(r, Record) for r in seen)
    assert sorted(int(r.id) for r in seen) == list(range(1, 11))
    assert all(type(r.id) is RecordId for r in seen)
    for r in seen:
        assert r == db.get(r.id)


def test_predicate_cannot_change_the_database(make_db: MakeDb) -> None:
    db = _near_and_far(make_db)

    def vandal(r: Record) -> bool:
        if r.payload is not None:
            r.payload["far"] = "changed"
            r.payload["extra"] = [1]
        return True

    db.search_with([1.0, 0.0], 10, "l2", vandal)
    assert db.get(1) == Record(1, [1.0, 0.0], {"far": False, "i": 1})
    assert all(r.payload is None or r.payload["far"] in (True, False) for r in db.search([1.0, 0.0], 10))


def test_non_callable_predicate_raises_invalid_argument(make_db: MakeDb) -> None:
    db = _near_and_far(make_db)
    with pytest.raises(InvalidArgument, match="predicate"):
        db.search_with([1.0, 0.0], 3, "l2", None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="predicate"):
        db.search_batch([[1.0, 0.0]], 3, "l2", "far")  # type: ignore[arg-type]


def test_predicate_may_read_the_database(make_db: MakeDb) -> None:
    db = _near_and_far(make_db)
    got = db.search_with([1.0, 0.0], 3, "l2", lambda r: r.id in db and len(db) == 10 and db.get(r.id) == r)
    assert [int(r.id) for r in got] == [int(r.id) for r in db.search([1.0, 0.0], 3, "l2")]


# --- search_batch ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_search_batch_equals_per_query_search_for_every_input_form(make_db: MakeDb, metric: str) -> None:
    db, model = filled(make_db, n=30, d=3, seed=2)
    rng = np.random.default_rng(9)
    Q = rng.integers(-3, 4, size=(6, 3)).astype(np.float64)
    Q[2] = 0.0
    Q[3] = model[next(iter(model))]
    forms: list[Any] = [
        Q,
        Q.astype(np.float32),
        [Vector(q) for q in Q],
        Q.tolist(),
        [tuple(q) for q in Q.tolist()],
    ]
    for k in (1, 5, 30, 31):
        want = [db.search(q, k, metric) for q in Q]
        for form in forms:
            assert db.search_batch(form, k, metric) == want
        for q, res in zip(Q, want):
            assert same(pairs(res), model_brute(model, q, k, metric))


@pytest.mark.parametrize("metric", METRICS)
def test_search_batch_with_a_predicate_equals_search_with(make_db: MakeDb, metric: str) -> None:
    db, model = filled(make_db, n=30, d=3, seed=4)

    def odd(r: Record) -> bool:
        return int(r.id) % 2 == 1

    Q = np.random.default_rng(1).integers(-3, 4, size=(5, 3)).astype(np.float32)
    for k in (1, 4, 30):
        batch = db.search_batch(Q, k, metric, odd)
        assert batch == [db.search_with(q, k, metric, odd) for q in Q]
        odd_model = {i: v for i, v in model.items() if i % 2 == 1}
        for q, res in zip(Q, batch):
            assert same(pairs(res), model_brute(odd_model, q, k, metric))


def test_search_batch_of_no_queries(make_db: MakeDb) -> None:
    db, _ = filled(make_db)
    assert db.search_batch([], 3) == []
    assert db.search_batch(np.empty((0, 3), dtype=np.float32), 3) == []


def test_search_batch_rejects_a_single_vector_and_ragged_rows(make_db: MakeDb) -> None:
    db, _ = filled(make_db)
    with pytest.raises(InvalidVector):
        db.search_batch(np.array([1.0, 2.0, 3.0]), 3)
    with pytest.raises(InvalidVector):
        db.search_batch(Vector([1.0, 2.0, 3.0]), 3)
    with pytest.raises(InvalidVector):
        db.search_batch([[1.0, 2.0, 3.0], [1.0, 2.0]], 3)


@pytest.mark.parametrize("metric", METRICS)
def test_search_batch_with_more_queries_than_a_tile(make_db: MakeDb, metric: str) -> None:
    rng = np.random.default_rng(12)
    n, d, m = 50, 3, 3000
    X = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    ids = [int(i) for i in rng.permutation(10_000)[:n]]
    db = make_db()
    db.upsert_many(ids, X)
    Q = rng.integers(-3, 4, size=(m, d)).astype(np.float32)
    batch = db.search_batch(Q, 7, metric)
    assert len(batch) == m
    for i in range(0, m, 53):
        assert same(pairs(batch[i]), brute(ids, X, Q[i], 7, metric))
    for i in range(0, m, 301):
        assert batch[i] == db.search(Q[i], 7, metric)


def _brute_all(ids: np.ndarray[Any, Any], X: np.ndarray[Any, Any], q: Any, k: int, metric: str) -> list[int]:
    s = scores_f64(X, q, metric)
    nan = np.isnan(s)
    order = np.lexsort((ids, np.where(nan, 0.0, s), nan))
    return [int(i) for i in ids[order[:k]]]


def test_search_batch_with_many_queries_and_rows_spanning_several_tiles(make_db: MakeDb) -> None:
    # More queries than one query block and more rows than one row tile, small-integer data so
    # that exact ties straddle tile borders.
    rng = np.random.default_rng(13)
    n, d, m, k = 10_000, 4, 4100, 9
    X = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    ids = rng.permutation(2 * n)[:n].astype(np.uint64)
    db = make_db()
    db.upsert_many(ids, X)
    Q = rng.integers(-3, 4, size=(m, d)).astype(np.float32)
    for metric in ("l2", "cosine"):
        batch = db.search_batch(Q, k, metric)
        assert len(batch) == m
        for i in list(range(0, m, 131)) + [4095, 4096, m - 1]:
            assert [int(r.id) for r in batch[i]] == _brute_all(ids, X, Q[i], k, metric), (metric, i)
        for i in (0, 2000, 4096, m - 1):
            assert batch[i] == db.search(Q[i], k, metric)


# --- writes followed by search --------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_deletes_and_replacements_are_seen_by_search(make_db: MakeDb, reopen: Reopen, metric: str) -> None:
    rng = np.random.default_rng(21)
    ids = [int(i) for i in rng.permutation(100)[:12]]
    X = rng.integers(-4, 5, size=(12, 3)).astype(np.float32)
    X[np.all(X == 0, axis=1), 0] = 1.0
    db = make_db()
    model: dict[int, list[float]] = {}
    payloads: dict[int, Any] = {}
    for i, x in zip(ids, X):
        db.upsert(Record(i, x, {"v": i}))
        model[i], payloads[i] = x.tolist(), {"v": i}
    q = [1.0, -2.0, 2.0]

    def check(handle: Iqdb) -> None:
        got = handle.search(q, len(model) + 1, metric)
        assert same(pairs(got), model_brute(model, q, len(model) + 1, metric))
        assert all(r.payload == payloads[int(r.id)] for r in got)
        assert len(handle) == len(model)

    check(db)
    last, first, middle = ids[-1], ids[0], ids[5]
    assert db.delete(last)  # the row that is last in storage
    del model[last]
    check(db)
    assert db.delete(first)  # the first row: the last one moves into its place
    del model[first]
    check(db)
    db.upsert(Record(middle, q, {"v": "replaced"}))  # now an exact match
    model[middle], payloads[middle] = q, {"v": "replaced"}
    check(db)
    moved = ids[-2]
    db.upsert(Record(moved, [-1.0, 2.0, -2.0], None))
    model[moved], payloads[moved] = [-1.0, 2.0, -2.0], None
    check(db)
    db.upsert(Record(last, [0.0, 0.0, 1.0], {"v": "back"}))  # a deleted id comes back
    model[last], payloads[last] = [0.0, 0.0, 1.0], {"v": "back"}
    check(db)
    db.upsert_many([first, 5000], [[4.0, 4.0, 4.0], [1.0, 1.0, 1.0]], [{"v": "f"}, {"v": "new"}])
    model[first], payloads[first] = [4.0, 4.0, 4.0], {"v": "f"}
    model[5000], payloads[5000] = [1.0, 1.0, 1.0], {"v": "new"}
    check(db)
    assert not db.delete(123456)
    check(db)
    check(reopen(db))


def test_deleted_record_never_appears_in_search(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many(range(20), np.tile([1.0, 1.0], (20, 1)))
    for gone in (19, 0, 7):
        db.delete(gone)
    got = [int(r.id) for r in db.search([1.0, 1.0], 20, "l2")]
    assert got == [i for i in range(20) if i not in (19, 0, 7)]
    assert [int(r.id) for r in db.search_batch([[1.0, 1.0]], 20, "l2")[0]] == got


# --- query forms and copies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        [1.0, -2.0, 3.0],
        (1, -2, 3),
        np.array([1.0, -2.0, 3.0]),
        np.array([1.0, -2.0, 3.0], dtype=np.float32),
        np.array([1, -2, 3], dtype=np.int32),
        np.array([1.0, 0.0, -2.0, 0.0, 3.0, 0.0])[::2],
        Vector([1.0, -2.0, 3.0]),
    ],
    ids=["list", "tuple", "f64", "f32", "int32", "strided", "Vector"],
)
def test_query_forms(make_db: MakeDb, query: Any) -> None:
    db, model = filled(make_db, n=15)
    for metric in METRICS:
        assert same(pairs(db.search(query, 6, metric)), model_brute(model, [1.0, -2.0, 3.0], 6, metric))


def test_search_does_not_modify_the_query(make_db: MakeDb) -> None:
    db, _ = filled(make_db)
    q = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    Q = np.array([[1.0, -2.0, 3.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    db.search(q, 5, "cosine")
    db.search_batch(Q, 5, "l2")
    assert q.tolist() == [1.0, -2.0, 3.0]
    assert Q.tolist() == [[1.0, -2.0, 3.0], [0.0, 0.0, 1.0]]


def test_payloads_in_results_are_copies(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]], [{"tags": ["a"]}, {"n": {"x": 1}}])
    first = db.search([1.0, 0.0], 2, "l2")
    assert first[0].payload is not None
    first[0].payload["tags"].append("changed")  # type: ignore[union-attr]
    first[0].payload["new"] = 1
    batch = db.search_batch([[1.0, 0.0], [1.0, 0.0]], 2, "l2")
    assert batch[0][1].payload is not None
    batch[0][1].payload["n"]["x"] = 2  # type: ignore[index]
    assert batch[1][1].payload == {"n": {"x": 1}}
    again = db.search([1.0, 0.0], 2, "l2")
    assert again[0].payload == {"tags": ["a"]}
    assert again[1].payload == {"n": {"x": 1}}
    assert db.get(1) == Record(1, [1.0, 0.0], {"tags": ["a"]})
