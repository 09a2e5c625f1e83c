"""ShardedIqdb on a real local Ray cluster: actors, restarts, outages and the Ray Data helper.

Run by ``ci/ray.sh`` (which installs the ``ray`` extra); skipped when Ray is not installed. One
cluster serves the whole module (``ray.init`` costs seconds); shards reserve no CPU
(``num_cpus=0``) so that four of them and a Ray Data pool fit on two cores.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install 'iqdb[ray]'")

import iqdb  # noqa: E402
from iqdb.distributed import ShardedIqdb, ShardUnavailable, batch_search  # noqa: E402

# Ray Data's context reads its own deprecated options when it is first built (Ray 2.60).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

ACTOR = {"num_cpus": 0}
METRICS = ["l2", "cosine", "dot"]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Any:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace=f"iqdb-test-{uuid.uuid4().hex[:8]}",
    )
    yield
    ray.shutdown()


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


def assert_same_arrays(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].shape == want[0].shape
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(_bits(got[1]), _bits(want[1]))


def data(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and small-integer vectors: many exact ties, and zero rows (NaN cosine scores)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    X[: n // 4] = X[0]
    X[n // 4 : n // 4 + 3] = 0
    ids = rng.choice(10 * n, size=n, replace=False).astype(np.uint64)
    return ids, X


def pid_of(db: ShardedIqdb, shard: int) -> int:
    return int(db.shard_info()[shard]["pid"])


@pytest.mark.parametrize("shards", [2, 4])
def test_results_equal_one_database(tmp_path: Path, shards: int) -> None:
    ids, X = data(shards, 400, 6)
    payloads = [{"i": int(i)} for i in ids]
    Q = np.vstack([np.zeros((1, 6), np.float32), X[:3], X[-3:] + 0.5])
    with (
        ShardedIqdb.open(tmp_path, shards=shards, actor_options=ACTOR) as db,
        iqdb.open_in_memory() as oracle,
    ):
        db.upsert_many(ids, X, payloads)
        oracle.upsert_many(ids, X, payloads)
        assert len(db) == 400 and db.dim == 6
        for metric in METRICS:
            for k in (1, 37, 399, 1000):
                assert_same_arrays(db.search_arrays(Q, k, metric), oracle.search_arrays(Q, k, metric))
        got, want = db.search_batch(Q, 20, "cosine"), oracle.search_batch(Q, 20, "cosine")
        assert [[(int(r.id), r.payload) for r in g] for g in got] == [
            [(int(r.id), r.payload) for r in w] for w in want
        ]
        # A predicate travels to the actors by cloudpickle.
        odd = lambda r: int(r.id) % 2 == 1  # noqa: E731
        assert db.search_with(X[1], 15, "l2", odd) == oracle.search_with(X[1], 15, "l2", odd)
        if hasattr(iqdb.Iqdb, "count"):
            f = iqdb.Field("i") < 2000
            assert db.count(f) == oracle.count(f)
            assert_same_arrays(
                db.search_arrays(Q, 50, "l2", filter=f), oracle.search_arrays(Q, 50, "l2", filter=f)
            )


def test_writes_deletes_and_reopen(tmp_path: Path) -> None:
    ids, X = data(1, 200, 4)
    with ShardedIqdb.open(tmp_path, shards=3, actor_options=ACTOR) as db:
        db.upsert_many(ids, X)
        db.upsert(iqdb.Record(10**9, [1.0, 2.0, 3.0, 4.0], {"late": True}))
        assert db.delete(int(ids[0])) is True and db.delete(int(ids[0])) is False
        assert int(ids[1]) in db and int(ids[0]) not in db
        before = db.search_arrays(X[:4], 30, "l2")
        with pytest.raises(iqdb.Locked):  # its shards' actors are live: a second handle is refused
            ShardedIqdb.open(tmp_path, actor_options=ACTOR)
    with pytest.raises(iqdb.InvalidConfig, match="shards=2"):
        ShardedIqdb.open(tmp_path, shards=2, actor_options=ACTOR)
    with ShardedIqdb.open(tmp_path, shards=3, actor_options=ACTOR) as db:
        assert len(db) == 200 and db.get(10**9).payload == {"late": True}
        assert_same_arrays(db.search_arrays(X[:4], 30, "l2"), before)


def test_a_shard_killed_during_a_write_stream_loses_no_acknowledged_write(tmp_path: Path) -> None:
    d, batch, batches = 8, 40, 60
    rng = np.random.default_rng(3)
    X = rng.normal(size=(batch * batches, d)).astype(np.float32)
    acked: list[int] = []
    failed: list[int] = []
    with ShardedIqdb.open(tmp_path, shards=2, actor_options=ACTOR, timeout=60) as db:
        db.upsert_many([0], X[:1])
        victim = db._shards[0].handle
        old_pid = pid_of(db, 0)

        def writer() -> None:
            for b in range(batches):
                rows = slice(b * batch, (b + 1) * batch)
                try:
                    db.upsert_many(np.arange(rows.start, rows.stop), X[rows])
                except ShardUnavailable:
                    failed.append(b)
                else:
                    acked.append(b)

        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + 60
        while len(acked) < 10 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acked) >= 10, (acked, failed)
        ray.kill(victim, no_restart=False)
        thread.join(120)
        assert not thread.is_alive()
        assert len(acked) > 10 and pid_of(db, 0) != old_pid  # the writes went on into a new process
        for b in acked:  # every acknowledged write is there, read back whole
            for i in (b * batch, (b + 1) * batch - 1):
                assert db.get(i) == iqdb.Record(i, X[i])
        for b in failed:  # the documented remedy for a write that was not acknowledged: repeat it
            db.upsert_many(np.arange(b * batch, (b + 1) * batch), X[b * batch : (b + 1) * batch])
        assert len(db) == batch * batches
        with iqdb.open_in_memory() as oracle:
            oracle.upsert_many(np.arange(batch * batches), X)
            Q = X[:5] + 0.25
            for metric in METRICS:
                assert_same_arrays(db.search_arrays(Q, 25, metric), oracle.search_arrays(Q, 25, metric))


def test_a_restarted_shard_reopens_its_directory(tmp_path: Path) -> None:
    ids, X = data(2, 100, 3)
    with ShardedIqdb.open(tmp_path, shards=2, actor_options=ACTOR) as db:
        db.upsert_many(ids, X)
        old = [pid_of(db, s) for s in range(2)]
        for s in range(2):
            ray.kill(db._shards[s].handle, no_restart=False)
        assert len(db) == 100  # waits for the restarts rather than failing or counting short
        assert [pid_of(db, s) for s in range(2)] != old
        assert db.get(int(ids[5])) == iqdb.Record(int(ids[5]), X[5])


def test_a_dead_shard_fails_searches_with_a_typed_error(tmp_path: Path) -> None:
    ids, X = data(4, 60, 3)
    db = ShardedIqdb.open(tmp_path, shards=2, actor_options=ACTOR, timeout=20)
    db.upsert_many(ids, X)
    ray.kill(db._shards[1].handle, no_restart=True)
    start = time.monotonic()
    with pytest.raises(ShardUnavailable) as info:
        db.search(X[0], 5, "l2")
    assert info.value.shards == (1,) and time.monotonic() - start < 10
    with pytest.raises(ShardUnavailable):
        db.close()  # shard 0 still closed and compacted; shard 1's writes are in its WAL
    with ShardedIqdb.open(tmp_path, actor_options=ACTOR) as again:  # a new actor replays the WAL
        assert len(again) == 60


def test_a_slow_shard_times_out_per_call(tmp_path: Path) -> None:
    ids, X = data(5, 40, 3)
    with ShardedIqdb.open_in_memory(shards=2, actor_options=ACTOR) as db:
        db.upsert_many(ids, X)

        def slow(r: iqdb.Record) -> bool:
            time.sleep(0.1)
            return True

        start = time.monotonic()
        with pytest.raises(ShardUnavailable, match="timeout"):
            db.search_with(X[0], 3, "l2", slow, timeout=0.5)
        assert time.monotonic() - start < 3
        assert len(db.search(X[0], 3, "l2", timeout=30)) == 3  # the shards still answer


def test_an_in_memory_shard_is_not_restarted_empty(tmp_path: Path) -> None:
    db = ShardedIqdb.open_in_memory(shards=2, actor_options=ACTOR, timeout=20)
    db.upsert_many(np.arange(20), np.ones((20, 2)))
    ray.kill(db._shards[0].handle, no_restart=False)
    # The kill lands asynchronously: until it does the answer is whole; after, a typed error.
    deadline = time.monotonic() + 20
    with pytest.raises(ShardUnavailable):
        while time.monotonic() < deadline:
            assert len(db) == 20
            time.sleep(0.05)
    with pytest.raises(ShardUnavailable):
        db.close()


def test_a_restart_without_the_marker_refuses_to_come_up_empty(tmp_path: Path) -> None:
    db = ShardedIqdb.open(tmp_path, shards=2, actor_options=ACTOR, timeout=20)
    db.upsert_many(np.arange(20), np.ones((20, 2)))
    os.remove(tmp_path / "shard-00001" / "shard.json")  # as on a node without the shard's files
    ray.kill(db._shards[1].handle, no_restart=False)
    with pytest.raises(ShardUnavailable, match=r"shard\.json"):
        db.search([1.0, 1.0], 3)
    with pytest.raises(ShardUnavailable):
        db.close()


def test_read_replicas_answer_exactly_and_see_every_acknowledged_write(tmp_path: Path) -> None:
    ids, X = data(8, 120, 4)
    with (
        ShardedIqdb.open(tmp_path, shards=2, replicas=1, actor_options=ACTOR) as db,
        iqdb.open_in_memory() as oracle,
    ):
        pids = {info["pid"] for info in db.shard_info()}
        replica_pids = {ray.get(r.handle.info.remote())["pid"] for r in db._replicas.all()}
        assert len(pids | replica_pids) == 4  # a process per primary and per replica
        db.upsert_many(ids, X)
        oracle.upsert_many(ids, X)
        for i in range(10):  # read after write, whichever copy answers
            rid = 10**6 + i
            db.upsert(iqdb.Record(rid, [9.0, 9.0, 9.0, float(i)]))
            assert int(db.search([9.0, 9.0, 9.0, float(i)], 1, "l2")[0].id) == rid
            oracle.upsert(iqdb.Record(rid, [9.0, 9.0, 9.0, float(i)]))
        deadline = time.monotonic() + 30
        while any(db._replicas.stale(s) for s in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(db._replicas.stale(s) for s in range(2))
        for metric in METRICS:
            assert_same_arrays(db.search_arrays(X[:6], 40, metric), oracle.search_arrays(X[:6], 40, metric))


def test_batch_search_over_a_ray_dataset(tmp_path: Path) -> None:
    ids, X = data(6, 300, 5)
    rng = np.random.default_rng(9)
    Q = rng.integers(-2, 3, size=(150, 5)).astype(np.float32)
    with (
        ShardedIqdb.open_in_memory(shards=2, actor_options=ACTOR) as db,
        iqdb.open_in_memory() as oracle,
    ):
        db.upsert_many(ids, X)
        oracle.upsert_many(ids, X)
        ds = ray.data.from_items([{"qid": i, "vector": Q[i]} for i in range(len(Q))])
        out = batch_search(ds, db, 12, "cosine", batch_size=40, pool_size=1, num_cpus=0.5)
        out.write_parquet(str(tmp_path / "out"))
        rows = sorted(ray.data.read_parquet(str(tmp_path / "out")).take_all(), key=lambda r: r["qid"])
        want_ids, want_scores = oracle.search_arrays(Q, 12, "cosine")
        assert [r["qid"] for r in rows] == list(range(len(Q)))
        got_ids = np.stack([np.asarray(r["ids"]) for r in rows])
        got_scores = np.stack([np.asarray(r["scores"]) for r in rows])
        assert_same_arrays((got_ids.astype(np.uint64), got_scores), (want_ids, want_scores))
        with pytest.raises(iqdb.InvalidConfig):
            local = ShardedIqdb.open_in_memory(shards=1, transport="local")
            try:
                batch_search(ds, local, 3)
            finally:
                local.close()
