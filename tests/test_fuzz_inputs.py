"""Fuzzing: bad input to any public call raises an ``IqdbError`` and nothing else, and leaves the
database exactly as it was.

Hypothesis feeds generated junk to every public method and constructor: wrong types, NaN and
infinities, huge and negative ints, bools, nested junk, wrong dimensions, ragged lists,
strings with lone surrogates or NUL, bytes, ``None``, NumPy arrays of odd dtypes and shapes
(object, complex, datetime, strings, 0-d, 3-d, byte-swapped), bad ids, predicates, payloads and
``from_dict`` data. Some of it happens to be valid; those calls may succeed. A call that raises
must raise an ``IqdbError``, and afterwards:

* the durable database's WAL is byte-identical to what it was before the call;
* the handle is usable and unchanged: same ``len`` and ``dim``, a probe search returns the same
  results, and the seeded records read back the same.

Every handle method runs against one durable and one in-memory database (module fixtures with
a few records); constructors and value methods run beside the durable one. A test counts only
the calls that raised (a call that succeeded is made and checked, then rejected, so Hypothesis
draws another): 23 entry points x 160 on the durable database, 12 handle methods x 80 on the
in-memory one, and the two openers x 250, so 5,140 refused inputs in all, besides the valid
ones (about a fifth more).
"""

from __future__ import annotations

import decimal
import fractions
import os
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

import iqdb
from iqdb import (
    DistanceMetric,
    InvalidConfig,
    Iqdb,
    IqdbError,
    Payload,
    Record,
    RecordId,
    SearchResult,
    Vector,
)

D = 3
SEED_IDS = [1, 2, 3, 5, 8, 13]
SEED_VECTORS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [2, -1, 3], [0, 0, 0]], dtype=np.float32)
SEED_PAYLOADS: list[dict[str, Any] | None] = [
    {"a": 1},
    None,
    {},
    {"b": [1.5, "x"]},
    {"n": float("nan")},
    None,
]
PROBE = [0.5, 0.25, 0.125]

HANDLE_EXAMPLES = 160  # per entry point, durable database
MEMORY_EXAMPLES = 80  # per handle method, in-memory database
OPEN_EXAMPLES = 250  # per opener


