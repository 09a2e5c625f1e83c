"""Property tests: search and search_batch against a float64 NumPy brute force.

Random sizes (n up to 300, d 1..16), metrics, k (0..n+2), deletions, replacements, duplicate and
zero vectors, small and huge ids. Small-integer data makes every distance exact in float64, so
those examples must match the reference exactly; real-valued data is compared with a tolerance
scaled to the data, and ties between identical vectors must still go to the smaller id.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iqdb
from iqdb import Iqdb, Record, SearchResult

METRICS = ["l2", "cosine", "dot"]
# 1e-40 and 1e-44 are float32 subnormals (|x|^2 underflows float32); 1e19 makes |x|^2
# overflow float32. Both ends must stay exact.
SCALES = [1e-44, 1e-40, 1e-3, 1.0, 1e3, 1e19]


def scores_f64(X: np.ndarray[Any, Any], q: np.ndarray[Any, Any], metric: str) -> np.ndarray[Any, Any]:
    """The contract's formulas in float64 over the float32 data."""
    A = X.astype(np.float32).astype(np.float64)
    v = q.astype(np.float32).astype(np.float64)
    if metric == "l2":
        return np.sqrt(np.sum((A - v) ** 2, axis=1))
    dot = np.sum(A * v, axis=1)
    if metric == "dot":
        return -dot
    denom = np.sum(A * A, axis=1) * float(np.sum(v * v))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - dot / np.sqrt(denom)
    return np.where(denom == 0, np.nan, out)


def reference(ids: list[int], X: np.ndarray[Any, Any], q: np.ndarray[Any, Any], k: int, metric: str) -> Any:
    """``(top-k as (id, score) pairs, all scores)``: ascending (score, id), NaN last by id."""
    if not ids:
        return [], np.empty(0)
    s = scores_f64(X, q, metric)
    order = sorted(
        range(len(ids)), key=lambda j: (math.isnan(s[j]), 0.0 if math.isnan(s[j]) else s[j], ids[j])
    )
    return [(ids[j], float(s[j])) for j in order[:k]], s


def tolerance(X: np.ndarray[Any, Any], q: np.ndarray[Any, Any], metric: str) -> float:
    big = float(np.sqrt(np.max(np.sum(X.astype(np.float64) ** 2, axis=1)))) if len(X) else 0.0
    qn = float(np.sqrt(np.sum(q.astype(np.float64) ** 2)))
    if metric == "l2":
        return 1e-9 * (big + qn) + 1e-300
    if metric == "dot":
        return 1e-9 * big * qn + 1e-300
    return 1e-9


