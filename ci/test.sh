#!/usr/bin/env bash
# The README's test command: install iqdb with its test extras into a virtual environment, then
# lint (ruff), type-check (mypy --strict), compile-check CUDA sources (nvcc; installed when absent) and
# run the test suite. Extra arguments go to pytest, e.g. `bash ci/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${IQDB_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
"$venv/bin/ruff" check iqdb kernels tests bench
"$venv/bin/ruff" format --check iqdb kernels tests
MYPY="$venv/bin/mypy" bash ci/typecheck.sh
# Every CUDA source compiles to a cubin for the GPUs we target (one arch per nvcc call). Without
# a CUDA toolkit on the machine, NVIDIA's CUDA 13 wheels provide nvcc and the runtime headers: a
# CI-only install into its own venv (.venv-nvcc), never a dependency of iqdb.
nvcc=$(command -v nvcc || true)
if [ -z "$nvcc" ]; then
  if [ ! -x .venv-nvcc/bin/python ]; then "${PYTHON:-python3}" -m venv .venv-nvcc; fi
  .venv-nvcc/bin/python -m pip install -q --disable-pip-version-check nvidia-cuda-nvcc nvidia-cuda-runtime
  nvcc=$(.venv-nvcc/bin/python -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'bin', 'nvcc'))")
fi
for src in kernels/cuda/*.cu; do
  for arch in sm_80 sm_90; do
    "$nvcc" -std=c++17 -cubin -arch="$arch" -o /dev/null "$src"
    echo "nvcc ok: $src $arch"
  done
done
"$venv/bin/python" -m pytest "$@"
