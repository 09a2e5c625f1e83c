"""A readers-writer lock: many searches at once, one writer alone, writers first.

>>> from iqdb._lock import RWLock
>>> lock = RWLock()
>>> with lock.read():
...     pass

Reads are re-entrant in the same thread (a search predicate may call ``db.get``), even while
a writer waits; the writer that holds the lock may also read.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RWLock"]


class RWLock:
    """Readers share, a writer excludes everyone; waiting writers block new (non-nested) readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writers_waiting = 0
        self._local = threading.local()

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared."""
        me = threading.get_ident()
        depth = getattr(self._local, "depth", 0)
        if self._writer == me:
            yield
            return
        with self._cond:
            if depth == 0:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively (not re-entrant)."""
        me = threading.get_ident()
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()
