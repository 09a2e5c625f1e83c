"""Running selection: each query's best coarse candidates so far, and the admission bounds that
keep almost every score out of it (seeded from a first tile, or sampled up front for large k).

Part of the flat top-k search (:mod:`iqdb.kernels._flat` is the driver), written against ``xp``.

>>> import numpy as np
>>> S = np.array([[5.0, 1.0, 4.0, 2.0, 3.0, 0.5]])  # runs of 2 rows: (5, 2), (1, 3), (4, 0.5)
>>> _kth_run_min(np, S, 2, 2, 1).tolist()  # the 2nd smallest of the runs' minima 2, 1, 0.5
[1.0]
"""

from __future__ import annotations

import math
from typing import Any

from ._parallel import Parallel
from ._profile import Profile
from ._tiles import (
    Array,
    _Candidates,
    _nan_to_inf,
    _rows_take,
    _Tiler,
)

__all__: list[str] = []


def _kth_run_min(xp: Any, S: Array, kth: int, g: int, rows_axis: int, nan: bool = True) -> Array:
    """The ``kth``-smallest (1-based) minimum over disjoint runs of ``g`` rows of ``S``, per query,
    ``+inf`` where fewer than ``kth`` runs have a non-NaN minimum.

    ``kth`` different runs each hold a score at or below the result, so it bounds the ``kth``
    best score from above; when a run rarely holds two of the ``kth`` best it is nearly as tight
    as the ``kth`` best itself, and it is a partition of ``rows / g`` minima instead of ``rows``
    scores. A run is every ``(rows // g)``-th row: the minimum is then a reduction over an outer
    axis, which streams (over a short last axis NumPy is about 10x slower).
    """
    rows = int(S.shape[rows_axis])
    nr = rows // g
    if g > 1:
        if rows_axis == 0:
            S = S[: nr * g].reshape(g, nr, *S.shape[1:]).min(axis=0)
        else:
            S = S[:, : nr * g].reshape(S.shape[0], g, nr).min(axis=1)
    # A run holding a NaN has a NaN minimum, which must not be counted: it becomes +inf before
    # the partition (CuPy's bitonic partition compares with `<`, which a NaN breaks). ``nan``
    # False: the caller knows no score is NaN, and two passes are saved.
    if nan:
        S = _nan_to_inf(xp, S)
    return xp.take(xp.partition(S, kth - 1, axis=rows_axis), kth - 1, axis=rows_axis)


