"""Filters as values: what ``Field`` builds, the Mongo-style dict form, and their meaning.

>>> from iqdb import Field, Filter
>>> f = (Field("kind") == "doc") & (Field("year") >= 2020)
>>> f
(Field('kind') == 'doc') & (Field('year') >= 2020)
>>> f.to_dict()
{'$and': [{'kind': {'$eq': 'doc'}}, {'year': {'$gte': 2020}}]}
>>> Filter.from_dict({"kind": "doc", "year": {"$gte": 2020}}) == f
True

Semantics (the same on every device and plan; :mod:`iqdb._filters._compile` implements them):

* A comparison looks up the field's value (dotted paths go into nested objects; a key that
  itself contains a dot cannot be reached). A missing field, or a record without a payload,
  makes every comparison false.
* Values compare within their kind only: numbers (``int`` and ``float``, compared exactly as
  numbers; ``bool`` is not a number), booleans, strings, bytes, ``None``, lists and objects (the
  last two by equality only). Across kinds a comparison is false, never an error: ``"1"`` is not
  ``1`` and ``True`` is not ``1``. NaN equals nothing and orders with nothing.
* ``!=`` (``$ne``) matches a present field holding any other value, of any type; ``$nin``
  likewise matches a present field equal to none of the values. ``~`` is plain negation, so
  ``~(Field("g") < 5)`` matches records without ``g``.
* ``exists()`` is true when the key is present, even holding ``None``; ``contains(x)`` when the
  field is a list holding an element equal to ``x``.
* ``Field.id`` is the record id (an unsigned integer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Union

import numpy as np

from .._errors import InvalidArgument
from .._payload import PayloadValue, normalize_value

__all__ = [
    "And",
    "Cmp",
    "Field",
    "Filter",
    "FilterLike",
    "Not",
    "Or",
    "coerce_filter",
]

ID_PATH = "$id"
# op -> (dict operator, repr operator)
_OPS = {
    "eq": ("$eq", "=="),
    "ne": ("$ne", "!="),
    "lt": ("$lt", "<"),
    "le": ("$lte", "<="),
    "gt": ("$gt", ">"),
    "ge": ("$gte", ">="),
    "in": ("$in", None),
    "nin": ("$nin", None),
    "exists": ("$exists", None),
    "contains": ("$contains", None),
}
_FROM_DICT_OP = {dop: op for op, (dop, _) in _OPS.items()}
ORDERING = frozenset({"lt", "le", "gt", "ge"})


def literal_key(value: PayloadValue) -> tuple[Any, ...]:
    """A hashable, type-tagged key of a value: ``1``, ``1.0`` and ``True`` differ, NaN equals
    itself (as a key) and ``-0.0`` is ``0.0``."""
    if value is None:
        return ("n",)
    if type(value) is bool:
        return ("b", value)
    if type(value) is int:
        return ("i", value)
    if type(value) is float:
        return ("f", "nan" if math.isnan(value) else (value + 0.0).hex())
    if type(value) is str:
        return ("s", value)
    if type(value) is bytes:
        return ("y", value)
    if type(value) is list:
        return ("l", *(literal_key(v) for v in value))
    assert type(value) is dict
    return ("d", *sorted((k, literal_key(v)) for k, v in value.items()))


def _literal(value: object, where: str, path: str = "") -> PayloadValue:
    if path == ID_PATH and isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)  # ids reach 2**64 - 1, past a payload int's range
    try:
        return normalize_value(value, "")
    except InvalidArgument as exc:
        raise InvalidArgument(f"filter value of {where} is not a payload value: {exc}") from None


def _check_path(path: object) -> str:
    if not isinstance(path, str):
        raise InvalidArgument(f"field path must be a str, got {type(path).__name__}")
    if path != ID_PATH and (not path or "" in path.split(".") or path.startswith("$")):
        raise InvalidArgument(f"invalid field path {path!r} (dotted keys, none empty, no leading '$')")
    return path


class Filter:
    """A filter over records: build one with :class:`Field`, or from a dict with :meth:`from_dict`.

    Filters are immutable values: hashable, compared by structure, picklable, with a readable
    ``repr``; combine them with ``&``, ``|`` and ``~``.
    """

    __slots__ = ("_hash",)

    def key(self) -> tuple[Any, ...]:
        """The canonical, hashable form (type-tagged literals): equal keys, equal filters."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filter) and self.key() == other.key()

    def __hash__(self) -> int:
        try:
            return self._hash  # type: ignore[attr-defined,no-any-return]
        except AttributeError:
            h = hash(self.key())
            object.__setattr__(self, "_hash", h)
            return h

    def __and__(self, other: object) -> Filter:
        return And((self, coerce_filter(other)))

    def __rand__(self, other: object) -> Filter:
        return And((coerce_filter(other), self))

    def __or__(self, other: object) -> Filter:
        return Or((self, coerce_filter(other)))

    def __ror__(self, other: object) -> Filter:
        return Or((coerce_filter(other), self))

    def __invert__(self) -> Filter:
        return Not(self)

    def __bool__(self) -> bool:
        raise TypeError("a Filter has no truth value: combine filters with &, | and ~, not and/or/not")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Filter.from_dict, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """The Mongo-style dict form; :meth:`from_dict` turns it back into an equal filter."""
        raise NotImplementedError

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Filter:
        """Parse the Mongo-style dict form.

        ``{"kind": "doc", "year": {"$gte": 2020}}`` (several keys: all must hold), ``{"$and":
        [...]}``, ``{"$or": [...]}``, ``{"$not": {...}}``; per field ``$eq $ne $lt $lte $gt $gte
        $in $nin $exists $contains``, or a plain value for ``$eq``. ``"$id"`` names the record id.
        ``{}`` matches every record.

        Raises
        ------
        InvalidArgument
            A malformed filter, naming the bad part.
        """
        return _parse(d, "filter")


