"""The client plumbing under :class:`ShardedIqdb`: validated options, starting the shards,
waiting for their answers, and :class:`ShardReader`, the picklable search-only client.

>>> from iqdb.distributed._client import Config
>>> Config.make("cpu", None, "local", 5, 2, 0.0, {}).timeout
5.0
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .._device import parse_device
from .._errors import DimensionMismatch, InvalidConfig, Locked
from ._manifest import Manifest
from ._merge import NO_ID, merge_topk
from ._shard import Pending, RayShard, Shard, ShardUnavailable, actor_class

__all__ = [
    "Config",
    "ShardReader",
    "check_timeout",
    "gather",
    "import_ray",
    "quietly",
    "ray_put",
    "start_actors",
]

_OPEN_OPTIONS = frozenset({"sync", "wal_limit", "working_set"})
_TRANSPORTS = ("ray", "local")


def check_timeout(timeout: object, what: str = "timeout") -> float | None:
    """``timeout`` as seconds, or ``None``.

    Raises
    ------
    InvalidConfig
        Not ``None`` and not a positive number.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidConfig(f"{what} must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


class ShardReader:
    """Searches over a sharded database's shards, without owning them (see :meth:`ShardedIqdb.reader`).

    Parameters
    ----------
    shards
        The shards' clients.
    dim
        The database's dimension when the reader was made.
    timeout
        Seconds a search waits for every shard (``None``: no limit).
    """

    def __init__(self, shards: list[Shard], dim: int | None, timeout: float | None) -> None:
        self.shards = shards
        self.dim = dim
        self.timeout = timeout

    def search_arrays(
        self, queries: npt.NDArray[np.float32], k: int, metric: str, filter: object = None
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float64]]:
        """As :meth:`ShardedIqdb.search_arrays` (the queries already a float32 matrix).

        Raises
        ------
        DimensionMismatch
            The queries' dimension differs from the database's.
        ShardUnavailable
            A shard did not answer in time.
        """
        m = int(queries.shape[0])
        if self.dim is None or m == 0 or k == 0:
            return np.empty((m, 0), dtype=np.uint64), np.empty((m, 0), dtype=np.float64)
        if queries.shape[1] != self.dim:
            raise DimensionMismatch(left=int(queries.shape[1]), right=self.dim)
        extra = {} if filter is None else {"filter": filter}
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pending = [
            s.submit("search_arrays", "read", queries, k, metric, None, extra, retry=True)
            for s in self.shards
        ]
        parts = gather(pending, deadline)
        valid = [~((i == NO_ID) & np.isnan(s)) if filter is not None else None for i, s in parts]
        ids, scores, _, _ = merge_topk(parts, valid, k)
        return ids, scores


class Config:
    """Validated open options."""

    def __init__(self) -> None:
        self.device = "auto"
        self.actor_options: dict[str, Any] = {}
        self.transport = "ray"
        self.timeout: float | None = None
        self.read_concurrency = 2
        self.lock_wait = 30.0
        self.options: dict[str, Any] = {}

    @classmethod
    def make(
        cls,
        device: object,
        actor_options: object,
        transport: object,
        timeout: object,
        read_concurrency: object,
        lock_wait: object,
        options: dict[str, Any],
    ) -> Config:
        """The options of :meth:`ShardedIqdb.open`, checked.

        Raises
        ------
        InvalidConfig
            A bad device spelling, transport, timeout, concurrency, lock wait or option.
        """
        cfg = cls()
        parse_device(device)  # spelling only: the shards' machines decide what is usable
        cfg.device = str(device)
        if actor_options is not None and not isinstance(actor_options, dict):
            raise InvalidConfig(f"actor_options must be a dict, got {type(actor_options).__name__}")
        cfg.actor_options = dict(actor_options or {})
        if transport not in _TRANSPORTS:
            raise InvalidConfig(f"unknown transport {transport!r}; expected 'ray' or 'local'")
        cfg.transport = str(transport)
        cfg.timeout = check_timeout(timeout)
        if (
            isinstance(read_concurrency, bool)
            or not isinstance(read_concurrency, int)
            or read_concurrency < 1
        ):
            raise InvalidConfig(f"read_concurrency must be a positive integer, got {read_concurrency!r}")
        cfg.read_concurrency = read_concurrency
        if isinstance(lock_wait, bool) or not isinstance(lock_wait, (int, float)) or lock_wait < 0:
            raise InvalidConfig(f"lock_wait must be a non-negative number of seconds, got {lock_wait!r}")
        cfg.lock_wait = float(lock_wait)
        unknown = set(options) - _OPEN_OPTIONS
        if unknown:
            raise InvalidConfig(f"unknown option(s) for ShardedIqdb: {', '.join(sorted(unknown))}")
        cfg.options = dict(options)
        return cfg


