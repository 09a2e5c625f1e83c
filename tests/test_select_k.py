"""Per-row select-k: the NumPy twin against a plain sort, the CUDA source through nvcc and through a
CPU block emulator, and (on a GPU) the kernel against the twin, bit for bit.

The reference is written apart from the twin: a Python loop over rows, the eligible columns of
each, and one ``np.lexsort`` by (NaN last, value with NaN as +inf, column), where ``-0.0`` and
``0.0`` compare equal as IEEE floats do. Data is tie-heavy (a few distinct values), with NaNs of
both signs and several payloads, +/-inf, and -0.0 next to 0.0. Values are compared as bits.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iqdb.kernels import _select
from iqdb.kernels._select import KERNEL_MAX_K, select_k, select_k_twin

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "kernels" / "cuda").glob("*.cu"))
NAN_BITS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FC0BEEF]


def tie_heavy(rng: np.random.Generator, m: int, n: int, *, distinct: int = 7) -> np.ndarray:
    """Scores from a few distinct values (``distinct=0``: all distinct, normal), with NaNs
    (several payloads), +/-inf, -0.0 and 0.0."""
    if distinct:
        s = (rng.integers(-distinct, distinct + 1, size=(m, n)) / 4).astype(np.float32)
    else:
        s = rng.standard_normal((m, n)).astype(np.float32)
    special = rng.random((m, n))
    s[special < 0.05] = np.inf
    s[(special >= 0.05) & (special < 0.08)] = -np.inf
    s[(special >= 0.08) & (special < 0.16)] = -0.0
    nan = (special >= 0.16) & (special < 0.22)
    s.view(np.uint32)[nan] = rng.choice(np.array(NAN_BITS, dtype=np.uint32), size=int(nan.sum()))
    return s


def bitset(mask: np.ndarray, extra_words: int = 0) -> np.ndarray:
    """Packs a boolean (..., n) mask into uint32 words (column c: bit c & 31 of word c >> 5)."""
    n = mask.shape[-1]
    words = (n + 31) // 32 + extra_words
    padded = np.zeros(mask.shape[:-1] + (words * 32,), dtype=bool)
    padded[..., :n] = mask
    # Bits past n are set on purpose: the kernel must ignore them.
    padded[..., n:] = True
    return np.packbits(padded, axis=-1, bitorder="little").view(np.uint32)


def reference(scores: np.ndarray, k: int, eligible: np.ndarray, index: np.ndarray | None):
    """``(vals, idx)`` by a plain per-row lexsort; ``eligible`` is a boolean (m, n) mask."""
    m = scores.shape[0]
    vals = np.full((m, k), np.nan, dtype=np.float32)
    vals.view(np.uint32)[:] = 0x7FC00000
    idx = np.full((m, k), -1, dtype=np.int64)
    for r in range(m):
        cols = np.flatnonzero(eligible[r])
        v = scores[r, cols]
        isnan = np.isnan(v)
        order = np.lexsort((cols, np.where(isnan, np.inf, v), isnan))[:k]
        vals[r, : order.size] = v[order]
        picked = cols[order]
        idx[r, : order.size] = picked if index is None else index[r, picked]
    return vals, idx


def assert_same(got: tuple[Any, Any], want: tuple[np.ndarray, np.ndarray]) -> None:
    gv, gi = (np.asarray(a) for a in got)
    wv, wi = want
    assert gv.dtype == np.float32 and gi.dtype == np.int64
    assert gv.shape == wv.shape and gi.shape == wi.shape
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_array_equal(gv.view(np.uint32), wv.view(np.uint32))


def case(rng: np.random.Generator, m: int, n: int, mask: str, with_index: bool, distinct: int = 7):
    """Scores, the kwargs for select_k, and the (m, n) eligibility and index for the reference."""
    scores = tie_heavy(rng, m, n, distinct=distinct)
    eligible = np.ones((m, n), dtype=bool)
    allowed = None
    if mask == "shared":
        row = rng.random(n) < 0.6
        eligible &= row
        allowed = bitset(row)
    elif mask == "per-row":
        rows = rng.random((m, n)) < rng.random((m, 1))  # densities from ~0 to ~1
        rows[0] = False  # a row with nothing allowed
        if m > 1:
            rows[1] = True
        eligible &= rows
        allowed = bitset(rows, extra_words=1)
    index = None
    if with_index:
        index = rng.permutation(10 * n)[:n].astype(np.int64) + 5
        index = np.broadcast_to(index, (m, n)).copy()
        index[rng.random((m, n)) < 0.1] = -1
        eligible &= index >= 0
    return scores, {"allowed": allowed, "index": index}, eligible, index


@pytest.mark.parametrize("mask", ["none", "shared", "per-row"])
@pytest.mark.parametrize("with_index", [False, True], ids=["columns", "index"])
@pytest.mark.parametrize("k", [1, 2, 31, 32, 33, 100, 500, 999])
def test_twin_matches_a_sort(mask: str, with_index: bool, k: int) -> None:
    rng = np.random.default_rng(k * 7 + len(mask) + with_index)
    scores, kwargs, eligible, index = case(rng, 5, 600, mask, with_index)
    assert_same(
        select_k_twin(np, scores, k, kwargs["allowed"], index=kwargs["index"]),
        reference(scores, k, eligible, index),
    )


@pytest.mark.parametrize("k", [1, 2048, 2049, 5000, 6000, 6001])
def test_twin_large_k(k: int) -> None:
    rng = np.random.default_rng(k)
    scores, kwargs, eligible, index = case(rng, 3, 6000, "per-row", False)
    want = reference(scores, k, eligible, index)
    assert_same(select_k_twin(np, scores, k, kwargs["allowed"]), want)
    # k = n with nothing masked: every column, in order.
    full = select_k_twin(np, scores, 6000)[1]
    assert sorted(full[0].tolist()) == list(range(6000))


def test_twin_fewer_allowed_than_k_pads_with_nan_and_minus_one() -> None:
    scores = np.array([[np.nan, 1.0, 0.0, -np.inf]], dtype=np.float32)
    vals, idx = select_k_twin(np, scores, 6, bitset(np.array([[True, False, True, True]])))
    assert idx.tolist() == [[3, 2, 0, -1, -1, -1]]
    assert vals.view(np.uint32)[0, 3:].tolist() == [0x7FC00000] * 3
    assert np.isnan(vals[0, 2])


def test_twin_ties_minus_zero_with_zero_by_column_and_keeps_bits() -> None:
    scores = np.array([[0.0, -0.0, 0.0, -0.0]], dtype=np.float32)
    vals, idx = select_k_twin(np, scores, 4)
    assert idx.tolist() == [[0, 1, 2, 3]]
    assert vals.view(np.uint32).tolist() == [[0, 0x80000000, 0, 0x80000000]]


def test_twin_nan_last_by_column_payloads_kept() -> None:
    scores = np.array([[0.0, 0.0, 0.0, np.inf]], dtype=np.float32)
    scores.view(np.uint32)[0, :3] = [0xFFC00001, 0x7F800001, 0x7FC00000]
    vals, idx = select_k_twin(np, scores, 4)
    assert idx.tolist() == [[3, 0, 1, 2]]
    assert vals.view(np.uint32)[0, 1:].tolist() == [0xFFC00001, 0x7F800001, 0x7FC00000]


@pytest.mark.parametrize(("m", "n"), [(0, 5), (3, 0), (0, 0)])
def test_twin_empty_shapes(m: int, n: int) -> None:
    vals, idx = select_k_twin(np, np.zeros((m, n), np.float32), 3)
    assert vals.shape == idx.shape == (m, 3)
    assert (idx == -1).all() and (vals.view(np.uint32) == 0x7FC00000).all()


def test_twin_accepts_strided_scores() -> None:
    rng = np.random.default_rng(3)
    wide = tie_heavy(rng, 6, 300)
    scores = wide[::2, 50:250]
    eligible = np.ones(scores.shape, dtype=bool)
    assert_same(select_k_twin(np, scores, 40), reference(np.ascontiguousarray(scores), 40, eligible, None))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((np.zeros(4, np.float32), 1), ValueError),
        ((np.zeros((2, 4), np.float64), 1), TypeError),
        ((np.zeros((2, 4), np.float32), 0), ValueError),
        ((np.zeros((2, 4), np.float32), 1, np.zeros(1, np.int32)), TypeError),
        ((np.zeros((2, 40), np.float32), 1, np.zeros(1, np.uint32)), ValueError),
        ((np.zeros((2, 4), np.float32), 1, np.zeros((3, 1), np.uint32)), ValueError),
    ],
)
def test_bad_arguments_are_rejected(args: tuple[Any, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        select_k_twin(np, *args)
    with pytest.raises(error):
        select_k(np, *args)


def test_bad_index_is_rejected() -> None:
    scores = np.zeros((2, 4), np.float32)
    with pytest.raises(TypeError):
        select_k(np, scores, 1, index=np.zeros(4, np.int32))
    with pytest.raises(ValueError):
        select_k(np, scores, 1, index=np.zeros((3, 4), np.int64))


@pytest.mark.parametrize("mask", ["shared", "per-row"])
def test_sort_path_in_row_groups_is_the_twin(monkeypatch: pytest.MonkeyPatch, mask: str) -> None:
    # The device's path for k > KERNEL_MAX_K sorts a group of rows at a time; here on NumPy, with
    # groups of 3 rows.
    rng = np.random.default_rng(13)
    scores, kwargs, _, _ = case(rng, 8, 500, mask, True)
    monkeypatch.setattr(_select, "_SORT_KEYS", 3 * 500)
    got = _select._sort_in_groups(np, scores, 300, kwargs["allowed"], kwargs["index"])
    assert_same(got, select_k_twin(np, scores, 300, **kwargs))


def test_select_k_on_numpy_is_the_twin() -> None:
    rng = np.random.default_rng(11)
    scores, kwargs, _, _ = case(rng, 4, 500, "shared", True)
    assert_same(select_k(np, scores, 50, **kwargs), select_k_twin(np, scores, 50, **kwargs))


def test_importing_the_module_does_not_import_cupy(tmp_path: Path) -> None:
    # A planted cupy that fails loudly on import: importing the module and selecting on NumPy
    # must never touch it.
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("raise ImportError('cupy was imported')\n")
    code = (
        "import sys, numpy as np\n"
        "from iqdb.kernels import _select\n"
        "_select.select_k(np, np.zeros((1, 3), np.float32), 2)\n"
        "assert 'cupy' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# The CUDA sources compile for the GPUs CI targets (as ci/test.sh does).


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles(source: Path, arch: str, tmp_path: Path) -> None:
    done = subprocess.run(
        ["nvcc", "-std=c++17", "-cubin", f"-arch={arch}", "-o", str(tmp_path / "out.cubin"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


def test_kernel_source_is_shipped_with_the_package() -> None:
    import importlib.resources

    text = (importlib.resources.files("iqdb.kernels") / "cuda" / "select_k.cu").read_text()
    for kc in _select.BUCKETS:
        assert f"IQDB_SELECT_K({kc})" in text
    # The host launches blocks of the size the kernel is written for.
    assert f"constexpr int kThreads = {_select._THREADS};" in text


# The kernel's own source on the CPU, through the block emulator in tests/cuda_emu.

_EMU = ROOT / "tests" / "cuda_emu"
_CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if _CXX is None:
        pytest.skip("no C++ compiler to build the CPU block emulator")
    lib = tmp_path_factory.mktemp("emu") / "select_k_emu.so"
    source = ROOT / "kernels" / "cuda" / "select_k.cu"
    subprocess.run(
        [
            _CXX,
            "-std=c++17",
            "-O2",
            "-shared",
            "-fPIC",
            "-Wno-unknown-pragmas",
            f'-DSELECT_K_SOURCE="{source}"',
            f"-I{_EMU}",
            str(_EMU / "select_k_harness.cpp"),
            "-o",
            str(lib),
        ],
        check=True,
        timeout=300,
    )
    dll = ctypes.CDLL(str(lib))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    dll.emu_select_k.argtypes = [
        i32,
        i32,
        i32,
        ctypes.c_uint,
        p,
        i64,
        i32,
        p,
        i64,
        p,
        i64,
        i32,
        i32,
        i32,
        p,
        p,
        i64,
    ]
    dll.emu_select_k.restype = i32
    return dll


def emulator_launch(dll: ctypes.CDLL, order: int, seed: int):
    """A ``launch`` for ``_select._device_passes`` that runs the kernel in the emulator."""

    def ptr(a: np.ndarray | None) -> int | None:
        return None if a is None else a.ctypes.data

    def launch(kc, blocks, scores, ss, n, allowed, as_, index, is_, k, chunk, chunks, out_vals, out_idx, os_):
        status = dll.emu_select_k(
            kc,
            blocks,
            order,
            seed,
            ptr(scores),
            ss,
            n,
            ptr(allowed),
            as_,
            ptr(index),
            is_,
            k,
            chunk,
            chunks,
            ptr(out_vals),
            ptr(out_idx),
            os_,
        )
        assert status == 0, "barrier divergence" if status == 1 else f"emulator status {status}"

    return launch


EMULATED_CASES = [
    # (m, n, k, mask, index, distinct values (0: all distinct), blocks_wanted): small chunks force
    # several passes; distinct=1 puts the -0.0/0.0 ties at the k-th place.
    pytest.param(3, 3000, 10, "shared", False, 7, 64, id="k10-two-passes-shared"),
    pytest.param(2, 20000, 40, "none", False, 0, 64, id="k40-three-passes-distinct"),
    pytest.param(4, 1500, 1, "per-row", True, 7, 64, id="k1-per-row-index"),
    pytest.param(2, 1200, 32, "per-row", False, 7, 1, id="k32-one-block"),
    pytest.param(2, 1200, 33, "none", True, 0, 1, id="k33-one-block-index-distinct"),
    pytest.param(2, 2600, 300, "shared", False, 0, 8, id="k300-distinct"),
    pytest.param(2, 6000, KERNEL_MAX_K, "per-row", False, 1, 1, id="k2048-zero-ties"),
    pytest.param(3, 700, 1000, "per-row", False, 7, 1, id="k-over-allowed"),
    pytest.param(2, 0, 5, "none", False, 7, 1, id="no-columns"),
    pytest.param(0, 100, 5, "none", False, 7, 1, id="no-rows"),
    # Long rows in one block: many rounds filtered by the running k-th best, and several folds.
    pytest.param(2, 60000, 100, "none", False, 0, 1, id="k100-long-row-distinct"),
    pytest.param(2, 60000, 700, "shared", True, 7, 1, id="k700-long-row-ties"),
]


@pytest.mark.parametrize(("m", "n", "k", "mask", "with_index", "distinct", "blocks"), EMULATED_CASES)
def test_kernel_in_cpu_emulator_matches_twin(emulated, m, n, k, mask, with_index, distinct, blocks) -> None:
    rng = np.random.default_rng(m * n + k)
    scores, kwargs, _, _ = case(rng, m, n, mask, with_index, distinct)
    want = select_k_twin(np, scores, k, kwargs["allowed"], index=kwargs["index"])
    launch = emulator_launch(emulated, order=2, seed=k)  # threads run in a shuffled order
    got = _select._device_passes(
        np, launch, scores, k, kwargs["allowed"], kwargs["index"], blocks, min_chunk=0
    )
    assert_same(got, want)


@pytest.mark.parametrize("pattern", ["descending", "late-arrivals"])
def test_kernel_in_cpu_emulator_adversarial_orders(emulated, pattern: str) -> None:
    # descending: every key beats the running k-th best, the filter's worst case (a fold every
    # round). late-arrivals: ascending rows, then small values late in the row that fall between
    # the running (k-1)-th and k-th best, which a threshold off by one would drop. Both rows sit
    # in a wider array (row stride > n), and both thread orders must agree.
    n, k = 20000, 50
    wide = np.empty((2, n + 100), dtype=np.float32)
    if pattern == "descending":
        wide[:] = np.arange(n + 100, 0, -1, dtype=np.float32) // 3
    else:
        wide[:] = 2 * np.arange(n + 100, dtype=np.float32)  # the k best so far: 0, 2, ..., 2k - 2
        wide[0, n - 7] = 2 * k - 3  # the final k-th best, just under the running k-th
        wide[1, [n - 900, n - 600, n - 3]] = [2 * k - 3, 2 * k - 5, 1]
    scores = wide[:, :n]
    want = select_k_twin(np, scores, k)
    for order in (0, 1):  # forward and reverse thread orders
        got = _select._device_passes(np, emulator_launch(emulated, order, 0), scores, k, None, None, 1)
        assert_same(got, want)


# On a GPU: the kernel against the twin, bit for bit.


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["none", "shared", "per-row"])
@pytest.mark.parametrize("with_index", [False, True], ids=["columns", "index"])
@pytest.mark.parametrize(
    ("m", "n", "k", "distinct"),
    [
        (7, 1000, 1, 7),
        (7, 1000, 32, 7),
        (7, 1000, 33, 7),
        (3, 300_000, 10, 7),
        (2, 300_000, 100, 0),
        (300, 20_000, 100, 7),
        (64, 50_000, 1000, 0),
        (2, 300_000, 2048, 1),
        (2, 6000, 2049, 7),
        (3, 6000, 5000, 7),
        (4, 500, 1000, 7),
    ],
)
def test_gpu_kernel_matches_twin(mask: str, with_index: bool, m: int, n: int, k: int, distinct: int) -> None:
    import cupy

    rng = np.random.default_rng(m + n + k)
    scores, kwargs, _, _ = case(rng, m, n, mask, with_index, distinct)
    want = select_k_twin(np, scores, k, kwargs["allowed"], index=kwargs["index"])
    dev = {name: None if a is None else cupy.asarray(a) for name, a in kwargs.items()}
    vals, idx = select_k(cupy, cupy.asarray(scores), k, dev["allowed"], index=dev["index"])
    assert_same((vals.get(), idx.get()), want)
    # Descending rows (the filter's worst case) and a strided view.
    wide = cupy.asarray(np.arange(n + 64, 0, -1, dtype=np.float32)[None, :].repeat(m, 0) // 3)
    vals, idx = select_k(cupy, wide[:, :n], k)
    assert_same((vals.get(), idx.get()), select_k_twin(np, wide[:, :n].get(), k))
