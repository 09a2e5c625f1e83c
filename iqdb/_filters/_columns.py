"""Columnar indexes of payload fields, kept beside the store's rows, for compiled filters.

>>> from iqdb._filters._columns import PayloadIndex, INT
>>> ix = PayloadIndex()
>>> ix.append(0, [{"year": 2020, "meta": {"lang": "en"}}, None, {"year": 1.5}])
>>> sorted(ix.columns), ix.columns["year"].tags.view(0, 3).tolist() == [INT, 0, 4]
(['meta', 'meta.lang', 'year'], True)

One :class:`PathColumn` per dotted path seen in any payload (paths go through nested objects),
holding per row a type tag (0: absent) and the value in the array its type uses: ``int64`` for
ints and bools, ``float64`` for floats, ``int32`` dictionary codes for strings and bytes. Lists
also get an element table (owner row, tag, value), which ``contains`` reads. Lists and objects
as whole values are tagged but not stored: an equality on one reads the payload itself.

The store only ever appends rows, so the index only appends too: a row's entries never change
once written, and readers may evaluate rows below any published count while the writer appends
(each array is replaced, never resized in place, when it grows). A failed write truncates what
it appended (:meth:`PayloadIndex.truncate`); vacuuming builds the next layout's index with
:meth:`PayloadIndex.take`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BOOL", "BYTES", "DICT", "FLOAT", "INT", "LIST", "NULL", "STR", "PathColumn", "PayloadIndex"]

ABSENT, NULL, BOOL, INT, FLOAT, STR, BYTES, LIST, DICT = range(9)
_GROWTH = 1.5


def tag_of(value: object) -> int:
    t = type(value)
    if t is bool:
        return BOOL
    if t is int:
        return INT
    if t is float:
        return FLOAT
    if t is str:
        return STR
    if t is bytes:
        return BYTES
    if t is list:
        return LIST
    if t is dict:
        return DICT
    return NULL


class _Grow:
    """An append-only 1-D array: readers take :meth:`view` of rows already written."""

    __slots__ = ("a", "dtype")

    def __init__(self, dtype: Any, capacity: int = 0) -> None:
        self.dtype = np.dtype(dtype)
        self.a: npt.NDArray[Any] = np.zeros(capacity, dtype=self.dtype)

    def ensure(self, n: int) -> npt.NDArray[Any]:
        """Room for ``n`` rows (zero-filled); returns the array to write into."""
        a = self.a
        if a.shape[0] < n:
            grown = np.zeros(max(n, int(a.shape[0] * _GROWTH), 64), dtype=self.dtype)
            grown[: a.shape[0]] = a
            self.a = a = grown  # one attribute store: readers see the old or the new array
        return a

    def view(self, a: int, b: int) -> npt.NDArray[Any]:
        """Rows ``a:b`` (zeros past what was ever written)."""
        arr = self.a
        if arr.shape[0] >= b:
            return arr[a:b]
        out = np.zeros(b - a, dtype=self.dtype)
        have = max(0, arr.shape[0] - a)
        out[:have] = arr[a : a + have]
        return out

    def nbytes(self, n: int) -> int:
        return n * self.dtype.itemsize if self.a.shape[0] else 0


class PathColumn:
    """The values of one dotted path, by row (see the module docstring)."""

    __slots__ = ("codes", "el_codes", "el_floats", "el_ints", "el_n", "el_owner", "el_tags", "floats",
                 "ints", "lookup", "tags", "values")  # fmt: skip

    def __init__(self) -> None:
        self.tags = _Grow(np.int8)
        self.ints = _Grow(np.int64)
        self.floats = _Grow(np.float64)
        self.codes = _Grow(np.int32)
        self.lookup: dict[str | bytes, int] = {}  # str and bytes never compare equal to each other
        self.values: list[str | bytes] = []
        self.el_n = 0
        self.el_owner = _Grow(np.int64)
        self.el_tags = _Grow(np.int8)
        self.el_ints = _Grow(np.int64)
        self.el_floats = _Grow(np.float64)
        self.el_codes = _Grow(np.int32)

    def code(self, value: str | bytes) -> int:
        c = self.lookup.get(value)
        if c is None:
            c = self.lookup[value] = len(self.values)
            self.values.append(value)
        return c

    def nbytes(self, n: int) -> int:
        per_row = sum(g.nbytes(n) for g in (self.tags, self.ints, self.floats, self.codes))
        per_el = sum(g.nbytes(self.el_n) for g in (self.el_owner, self.el_tags, self.el_ints, self.el_floats))
        # The dictionary: the strings are the payloads' own objects; count its slots and list.
        return per_row + per_el + self.el_codes.nbytes(self.el_n) + 56 * len(self.values)


def _put(
    col: PathColumn, rows: list[int] | npt.NDArray[np.int64], values: list[Any], end: int, tags: _Grow,
    ints: _Grow, floats: _Grow, codes: _Grow,
) -> None:  # fmt: skip
    """Write one batch of values of one path (or one path's list elements) at ``rows``."""
    r = np.asarray(rows, dtype=np.int64)
    kinds = set(map(type, values))
    if len(kinds) == 1 and _put_uniform(col, next(iter(kinds)), r, values, end, tags, ints, floats, codes):
        return
    t = np.fromiter(map(tag_of, values), dtype=np.int8, count=len(values))
    tags.ensure(end)[r] = t
    for tag, grow in ((INT, ints), (BOOL, ints), (FLOAT, floats)):
        sel = np.flatnonzero(t == tag)
        if sel.shape[0]:
            src = [values[i] for i in sel.tolist()]
            grow.ensure(end)[r[sel]] = np.array(src, dtype=grow.dtype)
    sel = np.flatnonzero((t == STR) | (t == BYTES))
    if sel.shape[0]:
        code = col.code
        codes.ensure(end)[r[sel]] = np.fromiter(
            (code(values[i]) for i in sel.tolist()), dtype=np.int32, count=int(sel.shape[0])
        )


def _put_uniform(
    col: PathColumn, kind: type, r: Any, values: list[Any], end: int, tags: _Grow, ints: _Grow, floats: _Grow,
    codes: _Grow,
) -> bool:  # fmt: skip
    """:func:`_put` for values of one Python type, converted in bulk (no call per value); ``False``
    for a type it does not handle."""
    if kind is int or kind is bool:
        ints.ensure(end)[r] = np.array(values, dtype=np.int64)
    elif kind is float:
        floats.ensure(end)[r] = np.array(values, dtype=np.float64)
    elif kind is str:
        # The dictionary keeps the payloads' own string objects (a copy, say from Arrow, would
        # double the memory of unique strings).
        codes.ensure(end)[r] = np.fromiter(map(col.code, values), dtype=np.int32, count=len(values))
    else:
        return False
    tags.ensure(end)[r] = tag_of(values[0])
    return True


class PayloadIndex:
    """Every path's column over the rows of one store layout."""

    __slots__ = ("columns", "n")

    def __init__(self) -> None:
        self.columns: dict[str, PathColumn] = {}
        self.n = 0  # rows indexed

    def append(
        self,
        start: int,
        payloads: Iterable[Mapping[str, Any] | None],
        columns: Mapping[str, list[Any]] | None = None,
    ) -> None:
        """Index the payloads of rows ``start, start + 1, ...`` (which must be ``self.n``).

        ``columns``, when given, holds the same payloads as columns of scalar values (payload
        ``i`` is exactly ``{key: columns[key][i]}``): they are indexed column by column, with no
        pass over the payloads."""
        if columns:
            n = len(next(iter(columns.values())))
            at = np.arange(start, start + n, dtype=np.int64)
            for path, vals in columns.items():
                if "." in path:
                    continue  # not reachable by a dotted path (as in _flatten)
                col = self.columns.get(path)
                if col is None:
                    col = self.columns[path] = PathColumn()
                _put(col, at, vals, start + n, col.tags, col.ints, col.floats, col.codes)
            self.n = start + n
            return
        values: dict[str, tuple[list[int], list[Any]]] = {}
        elements: dict[str, tuple[list[int], list[Any]]] = {}
        row = start
        for p in payloads:
            if p is not None:
                _flatten(p if type(p) is dict else p._items, "", row, values, elements)  # type: ignore[attr-defined]
            row += 1
        for path, (rows, vals) in values.items():
            col = self.columns.get(path)
            if col is None:
                col = self.columns[path] = PathColumn()
            _put(col, rows, vals, row, col.tags, col.ints, col.floats, col.codes)
        for path, (owners, vals) in elements.items():
            col = self.columns[path]
            end = col.el_n + len(vals)
            slots = list(range(col.el_n, end))
            col.el_owner.ensure(end)[col.el_n : end] = owners
            _put(col, slots, vals, end, col.el_tags, col.el_ints, col.el_floats, col.el_codes)
            col.el_n = end
        self.n = row

    def truncate(self, n: int) -> None:
        """Forget rows ``n`` and up (a write that failed midway)."""
        if n >= self.n:
            return
        for col in self.columns.values():
            if col.tags.a.shape[0] > n:
                col.tags.a[n:] = 0
            if col.el_n:
                keep = int(np.searchsorted(col.el_owner.a[: col.el_n], n))
                col.el_tags.a[keep : col.el_n] = 0
                col.el_n = keep
        self.n = n

    def take(self, rows: npt.NDArray[np.int64]) -> PayloadIndex:
        """A new index of the given rows (ascending), renumbered ``0..len(rows)-1``."""
        out = PayloadIndex()
        k = int(rows.shape[0])
        newpos = np.full(self.n + 1, -1, dtype=np.int64)
        newpos[rows] = np.arange(k, dtype=np.int64)
        for path, col in self.columns.items():
            c = out.columns[path] = PathColumn()
            c.lookup, c.values = dict(col.lookup), list(col.values)
            for src, dst in (
                (col.tags, c.tags),
                (col.ints, c.ints),
                (col.floats, c.floats),
                (col.codes, c.codes),
            ):
                if src.a.shape[0]:
                    dst.a = src.view(0, self.n)[rows]
            if col.el_n:
                owner = newpos[col.el_owner.a[: col.el_n]]
                keep = np.flatnonzero(owner >= 0)
                c.el_n = int(keep.shape[0])
                c.el_owner.a = owner[keep]
                pairs = ((col.el_tags, c.el_tags), (col.el_ints, c.el_ints), (col.el_floats, c.el_floats),
                         (col.el_codes, c.el_codes))  # fmt: skip
                for src, dst in pairs:
                    if src.a.shape[0]:
                        dst.a = src.view(0, col.el_n)[keep]
        out.n = k
        return out

    def nbytes(self) -> int:
        """Bytes held by the columns (the dictionaries' slots estimated)."""
        return sum(c.nbytes(self.n) for c in self.columns.values())


def _flatten(
    obj: Mapping[str, Any],
    prefix: str,
    row: int,
    values: dict[str, tuple[list[int], list[Any]]],
    elements: dict[str, tuple[list[int], list[Any]]],
) -> None:
    for key, value in obj.items():
        if "." in key:
            continue  # not reachable by a dotted path (see iqdb._filters._expr)
        path = prefix + key
        slot = values.get(path)
        if slot is None:
            slot = values[path] = ([], [])
        slot[0].append(row)
        slot[1].append(value)
        t = type(value)
        if t is dict:
            _flatten(value, path + ".", row, values, elements)
        elif t is list and value:
            el = elements.get(path)
            if el is None:
                el = elements[path] = ([], [])
            el[0].extend([row] * len(value))
            el[1].extend(value)