def _seed_bound(xp: Any, S: Array, c: int, rows_axis: int, chunk: int, nan: bool = True) -> Array:
    """Each query's first admission bound from its first tile ``S`` (or a single query's
    scores): an upper bound of its final ``c``-th best, so nothing that belongs in the top ``c``
    is ever filtered out. Runs of up to ``chunk`` rows, at least 8 ``c`` of them."""
    g = max(1, min(chunk, int(S.shape[rows_axis]) // (8 * c)))
    return _kth_run_min(xp, S, c, g, rows_axis, nan)


def _sample_bound(
    xp: Any,
    cand: _Candidates,
    Qc: Array,
    metric: str,
    cdtype: Any,
    c: int,
    working_set: int,
    parallel: Parallel,
    profile: Profile,
) -> Array | None:
    """Per-query admission bounds that about ``1.5c``-``3c`` rows meet, from a strided sample.

    With ``s`` of ``n`` rows sampled, about ``lam = c s / n`` sampled rows are among a query's
    true ``c`` best. The bound is the ``r``-th best sampled score with ``r`` three standard
    deviations above ``lam``: fewer than ``r`` sampled rows lie in the true ``c`` best (the
    bound then admits all of them) except with a probability of about 1e-3 for a random row
    order. A query admitting fewer than ``c`` rows is scanned again by the caller, so an
    unlucky or adversarial order costs time, never a result. ``None`` when not worth it.
    """
    mb, n, d = int(Qc.shape[0]), cand.n, int(Qc.shape[1])
    if mb == 1 or c < profile.sample_min_c:
        return None
    s = min(n // profile.sample_stride, working_set // (4 * mb))
    lam = c * s / n
    r = math.ceil(lam + 3 * math.sqrt(lam) + 2)
    if 4 * r > s:
        return None
    step = n // s
    sub = cand.subset(xp.arange(s, dtype=xp.int64) * step + step // 2, xp)
    # One contiguous copy of the sampled rows, shared by the workers (each takes some queries).
    sub = _Candidates(xp.take(sub.X, sub.rows, axis=0), None, sub.norms, sub.norms32, sub.inv32, sub.dead)
    out = xp.empty(mb, dtype=cdtype)
    workers = min(parallel.workers, mb) if mb * s * d >= profile.min_work else 1
    cuts = [mb * w // workers for w in range(workers + 1)]

    # The r-th smallest minimum of runs of g sampled scores, g small enough that a run rarely
    # holds two of the r best (g r / s <= 1/32: the bound admits a few % more).
    g = max(1, min(8, s // (32 * r)))

    def bound(w: int) -> None:
        q0, q1 = cuts[w], cuts[w + 1]
        S = _Tiler(xp, sub, Qc[q0:q1], metric, cdtype, s, transposed=False).scores(0, s)
        out[q0:q1] = _kth_run_min(xp, S, r, g, 1, sub.may_nan)

    if workers > 1:
        parallel.map(bound, workers)
    else:
        bound(0)
    return out


def _select_one(xp: Any, cand: _Candidates, s: Array, lo: int, c: int, chunk: int) -> tuple[Array, Array]:
    """The ``c`` best of one query's coarse scores ``s`` (candidates ``lo...``) as ``(1, c)``.

    The fast path of one query: the same admission bound as a tiled scan's first tile, then one
    comparison over all scores and a partition of the few that pass.
    """
    thr = _seed_bound(xp, s, c, 0, chunk, cand.may_nan) if s.shape[0] >= c else xp.inf
    hits = xp.flatnonzero(s <= thr)  # NaN never passes: those rows are ranked apart
    vals = s[hits]
    if hits.shape[0] > c:
        part = xp.argpartition(vals, c - 1)[:c]
        hits, vals = hits[part], vals[part]
    best_s = xp.full((1, c), xp.inf, dtype=s.dtype)
    best_r = xp.full((1, c), -1, dtype=xp.int64)
    best_s[0, : hits.shape[0]] = vals
    best_r[0, : hits.shape[0]] = cand.row_index(lo, hits, xp)
    return best_s, best_r


class _Selection:
    """Each query's ``c`` best coarse scores so far (columns ``:c``; ``+inf`` with row -1 for
    none yet), then the admitted scores waiting to be merged in (``NaN`` marks an empty slot;
    NaN ranks after ``+inf``)."""

    def __init__(self, xp: Any, cand: _Candidates, mb: int, c: int, cdtype: Any, spare: int) -> None:
        self.xp, self.cand, self.c = xp, cand, c
        self.width = c + spare
        self.s = xp.full((mb, self.width), xp.nan, dtype=cdtype)
        self.s[:, :c] = xp.inf
        self.r = xp.full((mb, self.width), -1, dtype=xp.int64)
        self.fill = xp.full(mb, c, dtype=xp.int64)
        self.pending = False

    def add(self, qi: Array, pos: Array, vals: Array) -> bool:
        """Store admitted scores (grouped by query); ``True`` when the buffer was full and the
        waiting scores were merged first (the ``c`` best changed)."""
        xp = self.xp
        if qi.shape[0] == 0:
            return False
        counts = xp.bincount(qi, minlength=self.s.shape[0])
        need = int(xp.max(self.fill + counts))
        folded = need > self.width and self.pending
        if folded:
            self.fold()
            need = int(xp.max(self.fill + counts))
        if need > self.width:
            # More admitted in one tile than the buffer holds (ties, or a prefix's bound).
            grow = need - self.width
            self.s = xp.concatenate([self.s, xp.full((self.s.shape[0], grow), xp.nan, self.s.dtype)], axis=1)
            self.r = xp.concatenate([self.r, xp.full((self.r.shape[0], grow), -1, xp.int64)], axis=1)
            self.width = need
        flat = _slots(xp, qi, counts, xp.arange(counts.shape[0]) * self.width + self.fill)
        self.s.reshape(-1)[flat] = vals
        self.r.reshape(-1)[flat] = self.cand.row_index(0, pos, xp)
        self.fill += counts
        self.pending = True
        return folded

    def merge(self, qi: Array, pos: Array, vals: Array) -> None:
        """Merge admitted scores (grouped by query) straight into the ``c`` best, by-passing the
        buffer: the eager schedule (a fresh ``(queries hit, c + most hits)`` array per tile
        measured about 3 % faster overall than going through the buffer at 1,000,000 x 128)."""
        xp, c = self.xp, self.c
        if qi.shape[0] == 0:
            return
        counts = xp.bincount(qi, minlength=self.s.shape[0])
        touched = xp.flatnonzero(counts)
        width = c + int(xp.max(counts))
        row_start = xp.zeros(self.s.shape[0], dtype=xp.int64)
        row_start[touched] = xp.arange(touched.shape[0]) * width + c
        flat = _slots(xp, qi, counts, row_start)
        cand_s = xp.full((touched.shape[0], width), xp.nan, dtype=self.s.dtype)
        cand_r = xp.empty((touched.shape[0], width), dtype=xp.int64)
        cand_s[:, :c] = self.s[touched, :c]
        cand_r[:, :c] = self.r[touched, :c]
        cand_s.reshape(-1)[flat] = vals
        cand_r.reshape(-1)[flat] = self.cand.row_index(0, pos, xp)
        self._keep_best(touched, cand_s, cand_r)

    def fold(self) -> None:
        """Merge the waiting scores into the ``c`` best."""
        xp, c = self.xp, self.c
        touched = xp.flatnonzero(self.fill > c)
        if touched.shape[0] == 0:
            return
        w = int(xp.max(self.fill))
        self._keep_best(touched, self.s[touched, :w], self.r[touched, :w])
        self.s[touched, c:w] = xp.nan
        self.fill[touched] = c
        self.pending = False

    def _keep_best(self, touched: Array, cand_s: Array, cand_r: Array) -> None:
        """The ``c`` best of each row of ``cand_s`` become the ``c`` best of queries ``touched``.
        Empty slots hold NaN and rank last, after the ``+inf`` placeholders: each row has ``c``
        non-NaN entries, so no empty slot is ever kept."""
        c = self.c
        part = self.xp.argpartition(cand_s, c - 1, axis=1)[:, :c]
        self.s[touched, :c] = _rows_take(self.xp, cand_s, part)
        self.r[touched, :c] = _rows_take(self.xp, cand_r, part)

    def worst(self) -> Array:
        """Each query's ``c``-th best (``+inf`` while it has fewer; never NaN, as NaN is never
        admitted): a valid admission bound."""
        return self.xp.max(self.s[:, : self.c], axis=1)

    def best(self) -> tuple[Array, Array]:
        if self.pending:
            self.fold()
        return self.s[:, : self.c], self.r[:, : self.c]


def _slots(xp: Any, qi: Array, counts: Array, row_start: Array) -> Array:
    """Flat positions for hits grouped by query: the ``i``-th hit of query ``q`` goes to
    ``row_start[q] + i`` (``counts`` hits per query)."""
    return (row_start - (xp.cumsum(counts) - counts))[qi] + xp.arange(qi.shape[0])
