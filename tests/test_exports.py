"""The public surface: ``iqdb.__all__``, the contract's import line, and a CuPy-free import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import iqdb

# API.md's import line, name for name.
CONTRACT_NAMES = [
    "Iqdb",
    "Record",
    "RecordId",
    "Vector",
    "Payload",
    "PayloadValue",
    "DistanceMetric",
    "SearchResult",
    "IqdbError",
    "InvalidVector",
    "DimensionMismatch",
    "InvalidConfig",
    "InvalidArgument",
    "Corrupt",
    "StorageError",
    "Closed",
    "Locked",
    "DeviceUnavailable",
]


def test_all_is_exactly_the_curated_sorted_list() -> None:
    assert iqdb.__all__ == [
        "AsyncIqdb",
        "Closed",
        "Corrupt",
        "DeviceUnavailable",
        "DimensionMismatch",
        "DistanceMetric",
        "Field",
        "Filter",
        "InvalidArgument",
        "InvalidConfig",
        "InvalidVector",
        "Iqdb",
        "IqdbError",
        "Locked",
        "NO_ID",
        "Payload",
        "PayloadValue",
        "Poisoned",
        "Record",
        "RecordId",
        "SearchResult",
        "StorageError",
        "Vector",
        "__version__",
        "open",
        "open_in_memory",
        "results_to_arrow",
    ]
    assert iqdb.__all__ == sorted(iqdb.__all__)


def test_every_name_in_all_exists() -> None:
    missing = [name for name in iqdb.__all__ if not hasattr(iqdb, name)]
    assert missing == []


def test_the_contract_import_line_works() -> None:
    namespace: dict[str, object] = {}
    exec("from iqdb import " + ", ".join(CONTRACT_NAMES), namespace)
    for name in CONTRACT_NAMES:
        assert namespace[name] is getattr(iqdb, name)
    assert set(CONTRACT_NAMES) <= set(iqdb.__all__)


def test_module_level_open_spellings_exist() -> None:
    assert callable(iqdb.open)
    assert callable(iqdb.open_in_memory)
    db = iqdb.open_in_memory()
    try:
        assert isinstance(db, iqdb.Iqdb)
    finally:
        db.close()


def test_version_matches_the_package_metadata() -> None:
    from importlib.metadata import version

    assert iqdb.__version__ == version("iqdb")


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_import_iqdb_does_not_import_cupy() -> None:
    proc = _run_python(
        """
        import sys
        import iqdb
        loaded = sorted(m for m in sys.modules if m == "cupy" or m.startswith("cupy."))
        print("LOADED", loaded)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


def test_cpu_search_does_not_import_cupy() -> None:
    # GPU costs nothing until used: a whole CPU session stays CuPy-free, not just the import.
    proc = _run_python(
        """
        import sys
        import iqdb
        with iqdb.open_in_memory(device="cpu") as db:
            db.upsert_many([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
            assert len(db.search([1.0, 0.0], 2)) == 2
            assert len(db.search_batch([[1.0, 0.0], [0.0, 1.0]], 2, "l2")) == 2
        loaded = sorted(m for m in sys.modules if m == "cupy" or m.startswith("cupy."))
        print("LOADED", loaded)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout
