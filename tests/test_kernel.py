"""Every path of the flat kernel returns exactly what a float64 brute force returns.

The kernel has several paths chosen by shape and data: a matrix-vector product (one query), a
plain product plus a pass over the scores (few queries), a product over an augmented or
pre-scaled copy of each tile (256 queries or more), float64 coarse scores for vectors outside
float32's comfortable range, a re-scan when near-ties crowd the candidate margin, a pre-filter
over a subset of rows, many small tiles when the working set is tiny, small query blocks for
large k, and scans split among workers (threads, or inline to test the split alone). Each is
compared here, ids and scores, with the reference in ``_reference``: float64 distances of every
row written out in plain NumPy (nothing from the kernels, not even their exact re-scoring),
ordered by (score, id), NaN last. Real-valued scores may differ from the kernel's in their last
bits (another summation order), within a rounding tolerance; small-integer data is exact in any
order, so there ids and score bits must be equal.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import pytest
from _reference import Expected, brute_force

from iqdb._store import row_norms_sq
from iqdb.kernels import CPU_PROFILE, _backend, _exact, _flat, _selection, _tiles, cpu_backend, flat_topk
from iqdb.kernels._parallel import Parallel, ThreadedCpu, _BlasLimit

METRICS = ["l2", "cosine", "dot"]


def reference(
    X: np.ndarray, ids: np.ndarray, Q: np.ndarray, k: int, metric: str, rows: np.ndarray | None
) -> Expected:
    return brute_force(X, ids, Q, k, metric, rows)


def run(X, ids, Q, k, metric, rows=None, working_set=16 << 20):
    out = flat_topk(np, X, row_norms_sq(np, X), ids, Q, k, metric, rows, working_set=working_set)
    return ids[out.rows].tolist(), out.scores.tolist()


def same(got, want: Expected, exact: bool = False) -> None:
    want.check(*got, exact=exact)


def tricky_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rows plus exact duplicates, zero rows and near-duplicates, under shuffled ids."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[5:25] = X[3]  # 21 identical rows: ties at any k
    X[30:34] = 0.0  # zero rows: NaN under COSINE
    X[40:60] = X[3] + rng.standard_normal((20, d)).astype(np.float32) * 1e-6  # near-ties
    ids = rng.permutation(np.arange(10 * n, 11 * n, dtype=np.uint64))
    return X, ids


def queries(X: np.ndarray, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    Q = rng.standard_normal((m, X.shape[1])).astype(np.float32)
    Q[0] = X[3]  # sits on the duplicate block
    if m > 1:
        Q[1] = 0.0  # a zero query: every COSINE score is NaN
    return Q


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("m", [1, 7, 40, 300], ids=["gemv", "rows", "transposed", "augmented"])
@pytest.mark.parametrize("k", [1, 10, 33])
def test_every_query_path_matches_the_reference(metric: str, m: int, k: int) -> None:
    X, ids = tricky_data(2000, 12, seed=m + k)
    Q = queries(X, m, seed=k)
    same(run(X, ids, Q, k, metric), reference(X, ids, Q, k, metric, None))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("m", [1, 300])
def test_tiny_working_set_many_tiles_matches_the_reference(metric: str, m: int) -> None:
    X, ids = tricky_data(9000, 8, seed=7)
    Q = queries(X, m, seed=3)
    same(run(X, ids, Q, 25, metric, working_set=4096), reference(X, ids, Q, 25, metric, None))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("m", [1, 300])
def test_prefilter_rows_match_the_reference(metric: str, m: int) -> None:
    X, ids = tricky_data(3000, 6, seed=11)
    rows = np.flatnonzero(np.random.default_rng(0).random(3000) < 0.3)
    rows = np.union1d(rows, [3, 5, 6, 30]).astype(np.int64)  # keep some ties and a zero row
    Q = queries(X, m, seed=5)
    same(run(X, ids, Q, 12, metric, rows), reference(X, ids, Q, 12, metric, rows))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("scale", [1e-25, 1e19], ids=["tiny", "huge"])
def test_float64_coarse_path_matches_the_reference(metric: str, scale: float) -> None:
    X, ids = tricky_data(1500, 5, seed=2)
    X = (X.astype(np.float64) * scale).astype(np.float32)
    Q = (queries(X, 3, seed=9).astype(np.float64) * (scale if scale < 1 else 1.0)).astype(np.float32)
    with np.errstate(over="ignore"):
        got = run(X, ids, Q, 15, metric)
    same(got, reference(X, ids, Q, 15, metric, None))


@pytest.mark.parametrize("metric", METRICS)
def test_duplicates_beyond_the_margin_force_a_rescan_and_still_match(metric: str) -> None:
    """200 identical rows and k = 10: the kept candidates (k + margin) are all ties, so the
    kernel must re-scan to find the smallest ids among all 200."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((5000, 16)).astype(np.float32)
    X[1000:1200] = X[7]
    ids = rng.permutation(np.arange(5000, dtype=np.uint64))
    Q = np.stack([X[7], X[7] * 1.5]).astype(np.float32)
    same(run(X, ids, Q, 10, metric), reference(X, ids, Q, 10, metric, None))


