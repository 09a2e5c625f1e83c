"""Progress reporting for long operations: one callback type, shared by every caller.

>>> import iqdb, pyarrow as pa
>>> seen = []
>>> table = pa.table({"id": [1, 2, 3], "vector": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]})
>>> with iqdb.open_in_memory() as db:
...     db.upsert_arrow(table, progress=lambda done, total: seen.append((done, total)))
3
>>> seen
[(0, 3), (3, 3)]

A long operation (today ``upsert_arrow``; compaction and opening a large snapshot are meant to
follow) takes an optional ``progress`` keyword: a callable ``progress(done, total)`` that it
calls with the units done so far and the total, or ``None`` for the total when it is not known
in advance (a stream). It calls it once with ``done = 0`` before starting and then after each
step, always from the thread that runs the operation, with ``done`` never decreasing. The
command line turns these calls into a progress bar; the library itself draws nothing.

An exception raised by the callback propagates out of the operation (so a caller can cancel
it by raising); steps finished before it stay done, as they would after any other error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from ._errors import InvalidArgument

__all__ = ["ProgressCallback", "Progress"]

ProgressCallback = Callable[[int, Optional[int]], None]  # noqa: UP045 (a runtime alias on Python 3.10)
"""``progress(done, total)``: units done so far, and the total or ``None`` when unknown."""


class Progress:
    """Feeds one operation's steps to an optional :data:`ProgressCallback`.

    Parameters
    ----------
    callback
        The caller's callable, or ``None`` (then every method does nothing).
    total
        The total number of units, or ``None`` when unknown.

    Raises
    ------
    InvalidArgument
        ``callback`` is neither ``None`` nor callable.
    """

    __slots__ = ("_callback", "done", "total")

    def __init__(self, callback: object, total: int | None = None) -> None:
        if callback is not None and not callable(callback):
            raise InvalidArgument(f"progress must be callable or None, got {type(callback).__name__}")
        self._callback: ProgressCallback | None = callback  # type: ignore[assignment]
        self.done = 0
        self.total = total

    def start(self) -> None:
        """Report ``done = 0`` (so a bar appears before the first, possibly slow, step)."""
        if self._callback is not None:
            self._callback(self.done, self.total)

    def advance(self, units: int) -> None:
        """Count ``units`` more as done and report."""
        self.done += units
        if self._callback is not None:
            self._callback(self.done, self.total)
