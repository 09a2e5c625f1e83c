"""ShardedIqdb without Ray: routing, merge, manifest and the whole API over the in-process
transport, checked against one ``Iqdb`` holding the same records (the oracle).

The Ray transport runs the same server code in actors; ``test_distributed_ray.py`` covers what
only Ray does (actors, restarts, Ray Data).
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iqdb
from iqdb.distributed import HASH_NAME, HASH_VERSION, ShardedIqdb, ShardUnavailable, shard_of
from iqdb.distributed._merge import NO_ID, merge_topk
from iqdb.distributed._routing import splitmix64

METRICS = ["l2", "cosine", "dot"]


# -- helpers ----------------------------------------------------------------------------------
def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


def assert_same_arrays(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    """Ids, order and scores identical to the bit (NaNs included)."""
    assert got[0].dtype == np.uint64 and got[1].dtype == np.float64
    assert got[0].shape == want[0].shape, (got[0].shape, want[0].shape)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(_bits(got[1]), _bits(want[1]))


def assert_same_lists(got: list[list[iqdb.SearchResult]], want: list[list[iqdb.SearchResult]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [int(r.id) for r in g] == [int(r.id) for r in w]
        assert (
            _bits(np.array([r.score for r in g])).tolist() == _bits(np.array([r.score for r in w])).tolist()
        )
        assert [r.payload for r in g] == [r.payload for r in w]


def tied_data(rng: np.random.Generator, n: int, d: int, zeros: int = 0) -> np.ndarray:
    """Small integers: many exactly equal scores (duplicate rows, equal distances); ``zeros`` zero
    rows give NaN cosine scores."""
    X = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    X[rng.choice(n, size=min(n, n // 3), replace=False)] = X[0]  # a third are copies of one row
    if zeros:
        X[rng.choice(n, size=zeros, replace=False)] = 0
    return X


@pytest.fixture
def pair() -> Any:
    """A sharded database (3 shards, in process) and the oracle, written alike by the test."""
    sharded = ShardedIqdb.open_in_memory(shards=3, transport="local")
    single = iqdb.open_in_memory(device="cpu")
    yield sharded, single
    sharded.close()
    single.close()


# -- routing ----------------------------------------------------------------------------------
# Golden values: part of the on-disk format. If one changes, existing databases route ids to the
# wrong shard: never update these to make the test pass; add a new HASH_VERSION instead.
GOLDEN_IDS = [0, 1, 2, 3, 42, 1000, 2**32, 2**63, 2**64 - 1, 123456789012345678]
GOLDEN = {
    2: [1, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    3: [2, 0, 0, 1, 0, 0, 0, 0, 2, 0],
    4: [3, 3, 0, 1, 0, 0, 0, 0, 3, 0],
    8: [7, 3, 0, 4, 0, 0, 0, 0, 3, 4],
    16: [8, 15, 0, 14, 0, 12, 0, 8, 3, 4],
    1000: [258, 527, 19, 473, 151, 639, 921, 994, 650, 950],
}


def test_routing_matches_the_golden_values() -> None:
    assert (HASH_NAME, HASH_VERSION) == ("splitmix64-jump", 1)
    ids = np.array(GOLDEN_IDS, dtype=np.uint64)
    got = {s: shard_of(ids, s).tolist() for s in GOLDEN}
    assert got == GOLDEN
    assert [hex(int(x)) for x in splitmix64(np.arange(3, dtype=np.uint64))] == [
        "0xe220a8397b1dcdaf",
        "0x910a2dec89025cc1",
        "0x975835de1c9756ce",
    ]


def _reference_route(key: int, buckets: int) -> int:
    """SplitMix64 and jump consistent hash as published, on Python ints."""
    m = (1 << 64) - 1
    z = (key + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    b, j = -1, 0
    while j < buckets:
        b = j
        z = (z * 2862933555777941757 + 1) & m
        j = int((b + 1) * (float(1 << 31) / float((z >> 33) + 1)))
    return b


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50), st.integers(1, 300))
@settings(max_examples=60, deadline=None)
def test_routing_equals_the_published_algorithm(ids: list[int], shards: int) -> None:
    got = shard_of(np.array(ids, dtype=np.uint64), shards).tolist()
    assert got == [_reference_route(i, shards) for i in ids]


def test_structured_ids_spread_evenly() -> None:
    for ids in (np.arange(80_000), np.arange(80_000) * 8, np.arange(80_000) << 32):
        counts = np.bincount(shard_of(ids.astype(np.uint64), 8), minlength=8)
        assert counts.min() > 0.95 * 10_000 and counts.max() < 1.05 * 10_000, counts


def test_adding_a_shard_moves_only_its_share_of_ids_and_only_to_it() -> None:
    ids = np.arange(100_000, dtype=np.uint64) * 7919
    for s in (1, 2, 4, 7):
        before, after = shard_of(ids, s), shard_of(ids, s + 1)
        moved = before != after
        assert set(after[moved].tolist()) <= {s}  # every moved id goes to the new shard
        assert abs(moved.mean() - 1 / (s + 1)) < 0.01


# -- merge ------------------------------------------------------------------------------------
def test_merge_orders_by_score_then_id_with_nan_last_and_pads() -> None:
    a = (np.array([[5, 9, 1]], np.uint64), np.array([[0.5, np.nan, np.nan]]))
    b = (np.array([[2, 7]], np.uint64), np.array([[0.5, np.nan]]))
    ids, scores, shard, pos = merge_topk([a, b], [None, None], k=4)
    assert ids.tolist() == [[2, 5, 1, 7]]
    assert shard.tolist() == [[1, 0, 0, 1]] and pos.tolist() == [[0, 0, 2, 1]]
    assert np.isnan(scores[0, 2:]).all() and scores[0, :2].tolist() == [0.5, 0.5]
    # One query with fewer results than the other: padded like search_arrays.
    c = (np.array([[3, NO_ID], [4, 6]], np.uint64), np.array([[0.1, np.nan], [0.2, 0.3]]))
    valid = [np.array([[True, False], [True, True]])]
    ids, scores, shard, _ = merge_topk([c], valid, k=5)
    assert ids.tolist() == [[3, int(NO_ID)], [4, 6]] and np.isnan(scores[0, 1])
    assert shard.tolist() == [[0, -1], [0, 0]]
    # No shard has anything.
    ids, scores, _, _ = merge_topk([(np.empty((2, 0), np.uint64), np.empty((2, 0)))], [None], k=3)
    assert ids.shape == (2, 0) and scores.shape == (2, 0)


@given(
    seed=st.integers(0, 2**32 - 1),
    shards=st.integers(1, 6),
    m=st.integers(1, 4),
    k=st.integers(1, 12),
    padded=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_merge_equals_sorting_the_union(seed: int, shards: int, m: int, k: int, padded: bool) -> None:
    """Against a plain sort of (is padding, is NaN, score, id) tuples: ties at the k-th place,
    NaNs, padding, shards of different widths (0 included)."""
    rng = np.random.default_rng(seed)
    parts, valid, union = [], [], [[] for _ in range(m)]
    next_id = iter(rng.permutation(10_000).tolist())
    for _ in range(shards):
        w = int(rng.integers(0, k + 1))
        scores = rng.integers(0, 4, size=(m, w)).astype(np.float64)
        scores[rng.random((m, w)) < 0.2] = np.nan
        ids = np.array([[next(next_id) for _ in range(w)] for _ in range(m)], dtype=np.uint64).reshape(m, w)
        ok = np.ones((m, w), bool)
        if padded and w:
            for q in range(m):
                ok[q, int(rng.integers(0, w + 1)) :] = False
            ids[~ok], scores[~ok] = NO_ID, np.nan
        for q in range(m):  # each shard's rows in its own (score, id) order, NaN last
            row = sorted(zip(~ok[q], np.isnan(scores[q]), np.nan_to_num(scores[q]), ids[q].tolist()))
            scores[q] = [np.nan if nan or pad else sc for pad, nan, sc, _ in row]
            ids[q] = [i for *_, i in row]
            ok[q] = [not pad for pad, *_ in row]
            union[q] += [r for r in row if not r[0]]
        parts.append((ids, scores))
        valid.append(ok if padded else None)
    got_ids, got_scores, shard, pos = merge_topk(parts, valid, k)
    c = min(k, max(len(u) for u in union))
    assert got_ids.shape == (m, c)
    for q in range(m):
        want = sorted(union[q])[:c]
        n = len(want)
        assert got_ids[q, :n].tolist() == [i for *_, i in want]
        assert (got_ids[q, n:] == NO_ID).all() and np.isnan(got_scores[q, n:]).all()
        assert (shard[q, n:] == -1).all()
        for j in range(n):  # each entry points back at where it came from
            assert parts[shard[q, j]][0][q, pos[q, j]] == got_ids[q, j]


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 40),
    shards=st.integers(1, 5),
    k=st.integers(1, 50),
    metric=st.sampled_from(METRICS),
    zeros=st.integers(0, 3),
)
@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sharded_search_equals_one_database(
    seed: int, n: int, shards: int, k: int, metric: str, zeros: int
) -> None:
    """Ties (duplicate rows, small integers), NaN scores (cosine with zero rows and a zero
    query), k beyond some shards' sizes and beyond the total, empty shards."""
    rng = np.random.default_rng(seed)
    d = 3
    X = tied_data(rng, n, d, zeros=min(zeros, n)) if n else np.empty((0, d), np.float32)
    ids = rng.choice(10_000, size=n, replace=False).astype(np.uint64)
    payloads = [{"i": int(i)} if i % 2 else None for i in ids]
    Q = rng.integers(-2, 3, size=(4, d)).astype(np.float32)
    Q[0] = 0  # a zero query: every cosine score is NaN
    Q[1] = X[0] if n else Q[1]
    with (
        ShardedIqdb.open_in_memory(shards=shards, transport="local") as sharded,
        iqdb.open_in_memory() as single,
    ):
        if n:
            sharded.upsert_many(ids, X, payloads)
            single.upsert_many(ids, X, payloads)
        assert len(sharded) == len(single)
        assert_same_arrays(sharded.search_arrays(Q, k, metric), single.search_arrays(Q, k, metric))
        assert_same_lists(sharded.search_batch(Q, k, metric), single.search_batch(Q, k, metric))
        assert_same_lists([sharded.search(Q[2], k, metric)], [single.search(Q[2], k, metric)])


