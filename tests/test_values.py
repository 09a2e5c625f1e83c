"""The value types of API.md's "Values" table, their pickling and JSON forms, and the error tree."""

from __future__ import annotations

import errno
import json
import math
import pickle
import struct
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iqdb
from iqdb import (
    Closed,
    Corrupt,
    DeviceUnavailable,
    DimensionMismatch,
    DistanceMetric,
    InvalidArgument,
    InvalidConfig,
    InvalidVector,
    IqdbError,
    Locked,
    Payload,
    Record,
    RecordId,
    SearchResult,
    StorageError,
    Vector,
)

EMPTY = "vector is empty"
NON_FINITE = "vector contains a non-finite value"


# --- Vector: validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [[], (), np.array([]), np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)],
    ids=["list", "tuple", "f64-array", "f32-array", "int-array"],
)
def test_empty_vector_is_rejected_with_the_exact_reason(data: object) -> None:
    with pytest.raises(InvalidVector, match=EMPTY) as info:
        Vector(data)
    assert info.value.reason == EMPTY


@pytest.mark.parametrize(
    "data",
    [
        [1.0, math.nan],
        [math.inf, 0.0],
        [0.0, -math.inf],
        np.array([np.nan], dtype=np.float32),
        np.array([1.0, np.inf], dtype=np.float64),
        np.array([1e39, 1.0]),  # finite in float64, +inf once stored as float32
        [-3.5e38],  # finite in float64, -inf once stored as float32
    ],
    ids=["nan", "+inf", "-inf", "f32-nan", "f64-inf", "f64-overflow", "list-overflow-negative"],
)
def test_non_finite_vector_is_rejected_with_the_exact_reason(data: object) -> None:
    with pytest.raises(InvalidVector, match=NON_FINITE) as info:
        Vector(data)
    assert info.value.reason == NON_FINITE


def test_largest_float32_values_are_still_valid() -> None:
    big = float(np.finfo(np.float32).max)
    assert Vector([big, -big]).tolist() == [big, -big]


@pytest.mark.parametrize(
    "data",
    [5, 2.5, [[1.0, 2.0]], np.zeros((2, 2)), np.zeros((1, 1, 1))],
    ids=["int", "float", "nested-list", "2-D", "3-D"],
)
def test_input_that_is_not_one_dimensional_is_rejected_naming_the_problem(data: object) -> None:
    with pytest.raises(InvalidVector, match="1-D") as info:
        Vector(data)
    assert info.value.reason not in (EMPTY, NON_FINITE)


@pytest.mark.parametrize(
    "data",
    [
        "ab",
        b"ab",
        bytearray(b"ab"),
        ["a", "b"],
        [1.0, None],
        [1 + 2j],
        {"a": 1.0},
        [[1.0], [1.0, 2.0]],
        object(),
    ],
    ids=["str", "bytes", "bytearray", "str-list", "none", "complex", "dict", "ragged", "object"],
)
def test_non_numeric_input_is_rejected(data: object) -> None:
    with pytest.raises(InvalidVector) as info:
        Vector(data)
    assert info.value.reason not in (EMPTY, NON_FINITE)
    assert info.value.reason


def test_invalid_vector_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=EMPTY):
        Vector([])


def test_zero_vectors_are_valid() -> None:
    v = Vector([0.0, 0.0, 0.0])
    assert v.dim == 3
    assert v.norm() == 0.0
    assert v.norm_squared() == 0.0


class _ArrayLike:
    """Has ``__array__`` but is not a sequence."""

    def __init__(self, values: list[float]) -> None:
        self._values = values

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        return np.array(self._values, dtype=dtype)


class _DLPackOnly:
    """Speaks DLPack and nothing else (like a tensor from another library)."""

    def __init__(self, arr: np.ndarray[Any, Any]) -> None:
        self._arr = arr

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self._arr.__dlpack_device__()


@pytest.mark.parametrize(
    "data",
    [
        [1, 2, 3],
        (1.0, 2.0, 3.0),
        range(1, 4),
        np.array([1, 2, 3], dtype=np.int64),
        np.array([1, 2, 3], dtype=np.uint8),
        np.array([1.0, 2.0, 3.0], dtype=np.float16),
        np.array([1.0, 2.0, 3.0], dtype=np.float64),
        np.array([1.0, 9.0, 2.0, 9.0, 3.0], dtype=np.float32)[::2],
        _ArrayLike([1.0, 2.0, 3.0]),
        _DLPackOnly(np.array([1.0, 2.0, 3.0], dtype=np.float32)),
    ],
    ids=["list", "tuple", "range", "int64", "uint8", "f16", "f64", "strided", "__array__", "dlpack"],
)
def test_any_one_dimensional_real_sequence_or_array_is_accepted(data: object) -> None:
    v = Vector(data)
    assert v.tolist() == [1.0, 2.0, 3.0]
    assert v.to_numpy().dtype == np.float32


