"""Device choice: spellings, ``IQDB_DEVICE``, the auto probe and its one log line, CuPy kept away.

The GPU side runs against a planted stand-in ``cupy`` package (written to a temporary directory
and put first on the import path), so these tests behave the same on machines with and without
a GPU. The stand-in appends to a marker file when it is imported, which is how the subprocess
tests tell "never imported" from "imported".
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import iqdb
from iqdb import DeviceUnavailable, InvalidConfig, _device
from iqdb.kernels import ArrayBackend, _backend, gpu_backend

FAKE_CUPY = '''\
"""A stand-in for CuPy planted by tests/test_device.py; configured by FAKE_CUPY_* variables."""
import os

import numpy as np

if os.environ.get("FAKE_CUPY_MARKER"):
    with open(os.environ["FAKE_CUPY_MARKER"], "a") as _f:
        _f.write("imported\\n")
if os.environ.get("FAKE_CUPY_IMPORT_ERROR"):
    raise ImportError("libcudart.so.12: cannot open shared object file: No such file or directory")

__version__ = os.environ.get("FAKE_CUPY_VERSION", "14.0.0")
_DEVICES = int(os.environ.get("FAKE_CUPY_DEVICES", "0"))
_BROKEN = os.environ.get("FAKE_CUPY_BROKEN") == "1"
float32 = np.float32
current = []  # the device indices entered, innermost last
asarray_devices = []  # the current device at each asarray call


class _Runtime:
    @staticmethod
    def getDeviceCount():
        if _DEVICES == 0:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return _DEVICES


class _Device:
    def __init__(self, index=0):
        self.id = index

    def __enter__(self):
        current.append(self.id)
        return self

    def __exit__(self, *exc):
        current.pop()


class cuda:
    runtime = _Runtime
    Device = _Device


def zeros(shape, dtype=float):
    if _BROKEN:
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    return np.zeros(shape, dtype)


def asarray(a):
    asarray_devices.append(current[-1] if current else None)
    return np.asarray(a)
'''

# cupy._core._routines_linalg: the process-wide compute type of products, by dtype.
FAKE_LINALG = """\
import numpy as np

COMPUTE_TYPE_DEFAULT = 1
compute_types = {}


def set_compute_type(dtype, kind):
    compute_types[np.dtype(dtype).name] = kind
"""

HINT = 'pip install "iqdb[gpu]"'


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no cached probe, no auto log line yet, and none of our variables set."""
    for name in ("IQDB_DEVICE", "CUPY_TF32"):
        monkeypatch.delenv(name, raising=False)
    _device._reset_probe()
    yield
    _device._reset_probe()


@pytest.fixture
def fake_dir(tmp_path: Path) -> Path:
    """A directory holding the stand-in ``cupy`` package."""
    root = tmp_path / "fake"
    (root / "cupy").mkdir(parents=True)
    (root / "cupy" / "__init__.py").write_text(FAKE_CUPY)
    (root / "cupy" / "_core").mkdir()
    (root / "cupy" / "_core" / "__init__.py").write_text("")
    (root / "cupy" / "_core" / "_routines_linalg.py").write_text(FAKE_LINALG)
    return root


def plant(monkeypatch: pytest.MonkeyPatch, fake_dir: Path, **config: object) -> None:
    """Make ``import cupy`` in this process load the stand-in, configured by ``config``.

    Whatever ``cupy`` was in ``sys.modules`` before (the real one on a GPU machine) comes back
    at teardown.
    """
    for key, value in config.items():
        monkeypatch.setenv(f"FAKE_CUPY_{key.upper()}", str(value))
    for name in ("cupy", "cupy._core", "cupy._core._routines_linalg"):
        monkeypatch.setitem(sys.modules, name, None)  # remembers the original for teardown
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fake_dir))


def fake_module() -> ModuleType:
    module = sys.modules["cupy"]
    assert module.__file__ is not None and "fake" in module.__file__
    return module


def device_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "iqdb" and "device='auto'" in r.getMessage()]


# --- subprocesses with the stand-in on PYTHONPATH ----------------------------------------------------


