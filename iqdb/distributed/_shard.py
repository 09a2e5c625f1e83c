"""One shard: the server that owns an ordinary iqdb database, and the transports that reach it.

>>> from iqdb.distributed._shard import LocalShard, ShardServer
>>> shard = LocalShard(0, ShardServer(None, 0))
>>> shard.submit("length", "control").result(None)
0
>>> shard.stop()

A :class:`ShardServer` wraps one :class:`iqdb.Iqdb` and answers plain calls with plain data (NumPy
arrays, records, results): it is what runs inside a Ray actor, or in the driver's own process.
A :class:`Shard` is the client side: ``submit(method, group, *args)`` starts a call and returns a
:class:`Pending` whose ``result(deadline)`` waits for it. Two transports implement it:

- :class:`LocalShard`: the server in this process, calls run on a thread pool. No Ray needed;
  the sharded database's routing, merge and manifest behave exactly as over Ray.
- :class:`RayShard`: the server is a threaded Ray actor (concurrency groups ``write`` 1,
  ``read`` several, ``control`` 1, so a health check answers during a long search). Ray restarts a
  dead actor (``max_restarts``), which reopens its directory from disk: the snapshot and the WAL,
  so every write a client saw acknowledged is there.

Ray is imported only by the Ray transport, never by ``import iqdb.distributed``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._db import Iqdb
from .._errors import InvalidConfig, IqdbError, Locked
from .._payload import Payload
from .._values import Record, SearchResult

__all__ = [
    "MARKER",
    "LocalShard",
    "Pending",
    "RayShard",
    "Shard",
    "ShardServer",
    "ShardUnavailable",
    "read_marker",
    "write_marker",
]

MARKER = "shard.json"  # in each shard directory: which cluster and which shard it belongs to
_MARKER_FORMAT = "iqdb-shard"


class ShardUnavailable(IqdbError, RuntimeError):
    """One or more shards did not answer: dead, restarting past the call's ``timeout``, or unable
    to start. A search never returns a partial answer instead.

    Parameters
    ----------
    shards
        The indices of the shards that did not answer.
    reason
        What happened, e.g. ``"no answer within 5.0 s"`` or the actor's death cause.
    """

    def __init__(self, shards: tuple[int, ...], reason: str) -> None:
        names = ", ".join(str(s) for s in shards)
        super().__init__(f"shard(s) {names} unavailable: {reason}")
        self.shards = shards
        self.reason = reason

    def __reduce__(self) -> tuple[type[ShardUnavailable], tuple[tuple[int, ...], str]]:
        return (type(self), (self.shards, self.reason))


# -- markers ------------------------------------------------------------------------------------
def write_marker(directory: str, uuid: str, index: int, shards: int) -> None:
    """Create ``directory`` and its marker file, durably (file and directory synced)."""
    os.makedirs(directory, exist_ok=True)
    body = json.dumps({"format": _MARKER_FORMAT, "uuid": uuid, "index": index, "shards": shards})
    path = os.path.join(directory, MARKER)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(body + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # never a half-written marker under the real name
    _sync_dir(directory)


def read_marker(directory: str) -> dict[str, Any] | None:
    """The marker's contents, or ``None`` when there is none."""
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidConfig(f"shard marker in {directory!r} is unreadable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _MARKER_FORMAT:
        raise InvalidConfig(f"{os.path.join(directory, MARKER)!r} is not an iqdb shard marker")
    return data


def _sync_dir(directory: str) -> None:
    if os.name == "nt":  # Windows cannot open a directory to fsync it; renames are durable there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the server ---------------------------------------------------------------------------------
class ShardServer:
    """Owns one shard's database; runs in a Ray actor or in the driver's process.

    Each method is the :class:`iqdb.Iqdb` method of the same name (``length`` for ``len``,
    ``contains`` for ``in``) with plain arguments, raising what it raises.

    Parameters
    ----------
    path
        The shard directory, or ``None`` for an in-memory shard.
    index
        The shard's number (checked against the marker).
    uuid
        The sharded database's identity from its manifest (checked against the marker).
    device
        As for :meth:`iqdb.Iqdb.open`. Inside a Ray actor that was given a GPU, ``"cuda"`` is
        that GPU (Ray makes it the only visible one).
    options
        Options for :meth:`iqdb.Iqdb.open` (``sync``, ``wal_limit``, ``working_set``).
    lock_wait
        Seconds to wait for the directory's lock: a restarted actor may start before the
        operating system has released its dead predecessor's lock.

    Raises
    ------
    InvalidConfig
        The directory has no marker, or one for another shard or another database: the actor
        must not come up empty on a node where the shard's files are not (a constructor that
        raises leaves a Ray actor dead, not restarting in a loop).
    Locked
        The directory stayed locked for ``lock_wait`` seconds.
    """

    def __init__(
        self,
        path: str | None,
        index: int,
        uuid: str | None = None,
        device: str = "auto",
        options: dict[str, Any] | None = None,
        lock_wait: float = 30.0,
        readonly: bool = False,
    ) -> None:
        opts = dict(options or {})
        self.index = index
        self._reopen = (path, device, opts)
        self._reopen_lock = threading.Lock()
        self._generation = 0
        if path is None:
            self.db = Iqdb.open_in_memory(device=device, **opts)
            return
        marker = read_marker(path)
        if marker is None:
            raise InvalidConfig(
                f"shard directory {path!r} has no {MARKER}: refusing to open (or create) a shard "
                "where its files are not"
            )
        if marker.get("uuid") != uuid or marker.get("index") != index:
            raise InvalidConfig(
                f"shard directory {path!r} belongs to database {marker.get('uuid')!r} shard "
                f"{marker.get('index')!r}, not {uuid!r} shard {index}"
            )
        deadline = time.monotonic() + lock_wait
        while True:
            try:
                self.db = Iqdb.open(path, device=device, readonly=readonly, **opts)
                return
            except Locked:  # noqa: PERF203 (a retry loop)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    # Writes ------------------------------------------------------------------------------
    def upsert_many(
        self, ids: npt.NDArray[np.uint64], vectors: npt.NDArray[np.float32], payloads: list[Payload | None]
    ) -> None:
        self.db.upsert_many(ids, vectors, payloads)

    def delete(self, rid: int) -> bool:
        return self.db.delete(rid)

    def delete_where(self, filter: Any) -> int:
        return self.db.delete_where(filter)

    def upsert_arrow(self, data: object, options: dict[str, Any]) -> int:
        return self.db.upsert_arrow(data, **options)

    def flush(self) -> None:
        self.db.flush()

    def compact(self) -> None:
        self.db.compact()

    def close(self) -> None:
        self.db.close()

    # Reads -------------------------------------------------------------------------------
    def get(self, rid: int) -> Record | None:
        return self.db.get(rid)

    def contains(self, rid: int) -> bool:
        return rid in self.db

    def length(self) -> int:
        return len(self.db)

    def dim(self) -> int | None:
        return self.db.dim

    def count(self, filter: Any) -> int:
        return self.db.count(filter)

    def search_batch(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        metric: str,
        predicate: Callable[[Record], object] | None,
        extra: dict[str, Any],
    ) -> list[list[SearchResult]]:
        return self.db.search_batch(queries, k, metric, predicate, **extra)

    def search_arrays(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        metric: str,
        predicate: Callable[[Record], object] | None,
        extra: dict[str, Any],
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float64]]:
        ids, scores = self.db.search_arrays(queries, k, metric, predicate, **extra)
        # Plain host arrays whatever the device: they are pickled to the driver.
        return np.asarray(ids), np.asarray(scores)

    def reopen(self, generation: int) -> None:
        """A read replica: open a fresh read-only view of the directory, then drop the old one
        (a read-only view is fixed when it is opened; searches running on it finish there).

        ``generation`` counts the client's requests: one older than the view already open is
        skipped, so a late request can never bring back a view older than a newer one's.
        """
        path, device, opts = self._reopen
        if path is None:
            raise InvalidConfig("an in-memory shard has no directory to reopen")
        with self._reopen_lock:
            if generation <= self._generation:
                return
            fresh = Iqdb.open(path, device=device, readonly=True, **opts)
            old, self.db = self.db, fresh
            self._generation = generation
        old.close()

    def info(self) -> dict[str, Any]:
        """The process and device serving this shard (health checks, tests)."""
        return {"pid": os.getpid(), "index": self.index, "device": self.db.device}