def test_large_k_many_ties_every_metric(pair: Any) -> None:
    sharded, single = pair
    rng = np.random.default_rng(7)
    X = tied_data(rng, 600, 8, zeros=5)
    ids = rng.permutation(600).astype(np.uint64) * 3
    for db in pair:
        db.upsert_many(ids, X)
        db.delete(int(ids[3]))  # a deleted row on one shard
    Q = np.vstack([np.zeros((1, 8), np.float32), X[:5], rng.normal(size=(3, 8)).astype(np.float32)])
    for metric in METRICS:
        for k in (1, 10, 250, 599, 2000):
            assert_same_arrays(sharded.search_arrays(Q, k, metric), single.search_arrays(Q, k, metric))


def test_predicate_search_equals_one_database(pair: Any) -> None:
    sharded, single = pair
    rng = np.random.default_rng(3)
    X = tied_data(rng, 120, 4)
    for db in pair:
        db.upsert_many(np.arange(120), X, [{"even": i % 2 == 0} for i in range(120)])

    def even(r: iqdb.Record) -> bool:
        return bool(r.payload and r.payload["even"])

    assert_same_lists([sharded.search_with(X[1], 30, "l2", even)], [single.search_with(X[1], 30, "l2", even)])
    assert_same_arrays(
        sharded.search_arrays(X[:3], 70, "dot", even), single.search_arrays(X[:3], 70, "dot", even)
    )


