"""``ShardedIqdb``: the :class:`iqdb.Iqdb` API over shards, with results identical to one database.

>>> import numpy as np
>>> from iqdb.distributed import ShardedIqdb
>>> with ShardedIqdb.open_in_memory(shards=3, transport="local") as db:
...     db.upsert_many([1, 2, 3, 4], np.eye(4))
...     [int(r.id) for r in db.search([1, 0, 0, 0], k=2, metric="l2")], len(db)
([1, 2], 4)

Writes are routed by the id's hash (:mod:`._routing`) and grouped per shard; searches go to every
shard at once and the driver merges the per-shard top-``k`` (:mod:`._merge`), which gives exactly
what one database over all the records gives: ids, order, scores to the bit, ties and NaNs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from .._coerce import _check_k, _length, coerce_ids, coerce_rows
from .._errors import Closed, Corrupt, DimensionMismatch, InvalidArgument, InvalidConfig
from .._payload import Payload
from .._values import (
    DistanceMetric,
    Record,
    RecordId,
    SearchResult,
    as_matrix,
    as_vector_array,
    coerce_metric,
)
from ._client import Config, ShardReader, check_timeout, gather, quietly, ray_put, start_actors
from ._manifest import Manifest, check_layout, create_layout, read_manifest, shard_dir, write_manifest
from ._merge import NO_ID, merge_topk
from ._replicas import Replicas
from ._routing import shard_of
from ._shard import LocalShard, Pending, Shard, ShardServer

__all__ = ["ShardedIqdb"]

Predicate = Callable[[Record], object]
_PRIVATE = object()


def _check_shards(shards: object) -> int:
    if isinstance(shards, (bool, np.bool_)) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise InvalidConfig(f"shards must be a positive integer, got {shards!r}")
    return int(shards)


class ShardedIqdb:
    """An iqdb database split over shards, each an ordinary iqdb database served by a Ray actor
    (``transport="ray"``) or by threads in this process (``transport="local"``).

    Open with :meth:`open` (durable, in directory ``root``) or :meth:`open_in_memory`. It has the
    :class:`iqdb.Iqdb` API; searches return exactly what one database over all the records would.

    Atomicity is per shard. ``upsert_many`` splits its rows by shard and each shard applies its
    part all or nothing; when a shard fails (or the process dies) in the middle, the shards that
    acknowledged keep their part and the others have none of theirs. Repeating the call is safe:
    an upsert of the same rows is idempotent.
    """

    def __init__(
        self,
        shards: list[Shard],
        manifest: Manifest,
        *,
        root: str | None,
        share: Callable[[Any], Any],
        timeout: float | None,
        replicas: Replicas | None = None,
        _token: object = None,
    ) -> None:
        if _token is not _PRIVATE:
            raise TypeError("use ShardedIqdb.open(root, shards=N) or ShardedIqdb.open_in_memory(shards=N)")
        self._shards = shards
        self._manifest = manifest
        self._root = root
        self._share = share
        self._timeout = timeout
        self._replicas = replicas
        self._dim = manifest.dim
        self._dim_lock = threading.Lock()  # held by the write that fixes the dimension
        self._closed = False

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        shards: int | None = None,
        *,
        device: str = "auto",
        actor_options: dict[str, Any] | None = None,
        transport: str = "ray",
        timeout: float | None = 60.0,
        read_concurrency: int = 2,
        lock_wait: float = 30.0,
        replicas: int = 0,
        **options: Any,
    ) -> ShardedIqdb:
        """Open or create a durable sharded database in directory ``root``.

        ``root/manifest.json`` records the layout; shard ``i`` is the ordinary iqdb database
        directory ``root/shard-0000i`` (``iqdb.open`` opens it on its own), with a ``shard.json``
        marker. Over Ray, each shard's actor restarts after a crash (``max_restarts=-1``) and
        reopens its directory: every acknowledged write is in its write-ahead log.

        Parameters
        ----------
        root
            The database's directory (created with its parents). Every shard's actor must see
            it at the same path: one machine, or shared storage.
        shards
            The number of shards; required to create, optional to reopen (it must then equal the
            manifest's).
        device
            As for :meth:`iqdb.Iqdb.open`, for every shard. Over Ray, a GPU device (or ``"auto"``
            when the cluster has GPUs) makes each actor ask for one GPU.
        actor_options
            Ray actor options that override the defaults (``num_cpus`` 1, or ``num_gpus`` 1;
            ``max_restarts``; ``max_task_retries`` 0; a name), e.g. ``{"num_cpus": 4}``,
            ``{"lifetime": "detached"}`` or a ``scheduling_strategy``.
        transport
            ``"ray"`` (one actor per shard) or ``"local"`` (threads in this process: no Ray).
        timeout
            Default seconds a call waits for the shards (``None``: no limit); each call can give
            its own. A shard that does not answer in time raises :class:`ShardUnavailable`.
        read_concurrency
            Searches one shard runs at once.
        lock_wait
            Seconds a (re)starting shard waits for its directory's lock.
        replicas
            Read replicas per shard: extra actors (or threads) with a read-only view of the
            shard's directory that take turns with it at answering searches. A replica answers
            only once it has reopened after the last write to its shard, so searches always see
            every acknowledged write. They need the directory at the same path (same machine,
            or shared storage), and pay off for read-heavy loads with cores or GPUs to spare.
        **options
            ``sync``, ``wal_limit``, ``working_set``: as for :meth:`iqdb.Iqdb.open`.

        Raises
        ------
        InvalidConfig
            ``shards`` differs from the manifest's, or is missing for a new database; ``root``
            is not a directory, or a non-empty directory with no manifest; a shard directory or
            its marker is missing; an unknown option, device or transport.
        Corrupt
            The manifest is damaged, or the shards disagree on the dimension.
        ShardUnavailable
            A shard's actor could not start (its cause is in the message).
        """
        where = os.fspath(root)
        if not isinstance(where, str) or not where:
            raise InvalidConfig(f"root must be a directory path, got {root!r}")
        if os.path.exists(where) and not os.path.isdir(where):
            raise InvalidConfig(f"root {where!r} exists and is not a directory")
        count = None if shards is None else _check_shards(shards)
        cfg = Config.make(device, actor_options, transport, timeout, read_concurrency, lock_wait, options)
        manifest = read_manifest(where)
        if manifest is None:
            if count is None:
                raise InvalidConfig(f"{where!r} holds no sharded database: give shards=N to create one")
            manifest = create_layout(where, count)
        else:
            if count is not None and count != manifest.shards:
                raise InvalidConfig(
                    f"{where!r} holds {manifest.shards} shards (manifest.json) but shards={count} was "
                    "given: the shard count is fixed when the database is created"
                )
            check_layout(where, manifest)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise InvalidConfig(f"replicas must be a non-negative integer, got {replicas!r}")
        paths: list[str | None] = [shard_dir(where, i) for i in range(manifest.shards)]
        db = cls._start(paths, manifest, where, cfg, replicas)
        try:
            db._adopt_dim()
        except BaseException:
            db._teardown()
            raise
        return db

    @classmethod
    def open_in_memory(
        cls,
        shards: int,
        *,
        device: str = "auto",
        actor_options: dict[str, Any] | None = None,
        transport: str = "ray",
        timeout: float | None = 60.0,
        read_concurrency: int = 2,
        working_set: int | None = None,
    ) -> ShardedIqdb:
        """A new, empty sharded database held in memory by its shards.

        An in-memory shard cannot survive its actor: a dead shard is not restarted (it would
        come back empty) and calls to it raise :class:`ShardUnavailable`.

        Parameters
        ----------
        shards, device, actor_options, transport, timeout, read_concurrency
            As for :meth:`open`.
        working_set
            As for :meth:`iqdb.Iqdb.open_in_memory`.

        Raises
        ------
        InvalidConfig
            A bad shard count, device, transport or option.
        ShardUnavailable
            A shard's actor could not start.
        """
        import uuid as uuidlib

        count = _check_shards(shards)
        options = {} if working_set is None else {"working_set": working_set}
        cfg = Config.make(device, actor_options, transport, timeout, read_concurrency, 0.0, options)
        manifest = Manifest(uuid=uuidlib.uuid4().hex, shards=count, dim=None)
        return cls._start([None] * count, manifest, None, cfg)

    @classmethod
    def _start(
        cls, paths: list[str | None], manifest: Manifest, root: str | None, cfg: Config, replicas: int = 0
    ) -> ShardedIqdb:
        started: list[list[Shard]] = []  # the primaries, then each round of replicas
        try:
            for replica in [None, *range(replicas)]:
                if cfg.transport == "local":
                    started.append([])
                    for i, path in enumerate(paths):
                        server = ShardServer(
                            path,
                            i,
                            manifest.uuid,
                            cfg.device,
                            cfg.options,
                            cfg.lock_wait,
                            replica is not None,
                        )
                        started[-1].append(LocalShard(i, server))
                else:
                    started.append(start_actors(paths, manifest, cfg, replica))
        except BaseException:
            for shard in (s for group in started for s in group):
                quietly(shard.stop)
            raise
        share: Callable[[Any], Any] = _identity if cfg.transport == "local" else ray_put
        copies = (
            Replicas([[group[i] for group in started[1:]] for i in range(len(paths))]) if replicas else None
        )
        return cls(
            started[0],
            manifest,
            root=root,
            share=share,
            timeout=cfg.timeout,
            replicas=copies,
            _token=_PRIVATE,
        )

    def _adopt_dim(self) -> None:
        """Take the dimension from the shards when the manifest has none yet: a crash may have
        come between a first write and the manifest's update."""
        dims = {d for d in self._fan("dim", "control", (), None, retry=True) if d is not None}
        if len(dims) > 1:
            raise Corrupt(f"the shards of {self._root!r} hold vectors of different dimensions {sorted(dims)}")
        found = dims.pop() if dims else None
        if self._dim is not None and found is not None and found != self._dim:
            raise Corrupt(f"the shards of {self._root!r} hold dimension {found}, the manifest {self._dim}")
        if self._dim is None and found is not None:
            self._set_dim(found)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close every shard (durable shards compact first), then stop their actors or threads.
        Closing again does nothing.

        Raises
        ------
        ShardUnavailable
            A shard could not be reached to close it (its writes are still in its WAL; the next
            open replays them).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._fan("close", "write", (), None, retry=True)
            if self._replicas is not None:
                gather(
                    [r.submit("close", "write", retry=True) for r in self._replicas.all()],
                    self._deadline(None),
                )
        finally:
            self._teardown()

    def _teardown(self) -> None:
        self._closed = True
        for shard in [*self._shards, *(self._replicas.all() if self._replicas else [])]:
            quietly(shard.stop)

    def __enter__(self) -> ShardedIqdb:
        self._check_open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"shards={len(self._shards)} dim={self._dim}"
        where = "memory" if self._root is None else repr(self._root)
        return f"<ShardedIqdb {where} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the sharded database handle is closed")

    @property
    def shards(self) -> int:
        """The number of shards."""
        return len(self._shards)

    @property
    def dim(self) -> int | None:
        """The dimension, or ``None`` while the database has never held a vector."""
        self._check_open()
        return self._dim

    def shard_of(self, rid: object) -> int:
        """The shard that holds (or would hold) id ``rid``.

        Raises
        ------
        InvalidArgument
            ``rid`` is not a valid id.
        """
        return int(shard_of(np.array([int(RecordId(rid))], dtype=np.uint64), len(self._shards))[0])

    def shard_info(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Per shard: the process (``pid``) and ``device`` serving it; a health check.

        Raises
        ------
        ShardUnavailable
            A shard did not answer in time.
        """
        self._check_open()
        return list(self._fan("info", "control", (), timeout, retry=True))

    # -- plumbing ---------------------------------------------------------------------------
    def _deadline(self, timeout: float | None) -> float | None:
        limit = self._timeout if timeout is None else check_timeout(timeout)
        return None if limit is None else time.monotonic() + limit

    def _fan(
        self, method: str, group: str, args: tuple[Any, ...], timeout: float | None, retry: bool
    ) -> list[Any]:
        deadline = self._deadline(timeout)
        pending = [self._submit(i, method, group, args, retry) for i in range(len(self._shards))]
        return gather(pending, deadline)

    def _one(self, rid: int, method: str, group: str, args: tuple[Any, ...], timeout: float | None) -> Any:
        deadline = self._deadline(timeout)
        return gather([self._submit(self.shard_of(rid), method, group, args, True)], deadline)[0]

    def _submit(self, index: int, method: str, group: str, args: tuple[Any, ...], retry: bool) -> Pending:
        """Reads may go to a fresh replica; everything else goes to the shard itself."""
        primary = self._shards[index]
        if group == "read" and self._replicas is not None:
            return self._replicas.submit(index, primary, method, group, *args)
        return primary.submit(method, group, *args, retry=retry)

    def _wrote(self, shards: Iterable[int]) -> None:
        if self._replicas is not None:
            self._replicas.wrote(shards)

    def _set_dim(self, dim: int) -> None:
        self._dim = dim
        self._manifest = self._manifest.with_dim(dim)
        if self._root is not None:
            write_manifest(self._root, self._manifest)

    # -- writes -----------------------------------------------------------------------------
    def upsert(self, record: Record, *, timeout: float | None = None) -> None:
        """Insert ``record``, or replace the record with that id; see :meth:`iqdb.Iqdb.upsert`.

        Raises
        ------
        InvalidArgument
            ``record`` is not a :class:`iqdb.Record`.
        DimensionMismatch
            The vector's dimension differs from the database's.
        ShardUnavailable
            The shard did not acknowledge in time (the write may or may not have been applied).
        """
        self._check_open()
        if not isinstance(record, Record):
            raise InvalidArgument(f"upsert takes a Record, got {type(record).__name__}")
        payload = None if record.payload is None else record.payload.copy()
        self._write_rows(
            np.array([int(record.id)], dtype=np.uint64), record.vector.to_numpy()[None, :], [payload], timeout
        )

    def upsert_many(
        self,
        ids: object,
        vectors: object,
        payloads: Sequence[object] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Insert or replace many records; see :meth:`iqdb.Iqdb.upsert_many`.

        Every row is checked before any shard is written, so bad input writes nothing. The rows
        are then split by shard and the shards write their parts concurrently, each all or
        nothing: if one fails, those that acknowledged keep their part (repeating the call is
        safe). A repeated id: the last row wins (all its rows go to the same shard, in order).

        Raises
        ------
        InvalidArgument
            Bad ids, lengths that differ, or a bad payload (naming its row).
        InvalidVector
            A row is empty or non-finite, or the vectors are not a regular numeric array.
        DimensionMismatch
            The rows' dimension differs from the database's.
        ShardUnavailable
            A shard did not acknowledge in time; the others' parts are written.
        """
        self._check_open()
        rows = coerce_rows(ids, vectors, payloads)
        if rows is not None:
            self._write_rows(*rows, timeout)

    def _write_rows(
        self,
        ids: npt.NDArray[np.uint64],
        matrix: npt.NDArray[np.float32],
        payloads: list[Payload | None],
        timeout: float | None,
    ) -> None:
        dim = int(matrix.shape[1])
        if self._dim is not None:
            if dim != self._dim:
                raise DimensionMismatch(left=dim, right=self._dim)
            self._send_rows(ids, matrix, payloads, timeout)
            return
        with self._dim_lock:  # the first write fixes the dimension; concurrent ones wait for it
            if self._dim is not None:
                if dim != self._dim:
                    raise DimensionMismatch(left=dim, right=self._dim)
                self._send_rows(ids, matrix, payloads, timeout)
                return
            try:
                self._send_rows(ids, matrix, payloads, timeout)
            except BaseException:
                # Any shard that took its part holds this dimension for good; one that failed
                # holds nothing. Ask which is the case (if the shards answer: the write's own
                # error is the one to report).
                try:
                    fixed = any(d is not None for d in self._fan("dim", "control", (), timeout, retry=True))
                except Exception:
                    fixed = False
                if fixed:
                    self._set_dim(dim)
                raise
            self._set_dim(dim)

    def _send_rows(
        self,
        ids: npt.NDArray[np.uint64],
        matrix: npt.NDArray[np.float32],
        payloads: list[Payload | None],
        timeout: float | None,
    ) -> None:
        deadline = self._deadline(timeout)
        where = shard_of(ids, len(self._shards))
        # A stable sort keeps each shard's rows in the caller's order, so "the last row wins"
        # holds within the shard that receives every copy of a repeated id.
        order = np.argsort(where, kind="stable")
        bounds = np.searchsorted(where[order], np.arange(len(self._shards) + 1))
        pending: list[Pending] = []
        written: list[int] = []
        for s, shard in enumerate(self._shards):
            rows = order[bounds[s] : bounds[s + 1]]
            if rows.size == 0:
                continue
            part = [payloads[r] for r in rows.tolist()]
            args = (np.ascontiguousarray(ids[rows]), np.ascontiguousarray(matrix[rows]), part)
            # An upsert sent twice leaves what one leaves: safe to send again after a lost shard.
            pending.append(shard.submit("upsert_many", "write", *args, retry=True))
            written.append(s)
        try:
            gather(pending, deadline)
        finally:
            self._wrote(written)

    def delete(self, rid: object, *, timeout: float | None = None) -> bool:
        """Delete the record with id ``rid``; ``True`` if one was removed.

        After a shard was lost during the call and the delete was sent again, the answer can be
        ``False`` for a record the first attempt removed; the record is gone either way.

        Raises
        ------
        InvalidArgument
            ``rid`` is not a valid id.
        ShardUnavailable
            The shard did not answer in time.
        """
        self._check_open()
        key = int(RecordId(rid))
        try:
            return bool(self._one(key, "delete", "write", (key,), timeout))
        finally:
            self._wrote([self.shard_of(key)])

    def delete_where(self, filter: object, *, timeout: float | None = None) -> int:
        """Delete the records matching ``filter`` on every shard; how many were deleted.

        Each shard deletes its matches all or nothing; see :meth:`iqdb.Iqdb.delete_where`.

        Raises
        ------
        InvalidArgument
            A malformed filter.
        ShardUnavailable
            A shard did not answer in time (the others have deleted their matches).
        """
        self._check_open()
        try:
            return sum(self._fan("delete_where", "write", (filter,), timeout, retry=True))
        finally:
            self._wrote(range(len(self._shards)))

    def upsert_arrow(
        self,
        data: object,
        *,
        id_column: str = "id",
        vector_column: str = "vector",
        payload_columns: Sequence[str] | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Insert or replace the rows of Arrow data (see :meth:`iqdb.Iqdb.upsert_arrow`); the rows read.

        Each record batch of ``data`` is split by shard (with ``pyarrow.compute``) and every shard
        writes its part of the batch, all or nothing per shard. ``progress(done, total)`` is
        called after each batch (``total`` is ``None`` for a stream).

        Raises
        ------
        InvalidArgument
            ``data`` is not Arrow data, or lacks ``id_column``; as ``Iqdb.upsert_arrow``.
        ShardUnavailable
            A shard did not acknowledge in time.
        """
        import pyarrow as pa

        self._check_open()
        total = None
        if isinstance(data, pa.Table):
            batches: Any = data.to_batches()
            total = data.num_rows
        elif isinstance(data, pa.RecordBatch):
            batches = [data]
            total = data.num_rows
        elif isinstance(data, pa.RecordBatchReader):
            batches = data
        elif hasattr(data, "__arrow_c_stream__"):
            batches = pa.RecordBatchReader.from_stream(data)
        else:
            raise InvalidArgument(f"upsert_arrow takes Arrow data, got {type(data).__name__}")
        options: dict[str, Any] = {"id_column": id_column, "vector_column": vector_column}
        if payload_columns is not None:
            options["payload_columns"] = list(payload_columns)
        rows = 0
        for batch in batches:
            if batch.num_rows:
                self._send_arrow(batch, options, timeout)
                rows += batch.num_rows
                if progress is not None:
                    progress(rows, total)
        return rows

    def _send_arrow(self, batch: Any, options: dict[str, Any], timeout: float | None) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        if options["id_column"] not in batch.schema.names:
            raise InvalidArgument(f"the Arrow data has no id column {options['id_column']!r}")
        ids = coerce_ids(batch.column(options["id_column"]).to_numpy(zero_copy_only=False))
        where = pa.array(shard_of(ids, len(self._shards)))
        table = pa.Table.from_batches([batch])
        deadline = self._deadline(timeout)
        pending = []
        written: list[int] = []
        for s, shard in enumerate(self._shards):
            part = table.filter(pc.equal(where, s))
            if part.num_rows:
                pending.append(shard.submit("upsert_arrow", "write", part, options, retry=True))
                written.append(s)
        try:
            gather(pending, deadline)
        finally:
            self._wrote(written)
        if self._dim is None:
            dims = {d for d in self._fan("dim", "control", (), timeout, retry=True) if d is not None}
            if dims:
                with self._dim_lock:
                    self._set_dim(dims.pop())

    def flush(self, *, timeout: float | None = None) -> None:
        """Make every write so far durable on every shard (fsync of each WAL).

        Raises
        ------
        StorageError
            A shard's fsync failed (that shard is then poisoned until reopened).
        ShardUnavailable
            A shard did not answer in time.
        """
        self._check_open()
        self._fan("flush", "write", (), timeout, retry=True)

    def compact(self, *, timeout: float | None = None) -> None:
        """Compact every shard (a fresh snapshot, the WAL emptied): shorter restarts.

        Raises
        ------
        ShardUnavailable
            A shard did not answer in time.
        """
        self._check_open()
        self._fan("compact", "write", (), timeout, retry=True)

    # -- reads ------------------------------------------------------------------------------
    def get(self, rid: object, *, timeout: float | None = None) -> Record | None:
        """A copy of the record with id ``rid``, or ``None``.

        Raises
        ------
        InvalidArgument
            ``rid`` is not a valid id.
        ShardUnavailable
            The shard did not answer in time.
        """
        self._check_open()
        key = int(RecordId(rid))
        found: Record | None = self._one(key, "get", "read", (key,), timeout)
        return found

    def __contains__(self, rid: object) -> bool:
        self._check_open()
        key = int(RecordId(rid))
        return bool(self._one(key, "contains", "read", (key,), None))

    def __len__(self) -> int:
        self._check_open()
        return sum(self._fan("length", "control", (), None, retry=True))

    def is_empty(self) -> bool:
        """``True`` when no record is stored."""
        return len(self) == 0

    def count(self, filter: object = None, *, timeout: float | None = None) -> int:
        """How many records match ``filter`` (all records when ``None``), over every shard.

        Raises
        ------
        InvalidArgument
            A malformed filter.
        ShardUnavailable
            A shard did not answer in time.
        """
        self._check_open()
        return sum(self._fan("count", "read", (filter,), timeout, retry=True))

    def search(
        self,
        query: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        *,
        filter: object = None,
        timeout: float | None = None,
    ) -> list[SearchResult]:
        """Exact top-``k`` over all shards; equal to :meth:`iqdb.Iqdb.search` over the union.

        Parameters
        ----------
        query, k, metric
            As for :meth:`iqdb.Iqdb.search`.
        filter
            A filter, passed to every shard.
        timeout
            Seconds to wait for every shard (default: the handle's). Never a partial answer.

        Raises
        ------
        InvalidArgument
            ``k`` negative or not an integer; unknown metric.
        InvalidVector
            ``query`` is not a valid vector.
        DimensionMismatch
            ``left`` = query dimension, ``right`` = database dimension.
        ShardUnavailable
            A shard did not answer in time.
        """
        return self._search_one(query, k, metric, None, filter, timeout)

    def search_with(
        self,
        query: object,
        k: int,
        metric: DistanceMetric | str,
        predicate: Predicate,
        *,
        timeout: float | None = None,
    ) -> list[SearchResult]:
        """As :meth:`search`, among the records for which ``predicate(record)`` is true.

        Over Ray the predicate is pickled (cloudpickle) to every shard's actor.

        Raises
        ------
        InvalidArgument
            ``predicate`` is not callable; as :meth:`search` otherwise.
        """
        self._check_open()
        if _check_k(k) and not callable(predicate):
            raise InvalidArgument(f"predicate must be callable, got {type(predicate).__name__}")
        return self._search_one(query, k, metric, predicate, None, timeout)

    def _search_one(
        self,
        query: object,
        k: object,
        metric: object,
        predicate: Predicate | None,
        filter: object,
        timeout: float | None,
    ) -> list[SearchResult]:
        self._check_open()
        kk = _check_k(k)
        if kk == 0:
            return []
        met = coerce_metric(metric)
        Q = as_vector_array(query)[None, :]
        return self._search_lists(Q, kk, met, predicate, filter, timeout)[0]

    def search_batch(
        self,
        queries: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        predicate: Predicate | None = None,
        *,
        filter: object = None,
        timeout: float | None = None,
    ) -> list[list[SearchResult]]:
        """One result list per query; each equals :meth:`search` for that query.

        Raises
        ------
        As :meth:`search` and :meth:`search_with`.
        """
        request = self._batch_request(queries, k, metric, predicate)
        if request is None:
            return [[] for _ in range(_length(queries) or 0)]
        return self._search_lists(*request, predicate, filter, timeout)

    def search_arrays(
        self,
        queries: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        predicate: Predicate | None = None,
        *,
        filter: object = None,
        timeout: float | None = None,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float64]]:
        """As :meth:`search_batch`, as ``(m, c)`` arrays of ids (``uint64``) and scores (``float64``),
        exactly :meth:`iqdb.Iqdb.search_arrays` over the union (padding included).

        Raises
        ------
        As :meth:`search_batch`.
        """
        request = self._batch_request(queries, k, metric, predicate)
        if request is None:
            m = _length(queries) or 0
            return np.empty((m, 0), dtype=np.uint64), np.empty((m, 0), dtype=np.float64)
        Q, kk, met = request
        if self._dim is None:
            m = int(Q.shape[0])
            return np.empty((m, 0), dtype=np.uint64), np.empty((m, 0), dtype=np.float64)
        parts = self._fan_search("search_arrays", Q, kk, met, predicate, filter, timeout)
        # Without a filter every query has the same number of results, so no row is padded; with
        # one, a shard pads short rows with (NO_ID, NaN), which no real result can be told from
        # only when a record has the id 2**64 - 1 and a NaN score, and would then sort last anyway.
        narrowed = predicate is not None or filter is not None
        valid = [~((ids == NO_ID) & np.isnan(sc)) if narrowed else None for ids, sc in parts]
        ids, scores, _, _ = merge_topk(parts, valid, kk)
        return ids, scores

    def _batch_request(
        self, queries: object, k: object, metric: object, predicate: Predicate | None
    ) -> tuple[npt.NDArray[np.float32], int, DistanceMetric] | None:
        """The batch searches' checks in :class:`iqdb.Iqdb`'s order; ``None`` for an empty answer."""
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

    def _fan_search(
        self,
        method: str,
        Q: npt.NDArray[np.float32],
        k: int,
        metric: DistanceMetric,
        predicate: Predicate | None,
        filter: object,
        timeout: float | None,
    ) -> list[Any]:
        dim = self._dim
        if dim is not None and Q.shape[1] != dim:
            raise DimensionMismatch(left=int(Q.shape[1]), right=dim)
        # `filter` reaches the shards only when given, so that shards of an iqdb without filters
        # still answer plain searches.
        extra = {} if filter is None else {"filter": filter}
        shared = self._share(Q)  # one copy of the queries for all shards (ray.put)
        return self._fan(method, "read", (shared, k, metric.value, predicate, extra), timeout, retry=True)

    def _search_lists(
        self,
        Q: npt.NDArray[np.float32],
        k: int,
        metric: DistanceMetric,
        predicate: Predicate | None,
        filter: object,
        timeout: float | None,
    ) -> list[list[SearchResult]]:
        m = int(Q.shape[0])
        if self._dim is None:
            return [[] for _ in range(m)]
        per_shard: list[list[list[SearchResult]]] = self._fan_search(
            "search_batch", Q, k, metric, predicate, filter, timeout
        )
        parts, valid = [], []
        for lists in per_shard:
            width = max((len(r) for r in lists), default=0)
            ids = np.full((m, width), NO_ID, dtype=np.uint64)
            scores = np.full((m, width), np.nan)
            ok = np.zeros((m, width), dtype=bool)
            for q, results in enumerate(lists):
                n = len(results)
                if n:
                    ids[q, :n] = [int(r.id) for r in results]
                    scores[q, :n] = [r.score for r in results]
                    ok[q, :n] = True
            parts.append((ids, scores))
            valid.append(ok)
        _, _, shard, pos = merge_topk(parts, valid, k)
        shard_rows, pos_rows = shard.tolist(), pos.tolist()
        return [[per_shard[s][q][p] for s, p in zip(shard_rows[q], pos_rows[q]) if s >= 0] for q in range(m)]

    def reader(self) -> ShardReader:
        """A picklable search-only client of this database's shards, for Ray tasks and actors
        (the batch helper uses it). Over the local transport it works in this process only.

        Raises
        ------
        Closed
            The handle is closed.
        """
        self._check_open()
        return ShardReader(list(self._shards), self._dim, self._timeout)


def _identity(value: Any) -> Any:
    return value