FilterLike = Union[Filter, Mapping[str, Any]]  # noqa: UP007 (a runtime alias: Python 3.10 has no Filter | Mapping)


def coerce_filter(f: object) -> Filter:
    """A :class:`Filter` from a filter or its dict form.

    Raises
    ------
    InvalidArgument
        Neither a filter nor a valid dict.
    """
    if isinstance(f, Filter):
        return f
    if isinstance(f, Mapping):
        return Filter.from_dict(f)
    raise InvalidArgument(f"filter must be an iqdb.Filter or a dict, got {type(f).__name__}")


class Cmp(Filter):
    """One condition on one field: ``path op value``."""

    __slots__ = ("op", "path", "value")
    path: str
    op: str
    value: Any  # PayloadValue; a tuple of them for in/nin; bool for exists

    def __init__(self, path: str, op: str, value: Any) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "value", value)

    def key(self) -> tuple[Any, ...]:
        if self.op in ("in", "nin"):
            lit: Any = tuple(sorted({literal_key(v) for v in self.value}))
        elif self.op == "exists":
            lit = True
        else:
            lit = literal_key(self.value)
        return ("cmp", self.path, self.op, lit)

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if self.op in ("in", "nin") else self.value
        return {self.path: {_OPS[self.op][0]: value}}

    def __repr__(self) -> str:
        field = "Field.id" if self.path == ID_PATH else f"Field({self.path!r})"
        sym = _OPS[self.op][1]
        if sym is not None:
            return f"{field} {sym} {self.value!r}"
        if self.op == "exists":
            return f"{field}.exists()"
        if self.op == "contains":
            return f"{field}.contains({self.value!r})"
        method = "isin" if self.op == "in" else "notin"
        return f"{field}.{method}({list(self.value)!r})"


class _Group(Filter):
    __slots__ = ("children",)
    children: tuple[Filter, ...]
    _word: ClassVar[str]
    _sym: ClassVar[str]

    def __init__(self, children: Iterable[Filter]) -> None:
        flat: list[Filter] = []
        for c in children:
            flat.extend(c.children if type(c) is type(self) else (c,))  # type: ignore[attr-defined]
        object.__setattr__(self, "children", tuple(flat))

    def key(self) -> tuple[Any, ...]:
        return (self._word, *(c.key() for c in self.children))

    def to_dict(self) -> dict[str, Any]:
        return {f"${self._word}": [c.to_dict() for c in self.children]}

    def __repr__(self) -> str:
        if not self.children:
            return f"{type(self).__name__}(())"
        return f" {self._sym} ".join(
            f"({c!r})" if isinstance(c, (Cmp, _Group)) and len(self.children) > 1 else repr(c)
            for c in self.children
        )


class And(_Group):
    """All children hold (no children: every record)."""

    __slots__ = ()
    _word, _sym = "and", "&"


class Or(_Group):
    """Any child holds (no children: no record)."""

    __slots__ = ()
    _word, _sym = "or", "|"


class Not(Filter):
    """Plain negation: the records the child does not match, missing fields included."""

    __slots__ = ("child",)
    child: Filter

    def __init__(self, child: Filter) -> None:
        object.__setattr__(self, "child", child)

    def key(self) -> tuple[Any, ...]:
        return ("not", self.child.key())

    def to_dict(self) -> dict[str, Any]:
        return {"$not": self.child.to_dict()}

    def __repr__(self) -> str:
        return f"~({self.child!r})"


