"""Exact scoring and ordering: the canonical float64 score (one fixed summation order, the same
bits on every device), the contract's order by (score, id) with NaN last, and the exact
completion of a search (re-scoring its candidates, near-tie rescans, NaN fills).

Part of the flat top-k search (:mod:`iqdb.kernels._flat` is the driver), written against ``xp``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._profile import DEFAULT_WORKING_SET
from ._tiles import (
    Array,
    MatVec,
    _Candidates,
    _rows_take,
    _Tiler,
)

__all__ = ["canonical_sum", "exact_scores"]


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


def _order(xp: Any, scores: Array, row_ids: Array, fixed_shape: bool = False) -> Array:
    """Per-row order by (score, id), NaN scores last (by id among themselves): the contract's
    result order.

    One sort by score; only the rows holding equal scores (or NaNs) are sorted again, id first
    and then stably by score (NumPy and CuPy both sort NaN last; a stacked lexsort would cast
    uint64 ids to float64 and lose precision). With ``fixed_shape`` (a device, where finding
    the tied rows is a host sync), every row is sorted twice: stably by id, then by score.
    """
    if fixed_shape:
        by_id = xp.argsort(row_ids, axis=1, kind="stable")
        return _rows_take(xp, by_id, xp.argsort(_rows_take(xp, scores, by_id), axis=1, kind="stable"))
    order = xp.argsort(scores, axis=1)
    ranked = _rows_take(xp, scores, order)
    tied = xp.flatnonzero(xp.any((ranked[:, 1:] == ranked[:, :-1]) | xp.isnan(ranked[:, 1:]), axis=1))
    if tied.shape[0]:
        by_id = xp.argsort(row_ids[tied], axis=1, kind="stable")
        again = xp.argsort(_rows_take(xp, scores[tied], by_id), axis=1, kind="stable")
        order[tied] = _rows_take(xp, by_id, again)
    return order


def _finalize(
    xp: Any,
    cand: _Candidates,
    ids: Array,
    Q64: Array,
    rows_in: Array,
    metric: str,
    count: int,
    finalize_bytes: int,
) -> tuple[Array, Array]:
    """:func:`exact_ranked`, then a query left with fewer than ``count`` non-NaN results is
    completed by the rows whose score is NaN, by id (:func:`fill_nan_rows`)."""
    rows, scores, have = exact_ranked(xp, cand, ids, Q64, rows_in, metric, count, finalize_bytes)
    fill_nan_rows(xp, cand, ids, Q64, rows, scores, have, have < count, metric, count)
    return rows, scores


def exact_ranked(
    xp: Any,
    cand: _Candidates,
    ids: Array,
    Q64: Array,
    rows_in: Array,
    metric: str,
    count: int,
    finalize_bytes: int,
    fixed_shape: bool = False,
) -> tuple[Array, Array, Array]:
    """Exact scores of each query's kept candidates (``rows_in``: rows of ``X``, -1 for a
    placeholder), ordered by (score, id), NaN last, and cut to ``count``: ``(rows, scores,
    have)``, ``have`` the non-NaN scores per query. Placeholders score NaN and sort last.
    ``fixed_shape``: no step with a data-dependent size (see :func:`_order`)."""
    valid = rows_in >= 0
    safe_rows = xp.where(valid, rows_in, 0)
    # Gathered in pieces of at most ``finalize_bytes`` as float64 (so memory stays bounded for any
    # k); `take` gathers rows about 1.8x faster than fancy indexing (measured, 1,008 rows).
    d = int(cand.X.shape[1])
    width = max(1, finalize_bytes // (8 * d * int(Q64.shape[0])))
    exact = xp.empty(safe_rows.shape, dtype=xp.float64)
    for j0 in range(0, int(safe_rows.shape[1]), width):
        A = xp.take(cand.X, safe_rows[:, j0 : j0 + width], axis=0)
        exact[:, j0 : j0 + width] = exact_scores(xp, metric, A, Q64[:, None, :])
    scores = xp.where(valid, exact, xp.nan)
    order = _order(xp, scores, ids[safe_rows], fixed_shape)[:, :count]
    rows = _rows_take(xp, safe_rows, order)
    scores = _rows_take(xp, scores, order)
    return rows, scores, count - xp.sum(xp.isnan(scores), axis=1)


def fill_nan_rows(
    xp: Any,
    cand: _Candidates,
    ids: Array,
    Q64: Array,
    rows: Array,
    scores: Array,
    have: Array,
    short: Array,
    metric: str,
    count: int,
) -> None:
    """Complete ``rows[i, have[i]:count]`` (and their scores), for every query ``i`` where
    ``short`` is true, with the rows whose score is NaN, smallest ids first: in place, as array
    work over all those queries at once.

    Only COSINE has NaN scores: every row when the query is zero, else the zero rows. The
    queries of each kind share one list of NaN rows, by id; query ``i`` takes its first
    ``count - have[i]`` entries.
    """
    zero_q = xp.sum(Q64 * Q64, axis=1) == 0
    groups = [xp.flatnonzero(short & zero_q), xp.flatnonzero(short & ~zero_q)]
    if not (groups[0].shape[0] or groups[1].shape[0]):
        return  # the common case: found before any pass over the rows
    live = cand.live_positions(xp)
    for sel, pos in zip(groups, (live, live[cand.norms[live] == 0])):
        if sel.shape[0] == 0:
            continue
        nan_rows = cand.row_index(0, pos, xp)
        nan_rows = nan_rows[xp.argsort(ids[nan_rows], kind="stable")][:count]
        take = xp.arange(count)[None, :] - have[sel][:, None]  # the entry each slot takes
        fill = take >= 0
        block_rows, block_scores = rows[sel], scores[sel]
        picked = nan_rows[xp.where(fill, take, 0)]
        block_rows = xp.where(fill, picked, block_rows)
        q_of = xp.broadcast_to(sel[:, None], fill.shape)
        filled = exact_scores(xp, metric, cand.X[block_rows], Q64[q_of])
        block_scores = xp.where(fill, filled, block_scores)
        rows[sel], scores[sel] = block_rows, block_scores


def rescan_rows(
    xp: Any,
    cand: _Candidates,
    ids: Array,
    Qc: Array,
    Q64: Array,
    metric: str,
    count: int,
    bounds: Array,
    cdtype: Any,
    matvec: MatVec | None,
    working_set: int = DEFAULT_WORKING_SET,
) -> tuple[Array, Array]:
    """Near-ties crowd the margin of these queries (rows of ``Qc``/``Q64``): score exactly every
    row whose coarse score is within the query's bound, and keep each query's best ``count`` by
    (score, id), as array work over all the queries at once.

    Tile by tile, so memory stays within the working set however many rows the bounds admit
    (all of them, when an extreme row makes the rounding bound huge): after each piece of
    exact scores only each query's ``count`` best are kept. A query left with fewer (COSINE with
    zero vectors) is completed by :func:`fill_nan_rows`.
    """
    u, d = int(Qc.shape[0]), int(Qc.shape[1])
    n = cand.n
    # Tiles within the working set, also when the rows are widened to float64.
    width = (4 if cdtype == xp.float32 else 8 * (d + 1)) * u
    tile = max(1, min(n, 1 << 20, working_set // width))
    piece = max(1, working_set // (8 * d))  # (query, row) pairs re-scored in float64 at once
    tiler = _Tiler(xp, cand, Qc, metric, cdtype, tile, transposed=False, matvec=matvec)
    kept_q = xp.empty(0, dtype=xp.int64)
    kept_r = xp.empty(0, dtype=xp.int64)
    kept_s = xp.empty(0, dtype=xp.float64)
    for t0 in range(0, n, tile):
        t1 = min(n, t0 + tile)
        hits = xp.flatnonzero(tiler.scores(t0, t1) <= bounds[:, None])  # NaN never passes
        for p0 in range(0, int(hits.shape[0]), piece):
            flat = hits[p0 : p0 + piece]
            qi = flat // (t1 - t0)
            r = cand.row_index(t0, flat % (t1 - t0), xp)
            kept_q = xp.concatenate([kept_q, qi])
            kept_r = xp.concatenate([kept_r, r])
            kept_s = xp.concatenate([kept_s, exact_scores(xp, metric, cand.X[r], Q64[qi])])
            kept_q, kept_r, kept_s = _best_per_query(xp, kept_q, kept_r, kept_s, ids, count)
    rows = xp.zeros((u, count), dtype=xp.int64)
    scores = xp.full((u, count), xp.nan, dtype=xp.float64)
    rank = xp.arange(kept_q.shape[0]) - xp.searchsorted(kept_q, kept_q, side="left")
    rows[kept_q, rank] = kept_r
    scores[kept_q, rank] = kept_s
    have = xp.bincount(kept_q, minlength=u)
    short = have < count
    if bool(short.any()):  # COSINE with zero vectors only
        fill_nan_rows(xp, cand, ids, Q64, rows, scores, have, short, metric, count)
    return rows, scores


def _best_per_query(
    xp: Any, q: Array, r: Array, s: Array, ids: Array, count: int
) -> tuple[Array, Array, Array]:
    """The ``count`` best (score, id) of each query's (query, row, score) triples, grouped by
    query in that order (three stable sorts: by id, by score, by query; NaN last)."""
    order = xp.argsort(ids[r], kind="stable")
    order = order[xp.argsort(s[order], kind="stable")]
    order = order[xp.argsort(q[order], kind="stable")]
    q, r, s = q[order], r[order], s[order]
    keep = xp.flatnonzero(xp.arange(q.shape[0]) - xp.searchsorted(q, q, side="left") < count)
    return q[keep], r[keep], s[keep]
