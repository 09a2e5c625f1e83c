"""Arrow in and out: ``db.upsert_arrow(data)``, ``db.to_arrow()`` and :func:`results_to_arrow`.

>>> import iqdb, pyarrow as pa
>>> table = pa.table({
...     "id": pa.array([1, 2], pa.int64()),
...     "vector": pa.array([[1, 0], [0, 1]], pa.list_(pa.float32(), 2)),
...     "title": ["a", None],
... })
>>> with iqdb.open_in_memory() as db:
...     db.upsert_arrow(table)
...     db.get(1).payload, db.get(2).payload
...     db.to_arrow().column_names
2
(Payload({'title': 'a'}), None)
['id', 'vector', 'title']

**In** (:func:`upsert_arrow`): a ``pyarrow.Table``, a ``pyarrow.RecordBatchReader``, or any
object with the Arrow PyCapsule stream interface (``__arrow_c_stream__``: pandas >= 2.2 and
polars frames, DuckDB results, ...). The input is read one record batch at a time, and each
batch (cut into chunks of at most :data:`CHUNK_ROWS` rows) is one ``upsert_many`` call, that is
one WAL frame: all or nothing per chunk, and memory bounded by a chunk whatever the input's size.

* ``id``: any integer column without nulls or negative values.
* ``vector``: ``fixed_size_list<float>[d]``, ``list<float>`` / ``large_list<float>`` whose rows
  all have the same length, or an ``arrow.fixed_shape_tensor`` column of shape ``(d,)``; any
  float width (stored as float32). No nulls.
* Every other column (or only those in ``payload_columns``) is a payload field named after the
  column. Arrow types map onto :data:`~iqdb.PayloadValue`: integers, floats, bool, strings,
  binaries, null, lists, structs (to dicts), dictionary-encoded columns (their values), nested
  freely. Timestamps, dates, times, durations, intervals, decimals and maps are refused with
  :class:`~iqdb.InvalidArgument` naming the column, before anything is written: cast them first
  (say ``pc.cast(col, pa.string())`` or to ``int64``).
* **Nulls:** a null in a payload column means the record has no such key. A record with no
  non-null payload field gets the payload ``None`` (not an empty payload), unless the reserved
  boolean column :data:`EMPTY_PAYLOAD_COLUMN` is true on its row, which makes it ``{}``. A null
  *inside* a list or struct is a ``None`` value there (structs give every field of their type).

**Out** (:func:`to_arrow`): ``id`` (uint64), ``vector`` (``fixed_size_list<float32>[d]``, a
zero-copy view of the store's own rows when no record has been deleted or replaced since the
last vacuum; ``list<float32>`` while the database has no dimension), then one column per
top-level payload key in key order (absent key: null), and
:data:`EMPTY_PAYLOAD_COLUMN` only when some record has an empty payload. Rows come in storage
order (insertion order, replaced records moved to the end), not sorted by id.

A payload column has the Arrow type pyarrow infers for its values (int64, float64, bool,
string, binary, lists, structs) whenever that type gives every value back exactly. When it would
not (values of different types under one key, say ``1`` and ``"1"``, or ``1`` and ``1.5``;
``None`` stored as a value; structs whose records have different keys; ints and bools mixed in a
list), the column is ``binary`` holding each value in iqdb's own payload encoding, marked by the
field metadata ``iqdb.encoding = payload``; ``upsert_arrow`` decodes such columns. A payload
key that collides with ``id``, ``vector`` or the reserved column is stored under the column name
``payload.<key>`` with the field metadata ``iqdb.key = <key>``. So ``upsert_arrow(to_arrow())``
reproduces a database exactly, also through Parquet and Arrow IPC files, which keep field
metadata. pandas and polars frames keep the typed columns; an encoded column turns into plain
``bytes`` values there, since they drop field metadata.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from ._errors import Corrupt, InvalidArgument, InvalidVector
from ._payload import PayloadColumns, PayloadValue, _decode_at, _encode_into
from ._progress import Progress
from ._search import NO_ID

if TYPE_CHECKING:
    from ._db import Iqdb
    from ._store import Version

__all__ = [
    "CHUNK_ROWS",
    "EMPTY_PAYLOAD_COLUMN",
    "open_file",
    "results_to_arrow",
    "to_arrow",
    "upsert_arrow",
]

CHUNK_ROWS = 65_536
"""The most rows one ``upsert_many`` call (one WAL frame) of :func:`upsert_arrow` takes."""

EMPTY_PAYLOAD_COLUMN = "iqdb:empty_payload"
"""Reserved boolean column: true where a record's payload is ``{}`` rather than ``None``."""


