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
# Coarse scores are float32 when every nonzero squared norm lies in this range: no overflow,
# no subnormal products (whose absolute error the relative bound `tol` would not cover), and
# 1/|x| fits float32. Otherwise they are computed in float64.
_SAFE_NORM_SQ = (1e-30, 1e36)
_MARGIN = 8  # extra candidates kept per query beyond k


@dataclass(frozen=True)
class SearchOutput:
    """Per-query results: ``rows[i, :count]`` and ``scores[i, :count]`` (float64), best first."""

    rows: Array
    scores: Array
    count: int


def exact_scores(xp: Any, metric: str, A: Array, q: Array) -> Array:
    """Distances from each row of ``A`` to the vectors ``q`` in float64.

    ``A`` is ``(..., d)`` and ``q`` broadcasts against it. Per-row sums of products (``einsum``'s
    own loops, not BLAS) keep identical rows bit-identical, so exact ties stay ties.
    """
    A = A.astype(xp.float64, copy=False)
    q = q.astype(xp.float64, copy=False)
    if metric == "l2":
        diff = A - q
        return xp.sqrt(xp.einsum("...d,...d->...", diff, diff))
    dot = xp.einsum("...d,...d->...", A, q)
    if metric == "dot":
        return -dot
    denom = xp.einsum("...d,...d->...", A, A) * xp.einsum("...d,...d->...", q, q)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - dot / xp.sqrt(denom)
    return xp.where(denom == 0, xp.nan, out)


