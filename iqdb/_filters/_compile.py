"""Filters compiled to boolean row masks over a layout's payload columns, with a mask cache.

>>> import numpy as np
>>> from iqdb._filters._columns import PayloadIndex
>>> from iqdb._filters._expr import Field
>>> ix = PayloadIndex()
>>> ix.append(0, [{"n": 1}, {"n": 2.5}, {"n": True}, None])
>>> ids = np.arange(4, dtype=np.uint64)
>>> evaluate(Field("n") >= 1, ix, ids, [None] * 4, 0, 4).tolist()
[True, True, False, False]

Numbers compare exactly: an ``int64`` column against a float bound goes through the bound's
floor or ceiling, a ``float64`` column against an int that has no exact float goes through the
neighbouring floats, and bounds past a column's range mean all or none. NaN fails every
comparison by IEEE rules. Strings order by code point (a lookup table over the dictionary).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._payload import Payload
from ._columns import BOOL, BYTES, DICT, FLOAT, INT, LIST, NULL, STR, PathColumn, PayloadIndex, _Grow
from ._expr import ID_PATH, And, Cmp, Filter, Not, Or

__all__ = ["At", "MaskCache", "evaluate", "evaluate_rows", "value_equal"]

Mask = Any  # a boolean array (NumPy's comparison stubs return Any)
_I64 = (-(2**63), 2**63 - 1)
_U64 = (0, 2**64 - 1)


def value_equal(a: Any, b: Any) -> bool:
    """Filter equality of two payload values: numbers by exact value (``bool`` is not a number),
    NaN equal to nothing, lists and objects element by element."""
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and bool(a == b)
    if ta in (int, float) and tb in (int, float):
        return bool(a == b)  # Python compares int and float exactly
    if ta is not tb:
        return False
    if ta is list:
        return len(a) == len(b) and all(map(value_equal, a, b))
    if ta is dict:
        return a.keys() == b.keys() and all(value_equal(a[k], b[k]) for k in a)
    return bool(a == b)


class At:
    """The rows a filter is evaluated at: the range ``a:b``, or a list of rows (``rows``)."""

    __slots__ = ("a", "b", "rows", "size")

    def __init__(self, a: int, b: int, rows: npt.NDArray[np.int64] | None = None) -> None:
        self.a, self.b, self.rows = a, b, rows
        self.size = b - a if rows is None else int(rows.shape[0])

    def of(self, g: _Grow) -> Any:
        """A column's entries at these rows (zeros past what was written)."""
        if self.rows is None:
            return g.view(self.a, self.b)
        return g.view(0, self.b)[self.rows]

    def take(self, a: Any) -> Any:
        return a[self.a : self.b] if self.rows is None else a[self.rows]

    def row(self, pos: Any) -> Any:
        """Row numbers of positions ``pos`` among these rows."""
        return pos + self.a if self.rows is None else self.rows[pos]

    def elements(self, col: PathColumn) -> tuple[At, Any]:
        """The list elements owned by these rows, and the position of each one's owner."""
        n = col.el_n  # first: a writer grows the table, then the count (the array may be newer)
        owners = col.el_owner.a[:n]
        if self.rows is None:
            e0, e1 = (int(i) for i in np.searchsorted(owners, [self.a, self.b]))
            return At(e0, e1), owners[e0:e1] - self.a
        starts = np.searchsorted(owners, self.rows, "left")
        lengths = np.searchsorted(owners, self.rows, "right") - starts
        total = int(lengths.sum())
        pos = np.repeat(np.arange(self.size), lengths)
        first = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        idx = first + np.arange(total)
        return At(0, n, idx), pos


def evaluate(
    f: Filter,
    index: PayloadIndex,
    ids: npt.NDArray[np.uint64],
    payloads: Sequence[Payload | None],
    a: int,
    b: int,
) -> Mask:
    """The mask of rows ``a:b`` that ``f`` matches (dead rows not excluded)."""
    return _eval(f, index, ids, payloads, At(a, b))


def evaluate_rows(
    f: Filter,
    index: PayloadIndex,
    ids: npt.NDArray[np.uint64],
    payloads: Sequence[Payload | None],
    rows: npt.NDArray[np.int64],
) -> Mask:
    """Whether ``f`` matches each of ``rows`` (any order; for a few rows, with no full mask)."""
    return _eval(f, index, ids, payloads, At(0, int(rows.max()) + 1 if rows.shape[0] else 0, rows))


def _eval(
    f: Filter, index: PayloadIndex, ids: npt.NDArray[np.uint64], payloads: Sequence[Payload | None], at: At
) -> Mask:
    if isinstance(f, Cmp):
        return _leaf(f, index, ids, payloads, at)
    if isinstance(f, Not):
        return ~_eval(f.child, index, ids, payloads, at)
    if isinstance(f, (And, Or)):
        is_and = isinstance(f, And)
        out = np.full(at.size, is_and, dtype=bool)
        for child in f.children:
            m = _eval(child, index, ids, payloads, at)
            if is_and:
                out &= m
                if not out.any():
                    break
            else:
                out |= m
        return out
    raise TypeError(f"not a filter: {f!r}")