def test_values_are_stored_as_float32() -> None:
    v = Vector([0.1, 1e-3])
    assert v.tolist() == [float(np.float32(0.1)), float(np.float32(1e-3))]
    assert v.tolist() != [0.1, 1e-3]


def test_vector_copies_its_input() -> None:
    arr = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    lst = [1.0, 2.0, 3.0]
    va, vl = Vector(arr), Vector(lst)
    arr[0] = 100.0
    lst[0] = 100.0
    assert va.tolist() == [1.0, 2.0, 3.0]
    assert vl.tolist() == [1.0, 2.0, 3.0]


# --- Vector: reading ---------------------------------------------------------------------------


def test_dim_len_and_norms() -> None:
    v = Vector([3, 4])
    assert v.dim == 2
    assert len(v) == 2
    assert v.norm_squared() == 25.0
    assert v.norm() == 5.0
    assert type(v.norm()) is float
    assert type(v.norm_squared()) is float
    assert Vector(np.ones(1000)).dim == 1000


def test_norm_is_computed_without_float32_overflow() -> None:
    big = float(np.finfo(np.float32).max)
    assert Vector([big]).norm() == big


def test_to_numpy_is_a_read_only_float32_array_with_the_data() -> None:
    v = Vector([1.0, 2.0])
    a = v.to_numpy()
    assert a.dtype == np.float32
    assert a.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        a[0] = 5.0
    with pytest.raises(ValueError):
        a.flags.writeable = True
    assert v.tolist() == [1.0, 2.0]


def test_tolist_gives_python_floats() -> None:
    out = Vector(np.array([1, 2], dtype=np.int32)).tolist()
    assert out == [1.0, 2.0]
    assert all(type(x) is float for x in out)


def test_np_asarray_gives_the_float32_data_read_only() -> None:
    v = Vector([1.5, -2.0])
    a = np.asarray(v)
    assert a.dtype == np.float32
    assert a.tolist() == [1.5, -2.0]
    with pytest.raises(ValueError):
        a[0] = 0.0
    with pytest.raises(ValueError):
        a.flags.writeable = True
    assert np.asarray(v, dtype=np.float64).tolist() == [1.5, -2.0]
    assert v.tolist() == [1.5, -2.0]


def test_equality_compares_all_elements_and_returns_bool() -> None:
    a = Vector([1.0, 2.0, 3.0])
    same = a == Vector(np.array([1, 2, 3]))
    differs_last = a == Vector([1.0, 2.0, 4.0])
    prefix = a == Vector([1.0, 2.0])
    assert same is True
    assert differs_last is False
    assert prefix is False
    assert (a != Vector([1.0, 2.0, 4.0])) is True
    assert (a != Vector([1.0, 2.0, 3.0])) is False


def test_vector_is_immutable() -> None:
    v = Vector([1.0, 2.0])
    with pytest.raises(AttributeError):
        v.dim = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        v.extra = 1  # type: ignore[attr-defined]
    assert v.tolist() == [1.0, 2.0]


def test_vector_is_hashable_and_equal_vectors_hash_equal() -> None:
    a = Vector([1.0, 2.0])
    b = Vector(np.array([1, 2], dtype=np.int8))
    assert hash(a) == hash(b)
    assert len({a, b, Vector([2.0, 1.0])}) == 2
    assert {a: "x"}[b] == "x"
    # +0.0 and -0.0 are equal elements, so the vectors are equal and must hash alike.
    assert Vector([0.0, 1.0]) == Vector([-0.0, 1.0])
    assert hash(Vector([0.0, 1.0])) == hash(Vector([-0.0, 1.0]))


def test_vector_from_a_vector_is_equal() -> None:
    v = Vector([1.0, 2.0])
    assert Vector(v) == v


def test_vector_repr_is_readable() -> None:
    assert repr(Vector([1.0, 2.5])) == "Vector([1.0, 2.5])"
    long = repr(Vector(np.arange(100)))
    assert long.startswith("Vector([0.0, 1.0, 2.0")
    assert "dim=100" in long


# --- RecordId -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 42, 2**63, 2**64 - 1])
def test_record_id_accepts_the_full_unsigned_64_bit_range(n: int) -> None:
    rid = RecordId(n)
    assert isinstance(rid, int)
    assert rid == n
    assert int(rid) == n


@pytest.mark.parametrize("n", [-1, 2**64, -(2**70), 2**80])
def test_record_id_out_of_range_is_rejected(n: int) -> None:
    with pytest.raises(InvalidArgument, match="outside"):
        RecordId(n)