_ENCODING_KEY = b"iqdb.encoding"
_ENCODING_PAYLOAD = b"payload"
_KEY_KEY = b"iqdb.key"
_TENSOR = "arrow.fixed_shape_tensor"
_ABSENT: Any = object()
_NONE: Any = object()
_INT64_MAX = 2**63 - 1


# -- in ---------------------------------------------------------------------------------------


def _reader(data: object) -> tuple[pa.RecordBatchReader, int | None]:
    """``data`` as a stream of record batches, and its row count when known up front."""
    if isinstance(data, pa.Table):
        return data.to_reader(), data.num_rows
    if isinstance(data, pa.RecordBatch):
        return pa.RecordBatchReader.from_batches(data.schema, [data]), data.num_rows
    if isinstance(data, pa.RecordBatchReader):
        return data, None
    if hasattr(data, "__arrow_c_stream__"):
        try:
            reader = pa.RecordBatchReader.from_stream(data)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise InvalidArgument(f"could not read {type(data).__name__} as an Arrow stream: {exc}") from exc
        total = None
        shape = getattr(data, "shape", None)  # pandas and polars frames know their length
        if isinstance(shape, tuple) and shape and isinstance(shape[0], int):
            total = shape[0]
        return reader, total
    raise InvalidArgument(
        "upsert_arrow takes a pyarrow.Table, a RecordBatchReader or an object with "
        f"__arrow_c_stream__ (pandas, polars), got {type(data).__name__}"
    )


