"""The answer every search must give, by a float64 brute force that shares no code with the kernels.

>>> X = np.array([[0, 0], [3, 4], [1, 0]], dtype=np.float32)
>>> ref = brute_force(X, np.array([7, 5, 6], np.uint64), np.zeros((1, 2), np.float32), 2, "l2")
>>> ref.ids.tolist(), ref.scores.tolist()
([[7, 6]], [[0.0, 1.0]])
>>> ref.check([[7, 6]], [[0.0, 1.0]], exact=True)

The distances are the contract's formulas written out in plain NumPy over the float32 data
widened to float64 (L2 ``sqrt(sum((a - q)^2))``, COSINE ``1 - a.q / sqrt(|a|^2 |q|^2)``, NaN
when that denominator is 0, DOT ``-a.q``); results are ordered by ``(score, id)``, NaN last by
id. The kernels sum their products in another order, so a real-valued score may differ in its
last bits: :meth:`Expected.check` allows each score :func:`tolerance` (a few times the worst
rounding difference of two summation orders) and lets two ids trade places only when their
reference scores differ, by no more than that. Small-integer data is summed exactly in any
order, so ``exact=True`` demands the very ids and the very bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Arr = np.ndarray[Any, Any]
_U = 2.0**-53  # unit roundoff of float64


def distances(X: Arr, q: Arr, metric: str) -> Arr:
    """Float64 distances from each float32 row of ``X`` (``(n, d)``) to ``q`` (``(d,)``)."""
    return score_matrix(X, np.asarray(q)[None], metric)[0]


def score_matrix(X: Arr, Q: Arr, metric: str) -> Arr:
    """Float64 distances from each float32 query of ``Q`` (``(m, d)``) to each row of ``X``,
    ``(m, n)``: the formulas in plain NumPy, each sum taken one coordinate after another (no
    BLAS, whose blocking may round two identical rows differently)."""
    if metric not in ("l2", "cosine", "dot"):
        raise ValueError(metric)
    cols = np.asarray(X, dtype=np.float32).astype(np.float64).T.copy()  # (d, n): a row per coordinate
    V = np.asarray(Q, dtype=np.float32).astype(np.float64)
    out = np.empty((len(V), cols.shape[1]))
    norms_sq = _sum_of_products(cols, cols)
    for i, v in enumerate(V):
        if metric == "l2":
            diff = cols - v[:, None]
            out[i] = np.sqrt(_sum_of_products(diff, diff))
            continue
        dot = _sum_of_products(cols, v[:, None])
        if metric == "dot":
            out[i] = -dot
            continue
        denom = norms_sq * _sum_of_products(v[:, None], v[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            out[i] = np.where(denom == 0, np.nan, 1.0 - dot / np.sqrt(denom))
    return out


def _sum_of_products(a: Arr, b: Arr) -> Arr:
    """``sum_j a[j] * b[j]`` over the first axis, left to right."""
    acc = np.zeros(np.broadcast_shapes(a.shape, b.shape)[1:])
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


def tolerance(X: Arr, q: Arr, metric: str, scores: Arr) -> Arr:
    """How far another summation order may move each score: ``8 (d + 4) u`` times the size the
    rounding is relative to (the L2 score itself, ``|a| |q|`` for DOT, 1 for COSINE), at least
    twice the worst-case difference of two float64 evaluations of the same formula."""
    d = int(np.asarray(X).shape[1])
    if metric == "l2":
        scale = scores
    elif metric == "dot":
        A = np.asarray(X, dtype=np.float32).astype(np.float64)
        v = np.asarray(q, dtype=np.float32).astype(np.float64)
        scale = np.sqrt(np.sum(A * A, axis=1) * np.sum(v * v))
    else:
        scale = np.ones(len(scores))
    return 8 * (d + 4) * _U * scale


def ranking(scores: Arr, ids: Arr) -> Arr:
    """Positions ordered by ``(score, id)`` ascending, NaN scores last (by id among themselves)."""
    nan = np.isnan(scores)
    return np.lexsort((ids, np.where(nan, 0.0, scores), nan))


@dataclass(frozen=True)
class Expected:
    """The brute force's answer: ``ids[i]`` and ``scores[i]`` are query ``i``'s top ``count``
    (``at[i]``: their positions among the candidates)."""

    X: Arr  # the candidate rows
    cand_ids: Arr
    Q: Arr
    metric: str
    ids: Arr  # (m, count) uint64
    scores: Arr  # (m, count) float64
    at: Arr  # (m, count) int64

    def check(self, got_ids: Any, got_scores: Any, *, exact: bool = False) -> None:
        """Assert that a search returned this answer.

        With ``exact``, ids and score bits must be equal. Otherwise each returned score must be
        its record's reference distance within :func:`tolerance`, the results must be ordered by
        ``(score, id)`` with NaN last, and at each place the id must be the reference's, or one
        whose reference score differs from it, by no more than the tolerance (a near-tie that
        float64 rounding cannot settle; an exact tie must still go to the smaller id).
        """
        m, count = self.ids.shape
        got_ids = np.asarray(got_ids, dtype=np.uint64).reshape(m, -1)
        got_scores = np.asarray(got_scores, dtype=np.float64).reshape(m, -1)
        assert got_ids.shape == (m, count), (got_ids.shape, (m, count))
        if exact:
            np.testing.assert_array_equal(got_ids, self.ids)
            np.testing.assert_array_equal(got_scores.view(np.uint64), self.scores.view(np.uint64))
            return
        by_id = np.argsort(self.cand_ids, kind="stable")
        sorted_ids = self.cand_ids[by_id]
        for i in range(m):
            gid, gs = got_ids[i], got_scores[i]
            assert len(set(gid.tolist())) == count, f"query {i}: an id appears twice: {gid.tolist()}"
            j = np.minimum(np.searchsorted(sorted_ids, gid), len(sorted_ids) - 1)
            assert np.array_equal(sorted_ids[j], gid), f"query {i}: ids outside the candidates"
            at = by_id[j]
            s = distances(self.X[at], self.Q[i], self.metric)
            tol = tolerance(self.X[at], self.Q[i], self.metric, s)
            nan = np.isnan(s)
            bad = (nan != np.isnan(gs)) | (~nan & ~(np.abs(gs - s) <= tol))
            assert not bad.any(), f"query {i}: scores {gs[bad]} of ids {gid[bad]}, want {s[bad]}"
            gnan = np.isnan(gs)
            key = list(zip(gnan.tolist(), np.where(gnan, 0.0, gs).tolist(), gid.tolist()))
            assert key == sorted(key), f"query {i}: not ordered by (score, id), NaN last"
            want = self.scores[i]
            want_tol = tolerance(self.X[self.at[i]], self.Q[i], self.metric, want)
            near = (s != want) & (np.abs(s - want) <= np.maximum(tol, want_tol))
            wrong = (gid != self.ids[i]) & ~near
            assert not wrong.any(), (
                f"query {i}: ids {gid[wrong].tolist()} (scores {s[wrong].tolist()}) where the reference "
                f"has {self.ids[i][wrong].tolist()} (scores {want[wrong].tolist()})"
            )


def brute_force(X: Arr, ids: Arr, Q: Arr, k: int, metric: str, rows: Arr | None = None) -> Expected:
    """The top ``k`` of every query in ``Q`` over the rows of ``X`` (only ``rows``, if given)."""
    X = np.asarray(X, dtype=np.float32)
    cand_ids = np.asarray(ids, dtype=np.uint64)
    if rows is not None:
        X, cand_ids = X[rows], cand_ids[rows]
    Q = np.asarray(Q, dtype=np.float32).reshape(-1, X.shape[1])
    n, count = len(cand_ids), min(k, len(cand_ids))
    at = np.empty((len(Q), count), dtype=np.int64)
    if count:
        S = score_matrix(X, Q, metric)
        # Only the rows scoring at most the count-th smallest score (NaN sorts last) can rank
        # among the first count: order just those.
        kth = np.partition(S, count - 1, axis=1)[:, count - 1] if count < n else np.full(len(Q), np.nan)
        for i, (s, v) in enumerate(zip(S, kth)):
            few = np.arange(n) if np.isnan(v) else np.flatnonzero(s <= v)
            at[i] = few[ranking(s[few], cand_ids[few])][:count]
    else:
        S = np.empty((len(Q), 0))
    scores = np.take_along_axis(S, at, axis=1)
    return Expected(X, cand_ids, Q, metric, cand_ids[at], scores, at)
