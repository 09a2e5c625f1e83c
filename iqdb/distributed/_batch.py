"""Offline retrieval: a Ray Dataset of query vectors through a pool of search actors.

A sketch of the common case (needs Ray and a database opened with the Ray transport)::

    import ray, numpy as np
    from iqdb.distributed import ShardedIqdb, batch_search

    db = ShardedIqdb.open("/data/vectors", shards=8)
    queries = ray.data.from_items([{"qid": i, "vector": v} for i, v in enumerate(vectors)])
    batch_search(queries, db, k=10, metric="cosine").write_parquet("/data/neighbours")

Each output row keeps the input's columns and gains ``ids`` (``uint64``) and ``scores``
(``float64``), arrays of the query's ``c = min(k, matches)`` results: the same as
``db.search_arrays`` gives for that query. The pool's actors are thin clients: they send each
batch of queries to every shard's actor and merge the answers, so the shards do the scanning and
the pool only needs CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._coerce import _check_k
from .._errors import InvalidArgument, InvalidConfig
from .._values import DistanceMetric, as_matrix, coerce_metric
from ._client import ShardReader, import_ray
from ._shard import RayShard
from ._sharded import ShardedIqdb

__all__ = ["batch_search"]


class _Retriever:
    """The ``map_batches`` callable: one per pool actor, holding a :class:`ShardReader`."""

    def __init__(self, reader: ShardReader, k: int, metric: str, column: str, filter: object) -> None:
        self.reader = reader
        self.k = k
        self.metric = metric
        self.column = column
        self.filter = filter

    def __call__(self, batch: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        if self.column not in batch:
            raise InvalidArgument(f"the dataset has no column {self.column!r} (columns: {sorted(batch)})")
        column = batch[self.column]
        # A fixed-size list column arrives as an (m, d) array; ragged lists as an object array.
        queries = column if column.dtype != object else np.stack(list(column)) if len(column) else column
        Q = as_matrix(queries, "queries") if len(queries) else np.empty((0, self.reader.dim or 0), np.float32)
        ids, scores = self.reader.search_arrays(Q, self.k, self.metric, self.filter)
        out = dict(batch)
        out["ids"] = ids
        out["scores"] = scores
        return out


def batch_search(
    dataset: Any,
    db: ShardedIqdb | ShardReader,
    k: int,
    metric: DistanceMetric | str = DistanceMetric.COSINE,
    *,
    column: str = "vector",
    filter: object = None,
    batch_size: int = 1024,
    pool_size: int = 2,
    num_cpus: float = 1.0,
) -> Any:
    """Search every row of a Ray Dataset; the dataset with ``ids`` and ``scores`` columns added.

    Lazy, like every Ray Dataset transform: nothing runs until the result is consumed (say by
    ``write_parquet``). The database must stay open until then.

    Parameters
    ----------
    dataset
        A ``ray.data.Dataset`` with a column of query vectors.
    db
        A :class:`ShardedIqdb` opened with the Ray transport, or its :meth:`~ShardedIqdb.reader`.
    k, metric
        As for :meth:`ShardedIqdb.search_arrays`.
    column
        The column holding the query vectors.
    filter
        A filter every query's results must match (passed to every shard).
    batch_size
        Queries per ``map_batches`` batch (one search call per shard per batch).
    pool_size
        Search actors in the ``ActorPoolStrategy`` pool; about twice a shard's read
        concurrency keeps the shards busy.
    num_cpus
        CPUs each pool actor reserves.

    Raises
    ------
    InvalidConfig
        ``db`` does not use the Ray transport; a bad ``batch_size`` or ``pool_size``.
    InvalidArgument
        A bad ``k`` or metric.
    """
    import_ray()
    from ray.data import ActorPoolStrategy

    reader = db.reader() if isinstance(db, ShardedIqdb) else db
    if not isinstance(reader, ShardReader) or not all(isinstance(s, RayShard) for s in reader.shards):
        raise InvalidConfig("batch_search needs a ShardedIqdb opened with transport='ray'")
    kk = _check_k(k)
    met = coerce_metric(metric)
    for name, value in (("batch_size", batch_size), ("pool_size", pool_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidConfig(f"{name} must be a positive integer, got {value!r}")
    return dataset.map_batches(
        _Retriever,
        fn_constructor_kwargs={
            "reader": reader,
            "k": kk,
            "metric": met.value,
            "column": column,
            "filter": filter,
        },
        compute=ActorPoolStrategy(size=pool_size),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