def _scalar(t: pa.DataType) -> bool:
    """Whether Arrow gives a column of this type as scalar payload values (bool, int, float, str
    or bytes: no list, no dict)."""
    return bool(
        pa.types.is_boolean(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or t in (pa.string_view(), pa.binary_view())
    )


def _refusal(t: pa.DataType) -> str | None:
    """Why a payload column of type ``t`` cannot be stored (recursively), or ``None``."""
    if pa.types.is_null(t) or _scalar(t):
        return None
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        return _refusal(t.value_type)
    if pa.types.is_struct(t):
        for i in range(t.num_fields):
            why = _refusal(t.field(i).type)
            if why is not None:
                return why
        return None
    if pa.types.is_dictionary(t):
        return _refusal(t.value_type)
    if pa.types.is_map(t):
        return f"type {t} (a map: cast it to a list of structs)"
    return f"type {t} (cast it first, say to int64 or string)"


class _Plan:
    """What each column of a stream's schema becomes, checked before anything is read."""

    def __init__(
        self,
        schema: pa.Schema,
        id_column: str,
        vector_column: str,
        payload_columns: Sequence[str] | None,
    ) -> None:
        names = schema.names
        for what, name in (("id_column", id_column), ("vector_column", vector_column)):
            if not isinstance(name, str):
                raise InvalidArgument(f"{what} must be a str, got {type(name).__name__}")
            if name not in names:
                raise InvalidArgument(f"no {what[:-7]} column {name!r} in the data (columns: {names})")
        if names.count(id_column) > 1 or names.count(vector_column) > 1:
            raise InvalidArgument(
                f"the data has more than one column named {id_column!r} or {vector_column!r}"
            )
        if id_column == vector_column:
            raise InvalidArgument(f"id_column and vector_column are both {id_column!r}")
        self.id_column, self.vector_column = id_column, vector_column
        id_type = schema.field(id_column).type
        if not pa.types.is_integer(id_type):
            raise InvalidArgument(f"id column {id_column!r} has type {id_type}; ids must be integers")
        self.vector_dim = _vector_dim(schema.field(vector_column).type, vector_column)
        if payload_columns is None:
            chosen = [n for n in names if n not in (id_column, vector_column, EMPTY_PAYLOAD_COLUMN)]
        else:
            if isinstance(payload_columns, (str, bytes)) or not isinstance(payload_columns, Sequence):
                raise InvalidArgument(
                    f"payload_columns must be a sequence of column names or None, "
                    f"got {type(payload_columns).__name__}"
                )
            chosen = list(payload_columns)
            for name in chosen:
                if not isinstance(name, str):
                    raise InvalidArgument(f"payload_columns holds a {type(name).__name__}, not a str")
                if name not in names:
                    raise InvalidArgument(f"no payload column {name!r} in the data (columns: {names})")
                if name in (id_column, vector_column):
                    raise InvalidArgument(f"column {name!r} is the id or vector column, not a payload")
        # (column name, payload key, decode iqdb's encoding?)
        self.payload: list[tuple[str, str, bool]] = []
        keys: set[str] = set()
        for name in chosen:
            if names.count(name) > 1:
                raise InvalidArgument(f"the data has more than one column named {name!r}")
            field = schema.field(name)
            why = _refusal(field.type)
            if why is not None:
                raise InvalidArgument(f"payload column {name!r} has {why}")
            meta = field.metadata or {}
            key = meta[_KEY_KEY].decode("utf-8") if _KEY_KEY in meta else name
            if key in keys:
                raise InvalidArgument(f"two payload columns give the payload key {key!r}")
            keys.add(key)
            encoded = meta.get(_ENCODING_KEY) == _ENCODING_PAYLOAD
            if encoded and not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
                raise InvalidArgument(f"payload column {name!r} is marked iqdb-encoded but is not binary")
            self.payload.append((name, key, encoded))
        # Arrow's Python values are canonical payload values, but for unsigned 64-bit integers
        # inside lists or structs (a top-level uint64 column is checked before the write): those
        # batches take upsert_many's per-value check.
        self.canonical = not any(_inner_uint64(schema.field(name).type) for name, _, _ in self.payload)
        # Scalar columns only (no lists or structs, nothing iqdb-encoded): a chunk without nulls
        # then hands its columns to the filter index as they are (PayloadIndex.append).
        self.scalar = all(not enc and _scalar(schema.field(name).type) for name, _, enc in self.payload)
        self.empty_marker = (
            EMPTY_PAYLOAD_COLUMN
            if EMPTY_PAYLOAD_COLUMN in names and pa.types.is_boolean(schema.field(EMPTY_PAYLOAD_COLUMN).type)
            else None
        )


def _inner_uint64(t: pa.DataType, inner: bool = False) -> bool:
    """Whether ``t`` holds uint64 values inside a list or a struct."""
    if pa.types.is_uint64(t):
        return inner
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _inner_uint64(t.value_type, True)
    if pa.types.is_struct(t):
        return any(_inner_uint64(t.field(i).type, True) for i in range(t.num_fields))
    if pa.types.is_dictionary(t):
        return _inner_uint64(t.value_type, inner)
    return False


def _vector_dim(t: pa.DataType, column: str) -> int | None:
    """The dimension the vector column's type fixes (``None`` for variable-length lists)."""
    if isinstance(t, pa.BaseExtensionType):
        if t.extension_name != _TENSOR:
            raise InvalidArgument(f"vector column {column!r} has extension type {t.extension_name}")
        if len(t.shape) != 1:
            raise InvalidArgument(
                f"vector column {column!r} holds tensors of shape {tuple(t.shape)}; vectors are 1-D"
            )
        t = t.storage_type
    if pa.types.is_fixed_size_list(t):
        dim: int | None = t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        dim = None
    else:
        raise InvalidArgument(
            f"vector column {column!r} has type {t}; expected a fixed_size_list, list or "
            "fixed_shape_tensor of floats"
        )
    if not pa.types.is_floating(t.value_type):
        raise InvalidArgument(f"vector column {column!r} holds {t.value_type}, not floats")
    return dim


def _first_null(arr: pa.Array) -> int:
    return int(pc.index(arr.is_null(), True).as_py())


def _ids(arr: pa.Array, plan: _Plan, base: int) -> npt.NDArray[np.uint64]:
    col = plan.id_column
    if arr.null_count:
        raise InvalidArgument(f"id column {col!r} is null at row {base + _first_null(arr)}")
    if pa.types.is_signed_integer(arr.type) and len(arr):
        low = pc.min(arr).as_py()
        if low < 0:
            row = int(pc.index(arr, low).as_py())
            raise InvalidArgument(
                f"record id {low} in column {col!r} (row {base + row}) is outside [0, 2**64)"
            )
    ids: npt.NDArray[np.uint64] = arr.to_numpy().astype(np.uint64, copy=False)
    return ids


def _vectors(arr: pa.Array, plan: _Plan, base: int) -> npt.NDArray[Any]:
    col = plan.vector_column
    if isinstance(arr.type, pa.BaseExtensionType):
        arr = arr.storage
    if arr.null_count:
        raise InvalidArgument(f"vector column {col!r} is null at row {base + _first_null(arr)}")
    n = len(arr)
    dim = plan.vector_dim
    if dim is None:
        lengths = pc.list_value_length(arr)
        bounds = pc.min_max(lengths).as_py() if n else {"min": 0, "max": 0}
        if bounds["min"] != bounds["max"]:
            row = int(pc.index(lengths, bounds["max"]).as_py())
            raise InvalidVector(
                f"vector column {col!r} holds rows of lengths {bounds['min']} and {bounds['max']} "
                f"(row {base + row})"
            )
        dim = int(bounds["max"])
    flat = arr.flatten()  # the rows' values, slice offsets applied
    if flat.null_count:
        row = _first_null(flat) // max(dim, 1)
        raise InvalidVector(f"vector column {col!r} holds a null value at row {base + row}")
    matrix: npt.NDArray[Any] = flat.to_numpy(zero_copy_only=False).reshape(n, dim)
    return matrix


def _decode_value(raw: bytes, column: str, row: int) -> PayloadValue:
    try:
        view = memoryview(raw)
        value, end = _decode_at(view, 0, 1)
        if end != len(view):
            raise Corrupt("trailing bytes")
    except (Corrupt, struct.error, IndexError, UnicodeDecodeError, RecursionError):
        raise InvalidArgument(
            f"payload column {column!r} (row {row}) is marked iqdb-encoded but does not decode"
        ) from None
    return value


Payloads = list[dict[str, Any] | None]


def _payloads(batch: pa.RecordBatch, plan: _Plan, base: int) -> tuple[Payloads | None, PayloadColumns | None]:
    """The chunk's payloads (one Python object per row is the one thing built per row), and the
    same as columns ``{key: values}`` when every row has every key and every value is a scalar."""
    if not plan.payload and plan.empty_marker is None:
        return None, None
    n = batch.num_rows
    keys: list[str] = []
    columns: list[list[Any]] = []
    any_encoded = False
    dense = all(batch.column(name).null_count == 0 for name, _, _ in plan.payload)
    for name, key, encoded in plan.payload:
        col = batch.column(name)
        if pa.types.is_uint64(col.type) and col.null_count < n and pc.max(col).as_py() > _INT64_MAX:
            bad = int(pc.index(pc.greater(col, pa.scalar(_INT64_MAX, pa.uint64())), True).as_py())
            raise InvalidArgument(
                f"payload column {name!r} holds an integer beyond the signed 64-bit range (row {base + bad})"
            )
        values = col.to_pylist()
        if encoded and dense:
            values = [_decode_value(raw, name, base + i) for i, raw in enumerate(values)]
        elif encoded:
            # Null (no key) is None here; a stored None value is _NONE until the row is built.
            any_encoded = True
            values = [
                None if raw is None else _NONE if (v := _decode_value(raw, name, base + i)) is None else v
                for i, raw in enumerate(values)
            ]
        keys.append(key)
        columns.append(values)
    empty = (
        batch.column(plan.empty_marker).fill_null(False).to_pylist()
        if plan.empty_marker is not None
        else [False] * n
    )
    # Fresh dicts of canonical values (Arrow's Python conversions give int64-range ints, valid
    # UTF-8 strings, bytes, floats, lists and str-keyed dicts): the handle adopts them as they
    # are (Iqdb._upsert_canonical), with no per-record check or copy.
    rows = zip(*columns) if columns else iter([()] * n)
    out: list[dict[str, Any] | None] = []
    if dense and keys:  # every row has every key: no per-value test
        return [dict(zip(keys, row)) for row in rows], dict(zip(keys, columns)) if plan.scalar else None
    if any_encoded:
        for row, is_empty in zip(rows, empty):
            p = {k: None if v is _NONE else v for k, v in zip(keys, row) if v is not None}
            out.append(p if p or is_empty else None)
    else:
        for row, is_empty in zip(rows, empty):
            p = {k: v for k, v in zip(keys, row) if v is not None}
            out.append(p if p or is_empty else None)
    return out, None


def upsert_arrow(
    db: Iqdb,
    data: object,
    *,
    id_column: str = "id",
    vector_column: str = "vector",
    payload_columns: Sequence[str] | None = None,
    progress: object = None,
) -> int:
    """Insert or replace the records of an Arrow table or stream; the number of rows read.

    See the module docstring for the column types and the rule for nulls. ``progress`` is a
    :data:`~iqdb._progress.ProgressCallback` called with rows done and the total (``None`` for
    a stream of unknown length).

    Raises
    ------
    InvalidArgument
        ``data`` is not Arrow data; a missing or badly typed column (named), a refused payload
        type (naming the column), a null or negative id (naming the value and row).
    InvalidVector
        Vectors of different lengths, or a null or non-finite value (naming the row).
    DimensionMismatch
        The vectors' dimension differs from the database's.
    """
    reader, total = _reader(data)
    plan = _Plan(reader.schema, id_column, vector_column, payload_columns)
    bar = Progress(progress, total)
    bar.start()
    done = 0
    with db._bulk(total):  # one growth and one compaction at most, whatever the size
        for batch in reader:
            for lo in range(0, batch.num_rows, CHUNK_ROWS):
                chunk = batch.slice(lo, CHUNK_ROWS)
                # All is converted and checked before the write, so a bad chunk writes nothing.
                ids = _ids(chunk.column(plan.id_column), plan, done)
                vectors = _vectors(chunk.column(plan.vector_column), plan, done)
                payloads, columns = _payloads(chunk, plan, done)
                if plan.canonical:
                    db._upsert_canonical(ids, vectors, payloads, columns)  # values are canonical
                else:
                    db.upsert_many(ids, vectors, payloads)
                done += chunk.num_rows
                bar.advance(chunk.num_rows)
    return done


# -- out --------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Exact equality of payload values: types too (``True`` is not ``1``, ``1`` not ``1.0``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    return bool(a == b)


_SCALAR_TYPES: dict[type, pa.DataType] = {
    bool: pa.bool_(),
    int: pa.int64(),
    float: pa.float64(),
    str: pa.large_string(),
    bytes: pa.large_binary(),
}


def _storable(t: pa.DataType) -> bool:
    """Whether every file format takes ``t``: Parquet has no struct without fields (``{}``)."""
    if pa.types.is_struct(t):
        return t.num_fields > 0 and all(_storable(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _storable(t.value_type)
    return True


def _encode(value: PayloadValue) -> bytes:
    out = bytearray()
    _encode_into(value, out)
    return bytes(out)


def _payload_column(values: list[Any]) -> tuple[pa.Array, bool]:
    """One key's values (``_ABSENT`` where a record lacks it) as a column; ``True`` when it had
    to fall back to iqdb's encoding to give every value back exactly."""
    present_types = {type(v) for v in values if v is not _ABSENT}
    plain = [None if v is _ABSENT else v for v in values]
    if len(present_types) == 1:
        (kind,) = present_types
        if kind in _SCALAR_TYPES:
            return pa.array(plain, type=_SCALAR_TYPES[kind]), False
        if kind in (list, dict):
            try:
                arr = pa.array(plain)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                pass
            else:
                # pyarrow's inference may widen (ints to floats), fill (missing struct keys with
                # None) or merge (bool and int): keep the column only if it gives back exactly.
                if _storable(arr.type) and all(
                    v is _ABSENT or _same(v, back) for v, back in zip(values, arr.to_pylist())
                ):
                    return arr, False
    encoded = [None if v is _ABSENT else _encode(v) for v in values]
    return pa.array(encoded, type=pa.large_binary()), True


def to_arrow(version: Version) -> pa.Table:
    """The records of one store version as a table (see the module docstring)."""
    dim = version.dim
    rows = version.live_rows()
    if rows.size == version.n:
        # No dead row: the store's own arrays. Rows below a published count are never written
        # again (see iqdb._store), so a view is as immutable as Arrow expects.
        matrix, ids = version.matrix, version.ids
    else:
        matrix, ids = version.matrix[rows], version.ids[rows]
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=pa.float32())
    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, type=pa.uint64()),
        # A database that never held a vector has no dimension to fix the list size with.
        "vector": pa.array([], pa.list_(pa.float32()))
        if dim is None
        else pa.FixedSizeListArray.from_arrays(flat, dim),
    }
    fields = [pa.field("id", pa.uint64(), nullable=False), pa.field("vector", columns["vector"].type)]
    stored = version.payloads
    # The payload objects' own dicts: read only, and no sorted() per record as Payload's
    # iteration does.
    items: list[dict[str, PayloadValue] | None] = [
        None if (p := stored[r]) is None else p._items for r in rows.tolist()
    ]
    keys: dict[str, None] = {}
    any_empty = False
    for d in items:
        if d is not None:
            if d:
                keys.update(dict.fromkeys(d))
            else:
                any_empty = True
    taken = {"id", "vector", EMPTY_PAYLOAD_COLUMN}
    for key in sorted(keys):
        arr, encoded = _payload_column([_ABSENT if d is None else d.get(key, _ABSENT) for d in items])
        meta: dict[bytes, bytes] = {}
        name = key
        if key in taken:
            while name in taken or name in keys:
                name = f"payload.{name}"
            meta[_KEY_KEY] = key.encode("utf-8")
        if encoded:
            meta[_ENCODING_KEY] = _ENCODING_PAYLOAD
        taken.add(name)
        columns[name] = arr
        fields.append(pa.field(name, arr.type, metadata=meta or None))
    if any_empty:
        columns[EMPTY_PAYLOAD_COLUMN] = pa.array([d is not None and not d for d in items], type=pa.bool_())
        fields.append(pa.field(EMPTY_PAYLOAD_COLUMN, pa.bool_(), nullable=False))
    return pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))