@pytest.mark.skipif(not hasattr(iqdb.Iqdb, "count"), reason="Iqdb has no declarative filters yet")
def test_filters_count_and_delete_where_equal_one_database(pair: Any) -> None:
    sharded, single = pair
    rng = np.random.default_rng(11)
    X = tied_data(rng, 300, 5, zeros=3)
    payloads = [{"kind": ["a", "b", "c"][i % 3], "n": i} for i in range(300)]
    for db in pair:
        db.upsert_many(np.arange(300) * 5, X, payloads)
    f = iqdb.Field("kind") == "b"
    Q = X[:4]
    for metric in METRICS:
        assert_same_arrays(
            sharded.search_arrays(Q, 150, metric, filter=f), single.search_arrays(Q, 150, metric, filter=f)
        )
    # One filter per query: short rows are padded (NO_ID, NaN) exactly as one database pads them.
    per_query = [f, {"n": {"$lt": 7}}, None, iqdb.Field("n").isin([5, 10, 15])]
    assert_same_arrays(
        sharded.search_arrays(Q, 50, "l2", filter=per_query),
        single.search_arrays(Q, 50, "l2", filter=per_query),
    )
    assert_same_lists(
        sharded.search_batch(Q, 50, "cosine", filter=per_query),
        single.search_batch(Q, 50, "cosine", filter=per_query),
    )
    assert_same_lists([sharded.search(Q[0], 9, filter=f)], [single.search(Q[0], 9, filter=f)])
    assert sharded.count() == single.count() == 300
    assert sharded.count(f) == single.count(f) == 100
    assert sharded.delete_where({"kind": "a"}) == single.delete_where({"kind": "a"}) == 100
    assert len(sharded) == 200
    assert_same_arrays(sharded.search_arrays(Q, 300, "l2"), single.search_arrays(Q, 300, "l2"))


