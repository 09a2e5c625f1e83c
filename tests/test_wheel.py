"""What the built package carries: the version from one source, ``py.typed``, the CUDA sources,
the license files. Under ``ci/wheel.sh`` (``IQDB_TEST_INSTALLED=1``) it also proves that the suite
is testing the installed wheel, not a source tree."""

from __future__ import annotations

import os
import sysconfig
from importlib import metadata, resources
from pathlib import Path

import pytest

import iqdb

INSTALLED = os.environ.get("IQDB_TEST_INSTALLED") == "1"


def test_the_version_has_one_source() -> None:
    assert iqdb.__version__ == metadata.version("iqdb")


def test_the_package_is_typed_and_carries_its_cuda_sources() -> None:
    assert resources.files("iqdb").joinpath("py.typed").is_file()
    cuda = resources.files("iqdb.kernels").joinpath("cuda")
    assert sorted(p.name for p in cuda.iterdir() if p.name.endswith(".cu")), "no CUDA source shipped"


def test_the_metadata_names_the_license() -> None:
    meta = metadata.metadata("iqdb")
    assert meta["License-Expression"] == "MIT OR Apache-2.0"
    assert "Typing :: Typed" in meta.get_all("Classifier", [])
    files = {Path(str(f)).name for f in metadata.files("iqdb") or []}
    assert {"LICENSE-MIT", "LICENSE-APACHE"} <= files


@pytest.mark.skipif(not INSTALLED, reason="only under ci/wheel.sh, which installs the built wheel")
def test_the_suite_runs_against_the_installed_wheel() -> None:
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for module in (iqdb, iqdb.kernels):
        assert module.__file__ is not None
        assert Path(module.__file__).resolve().is_relative_to(site), module.__file__
    # Not an editable install: the files themselves are in site-packages.
    direct_url = metadata.distribution("iqdb").read_text("direct_url.json") or ""
    assert '"editable": true' not in direct_url
