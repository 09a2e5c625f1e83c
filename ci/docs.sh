#!/usr/bin/env bash
# Build the documentation site with every warning an error: mkdocs-material pages from docs/,
# the API reference from the docstrings (mkdocstrings), the benchmark tables and their plots
# and the command line's --help filled in at build time (docs/hooks.py). Installs the docs
# extra into ${IQDB_VENV:-.venv}. The site goes to ${IQDB_SITE_DIR:-site}/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${IQDB_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[docs,cli]"
"$venv/bin/ruff" check docs/*.py examples
"$venv/bin/ruff" format --check docs/*.py examples
# The hooks run `python -m iqdb` and import matplotlib: the venv's Python must come first.
PATH="$PWD/$venv/bin:$PATH" NO_MKDOCS_2_WARNING=1 "$venv/bin/mkdocs" build --strict --clean --site-dir "${IQDB_SITE_DIR:-site}"