@pytest.mark.skipif(not hasattr(iqdb.Iqdb, "upsert_arrow"), reason="Iqdb has no upsert_arrow yet")
def test_upsert_arrow_is_split_by_shard(pair: Any) -> None:
    pa = pytest.importorskip("pyarrow")
    sharded, single = pair
    rng = np.random.default_rng(5)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    table = pa.table(
        {
            "id": pa.array(np.arange(50, dtype=np.uint64) * 11),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 4),
            "tag": [f"t{i}" for i in range(50)],
        }
    )
    seen: list[tuple[int, int | None]] = []
    assert sharded.upsert_arrow(table, progress=lambda done, total: seen.append((done, total))) == 50
    assert single.upsert_arrow(table) == 50
    assert seen[-1] == (50, 50)
    with pytest.raises(iqdb.InvalidArgument, match="no id column"):
        sharded.upsert_arrow(table.drop_columns(["id"]))
    with pytest.raises(iqdb.InvalidArgument):
        sharded.upsert_arrow([1, 2, 3])
    assert sharded.dim == 4 and len(sharded) == 50
    assert sharded.get(11) == single.get(11)
    assert_same_lists(sharded.search_batch(X[:3], 20, "l2"), single.search_batch(X[:3], 20, "l2"))


# -- the Iqdb API -----------------------------------------------------------------------------
def test_writes_reads_and_deletes_route_to_one_shard(pair: Any) -> None:
    sharded, _ = pair
    assert sharded.dim is None and sharded.is_empty()
    assert sharded.search([1.0, 2.0], 3) == []
    sharded.upsert(iqdb.Record(5, [1.0, 2.0], {"a": 1}))
    sharded.upsert_many([6, 7, 6], [[0, 1], [1, 1], [2, 2]], [None, {"b": [1, 2]}, {"last": True}])
    assert sharded.dim == 2 and len(sharded) == 3
    assert sharded.get(6) == iqdb.Record(6, [2.0, 2.0], {"last": True})  # the last row of a repeated id won
    assert sharded.get(np.uint64(7)).payload == {"b": [1, 2]}
    assert 5 in sharded and 8 not in sharded and sharded.get(8) is None
    assert sharded.delete(5) is True and sharded.delete(5) is False
    assert len(sharded) == 2
    # Exactly one shard holds each record: the one the hash names.
    owners = [s for s, shard in enumerate(sharded._shards) if 7 in shard.server.db]
    assert owners == [sharded.shard_of(7)]


def test_bad_input_writes_nothing_on_any_shard(pair: Any) -> None:
    sharded, _ = pair
    sharded.upsert_many([1], [[1.0, 1.0]])
    ids = list(range(10, 30))
    rows = np.ones((20, 2), np.float32)
    rows[17, 1] = np.nan
    with pytest.raises(iqdb.InvalidVector):
        sharded.upsert_many(ids, rows)
    with pytest.raises(iqdb.InvalidArgument, match="row 12"):
        sharded.upsert_many(ids, np.ones((20, 2)), [None] * 12 + [{"x": object()}] + [None] * 7)
    with pytest.raises(iqdb.InvalidArgument):
        sharded.upsert_many(ids, np.ones((19, 2)))
    with pytest.raises(iqdb.InvalidArgument):
        sharded.upsert_many([1, -2], np.ones((2, 2)))
    with pytest.raises(iqdb.DimensionMismatch) as info:
        sharded.upsert_many(ids, np.ones((20, 3)))
    assert (info.value.left, info.value.right) == (3, 2)
    with pytest.raises(iqdb.InvalidArgument):
        sharded.upsert("not a record")  # type: ignore[arg-type]
    assert len(sharded) == 1


