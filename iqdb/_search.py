"""Search orchestration: arguments -> filter plan -> kernel -> results, out of the handle.

>>> import numpy as np, iqdb
>>> db = iqdb.open_in_memory()
>>> db.upsert_many([1, 2, 3], np.eye(3), [{"k": "a"}, {"k": "b"}, {"k": "a"}])
>>> [int(r.id) for r in db.search([1, 1, 1], 3, "l2", filter=iqdb.Field("k") == "a")]
[1, 3]

A search reads one published :class:`~iqdb._store.Version` and never takes a lock. A filter
becomes a row mask of that version (compiled over the layout's payload columns, cached per
filter, see :mod:`iqdb._filters`), and the plan follows its number of matches:

* *gather* (few matches: at most ``GATHER_FRACTION`` of the live rows or ``GATHER_ROWS``):
  the kernel scores only the matching rows;
* *dense* (many matches): the kernel scans the whole contiguous matrix and excludes the other
  rows inside each tile, exactly as it excludes deleted rows, with no gather.

Either way the answer is the exact top-k among the matching records: ``min(k, matches)``
results. A batch with one filter per query runs each distinct filter once, on its queries.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ._errors import DimensionMismatch, InvalidArgument
from ._filters import Filter, coerce_filter
from ._filters._compile import evaluate_rows
from ._store import ColumnStore, Version
from ._values import DistanceMetric, Record, RecordId, SearchResult, Vector
from .kernels import SERIAL, fixed_topk, flat_topk

__all__ = ["NO_ID", "Searcher", "coerce_where"]

NO_ID = 2**64 - 1
"""The id that pads a row of :meth:`Iqdb.search_arrays` with fewer results than the others."""

log = logging.getLogger("iqdb")
T = TypeVar("T")
Predicate = Callable[[Record], object]
# One filter for every query, or one per query (``None``: that query is not filtered).
Where = Filter | list[Filter | None] | None

GATHER_FRACTION = 0.02  # the gather plan for at most this share of the live rows ...
GATHER_ROWS = 20_000  # ... or this many matches (research/filters.md §3.4: break-even 5-8 %)
_PLANS_PER_VERSION = 8
_RETRY_MIN_BYTES = 1 << 20  # an out-of-memory search retries with 4x smaller tiles down to this
# A batch with more distinct per-query filters than this serves the broad ones (matching at
# least _SHARED_SCAN_MIN_SHARE of a sample of _SAMPLE_ROWS rows) from one shared scan keeping
# up to _SHARED_SCAN_MAX_K candidates per query, instead of one scan per filter.
_SHARED_SCAN_GROUPS = 4
# ... and so does a batch of at least _SHARED_SCAN_BATCH queries with one filter matching at
# least _SHARED_SCAN_BATCH_SHARE of the live rows (bench_filters.py, 200,000 x 128, 200
# queries, a 50 % filter: 1.61x the unfiltered batch excluding rows per tile, 1.22x this way).
_SHARED_SCAN_BATCH = 8
_SHARED_SCAN_BATCH_SHARE = 0.25
_SHARED_SCAN_MIN_SHARE = 0.05
_SHARED_SCAN_MAX_K = 1024
_SAMPLE_ROWS = 4096
_MARGIN = 16


class _FairSlots:
    """A counting semaphore that serves waiters in arrival order: a released slot is handed to
    the oldest waiter directly, so a thread that releases and at once acquires again cannot
    take it back first (``threading.Semaphore`` lets it, which starves the others)."""

    def __init__(self, slots: int) -> None:
        self._mutex = threading.Lock()
        self._slots = self._free = slots
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self) -> bool:
        """Take a slot (waiting in turn); ``True`` if no other slot is taken now."""
        with self._mutex:
            if self._free and not self._waiters:
                self._free -= 1
                return self._free == self._slots - 1
            me = threading.Lock()
            me.acquire()
            self._waiters.append(me)
        try:
            me.acquire()  # released by the thread that hands this one its slot
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt): leave the queue, or pass on the
            # slot if it was handed over meanwhile, so no slot is ever lost.
            with self._mutex:
                if me in self._waiters:
                    self._waiters.remove(me)
                    raise
            self.release()
            raise
        return self._slots == 1

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1


# Searches that run their kernel at once: one per core but one, which is left to the rest of
# the process (a writer, the application's own threads); a search running alone splits over
# the cores. Measured with bench_concurrency.py on 2 vCPUs (8 search threads and a writer, 4 s
# phases): one slot kept 0.29-0.44 of the search rate and 0.6-0.7 of the writer's, two slots
# (no split) 0.34-0.50 and 0.36-0.47.
KERNEL_SLOTS = _FairSlots(max(1, (os.cpu_count() or 2) - 1))


def coerce_where(where: object, m: int | None) -> Where:
    """``filter=``: ``None``, one filter (or dict), or a list/tuple of ``m`` of them.

    Raises
    ------
    InvalidArgument
        A malformed filter, or a per-query list whose length is not the number of queries.
    """
    if where is None:
        return None
    if isinstance(where, (list, tuple)):
        if m is None:
            raise InvalidArgument("a single search takes one filter, not a list of them")
        if len(where) != m:
            raise InvalidArgument(f"got {m} queries but {len(where)} filters")
        out: list[Filter | None] = [None if f is None else coerce_filter(f) for f in where]
        return out
    return coerce_filter(where)


class _Selection:
    """Which rows of a version one group of queries may return: ``rows`` (gather), or all rows
    but ``dead`` (sorted; dense), and how many that is."""

    __slots__ = ("_device", "dead", "matches", "rows")

    def __init__(self, rows: npt.NDArray[np.int64] | None, dead: npt.NDArray[np.int64] | None, matches: int):
        self.rows, self.dead, self.matches = rows, dead, matches
        self._device: tuple[Any, Any] | None = None

    def on_device(self, be: Any) -> tuple[Any, Any]:
        """``(rows, dead)`` on the search device, uploaded once per plan (a plan lives as long
        as its version, so repeated searches with one filter upload nothing)."""
        if self._device is None:
            up = (None if a is None else be.asarray(a) for a in (self.rows, self.dead))
            self._device = (next(up), next(up))
        return self._device


def live_mask(v: Version, f: Filter) -> Any:
    """The live rows of ``v`` that ``f`` matches, as a mask over its ``n`` rows."""
    L = v.layout
    mask = L.masks.mask(f, L.fields, L.ids, L.payloads, v.n)
    dead = v.dead_rows()
    if dead is None:
        return mask
    out = mask.copy()
    out[dead] = False
    return out


def _plan(v: Version, f: Filter) -> _Selection:
    plans: dict[Filter, _Selection] = v.plans
    sel = plans.get(f)
    if sel is not None:
        return sel
    keep = live_mask(v, f)
    matches = int(np.count_nonzero(keep))
    if matches <= max(GATHER_ROWS, GATHER_FRACTION * v.live):
        sel = _Selection(np.flatnonzero(keep), None, matches)
    else:
        sel = _Selection(None, np.flatnonzero(~keep), matches)
    if len(plans) >= _PLANS_PER_VERSION:
        plans.clear()
    plans[f] = sel
    return sel


class Searcher:
    """Runs a handle's searches: no lock, one version each, the kernel in a fair slot."""

    def __init__(self, store: ColumnStore, working_set: int, check_open: Callable[[], None]) -> None:
        self.store = store
        self.working_set = working_set
        self.check_open = check_open
        self.local = threading.local()  # .predicate: depth of predicate calls; .seq (tests)
        self.searching: list[None] = []  # one entry per search in flight (append/pop are atomic)

    def run(
        self,
        Q: Any,
        k: int,
        metric: DistanceMetric,
        predicate: Predicate | None,
        where: Where,
        finish: Callable[[Version, int, Any], T],
    ) -> T:
        """Search the current version; ``finish`` turns its rows and scores (``None`` while the
        database has never held a vector) into the caller's form."""
        v = self.store.version
        self.check_open()
        self.local.seq = v.seq  # the version this thread's last search read (tests check it)
        m = int(Q.shape[0])
        if v.dim is None:
            return finish(v, m, None)
        if Q.shape[1] != v.dim:
            raise DimensionMismatch(left=int(Q.shape[1]), right=v.dim)
        # A batch with one filter that matches much of the database: the shared scan (see
        # _per_query) costs less than excluding the other rows from every tile.
        if (
            isinstance(where, Filter)
            and predicate is None
            and m >= _SHARED_SCAN_BATCH
            and _plan(v, where).matches >= _SHARED_SCAN_BATCH_SHARE * v.live
        ):
            where = [where] * m
        if not isinstance(where, list):
            out = self._kernel(v, Q, k, metric, self._select(v, where, predicate))
            if finish is as_device_arrays:
                return finish(v, m, (v.device_columns()[4][out.rows], out.scores))
            be = self.store.backend
            return finish(v, m, (be.to_host(out.rows), be.to_host(out.scores), None))
        return finish(v, m, self._per_query(v, Q, k, metric, predicate, where))

    def _per_query(
        self,
        v: Version,
        Q: Any,
        k: int,
        metric: DistanceMetric,
        predicate: Predicate | None,
        where: list[Any],
    ) -> _Found:
        """One filter per query. Queries that share a filter share its plan. With many distinct
        filters, those that match a good share of the rows are served by one unfiltered scan
        that keeps more candidates per query (``k'``); each query's filter is then evaluated at
        its candidates only. The first ``k`` matching candidates are the exact answer whenever
        there are ``k`` of them (the candidates are the exact top-``k'`` of every live row, in
        order); a query left short runs its own filtered plan."""
        be = self.store.backend
        m = int(Q.shape[0])
        groups: dict[Filter | None, list[int]] = {}
        for i, f in enumerate(where):
            groups.setdefault(f, []).append(i)
        found_rows: list[Any] = [None] * m
        found_scores: list[Any] = [None] * m
        if predicate is None and (len(groups) > _SHARED_SCAN_GROUPS or len(groups) == 1):
            self._shared_scan(v, Q, k, metric, groups, found_rows, found_scores)
        for f, idx in groups.items():
            todo = [i for i in idx if found_rows[i] is None]
            if not todo:
                continue
            out = self._kernel(v, Q[np.asarray(todo)], k, metric, self._select(v, f, predicate))
            r, sc = be.to_host(out.rows), be.to_host(out.scores)
            for j, i in enumerate(todo):
                found_rows[i], found_scores[i] = r[j], sc[j]
        counts = np.fromiter((a.shape[0] for a in found_rows), dtype=np.int64, count=m)
        width = int(counts.max()) if m else 0
        rows = np.full((m, width), -1, dtype=np.int64)
        scores = np.full((m, width), np.nan, dtype=np.float64)
        for i in range(m):
            rows[i, : counts[i]] = found_rows[i]
            scores[i, : counts[i]] = found_scores[i]
        return rows, scores, counts

    def _shared_scan(
        self,
        v: Version,
        Q: Any,
        k: int,
        metric: DistanceMetric,
        groups: dict[Filter | None, list[int]],
        found_rows: list[Any],
        found_scores: list[Any],
    ) -> None:
        """Serve the queries of the broad filters from one scan with ``k'`` candidates each
        (fills ``found_*`` for the queries it answers exactly)."""
        L = v.layout
        if v.live == 0:
            return
        sample = np.unique(np.linspace(0, v.n - 1, min(v.n, _SAMPLE_ROWS)).astype(np.int64))
        broad: list[tuple[Filter, list[int]]] = []
        share = 1.0
        for f, idx in groups.items():
            if f is None:
                continue
            s = float(np.mean(evaluate_rows(f, L.fields, L.ids, L.payloads, sample)))
            if s >= _SHARED_SCAN_MIN_SHARE:
                broad.append((f, idx))
                share = min(share, s)
        if not broad:
            return
        kp = min(v.live, math.ceil(2 * k / share) + _MARGIN)
        if kp > _SHARED_SCAN_MAX_K:
            return
        qidx = np.asarray([i for _, idx in broad for i in idx])
        out = self._kernel(v, Q[qidx], kp, metric, None)
        be = self.store.backend
        cand, cand_scores = be.to_host(out.rows), be.to_host(out.scores)
        exhaustive = out.count == v.live  # every live row was a candidate
        at = 0
        for f, idx in broad:
            R = cand[at : at + len(idx)]
            ok = evaluate_rows(f, L.fields, L.ids, L.payloads, R.ravel()).reshape(R.shape)
            for j, i in enumerate(idx):
                hit = np.flatnonzero(ok[j])[:k]
                if hit.shape[0] == k or exhaustive:
                    found_rows[i], found_scores[i] = R[j, hit], cand_scores[at + j, hit]
            at += len(idx)

    def _select(self, v: Version, f: Filter | None, predicate: Predicate | None) -> _Selection | None:
        """The rows a group may return (``None``: every live row)."""
        if f is None and predicate is None:
            return None
        sel = None if f is None else _plan(v, f)
        if predicate is None:
            return sel
        if sel is None:
            rows = v.live_rows()
        else:
            rows = sel.rows if sel.rows is not None else np.flatnonzero(live_mask(v, f))  # type: ignore[arg-type]
        keep = self._filter_rows(v, predicate, rows)
        return _Selection(keep, None, int(keep.shape[0]))

    def _kernel(self, v: Version, Q: Any, k: int, metric: DistanceMetric, sel: _Selection | None) -> Any:
        be = self.store.backend
        X, norms, norms32, inv32, dev_ids = v.device_columns()
        if sel is None:
            rows, dead = None, v.device_dead_rows()
        else:
            rows, dead = sel.on_device(be)
        self.searching.append(None)
        # Only a few searches run their kernel at a time (KERNEL_SLOTS); the others wait, in
        # order, instead of competing for the GIL with the running ones and with the writer.
        # Splitting one search over the cores pays off only when it runs alone; next to other
        # searches it only adds thread hand-offs (and GIL waits) to each of them.
        alone = KERNEL_SLOTS.acquire()
        try:
            run = fixed_topk if be.fixed_shape else flat_topk
            Qd = be.asarray(Q) if isinstance(Q, np.ndarray) else Q
            ws = be.tile_bytes(self.working_set)
            while True:
                try:
                    return run(
                        be.xp,
                        X,
                        norms,
                        dev_ids,
                        Qd,
                        k,
                        metric.value,
                        rows,
                        dead=dead,
                        norms32=norms32,
                        inv_norms32=inv32,
                        norm_bounds=v.bounds,
                        working_set=ws,
                        parallel=be.parallel if alone else SERIAL,
                        matvec=be.matvec,
                        profile=be.profile,
                    )
                except MemoryError as exc:  # noqa: PERF203 (CuPy's OutOfMemoryError is one too)
                    if ws <= _RETRY_MIN_BYTES:
                        raise MemoryError(
                            f"out of memory searching {int(Q.shape[0])} queries over {v.n} rows on "
                            f"{be.name}, even with {ws:,}-byte score tiles: search fewer queries at "
                            "once, or free memory"
                        ) from exc
                    ws = max(_RETRY_MIN_BYTES, ws // 4)
                    log.warning(
                        "iqdb: out of memory in a search on %s; retrying with %d-byte tiles", be.name, ws
                    )
        finally:
            KERNEL_SLOTS.release()
            self.searching.pop()

    def _filter_rows(
        self, v: Version, predicate: Predicate, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """``rows`` whose record passes ``predicate`` (the escape hatch: one call per record).
        The predicate may read the handle but not change it."""
        matrix = v.matrix  # the host columns: no copy from the device
        ids, payloads = v.ids, v.payloads
        local = self.local
        depth = getattr(local, "predicate", 0)
        local.predicate = depth + 1
        try:
            keep = [
                row
                for row in rows.tolist()
                if predicate(
                    Record._trusted(
                        RecordId(int(ids[row])),
                        Vector._trusted(matrix[row].copy()),
                        None if (p := payloads[row]) is None else p.copy(),
                    )
                )
            ]
        finally:
            local.predicate = depth
        return np.asarray(keep, dtype=np.int64)

    def count(self, f: Filter | None) -> int:
        """Live records that ``f`` matches (all of them for ``None``)."""
        v = self.store.version
        return v.live if f is None else int(np.count_nonzero(live_mask(v, f)))


# -- results ------------------------------------------------------------------------------
# What the kernel found, on the host: rows into the version and scores, (m, c) each, and the
# number of results per query when it differs between queries (rows padded with -1).
_Found = tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], "npt.NDArray[np.int64] | None"]


