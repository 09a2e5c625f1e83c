"""The GPU answers exactly as the CPU does: the same ids, in the same order, with the same score bits.

Every test builds one database on ``device="cpu"`` and the same database on the device under
test (the ``gpu_device`` fixture), runs the same searches on both and compares the answers
exactly: ids, their order (ties to the smaller id, NaN last) and every score's float64 bits
(NaN positions must match; a NaN is compared as a NaN, whatever its payload bits).

The device under test is

* ``standin``: ``device="cuda"`` resolves to the CuPy-like stand-in of ``tests/standin.py`` (the
  GPU orchestration, fixed-shape driver and device mirror running on the CPU), always;
* ``cuda``: real CuPy on ``cuda:0``, marked ``gpu`` and skipped with conftest's reason when the
  machine has no usable GPU.

The scenarios are the issue's list: random data, every metric, tie patterns, NaN, ``k`` beyond
the number of records, deletes and replacements (up to a vacuum and through growth), filters
(both plans, shared and per query), a reopen from snapshot plus WAL, and a large ``k``.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _reference import brute_force
from standin import standin_backend

import iqdb
from iqdb.kernels import cpu_backend

METRICS = ["l2", "cosine", "dot"]
MIN_WORKING_SET = 64 << 10  # the smallest working set: many tiles even for small stores

Answer = Any  # what a search returned: (ids, scores) arrays, or result lists


@pytest.fixture(
    params=[
        pytest.param("standin", id="standin"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
        pytest.param("cuda-tiles", id="cuda-small-tiles", marks=pytest.mark.gpu),
    ]
)
def gpu_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ``device=`` spelling of the device under test (always ``"cuda"``).

    For ``standin``, handles opened with ``device="cuda"`` run on the stand-in and ``"cpu"`` stays
    NumPy (as ``on_standin`` in test_standin.py does); for ``cuda`` nothing is patched. A real GPU
    sizes its score tiles from free memory (up to 1 GiB), so the stores here fit one tile; for
    ``cuda-small-tiles`` the GPU profile keeps to the handle's working set instead, so the GPU
    merges many tiles, as the stand-in does.
    """
    if request.param == "standin":
        monkeypatch.setattr(
            "iqdb._db.resolve_device", lambda device: cpu_backend() if device == "cpu" else standin_backend()
        )
    elif request.param == "cuda-tiles":
        import iqdb.kernels._backend as kb

        monkeypatch.setattr(kb, "GPU_PROFILE", dataclasses.replace(kb.GPU_PROFILE, free_memory_divisor=None))
    return "cuda"


# -- comparing answers ----------------------------------------------------------------------------


def _score_key(score: float) -> int | str:
    return "nan" if np.isnan(score) else int(np.array(score, dtype=np.float64).view(np.uint64))


def assert_identical(got: Answer, want: Answer, what: str) -> None:
    """``got`` (device) is ``want`` (CPU): ids, order, score bits, NaN positions, payloads."""
    if isinstance(want, tuple):  # search_arrays
        (gi, gs), (wi, ws) = got, want
        assert isinstance(gi, np.ndarray) and isinstance(gs, np.ndarray), what
        assert gi.dtype == wi.dtype == np.uint64 and gs.dtype == ws.dtype == np.float64, what
        assert gi.shape == wi.shape and gs.shape == ws.shape, f"{what}: shapes {gi.shape} != {wi.shape}"
        np.testing.assert_array_equal(gi, wi, err_msg=f"{what}: ids")
        g_nan, w_nan = np.isnan(gs), np.isnan(ws)
        np.testing.assert_array_equal(g_nan, w_nan, err_msg=f"{what}: NaN positions")
        np.testing.assert_array_equal(
            np.where(g_nan, 0.0, gs).view(np.uint64),
            np.where(w_nan, 0.0, ws).view(np.uint64),
            err_msg=f"{what}: score bits",
        )
        return
    assert isinstance(want, list) and isinstance(got, list), what
    if want and isinstance(want[0], list):  # search_batch
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_identical(g, w, f"{what}, query {i}")
        return
    key = [(int(r.id), _score_key(r.score), r.payload) for r in got]
    assert key == [(int(r.id), _score_key(r.score), r.payload) for r in want], what