def results_to_arrow(ids: Any, scores: Any) -> pa.Table:
    """``search_arrays``' output as a long table: one row per hit.

    >>> import numpy as np, iqdb
    >>> db = iqdb.open_in_memory()
    >>> db.upsert_many([7, 8, 9], np.eye(3))
    >>> t = iqdb.results_to_arrow(*db.search_arrays([[1, 0, 0], [0, 0, 1]], 2, "l2"))
    >>> t.column_names, t.column("id").to_pylist(), t.column("rank").to_pylist()
    (['query', 'rank', 'id', 'score'], [7, 8, 9, 7], [0, 1, 0, 1])

    Columns: ``query`` (int64, the query's row), ``rank`` (int32, 0 for the closest), ``id``
    (uint64) and ``score`` (float64), ordered by query then rank. The padding of queries with
    fewer results (id ``NO_ID``) is left out. A long table joins, groups and filters directly
    (``table.to_pandas().merge(...)``, ``polars.from_arrow(table).group_by("query")``) where
    per-query list columns would need exploding first.

    Parameters
    ----------
    ids, scores
        ``(m, c)`` arrays from :meth:`Iqdb.search_arrays` (NumPy, or device arrays with ``.get()``).

    Raises
    ------
    InvalidArgument
        ``ids`` and ``scores`` are not 2-D arrays of the same shape.
    """
    ids_h, scores_h = _host(ids), _host(scores)
    if ids_h.ndim != 2 or ids_h.shape != scores_h.shape:
        raise InvalidArgument(
            f"ids and scores must be 2-D arrays of one shape, got {ids_h.shape} and {scores_h.shape}"
        )
    if ids_h.dtype.kind not in "iu":
        raise InvalidArgument(f"ids must be an integer array, got dtype {ids_h.dtype}")
    m, c = ids_h.shape
    ids_u = ids_h.astype(np.uint64, copy=False)
    keep = (ids_u != np.uint64(NO_ID)).ravel()
    query = np.repeat(np.arange(m, dtype=np.int64), c)[keep]
    rank = np.tile(np.arange(c, dtype=np.int32), m)[keep]
    return pa.table(
        {
            "query": pa.array(query, type=pa.int64()),
            "rank": pa.array(rank, type=pa.int32()),
            "id": pa.array(ids_u.ravel()[keep], type=pa.uint64()),
            "score": pa.array(scores_h.astype(np.float64, copy=False).ravel()[keep], type=pa.float64()),
        }
    )


