"""Shared fixtures: every storage or search test runs on every backend through ``make_db``.

``make_db()`` returns a fresh open database; the cells are {memory, durable} x {cpu, gpu}.
GPU cells are skipped with a reason when there is no usable GPU. ``reopen(db)`` closes a
durable database and opens it again (for a memory database it returns ``db`` unchanged).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import iqdb


def _gpu_reason() -> str | None:
    """Why this machine cannot run the GPU cells, or ``None`` when it can.

    Probed directly (CuPy importable, version 14 or later, a device that computes), never
    through iqdb: if iqdb's own GPU path is broken, the GPU cells must run and fail, not skip.
    """
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'iqdb[gpu]')"
    # A warning at CuPy's import (an error under our filterwarnings) must not turn into a skip.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _probe_cupy()


def _probe_cupy() -> str | None:
    try:
        import cupy
    except Exception as exc:
        return f"CuPy failed to import: {exc!r}"
    version = str(getattr(cupy, "__version__", "unknown"))
    major = re.match(r"\d+", version)
    if major is None or int(major.group()) < 14:
        return f"CuPy {version} is older than 14 (pip install 'iqdb[gpu]')"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return f"no CUDA device: {exc!r}"
    if count < 1:
        return "no CUDA device: the CUDA runtime reports 0 devices"
    try:
        with cupy.cuda.Device(0):
            x = cupy.zeros(4, dtype=cupy.float32)
            x += 1
            total = float(x.sum())
    except Exception as exc:
        return f"CUDA device 0 does not answer: {exc!r}"
    if total != 4.0:
        return f"CUDA device 0 does not answer: a test sum gave {total}, not 4.0"
    return None


GPU_SKIP = _gpu_reason()


# On a lent GPU the time is short (bench/bench_gpu.py gives the GPU tests a few minutes): a run of
# only the GPU tests (-m gpu) takes these files first, so that a run cut off by its timeout has
# already compared the device with the CPU.
_GPU_FIRST = (
    "test_gpu_equality.py",
    "test_vmm.py",
    "test_transfer.py",
    "test_select_k.py",
    "test_standin.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if GPU_SKIP is not None and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP))
    if config.getoption("markexpr", "") == "gpu":
        first = {name: i for i, name in enumerate(_GPU_FIRST)}
        items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: order kept within


_CELLS = [
    pytest.param(("memory", "cpu"), id="memory-cpu"),
    pytest.param(("durable", "cpu"), id="durable-cpu"),
    # The GPU orchestration (device mirror, fixed-shape driver, select-k twin) on the CPU: the
    # handle's "cuda" resolves to the CuPy-like stand-in (tests/standin.py), so CI runs the whole
    # contract suite through the GPU path, GPU or not.
    pytest.param(("memory", "standin"), id="memory-standin"),
    pytest.param(("durable", "standin"), id="durable-standin"),
    pytest.param(("memory", "cuda"), id="memory-gpu", marks=pytest.mark.gpu),
    pytest.param(("durable", "cuda"), id="durable-gpu", marks=pytest.mark.gpu),
]


@pytest.fixture(params=_CELLS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """``(storage, device)`` of the current cell (a stand-in cell reads as ``"cuda"``: a handle
    opened with any GPU device there runs on the stand-in, and ``"cpu"`` stays NumPy)."""
    storage, device = request.param
    if device == "standin":
        from standin import standin_backend

        from iqdb import _db

        cpu = _db.resolve_device
        monkeypatch.setattr(_db, "resolve_device", lambda d: cpu(d) if d == "cpu" else standin_backend())
        device = "cuda"
    return storage, device


@pytest.fixture
def make_db(backend: tuple[str, str], tmp_path: Path) -> Iterator[Callable[[], iqdb.Iqdb]]:
    """A factory of fresh, empty databases of the current cell; all are closed at teardown."""
    storage, device = backend
    opened: list[iqdb.Iqdb] = []
    counter = iter(range(1_000_000))

    def factory() -> iqdb.Iqdb:
        if storage == "memory":
            db = iqdb.open_in_memory(device=device)
        else:
            db = iqdb.open(tmp_path / f"db{next(counter)}", device=device)
        opened.append(db)
        return db

    yield factory
    for db in opened:
        db.close()


@pytest.fixture
def reopen(backend: tuple[str, str]) -> Iterator[Callable[[iqdb.Iqdb], iqdb.Iqdb]]:
    """Close and reopen a durable database (same directory); a memory database is returned as is.

    Every handle it opens is closed at teardown.
    """
    storage, device = backend
    opened: list[iqdb.Iqdb] = []

    def do(db: iqdb.Iqdb) -> iqdb.Iqdb:
        if storage == "memory":
            return db
        path = db._backend.path  # type: ignore[attr-defined]
        db.close()
        new = iqdb.open(path, device=device)
        opened.append(new)
        return new

    yield do
    for db in opened:
        db.close()