def check(
    results: list[SearchResult],
    model: dict[int, np.ndarray[Any, Any]],
    q: np.ndarray[Any, Any],
    k: int,
    metric: str,
    exact: bool,
) -> None:
    ids = sorted(model)
    X = np.array([model[i] for i in ids], dtype=np.float32).reshape(len(ids), q.shape[0])
    want, all_scores = reference(ids, X, q, k, metric)
    got = [(int(r.id), r.score) for r in results]
    assert len(got) == min(k, len(ids))
    assert all(type(r.score) is float for r in results)
    got_ids = [i for i, _ in got]
    assert len(set(got_ids)) == len(got_ids), "an id appears twice"
    assert set(got_ids) <= set(model)
    if exact:
        # Small integers: every distance is exact, so ids and scores match bit for bit.
        assert got_ids == [i for i, _ in want]
        for (_, gs), (_, ws) in zip(got, want):
            assert gs == ws or (math.isnan(gs) and math.isnan(ws))
        return
    tol = tolerance(X, q, metric)
    pos = {i: j for j, i in enumerate(ids)}
    for i, s in got:  # each score is that record's distance
        r = all_scores[pos[i]]
        assert (math.isnan(s) and math.isnan(r)) or abs(s - r) <= tol, (i, s, r)
    for (_, gs), (_, ws) in zip(got, want):  # the top-k multiset of scores
        assert (math.isnan(gs) and math.isnan(ws)) or abs(gs - ws) <= tol, (gs, ws)
    keys = [(math.isnan(s), 0.0 if math.isnan(s) else s, i) for i, s in got]
    assert keys == sorted(keys), "not sorted by (score, id) with NaN last"
    # Identical vectors score identically: among them the smaller ids must win.
    groups: dict[bytes, list[int]] = {}
    for j, i in enumerate(ids):
        groups.setdefault((X[j] + np.float32(0.0)).tobytes(), []).append(i)
    returned = set(got_ids)
    for j, i in enumerate(ids):
        if i in returned:
            smaller = [o for o in groups[(X[j] + np.float32(0.0)).tobytes()] if o < i]
            assert returned.issuperset(smaller), (i, smaller)
    # NaN scores (COSINE with a zero vector) are exact: the returned ones are the smallest ids.
    nan_got = [i for i, s in got if math.isnan(s)]
    nan_all = sorted(ids[j] for j in range(len(ids)) if math.isnan(all_scores[j]))
    assert nan_got == nan_all[: len(nan_got)]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 300))
    return {
        "n": n,
        "d": draw(st.integers(1, 16)),
        "exact": draw(st.booleans()),
        "scale": draw(st.sampled_from(SCALES)),
        "dup_frac": draw(st.sampled_from([0.0, 0.3, 0.9])),
        "zero_frac": draw(st.sampled_from([0.0, 0.1, 0.6])),
        "n_del": draw(st.integers(0, n)),
        "n_rep": draw(st.integers(0, 20)),
        "chunks": draw(st.integers(1, 3)),
        "big_ids": draw(st.booleans()),
        "metric": draw(st.sampled_from(METRICS)),
        "k": draw(st.integers(0, n + 2)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _rows(rng: np.random.Generator, sc: dict[str, Any], m: int, pool: np.ndarray[Any, Any] | None) -> Any:
    d = sc["d"]
    if sc["exact"]:
        X = rng.integers(-3, 4, size=(m, d)).astype(np.float32)
    else:
        X = (rng.normal(size=(m, d)) * sc["scale"]).astype(np.float32)
    if m and pool is not None and len(pool):
        dup = rng.random(m) < sc["dup_frac"]
        X[dup] = pool[rng.integers(0, len(pool), int(dup.sum()))]
    X[rng.random(m) < sc["zero_frac"]] = 0.0
    return X


def run_scenario(
    db: Iqdb, sc: dict[str, Any]
) -> tuple[dict[int, np.ndarray[Any, Any]], list[np.ndarray[Any, Any]]]:
    """Apply inserts, deletions and replacements to ``db``; return the model and some queries."""
    rng = np.random.default_rng(sc["seed"])
    n, d = sc["n"], sc["d"]
    pool = _rows(rng, sc, max(1, n // 8), None)  # the vectors duplicates are drawn from
    X = _rows(rng, sc, n, pool)
    if sc["big_ids"]:
        ids = [2**64 - 1 - i if i % 2 else i for i in rng.permutation(4 * n + 4)[:n].tolist()]
    else:
        ids = rng.permutation(3 * n + 3)[:n].tolist()
    model: dict[int, np.ndarray[Any, Any]] = {}
    bounds = sorted({0, n, *rng.integers(0, n + 1, sc["chunks"] - 1).tolist()})
    for a, b in zip(bounds, bounds[1:]):
        if b - a == 1 and rng.random() < 0.5:
            db.upsert(Record(ids[a], X[a]))
        else:
            db.upsert_many(np.array(ids[a:b], dtype=np.uint64), X[a:b])
        model.update({i: X[j] for j, i in enumerate(ids[a:b], start=a)})
    for j in rng.permutation(n)[: sc["n_del"]].tolist():
        assert db.delete(ids[j]) is True
        del model[ids[j]]
    assert db.delete(2**64 - 2 if not sc["big_ids"] else 4 * n + 10) is False
    if ids:
        rep_ids = [ids[j] for j in rng.permutation(n)[: sc["n_rep"]].tolist()]
        R = _rows(rng, sc, len(rep_ids), np.concatenate([pool, X]))
        if rep_ids:
            half = len(rep_ids) // 2
            db.upsert_many(rep_ids[:half], R[:half])
            for i, v in zip(rep_ids[half:], R[half:]):
                db.upsert(Record(i, v))
            model.update(zip(rep_ids, R))
    assert len(db) == len(model)
    queries = [_rows(rng, sc, 1, None)[0], np.zeros(d, dtype=np.float32)]
    if model:
        queries.append(model[sorted(model)[int(rng.integers(0, len(model)))]].copy())
    return model, queries


def check_all(db: Iqdb, model: dict[int, Any], queries: list[Any], sc: dict[str, Any]) -> None:
    k, metric, exact = sc["k"], sc["metric"], sc["exact"]
    singles = [db.search(q, k, metric) for q in queries]
    for q, res in zip(queries, singles):
        if k == 0:
            assert res == []
        else:
            check(res, model, q, k, metric, exact)
    assert db.search_batch(np.stack(queries), k, metric) == (singles if k else [[] for _ in queries])

    def odd(r: Record) -> bool:
        return int(r.id) % 2 == 1

    odd_model = {i: v for i, v in model.items() if i % 2 == 1}
    filtered = db.search_batch(queries, k, metric, odd)
    for q, res in zip(queries, filtered):
        assert res == db.search_with(q, k, metric, odd)
        if k:
            check(res, odd_model, q, k, metric, exact)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_search_matches_a_float64_brute_force(sc: dict[str, Any]) -> None:
    with iqdb.open_in_memory() as db:
        model, queries = run_scenario(db, sc)
        check_all(db, model, queries, sc)


def _durable_unavailable() -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            db = iqdb.open(Path(tmp) / "probe")
        except ImportError as exc:  # ModuleNotFoundError included
            return f"the durable backend is not available: {exc}"
        db.close()
    return None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def _durable_property(sc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db"
        with iqdb.open(path) as db:
            model, queries = run_scenario(db, sc)
            check_all(db, model, queries, sc)
        with iqdb.open(path) as db:
            assert len(db) == len(model)
            check_all(db, model, queries, sc)


def test_durable_search_matches_a_float64_brute_force_after_reopen() -> None:
    reason = _durable_unavailable()
    if reason is not None:
        pytest.skip(reason)
    _durable_property()
