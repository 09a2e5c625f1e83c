#!/usr/bin/env bash
# Build the sdist and the wheel, check what they carry, install the wheel with its test extra
# into a fresh virtual environment, and run the test suite against the installed package — not
# this source tree: pytest runs from a scratch directory holding copies of tests/ and of the few
# files the tests read (README.md, the CUDA sources), where `import iqdb` can only find the
# wheel's copy; tests/test_wheel.py asserts that (IQDB_TEST_INSTALLED=1).
#
#   bash ci/wheel.sh                 # the suite without the slow marker (crash trials, big data)
#   bash ci/wheel.sh -m ""           # everything; other arguments go to pytest too
#
# The build runs in ${IQDB_VENV:-.venv} (with `build` installed there); the fresh environment
# and the scratch directory live under a temporary directory that is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${IQDB_VENV:-.venv}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/iqdb-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$venv/bin/python" -m pip install -q --disable-pip-version-check "build>=1.2"
"$venv/bin/python" -m build --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 || {
  cat "$work/build.log"
  exit 1
}
wheel=$(ls "$work"/dist/iqdb-*.whl)
sdist=$(ls "$work"/dist/iqdb-*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist")"

# What the archives must hold: every package of the source tree, py.typed, the CUDA sources,
# the license files; the version is iqdb.__version__.
"$venv/bin/python" - "$wheel" "$sdist" "$root" <<'PY'
import ast, pathlib, sys, tarfile, zipfile

wheel, sdist, root = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
names = set(zipfile.ZipFile(wheel).namelist())
prefix = tarfile.open(sdist).getnames()[0].split("/")[0]
snames = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
init = (root / "iqdb" / "__init__.py").read_text()
version = next(
    node.value.value
    for node in ast.parse(init).body
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets)
)
problems = []
if prefix != f"iqdb-{version}" or f"iqdb-{version}-py3-none-any.whl" != pathlib.Path(wheel).name:
    problems.append(f"archives are not named for version {version}: {prefix}, {pathlib.Path(wheel).name}")
packages = sorted(p.parent for p in (root / "iqdb").rglob("__init__.py") if "__pycache__" not in p.parts)
for package in packages:
    for source in package.glob("*.py"):
        rel = source.relative_to(root).as_posix()
        if rel not in names:
            problems.append(f"wheel lacks {rel} (is its package in pyproject's packages list?)")
for source in (root / "kernels").rglob("*"):
    if source.is_file() and source.suffix in (".py", ".cu") and "__pycache__" not in source.parts:
        rel = source.relative_to(root / "kernels").as_posix()
        if f"iqdb/kernels/{rel}" not in names:
            problems.append(f"wheel lacks iqdb/kernels/{rel}")
        if f"kernels/{rel}" not in snames:
            problems.append(f"sdist lacks kernels/{rel}")
if not any(n.startswith("iqdb/kernels/cuda/") and n.endswith(".cu") for n in names):
    problems.append("wheel carries no CUDA source")
for needed in ("iqdb/py.typed", f"iqdb-{version}.dist-info/licenses/LICENSE-MIT",
               f"iqdb-{version}.dist-info/licenses/LICENSE-APACHE"):
    if needed not in names:
        problems.append(f"wheel lacks {needed}")
for needed in ("LICENSE-MIT", "LICENSE-APACHE", "pyproject.toml", "README.md", "iqdb/py.typed",
               "tests/conftest.py"):
    if needed not in snames:
        problems.append(f"sdist lacks {needed}")
if any(n.startswith(("kernels/", "tests/")) for n in names):
    problems.append("wheel installs a top-level kernels/ or tests/ package")
if problems:
    sys.exit("ci/wheel.sh: " + "\n  ".join(["the built archives are incomplete:"] + problems))
cuda = sorted(n for n in names if n.endswith(".cu"))
print(f"archives ok: version {version}, {len(names)} files in the wheel, CUDA sources {cuda}")
PY

# A fresh environment with nothing but the wheel and its test extra.
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel[test]"

# The tests and the files they read (the README, the examples, the docs' pages, the benchmark
# scripts, the CUDA sources), nothing of iqdb's own code.
mkdir -p "$work/run/kernels"
cp -r tests "$work/run/tests"
cp README.md pyproject.toml "$work/run/"
cp -r examples docs bench "$work/run/"
cp -r kernels/cuda "$work/run/kernels/cuda"
find "$work/run" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/run"
"$work/venv/bin/python" -c '
import iqdb, sys
assert "site-packages" in iqdb.__file__, iqdb.__file__
print("testing", iqdb.__file__, "version", iqdb.__version__)'
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
# The bin/pytest script, not `python -m pytest`: -m would put the working directory first on
# sys.path. The one test about running from a checkout has no checkout here.
IQDB_TEST_INSTALLED=1 "$work/venv/bin/pytest" -p no:cacheprovider -q \
  --deselect tests/test_misuse.py::test_kernels_load_from_a_checkout_without_the_package_dir_mapping \
  "$@"
