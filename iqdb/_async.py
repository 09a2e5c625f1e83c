"""An asyncio handle: the :class:`~iqdb.Iqdb` API as coroutines, with the blocking work in threads.

>>> import asyncio, iqdb
>>> async def main() -> list[int]:
...     async with iqdb.AsyncIqdb.open_in_memory() as db:
...         await db.upsert_many([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
...         hits = await db.search([1.0, 0.1], k=2, metric="l2")
...         return [int(h.id) for h in hits]
>>> asyncio.run(main())
[1, 3]

``await AsyncIqdb.open(path, ...)`` and ``await AsyncIqdb.open_in_memory(...)`` give a handle;
``async with AsyncIqdb.open(path) as db:`` (with or without ``await``) closes it on exit. Every
method of :class:`~iqdb.Iqdb` has a coroutine twin here taking the same arguments (keywords that
later versions add pass straight through); ``device``, ``dim``, ``len(db)`` and ``id in db``
stay plain, since they only read one attribute.

How it works, and what it promises:

* *The event loop never blocks on iqdb.* Each call runs the synchronous method in a worker
  thread (the loop's default executor, or the ``executor`` given to ``open``). Searches never
  wait for writes (each reads an immutable version of the store) and release the GIL in their
  matrix products, so searches from many tasks run concurrently, next to one writer.
* *Safe to share across tasks.* The handle is the thread-safe :class:`~iqdb.Iqdb`; writers
  serialise on its mutex in the order their threads reach it.
* *Cancelling never half-applies a write.* A cancelled task stops waiting at once. If its call
  had not started in a thread yet, it never runs. If it had started, it runs to its end in the
  thread, so **a write whose task was cancelled may still complete**: each write is all or
  nothing (one WAL frame, one published version), and it either lands whole or fails whole.
  To know which, read the database afterwards (``get``, ``len``). Arguments are read in the
  worker thread: do not change an array you passed in until the call returns, nor at all after
  cancelling it.
* A cancelled ``open`` that completes in its thread anyway closes what it opened, so the
  directory is not left locked.
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._db import Iqdb
from ._errors import Closed, InvalidArgument
from ._values import DistanceMetric, Record, SearchResult

if TYPE_CHECKING:  # asyncio is imported on first use: `import iqdb` stays as quick as it was
    import asyncio
    from concurrent.futures import Executor

__all__ = ["AsyncIqdb"]

T = TypeVar("T")


async def _in_thread(executor: Executor | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, with this task's context variables (as
    :func:`asyncio.to_thread`), on ``executor`` or the running loop's default one."""
    import asyncio

    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await loop.run_in_executor(executor, call)


