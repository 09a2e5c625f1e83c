"""The id -> row map: sorted NumPy arrays plus a small dict of recent changes.

>>> import numpy as np
>>> from iqdb._index import IdIndex
>>> ix = IdIndex()
>>> ix.set_many(np.array([7, 3], dtype=np.uint64), np.array([0, 1]))
>>> ix.get(3), ix.get(4), ix.get_many(np.array([7, 9], dtype=np.uint64)).tolist()
(1, None, [0, -1])

A Python dict of a million ints costs ~100 bytes an entry, a fifth of a 128-d float32 row, and
bulk look-ups through it are a per-id Python call. Here the bulk of the map is two sorted
arrays (16 bytes an entry, vectorised ``searchsorted`` look-ups) and only the changes since
the last merge live in a dict. The dict is merged into the arrays once it holds more than
``max(4096, n/16)`` entries, so a merge's O(n log n) is amortised to O(16 log n) per write.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["IdIndex"]

_MIN_DELTA = 4096
_GONE = -1


class IdIndex:
    """Maps uint64 ids to int64 rows; ``-1`` / ``None`` for an absent id."""

    def __init__(self) -> None:
        self._keys: npt.NDArray[np.uint64] = np.empty(0, dtype=np.uint64)  # sorted
        self._rows: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)  # -1: deleted since merge
        self._delta: dict[int, int] = {}  # newer than the arrays; _GONE marks a delete

    def nbytes(self) -> int:
        """Bytes held by the sorted arrays (the dict is bounded by the merge rule)."""
        return int(self._keys.nbytes + self._rows.nbytes)

    def _base_get(self, key: int) -> int:
        i = int(np.searchsorted(self._keys, np.uint64(key)))
        if i < self._keys.shape[0] and int(self._keys[i]) == key:
            return int(self._rows[i])
        return _GONE

    def get(self, key: int) -> int | None:
        """The row of ``key``, or ``None``."""
        row = self._delta.get(key)
        if row is None:
            row = self._base_get(key)
        return None if row == _GONE else row

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def set(self, key: int, row: int) -> None:
        """Map ``key`` to ``row``."""
        self._delta[key] = row
        self._maybe_merge()

    def pop(self, key: int) -> int | None:
        """Remove ``key``; its row, or ``None`` if it was absent."""
        row = self.get(key)
        if row is not None:
            self._delta[key] = _GONE
            self._maybe_merge()
        return row

    def get_many(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Rows of many ids at once (``-1`` where absent), vectorised."""
        rows = np.full(keys.shape[0], _GONE, dtype=np.int64)
        if self._keys.shape[0]:
            pos = np.searchsorted(self._keys, keys)
            pos_c = np.minimum(pos, self._keys.shape[0] - 1)
            hit = self._keys[pos_c] == keys
            rows[hit] = self._rows[pos_c[hit]]
        if self._delta:
            dkeys, drows = self._delta_arrays()
            pos = np.searchsorted(dkeys, keys)
            pos_c = np.minimum(pos, dkeys.shape[0] - 1)
            hit = dkeys[pos_c] == keys
            rows[hit] = drows[pos_c[hit]]
        return rows

    def set_many(self, keys: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64]) -> None:
        """Map each of ``keys`` (unique) to the matching row."""
        if keys.shape[0] > _MIN_DELTA:
            self._merge(keys, rows)
        else:
            self._delta.update(zip(keys.tolist(), rows.tolist()))
            self._maybe_merge()

    def load(self, keys: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64]) -> None:
        """Replace everything with these (unique) pairs."""
        order = np.argsort(keys, kind="stable")
        self._keys = np.ascontiguousarray(keys[order], dtype=np.uint64)
        self._rows = np.ascontiguousarray(rows[order], dtype=np.int64)
        self._delta = {}

    def _delta_arrays(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        dkeys = np.fromiter(self._delta.keys(), dtype=np.uint64, count=len(self._delta))
        drows = np.fromiter(self._delta.values(), dtype=np.int64, count=len(self._delta))
        order = np.argsort(dkeys)
        return dkeys[order], drows[order]

    def _maybe_merge(self) -> None:
        if len(self._delta) > max(_MIN_DELTA, self._keys.shape[0] // 16):
            self._merge(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64))

    def _merge(self, keys: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64]) -> None:
        """Fold the dict and ``keys -> rows`` into the arrays; newest wins, deletes drop out."""
        dkeys, drows = self._delta_arrays() if self._delta else (keys[:0], rows[:0])
        all_keys = np.concatenate([self._keys, dkeys, keys])
        all_rows = np.concatenate([self._rows, drows, rows.astype(np.int64, copy=False)])
        # Stable sort keeps insertion order among equal keys; the last of each run is newest.
        order = np.argsort(all_keys, kind="stable")
        sk, sr = all_keys[order], all_rows[order]
        last = np.ones(sk.shape[0], dtype=bool)
        last[:-1] = sk[1:] != sk[:-1]
        keep = last & (sr != _GONE)
        self._keys, self._rows = sk[keep], sr[keep]
        self._delta = {}
