"""Exact flat top-k search, written once against an array namespace ``xp`` (NumPy or CuPy).

>>> import numpy as np
>>> from iqdb.kernels import flat_topk
>>> X = np.eye(3, dtype=np.float32)
>>> res = flat_topk(np, X, np.ones(3), np.arange(3, dtype=np.uint64), X[2:3], 2, "l2")
>>> res.rows.tolist(), res.count
([[2, 0]], 2)

How a search runs (per block of queries, per tile of stored rows):

1. *Coarse scores* in float32 with one matrix product per tile (``||x||^2 - 2 x.q`` for L2,
   ``-x.q`` for DOT, ``-x.q/(|x||q|)`` for COSINE): monotone in the true distance, so the
   constant ``||q||^2`` and the square root are left out.
2. *Running selection*: each query keeps its best ``c = k + margin`` coarse candidates. A tile
   only contributes entries at or below the query's admission bound, so almost every score is
   discarded by one comparison. For small ``c`` the bound is the ``c``-th best so far (seeded by
   a prefix of the first tile) and admitted scores are merged after every tile. For large ``c``
   (``k`` about 56 and up) merging every tile would cost more than the product, so the bound is
   estimated up front from a strided sample of the rows (it admits about ``1.5c``-``3c`` rows)
   and admitted scores wait in a buffer that is merged when full, usually once. A query whose
   estimated bound admitted fewer than ``c`` rows is scanned again with the exact running bound.
3. *Exact re-scoring* of the ``c`` candidates in float64 (the scores users see), then ordering by
   ``(score, id)`` with NaN last. Float32 rounding can misorder near-ties, so the margin is
   checked against a rigorous rounding bound ``tol``: when the worst kept candidate is not
   clearly worse than the k-th, the query is re-scanned and every row within ``tol`` of the k-th
   is re-scored exactly. Results are therefore exact, ties broken by smaller id, on any device.

NaN scores only arise for COSINE with a zero vector (database row or query); such rows are
ranked last, by id. Vectors so large that float32 products could overflow are scored in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._parallel import SERIAL, Parallel

__all__ = ["DEFAULT_WORKING_SET", "SearchOutput", "canonical_sum", "exact_scores", "flat_topk"]

Array = Any  # an xp.ndarray
MatVec = Callable[[Array, Array, Array], None]  # matvec(A, v, out): out[:] = A @ v

_U = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32
# Coarse scores are float32 when every nonzero squared norm lies in this range: no overflow,
# no subnormal products (whose absolute error the relative bound `tol` would not cover), and
# 1/|x| fits float32. Otherwise they are computed in float64.
_SAFE_NORM_SQ = (1e-30, 1e36)
_MARGIN = 8  # extra candidates kept per query beyond k
DEFAULT_WORKING_SET = 16 << 20  # bytes of score tiles a search holds at once


@dataclass(frozen=True)
class SearchOutput:
    """Per-query results: ``rows[i, :count]`` and ``scores[i, :count]`` (float64), best first."""

    rows: Array
    scores: Array
    count: int


def exact_scores(xp: Any, metric: str, A: Array, q: Array) -> Array:
    """Distances from each row of ``A`` to the vectors ``q`` in float64: the canonical score.

    ``A`` is ``(..., d)`` and ``q`` broadcasts against it. Every term is computed elementwise
    in float64 (a product of two float32 values is exact in float64) and the ``d`` terms are
    summed in one fixed order (:func:`canonical_sum`), never by BLAS or a library reduction
    whose order is its own: the same inputs give bit-identical scores on every device, and
    identical rows give identical scores, so exact ties stay ties.
    """
    if metric == "l2":
        terms = _terms(xp, xp.subtract, A, q)  # each difference rounded once, the same everywhere
        xp.multiply(terms, terms, out=terms)
        return xp.sqrt(canonical_sum(xp, terms))
    dot = canonical_sum(xp, _terms(xp, xp.multiply, A, q))
    if metric == "dot":
        return -dot
    denom = canonical_sum(xp, _terms(xp, xp.multiply, A, A)) * canonical_sum(
        xp, _terms(xp, xp.multiply, q, q)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - dot / xp.sqrt(denom)
    return xp.where(denom == 0, xp.nan, out)


def _terms(xp: Any, op: Any, a: Array, b: Array) -> Array:
    """``op(a, b)`` in float64 with the last (vector) axis moved first, ``(d, ...)``: the
    summation then adds whole contiguous blocks."""
    shape = np.broadcast_shapes(a.shape, b.shape)
    terms = xp.empty((shape[-1], *shape[:-1]), dtype=xp.float64)
    a, b = (x.reshape((1,) * (len(shape) - x.ndim) + x.shape) for x in (a, b))
    op(xp.moveaxis(a, -1, 0), xp.moveaxis(b, -1, 0), out=terms, dtype=xp.float64)
    return terms


def canonical_sum(xp: Any, terms: Array) -> Array:
    """The sum over the first axis in one fixed order, independent of device and library: the
    upper half of the terms is added onto the lower half (the middle term of an odd count
    stays) until one is left. Each step is an elementwise float64 addition, which rounds the
    same way on every IEEE device (no fused multiply-add: the terms were rounded before).
    Consumes ``terms`` (summed in place).

    >>> import numpy as np
    >>> float(canonical_sum(np, np.array([1e16, 1.0, -1e16, 1.0])))  # (1e16 - 1e16) + (1 + 1)
    2.0
    """
    n = int(terms.shape[0])
    if n == 0:
        return xp.zeros(terms.shape[1:], dtype=xp.float64)
    while n > 1:
        h = n // 2
        terms[:h] += terms[n - h : n]
        n -= h
    # + 0.0 turns a -0.0 sum into +0.0: a zero is always the same zero, whatever the signs of
    # the zero terms it came from.
    return terms[0] + 0.0


@dataclass(frozen=True)
class _Candidates:
    """The rows a search may return: all of ``X`` (``rows is None``) or a subset, with the
    per-row columns the coarse scores need, restricted to those rows."""

    X: Array
    rows: Array | None
    norms: Array  # float64 squared norms
    norms32: Array
    inv32: Array | None  # 1/|x| as float32 (COSINE only); inf for a zero row
    dead: Array | None = None  # sorted candidate positions never to return (deleted rows)
    # The same positions on the host: each tile finds its share with no device round trip.
    dead_host: np.ndarray[Any, Any] | None = None

    @property
    def n(self) -> int:
        return int(self.norms.shape[0])

    @property
    def may_nan(self) -> bool:
        """Whether a coarse score can be NaN: COSINE (a zero row or query) or dead rows."""
        return self.inv32 is not None or self.dead is not None

    @property
    def n_live(self) -> int:
        return self.n - (0 if self.dead is None else int(self.dead.shape[0]))

    def mask_dead(self, xp: Any, S: Array, t0: int, t1: int, rows_axis: int) -> None:
        """Set the scores of dead candidates among ``t0:t1`` to NaN: a NaN is never admitted (and
        the rows a NaN score marks are completed from :meth:`live_positions`, never from ``S``)."""
        if self.dead is None or self.dead_host is None:
            return
        a, b = (int(i) for i in np.searchsorted(self.dead_host, [t0, t1]))
        if a == b:
            return
        hit = self.dead[a:b] - t0
        if rows_axis == 0:
            S[hit] = np.nan
        else:
            S[:, hit] = np.nan

    def live_positions(self, xp: Any) -> Array:
        """Every candidate position that is not dead, ascending."""
        pos = xp.arange(self.n, dtype=xp.int64)
        return pos if self.dead is None else xp.delete(pos, self.dead)

    def row_index(self, t0: int, cols: Array, xp: Any) -> Array:
        """Row indices into ``X`` of candidate positions ``t0 + cols``."""
        if self.rows is None:
            return cols.astype(xp.int64) + t0
        return self.rows[t0 + cols]

    def subset(self, pos: Array, xp: Any) -> _Candidates:
        """The candidates at positions ``pos`` (int64)."""
        inv = None if self.inv32 is None else self.inv32[pos]
        dead = None
        if self.dead is not None:
            at = xp.minimum(xp.searchsorted(self.dead, pos), self.dead.shape[0] - 1)
            dead = xp.flatnonzero(self.dead[at] == pos)
            dead = dead if dead.shape[0] else None
        return _Candidates(
            self.X,
            self.row_index(0, pos, xp),
            self.norms[pos],
            self.norms32[pos],
            inv,
            dead,
            _on_host(xp, dead),
        )


def flat_topk(
    xp: Any,
    X: Array,
    norms_sq: Array,
    ids: Array,
    Q: Array,
    k: int,
    metric: str,
    rows: Array | None = None,
    *,
    dead: Array | None = None,
    norms32: Array | None = None,
    inv_norms32: Array | None = None,
    norm_bounds: tuple[float, float] | None = None,
    working_set: int = DEFAULT_WORKING_SET,
    parallel: Parallel = SERIAL,
    matvec: MatVec | None = None,
) -> SearchOutput:
    """Exact top-``k`` of every query in ``Q`` over the rows of ``X``.

    Parameters
    ----------
    xp
        The array namespace (``numpy`` or ``cupy``) all arrays belong to.
    X
        ``(n, d)`` float32 stored vectors (C-contiguous).
    norms_sq
        ``(n,)`` float64 squared norms of ``X``'s rows.
    ids
        ``(n,)`` uint64 record ids, used to break ties (smaller id wins).
    Q
        ``(m, d)`` float32 queries (finite).
    k
        Number of neighbours, ``k >= 1``.
    metric
        ``"l2"``, ``"cosine"`` or ``"dot"``.
    rows
        Optional int64 indices into ``X``: search only these rows (a pre-filter).
    dead
        Optional sorted int64 indices into ``X`` of rows never to return (deleted rows that are
        still stored): they are excluded inside the scan, with no gather of the other rows.
    norms32, inv_norms32
        Optional caches of ``norms_sq`` as float32 and of ``1/sqrt(norms_sq)`` as float32
        (computed here when absent).
    norm_bounds
        Optional ``(lower, upper)`` bounds on the nonzero squared norms (computed when absent).
    working_set
        Bytes of score tiles per query block (all workers together): extra memory stays
        bounded for any ``m`` and ``n``.
    parallel
        Runs the workers that split the stored rows among them (one after another by default).
    matvec
        ``matvec(A, v, out)`` writes ``A @ v`` (float32 or float64) into ``out``: how a single
        query streams its rows (``xp.matmul`` by default; a backend may pass a faster one).

    Returns
    -------
    SearchOutput
        ``count = min(k, candidates)`` results per query, best first, as row indices into ``X``.
    """
    m = int(Q.shape[0])
    with np.errstate(divide="ignore", over="ignore"):
        if norms32 is None:
            norms32 = norms_sq.astype(xp.float32)
        if metric == "cosine" and inv_norms32 is None:
            inv_norms32 = (1.0 / xp.sqrt(norms_sq)).astype(xp.float32)
    if dead is not None and dead.shape[0] == 0:
        dead = None
    cand = _Candidates(
        X, None, norms_sq, norms32, inv_norms32 if metric == "cosine" else None, dead, _on_host(xp, dead)
    )
    if rows is not None:
        cand = cand.subset(rows, xp)
    n_cand = cand.n
    count = min(k, cand.n_live)
    out_rows = xp.empty((m, count), dtype=xp.int64)
    out_scores = xp.empty((m, count), dtype=xp.float64)
    if count == 0 or m == 0:
        return SearchOutput(out_rows, out_scores, count)
    if norm_bounds is None or rows is not None:
        positive = cand.norms[cand.norms > 0]
        norm_bounds = (float(xp.min(positive)), float(xp.max(positive))) if positive.shape[0] else (1.0, 0.0)
    # Queries per block: all of them up to _MAX_BLOCK (the product's efficiency grows with the
    # block), with tiles of at least 1,024 rows within the working set. When each tile is merged
    # into the running selection (small c), a tile should hold several times the c = k + margin
    # candidates each query keeps, or merging would cost more than the product; with sampled
    # bounds, the selection buffers ((1 + _LAZY) c slots of 12 bytes per query) stay within it.
    per_worker = working_set // max(1, parallel.workers)
    c = min(n_cand, k + _MARGIN)
    if c >= _SAMPLE_MIN_C:
        per_query = max(4 * 1024, 12 * (1 + _LAZY) * c)
    else:
        per_query = 4 * max(1024, _TILE_PER_CANDIDATE * c)
    block = _even_block(m, max(1, min(_MAX_BLOCK, per_worker // per_query)))
    for q0 in range(0, m, block):
        r, s = _search_block(
            xp, cand, ids, Q[q0 : q0 + block], k, count, metric, norm_bounds, working_set, parallel, matvec
        )
        out_rows[q0 : q0 + block] = r
        out_scores[q0 : q0 + block] = s
    return SearchOutput(out_rows, out_scores, count)


# At most 1,000 queries per block, not 1,024: blocks of (or just under) a power of two run
# slower, their transposed score tiles' rows sitting about 2^k floats apart in the caches
# (1,000,000 x 128, k = 10, ms per query: 1,024 -> 1.67, 1,023 -> 1.67, 1,020 -> 1.52,
# 1,000 -> 1.50; 512 -> 1.57 against 500 -> 1.50).
_MAX_BLOCK = 1000
_TILE_PER_CANDIDATE = 8  # rows of a tile per candidate kept, merging every tile (so k = 50 -> 464)


def _even_block(m: int, most: int) -> int:
    """Queries per block: at most ``most``, the blocks as even as possible (no small leftover
    block paying a whole pass over the rows)."""
    return -(-m // -(-m // most))


def _search_block(
    xp: Any,
    cand: _Candidates,
    ids: Array,
    Qb: Array,
    k: int,
    count: int,
    metric: str,
    norm_bounds: tuple[float, float],
    working_set: int,
    parallel: Parallel,
    matvec: MatVec | None,
) -> tuple[Array, Array]:
    mb, d = int(Qb.shape[0]), int(Qb.shape[1])
    n = cand.n
    Q64 = Qb.astype(xp.float64)
    q_norm_sq = xp.sum(Q64 * Q64, axis=1)
    positive_q = q_norm_sq[q_norm_sq > 0]
    if positive_q.shape[0]:
        wide = wide_norms(norm_bounds, float(xp.min(positive_q)), float(xp.max(positive_q)))
    else:
        wide = wide_norms(norm_bounds, math.inf, 0.0)
    cdtype = xp.float64 if wide else xp.float32
    Qc, tol = _coarse_query(xp, Q64, q_norm_sq, metric, cdtype, norm_bounds[1], d, wide)
    c = min(n, k + _MARGIN)
    # For large c, a strided sample sets each query's admission bound up front, so a scan
    # admits about 2c scores per query and merges them once, instead of merging every tile.
    # The bound is an estimate: a query that admits fewer than c rows is scanned again the
    # exact way (a running bound, seeded by the first tile).
    theta = _sample_bound(xp, cand, Qc, metric, cdtype, c, working_set, parallel)
    best_s, best_r = _coarse_best(xp, cand, Qc, metric, cdtype, c, working_set, parallel, theta, matvec)
    workers = _workers(parallel.workers, mb, n, d)
    if theta is not None:
        short = xp.flatnonzero(xp.isinf(xp.max(best_s, axis=1)) & ~xp.isinf(theta))
        if short.shape[0]:
            s2, r2 = _coarse_best(xp, cand, Qc[short], metric, cdtype, c, working_set, parallel, None, matvec)
            best_s[short] = s2
            best_r[short] = r2
    # The k-th best coarse score and the worst kept one: the margin between them decides
    # whether the exact scores of the kept candidates settle the top k. Kept scores are never
    # NaN (a NaN is never admitted); +inf marks a placeholder, left only when every row was
    # admitted, so then the margin holds too (as it does when c == n: nothing was excluded).
    kth = xp.partition(best_s, count - 1, axis=1)[:, count - 1]
    worst = xp.max(best_s, axis=1)
    safe = (worst > kth + tol) | (c == n) | xp.isinf(kth)
    rows_out = xp.empty((mb, count), dtype=xp.int64)
    scores_out = xp.empty((mb, count), dtype=xp.float64)
    ok = xp.nonzero(safe)[0]
    # Exact re-scoring gathers c rows per query in float64: in chunks of queries small enough
    # for the temporaries to stay in cache (which also bounds them for any k), split among
    # the workers.
    step = max(1, _FINALIZE_BYTES // (8 * c * d))
    chunks = [ok[i0 : i0 + step] for i0 in range(0, int(ok.shape[0]), step)]

    def finish(w: int) -> None:
        for sel in chunks[w::workers]:
            r, s = _finalize(xp, cand, ids, Q64[sel], best_r[sel], metric, count)
            rows_out[sel] = r
            scores_out[sel] = s

    if workers > 1 and len(chunks) > 1:
        parallel.map(finish, workers)
    else:
        for w in range(workers):
            finish(w)
    for i in _to_list(xp, xp.nonzero(~safe)[0]):
        bound = float(kth[i] + tol[i])
        r, s = _rescan(
            xp, cand, ids, Qc[i : i + 1], Q64[i], metric, count, bound, cdtype, matvec, working_set
        )
        rows_out[i] = r
        scores_out[i] = s
    return rows_out, scores_out


def wide_norms(norm_bounds: tuple[float, float], q_lo: float, q_hi: float) -> bool:
    """Whether coarse scores must be float64: some nonzero squared norm (rows: ``norm_bounds``;
    queries: ``q_lo``..``q_hi``, ``q_hi == 0`` for none) lies outside :data:`_SAFE_NORM_SQ`."""
    lo, hi = _SAFE_NORM_SQ
    rows_ok = norm_bounds[1] == 0 or lo <= norm_bounds[0] <= norm_bounds[1] <= hi
    queries_ok = q_hi == 0 or lo <= q_lo <= q_hi <= hi
    return not (rows_ok and queries_ok)


def _coarse_query(
    xp: Any, Q64: Array, q_norm_sq: Array, metric: str, cdtype: Any, max_norm_sq: float, d: int, wide: bool
) -> tuple[Array, Array]:
    """The coarse query operand, chosen so a single product gives a score monotone in the
    distance, and ``tol``, twice a rigorous bound on the coarse score's rounding error (scale x
    (d + c) u), per query."""
    u = _U if not wide else float(np.finfo(np.float64).eps) / 2
    max_norm_sq = max(max_norm_sq, 0.0)
    if metric == "l2":
        Qc = (-2.0 * Q64).astype(cdtype)
        tol = 2 * (d + 4) * u * (max_norm_sq + 2.0 * xp.sqrt(max_norm_sq * q_norm_sq))
    elif metric == "dot":
        Qc = (-Q64).astype(cdtype)
        tol = 2 * (d + 4) * u * xp.sqrt(max_norm_sq * q_norm_sq)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            Qc = (-Q64 / xp.sqrt(q_norm_sq)[:, None]).astype(cdtype)
        tol = xp.full(int(Q64.shape[0]), 2 * (d + 6) * u)
    return Qc, tol


def _coarse_best(
    xp: Any,
    cand: _Candidates,
    Qc: Array,
    metric: str,
    cdtype: Any,
    c: int,
    working_set: int,
    parallel: Parallel,
    theta: Array | None,
    matvec: MatVec | None = None,
) -> tuple[Array, Array]:
    """Each query's ``c`` best coarse scores and their rows, ``(m, c)`` each: ``+inf`` with row
    -1 where fewer than ``c`` scores were admitted.

    Scores above a query's bound are never admitted: ``theta`` (from :func:`_sample_bound`) when
    given, else :func:`_seed_bound` of the first tile; the bound then tightens to the ``c``-th
    best kept whenever admitted scores are merged in.
    """
    mb, d = int(Qc.shape[0]), int(Qc.shape[1])
    n = cand.n
    workers = _workers(parallel.workers, mb, n, d)
    # Each worker scans a contiguous share of the rows with its own score tile and its own c
    # best; a tile is a whole number of the runs `_tile_hits` takes minima over. Float64
    # scores (rows of extreme norms) widen each tile's rows too, so their tiles also keep the
    # widened rows within the working set.
    whole = mb == 1 and cdtype == xp.float32
    if whole:
        tile = -(-n // workers)
    else:
        tile = max(16 * _CHUNK, working_set // (4 * mb * workers) // _CHUNK * _CHUNK)
        if cdtype != xp.float32:
            tile = min(tile, max(_CHUNK, working_set // (8 * (d + 1) * workers) // _CHUNK * _CHUNK))
    bounds = [n * w // workers for w in range(workers + 1)]
    # Sampled bounds admit about 2c scores per query: they wait in a buffer (c x _LAZY slots
    # per query) and are merged once it fills, usually once per scan. A bound seeded by a
    # prefix is looser at first, so those scans merge after every tile and tighten it.
    spare = _LAZY * c if theta is not None else 0

    def scan(w: int) -> tuple[Array, Array]:
        lo, hi = bounds[w], bounds[w + 1]
        tiler = _Tiler(xp, cand, Qc, metric, cdtype, min(tile, hi - lo), matvec=matvec)
        if whole:
            return _select_one(xp, cand, tiler.scores(lo, hi)[0], lo, c)
        sel = _Selection(xp, cand, mb, c, cdtype, spare)
        thr = xp.full(mb, xp.inf, dtype=cdtype) if theta is None else theta.astype(cdtype)
        for t0 in range(lo, hi, tile):
            S = tiler.scores(t0, min(t0 + tile, hi))
            rows_axis = 0 if tiler.transposed else 1
            if t0 == lo and theta is None and S.shape[rows_axis] >= c:
                thr = _seed_bound(xp, S, c, rows_axis, cand.may_nan)
            qi, row, vals = _tile_hits(xp, S, thr, tiler.transposed)
            if theta is None:
                sel.merge(qi, t0 + row, vals)
                merged = qi.shape[0] > 0
            else:
                merged = sel.add(qi, t0 + row, vals)
            if merged:
                thr = xp.minimum(thr, sel.worst())
        return sel.best()

    if workers == 1:
        return scan(0)
    parts = parallel.map(scan, workers)
    best_s = xp.concatenate([p[0] for p in parts], axis=1)
    best_r = xp.concatenate([p[1] for p in parts], axis=1)
    # The c best of the union (placeholders, +inf with row -1, rank before NaN).
    part = xp.argpartition(best_s, c - 1, axis=1)[:, :c]
    return _rows_take(xp, best_s, part), _rows_take(xp, best_r, part)


_LAZY = 1  # admitted scores per candidate kept that may wait for a merge (sampled bounds)
_SAMPLE_MIN_C = 64  # candidates kept per query from which the bound is sampled
_SAMPLE_STRIDE = 16  # at most every 16th row is sampled (the sample costs 1/16 of a scan)


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


def _seed_bound(xp: Any, S: Array, c: int, rows_axis: int, nan: bool = True) -> Array:
    """Each query's first admission bound from its first tile ``S`` (or a single query's
    scores): an upper bound of its final ``c``-th best, so nothing that belongs in the top ``c``
    is ever filtered out. Runs of up to 64 rows, at least 8 ``c`` of them."""
    return _kth_run_min(xp, S, c, max(1, min(_CHUNK, int(S.shape[rows_axis]) // (8 * c))), rows_axis, nan)


def _sample_bound(
    xp: Any,
    cand: _Candidates,
    Qc: Array,
    metric: str,
    cdtype: Any,
    c: int,
    working_set: int,
    parallel: Parallel,
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
    if mb == 1 or c < _SAMPLE_MIN_C:
        return None
    s = min(n // _SAMPLE_STRIDE, working_set // (4 * mb))
    lam = c * s / n
    r = math.ceil(lam + 3 * math.sqrt(lam) + 2)
    if 4 * r > s:
        return None
    step = n // s
    sub = cand.subset(xp.arange(s, dtype=xp.int64) * step + step // 2, xp)
    # One contiguous copy of the sampled rows, shared by the workers (each takes some queries).
    sub = _Candidates(
        xp.take(sub.X, sub.rows, axis=0), None, sub.norms, sub.norms32, sub.inv32, sub.dead, sub.dead_host
    )
    out = xp.empty(mb, dtype=cdtype)
    workers = min(parallel.workers, mb) if mb * s * d >= _MIN_WORK else 1
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


def _select_one(xp: Any, cand: _Candidates, s: Array, lo: int, c: int) -> tuple[Array, Array]:
    """The ``c`` best of one query's coarse scores ``s`` (candidates ``lo...``) as ``(1, c)``.

    The fast path of one query: the same admission bound as a tiled scan's first tile, then one
    comparison over all scores and a partition of the few that pass.
    """
    thr = _seed_bound(xp, s, c, 0, cand.may_nan) if s.shape[0] >= c else xp.inf
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


_FINALIZE_BYTES = 2 << 20  # float64 candidate vectors re-scored at once (per worker)

# Rows per worker below which splitting the scan costs more (thread hand-off, a second
# selection) than it saves, and the multiply-adds a search must have before it is split. One
# query's split (measured with the CPU backend's einsum stream, ms whole against split): 0.75
# against 0.85 at 30,000 x 128, 2.68 against 1.95 at 100,000, 4.82 against 3.54 at 200,000.
_MIN_ROWS_PER_WORKER = 4096
_MIN_WORK = 1 << 22
_MIN_WORK_ONE_QUERY = 1 << 22


def _workers(available: int, mb: int, n: int, d: int) -> int:
    if available <= 1 or mb * n * d < (_MIN_WORK_ONE_QUERY if mb == 1 else _MIN_WORK):
        return 1
    return max(1, min(available, n // _MIN_ROWS_PER_WORKER))


def _nan_to_inf(xp: Any, a: Array) -> Array:
    return xp.where(xp.isnan(a), xp.inf, a)


def _on_host(xp: Any, a: Array | None) -> np.ndarray[Any, Any] | None:
    """A host copy of a small index array (one download on a GPU; none on the CPU)."""
    if a is None:
        return None
    host: np.ndarray[Any, Any] = a if xp is np else a.get()
    return host


def _to_list(xp: Any, a: Array) -> list[int]:
    return [int(v) for v in (a.tolist() if xp is np else a.get().tolist())]


_AUGMENT_MIN = 256  # queries per block from which a per-tile copy of X beats a pass over S


class _Tiler:
    """Computes coarse score tiles for one block of queries into a reused buffer.

    A tile is *transposed*, ``(rows, queries)``: then a query's threshold lines up with the
    contiguous axis, so comparing a tile with the thresholds and taking minima over runs of
    rows are plain streaming operations (in NumPy, an operand broadcast along the contiguous
    axis takes a loop about 3.5x slower, measured on a 1,024 x 3,840 tile).

    For few queries the product is followed by one pass over the scores (``+ |x|^2`` for L2,
    ``* 1/|x|`` for COSINE). For a big block, a pass over the ``(tile, m)`` scores costs more
    than preparing the ``(tile, d)`` operand, so the tile is copied once with the norm appended
    as an extra column (L2: ``[x, |x|^2] . [-2q, 1]``) or scaled by ``1/|x|`` (COSINE), and the
    product alone yields the coarse scores.
    """

    def __init__(
        self,
        xp: Any,
        cand: _Candidates,
        Qc: Array,
        metric: str,
        cdtype: Any,
        tile: int,
        transposed: bool | None = None,
        matvec: MatVec | None = None,
    ) -> None:
        self.xp, self.cand, self.metric, self.cdtype = xp, cand, metric, cdtype
        self.matvec = matvec
        mb = Qc.shape[0]
        width = min(tile, cand.n)
        self.transposed = mb >= _TRANSPOSE_MIN if transposed is None else transposed
        self.scratch = xp.empty(width * mb, dtype=cdtype)
        self.augment = self.transposed and mb >= _AUGMENT_MIN and metric != "dot"
        self.Qc = Qc
        if self.augment and metric == "l2":
            self.Qc = xp.concatenate([Qc, xp.ones((mb, 1), dtype=cdtype)], axis=1)
        if self.augment:
            self.Xa = xp.empty((width, self.Qc.shape[1]), dtype=cdtype)

    def _norms(self, t0: int, t1: int) -> Array:
        c = self.cand
        return c.norms32[t0:t1] if self.cdtype == self.xp.float32 else c.norms[t0:t1]

    def _inv(self, t0: int, t1: int) -> Array:
        c, xp = self.cand, self.xp
        if self.cdtype == xp.float32 and c.inv32 is not None:
            return c.inv32[t0:t1]
        with np.errstate(divide="ignore"):
            return (1.0 / xp.sqrt(c.norms[t0:t1])).astype(self.cdtype)

    def scores(self, t0: int, t1: int) -> Array:
        """Coarse scores of candidates ``t0:t1`` against the block (a view of the buffer):
        ``(t1 - t0, m)`` when :attr:`transposed`, else ``(m, t1 - t0)``; NaN for dead rows."""
        S = self._scores(t0, t1)
        self.cand.mask_dead(self.xp, S, t0, t1, 0 if self.transposed else 1)
        return S

    def _scores(self, t0: int, t1: int) -> Array:
        xp, cand = self.xp, self.cand
        Xt = cand.X[t0:t1] if cand.rows is None else cand.X[cand.rows[t0:t1]]
        mb = self.Qc.shape[0]
        if not self.transposed:
            return self._row_scores(Xt, self.scratch[: mb * (t1 - t0)].reshape(mb, t1 - t0), t0, t1)
        S = self.scratch[: mb * (t1 - t0)].reshape(t1 - t0, mb)
        if self.augment:
            Xa = self.Xa[: t1 - t0]
            if self.metric == "l2":
                Xa[:, :-1] = Xt
                Xa[:, -1] = self._norms(t0, t1)
            else:
                # A zero row scales to NaN (0 * inf) and its scores are NaN: ranked last.
                with np.errstate(invalid="ignore"):
                    xp.multiply(Xt, self._inv(t0, t1)[:, None], out=Xa)
            xp.matmul(Xa, self.Qc.T, out=S)
            return S
        if self.cdtype != xp.float32:
            Xt = Xt.astype(self.cdtype)
        xp.matmul(Xt, self.Qc.T, out=S)
        if self.metric == "l2":
            S += self._norms(t0, t1)[:, None]
        elif self.metric == "cosine":
            # A zero row has 1/|x| = inf: 0 * inf = NaN marks it, and NaN ranks last.
            with np.errstate(invalid="ignore"):
                S *= self._inv(t0, t1)[:, None]
        return S

    def _row_scores(self, Xt: Array, S: Array, t0: int, t1: int) -> Array:
        """Scores laid out ``(m, rows)``, for a few queries (the per-row passes run along the
        contiguous axis)."""
        xp = self.xp
        if self.cdtype != xp.float32:
            Xt = Xt.astype(self.cdtype)
        if S.shape[0] == 1:
            # One query: a matrix-vector product streams X once at memory bandwidth (the
            # backend's own, which may pick the fastest way to stream rows on its device).
            if self.matvec is None:
                xp.matmul(Xt, self.Qc[0], out=S[0])
            else:
                self.matvec(Xt, self.Qc[0], S[0])
        else:
            xp.matmul(self.Qc, Xt.T, out=S)
        if self.metric == "l2":
            S += self._norms(t0, t1)
        elif self.metric == "cosine":
            with np.errstate(invalid="ignore"):
                S *= self._inv(t0, t1)
        return S


def _tile_hits(xp: Any, S: Array, thr: Array, transposed: bool) -> tuple[Array, Array, Array]:
    """The scores of a tile at or below their query's bound ``thr``: ``(query, row in the tile,
    score)`` arrays, grouped by query (queries ascending)."""
    return _transposed_hits(xp, S, thr) if transposed else _row_hits(xp, S, thr)


def _row_hits(xp: Any, S: Array, thr: Array) -> tuple[Array, Array, Array]:
    """:func:`_tile_hits` for a tile laid out ``(queries, rows)``.

    Once the bounds are tight, most queries have no score in a tile at or below their bound:
    a row minimum (one fast reduction) finds the rows that do, and only those are compared
    element by element; the few hits are gathered through a flat index (NumPy's 2-D
    ``nonzero`` is an order of magnitude slower than ``flatnonzero``).
    """
    mb, width_tile = S.shape
    row_min = xp.min(S, axis=1)
    # A row holding a NaN (COSINE, zero vector) has a NaN minimum: compare it in full.
    live = xp.flatnonzero((row_min <= thr) | xp.isnan(row_min))
    if 2 * live.shape[0] < mb:
        sub = S[live]
        hits = xp.flatnonzero(sub <= thr[live][:, None])
        qi = live[hits // width_tile]
    else:
        sub = S
        hits = xp.flatnonzero(S <= thr[:, None])
        qi = hits // width_tile
    return qi, hits % width_tile, sub.reshape(-1)[hits]


_TRANSPOSE_MIN = 32  # queries per block from which score tiles are laid out (rows, queries)
_CHUNK = 64  # rows per run whose minimum decides whether the run is compared at all


def _transposed_hits(xp: Any, S: Array, thr: Array) -> tuple[Array, Array, Array]:
    """:func:`_tile_hits` for a transposed tile ``S`` (rows, queries).

    Once the bounds are tight, most of a tile lies above every query's bound. Minima over runs
    of :data:`_CHUNK` rows (one streaming reduction) find the (run, query) pairs holding a
    score at or below the query's bound, and only those are compared element by element, so
    the tile is read about once. The hits are gathered through flat indices (NumPy's 2-D
    ``nonzero`` is an order of magnitude slower than ``flatnonzero``).
    """
    width_tile, mb = S.shape
    ch = _CHUNK if width_tile % _CHUNK == 0 else width_tile
    nch = width_tile // ch
    runs = S.reshape(nch, ch, mb)
    run_min = xp.min(runs, axis=1)
    # A run holding a NaN (COSINE, zero vector) has a NaN minimum: compare it in full.
    # Pairs are enumerated query-major (through a transposed view of the small mask), so the
    # sparse path's hits come out grouped by query with no sort.
    live = xp.flatnonzero(((run_min <= thr) | xp.isnan(run_min)).T)
    if 4 * live.shape[0] < nch * mb:
        lq, lrun = live // nch, live % nch
        sub = runs[lrun, :, lq]  # (live, ch)
        hits = xp.flatnonzero(sub <= thr[lq][:, None])
        pair = hits // ch
        return lq[pair], lrun[pair] * ch + hits % ch, sub.reshape(-1)[hits]
    hits = xp.flatnonzero(S <= thr)
    # Group the hits by query: a stable sort of small integers (NumPy sorts them by radix).
    # Measured 1.6-2x faster than enumerating a transposed copy of the mask at 1-3.5 % of
    # scores hit, about even at 10 %.
    qi = (hits % mb).astype(xp.uint16 if mb <= 1 << 16 else xp.int64)
    order = xp.argsort(qi, kind="stable")
    hits = hits[order]
    return qi[order].astype(xp.int64), hits // mb, S.reshape(-1)[hits]


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


def _rows_take(xp: Any, a: Array, idx: Array) -> Array:
    """``take_along_axis(a, idx, axis=1)`` without its Python overhead (small arrays, hot path)."""
    return a[xp.arange(a.shape[0])[:, None], idx]


def _order(xp: Any, scores: Array, row_ids: Array) -> Array:
    """Per-row order by (score, id), NaN scores last (by id among themselves): the contract's
    result order.

    One sort by score; only the rows holding equal scores (or NaNs) are sorted again, id first
    and then stably by score (NumPy and CuPy both sort NaN last; a stacked lexsort would cast
    uint64 ids to float64 and lose precision).
    """
    order = xp.argsort(scores, axis=1)
    ranked = _rows_take(xp, scores, order)
    tied = xp.flatnonzero(xp.any((ranked[:, 1:] == ranked[:, :-1]) | xp.isnan(ranked[:, 1:]), axis=1))
    if tied.shape[0]:
        by_id = xp.argsort(row_ids[tied], axis=1, kind="stable")
        again = xp.argsort(_rows_take(xp, scores[tied], by_id), axis=1, kind="stable")
        order[tied] = _rows_take(xp, by_id, again)
    return order


def _finalize(
    xp: Any, cand: _Candidates, ids: Array, Q64: Array, rows_in: Array, metric: str, count: int
) -> tuple[Array, Array]:
    """Exact scores for the kept candidates, then order by (score, id), NaN last, and cut.

    Placeholders (row -1) score NaN and sort last; a query left with fewer than ``count``
    non-NaN results is completed by the rows whose score is NaN, by id (:func:`_fill_nan`).
    """
    valid = rows_in >= 0
    safe_rows = xp.where(valid, rows_in, 0)
    # Gathered in pieces of at most _FINALIZE_BYTES as float64 (so memory stays bounded for any
    # k); `take` gathers rows about 1.8x faster than fancy indexing (measured, 1,008 rows).
    d = int(cand.X.shape[1])
    width = max(1, _FINALIZE_BYTES // (8 * d * int(Q64.shape[0])))
    exact = xp.empty(safe_rows.shape, dtype=xp.float64)
    for j0 in range(0, int(safe_rows.shape[1]), width):
        A = xp.take(cand.X, safe_rows[:, j0 : j0 + width], axis=0)
        exact[:, j0 : j0 + width] = exact_scores(xp, metric, A, Q64[:, None, :])
    scores = xp.where(valid, exact, xp.nan)
    order = _order(xp, scores, ids[safe_rows])[:, :count]
    rows = _rows_take(xp, safe_rows, order)
    scores = _rows_take(xp, scores, order)
    have = count - xp.sum(xp.isnan(scores), axis=1)
    for i in _to_list(xp, xp.nonzero(have < count)[0]):
        rows[i], scores[i] = _fill_nan(xp, cand, ids, Q64[i], rows[i], int(have[i]), metric, count)
    return rows, scores


def _fill_nan(
    xp: Any, cand: _Candidates, ids: Array, q: Array, rows: Array, have: int, metric: str, count: int
) -> tuple[Array, Array]:
    """Complete ``rows[have:count]`` with the rows whose score is NaN, smallest ids first.

    Only COSINE has NaN scores: every row when the query is zero, else the zero rows.
    """
    pos = cand.live_positions(xp)
    if float(xp.sum(q * q)) != 0:
        pos = pos[cand.norms[pos] == 0]
    nan_rows = cand.row_index(0, pos, xp)
    nan_rows = nan_rows[xp.argsort(ids[nan_rows], kind="stable")]
    rows = rows.copy()
    rows[have:count] = nan_rows[: count - have]
    return rows, exact_scores(xp, metric, cand.X[rows], q)


def _rescan(
    xp: Any,
    cand: _Candidates,
    ids: Array,
    Qc1: Array,
    q64: Array,
    metric: str,
    count: int,
    bound: float,
    cdtype: Any,
    matvec: MatVec | None,
    working_set: int = DEFAULT_WORKING_SET,
) -> tuple[Array, Array]:
    """Near-ties crowd the margin: score every row within ``bound`` exactly and keep the best
    ``count``, tile by tile, so memory stays within the working set however many rows the
    bound admits (all of them, when an extreme row makes the rounding bound huge)."""
    n, d = cand.n, int(Qc1.shape[1])
    # Tiles within the working set, also when the rows are widened to float64.
    width = 4 if cdtype == xp.float32 else 8 * (d + 1)
    tile = max(1, min(n, 1 << 20, working_set // width))
    piece = max(1, working_set // (8 * d))  # rows re-scored in float64 at once
    tiler = _Tiler(xp, cand, Qc1, metric, cdtype, tile, matvec=matvec)
    rows = xp.empty(0, dtype=xp.int64)
    scores = xp.empty(0, dtype=xp.float64)
    for t0 in range(0, n, tile):
        S = tiler.scores(t0, min(t0 + tile, n))
        hit = cand.row_index(t0, xp.flatnonzero(S.reshape(-1) <= bound), xp)
        for p0 in range(0, int(hit.shape[0]), piece):
            r = hit[p0 : p0 + piece]
            rows = xp.concatenate([rows, r])
            scores = xp.concatenate([scores, exact_scores(xp, metric, cand.X[r], q64)])
            order = _order(xp, scores[None, :], ids[rows][None, :])[0][:count]
            rows, scores = rows[order], scores[order]
    have = int(rows.shape[0])
    if have < count:
        rows = xp.concatenate([rows, xp.zeros(count - have, dtype=xp.int64)])
        return _fill_nan(xp, cand, ids, q64, rows, have, metric, count)
    return rows, scores