class AsyncIqdb:
    """An iqdb database for asyncio code: every :class:`~iqdb.Iqdb` method as a coroutine.

    Get one with :meth:`open` or :meth:`open_in_memory`, or wrap an open :class:`~iqdb.Iqdb`
    (``AsyncIqdb(db)``; closing either closes both). Use ``async with``, or ``await db.close()``.
    After ``close()`` every call but ``close()`` raises :class:`~iqdb.Closed`.

    Parameters
    ----------
    db
        The synchronous handle to drive.
    executor
        Where the blocking calls run; ``None`` (the default) uses the running event loop's
        default executor, as :func:`asyncio.to_thread` does.

    Raises
    ------
    InvalidArgument
        ``db`` is not an :class:`~iqdb.Iqdb`.
    """

    __slots__ = ("_closed", "_db", "_executor")

    def __init__(self, db: Iqdb, *, executor: Executor | None = None) -> None:
        if not isinstance(db, Iqdb):
            raise InvalidArgument(f"AsyncIqdb wraps an Iqdb, got {type(db).__name__}")
        self._db = db
        self._executor = executor
        self._closed = False

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, executor: Executor | None = None, **options: Any
    ) -> _Opening:
        """Open or create a durable database in directory ``path``, off the event loop.

        ``await AsyncIqdb.open(path)`` gives the handle; ``async with AsyncIqdb.open(path) as db``
        also closes it. The open (which may replay the write-ahead log) runs in a worker thread.

        Parameters
        ----------
        path
            The database directory, as for :meth:`iqdb.Iqdb.open`.
        executor
            Where blocking calls run (default: the event loop's default executor).
        **options
            Passed to :meth:`iqdb.Iqdb.open`: ``device``, ``readonly``, ``working_set``,
            ``sync``, ``wal_limit``.

        Raises
        ------
        InvalidConfig, Corrupt, Locked, StorageError, DeviceUnavailable
            As :meth:`iqdb.Iqdb.open`, when awaited.
        """
        return _Opening(functools.partial(Iqdb.open, path, **options), executor)

    @classmethod
    def open_in_memory(cls, *, executor: Executor | None = None, **options: Any) -> _Opening:
        """A new, empty, in-memory database; ``await`` it, or use it in ``async with``.

        Parameters
        ----------
        executor
            Where blocking calls run (default: the event loop's default executor).
        **options
            Passed to :meth:`iqdb.Iqdb.open_in_memory`: ``device``, ``working_set``.

        Raises
        ------
        InvalidConfig, DeviceUnavailable
            As :meth:`iqdb.Iqdb.open_in_memory`, when awaited.
        """
        return _Opening(functools.partial(Iqdb.open_in_memory, **options), executor)

    # -- lifecycle ------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the handle (a durable one compacts first, in a worker thread).

        Writes already running finish first; calls made after this one raise
        :class:`~iqdb.Closed`. Closing again does nothing.

        Raises
        ------
        StorageError
            The compaction failed (the write-ahead log keeps every write).
        """
        self._closed = True
        await _in_thread(self._executor, self._db.close)

    async def __aenter__(self) -> AsyncIqdb:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncIqdb {self._db!r}>" if not self._closed else "<AsyncIqdb closed>"

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the database handle is closed")

    async def _run(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        self._check_open()  # before any argument, as the synchronous handle does
        return await _in_thread(self._executor, getattr(self._db, name), *args, **kwargs)

    # -- plain attributes (one attribute read each: no thread) ----------------------------
    @property
    def handle(self) -> Iqdb:
        """The synchronous :class:`~iqdb.Iqdb` this drives (for code that runs in threads)."""
        return self._db

    @property
    def device(self) -> str:
        """Where search runs: ``"cpu"`` or ``"cuda:N"``.

        Raises
        ------
        Closed
            The handle is closed.
        """
        self._check_open()
        return self._db.device

    @property
    def dim(self) -> int | None:
        """The dimension, or ``None`` while the database has never held a vector.

        Raises
        ------
        Closed
            The handle is closed.
        """
        self._check_open()
        return self._db.dim

    def __len__(self) -> int:
        self._check_open()
        return len(self._db)

    def __contains__(self, rid: object) -> bool:
        self._check_open()
        return rid in self._db

    # -- coroutine twins of the Iqdb methods ----------------------------------------------
    async def is_empty(self) -> bool:
        """``True`` when no record is stored.

        Raises
        ------
        Closed
            The handle is closed.
        """
        result: bool = await self._run("is_empty")
        return result

    async def upsert(self, record: Record, **options: Any) -> None:
        """Insert or replace one record; see :meth:`iqdb.Iqdb.upsert`.

        Raises
        ------
        InvalidArgument, DimensionMismatch, Closed
            As :meth:`iqdb.Iqdb.upsert`.
        """
        await self._run("upsert", record, **options)

    async def upsert_many(self, ids: object, vectors: object, payloads: Any = None, **options: Any) -> None:
        """Insert or replace many records, all or nothing; see :meth:`iqdb.Iqdb.upsert_many`.

        A cancelled call may still complete (see the module notes); it never half-applies.

        Raises
        ------
        InvalidArgument, InvalidVector, DimensionMismatch, Closed
            As :meth:`iqdb.Iqdb.upsert_many`.
        """
        await self._run("upsert_many", ids, vectors, payloads, **options)

    async def upsert_arrow(self, data: Any, **options: Any) -> Any:
        """Bulk insert from Arrow data, streaming, in a worker thread; see ``Iqdb.upsert_arrow``.

        Raises
        ------
        InvalidArgument, InvalidVector, DimensionMismatch, Closed
            As ``Iqdb.upsert_arrow``.
        """
        return await self._run("upsert_arrow", data, **options)

    async def get(self, rid: object) -> Record | None:
        """A copy of the record with id ``rid``, or ``None``; see :meth:`iqdb.Iqdb.get`.

        Raises
        ------
        InvalidArgument, Closed
            As :meth:`iqdb.Iqdb.get`.
        """
        result: Record | None = await self._run("get", rid)
        return result

    async def delete(self, rid: object) -> bool:
        """Delete the record with id ``rid``; ``True`` if one was removed.

        Raises
        ------
        InvalidArgument, Closed
            As :meth:`iqdb.Iqdb.delete`.
        """
        result: bool = await self._run("delete", rid)
        return result

    async def delete_where(self, *args: Any, **kwargs: Any) -> int:
        """Delete the records a filter matches, all or nothing; how many. See ``Iqdb.delete_where``.

        Raises
        ------
        InvalidArgument, Closed
            As ``Iqdb.delete_where``.
        """
        result: int = await self._run("delete_where", *args, **kwargs)
        return result

    async def count(self, *args: Any, **kwargs: Any) -> int:
        """How many records match a filter (all of them without one); see ``Iqdb.count``.

        Raises
        ------
        InvalidArgument, Closed
            As ``Iqdb.count``.
        """
        result: int = await self._run("count", *args, **kwargs)
        return result

    async def flush(self) -> None:
        """Make every write so far durable (fsync, in a worker thread); see :meth:`iqdb.Iqdb.flush`.

        Raises
        ------
        StorageError, Closed
            As :meth:`iqdb.Iqdb.flush`.
        """
        await self._run("flush")

    async def compact(self) -> None:
        """Write a fresh snapshot and empty the WAL; see :meth:`iqdb.Iqdb.compact`.

        Raises
        ------
        StorageError, Closed
            As :meth:`iqdb.Iqdb.compact`.
        """
        await self._run("compact")

    async def memory_usage(self) -> dict[str, int]:
        """Bytes the database holds: ``{"host": ..., "device": ...}``.

        Raises
        ------
        Closed
            The handle is closed.
        """
        result: dict[str, int] = await self._run("memory_usage")
        return result

    async def check(self) -> dict[str, Any]:
        """Verify the stored files' integrity; see :meth:`iqdb.Iqdb.check`.

        Raises
        ------
        Closed
            The handle is closed.
        """
        result: dict[str, Any] = await self._run("check")
        return result

    async def to_arrow(self, *args: Any, **kwargs: Any) -> Any:
        """The whole database as a ``pyarrow.Table``; see ``Iqdb.to_arrow``.

        Raises
        ------
        Closed
            The handle is closed.
        """
        return await self._run("to_arrow", *args, **kwargs)

    async def search(
        self,
        query: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        **options: Any,
    ) -> list[SearchResult]:
        """Exact top-``k``, closest first; see :meth:`iqdb.Iqdb.search` (``filter=`` and other
        keywords pass through).

        Raises
        ------
        InvalidArgument, InvalidVector, DimensionMismatch, Closed
            As :meth:`iqdb.Iqdb.search`.
        """
        result: list[SearchResult] = await self._run("search", query, k, metric, **options)
        return result

    async def search_with(
        self,
        query: object,
        k: int,
        metric: DistanceMetric | str,
        predicate: Callable[[Record], object],
        **options: Any,
    ) -> list[SearchResult]:
        """As :meth:`search`, among the records ``predicate`` accepts (it is called in the
        worker thread); see :meth:`iqdb.Iqdb.search_with`.

        Raises
        ------
        InvalidArgument, InvalidVector, DimensionMismatch, Closed
            As :meth:`iqdb.Iqdb.search_with`.
        """
        result: list[SearchResult] = await self._run("search_with", query, k, metric, predicate, **options)
        return result

    async def search_batch(
        self,
        queries: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        predicate: Callable[[Record], object] | None = None,
        **options: Any,
    ) -> list[list[SearchResult]]:
        """One result list per query; see :meth:`iqdb.Iqdb.search_batch`.

        Raises
        ------
        InvalidArgument, InvalidVector, DimensionMismatch, Closed
            As :meth:`iqdb.Iqdb.search_batch`.
        """
        result: list[list[SearchResult]] = await self._run(
            "search_batch", queries, k, metric, predicate, **options
        )
        return result

    async def search_arrays(
        self,
        queries: object,
        k: int,
        metric: DistanceMetric | str = DistanceMetric.COSINE,
        predicate: Callable[[Record], object] | None = None,
        **options: Any,
    ) -> tuple[Any, Any]:
        """``search_batch``'s results as ``(ids, scores)`` arrays; see :meth:`iqdb.Iqdb.search_arrays`.

        Raises
        ------
        InvalidArgument, InvalidVector, DimensionMismatch, Closed
            As :meth:`iqdb.Iqdb.search_arrays`.
        """
        result: tuple[Any, Any] = await self._run("search_arrays", queries, k, metric, predicate, **options)
        return result


class _Opening:
    """What :meth:`AsyncIqdb.open` returns: await it for the handle, or use it in ``async with``
    to close the handle on exit too. Nothing runs until then."""

    __slots__ = ("_db", "_executor", "_opener")

    def __init__(self, opener: Callable[[], Iqdb], executor: Executor | None) -> None:
        self._opener = opener
        self._executor = executor
        self._db: AsyncIqdb | None = None

    def __await__(self) -> Generator[Any, None, AsyncIqdb]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncIqdb:
        self._db = await self._open()
        return self._db

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._db is not None:
            await self._db.close()

    async def _open(self) -> AsyncIqdb:
        import asyncio

        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, self._opener)
        opening = loop.run_in_executor(self._executor, call)
        try:
            # Shielded: a cancelled wait must not lose the handle a running open is about to return.
            db = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(functools.partial(_close_abandoned, self._executor))
            raise
        return AsyncIqdb(db, executor=self._executor)


def _close_abandoned(executor: Executor | None, opening: asyncio.Future[Iqdb]) -> None:
    """Close a handle whose opener was cancelled, so that its directory is not left locked."""
    if opening.cancelled() or opening.exception() is not None:
        return  # nothing was opened (reading the exception keeps asyncio from reporting it)
    db = opening.result()
    try:
        closing = opening.get_loop().run_in_executor(executor, db.close)
    except RuntimeError:  # the loop or the executor is shutting down: close here
        db.close()
        return
    closing.add_done_callback(_consume)


def _consume(done: asyncio.Future[None]) -> None:
    # A close that failed after its opener was cancelled has no caller to tell; the WAL keeps
    # every write, so the next open recovers. Reading the exception keeps asyncio quiet.
    if not done.cancelled():
        done.exception()
