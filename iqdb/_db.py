"""The database handle.

>>> import iqdb
>>> with iqdb.open_in_memory() as db:
...     db.upsert(iqdb.Record(1, [1.0, 0.0], {"kind": "x"}))
...     db.upsert(iqdb.Record(2, [0.0, 1.0]))
...     [(int(r.id), round(r.score, 3)) for r in db.search([0.9, 0.1], k=2, metric="l2")]
[(1, 0.141), (2, 1.273)]

One handle, two backends: :meth:`Iqdb.open_in_memory` and :meth:`Iqdb.open` (a directory with an
Arrow snapshot and a write-ahead log).

Any number of threads may search while others write, and neither waits for the other: writers
take a mutex among themselves, and each write ends by publishing an immutable version of the
store (see :mod:`iqdb._store`). A search reads one version, so it sees the database exactly as
it was after one write. Compaction, too, runs while searches go on. While searches are running,
a writer gives up the GIL after each write so that a tight write loop cannot starve them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ._backend import Backend, DeleteOp, MemoryBackend, Op, UpsertOp, apply_op, dedupe_last
from ._coerce import _check_k, _check_path, _check_working_set, _length, coerce_rows
from ._device import device_queries, resolve_device
from ._errors import Closed, InvalidArgument, InvalidConfig, Poisoned, StorageError
from ._filters import FilterLike, coerce_filter
from ._payload import Payload, PayloadColumns
from ._search import Searcher, Where, as_arrays, as_device_arrays, as_results, coerce_where, live_mask
from ._store import ColumnStore, Version
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
from .kernels import DEFAULT_WORKING_SET

__all__ = ["Iqdb"]

log = logging.getLogger("iqdb")

Predicate = Callable[[Record], object]
T = TypeVar("T")

# While searches run, a writer gives up the GIL at most this often (seconds; None: never).
YIELD_EVERY: float | None = 0.005


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
        self._closed = False
        self._wlock = threading.Lock()  # writers only; searches never take it
        self._searcher = Searcher(store, working_set, self._check_open)
        self._local = self._searcher.local  # .predicate: depth of predicate calls in this thread
        self._searching = self._searcher.searching  # one entry per search in flight
        self._broken: BaseException | None = None  # a failed write could not be undone
        self._yielded = 0.0  # when a write last handed the GIL to the searches
        self._bulk_depth = 0  # bulk imports running: automatic compaction waits for their end

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

        where = _check_path(path)
        if not isinstance(readonly, (bool, np.bool_)):
            raise InvalidConfig(f"readonly must be a bool, got {type(readonly).__name__}")
        unknown = set(options) - {"sync", "wal_limit", "fs"}
        if unknown:
            raise InvalidConfig(f"unknown option(s) for Iqdb.open: {', '.join(sorted(unknown))}")
        ws = _check_working_set(working_set)
        backend = resolve_device(device)
        store = ColumnStore(backend)
        durable = open_durable(where, store, readonly=bool(readonly), **options)
        return cls(store, durable, working_set=ws, _token=_PRIVATE)

    # -- lifecycle ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the database handle is closed")

    def _check_not_in_predicate(self) -> None:
        if getattr(self._local, "predicate", 0):
            raise InvalidArgument("the database cannot be changed from inside a search predicate")

    def close(self) -> None:
        """Close the handle. Durable databases compact first (snapshot written, WAL emptied), then
        release their lock and files; the memory the records held is released too.

        Closing again does nothing. Searches already running finish on what they read.

        Raises
        ------
        InvalidArgument
            Called from inside a search predicate.
        """
        if self._closed:
            return
        self._check_not_in_predicate()
        with self._wlock:
            if self._closed:
                return
            self._closed = True
            try:
                self._backend.close(self._store)
            finally:
                self._store.clear()

    def __del__(self) -> None:
        # A handle dropped without close(): release the lock and the files so that the
        # directory can be opened again, but do not compact (every write is in the WAL).
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._store.clear()
        try:
            held = self._backend.abandon()
        except BaseException:
            return
        if held:
            warnings.warn(
                f"unclosed iqdb database {self._backend!r}", ResourceWarning, stacklevel=1, source=self
            )

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
        v = self._store.version
        return f"<Iqdb {self._backend!r} n={v.live} dim={v.dim} device={self._store.backend.name!r}>"

    @property
    def device(self) -> str:
        """Where search runs: ``"cpu"`` or ``"cuda:N"``."""
        self._check_open()
        name: str = self._store.backend.name
        return name

    @property
    def dim(self) -> int | None:
        """The dimension, or ``None`` while the database has never held a vector."""
        self._check_open()
        return self._store.version.dim

    def __len__(self) -> int:
        self._check_open()
        return self._store.version.live

    def is_empty(self) -> bool:
        """``True`` when no record is stored."""
        return len(self) == 0

    def __contains__(self, rid: object) -> bool:
        self._check_open()
        key = int(RecordId(rid))
        return self._store.lookup(key) is not None

    # -- writes ---------------------------------------------------------------------------
    def _write(self, op: Op | Callable[[Version], Op | None], dim: int | None = None) -> Any:
        """Log then apply under the writer mutex (log order is memory order), publishing a new
        version; searches are never blocked. ``dim``: the vectors' dimension, checked against
        the database's under the mutex. ``op`` may be a function of the current version that
        makes the operation under the mutex (``None``: nothing to do). Returns what the
        operation returned."""
        with self._wlock:
            self._check_writable()
            store = self._store
            if callable(op):
                made = op(store.version)
                if made is None:
                    return 0
                op = made
            if dim is not None:
                store.check_dim(dim)
            if isinstance(op, DeleteOp) and not any(store.row_of.get(int(i)) is not None for i in op.ids):
                return 0
            ticket = self._backend.log(op)
            try:
                result = apply_op(store, op)
            except BaseException as exc:
                self._undo(ticket, exc)
                raise
            if not self._bulk_depth:
                self._compact_if_wanted()
        self._backend.commit(ticket)
        if self._searching and YIELD_EVERY is not None:
            # Hand the GIL to the searches now rather than at the end of the interpreter's
            # switch interval: a writer in a tight loop would otherwise hold it most of the time.
            now = time.perf_counter()
            if now - self._yielded >= YIELD_EVERY:
                time.sleep(0)
                self._yielded = time.perf_counter()
        return result

    def _compact_if_wanted(self) -> None:
        """Compact if the WAL has outgrown its limit (as the writer)."""
        if self._backend.wants_compaction():
            try:
                self._backend.compact(self._store)
            except StorageError as exc:
                # The writes themselves succeeded and are in the WAL, which stays the truth.
                log.warning("iqdb: automatic compaction failed: %s", exc)

    @contextlib.contextmanager
    def _bulk(self, rows: int | None) -> Iterator[None]:
        """A bulk import: the store makes room for ``rows`` more records at once (when known:
        one growth, not one per 1.2x), and automatic compaction waits for the end: one snapshot
        then, instead of one per ``wal_limit`` of imported bytes, each rewriting the whole
        database (an import's cost would grow with the square of its size)."""
        with self._wlock:
            self._bulk_depth += 1
            if rows:
                self._store.expect(rows)
        try:
            yield
        finally:
            with self._wlock:
                self._bulk_depth -= 1
                self._store.expect(0)
                if not self._bulk_depth and not self._closed:
                    self._compact_if_wanted()

    def _undo(self, ticket: Any, exc: BaseException) -> None:
        """A logged write failed to apply (say, MemoryError): take it out of the log and of
        memory, so that memory stays what a reopen would see; if that fails too, poison."""
        try:
            self._store.rollback()
            self._backend.unlog(ticket)
        except BaseException as undo:
            self._broken = undo
            log.error("iqdb: could not undo a failed write (%s after %s); writes are refused", undo, exc)

    def _check_writable(self) -> None:
        self._check_open()
        self._check_not_in_predicate()
        if self._backend.readonly:
            raise InvalidConfig("the database was opened readonly; writes are refused")
        broken = self._broken
        if broken is not None:
            message = (
                f"writes refused until the database is reopened: undoing a failed write failed ({broken})"
            )
            err = Poisoned(message)
            if isinstance(broken, OSError) and broken.errno is not None:
                err = Poisoned(message, broken.errno, broken.filename)
            raise err from broken

    def upsert(self, record: Record) -> None:
        """Insert ``record``, or replace the whole record (vector and payload) with that id.

        Raises
        ------
        InvalidArgument
            ``record`` is not a :class:`Record`.
        DimensionMismatch
            The vector's dimension differs from the database's (``left`` = vector, ``right`` = db).
        """
        self._check_open()  # the rest of _check_writable runs under the writer mutex
        if not isinstance(record, Record):
            raise InvalidArgument(f"upsert takes a Record, got {type(record).__name__}")
        vectors = record.vector.to_numpy()[None, :]
        op = UpsertOp(
            np.array([int(record.id)], dtype=np.uint64),
            vectors,
            [None if record.payload is None else record.payload.copy()],
        )
        self._write(op, record.vector.dim)

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
        self._check_writable()
        rows = coerce_rows(ids, vectors, payloads)
        if rows is not None:
            self._upsert_rows(*rows)

    def _upsert_canonical(
        self,
        ids: object,
        vectors: object,
        payloads: Sequence[dict[str, Any] | None] | None,
        columns: PayloadColumns | None = None,
    ) -> None:
        """:meth:`upsert_many` for a caller whose payloads are fresh dicts of canonical values
        (iqdb's own Arrow import builds them from Arrow's types): they are adopted as they are,
        without the check and the copy (about half of a bulk import's time otherwise).
        ``columns``: the same payloads as scalar columns, when every payload is exactly
        ``{key: columns[key][i]}`` (see :class:`~iqdb._backend.UpsertOp`)."""
        self._check_writable()
        rows = coerce_rows(ids, vectors, payloads, adopt=True)
        if rows is not None:
            self._upsert_rows(*rows, columns)

    def _upsert_rows(
        self,
        id_arr: npt.NDArray[np.uint64],
        matrix: npt.NDArray[np.float32],
        plist: list[Payload | None],
        columns: PayloadColumns | None = None,
    ) -> None:
        # A repeated id: the last row wins.
        op = UpsertOp(np.ascontiguousarray(id_arr), np.ascontiguousarray(matrix), plist, columns)
        self._write(dedupe_last(op), int(matrix.shape[1]))

    def delete(self, rid: object) -> bool:
        """Delete the record with id ``rid``; ``True`` if one was removed.

        Raises
        ------
        InvalidArgument
            ``rid`` is not a valid id.
        """
        self._check_writable()
        key = int(RecordId(rid))
        return bool(self._write(DeleteOp(np.array([key], dtype=np.uint64))))

    def upsert_arrow(
        self,
        data: object,
        *,
        id_column: str = "id",
        vector_column: str = "vector",
        payload_columns: Sequence[str] | None = None,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> int:
        """Insert or replace records from Arrow data, streaming; the number of rows read.

        ``data`` is a ``pyarrow.Table``, a ``RecordBatchReader`` or anything with
        ``__arrow_c_stream__`` (pandas, polars). Each chunk of at most 65,536 rows is one
        :meth:`upsert_many` (all or nothing). A null payload value means the key is absent; see
        :mod:`iqdb._arrow` for the column types. ``progress(done, total)`` reports rows.

        Raises
        ------
        InvalidArgument
            Not Arrow data; a missing or badly typed column, named (timestamps, decimals, ...:
            cast them first); a null or negative id.
        InvalidVector, DimensionMismatch
            As :meth:`upsert_many`.
        """
        self._check_open()
        from ._arrow import upsert_arrow

        return upsert_arrow(
            self,
            data,
            id_column=id_column,
            vector_column=vector_column,
            payload_columns=payload_columns,
            progress=progress,
        )

    def to_arrow(self) -> Any:
        """Every record as a ``pyarrow.Table`` (one consistent version of the database).

        Columns ``id`` (uint64), ``vector`` (``fixed_size_list<float32>[d]``) and one per
        top-level payload key; :meth:`upsert_arrow` of it reproduces the records exactly (see
        :mod:`iqdb._arrow`).
        """
        self._check_open()
        from ._arrow import to_arrow

        return to_arrow(self._store.version)

    def flush(self) -> None:
        """Make every write so far durable (fsync of the WAL); a no-op in memory.

        Raises
        ------
        StorageError
            The fsync failed; the handle is then poisoned (writes raise until reopened).
        """
        self._check_open()
        if not self._backend.readonly:
            self._backend.flush()

    def compact(self) -> None:
        """Write a fresh snapshot and empty the WAL (what ``close()`` does), keeping the handle
        open. Searches go on meanwhile (writers wait).

        Raises
        ------
        InvalidArgument
            Called from inside a search predicate.
        """
        self._check_writable()
        with self._wlock:
            self._check_writable()
            self._backend.compact(self._store)

    def memory_usage(self) -> dict[str, int]:
        """Bytes the database holds: ``{"host": ..., "device": ...}``.

        ``device`` counts the vectors and their norms when search runs on a GPU (0 on the CPU,
        where they are host memory); ``host`` counts everything else: ids, the id index, deleted
        rows not yet dropped, and the payload objects (an estimate: Python's own sizes, an object
        shared by several payloads counted for each).

        >>> import iqdb
        >>> db = iqdb.open_in_memory()
        >>> db.upsert(iqdb.Record(1, [1.0, 2.0]))
        >>> usage = db.memory_usage()
        >>> usage["device"], usage["host"] > 0
        (0, True)
        """
        self._check_open()
        return self._store.memory_usage()

    def check(self) -> dict[str, Any]:
        """Verify the stored files' integrity; a report of what was found (``report["ok"]``)."""
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
        self._check_open()
        key = RecordId(rid)
        found = self._store.lookup(int(key))
        if found is None:
            return None
        v, row = found
        layout = v.layout
        payload = layout.payloads[row]
        vector = layout.matrix[row].copy()
        return Record._trusted(key, Vector._trusted(vector), None if payload is None else payload.copy())

    def search(
        self,
        query: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        *,
        filter: FilterLike | None = None,
    ) -> list[SearchResult]:
        """Exact top-``k`` over all records (or those ``filter`` matches), closest first (ties:
        smaller id first; NaN last).

        Parameters
        ----------
        query
            A :class:`Vector` or anything ``Vector`` accepts.
        k
            How many results at most. ``k == 0`` returns ``[]`` before any other check.
        metric
            ``DistanceMetric`` or its string value.
        filter
            An :class:`iqdb.Filter` or its dict form: the exact top-``k`` among the records it
            matches, ``min(k, matches)`` results (see :mod:`iqdb._filters._expr` for the rules).

        Raises
        ------
        InvalidArgument
            ``k`` negative or not an integer; unknown metric; a malformed filter.
        InvalidVector
            ``query`` is not a valid vector.
        DimensionMismatch
            ``left`` = query dimension, ``right`` = database dimension.
        """
        return self._search_one(query, k, metric, None, filter)

    def search_with(
        self, query: object, k: int, metric: DistanceMetric | str, predicate: Predicate
    ) -> list[SearchResult]:
        """As :meth:`search`, among the records for which ``predicate(record)`` is true.

        The filter applies before the top-``k`` cut: the result is the exact top-``k`` of the
        records that pass. ``predicate`` receives a copy of each record (one Python call per
        record: prefer ``filter=``, which is compiled).

        Raises
        ------
        InvalidArgument
            ``predicate`` is not callable; as :meth:`search` otherwise.
        """
        self._check_open()
        if _check_k(k) and not callable(predicate):
            raise InvalidArgument(f"predicate must be callable, got {type(predicate).__name__}")
        return self._search_one(query, k, metric, predicate, None)

    def _search_one(
        self, query: object, k: object, metric: object, predicate: Predicate | None, where: object
    ) -> list[SearchResult]:
        self._check_open()
        kk = _check_k(k)
        if kk == 0:
            return []
        met = coerce_metric(metric)
        f = coerce_where(where, None)
        q = device_queries(self._store.backend, query, 1)
        q = as_vector_array(query)[None, :] if q is None else q[None, :]
        return self._searcher.run(q, kk, met, predicate, f, as_results)[0]

    def search_batch(
        self,
        queries: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        predicate: Predicate | None = None,
        *,
        filter: FilterLike | Sequence[FilterLike | None] | None = None,
    ) -> list[list[SearchResult]]:
        """One result list per query, in order; each equals :meth:`search` (or :meth:`search_with`).

        Runs as blocked matrix products with bounded memory, not as m single searches.

        Parameters
        ----------
        queries
            An ``(m, d)`` array or a sequence of vectors.
        filter
            One filter for every query, or a list with one per query (``None``: unfiltered).
            Queries that share a filter share its work.

        Raises
        ------
        As :meth:`search` and :meth:`search_with`; ``InvalidArgument`` for a list of filters
        whose length is not the number of queries.
        """
        request = self._batch_request(queries, k, metric, predicate, filter)
        if request is None:
            return [[] for _ in range(_length(queries) or 0)]
        return self._searcher.run(*request[:3], predicate, request[3], as_results)

    def search_arrays(
        self,
        queries: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        predicate: Predicate | None = None,
        *,
        filter: FilterLike | Sequence[FilterLike | None] | None = None,
        device_output: bool = False,
    ) -> tuple[Any, Any]:
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
            in order, exactly what :meth:`search_batch` gives for it. ``c`` is the most results
            any query has (``min(k, matches)``; ``0`` while the database has never held a
            vector). With one filter per query, a query with fewer results has its row padded
            with id :data:`iqdb.NO_ID` and score NaN. With ``device_output=True`` both stay on
            the search device (CuPy arrays on a GPU, for a server that hands them on, say to
            PyTorch through DLPack; NumPy arrays on the CPU). Queries that already live on the
            GPU (CuPy, or anything with ``__cuda_array_interface__`` or a CUDA DLPack capsule)
            are used there.

        Raises
        ------
        As :meth:`search_batch`.
        """
        request = self._batch_request(queries, k, metric, predicate, filter)
        finish = as_device_arrays if device_output else as_arrays
        if request is None:
            return finish(self._store.version, _length(queries) or 0, None)
        return self._searcher.run(*request[:3], predicate, request[3], finish)

    def _batch_request(
        self, queries: object, k: object, metric: object, predicate: Predicate | None, where: object
    ) -> tuple[Any, int, DistanceMetric, Where] | None:
        """The batch searches' checks, in the contract's order: ``None`` when the answer is
        empty without searching (``k == 0`` answers before any other check; no queries), else
        the query matrix, ``k``, the metric and the filters."""
        self._check_open()
        kk = _check_k(k)
        if kk == 0:
            return None
        met = coerce_metric(metric)
        if predicate is not None and not callable(predicate):
            raise InvalidArgument(f"predicate must be callable, got {type(predicate).__name__}")
        Q = device_queries(self._store.backend, queries, 2)
        if Q is None:
            if _length(queries) == 0:
                return None
            Q = as_matrix(queries, "queries")
        if Q.shape[0] == 0:
            return None
        return Q, kk, met, coerce_where(where, int(Q.shape[0]))

    def count(self, filter: FilterLike | None = None) -> int:
        """How many records ``filter`` matches (all of them when ``None``).

        Raises
        ------
        InvalidArgument
            A malformed filter.
        """
        self._check_open()
        return self._searcher.count(None if filter is None else coerce_filter(filter))

    def delete_where(self, filter: FilterLike) -> int:
        """Delete every record ``filter`` matches, in one write (one WAL frame: all or none of
        them after a crash); returns how many were deleted.

        Raises
        ------
        InvalidArgument
            A malformed filter, or called from inside a search predicate.
        """
        self._check_writable()
        f = coerce_filter(filter)

        def matches(v: Version) -> DeleteOp | None:
            # Under the writer mutex: no other write can change the matches meanwhile.
            ids = v.ids[np.flatnonzero(live_mask(v, f))]
            return DeleteOp(ids) if ids.shape[0] else None

        return int(self._write(matches))


_PRIVATE = object()
