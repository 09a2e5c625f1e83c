"""The database handle: every row of API.md's handle table, on every backend (``make_db``)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GPU_SKIP

import iqdb
from iqdb import (
    Closed,
    DeviceUnavailable,
    DimensionMismatch,
    InvalidArgument,
    InvalidConfig,
    InvalidVector,
    Iqdb,
    Payload,
    Record,
    RecordId,
    Vector,
)

MakeDb = Callable[[], Iqdb]
Reopen = Callable[[Iqdb], Iqdb]

needs_no_gpu = pytest.mark.skipif(GPU_SKIP is None, reason="a GPU is usable here, so GPU spellings succeed")


def state(db: Iqdb, ids: list[int]) -> list[Record | None]:
    return [db.get(i) for i in ids]


# --- opening and devices ---------------------------------------------------------------------------


@pytest.mark.parametrize("opener", [Iqdb.open_in_memory, iqdb.open_in_memory], ids=["classmethod", "module"])
def test_open_in_memory_gives_a_new_empty_database(opener: Callable[..., Iqdb]) -> None:
    db = opener()
    try:
        assert len(db) == 0
        assert db.is_empty()
        assert db.dim is None
        other = opener()
        db.upsert(Record(1, [1.0]))
        assert len(other) == 0
        other.close()
    finally:
        db.close()


def test_cpu_device() -> None:
    with iqdb.open_in_memory(device="cpu") as db:
        assert db.device == "cpu"


def test_auto_device_runs_somewhere_valid() -> None:
    with iqdb.open_in_memory(device="auto") as db:
        assert db.device == "cpu" or db.device.startswith("cuda:")
        db.upsert(Record(1, [1.0, 0.0]))
        assert [int(r.id) for r in db.search([1.0, 0.0], 1)] == [1]
    with iqdb.open_in_memory() as db:
        assert db.device == "cpu" or db.device.startswith("cuda:")


@needs_no_gpu
@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:0", "cuda:3"])
def test_gpu_spellings_without_a_usable_gpu_raise_device_unavailable(device: str) -> None:
    with pytest.raises(DeviceUnavailable):
        iqdb.open_in_memory(device=device)


def test_device_unavailable_is_an_iqdb_error() -> None:
    assert issubclass(DeviceUnavailable, iqdb.IqdbError)


@pytest.mark.parametrize(
    "device",
    ["", "tpu", "metal", "cpu0", "cuda:", "cuda:x", "cuda:-1", "gpu:0", "cuda0", "cpu,cuda", None, 0],
)
def test_unknown_device_raises_invalid_config(device: Any) -> None:
    with pytest.raises(InvalidConfig, match="device"):
        iqdb.open_in_memory(device=device)


def test_open_in_memory_never_touches_the_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with iqdb.open_in_memory() as db:
        db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]], [{"a": 1}, None])
        db.delete(1)
        db.flush()
        db.search([1.0, 2.0], 2)
    assert os.listdir(tmp_path) == []


def test_device_property(make_db: MakeDb, backend: tuple[str, str]) -> None:
    db = make_db()
    if backend[1] == "cpu":
        assert db.device == "cpu"
    else:
        assert db.device.startswith("cuda:")


# --- upsert -------------------------------------------------------------------------------------------


def test_upsert_inserts(make_db: MakeDb, reopen: Reopen) -> None:
    db = make_db()
    rec = Record(7, [1.0, 2.0, 3.0], {"name": "seven"})
    db.upsert(rec)
    assert len(db) == 1
    assert 7 in db
    assert db.get(7) == rec
    db = reopen(db)
    assert db.get(7) == rec


def test_upsert_replaces_the_whole_record_including_the_payload(make_db: MakeDb, reopen: Reopen) -> None:
    db = make_db()
    db.upsert(Record(1, [1.0, 0.0], {"old": True, "keep": "no"}))
    db.upsert(Record(2, [0.0, 1.0], {"other": 1}))
    db.upsert(Record(1, [5.0, 5.0], {"new": 1}))
    assert len(db) == 2
    assert db.get(1) == Record(1, [5.0, 5.0], {"new": 1})
    db.upsert(Record(1, [6.0, 6.0]))  # no payload: the old one must not survive
    assert db.get(1) == Record(1, [6.0, 6.0], None)
    assert db.get(2) == Record(2, [0.0, 1.0], {"other": 1})
    db = reopen(db)
    assert db.get(1) == Record(1, [6.0, 6.0], None)
    assert db.get(1).payload is None  # type: ignore[union-attr]
    assert len(db) == 2


def test_upsert_takes_only_a_record(make_db: MakeDb) -> None:
    db = make_db()
    with pytest.raises(InvalidArgument, match="Record"):
        db.upsert((1, [1.0]))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="Record"):
        db.upsert({"id": 1, "vector": [1.0]})  # type: ignore[arg-type]
    assert len(db) == 0
    assert db.dim is None


def test_upsert_stores_a_copy_of_the_payload(make_db: MakeDb) -> None:
    db = make_db()
    rec = Record(1, [1.0], {"tags": ["a"]})
    db.upsert(rec)
    assert rec.payload is not None
    rec.payload["tags"].append("b")  # type: ignore[union-attr]
    rec.payload["extra"] = 1
    assert db.get(1) == Record(1, [1.0], {"tags": ["a"]})


def test_first_vector_fixes_the_dimension(make_db: MakeDb) -> None:
    db = make_db()
    assert db.dim is None
    db.upsert(Record(1, [1.0, 2.0, 3.0]))
    assert db.dim == 3
    assert type(db.dim) is int


def test_other_dimension_raises_and_changes_nothing(make_db: MakeDb, reopen: Reopen) -> None:
    db = make_db()
    db.upsert(Record(1, [1.0, 2.0, 3.0], {"v": 1}))
    with pytest.raises(DimensionMismatch) as info:
        db.upsert(Record(2, [1.0, 2.0, 3.0, 4.0]))
    assert (info.value.left, info.value.right) == (4, 3)
    with pytest.raises(DimensionMismatch) as info:
        db.upsert(Record(1, [9.0, 9.0], {"v": 2}))  # replacing with another dimension
    assert (info.value.left, info.value.right) == (2, 3)
    with pytest.raises(DimensionMismatch) as info:
        db.upsert_many([1, 5], [[1.0], [2.0]])
    assert (info.value.left, info.value.right) == (1, 3)
    assert len(db) == 1
    assert 2 not in db
    assert 5 not in db
    assert db.get(1) == Record(1, [1.0, 2.0, 3.0], {"v": 1})
    assert db.dim == 3
    db = reopen(db)
    assert len(db) == 1
    assert db.get(1) == Record(1, [1.0, 2.0, 3.0], {"v": 1})


def test_dimension_stays_fixed_after_deleting_every_record(make_db: MakeDb, reopen: Reopen) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    assert db.delete(1)
    assert db.delete(2)
    assert db.is_empty()
    assert db.dim == 2
    with pytest.raises(DimensionMismatch) as info:
        db.upsert(Record(3, [1.0, 2.0, 3.0]))
    assert (info.value.left, info.value.right) == (3, 2)
    db = reopen(db)
    assert db.dim == 2
    with pytest.raises(DimensionMismatch):
        db.upsert(Record(3, [1.0, 2.0, 3.0]))
    db.upsert(Record(3, [5.0, 6.0]))
    assert db.get(3) == Record(3, [5.0, 6.0])


# --- upsert_many ----------------------------------------------------------------------------------------


def test_upsert_many_inserts_every_row(make_db: MakeDb, reopen: Reopen) -> None:
    db = make_db()
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    db.upsert_many([10, 20, 30], vectors, [{"n": 10}, None, {}])
    assert len(db) == 3
    assert db.dim == 2
    expected = [Record(10, [1.0, 0.0], {"n": 10}), Record(20, [0.0, 1.0]), Record(30, [1.0, 1.0], {})]
    assert state(db, [10, 20, 30]) == expected
    db = reopen(db)
    assert state(db, [10, 20, 30]) == expected
    assert db.get(30).payload == {}  # type: ignore[union-attr]
    assert db.get(20).payload is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "ids",
    [
        [1, 2, 2**64 - 1],
        (1, 2, 2**64 - 1),
        np.array([1, 2, 2**64 - 1], dtype=np.uint64),
        [RecordId(1), RecordId(2), RecordId(2**64 - 1)],
        [np.int64(1), np.uint8(2), np.uint64(2**64 - 1)],
    ],
    ids=["list", "tuple", "uint64-array", "record-ids", "numpy-scalars"],
)
def test_upsert_many_takes_any_integer_sequence_or_array_of_ids(make_db: MakeDb, ids: Any) -> None:
    db = make_db()
    db.upsert_many(ids, [[1.0], [2.0], [3.0]])
    assert len(db) == 3
    assert db.get(2**64 - 1) == Record(2**64 - 1, [3.0])
    found = db.search([1.0], 3, "l2")
    assert [r.id for r in found] == [1, 2, 2**64 - 1]
    assert all(type(r.id) is RecordId for r in found)


@pytest.mark.parametrize(
    "ids",
    [np.array([3, 1, 2], dtype=np.int64), np.array([3, 1, 2], dtype=np.int32), [3, 1, 2]],
    ids=["int64-array", "int32-array", "list"],
)
def test_upsert_many_takes_signed_integer_arrays(make_db: MakeDb, ids: Any) -> None:
    db = make_db()
    db.upsert_many(ids, [[3.0], [1.0], [2.0]])
    assert [db.get(i) for i in (1, 2, 3)] == [Record(1, [1.0]), Record(2, [2.0]), Record(3, [3.0])]


def test_upsert_many_takes_a_range_of_ids(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many(range(3, 0, -1), [[3.0], [2.0], [1.0]])
    assert [db.get(i) for i in (1, 2, 3)] == [Record(1, [1.0]), Record(2, [2.0]), Record(3, [3.0])]


@pytest.mark.parametrize(
    "vectors",
    [
        np.array([[1, 2], [3, 4]], dtype=np.float32),
        np.array([[1, 2], [3, 4]], dtype=np.float64),
        np.array([[1, 2], [3, 4]], dtype=np.int64),
        np.asfortranarray(np.array([[1, 2], [3, 4]], dtype=np.float32)),
        [[1, 2], [3, 4]],
        [Vector([1, 2]), Vector([3, 4])],
        [np.array([1.0, 2.0]), (3, 4)],
    ],
    ids=["f32", "f64", "int64", "fortran", "lists", "Vectors", "mixed-rows"],
)
def test_upsert_many_vector_forms(make_db: MakeDb, vectors: Any) -> None:
    db = make_db()
    db.upsert_many([1, 2], vectors)
    assert db.get(1) == Record(1, [1.0, 2.0])
    assert db.get(2) == Record(2, [3.0, 4.0])


def test_upsert_many_does_not_keep_a_reference_to_the_input_array(make_db: MakeDb) -> None:
    db = make_db()
    vectors = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    db.upsert_many([1, 2], vectors)
    vectors[:] = 99.0
    assert db.get(1) == Record(1, [1.0, 2.0])
    assert [int(r.id) for r in db.search([1.0, 2.0], 1, "l2")] == [1]


@pytest.mark.parametrize(
    "payloads",
    [
        [{"a": 1}, None, {}],
        ({"a": 1}, None, {}),
        [Payload({"a": 1}), None, Payload()],
    ],
    ids=["list", "tuple", "Payloads"],
)
def test_upsert_many_payload_sequences(make_db: MakeDb, payloads: Any) -> None:
    db = make_db()
    db.upsert_many([1, 2, 3], [[1.0], [2.0], [3.0]], payloads)
    got = [db.get(i).payload for i in (1, 2, 3)]  # type: ignore[union-attr]
    assert got[0] == {"a": 1}
    assert got[1] is None
    assert got[2] == {}
    assert got[2] is not None


def test_upsert_many_without_payloads_replaces_them_with_none(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0], [2.0]], [{"a": 1}, {"b": 2}])
    db.upsert_many([1, 2], [[1.5], [2.5]])
    assert state(db, [1, 2]) == [Record(1, [1.5]), Record(2, [2.5])]


def test_upsert_many_copies_payloads(make_db: MakeDb) -> None:
    db = make_db()
    src: dict[str, Any] = {"l": [1]}
    db.upsert_many([1], [[1.0]], [src])
    src["l"].append(2)
    src["x"] = 0
    assert db.get(1) == Record(1, [1.0], {"l": [1]})


def test_upsert_many_repeated_id_last_row_wins(make_db: MakeDb, reopen: Reopen) -> None:
    db = make_db()
    db.upsert(Record(1, [0.0, 0.0], {"v": "before"}))
    db.upsert_many(
        [1, 2, 1, 3, 1],
        [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0], [5.0, 5.0]],
        [{"v": "first"}, {"v": "two"}, {"v": "middle"}, None, {"v": "last"}],
    )
    assert len(db) == 3
    assert db.get(1) == Record(1, [5.0, 5.0], {"v": "last"})
    assert db.get(2) == Record(2, [2.0, 2.0], {"v": "two"})
    hits = db.search([5.0, 5.0], 10, "l2")
    assert [int(r.id) for r in hits] == [1, 3, 2]
    db = reopen(db)
    assert db.get(1) == Record(1, [5.0, 5.0], {"v": "last"})
    assert len(db) == 3


def test_upsert_many_with_no_rows_changes_nothing(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert_many([], np.empty((0, 4), dtype=np.float32))
    db.upsert_many([], [], [])
    assert db.dim is None
    assert len(db) == 0
    db.upsert(Record(1, [1.0, 2.0]))
    assert db.dim == 2


@pytest.mark.parametrize(
    ("ids", "vectors", "payloads"),
    [
        ([1, 2, 3], [[1.0], [2.0]], None),
        ([1, 2], [[1.0], [2.0], [3.0]], None),
        ([1, 2], [[1.0], [2.0]], [None]),
        ([1, 2], [[1.0], [2.0]], [None, None, None]),
        ([], [[1.0]], None),
        ([], [], [{}]),
    ],
    ids=[
        "fewer-vectors",
        "more-vectors",
        "fewer-payloads",
        "more-payloads",
        "no-ids-one-vector",
        "no-ids-one-payload",
    ],
)
def test_upsert_many_length_mismatch_raises_invalid_argument(
    make_db: MakeDb, ids: Any, vectors: Any, payloads: Any
) -> None:
    db = make_db()
    with pytest.raises(InvalidArgument):
        db.upsert_many(ids, vectors, payloads)
    assert len(db) == 0
    assert db.dim is None


_GOOD_IDS = [1, 10, 11]
_GOOD_VECTORS = [[9.0, 9.0], [10.0, 10.0], [11.0, 11.0]]
_GOOD_PAYLOADS: list[Any] = [{"v": "new1"}, {"v": "new10"}, None]


def _replace(seq: list[Any], pos: int, value: Any) -> list[Any]:
    out = list(seq)
    out[pos] = value
    return out


@pytest.mark.parametrize(
    ("ids", "vectors", "payloads", "error"),
    [
        (_GOOD_IDS, _replace(_GOOD_VECTORS, 2, [math.nan, 1.0]), _GOOD_PAYLOADS, InvalidVector),
        (_GOOD_IDS, _replace(_GOOD_VECTORS, 1, [math.inf, 1.0]), _GOOD_PAYLOADS, InvalidVector),
        (_GOOD_IDS, _replace(_GOOD_VECTORS, 2, [-math.inf, 1.0]), _GOOD_PAYLOADS, InvalidVector),
        (_GOOD_IDS, np.array(_replace(_GOOD_VECTORS, 2, [1e39, 0.0])), _GOOD_PAYLOADS, InvalidVector),
        (_GOOD_IDS, _replace(_GOOD_VECTORS, 2, [1.0]), _GOOD_PAYLOADS, InvalidVector),
        (_GOOD_IDS, [[1.0, 2.0, 3.0]] * 3, _GOOD_PAYLOADS, DimensionMismatch),
        (_GOOD_IDS, "not vectors", _GOOD_PAYLOADS, InvalidVector),
        (_GOOD_IDS, _GOOD_VECTORS, _replace(_GOOD_PAYLOADS, 2, {"bad": object()}), InvalidArgument),
        (_GOOD_IDS, _GOOD_VECTORS, _replace(_GOOD_PAYLOADS, 2, {"bad": "\ud800"}), InvalidArgument),
        (_GOOD_IDS, _GOOD_VECTORS, _replace(_GOOD_PAYLOADS, 2, {"bad": 2**63}), InvalidArgument),
        (_GOOD_IDS, _GOOD_VECTORS, _replace(_GOOD_PAYLOADS, 2, ["not", "a", "mapping"]), InvalidArgument),
        (_GOOD_IDS, _GOOD_VECTORS, "abc", InvalidArgument),
        (_replace(_GOOD_IDS, 2, -1), _GOOD_VECTORS, _GOOD_PAYLOADS, InvalidArgument),
        (_replace(_GOOD_IDS, 2, 2**64), _GOOD_VECTORS, _GOOD_PAYLOADS, InvalidArgument),
        (_replace(_GOOD_IDS, 2, 11.0), _GOOD_VECTORS, _GOOD_PAYLOADS, InvalidArgument),
        (_replace(_GOOD_IDS, 2, "11"), _GOOD_VECTORS, _GOOD_PAYLOADS, InvalidArgument),
        (np.array([1.0, 10.0, 11.0]), _GOOD_VECTORS, _GOOD_PAYLOADS, InvalidArgument),
        (np.array([1, 10, -11]), _GOOD_VECTORS, _GOOD_PAYLOADS, InvalidArgument),
        (_GOOD_IDS, _GOOD_VECTORS[:2], _GOOD_PAYLOADS, InvalidArgument),
        (_GOOD_IDS, _GOOD_VECTORS, _GOOD_PAYLOADS[:2], InvalidArgument),
    ],
    ids=[
        "nan",
        "inf",
        "-inf",
        "f32-overflow",
        "ragged",
        "wrong-dim",
        "string-vectors",
        "payload-type",
        "payload-utf8",
        "payload-int-range",
        "payload-not-mapping",
        "payloads-string",
        "id-negative",
        "id-too-big",
        "id-float",
        "id-str",
        "id-float-array",
        "id-negative-array",
        "vectors-short",
        "payloads-short",
    ],
)
def test_upsert_many_is_all_or_nothing(
    make_db: MakeDb, reopen: Reopen, ids: Any, vectors: Any, payloads: Any, error: type[Exception]
) -> None:
    db = make_db()
    db.upsert_many([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [{"v": "one"}, None, {}])
    before_records = state(db, [1, 2, 3, 10, 11])
    before_search = db.search([1.0, 0.5], 10, "l2")
    with pytest.raises(error):
        db.upsert_many(ids, vectors, payloads)

    def unchanged(handle: Iqdb) -> None:
        assert len(handle) == 3
        assert handle.dim == 2
        assert state(handle, [1, 2, 3, 10, 11]) == before_records
        assert 10 not in handle
        assert 11 not in handle
        assert handle.search([1.0, 0.5], 10, "l2") == before_search

    unchanged(db)
    unchanged(reopen(db))


def test_failed_first_upsert_many_does_not_fix_the_dimension(make_db: MakeDb) -> None:
    db = make_db()
    with pytest.raises(InvalidVector, match="vector contains a non-finite value"):
        db.upsert_many([1, 2], [[1.0, 2.0, 3.0], [math.nan, 0.0, 0.0]])
    with pytest.raises(InvalidArgument):
        db.upsert_many([1, 2], [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [None, {"x": object()}])
    assert db.dim is None
    assert len(db) == 0
    assert db.search([1.0], 5) == []
    db.upsert(Record(1, [1.0]))
    assert db.dim == 1


def test_upsert_many_rejects_a_bool_inside_a_list_of_ids(make_db: MakeDb) -> None:
    db = make_db()
    with pytest.raises(InvalidArgument):
        db.upsert_many([True, 2], [[1.0], [2.0]])
    assert len(db) == 0


def test_upsert_many_rejects_a_bool_array_of_ids(make_db: MakeDb) -> None:
    db = make_db()
    with pytest.raises(InvalidArgument):
        db.upsert_many(np.array([True, False]), [[1.0], [2.0]])
    assert len(db) == 0


# --- get / delete / len / in / dim -------------------------------------------------------------------------


def test_get_returns_a_copy_of_the_record_or_none(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert(Record(5, [1.0, 2.0], {"tags": ["a"], "meta": {"n": 1}}))
    got = db.get(5)
    assert isinstance(got, Record)
    assert type(got.id) is RecordId
    assert got == Record(5, [1.0, 2.0], {"tags": ["a"], "meta": {"n": 1}})
    assert got.payload is not None
    got.payload["tags"].append("b")  # type: ignore[union-attr]
    got.payload["meta"]["n"] = 2  # type: ignore[index]
    got.payload["new"] = True
    again = db.get(5)
    assert again == Record(5, [1.0, 2.0], {"tags": ["a"], "meta": {"n": 1}})
    assert db.search([1.0, 2.0], 1)[0].payload == {"tags": ["a"], "meta": {"n": 1}}
    assert db.get(6) is None


@pytest.mark.parametrize(
    "rid",
    [5, np.int64(5), np.uint64(5), np.uint8(5), RecordId(5)],
    ids=["int", "int64", "uint64", "uint8", "RecordId"],
)
def test_id_arguments_accept_ints_numpy_ints_and_record_ids(make_db: MakeDb, rid: Any) -> None:
    db = make_db()
    db.upsert(Record(rid, [1.0]))
    assert rid in db
    assert db.get(rid) == Record(5, [1.0])
    assert db.delete(rid) is True
    assert rid not in db


@pytest.mark.parametrize(
    "rid", [-1, 2**64, 1.0, True, "5", None], ids=["-1", "2**64", "float", "bool", "str", "None"]
)
def test_invalid_ids_raise_invalid_argument(make_db: MakeDb, rid: Any) -> None:
    db = make_db()
    db.upsert(Record(1, [1.0]))
    with pytest.raises(InvalidArgument):
        db.get(rid)
    with pytest.raises(InvalidArgument):
        db.delete(rid)
    assert len(db) == 1


def test_delete_reports_whether_a_record_was_removed(make_db: MakeDb, reopen: Reopen) -> None:
    db = make_db()
    db.upsert_many([1, 2, 3], [[1.0], [2.0], [3.0]])
    assert db.delete(2) is True
    assert db.delete(2) is False
    assert db.delete(99) is False
    assert len(db) == 2
    assert 2 not in db
    assert db.get(2) is None
    assert state(db, [1, 3]) == [Record(1, [1.0]), Record(3, [3.0])]
    db = reopen(db)
    assert len(db) == 2
    assert db.get(2) is None
    assert db.delete(2) is False
    assert state(db, [1, 3]) == [Record(1, [1.0]), Record(3, [3.0])]


def test_len_is_empty_and_in_count_distinct_ids(make_db: MakeDb) -> None:
    db = make_db()
    assert len(db) == 0
    assert db.is_empty() is True
    assert 1 not in db
    db.upsert(Record(1, [1.0]))
    db.upsert(Record(1, [2.0]))
    db.upsert_many([1, 2, 2], [[3.0], [4.0], [5.0]])
    assert len(db) == 2
    assert db.is_empty() is False
    assert 1 in db
    assert 2 in db
    assert 3 not in db
    db.delete(1)
    db.delete(2)
    assert len(db) == 0
    assert db.is_empty() is True


def test_dim_is_none_until_the_first_vector(make_db: MakeDb) -> None:
    db = make_db()
    assert db.dim is None
    with pytest.raises(InvalidArgument):
        db.upsert_many([-1], [[1.0, 2.0]])
    assert db.dim is None
    db.upsert_many([1], np.zeros((1, 128)))
    assert db.dim == 128


def test_payloads_survive_exactly(make_db: MakeDb, reopen: Reopen) -> None:
    payload = {
        "bytes": b"\x00\xff",
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "nested": [1, [2, {"deep": None}], {"$k": "v"}],
        "big": 2**63 - 1,
        "small": -(2**63),
        "text": "héllo ✓",
        "flag": False,
    }
    db = make_db()
    db.upsert_many([1, 2, 3], [[1.0], [2.0], [3.0]], [payload, {}, None])
    for reopened in (False, True):
        handle = reopen(db) if reopened else db
        one = handle.get(1)
        assert one is not None
        assert one.payload == payload
        assert type(one.payload["flag"]) is bool  # type: ignore[index]
        assert handle.get(2).payload == {}  # type: ignore[union-attr]
        assert handle.get(2).payload is not None  # type: ignore[union-attr]
        assert handle.get(3).payload is None  # type: ignore[union-attr]


def test_an_empty_database_closes_and_reopens(make_db: MakeDb, reopen: Reopen) -> None:
    db = reopen(make_db())
    assert len(db) == 0
    assert db.dim is None
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]], [{}, None])
    db.delete(1)
    db.delete(2)
    db = reopen(db)
    assert len(db) == 0
    assert db.dim == 2
    assert db.search([1.0, 2.0], 3) == []


# --- flush / close / context manager -----------------------------------------------------------------------


def test_flush_keeps_every_write(make_db: MakeDb, reopen: Reopen) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]], [{"a": 1}, None])
    db.delete(2)
    assert db.flush() is None
    assert state(db, [1, 2]) == [Record(1, [1.0, 2.0], {"a": 1}), None]
    db = reopen(db)
    assert state(db, [1, 2]) == [Record(1, [1.0, 2.0], {"a": 1}), None]


def test_flush_on_an_empty_in_memory_database_is_a_no_op() -> None:
    with iqdb.open_in_memory() as db:
        db.flush()
        db.flush()
        assert len(db) == 0
        assert db.dim is None


def test_close_is_idempotent(make_db: MakeDb) -> None:
    db = make_db()
    db.upsert(Record(1, [1.0]))
    db.close()
    db.close()
    with pytest.raises(Closed):
        len(db)


_AFTER_CLOSE: list[tuple[str, Callable[[Iqdb], object]]] = [
    ("device", lambda db: db.device),
    ("dim", lambda db: db.dim),
    ("len", len),
    ("is_empty", lambda db: db.is_empty()),
    ("in", lambda db: 1 in db),
    ("upsert", lambda db: db.upsert(Record(3, [1.0, 2.0]))),
    ("upsert_many", lambda db: db.upsert_many([3], [[1.0, 2.0]])),
    ("upsert_many-empty", lambda db: db.upsert_many([], [])),
    ("get", lambda db: db.get(1)),
    ("delete", lambda db: db.delete(1)),
    ("delete-absent", lambda db: db.delete(99)),
    ("search", lambda db: db.search([1.0, 2.0], 1)),
    ("search-k0", lambda db: db.search([1.0, 2.0], 0)),
    ("search_with", lambda db: db.search_with([1.0, 2.0], 1, "l2", lambda r: True)),
    ("search_batch", lambda db: db.search_batch([[1.0, 2.0]], 1)),
    ("flush", lambda db: db.flush()),
    ("compact", lambda db: db.compact()),
    ("check", lambda db: db.check()),
    ("with", lambda db: db.__enter__()),
]


@pytest.mark.parametrize("call", [c for _, c in _AFTER_CLOSE], ids=[name for name, _ in _AFTER_CLOSE])
def test_every_call_on_a_closed_handle_raises_closed(make_db: MakeDb, call: Callable[[Iqdb], object]) -> None:
    db = make_db()
    db.upsert_many([1, 2], [[1.0, 2.0], [3.0, 4.0]])
    db.close()
    with pytest.raises(Closed):
        call(db)


def test_closed_is_an_iqdb_error() -> None:
    assert issubclass(Closed, iqdb.IqdbError)


def test_repr_works_open_and_closed(make_db: MakeDb) -> None:
    db = make_db()
    assert "Iqdb" in repr(db)
    db.close()
    assert "closed" in repr(db)


def test_context_manager_returns_the_handle_and_closes_it(make_db: MakeDb) -> None:
    db = make_db()
    with db as entered:
        assert entered is db
        db.upsert(Record(1, [1.0]))
        assert len(db) == 1
    with pytest.raises(Closed):
        len(db)


def test_context_manager_closes_on_error_and_lets_it_through(make_db: MakeDb) -> None:
    db = make_db()
    with pytest.raises(KeyError, match="boom"), db:
        db.upsert(Record(1, [1.0]))
        raise KeyError("boom")
    with pytest.raises(Closed):
        db.get(1)


def test_module_and_classmethod_in_memory_context_manager() -> None:
    with iqdb.open_in_memory() as db:
        db.upsert(Record(1, [1.0, 2.0]))
        assert db.get(1) == Record(1, [1.0, 2.0])
    with pytest.raises(Closed):
        db.search([1.0, 2.0], 1)
