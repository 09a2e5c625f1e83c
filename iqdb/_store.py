"""The columnar in-memory store every backend searches: append-only rows, published as versions.

>>> import numpy as np
>>> from iqdb._store import ColumnStore
>>> from iqdb.kernels import cpu_backend
>>> s = ColumnStore(cpu_backend())
>>> s.upsert(np.array([5, 9], dtype=np.uint64), np.eye(2, dtype=np.float32), [None, None])
>>> v = s.version
>>> s.delete_many(np.array([5], dtype=np.uint64)), len(v), len(s.version)
(1, 2, 1)

Searches never wait for writers (multi-version concurrency, as in LMDB or SQLite's WAL mode):

* Rows are only ever appended. A replace appends the new row and marks the old one dead; a
  delete only marks. "Marks" means appending the row to the *dead log*, in write order.
* Every write ends by publishing an immutable :class:`Version` with one attribute store: the
  arrays, the number of rows visible and the length of the dead log at that point. A search
  loads ``store.version`` once and reads nothing else, so it sees exactly the state after one
  write: never half of an ``upsert_many``, never a record missing while it is being replaced.
  Rows past the version's ``n`` and log entries past its count are invisible to it, and the
  writer never changes a row below any published ``n`` (the kernel excludes the version's
  dead rows from every tile).
* Growth and vacuuming (dropping dead rows once they are a fifth of the rows) build a new
  :class:`_Layout` (fresh arrays and id index) while searches go on with the old one; the old
  layout is never written again and is freed with its last version (reference counting is the
  grace period).

``get`` and ``in`` read the newest layout's id index without a lock and retry if a write
changed it meanwhile (a sequence lock), so they see the same state as a search started then.

One writer at a time: the handle serialises writes with a mutex that readers never take.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import Corrupt, DimensionMismatch
from ._filters import MaskCache, PayloadIndex
from ._index import IdIndex
from ._payload import Payload, PayloadColumns
from .kernels import ArrayBackend
from .kernels._transfer import Stage, copy_rows, stage_for
from .kernels._vmm import CudaError

__all__ = ["ColumnStore", "Version", "row_norms_sq"]

log = logging.getLogger("iqdb")

_GROWTH = 1.2
_F32_MAX = float(np.finfo(np.float32).max)
_MIN_CAPACITY = 16
_VACUUM_FRACTION = 0.2  # dead rows, as a share of all rows, that trigger a vacuum
_VACUUM_MIN = 1024  # ... and at least this many (small stores keep their dead rows longer)


def row_norms_sq(xp: Any, block: Any, chunk: int = 8192) -> Any:
    """Float64 squared norms of float32 rows, in chunks so the float64 copy stays in cache."""
    out = xp.empty(block.shape[0], dtype=xp.float64)
    for r0 in range(0, block.shape[0], chunk):
        part = block[r0 : r0 + chunk].astype(xp.float64)
        out[r0 : r0 + chunk] = xp.einsum("ij,ij->i", part, part)
        del part  # before the next chunk is widened: one float64 chunk at a time
    return out


class _Layout:
    """One set of columns with room for ``capacity`` rows, and the id index into them.

    While it is the store's current layout the writer appends rows and updates its index;
    once replaced (growth, vacuum) it is never written again.
    """

    __slots__ = (
        "backend",
        "capacity",
        "dim",
        "fields",
        "ids",
        "index",
        "inv32",
        "masks",
        "matrix",
        "mirror",
        "norms",
        "norms32",
        "payloads",
    )

    def __init__(self, backend: ArrayBackend, capacity: int, dim: int | None) -> None:
        self.backend = backend
        self.capacity = capacity
        self.dim = dim
        # The host columns are the truth (what the WAL and the snapshot describe); a GPU
        # search reads the device mirror, which follows them (see _Mirror).
        self.matrix: npt.NDArray[np.float32] = np.empty((capacity, dim or 0), dtype=np.float32)
        self.norms: npt.NDArray[np.float64] = np.empty(capacity, dtype=np.float64)
        self.norms32: npt.NDArray[np.float32] = np.empty(capacity, dtype=np.float32)
        self.inv32: npt.NDArray[np.float32] = np.empty(capacity, dtype=np.float32)
        self.ids: npt.NDArray[np.uint64] = np.empty(capacity, dtype=np.uint64)
        self.payloads: list[Payload | None] = []
        self.index = IdIndex()
        # Payload columns for compiled filters, appended with the rows; masks cached per layout.
        self.fields = PayloadIndex()
        self.masks = MaskCache()
        self.mirror = None if backend.xp is np else _Mirror(backend, dim or 0)

    def nbytes(self) -> int:
        arrays = (self.matrix, self.norms, self.norms32, self.inv32, self.ids)
        return sum(int(a.nbytes) for a in arrays) + self.index.nbytes() + self.fields.nbytes()


# The mirror's columns: (dtype, values per row; 0: the dimension). Their order is the order of
# _Mirror.columns and of device_columns(): matrix, norms, norms32, inv_norms32, ids; then the
# dead log (a row dies at most once per layout, so the log never holds more entries than rows).
_DEVICE_COLUMNS = (
    (np.float32, 0),
    (np.float64, 1),
    (np.float32, 1),
    (np.float32, 1),
    (np.uint64, 1),
    (np.int64, 1),
)


# Devices whose driver refused to grow a mirror in place (not for lack of memory) in this process.
_GROWTH_REFUSED: set[str] = set()


class _Mirror:
    """The host columns' rows on the search device, filled on demand: a search first uploads the
    rows its version has and the device lacks (rows below a published count never change, so
    they are uploaded once, in one batch per search however many writes made them), and a
    write never touches the device. An open fills it at once, in the same pass that copies the
    snapshot to the host (:meth:`load`). Every upload goes through two small page-locked
    buffers (:func:`~iqdb.kernels._transfer.copy_rows`), never a staging copy of the whole.

    One mirror serves a lineage of layouts: a layout and the layouts grown from it, which copy
    the rows to the same places. Where the backend has growable buffers (CUDA virtual memory:
    :mod:`~iqdb.kernels._vmm`), each column is one reserved address range that the next search
    after a growth backs with more memory in place: the rows already there stay, only the rows
    written since are uploaded, and the device holds the matrix once plus the growth step. A
    vacuumed layout (rows move) gets a new mirror, filled from the host, as does every grown
    layout where the device cannot grow memory in place (plain allocations of the layout's
    capacity). The old mirror goes with the old layout's last version (at once when no search
    is running: a mirror holds no reference to its layouts), so the device never holds both; a
    device-to-device copy would peak at old + new, about 2.2x the matrix at a growth step of 1.2.
    """

    __slots__ = ("backend", "buffers", "capacity", "columns", "dead", "dim", "growable", "lock", "rows")

    def __init__(self, backend: ArrayBackend, dim: int) -> None:
        self.backend = backend
        self.dim = dim
        self.lock = threading.Lock()
        self.rows = 0  # rows uploaded
        self.dead = 0  # entries of the dead log uploaded
        self.capacity = 0  # rows the columns hold
        self.columns: tuple[Any, ...] | None = None  # full-capacity arrays
        self.buffers: tuple[Any, ...] | None = None  # the growable buffers under them
        # Until the device says otherwise (then, for the rest of the process).
        self.growable = backend.growable_columns is not None and backend.name not in _GROWTH_REFUSED

    def serves(self, grown: _Layout) -> bool:
        """Whether ``grown``, a layout grown from one of this mirror's (rows in place), may use it."""
        return self.growable and self.dim == grown.dim

    def upto(self, L: _Layout, n: int) -> tuple[Any, ...]:
        """The device columns with at least ``n`` of ``L``'s rows uploaded (views of the first ``n``)."""
        with self.lock:
            self._fit(L.capacity)
            if self.rows < n:
                self._upload(L, self.rows, n, first=0)
            assert self.columns is not None
            return tuple(c[:n] for c in self.columns[:5])

    def dead_log(self, L: _Layout, log: _DeadLog, n_dead: int) -> Any:
        """The first ``n_dead`` entries of ``log`` (``L``'s dead log, in write order) on the
        device, uploading the entries it lacks: like the rows, entries below a published count
        never change within a lineage (a vacuum, which starts a new log, starts a new mirror;
        a growth shares this one only when the log is empty), so each is uploaded once."""
        with self.lock:
            self._fit(L.capacity)
            assert self.columns is not None
            if self.dead < n_dead:
                lo, col = self.dead, self.columns[5]
                copy_rows(self.backend, log.rows[lo:n_dead], device=col[lo:n_dead])  # waits
                self.dead = n_dead
            return self.columns[5][:n_dead]

    def load(self, L: _Layout, matrix: npt.NDArray[np.float32], crc: int | None) -> int | None:
        """Fill ``L``'s host matrix and this (empty) mirror with ``matrix``'s rows in one pass
        (each row read once, then sent on through the pinned buffers), and the other columns
        from the host, which hold the rows already. Returns the CRC-32 of ``matrix``'s bytes
        continued from ``crc`` (``None``: not computed)."""
        n = int(matrix.shape[0])
        with self.lock:
            self._fit(L.capacity)
            assert self.columns is not None and self.rows == 0
            stage = stage_for(self.backend, [matrix])  # the biggest column: the others fit too
            try:
                crc = copy_rows(
                    self.backend, matrix, host=L.matrix[:n], device=self.columns[0][:n], crc=crc, stage=stage
                )
                self._upload(L, 0, n, first=1, stage=stage)
            finally:
                if stage is not None:
                    stage.finish()  # no copy still reads or writes once this returns or raises
            return crc

    def _fit(self, capacity: int) -> None:
        """Columns of at least ``capacity`` rows (as the lock holder); rows already there stay."""
        if self.columns is not None and capacity <= self.capacity:
            return
        xp, widths = self.backend.xp, [w or self.dim for _t, w in _DEVICE_COLUMNS]
        dtypes = [np.dtype(t) for t, _w in _DEVICE_COLUMNS]
        shapes = [(capacity, w) if i == 0 else (capacity,) for i, w in enumerate(widths)]
        with self.backend.device():
            if self.columns is None and self.growable:
                assert self.backend.growable_columns is not None
                self.buffers = self.backend.growable_columns([t.itemsize * w for t, w in zip(dtypes, widths)])
                self.growable = self.buffers is not None
            if self.buffers is not None:
                try:
                    for buf, t, w in zip(self.buffers, dtypes, widths):
                        buf.ensure(capacity * w * t.itemsize)
                except CudaError as exc:  # the driver refused to map more (not out of memory)
                    _GROWTH_REFUSED.add(self.backend.name)  # new mirrors on it start plain
                    log.warning(
                        "iqdb: %s: device memory cannot grow in place (%s); re-uploading",
                        self.backend.name,
                        exc,
                    )
                    self.buffers, self.growable, self.columns = None, False, None
                    self.rows = self.dead = 0  # the plain columns below start empty
                else:
                    self.columns = tuple(
                        buf.array(t, shape) for buf, t, shape in zip(self.buffers, dtypes, shapes)
                    )
            if self.buffers is None:
                assert self.columns is None, "a plain allocation cannot grow"
                self.columns = tuple(xp.empty(shape, dtype=t) for t, shape in zip(dtypes, shapes))
        self.capacity = capacity

    def _upload(self, L: _Layout, lo: int, n: int, first: int, stage: Stage | None = None) -> None:
        """Upload rows ``lo:n`` of ``L``'s host columns from column ``first`` on (as the lock
        holder), every column through one :class:`~iqdb.kernels._transfer.Stage` (``stage``, or
        one made for them), and wait for the copies."""
        assert self.columns is not None
        hosts: tuple[Any, ...] = (L.matrix, L.norms, L.norms32, L.inv32, L.ids)
        pairs = [(dev[lo:n], host[lo:n]) for dev, host in zip(self.columns[first:5], hosts[first:])]
        stage = stage or stage_for(self.backend, [host for _dev, host in pairs])
        for dev, host in pairs:
            copy_rows(self.backend, host, device=dev, stage=stage)
        if stage is not None:
            stage.finish()
        self.rows = n

    def nbytes(self) -> int:
        if self.buffers is not None:
            return sum(int(b.committed) for b in self.buffers)
        return 0 if self.columns is None else sum(int(c.nbytes) for c in self.columns)


