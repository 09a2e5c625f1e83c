"""The driver's merge: per-shard top-k lists into the exact global top-k.

>>> import numpy as np
>>> from iqdb.distributed._merge import merge_topk
>>> a = (np.array([[4, 9]], np.uint64), np.array([[0.5, np.nan]]))
>>> b = (np.array([[2, 7]], np.uint64), np.array([[0.5, 0.25]]))
>>> ids, scores, _, _ = merge_topk([a, b], [None, None], k=3)
>>> ids.tolist(), scores.tolist()
([[7, 2, 4]], [[0.25, 0.5, 0.5]])

Every shard returns its own exact top-``k`` ordered by ``(score, id)``, NaN last; the scores are
the canonical float64 scores (:func:`iqdb.kernels.exact_scores`), which depend only on the record
and the query, not on which shard or device computed them. The global top-``k`` is therefore the
top-``k`` of the union of the shards' lists under the same order, and merging them reproduces a
single database's answer bit for bit, ties and NaNs included: a record beaten by ``k`` records of
its own shard is beaten by the same ``k`` records globally.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["NO_ID", "ShardRows", "merge_topk"]

NO_ID = np.uint64(2**64 - 1)  # the id that pads a short row of ``search_arrays`` (API.md)

U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
ShardRows = tuple[U64, F64]  # one shard's (m, c_s) ids and scores


def merge_topk(
    parts: Sequence[ShardRows], valid: Sequence[npt.NDArray[np.bool_] | None], k: int
) -> tuple[U64, F64, I64, I64]:
    """Merge per-shard results into the global top-``k`` of each query.

    Parameters
    ----------
    parts
        One ``(ids, scores)`` pair per shard, each ``(m, c_s)`` (``c_s`` may differ per shard and
        may be 0), rows in ``(score, id)`` order as a shard returns them.
    valid
        Per shard, an ``(m, c_s)`` mask of the entries that are results (``False`` for padding of
        a row shorter than the shard's widest), or ``None`` when every entry is one.
    k
        How many results at most per query (``k >= 1``).

    Returns
    -------
    (ids, scores, shard, position)
        ``(m, c)`` arrays with ``c = min(k, the most results any query has)``: the merged ids and
        scores, and for each entry the shard it came from and its column there (``-1`` for the
        padding of a query with fewer than ``c`` results, whose id is :data:`NO_ID` and score NaN,
        as ``search_arrays`` pads).
    """
    m = int(parts[0][0].shape[0]) if parts else 0
    widths = [int(ids.shape[1]) for ids, _ in parts]
    total = sum(widths)
    if total == 0 or m == 0:
        empty_i = np.empty((m, 0), dtype=np.int64)
        return np.empty((m, 0), dtype=np.uint64), np.empty((m, 0), dtype=np.float64), empty_i, empty_i
    ids = np.concatenate([p[0] for p in parts], axis=1).astype(np.uint64, copy=False)
    scores = np.concatenate([p[1] for p in parts], axis=1).astype(np.float64, copy=False)
    ok = np.concatenate(
        [np.ones((m, w), dtype=bool) if v is None else v for v, w in zip(valid, widths)], axis=1
    )
    shard = np.repeat(np.arange(len(parts), dtype=np.int64), widths)
    position = np.concatenate([np.arange(w, dtype=np.int64) for w in widths])
    nan = np.isnan(scores)
    c = min(k, int(ok.sum(axis=1).max()))
    if c == 0:
        empty_i = np.empty((m, 0), dtype=np.int64)
        return np.empty((m, 0), dtype=np.uint64), np.empty((m, 0), dtype=np.float64), empty_i, empty_i
    # The contract's order as two keys: the score with NaN and padding as +inf (no real score is
    # infinite: float32 inputs cannot overflow a float64 distance), then the id, with padding's
    # id NO_ID, the largest, so that padding follows every NaN result.
    key = np.where(nan | ~ok, np.inf, scores)
    rid = np.where(ok, ids, NO_ID)
    if c < total:
        # Each row's c smallest keys, in linear time, instead of sorting all S * k of them.
        part = np.argpartition(key, c - 1, axis=1)
        cols = part[:, :c]
        kth = np.take_along_axis(key, part[:, c - 1 : c], axis=1)
        # Rows where more than c entries are at or below the c-th key have ties at the cut,
        # which argpartition resolved arbitrarily: they are redone whole below (rare but for
        # NaNs and duplicate vectors).
        crowded = np.flatnonzero((key <= kth).sum(axis=1) > c)
    else:
        cols = np.broadcast_to(np.arange(total), (m, total)).copy()
        crowded = np.empty(0, dtype=np.int64)
    # Order each row's selection: one sort by key; rows holding equal keys are sorted again, by
    # id and then stably by key (as the kernels' own ordering does).
    sel_key = np.take_along_axis(key, cols, axis=1)
    order = np.argsort(sel_key, axis=1)
    ranked = np.take_along_axis(sel_key, order, axis=1)
    tied = np.flatnonzero(np.any(ranked[:, 1:] == ranked[:, :-1], axis=1))
    if tied.size:
        by_id = np.argsort(np.take_along_axis(rid[tied], cols[tied], axis=1), axis=1, kind="stable")
        again = np.argsort(np.take_along_axis(sel_key[tied], by_id, axis=1), axis=1, kind="stable")
        order[tied] = np.take_along_axis(by_id, again, axis=1)
    order = np.take_along_axis(cols, order, axis=1)  # columns into the concatenated results
    for r in crowded.tolist():
        order[r] = np.lexsort((rid[r], key[r]))[:c]
    out_ids = np.take_along_axis(ids, order, axis=1)
    out_scores = np.take_along_axis(scores, order, axis=1)
    out_ok = np.take_along_axis(ok, order, axis=1)
    out_shard = shard[order]
    out_pos = position[order]
    if not out_ok.all():
        out_ids[~out_ok] = NO_ID
        out_scores[~out_ok] = np.nan
        out_shard[~out_ok] = -1
        out_pos[~out_ok] = -1
    return out_ids, out_scores, out_shard, out_pos