def test_search_arguments_are_checked_like_one_database(pair: Any) -> None:
    sharded, _ = pair
    sharded.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]])
    assert sharded.search([1.0, 0.0, 0.0], 0) == []  # k == 0 answers before anything else
    with pytest.raises(iqdb.DimensionMismatch) as info:
        sharded.search([1.0, 0.0, 0.0], 1)
    assert (info.value.left, info.value.right) == (3, 2)
    with pytest.raises(iqdb.InvalidArgument):
        sharded.search([1.0, 0.0], -1)
    with pytest.raises(iqdb.InvalidArgument):
        sharded.search([1.0, 0.0], True)
    with pytest.raises(iqdb.InvalidArgument):
        sharded.search([1.0, 0.0], 1, "hamming")
    with pytest.raises(iqdb.InvalidVector):
        sharded.search([np.inf, 0.0], 1)
    with pytest.raises(iqdb.InvalidArgument):
        sharded.search_with([1.0, 0.0], 1, "l2", "not callable")  # type: ignore[arg-type]
    with pytest.raises(iqdb.InvalidConfig):
        sharded.search([1.0, 0.0], 1, timeout=-1)
    assert sharded.search_batch([], 3) == []
    ids, scores = sharded.search_arrays(np.empty((0, 2)), 3)
    assert ids.shape == (0, 0) and scores.shape == (0, 0)
    ids, scores = sharded.search_arrays([[1.0, 0.0]], 0)
    assert ids.shape == (1, 0)


def test_threads_may_write_and_search_at_once(pair: Any) -> None:
    sharded, single = pair
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 4)).astype(np.float32)
    sharded.upsert(iqdb.Record(10**6, [0.0, 0.0, 0.0, 1.0]))
    errors: list[BaseException] = []

    def write(part: int) -> None:
        try:
            for b in range(part, 400, 40):  # two writers, disjoint batches of 20
                sharded.upsert_many(np.arange(b, b + 20), X[b : b + 20])
        except BaseException as exc:
            errors.append(exc)

    def search() -> None:
        try:
            for _ in range(30):
                ids, _ = sharded.search_arrays(X[:2], 5, "l2")
                assert ids.shape[1] == min(5, ids.shape[1]) and (ids != NO_ID).all()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(0,)), threading.Thread(target=write, args=(20,))]
    threads.append(threading.Thread(target=search))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    single.upsert(iqdb.Record(10**6, [0.0, 0.0, 0.0, 1.0]))
    single.upsert_many(np.arange(400), X)
    assert len(sharded) == 401
    assert_same_arrays(sharded.search_arrays(X[:8], 50, "cosine"), single.search_arrays(X[:8], 50, "cosine"))


def test_closed_handle_refuses_every_call() -> None:
    with ShardedIqdb.open_in_memory(shards=2, transport="local") as db:
        db.upsert(iqdb.Record(1, [1.0]))
    db.close()  # again: nothing
    for call in (
        lambda: len(db),
        lambda: db.get(1),
        lambda: db.search([1.0], 1),
        lambda: db.upsert_many([2], [[1.0]]),
    ):
        with pytest.raises(iqdb.Closed):
            call()
    assert "closed" in repr(db)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shards": 0},
        {"shards": True},
        {"shards": 2.0},
        {"shards": 2, "transport": "grpc"},
        {"shards": 2, "device": "tpu"},
        {"shards": 2, "timeout": 0},
        {"shards": 2, "read_concurrency": 0},
        {"shards": 2, "actor_options": ["num_cpus"]},
    ],
)
def test_bad_configuration_is_invalid_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(iqdb.InvalidConfig):
        ShardedIqdb.open_in_memory(**{"transport": "local", **kwargs})


def test_a_slow_shard_times_out_with_a_typed_error_never_a_partial_answer(pair: Any) -> None:
    sharded, _ = pair
    sharded.upsert_many(np.arange(30), np.ones((30, 2)))
    slow = sharded._shards[1].server
    original = slow.search_arrays
    release = threading.Event()

    def stuck(*args: Any) -> Any:
        release.wait(5)
        return original(*args)

    slow.search_arrays = stuck
    try:
        start = time.monotonic()
        with pytest.raises(ShardUnavailable) as info:
            sharded.search_arrays([[1.0, 1.0]], 5, timeout=0.3)
        assert time.monotonic() - start < 2
        assert info.value.shards == (1,) and isinstance(info.value, iqdb.IqdbError)
    finally:
        release.set()
    slow.search_arrays = original
    assert sharded.search_arrays([[1.0, 1.0]], 40)[0].shape == (1, 30)