@pytest.mark.parametrize(
    "value",
    [True, False, np.bool_(True), 1.0, 2.5, np.float64(3.0), "7", b"7", None, [1]],
    ids=["True", "False", "np.bool_", "1.0", "2.5", "np.float64", "str", "bytes", "None", "list"],
)
def test_record_id_rejects_bools_and_non_integers(value: object) -> None:
    with pytest.raises(InvalidArgument, match="integer"):
        RecordId(value)


@pytest.mark.parametrize(
    "value",
    [np.int8(5), np.int64(5), np.uint16(5), np.uint64(5)],
    ids=["int8", "int64", "uint16", "uint64"],
)
def test_record_id_accepts_numpy_integers(value: object) -> None:
    rid = RecordId(value)
    assert rid == 5
    assert type(rid) is RecordId


def test_record_id_accepts_the_largest_numpy_uint64() -> None:
    assert RecordId(np.uint64(2**64 - 1)) == 2**64 - 1


def test_record_id_rejects_negative_numpy_integers() -> None:
    with pytest.raises(InvalidArgument):
        RecordId(np.int64(-1))


def test_record_id_str_and_repr() -> None:
    assert str(RecordId(42)) == "42"
    assert repr(RecordId(42)) == "RecordId(42)"
    assert f"{RecordId(7)}" == "7"


def test_record_id_hashes_and_compares_as_its_int() -> None:
    assert RecordId(5) == 5
    assert hash(RecordId(5)) == hash(5)
    assert {5: "x"}[RecordId(5)] == "x"
    assert RecordId(RecordId(9)) == 9


def test_invalid_argument_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        RecordId(-1)


# --- PayloadValue normalisation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "kind"),
    [
        (np.int64(-3), -3, int),
        (np.uint8(200), 200, int),
        (np.float32(1.5), 1.5, float),
        (np.float64(-0.25), -0.25, float),
        (np.bool_(True), True, bool),
        (np.bool_(False), False, bool),
        (np.str_("text"), "text", str),
        (np.bytes_(b"raw"), b"raw", bytes),
    ],
    ids=["int64", "uint8", "float32", "float64", "bool_True", "bool_False", "str_", "bytes_"],
)
def test_numpy_scalars_become_python_scalars(value: object, expected: object, kind: type) -> None:
    p = Payload({"k": value})
    assert p["k"] == expected
    assert type(p["k"]) is kind


def test_tuples_become_lists_and_bytearray_becomes_bytes_at_any_depth() -> None:
    p = Payload({"t": (1, (2, 3), {"inner": (4,)}), "b": bytearray(b"\x00\x01"), "l": [bytearray(b"z")]})
    assert p["t"] == [1, [2, 3], {"inner": [4]}]
    assert type(p["t"]) is list
    assert type(p["t"][1]) is list  # type: ignore[index]
    assert type(p["t"][2]["inner"]) is list  # type: ignore[index, call-overload]
    assert p["b"] == b"\x00\x01"
    assert type(p["b"]) is bytes
    assert p["l"] == [b"z"]
    assert type(p["l"][0]) is bytes  # type: ignore[index]


def test_every_payload_value_kind_is_kept() -> None:
    items = {
        "none": None,
        "bool": False,
        "int": -(2**63),
        "int_max": 2**63 - 1,
        "float": 0.5,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "str": "héllo ✓",
        "bytes": b"\xff\x00",
        "list": [1, "a", None, [2.5]],
        "dict": {"x": {"y": [True]}},
    }
    p = Payload(items)
    assert p == items
    assert math.isnan(p["nan"])  # type: ignore[arg-type]
    assert p["inf"] == math.inf
    assert p["ninf"] == -math.inf
    assert type(p["bool"]) is bool


class _Secret:
    def __repr__(self) -> str:
        return "SECRET-CONTENT"

    __str__ = __repr__


@pytest.mark.parametrize(
    "value",
    [{"SECRET-CONTENT"}, frozenset({"SECRET-CONTENT"}), _Secret(), 1 + 2j, np.array([1, 2]), object()],
    ids=["set", "frozenset", "custom", "complex", "ndarray", "object"],
)
def test_unsupported_values_raise_naming_the_key_not_the_value(value: object) -> None:
    with pytest.raises(InvalidArgument, match="'the_key'") as info:
        Payload({"the_key": value})
    assert "SECRET" not in str(info.value)


def test_unsupported_nested_value_names_its_path() -> None:
    with pytest.raises(InvalidArgument, match=r"outer\.inner\[1\]") as info:
        Payload({"outer": {"inner": [1, _Secret()]}})
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    "bad", ["\ud800", "secret\udfff", "ok\ud83d"], ids=["lone-high", "lone-low", "half-pair"]
)
def test_strings_that_cannot_be_utf8_encoded_raise_naming_the_key(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="'k'") as info:
        Payload({"k": bad})
    message = str(info.value)
    assert "secret" not in message
    assert bad not in message
    assert repr(bad) not in message


