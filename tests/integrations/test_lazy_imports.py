"""``import iqdb`` (and ``import iqdb.integrations``) never imports LangChain or LlamaIndex; an
adapter without its framework fails naming the extra to install.

Runs in every environment: with the frameworks installed (ci/integrations.sh) the first test
shows they stay unloaded; without them, the second still checks the error.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

FRAMEWORKS = ("langchain_core", "langchain", "llama_index")


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_iqdb_does_not_import_the_frameworks() -> None:
    proc = _run_python(
        f"""
        import sys
        import iqdb
        import iqdb.integrations
        with iqdb.open_in_memory(device="cpu") as db:
            db.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]], [{{"k": 1}}, None])
            db.search([1.0, 0.0], 2)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})
        print("LOADED", loaded)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [("langchain", "langchain_core", "iqdb[langchain]"), ("llama_index", "llama_index", "iqdb[llama-index]")],
)
def test_an_adapter_without_its_framework_names_the_extra(module: str, framework: str, extra: str) -> None:
    # sys.modules[name] = None makes ``import name`` fail, as if it were not installed.
    proc = _run_python(
        f"""
        import sys
        sys.modules[{framework!r}] = None
        try:
            import iqdb.integrations.{module}
        except ImportError as exc:
            print("ERROR", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ERROR iqdb.integrations.{module} needs" in proc.stdout
    assert extra in proc.stdout
