"""The database handle.

>>> import iqdb
>>> with iqdb.open_in_memory() as db:
...     db.upsert(iqdb.Record(1, [1.0, 0.0], {"kind": "x"}))
...     db.upsert(iqdb.Record(2, [0.0, 1.0]))
...     [(int(r.id), round(r.score, 3)) for r in db.search([0.9, 0.1], k=2, metric="l2")]
[(1, 0.141), (2, 1.273)]

One handle, two backends: :meth:`Iqdb.open_in_memory` and :meth:`Iqdb.open` (a directory with an
Arrow snapshot and a write-ahead log). Any number of threads may search while one writes: the
handle holds a readers-writer lock, so a search never sees a half-applied write.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ._backend import Backend, DeleteOp, MemoryBackend, Op, UpsertOp, apply_op, dedupe_last
from ._device import resolve_device
from ._errors import Closed, DimensionMismatch, InvalidArgument, InvalidConfig, StorageError
from ._lock import RWLock
from ._payload import Payload, coerce_payload
from ._store import ColumnStore
from ._values import (
    DistanceMetric,
    Record,
    RecordId,
    SearchResult,
    Vector,
    as_matrix,
    as_vector_array,
    coerce_metric,
)
from .kernels import DEFAULT_WORKING_SET, flat_topk

__all__ = ["Iqdb", "coerce_ids"]

log = logging.getLogger("iqdb")

Predicate = Callable[[Record], object]
_BOOL_TYPES = frozenset({bool, np.bool_})
T = TypeVar("T")

_MIN_WORKING_SET = 64 << 10


def _check_working_set(working_set: object) -> int:
    if type(working_set) in _BOOL_TYPES or not isinstance(working_set, (int, np.integer)):
        raise InvalidConfig(f"working_set must be an integer number of bytes, got {working_set!r}")
    if working_set < _MIN_WORKING_SET:
        raise InvalidConfig(f"working_set must be at least {_MIN_WORKING_SET} bytes, got {working_set}")
    return int(working_set)


def _check_k(k: object) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise InvalidArgument(f"k must be a non-negative integer, got {type(k).__name__}")
    if k < 0:
        raise InvalidArgument(f"k must be a non-negative integer, got {int(k)}")
    return int(k)


def coerce_ids(ids: object) -> npt.NDArray[np.uint64]:
    """Validate a sequence or integer array of ids; a uint64 array.

    Raises
    ------
    InvalidArgument
        A bool, a non-integer or an out-of-range id (the message names it and its position).
    """
    if isinstance(ids, (str, bytes, Mapping)) or not hasattr(ids, "__len__"):
        raise InvalidArgument(f"ids must be a sequence or array of integers, got {type(ids).__name__}")
    arr = ids if isinstance(ids, np.ndarray) else None
    if arr is None:
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError, OverflowError):
            return _coerce_ids_slowly(ids)
    if arr.ndim != 1:
        raise InvalidArgument(f"ids must be 1-D, got an array of shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if not isinstance(ids, np.ndarray) and not _BOOL_TYPES.isdisjoint(map(type, ids)):  # type: ignore[call-overload]
            return _coerce_ids_slowly(ids)  # NumPy turns True into 1; the slow path names it
        if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
            pos = int(np.argmin(arr))
            raise InvalidArgument(f"record id {int(arr[pos])} at position {pos} is outside [0, 2**64)")
        return arr.astype(np.uint64, copy=False)
    return _coerce_ids_slowly(ids)


def _coerce_ids_slowly(ids: Any) -> npt.NDArray[np.uint64]:
    """Element by element, for mixed inputs (Python ints beyond int64, RecordIds) and errors."""
    out = np.empty(len(ids), dtype=np.uint64)
    pos = 0
    try:
        for pos, value in enumerate(ids):
            out[pos] = RecordId(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc} (position {pos})") from None
    return out


class Iqdb:
    """An iqdb database: in memory (:meth:`open_in_memory`) or durable in a directory (:meth:`open`).

    Use as a context manager, or call :meth:`close`. After ``close()`` every call but ``close()``
    raises :class:`Closed`.
    """

    def __init__(
        self,
        store: ColumnStore,
        backend: Backend,
        *,
        working_set: int = DEFAULT_WORKING_SET,
        _token: object = None,
    ) -> None:
        if _token is not _PRIVATE:
            raise TypeError("use Iqdb.open_in_memory() or Iqdb.open(path)")
        self._working_set = working_set
        self._store = store
        self._backend = backend
        self._lock = RWLock()
        self._closed = False

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open_in_memory(cls, *, device: str = "auto", working_set: int = DEFAULT_WORKING_SET) -> Iqdb:
        """A new, empty, in-memory database. Never touches the file system.

        Parameters
        ----------
        device
            ``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"`` or ``"cuda:N"``.
        working_set
            Bytes of score tiles a search may use at once (default 16 MiB): a search's extra
            memory beyond its inputs and results stays within a small multiple of this for
            any number of queries and records.

        Raises
        ------
        InvalidConfig
            An unknown device string; ``working_set`` not an integer of at least 64 KiB.
        DeviceUnavailable
            A GPU spelling on a machine without a usable GPU.
        """
        ws = _check_working_set(working_set)
        backend = resolve_device(device)
        return cls(ColumnStore(backend), MemoryBackend(), working_set=ws, _token=_PRIVATE)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        readonly: bool = False,
        working_set: int = DEFAULT_WORKING_SET,
        **options: Any,
    ) -> Iqdb:
        """Open or create a durable database in directory ``path`` (created with its parents).

        Parameters
        ----------
        path
            The directory: ``path/snap`` (Arrow IPC snapshot) and ``path/wal`` (write-ahead log).
        device, working_set
            As for :meth:`open_in_memory`.
        readonly
            Open a consistent view without the write lock; never changes a file. Writes raise
            :class:`InvalidConfig`.
        **options
            Durable-store options (see :mod:`iqdb._durable`): ``sync``, ``wal_limit``, ``fs``.

        Raises
        ------
        InvalidConfig
            ``path`` exists and is not a directory; an unknown option or device; a bad
            ``working_set``.
        Corrupt
            The snapshot or the WAL header fails its integrity checks.
        Locked
            Another process or handle has the directory open for writing.
        StorageError
            The operating system refused a file operation.
        """
        from ._durable import open_durable

        unknown = set(options) - {"sync", "wal_limit", "fs"}
        if unknown:
            raise InvalidConfig(f"unknown option(s) for Iqdb.open: {', '.join(sorted(unknown))}")
        ws = _check_working_set(working_set)
        backend = resolve_device(device)
        store = ColumnStore(backend)
        durable = open_durable(os.fspath(path), store, readonly=readonly, **options)
        return cls(store, durable, working_set=ws, _token=_PRIVATE)

    # -- lifecycle ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the database handle is closed")

    def close(self) -> None:
        """Close the handle. Durable databases compact first (snapshot written, WAL emptied).

        Closing again does nothing.
        """
        with self._lock.write():
            if self._closed:
                return
            self._closed = True
            self._backend.close(self._store)

    def __enter__(self) -> Iqdb:
        self._check_open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<Iqdb closed>"
        store = self._store
        return f"<Iqdb {self._backend!r} n={store.n} dim={store.dim} device={store.backend.name!r}>"

    @property
    def device(self) -> str:
        """Where search runs: ``"cpu"`` or ``"cuda:N"``."""
        self._check_open()
        name: str = self._store.backend.name
        return name

    @property
    def dim(self) -> int | None:
        """The dimension, or ``None`` while the database has never held a vector."""
        with self._lock.read():
            self._check_open()
            return self._store.dim

    def __len__(self) -> int:
        with self._lock.read():
            self._check_open()
            return self._store.n

    def is_empty(self) -> bool:
        """``True`` when no record is stored."""
        return len(self) == 0

    def __contains__(self, rid: object) -> bool:
        key = int(RecordId(rid))
        with self._lock.read():
            self._check_open()
            return key in self._store.row_of

    # -- writes ---------------------------------------------------------------------------
    def _write(self, op: Op) -> Any:
        """Log then apply, under the writer lock: log order is memory order. The ticket goes to
        ``backend.commit`` once the lock is released (group commit)."""
        ticket = self._backend.log(op)
        apply_op(self._store, op)
        if self._backend.wants_compaction():
            try:
                self._backend.compact(self._store)
            except StorageError as exc:
                # The write itself succeeded and is in the WAL, which stays the truth.
                log.warning("iqdb: automatic compaction failed: %s", exc)
        return ticket

    def _check_writable(self) -> None:
        self._check_open()
        if self._backend.readonly:
            raise InvalidConfig("the database was opened readonly; writes are refused")

    def upsert(self, record: Record) -> None:
        """Insert ``record``, or replace the whole record (vector and payload) with that id.

        Raises
        ------
        InvalidArgument
            ``record`` is not a :class:`Record`.
        DimensionMismatch
            The vector's dimension differs from the database's (``left`` = vector, ``right`` = db).
        """
        if not isinstance(record, Record):
            raise InvalidArgument(f"upsert takes a Record, got {type(record).__name__}")
        vectors = record.vector.to_numpy()[None, :]
        op = UpsertOp(
            np.array([int(record.id)], dtype=np.uint64),
            vectors,
            [None if record.payload is None else record.payload.copy()],
        )
        with self._lock.write():
            self._check_writable()
            self._store.check_dim(record.vector.dim)
            ticket = self._write(op)
        self._backend.commit(ticket)

    def upsert_many(self, ids: object, vectors: object, payloads: Sequence[object] | None = None) -> None:
        """Insert or replace many records at once: all or nothing.

        Parameters
        ----------
        ids
            Any integer sequence or array (length n). A repeated id: the last row wins.
        vectors
            An ``(n, d)`` array, or a sequence of n vectors.
        payloads
            ``None``, or a sequence of n payloads (mappings or ``None``).

        Raises
        ------
        InvalidArgument
            Bad ids, lengths that differ, or a bad payload (naming its row).
        InvalidVector
            A row is empty or non-finite, or the vectors are not a regular numeric array.
        DimensionMismatch
            The rows' dimension differs from the database's.
        """
        id_arr = coerce_ids(ids)
        n = int(id_arr.shape[0])
        if n == 0:
            if _length(vectors) not in (0, None):
                raise InvalidArgument(f"got 0 ids but {_length(vectors)} vectors")
            if payloads is not None and len(payloads) != 0:
                raise InvalidArgument(f"got 0 ids but {len(payloads)} payloads")
            with self._lock.read():
                self._check_writable()
            return
        matrix = as_matrix(vectors)
        if matrix.shape[0] != n:
            raise InvalidArgument(f"got {n} ids but {matrix.shape[0]} vectors")
        if payloads is None:
            plist: list[Payload | None] = [None] * n
        else:
            if isinstance(payloads, (str, bytes, Mapping)) or not hasattr(payloads, "__len__"):
                raise InvalidArgument(f"payloads must be a sequence, got {type(payloads).__name__}")
            if len(payloads) != n:
                raise InvalidArgument(f"got {n} ids but {len(payloads)} payloads")
            plist = _coerce_payloads(payloads)
        # A repeated id: the last row wins.
        op = dedupe_last(UpsertOp(np.ascontiguousarray(id_arr), np.ascontiguousarray(matrix), plist))
        with self._lock.write():
            self._check_writable()
            self._store.check_dim(int(matrix.shape[1]))
            ticket = self._write(op)
        self._backend.commit(ticket)

    def delete(self, rid: object) -> bool:
        """Delete the record with id ``rid``; ``True`` if one was removed.

        Raises
        ------
        InvalidArgument
            ``rid`` is not a valid id.
        """
        key = int(RecordId(rid))
        with self._lock.write():
            self._check_writable()
            if key not in self._store.row_of:
                return False
            ticket = self._write(DeleteOp(np.array([key], dtype=np.uint64)))
        self._backend.commit(ticket)
        return True

    def flush(self) -> None:
        """Make every write so far durable (fsync of the WAL); a no-op in memory.

        Raises
        ------
        StorageError
            The fsync failed; the handle is then poisoned (writes raise until reopened).
        """
        with self._lock.read():
            self._check_open()
            if not self._backend.readonly:
                self._backend.flush()

    def compact(self) -> None:
        """Write a fresh snapshot and empty the WAL (what ``close()`` does), keeping the handle open."""
        with self._lock.write():
            self._check_writable()
            self._backend.compact(self._store)

    def check(self) -> dict[str, Any]:
        """Verify the stored files' integrity; a report of what was found (``report["ok"]``)."""
        with self._lock.read():
            self._check_open()
            return self._backend.check()

    # -- reads ----------------------------------------------------------------------------
    def get(self, rid: object) -> Record | None:
        """A copy of the record with id ``rid``, or ``None``.

        Raises
        ------
        InvalidArgument
            ``rid`` is not a valid id.
        """
        key = RecordId(rid)
        with self._lock.read():
            self._check_open()
            row = self._store.row_of.get(int(key))
            if row is None:
                return None
            payload = self._store.payloads[row]
            return Record._trusted(
                key,
                Vector._trusted(self._store.vector_of(row)),
                None if payload is None else payload.copy(),
            )

    def search(
        self, query: object, k: int, metric: DistanceMetric | str = DistanceMetric.COSINE
    ) -> list[SearchResult]:
        """Exact top-``k`` over all records, closest first (ties: smaller id first; NaN last).

        Parameters
        ----------
        query
            A :class:`Vector` or anything ``Vector`` accepts.
        k
            How many results at most. ``k == 0`` returns ``[]`` before any other check.
        metric
            ``DistanceMetric`` or its string value.

        Raises
        ------
        InvalidArgument
            ``k`` negative or not an integer; unknown metric.
        InvalidVector
            ``query`` is not a valid vector.
        DimensionMismatch
            ``left`` = query dimension, ``right`` = database dimension.
        """
        return self._search_one(query, k, metric, None)

    def search_with(
        self, query: object, k: int, metric: DistanceMetric | str, predicate: Predicate
    ) -> list[SearchResult]:
        """As :meth:`search`, among the records for which ``predicate(record)`` is true.

        The filter applies before the top-``k`` cut: the result is the exact top-``k`` of the
        records that pass. ``predicate`` receives a copy of each record.

        Raises
        ------
        InvalidArgument
            ``predicate`` is not callable; as :meth:`search` otherwise.
        """
        if not callable(predicate):
            raise InvalidArgument(f"predicate must be callable, got {type(predicate).__name__}")
        return self._search_one(query, k, metric, predicate)

    def _search_one(
        self, query: object, k: object, metric: object, predicate: Predicate | None
    ) -> list[SearchResult]:
        self._check_open()
        kk = _check_k(k)
        if kk == 0:
            return []
        met = coerce_metric(metric)
        q = as_vector_array(query)[None, :]
        return self._search(q, kk, met, predicate, _as_results)[0]

    def search_batch(
        self,
        queries: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        predicate: Predicate | None = None,
    ) -> list[list[SearchResult]]:
        """One result list per query, in order; each equals :meth:`search` (or :meth:`search_with`).

        Runs as blocked matrix products with bounded memory, not as m single searches.

        Parameters
        ----------
        queries
            An ``(m, d)`` array or a sequence of vectors.

        Raises
        ------
        As :meth:`search` and :meth:`search_with`.
        """
        request = self._batch_request(queries, k, metric, predicate)
        if request is None:
            return [[] for _ in range(_length(queries) or 0)]
        return self._search(*request, predicate, _as_results)

    def search_arrays(
        self,
        queries: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        predicate: Predicate | None = None,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float64]]:
        """As :meth:`search_batch`, as two arrays instead of result objects.

        For many queries or a large ``k``: no per-result objects and no payload copies.

        >>> import numpy as np, iqdb
        >>> db = iqdb.open_in_memory()
        >>> db.upsert_many([7, 8, 9], np.eye(3))
        >>> ids, scores = db.search_arrays([[1, 0, 0], [0, 0, 1]], 2, "l2")
        >>> ids.tolist(), scores.round(3).tolist()
        ([[7, 8], [9, 7]], [[0.0, 1.414], [0.0, 1.414]])

        Returns
        -------
        (ids, scores)
            ``(m, c)`` arrays, ``uint64`` and ``float64``: row ``i`` holds query ``i``'s results
            in order, exactly what :meth:`search_batch` gives for it. ``c = min(k, number of
            records considered)`` is the same for every query (``0`` while the database has
            never held a vector).

        Raises
        ------
        As :meth:`search_batch`.
        """
        request = self._batch_request(queries, k, metric, predicate)
        if request is None:
            return _as_arrays(self._store, _length(queries) or 0, None)
        return self._search(*request, predicate, _as_arrays)

    def _batch_request(
        self, queries: object, k: object, metric: object, predicate: Predicate | None
    ) -> tuple[npt.NDArray[np.float32], int, DistanceMetric] | None:
        """The batch searches' checks, in the contract's order: ``None`` when the answer is
        empty without searching (``k == 0`` answers before any other check; no queries), else
        the query matrix, ``k`` and the metric."""
        self._check_open()
        kk = _check_k(k)
        if kk == 0:
            return None
        met = coerce_metric(metric)
        if predicate is not None and not callable(predicate):
            raise InvalidArgument(f"predicate must be callable, got {type(predicate).__name__}")
        if _length(queries) == 0:
            return None
        return as_matrix(queries, "queries"), kk, met

    def _search(
        self,
        Q: npt.NDArray[np.float32],
        k: int,
        metric: DistanceMetric,
        predicate: Predicate | None,
        finish: Callable[[ColumnStore, int, _Found | None], T],
    ) -> T:
        """Run the kernel under the read lock; ``finish`` turns its rows and scores (``None``
        while the database has never held a vector) into the caller's form, still under the
        lock, since rows move when records are written."""
        with self._lock.read():
            self._check_open()
            store = self._store
            if store.dim is None:
                return finish(store, Q.shape[0], None)
            if Q.shape[1] != store.dim:
                raise DimensionMismatch(left=int(Q.shape[1]), right=store.dim)
            rows = None if predicate is None else self._filter_rows(predicate)
            be = store.backend
            out = flat_topk(
                be.xp,
                store.matrix,
                store.norms,
                store.device_ids,
                be.asarray(Q),
                k,
                metric.value,
                None if rows is None else be.asarray(rows),
                norms32=store.norms32,
                inv_norms32=store.inv_norms32,
                norm_bounds=store.norm_bounds,
                working_set=self._working_set,
                parallel=be.parallel,
                matvec=be.matvec,
            )
            found = (be.to_host(out.rows), be.to_host(out.scores))
            return finish(store, Q.shape[0], found)

    def _filter_rows(self, predicate: Predicate) -> npt.NDArray[np.int64]:
        """Rows whose record passes ``predicate`` (the escape hatch: one call per record)."""
        store = self._store
        matrix = store.backend.to_host(store.matrix)
        keep = [
            row
            for row, (rid, payload) in enumerate(zip(store.ids.tolist(), store.payloads))
            if predicate(
                Record._trusted(
                    RecordId(rid),
                    Vector._trusted(matrix[row].copy()),
                    None if payload is None else payload.copy(),
                )
            )
        ]
        return np.asarray(keep, dtype=np.int64)


