#!/usr/bin/env bash
# The GPU benchmark on a lent GPU machine, in one call (the device tool runs commands in the
# repository root, offline, about 15 minutes of device time in all, 10 minutes a command):
#
#     bash ci/gpu.sh               # GPU tests + bench/bench_gpu.py at full size: about 8 minutes
#     bash ci/gpu.sh --quick       # a smoke run; any arguments go to bench/bench_gpu.py
#
# Installs nothing from an index (there is no network): iqdb itself at most, with
# `pip install --no-deps -e .` when it is not importable, else the checkout on PYTHONPATH.
# Prints the GPU and the versions that matter, runs the benchmark under a timeout (IQDB_GPU_TIMEOUT,
# 540 s; the script's own budget stops it sooner), and copies the result file and the log into
# $OUT when that is set. No `set -e`: a failing step must not lose what was measured.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3}"; exit 1; }
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac
LIMIT=${IQDB_GPU_TIMEOUT:-540}
mark=$(mktemp)

echo "== GPU"
nvidia-smi || echo "(nvidia-smi failed)"
echo "== Python packages"
"$PY" - <<'PYEOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
want = ("numpy", "pyarrow", "cupy", "torch", "faiss", "pytest", "hypothesis", "threadpoolctl", "nvidia-cublas")
found = sorted({(d.metadata["Name"], d.version) for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith(want)})
for name, version in found:
    print(f"  {name} {version}")
PYEOF

echo "== iqdb"
if ! (cd / && "$PY" -c "import iqdb" 2>/dev/null); then
  # --no-build-isolation and --no-index: the build uses the installed setuptools, nothing is fetched
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$mark.pip" 2>&1 \
    || { tail -n 5 "$mark.pip"; echo "(pip install -e . failed: using the checkout through PYTHONPATH)"; }
  rm -f "$mark.pip"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
(cd / && "$PY" -c "import iqdb; print('iqdb', iqdb.__version__, 'from', iqdb.__file__)") \
  || echo "(iqdb is not importable: the benchmark will say why)"

echo "== bench/bench_gpu.py $*"
if [ -n "${OUT:-}" ]; then
  PYTHONUNBUFFERED=1 timeout -k 15 "$LIMIT" "$PY" bench/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.log"
  rc=${PIPESTATUS[0]}
else
  PYTHONUNBUFFERED=1 timeout -k 15 "$LIMIT" "$PY" bench/bench_gpu.py "$@"
  rc=$?
fi
echo "== bench/bench_gpu.py exit code $rc (124: stopped by the timeout)"
if [ -n "${OUT:-}" ]; then
  find bench/results -maxdepth 1 -name 'gpu_*.md' -newer "$mark" -exec cp {} "$OUT/" \;
  ls -l "$OUT"
fi
rm -f "$mark"
exit "$rc"
