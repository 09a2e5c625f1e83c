"""The storage contract: what the handle needs from an in-memory or durable backend.

>>> from iqdb._backend import MemoryBackend
>>> MemoryBackend().readonly
False

A write reaches a backend as an *operation* that has already been validated completely. The
handle calls :meth:`Backend.log` first (the durable backend appends a WAL frame; a failure
raises and changes nothing) and applies the operation to the :class:`ColumnStore` after, both
under its writer mutex, so log order is memory order. If applying fails, the handle rolls the
store back and calls :meth:`Backend.unlog`, so the log never holds a write that memory lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import numpy as np
import numpy.typing as npt

from ._payload import Payload, PayloadColumns
from ._store import ColumnStore

__all__ = [
    "Backend",
    "DeleteOp",
    "MemoryBackend",
    "Op",
    "UpsertOp",
    "apply_op",
    "dedupe_last",
    "merge_upserts",
]


@dataclass(frozen=True)
class UpsertOp:
    """Insert or replace rows. ``ids`` unique (uint64), ``vectors`` ``(m, d)`` float32 finite.

    ``columns``, when given, holds the same payloads as columns: payload ``i`` is exactly
    ``{key: columns[key][i]}`` (in that key order) with scalar values, so the filter index takes
    them column by column (an Arrow import knows them so); any rewrite of the rows drops it.
    """

    ids: npt.NDArray[np.uint64]
    vectors: npt.NDArray[np.float32]
    payloads: list[Payload | None]
    columns: PayloadColumns | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DeleteOp:
    """Delete ids (absent ones are ignored)."""

    ids: npt.NDArray[np.uint64]


Op = Union[UpsertOp, DeleteOp]  # noqa: UP007


def dedupe_last(op: UpsertOp) -> UpsertOp:
    """The same upsert with each repeated id reduced to its last row (later writes win)."""
    n = int(op.ids.shape[0])
    uniq, first_in_reversed = np.unique(op.ids[::-1], return_index=True)
    if uniq.shape[0] == n:
        return op
    keep = np.sort(n - 1 - first_in_reversed)
    return UpsertOp(op.ids[keep], op.vectors[keep], [op.payloads[i] for i in keep.tolist()])


def merge_upserts(ops: list[UpsertOp]) -> UpsertOp:
    """Consecutive upserts (same dimension) as one, with the same end state."""
    if len(ops) == 1:
        return ops[0]
    merged = UpsertOp(
        np.concatenate([op.ids for op in ops]),
        np.concatenate([op.vectors for op in ops]),
        [p for op in ops for p in op.payloads],
    )
    return dedupe_last(merged)


def apply_op(store: ColumnStore, op: Op) -> int:
    """Apply a validated operation to the store; the number of records written or removed."""
    if isinstance(op, UpsertOp):
        store.upsert(op.ids, op.vectors, op.payloads, op.columns)
        return int(op.ids.shape[0])
    return store.delete_many(op.ids)


class Backend(Protocol):
    """What the handle needs from storage."""

    @property
    def readonly(self) -> bool:
        """Writes refused (``InvalidConfig``)."""

    def log(self, op: Op) -> Any:
        """Make ``op`` survive a process crash before it is applied, or raise having written nothing.

        Returns a ticket for :meth:`commit`.
        """

    def commit(self, ticket: Any) -> None:
        """Called after the writer lock is released: wait until the logged write is as durable as
        the backend's setting promises (``sync="always"``: fsynced, group-committed)."""

    def unlog(self, ticket: Any) -> None:
        """Take back the write :meth:`log` just logged (it could not be applied), or raise."""

    def flush(self) -> None:
        """Make every logged operation survive a machine crash."""

    def compact(self, store: ColumnStore) -> None:
        """Rewrite the durable state from ``store`` so no log needs replaying."""

    def wants_compaction(self) -> bool:
        """The log has grown enough that :meth:`compact` should run now."""

    def close(self, store: ColumnStore) -> None:
        """Release resources; durable backends compact first."""

    def abandon(self) -> bool:
        """Release resources without compacting (a handle garbage-collected unclosed); ``True``
        if there were any (files, a lock)."""

    def check(self) -> dict[str, Any]:
        """Verify the stored state; a report of what was found."""


class MemoryBackend:
    """No durability: every method but :meth:`check` is a no-op."""

    readonly = False

    def log(self, op: Op) -> None:
        """Nothing to log in memory."""

    def commit(self, ticket: Any) -> None:
        """Nothing to wait for."""

    def unlog(self, ticket: Any) -> None:
        """Nothing was logged."""

    def flush(self) -> None:
        """Nothing to flush in memory."""

    def compact(self, store: ColumnStore) -> None:
        """Nothing to compact in memory."""

    def wants_compaction(self) -> bool:
        """Never."""
        return False

    def close(self, store: ColumnStore) -> None:
        """Nothing to release."""

    def abandon(self) -> bool:
        """Nothing to release."""
        return False

    def check(self) -> dict[str, Any]:
        """An in-memory database has nothing on disk to verify."""
        return {"ok": True, "backend": "memory"}