def test_a_failed_shard_keeps_the_others_parts_and_a_retry_completes(pair: Any) -> None:
    """Atomicity is per shard: the documented partial outcome, and the documented remedy."""
    sharded, _ = pair
    sharded.upsert(iqdb.Record(10**6, [0.0, 0.0]))
    ids = np.arange(60, dtype=np.uint64)
    broken = sharded._shards[2].server
    original = broken.upsert_many

    def fail(*args: Any) -> None:
        raise iqdb.StorageError("disk full (injected)", 28, "wal")

    broken.upsert_many = fail
    with pytest.raises(iqdb.StorageError):
        sharded.upsert_many(ids, np.ones((60, 2)))
    owner = shard_of(ids, 3)
    present = np.array([int(i) in sharded for i in ids])
    assert present.tolist() == (owner != 2).tolist()  # the others' parts, none of shard 2's
    broken.upsert_many = original
    sharded.upsert_many(ids, np.ones((60, 2)))  # the same call again: now complete
    assert len(sharded) == 61


# -- durable layout ---------------------------------------------------------------------------
def test_durable_layout_manifest_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "db"
    rng = np.random.default_rng(1)
    X = tied_data(rng, 200, 6, zeros=2)
    ids = np.arange(200, dtype=np.uint64) * 13
    with ShardedIqdb.open(root, shards=3, transport="local") as db:
        assert db.dim is None
        db.upsert_many(ids, X, [{"n": int(i)} for i in ids])
        db.delete(13)
        before = db.search_arrays(X[:5], 50, "cosine")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == "iqdb-sharded" and manifest["format_version"] == 1
    assert manifest["shards"] == 3 and manifest["dim"] == 6
    assert manifest["hash"] == {"name": "splitmix64-jump", "version": 1}
    assert sorted(p.name for p in root.iterdir()) == [
        "manifest.json",
        "shard-00000",
        "shard-00001",
        "shard-00002",
    ]
    # Each shard is an ordinary iqdb database holding exactly the ids routed to it.
    owner = shard_of(ids, 3)
    for s in range(3):
        with iqdb.open(root / f"shard-{s:05d}", readonly=True) as part:
            held = sorted(int(r.id) for r in part.search(X[0], 1000, "l2"))
            assert held == sorted(int(i) for i in ids[owner == s] if i != 13)
    with ShardedIqdb.open(root, transport="local") as db:  # the shard count comes from the manifest
        assert db.shards == 3 and db.dim == 6 and len(db) == 199
        assert db.get(26) == iqdb.Record(26, X[2], {"n": 26})
        assert_same_arrays(db.search_arrays(X[:5], 50, "cosine"), before)


def test_reopening_with_another_shard_count_is_invalid_config(tmp_path: Path) -> None:
    ShardedIqdb.open(tmp_path, shards=2, transport="local").close()
    with pytest.raises(iqdb.InvalidConfig, match=r"holds 2 shards .* shards=4"):
        ShardedIqdb.open(tmp_path, shards=4, transport="local")


def test_refusals_when_the_layout_is_not_a_sharded_database(tmp_path: Path) -> None:
    with pytest.raises(iqdb.InvalidConfig, match="shards=N"):
        ShardedIqdb.open(tmp_path / "new", transport="local")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_bytes(b"x")
    with pytest.raises(iqdb.InvalidConfig, match="not empty"):
        ShardedIqdb.open(tmp_path / "other", shards=2, transport="local")
    (tmp_path / "file").write_text("")
    with pytest.raises(iqdb.InvalidConfig, match="not a directory"):
        ShardedIqdb.open(tmp_path / "file", shards=2, transport="local")
    root = tmp_path / "db"
    ShardedIqdb.open(root, shards=2, transport="local").close()
    os.remove(root / "shard-00001" / "shard.json")
    with pytest.raises(iqdb.InvalidConfig, match="shard 1"):
        ShardedIqdb.open(root, transport="local")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(iqdb.Corrupt):
        ShardedIqdb.open(root, transport="local")
    newer = {"format": "iqdb-sharded", "format_version": 99}
    (root / "manifest.json").write_text(json.dumps(newer))
    with pytest.raises(iqdb.InvalidConfig, match="format version 99"):
        ShardedIqdb.open(root, transport="local")