def _host(a: Any) -> npt.NDArray[Any]:
    if not isinstance(a, np.ndarray) and hasattr(a, "get") and hasattr(a, "__cuda_array_interface__"):
        a = a.get()  # a CuPy array
    try:
        return np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"expected an array, got {type(a).__name__}") from exc


# -- files --------------------------------------------------------------------------------------

_NPY_ROWS = 65_536


def open_file(
    path: str | os.PathLike[str], *, vector_column: str = "vector"
) -> tuple[pa.RecordBatchReader, int | None]:
    """A stream of record batches from a file, by its suffix, and its row count when known.

    * ``.parquet`` / ``.pq``: read one row group's batches at a time.
    * ``.arrow`` / ``.feather`` / ``.ipc`` (Arrow IPC file; an IPC stream also works):
      memory-mapped, batch by batch.
    * ``.npy``: an ``(n, d)`` float array, memory-mapped, as columns ``id`` (0..n-1) and
      ``vector_column``.
    * ``.csv`` (also ``.csv.gz`` etc.): parsed block by block; the vector column holds the numbers
      as text (``"[0.1, 0.2]"`` or ``"0.1 0.2"``: brackets optional, separated by commas,
      semicolons or spaces); dates and times stay text, since CSV has no types; an empty field
      is a null (so the record lacks that key).

    Raises
    ------
    InvalidArgument
        An unknown suffix, or a file that is not what its suffix says (the message names it).
    FileNotFoundError
        No such file.
    """
    where = os.fspath(path)
    name = where.lower()
    if not os.path.exists(where):
        raise FileNotFoundError(2, "no such file", where)
    try:
        if name.endswith((".parquet", ".pq")):
            return _open_parquet(where)
        if name.endswith((".arrow", ".feather", ".ipc", ".arrows")):
            return _open_ipc(where)
        if name.endswith(".npy"):
            return _open_npy(where, vector_column)
        if ".csv" in os.path.basename(name):
            return _open_csv(where, vector_column)
    except (pa.ArrowException, ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise InvalidArgument(f"cannot read {where!r}: {exc}") from exc
    raise InvalidArgument(
        f"cannot tell the format of {where!r} from its suffix (.parquet, .arrow, .feather, .ipc, .npy, .csv)"
    )


def _open_parquet(path: str) -> tuple[pa.RecordBatchReader, int | None]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    return (
        pa.RecordBatchReader.from_batches(f.schema_arrow, f.iter_batches(batch_size=CHUNK_ROWS)),
        f.metadata.num_rows,
    )


def _open_ipc(path: str) -> tuple[pa.RecordBatchReader, int | None]:
    source = pa.memory_map(path, "r")
    try:
        f = pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source), None
    # Batches are views of the mapped file: reading one costs no copy and no memory.
    count = f.num_record_batches
    total = sum(f.get_batch(i).num_rows for i in range(count))
    return pa.RecordBatchReader.from_batches(f.schema, (f.get_batch(i) for i in range(count))), total