# -- transports ---------------------------------------------------------------------------------
class Pending(Protocol):
    """A call in flight."""

    def result(self, deadline: float | None) -> Any:
        """Wait for the answer until ``deadline`` (``time.monotonic()``; ``None``: no limit).

        Raises
        ------
        ShardUnavailable
            No answer by the deadline, or the shard is dead.
        """
        ...

    def done(self) -> bool:
        """``True`` once the answer (or an error) is there: ``result`` will not wait."""
        ...


class Shard(Protocol):
    """The client side of one shard."""

    index: int

    def submit(self, method: str, group: str, *args: Any, retry: bool = False) -> Pending:
        """Start ``ShardServer.<method>(*args)`` in concurrency group ``group`` (``"read"``,
        ``"write"`` or ``"control"``). ``retry``: the call is idempotent, so it may be sent
        again when the shard was lost before answering."""
        ...

    def stop(self) -> None:
        """Release what the transport holds (threads, the actor). The database is closed by a
        ``close`` call first; this only tears down."""
        ...


class _LocalPending:
    def __init__(self, index: int, future: Future[Any]) -> None:
        self.index = index
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def result(self, deadline: float | None) -> Any:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return self.future.result(timeout)
        except FutureTimeout:
            raise ShardUnavailable(
                (self.index,), f"no answer within the timeout ({timeout:.3g} s left)"
            ) from None


