#!/usr/bin/env bash
# Scale-out on Ray (iqdb.distributed): install the `ray` extra into the test virtual environment,
# then run the tests that need a real local Ray cluster (one cluster for the whole module, 2 CPUs).
# The in-process tests of iqdb.distributed (routing, merge, manifest, the API over threads) run in
# the main suite and need no Ray. Extra arguments go to pytest, e.g. `bash ci/ray.sh -k batch`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${IQDB_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,ray]"
"$venv/bin/ruff" check iqdb/distributed tests/distributed
"$venv/bin/ruff" format --check iqdb/distributed tests/distributed
# Ray's token-auth notice and its usage-stats prompt are noise in CI logs.
export RAY_USAGE_STATS_ENABLED=0
"$venv/bin/python" -m pytest -p no:cacheprovider tests/distributed/test_distributed_ray.py "$@"
