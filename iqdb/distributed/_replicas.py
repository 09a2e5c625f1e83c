"""Read replicas: extra read-only copies of each shard that share its search load.

>>> from iqdb.distributed._replicas import Replicas
>>> Replicas([[], []]).stale(0)
False

A replica is a :class:`~iqdb.distributed._shard.ShardServer` that opened its shard's directory
``readonly=True`` (same machine, or shared storage). A read-only view is fixed when it is opened,
so a replica is *fresh* only while no write has reached its shard since it last (re)opened: the
client counts the writes it has seen acknowledged per shard, asks a shard's replicas to reopen
after each write, and sends a search to a replica only once that reopen has finished. A search
therefore sees every write acknowledged before it started, exactly as on the primary. Until then
(and whenever a replica fails) the primary answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from ._shard import Pending, Shard, ShardUnavailable

__all__ = ["Replicas"]


class _Fallback:
    """A read sent to a replica; if the replica is lost, the same read goes to the primary."""

    def __init__(self, first: Pending, again: Callable[[], Pending], lost: Callable[[], None]) -> None:
        self.first = first
        self.again = again
        self.lost = lost

    def result(self, deadline: float | None) -> Any:
        try:
            return self.first.result(deadline)
        except ShardUnavailable:
            self.lost()
            return self.again().result(deadline)

    def done(self) -> bool:
        return self.first.done()


class Replicas:
    """Each shard's replicas and which of them may answer now.

    Parameters
    ----------
    copies
        ``copies[s]``: the replicas of shard ``s`` (any number, the same for every shard).
    """

    def __init__(self, copies: list[list[Shard]]) -> None:
        self.copies = copies
        self._lock = threading.Lock()
        self._writes = [0] * len(copies)  # writes acknowledged (or failed) per shard
        # Per replica: the reopen in flight (or None), and the write count its view includes
        # (-1: failed, not to be used until the next reopen).
        self._state: list[list[tuple[Pending | None, int]]] = [[(None, 0)] * len(c) for c in copies]
        self._turn = 0

    def all(self) -> list[Shard]:
        return [r for copies in self.copies for r in copies]

    def stale(self, shard: int) -> bool:
        """Whether some replica of ``shard`` cannot answer now (tests, health checks)."""
        with self._lock:
            return any(not self._fresh(shard, r) for r in range(len(self.copies[shard])))

    def _fresh(self, shard: int, r: int) -> bool:
        pending, seen = self._state[shard][r]
        if pending is not None and pending.done():
            try:
                pending.result(None)
            except Exception:
                seen = -1
            self._state[shard][r] = pending, seen = (None, seen)
        return pending is None and seen == self._writes[shard]

    def submit(self, shard: int, primary: Shard, method: str, group: str, *args: Any) -> Pending:
        """Send a read to the primary or a fresh replica, taking turns."""
        with self._lock:
            fresh = [r for r in range(len(self.copies[shard])) if self._fresh(shard, r)]
            self._turn += 1
            pick = self._turn % (len(fresh) + 1)
        if pick == len(fresh):
            return primary.submit(method, group, *args, retry=True)
        r = fresh[pick]

        def lost() -> None:
            with self._lock:
                self._state[shard][r] = (None, -1)

        return _Fallback(
            self.copies[shard][r].submit(method, group, *args, retry=False),
            lambda: primary.submit(method, group, *args, retry=True),
            lost,
        )

    def wrote(self, shards: Iterable[int]) -> None:
        """A write to ``shards`` returned or failed (it may have been applied either way): their
        replicas are stale until they have reopened, which starts now."""
        with self._lock:
            for s in shards:
                self._writes[s] += 1
                seen = self._writes[s]
                for r, copy in enumerate(self.copies[s]):
                    self._state[s][r] = (copy.submit("reopen", "write", seen, retry=False), seen)
