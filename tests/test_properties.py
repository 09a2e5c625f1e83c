"""Property tests: search and search_batch against a float64 NumPy brute force (``_reference``).

Random sizes (n up to 300, d 1..16), metrics, k (0..n+2), deletions, replacements, duplicate and
zero vectors, small and huge ids. Small-integer data makes every distance exact in float64, so
those examples must match the reference bit for bit; real-valued data is compared within a
rounding tolerance, and ties between identical vectors must still go to the smaller id.

Larger examples (thousands of rows, batches of up to 300 queries, working sets of 64 KiB to
4 MiB) reach the kernel's paths that small ones never take: many tiles, transposed and
augmented score tiles, sampled admission bounds, and scans split between two workers.
:func:`test_the_large_examples_reach_their_kernel_paths` proves that they do, so a change of
the kernel's thresholds cannot quietly leave a path untested.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _reference import brute_force
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import iqdb
from iqdb import Iqdb, Record, SearchResult
from iqdb.kernels import _flat, _parallel
from iqdb.kernels._parallel import Parallel, ThreadedCpu, _BlasLimit

METRICS = ["l2", "cosine", "dot"]
# 1e-40 and 1e-44 are float32 subnormals (|x|^2 underflows float32); 1e19 makes |x|^2
# overflow float32. Both ends must stay exact.
SCALES = [1e-44, 1e-40, 1e-3, 1.0, 1e3, 1e19]


@pytest.fixture(scope="module", autouse=True)
def two_search_workers() -> Iterator[Parallel]:
    """Searches in this module run on two CPU workers, on any machine (the development guest
    has two cores): the large examples' sizes then reach the split path wherever they run."""
    current = _parallel.cpu_parallel()
    if current.workers == 2:
        runner = current
    else:
        from threadpoolctl import ThreadpoolController

        controllers = ThreadpoolController().select(user_api="blas").lib_controllers
        runner = ThreadedCpu(2, _BlasLimit(list(controllers)))
    saved, _parallel._CPU = _parallel._CPU, runner
    yield runner
    _parallel._CPU = saved


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
    assert len(results) == min(k, len(ids))
    assert all(type(r.score) is float for r in results)
    want = brute_force(X, np.array(ids, dtype=np.uint64), q[None], k, metric)
    want.check([[int(r.id) for r in results]], [[r.score for r in results]], exact=exact)


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
    more = sc.get("m", 0) - len(queries)
    if more > 0:  # a batch: random vectors and stored ones, half and half
        stored = [model[i] for i in sorted(model)]
        queries += [stored[j].copy() for j in rng.integers(0, len(stored), more // 2).tolist()]
        queries += list(_rows(rng, sc, more - more // 2, None))
    return model, queries


def odd(r: Record) -> bool:
    return int(r.id) % 2 == 1


def check_all(db: Iqdb, model: dict[int, Any], queries: list[Any], sc: dict[str, Any]) -> None:
    k, metric, exact = sc["k"], sc["metric"], sc["exact"]
    singles = [db.search(q, k, metric) for q in queries]
    for q, res in zip(queries, singles):
        if k == 0:
            assert res == []
        else:
            check(res, model, q, k, metric, exact)
    assert db.search_batch(np.stack(queries), k, metric) == (singles if k else [[] for _ in queries])

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


@dataclass(frozen=True)
class Shape:
    """A size of the large examples and the kernel paths it takes (with two workers)."""

    n: int
    d: int
    m: int  # queries per batch
    k: tuple[int, int]  # the range k is drawn from
    working_set: int
    paths: frozenset[str]


PATHS = frozenset({"tiled", "transposed", "augmented", "sampled", "split"})
# Why each shape takes its paths, in the kernel's terms (two workers share the working set):
# "tiled": three or more tiles of at least 1,024 rows per scan; "transposed": 32 or more
# queries per block, "augmented": 256 or more (L2 and COSINE); "sampled": k + 8 >= 64 and a
# strided sample of min(n / 16, working set / 4m) rows holding four times the rows that set
# the bound; "split": n >= 2 x 4,096 and m n d >= 2^22. Up to n / 20 deletions keep them all.
LARGE = {
    "tiles": Shape(5000, 6, 8, (1, 40), 64 << 10, frozenset({"tiled"})),
    "transposed": Shape(7000, 5, 40, (1, 40), 512 << 10, frozenset({"tiled", "transposed"})),
    "augmented": Shape(6000, 4, 300, (56, 90), 4 << 20, frozenset({"transposed", "augmented", "sampled"})),
    "sampled": Shape(4000, 6, 6, (56, 90), 64 << 10, frozenset({"sampled"})),
    "split": Shape(9000, 8, 64, (1, 40), 1 << 20, frozenset({"tiled", "transposed", "split"})),
    "split-sampled": Shape(9000, 8, 64, (56, 90), 1 << 20, frozenset({"transposed", "sampled", "split"})),
}


def large_case(shape: str, **params: Any) -> dict[str, Any]:
    sh = LARGE[shape]
    return {"shape": shape, "n": sh.n, "d": sh.d, "m": sh.m, "working_set": sh.working_set, **params}


@st.composite
def large_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(st.sampled_from(sorted(LARGE)))
    sh = LARGE[shape]
    metrics = METRICS if shape != "augmented" else ["l2", "cosine"]  # DOT tiles are not augmented
    return large_case(
        shape,
        exact=draw(st.booleans()),
        scale=draw(st.sampled_from(SCALES)),
        dup_frac=draw(st.sampled_from([0.0, 0.3, 0.9])),
        zero_frac=draw(st.sampled_from([0.0, 0.1, 0.6])),
        n_del=draw(st.integers(0, sh.n // 20)),
        n_rep=draw(st.integers(0, 20)),
        chunks=draw(st.integers(1, 3)),
        big_ids=draw(st.booleans()),
        metric=draw(st.sampled_from(metrics)),
        k=draw(st.integers(*sh.k)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


_VARIED = {"scale": 1.0, "dup_frac": 0.3, "zero_frac": 0.1, "n_rep": 10, "chunks": 2}
# Every shape, always run: real-valued and small-integer data, every metric somewhere.
LARGE_EXAMPLES = [
    large_case("tiles", **_VARIED, exact=False, n_del=200, big_ids=True, metric="l2", k=25, seed=1),
    large_case("transposed", **_VARIED, exact=True, n_del=50, big_ids=False, metric="cosine", k=30, seed=2),
    large_case("augmented", **_VARIED, exact=False, n_del=100, big_ids=False, metric="l2", k=60, seed=3),
    large_case("augmented", **_VARIED, exact=True, n_del=0, big_ids=True, metric="cosine", k=70, seed=4),
    large_case("sampled", **_VARIED, exact=False, n_del=150, big_ids=False, metric="dot", k=80, seed=5),
    large_case("split", **_VARIED, exact=False, n_del=300, big_ids=True, metric="cosine", k=10, seed=6),
    large_case("split-sampled", **_VARIED, exact=True, n_del=400, big_ids=False, metric="l2", k=64, seed=7),
]


def check_large(db: Iqdb, model: dict[int, Any], queries: list[Any], sc: dict[str, Any]) -> None:
    """The whole batch against the reference, with and without a filter; single searches (one
    query's own path) agree with the batch bit for bit."""
    k, metric, exact = sc["k"], sc["metric"], sc["exact"]
    ids = np.array(sorted(model), dtype=np.uint64)
    X = np.stack([model[i] for i in ids.tolist()])
    Q = np.stack(queries)
    got_ids, got_scores = db.search_arrays(Q, k, metric)
    brute_force(X, ids, Q, k, metric).check(got_ids, got_scores, exact=exact)
    for i in (0, 1, len(Q) - 1):
        single = db.search(Q[i], k, metric)
        assert [int(r.id) for r in single] == got_ids[i].tolist()
        np.testing.assert_array_equal(np.array([r.score for r in single]), got_scores[i])
    got_ids, got_scores = db.search_arrays(Q, k, metric, odd)
    rows = np.flatnonzero(ids % 2 == 1)
    brute_force(X, ids, Q, k, metric, rows).check(got_ids, got_scores, exact=exact)


def with_examples(cases: list[dict[str, Any]]) -> Any:
    """Hypothesis's ``@example`` for each case: they run first, every time."""

    def decorate(test: Any) -> Any:
        for case in reversed(cases):
            test = example(case)(test)
        return test

    return decorate


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@with_examples(LARGE_EXAMPLES)
@given(large_scenarios())
def test_large_batches_match_a_float64_brute_force(sc: dict[str, Any]) -> None:
    with iqdb.open_in_memory(working_set=sc["working_set"]) as db:
        model, queries = run_scenario(db, sc)
        check_large(db, model, queries, sc)


@pytest.fixture
def paths_taken(monkeypatch: pytest.MonkeyPatch, two_search_workers: Parallel) -> set[str]:
    """The names of the kernel paths that searches take from here on (in :data:`PATHS`),
    recorded by spies around the kernel's pieces."""
    taken: set[str] = set()
    tiles: dict[int, int] = {}
    init, scores, sample, run = (
        _flat._Tiler.__init__,
        _flat._Tiler.scores,
        _flat._sample_bound,
        two_search_workers.map,
    )

    def spy_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        taken.update({"transposed"} if self.transposed else set(), {"augmented"} if self.augment else set())

    def spy_scores(self: Any, t0: int, t1: int) -> Any:
        tiles[id(self)] = tiles.get(id(self), 0) + 1
        if tiles[id(self)] >= 3:
            taken.add("tiled")
        return scores(self, t0, t1)

    def spy_sample(*args: Any, **kwargs: Any) -> Any:
        theta = sample(*args, **kwargs)
        if theta is not None:
            taken.add("sampled")
        return theta

    def spy_map(fn: Any, n: int) -> Any:
        if fn.__name__ == "scan" and n >= 2:
            taken.add("split")
        return run(fn, n)

    monkeypatch.setattr(_flat._Tiler, "__init__", spy_init)
    monkeypatch.setattr(_flat._Tiler, "scores", spy_scores)
    monkeypatch.setattr(_flat, "_sample_bound", spy_sample)
    monkeypatch.setattr(two_search_workers, "map", spy_map)
    return taken


def test_the_large_examples_cover_every_path() -> None:
    assert set().union(*(LARGE[sc["shape"]].paths for sc in LARGE_EXAMPLES)) == PATHS


@pytest.mark.parametrize("sc", LARGE_EXAMPLES, ids=lambda sc: f"{sc['shape']}-{sc['metric']}")
def test_the_large_examples_reach_their_kernel_paths(sc: dict[str, Any], paths_taken: set[str]) -> None:
    """Each always-run example takes the paths its shape claims: a kernel change that moves a
    threshold past these sizes fails here, not silently in the property above."""
    with iqdb.open_in_memory(working_set=sc["working_set"]) as db:
        _, queries = run_scenario(db, sc)
        paths_taken.clear()
        db.search_arrays(np.stack(queries), sc["k"], sc["metric"])
    assert LARGE[sc["shape"]].paths <= paths_taken, paths_taken


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
