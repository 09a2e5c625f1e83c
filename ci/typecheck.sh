#!/usr/bin/env bash
# mypy --strict over iqdb as it is installed: kernels/ becomes iqdb.kernels (the package-dir
# mapping in pyproject.toml), so mypy checks a staging tree of symlinks with that shape.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mypy=$(realpath "${MYPY:-$root/.venv/bin/mypy}")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/iqdb"
for f in iqdb/*; do ln -s "$root/$f" "$stage/$f"; done
ln -s "$root/kernels" "$stage/iqdb/kernels"
cd "$stage"
"$mypy" --config-file "$root/pyproject.toml" -p iqdb