def run_with_fake(fake_dir: Path, tmp_path: Path, code: str, **config: str) -> tuple[str, bool]:
    """Run ``code`` in a fresh interpreter that would import the stand-in as ``cupy``.

    Returns its stdout and whether the stand-in was imported.
    """
    marker = tmp_path / "cupy-imported"
    env = {k: v for k, v in os.environ.items() if k not in ("IQDB_DEVICE", "CUPY_TF32")}
    env = {k: v for k, v in env.items() if not k.startswith("FAKE_CUPY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake_dir), env.get("PYTHONPATH", "")) if p)
    env["FAKE_CUPY_MARKER"] = str(marker)
    env.update({f"FAKE_CUPY_{k.upper()}": v for k, v in config.items()})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, marker.exists()


def test_the_planted_fake_is_what_import_cupy_finds(fake_dir: Path, tmp_path: Path) -> None:
    # Without this, "never imported" below could pass because the plant does not work.
    out, imported = run_with_fake(fake_dir, tmp_path, "import cupy; print(cupy.__file__)")
    assert imported
    assert str(fake_dir) in out


def test_a_cpu_session_never_imports_cupy(fake_dir: Path, tmp_path: Path) -> None:
    code = """
        import sys
        import iqdb
        with iqdb.open_in_memory(device="cpu") as db:
            db.upsert_many([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [{"a": 1}, None, {}])
            db.upsert(iqdb.Record(4, [0.5, 0.5]))
            assert int(db.search([1.0, 0.0], 2)[0].id) == 1
            assert len(db.search_batch([[1.0, 0.0], [0.0, 1.0]], 2, "l2")) == 2
            ids, _ = db.search_arrays([[0.0, 1.0]], 1, "dot")
            assert db.device == "cpu"
        with iqdb.open("durable", device=" CPU ") as db:
            db.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]])
            assert int(db.search([0.0, 1.0], 1)[0].id) == 2
        print("LOADED", sorted(m for m in sys.modules if m == "cupy" or m.startswith("cupy.")))
        """
    out, imported = run_with_fake(fake_dir, tmp_path, code, devices="1")
    assert "LOADED []" in out
    assert not imported


def test_auto_tries_cupy_falls_back_to_the_cpu_and_logs_the_reason_once(
    fake_dir: Path, tmp_path: Path
) -> None:
    code = """
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOG|%(name)s|%(levelname)s|%(message)s")
        import iqdb
        for _ in range(3):
            with iqdb.open_in_memory(device="auto") as db:
                db.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]])
                assert int(db.search([1.0, 0.0], 1)[0].id) == 1
                print("DEVICE", db.device)
        """
    out, imported = run_with_fake(fake_dir, tmp_path, code, devices="0")
    assert imported
    assert out.count("DEVICE cpu") == 3
    logged = [line for line in out.splitlines() if line.startswith("LOG|iqdb|") and "auto" in line]
    assert len(logged) == 1, out
    assert "WARNING" in logged[0]
    assert "no CUDA device" in logged[0]
    assert "cudaErrorNoDevice" in logged[0]


def test_gpu_with_a_cupy_that_has_no_device_raises_with_the_install_hint(
    fake_dir: Path, tmp_path: Path
) -> None:
    code = """
        import iqdb
        try:
            iqdb.open_in_memory(device="gpu")
        except iqdb.DeviceUnavailable as exc:
            print("RAISED", exc)
        else:
            print("OPENED")
        """
    out, imported = run_with_fake(fake_dir, tmp_path, code, devices="0")
    assert imported
    assert "RAISED" in out
    assert HINT in out
    assert "no CUDA device" in out


# --- in process, with the stand-in planted on sys.path ----------------------------------------------


def test_cupy_13_is_refused_naming_the_version_needed(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The stand-in has a working device: only the version check stands between it and "cuda:0".
    plant(monkeypatch, fake_dir, version="13.3.0", devices=1)
    with pytest.raises(DeviceUnavailable, match=r"CuPy 13\.3\.0") as info:
        _device.resolve_device("gpu")
    assert "CuPy 14" in str(info.value)
    assert HINT in str(info.value)
    caplog.set_level(logging.INFO, logger="iqdb")
    assert _device.resolve_device("auto").name == "cpu"
    [record] = device_records(caplog)
    assert record.levelno == logging.WARNING
    assert "14" in record.getMessage()


def test_cupy_14_with_a_device_that_answers_is_chosen_by_auto_and_logged(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plant(monkeypatch, fake_dir, version="14.2.0", devices=1)
    caplog.set_level(logging.INFO, logger="iqdb")
    backend = _device.resolve_device("auto")
    assert backend.name == "cuda:0"
    assert backend.device_index == 0
    assert backend.xp is fake_module()
    assert backend.matvec is None
    assert _device.resolve_device(" Auto ").name == "cuda:0"
    [record] = device_records(caplog)
    assert record.levelno == logging.INFO
    assert "cuda:0" in record.getMessage()


@pytest.mark.parametrize(("spelling", "index"), [("gpu", 0), ("CUDA", 0), ("cuda:0", 0), (" cuda:1 ", 1)])
def test_explicit_gpu_spellings_pick_their_device(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, spelling: str, index: int
) -> None:
    plant(monkeypatch, fake_dir, devices=2)
    backend = _device.resolve_device(spelling)
    assert (backend.name, backend.device_index) == (f"cuda:{index}", index)


def test_a_device_index_out_of_range_raises(fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plant(monkeypatch, fake_dir, devices=2)
    with pytest.raises(DeviceUnavailable, match="out of range") as info:
        _device.resolve_device("cuda:2")
    assert "2 CUDA device" in str(info.value)
    assert HINT in str(info.value)


def test_a_listed_device_that_fails_to_compute_is_unusable(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plant(monkeypatch, fake_dir, devices=1, broken=1)
    with pytest.raises(DeviceUnavailable, match="does not answer") as info:
        _device.resolve_device("cuda")
    assert isinstance(info.value.__cause__, RuntimeError)
    caplog.set_level(logging.INFO, logger="iqdb")
    assert _device.resolve_device("auto").name == "cpu"
    [record] = device_records(caplog)
    assert "cudaErrorInsufficientDriver" in record.getMessage()


def test_a_cupy_that_fails_to_import_is_a_reason_not_a_crash(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plant(monkeypatch, fake_dir, import_error=1)
    caplog.set_level(logging.INFO, logger="iqdb")
    assert _device.resolve_device("auto").name == "cpu"
    [record] = device_records(caplog)
    assert record.levelno == logging.WARNING
    assert "CuPy failed to import" in record.getMessage()
    with pytest.raises(DeviceUnavailable, match="libcudart"):
        _device.resolve_device("gpu")


def test_the_gpu_backend_allocates_under_its_own_device(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant(monkeypatch, fake_dir, devices=2)
    backend = gpu_backend(1)
    arr = backend.asarray(np.ones(3, dtype=np.float32))
    assert fake_module().asarray_devices == [1]
    assert backend.to_host(arr) is arr  # the stand-in's arrays are NumPy's
    # It searches with the GPU's tuning (big tiles), the CPU backend with the CPU's.
    assert backend.profile is iqdb.kernels.GPU_PROFILE
    assert iqdb.kernels.cpu_backend().profile is iqdb.kernels.CPU_PROFILE


def test_cupy_tf32_in_the_environment_is_overridden_and_warned_about_once(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plant(monkeypatch, fake_dir, devices=1)
    _backend._warn_tf32.cache_clear()
    monkeypatch.setenv("CUPY_TF32", "1")
    caplog.set_level(logging.INFO, logger="iqdb")
    gpu_backend(0)
    # Full float32 for float32 products (CuPy's default compute type), set before any product.
    assert sys.modules["cupy._core._routines_linalg"].compute_types == {"float32": 1}
    gpu_backend(0)
    warned = [r for r in caplog.records if "CUPY_TF32" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].levelno == logging.WARNING
    monkeypatch.setenv("CUPY_TF32", "0")
    gpu_backend(0)
    assert len([r for r in caplog.records if "CUPY_TF32" in r.getMessage()]) == 1
    _backend._warn_tf32.cache_clear()


# --- IQDB_DEVICE --------------------------------------------------------------------------------------


def test_iqdb_device_cpu_replaces_auto_without_touching_cupy(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant(monkeypatch, fake_dir, devices=1)
    monkeypatch.setenv("IQDB_DEVICE", "CPU")
    with iqdb.open_in_memory() as db:
        assert db.device == "cpu"
    assert "cupy" not in sys.modules


def test_iqdb_device_bogus_raises_invalid_config_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IQDB_DEVICE", "tpu")
    with pytest.raises(InvalidConfig, match="IQDB_DEVICE") as info:
        iqdb.open_in_memory()
    assert "'tpu'" in str(info.value)


def test_iqdb_device_gpu_without_a_usable_gpu_raises(fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plant(monkeypatch, fake_dir, devices=0)
    monkeypatch.setenv("IQDB_DEVICE", "gpu")
    with pytest.raises(DeviceUnavailable, match="IQDB_DEVICE") as info:
        iqdb.open_in_memory(device="auto")
    assert HINT in str(info.value)


def test_iqdb_device_picks_an_index(fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plant(monkeypatch, fake_dir, devices=2)
    monkeypatch.setenv("IQDB_DEVICE", " Cuda:1 ")
    assert _device.resolve_device("auto").name == "cuda:1"


def test_an_explicit_device_wins_over_iqdb_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IQDB_DEVICE", "gpu")
    with iqdb.open_in_memory(device="cpu") as db:
        assert db.device == "cpu"
    monkeypatch.setenv("IQDB_DEVICE", "bogus")
    with iqdb.open_in_memory(device="cpu") as db:
        assert db.device == "cpu"
    with pytest.raises(InvalidConfig, match="unknown device 'tpu'"):
        iqdb.open_in_memory(device="tpu")


def test_an_empty_iqdb_device_means_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # CuPy absent, whatever this machine has
    monkeypatch.setenv("IQDB_DEVICE", "  ")
    assert _device.resolve_device("auto").name == "cpu"


# --- the log line, and db.device ---------------------------------------------------------------------


def test_auto_logs_its_choice_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now fails as if not installed
    caplog.set_level(logging.INFO, logger="iqdb")
    with iqdb.open_in_memory(device="auto") as a, iqdb.open_in_memory() as b:
        assert (a.device, b.device) == ("cpu", "cpu")
    [record] = device_records(caplog)
    assert record.levelno == logging.INFO  # no CuPy: the user never asked for a GPU
    assert "CuPy is not installed" in record.getMessage()
    _device._reset_probe()
    with iqdb.open_in_memory():
        pass
    assert len(device_records(caplog)) == 2  # the reset really is what kept it to one


def test_db_device_is_cpu_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    with iqdb.open_in_memory(device="cpu") as db:
        assert db.device == "cpu"
    monkeypatch.setitem(sys.modules, "cupy", None)
    with iqdb.open_in_memory(device="auto") as db:
        assert db.device == "cpu"


def test_array_backend_stays_positional_compatible() -> None:
    backend = ArrayBackend("cpu", np)
    assert backend.device_index is None
    assert backend.profile is iqdb.kernels.CPU_PROFILE
    assert backend.asarray(np.zeros(2)).dtype == np.float64


def test_gpu_score_tiles_grow_with_free_device_memory() -> None:
    """On a GPU a search's tiles may take an eighth of the free device memory (at most 1 GiB,
    never less than the working set), read on the backend's own device; the CPU keeps the
    working set."""
    import contextlib
    import types

    entered: list[int] = []

    @contextlib.contextmanager
    def device(index: int) -> Iterator[None]:
        entered.append(index)
        yield

    free = [0]
    runtime = types.SimpleNamespace(memGetInfo=lambda: (free[0], 80 << 30))
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, Device=device))
    be = ArrayBackend("cuda:1", fake, device_index=1, fixed_shape=True, profile=iqdb.kernels.GPU_PROFILE)
    for free[0], want in ((40 << 30, 1 << 30), (800 << 20, 100 << 20), (8 << 20, 16 << 20)):
        assert be.tile_bytes(16 << 20) == want
    assert entered == [1, 1, 1]
    assert iqdb.kernels.cpu_backend().tile_bytes(16 << 20) == 16 << 20
    # A device backend with the CPU's profile (the field's default) keeps the working set, and
    # never asks the device.
    assert ArrayBackend("cuda:1", fake, device_index=1).tile_bytes(16 << 20) == 16 << 20
    assert entered == [1, 1, 1]