def as_results(v: Version, m: int, found: _Found | None) -> list[list[SearchResult]]:
    if found is None:
        return [[] for _ in range(m)]
    found_rows, scores_arr, counts = found
    scores = scores_arr.tolist()
    found_ids = v.ids[found_rows].tolist()
    payloads = v.payloads
    # Ids and scores from the store are canonical by construction: skip the checks.
    rid = functools.partial(int.__new__, RecordId)
    make = SearchResult._trusted
    out = [
        [
            make(i, score, None if (p := payloads[row]) is None else p.copy())
            for i, score, row in zip(map(rid, ids_q), scores_q, rows_q)
        ]
        for ids_q, scores_q, rows_q in zip(found_ids, scores, found_rows.tolist())
    ]
    if counts is not None:
        out = [res[:c] for res, c in zip(out, counts.tolist())]
    return out


def as_device_arrays(v: Version, m: int, found: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """``search_arrays(device_output=True)``: ids and scores where the search ran."""
    be = v.layout.backend
    if found is None or len(found) == 3:
        return tuple(be.asarray(a) for a in as_arrays(v, m, found))  # type: ignore[return-value,arg-type]
    return found


def as_arrays(
    v: Version, m: int, found: _Found | None
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float64]]:
    if found is None:
        return np.empty((m, 0), dtype=np.uint64), np.empty((m, 0), dtype=np.float64)
    found_rows, scores, counts = found
    ids = v.ids[found_rows]
    if counts is not None:
        ids[found_rows < 0] = NO_ID
    return ids, scores