class _DeadLog:
    """Rows marked dead, in write order, with a cache of a sorted prefix (readers share it)."""

    __slots__ = ("_sorted", "rows")

    def __init__(self, capacity: int, old: _DeadLog | None = None, count: int = 0) -> None:
        self.rows: npt.NDArray[np.int64] = np.empty(capacity, dtype=np.int64)
        self._sorted: tuple[int, npt.NDArray[np.int64]] = (0, self.rows[:0])
        if old is not None:
            self.rows[:count] = old.rows[:count]
            self._sorted = old._sorted

    def sorted_prefix(self, count: int) -> npt.NDArray[np.int64]:
        """The first ``count`` entries, sorted (never mutated afterwards: callers may keep it)."""
        have, done = self._sorted
        if have == count:
            return done
        if have < count:
            # Two sorted runs: the stable sort (timsort for int64) merges them in linear time.
            out = np.concatenate([done, np.sort(self.rows[have:count])])
            out.sort(kind="stable")
            self._sorted = (count, out)  # a race only leaves an older (still valid) cache
            return out
        return np.sort(self.rows[:count])


class Version:
    """What a search reads: the store as it was after one write. Immutable once published.

    ``n`` rows of ``layout`` are visible, of which the first ``n_dead`` rows of the dead log are
    dead; ``live`` distinct ids remain.
    """

    __slots__ = ("_dead_dev", "bounds", "layout", "live", "log", "n", "n_dead", "plans", "seq")

    def __init__(
        self,
        layout: _Layout,
        n: int,
        seq: int,
        live: int,
        log: _DeadLog,
        n_dead: int,
        bounds: tuple[float, float],
    ) -> None:
        self.layout, self.n, self.seq, self.live = layout, n, seq, live
        self.log, self.n_dead, self.bounds = log, n_dead, bounds
        self._dead_dev: Any = None
        self.plans: dict[Any, Any] = {}  # filter -> its rows in this version (iqdb._search)

    def __len__(self) -> int:
        return self.live

    @property
    def dim(self) -> int | None:
        return self.layout.dim

    @property
    def matrix(self) -> npt.NDArray[np.float32]:
        """``(n, d)`` float32 rows on the host (dead ones included: see :meth:`dead_rows`)."""
        return self.layout.matrix[: self.n]

    @property
    def ids(self) -> npt.NDArray[np.uint64]:
        return self.layout.ids[: self.n]

    def device_columns(self) -> tuple[Any, Any, Any, Any, Any]:
        """``(matrix, norms, norms32, inv_norms32, ids)`` of the visible rows on the search
        device: the host columns themselves on the CPU, the caught-up mirror on a GPU."""
        L, n = self.layout, self.n
        if L.mirror is None:
            return L.matrix[:n], L.norms[:n], L.norms32[:n], L.inv32[:n], L.ids[:n]
        m, no, n32, inv, ids = L.mirror.upto(L, n)
        return m, no, n32, inv, ids

    def device_dead_rows(self) -> Any:
        """:meth:`dead_rows` on the search device, or ``None``. On a GPU the mirror holds the
        dead log and uploads only the entries written since its last search; each version sorts
        its prefix on the device, once."""
        L = self.layout
        if L.mirror is None or not self.n_dead:
            return self.dead_rows()
        if self._dead_dev is None:
            log = L.mirror.dead_log(L, self.log, self.n_dead)
            with L.backend.device():
                self._dead_dev = L.backend.xp.sort(log)
        return self._dead_dev

    @property
    def payloads(self) -> list[Payload | None]:
        """Payloads by row (the list may be longer than ``n``: only rows below it are visible)."""
        return self.layout.payloads

    def dead_rows(self) -> npt.NDArray[np.int64] | None:
        """The sorted rows below ``n`` that are dead in this version, or ``None`` if none are."""
        return self.log.sorted_prefix(self.n_dead) if self.n_dead else None

    def live_rows(self) -> npt.NDArray[np.int64]:
        """Every visible, live row, ascending."""
        rows = np.arange(self.n, dtype=np.int64)
        dead = self.dead_rows()
        return rows if dead is None else np.delete(rows, dead)


