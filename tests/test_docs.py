"""The README's tour and the modules' docstring examples run as written."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tour_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    script = tmp_path / "tour.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


MODULES = [
    "iqdb",
    "iqdb._errors",
    "iqdb._payload",
    "iqdb._values",
    "iqdb._db",
    "iqdb._store",
    "iqdb._search",
    "iqdb._filters",
    "iqdb._filters._expr",
    "iqdb._filters._columns",
    "iqdb._filters._compile",
    "iqdb._index",
    "iqdb._device",
    "iqdb._backend",
    "iqdb._wal",
    "iqdb._snapshot",
    "iqdb._durable",
    "iqdb._fs",
    "iqdb.kernels",
    "iqdb.kernels._flat",
    "iqdb.kernels._fixed",
    "iqdb.kernels._tiles",
    "iqdb.kernels._selection",
    "iqdb.kernels._exact",
    "iqdb.kernels._select",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0, f"{name} has no runnable example"
    assert failed == 0


def test_demo_command_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "iqdb", "demo", "--n", "5000", "--queries", "50", "--single", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "device: cpu" in done.stdout
    assert "queries/s" in done.stdout
    assert "brute force: ok" in done.stdout


def test_info_command_reports_a_durable_database(tmp_path: Path) -> None:
    import json

    import iqdb

    with iqdb.open(tmp_path / "db") as db:
        db.upsert_many([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    done = subprocess.run(
        [sys.executable, "-m", "iqdb", "info", str(tmp_path / "db"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["count"] == 3
    assert report["dim"] == 2
    assert report["ok"] is True
    # Damage is reported with a failing exit status.
    with open(tmp_path / "db" / "snap", "r+b") as f:
        f.write(b"XXXX")
    done = subprocess.run(
        [sys.executable, "-m", "iqdb", "info", str(tmp_path / "db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4  # iqdb._cli's exit code for a corrupt database
    assert done.stderr.startswith("iqdb: Corrupt:")
    assert "Traceback" not in done.stderr
