"""Property tests: random filters over random payloads agree with the plain-Python brute force.

Payloads mix types at the same key (ints, floats with NaN, infinities and -0.0, bools, big
ints near 2**53 and 2**63, strings, bytes, None, lists, nested objects), miss keys, or are
absent; filters are random trees of every ``Field`` operator under ``&``, ``|`` and ``~``,
over plain and dotted paths and the record id. The library's matches (``count`` and the ids of
a search with ``k = n``) must be the ids that ``tests/_filter_reference.py`` finds from the
filter's dict form, on fresh stores and after deletes, replacements and appends (which the
mask cache must follow), on both plans and on durable stores after a reopen.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _filter_reference import ref_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iqdb
import iqdb._search
from iqdb import Field, Filter, Iqdb

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INTS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63), 10**18]),
    st.integers(-(2**63), 2**63 - 1),
)
_FLOAT_EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, 2.5, 2.0**53, 2.0**63, -(2.0**63), 1e308, 5e-324]
FLOATS = st.one_of(
    st.sampled_from([*_FLOAT_EDGES, float("nan"), float("inf"), -float("inf")]),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXT = st.text(alphabet=["a", "b", "Z", "é", "\uffff", "\U0001f600", "1"], max_size=3)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT, st.binary(max_size=2))
KEYS = ["a", "b", "c"]


def values(depth: int = 2) -> st.SearchStrategy[Any]:
    if depth == 0:
        return SCALARS
    inner = values(depth - 1)
    return st.one_of(
        SCALARS,
        SCALARS,
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from([*KEYS, "b.c", "$x"]), inner, max_size=3),
    )


VALUES = values()
PAYLOADS = st.one_of(st.none(), st.dictionaries(st.sampled_from([*KEYS, "a.b"]), VALUES, max_size=4))
PATHS = st.sampled_from(["a", "b", "c", "a.b", "b.a", "a.b.c", "a.a", "b.c", "$id"])


@st.composite
def leaves(draw: st.DrawFn) -> Filter:
    path = draw(PATHS)
    field = Field.id if path == "$id" else Field(path)
    # The id's literals stay numbers mostly (its matches are then not all-or-nothing).
    lit = (
        (lambda: draw(st.one_of(st.integers(-2, 60), FLOATS, SCALARS)))
        if path == "$id"
        else (lambda: draw(VALUES))
    )
    op = draw(
        st.sampled_from(["eq", "ne", "lt", "le", "gt", "ge", "in", "nin", "between", "exists", "contains"])
    )
    if op == "eq":
        return field == lit()
    if op == "ne":
        return field != lit()
    if op == "lt":
        return field < lit()
    if op == "le":
        return field <= lit()
    if op == "gt":
        return field > lit()
    if op == "ge":
        return field >= lit()
    if op in ("in", "nin"):
        vals = [lit() for _ in range(draw(st.integers(0, 4)))]
        return field.isin(vals) if op == "in" else field.notin(vals)
    if op == "between":
        return field.between(lit(), lit())
    if op == "exists":
        return field.exists()
    return field.contains(draw(SCALARS))


FILTERS = st.recursive(
    leaves(),
    lambda kids: st.one_of(
        st.tuples(kids, kids).map(lambda t: t[0] & t[1]),
        st.tuples(kids, kids).map(lambda t: t[0] | t[1]),
        kids.map(lambda f: ~f),
    ),
    max_leaves=5,
)
IDS = st.one_of(st.integers(0, 60), st.sampled_from([2**53 + 1, 2**63 - 1, 2**63, 2**64 - 2]))


def records(min_size: int = 1, max_size: int = 30) -> st.SearchStrategy[dict[int, Any]]:
    return st.dictionaries(IDS, PAYLOADS, min_size=min_size, max_size=max_size)


def vec(rid: int) -> list[float]:
    return [float(rid % 5), float(rid % 3), 1.0]


def write(db: Iqdb, recs: dict[int, Any]) -> None:
    ids = list(recs)
    db.upsert_many(ids, np.array([vec(i) for i in ids], dtype=np.float32), [recs[i] for i in ids])


def lib_ids(db: Iqdb, f: Any) -> list[int]:
    got = sorted(int(r.id) for r in db.search(vec(1), max(1, len(db)), "l2", filter=f))
    assert db.count(f) == len(got), f"count {db.count(f)} but {len(got)} search results"
    return got


def agree(db: Iqdb, model: dict[int, Any], filters: list[Filter]) -> None:
    for f in filters:
        want = sorted(ref_ids(f.to_dict(), model.items()))
        assert lib_ids(db, f) == want, f


@settings(SETTINGS, max_examples=300)
@given(recs=records(), f=FILTERS)
def test_random_filters_over_random_payloads_agree_with_the_brute_force(
    recs: dict[int, Any], f: Filter
) -> None:
    with iqdb.open_in_memory(device="cpu") as db:
        write(db, recs)
        agree(db, recs, [f])
        # The dict form and a pickle are the same filter and match alike.
        twin = Filter.from_dict(f.to_dict())
        assert twin == f and hash(twin) == hash(f)
        back = pickle.loads(pickle.dumps(f))
        assert back == f
        assert lib_ids(db, f.to_dict()) == lib_ids(db, f)
        assert sorted(ref_ids(twin.to_dict(), recs.items())) == sorted(ref_ids(f.to_dict(), recs.items()))


@settings(SETTINGS, max_examples=120)
@given(
    recs=records(),
    fs=st.lists(FILTERS, min_size=1, max_size=4),
    changes=st.lists(st.tuples(st.sampled_from(["upsert", "delete"]), IDS, PAYLOADS), max_size=12),
    more=records(0, 10),
    plan=st.sampled_from(["auto", "dense", "gather"]),
)
def test_filters_follow_deletes_replacements_and_appends(
    recs: dict[int, Any],
    fs: list[Filter],
    changes: list[tuple[str, int, Any]],
    more: dict[int, Any],
    plan: str,
) -> None:
    """The same filters searched before and after writes (the cached masks must follow)."""
    with pytest.MonkeyPatch.context() as mp:
        if plan == "dense":
            mp.setattr(iqdb._search, "GATHER_ROWS", -1)
            mp.setattr(iqdb._search, "GATHER_FRACTION", -1.0)
        elif plan == "gather":
            mp.setattr(iqdb._search, "GATHER_ROWS", 10**12)
        with iqdb.open_in_memory(device="cpu") as db:
            model = dict(recs)
            write(db, recs)
            agree(db, model, fs)
            for kind, rid, payload in changes:
                if kind == "upsert":
                    db.upsert(iqdb.Record(rid, vec(rid), payload))
                    model[rid] = payload
                else:
                    assert db.delete(rid) == (rid in model)
                    model.pop(rid, None)
            agree(db, model, fs)
            write(db, more)
            model.update(more)
            agree(db, model, fs)
            # delete_where removes exactly the matches
            want = set(ref_ids(fs[0].to_dict(), model.items()))
            assert db.delete_where(fs[0]) == len(want)
            model = {i: p for i, p in model.items() if i not in want}
            assert sorted(int(i) for i in db.search_arrays([vec(1)], max(1, len(db)), "l2")[0][0]) == sorted(
                model
            )
            agree(db, model, fs)


@settings(SETTINGS, max_examples=30)
@given(recs=records(), fs=st.lists(FILTERS, min_size=1, max_size=4), gone=st.sets(IDS, max_size=8))
def test_durable_stores_agree_after_reopen(recs: dict[int, Any], fs: list[Filter], gone: set[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db"
        with iqdb.open(path, device="cpu") as db:
            write(db, recs)
            for rid in gone:
                db.delete(rid)
        model = {i: p for i, p in recs.items() if i not in gone}
        with iqdb.open(path, device="cpu") as db:
            agree(db, model, fs)


@settings(SETTINGS, max_examples=80)
@given(
    recs=records(), fs=st.lists(st.one_of(st.none(), FILTERS), min_size=1, max_size=5), k=st.integers(1, 8)
)
def test_per_query_filters_give_each_query_its_own_matches(
    recs: dict[int, Any], fs: list[Filter | None], k: int
) -> None:
    with iqdb.open_in_memory(device="cpu") as db:
        write(db, recs)
        Q = np.array([vec(i) for i in range(len(fs))], dtype=np.float32)
        batch = db.search_batch(Q, k, "l2", filter=fs)
        ids, scores = db.search_arrays(Q, k, "l2", filter=fs)
        width = max(min(k, len(ref_ids({} if f is None else f.to_dict(), recs.items()))) for f in fs)
        assert ids.shape == (len(fs), width)
        for i, f in enumerate(fs):
            matches = set(ref_ids({} if f is None else f.to_dict(), recs.items()))
            single = db.search(Q[i], k, "l2", filter=f)
            assert [(int(r.id), r.score) for r in batch[i]] == [(int(r.id), r.score) for r in single]
            assert len(single) == min(k, len(matches))
            assert {int(r.id) for r in single} <= matches
            c = len(single)
            assert ids[i, :c].tolist() == [int(r.id) for r in single]
            assert scores[i, :c].tolist() == [r.score for r in single]
            assert (ids[i, c:] == iqdb.NO_ID).all() and np.isnan(scores[i, c:]).all()


@settings(SETTINGS, max_examples=60)
@given(recs=records(), path=st.sampled_from(["a", "b", "a.b"]), value=VALUES)
def test_contains_finds_any_equal_element(recs: dict[int, Any], path: str, value: Any) -> None:
    """``contains(x)``: the field is a list holding an element equal to ``x``, whatever ``x`` is
    (lists and objects too). Records whose list holds ``value`` itself are added."""
    recs = {**recs, 1000: {path.split(".")[0]: [value]}, 1001: {"a": {"b": [1, value]}}}
    with iqdb.open_in_memory(device="cpu") as db:
        write(db, recs)
        agree(db, recs, [Field(path).contains(value)])
