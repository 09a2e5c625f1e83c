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
   only contributes entries at or below the query's current ``c``-th score, so after the first
   tile almost every score is discarded by one comparison.
3. *Exact re-scoring* of the ``c`` candidates in float64 (the scores users see), then ordering by
   ``(score, id)`` with NaN last. Float32 rounding can misorder near-ties, so the margin is
   checked against a rigorous rounding bound ``tol``: when the worst kept candidate is not
   clearly worse than the k-th, the query is re-scanned and every row within ``tol`` of the k-th
   is re-scored exactly. Results are therefore exact, ties broken by smaller id, on any device.

NaN scores only arise for COSINE with a zero vector (database row or query); such rows are
ranked last, by id. Vectors so large that float32 products could overflow are scored in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SearchOutput", "exact_scores", "flat_topk"]

Array = Any  # an xp.ndarray

_U = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32
_SAFE_NORM_SQ = 1e36  # below this, float32 products and sums cannot overflow
_MARGIN = 8  # extra candidates kept per query beyond k


@dataclass(frozen=True)
class SearchOutput:
    """Per-query results: ``rows[i, :count]`` and ``scores[i, :count]`` (float64), best first."""

    rows: Array
    scores: Array
    count: int


def exact_scores(xp: Any, metric: str, A: Array, q: Array) -> Array:
    """Distances from each row of ``A`` to the vectors ``q`` in float64.

    ``A`` is ``(..., d)`` and ``q`` broadcasts against it. Element-wise products and per-row
    sums (not BLAS) keep identical rows bit-identical, so exact ties stay ties.
    """
    A = A.astype(xp.float64, copy=False)
    q = q.astype(xp.float64, copy=False)
    if metric == "l2":
        diff = A - q
        return xp.sqrt(xp.sum(diff * diff, axis=-1))
    dot = xp.sum(A * q, axis=-1)
    if metric == "dot":
        return -dot
    denom = xp.sum(A * A, axis=-1) * xp.sum(q * q, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - dot / xp.sqrt(denom)
    return xp.where(denom == 0, xp.nan, out)


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
    working_set: int = 64 << 20,
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
        Optional sorted int64 indices into ``X``: search only these rows (a pre-filter).
    working_set
        Bytes of score tile per query block; bounds extra memory independently of ``m`` and ``n``.

    Returns
    -------
    SearchOutput
        ``count = min(k, candidates)`` results per query, best first, as row indices into ``X``.
    """
    m = int(Q.shape[0])
    n_cand = int(X.shape[0]) if rows is None else int(rows.shape[0])
    count = min(k, n_cand)
    out_rows = xp.empty((m, count), dtype=xp.int64)
    out_scores = xp.empty((m, count), dtype=xp.float64)
    if count == 0 or m == 0:
        return SearchOutput(out_rows, out_scores, count)
    cand_rows = xp.arange(X.shape[0], dtype=xp.int64) if rows is None else rows
    cand_norms = norms_sq if rows is None else norms_sq[rows]
    max_norm_sq = float(xp.max(cand_norms))
    # Queries per block: enough to make the matrix product efficient, few enough that a tile
    # of at least 4096 rows fits the working set.
    block = max(1, min(m, working_set // (4 * 4096)))
    for q0 in range(0, m, block):
        Qb = Q[q0 : q0 + block]
        r, s = _search_block(
            xp, X, cand_rows, cand_norms, ids, Qb, k, count, metric, max_norm_sq, working_set, rows is None
        )
        out_rows[q0 : q0 + block] = r
        out_scores[q0 : q0 + block] = s
    return SearchOutput(out_rows, out_scores, count)


def _search_block(
    xp: Any,
    X: Array,
    cand_rows: Array,
    cand_norms: Array,
    ids: Array,
    Qb: Array,
    k: int,
    count: int,
    metric: str,
    max_norm_sq: float,
    working_set: int,
    contiguous: bool,
) -> tuple[Array, Array]:
    mb, d = int(Qb.shape[0]), int(Qb.shape[1])
    n = int(cand_rows.shape[0])
    Q64 = Qb.astype(xp.float64)
    q_norm_sq = xp.sum(Q64 * Q64, axis=1)
    wide = max_norm_sq > _SAFE_NORM_SQ or float(xp.max(q_norm_sq)) > _SAFE_NORM_SQ
    cdtype = xp.float64 if wide else xp.float32
    u = _U if not wide else float(np.finfo(np.float64).eps) / 2
    # Coarse query operand, chosen so a single product gives a score monotone in the distance,
    # and `tol`, twice a rigorous bound on the coarse score's rounding error (scale x (d+c) u).
    if metric == "l2":
        Qc = (-2.0 * Q64).astype(cdtype)
        tol = 2 * (d + 4) * u * (max_norm_sq + 2.0 * xp.sqrt(max_norm_sq * q_norm_sq))
    elif metric == "dot":
        Qc = (-Q64).astype(cdtype)
        tol = 2 * (d + 4) * u * xp.sqrt(max_norm_sq * q_norm_sq)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            Qc = (-Q64 / xp.sqrt(q_norm_sq)[:, None]).astype(cdtype)
        tol = xp.full(mb, 2 * (d + 6) * u)
    c = min(n, k + _MARGIN)
    tile = max(4096, working_set // (4 * mb))
    best_s = xp.full((mb, c), xp.inf, dtype=cdtype)
    best_r = xp.full((mb, c), -1, dtype=xp.int64)
    thr = xp.full(mb, xp.inf, dtype=cdtype)
    for t0 in range(0, n, tile):
        S, tile_rows = _coarse_tile(
            xp, X, cand_rows, cand_norms, Qc, metric, t0, t0 + tile, cdtype, contiguous
        )
        best_s, best_r = _merge(xp, best_s, best_r, S, tile_rows, thr, c, first=t0 == 0)
        thr = _threshold(xp, best_s)
    # Sort the kept candidates by coarse score to find the k-th and check the margin.
    order = xp.argsort(best_s, axis=1)
    best_s = xp.take_along_axis(best_s, order, axis=1)
    best_r = xp.take_along_axis(best_r, order, axis=1)
    kth = best_s[:, count - 1]
    worst = best_s[:, c - 1]
    kth_nan = xp.isnan(kth) | (best_r[:, count - 1] < 0)
    # When every candidate was kept (c == n) nothing was excluded, so the margin holds trivially.
    safe = (worst > kth + tol) | xp.isnan(worst) | (c == n) | kth_nan
    rows_out = xp.empty((mb, count), dtype=xp.int64)
    scores_out = xp.empty((mb, count), dtype=xp.float64)
    ok = xp.nonzero(safe)[0]
    if ok.shape[0]:
        r, s = _finalize(xp, X, ids, Q64[ok], best_s[ok], best_r[ok], metric, count, cand_rows, cand_norms)
        rows_out[ok] = r
        scores_out[ok] = s
    for i in _to_list(xp, xp.nonzero(~safe)[0]):
        bound = float(kth[i] + tol[i])
        r, s = _rescan(
            xp,
            X,
            cand_rows,
            cand_norms,
            ids,
            Qc[i : i + 1],
            Q64[i],
            metric,
            count,
            bound,
            cdtype,
            tile * mb,
            contiguous,
        )
        rows_out[i] = r
        scores_out[i] = s
    return rows_out, scores_out


def _to_list(xp: Any, a: Array) -> list[int]:
    return [int(v) for v in (a.tolist() if xp is np else a.get().tolist())]


def _coarse_tile(
    xp: Any,
    X: Array,
    cand_rows: Array,
    cand_norms: Array,
    Qc: Array,
    metric: str,
    t0: int,
    t1: int,
    cdtype: Any,
    contiguous: bool,
) -> tuple[Array, Array]:
    """Coarse scores of the queries against candidate rows ``t0:t1``; returns ``(S, rows)``."""
    tile_rows = cand_rows[t0:t1]
    Xt = X[t0:t1] if contiguous else X[tile_rows]
    if cdtype != xp.float32:
        Xt = Xt.astype(cdtype)
    # One query: a matrix-vector product streams X once at memory bandwidth.
    S = (Xt @ Qc[0])[None, :] if Qc.shape[0] == 1 else Qc @ Xt.T
    nrm = cand_norms[t0:t1]
    if metric == "l2":
        S += nrm.astype(cdtype)
    elif metric == "cosine":
        with np.errstate(divide="ignore"):
            inv = (1.0 / xp.sqrt(nrm)).astype(cdtype)
        # A zero row has norm 0: 0 * inf = NaN marks it, and NaN ranks last.
        with np.errstate(invalid="ignore"):
            S *= inv
    return S, tile_rows


def _threshold(xp: Any, best_s: Array) -> Array:
    """Each query's current admission bound: its worst kept score (+inf while a slot is empty)."""
    worst = xp.max(best_s, axis=1)
    return xp.where(xp.isnan(worst), xp.inf, worst)


def _merge(
    xp: Any, best_s: Array, best_r: Array, S: Array, tile_rows: Array, thr: Array, c: int, first: bool
) -> tuple[Array, Array]:
    """Fold a tile of coarse scores into each query's ``c`` best."""
    mb = S.shape[0]
    if first:
        cand_s, cand_r = S, xp.broadcast_to(tile_rows, S.shape)
    else:
        qi, col = xp.nonzero(S <= thr[:, None])
        if qi.shape[0] == 0:
            return best_s, best_r
        counts = xp.bincount(qi, minlength=mb)
        width = int(xp.max(counts))
        starts = xp.cumsum(counts) - counts
        slot = xp.arange(qi.shape[0]) - starts[qi]
        cand_s = xp.full((mb, width), xp.nan, dtype=S.dtype)
        cand_r = xp.full((mb, width), -1, dtype=xp.int64)
        cand_s[qi, slot] = S[qi, col]
        cand_r[qi, slot] = tile_rows[col]
        cand_s = xp.concatenate([best_s, cand_s], axis=1)
        cand_r = xp.concatenate([best_r, cand_r], axis=1)
    if cand_s.shape[1] > c:
        part = xp.argpartition(cand_s, c - 1, axis=1)[:, :c]
        return xp.take_along_axis(cand_s, part, axis=1), xp.take_along_axis(cand_r, part, axis=1)
    pad = c - cand_s.shape[1]
    if pad:
        cand_s = xp.concatenate([cand_s, xp.full((mb, pad), xp.inf, dtype=S.dtype)], axis=1)
        cand_r = xp.concatenate([cand_r, xp.full((mb, pad), -1, dtype=xp.int64)], axis=1)
    return xp.ascontiguousarray(cand_s), xp.ascontiguousarray(cand_r)


def _order(xp: Any, scores: Array, row_ids: Array, valid: Array) -> Array:
    """Per-row order by (invalid, NaN, score, id): the contract's result order.

    Successive stable sorts, least significant key first (NumPy and CuPy both have them; a
    stacked lexsort would cast uint64 ids to float64 and lose precision).
    """
    order = xp.argsort(row_ids, axis=1, kind="stable")
    for key in (
        xp.where(valid, scores, xp.inf),
        xp.isnan(scores) & valid,
        ~valid,
    ):
        key = xp.take_along_axis(key, order, axis=1)
        order = xp.take_along_axis(order, xp.argsort(key, axis=1, kind="stable"), axis=1)
    return order


def _finalize(
    xp: Any,
    X: Array,
    ids: Array,
    Q64: Array,
    coarse: Array,
    cand: Array,
    metric: str,
    count: int,
    cand_rows: Array,
    cand_norms: Array,
) -> tuple[Array, Array]:
    """Exact scores for the kept candidates, then order by (score, id), NaN last, and cut."""
    # A NaN coarse score means an exact NaN (COSINE, zero vector); those are ranked apart.
    valid = (cand >= 0) & ~xp.isnan(coarse)
    safe_rows = xp.where(valid, cand, 0)
    scores = exact_scores(xp, metric, X[safe_rows], Q64[:, None, :])
    order = _order(xp, scores, ids[safe_rows], valid)
    rows = xp.take_along_axis(safe_rows, order, axis=1)[:, :count]
    scores = xp.take_along_axis(scores, order, axis=1)[:, :count]
    nvalid = xp.sum(valid, axis=1)
    for i in _to_list(xp, xp.nonzero(nvalid < count)[0]):
        rows[i], scores[i] = _fill_nan(
            xp, X, ids, cand_rows, cand_norms, Q64[i], rows[i], int(nvalid[i]), metric, count
        )
    return rows, scores


def _fill_nan(
    xp: Any,
    X: Array,
    ids: Array,
    cand_rows: Array,
    cand_norms: Array,
    q: Array,
    rows: Array,
    have: int,
    metric: str,
    count: int,
) -> tuple[Array, Array]:
    """Complete ``rows[have:count]`` with the rows whose score is NaN, smallest ids first.

    Only COSINE has NaN scores: every row when the query is zero, else the zero rows.
    """
    nan_rows = cand_rows if float(xp.sum(q * q)) == 0 else cand_rows[cand_norms == 0]
    nan_rows = nan_rows[xp.argsort(ids[nan_rows], kind="stable")]
    rows = rows.copy()
    rows[have:count] = nan_rows[: count - have]
    return rows, exact_scores(xp, metric, X[rows], q)


def _rescan(
    xp: Any,
    X: Array,
    cand_rows: Array,
    cand_norms: Array,
    ids: Array,
    Qc1: Array,
    q64: Array,
    metric: str,
    count: int,
    bound: float,
    cdtype: Any,
    tile: int,
    contiguous: bool,
) -> tuple[Array, Array]:
    """Near-ties crowd the margin: collect every row within ``bound``, score exactly, cut."""
    found = []
    n = int(cand_rows.shape[0])
    for t0 in range(0, n, tile):
        S, tile_rows = _coarse_tile(
            xp, X, cand_rows, cand_norms, Qc1, metric, t0, t0 + tile, cdtype, contiguous
        )
        found.append(tile_rows[S[0] <= bound])
    rows = xp.concatenate(found)
    scores = exact_scores(xp, metric, X[rows], q64)
    order = _order(xp, scores[None, :], ids[rows][None, :], xp.ones((1, rows.shape[0]), dtype=bool))[0]
    have = min(count, int(rows.shape[0]))
    rows = xp.concatenate([rows[order][:have], xp.zeros(count - have, dtype=xp.int64)])
    if have < count:
        return _fill_nan(xp, X, ids, cand_rows, cand_norms, q64, rows, have, metric, count)
    return rows, exact_scores(xp, metric, X[rows], q64)