def test_k_above_the_row_count_returns_every_row_in_order() -> None:
    X, ids = tricky_data(80, 4, seed=1)
    Q = queries(X, 3, seed=1)
    for metric in METRICS:
        got = run(X, ids, Q, 500, metric)
        assert all(len(r) == 80 for r in got[0])
        same(got, reference(X, ids, Q, 500, metric, None))


class InlineWorkers(Parallel):
    """Claims ``workers`` cores but runs the tasks one after another: the split's logic,
    deterministically."""

    def __init__(self, workers: int) -> None:
        self.workers = workers


# The CPU profile with the split floors lowered: tiny test data splits among workers (the real
# floors keep small scans whole), the sampled bounds' own split included.
SPLIT = dataclasses.replace(CPU_PROFILE, min_work=0, min_work_one_query=0, min_rows_per_worker=1)


def run_split(X, ids, Q, k, metric, parallel, rows=None, working_set=16 << 20, profile=SPLIT):
    out = flat_topk(
        np,
        X,
        row_norms_sq(np, X),
        ids,
        Q,
        k,
        metric,
        rows,
        working_set=working_set,
        parallel=parallel,
        profile=profile,
    )
    return ids[out.rows].tolist(), out.scores.tolist()


RUNNERS = {
    "inline-2": lambda: InlineWorkers(2),
    "inline-3": lambda: InlineWorkers(3),
    "threads-3": lambda: ThreadedCpu(3, _BlasLimit(_blas_controllers())),
}


def _blas_controllers() -> list:
    from threadpoolctl import ThreadpoolController

    return list(ThreadpoolController().select(user_api="blas").lib_controllers)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("m", [1, 7, 40, 300], ids=["gemv", "rows", "transposed", "augmented"])
@pytest.mark.parametrize("k", [1, 33])
def test_scans_split_among_workers_match_the_reference(runner: str, metric: str, m: int, k: int) -> None:
    X, ids = tricky_data(2000, 12, seed=m + k)
    Q = queries(X, m, seed=k)
    got = run_split(X, ids, Q, k, metric, RUNNERS[runner]())
    same(got, reference(X, ids, Q, k, metric, None))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("m", [1, 300])
def test_split_scans_with_tiny_tiles_prefilter_and_rescan_match_the_reference(metric: str, m: int) -> None:
    parallel = InlineWorkers(3)
    X, ids = tricky_data(9000, 8, seed=7)
    Q = queries(X, m, seed=3)
    same(run_split(X, ids, Q, 25, metric, parallel, working_set=4096), reference(X, ids, Q, 25, metric, None))
    rows = np.union1d(np.flatnonzero(np.random.default_rng(0).random(9000) < 0.3), [3, 5, 6, 30])
    rows = rows.astype(np.int64)
    same(run_split(X, ids, Q, 12, metric, parallel, rows), reference(X, ids, Q, 12, metric, rows))
    # 200 identical rows spread over all three workers' shares: a re-scan must find the
    # smallest ids among them.
    X2 = np.random.default_rng(4).standard_normal((6000, 16)).astype(np.float32)
    X2[::30] = X2[7]
    ids2 = np.random.default_rng(5).permutation(np.arange(6000, dtype=np.uint64))
    Q2 = np.stack([X2[7], X2[7] * 1.5]).astype(np.float32)
    same(run_split(X2, ids2, Q2, 10, metric, parallel), reference(X2, ids2, Q2, 10, metric, None))


