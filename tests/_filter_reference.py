"""A plain-Python brute force for filters: evaluates a filter's dict form over one record.

>>> ref_matches({"$and": [{"kind": {"$eq": "doc"}}, {"year": {"$gte": 2020}}]}, 7, {"kind": "doc", "year": 2021.5})
True
>>> ref_matches({"n": {"$eq": 1}}, 7, {"n": True}), ref_matches({"$not": {"n": {"$lt": 5}}}, 7, None)
(False, True)

Written from the contract (``../shared/API.md`` and the issue), sharing no code with
``iqdb._filters``:

* a comparison reads the field at a dotted path through nested objects only (a key that itself
  holds a dot cannot be reached); ``"$id"`` is the record id; a missing field, or a record
  without a payload, makes every comparison false;
* equality holds within a kind only: numbers (``int`` and ``float``, compared exactly, which is
  what Python's own ``int == float`` does; ``bool`` is not a number), booleans, strings, bytes,
  ``None``, lists and objects (element by element, by this same equality); NaN equals nothing;
* ordering holds only within numbers, strings (code point order), bytes and booleans;
* ``$ne`` / ``$nin``: a present field equal to none of the values (of any type); ``$not``:
  plain negation; ``$exists``: the key is present (even holding ``None``); ``$contains``: the
  field is a list holding an element equal to the value.

The dict form is parsed here as a user would write it: several keys in one object must all hold,
a field's body is an object of ``$`` operators (all must hold) or a plain value (``$eq``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["MISSING", "kind", "matching_rows", "plain", "ref_equal", "ref_ids", "ref_matches", "resolve"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def kind(v: Any) -> str:
    """The kind a value compares within."""
    if v is None:
        return "null"
    if type(v) is bool:
        return "bool"
    if type(v) in (int, float):
        return "num"
    if type(v) is str:
        return "str"
    if type(v) is bytes:
        return "bytes"
    if isinstance(v, list):
        return "list"
    if isinstance(v, Mapping):
        return "dict"
    raise TypeError(f"not a payload value: {v!r}")


def ref_equal(a: Any, b: Any) -> bool:
    """Filter equality of two payload values."""
    ka, kb = kind(a), kind(b)
    if ka != kb:
        return False
    if ka == "list":
        return len(a) == len(b) and all(ref_equal(x, y) for x, y in zip(a, b))
    if ka == "dict":
        return set(a) == set(b) and all(ref_equal(a[key], b[key]) for key in a)
    if ka == "num":
        # Exact: Python compares an int and a float by their exact values; NaN equals nothing.
        return bool(a == b)
    return bool(a == b)


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "$lt": operator.lt,
    "$lte": operator.le,
    "$gt": operator.gt,
    "$gte": operator.ge,
}
_ORDERED_KINDS = {"num", "str", "bytes", "bool"}


def _ordered(op: str, a: Any, b: Any) -> bool:
    ka = kind(a)
    if ka != kind(b) or ka not in _ORDERED_KINDS:
        return False
    return bool(_ORDER[op](a, b))  # NaN: every IEEE comparison is false


def resolve(path: str, rid: int, payload: Mapping[str, Any] | None) -> Any:
    """The value at ``path`` of a record, or :data:`MISSING`."""
    if path == "$id":
        return rid
    obj: Any = payload
    if obj is None:
        return MISSING
    for part in path.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return MISSING
        obj = obj[part]
    return obj


def _cond(op: str, arg: Any, value: Any) -> bool:
    present = value is not MISSING
    if op == "$exists":
        return present == bool(arg)
    if not present:
        return False
    if op == "$eq":
        return ref_equal(value, arg)
    if op == "$ne":
        return not ref_equal(value, arg)
    if op == "$in":
        return any(ref_equal(value, x) for x in arg)
    if op == "$nin":
        return not any(ref_equal(value, x) for x in arg)
    if op == "$contains":
        return isinstance(value, list) and any(ref_equal(x, arg) for x in value)
    if op in _ORDER:
        return _ordered(op, value, arg)
    raise ValueError(f"unknown operator {op!r}")


def ref_matches(d: Mapping[str, Any], rid: int, payload: Mapping[str, Any] | None) -> bool:
    """Whether the record ``(rid, payload)`` matches the filter whose dict form is ``d``."""
    for key, body in d.items():
        if key == "$and":
            ok = all(ref_matches(c, rid, payload) for c in body)
        elif key == "$or":
            ok = any(ref_matches(c, rid, payload) for c in body)
        elif key == "$not":
            ok = not ref_matches(body, rid, payload)
        else:
            value = resolve(key, rid, payload)
            if isinstance(body, Mapping) and body and all(str(k).startswith("$") for k in body):
                ok = all(_cond(op, arg, value) for op, arg in body.items())
            else:
                ok = _cond("$eq", body, value)
        if not ok:
            return False
    return True


def ref_ids(d: Mapping[str, Any], records: Iterable[tuple[int, Mapping[str, Any] | None]]) -> list[int]:
    """The ids of ``records`` (``(id, payload)`` pairs) that ``d`` matches, in the given order."""
    return [rid for rid, payload in records if ref_matches(d, rid, payload)]


def plain(payload: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A payload as a plain ``dict`` (an ``iqdb.Payload`` is a mapping too)."""
    return None if payload is None else dict(payload.items())


def matching_rows(d: Mapping[str, Any], ids: Sequence[int], payloads: Sequence[Any]) -> list[int]:
    """Positions ``i`` whose record ``(ids[i], payloads[i])`` matches ``d``."""
    return [i for i, (rid, p) in enumerate(zip(ids, payloads)) if ref_matches(d, int(rid), p)]