def gather(pending: list[Pending], deadline: float | None) -> list[Any]:
    """Every call's answer, in order. All are waited for (to the deadline) before anything is
    raised, so no shard is still working on this call when the caller hears of a failure; shards
    that did not answer are reported together in one :class:`ShardUnavailable`."""
    results: list[Any] = []
    lost: list[ShardUnavailable] = []
    failed: BaseException | None = None
    for p in pending:
        try:
            results.append(p.result(deadline))
        except ShardUnavailable as exc:  # noqa: PERF203 (one try per shard is the point)
            lost.append(exc)
            results.append(None)
        except BaseException as exc:
            failed = failed or exc
            results.append(None)
    if failed is not None:
        raise failed
    if len(lost) == 1:
        raise lost[0]
    if lost:
        shards = tuple(s for exc in lost for s in exc.shards)
        raise ShardUnavailable(shards, "; ".join(exc.reason for exc in lost))
    return results


def import_ray() -> Any:
    """The ``ray`` module, or :class:`InvalidConfig` with the install hint."""
    try:
        import ray
    except ImportError as exc:
        raise InvalidConfig(
            'transport="ray" needs Ray: pip install "iqdb[ray]" (or use transport="local")'
        ) from exc
    return ray


def ray_put(value: Any) -> Any:
    """One copy of ``value`` in Ray's object store, for every shard's call to read."""
    import ray

    return ray.put(value)


def quietly(fn: Callable[[], object]) -> None:
    """Call ``fn``, ignoring its errors."""
    # Tearing down after an error, or at close: the first error is the one worth reporting.
    with contextlib.suppress(Exception):
        fn()


def actor_settings(
    cfg: Config, uuid: str, index: int, *, durable: bool, cluster_gpus: float, replica: int | None = None
) -> tuple[str, dict[str, Any]]:
    """The device string a shard's actor opens its database with, and the actor's options.

    >>> cfg = Config.make("cuda:3", {"num_cpus": 4}, "ray", 60, 2, 30, {})
    >>> device, opts = actor_settings(cfg, "u", 1, durable=True, cluster_gpus=8)
    >>> device, opts["num_gpus"], opts["num_cpus"], opts["max_restarts"], opts["name"]
    ('cuda', 1, 4, -1, 'iqdb-u-00001')
    """
    kind, _ = parse_device(cfg.device)
    gpu = kind == "cuda" or (kind == "auto" and cluster_gpus >= 1)
    opts: dict[str, Any] = {
        # A durable shard comes back from its directory; an in-memory one would come back
        # empty, so it stays dead.
        "max_restarts": -1 if durable else 0,
        # Retries are the client's, which sends a call again only after its shard was lost:
        # Ray's own retries would reorder a shard's writes.
        "max_task_retries": 0,
        "name": f"iqdb-{uuid}-{index:05d}" + ("" if replica is None else f"-r{replica}"),
        "num_cpus": 1,
    }
    if gpu:
        opts["num_gpus"] = 1
    opts.update(cfg.actor_options)
    # Ray shows an actor only its own GPU, as device 0: "cuda:3" on the driver's side names a
    # GPU of some machine, and inside the actor that GPU is "cuda".
    return ("cuda" if kind == "cuda" else cfg.device), opts


def start_actors(
    paths: list[str | None], manifest: Manifest, cfg: Config, replica: int | None = None
) -> list[Shard]:
    """One actor per shard (or, with ``replica``, one read-only replica of each), then a health
    check of each: an actor whose constructor failed (no marker, ...) is dead, and the error
    should come now, not at the first search."""
    ray = import_ray()

    if not ray.is_initialized():
        ray.init()
    resources: Any = ray.cluster_resources
    cluster_gpus = float(resources().get("GPU", 0))
    cls = actor_class(cfg.read_concurrency)
    shards: list[Shard] = []
    try:
        for i, path in enumerate(paths):
            device, opts = actor_settings(
                cfg, manifest.uuid, i, durable=path is not None, cluster_gpus=cluster_gpus, replica=replica
            )
            try:
                handle = cls.options(**opts).remote(
                    path, i, manifest.uuid, device, cfg.options, cfg.lock_wait, replica is not None
                )
            except ValueError as exc:
                if "already" in str(exc):
                    raise Locked(
                        f"shard {i} of database {manifest.uuid} is already served by a live actor "
                        f"({opts['name']!r}): close the other handle, or ray.kill that actor"
                    ) from exc
                raise
            shards.append(RayShard(i, handle))
        deadline = None if cfg.timeout is None else time.monotonic() + max(cfg.timeout, cfg.lock_wait)
        gather([s.submit("info", "control") for s in shards], deadline)
    except BaseException:
        for shard in shards:
            quietly(shard.stop)
        raise
    return shards
