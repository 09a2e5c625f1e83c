"""Scale-out: one iqdb database sharded over Ray actors, with results identical to a single database.

>>> import numpy as np
>>> from iqdb.distributed import ShardedIqdb
>>> db = ShardedIqdb.open_in_memory(shards=2, transport="local")  # threads here; "ray": actors
>>> db.upsert_many([10, 11, 12], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
>>> [int(r.id) for r in db.search([1.0, 0.1], k=2)]
[10, 12]
>>> db.close()

``ShardedIqdb.open(root, shards=N)`` keeps shard ``i`` as the ordinary iqdb directory
``root/shard-0000i`` and the layout in ``root/manifest.json``. Ray is imported only when a Ray
transport is used: ``import iqdb.distributed`` does not import it. See ``docs/scaleout.md``.
"""

from __future__ import annotations

from ._batch import batch_search
from ._client import ShardReader
from ._routing import HASH_NAME, HASH_VERSION, shard_of
from ._shard import Shard, ShardUnavailable
from ._sharded import ShardedIqdb

__all__ = [
    "HASH_NAME",
    "HASH_VERSION",
    "Shard",
    "ShardReader",
    "ShardUnavailable",
    "ShardedIqdb",
    "batch_search",
    "shard_of",
]
