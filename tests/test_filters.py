"""Declarative filters at small scale: filters as values, the dict form, and their meaning.

Filters are checked on a set of awkward payloads (one edge case per record): against the
outcome the contract spells out (hand-written ids, which the plain-Python brute force of
``tests/_filter_reference.py`` must give too), and, for every operator against literals of
every kind, against that brute force (over the filter's dict form), through ``count`` and a
filtered ``search`` over all records. The entry points (``search``, ``search_batch``,
``search_arrays``, ``count``, ``delete_where``) take the dict form and refuse malformed filters.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _filter_reference import ref_ids, ref_matches

import iqdb
from iqdb import Field, Filter, InvalidArgument, Iqdb

MakeDb = Callable[[], Iqdb]
Reopen = Callable[[Iqdb], Iqdb]

NAN = float("nan")
INF = float("inf")
BIG_ID = 2**64 - 2  # an id above the signed 64-bit range

# id -> payload: one awkward case each. Ids are the keys; vectors are made from the ids.
RECORDS: dict[int, dict[str, Any] | None] = {
    1: {"a": 1},
    2: {"a": 1.0},
    3: {"a": True},
    4: {"a": "1"},
    5: {"a": b"1"},
    6: {"a": 0},
    7: {"a": -0.0},
    8: {"a": False},
    9: {"a": 2**53 + 1},
    10: {"a": 2.0**53},
    11: {"a": 2**63 - 1},
    12: {"a": 2.0**63},
    13: {"a": NAN},
    14: {"a": INF},
    15: {"a": -INF},
    16: {"a": None},
    17: {"a": "x"},
    18: {"a": b"x"},
    19: {"a": "Z"},
    20: {"a": "é"},
    21: {"a": "\U0001f600"},  # above every UTF-16 code unit, below nothing in code point order
    22: {"a": "\uffff"},
    23: {"a": [1, 2]},
    24: {"a": [1.0, 2]},
    25: {"a": [True, 2]},
    26: {"a": [2, 1]},
    27: {"a": [[1, 2], "x", None]},
    28: {"a": {"b": 1}},
    29: {"a": {"b": 1.0, "c": None}},
    30: {"m": {"a": 1, "b": {"c": "deep"}}},
    31: {"m.a": 1},  # a key with a dot: unreachable by the path "m.a"
    32: {"m": [{"a": 1}]},  # a list on the path: not followed
    33: {},
    34: None,
    35: {"a": -7, "tags": ["red", "blue"], "year": 2020},
    36: {"a": 2.5, "tags": [], "year": 2024.0},
    37: {"a": -(2**63), "tags": ["red", 3, b"red"], "year": "2021"},
    38: {"a": [], "tags": "red", "year": 2019.999},
    39: {"a": {}, "tags": [NAN, None, {"k": 1}]},
    BIG_ID: {"a": 5},
}
ALL = sorted(RECORDS)
PRESENT_A = [i for i in ALL if RECORDS[i] is not None and "a" in RECORDS[i]]  # type: ignore[operator]


def vector_of(rid: int) -> list[float]:
    return [float(rid % 7), float(rid % 5), 1.0, float(rid % 3)]


def fill(db: Iqdb, records: dict[int, dict[str, Any] | None] = RECORDS) -> None:
    ids = list(records)
    db.upsert_many(ids, np.array([vector_of(i) for i in ids], dtype=np.float32), [records[i] for i in ids])


@pytest.fixture(scope="module")
def small_db() -> Iterator[Iqdb]:
    db = iqdb.open_in_memory(device="cpu")
    fill(db)
    yield db
    db.close()


def lib_ids(db: Iqdb, f: Any) -> list[int]:
    """The ids a filtered search over every record returns, sorted; also checks ``count``."""
    n = len(db)
    got = sorted(int(r.id) for r in db.search(vector_of(0), n, "l2", filter=f))
    assert db.count(f) == len(got)
    return got


def reference(f: Filter, records: dict[int, dict[str, Any] | None] = RECORDS) -> list[int]:
    return sorted(ref_ids(f.to_dict(), records.items()))


# (filter, the ids the contract says it matches)
CASES: list[tuple[Filter, list[int]]] = [
    # equality: numbers exactly, bool is not a number, str is not bytes is not a number
    (Field("a") == 1, [1, 2]),
    (Field("a") == 1.0, [1, 2]),
    (Field("a") == True, [3]),  # noqa: E712
    (Field("a") == False, [8]),  # noqa: E712
    (Field("a") == 0, [6, 7]),
    (Field("a") == -0.0, [6, 7]),
    (Field("a") == "1", [4]),
    (Field("a") == b"1", [5]),
    (Field("a") == 2**53 + 1, [9]),
    (Field("a") == 2**53, [10]),
    (Field("a") == 2.0**53, [10]),
    (Field("a") == 2**63 - 1, [11]),
    (Field("a") == 2.0**63, [12]),
    (Field("a") == -(2**63), [37]),
    (Field("a") == NAN, []),
    (Field("a") == INF, [14]),
    (Field("a") == None, [16]),  # noqa: E711
    (Field("a") == [1, 2], [23, 24]),
    (Field("a") == [2, 1], [26]),
    (Field("a") == [], [38]),
    (Field("a") == {"b": 1}, [28]),
    (Field("a") == {"b": 1, "c": None}, [29]),
    (Field("a") == {}, [39]),
    # ordering: within numbers, strings, bytes and booleans only
    (Field("a") > 2.0**53, [9, 11, 12, 14]),
    (Field("a") >= 2**53 + 1, [9, 11, 12, 14]),
    (Field("a") < 2**53 + 1, [1, 2, 6, 7, 10, 15, 35, 36, 37, BIG_ID]),
    (Field("a") < 2.0**63, [1, 2, 6, 7, 9, 10, 11, 15, 35, 36, 37, BIG_ID]),
    (Field("a") >= 2**63 - 1, [11, 12, 14]),
    (Field("a") > 2**63 - 1, [12, 14]),
    (Field("a") <= -(2**63), [15, 37]),
    (Field("a") > 1e308, [14]),
    (Field("a") < INF, [1, 2, 6, 7, 9, 10, 11, 12, 15, 35, 36, 37, BIG_ID]),
    (Field("a") <= -INF, [15]),
    (Field("a") > NAN, []),
    (Field("a") <= NAN, []),
    (Field("a") < 1, [6, 7, 15, 35, 37]),
    (Field("a") <= 1, [1, 2, 6, 7, 15, 35, 37]),
    (Field("a") > 2, [9, 10, 11, 12, 14, 36, BIG_ID]),
    (Field("a") >= 2.5, [9, 10, 11, 12, 14, 36, BIG_ID]),
    (Field("a") > 2.4999, [9, 10, 11, 12, 14, 36, BIG_ID]),
    (Field("a") < True, [8]),
    (Field("a") >= False, [3, 8]),
    (Field("a") > False, [3]),
    (Field("a") < "a", [4, 19]),
    (Field("a") > "z", [20, 21, 22]),
    (Field("a") > "\uffff", [21]),  # code point order, not UTF-16
    (Field("a") >= b"x", [18]),
    (Field("a") < b"x", [5]),
    (Field("a") < None, []),
    (Field("a") >= [1, 2], []),
    (Field("a") <= {"b": 1}, []),
    (Field("a").between(0, 1), [1, 2, 6, 7]),
    (Field("a").between(-7, 2.5), [1, 2, 6, 7, 35, 36]),
    (Field("a").between("Z", "x"), [17, 19]),
    (Field("a").between(2, 1), []),
    # !=, $nin: a present field holding anything else
    (Field("a") != 1, [i for i in PRESENT_A if i not in (1, 2)]),
    (Field("a") != NAN, PRESENT_A),
    (Field("a") != None, [i for i in PRESENT_A if i != 16]),  # noqa: E711
    (Field("a") != [1, 2], [i for i in PRESENT_A if i not in (23, 24)]),
    (Field("a").notin([1, "x", None]), [i for i in PRESENT_A if i not in (1, 2, 16, 17)]),
    (Field("a").notin([]), PRESENT_A),
    (Field("a").isin([1, "x", None, b"1"]), [1, 2, 5, 16, 17]),
    (Field("a").isin([True, 2**53 + 1, NAN]), [3, 9]),
    (Field("a").isin([[2, 1], {"b": 1}]), [26, 28]),
    (Field("a").isin([]), []),
    # ~ is plain negation: missing fields and missing payloads match
    (~(Field("a") == 1), [i for i in ALL if i not in (1, 2)]),
    (~(Field("a") < 5), [i for i in ALL if i not in (1, 2, 6, 7, 15, 35, 36, 37)]),
    (~Field("a").exists(), [30, 31, 32, 33, 34]),
    (~~(Field("a") == 1), [1, 2]),
    # exists: the key is present, whatever it holds
    (Field("a").exists(), PRESENT_A),
    (Field("tags").exists(), [35, 36, 37, 38, 39]),
    (Field("m.a").exists(), [30]),
    # contains: a list holding an equal element
    (Field("a").contains(1), [23, 24, 26]),
    (Field("a").contains(1.0), [23, 24, 26]),
    (Field("a").contains(True), [25]),
    (Field("a").contains(None), [27]),
    (Field("a").contains("x"), [27]),
    (Field("a").contains(NAN), []),
    (Field("tags").contains("red"), [35, 37]),
    (Field("tags").contains(b"red"), [37]),
    (Field("tags").contains(3.0), [37]),
    (Field("tags").contains(None), [39]),
    (Field("a").contains([1, 2]), [27]),
    (Field("tags").contains({"k": 1}), [39]),
    # nested paths: into objects only
    (Field("m.a") == 1, [30]),
    (Field("m.b.c") == "deep", [30]),
    (Field("m.b") == {"c": "deep"}, [30]),
    (Field("m.b.c.d").exists(), []),
    (Field("a.b") == 1, [28, 29]),
    (Field("a.c") == None, [29]),  # noqa: E711
    (Field("a.c").exists(), [29]),
    (Field("nope") == 1, []),
    (Field("nope") != 1, []),
    # the record id
    (Field.id == 3, [3]),
    (Field.id == 3.0, [3]),
    (Field.id == 3.5, []),
    (Field.id == True, []),  # noqa: E712
    (Field.id == "3", []),
    (Field.id.isin([1, 5, 9, 1000]), [1, 5, 9]),
    (Field.id.between(30, 32), [30, 31, 32]),
    (Field.id > 38.5, [39, BIG_ID]),
    (Field.id <= -1, []),
    (Field.id != 1, [i for i in ALL if i != 1]),
    (Field.id.notin([1, 2]), [i for i in ALL if i not in (1, 2)]),
    (Field.id.exists(), ALL),
    # combinators
    ((Field("a") == 1) | (Field("a") == "x"), [1, 2, 17]),
    ((Field("a") >= 0) & (Field("a") < 2) & ~(Field("a") == 0), [1, 2]),
    (Field("tags").contains("red") & (Field("year") >= 2020), [35]),
    (Field("tags").contains("red") | (Field("year") == 2024), [35, 36, 37]),
    ((Field("year") < 2020) | (Field("year") > 2023), [36, 38]),
    (~((Field("a") == 1) | Field("tags").exists()), [i for i in ALL if i not in (1, 2, 35, 36, 37, 38, 39)]),
]


# contains() of a list or an object: tested by CASES alone, so that a failure there does not
# hide the other filters' results in the broad tests below.
CONTAINS_COMPOUND = {Field("a").contains([1, 2]), Field("tags").contains({"k": 1})}


def _case_id(case: tuple[Filter, list[int]]) -> str:
    return repr(case[0])[:60]


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_each_filter_matches_what_the_contract_says(small_db: Iqdb, case: tuple[Filter, list[int]]) -> None:
    f, want = case
    assert reference(f) == sorted(want), "the brute force disagrees with the hand-written answer"
    assert lib_ids(small_db, f) == sorted(want)


def test_a_filter_on_an_id_above_the_signed_64_bit_range_finds_it(small_db: Iqdb) -> None:
    """Ids are unsigned 64-bit: ``Field.id`` must name every one of them."""
    assert lib_ids(small_db, Field.id == BIG_ID) == [BIG_ID]
    assert lib_ids(small_db, Field.id >= 2**63) == [BIG_ID]
    assert lib_ids(small_db, {"$id": {"$in": [BIG_ID, 1]}}) == [1, BIG_ID]


# -- the same filters through every entry point, on every kind of database ----------------


def _all_filters() -> list[Filter]:
    """Every operator against a spread of literals of every kind, plus CASES."""
    literals: list[Any] = [0, 1, -1, 1.0, 2.5, 2**53 + 1, 2.0**53, 2**63 - 1, -(2**63), NAN, INF, -INF, -0.0,
                           True, False, None, "x", "", "Z", "é", b"x", b"", [1, 2], [], {"b": 1}]  # fmt: skip
    out = [c[0] for c in CASES if c[0] not in CONTAINS_COMPOUND]
    for path in ("a", "tags", "year", "m.a"):
        f = Field(path)
        for v in literals:
            out += [f == v, f != v, f < v, f <= v, f > v, f >= v]
            if not isinstance(v, (list, dict)):  # a list or object element: its own tests (CASES)
                out.append(f.contains(v))
        out += [f.isin(literals), f.notin(literals), f.exists(), f.isin(literals[10:]), f.notin(literals[:5])]
    return out


def test_every_operator_against_every_kind_agrees_with_the_brute_force(
    make_db: MakeDb, reopen: Reopen
) -> None:
    db = make_db()
    fill(db)
    filters = _all_filters()
    for state in ("fresh", "reopened"):
        wrong = [f for f in filters if lib_ids(db, f) != reference(f)]
        assert not wrong, f"{state}: {len(wrong)} filters disagree with the brute force: {wrong}"
        db = reopen(db)


def test_a_predicate_and_a_filter_together_both_hold(small_db: Iqdb) -> None:
    f = Field("a").isin([1, 0, "x", b"x", None]) | Field("tags").exists()

    def odd(r: iqdb.Record) -> bool:
        return int(r.id) % 2 == 1

    want = [i for i in reference(f) if i % 2 == 1]
    (got,) = small_db.search_batch([vector_of(0)], 100, "l2", predicate=odd, filter=f)
    assert sorted(int(r.id) for r in got) == want
    ids, _ = small_db.search_arrays([vector_of(0)], 100, "l2", predicate=odd, filter=f)
    assert sorted(ids[0].tolist()) == want
    per_query = small_db.search_batch([vector_of(0)] * 2, 100, "l2", predicate=odd, filter=[f, None])
    assert sorted(int(r.id) for r in per_query[0]) == want
    assert sorted(int(r.id) for r in per_query[1]) == [i for i in ALL if i % 2 == 1]


# -- filters as values --------------------------------------------------------------------

VALUE_FILTERS: list[Filter] = [
    Field("kind") == "doc",
    Field("year") >= 2020,
    Field("meta.author").isin(["ann", "bob"]),
    Field("n").notin([1, 2.5, None]),
    Field("tags").contains("red"),
    Field("draft").exists(),
    Field("year").between(2020, 2024),
    Field.id == 7,
    Field.id.isin([1, 2, 3]),
    Field("blob") == b"\x00\xff",
    Field("obj") == {"x": [1, {"y": None}]},
    (Field("kind") == "doc") & ((Field("year") < 2000) | ~Field("draft").exists()),
    ~((Field("a") != True) | (Field("b") <= -3.5)),  # noqa: E712
]


@pytest.mark.parametrize("f", VALUE_FILTERS, ids=repr)
def test_filters_are_hashable_equal_by_structure_and_pickle(f: Filter) -> None:
    twin = Filter.from_dict(f.to_dict())
    assert twin == f and hash(twin) == hash(f)
    assert {f: 1}[twin] == 1
    back = pickle.loads(pickle.dumps(f))
    assert back == f and hash(back) == hash(f)
    assert isinstance(back, Filter)


@pytest.mark.parametrize("f", VALUE_FILTERS, ids=repr)
def test_repr_is_readable_python_that_builds_an_equal_filter(f: Filter) -> None:
    text = repr(f)
    assert "Field" in text and "object at 0x" not in text
    assert eval(text, {"Field": Field}) == f


def test_filters_that_differ_are_not_equal() -> None:
    distinct = [
        Field("a") == 1,
        Field("a") == True,  # noqa: E712
        Field("a") == "1",
        Field("a") == b"1",
        Field("a") == [1],
        Field("a") != 1,
        Field("a") < 1,
        Field("a") <= 1,
        Field("b") == 1,
        Field("a").isin([1, 2]),
        Field("a").notin([1, 2]),
        Field("a").contains(1),
        Field("a").exists(),
        ~(Field("a") == 1),
        (Field("a") == 1) & (Field("b") == 1),
        (Field("a") == 1) | (Field("b") == 1),
        Field.id == 1,
    ]
    for i, f in enumerate(distinct):
        for j, g in enumerate(distinct):
            assert (f == g) == (i == j), (f, g)


def test_equal_filters_match_the_same_records(small_db: Iqdb) -> None:
    """Masks are cached by filter value: two filters may be equal only if they match alike."""
    by_value: dict[Filter, list[int]] = {}
    for f in _all_filters():
        want = reference(f)
        if f in by_value:
            assert by_value[f] == want, f"{f!r} equals a filter that matches other records"
        by_value[f] = want
    # Searched in an order that puts equal filters right after one another (cache hits).
    wrong = [f for f in sorted(by_value, key=repr) if lib_ids(small_db, f) != by_value[f]]
    assert not wrong, f"{len(wrong)} filters disagree with the brute force: {wrong}"


def test_a_filter_has_no_truth_value() -> None:
    f = Field("a") == 1
    with pytest.raises(TypeError):
        bool(f)
    with pytest.raises(TypeError):
        _ = f and (Field("b") == 2)
    with pytest.raises(TypeError):
        _ = not f
    with pytest.raises(TypeError):
        _ = 1 < Field("a") < 5  # a chained comparison needs a truth value


def test_filters_and_fields_are_immutable() -> None:
    f = Field("a") == 1
    with pytest.raises(AttributeError):
        f.path = "b"  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        Field("a").path = "b"  # type: ignore[misc]


def test_field_literals_are_normalized_like_payload_values() -> None:
    assert (Field("a") == np.int64(3)) == (Field("a") == 3)
    assert (Field("a") == np.float32(0.5)) == (Field("a") == 0.5)
    assert (Field("a") == (1, 2)) == (Field("a") == [1, 2])
    assert (Field("a") == bytearray(b"x")) == (Field("a") == b"x")
    assert (Field("a") == np.bool_(True)) == (Field("a") == True)  # noqa: E712


# -- the dict form ------------------------------------------------------------------------

DICT_PAIRS: list[tuple[dict[str, Any], Filter]] = [
    ({"kind": "doc"}, Field("kind") == "doc"),
    ({"kind": {"$eq": "doc"}}, Field("kind") == "doc"),
    ({"kind": "doc", "year": {"$gte": 2020}}, (Field("kind") == "doc") & (Field("year") >= 2020)),
    ({"year": {"$gte": 2020, "$lte": 2024}}, Field("year").between(2020, 2024)),
    ({"a": {"$ne": 1}}, Field("a") != 1),
    ({"a": {"$lt": 1}}, Field("a") < 1),
    ({"a": {"$gt": 1.5}}, Field("a") > 1.5),
    ({"a": {"$lte": "x"}}, Field("a") <= "x"),
    ({"a": {"$in": [1, "x", None]}}, Field("a").isin([1, "x", None])),
    ({"a": {"$nin": [1, 2]}}, Field("a").notin([1, 2])),
    ({"a": {"$exists": True}}, Field("a").exists()),
    ({"a": {"$exists": False}}, ~Field("a").exists()),
    ({"tags": {"$contains": "red"}}, Field("tags").contains("red")),
    ({"m.a": 1}, Field("m.a") == 1),
    ({"a": [1, 2]}, Field("a") == [1, 2]),
    ({"a": {"b": 1}}, Field("a") == {"b": 1}),
    ({"a": None}, Field("a") == None),  # noqa: E711
    ({"$id": 3}, Field.id == 3),
    ({"$id": {"$in": [1, 2]}}, Field.id.isin([1, 2])),
    ({"$not": {"a": {"$lt": 5}}}, ~(Field("a") < 5)),
    ({"$or": [{"a": 1}, {"a": "x"}]}, (Field("a") == 1) | (Field("a") == "x")),
    ({"$and": [{"a": {"$gte": 0}}, {"a": {"$lt": 2}}]}, (Field("a") >= 0) & (Field("a") < 2)),
    (
        {"tags": {"$contains": "red"}, "$or": [{"year": {"$lt": 2020}}, {"$not": {"a": {"$exists": True}}}]},
        Field("tags").contains("red") & ((Field("year") < 2020) | ~Field("a").exists()),
    ),
]


@pytest.mark.parametrize("pair", DICT_PAIRS, ids=[repr(p[1])[:60] for p in DICT_PAIRS])
def test_dict_syntax_equals_field_syntax(small_db: Iqdb, pair: tuple[dict[str, Any], Filter]) -> None:
    d, f = pair
    parsed = Filter.from_dict(d)
    assert parsed == f
    assert Filter.from_dict(f.to_dict()) == f
    want = reference(f)
    assert sorted(ref_ids(d, RECORDS.items())) == want, "the brute force reads both forms alike"
    assert lib_ids(small_db, d) == want
    assert lib_ids(small_db, f) == want


def test_empty_and_or_and_dict() -> None:
    recs = list(RECORDS.items())
    assert sorted(ref_ids({}, recs)) == ALL
    db = iqdb.open_in_memory(device="cpu")
    fill(db)
    assert lib_ids(db, {}) == ALL
    assert lib_ids(db, {"$and": []}) == ALL
    assert lib_ids(db, {"$or": []}) == []
    assert lib_ids(db, {"$not": {}}) == []
    db.close()


@pytest.mark.parametrize("f", VALUE_FILTERS + [c[0] for c in CASES], ids=repr)
def test_to_dict_round_trips(f: Filter) -> None:
    d = f.to_dict()
    assert isinstance(d, dict)
    assert Filter.from_dict(d) == f
    for rid, p in RECORDS.items():
        assert ref_matches(d, rid, p) == ref_matches(Filter.from_dict(d).to_dict(), rid, p)


def test_to_dict_of_json_safe_filters_survives_json() -> None:
    for f in VALUE_FILTERS:
        if "b'" in repr(f):
            continue
        assert Filter.from_dict(json.loads(json.dumps(f.to_dict()))) == f


MALFORMED: list[tuple[Any, str]] = [
    ({"a": {"$foo": 1}}, "$foo"),
    ({"$foo": [{"a": 1}]}, "$foo"),
    ({"a": {"$eq": 1, "$bogus": 2}}, "$bogus"),
    ({"a": {"$in": 5}}, "$in"),
    ({"a": {"$in": "ab"}}, "$in"),
    ({"a": {"$nin": {"x": 1}}}, "$nin"),
    ({"$and": {"a": 1}}, "$and"),
    ({"$or": "a"}, "$or"),
    ({"$or": [{"a": 1}, 5]}, "$or"),
    ({"$not": 5}, "$not"),
    ({"$or": [{"a": 1}, {"b": {"$gte": 1, "$lol": 2}}]}, "$lol"),
    ({"a": {"$exists": "yes"}}, "$exists"),
    ({"": 1}, "''"),
    ({"a..b": 1}, "a..b"),
    ({".a": 1}, ".a"),
    ({"a.": 1}, "a."),
    ({"a": object()}, "Field('a')"),
    ({"a": {"$in": [1, object()]}}, "$in"),
    ({"a": 2**64}, "Field('a')"),
    ([("a", 1)], "list"),
    ("a == 1", "str"),
    (5, "int"),
]


@pytest.mark.parametrize("bad", MALFORMED, ids=[repr(m[0])[:50] for m in MALFORMED])
def test_malformed_dicts_raise_invalid_argument_naming_the_bad_part(bad: tuple[Any, str]) -> None:
    d, part = bad
    with pytest.raises(InvalidArgument) as info:
        Filter.from_dict(d)
    assert part in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_field_paths_raise_invalid_argument() -> None:
    for path in ["", "a..b", ".a", "a.", "$a"]:
        with pytest.raises(InvalidArgument, match="path"):
            Field(path)
    with pytest.raises(InvalidArgument):
        Field(5)  # type: ignore[arg-type]
    for bad in [5, "ab", {"a": 1}, None]:
        with pytest.raises(InvalidArgument):
            Field("a").isin(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        _ = Field("a") == object()


@pytest.fixture
def db_for_entry_points(tmp_path: Path) -> Iterator[Iqdb]:
    db = iqdb.open(tmp_path / "db", device="cpu")
    fill(db)
    yield db
    db.close()


def test_a_dict_is_accepted_wherever_a_filter_is(db_for_entry_points: Iqdb) -> None:
    db = db_for_entry_points
    d = {"a": {"$in": [1, "x"]}}
    want = reference(Filter.from_dict(d))
    q = vector_of(0)
    assert sorted(int(r.id) for r in db.search(q, 50, "l2", filter=d)) == want
    assert [sorted(int(r.id) for r in res) for res in db.search_batch([q, q], 50, "l2", filter=d)] == [
        want
    ] * 2
    per_query = db.search_batch([q, q], 50, "l2", filter=[d, None])
    assert sorted(int(r.id) for r in per_query[0]) == want and len(per_query[1]) == len(db)
    ids, _ = db.search_arrays([q], 50, "l2", filter=d)
    assert sorted(ids[0].tolist()) == want
    ids, _ = db.search_arrays([q, q], 50, "l2", filter=[None, d])
    assert sorted(i for i in ids[1].tolist() if i != iqdb.NO_ID) == want
    assert db.count(d) == len(want)
    combined = (Field("a") == 1) & {"b": 1}
    assert combined == (Field("a") == 1) & (Field("b") == 1)
    assert {"b": 1} | (Field("a") == 1) == (Field("b") == 1) | (Field("a") == 1)
    assert db.delete_where(d) == len(want)
    assert all(i not in db for i in want)
    assert db.count(d) == 0


@pytest.mark.parametrize("bad", [{"a": {"$foo": 1}}, 5, "kind == doc", [Field("a") == 1]])
def test_malformed_filters_are_refused_everywhere_and_write_nothing(
    db_for_entry_points: Iqdb, bad: Any
) -> None:
    db = db_for_entry_points
    q = vector_of(0)
    n = len(db)
    wal = Path(db._backend.path) / "wal"  # type: ignore[attr-defined]
    size = wal.stat().st_size
    calls: list[Callable[[], object]] = [
        lambda: db.search(q, 5, "l2", filter=bad),
        lambda: db.count(bad),
        lambda: db.delete_where(bad),
        lambda: db.search_batch([q], 5, "l2", lambda r: True, filter=[bad]),
    ]
    if not isinstance(bad, list):  # a list is a per-query list in a batch
        calls += [
            lambda: db.search_batch([q], 5, "l2", filter=bad),
            lambda: db.search_arrays([q], 5, "l2", filter=bad),
        ]
    calls += [
        lambda: db.search_batch([q, q], 5, "l2", filter=[None, bad]),
        lambda: db.search_arrays([q, q], 5, "l2", filter=[bad, None]),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            call()
    assert len(db) == n and wal.stat().st_size == size


def test_a_per_query_list_of_the_wrong_length_is_refused(small_db: Iqdb) -> None:
    q = vector_of(0)
    for filters in ([], [None], [Field("a") == 1] * 3):
        with pytest.raises(InvalidArgument, match=str(len(filters))):
            small_db.search_batch([q, q], 5, "l2", filter=filters)
        with pytest.raises(InvalidArgument, match=str(len(filters))):
            small_db.search_arrays([q, q], 5, "l2", filter=filters)
    with pytest.raises(InvalidArgument):
        small_db.search(q, 5, "l2", filter=[Field("a") == 1])  # type: ignore[arg-type]


def test_nan_values_never_match_a_comparison_but_do_match_exists_and_ne(small_db: Iqdb) -> None:
    assert 13 not in lib_ids(small_db, Field("a") == NAN)
    for f in (Field("a") < INF, Field("a") > -INF, Field("a").between(-INF, INF), Field("a").isin([NAN])):
        assert 13 not in lib_ids(small_db, f), f
    for f in (Field("a").exists(), Field("a") != NAN, Field("a") != 1, ~(Field("a") < 0)):
        assert 13 in lib_ids(small_db, f), f
    assert math.isnan(RECORDS[13]["a"])  # type: ignore[index]