class LocalShard:
    """A shard served in this process: calls run on a small thread pool of its own.

    Parameters
    ----------
    index
        The shard's number.
    server
        The server that owns the shard's database.
    """

    def __init__(self, index: int, server: ShardServer) -> None:
        self.index = index
        self.server = server
        # Two threads: a write and a search (or a control call) of this shard can overlap, as
        # they do in a threaded actor; more would only queue on two cores.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"iqdb-shard-{index}")

    def submit(self, method: str, group: str, *args: Any, retry: bool = False) -> Pending:
        fn = getattr(self.server, method)
        return _LocalPending(self.index, self._pool.submit(fn, *args))

    def stop(self) -> None:
        self._pool.shutdown(wait=True)
        # After a failed open or a failed close: the database must not be left to the garbage
        # collector (which warns and skips the compaction). After a good close this does nothing.
        self.server.close()


class _RayPending:
    def __init__(self, shard: RayShard, method: str, group: str, args: tuple[Any, ...], retry: bool) -> None:
        self.shard = shard
        self.method = method
        self.group = group
        self.args = args
        self.retry = retry
        self.ref = shard._send(method, group, args)

    def done(self) -> bool:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self, deadline: float | None) -> Any:
        import ray
        from ray import exceptions as rex

        backoff = 0.05
        while True:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise ShardUnavailable((self.shard.index,), "no answer within the timeout")
            try:
                return ray.get(self.ref, timeout=timeout)
            except rex.GetTimeoutError:
                raise ShardUnavailable((self.shard.index,), "no answer within the timeout") from None
            except rex.RayTaskError as exc:
                # The shard raised: hand on its own exception (an iqdb error), not Ray's wrapper.
                cause = exc.cause
                if isinstance(cause, BaseException):
                    raise cause from None
                raise
            except rex.ActorDiedError as exc:
                # Dead for good: out of restarts, or its constructor raised (no marker, ...).
                raise ShardUnavailable((self.shard.index,), f"the shard's actor is dead: {exc}") from None
            except rex.RayActorError as exc:
                # Lost before answering (ActorUnavailableError: the call may or may not have run).
                # Ray restarts the actor; an idempotent call is sent again, the others report.
                if not self.retry:
                    raise ShardUnavailable(
                        (self.shard.index,), f"the shard was lost during a {self.method} call: {exc}"
                    ) from None
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                self.ref = self.shard._send(self.method, self.group, self.args)


class RayShard:
    """A shard served by a Ray actor.

    Parameters
    ----------
    index
        The shard's number.
    handle
        The actor (a ``ShardServer`` made remote by :func:`actor_class`).
    """

    def __init__(self, index: int, handle: Any) -> None:
        self.index = index
        self.handle = handle

    def _send(self, method: str, group: str, args: tuple[Any, ...]) -> Any:
        return getattr(self.handle, method).options(concurrency_group=group).remote(*args)

    def submit(self, method: str, group: str, *args: Any, retry: bool = False) -> Pending:
        return _RayPending(self, method, group, args, retry)

    def stop(self) -> None:
        import ray

        ray.kill(self.handle, no_restart=True)

    def __reduce__(self) -> tuple[type[RayShard], tuple[int, Any]]:
        return (RayShard, (self.index, self.handle))


_ACTOR_CLASSES: dict[int, Any] = {}


def actor_class(read_concurrency: int) -> Any:
    """``ShardServer`` as a Ray actor class with the three concurrency groups (made once per
    read concurrency: Ray fixes the groups when the class is made remote, not per actor)."""
    import ray

    cls = _ACTOR_CLASSES.get(read_concurrency)
    if cls is None:
        remote: Any = ray.remote  # typed by Ray's overloads only for functions' options
        groups = {"write": 1, "read": read_concurrency, "control": 1}
        cls = _ACTOR_CLASSES[read_concurrency] = remote(concurrency_groups=groups)(ShardServer)
    return cls