def test_non_utf8_string_in_a_list_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="UTF-8"):
        Payload({"k": ["fine", "\ud800"]})


def test_non_utf8_key_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="UTF-8"):
        Payload({"\ud800": 1})


@pytest.mark.parametrize(
    "value", [2**63, -(2**63) - 1, 2**64, np.uint64(2**63)], ids=["2**63", "-2**63-1", "2**64", "u64"]
)
def test_ints_outside_signed_64_bits_are_rejected_without_echoing_them(value: object) -> None:
    with pytest.raises(InvalidArgument, match="'n'") as info:
        Payload({"n": value})
    assert str(int(value)) not in str(info.value)  # type: ignore[call-overload]


def test_non_string_keys_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="str"):
        Payload({1: "x"})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument, match="str"):
        Payload({"ok": {2: "x"}})


def test_payload_value_type_is_exported() -> None:
    assert iqdb.PayloadValue is not None
    assert "PayloadValue" in iqdb.__all__


# --- Payload ---------------------------------------------------------------------------------------


def test_payload_iterates_in_key_order() -> None:
    p = Payload({"b": 1, "c": 2, "a": 3})
    p["0"] = 4
    assert list(p) == ["0", "a", "b", "c"]
    assert list(p.keys()) == ["0", "a", "b", "c"]
    assert list(p.items()) == [("0", 4), ("a", 3), ("b", 1), ("c", 2)]
    assert list(p.values()) == [4, 3, 1, 2]


def test_insert_and_remove_return_the_previous_value() -> None:
    p = Payload()
    assert p.insert("a", 1) is None
    assert p.insert("a", 2) == 1
    assert p["a"] == 2
    assert p.remove("a") == 2
    assert "a" not in p
    assert p.remove("a") is None
    assert len(p) == 0


def test_insert_normalises_and_validates() -> None:
    p = Payload()
    p.insert("t", (1, 2))
    assert p["t"] == [1, 2]
    with pytest.raises(InvalidArgument, match="'s'"):
        p.insert("s", {1, 2})
    assert "s" not in p


def test_payload_mapping_protocol() -> None:
    p = Payload({"a": 1, "b": None})
    assert p["a"] == 1
    assert p.get("a") == 1
    assert p.get("missing") is None
    assert p.get("missing", 7) == 7
    assert "a" in p
    assert "b" in p
    assert "z" not in p
    assert len(p) == 2
    with pytest.raises(KeyError):
        p["missing"]


def test_payload_is_a_mutable_mapping() -> None:
    p = Payload({"a": 1})
    assert isinstance(p, MutableMapping)
    p["b"] = (2,)
    p.update({"c": 3})
    del p["a"]
    assert p == {"b": [2], "c": 3}
    assert p.pop("c") == 3
    assert p.setdefault("d", 4) == 4
    assert dict(p) == {"b": [2], "d": 4}
    with pytest.raises(InvalidArgument):
        p["bad"] = object()
    with pytest.raises(InvalidArgument):
        p[5] = 1  # type: ignore[index]


def test_payload_equals_a_dict_with_the_same_items() -> None:
    p = Payload({"a": 1, "b": [1, {"c": b"x"}]})
    assert p == {"b": [1, {"c": b"x"}], "a": 1}
    assert {"a": 1, "b": [1, {"c": b"x"}]} == p
    assert p != {"a": 1}
    assert p != {"a": 2, "b": [1, {"c": b"x"}]}
    assert p == Payload({"b": [1, {"c": b"x"}], "a": 1})
    assert Payload() == {}
    assert Payload(None) == {}


def test_payload_copies_the_mapping_it_is_built_from() -> None:
    src: dict[str, Any] = {"l": [1, 2], "d": {"x": 1}}
    p = Payload(src)
    src["l"].append(3)
    src["d"]["x"] = 2
    src["new"] = 1
    assert p == {"l": [1, 2], "d": {"x": 1}}


def test_payload_rejects_a_non_mapping() -> None:
    with pytest.raises(InvalidArgument, match="mapping"):
        Payload([("a", 1)])  # type: ignore[arg-type]


def test_payload_repr_is_readable() -> None:
    assert repr(Payload({"b": 2, "a": "x"})) == "Payload({'a': 'x', 'b': 2})"


# --- Record ----------------------------------------------------------------------------------------


def test_record_fields() -> None:
    r = Record(7, [1.0, 2.0], {"k": "v"})
    assert type(r.id) is RecordId
    assert r.id == 7
    assert r.vector == Vector([1.0, 2.0])
    assert isinstance(r.payload, Payload)
    assert r.payload == {"k": "v"}
    assert Record(7, [1.0, 2.0]).payload is None


