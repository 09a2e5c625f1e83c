"""A Hypothesis state machine drives a durable database against a serial model while a reader
thread searches it without pause.

The model is a dict ``id -> (vector, payload)``. Rules upsert (one record, or a batch with
repeated ids: the last row wins), delete present and absent ids, read (``get``, ``in``,
``len``, ``dim``), search (``search`` and ``search_arrays``, L2 and DOT, any ``k``), flush,
compact, open a read-only view beside the writer, and close and reopen the directory. After
every step the handle must agree with the model exactly: vectors are small integers, so every
distance is exact in float64 and a search must return the brute force's ids and score bits
(``_reference``), ties to the smaller id.

Meanwhile a background thread searches (and reads records) without pause. It cannot know which
version it reads, so it checks what holds in every version: each payload carries its record's
vector (``{"v": [...]}``), so every result's score must be the exact distance from the query to
that vector, ids are unique and results are ordered by ``(score, id)``, at most ``k`` of them;
``get`` returns a record whose vector is its payload's. The thread records any exception, and
the invariant checked after every step re-raises it. Reopening stops the thread first (it
holds the handle) and starts a new one on the new handle.

280 runs of up to 50 steps (Hypothesis ends a few runs early): over 10,000 steps, and over
10,000 searches by the readers, both counted and asserted.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from _reference import brute_force, distances
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import iqdb
from iqdb import Record

D = 3
RUNS = 280  # Hypothesis ends some runs early: about 44 steps a run on average
STEPS = 50
METRICS = ["l2", "dot"]  # exact for small integers (COSINE divides by a square root)

ids = st.integers(0, 15)
vectors = st.tuples(*[st.integers(-3, 3)] * D)
tags = st.none() | st.integers(0, 3)
Vec = tuple[int, ...]


def payload_of(vec: Vec, tag: int | None) -> dict[str, Any]:
    """Every payload carries its record's vector, so a reader can check any result it sees."""
    return {"v": list(vec)} if tag is None else {"v": list(vec), "t": tag}


def check_results(q: list[int], k: int, metric: str, results: list[iqdb.SearchResult]) -> None:
    """What holds for a search of any version of the database."""
    assert len(results) <= k
    got = [int(r.id) for r in results]
    assert len(set(got)) == len(got), f"an id appears twice: {got}"
    keys = [(r.score, int(r.id)) for r in results]
    assert keys == sorted(keys), f"not ordered by (score, id): {keys}"
    if not results:
        return
    X = np.array([r.payload["v"] for r in results if r.payload is not None], dtype=np.float32)
    assert X.shape == (len(results), D), "a result without its payload"
    want = distances(X, np.array(q, dtype=np.float32), metric)
    assert [r.score for r in results] == want.tolist(), f"scores {keys} are not the distances {want}"