def _leaf(
    f: Cmp, index: PayloadIndex, ids: npt.NDArray[np.uint64], payloads: Sequence[Payload | None], at: At
) -> Mask:
    n = at.size
    if f.path == ID_PATH:
        return _id_leaf(f, at.take(ids), n)
    col = index.columns.get(f.path)
    if col is None:
        return np.zeros(n, dtype=bool)
    tags = at.of(col.tags)
    op, value = f.op, f.value
    if op == "exists":
        return tags != 0
    if op in ("eq", "in", "ne", "nin"):
        values = value if op in ("in", "nin") else (value,)
        hit = _any_equal(col, tags, values, payloads, f.path, at)
        return hit if op in ("eq", "in") else (tags != 0) & ~hit
    if op == "contains":
        return _contains(col, value, at, payloads, f.path)
    return _ordered(col, tags, op, value, at)


def _any_equal(
    col: PathColumn,
    tags: npt.NDArray[np.int8],
    values: Sequence[Any],
    payloads: Sequence[Payload | None],
    path: str,
    at: At,
) -> Mask:
    out = np.zeros(at.size, dtype=bool)
    codes: list[int] = []
    for v in values:
        t = type(v)
        if v is None:
            out |= tags == NULL
        elif t is str or t is bytes:
            c = col.lookup.get(v)
            if c is not None and type(col.values[c]) is t:
                codes.append(c)
        elif t in (bool, int, float):
            out |= _ordered(col, tags, "eq", v, at)
        else:  # a list or an object: compare with the stored values themselves (rarely used)
            kind = LIST if t is list else DICT
            for i in np.flatnonzero(tags == kind).tolist():
                if value_equal(_resolve(payloads[int(at.row(i))], path), v):
                    out[i] = True
    if codes:
        text = (tags == STR) | (tags == BYTES)
        cv = at.of(col.codes)
        if len(codes) <= 8:
            for c in codes:
                out |= text & (cv == c)
        else:
            lut = np.zeros(len(col.values) + 1, dtype=bool)
            lut[codes] = True
            out |= text & np.take(lut, cv)
    return out


def _resolve(p: Payload | None, path: str) -> Any:
    obj: Any = None if p is None else p._items
    for part in path.split("."):
        obj = obj.get(part) if type(obj) is dict else None
    return obj


def _ordered(col: PathColumn, tags: npt.NDArray[np.int8], op: str, value: Any, at: At) -> Mask:
    """``op`` (eq, lt, le, gt, ge) against a scalar: numbers, bools, strings or bytes."""
    t = type(value)
    if t is bool:
        return (tags == BOOL) & _int_cmp(at.of(col.ints), op, int(value), _I64)
    if t is int or t is float:
        out = np.zeros(at.size, dtype=bool)
        is_int, is_float = tags == INT, tags == FLOAT  # a column of one kind skips the other's pass
        if is_int.any():
            out |= is_int & _int_vs_number(at.of(col.ints), op, value, _I64)
        if is_float.any():
            out |= is_float & _float_vs_number(at.of(col.floats), op, value)
        return out
    if t is str or t is bytes:
        kind = STR if t is str else BYTES
        cmp: Callable[[Any, Any], bool] = _PY_CMP[op]
        lut = np.fromiter(
            (type(s) is t and cmp(s, value) for s in col.values), dtype=np.bool_, count=len(col.values)
        )
        return (tags == kind) & np.take(np.append(lut, False), at.of(col.codes))
    return np.zeros(at.size, dtype=bool)  # None, lists and objects have no order


_PY_CMP: dict[str, Callable[[Any, Any], Any]] = {
    "eq": lambda x, y: x == y,
    "lt": lambda x, y: x < y,
    "le": lambda x, y: x <= y,
    "gt": lambda x, y: x > y,
    "ge": lambda x, y: x >= y,
}


def _int_vs_number(arr: npt.NDArray[Any], op: str, value: int | float, bounds: tuple[int, int]) -> Mask:
    """An integer column against an int or a float, exactly."""
    if type(value) is int:
        return _int_cmp(arr, op, value, bounds)
    if math.isnan(value):
        return np.zeros(arr.shape[0], dtype=bool)
    if math.isinf(value):
        below = value > 0  # every int is below +inf
        return np.full(arr.shape[0], below if op in ("lt", "le") else not below if op != "eq" else False)
    if op == "eq":
        return (
            _int_cmp(arr, "eq", int(value), bounds)
            if value == math.floor(value)
            else np.zeros(arr.shape[0], bool)
        )
    # x < f <=> x < ceil(f); x <= f <=> x <= floor(f); x > f <=> x > floor(f); x >= f <=> x >= ceil(f)
    bound = math.ceil(value) if op in ("lt", "ge") else math.floor(value)
    return _int_cmp(arr, op, bound, bounds)