@pytest.mark.parametrize(
    "vector",
    [[1.0, 2.0], (1, 2), np.array([1.0, 2.0]), np.array([1, 2], dtype=np.int16), Vector([1.0, 2.0])],
    ids=["list", "tuple", "f64", "int16", "Vector"],
)
def test_record_vector_may_be_any_array_like(vector: object) -> None:
    r = Record(1, vector)
    assert isinstance(r.vector, Vector)
    assert r.vector == Vector([1.0, 2.0])


def test_record_equality_by_value() -> None:
    base = Record(1, [1.0, 2.0], {"a": [1, 2]})
    assert base == Record(RecordId(1), np.array([1.0, 2.0]), Payload({"a": (1, 2)}))
    assert base != Record(2, [1.0, 2.0], {"a": [1, 2]})
    assert base != Record(1, [1.0, 2.5], {"a": [1, 2]})
    assert base != Record(1, [1.0, 2.0], {"a": [1, 3]})
    assert base != Record(1, [1.0, 2.0])
    # NaN payload values are values: a record equals its own copy.
    assert Record(1, [1.0], {"x": math.nan}) == Record(1, [1.0], {"x": math.nan})


def test_empty_payload_is_distinct_from_none() -> None:
    empty = Record(1, [1.0], {})
    none = Record(1, [1.0], None)
    assert empty.payload is not None
    assert empty.payload == {}
    assert none.payload is None
    assert empty != none


def test_with_payload_builds_the_same_record() -> None:
    assert Record.with_payload(3, [1.0], {"a": 1}) == Record(3, [1.0], {"a": 1})
    assert Record.with_payload(3, [1.0], {}).payload == {}
    assert Record.with_payload(3, [1.0], None).payload is None


def test_record_copies_the_payload_it_is_given() -> None:
    src = Payload({"l": [1]})
    r = Record(1, [1.0], src)
    src["l"].append(2)  # type: ignore[union-attr]
    src["new"] = 1
    assert r.payload == {"l": [1]}


def test_record_validates_its_parts() -> None:
    with pytest.raises(InvalidArgument):
        Record(-1, [1.0])
    with pytest.raises(InvalidArgument):
        Record(True, [1.0])
    with pytest.raises(InvalidVector, match=NON_FINITE):
        Record(1, [math.nan])
    with pytest.raises(InvalidVector, match=EMPTY):
        Record(1, [])
    with pytest.raises(InvalidArgument, match="'p'"):
        Record(1, [1.0], {"p": object()})
    with pytest.raises(InvalidArgument):
        Record(1, [1.0], [("a", 1)])  # type: ignore[arg-type]


def test_record_fields_cannot_be_reassigned() -> None:
    r = Record(1, [1.0])
    with pytest.raises(AttributeError):
        r.id = RecordId(2)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        r.payload = None  # type: ignore[misc]
    assert r.id == 1


def test_record_repr_is_readable() -> None:
    text = repr(Record(5, [1.0, 2.0], {"a": 1}))
    assert "5" in text
    assert "Vector([1.0, 2.0])" in text
    assert "'a': 1" in text


# --- DistanceMetric ----------------------------------------------------------------------------------


def test_metric_values_and_lookup_by_string() -> None:
    assert [m.value for m in DistanceMetric] == ["l2", "cosine", "dot"]
    assert DistanceMetric("l2") is DistanceMetric.L2
    assert DistanceMetric("cosine") is DistanceMetric.COSINE
    assert DistanceMetric("dot") is DistanceMetric.DOT
    assert DistanceMetric.L2 == "l2"


def test_l2_is_the_true_euclidean_distance_not_squared() -> None:
    assert DistanceMetric.L2.distance(Vector([0.0, 0.0]), Vector([3.0, 4.0])) == 5.0
    assert DistanceMetric.L2.distance([1.0, 1.0], [1.0, 1.0]) == 0.0


def test_cosine_is_one_minus_cosine_similarity() -> None:
    assert DistanceMetric.COSINE.distance([1.0, 0.0], [0.0, 2.0]) == 1.0
    assert DistanceMetric.COSINE.distance([1.0, 0.0], [-3.0, 0.0]) == 2.0
    assert DistanceMetric.COSINE.distance([1.0, 0.0], [5.0, 0.0]) == 0.0
    assert DistanceMetric.COSINE.distance([1.0, 0.0], [1.0, 1.0]) == pytest.approx(
        1 - 1 / math.sqrt(2), abs=1e-15
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [([0.0, 0.0], [1.0, 2.0]), ([1.0, 2.0], [0.0, 0.0]), ([0.0], [0.0])],
    ids=["left", "right", "both"],
)
def test_cosine_with_a_zero_vector_is_nan(a: list[float], b: list[float]) -> None:
    assert math.isnan(DistanceMetric.COSINE.distance(a, b))