class Reader:
    """A thread that searches ``db`` until stopped, recording the first failure."""

    def __init__(self, db: iqdb.Iqdb, seed: int) -> None:
        self.db = db
        self.rnd = random.Random(seed)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.searches = 0
        self.thread = threading.Thread(target=self._run, name="iqdb-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rnd, db = self.rnd, self.db
        try:
            while not self.stop.is_set():
                queries = [[rnd.randint(-3, 3) for _ in range(D)] for _ in range(rnd.choice([1, 1, 2, 3]))]
                k = rnd.randint(0, 20)
                metric = rnd.choice(METRICS)
                if len(queries) == 1:
                    batches = [db.search(queries[0], k, metric)]
                else:
                    batches = db.search_batch(queries, k, metric)
                assert len(batches) == len(queries)
                for q, results in zip(queries, batches):
                    check_results(q, k, metric, results)
                rec = db.get(rnd.randint(0, 15))
                if rec is not None:
                    assert rec.payload is not None and rec.vector.tolist() == rec.payload["v"], rec
                self.searches += 1
                time.sleep(0)  # let the writer in
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the reader hung"
        DurableWithReader.searches += self.searches
        self.check()

    def check(self) -> None:
        if self.errors:
            raise AssertionError("the reader thread failed") from self.errors[0]


class DurableWithReader(RuleBasedStateMachine):
    root: ClassVar[Path]
    machines: ClassVar[int] = 0
    checks: ClassVar[int] = 0  # invariant checks: one per machine plus one per step
    searches: ClassVar[int] = 0  # by the reader threads

    def __init__(self) -> None:
        super().__init__()
        type(self).machines += 1
        self.path = Path(tempfile.mkdtemp(dir=self.root)) / "db"
        self.db = iqdb.open(self.path, device="cpu")
        self.model: dict[int, tuple[Vec, dict[str, Any]]] = {}
        self.dim: int | None = None
        self.reader = Reader(self.db, seed=self.machines)

    def teardown(self) -> None:
        try:
            self.reader.join()
        finally:
            self.db.close()
            shutil.rmtree(self.path.parent)

    # -- writes -----------------------------------------------------------------------------
    @rule(rid=ids, vec=vectors, tag=tags)
    def upsert(self, rid: int, vec: Vec, tag: int | None) -> None:
        payload = payload_of(vec, tag)
        self.db.upsert(Record(rid, vec, payload))
        self.model[rid] = (vec, payload)
        self.dim = D

    @rule(rows=st.lists(st.tuples(ids, vectors, tags), max_size=6))
    def upsert_many(self, rows: list[tuple[int, Vec, int | None]]) -> None:
        payloads = [payload_of(vec, tag) for _, vec, tag in rows]
        matrix = np.array([vec for _, vec, _ in rows], dtype=np.float32).reshape(len(rows), D)
        self.db.upsert_many([rid for rid, _, _ in rows], matrix, payloads)
        for (rid, vec, _), payload in zip(rows, payloads):
            self.model[rid] = (vec, payload)  # in order: a repeated id's last row wins
        if rows:
            self.dim = D

    @rule(rid=ids)
    def delete(self, rid: int) -> None:
        assert self.db.delete(rid) == (rid in self.model)
        self.model.pop(rid, None)

    @rule()
    def flush(self) -> None:
        self.db.flush()

    @rule()
    def compact(self) -> None:
        self.db.compact()

    @rule()
    def reopen(self) -> None:
        self.reader.join()
        self.db.close()
        self.db = iqdb.open(self.path, device="cpu")
        self.check_everything(self.db)
        self.reader = Reader(self.db, seed=random.randrange(2**32))

    @rule()
    def readonly_view(self) -> None:
        # Every write reached the OS before it returned, so a reader that opens now sees them all.
        with iqdb.open(self.path, device="cpu", readonly=True) as view:
            self.check_everything(view)

    # -- reads ------------------------------------------------------------------------------
    @rule(rid=ids)
    def get(self, rid: int) -> None:
        rec = self.db.get(rid)
        if rid not in self.model:
            assert rec is None
        else:
            vec, payload = self.model[rid]
            assert rec == Record(rid, vec, payload)

    @rule(rid=ids)
    def contains(self, rid: int) -> None:
        assert (rid in self.db) == (rid in self.model)

    @rule()
    def length(self) -> None:
        assert len(self.db) == len(self.model)
        assert self.db.is_empty() == (not self.model)
        assert self.db.dim == self.dim

    @rule(q=vectors, k=st.integers(0, 20), metric=st.sampled_from(METRICS))
    def search(self, q: Vec, k: int, metric: str) -> None:
        results = self.db.search(q, k, metric)
        self.expected([q], k, metric).check(
            [[int(r.id) for r in results]], [[r.score for r in results]], exact=True
        )
        for r in results:
            assert r.payload == self.model[int(r.id)][1]

    @rule(qs=st.lists(vectors, min_size=1, max_size=3), k=st.integers(0, 20), metric=st.sampled_from(METRICS))
    def search_arrays(self, qs: list[Vec], k: int, metric: str) -> None:
        got_ids, got_scores = self.db.search_arrays(qs, k, metric)
        assert got_ids.dtype == np.uint64 and got_scores.dtype == np.float64
        self.expected(qs, k, metric).check(got_ids, got_scores, exact=True)

    # -- checks -----------------------------------------------------------------------------
    def expected(self, qs: list[Vec], k: int, metric: str) -> Any:
        keys = sorted(self.model)
        X = np.array([self.model[i][0] for i in keys], dtype=np.float32).reshape(len(keys), D)
        return brute_force(X, np.array(keys, dtype=np.uint64), np.array(qs, dtype=np.float32), k, metric)

    def check_everything(self, db: iqdb.Iqdb) -> None:
        assert len(db) == len(self.model)
        assert db.dim == self.dim
        for rid in range(16):
            want = self.model.get(rid)
            assert db.get(rid) == (None if want is None else Record(rid, want[0], want[1]))

    @invariant()
    def the_reader_saw_nothing_wrong(self) -> None:
        type(self).checks += 1
        self.reader.check()


@pytest.mark.slow  # about 30 s
def test_a_durable_database_matches_a_serial_model_while_a_reader_searches(tmp_path: Path) -> None:
    DurableWithReader.root = tmp_path
    DurableWithReader.machines = DurableWithReader.checks = DurableWithReader.searches = 0
    run_state_machine_as_test(
        DurableWithReader,
        settings=settings(
            max_examples=RUNS,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    steps = DurableWithReader.checks - DurableWithReader.machines
    assert steps >= 10_000, (steps, DurableWithReader.machines)
    assert DurableWithReader.searches >= 10_000, DurableWithReader.searches
