"""docs/integrations.md's examples and the adapters' docstring examples run as written."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("langchain_core", reason="needs langchain-core: pip install 'iqdb[langchain]'")
pytest.importorskip("llama_index.core", reason="needs llama-index-core: pip install 'iqdb[llama-index]'")

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.parametrize("index", [0, 1], ids=["langchain", "llama_index"])
def test_docs_examples_run(index: int, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "integrations.md").read_text(), re.S)
    assert len(blocks) == 2
    script = tmp_path / "example.py"
    script.write_text(blocks[index])
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # the example's own "# [...]" comments state what it prints
    expected = re.findall(r"print\(.*\)\s+# (\[.*?\])", blocks[index])
    for line in expected:
        assert line in done.stdout.splitlines()


@pytest.mark.parametrize(
    "name", ["iqdb.integrations._common", "iqdb.integrations.langchain", "iqdb.integrations.llama_index"]
)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0, f"{name} has no runnable example"
    assert failed == 0