def test_dot_is_the_negated_inner_product() -> None:
    assert DistanceMetric.DOT.distance([1.0, 2.0], [3.0, 4.0]) == -11.0
    assert DistanceMetric.DOT.distance([1.0, 2.0], [-3.0, 0.0]) == 3.0


def test_distances_match_float64_formulas_on_random_vectors() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        d = int(rng.integers(1, 40))
        a32 = rng.normal(size=d).astype(np.float32)
        b32 = rng.normal(size=d).astype(np.float32)
        a, b = a32.astype(np.float64), b32.astype(np.float64)
        l2 = math.sqrt(float(np.sum((a - b) ** 2)))
        dot = float(np.dot(a, b))
        cos = 1.0 - dot / math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
        assert DistanceMetric.L2.distance(a32, b32) == pytest.approx(l2, rel=1e-12, abs=1e-12)
        assert DistanceMetric.DOT.distance(a32, b32) == pytest.approx(-dot, rel=1e-12, abs=1e-12)
        assert DistanceMetric.COSINE.distance(a32, b32) == pytest.approx(cos, rel=1e-12, abs=1e-12)
        assert 0.0 <= DistanceMetric.COSINE.distance(a32, b32) <= 2.0


def test_distance_returns_a_python_float() -> None:
    for metric in DistanceMetric:
        assert type(metric.distance([1.0, 2.0], np.array([2.0, 1.0]))) is float


def test_distance_dimension_mismatch_names_left_and_right() -> None:
    with pytest.raises(DimensionMismatch) as info:
        DistanceMetric.L2.distance(Vector([1.0, 2.0]), Vector([1.0, 2.0, 3.0]))
    assert (info.value.left, info.value.right) == (2, 3)
    with pytest.raises(DimensionMismatch) as info:
        DistanceMetric.COSINE.distance([1.0, 2.0, 3.0, 4.0], [1.0])
    assert (info.value.left, info.value.right) == (4, 1)


def test_distance_validates_its_vectors() -> None:
    with pytest.raises(InvalidVector, match=NON_FINITE):
        DistanceMetric.DOT.distance([math.nan], [1.0])
    with pytest.raises(InvalidVector, match=EMPTY):
        DistanceMetric.DOT.distance([1.0], [])


def test_metric_repr_is_readable() -> None:
    assert repr(DistanceMetric.COSINE) == "DistanceMetric.COSINE"


# --- SearchResult -------------------------------------------------------------------------------------


def test_search_result_fields_and_equality() -> None:
    r = SearchResult(RecordId(3), 0.25, Payload({"a": 1}))
    assert type(r.id) is RecordId
    assert r.id == 3
    assert type(r.score) is float
    assert r.score == 0.25
    assert r.payload == {"a": 1}
    assert r == SearchResult(RecordId(3), 0.25, Payload({"a": 1}))
    assert r != SearchResult(RecordId(4), 0.25, Payload({"a": 1}))
    assert r != SearchResult(RecordId(3), 0.5, Payload({"a": 1}))
    assert r != SearchResult(RecordId(3), 0.25, None)
    assert SearchResult(RecordId(3), 0.25, Payload()) != SearchResult(RecordId(3), 0.25, None)
    assert SearchResult(RecordId(1), math.nan) == SearchResult(RecordId(1), math.nan)


