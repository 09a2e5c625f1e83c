"""The README's tour and the modules' docstring examples run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
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


def _modules() -> list[str]:
    """Every module of iqdb, kernels included (an editable install maps ``iqdb.kernels`` to
    ``kernels/``, which ``walk_packages`` does not follow), but ``__main__``."""
    import iqdb
    import iqdb.kernels

    found = ["iqdb", "iqdb.kernels"]
    found += [m.name for m in pkgutil.walk_packages(iqdb.__path__, "iqdb.", onerror=lambda name: None)]
    found += [m.name for m in pkgutil.iter_modules(iqdb.kernels.__path__, "iqdb.kernels.")]
    return sorted({name for name in found if not name.endswith("__main__")})


MODULES = _modules()

# Modules whose common case cannot run as a doctest, with where it is run instead.
NO_EXAMPLE = {
    "iqdb._cli": "a command line (tests/test_cli.py runs each command)",
    "iqdb.distributed._batch": "needs a Ray cluster (ci/ray.sh runs it)",
    "iqdb.integrations": "its examples import the frameworks (ci/integrations.sh runs the adapters)",
}

# Optional dependencies: a module that needs one is skipped where it is missing (CI's
# integrations and Ray runs have them).
OPTIONAL = {"iqdb.integrations.langchain": "langchain_core", "iqdb.integrations.llama_index": "llama_index"}


def test_every_module_is_checked() -> None:
    assert "iqdb.kernels._vmm" in MODULES and "iqdb._store" in MODULES and len(MODULES) > 40


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failed == 0
    if name in NO_EXAMPLE:
        assert attempted == 0, f"{name} has a runnable example now: take it off NO_EXAMPLE"
    else:
        assert attempted > 0, f"{name} has no runnable example"


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
