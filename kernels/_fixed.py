"""Exact flat top-k with fixed shapes: the driver for devices where a host sync costs (GPUs).

>>> import numpy as np
>>> from iqdb.kernels._fixed import fixed_topk
>>> X = np.eye(3, dtype=np.float32)
>>> res = fixed_topk(np, X, np.ones(3), np.arange(3, dtype=np.uint64), X[2:3], 2, "l2")
>>> res.rows.tolist(), res.count
([[2, 0]], 2)

It answers exactly what :func:`~iqdb.kernels.flat_topk` answers (the same rows, order and
canonical exact scores: the tests compare them bit for bit), by another route. The adaptive
driver in ``_flat.py`` admits scores under a running bound, which on a CPU discards almost every
score with one comparison, but every admission has a data-dependent size, and on a GPU each such
size is a host sync. Here every step has a shape known in advance:

1. per tile of stored rows, the coarse float32 scores of the whole query block (one product);
2. :func:`~iqdb.kernels._select.select_k` keeps each query's ``c = k + margin`` best of the
   tile, and a second ``select_k`` over ``[kept so far | tile's best]`` keeps the ``c`` best of
   both (ties by position, so the earlier rows win, as in a scan);
3. the ``c`` candidates are re-scored exactly in float64 and ordered by (score, id) with two
   stable sorts (NaN last, by id).

The host waits on the device twice per block of queries: once for the query norms (whether the
float32 products are safe from overflow) and once, at the end, for the few queries the margin
does not settle (near-ties: re-scanned exactly, as by the adaptive driver) or that have fewer
than ``k`` non-NaN scores (COSINE with zero vectors: completed by id). Those rare queries take
the adaptive driver's per-query paths.
"""

from __future__ import annotations

from typing import Any

from ._exact import exact_ranked, fill_nan_rows, rescan_rows
from ._flat import SearchOutput, _coarse_query, flat_topk, wide_norms
from ._parallel import SERIAL, Parallel
from ._profile import CPU_PROFILE, Profile
from ._select import select_k
from ._tiles import MatVec, _Candidates, _on_host, _rows_take, _Tiler, search_candidates

__all__ = ["fixed_topk"]

Array = Any


