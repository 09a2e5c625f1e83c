"""iqdb: an embedded vector database with exact nearest-neighbour search on the CPU or the GPU.

>>> import iqdb
>>> db = iqdb.open_in_memory()
>>> db.upsert_many([1, 2, 3], [[1, 0], [0, 1], [1, 1]], [{"n": 1}, None, {}])
>>> [int(r.id) for r in db.search([1, 0.1], k=2, metric="cosine")]
[1, 3]

See ``API.md`` for the contract. ``iqdb.open(path)`` gives the same handle backed by a directory
(an Arrow IPC snapshot and a write-ahead log).
"""

# ruff: noqa: E402 (iqdb.kernels must be importable before the modules that use it are imported)
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any


def _adopt_source_kernels() -> None:
    """In a source checkout with no editable install, load ``kernels/`` as ``iqdb.kernels``.

    An installed iqdb has ``iqdb/kernels/`` (pyproject's package-dir mapping puts it there; an
    editable install's finder maps it). Python started in a checkout's root finds the source
    ``iqdb/`` first on ``sys.path``, ahead of the installed one, and that has no ``kernels``:
    this gives it the checkout's own, so ``pip install . && python -m pytest`` tests the checkout.
    """
    name = f"{__name__}.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(source, "__init__.py"), submodule_search_locations=[source]
    )
    if spec is None or spec.loader is None or not os.path.isdir(source):
        return  # not a checkout: the import below fails naming iqdb.kernels
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    globals()["kernels"] = module  # what the import system does for a submodule it loads


_adopt_source_kernels()

from ._async import AsyncIqdb
from ._db import Iqdb
from ._errors import (
    Closed,
    Corrupt,
    DeviceUnavailable,
    DimensionMismatch,
    InvalidArgument,
    InvalidConfig,
    InvalidVector,
    IqdbError,
    Locked,
    Poisoned,
    StorageError,
)
from ._filters import Field, Filter
from ._payload import Payload, PayloadValue
from ._search import NO_ID
from ._values import DistanceMetric, Record, RecordId, SearchResult, Vector
from .kernels import DEFAULT_WORKING_SET

__version__ = "0.5.0"

__all__ = [
    "AsyncIqdb",
    "Closed",
    "Corrupt",
    "DeviceUnavailable",
    "DimensionMismatch",
    "DistanceMetric",
    "Field",
    "Filter",
    "InvalidArgument",
    "InvalidConfig",
    "InvalidVector",
    "Iqdb",
    "IqdbError",
    "Locked",
    "NO_ID",
    "Payload",
    "PayloadValue",
    "Poisoned",
    "Record",
    "RecordId",
    "SearchResult",
    "StorageError",
    "Vector",
    "__version__",
    "open",
    "open_in_memory",
    "results_to_arrow",
]


def open(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    readonly: bool = False,
    working_set: int = DEFAULT_WORKING_SET,
    **options: Any,
) -> Iqdb:
    """Open or create a durable database in directory ``path``; see :meth:`Iqdb.open`."""
    return Iqdb.open(path, device=device, readonly=readonly, working_set=working_set, **options)


def open_in_memory(*, device: str = "auto", working_set: int = DEFAULT_WORKING_SET) -> Iqdb:
    """A new in-memory database; see :meth:`Iqdb.open_in_memory`."""
    return Iqdb.open_in_memory(device=device, working_set=working_set)


def results_to_arrow(ids: Any, scores: Any) -> Any:
    """``search_arrays``' ``(ids, scores)`` as a long ``pyarrow.Table`` (query, rank, id, score),
    padding left out; see :func:`iqdb._arrow.results_to_arrow`. Imports pyarrow on first use."""
    from ._arrow import results_to_arrow as convert

    return convert(ids, scores)