@pytest.mark.parametrize("metric", METRICS)
def test_k_above_a_workers_share_matches_the_reference(metric: str) -> None:
    """k = 70 over 3 workers' shares of 40 rows: each share keeps every row it has."""
    X, ids = tricky_data(120, 4, seed=1)
    Q = queries(X, 5, seed=1)
    same(run_split(X, ids, Q, 70, metric, InlineWorkers(3)), reference(X, ids, Q, 70, metric, None))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [100, 700])
def test_large_k_shrinks_the_query_block_and_matches_the_reference(metric: str, k: int) -> None:
    """With a small working set and large k the queries run in many small blocks."""
    X, ids = tricky_data(6000, 10, seed=k)
    Q = queries(X, 40, seed=k)
    same(run(X, ids, Q, k, metric, working_set=1 << 17), reference(X, ids, Q, k, metric, None))


@pytest.fixture
def sample_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per block, whether its admission bounds were sampled (True) or not."""
    calls: list[bool] = []
    original = _flat._sample_bound

    def spy(*args, **kwargs):
        theta = original(*args, **kwargs)
        calls.append(theta is not None)
        return theta

    monkeypatch.setattr(_flat, "_sample_bound", spy)
    return calls


@pytest.mark.parametrize("runner", ["serial", "inline-2", "threads-3"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("m", [40, 300], ids=["transposed", "augmented"])
@pytest.mark.parametrize("k", [60, 250])
def test_sampled_admission_bounds_match_the_reference(
    runner: str, metric: str, m: int, k: int, sample_calls: list[bool]
) -> None:
    """Large k: each query's bound comes from a strided sample and admitted scores are merged
    lazily. Ties, zero rows (NaN under COSINE), a zero query and near-duplicates included."""
    X, ids = tricky_data(8000, 12, seed=m + k)
    Q = queries(X, m, seed=k)
    parallel = {"serial": lambda: _flat.SERIAL, **RUNNERS}[runner]()
    got = run_split(X, ids, Q, k, metric, parallel)
    assert sample_calls and all(sample_calls)
    same(got, reference(X, ids, Q, k, metric, None))
    rows = np.union1d(np.flatnonzero(np.random.default_rng(1).random(8000) < 0.5), [3, 5, 6, 30])
    rows = rows.astype(np.int64)
    same(run_split(X, ids, Q, k, metric, parallel, rows), reference(X, ids, Q, k, metric, rows))


@pytest.mark.parametrize("runner", ["serial", "inline-2"])
@pytest.mark.parametrize("metric", METRICS)
def test_a_sample_that_misses_the_top_k_falls_back_to_the_exact_scan(
    runner: str, metric: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adversarial order: exactly the sampled rows are the near ones, so each sampled bound
    admits fewer than k rows. Those queries are scanned again with an exact running bound."""
    n, d, k = 8000, 8, 100
    rng = np.random.default_rng(3)
    Q = rng.standard_normal((50, d)).astype(np.float32)
    X = (rng.standard_normal((n, d)) * 10 + 40).astype(np.float32)  # far from every query
    s = n // CPU_PROFILE.sample_stride
    step = n // s
    near = np.arange(s) * step + step // 2
    X[near] = (Q[rng.integers(0, 50, s)] + rng.standard_normal((s, d)) * 0.1).astype(np.float32)
    ids = rng.permutation(np.arange(n, dtype=np.uint64))
    thetas: list[bool] = []
    original = _flat._coarse_best

    def spy(*args, **kwargs):
        thetas.append(inspect.signature(original).bind(*args, **kwargs).arguments["theta"] is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(_flat, "_coarse_best", spy)
    parallel = InlineWorkers(2) if runner == "inline-2" else _flat.SERIAL
    got = run_split(X, ids, Q, k, metric, parallel)
    assert thetas[0] and False in thetas[1:], "the fallback scan did not run"
    same(got, reference(X, ids, Q, k, metric, None))


@pytest.mark.parametrize("metric", METRICS)
def test_ties_overflowing_the_selection_buffer_match_the_reference(
    metric: str, sample_calls: list[bool]
) -> None:
    """3,000 identical rows nearest to every query: one tile admits more ties than the lazy
    buffer holds, so it grows; the kept candidates are all ties, so a re-scan orders them."""
    rng = np.random.default_rng(8)
    X = rng.standard_normal((9000, 6)).astype(np.float32)
    X[2000:5000] = X[1]
    ids = rng.permutation(np.arange(9000, dtype=np.uint64))
    Q = (X[1] + rng.standard_normal((40, 6)) * 1e-3).astype(np.float32)
    got = run(X, ids, Q, 120, metric)
    assert sample_calls and all(sample_calls)
    same(got, reference(X, ids, Q, 120, metric, None))


def integer_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small-integer rows (every distance exact in float64, ties everywhere), duplicates and
    zero rows under shuffled ids; the generator goes on to draw the queries."""
    rng = np.random.default_rng(seed)
    X = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    X[5:25] = X[3]
    X[30:34] = 0.0
    ids = rng.permutation(np.arange(10 * n, 11 * n, dtype=np.uint64))
    return X, ids, rng


# path: (queries, k, working_set, workers claimed); "split" runs with the split floors lowered.
INTEGER_PATHS = {
    "gemv": (1, 10, 16 << 20, 1),
    "rows": (7, 10, 16 << 20, 1),
    "transposed": (40, 10, 16 << 20, 1),
    "augmented": (300, 10, 16 << 20, 1),
    "tiny-tiles": (40, 25, 4096, 1),
    "split": (40, 25, 4096, 3),
    "sampled": (40, 60, 16 << 20, 2),
}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("path", list(INTEGER_PATHS))
def test_small_integer_data_matches_the_reference_bit_for_bit(
    metric: str, path: str, sample_calls: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sums of small integers are exact in any order: ids and score bits equal the reference's,
    every exact tie broken by the smaller id."""
    m, k, working_set, workers = INTEGER_PATHS[path]
    profile = SPLIT if path == "split" else CPU_PROFILE
    X, ids, rng = integer_data(3000, 8, seed=len(path))
    Q = rng.integers(-3, 4, size=(m, 8)).astype(np.float32)
    Q[0] = X[3]
    if m > 1:
        Q[1] = 0.0
    runner, tasks = InlineWorkers(workers), []
    monkeypatch.setattr(runner, "map", lambda fn, n: tasks.append(fn.__name__) or Parallel.map(runner, fn, n))
    got = run_split(X, ids, Q, k, metric, runner, working_set=working_set, profile=profile)
    same(got, reference(X, ids, Q, k, metric, None), exact=True)
    assert any(sample_calls) == (path == "sampled")
    assert ("scan" in tasks) == (path == "split")


@pytest.mark.parametrize("mutant", ["float32-scores", "squared-l2"])
def test_the_reference_catches_a_kernel_whose_exact_scores_are_wrong(
    mutant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference shares no code with the kernel: a kernel whose exact re-scoring is wrong
    (here in ways that keep every order) fails, whatever its own scoring function says."""
    original = _exact.exact_scores

    def wrong(xp, metric, A, q):
        s = original(xp, metric, A, q)
        return s.astype(np.float32).astype(np.float64) if mutant == "float32-scores" else s * s

    monkeypatch.setattr(_exact, "exact_scores", wrong)
    X, ids = tricky_data(2000, 12, seed=1)
    Q = queries(X, 7, seed=1)
    with pytest.raises(AssertionError, match="scores"):
        same(run(X, ids, Q, 10, "l2"), reference(X, ids, Q, 10, "l2", None))


@pytest.mark.parametrize("mode", ["merge", "buffer-0", "buffer-7", "buffer-50"])
def test_the_selection_keeps_the_c_best_of_everything_added(mode: str) -> None:
    """_Selection against a sort: batches of admitted scores (grouped by query, some queries
    absent, some batches larger than the buffer), merged at once (`merge`, the eager schedule)
    or through the buffer (`add`, folded when full; with no spare, folded after every batch)."""
    spare = 0 if mode == "merge" else int(mode.split("-")[1])
    rng = np.random.default_rng(spare + len(mode))
    mb, c, n = 6, 9, 400
    cand = _tiles._Candidates(np.zeros((n, 1), np.float32), None, np.zeros(n), np.zeros(n, np.float32), None)
    sel = _selection._Selection(np, cand, mb, c, np.float32, spare)
    everything: list[list[tuple[float, int]]] = [[] for _ in range(mb)]
    most = 0
    for batch in range(12):
        size = int(rng.integers(0, 40 if batch != 5 else 200))
        qi = np.sort(rng.integers(0, mb, size))
        pos = rng.integers(0, n, size)
        vals = rng.standard_normal(size).astype(np.float32)
        most = max(most, int(np.bincount(qi, minlength=mb).max()))
        if mode == "merge":
            sel.merge(qi, pos, vals)
        else:
            sel.add(qi, pos, vals)
            if spare == 0:
                sel.fold()
        for q, p, v in zip(qi.tolist(), pos.tolist(), vals.tolist()):
            everything[q].append((v, p))
    best_s, best_r = sel.best()
    # Merged slots are reused: the buffer only grows to hold one query's largest batch.
    assert sel.width <= c + max(spare, most)
    for q in range(mb):
        want = sorted(everything[q])[:c]
        got = sorted(zip(best_s[q].tolist(), best_r[q].tolist()))
        want_s = [v for v, _ in want] + [np.inf] * (c - len(want))
        assert [v for v, _ in got] == want_s
        assert {r for v, r in got if v != np.inf} <= {p for _, p in everything[q]}
        assert all(r == -1 for v, r in got if v == np.inf)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("einsum", [True, False], ids=["einsum", "sgemv"])
def test_both_single_query_products_of_the_cpu_backend_match_the_reference(
    metric: str, einsum: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU backend's matvec streams rows with sgemv below _EINSUM_MIN_BYTES and, above it,
    the way measured faster (einsum here); one query's scan (and a re-scan) goes through it."""
    monkeypatch.setattr(_backend, "_EINSUM_MIN_BYTES", 0 if einsum else 1 << 62)
    monkeypatch.setattr(_backend, "_large_matvec", "einsum")
    calls: list[str] = []
    original = np.einsum
    monkeypatch.setattr(np, "einsum", lambda spec, *a, **kw: calls.append(spec) or original(spec, *a, **kw))
    X, ids = tricky_data(3000, 24, seed=6)
    for q in queries(X, 4, seed=2):
        out = flat_topk(np, X, row_norms_sq(np, X), ids, q[None], 17, metric, matvec=cpu_backend().matvec)
        same((ids[out.rows].tolist(), out.scores.tolist()), reference(X, ids, q[None], 17, metric, None))
    assert ("ij,j->i" in calls) == einsum


def test_huge_k_rescoring_stays_within_the_working_set() -> None:
    """k = 30,000 at d = 96: re-scoring every kept candidate at once would take 23 MB of
    float64 vectors per query; it runs in pieces, so the search's extra memory stays small."""
    import tracemalloc

    rng = np.random.default_rng(12)
    X = rng.standard_normal((40_000, 96)).astype(np.float32)
    ids = np.arange(40_000, dtype=np.uint64)
    Q = rng.standard_normal((2, 96)).astype(np.float32)
    norms = row_norms_sq(np, X)
    tracemalloc.start()
    try:
        out = flat_topk(np, X, norms, ids, Q, 30_000, "l2", working_set=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    results = 2 * 30_000 * 16
    assert peak < results + (12 << 20), peak
    same((ids[out.rows], out.scores), reference(X, ids, Q, 30_000, "l2", None))


@pytest.mark.parametrize("rows_axis", [0, 1])
@pytest.mark.parametrize("g", [1, 3, 8])
def test_kth_run_min_is_the_kth_smallest_run_minimum(rows_axis: int, g: int) -> None:
    """Against a loop: runs are every (rows // g)-th row, a run with a NaN is not counted, and
    fewer than kth counted runs give +inf. The result bounds the kth best score from above."""
    rng = np.random.default_rng(g)
    S = rng.standard_normal((101, 5)).astype(np.float32)
    S[3, 0] = np.nan  # one run of query 0 holds a NaN
    S[:, 4] = np.nan  # query 4: every run holds one
    S[: 101 // g * g : 101 // g, 1] = -5.0  # query 1: the g rows of run 0, all equal
    got = _selection._kth_run_min(np, S if rows_axis == 0 else np.ascontiguousarray(S.T), 4, g, rows_axis)
    nr = 101 // g
    for q in range(5):
        minima = [S[j : nr * g : nr, q].min() for j in range(nr)]
        counted = sorted(v for v in minima if not np.isnan(v))
        want = counted[3] if len(counted) >= 4 else np.inf
        assert got[q] == want, (q, got[q], want)
        finite = np.sort(S[~np.isnan(S[:, q]), q])
        assert len(finite) < 4 or got[q] >= finite[3]


# -- dead rows (deleted rows still stored, excluded inside the scan) ------------------------------
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("path", list(INTEGER_PATHS))
@pytest.mark.parametrize("dead_share", [0.05, 0.6])
def test_dead_rows_are_never_returned_on_any_path(metric: str, path: str, dead_share: float) -> None:
    """``dead=`` gives exactly the reference over the live rows, ids and score bits, on every
    path (the first rows, the near-duplicates of the queries and some zero rows among the dead,
    so a dead row would often win or fill a NaN slot), with ``count = min(k, live)``."""
    m, k, working_set, workers = INTEGER_PATHS[path]
    X, ids, rng = integer_data(3000, 8, seed=7 + len(path))
    Q = rng.integers(-3, 4, size=(m, 8)).astype(np.float32)
    Q[0] = X[3]
    if m > 1:
        Q[1] = 0.0
    dead = np.union1d(
        np.flatnonzero(rng.random(3000) < dead_share), np.array([3, 5, 6, 30, 31, 0, 2999], dtype=np.int64)
    ).astype(np.int64)
    live = np.setdiff1d(np.arange(3000), dead)
    out = flat_topk(
        np,
        X,
        row_norms_sq(np, X),
        ids,
        Q,
        k,
        metric,
        dead=dead,
        working_set=working_set,
        parallel=InlineWorkers(workers),
        profile=SPLIT if path == "split" else CPU_PROFILE,
    )
    assert out.count == min(k, live.shape[0])
    assert not np.isin(out.rows, dead).any()
    same((ids[out.rows].tolist(), out.scores.tolist()), reference(X, ids, Q, k, metric, live), exact=True)


@pytest.mark.parametrize("metric", METRICS)
def test_dead_rows_with_a_prefilter_and_with_fewer_live_rows_than_k(metric: str) -> None:
    X, ids, rng = integer_data(400, 6, seed=3)
    Q = rng.integers(-3, 4, size=(5, 6)).astype(np.float32)
    Q[1] = 0.0
    dead = np.arange(0, 400, 2, dtype=np.int64)
    rows = np.arange(0, 400, 3, dtype=np.int64)  # a pre-filter that overlaps the dead rows
    out = flat_topk(np, X, row_norms_sq(np, X), ids, Q, 500, metric, rows, dead=dead)
    want_rows = np.setdiff1d(rows, dead)
    assert out.count == want_rows.shape[0]
    same(
        (ids[out.rows].tolist(), out.scores.tolist()),
        reference(X, ids, Q, 500, metric, want_rows),
        exact=True,
    )
    # Every row dead: nothing to return.
    none = flat_topk(np, X, row_norms_sq(np, X), ids, Q, 3, metric, dead=np.arange(400, dtype=np.int64))
    assert none.count == 0 and none.rows.shape == (5, 0)


def test_a_rescan_with_dead_rows_and_a_huge_rounding_bound_stays_exact() -> None:
    """An extreme live row makes the coarse bound useless, so every query is re-scanned; the
    re-scan must skip dead rows and keep its memory to the working set."""
    X, ids, rng = integer_data(5000, 8, seed=11)
    X[100] = 1e19
    Q = rng.integers(-3, 4, size=(3, 8)).astype(np.float32)
    dead = np.arange(0, 5000, 7, dtype=np.int64)
    live = np.setdiff1d(np.arange(5000), dead)
    out = flat_topk(np, X, row_norms_sq(np, X), ids, Q, 12, "l2", dead=dead, working_set=64 << 10)
    assert not np.isin(out.rows, dead).any()
    same((ids[out.rows].tolist(), out.scores.tolist()), reference(X, ids, Q, 12, "l2", live))


def _fold(terms: list[float]) -> float:
    """The canonical order, written out in plain Python: the upper half added onto the lower."""
    t = list(terms)
    n = len(t)
    while n > 1:
        h = n // 2
        for i in range(h):
            t[i] += t[n - h + i]
        n -= h
    return t[0] + 0.0


@pytest.mark.parametrize("d", [1, 2, 3, 7, 128, 769])
@pytest.mark.parametrize("metric", METRICS)
def test_exact_scores_are_the_canonical_sum_bit_for_bit(d: int, metric: str) -> None:
    """The score users see is defined by one summation order (so every device gives the same
    bits): each float64 term rounded once, then folded upper half onto lower half."""
    import math

    rng = np.random.default_rng(d)
    A = (rng.standard_normal((6, d)) * rng.choice([1e-3, 1.0, 1e3], (6, d))).astype(np.float32)
    A[5] = 0.0
    q = rng.standard_normal(d).astype(np.float32)
    got = _flat.exact_scores(np, metric, A, q.astype(np.float64)[None, :])
    for row, score in zip(A, got.tolist()):
        a, b = [float(x) for x in row], [float(x) for x in q]
        if metric == "l2":
            want = math.sqrt(_fold([(x - y) * (x - y) for x, y in zip(a, b)]))
        elif metric == "dot":
            want = -_fold([x * y for x, y in zip(a, b)])
        else:
            denom = _fold([x * x for x in a]) * _fold([y * y for y in b])
            want = math.nan if denom == 0 else 1.0 - _fold([x * y for x, y in zip(a, b)]) / math.sqrt(denom)
        assert (math.isnan(want) and math.isnan(score)) or np.float64(score).tobytes() == np.float64(
            want
        ).tobytes()


@pytest.mark.parametrize("faster", ["einsum", "sgemv"])
def test_large_single_query_products_take_the_way_measured_faster(
    faster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first large block a process streams is streamed both ways, twice each, and the
    faster way is kept: later large blocks use only it; small blocks always use sgemv."""
    monkeypatch.setattr(_backend, "_large_matvec", None)
    monkeypatch.setattr(_backend, "_EINSUM_MIN_BYTES", 4096)
    now = [0.0]
    used: list[str] = []
    for name in ("einsum", "sgemv"):
        real = getattr(_backend, f"_{name}")

        def timed(A: Any, v: Any, out: Any, name: str = name, real: Any = real) -> None:
            used.append(name)
            now[0] += 1.0 if name == faster else 3.0  # the fake clock's cost of each way
            real(A, v, out)

        monkeypatch.setattr(_backend, f"_{name}", timed)
    monkeypatch.setattr(_backend, "_clock", lambda: now[0])
    rng = np.random.default_rng(3)
    A = rng.standard_normal((64, 32)).astype(np.float32)  # 8 KiB: large here
    v = rng.standard_normal(32).astype(np.float32)
    out = np.empty(64, dtype=np.float32)
    _backend.cpu_matvec(A, v, out)
    np.testing.assert_allclose(out, A @ v, rtol=1e-5)
    assert sorted(used) == ["einsum", "einsum", "sgemv", "sgemv"] and _backend._large_matvec == faster
    used.clear()
    _backend.cpu_matvec(A, v, out)
    _backend.cpu_matvec(A[:8], v, out[:8])  # 1 KiB: small, sgemv whatever was measured
    assert used == [faster, "sgemv"]
    np.testing.assert_allclose(out[:8], A[:8] @ v, rtol=1e-5)
