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

One writer, any number of lock-free readers: the arrays and the dict are held as one tuple that
a merge replaces with a single attribute store, so a reader always sees a matching pair of
sorted arrays and dict (under the GIL, one dict operation is atomic).
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
        # (sorted keys, their rows, the dict of changes since: _GONE marks a delete)
        self._state: tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], dict[int, int]] = (
            np.empty(0, dtype=np.uint64),
            np.empty(0, dtype=np.int64),
            {},
        )

    @property
    def _keys(self) -> npt.NDArray[np.uint64]:
        return self._state[0]

    @property
    def _delta(self) -> dict[int, int]:
        return self._state[2]

    def nbytes(self) -> int:
        """Bytes held by the sorted arrays (the dict is bounded by the merge rule)."""
        keys, rows, _ = self._state
        return int(keys.nbytes + rows.nbytes)

    def get(self, key: int) -> int | None:
        """The row of ``key``, or ``None``."""
        keys, rows, delta = self._state
        row = delta.get(key)
        if row is None:
            i = int(np.searchsorted(keys, np.uint64(key)))
            row = int(rows[i]) if i < keys.shape[0] and int(keys[i]) == key else _GONE
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
        base_keys, base_rows, delta = self._state
        rows = np.full(keys.shape[0], _GONE, dtype=np.int64)
        if base_keys.shape[0]:
            pos = np.searchsorted(base_keys, keys)
            pos_c = np.minimum(pos, base_keys.shape[0] - 1)
            hit = base_keys[pos_c] == keys
            rows[hit] = base_rows[pos_c[hit]]
        if delta:
            dkeys, drows = _dict_arrays(delta)
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

    def copy(self) -> IdIndex:
        """An independent index with the same contents (the arrays are shared: never mutated)."""
        new = IdIndex()
        keys, rows, delta = self._state
        new._state = (keys, rows, dict(delta))
        return new

    def load(self, keys: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64]) -> None:
        """Replace everything with these (unique) pairs."""
        order = np.argsort(keys, kind="stable")
        self._state = (
            np.ascontiguousarray(keys[order], dtype=np.uint64),
            np.ascontiguousarray(rows[order], dtype=np.int64),
            {},
        )

    def _maybe_merge(self) -> None:
        if len(self._state[2]) > max(_MIN_DELTA, self._state[0].shape[0] // 16):
            self._merge(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64))

    def _merge(self, keys: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64]) -> None:
        """Fold the dict and ``keys -> rows`` into the arrays; newest wins, deletes drop out."""
        base_keys, base_rows, delta = self._state
        dkeys, drows = _dict_arrays(delta) if delta else (keys[:0], rows[:0])
        all_keys = np.concatenate([base_keys, dkeys, keys])
        all_rows = np.concatenate([base_rows, drows, rows.astype(np.int64, copy=False)])
        # Stable sort keeps insertion order among equal keys; the last of each run is newest.
        order = np.argsort(all_keys, kind="stable")
        sk, sr = all_keys[order], all_rows[order]
        last = np.ones(sk.shape[0], dtype=bool)
        last[:-1] = sk[1:] != sk[:-1]
        keep = last & (sr != _GONE)
        self._state = (sk[keep], sr[keep], {})


def _dict_arrays(delta: dict[int, int]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """The dict's keys (sorted) and rows as arrays."""
    dkeys = np.fromiter(delta.keys(), dtype=np.uint64, count=len(delta))
    drows = np.fromiter(delta.values(), dtype=np.int64, count=len(delta))
    order = np.argsort(dkeys)
    return dkeys[order], drows[order]
