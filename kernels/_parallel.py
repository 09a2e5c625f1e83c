"""Running a search's independent pieces on several CPU cores at once.

>>> from iqdb.kernels._parallel import SERIAL
>>> SERIAL.map(lambda i: i * i, 3)
[0, 1, 4]

Why not let the BLAS thread the matrix product and do the rest in the calling thread: after
every call, OpenBLAS's worker threads spin for a while waiting for more work. A selection pass
that runs in the calling thread meanwhile shares the machine with spinning threads and measured
about 10x slower than alone (row minima over 1M x 1,000 scores: 73 ms alone, about 0.7 s
interleaved with the products, on the 2-vCPU development guest). So :class:`ThreadedCpu` limits
the BLAS to one thread and runs ``workers`` tasks on their own threads instead, each doing its
product *and* its selection: both scale with the cores and nothing spins. This is how
scikit-learn's KMeans avoids the same oversubscription, with the same library (threadpoolctl).

The limit is process-wide (BLAS libraries keep one thread count) and held only while tasks run;
concurrent searches share it through a count, and the last one out restores the original
setting, also when a task raises. A NumPy product that another thread of the application runs
at that moment runs on one thread (README, Performance). When the limit cannot be set, the
tasks run one after another instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["SERIAL", "Parallel", "ThreadedCpu", "cpu_parallel"]

T = TypeVar("T")


class Parallel:
    """Runs ``n`` independent tasks; this base class runs them one after another."""

    workers = 1

    def map(self, fn: Callable[[int], T], n: int) -> list[T]:
        """``[fn(0), ..., fn(n - 1)]``."""
        return [fn(i) for i in range(n)]


SERIAL = Parallel()


class _BlasLimit:
    """A process-wide, reference-counted "BLAS on one thread" switch.

    threadpoolctl lets one thread at a time control a process-wide OpenBLAS pool (the first to
    set it; others are silently ignored until it hands control back). The first search in sets
    the limit from its own thread, and every setting is read back: when it did not take effect
    (an application thread holds control, say inside ``threadpool_limits``), :meth:`acquire`
    says so and the caller runs its tasks one after another, each product threaded by the
    BLAS as usual. The last search out, whichever thread it runs on, takes control over from
    the first (it is still held by this switch), restores the count and hands control back.
    """

    def __init__(self, controllers: list[Any]) -> None:
        self._controllers = controllers
        self._lock = threading.Lock()
        self._active = 0
        self._saved: list[int] = []
        self._ok = False

    def _hand_back(self, force: bool) -> None:
        for c in self._controllers:
            clear = getattr(type(c), "clear_controlling_thread", None)
            if clear is not None:
                clear(force=force)

    def acquire(self) -> bool:
        """Limit the BLAS to one thread (or join a limit in force); ``False`` if that failed."""
        with self._lock:
            if self._active == 0:
                self._saved = [c.num_threads for c in self._controllers]
                try:
                    for c in self._controllers:
                        c.set_num_threads(1)
                    self._ok = all(c.num_threads == 1 for c in self._controllers)
                except BaseException:
                    # A library refused: put back the ones already limited, then fail the search.
                    self._ok = False
                    self._restore(force=False)
                    raise
                if not self._ok:
                    # Another thread controls the pool; put back whatever did change.
                    self._restore(force=False)
            self._active += 1
            return self._ok

    def release(self) -> None:
        """Leave the limit; the last one out restores the original thread count."""
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._ok:
                # Control belongs to this switch, possibly through another (search) thread.
                self._restore(force=True)

    def _restore(self, force: bool) -> None:
        self._hand_back(force=force)
        try:
            for c, n in zip(self._controllers, self._saved):
                c.set_num_threads(n)
        finally:
            self._hand_back(force=False)


class ThreadedCpu(Parallel):
    """Runs tasks on ``workers`` threads (the caller's included) with the BLAS on one thread.

    NumPy releases the GIL in matrix products and reductions, so the tasks' array work runs in
    parallel; only their Python bookkeeping takes turns.
    """

    def __init__(self, workers: int, limit: _BlasLimit) -> None:
        self.workers = workers
        self._limit = limit
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._pool_lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            # A forked child inherits the object but not its threads: start a new pool there.
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="iqdb-search")
                self._pid = os.getpid()
            return self._pool

    def map(self, fn: Callable[[int], T], n: int) -> list[T]:
        if n <= 1:
            return [fn(i) for i in range(n)]
        pool = self._executor()
        limited = self._limit.acquire()
        try:
            if not limited:
                return [fn(i) for i in range(n)]
            futures: list[Future[T]] = [pool.submit(fn, i) for i in range(1, n)]
            try:
                first = fn(0)
            finally:
                # Every task ends before the limit is lifted, even when one failed.
                wait(futures)
            return [first, *(f.result() for f in futures)]  # raises the first failure
        finally:
            self._limit.release()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_CPU: Parallel | None = None
_CPU_LOCK = threading.Lock()


def cpu_parallel() -> Parallel:
    """The process's CPU runner: as many workers as the BLAS would use threads (and cores).

    Falls back to :data:`SERIAL` when threadpoolctl is missing or finds no BLAS whose thread
    count it can set (then the BLAS threads the products itself, as before).
    """
    global _CPU
    with _CPU_LOCK:
        if _CPU is None:
            _CPU = _make_cpu_parallel()
        return _CPU


def _make_cpu_parallel() -> Parallel:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a declared dependency
        return SERIAL
    controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    if not controllers:
        return SERIAL
    workers = min(_cpu_count(), max(c.num_threads for c in controllers))
    if workers <= 1:
        return SERIAL
    return ThreadedCpu(workers, _BlasLimit(list(controllers)))