def _open_npy(path: str, vector_column: str) -> tuple[pa.RecordBatchReader, int | None]:
    matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    if matrix.ndim != 2 or matrix.dtype.kind != "f":
        raise InvalidArgument(
            f"{path!r} holds a {matrix.dtype} array of shape {matrix.shape}; expected (n, d) floats"
        )
    n, d = matrix.shape
    vtype = pa.list_(pa.from_numpy_dtype(matrix.dtype), d)
    schema = pa.schema([pa.field("id", pa.uint64()), pa.field(vector_column, vtype)])

    def batches() -> Iterator[pa.RecordBatch]:
        for lo in range(0, n, _NPY_ROWS):
            block = np.ascontiguousarray(matrix[lo : lo + _NPY_ROWS])
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), d)
            ids = pa.array(np.arange(lo, lo + block.shape[0], dtype=np.uint64))
            yield pa.RecordBatch.from_arrays([ids, vectors], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches()), n


def _open_csv(path: str, vector_column: str) -> tuple[pa.RecordBatchReader, int | None]:
    import pyarrow.csv as pcsv

    def open_with(types: dict[str, pa.DataType]) -> pa.RecordBatchReader:
        return pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=4 << 20),
            convert_options=pcsv.ConvertOptions(
                column_types=types, timestamp_parsers=[], strings_can_be_null=True
            ),
        )

    types: dict[str, pa.DataType] = {vector_column: pa.string()}
    reader = open_with(types)
    temporal = [f.name for f in reader.schema if pa.types.is_temporal(f.type)]
    if temporal:
        reader.close()
        types.update(dict.fromkeys(temporal, pa.string()))
        reader = open_with(types)
    if vector_column not in reader.schema.names:
        return reader, None
    index = reader.schema.get_field_index(vector_column)
    out_schema = reader.schema.set(index, pa.field(vector_column, pa.list_(pa.float32())))

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in reader:
            text = batch.column(index)
            if text.null_count:
                raise InvalidArgument(f"vector column {vector_column!r} is empty on a row of {path!r}")
            inner = pc.utf8_trim(text, "[]() \t")
            parts = pc.split_pattern_regex(inner, r"[,;\s]+")
            try:
                vectors = pc.cast(parts, pa.list_(pa.float32()))
            except pa.ArrowInvalid as exc:
                raise InvalidArgument(
                    f"vector column {vector_column!r} of {path!r} holds text that is not numbers: {exc}"
                ) from None
            yield batch.set_column(index, out_schema.field(index), vectors)

    return pa.RecordBatchReader.from_batches(out_schema, batches()), None
