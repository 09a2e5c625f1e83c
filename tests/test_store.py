"""The columnar store and its id index: model-checked operations and the memory bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iqdb
from iqdb._index import IdIndex
from iqdb._store import ColumnStore
from iqdb.kernels import cpu_backend

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 40), st.integers(0, 10**6)),
        st.tuples(st.just("pop"), st.integers(0, 40), st.just(0)),
        st.tuples(st.just("set_many"), st.integers(0, 40), st.integers(1, 6000)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_id_index_matches_a_dict(ops: list[tuple[str, int, int]]) -> None:
    """Every operation, including merges forced by big set_many calls, agrees with a dict."""
    ix, model = IdIndex(), {}
    for op, key, arg in ops:
        if op == "set":
            ix.set(key, arg)
            model[key] = arg
        elif op == "pop":
            assert ix.pop(key) == model.pop(key, None)
        else:
            # A big batch (beyond the dict threshold) goes straight into the sorted arrays.
            keys = np.arange(key, key + arg, dtype=np.uint64) * 7
            rows = np.arange(arg, dtype=np.int64) + key
            ix.set_many(keys, rows)
            model.update(zip(keys.tolist(), rows.tolist()))
        probe = np.array(sorted(set(model) | {0, 1, 2**64 - 1}), dtype=np.uint64)
        expect = [model.get(int(k), -1) for k in probe]
        assert ix.get_many(probe).tolist() == expect
        assert [ix.get(int(k)) for k in probe[:50]] == [model.get(int(k)) for k in probe[:50]]


def test_id_index_handles_the_largest_ids() -> None:
    ix = IdIndex()
    big = np.array([2**64 - 1, 2**63, 0], dtype=np.uint64)
    ix.set_many(big, np.array([5, 6, 7]))
    assert ix.get(2**64 - 1) == 5
    assert ix.get(2**63) == 6
    assert ix.pop(0) == 7
    assert ix.get_many(big).tolist() == [5, 6, -1]


@pytest.mark.parametrize("d", [128, 768])
@pytest.mark.parametrize("how", ["bulk", "batches", "singles"])
def test_memory_stays_under_1_3x_the_vectors(d: int, how: str) -> None:
    """Issue 2: a database of n vectors of dimension d holds at most 1.3 x n x d x 4 bytes
    (plus the payloads), whatever the insertion pattern and at every size along the way."""
    store = ColumnStore(cpu_backend())
    rng = np.random.default_rng(0)
    n_total = 6000 if how == "singles" else 40_000
    step = {"bulk": n_total, "batches": 997, "singles": 1}[how]
    worst = 0.0
    for start in range(0, n_total, step):
        m = min(step, n_total - start)
        ids = np.arange(start, start + m, dtype=np.uint64)
        store.upsert(ids, rng.standard_normal((m, d), dtype=np.float32), [None] * m)
        if store.n >= 1000:
            worst = max(worst, store.nbytes() / (store.n * d * 4))
    assert store.n == n_total
    assert worst <= 1.3, f"store held {worst:.3f} x the vector bytes"


def test_deletes_are_vacuumed_and_the_index_stays_right() -> None:
    db = iqdb.open_in_memory()
    n = 10_000
    vecs = np.random.default_rng(1).standard_normal((n, 4), dtype=np.float32)
    db.upsert_many(np.arange(n) * 3, vecs)
    for i in range(0, n, 2):
        assert db.delete(i * 3)
    store = db._store
    assert len(store) == len(db) == n // 2
    # Deleted rows are dropped once they are a fifth of the rows (vacuum), so the matrix stays
    # mostly live.
    assert store.n_dead <= max(1024, 0.2 * store.n)
    # Every surviving id still maps to the row that holds its own vector.
    for i in range(1, n, 2):
        row = store.row_of.get(i * 3)
        assert row is not None and row < store.n
        np.testing.assert_array_equal(store.matrix[row], vecs[i])
        assert int(store.ids[row]) == i * 3