def test_a_shard_directory_from_another_database_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ShardedIqdb.open(a, shards=2, transport="local").close()
    ShardedIqdb.open(b, shards=2, transport="local").close()
    os.replace(b / "shard-00000" / "shard.json", a / "shard-00000" / "shard.json")
    with pytest.raises(iqdb.InvalidConfig, match="belongs to database"):
        ShardedIqdb.open(a, transport="local")


def test_dimension_is_recovered_from_the_shards_when_the_manifest_missed_it(tmp_path: Path) -> None:
    with ShardedIqdb.open(tmp_path, shards=2, transport="local") as db:
        db.upsert_many([1, 2, 3], np.ones((3, 5)))
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["dim"] = None  # as if the process died between the first write and this update
    path.write_text(json.dumps(manifest))
    with ShardedIqdb.open(tmp_path, transport="local") as db:
        assert db.dim == 5
        with pytest.raises(iqdb.DimensionMismatch):
            db.upsert_many([4], np.ones((1, 4)))
    assert json.loads(path.read_text())["dim"] == 5


def test_an_open_root_is_locked(tmp_path: Path) -> None:
    with ShardedIqdb.open(tmp_path, shards=2, transport="local"), pytest.raises(iqdb.Locked):
        ShardedIqdb.open(tmp_path, transport="local", lock_wait=0)