class Twins:
    """The same database on the CPU and on the device under test, written and searched alike."""

    def __init__(self, cpu: iqdb.Iqdb, dev: iqdb.Iqdb) -> None:
        assert cpu.device == "cpu" and dev.device == "cuda:0"
        self.cpu, self.dev = cpu, dev

    def write(self, method: str, *args: Any, **kw: Any) -> None:
        """``db.method(*args, **kw)`` on both; both must return the same (delete's bool, say)."""
        results = [getattr(db, method)(*args, **kw) for db in (self.cpu, self.dev)]
        assert results[0] == results[1], (method, results)

    def same(self, method: str, *args: Any, at: str = "", **kw: Any) -> Answer:
        """``db.method(*args, **kw)`` (a search) on both; assert the answers identical; return
        the CPU's. ``at`` says where in the scenario, for the failure message."""
        want = getattr(self.cpu, method)(*args, **kw)
        shown = [f"array{a.shape}" if isinstance(a, np.ndarray) else repr(a) for a in args]
        call = ", ".join(shown + [f"{name}={value!r}" for name, value in kw.items()])
        what = f"{method}({call})" + (f" [{at}]" if at else "")
        assert_identical(getattr(self.dev, method)(*args, **kw), want, what)
        return want

    def close(self) -> None:
        self.cpu.close()
        self.dev.close()


@pytest.fixture
def twins(gpu_device: str) -> Iterator[Callable[..., Twins]]:
    """A factory of in-memory :class:`Twins` (keyword arguments go to ``open_in_memory``)."""
    made: list[Twins] = []

    def make(**options: Any) -> Twins:
        t = Twins(
            iqdb.open_in_memory(device="cpu", **options), iqdb.open_in_memory(device=gpu_device, **options)
        )
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _ties(ids: np.ndarray, scores: np.ndarray) -> int:
    """How many adjacent result pairs hold exactly equal (non-NaN) scores: a scenario about ties
    must produce some, or it tests nothing."""
    return int(np.count_nonzero(scores[:, 1:] == scores[:, :-1]))