def _named(name: str, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``strategy`` under a short name: Hypothesis's repr of a big nested strategy is expensive
    (and warns), and it is what failure reports print."""

    def draw_it(draw: st.DrawFn) -> Any:
        return draw(strategy)

    draw_it.__name__ = draw_it.__qualname__ = name
    return st.composite(draw_it)()


# --- junk --------------------------------------------------------------------------------------

_SPECIAL_INTS = [0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**400]
_SPECIAL_STRS = [
    "",
    "l2",
    "L2",
    " l2 ",
    "cosine",
    "dot",
    "\ud800",
    "a\udfffb",
    "\0",
    "a\0b",
    "$float",
    "$bytes",
]
_SPECIAL_STRS += [
    "$dict",
    "nan",
    "inf",
    "1",
    "cpu",
    "cuda:x",
    "gpu",
    "flush",
    "always",
    "é" * 3,
    "id",
    "vector",
]


class _Opaque:
    """An object iqdb has no reason to accept: no length, no array interface, not callable."""

    def __repr__(self) -> str:
        return "<opaque>"


class _LiesAboutLength:
    """Claims a length but cannot be indexed or iterated."""

    def __len__(self) -> int:
        return 3


def _np_scalars() -> list[Any]:
    return [
        np.float32("nan"), np.float64("inf"), np.float16(1.5), np.int8(-1), np.int64(-(2**63)),
        np.uint64(2**64 - 1), np.uint8(3), np.bool_(True), np.bool_(False), np.complex64(1j),
        np.longdouble(2.5), np.clongdouble(1), np.datetime64(1, "s"), np.timedelta64(3, "D"),
        np.str_("k"), np.bytes_(b"k"), np.void(b"ab"),
    ]  # fmt: skip


def _odd_objects() -> list[Any]:
    return [
        _Opaque(), _LiesAboutLength(), Ellipsis, NotImplemented, {1, 2}, frozenset({3}), range(3),
        range(0), memoryview(b"ab"), bytearray(b"xy"), decimal.Decimal("nan"), decimal.Decimal("1.5"),
        fractions.Fraction(1, 3), 1 + 2j,
        Vector([1.0, 2.0, 3.0]), Vector([1.0]), Vector([0.0] * 4), RecordId(3), Payload({"a": 1}),
        DistanceMetric.L2, DistanceMetric.DOT, Record(1, [1.0, 2.0, 3.0]), SearchResult(1, 0.5),
    ]  # fmt: skip


atoms: st.SearchStrategy[Any] = _named(
    "atoms",
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(_SPECIAL_INTS),
        st.floats(),
        st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 1e300, 5e-324]),
        st.text(max_size=6),
        st.sampled_from(_SPECIAL_STRS),
        st.text(st.characters(codec=None, categories=["Cs", "Cc", "Ll"]), max_size=4),  # lone surrogates
        st.binary(max_size=6),
        st.complex_numbers(),
        st.sampled_from(_np_scalars()),
        st.sampled_from(_odd_objects()),
        st.builds(lambda: iter([1.0, 2.0, 3.0])),  # no length
        st.builds(lambda: (x for x in (1, 2, 3))),
    ),
)

_dtypes = st.one_of(
    npst.scalar_dtypes(),
    npst.floating_dtypes(endianness="?"),
    npst.integer_dtypes(endianness="?"),
    npst.byte_string_dtypes(max_len=3),
    npst.unicode_string_dtypes(max_len=3),
    st.just(np.dtype([("a", "<f4"), ("b", "<i2")])),
)

arrays: st.SearchStrategy[Any] = _named(
    "arrays",
    st.one_of(
        npst.arrays(_dtypes, npst.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
        npst.arrays(_dtypes, st.sampled_from([(D,), (2, D), (1, D), (0, D), (D, 0), (2, D, 1), ()])),
        st.lists(atoms, max_size=4).map(lambda xs: _object_array(xs)),
        st.builds(lambda a: a[:, ::2] if a.ndim == 2 else a[::-1], npst.arrays(np.float64, (3, 2 * D))),
        st.builds(lambda a: np.asfortranarray(a), npst.arrays(np.float32, (2, D))),
    ),
)


def _object_array(xs: list[Any]) -> np.ndarray[Any, Any]:
    out = np.empty(len(xs), dtype=object)
    for i, x in enumerate(xs):
        out[i] = x
    return out


_keys = st.one_of(
    st.text(max_size=4),
    st.sampled_from(_SPECIAL_STRS),
    st.integers(),
    st.none(),
    st.floats(),
    st.binary(max_size=3),
)

junk: st.SearchStrategy[Any] = _named(
    "junk",
    st.recursive(
        st.one_of(atoms, arrays),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(_keys, children, max_size=3),
        ),
        max_leaves=8,
    ),
)

# --- near-valid values for a 3-d database (junk with a better chance of reaching deep code) ----

_number = st.one_of(
    st.integers(-4, 4),
    st.floats(),
    st.sampled_from(_SPECIAL_INTS),
    st.booleans(),
    atoms,
    st.sampled_from(_np_scalars()),
)
vectors: st.SearchStrategy[Any] = _named(
    "vectors",
    st.one_of(
        st.lists(_number, min_size=0, max_size=5),
        st.lists(st.integers(-4, 4), min_size=D, max_size=D),  # valid
        st.lists(st.integers(-4, 4), min_size=1, max_size=6),  # wrong dimension, sometimes
        st.tuples(_number, _number, _number),
        npst.arrays(_dtypes, st.sampled_from([(D,), (1, D), (), (0,), (D + 1,), (D, 1)])),
        st.integers(1, 5).map(lambda d: Vector(np.arange(d))),
        junk,
    ),
)
matrices: st.SearchStrategy[Any] = _named(
    "matrices",
    st.one_of(
        st.lists(vectors, min_size=0, max_size=4),
        st.lists(st.lists(st.integers(-4, 4), min_size=D, max_size=D), min_size=0, max_size=4),  # valid
        npst.arrays(_dtypes, st.tuples(st.integers(0, 3), st.sampled_from([D, D, 0, 1, D + 1]))),
        npst.arrays(np.float64, st.tuples(st.integers(1, 3), st.just(D))),  # NaN and inf inside
        st.lists(st.integers(1, 5), min_size=1, max_size=3).map(lambda ds: [Vector(np.ones(d)) for d in ds]),
        arrays,
        junk,
    ),
)
ids: st.SearchStrategy[Any] = _named(
    "ids",
    st.one_of(
        st.integers(),
        st.sampled_from(_SPECIAL_INTS + SEED_IDS),
        st.booleans(),
        st.floats(),
        st.sampled_from(_np_scalars()),
        st.sampled_from([np.int8(-3), np.uint64(5), np.int64(2), "1", b"1", 1.0, RecordId(2)]),
        junk,
    ),
)
id_lists: st.SearchStrategy[Any] = _named(
    "id_lists",
    st.one_of(
        st.lists(ids, max_size=4),
        st.lists(st.integers(0, 40), max_size=4),
        npst.arrays(_dtypes, st.sampled_from([(0,), (1,), (2,), (3,), (2, 2), ()])),
        st.lists(st.integers(-2, 40), max_size=4).map(np.array),
        junk,
    ),
)
payloads: st.SearchStrategy[Any] = _named(
    "payloads",
    st.one_of(
        st.none(),
        st.dictionaries(_keys, junk, max_size=3),
        st.dictionaries(st.text(max_size=3), atoms, max_size=3),
        st.dictionaries(st.sampled_from(["$float", "$bytes", "$dict"]), junk, min_size=1, max_size=1),
        junk,
    ),
)
payload_lists: st.SearchStrategy[Any] = _named(
    "payload_lists",
    st.one_of(st.none(), st.lists(payloads, max_size=4), junk),
)
ks: st.SearchStrategy[Any] = _named(
    "ks",
    st.one_of(
        st.integers(-3, 10),
        st.sampled_from(_SPECIAL_INTS),
        st.booleans(),
        st.sampled_from(_np_scalars()),
        atoms,
        junk,
    ),
)
metrics: st.SearchStrategy[Any] = _named(
    "metrics",
    st.one_of(
        st.sampled_from(list(DistanceMetric)), st.sampled_from(["l2", "COSINE", "Dot", "l1", ""]), atoms, junk
    ),
)


def _constant(value: Any) -> Callable[[Record], Any]:
    return lambda record: value


# Predicates: anything not callable, or a callable that behaves (what a predicate itself raises
# is the caller's exception, and propagates by design).
predicates: st.SearchStrategy[Any] = _named(
    "predicates",
    st.one_of(
        st.none(),
        st.sampled_from([None, True, 0, 1, "", "x", [], float("nan")]).map(_constant),
        st.just(lambda record: int(record.id) % 2 == 0),
        junk,
    ),
)


def _from_dict_data(keys: tuple[str, ...]) -> st.SearchStrategy[Any]:
    valid = {"id": st.integers(0, 9), "vector": vectors, "score": st.floats(), "payload": payloads}
    entries = st.fixed_dictionaries({}, optional={k: st.one_of(valid[k], junk) for k in keys})
    return st.one_of(entries, st.dictionaries(_keys, junk, max_size=4), junk)


# --- entry points ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A public call: its name, a strategy for its arguments, and how to make it on a handle."""

    name: str
    args: st.SearchStrategy[tuple[Any, ...]]
    call: Callable[[Iqdb, tuple[Any, ...]], object]
    on_handle: bool = True

    def __repr__(self) -> str:
        return self.name


def _record_or_junk() -> st.SearchStrategy[Any]:
    def build(rid: Any, vec: Any, payload: Any) -> Any:
        try:
            return Record(rid, vec, payload)
        except IqdbError:
            return (rid, vec, payload)

    return st.one_of(st.builds(build, ids, vectors, payloads), junk)


ENTRIES = [
    Entry("upsert", st.tuples(_record_or_junk()), lambda db, a: db.upsert(*a)),
    Entry("upsert_many", st.tuples(id_lists, matrices, payload_lists), lambda db, a: db.upsert_many(*a)),
    Entry("get", st.tuples(ids), lambda db, a: db.get(*a)),
    Entry("delete", st.tuples(ids), lambda db, a: db.delete(*a)),
    Entry("contains", st.tuples(ids), lambda db, a: a[0] in db),
    Entry("search", st.tuples(vectors, ks, metrics), lambda db, a: db.search(*a)),
    Entry("search_with", st.tuples(vectors, ks, metrics, predicates), lambda db, a: db.search_with(*a)),
    Entry("search_batch", st.tuples(matrices, ks, metrics, predicates), lambda db, a: db.search_batch(*a)),
    Entry("search_arrays", st.tuples(matrices, ks, metrics, predicates), lambda db, a: db.search_arrays(*a)),
    Entry(
        "search_kwargs",
        st.tuples(vectors, ks, metrics),
        lambda db, a: db.search(query=a[0], k=a[1], metric=a[2]),
    ),
    Entry(
        "search_batch_kwargs",
        st.tuples(matrices, ks, metrics, predicates),
        lambda db, a: db.search_batch(queries=a[0], k=a[1], metric=a[2], predicate=a[3]),
    ),
    Entry(
        "search_arrays_kwargs",
        st.tuples(matrices, ks, metrics, predicates),
        lambda db, a: db.search_arrays(queries=a[0], k=a[1], metric=a[2], predicate=a[3]),
    ),
    Entry("Vector", st.tuples(vectors), lambda db, a: Vector(*a), on_handle=False),
    Entry("RecordId", st.tuples(ids), lambda db, a: RecordId(*a), on_handle=False),
    Entry("Record", st.tuples(ids, vectors, payloads), lambda db, a: Record(*a), on_handle=False),
    Entry(
        "Record.with_payload",
        st.tuples(ids, vectors, payloads),
        lambda db, a: Record.with_payload(*a),
        on_handle=False,
    ),
    Entry(
        "Record.from_dict",
        st.tuples(_from_dict_data(("id", "vector", "payload"))),
        lambda db, a: Record.from_dict(*a),
        on_handle=False,
    ),
    Entry(
        "SearchResult",
        st.tuples(ids, st.one_of(st.floats(), atoms, junk), payloads),
        lambda db, a: SearchResult(*a),
        on_handle=False,
    ),
    Entry(
        "SearchResult.from_dict",
        st.tuples(_from_dict_data(("id", "score", "payload"))),
        lambda db, a: SearchResult.from_dict(*a),
        on_handle=False,
    ),
    Entry("Payload", st.tuples(payloads), lambda db, a: Payload(*a), on_handle=False),
    Entry(
        "Payload.insert",
        st.tuples(st.one_of(_keys, junk), junk),
        lambda db, a: Payload({"a": 1}).insert(*a),
        on_handle=False,
    ),
    Entry("DistanceMetric", st.tuples(metrics), lambda db, a: DistanceMetric(*a), on_handle=False),
    Entry(
        "metric.distance",
        st.tuples(st.sampled_from(list(DistanceMetric)), vectors, vectors),
        lambda db, a: a[0].distance(a[1], a[2]),
        on_handle=False,
    ),
]
assert len(ENTRIES) == 23

# --- the databases and the checks ---------------------------------------------------------------


class Checked:
    """A handle plus what it looked like after the last call; :meth:`call` checks one call."""

    def __init__(self, db: Iqdb, wal: Path | None) -> None:
        self.db = db
        self.wal = wal
        self.reseed()

    def reseed(self) -> None:
        self.db.upsert_many(SEED_IDS, SEED_VECTORS, SEED_PAYLOADS)
        if self.wal is not None and self.wal.stat().st_size > 1 << 16:
            self.db.compact()  # keep the WAL, read before and after every call, small
        self.before = self.state()

    def state(self) -> tuple[Any, ...]:
        db = self.db
        wal = None if self.wal is None else self.wal.read_bytes()
        n = len(db)
        probe = db.search(PROBE, n + 1, "l2")
        assert len(probe) == n
        return wal, n, db.dim, probe, [db.get(i) for i in SEED_IDS]

    def call(self, fn: Callable[[], object]) -> bool:
        """Make the call; ``True`` when it raised (an ``IqdbError``: anything else propagates)."""
        try:
            fn()
        except IqdbError:
            after = self.state()
            assert after[0] == self.before[0], "a refused call changed the WAL"
            assert after[1:] == self.before[1:], "a refused call changed the database"
            return True
        after = self.state()
        if after[1:] != self.before[1:]:
            self.reseed()  # a valid write got through; put the seed records back
        else:
            self.before = after
        return False


@pytest.fixture(scope="module")
def durable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checked]:
    path = tmp_path_factory.mktemp("fuzz") / "db"
    with iqdb.open(path, device="cpu") as db:
        yield Checked(db, path / "wal")