def _int_cmp(arr: npt.NDArray[Any], op: str, bound: int, bounds: tuple[int, int]) -> Mask:
    """An integer column against a Python int that may lie outside the column's range."""
    lo, hi = bounds
    n = arr.shape[0]
    if bound < lo or bound > hi:
        if op == "eq":
            return np.zeros(n, dtype=bool)
        return np.full(n, (bound > hi) == (op in ("lt", "le")))
    b = arr.dtype.type(bound)
    if op == "eq":
        return arr == b
    if op == "lt":
        return arr < b
    if op == "le":
        return arr <= b
    if op == "gt":
        return arr > b
    return arr >= b


def _float_vs_number(arr: npt.NDArray[np.float64], op: str, value: int | float) -> Mask:
    """A float column against an int or a float, exactly (an int without an exact float lies
    strictly between two neighbouring floats)."""
    if type(value) is int:
        f = float(value)
        if int(f) != value:
            if op == "eq":
                return np.zeros(arr.shape[0], dtype=bool)
            below = f if f < value else float(np.nextafter(f, -math.inf))
            above = f if f > value else float(np.nextafter(f, math.inf))
            return arr <= below if op in ("lt", "le") else arr >= above
        value = f
    return _PY_CMP[op](arr, value)  # type: ignore[no-any-return]


def _id_leaf(f: Cmp, ids: npt.NDArray[np.uint64], n: int) -> Mask:
    values = f.value if f.op in ("in", "nin") else (f.value,)
    if f.op == "exists":
        return np.ones(n, dtype=bool)
    if f.op == "contains":
        return np.zeros(n, dtype=bool)
    if f.op in ("lt", "le", "gt", "ge"):
        v = f.value
        if type(v) not in (int, float):
            return np.zeros(n, dtype=bool)
        return _int_vs_number(ids, f.op, v, _U64)
    hit = np.zeros(n, dtype=bool)
    nums = [v for v in values if type(v) in (int, float)]
    exact = [int(v) for v in nums if (type(v) is int or (math.isfinite(v) and v == math.floor(v)))]
    exact = [v for v in exact if _U64[0] <= v <= _U64[1]]
    if exact:
        hit = np.isin(ids, np.array(exact, dtype=np.uint64))
    return hit if f.op in ("eq", "in") else ~hit


def _contains(col: PathColumn, value: Any, at: At, payloads: Sequence[Payload | None], path: str) -> Mask:
    out = np.zeros(at.size, dtype=bool)
    if not col.el_n:
        return out
    el_at, owner_pos = at.elements(col)
    if el_at.size == 0:
        return out
    tags = el_at.of(col.el_tags)
    t = type(value)
    if t is str or t is bytes:
        c = col.lookup.get(value)
        if c is None:
            return out
        hit = (tags == (STR if t is str else BYTES)) & (el_at.of(col.el_codes) == c)
    elif t in (bool, int, float):
        # The element table has a column's layout: reuse the scalar comparison.
        el = PathColumn()
        el.ints, el.floats = col.el_ints, col.el_floats
        hit = _ordered(el, tags, "eq", value, el_at)
    elif value is None:
        hit = tags == NULL
    else:
        # A list or an object: compare with the stored lists themselves (rarely used), at the
        # rows whose list holds an element of that kind.
        kind = LIST if t is list else DICT
        for i in np.unique(owner_pos[tags == kind]).tolist():
            stored = _resolve(payloads[int(at.row(i))], path)
            if type(stored) is list and any(value_equal(e, value) for e in stored):
                out[i] = True
        return out
    out[owner_pos[hit]] = True
    return out


class MaskCache:
    """Masks of recently used filters over one layout, extended as rows are appended.

    Rows below a published count never change, so a cached mask of rows ``0:u`` stays right and
    only rows ``u:n`` are evaluated for a newer version. Readers share it without a lock (a race
    costs a repeated evaluation, never a wrong mask).
    """

    __slots__ = ("_entries", "_lock", "size")

    def __init__(self, size: int = 32) -> None:
        self._entries: OrderedDict[Filter, Mask] = OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def mask(
        self,
        f: Filter,
        index: PayloadIndex,
        ids: npt.NDArray[np.uint64],
        payloads: Sequence[Payload | None],
        n: int,
    ) -> Mask:
        """Rows ``0:n`` that ``f`` matches (a read-only array; dead rows not excluded)."""
        with self._lock:
            have = self._entries.get(f)
            if have is not None:
                self._entries.move_to_end(f)
        if have is not None and have.shape[0] >= n:
            return have[:n]
        u = 0 if have is None else int(have.shape[0])
        tail = evaluate(f, index, ids, payloads, u, n)
        out = tail if have is None else np.concatenate([have, tail])
        out.flags.writeable = False
        with self._lock:
            old = self._entries.get(f)
            if old is None or old.shape[0] < n:
                self._entries[f] = out
                self._entries.move_to_end(f)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return out
