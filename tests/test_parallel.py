"""The CPU runner that splits a search over cores: order, concurrency, and the BLAS limit.

While tasks run, the BLAS must run on one thread (each task runs its own product), and the
original thread count must come back afterwards, whatever happens: a failing task, several
searches at once, a forked child.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from iqdb.kernels._parallel import SERIAL, Parallel, ThreadedCpu, _BlasLimit, cpu_parallel


def blas_controllers() -> list:
    return list(ThreadpoolController().select(user_api="blas").lib_controllers)


def blas_threads() -> list[int]:
    return [c.num_threads for c in blas_controllers()]


@pytest.fixture
def runner() -> ThreadedCpu:
    return ThreadedCpu(3, _BlasLimit(blas_controllers()))


def test_serial_runs_in_order_on_the_calling_thread() -> None:
    seen: list[int] = []
    assert SERIAL.map(lambda i: seen.append(threading.get_ident()) or i * 10, 4) == [0, 10, 20, 30]
    assert set(seen) == {threading.get_ident()}
    assert SERIAL.workers == 1


def test_threaded_map_returns_results_in_task_order(runner: ThreadedCpu) -> None:
    assert runner.map(lambda i: i * i, 3) == [0, 1, 4]
    assert runner.map(lambda i: i, 1) == [0]
    assert runner.map(lambda i: i, 0) == []


def test_threaded_tasks_run_at_the_same_time(runner: ThreadedCpu) -> None:
    # Three tasks that each wait for the other two: they finish only if all run concurrently.
    barrier = threading.Barrier(3, timeout=10)
    threads = runner.map(lambda i: (barrier.wait(), threading.get_ident())[1], 3)
    assert len(set(threads)) == 3
    assert threading.get_ident() in threads  # the caller runs a share itself


def test_blas_runs_on_one_thread_during_tasks_and_is_restored_after(runner: ThreadedCpu) -> None:
    if not blas_controllers():
        pytest.skip("threadpoolctl finds no BLAS whose thread count it can set here")
    before = blas_threads()
    inside = runner.map(lambda i: blas_threads(), 3)
    assert all(all(n == 1 for n in counts) for counts in inside)
    assert blas_threads() == before


def test_a_failing_task_propagates_after_every_task_ended_and_the_limit_is_lifted(
    runner: ThreadedCpu,
) -> None:
    before = blas_threads()
    finished: list[int] = []
    barrier = threading.Barrier(2, timeout=10)

    def task(i: int) -> int:
        if i == 1:
            raise KeyError("boom")
        if i == 2:
            barrier.wait()
        if i == 0:
            barrier.wait()
        finished.append(i)
        return i

    with pytest.raises(KeyError, match="boom"):
        runner.map(task, 3)
    assert sorted(finished) == [0, 2]
    assert blas_threads() == before
    assert runner.map(lambda i: i, 3) == [0, 1, 2]  # still usable


def test_concurrent_maps_share_the_limit_and_restore_the_original(runner: ThreadedCpu) -> None:
    if not blas_controllers():
        pytest.skip("threadpoolctl finds no BLAS whose thread count it can set here")
    before = blas_threads()
    errors: list[BaseException] = []

    def search() -> None:
        try:
            for _ in range(20):
                counts = runner.map(lambda i: blas_threads(), 3)
                assert all(all(n == 1 for n in c) for c in counts), counts
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=search) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert errors == []
    assert blas_threads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_working_pool(runner: ThreadedCpu) -> None:
    assert runner.map(lambda i: i, 3) == [0, 1, 2]  # the parent's pool exists before the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = runner.map(lambda i: i + 1, 3) == [1, 2, 3]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_process_runner_uses_at_most_the_available_cores_and_is_shared() -> None:
    par = cpu_parallel()
    assert par is cpu_parallel()
    assert isinstance(par, Parallel)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert 1 <= par.workers <= cores


def test_numpy_products_in_tasks_are_correct(runner: ThreadedCpu) -> None:
    """The products the tasks run with the BLAS limited are the same products."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((300, 64)).astype(np.float32)
    B = rng.standard_normal((64, 200)).astype(np.float32)
    want = A @ B
    got = runner.map(lambda i: A[i * 100 : (i + 1) * 100] @ B, 3)
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-5, atol=1e-5)


def test_when_another_thread_controls_the_blas_tasks_run_serially_and_its_limit_stands(
    runner: ThreadedCpu,
) -> None:
    from threadpoolctl import threadpool_limits

    if not any(c.internal_api == "openblas" for c in blas_controllers()):
        pytest.skip("only OpenBLAS has a controlling thread")
    holding, done = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def application() -> None:
        with threadpool_limits(limits=2, user_api="blas"):
            holding.set()
            done.wait(10)
            seen.append(blas_threads())

    app = threading.Thread(target=application)
    app.start()
    holding.wait(10)
    try:
        threads = runner.map(lambda i: threading.get_ident(), 3)
        assert set(threads) == {threading.get_ident()}  # fell back to one after another
    finally:
        done.set()
        app.join()
    assert seen == [[2] * len(seen[0])]  # the application's limit was left alone
    barrier = threading.Barrier(3, timeout=10)
    assert len(set(runner.map(lambda i: (barrier.wait(), threading.get_ident())[1], 3))) == 3