class Field:
    """Names a payload field (dotted paths go into nested objects) to build filters from.

    >>> from iqdb import Field
    >>> Field("meta.author").isin(["ann", "bob"]) | ~Field("draft").exists()
    (Field('meta.author').isin(['ann', 'bob'])) | ~(Field('draft').exists())

    ``Field.id`` is the record id.
    """

    __slots__ = ("path",)
    path: str
    id: ClassVar[Field]
    __hash__ = None  # type: ignore[assignment]  # == builds a filter

    def __init__(self, path: str) -> None:
        object.__setattr__(self, "path", _check_path(path))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Field is immutable")

    def __repr__(self) -> str:
        return "Field.id" if self.path == ID_PATH else f"Field({self.path!r})"

    def _cmp(self, op: str, value: object) -> Cmp:
        return Cmp(self.path, op, _literal(value, f"{self!r} {_OPS[op][1]}", self.path))

    def __eq__(self, value: object) -> Cmp:  # type: ignore[override]
        return self._cmp("eq", value)

    def __ne__(self, value: object) -> Cmp:  # type: ignore[override]
        return self._cmp("ne", value)

    def __lt__(self, value: object) -> Cmp:
        return self._cmp("lt", value)

    def __le__(self, value: object) -> Cmp:
        return self._cmp("le", value)

    def __gt__(self, value: object) -> Cmp:
        return self._cmp("gt", value)

    def __ge__(self, value: object) -> Cmp:
        return self._cmp("ge", value)

    def isin(self, values: Iterable[object]) -> Cmp:
        """Equal to any of ``values``."""
        return Cmp(self.path, "in", _values(values, f"{self!r}.isin", self.path))

    def notin(self, values: Iterable[object]) -> Cmp:
        """Present and equal to none of ``values`` (``$nin``)."""
        return Cmp(self.path, "nin", _values(values, f"{self!r}.notin", self.path))

    def between(self, lo: object, hi: object) -> Filter:
        """``lo <= field <= hi`` (inclusive)."""
        return And((self >= lo, self <= hi))

    def exists(self) -> Cmp:
        """The key is present (even holding ``None``)."""
        return Cmp(self.path, "exists", True)

    def contains(self, value: object) -> Cmp:
        """The field is a list holding an element equal to ``value``."""
        return Cmp(self.path, "contains", _literal(value, f"{self!r}.contains"))


_id_field = object.__new__(Field)
object.__setattr__(_id_field, "path", ID_PATH)
Field.id = _id_field


def _values(values: object, where: str, path: str = "") -> tuple[PayloadValue, ...]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise InvalidArgument(f"{where} takes a list of values, got {type(values).__name__}")
    return tuple(_literal(v, where, path) for v in values)


def _parse(d: object, where: str) -> Filter:
    if not isinstance(d, Mapping):
        raise InvalidArgument(f"{where} must be a dict, got {type(d).__name__}")
    parts: list[Filter] = []
    for key, body in d.items():
        here = f"{where}[{key!r}]"
        if key in ("$and", "$or"):
            if isinstance(body, (str, bytes, Mapping)) or not isinstance(body, Sequence):
                raise InvalidArgument(f"{here} must be a list of filters, got {type(body).__name__}")
            kids = [_parse(c, f"{here}[{i}]") for i, c in enumerate(body)]
            parts.append(And(kids) if key == "$and" else Or(kids))
        elif key == "$not":
            parts.append(Not(_parse(body, here)))
        elif not isinstance(key, str):
            raise InvalidArgument(f"{where} has a non-string key {key!r}")
        elif key.startswith("$") and key != ID_PATH:
            raise InvalidArgument(f"{where} has unknown operator {key!r}")
        else:
            parts.append(_parse_field(Field(key) if key != ID_PATH else Field.id, body, here))
    if len(parts) == 1:
        return parts[0]
    return And(parts)


def _parse_field(field: Field, body: object, where: str) -> Filter:
    if not (isinstance(body, Mapping) and body and all(isinstance(k, str) and k[:1] == "$" for k in body)):
        return field == body  # a plain value (an object without operators too) is $eq
    conds: list[Filter] = []
    for dop, value in body.items():
        op = _FROM_DICT_OP.get(dop)
        here = f"{where}[{dop!r}]"
        if op is None:
            raise InvalidArgument(f"{where} has unknown operator {dop!r}")
        if op in ("in", "nin"):
            conds.append(Cmp(field.path, op, _values(value, here, field.path)))
        elif op == "exists":
            if type(value) is not bool:
                raise InvalidArgument(f"{here} must be true or false, got {value!r}")
            conds.append(field.exists() if value else Not(field.exists()))
        else:
            conds.append(Cmp(field.path, op, _literal(value, here, field.path)))
    return conds[0] if len(conds) == 1 else And(conds)
