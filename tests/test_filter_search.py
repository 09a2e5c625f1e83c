"""Filtered search, ``count`` and ``delete_where`` against brute force, on every plan and store state.

The expected answer of a filtered search is the float64 brute force of ``tests/_reference.py``
over the records that the plain-Python filter evaluator of ``tests/_filter_reference.py``
matches (from the filter's dict form): the same ids in the same order, ``min(k, matches)`` of
them, and, the data being small integers that every summation order adds exactly, the very
score bits. A :class:`Model` mirrors every write, so the records the brute force sees are the
ones the database should hold.

Plans are forced through ``iqdb._search``'s thresholds: ``GATHER_ROWS`` / ``GATHER_FRACTION``
(below zero: always the dense plan, even with no match; huge: always the gather plan; both with
the shared scan off), or the ``_SHARED_SCAN_*`` ones (every batch through the shared unfiltered
scan with more candidates, falling back to its own plan when short). The kernel's tiled path
is reached by a small ``working_set``, its sampled path by a large ``k``, its split path by a
runner that claims three workers (with the split floors lowered).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _filter_reference import matching_rows, ref_ids
from _reference import brute_force

import iqdb
import iqdb._search
from iqdb import NO_ID, Field, Filter, InvalidArgument, Iqdb
from iqdb._wal import decode_header, scan
from iqdb.kernels._parallel import Parallel

METRICS = ["l2", "cosine", "dot"]
D = 8

# Filters over the payloads of `payload_for`, from about half of the records to none.
HALF = Field("g") < 5
TENTH = Field("g") == 3
RARE = (Field("g") == 3) & (Field("kind") == "doc") & Field("meta.lang").isin(["en"])
NONE = Field("kind") == "nope"
NEGATED = ~(Field("g") < 5)  # records without g (or without a payload) too
LISTS = Field("tags").contains("a") | (Field("score") > 1.0)
IDS = Field.id.between(100, 400) & (Field("g") != 2)
MIXED = Field("g").isin([3.0, "x", True, None])
AS_DICT = {"kind": "doc", "$or": [{"g": {"$lte": 2}}, {"meta.n": {"$gt": 50}}]}
FILTERS: list[Any] = [HALF, TENTH, RARE, NONE, NEGATED, LISTS, IDS, MIXED, AS_DICT]
KINDS: list[Any] = ["doc", "img", "vid", 3, None]


def payload_for(rng: np.random.Generator, gen: int) -> dict[str, Any] | None:
    """A payload with mixed types at the same keys, nested objects, lists and missing keys."""
    r = rng.random()
    if r < 0.05:
        return None
    if r < 0.08:
        return {}
    p: dict[str, Any] = {"g": int(rng.integers(0, 10)), "kind": KINDS[int(rng.integers(0, 5))], "gen": gen}
    if rng.random() < 0.1:
        p["g"] = ["x", 3.0, True, None, 4.5][int(rng.integers(0, 5))]
    if rng.random() < 0.1:
        del p["g"]
    if rng.random() < 0.8:
        p["score"] = float(rng.normal())
    if rng.random() < 0.5:
        p["tags"] = [str(t) for t in rng.choice(["a", "b", "c"], size=int(rng.integers(0, 3)))]
    if rng.random() < 0.5:
        p["meta"] = {"lang": ["en", "de"][int(rng.integers(0, 2))], "n": int(rng.integers(0, 100))}
    return p


class Model:
    """What the database should hold: id -> (vector, payload). Change it only through its methods
    (the brute force's answers are cached per state)."""

    def __init__(self) -> None:
        self.records: dict[int, tuple[np.ndarray[Any, Any], dict[str, Any] | None]] = {}
        self._cache: dict[Any, Any] = {}

    def put(self, i: int, x: Any, p: dict[str, Any] | None) -> None:
        self.records[int(i)] = (np.asarray(x, dtype=np.float32), p)
        self._cache.clear()

    def drop(self, i: int) -> None:
        self.records.pop(int(i), None)
        self._cache.clear()

    def upsert_many(self, db: Iqdb, ids: list[int], X: Any, payloads: list[dict[str, Any] | None]) -> None:
        db.upsert_many(ids, X, payloads)
        for i, x, p in zip(ids, np.asarray(X, dtype=np.float32), payloads):
            self.put(i, x, p)

    def delete_where(self, db: Iqdb, f: Any) -> int:
        want = ref_ids(as_dict(f), self.items())
        got = db.delete_where(f)
        assert got == len(want)
        for i in want:
            self.drop(i)
        return got

    def items(self) -> list[tuple[int, dict[str, Any] | None]]:
        return [(i, p) for i, (_, p) in self.records.items()]

    def arrays(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[dict[str, Any] | None]]:
        if "arrays" not in self._cache:
            ids = sorted(self.records)
            X = np.array([self.records[i][0] for i in ids], dtype=np.float32).reshape(len(ids), -1)
            self._cache["arrays"] = np.array(ids, dtype=np.uint64), X, [self.records[i][1] for i in ids]
        return self._cache["arrays"]  # type: ignore[no-any-return]

    def rows(self, f: Any, keep: Callable[[int], bool] | None = None) -> np.ndarray[Any, Any]:
        """Positions (in id order) of the records ``f`` (a filter, a dict or ``None``) matches."""
        d = {} if f is None else as_dict(f)
        key = ("rows", repr(d))
        if key not in self._cache:
            ids, _, pays = self.arrays()
            self._cache[key] = np.array(matching_rows(d, ids.tolist(), pays), dtype=np.int64)
        rows: np.ndarray[Any, Any] = self._cache[key]
        if keep is not None:
            ids = self.arrays()[0]
            rows = rows[[keep(int(ids[r])) for r in rows.tolist()]] if rows.shape[0] else rows
        return rows

    def expected(self, Q: Any, k: int, metric: str, f: Any, keep: Callable[[int], bool] | None = None) -> Any:
        ids, X, _ = self.arrays()
        return brute_force(X, ids, Q, k, metric, rows=self.rows(f, keep))


def as_dict(f: Any) -> dict[str, Any]:
    """A filter's dict form, as the library writes it (a dict goes through ``from_dict`` first)."""
    return (Filter.from_dict(f) if isinstance(f, dict) else f).to_dict()  # type: ignore[no-any-return]


def data(rng: np.random.Generator, n: int, gen: int = 0) -> tuple[np.ndarray[Any, Any], list[Any]]:
    X = rng.integers(-3, 4, size=(n, D)).astype(np.float32)
    X[rng.random(n) < 0.01] = 0  # zero rows: NaN cosine scores, ranked last
    return X, [payload_for(rng, gen) for _ in range(n)]


def queries(rng: np.random.Generator, m: int) -> np.ndarray[Any, Any]:
    Q = rng.integers(-3, 4, size=(m, D)).astype(np.float32)
    Q[0] = np.where(Q[0] == 0, 1, Q[0])  # never a zero query at 0 (its cosine scores are all NaN)
    return Q


def as_arrays(results: list[list[iqdb.SearchResult]]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    ids = np.array([[int(r.id) for r in res] for res in results], dtype=np.uint64)
    scores = np.array([[r.score for r in res] for res in results], dtype=np.float64)
    return ids.reshape(len(results), -1), scores.reshape(len(results), -1)


def check_all_entry_points(
    db: Iqdb, model: Model, Q: Any, k: int, metric: str, f: Any, *, single: bool = True
) -> None:
    """search (first query), search_batch and search_arrays with one filter, against brute force."""
    exp = model.expected(Q, k, metric, f)
    count = exp.ids.shape[1]
    assert count == min(k, len(model.rows(f)))
    batch = db.search_batch(Q, k, metric, filter=f)
    assert all(len(res) == count for res in batch)
    exp.check(*as_arrays(batch), exact=True)
    records = model.records
    for res in batch[:2]:
        for r in res:
            assert r.payload == records[int(r.id)][1]
    ids, scores = db.search_arrays(Q, k, metric, filter=f)
    assert ids.dtype == np.uint64 and scores.dtype == np.float64
    exp.check(ids, scores, exact=True)
    if single:
        model.expected(Q[:1], k, metric, f).check(
            *as_arrays([db.search(Q[0], k, metric, filter=f)]), exact=True
        )


def check_per_query(db: Iqdb, model: Model, Q: Any, k: int, metric: str, filters: list[Any]) -> None:
    """One filter per query (``None`` entries too): each row its own brute force, arrays padded."""
    exps = [model.expected(Q[i : i + 1], k, metric, f) for i, f in enumerate(filters)]
    counts = [e.ids.shape[1] for e in exps]
    batch = db.search_batch(Q, k, metric, filter=filters)
    assert [len(res) for res in batch] == counts
    for e, res in zip(exps, batch):
        e.check(*as_arrays([res]), exact=True)
    ids, scores = db.search_arrays(Q, k, metric, filter=filters)
    assert ids.shape == scores.shape == (len(filters), max(counts))
    dev_ids, dev_scores = db.search_arrays(Q, k, metric, filter=filters, device_output=True)
    np.testing.assert_array_equal(np.asarray(getattr(dev_ids, "get", lambda: dev_ids)()), ids)
    np.testing.assert_array_equal(np.asarray(getattr(dev_scores, "get", lambda: dev_scores)()), scores)
    for i, (e, c) in enumerate(zip(exps, counts)):
        e.check(ids[i : i + 1, :c], scores[i : i + 1, :c], exact=True)
        assert (ids[i, c:] == NO_ID).all() and np.isnan(scores[i, c:]).all()


# -- opening databases: {memory, durable} x {cpu, gpu}, any working set ----------------------


Opener = Callable[..., Iqdb]


@pytest.fixture
def opener(backend: tuple[str, str], tmp_path: Path) -> Iterator[Opener]:
    """``opener(working_set=..., path=None)``: a database of the current cell (``path``: reopen that
    durable directory). All are closed at teardown."""
    storage, device = backend
    opened: list[Iqdb] = []
    counter = iter(range(1000))

    def do(working_set: int = 16 << 20, path: Path | None = None) -> Iqdb:
        if storage == "memory":
            db = iqdb.open_in_memory(device=device, working_set=working_set)
        else:
            db = iqdb.open(path or tmp_path / f"db{next(counter)}", device=device, working_set=working_set)
        opened.append(db)
        return db

    yield do
    for db in opened:
        db.close()


def reopened(db: Iqdb, opener: Opener, working_set: int) -> Iqdb:
    """A durable database closed and opened again; a memory one as it is."""
    path = getattr(db._backend, "path", None)  # type: ignore[attr-defined]
    if path is None:
        return db
    db.close()
    return opener(working_set, Path(path))


class PlanLog:
    """What the forced plan did: ``taken`` (per ``_plan`` call: gathered?) and ``answered`` (per
    shared scan: how many queries it answered)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.taken: list[bool] = []
        self.answered: list[int] = []

    def check_used(self) -> None:
        """Assert that the forced plan served some search."""
        if self.name == "shared":
            assert sum(self.answered) > 0, "the shared scan answered no query"
        else:
            assert self.taken, f"no search took the {self.name} plan"


@pytest.fixture(params=["dense", "gather", "shared"])
def plan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[PlanLog]:
    """Force one plan for every filtered search (``shared``: every batch, single filter or one
    per query, goes through one unfiltered scan with more candidates, whatever the filters'
    shares; a query it leaves short runs its own plan). Checks that each search took it."""
    S = iqdb._search
    log = PlanLog(request.param)
    if log.name == "shared":
        monkeypatch.setattr(S, "_SHARED_SCAN_GROUPS", 0)
        monkeypatch.setattr(S, "_SHARED_SCAN_BATCH", 1)
        monkeypatch.setattr(S, "_SHARED_SCAN_BATCH_SHARE", 0.0)
        monkeypatch.setattr(S, "_SHARED_SCAN_MIN_SHARE", 1e-9)
        monkeypatch.setattr(S, "_SHARED_SCAN_MAX_K", 10**9)
        real_scan = S.Searcher._shared_scan

        def scan_spy(
            self: Any, v: Any, Q: Any, k: int, metric: Any, groups: Any, rows: list[Any], sc: Any
        ) -> None:
            before = sum(r is not None for r in rows)
            real_scan(self, v, Q, k, metric, groups, rows, sc)
            log.answered.append(sum(r is not None for r in rows) - before)

        monkeypatch.setattr(S.Searcher, "_shared_scan", scan_spy)
        yield log
        return
    monkeypatch.setattr(S, "_SHARED_SCAN_MAX_K", 0)  # never the shared scan
    if log.name == "dense":
        monkeypatch.setattr(S, "GATHER_ROWS", -1)
        monkeypatch.setattr(S, "GATHER_FRACTION", -1.0)
    else:
        monkeypatch.setattr(S, "GATHER_ROWS", 10**12)
        monkeypatch.setattr(S, "GATHER_FRACTION", 1.0)
    real = S._plan

    def spy(v: Any, f: Any) -> Any:
        sel = real(v, f)
        log.taken.append(sel.rows is not None)
        return sel

    monkeypatch.setattr(S, "_plan", spy)
    yield log
    gathered = log.taken
    assert all(gathered) if log.name == "gather" else not any(gathered), (
        f"a search did not take the {log.name} plan"
    )


class _Inline(Parallel):
    """Claims three workers and runs their tasks one after another (the split, deterministically)."""

    workers = 3

    def __init__(self, log: list[int]) -> None:
        self.log = log

    def map(self, fn: Callable[[int], Any], n: int) -> list[Any]:
        self.log.append(n)
        return [fn(i) for i in range(n)]


@pytest.fixture
def split_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every search splits its rows among three (inline) workers; returns the log of splits."""
    log: list[int] = []
    real = iqdb._search.flat_topk

    def forced(*args: Any, **kw: Any) -> Any:
        kw["parallel"] = _Inline(log)
        # The floors that keep small scans whole, lowered in the profile the search runs with.
        kw["profile"] = dataclasses.replace(
            kw["profile"], min_work=0, min_work_one_query=0, min_rows_per_worker=1
        )
        return real(*args, **kw)

    monkeypatch.setattr(iqdb._search, "flat_topk", forced)
    return log


# -- the store's states, on both plans ------------------------------------------------------


def test_filtered_search_matches_brute_force_through_every_store_state(opener: Opener, plan: PlanLog) -> None:
    """Fresh, after deletes, after replacements (old payloads must stop matching), after a
    vacuum, after compaction and after a reopen; with many tiles (working_set at its minimum)."""
    store_states(opener, plan)


@pytest.fixture(params=["memory", "durable"])
def standin_opener(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Opener]:
    """Like ``opener``, on the CuPy look-alike of ``tests/standin.py``: the GPU orchestration
    (device plans, the fixed-shape driver) runs on the CPU, in CI too."""
    from standin import standin_backend

    from iqdb.kernels import cpu_backend

    monkeypatch.setattr(
        "iqdb._db.resolve_device", lambda device: cpu_backend() if device == "cpu" else standin_backend()
    )
    opened: list[Iqdb] = []
    counter = iter(range(1000))

    def do(working_set: int = 16 << 20, path: Path | None = None) -> Iqdb:
        if request.param == "memory":
            db = iqdb.open_in_memory(device="cuda", working_set=working_set)
        else:
            db = iqdb.open(path or tmp_path / f"db{next(counter)}", device="cuda", working_set=working_set)
        assert db.device == "cuda:0"
        opened.append(db)
        return db

    yield do
    for db in opened:
        db.close()


def test_on_the_gpu_standin_filtered_search_matches_brute_force_through_every_store_state(
    standin_opener: Opener, plan: PlanLog
) -> None:
    store_states(standin_opener, plan)


def store_states(opener: Opener, plan: PlanLog) -> None:
    ws = 64 << 10
    rng = np.random.default_rng(11)
    db, model = opener(ws), Model()
    n = 3000
    X, pays = data(rng, n)
    model.upsert_many(db, list(range(n)), X, pays)
    Q = queries(rng, 16)

    def check(state: str) -> None:
        assert len(db) == len(model.records), state
        assert db.count() == len(model.records)
        for j, f in enumerate(FILTERS):
            assert db.count(f) == len(model.rows(f)), (state, f)
            check_all_entry_points(db, model, Q, 10, METRICS[j % 3], f, single=j < 3)
        check_per_query(db, model, Q[:9], 10, METRICS[len(state) % 3], [*FILTERS[:8], None])

    check("fresh")
    # Deletes: one by one, and by filter.
    for i in rng.choice(n, 150, replace=False).tolist():
        assert db.delete(i) == (i in model.records)
        model.drop(i)
    model.delete_where(db, Field("kind") == "vid")
    check("after deletes")
    # Replacements: every id of g == 3 gets a payload of another generation, most without g == 3.
    old = [i for i, p in model.items() if p is not None and p.get("g") == 3]
    assert len(old) > 100
    X2, pays2 = data(rng, len(old), gen=1)
    model.upsert_many(db, old, X2, pays2)
    for i in old[:20]:  # and some single-record upserts
        p = {"g": 5, "kind": "img", "gen": 2}
        db.upsert(iqdb.Record(i, model.records[i][0], p))
        model.put(i, model.records[i][0], p)
    assert db.count(Field("gen") == 0) == len(ref_ids({"gen": 0}, model.items()))
    check("after replacements")
    # Vacuum: more than a fifth of more than 1,024 rows dead, then a write.
    store = db._store  # type: ignore[attr-defined]
    model.delete_where(db, Field("g").isin([0, 1, 2, 4, 6]))
    assert store.n_dead > 1024
    X3, pays3 = data(rng, 50, gen=3)
    model.upsert_many(db, list(range(n, n + 50)), X3, pays3)
    assert store.n_dead == 0, "the write after the deletes did not vacuum"
    check("after vacuum")
    db.compact()
    check("after compaction")
    db = reopened(db, opener, ws)
    check("after reopen")
    plan.check_used()


def test_sampled_path_large_k(opener: Opener, plan: PlanLog) -> None:
    """k = 100 over 5,000 rows keeps more than 64 candidates: the bound is sampled."""
    rng = np.random.default_rng(5)
    db, model = opener(), Model()
    X, pays = data(rng, 5000)
    model.upsert_many(db, list(range(5000)), X, pays)
    Q = queries(rng, 4)
    for j, f in enumerate([HALF, NEGATED, TENTH, LISTS, RARE]):
        check_all_entry_points(db, model, Q, 100, METRICS[j % 3], f, single=False)
    check_per_query(db, model, Q, 100, "l2", [HALF, None, TENTH, RARE])
    plan.check_used()


def test_split_path(opener: Opener, plan: PlanLog, split_scans: list[int], backend: tuple[str, str]) -> None:
    """Scans split among workers, with and without tiles, small and large k."""
    if backend[1] != "cpu":
        pytest.skip("a scan splits among CPU workers only (a GPU search runs whole)")
    rng = np.random.default_rng(9)
    for ws in (16 << 20, 64 << 10):
        db, model = opener(ws), Model()
        X, pays = data(rng, 2500)
        model.upsert_many(db, list(range(2500)), X, pays)
        for i in range(0, 2500, 7):
            db.delete(i)
            model.drop(i)
        Q = queries(rng, 6)
        for j, f in enumerate([HALF, NEGATED, TENTH]):
            check_all_entry_points(db, model, Q, 12 if j else 80, METRICS[j], f, single=j == 0)
        check_per_query(db, model, Q[:3], 30, "cosine", [HALF, None, MIXED])
    assert split_scans, "no search split its rows among workers"
    plan.check_used()


@pytest.mark.parametrize("metric", METRICS)
def test_automatic_plans_k_above_matches_and_zero_matches(opener: Opener, metric: str) -> None:
    """Unforced plans; k past the number of matches gives every match; no match gives []."""
    rng = np.random.default_rng(3)
    db, model = opener(), Model()
    X, pays = data(rng, 4000)
    model.upsert_many(db, list(range(4000)), X, pays)
    Q = queries(rng, 3)
    for f in FILTERS:
        check_all_entry_points(db, model, Q, 200, metric, f)
    # Batches of 8 queries and more with one broad filter, and with many distinct filters.
    Q10 = queries(rng, 10)
    for f in (HALF, NEGATED, LISTS):
        check_all_entry_points(db, model, Q10, 10, metric, f, single=False)
    check_per_query(db, model, Q10, 10, metric, [*FILTERS, None])
    check_per_query(db, model, Q10, 10, metric, [HALF, NEGATED, LISTS, MIXED, IDS, TENTH] + [HALF] * 4)
    assert db.search(Q[0], 5, metric, filter=NONE) == []
    assert [len(r) for r in db.search_batch(Q, 5, metric, filter=NONE)] == [0, 0, 0]
    ids, scores = db.search_arrays(Q, 5, metric, filter=NONE)
    assert ids.shape == scores.shape == (3, 0)
    rare = len(model.rows(RARE))
    assert 0 < rare < 200
    assert [len(r) for r in db.search_batch(Q, 200, metric, filter=RARE)] == [rare] * 3


# -- per-query filters, predicates -----------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_per_query_filters_with_none_entries_and_padding(opener: Opener, metric: str) -> None:
    rng = np.random.default_rng(21)
    db, model = opener(), Model()
    X, pays = data(rng, 1500)
    model.upsert_many(db, list(range(1500)), X, pays)
    Q = queries(rng, 12)
    # Repeated filters (shared work), equal filters built apart, a dict, no match, None.
    filters: list[Any] = [
        HALF,
        None,
        RARE,
        NONE,
        Field("g") < 5,
        AS_DICT,
        TENTH,
        None,
        RARE,
        IDS,
        MIXED,
        HALF,
    ]
    check_per_query(db, model, Q, 7, metric, filters)
    check_per_query(db, model, Q[:3], 500, metric, [RARE, TENTH, None])
    check_per_query(db, model, Q[:2], 5, metric, [NONE, NONE])  # every row empty: width 0
    # One filter per query, all the same, is one filter.
    check_per_query(db, model, Q[:4], 9, metric, [HALF] * 4)


def test_predicate_and_filter_together(opener: Opener) -> None:
    rng = np.random.default_rng(8)
    db, model = opener(), Model()
    X, pays = data(rng, 800)
    model.upsert_many(db, list(range(800)), X, pays)
    Q = queries(rng, 3)

    def pred(r: iqdb.Record) -> bool:
        return int(r.id) % 3 != 0

    for metric, f in zip(METRICS, [HALF, TENTH, NEGATED]):
        exp = model.expected(Q, 10, metric, f, keep=lambda i: i % 3 != 0)
        exp.check(*as_arrays(db.search_batch(Q, 10, metric, pred, filter=f)), exact=True)
        exp.check(*db.search_arrays(Q, 10, metric, pred, filter=f), exact=True)
    filters: list[Any] = [HALF, None, TENTH]
    got = db.search_batch(Q, 10, "l2", pred, filter=filters)
    for i, f in enumerate(filters):
        model.expected(Q[i : i + 1], 10, "l2", f, keep=lambda i: i % 3 != 0).check(
            *as_arrays([got[i]]), exact=True
        )


# -- count and delete_where ------------------------------------------------------------------


def _data_frames(wal: Path) -> list[Any]:
    data = wal.read_bytes()
    return [fr for fr in scan(memoryview(data), decode_header(data)).frames if fr.op is not None]


def test_delete_where_is_one_wal_frame_and_survives_reopen(opener: Opener, backend: tuple[str, str]) -> None:
    rng = np.random.default_rng(4)
    db, model = opener(), Model()
    X, pays = data(rng, 1200)
    model.upsert_many(db, list(range(1200)), X, pays)
    durable = backend[0] == "durable"
    path = Path(db._backend.path) if durable else None  # type: ignore[attr-defined]
    for f in [TENTH, {"tags": {"$contains": "b"}}, NEGATED, NONE]:
        before = _data_frames(path / "wal") if path else []
        want = sorted(ref_ids(as_dict(f), model.items()))
        assert model.delete_where(db, f) == len(want)
        assert db.count(f) == 0
        assert not any(i in db for i in want)
        assert db.search(queries(rng, 1)[0], 5, "l2", filter=f) == []
        if path:
            after = _data_frames(path / "wal")
            if want:
                assert len(after) == len(before) + 1, "delete_where wrote more or less than one frame"
                assert sorted(after[-1].op.ids.tolist()) == want
            else:
                assert len(after) == len(before)
    assert db.count() == len(db) == len(model.records)
    db = reopened(db, opener, 16 << 20)
    assert len(db) == len(model.records)
    for f in FILTERS:
        assert db.count(f) == len(model.rows(f))
    check_all_entry_points(db, model, queries(rng, 4), 20, "cosine", HALF)


def test_delete_where_everything_then_search(opener: Opener) -> None:
    rng = np.random.default_rng(6)
    db, model = opener(), Model()
    X, pays = data(rng, 300)
    model.upsert_many(db, list(range(300)), X, pays)
    assert model.delete_where(db, {}) == 300
    assert len(db) == 0 and db.count() == 0 and db.count(HALF) == 0
    assert db.search(X[0], 5, "l2", filter=HALF) == []
    assert db.delete_where(HALF) == 0
    assert db.dim == D


def test_delete_where_refuses_a_malformed_filter_and_writes_nothing(opener: Opener) -> None:
    rng = np.random.default_rng(6)
    db, model = opener(), Model()
    X, pays = data(rng, 100)
    model.upsert_many(db, list(range(100)), X, pays)
    path = getattr(db._backend, "path", None)  # type: ignore[attr-defined]
    before = Path(path, "wal").read_bytes() if path else b""
    for bad in [{"g": {"$lt": 5, "$oops": 1}}, {"$or": {"g": 1}}, "g < 5", None, 5]:
        with pytest.raises(InvalidArgument):
            db.delete_where(bad)
    assert len(db) == 100
    if path:
        assert Path(path, "wal").read_bytes() == before


# -- the mask cache, the incremental index and failed writes ---------------------------------


def test_cached_masks_see_appended_replaced_and_deleted_rows(opener: Opener, plan: PlanLog) -> None:
    rng = np.random.default_rng(2)
    db, model = opener(), Model()
    X, pays = data(rng, 500)
    model.upsert_many(db, list(range(500)), X, pays)
    Q = queries(rng, 2)
    f = Field("kind") == "doc"
    for step in range(6):
        check_all_entry_points(db, model, Q, 600, "l2", f)
        assert db.count(f) == len(model.rows(f))
        if step == 0:  # append, one by one and in bulk
            for i in range(500, 510):
                p = {"kind": "doc", "g": i}
                db.upsert(iqdb.Record(i, X[i - 500], p))
                model.put(i, X[i - 500], p)
            X2, pays2 = data(rng, 200)
            model.upsert_many(db, list(range(510, 710)), X2, pays2)
        elif step == 1:  # replace: old payloads must stop matching
            docs = [i for i, p in model.items() if p is not None and p.get("kind") == "doc"][:50]
            model.upsert_many(db, docs, np.ones((len(docs), D)), [{"kind": "img"}] * len(docs))
        elif step == 2:  # and the other way round
            imgs = [i for i, p in model.items() if p is not None and p.get("kind") == "img"][:50]
            model.upsert_many(db, imgs, np.ones((len(imgs), D)), [{"kind": "doc", "x": 1}] * len(imgs))
        elif step == 3:
            for i in [i for i, p in model.items() if p is not None and p.get("kind") == "doc"][::3]:
                db.delete(i)
                model.drop(i)
        elif step == 4:
            model.upsert_many(db, [0, 1, 2], np.ones((3, D)), [None, {}, {"kind": ["doc"]}])


def test_a_failed_write_leaves_nothing_a_filter_can_find(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    db, model = opener(), Model()
    X, pays = data(rng, 200)
    model.upsert_many(db, list(range(200)), X, pays)
    model.upsert_many(db, [200], X[:1], [None])
    # The failed writes below must fit the current layout (a write that grows it builds a new
    # layout, which a failure simply drops): then they leave rows in its payload columns.
    store = db._store  # type: ignore[attr-defined]
    assert store._layout.capacity >= store.n + 3
    marker = Field("marker") == "ghost"
    q = queries(rng, 1)[0]
    assert db.search(q, 5, "l2", filter=marker) == []  # cached: an empty mask
    ghost = [{"marker": "ghost", "tags": ["ghost"]}]
    # Invalid rows: a bad payload, a non-finite vector, another dimension, lengths that differ.
    bad_calls: list[Callable[[], object]] = [
        lambda: db.upsert_many([300, 301], np.ones((2, D)), [*ghost, {"bad": object()}]),
        lambda: db.upsert_many([300, 301], np.array([[1.0] * D, [np.nan] * D]), ghost * 2),
        lambda: db.upsert_many([300, 301], np.ones((2, D + 1)), ghost * 2),
        lambda: db.upsert_many([300, 301, 302], np.ones((3, D)), ghost * 2),
        lambda: db.upsert(iqdb.Record(300, np.ones(D + 1), ghost[0])),
    ]
    for call in bad_calls:
        with pytest.raises((InvalidArgument, iqdb.InvalidVector, iqdb.DimensionMismatch)):
            call()
    # A failure midway through applying the write (after the payload columns were appended).
    from iqdb._store import ColumnStore

    def boom(*args: Any, **kw: Any) -> None:
        raise MemoryError("simulated")

    for many in (True, False):
        monkeypatch.setattr(ColumnStore, "_publish", boom)
        with pytest.raises(MemoryError):
            if many:
                db.upsert_many([300, 301, 5], np.ones((3, D)), ghost * 3)
            else:
                db.upsert(iqdb.Record(300, np.ones(D), ghost[0]))
        monkeypatch.undo()
    for f in (marker, Field("tags").contains("ghost"), Field("marker").exists()):
        assert db.count(f) == 0, f
        assert db.search(q, 5, "l2", filter=f) == []
        assert db.search_batch([q], 5, "l2", filter=[f])[0] == []
    assert len(db) == 201 and 300 not in db
    # The rows the failed writes took are reused by good writes: only their payloads match.
    model.upsert_many(db, [400, 401, 402], np.ones((3, D)), [{"other": 1}, None, {"marker": "real"}])
    db.upsert(iqdb.Record(403, np.ones(D), None))
    model.put(403, np.ones(D), None)
    assert db.count(marker) == 0 and db.count(Field("marker") == "real") == 1
    assert db.count(Field("tags").contains("ghost")) == 0 and db.count(Field("marker").exists()) == 1
    check_all_entry_points(db, model, queries(rng, 2), 300, "l2", HALF)


def test_list_elements_of_every_kind_survive_relayouts(opener: Opener, plan: PlanLog) -> None:
    """Lists whose elements change kind from write to write, while the layout grows and drops
    dead rows again and again (each time the payload columns are rebuilt for the new layout)."""
    rng = np.random.default_rng(14)
    db, model = opener(), Model()
    elements: list[Any] = [[1], ["x"], [2.5], [b"x", None], [True], [[1], {"k": 1}], [3, "y"], []]
    filters: list[Any] = [Field("c").contains(v) for v in (1, "x", 2.5, b"x", None, True, 3, "y")]
    filters += [Field("c").exists(), Field("c") == ["x"], Field("c") == [], ~Field("c").contains(1)]
    Q = queries(rng, 2)
    next_id = 0
    for step in range(24):
        lst = elements[step % len(elements)]
        ids = list(range(next_id, next_id + 6))
        next_id += 6
        model.upsert_many(db, ids, data(rng, 6)[0], [{"c": lst}, None, {}, {"c": lst}, {"d": lst}, None])
        # Replace a few older records one by one (dead rows; growth relayouts drop them).
        for rid in rng.choice(next_id, 3, replace=False).tolist():
            p = {"c": elements[int(rng.integers(0, len(elements)))]} if rng.random() < 0.5 else None
            db.upsert(iqdb.Record(rid, model.records[rid][0], p))
            model.put(rid, model.records[rid][0], p)
        for f in filters:
            assert db.count(f) == len(model.rows(f)), (step, f)
        check_all_entry_points(db, model, Q, 5, METRICS[step % 3], filters[step % len(filters)], single=False)
    db.compact()
    db = reopened(db, opener, 16 << 20)
    for f in filters:
        assert db.count(f) == len(model.rows(f)), f


# -- concurrency -----------------------------------------------------------------------------


def test_filtered_searches_while_a_thread_writes_see_consistent_versions(opener: Opener) -> None:
    """Every result matches the filter (its payload is that of the version searched), and
    there are always k of them: 50 records that match are never touched."""
    rng = np.random.default_rng(12)
    db = opener()
    n = 600
    X = rng.integers(-3, 4, size=(n, D)).astype(np.float32)
    db.upsert_many(range(n), X, [{"side": "a" if i < 50 else "b", "i": i} for i in range(n)])
    f = Field("side") == "a"
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            w = np.random.default_rng(13)
            while not stop.is_set():
                ids = w.choice(np.arange(50, n), 40, replace=False)
                sides = w.choice(["a", "b"], 40)
                db.upsert_many(ids, X[ids], [{"side": str(s), "i": int(i)} for s, i in zip(sides, ids)])
                db.delete(int(w.integers(50, n)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline = time.monotonic() + 1.0
        rounds = 0
        while time.monotonic() < deadline or rounds < 20:
            rounds += 1
            q = X[rounds % n]
            for res in [
                db.search(q, 30, "l2", filter=f),
                *db.search_batch([q, -q], 30, "dot", filter=[f, f]),
            ]:
                assert len(res) == 30
                assert all(r.payload is not None and r.payload["side"] == "a" for r in res)
            ids, _ = db.search_arrays([q], 30, "cosine", filter=f)
            assert ids.shape == (1, 30) and (ids != NO_ID).all()
            assert 50 <= db.count(f) <= n
    finally:
        stop.set()
        t.join()
    assert not errors, errors


def test_a_reader_racing_a_growing_list_element_table_sees_only_published_rows() -> None:
    """Readers evaluate the published rows while the writer appends (payload columns are only
    appended to, and grown by replacing their arrays). This replays one interleaving exactly:
    a reader evaluating ``contains`` loads the element table's owner array, then the writer
    appends rows whose list elements grow that table, then the reader goes on. Only published
    rows may match, and none of them holds the element."""
    from iqdb._filters._columns import PayloadIndex, _Grow
    from iqdb._filters._compile import evaluate

    ix = PayloadIndex()
    ix.append(0, [{"t": ["x"]}, {"t": ["y"]}, {"t": ["z"]}])  # rows 0..2: published
    col = ix.columns["t"]
    real = col.el_owner
    fired: list[bool] = []

    class WriterRunsRightAfterThisRead(_Grow):
        __slots__ = ()

        @property  # type: ignore[override]
        def a(self) -> Any:
            arr = real.a
            if not fired:
                fired.append(True)
                col.el_owner = real
                ix.append(3, [{"t": ["needle", "needle"]} for _ in range(40)])  # rows 3..42: not published
            return arr

    col.el_owner = object.__new__(WriterRunsRightAfterThisRead)
    mask = evaluate(Field("t").contains("needle"), ix, np.arange(3, dtype=np.uint64), [None] * 3, 0, 3)
    assert fired, "the reader no longer reads the owner array through _Grow.a: update this replay"
    assert mask.tolist() == [False, False, False]


# -- edges -------------------------------------------------------------------------------------


def test_filters_on_empty_closed_and_readonly_databases(opener: Opener, backend: tuple[str, str]) -> None:
    db = opener()
    f = Field("a") == 1
    assert db.count(f) == db.count() == 0
    assert db.search([1.0, 2.0], 3, "l2", filter=f) == []
    assert db.delete_where(f) == 0
    ids, _ = db.search_arrays([[1.0, 2.0]], 3, filter=[f])
    assert ids.shape == (1, 0)
    db.upsert_many([1, 2, 3], np.eye(3), [{"a": 1}, None, {"a": 2}])
    assert db.count(f) == 1 and db.count(~f) == 2
    # A repeated id in one call: the last row wins, the first payload never matches.
    db.upsert_many([7, 7], np.eye(3)[:2], [{"a": "first"}, {"a": "second"}])
    assert db.count(Field("a") == "first") == 0 and db.count(Field("a") == "second") == 1

    def writes(r: iqdb.Record) -> bool:
        db.delete_where(f)
        return True

    with pytest.raises(InvalidArgument):
        db.search_batch([[1.0, 0.0, 0.0]], 2, "l2", writes)
    assert db.count(f) == 1
    if backend[0] == "durable":
        path = Path(db._backend.path)  # type: ignore[attr-defined]
        db.close()
        with iqdb.open(path, readonly=True, device=backend[1]) as ro:
            assert ro.count(f) == 1
            assert [int(r.id) for r in ro.search([1.0, 0.0, 0.0], 5, "l2", filter=~f)] == [2, 3, 7]
            with pytest.raises(iqdb.InvalidConfig):
                ro.delete_where(f)
            assert ro.count() == 4
        db = opener(path=path)
    # Everything deleted, then compacted and reopened (durable: a store of no rows at all).
    assert db.delete_where({}) == 4
    db.compact()
    db = reopened(db, opener, 16 << 20)
    assert db.dim == 3 and db.count() == db.count(f) == 0
    Q = np.ones((9, 3), dtype=np.float32)
    for where in ([f, f], [f, None], f, [Field("a") == i for i in range(6)]):
        m = len(where) if isinstance(where, list) else 9
        assert db.search_batch(Q[:m], 3, "l2", filter=where) == [[]] * m
        ids, scores = db.search_arrays(Q[:m], 3, "l2", filter=where)
        assert ids.shape == scores.shape == (m, 0)
    db.close()
    with pytest.raises(iqdb.Closed):
        db.count(f)
    with pytest.raises(iqdb.Closed):
        db.delete_where(f)
    with pytest.raises(iqdb.Closed):
        db.search([1.0, 0.0, 0.0], 1, filter=f)
