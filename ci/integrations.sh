#!/usr/bin/env bash
# The LangChain and LlamaIndex adapters' tests, LangChain's standard vector-store suite included.
# langchain-tests pins pytest and wants pytest-asyncio in "auto" mode, so this step runs in its own
# virtual environment (default .venv-integrations) rather than the main one. Extra arguments go to
# pytest, e.g. `bash ci/integrations.sh -k durable`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${IQDB_INTEGRATIONS_VENV:-.venv-integrations}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
# langchain-tests' own pins (pytest, langchain-core, pytest-asyncio) decide the versions; we add
# only the lower bounds the adapters were written against.
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,langchain,llama-index]" \
  "langchain-tests>=1.1.9,<2" "pytest-asyncio>=1.0"
"$venv/bin/ruff" check iqdb/integrations tests/integrations
"$venv/bin/ruff" format --check iqdb/integrations tests/integrations
# mypy --strict over iqdb with both frameworks installed (the main typecheck has neither).
MYPY="$venv/bin/mypy" bash ci/typecheck.sh
# The asyncio options here, not in pyproject: the main suite has no pytest-asyncio.
"$venv/bin/python" -m pytest -o asyncio_mode=auto -o asyncio_default_fixture_loop_scope=function \
  -p no:cacheprovider tests/integrations "$@"