def test_an_open_that_fails_half_way_releases_what_it_opened(tmp_path: Path) -> None:
    import gc
    import warnings

    ShardedIqdb.open(tmp_path, shards=3, transport="local").close()
    with iqdb.open(tmp_path / "shard-00002"):  # someone else holds the last shard
        with pytest.raises(iqdb.Locked):
            ShardedIqdb.open(tmp_path, transport="local", lock_wait=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
        iqdb.open(tmp_path / "shard-00000").close()  # shards 0 and 1 were closed, not leaked


def test_an_interrupted_creation_is_completed(tmp_path: Path) -> None:
    from iqdb.distributed._shard import write_marker

    write_marker(str(tmp_path / "shard-00000"), "deadbeef", 0, 2)  # markers written, no manifest
    with ShardedIqdb.open(tmp_path, shards=2, transport="local") as db:
        db.upsert(iqdb.Record(1, [1.0]))
    with ShardedIqdb.open(tmp_path, transport="local") as db:
        assert len(db) == 1


def test_unacknowledged_state_is_what_a_crash_leaves(tmp_path: Path) -> None:
    """A process that dies without close() loses no acknowledged write: each shard's WAL has it."""
    code = f"""
        import numpy as np, os
        from iqdb.distributed import ShardedIqdb
        db = ShardedIqdb.open({str(tmp_path)!r}, shards=3, transport="local")
        db.upsert_many(np.arange(500), np.arange(1000, dtype=np.float32).reshape(500, 2))
        db.delete(7)
        os._exit(0)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    with ShardedIqdb.open(tmp_path, transport="local") as db:
        assert len(db) == 499 and 7 not in db and db.dim == 2
        assert db.get(499) == iqdb.Record(499, [998.0, 999.0])


# -- read replicas ----------------------------------------------------------------------------
def _wait_fresh(db: ShardedIqdb) -> None:
    deadline = time.monotonic() + 10
    while any(db._replicas.stale(s) for s in range(db.shards)):
        assert time.monotonic() < deadline, "replicas did not reopen"
        time.sleep(0.01)


def _count_calls(server: Any, counts: dict[str, int], key: str) -> None:
    original = server.search_arrays

    def counted(*args: Any) -> Any:
        counts[key] = counts.get(key, 0) + 1
        return original(*args)

    server.search_arrays = counted


def test_replicas_share_reads_and_never_serve_a_stale_view(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 3)).astype(np.float32)
    with (
        ShardedIqdb.open(tmp_path, shards=2, replicas=2, transport="local") as db,
        iqdb.open_in_memory() as oracle,
    ):
        counts: dict[str, int] = {}
        for s in range(2):
            _count_calls(db._shards[s].server, counts, "primary")
            for copy in db._replicas.copies[s]:
                assert copy.server.db._backend.readonly
                _count_calls(copy.server, counts, "replica")
        for i in range(60):  # every search sees the write acknowledged just before it
            db.upsert(iqdb.Record(i, X[i]))
            oracle.upsert(iqdb.Record(i, X[i]))
            ids, _ = db.search_arrays(X[i : i + 1], 1, "l2")
            assert ids.tolist() == [[i]]
        _wait_fresh(db)
        for _ in range(6):
            assert_same_arrays(
                db.search_arrays(X[:5], 20, "cosine"), oracle.search_arrays(X[:5], 20, "cosine")
            )
        assert counts["replica"] >= 4 and counts["primary"] > 0  # replicas took their turns
        assert db.delete(3) and oracle.delete(3)
        for _ in range(3):
            assert_same_arrays(db.search_arrays(X[:5], 20, "l2"), oracle.search_arrays(X[:5], 20, "l2"))


def test_a_lost_replica_hands_its_reads_to_the_primary(tmp_path: Path) -> None:
    with ShardedIqdb.open(tmp_path, shards=1, replicas=1, transport="local") as db:
        db.upsert_many([1, 2, 3], np.eye(3))
        _wait_fresh(db)
        replica = db._replicas.copies[0][0].server

        def gone(*args: Any) -> Any:
            raise ShardUnavailable((0,), "replica lost (injected)")

        replica.search_arrays = gone
        for _ in range(4):
            assert db.search_arrays(np.eye(3), 1, "l2")[0].tolist() == [[1], [2], [3]]
        assert db._replicas.stale(0)  # not used again until the next write reopens it


def test_replicas_are_checked(tmp_path: Path) -> None:
    with pytest.raises(iqdb.InvalidConfig, match="replicas"):
        ShardedIqdb.open(tmp_path, shards=1, replicas=-1, transport="local")


# -- packaging --------------------------------------------------------------------------------
def test_actor_settings_ask_for_a_gpu_only_for_a_gpu_device() -> None:
    from iqdb.distributed._client import Config, actor_settings

    def settings(device: str, gpus: float, durable: bool = True, **user: Any) -> tuple[str, dict[str, Any]]:
        cfg = Config.make(device, user or None, "ray", 60, 2, 30, {})
        return actor_settings(cfg, "abc", 2, durable=durable, cluster_gpus=gpus)

    assert settings("cpu", 8) == (
        "cpu",
        {"max_restarts": -1, "max_task_retries": 0, "name": "iqdb-abc-00002", "num_cpus": 1},
    )
    assert settings("auto", 0)[1].get("num_gpus") is None
    assert settings("auto", 2) == ("auto", {**settings("cpu", 0)[1], "num_gpus": 1})
    assert settings("cuda:5", 0) == ("cuda", {**settings("cpu", 0)[1], "num_gpus": 1})  # Ray decides
    assert settings("gpu", 1)[0] == "cuda"
    assert settings("cpu", 0, durable=False)[1]["max_restarts"] == 0  # an empty restart is worse
    user = settings("cpu", 0, num_cpus=0, lifetime="detached", max_restarts=3)[1]
    assert (user["num_cpus"], user["lifetime"], user["max_restarts"]) == (0, "detached", 3)


def test_importing_and_using_the_local_transport_does_not_import_ray() -> None:
    code = """
        import sys
        import iqdb
        import iqdb.distributed
        from iqdb.distributed import ShardedIqdb
        with ShardedIqdb.open_in_memory(shards=2, transport="local") as db:
            db.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]])
            assert len(db.search([1.0, 0.0], 2)) == 2
        print("LOADED", sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout


def test_the_ray_transport_without_ray_says_how_to_install_it() -> None:
    code = """
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        import iqdb
        from iqdb.distributed import ShardedIqdb
        try:
            ShardedIqdb.open_in_memory(shards=2)
        except iqdb.InvalidConfig as exc:
            print("REFUSED", exc)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "REFUSED" in done.stdout and 'pip install "iqdb[ray]"' in done.stdout


@pytest.mark.parametrize(
    "name",
    [
        "iqdb.distributed",
        "iqdb.distributed._routing",
        "iqdb.distributed._merge",
        "iqdb.distributed._manifest",
        "iqdb.distributed._shard",
        "iqdb.distributed._sharded",
        "iqdb.distributed._client",
        "iqdb.distributed._replicas",
    ],
)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failed == 0