@pytest.fixture(scope="module")
def memory() -> Iterator[Checked]:
    with iqdb.open_in_memory(device="cpu") as db:
        yield Checked(db, None)


def _fuzz(
    target: Checked, args: st.SearchStrategy[Any], call: Callable[[Any], object], examples: int
) -> None:
    """Run ``call(drawn args)`` through ``target`` until ``examples`` calls have raised. A call
    that succeeds (the input happened to be valid) is made and checked, but not counted."""
    refused: list[None] = []

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(drawn=args)
    def run(drawn: Any) -> None:
        raised = target.call(lambda: call(drawn))
        assume(raised)
        refused.append(None)

    run()
    assert len(refused) >= examples


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_bad_input_raises_only_iqdb_errors_and_changes_nothing(durable: Checked, entry: Entry) -> None:
    _fuzz(durable, entry.args, lambda args: entry.call(durable.db, args), HANDLE_EXAMPLES)


HANDLE_ENTRIES = [e for e in ENTRIES if e.on_handle]


@pytest.mark.parametrize("entry", HANDLE_ENTRIES, ids=[e.name for e in HANDLE_ENTRIES])
def test_bad_input_to_an_in_memory_handle_raises_only_iqdb_errors(memory: Checked, entry: Entry) -> None:
    _fuzz(memory, entry.args, lambda args: entry.call(memory.db, args), MEMORY_EXAMPLES)