def _coerce_payloads(payloads: Sequence[object]) -> list[Payload | None]:
    out: list[Payload | None] = []
    try:
        for p in payloads:
            out.append(coerce_payload(p))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc} (row {len(out)})") from None
    return out


def _length(data: object) -> int | None:
    if isinstance(data, np.ndarray):
        return int(data.shape[0]) if data.ndim else None
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


_PRIVATE = object()


_Found = tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]  # rows into the store, scores


def _as_results(store: ColumnStore, m: int, found: _Found | None) -> list[list[SearchResult]]:
    if found is None:
        return [[] for _ in range(m)]
    found_rows, scores_arr = found
    scores = scores_arr.tolist()
    found_ids = store.ids[found_rows].tolist()
    payloads = store.payloads
    # Ids and scores from the store are canonical by construction: skip the checks.
    rid = functools.partial(int.__new__, RecordId)
    make = SearchResult._trusted
    return [
        [
            make(i, score, None if (p := payloads[row]) is None else p.copy())
            for i, score, row in zip(map(rid, ids_q), scores_q, rows_q)
        ]
        for ids_q, scores_q, rows_q in zip(found_ids, scores, found_rows.tolist())
    ]


def _as_arrays(
    store: ColumnStore, m: int, found: _Found | None
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float64]]:
    if found is None:
        return np.empty((m, 0), dtype=np.uint64), np.empty((m, 0), dtype=np.float64)
    found_rows, scores = found
    return store.ids[found_rows], scores