def test_search_result_built_by_hand_is_normalised() -> None:
    r = SearchResult(3, np.float32(0.5), {"t": (1, 2)})  # type: ignore[arg-type]
    assert type(r.id) is RecordId
    assert type(r.score) is float
    assert isinstance(r.payload, Payload)
    assert r.payload == {"t": [1, 2]}
    assert SearchResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(InvalidArgument):
        SearchResult(-1, 0.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        SearchResult(RecordId(1), "0.5")  # type: ignore[arg-type]


def test_search_result_repr_is_readable() -> None:
    text = repr(SearchResult(RecordId(3), 0.25, None))
    assert "3" in text
    assert "0.25" in text


# --- pickling -----------------------------------------------------------------------------------------

RICH_PAYLOAD: dict[str, Any] = {
    "bytes": b"\x00\xffraw",
    "nan": math.nan,
    "inf": math.inf,
    "ninf": -math.inf,
    "nested": [1, [2, {"deep": [None, True, -0.5]}], {"k": "v"}],
    "$dollar": {"$float": "nan", "$bytes": "not-base64", "$dict": {}},
    "$float": "looks like a tag",
    "empty_list": [],
    "empty_dict": {},
    "big": 2**63 - 1,
    "small": -(2**63),
    "text": "héllo ✓ \x00",
}


@pytest.mark.parametrize(
    "value",
    [
        Vector([1.5, -2.0, 0.0]),
        Vector(np.linspace(-1, 1, 300)),
        RecordId(2**64 - 1),
        Payload(RICH_PAYLOAD),
        Payload(),
        Record(1, [1.0, 2.0]),
        Record(2, [1.0, 2.0], {}),
        Record(2**64 - 1, [3.0], RICH_PAYLOAD),
        SearchResult(RecordId(9), 0.125, Payload(RICH_PAYLOAD)),
        SearchResult(RecordId(9), math.nan, None),
        SearchResult(RecordId(9), -math.inf, Payload()),
    ],
    ids=[
        "vector",
        "vector-long",
        "record-id",
        "payload",
        "payload-empty",
        "record-none",
        "record-empty",
        "record-rich",
        "result",
        "result-nan",
        "result-empty",
    ],
)
def test_values_pickle_round_trip(value: object) -> None:
    back = pickle.loads(pickle.dumps(value))
    assert type(back) is type(value)
    assert back == value
    if isinstance(value, Record):
        assert (back.payload is None) == (value.payload is None)


def test_pickled_vector_stays_immutable_and_hashable() -> None:
    v = pickle.loads(pickle.dumps(Vector([1.0, 2.0])))
    assert hash(v) == hash(Vector([1.0, 2.0]))
    with pytest.raises(ValueError):
        v.to_numpy()[0] = 3.0


@pytest.mark.parametrize("metric", list(DistanceMetric))
def test_metric_pickles_to_the_same_member(metric: DistanceMetric) -> None:
    assert pickle.loads(pickle.dumps(metric)) is metric


def test_errors_pickle_with_their_attributes() -> None:
    iv = pickle.loads(pickle.dumps(InvalidVector(EMPTY)))
    assert type(iv) is InvalidVector
    assert iv.reason == EMPTY
    dm = pickle.loads(pickle.dumps(DimensionMismatch(left=3, right=4)))
    assert (dm.left, dm.right) == (3, 4)
    se = pickle.loads(pickle.dumps(StorageError("no such file", errno.ENOENT, "/x/snap")))
    assert type(se) is StorageError
    assert (se.errno, se.filename) == (errno.ENOENT, "/x/snap")


# --- JSON forms ---------------------------------------------------------------------------------------


def _through_json(data: Mapping[str, Any]) -> Any:
    # allow_nan=False: the data must be strict JSON, so non-finite floats have to be encoded.
    return json.loads(json.dumps(data, allow_nan=False))


@pytest.mark.parametrize(
    "record",
    [
        Record(1, [1.0, -2.5, 3.25]),
        Record(2, [0.0], {}),
        Record(2**64 - 1, [float(np.float32(0.1)), 1e-30, 3e38], RICH_PAYLOAD),
        Record(3, [1.0], {"only": {"$float": "inf"}}),
        Record(4, [1.0], {"$bytes": "AAAA"}),
        Record(5, [1.0], {"$dict": {"x": 1}}),
        Record(6, [1.0], {"list_of_tags": [{"$float": "nan"}, {"$bytes": "zz"}, b"\x01"]}),
    ],
    ids=[
        "no-payload",
        "empty-payload",
        "rich",
        "tag-lookalike",
        "bytes-tag-key",
        "dict-tag-key",
        "tags-in-list",
    ],
)
def test_record_to_dict_from_dict_round_trips_through_json(record: Record) -> None:
    back = Record.from_dict(_through_json(record.to_dict()))
    assert back == record
    assert (back.payload is None) == (record.payload is None)
    if record.payload is not None:
        assert back.payload is not None
        assert len(back.payload) == len(record.payload)
        for key, value in record.payload.items():
            assert type(back.payload[key]) is type(value)


def test_record_json_keeps_bytes_and_non_finite_floats_exactly() -> None:
    back = Record.from_dict(_through_json(Record(1, [1.0], RICH_PAYLOAD).to_dict()))
    assert back.payload is not None
    assert back.payload["bytes"] == b"\x00\xffraw"
    assert type(back.payload["bytes"]) is bytes
    assert math.isnan(back.payload["nan"])  # type: ignore[arg-type]
    assert back.payload["inf"] == math.inf
    assert back.payload["ninf"] == -math.inf
    assert back.payload["$dollar"] == {"$float": "nan", "$bytes": "not-base64", "$dict": {}}
    assert back.payload["$float"] == "looks like a tag"


@pytest.mark.parametrize(
    "result",
    [
        SearchResult(RecordId(1), 0.5, None),
        SearchResult(RecordId(1), 0.5, Payload()),
        SearchResult(RecordId(2**64 - 1), math.nan, Payload(RICH_PAYLOAD)),
        SearchResult(RecordId(3), math.inf, None),
        SearchResult(RecordId(4), -math.inf, Payload({"$x": b"y"})),
        SearchResult(RecordId(5), -1234.5678, Payload({"a": [1, {"b": None}]})),
    ],
    ids=["none", "empty", "nan-rich", "inf", "ninf-dollar", "nested"],
)
def test_search_result_to_dict_from_dict_round_trips_through_json(result: SearchResult) -> None:
    back = SearchResult.from_dict(_through_json(result.to_dict()))
    assert back == result
    assert type(back.id) is RecordId
    assert type(back.score) is float
    assert (back.payload is None) == (result.payload is None)


def test_from_dict_rejects_missing_keys() -> None:
    with pytest.raises(InvalidArgument, match="vector"):
        Record.from_dict({"id": 1})
    with pytest.raises(InvalidArgument, match="score"):
        SearchResult.from_dict({"id": 1})


# --- the error tree -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        InvalidVector,
        DimensionMismatch,
        InvalidArgument,
        InvalidConfig,
        Corrupt,
        StorageError,
        Closed,
        Locked,
        DeviceUnavailable,
    ],
)
def test_every_error_is_an_iqdb_error(cls: type[Exception]) -> None:
    assert issubclass(cls, IqdbError)
    assert issubclass(IqdbError, Exception)