# --- the openers --------------------------------------------------------------------------------

_path_text = st.text(st.characters(codec=None, exclude_characters="."), min_size=1, max_size=8)
_path_bytes = st.binary(min_size=1, max_size=8).filter(lambda b: b"." not in b)
_option_names = st.text(max_size=8).filter(lambda s: s not in ("path", "fs"))


def _options(*, path_options: bool, unknown: bool) -> st.SearchStrategy[dict[str, Any]]:
    optional: dict[str, st.SearchStrategy[Any]] = {
        "device": st.one_of(
            st.sampled_from(["cpu", "auto", "CPU", " cpu", "gpu", "cuda:0", "tpu"]), atoms, junk
        ),
        "working_set": st.one_of(st.sampled_from([1 << 16, (1 << 16) - 1, 2**64, 2**200]), ks, atoms),
    }
    if path_options:
        optional["readonly"] = st.one_of(st.booleans(), atoms, arrays, junk)
        optional["sync"] = st.one_of(
            st.sampled_from(["flush", "always", "FLUSH", "never"]), atoms, arrays, junk
        )
        optional["wal_limit"] = st.one_of(st.sampled_from([1, 1 << 20, 2**64, 0, -1]), atoms, arrays, junk)
    fixed = st.fixed_dictionaries({}, optional=optional)
    if not unknown:
        return fixed
    others = st.dictionaries(_option_names, junk, max_size=2).map(
        lambda d: {k: v for k, v in d.items() if k not in optional}
    )
    return st.builds(lambda a, b: {**a, **b}, fixed, st.one_of(st.just({}), others))