@dataclass(frozen=True)
class _Candidates:
    """The rows a search may return: all of ``X`` (``rows is None``) or a subset, with the
    per-row columns the coarse scores need, restricted to those rows."""

    X: Array
    rows: Array | None
    norms: Array  # float64 squared norms
    norms32: Array
    inv32: Array | None  # 1/|x| as float32 (COSINE only); inf for a zero row

    @property
    def n(self) -> int:
        return int(self.norms.shape[0])

    def row_index(self, t0: int, cols: Array, xp: Any) -> Array:
        """Row indices into ``X`` of candidate positions ``t0 + cols``."""
        if self.rows is None:
            return cols.astype(xp.int64) + t0
        return self.rows[t0 + cols]

    def all_rows(self, xp: Any) -> Array:
        return xp.arange(self.X.shape[0], dtype=xp.int64) if self.rows is None else self.rows


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
    norms32: Array | None = None,
    inv_norms32: Array | None = None,
    norm_bounds: tuple[float, float] | None = None,
    working_set: int = 16 << 20,
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
    norms32, inv_norms32
        Optional caches of ``norms_sq`` as float32 and of ``1/sqrt(norms_sq)`` as float32
        (computed here when absent).
    norm_bounds
        Optional ``(lower, upper)`` bounds on the nonzero squared norms (computed when absent).
    working_set
        Bytes of score tile per query block: extra memory stays bounded for any ``m`` and ``n``.

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
    with np.errstate(divide="ignore", over="ignore"):
        if norms32 is None:
            norms32 = norms_sq.astype(xp.float32)
        if metric == "cosine" and inv_norms32 is None:
            inv_norms32 = (1.0 / xp.sqrt(norms_sq)).astype(xp.float32)
    inv = inv_norms32 if metric == "cosine" else None
    if rows is None:
        cand = _Candidates(X, None, norms_sq, norms32, inv)
    else:
        cand = _Candidates(X, rows, norms_sq[rows], norms32[rows], None if inv is None else inv[rows])
    if norm_bounds is None or rows is not None:
        positive = cand.norms[cand.norms > 0]
        norm_bounds = (float(xp.min(positive)), float(xp.max(positive))) if positive.shape[0] else (1.0, 0.0)
    # Queries per block: all of them up to 1024 (the product's efficiency grows with the block),
    # with a tile of rows sized so the score tile fits the working set.
    block = max(1, min(m, 1024, working_set // (4 * 1024)))
    for q0 in range(0, m, block):
        r, s = _search_block(xp, cand, ids, Q[q0 : q0 + block], k, count, metric, norm_bounds, working_set)
        out_rows[q0 : q0 + block] = r
        out_scores[q0 : q0 + block] = s
    return SearchOutput(out_rows, out_scores, count)


_SAMPLE = 512  # columns of the first tile used to seed each query's admission threshold


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
) -> tuple[Array, Array]:
    mb, d = int(Qb.shape[0]), int(Qb.shape[1])
    n = cand.n
    Q64 = Qb.astype(xp.float64)
    q_norm_sq = xp.sum(Q64 * Q64, axis=1)
    lo, hi = _SAFE_NORM_SQ
    positive_q = q_norm_sq[q_norm_sq > 0]
    wide = not (
        (norm_bounds[1] == 0 or lo <= norm_bounds[0] <= norm_bounds[1] <= hi)
        and (positive_q.shape[0] == 0 or lo <= float(xp.min(positive_q)) <= float(xp.max(positive_q)) <= hi)
    )
    max_norm_sq = max(norm_bounds[1], 0.0)
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
    # A tile width that is not a power of two: score rows 2^k floats apart alias in the caches.
    tile = n if mb == 1 else max(1024, working_set // (4 * mb)) - 48
    tiler = _Tiler(xp, cand, Qc, metric, cdtype, tile)
    best_s = xp.full((mb, c), xp.inf, dtype=cdtype)
    best_r = xp.full((mb, c), -1, dtype=xp.int64)
    thr = xp.full(mb, xp.inf, dtype=cdtype)
    for t0 in range(0, n, tile):
        S = tiler.scores(t0, min(t0 + tile, n))
        if t0 == 0 and S.shape[1] >= c:
            # Seed the admission bound with the c-th best of a sample: an upper bound of the
            # final c-th best, so nothing that belongs in the top c is ever filtered out.
            width = min(S.shape[1], max(_SAMPLE, 8 * c))
            thr = _nan_to_inf(xp, xp.partition(S[:, :width], c - 1, axis=1)[:, c - 1])
        best_s, best_r = _merge(xp, cand, best_s, best_r, S, t0, thr, c)
        thr = _nan_to_inf(xp, xp.max(best_s, axis=1))
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
    # Exact re-scoring gathers c rows per query in float64: chunk the queries so that stays
    # within the working set for any k.
    step = max(1, working_set // (8 * c * d))
    for i0 in range(0, int(ok.shape[0]), step):
        sel = ok[i0 : i0 + step]
        r, s = _finalize(xp, cand, ids, Q64[sel], best_s[sel], best_r[sel], metric, count)
        rows_out[sel] = r
        scores_out[sel] = s
    for i in _to_list(xp, xp.nonzero(~safe)[0]):
        bound = float(kth[i] + tol[i])
        r, s = _rescan(xp, cand, ids, Qc[i : i + 1], Q64[i], metric, count, bound, cdtype)
        rows_out[i] = r
        scores_out[i] = s
    return rows_out, scores_out


def _nan_to_inf(xp: Any, a: Array) -> Array:
    return xp.where(xp.isnan(a), xp.inf, a)


def _to_list(xp: Any, a: Array) -> list[int]:
    return [int(v) for v in (a.tolist() if xp is np else a.get().tolist())]


_AUGMENT_MIN = 256  # queries per block from which a per-tile copy of X beats a pass over S


class _Tiler:
    """Computes coarse score tiles for one block of queries into a reused buffer.

    For few queries the product is followed by one pass over the scores (``+ |x|^2`` for L2,
    ``* 1/|x|`` for COSINE). For a big block, a pass over the ``(m, tile)`` scores costs more
    than preparing the ``(tile, d)`` operand, so the tile is copied once with the norm appended
    as an extra column (L2: ``[-2q, 1] . [x, |x|^2]``) or scaled by ``1/|x|`` (COSINE), and the
    product alone yields the coarse scores.
    """

    def __init__(self, xp: Any, cand: _Candidates, Qc: Array, metric: str, cdtype: Any, tile: int) -> None:
        self.xp, self.cand, self.metric, self.cdtype = xp, cand, metric, cdtype
        mb = Qc.shape[0]
        width = min(tile, cand.n)
        self.scratch = xp.empty((mb, width), dtype=cdtype)
        self.augment = mb >= _AUGMENT_MIN and metric != "dot"
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
        """Coarse scores of the block against candidates ``t0:t1`` (a view of the buffer)."""
        xp, cand = self.xp, self.cand
        Xt = cand.X[t0:t1] if cand.rows is None else cand.X[cand.rows[t0:t1]]
        S = self.scratch[:, : t1 - t0]
        if self.augment:
            Xa = self.Xa[: t1 - t0]
            if self.metric == "l2":
                Xa[:, :-1] = Xt
                Xa[:, -1] = self._norms(t0, t1)
            else:
                # A zero row scales to NaN (0 * inf) and its scores are NaN: ranked last.
                with np.errstate(invalid="ignore"):
                    xp.multiply(Xt, self._inv(t0, t1)[:, None], out=Xa)
            xp.matmul(self.Qc, Xa.T, out=S)
            return S
        if self.cdtype != xp.float32:
            Xt = Xt.astype(self.cdtype)
        if self.Qc.shape[0] == 1:
            # One query: a matrix-vector product streams X once at memory bandwidth.
            xp.matmul(Xt, self.Qc[0], out=S[0])
        else:
            xp.matmul(self.Qc, Xt.T, out=S)
        if self.metric == "l2":
            S += self._norms(t0, t1)
        elif self.metric == "cosine":
            # A zero row has 1/|x| = inf: 0 * inf = NaN marks it, and NaN ranks last.
            with np.errstate(invalid="ignore"):
                S *= self._inv(t0, t1)
        return S


def _merge(
    xp: Any, cand: _Candidates, best_s: Array, best_r: Array, S: Array, t0: int, thr: Array, c: int
) -> tuple[Array, Array]:
    """Fold a tile of coarse scores into each query's ``c`` best.

    Once the bounds are tight, most queries have no score in a tile at or below their bound:
    a row minimum (one fast reduction) finds the rows that do, and only those are compared
    element by element; the few hits are gathered through a flat index (NumPy's 2-D
    ``nonzero`` is an order of magnitude slower than ``flatnonzero``).
    """
    mb, width_tile = S.shape
    row_min = xp.min(S, axis=1)
    # A row holding a NaN (COSINE, zero vector) has a NaN minimum: compare it in full.
    live = xp.flatnonzero((row_min <= thr) | xp.isnan(row_min))
    if live.shape[0] == 0:
        return best_s, best_r
    if 2 * live.shape[0] < mb:
        sub = S[live]
        hits = xp.flatnonzero(sub <= thr[live][:, None])
        qi = live[hits // width_tile]
    else:
        sub = S
        hits = xp.flatnonzero(S <= thr[:, None])
        qi = hits // width_tile
    if hits.shape[0] == 0:
        return best_s, best_r
    col = hits % width_tile
    counts = xp.bincount(qi, minlength=mb)
    width = int(xp.max(counts))
    starts = xp.cumsum(counts) - counts
    slot = xp.arange(hits.shape[0]) - starts[qi]
    cand_s = xp.full((mb, c + width), xp.nan, dtype=S.dtype)
    cand_r = xp.full((mb, c + width), -1, dtype=xp.int64)
    cand_s[:, :c] = best_s
    cand_r[:, :c] = best_r
    cand_s[qi, c + slot] = sub.reshape(-1)[hits]
    cand_r[qi, c + slot] = cand.row_index(t0, col, xp)
    # Empty slots hold NaN and rank last; +inf placeholders in best_s rank before them.
    part = xp.argpartition(cand_s, c - 1, axis=1)[:, :c]
    return xp.take_along_axis(cand_s, part, axis=1), xp.take_along_axis(cand_r, part, axis=1)


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
    xp: Any, cand: _Candidates, ids: Array, Q64: Array, coarse: Array, rows_in: Array, metric: str, count: int
) -> tuple[Array, Array]:
    """Exact scores for the kept candidates, then order by (score, id), NaN last, and cut."""
    # A NaN coarse score means an exact NaN (COSINE, zero vector); those are ranked apart.
    valid = (rows_in >= 0) & ~xp.isnan(coarse)
    safe_rows = xp.where(valid, rows_in, 0)
    scores = exact_scores(xp, metric, cand.X[safe_rows], Q64[:, None, :])
    order = _order(xp, scores, ids[safe_rows], valid)
    rows = xp.take_along_axis(safe_rows, order, axis=1)[:, :count]
    scores = xp.take_along_axis(scores, order, axis=1)[:, :count]
    nvalid = xp.sum(valid, axis=1)
    for i in _to_list(xp, xp.nonzero(nvalid < count)[0]):
        rows[i], scores[i] = _fill_nan(xp, cand, ids, Q64[i], rows[i], int(nvalid[i]), metric, count)
    return rows, scores


def _fill_nan(
    xp: Any, cand: _Candidates, ids: Array, q: Array, rows: Array, have: int, metric: str, count: int
) -> tuple[Array, Array]:
    """Complete ``rows[have:count]`` with the rows whose score is NaN, smallest ids first.

    Only COSINE has NaN scores: every row when the query is zero, else the zero rows.
    """
    all_rows = cand.all_rows(xp)
    nan_rows = all_rows if float(xp.sum(q * q)) == 0 else all_rows[cand.norms == 0]
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
) -> tuple[Array, Array]:
    """Near-ties crowd the margin: collect every row within ``bound``, score exactly, cut."""
    found = []
    n = cand.n
    tile = min(n, 1 << 20)
    tiler = _Tiler(xp, cand, Qc1, metric, cdtype, tile)
    for t0 in range(0, n, tile):
        S = tiler.scores(t0, min(t0 + tile, n))
        found.append(cand.row_index(t0, xp.flatnonzero(S[0] <= bound), xp))
    rows = xp.concatenate(found)
    scores = exact_scores(xp, metric, cand.X[rows], q64)
    order = _order(xp, scores[None, :], ids[rows][None, :], xp.ones((1, rows.shape[0]), dtype=bool))[0]
    have = min(count, int(rows.shape[0]))
    rows = xp.concatenate([rows[order][:have], xp.zeros(count - have, dtype=xp.int64)])
    if have < count:
        return _fill_nan(xp, cand, ids, q64, rows, have, metric, count)
    return rows, exact_scores(xp, metric, cand.X[rows], q64)