# -- the scenarios ----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_random_data(twins: Callable[..., Twins], metric: str) -> None:
    """Gaussian data at several k, one query and a batch of 300, ``search`` and ``search_arrays``,
    with the smallest working set (many tiles): catches any difference in the device's coarse
    scores, selection, candidate merge across tiles, exact re-scoring or ordering."""
    rng = np.random.default_rng(1)
    n, d = 3000, 24
    X = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.permutation(10 * n)[:n]  # ids unrelated to row order
    Q = rng.standard_normal((300, d)).astype(np.float32)
    t = twins(working_set=MIN_WORKING_SET)
    t.write("upsert_many", ids, X)
    for k in (1, 10, 100):
        ans = t.same("search_arrays", Q, k, metric)
        assert ans[0].shape == (300, k)
        t.same("search_arrays", Q[:1], k, metric)
        t.same("search", Q[7], k, metric)
        t.same("search_batch", Q[:5], k, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_vectors_tie_to_the_smaller_id(twins: Callable[..., Twins], metric: str) -> None:
    """Identical vectors under different ids, the larger ids stored first, the copies spread over
    many tiles. Pairs: the tie sits well inside the device's candidates, so its final sort
    decides. Groups of 40, larger than k plus the device's selection margin: the k-th place falls
    inside a group and the near-tie rescan decides. Catches a device that orders ties otherwise
    than by id, or keeps the earliest rows (its selection breaks ties by position) instead of the
    smallest ids."""
    rng = np.random.default_rng(2)
    d = 16
    big = rng.standard_normal((60, d)).astype(np.float32)
    pairs = rng.standard_normal((600, d)).astype(np.float32)
    X = np.concatenate([np.repeat(big, 40, axis=0), np.repeat(pairs, 2, axis=0)])
    X = X[rng.permutation(X.shape[0])]  # copies scattered across the rows
    ids = np.arange(X.shape[0])[::-1] * 3 + 5  # row order = descending ids
    t = twins(working_set=MIN_WORKING_SET)
    t.write("upsert_many", ids, X)
    noise = 0.01 * rng.standard_normal((40, d)).astype(np.float32)
    Q = np.concatenate([big[:20], big[:20] + noise[:20], pairs[:20], pairs[:20] + noise[20:]])
    for k in (1, 5, 30, 57, 100):
        ans = t.same("search_arrays", Q, k, metric)
        if k > 1:
            assert _ties(*ans) > 0
        t.same("search", Q[3], k, metric)
        t.same("search", Q[43], k, metric)
        t.same("search_arrays", Q[:1], k, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_integer_vectors_tie_exactly(twins: Callable[..., Twins], metric: str) -> None:
    """Small-integer vectors: scores are exact in any summation order and most of them tie, at
    every place of the answer. The CPU's answer is also checked bit for bit against the brute
    force of tests/_reference.py, so a break shared by both devices shows too."""
    rng = np.random.default_rng(3)
    n, d = 4000, 6
    X = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    X[np.all(X == 0, axis=1), 0] = 1.0
    ids = rng.permutation(n)[::-1].copy()
    Q = rng.integers(-2, 3, size=(50, d)).astype(np.float32)
    Q[np.all(Q == 0, axis=1), 0] = 1.0
    t = twins(working_set=MIN_WORKING_SET)
    t.write("upsert_many", ids, X)
    for k in (1, 10, 100, 777):
        ans = t.same("search_arrays", Q, k, metric)
        assert k == 1 or _ties(*ans) > 0
        brute_force(X, ids, Q, k, metric).check(*ans, exact=metric != "cosine")
        t.same("search", Q[0], k, metric)


def test_cosine_nan_ranks_last_by_id(twins: Callable[..., Twins]) -> None:
    """COSINE with zero rows in the store (scores NaN) and zero queries (every score NaN): the NaN
    results come after every number, by id, however deep k reaches. Catches a device partition or
    sort that mis-places NaN, and a NaN fill that picks the wrong rows."""
    rng = np.random.default_rng(4)
    n, d = 1500, 12
    X = rng.standard_normal((n, d)).astype(np.float32)
    zero = rng.choice(n, 60, replace=False)
    X[zero] = 0.0
    ids = rng.permutation(5 * n)[:n]
    Q = rng.standard_normal((12, d)).astype(np.float32)
    Q[[2, 5, 6]] = 0.0  # zero queries, mixed in the batch
    t = twins(working_set=MIN_WORKING_SET)
    t.write("upsert_many", ids, X)
    live = n - zero.shape[0]
    for k in (3, 50, live - 1, live, live + 1, live + 30, n, n + 10):
        ids_out, scores = t.same("search_arrays", Q, k, "cosine")
        assert np.isnan(scores[2]).all()
        brute_force(X, ids, Q, k, "cosine").check(ids_out, scores)
        if k > live:
            assert np.isnan(scores[0, live:]).all() and not np.isnan(scores[0, :live]).any()
        t.same("search", Q[5], k, "cosine", at="zero query")
        t.same("search", Q[0], k, "cosine")
        t.same("search_arrays", Q[5:6], k, "cosine", at="zero query alone")
    for metric in ("l2", "dot"):  # zero rows and queries are ordinary there
        t.same("search_arrays", Q, 80, metric, at="zero rows")


@pytest.mark.parametrize("metric", METRICS)
def test_k_at_and_beyond_the_number_of_records(twins: Callable[..., Twins], metric: str) -> None:
    """k = n, n + 5, far beyond n, and n - 1, also after deletes (n counts live records only):
    every record comes back, in order. Catches a device that pads, drops or duplicates rows when
    its selection width exceeds the store."""
    rng = np.random.default_rng(5)
    n, d = 37, 8
    X = rng.standard_normal((n, d)).astype(np.float32)
    Q = rng.standard_normal((9, d)).astype(np.float32)
    t = twins()
    t.write("upsert_many", np.arange(100, 100 + n), X)
    for step in range(2):
        live = n - 4 * step
        for k in (live - 1, live, live + 5, 10_000):
            ids_out, _ = t.same("search_arrays", Q, k, metric)
            assert ids_out.shape == (9, min(k, live))
            t.same("search", Q[1], k, metric)
            t.same("search_arrays", Q[:1], k, metric)
        for rid in (100, 117, 120, 136):
            t.write("delete", rid)


@pytest.mark.parametrize("metric", METRICS)
def test_deletes_replacements_vacuum_and_growth(twins: Callable[..., Twins], metric: str) -> None:
    """The device mirror kept in step through writes made between searches: deletes, upserts over
    existing ids (some onto another record's vector: new ties), a vacuum (deleted rows past a
    fifth of the store and 1,024), then growth by many inserts. Catches a mirror that misses a
    write, still returns a dead or replaced row, or misaligns rows after a vacuum or growth."""
    rng = np.random.default_rng(6)
    n, d = 4000, 16
    X = rng.standard_normal((n, d)).astype(np.float32)
    Q = rng.standard_normal((40, d)).astype(np.float32)
    t = twins(working_set=MIN_WORKING_SET)
    t.write("upsert_many", np.arange(n), X)

    def check(what: str) -> None:
        for k in (10, 64):
            t.same("search_arrays", Q, k, metric, at=what)
        t.same("search", Q[0], 10, metric, at=what)

    check("fresh")
    for rid in rng.choice(n, 200, replace=False).tolist():
        t.write("delete", rid)
    t.write("delete", n + 99)  # absent: False on both
    check("after single deletes")
    over = rng.choice(n, 300, replace=False)
    new = rng.standard_normal((300, d)).astype(np.float32)
    new[:100] = X[rng.choice(n, 100)]  # replaced by another record's vector: ties
    t.write("upsert_many", over, new)
    for rid in over[:20].tolist():
        t.write("upsert", iqdb.Record(rid, Q[rid % 40]))  # a query's own vector
    check("after replacements")
    t.write("delete_where", iqdb.Field.id < 1500)
    dead = t.dev._store.version.n_dead
    assert dead > 1024
    t.write("upsert", iqdb.Record(n + 1, Q[1]))  # the next write vacuums first
    assert t.dev._store.version.n_dead < dead and t.cpu._store.version.n_dead < dead
    check("after a vacuum")
    cap = t.dev._store.version.layout.capacity
    for i in range(5):  # growth, in a few bulk writes and one by one, with searches between
        more = rng.standard_normal((1500, d)).astype(np.float32)
        t.write("upsert_many", np.arange(10_000 + 1500 * i, 11_500 + 1500 * i), more)
        t.write("upsert", iqdb.Record(50_000 + i, Q[i] * 2))
        check(f"after growth step {i}")
    assert t.dev._store.version.layout.capacity > cap


def _payloads(n: int) -> list[dict[str, Any]]:
    return [
        {
            "cat": i % 7,
            "price": float((i * 37) % 1000) / 10.0,
            "tags": ["even" if i % 2 == 0 else "odd", f"t{i % 11}"],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("metric", METRICS)
def test_filters_selective_and_broad_shared_and_per_query(twins: Callable[..., Twins], metric: str) -> None:
    """``iqdb.Field`` filters (equality, range, contains, combinations), one per batch and one per
    query (``[f1, None, f2]``), matching few records (the gather plan: the device scores only
    those rows) and most (the dense plan: the device excludes the others inside every tile; with
    a batch, the shared scan). Catches a device that returns a non-matching row or misses a
    matching one in either plan, and any misalignment of the per-query padding."""
    rng = np.random.default_rng(7)
    n, d = 30_000, 8  # broad filters match over 20,000 rows: the dense plan
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[rng.choice(n, 50, replace=False)] = X[:50]  # some ties
    Q = rng.standard_normal((12, d)).astype(np.float32)
    t = twins()
    t.write("upsert_many", np.arange(n), X, _payloads(n))
    F = iqdb.Field
    selective = [
        F("cat") == 3,  # 1/7 of 30,000 < 20,000 rows: gather
        F("price").between(10.0, 12.5),
        F("tags").contains("t4") & (F("cat") != 2),
        F.id.isin([5, 77, 29_999, 12_345]),
    ]
    broad = [
        F("cat") != 3,  # 6/7: dense
        F("price") >= 20.0,
        ~F("tags").contains("t4"),
    ]
    for f in selective + broad:
        for k in (1, 10, 200):
            ans = t.same("search_arrays", Q, k, metric, filter=f)
            assert ans[0].shape[1] > 0
            t.same("search_arrays", Q[:1], k, metric, filter=f)
        t.same("search", Q[4], 15, metric, filter=f)
    v = t.dev._store.version
    assert all(v.plans[f].rows is not None for f in selective)  # the gather plan was used
    assert all(v.plans[f].rows is None for f in broad)  # the dense plan was used
    # 12 queries, 8 distinct filters (with None): the shared scan serves the broad ones.
    (s0, s1, s2, s3), (b0, b1, b2) = selective, broad
    per_query: list[iqdb.Filter | None] = [s0, None, b0, s3, b1, None, s1, b2, None, s2, s0, b0]
    for k in (3, 50):
        t.same("search_arrays", Q, k, metric, filter=per_query)
        t.same("search_arrays", Q[:3], k, metric, filter=per_query[:3])
        t.same("search_batch", Q[:4], k, metric, filter=per_query[:4])
    # A filter matching fewer than k records: short rows, padded alike.
    tiny: list[iqdb.Filter | None] = [F.id.isin([1, 2, 3]), None, F.id == 9, F("cat") == 99]
    ids_out, _ = t.same("search_arrays", Q[:4], 6, metric, filter=tiny, at="padded")
    assert (ids_out[0, 3:] == iqdb.NO_ID).all() and (ids_out[3] == iqdb.NO_ID).all()
    # Deletes change both plans' rows.
    t.write("delete_where", F("cat") == 5)
    t.same("search_arrays", Q, 20, metric, filter=broad[1], at="dense plan after deletes")
    t.same("search_arrays", Q, 20, metric, filter=selective[1], at="gather plan after deletes")


def _crash(db: iqdb.Iqdb) -> None:
    """The process dies: the lock and files are released, nothing is compacted (the writes since
    the last compaction are only in the WAL)."""
    db._backend._release()  # type: ignore[attr-defined]
    db._closed = True


def _durable_script(db: iqdb.Iqdb) -> None:
    rng = np.random.default_rng(8)
    d = 16
    X = rng.standard_normal((2000, d)).astype(np.float32)
    X[10:20] = 0.0  # cosine NaN rows
    X[100:130] = X[0]  # ties
    db.upsert_many(np.arange(2000), X, _payloads(2000))
    for rid in range(0, 2000, 9):
        db.delete(rid)
    db.compact()
    # Only in the WAL from here: inserts, replacements, deletes.
    db.upsert_many(np.arange(1990, 2400), rng.standard_normal((410, d)).astype(np.float32))
    db.upsert_many(np.arange(300, 330), np.repeat(X[1:2], 30, axis=0))
    db.delete_where(iqdb.Field("cat") == 4)
    db.delete(1)


def test_a_reopened_database_answers_as_the_cpu(gpu_device: str, tmp_path: Path) -> None:
    """A durable database written and compacted, then more writes that live only in the WAL, the
    process killed; reopened on the device, it answers as the CPU reopened (snapshot loaded onto
    the device and WAL replayed). Written once on the CPU and copied, and also written on the
    device itself. Then more writes after the reopen. Catches a snapshot load or WAL replay that
    puts different rows, norms or ids on the device."""
    rng = np.random.default_rng(9)
    Q = rng.standard_normal((20, 16)).astype(np.float32)
    Q[3] = 0.0
    for writer, name in (("cpu", "copied"), (gpu_device, "written on the device")):
        db = iqdb.open(tmp_path / f"{name}-w", device=writer)
        _durable_script(db)
        _crash(db)
        shutil.copytree(tmp_path / f"{name}-w", tmp_path / f"{name}-cpu")
        shutil.copytree(tmp_path / f"{name}-w", tmp_path / f"{name}-dev")
        cpu = iqdb.open(tmp_path / f"{name}-cpu", device="cpu")
        dev = iqdb.open(tmp_path / f"{name}-dev", device=gpu_device)
        t = Twins(cpu, dev)
        try:
            assert dev._backend.recovery["replayed"] == 4  # type: ignore[attr-defined]
            for metric in METRICS:
                for k in (1, 17, 500, 5000):
                    t.same("search_arrays", Q, k, metric, at=name)
                t.same("search", Q[3], 40, metric, at=f"{name}, zero query")
                t.same("search_arrays", Q, 25, metric, filter=iqdb.Field("cat") == 2, at=name)
            t.write("upsert_many", np.arange(5000, 5100), Q[np.arange(100) % 20] + 1)
            t.write("delete", 2)
            for metric in METRICS:
                t.same("search_arrays", Q, 30, metric, at=f"{name}, after more writes")
        finally:
            t.close()


@pytest.mark.parametrize("metric", METRICS)
def test_large_k_on_a_larger_store(twins: Callable[..., Twins], metric: str) -> None:
    """n = 5,000 and k = 2,000 (and k = n - 1): no cap on k, and a selection width far beyond the
    usual; catches a device path that caps k, or whose wide selection loses or misorders rows."""
    rng = np.random.default_rng(10)
    n, d = 5000, 16
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[4000:4100] = X[:100]  # ties deep in the answer
    Q = rng.standard_normal((8, d)).astype(np.float32)
    ids = rng.permutation(n)
    t = twins()
    t.write("upsert_many", ids, X)
    for k in (2000, n - 1):
        ids_out, _ = t.same("search_arrays", Q, k, metric)
        assert ids_out.shape == (8, k)
        t.same("search", Q[0], k, metric)