def _paths(root: Path, locked: Path) -> st.SearchStrategy[Any]:
    # Every generated path lies under root ("." is never generated, so no ".." either), except
    # junk that is not a path at all.
    return st.one_of(
        _path_text.map(lambda s: str(root / "t") + "/" + s),
        _path_text.map(lambda s: root / "p" / s),
        _path_bytes.map(lambda b: os.fsencode(root / "b") + b"/" + b),
        st.sampled_from([locked, str(locked), os.fsencode(locked), root / "file", root / "file" / "sub"]),
        st.sampled_from(
            [None, "", b"", 0, 3.5, ["a"], np.array(["x"]), str(root / "nul\0x"), str(root / "\ud800")]
        ),
        atoms.filter(lambda x: not isinstance(x, (str, bytes, os.PathLike))),
        junk.filter(lambda x: not isinstance(x, (str, bytes, os.PathLike))),
    )


def test_bad_arguments_to_open_raise_only_iqdb_errors(
    durable: Checked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path that gets through lands here
    (tmp_path / "file").write_bytes(b"not a directory")
    assert durable.wal is not None
    args = st.tuples(_paths(tmp_path, durable.wal.parent), _options(path_options=True, unknown=True))
    _fuzz(durable, args, lambda a: iqdb.open(a[0], **a[1]).close(), OPEN_EXAMPLES)
    assert not (tmp_path / "LOCK").exists()


def test_bad_arguments_to_open_in_memory_raise_only_iqdb_errors(durable: Checked) -> None:
    def attempt(options: dict[str, Any]) -> None:
        with iqdb.open_in_memory(**options) as db:  # whatever got through must work
            db.upsert_many(SEED_IDS, SEED_VECTORS)
            assert len(db.search(PROBE, 2, "l2")) == 2

    # Unknown keywords are left out: open_in_memory has no **options, so Python itself refuses
    # them with TypeError (where open, which takes **options, raises InvalidConfig).
    _fuzz(durable, _options(path_options=False, unknown=False), attempt, OPEN_EXAMPLES)


# The escapes found before this file existed, spelled out.
@pytest.mark.parametrize(
    ("path", "options"),
    [
        (None, {}),
        (3, {}),
        ("", {}),
        (b"", {}),
        ("{root}/a\ud800", {}),
        ("{root}/a\0b", {}),
        (b"{root}/a\0b", {}),
        ("{root}/ok", {"readonly": np.array([True, False])}),
        ("{root}/ok", {"readonly": 1}),
        ("{root}/ok", {"readonly": "yes"}),
        ("{root}/ok", {"sync": np.array(["flush", "always"])}),
        ("{root}/ok", {"sync": ["flush"]}),
        ("{root}/ok", {"wal_limit": np.array([1, 2])}),
        ("{root}/ok", {"bogus": 1}),
    ],
)
def test_known_bad_open_arguments_raise_invalid_config(
    tmp_path: Path, path: Any, options: dict[str, Any]
) -> None:
    if isinstance(path, str):
        path = path.replace("{root}", str(tmp_path))
    elif isinstance(path, bytes):
        path = path.replace(b"{root}", os.fsencode(tmp_path))
    with pytest.raises(InvalidConfig):
        iqdb.open(path, **options)
    assert os.listdir(tmp_path) == []


def test_a_path_given_as_bytes_or_pathlike_opens_the_same_database(tmp_path: Path) -> None:
    with iqdb.open(os.fsencode(tmp_path / "db")) as db:
        db.upsert(Record(1, [1.0, 2.0]))
    with iqdb.open(pathlib.PurePath(tmp_path / "db"), readonly=True) as db:
        assert db.get(1) == Record(1, [1.0, 2.0])


# NumPy counts np.timedelta64 as an np.integer, and int() of one in days (or of NaT) raises
# TypeError: a duration must be refused wherever an integer is taken.
@pytest.mark.parametrize("value", [np.timedelta64(3, "D"), np.timedelta64("NaT"), np.timedelta64(10**6, "D")])
def test_a_numpy_duration_is_not_an_integer(memory: Checked, value: Any) -> None:
    db = memory.db
    calls: list[Callable[[], object]] = [
        lambda: RecordId(value),
        lambda: SearchResult(1, value),
        lambda: db.get(value),
        lambda: value in db,
        lambda: db.delete(value),
        lambda: db.search(PROBE, value, "l2"),
        lambda: db.search_with(PROBE, value, "l2", lambda r: True),
        lambda: db.search_batch([PROBE], value, "l2"),
        lambda: db.search_arrays([PROBE], value, "l2"),
        lambda: iqdb.open_in_memory(working_set=value).close(),
    ]
    for call in calls:
        assert memory.call(call)