def fixed_topk(
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
    """:func:`~iqdb.kernels.flat_topk`'s contract, arguments and answer, with fixed shapes.

    ``parallel`` is ignored (the device is the parallelism); ``norm_bounds`` may bound a superset
    of the rows (the store's bounds with ``rows=``): they decide only whether float32 is safe and
    how wide the rounding margin is. A GPU backend passes its ``profile`` (big tiles, blocks of
    1,024 queries); the default is the CPU's, like :func:`~iqdb.kernels.flat_topk`'s.
    """
    m = int(Q.shape[0])
    if working_set is None:
        working_set = profile.working_set
    cand = search_candidates(xp, X, norms_sq, metric, rows, dead, norms32, inv_norms32)
    count = min(k, cand.n_live)
    out_rows = xp.empty((m, count), dtype=xp.int64)
    out_scores = xp.empty((m, count), dtype=xp.float64)
    if count == 0 or m == 0:
        return SearchOutput(out_rows, out_scores, count)
    if norm_bounds is None:
        lo_hi = xp.stack([xp.min(xp.where(cand.norms > 0, cand.norms, xp.inf)), xp.max(cand.norms)])
        lo, hi = (float(v) for v in _on_host(lo_hi).tolist())
        norm_bounds = (lo, hi) if hi > 0 else (1.0, 0.0)
    block = -(-m // -(-m // profile.max_block))
    for q0 in range(0, m, block):
        Qb = Q[q0 : q0 + block]
        r, s = _block(xp, cand, ids, Qb, k, count, metric, norm_bounds, working_set, matvec, profile)
        if r is None:  # extreme norms: float64 coarse scores, which select_k does not take
            fb = flat_topk(
                xp, X, norms_sq, ids, Qb, k, metric, rows, dead=dead, norms32=norms32,
                inv_norms32=inv_norms32, norm_bounds=norm_bounds, working_set=working_set, profile=profile,
            )  # fmt: skip
            r, s = fb.rows, fb.scores
        out_rows[q0 : q0 + block] = r
        out_scores[q0 : q0 + block] = s
    return SearchOutput(out_rows, out_scores, count)


def _block(
    xp: Any,
    cand: _Candidates,
    ids: Array,
    Qb: Array,
    k: int,
    count: int,
    metric: str,
    norm_bounds: tuple[float, float],
    working_set: int,
    matvec: MatVec | None,
    profile: Profile,
) -> tuple[Array | None, Array | None]:
    mb, d, n = int(Qb.shape[0]), int(Qb.shape[1]), cand.n
    Q64 = Qb.astype(xp.float64)
    q_norm_sq = xp.sum(Q64 * Q64, axis=1)
    # Sync 1: the query norms' range, which decides whether float32 products are safe.
    q_range = xp.stack([xp.min(xp.where(q_norm_sq > 0, q_norm_sq, xp.inf)), xp.max(q_norm_sq)])
    q_lo, q_hi = (float(v) for v in _on_host(q_range).tolist())
    if wide_norms(norm_bounds, q_lo, q_hi):
        return None, None
    cdtype = xp.float32
    Qc, tol = _coarse_query(xp, Q64, q_norm_sq, metric, cdtype, norm_bounds[1], d, wide=False)
    c = min(n, k + profile.margin)
    # Tiles of whole 32-row words: each tile's share of the live-row bitset is whole words.
    tile = -(-max(profile.min_tile_rows, working_set // (4 * mb) // 32 * 32) // 32) * 32
    # Dead rows (deleted, or excluded by a filter) are excluded inside select_k by a bitset,
    # not written into every tile as NaN (a scattered write of every dead row per query).
    live = cand.live_bits(xp)
    tiler = _Tiler(xp, cand, Qc, metric, cdtype, min(tile, n), transposed=False, matvec=matvec)
    best_s = xp.full((mb, c), xp.nan, dtype=cdtype)
    best_r = xp.full((mb, c), -1, dtype=xp.int64)
    for t0 in range(0, n, tile):
        t1 = min(n, t0 + tile)
        S = tiler.scores(t0, t1, mask_dead=False)  # (mb, t1 - t0); NaN for COSINE zero rows
        allowed = None if live is None else live[t0 // 32 : -(-t1 // 32)]
        vals, col = select_k(xp, S, min(c, t1 - t0), allowed)  # dead rows never kept
        pos = xp.where(col >= 0, col + t0, -1)
        # The kept ones first: on equal scores the earlier rows stay, as in one scan.
        both_s = xp.concatenate([best_s, vals], axis=1)
        both_r = xp.concatenate([best_r, pos], axis=1)
        best_s, pick = select_k(xp, both_s, c)
        best_r = _rows_take(xp, both_r, pick)
    # The kept scores are sorted (NaN last): the k-th best and the worst kept are columns. The
    # margin settles the top k when the worst kept is clearly worse than the k-th, when every
    # live row was kept, or when fewer than c rows have a score (NaN past them).
    kth = best_s[:, count - 1]
    worst = best_s[:, c - 1]
    safe = (worst > kth + tol) | xp.isnan(worst) | xp.isinf(kth)
    if c >= cand.n_live:
        safe = xp.ones(mb, dtype=bool)
    valid = (best_r >= 0) & ~xp.isnan(best_s)
    x_rows = xp.where(valid, cand.row_index(0, xp.where(valid, best_r, 0), xp), -1)
    rows_out, scores_out, have = exact_ranked(
        xp, cand, ids, Q64, x_rows, metric, count, profile.finalize_bytes, fixed_shape=True
    )
    # Sync 2: which queries need more (rare).
    flags = _on_host(xp.stack([~safe, have < count]))
    if flags[1].any():  # the queries the margin settles but that lack non-NaN scores, at once
        fill_nan_rows(xp, cand, ids, Q64, rows_out, scores_out, have, (have < count) & safe, metric, count)
    if flags[0].any():  # near-ties at the k-th place: those queries are re-scanned, at once
        unsafe = xp.flatnonzero(~safe)
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