class ColumnStore:
    """The rows of one database on the backend's device, with the writer's bookkeeping.

    Only the writer (one thread at a time, holding the handle's mutex) calls the methods that
    change it; readers use :attr:`version` and :meth:`lookup`.
    """

    def __init__(self, backend: ArrayBackend) -> None:
        self.backend = backend
        self.clear()

    def clear(self) -> None:
        """Drop every record and the dimension (a fresh, empty store), releasing the memory."""
        self._layout = _Layout(self.backend, 0, None)
        self._log = _DeadLog(0)
        self.n = 0  # rows written into the current layout, live and dead
        self.n_dead = 0  # entries of the dead log that apply to the current layout
        self.live = 0
        self.seq = 0
        self._bounds = (math.inf, 0.0)  # (min, max) squared norm of the live nonzero rows
        self._bounds_stale = False
        # Odd from a write's first change to the published layout's index until its version
        # is published: lock-free look-ups retry meanwhile.
        self._changing = 0
        self._undo: tuple[npt.NDArray[np.uint64] | int, npt.NDArray[np.int64] | int] | None = None
        self._expected = 0  # rows a bulk import announced (see expect)
        self.version = Version(self._layout, 0, 0, 0, self._log, 0, self._bounds)

    # -- what a search and the tests read ---------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self._layout.dim

    @property
    def row_of(self) -> IdIndex:
        """The id -> newest row map of the current layout."""
        return self._layout.index

    @property
    def matrix(self) -> Any:
        return self._layout.matrix[: self.n]

    @property
    def ids(self) -> npt.NDArray[np.uint64]:
        return self._layout.ids[: self.n]

    def __len__(self) -> int:
        return self.live

    def nbytes(self) -> int:
        """Bytes held by the columns, the dead log and the id index (not the payload objects)."""
        return self._layout.nbytes() + int(self._log.rows.nbytes)

    def memory_usage(self) -> dict[str, int]:
        """``{"host": bytes, "device": bytes}`` of the current layout: the host columns (the
        truth), the id index, the dead log and the payloads (an estimate) are host; the mirror
        a GPU search reads is device."""
        L = self._layout
        host = self.nbytes() + sum(_object_bytes(p._items) for p in L.payloads[: self.n] if p is not None)
        return {"host": host, "device": 0 if L.mirror is None else L.mirror.nbytes()}

    def lookup(self, rid: int) -> tuple[Version, int] | None:
        """The published version and the row holding ``rid`` in it, or ``None`` if absent.

        Lock-free: a write that changes the index meanwhile is seen (a sequence lock) and the
        look-up is repeated.
        """
        while True:
            before = self._changing
            v = self.version
            if before & 1:
                _yield()
                continue
            row = v.layout.index.get(rid)
            if self._changing == before and self.version is v:
                return None if row is None else (v, row)

    # -- checks ---------------------------------------------------------------------------
    def check_dim(self, d: int) -> None:
        """Raise :class:`DimensionMismatch` if ``d`` differs from the fixed dimension."""
        if self.dim is not None and d != self.dim:
            raise DimensionMismatch(left=d, right=self.dim)

    # -- writes ---------------------------------------------------------------------------
    def upsert(
        self,
        ids: npt.NDArray[np.uint64],
        vectors: npt.NDArray[np.float32],
        payloads: list[Payload | None],
        columns: PayloadColumns | None = None,
    ) -> None:
        """Insert or replace rows and publish. ``ids`` unique; inputs already validated;
        ``columns``: the payloads as scalar columns, when known (see ``UpsertOp``)."""
        m = int(ids.shape[0])
        if m == 0:
            return
        d = int(vectors.shape[1])
        self.check_dim(d)
        if m == 1:
            self._upsert_one(int(ids[0]), vectors[0], payloads[0])
            return
        norms = row_norms_sq(np, vectors)
        self._reserve(m, d)
        L = self._layout
        old = L.index.get_many(ids)
        replaced = old[old >= 0]
        start = self.n
        where = slice(start, start + m)
        L.matrix[where] = vectors
        self._set_norms(L, where, norms)
        L.ids[where] = ids
        L.payloads.extend(payloads)
        L.fields.append(start, payloads, columns)
        self.n = start + m
        self._begin(ids, old)
        L.index.set_many(ids, np.arange(start, start + m, dtype=np.int64))
        self._kill(replaced)
        self.live += m - int(replaced.shape[0])
        self._publish()

    def _upsert_one(self, rid: int, vector: npt.NDArray[np.float32], payload: Payload | None) -> None:
        """The single-record write path, without array bookkeeping."""
        v64 = vector.astype(np.float64)
        nsq = float(np.dot(v64, v64))
        self._reserve(1, int(vector.shape[0]))
        L = self._layout
        row = self.n
        L.matrix[row] = vector
        L.norms[row] = nsq
        # float32 caches, clamped: rows beyond float32's range make search score in float64.
        L.norms32[row] = min(nsq, _F32_MAX)
        L.inv32[row] = min(1.0 / math.sqrt(nsq), _F32_MAX) if nsq > 0 else math.inf
        L.ids[row] = rid
        L.payloads.append(payload)
        if payload is not None:
            L.fields.append(row, (payload,))
        L.fields.n = row + 1
        self.n = row + 1
        if nsq > 0:
            lo, hi = self._bounds
            if nsq < lo or nsq > hi:
                self._bounds = (min(lo, nsq), max(hi, nsq))
        old = L.index.get(rid)
        self._begin(rid, -1 if old is None else old)
        L.index.set(rid, row)
        if old is None:
            self.live += 1
        else:
            self._kill_one(old)
        self._publish()

    def delete_many(self, ids: npt.NDArray[np.uint64]) -> int:
        """Remove every listed id that is present and publish; returns how many were removed."""
        self._maybe_vacuum()
        L = self._layout
        if ids.shape[0] == 1:
            row = L.index.get(int(ids[0]))
            found = np.array([-1 if row is None else row], dtype=np.int64)
        else:
            found = L.index.get_many(ids)
        present = found >= 0
        gone, gone_ids = found[present], ids[present]
        if gone.shape[0] == 0:
            return 0
        self._begin(gone_ids, gone)
        for rid in gone_ids.tolist():
            L.index.pop(rid)
        self._kill(gone)
        self.live -= int(gone.shape[0])
        self._publish()
        return int(gone.shape[0])

    def _begin(self, ids: npt.NDArray[np.uint64] | int, old_rows: npt.NDArray[np.int64] | int) -> None:
        """The index is about to map ``ids`` away from ``old_rows`` (-1: absent; one id may come
        as plain ints): remember how to undo it, and if searches can see this layout, make
        lock-free look-ups wait until the version is published (see :meth:`lookup`)."""
        self._undo = (ids, old_rows)
        if self._layout is self.version.layout and not self._changing & 1:
            self._changing += 1

    def rollback(self) -> None:
        """Undo a write that failed midway: back to the published version's state."""
        v = self.version
        if self._layout is v.layout:
            L = self._layout
            del L.payloads[v.n :]
            L.fields.truncate(v.n)
            if self._undo is not None:
                ids, old_rows = (np.asarray(a).reshape(-1) for a in self._undo)
                ids, old_rows = ids.astype(np.uint64), old_rows.astype(np.int64)
                back = old_rows >= 0
                for rid in ids[~back].tolist():
                    L.index.pop(rid)
                L.index.set_many(ids[back], old_rows[back])
        else:
            self._layout = v.layout  # a new layout built by the failed write is dropped
        self._log, self.n, self.n_dead, self.live = v.log, v.n, v.n_dead, v.live
        self._bounds, self._bounds_stale, self._undo = v.bounds, False, None
        if self._changing & 1:
            self._changing += 1

    def _kill_one(self, row: int) -> None:
        log = self._log
        if self.n_dead == log.rows.shape[0]:
            log = self._log = _DeadLog(max(64, int(self.n_dead * 1.5)), log, self.n_dead)
        log.rows[self.n_dead] = row
        self.n_dead += 1
        nsq = float(self._layout.norms[row])
        if nsq > 0 and nsq in self._bounds:
            self._bounds_stale = True

    def _kill(self, rows: npt.NDArray[np.int64]) -> None:
        """Mark rows dead (appends them to the dead log)."""
        k = int(rows.shape[0])
        if k == 0:
            return
        if k == 1:
            self._kill_one(int(rows[0]))
            return
        log = self._log
        if self.n_dead + k > log.rows.shape[0]:
            log = self._log = _DeadLog(max(64, int((self.n_dead + k) * 1.5)), log, self.n_dead)
        log.rows[self.n_dead : self.n_dead + k] = rows
        self.n_dead += k
        killed = self._layout.norms[rows]
        lo, hi = self._bounds
        if bool(np.any((killed > 0) & ((killed <= lo) | (killed >= hi)))):
            self._bounds_stale = True

    def _publish(self) -> None:
        """Make the writes so far visible to searches (one attribute store)."""
        if self._bounds_stale:
            self._bounds = self._live_bounds()
            self._bounds_stale = False
        self.seq += 1
        self.version = Version(
            self._layout, self.n, self.seq, self.live, self._log, self.n_dead, self._bounds
        )
        self._undo = None
        if self._changing & 1:
            self._changing += 1

    def _maybe_vacuum(self) -> None:
        """Drop the dead rows once they are a fifth of the rows, before a write changes anything
        (so look-ups never wait for a vacuum)."""
        if self.n_dead > max(_VACUUM_MIN, _VACUUM_FRACTION * self.n):
            self.vacuum()

    def _live_bounds(self) -> tuple[float, float]:
        """Exact (min, max) of the live rows' nonzero squared norms (after an extreme row died)."""
        norms = self._layout.norms[: self.n]
        if self.n_dead:
            norms = np.delete(norms, self._log.rows[: self.n_dead])
        positive = norms[norms > 0]
        if positive.shape[0] == 0:
            return (math.inf, 0.0)
        return (float(positive.min()), float(positive.max()))

    def _set_norms(self, L: _Layout, where: Any, norms: npt.NDArray[np.float64]) -> None:
        xp = np
        L.norms[where] = norms
        # Extreme rows overflow these float32 caches; search then scores in float64 (see
        # bounds), so the overflow is expected and harmless.
        with np.errstate(divide="ignore", over="ignore"):
            L.norms32[where] = norms.astype(xp.float32)
            L.inv32[where] = (1.0 / xp.sqrt(norms)).astype(xp.float32)
        if norms.shape[0]:
            positive = norms[norms > 0]
            if positive.shape[0]:
                lo, hi = self._bounds
                self._bounds = (min(lo, float(xp.min(positive))), max(hi, float(xp.max(positive))))

    def expect(self, rows: int) -> None:
        """A hint, as the writer: about ``rows`` more rows are coming (a bulk import that knows its
        size), so the next growth makes room for them all at once instead of growing 1.2x at a
        time (each growth copies the whole matrix). ``expect(0)`` withdraws it."""
        self._expected = max(0, int(rows))

    def _reserve(self, extra: int, d: int) -> None:
        """Room for ``extra`` more rows in the current layout; a new (vacuumed) layout if not."""
        self._maybe_vacuum()
        L = self._layout
        if L.dim is not None and self.n + extra <= L.capacity:
            return
        extra, self._expected = max(extra, self._expected), 0
        live = self.n - self.n_dead
        cap = max(_MIN_CAPACITY, int(max(L.capacity, live) * _GROWTH), live + extra)
        self._relayout(cap, d)

    def vacuum(self) -> None:
        """Copy the live rows into a fresh layout (no dead rows), as the writer."""
        if self.n_dead or self._layout.capacity > max(_MIN_CAPACITY, int(self.live * 1.5)):
            self._relayout(max(_MIN_CAPACITY, int(self.live * 1.0625)), self.dim or 0)

    def _relayout(self, cap: int, d: int) -> None:
        """Move the live rows, in order, to a new layout of ``cap`` rows; the old one is left as
        it is for the searches that still read it."""
        old, xp = self._layout, np
        new = _Layout(self.backend, cap, d if old.dim is None else old.dim)
        if self.n_dead:
            keep = np.ones(self.n, dtype=bool)
            keep[self._log.rows[: self.n_dead]] = False
            rows = np.flatnonzero(keep)
            dev_rows = rows
            k = int(rows.shape[0])
            xp.take(old.matrix[: self.n], dev_rows, axis=0, out=new.matrix[:k])
            for a, b in ((new.norms, old.norms), (new.norms32, old.norms32), (new.inv32, old.inv32)):
                a[:k] = b[dev_rows]
            new.ids[:k] = old.ids[rows]
            new.payloads = [old.payloads[r] for r in rows.tolist()]
            new.fields = old.fields.take(rows)
            new.index.load(new.ids[:k], np.arange(k, dtype=np.int64))
            self.n, self.n_dead = k, 0
            self._log = _DeadLog(0)
        elif self.n:
            k = self.n
            pairs: tuple[tuple[Any, Any], ...] = (
                (new.matrix, old.matrix),
                (new.norms, old.norms),
                (new.norms32, old.norms32),
                (new.inv32, old.inv32),
                (new.ids, old.ids),
            )
            for a, b in pairs:
                a[:k] = b[:k]
            new.payloads = list(old.payloads[:k])
            new.fields = old.fields.take(np.arange(k, dtype=np.int64))
            new.index = old.index.copy()
            if old.mirror is not None and cap >= old.capacity and old.mirror.serves(new):
                new.mirror = old.mirror  # the rows kept their places: the device's stay too
        self._layout = new

    def load(
        self,
        ids: npt.NDArray[np.uint64],
        matrix: npt.NDArray[np.float32],
        payloads: list[Payload | None],
        dim: int | None,
        norms: Any = None,
        extra: int = 0,
        vectors_crc: str | None = None,
        headroom: float = 1.0625,
    ) -> None:
        """Replace the contents with whole columns (snapshot load) and publish: no per-row work
        on the vectors, each read once (copied to the host columns and, on a GPU, on to the
        device mirror chunk by chunk: see :func:`~iqdb.kernels._transfer.copy_rows`). ``extra``
        rows of room are reserved for writes known to follow.

        Raises
        ------
        Corrupt
            ``vectors_crc`` (the snapshot's CRC-32 of the vectors, checked during the copy) does
            not match; nothing is published.
        """
        self.clear()
        n = int(ids.shape[0])
        cap = max(_MIN_CAPACITY, int(n * headroom) + extra) if dim is not None else 0
        L = _Layout(self.backend, cap, dim)
        L.ids[:n] = ids
        if n:  # the norms first: on a GPU the one pass over the vectors uploads every column
            self._set_norms(L, slice(0, n), row_norms_sq(np, matrix) if norms is None else np.asarray(norms))
        start = None if vectors_crc is None else 0
        if L.mirror is None:
            crc = copy_rows(self.backend, matrix, host=L.matrix[:n], crc=start)
        else:
            crc = L.mirror.load(L, matrix, start)  # the device is ready when the open returns
        if vectors_crc is not None and str(crc) != vectors_crc:
            self.clear()
            raise Corrupt("snapshot vectors checksum mismatch")
        self._layout = L
        L.payloads = list(payloads)
        L.fields.append(0, L.payloads)
        L.index.load(np.asarray(ids, dtype=np.uint64), np.arange(n, dtype=np.int64))
        self.n = self.live = n
        self._publish()

    def live_columns(self) -> tuple[npt.NDArray[np.uint64], Any, list[Payload | None], Any]:
        """``(ids, vectors, payloads, norms)`` of the live rows (vacuums first), for a snapshot."""
        if self.n_dead:
            self.vacuum()
            self._publish()
        L = self._layout
        return L.ids[: self.n], L.matrix[: self.n], L.payloads[: self.n], L.norms[: self.n]


def _object_bytes(value: object) -> int:
    """Python's own size of a payload value and everything it holds."""
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(sys.getsizeof(k) + _object_bytes(v) for k, v in value.items())
    elif isinstance(value, list):
        size += sum(_object_bytes(v) for v in value)
    return size


def _yield() -> None:
    time.sleep(0)
