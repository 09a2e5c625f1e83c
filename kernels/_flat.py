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
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._exact import (
    _finalize,
    canonical_sum,
    exact_scores,
    rescan_rows,
)
from ._parallel import SERIAL, Parallel
from ._profile import CPU_PROFILE, DEFAULT_WORKING_SET, Profile
from ._selection import (
    _sample_bound,
    _seed_bound,
    _select_one,
    _Selection,
)
from ._tiles import (
    Array,
    MatVec,
    _Candidates,
    _rows_take,
    _tile_hits,
    _Tiler,
    _workers,
    search_candidates,
)

__all__ = ["DEFAULT_WORKING_SET", "SearchOutput", "canonical_sum", "exact_scores", "flat_topk"]

_U = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32
# Coarse scores are float32 when every nonzero squared norm lies in this range: no overflow,
# no subnormal products (whose absolute error the relative bound `tol` would not cover), and
# 1/|x| fits float32. Otherwise they are computed in float64.
_SAFE_NORM_SQ = (1e-30, 1e36)


@dataclass(frozen=True)
class SearchOutput:
    """Per-query results: ``rows[i, :count]`` and ``scores[i, :count]`` (float64), best first."""

    rows: Array
    scores: Array
    count: int


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
    working_set: int | None = None,
    parallel: Parallel = SERIAL,
    matvec: MatVec | None = None,
    profile: Profile = CPU_PROFILE,
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
        bounded for any ``m`` and ``n``. ``None``: the profile's
        (:data:`DEFAULT_WORKING_SET` on the CPU).
    parallel
        Runs the workers that split the stored rows among them (one after another by default).
    matvec
        ``matvec(A, v, out)`` writes ``A @ v`` (float32 or float64) into ``out``: how a single
        query streams its rows (``xp.matmul`` by default; a backend may pass a faster one).
    profile
        The tuning constants (tile and block sizes, layout and split thresholds): they move time
        and memory, never the answer.

    Returns
    -------
    SearchOutput
        ``count = min(k, candidates)`` results per query, best first, as row indices into ``X``.
    """
    m = int(Q.shape[0])
    if working_set is None:
        working_set = profile.working_set
    cand = search_candidates(xp, X, norms_sq, metric, rows, dead, norms32, inv_norms32)
    n_cand = cand.n
    count = min(k, cand.n_live)
    out_rows = xp.empty((m, count), dtype=xp.int64)
    out_scores = xp.empty((m, count), dtype=xp.float64)
    if count == 0 or m == 0:
        return SearchOutput(out_rows, out_scores, count)
    if norm_bounds is None or rows is not None:
        positive = cand.norms[cand.norms > 0]
        norm_bounds = (float(xp.min(positive)), float(xp.max(positive))) if positive.shape[0] else (1.0, 0.0)
    # Queries per block: all of them up to the profile's max_block (the product's efficiency
    # grows with the block), with tiles of at least min_tile_rows within the working set. When
    # each tile is merged into the running selection (small c), a tile should hold several times
    # the c = k + margin candidates each query keeps, or merging would cost more than the
    # product; with sampled bounds, the selection buffers ((1 + lazy) c slots of 12 bytes per
    # query) stay within it.
    p = profile
    per_worker = working_set // max(1, parallel.workers)
    c = min(n_cand, k + p.margin)
    if c >= p.sample_min_c:
        per_query = max(4 * p.min_tile_rows, 12 * (1 + p.lazy) * c)
    else:
        per_query = 4 * max(p.min_tile_rows, p.tile_per_candidate * c)
    block = _even_block(m, max(1, min(p.max_block, per_worker // per_query)))
    for q0 in range(0, m, block):
        r, s = _search_block(
            xp, cand, ids, Q[q0 : q0 + block], k, count, metric, norm_bounds, working_set, parallel, matvec, p
        )
        out_rows[q0 : q0 + block] = r
        out_scores[q0 : q0 + block] = s
    return SearchOutput(out_rows, out_scores, count)


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
    profile: Profile,
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
    c = min(n, k + profile.margin)
    # For large c, a strided sample sets each query's admission bound up front, so a scan
    # admits about 2c scores per query and merges them once, instead of merging every tile.
    # The bound is an estimate: a query that admits fewer than c rows is scanned again the
    # exact way (a running bound, seeded by the first tile).
    theta = _sample_bound(xp, cand, Qc, metric, cdtype, c, working_set, parallel, profile)
    best_s, best_r = _coarse_best(
        xp, cand, Qc, metric, cdtype, c, working_set, parallel, theta, matvec, profile
    )
    workers = _workers(parallel.workers, mb, n, d, profile)
    if theta is not None:
        short = xp.flatnonzero(xp.isinf(xp.max(best_s, axis=1)) & ~xp.isinf(theta))
        if short.shape[0]:
            s2, r2 = _coarse_best(
                xp, cand, Qc[short], metric, cdtype, c, working_set, parallel, None, matvec, profile
            )
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
    step = max(1, profile.finalize_bytes // (8 * c * d))
    chunks = [ok[i0 : i0 + step] for i0 in range(0, int(ok.shape[0]), step)]

    def finish(w: int) -> None:
        for sel in chunks[w::workers]:
            r, s = _finalize(xp, cand, ids, Q64[sel], best_r[sel], metric, count, profile.finalize_bytes)
            rows_out[sel] = r
            scores_out[sel] = s

    if workers > 1 and len(chunks) > 1:
        parallel.map(finish, workers)
    else:
        for w in range(workers):
            finish(w)
    unsafe = xp.flatnonzero(~safe)
    if unsafe.shape[0]:
        rows_out[unsafe], scores_out[unsafe] = rescan_rows(
            xp,
            cand,
            ids,
            Qc[unsafe],
            Q64[unsafe],
            metric,
            count,
            (kth + tol)[unsafe],
            cdtype,
            matvec,
            working_set,
        )
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
    matvec: MatVec | None,
    profile: Profile,
) -> tuple[Array, Array]:
    """Each query's ``c`` best coarse scores and their rows, ``(m, c)`` each: ``+inf`` with row
    -1 where fewer than ``c`` scores were admitted.

    Scores above a query's bound are never admitted: ``theta`` (from :func:`_sample_bound`) when
    given, else :func:`_seed_bound` of the first tile; the bound then tightens to the ``c``-th
    best kept whenever admitted scores are merged in.
    """
    mb, d = int(Qc.shape[0]), int(Qc.shape[1])
    n = cand.n
    workers = _workers(parallel.workers, mb, n, d, profile)
    # Each worker scans a contiguous share of the rows with its own score tile and its own c
    # best; a tile is a whole number of the runs `_tile_hits` takes minima over. Float64
    # scores (rows of extreme norms) widen each tile's rows too, so their tiles also keep the
    # widened rows within the working set.
    whole = mb == 1 and cdtype == xp.float32
    ch = profile.chunk
    if whole:
        tile = -(-n // workers)
    else:
        # At least min_tile_rows, rounded up to whole runs.
        tile = max(-(-profile.min_tile_rows // ch) * ch, working_set // (4 * mb * workers) // ch * ch)
        if cdtype != xp.float32:
            tile = min(tile, max(ch, working_set // (8 * (d + 1) * workers) // ch * ch))
    bounds = [n * w // workers for w in range(workers + 1)]
    # Sampled bounds admit about 2c scores per query: they wait in a buffer (c x lazy slots
    # per query) and are merged once it fills, usually once per scan. A bound seeded by a
    # prefix is looser at first, so those scans merge after every tile and tighten it.
    spare = profile.lazy * c if theta is not None else 0

    def scan(w: int) -> tuple[Array, Array]:
        lo, hi = bounds[w], bounds[w + 1]
        tiler = _Tiler(xp, cand, Qc, metric, cdtype, min(tile, hi - lo), matvec=matvec, profile=profile)
        if whole:
            return _select_one(xp, cand, tiler.scores(lo, hi)[0], lo, c, ch)
        sel = _Selection(xp, cand, mb, c, cdtype, spare)
        thr = xp.full(mb, xp.inf, dtype=cdtype) if theta is None else theta.astype(cdtype)
        for t0 in range(lo, hi, tile):
            S = tiler.scores(t0, min(t0 + tile, hi))
            rows_axis = 0 if tiler.transposed else 1
            if t0 == lo and theta is None and S.shape[rows_axis] >= c:
                thr = _seed_bound(xp, S, c, rows_axis, ch, cand.may_nan)
            qi, row, vals = _tile_hits(xp, S, thr, tiler.transposed, ch)
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
