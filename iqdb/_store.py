"""The columnar in-memory store every backend searches: one dense float32 matrix and its columns.

>>> import numpy as np
>>> from iqdb._store import ColumnStore
>>> from iqdb.kernels import cpu_backend
>>> s = ColumnStore(cpu_backend())
>>> s.upsert(np.array([5, 9], dtype=np.uint64), np.eye(2, dtype=np.float32), [None, None])
>>> len(s), s.delete(5), len(s)
(2, True, 1)

Layout: ``matrix[:n]`` (float32, C-contiguous, amortised growth by 1.2x), ``ids[:n]`` (uint64),
``norms[:n]`` (float64 squared norms, kept in step, with float32 caches of the norm and of
``1/|x|`` for the coarse scores), ``payloads[:n]`` (a list) and ``row_of`` (id -> row, an
:class:`IdIndex`). At d = 128 all of it but the payloads stays under 1.3 x n x d x 4 bytes.
A delete moves the last row into the hole, so rows ``0..n`` are always live and a search
never skips tombstones.

Not thread-safe: the handle serialises writers and excludes readers while a write is applied.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import DimensionMismatch
from ._index import IdIndex
from ._payload import Payload
from .kernels import ArrayBackend

__all__ = ["ColumnStore", "row_norms_sq"]

_GROWTH = 1.2
_F32_MAX = float(np.finfo(np.float32).max)
_MIN_CAPACITY = 16


def row_norms_sq(xp: Any, block: Any, chunk: int = 8192) -> Any:
    """Float64 squared norms of float32 rows, in chunks so the float64 copy stays in cache."""
    out = xp.empty(block.shape[0], dtype=xp.float64)
    for r0 in range(0, block.shape[0], chunk):
        part = block[r0 : r0 + chunk].astype(xp.float64)
        out[r0 : r0 + chunk] = xp.einsum("ij,ij->i", part, part)
    return out


class ColumnStore:
    """Dense columns of the live records, on the backend's device."""

    def __init__(self, backend: ArrayBackend) -> None:
        self.backend = backend
        self.clear()

    def clear(self) -> None:
        """Drop every record and the dimension (a fresh, empty store)."""
        backend = self.backend
        self.dim: int | None = None
        self.n = 0
        xp = backend.xp
        self._matrix: Any = xp.empty((0, 0), dtype=xp.float32)
        self._norms: Any = xp.empty(0, dtype=xp.float64)
        self._norms32: Any = xp.empty(0, dtype=xp.float32)
        self._inv32: Any = xp.empty(0, dtype=xp.float32)
        self._ids: npt.NDArray[np.uint64] = np.empty(0, dtype=np.uint64)
        self.payloads: list[Payload | None] = []
        self.row_of = IdIndex()
        # Bounds (not exact after deletes) on the squared norms of nonzero rows.
        self._max_norm_sq = 0.0
        self._min_norm_sq = float("inf")

    # -- views used by search -------------------------------------------------------------
    @property
    def matrix(self) -> Any:
        """``(n, d)`` float32 view of the live rows."""
        return self._matrix[: self.n]

    @property
    def norms(self) -> Any:
        """``(n,)`` float64 squared norms."""
        return self._norms[: self.n]

    @property
    def norm_bounds(self) -> tuple[float, float]:
        """``(lower, upper)`` bounds on the squared norms of the nonzero rows."""
        return self._min_norm_sq, self._max_norm_sq

    @property
    def norms32(self) -> Any:
        """``(n,)`` float32 squared norms (the L2 coarse score adds them)."""
        return self._norms32[: self.n]

    @property
    def inv_norms32(self) -> Any:
        """``(n,)`` float32 ``1/|x|`` (``inf`` for a zero row; the COSINE coarse score)."""
        return self._inv32[: self.n]

    @property
    def ids(self) -> npt.NDArray[np.uint64]:
        """``(n,)`` uint64 ids on the host."""
        return self._ids[: self.n]

    @property
    def device_ids(self) -> Any:
        """``(n,)`` uint64 ids on the device (the same array on the CPU)."""
        if self.backend.xp is np:
            return self._ids[: self.n]
        return self.backend.asarray(self._ids[: self.n])

    def __len__(self) -> int:
        return self.n

    def nbytes(self) -> int:
        """Bytes held by the columns and the id index (everything but the payload objects)."""
        arrays = (self._matrix, self._norms, self._norms32, self._inv32, self._ids)
        return sum(int(a.nbytes) for a in arrays) + self.row_of.nbytes()

    # -- checks ---------------------------------------------------------------------------
    def check_dim(self, d: int) -> None:
        """Raise :class:`DimensionMismatch` if ``d`` differs from the fixed dimension."""
        if self.dim is not None and d != self.dim:
            raise DimensionMismatch(left=d, right=self.dim)

    # -- writes ---------------------------------------------------------------------------
    def _reserve(self, extra: int, d: int) -> None:
        need = self.n + extra
        if self.dim is None:
            self.dim = d
        cap = int(self._matrix.shape[0]) if self._matrix.shape[1] == d else 0
        if need <= cap:
            return
        new_cap = max(_MIN_CAPACITY, int(cap * _GROWTH), need)
        xp = self.backend.xp
        matrix = xp.empty((new_cap, d), dtype=xp.float32)
        norms = xp.empty(new_cap, dtype=xp.float64)
        norms32 = xp.empty(new_cap, dtype=xp.float32)
        inv32 = xp.empty(new_cap, dtype=xp.float32)
        ids = np.empty(new_cap, dtype=np.uint64)
        if self.n:
            matrix[: self.n] = self._matrix[: self.n]
            norms[: self.n] = self._norms[: self.n]
            norms32[: self.n] = self._norms32[: self.n]
            inv32[: self.n] = self._inv32[: self.n]
            ids[: self.n] = self._ids[: self.n]
        self._matrix, self._norms, self._ids = matrix, norms, ids
        self._norms32, self._inv32 = norms32, inv32

    def upsert(
        self, ids: npt.NDArray[np.uint64], vectors: npt.NDArray[np.float32], payloads: list[Payload | None]
    ) -> None:
        """Insert or replace rows. ``ids`` must be unique; inputs already validated."""
        m = int(ids.shape[0])
        if m == 0:
            return
        d = int(vectors.shape[1])
        self.check_dim(d)
        if m == 1:
            self._upsert_one(int(ids[0]), vectors[0], payloads[0])
            return
        xp = self.backend.xp
        rows = self.row_of.get_many(ids)
        existing = rows >= 0
        fresh = np.flatnonzero(~existing)
        self._reserve(int(fresh.shape[0]), d)
        new_rows = np.arange(self.n, self.n + fresh.shape[0], dtype=np.int64)
        rows[fresh] = new_rows
        dev_vectors = self.backend.asarray(vectors)
        norms = row_norms_sq(xp, dev_vectors)
        if fresh.shape[0] == m:
            # All new (the bulk-load case): one block copy at the end of the matrix.
            where: Any = slice(self.n, self.n + m)
        else:
            where = self.backend.asarray(rows)
        self._matrix[where] = dev_vectors
        self._set_norms(where, norms)
        self._ids[rows] = ids
        self.row_of.set_many(ids[fresh], new_rows)
        if fresh.shape[0] == m:
            self.payloads.extend(payloads)
        else:
            self.payloads.extend([None] * int(fresh.shape[0]))
            for row, payload in zip(rows.tolist(), payloads):
                self.payloads[row] = payload
        self.n += int(fresh.shape[0])

    def _upsert_one(self, rid: int, vector: npt.NDArray[np.float32], payload: Payload | None) -> None:
        """The single-record write path, without array bookkeeping."""
        v64 = vector.astype(np.float64)
        nsq = float(np.dot(v64, v64))
        row = self.row_of.get(rid)
        if row is None:
            self._reserve(1, int(vector.shape[0]))
            row = self.n
            self.row_of.set(rid, row)
            self.payloads.append(payload)
            self._ids[row] = rid
            self.n += 1
        else:
            self.payloads[row] = payload
        self._matrix[row] = self.backend.asarray(vector)
        self._norms[row] = nsq
        # float32 caches, clamped: rows beyond float32's range make search score in float64.
        self._norms32[row] = min(nsq, _F32_MAX)
        self._inv32[row] = min(1.0 / math.sqrt(nsq), _F32_MAX) if nsq > 0 else math.inf
        if nsq > 0:
            self._max_norm_sq = max(self._max_norm_sq, nsq)
            self._min_norm_sq = min(self._min_norm_sq, nsq)

    def _set_norms(self, where: Any, norms: Any) -> None:
        xp = self.backend.xp
        self._norms[where] = norms
        # Extreme rows overflow these float32 caches; search then scores in float64 (see
        # norm_bounds), so the overflow is expected and harmless.
        with np.errstate(divide="ignore", over="ignore"):
            self._norms32[where] = norms.astype(xp.float32)
            self._inv32[where] = (1.0 / xp.sqrt(norms)).astype(xp.float32)
        if norms.shape[0]:
            positive = norms[norms > 0]
            self._max_norm_sq = max(self._max_norm_sq, float(xp.max(norms)))
            if positive.shape[0]:
                self._min_norm_sq = min(self._min_norm_sq, float(xp.min(positive)))

    def delete(self, rid: int) -> bool:
        """Remove one id; the last row moves into the hole. ``False`` if absent."""
        row = self.row_of.pop(rid)
        if row is None:
            return False
        last = self.n - 1
        if row != last:
            self._matrix[row] = self._matrix[last]
            self._norms[row] = self._norms[last]
            self._norms32[row] = self._norms32[last]
            self._inv32[row] = self._inv32[last]
            moved = int(self._ids[last])
            self._ids[row] = moved
            self.payloads[row] = self.payloads[last]
            self.row_of.set(moved, row)
        self.payloads.pop()
        self.n = last
        return True

    def delete_many(self, ids: npt.NDArray[np.uint64]) -> int:
        """Remove every listed id that is present; returns how many were removed."""
        return sum(self.delete(rid) for rid in ids.tolist())

    def load(
        self,
        ids: npt.NDArray[np.uint64],
        matrix: npt.NDArray[np.float32],
        payloads: list[Payload | None],
        dim: int | None,
        norms: Any = None,
        headroom: float = 1.0625,
        extra: int = 0,
    ) -> None:
        """Replace the contents with whole columns (snapshot load): one block copy, no per-row work
        on the vectors. ``extra`` rows of room are reserved for writes known to follow."""
        n = int(ids.shape[0])
        self.dim = dim
        xp = self.backend.xp
        cap = max(_MIN_CAPACITY, int(n * headroom) + extra) if dim is not None else 0
        d = dim or 0
        self._matrix = xp.empty((cap, d), dtype=xp.float32)
        self._matrix[:n] = self.backend.asarray(matrix)
        live = self._matrix[:n]
        self._norms = xp.empty(cap, dtype=xp.float64)
        self._norms32 = xp.empty(cap, dtype=xp.float32)
        self._inv32 = xp.empty(cap, dtype=xp.float32)
        self._max_norm_sq, self._min_norm_sq = 0.0, float("inf")
        if n:
            self._set_norms(
                slice(0, n), row_norms_sq(xp, live) if norms is None else self.backend.asarray(norms)
            )
        self._ids = np.empty(cap, dtype=np.uint64)
        self._ids[:n] = ids
        self.payloads = list(payloads)
        self.row_of = IdIndex()
        self.row_of.load(np.asarray(ids, dtype=np.uint64), np.arange(n, dtype=np.int64))
        self.n = n

    # -- reads ----------------------------------------------------------------------------
    def vector_of(self, row: int) -> npt.NDArray[np.float32]:
        """A host copy of one row."""
        return np.array(self.backend.to_host(self._matrix[row]), dtype=np.float32, copy=True)