@pytest.mark.parametrize("cls", [InvalidVector, DimensionMismatch, InvalidArgument])
def test_value_errors(cls: type[Exception]) -> None:
    assert issubclass(cls, ValueError)


def test_storage_error_is_an_os_error_with_errno_and_filename() -> None:
    cause = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/db/snap")
    with pytest.raises(OSError) as info:
        try:
            raise cause
        except OSError as exc:
            raise StorageError(str(exc), exc.errno, exc.filename) from exc
    err = info.value
    assert isinstance(err, StorageError)
    assert isinstance(err, IqdbError)
    assert err.errno == errno.ENOENT
    assert err.filename == "/data/db/snap"
    assert err.__cause__ is cause
    assert "/data/db/snap" in str(err)


def test_storage_error_without_errno() -> None:
    err = StorageError("disk full somewhere")
    assert err.errno is None
    assert err.filename is None
    assert "disk full somewhere" in str(err)


def test_dimension_mismatch_carries_left_and_right() -> None:
    err = DimensionMismatch(left=3, right=128)
    assert (err.left, err.right) == (3, 128)
    assert "3" in str(err)
    assert "128" in str(err)


def test_invalid_vector_carries_its_reason() -> None:
    err = InvalidVector(NON_FINITE)
    assert err.reason == NON_FINITE
    assert NON_FINITE in str(err)


_payload_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.binary(max_size=6),
)
_payload_values = st.recursive(
    _payload_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _payload_values, max_size=6))
def test_the_fast_payload_encoder_writes_the_defining_form(items: dict[str, Any]) -> None:
    """``encode_payload`` inlines the top level (strings, ints, floats; cached key heads): its bytes
    are exactly those of the recursive ``_encode_into`` that defines the binary form, and decode
    back to the payload."""
    from iqdb._payload import _encode_into, decode_payload, encode_payload

    p = Payload(items)
    want = bytearray()
    _encode_into(p._items, want)
    got = encode_payload(p)
    assert got == bytes(want)
    back = decode_payload(got)
    assert back is not None and encode_payload(back) == got


def _decode_reference(raw: bytes) -> Any:
    """The defining recursive reader over the whole payload: ``("ok", items)`` or ``("corrupt",
    message)``."""
    from iqdb._payload import _decode_checked

    try:
        return ("ok", _decode_checked(raw)._items)
    except Corrupt as exc:
        return ("corrupt", str(exc))


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=5), _payload_values, max_size=6),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
    st.integers(-3, 3),
)
def test_the_fast_payload_decoder_reads_as_the_defining_form(
    items: dict[str, Any], flips: list[tuple[int, int]], cut: int
) -> None:
    """``decode_payload`` reads the top level inline: on the encoding of any payload, and on any
    damage to it (bytes overwritten, cut short or extended), it answers exactly what the
    recursive reader answers: the same items, or ``Corrupt`` with the same message."""
    from iqdb._payload import decode_payload, encode_payload

    good = encode_payload(Payload(items))
    assert good is not None
    variants = [good]
    damaged = bytearray(good)
    for at, value in flips:
        damaged[at % len(damaged)] = value
    variants.append(bytes(damaged))
    variants.append(good[:cut] if cut < 0 else good + bytes(cut))
    for raw in variants:
        want = _decode_reference(raw)
        try:
            got: Any = ("ok", decode_payload(raw)._items)  # type: ignore[union-attr]
        except Corrupt as exc:
            got = ("corrupt", str(exc))
        assert got[0] == want[0] and ((got[0] == "corrupt" and got == want) or _same(got[1], want[1]))
        if raw is good:
            assert got[0] == "ok" and _same(got[1], Payload(items)._items)


def _same(a: Any, b: Any) -> bool:
    """Equality that tells types apart and NaN from NaN (float bits)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)
