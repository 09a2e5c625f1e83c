r"""iqdb on the GPU against FAISS GPU (or torch) and its own CPU path, with floors (issue 10).

One command on a GPU machine, under 8 minutes on an H100/H200: the GPU tests first, then the tables:

    python bench/bench_gpu.py

``bash ci/gpu.sh`` does the same on a lent machine: prints the machine, makes iqdb importable
without a network, runs this under a timeout and copies the result file to ``$OUT``.

    python bench/bench_gpu.py --quick        # smoke run on a GPU machine, 20,000 x 64, no tests
    python bench/bench_gpu.py --cpu-smoke    # the whole logic with every GPU system skipped (any machine)

What it measures, on seeded standard-normal float32 data, L2:

1. ``python -m pytest -q -m gpu tests/`` in a subprocess (pass/fail counts; failures are printed,
   the benchmark goes on).
2. For n = 1,000,000 at d = 768 and d = 128: batches of 1, 64, 1,024 and 10,000 queries at k = 10
   and 1,000 for iqdb on ``cuda:0`` and on the CPU (at most ``--cpu-queries`` queries a call, so
   the run stays in budget), and FAISS GPU's flat index, or torch (``addmm`` + ``topk``) when faiss
   has no GPU support. Every call takes host queries and returns host arrays. Floors measured in the
   same run: the HBM floor (bytes of X over the device-to-device copy bandwidth) and the compute
   floor (2 m n d over cuBLAS SGEMM's rate at the batch's shape, TF32 off).
3. Opening a 1,000,000 x 768 durable snapshot onto the device against reading its bytes.
   Growing a database from empty to 1,000,000 x 128 in 100 writes: the device memory in use
   against the vectors' bytes (target: near 1x plus the growth step).
4. Checks: iqdb GPU ids and scores equal iqdb CPU's (bit for bit), recall against a float64 brute
   force (ties counted), overlap with the peer.

Targets (issue 10): a single query within 1.5x of the HBM floor; batches of 1,024 and more within
1.3x of FAISS GPU or ahead; identical results to the CPU; open within 2x of reading the bytes.

Installs nothing and imports CuPy, PyTorch and faiss lazily; a missing peer is skipped and said so.
A global time budget (``--budget``) stops it gracefully; the result file is rewritten after every
section, so a run cut short still leaves what it measured. Result: ``bench/results/gpu_<tag>.md``
(tag from the GPU's name, e.g. ``h200``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    Reference,
    Stats,
    Table,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    interleave,
    loadavg,
    machine,
    peak_rss_gib,
    write_result,
)

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.perf_counter()
GIB = 1 << 30
CHUNK = 1 << 18  # rows per upsert_many call when building
TARGET_SINGLE = 1.5  # x the HBM floor
TARGET_BATCH = 1.3  # x FAISS GPU, batches of 1,024 and more
TARGET_OPEN = 2.0  # x reading the snapshot's bytes
PROGRESS = re.compile(r"^([.sFExX]+)\s*(\[\s*\d+%\])?$")  # pytest -q progress lines


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Stop(BaseException):
    """SIGTERM (ci/gpu.sh's timeout): stop, write what was measured."""


def _on_term(signum: int, frame: Any) -> None:
    raise Stop(f"signal {signum}")


def describe(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 160 else text[:157] + "..."


def cell_text(text: str) -> str:
    return text.replace("|", "/")


class Budget:
    """The run's wall-clock budget: sections and cells check what is left before they start."""

    def __init__(self, seconds: float, reserve: float) -> None:
        self.end = time.perf_counter() + seconds
        self.reserve = reserve

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, seconds: float) -> bool:
        return self.left() - self.reserve >= seconds


# ---------------------------------------------------------------------------------------------
# Data


def make_data(n: int, d: int, seed: int) -> np.ndarray:
    """Seeded standard-normal float32 ``(n, d)`` in 64 Ki-row blocks on all cores.

    One generator per block (seeded by ``[seed, block]``), so the data do not depend on the
    thread count; NumPy's generators release the GIL while filling.
    """
    X = np.empty((n, d), dtype=np.float32)
    step = 1 << 16

    def fill(b: int) -> None:
        np.random.default_rng([seed, b]).standard_normal(dtype=np.float32, out=X[b * step : (b + 1) * step])

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(fill, range(math.ceil(n / step))))
    return X


def to_host(a: Any) -> np.ndarray:
    """A result array on the host (iqdb returns NumPy; a device array is downloaded)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):  # CuPy
        return np.asarray(a.get())
    if hasattr(a, "cpu"):  # torch
        return np.asarray(a.cpu().numpy())
    return np.asarray(a)


# ---------------------------------------------------------------------------------------------
# The accelerator library: device sync, CUDA events, floors (PyTorch first, else CuPy)


def torch_fp32(torch: Any) -> str:
    """Plain fp32 products (TF32 off), whatever the defaults; returns the setting in words."""
    matmul = torch.backends.cuda.matmul
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
                matmul.fp32_precision = "ieee"
                return "torch.backends.cuda.matmul.fp32_precision = 'ieee'"
            matmul.allow_tf32 = False
            return "torch.backends.cuda.matmul.allow_tf32 = False"
    except Exception:  # mixing the old and new TF32 settings raises on some versions
        torch.set_float32_matmul_precision("highest")
        return "torch.set_float32_matmul_precision('highest')"


class Accel:
    """Times device work with CUDA events and holds device buffers for the floors."""

    def __init__(self, lib: str, mod: Any) -> None:
        self.lib = lib
        self.mod = mod
        self.precision = ""
        if lib == "torch":
            self.precision = torch_fp32(mod)
            self.dev = mod.device("cuda:0")
        else:
            tf32 = os.environ.get("CUPY_TF32", "")
            self.precision = "cupy.matmul (CUPY_TF32 unset)" if not tf32 else f"cupy.matmul, CUPY_TF32={tf32}"

    @classmethod
    def find(cls) -> tuple[Accel | None, list[str]]:
        """PyTorch with CUDA, else CuPy with a device; the reasons each was not taken."""
        reasons = []
        try:
            torch = importlib.import_module("torch")
            if torch.cuda.is_available():
                return cls("torch", torch), reasons
            reasons.append(f"torch {torch.__version__}: torch.cuda.is_available() is False")
        except Exception as exc:
            reasons.append(f"torch: {describe(exc)}")
        try:
            cupy = importlib.import_module("cupy")
            if cupy.cuda.runtime.getDeviceCount() > 0:
                return cls("cupy", cupy), reasons
            reasons.append("cupy: no CUDA device")
        except Exception as exc:
            reasons.append(f"cupy: {describe(exc)}")
        return None, reasons

    def sync(self) -> None:
        if self.lib == "torch":
            self.mod.cuda.synchronize()  # cudaDeviceSynchronize: every stream, every library
        else:
            self.mod.cuda.runtime.deviceSynchronize()

    def elapsed(self, fn: Callable[[], object]) -> float:
        """Seconds of the device work ``fn`` queues on the current stream (CUDA events)."""
        if self.lib == "torch":
            e0 = self.mod.cuda.Event(enable_timing=True)
            e1 = self.mod.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            return float(e0.elapsed_time(e1)) / 1e3
        e0, e1 = self.mod.cuda.Event(), self.mod.cuda.Event()
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        return float(self.mod.cuda.get_elapsed_time(e0, e1)) / 1e3

    def upload(self, X: np.ndarray) -> Any:
        if self.lib == "torch":
            return self.mod.from_numpy(np.ascontiguousarray(X)).to(self.dev)
        return self.mod.asarray(X)

    def empty(self, shape: tuple[int, ...]) -> Any:
        if self.lib == "torch":
            return self.mod.empty(shape, dtype=self.mod.float32, device=self.dev)
        return self.mod.empty(shape, dtype=self.mod.float32)

    def copy(self, dst: Any, src: Any) -> None:
        if self.lib == "torch":
            dst.copy_(src)
        else:
            dst.data.copy_from_device(src.data, src.nbytes)  # cudaMemcpyAsync, device to device

    def matmul(self, A: Any, B: Any, out: Any) -> None:
        self.mod.matmul(A, B, out=out)

    def name(self) -> str:
        if self.lib == "torch":
            return str(self.mod.cuda.get_device_name(0))
        props = self.mod.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)


def free_device_memory() -> None:
    """Give cached device memory back (CuPy's pools, torch's cache) between sections."""
    gc.collect()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
        except Exception:
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:
            pass


class Floors:
    """What the device allows for one ``n x d`` matrix, measured with CUDA events.

    HBM floor: the bytes of X over the device-to-device copy bandwidth (a copy of B bytes moves
    2B: read and write). Compute floor of m queries: the bare fp32 product of the batch's first
    ``min(m, 1024)`` queries with X (``(qb, d) @ (d, n)`` into a preallocated ``(qb, n)``
    output, no selection), scaled by ``m / qb``.
    """

    def __init__(self, accel: Accel, X: np.ndarray) -> None:
        self.accel = accel
        self.n, self.d = X.shape
        self.nbytes = X.nbytes
        self.copy_bw = self._copy_bandwidth(max(256 << 20, min(self.nbytes, 2 * GIB)))
        free_device_memory()  # the copy's buffers
        self.Xd = accel.upload(X)
        self.XdT = self.Xd.T  # a transposed view: cuBLAS takes it as is
        self.Qb: Any = None
        self.out: Any = None
        self.scale = 1.0

    def _copy_bandwidth(self, nbytes: int) -> float:
        a = self.accel
        src, dst = a.empty((nbytes // 4,)), a.empty((nbytes // 4,))

        def copy() -> None:
            a.copy(dst, src)

        for _ in range(3):
            copy()
        return 2 * nbytes / float(np.median([a.elapsed(copy) for _ in range(10)]))

    @property
    def hbm(self) -> float:
        return self.nbytes / self.copy_bw

    def prepare(self, Q: np.ndarray, m: int) -> None:
        qb = max(1, min(m, 1024))
        self.Qb = self.accel.upload(Q[:qb])
        self.out = self.accel.empty((qb, self.n))
        self.scale = m / qb
        self.gemm_once()  # warm-up: cuBLAS picks its kernel

    def gemm_once(self) -> float:
        a = self.accel
        return a.elapsed(lambda: a.matmul(self.Qb, self.XdT, self.out)) * self.scale

    def release(self) -> None:
        self.Qb = self.out = None

    def close(self) -> None:
        self.Qb = self.out = self.Xd = self.XdT = None
        free_device_memory()


# ---------------------------------------------------------------------------------------------
# Systems: each takes host queries and returns host (ids, scores), inside the timing


class System:
    name = "system"
    gpu = True
    note = ""

    def available(self) -> None:
        """Import what it needs; raises with the reason when it cannot run here."""

    def build(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def info(self) -> str:
        """A line for the notes after building (device memory, say)."""
        return ""

    def close(self) -> None:
        """Free what the system holds."""


class IqdbSystem(System):
    def __init__(self, device: str) -> None:
        self.device = device
        self.gpu = device != "cpu"
        self.name = "iqdb gpu" if self.gpu else "iqdb cpu"
        self.note = (
            f'`iqdb.open_in_memory(device="{device}")`, `upsert_many` in chunks of {CHUNK:,} rows, '
            '`search_arrays(Q, k, "l2")` (host queries in, NumPy ids and scores out)'
        )
        self.db: Any = None

    def available(self) -> None:
        importlib.import_module("iqdb")

    def build(self, X: np.ndarray) -> None:
        import iqdb

        self.db = iqdb.open_in_memory(device=self.device)
        for a in range(0, X.shape[0], CHUNK):
            b = min(X.shape[0], a + CHUNK)
            self.db.upsert_many(np.arange(a, b, dtype=np.uint64), X[a:b])

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.db.search_arrays(Q, k, "l2")
        return to_host(ids), to_host(scores)

    def info(self) -> str:
        usage = getattr(self.db, "memory_usage", None)
        if usage is None:
            return ""
        try:
            return f"`memory_usage()` {usage()}"
        except Exception as exc:
            return f"`memory_usage()` failed: {describe(exc)}"

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


class FaissGpuSystem(System):
    name = "faiss gpu"
    note = "`faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), d)`, `add(X)`, `search(Q, k)` (fp32)"

    def available(self) -> None:
        faiss = importlib.import_module("faiss")
        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError(f"faiss {faiss.__version__} has no GPU support (a faiss-cpu build)")
        if faiss.get_num_gpus() < 1:
            raise RuntimeError(f"faiss {faiss.__version__} sees no GPU")

    def build(self, X: np.ndarray) -> None:
        import faiss

        self.res = faiss.StandardGpuResources()
        self.index = faiss.GpuIndexFlatL2(self.res, X.shape[1])
        self.index.add(np.ascontiguousarray(X))

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.index.search(np.ascontiguousarray(Q), k)
        return I, D

    def close(self) -> None:
        self.index = self.res = None


class TorchSystem(System):
    name = "torch"
    note = (
        "PyTorch, fp32 with TF32 off: X and its squared norms on the device; per query block (score "
        "tiles of at most 2 GiB) `addmm(norms, Q, X.T, alpha=-2)` then `topk(k, largest=False)`"
    )

    def available(self) -> None:
        torch = importlib.import_module("torch")
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__}: torch.cuda.is_available() is False")
        self.precision = torch_fp32(torch)

    def build(self, X: np.ndarray) -> None:
        import torch

        self.torch = torch
        self.dev = torch.device("cuda:0")
        self.n = X.shape[0]
        self.Xd = torch.from_numpy(np.ascontiguousarray(X)).to(self.dev)
        self.xn = torch.empty(self.n, dtype=torch.float32, device=self.dev)
        for a in range(0, self.n, CHUNK):
            blk = self.Xd[a : a + CHUNK]
            self.xn[a : a + CHUNK] = (blk * blk).sum(dim=1)
        torch.cuda.synchronize()

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        Qd = torch.from_numpy(np.ascontiguousarray(Q)).to(self.dev)
        qn = (Qd * Qd).sum(dim=1)
        kk = min(k, self.n)
        qb = max(1, min(Qd.shape[0], (2 * GIB) // (4 * self.n)))
        vals, idx = [], []
        for s in range(0, Qd.shape[0], qb):
            S = torch.addmm(self.xn, Qd[s : s + qb], self.Xd.T, beta=1, alpha=-2)
            v, i = torch.topk(S, kk, dim=1, largest=False, sorted=True)
            vals.append(v + qn[s : s + qb, None])
            idx.append(i)
            del S
        return torch.cat(idx).cpu().numpy(), torch.cat(vals).cpu().numpy()

    def close(self) -> None:
        self.Xd = self.xn = None


def close_quietly(s: System) -> None:
    try:
        s.close()
    except Exception as exc:
        log(f"  closing {s.name}: {describe(exc)}")


def make_systems(args: argparse.Namespace) -> tuple[list[System], dict[str, str]]:
    """The systems to run, and a reason for each one left out."""
    systems: list[System] = []
    skipped: dict[str, str] = {}
    smoke = "--cpu-smoke: every GPU system is skipped"
    if args.cpu_smoke:
        skipped["iqdb gpu"] = smoke
    else:
        systems.append(IqdbSystem(args.device))
    systems.append(IqdbSystem("cpu"))
    order = {"auto": ["faiss", "torch"], "faiss": ["faiss"], "torch": ["torch"], "both": ["faiss", "torch"]}
    if args.cpu_smoke:
        skipped["faiss gpu"] = skipped["torch"] = smoke
    for which in [] if args.cpu_smoke else order.get(args.peer, []):
        peer: System = FaissGpuSystem() if which == "faiss" else TorchSystem()
        try:
            peer.available()
        except Exception as exc:
            skipped[peer.name] = describe(exc)
            continue
        systems.append(peer)
        if args.peer == "auto":
            break
    if args.peer == "none":
        skipped["peer"] = "--peer none"
    for name, why in skipped.items():
        log(f"  not run: {name}: {why}")
    return systems, skipped


# ---------------------------------------------------------------------------------------------
# 1. The GPU tests


@dataclass
class TestRun:
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rc: int | None = None
    note: str = ""

    def text(self) -> str:
        if not self.counts:
            return self.note or "no summary"
        return ", ".join(f"{v} {k}" for k, v in self.counts.items())

    def verdict(self) -> str:
        if self.counts.get("failed") or self.counts.get("errors") or self.rc not in (0, 5):
            return "FAIL"
        return "PASS" if self.counts.get("passed") else "- (none ran: every GPU test skipped)"


def run_tests(args: argparse.Namespace, budget: Budget) -> TestRun:
    timeout = max(10.0, min(args.test_timeout, budget.left() - args.bench_min))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/", "-p", "no:cacheprovider"]
    log(f"GPU tests: {' '.join(cmd[1:])} (timeout {timeout:.0f} s)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = TestRun()
    with tempfile.TemporaryFile(mode="w+") as sink:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            out.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: pytest and anything it started
            proc.wait()
            out.note = f"timed out after {timeout:.0f} s (killed; counts below are from its output so far)"
        except BaseException:  # SIGTERM (Stop) or ^C: take pytest down with us
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        out.seconds = time.perf_counter() - t0
        sink.seek(0)
        lines = sink.read().splitlines()
    print("\n".join(lines[-40:]), flush=True)
    summary = next(
        (ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|deselected)", ln)), ""
    )
    for num, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summary):
        out.counts["errors" if word.startswith("error") else word] = int(num)
    out.failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    if not out.counts:  # cut off before its summary: count the progress characters
        progress = "".join(m.group(1) for m in map(PROGRESS.match, lines) if m)
        for char, word in ((".", "passed"), ("F", "failed"), ("E", "errors"), ("s", "skipped")):
            out.counts[word] = progress.count(char)
    log(f"GPU tests: {out.text()} in {out.seconds:.0f} s (exit code {out.rc}); failures: {len(out.failures)}")
    for ln in out.failures[:30]:
        print("  " + ln, flush=True)
    return out


def tests_table(t: TestRun) -> Table:
    table = Table("GPU tests: `python -m pytest -q -m gpu tests/`", ["result", "seconds", "exit code"])
    table.add(t.text(), f"{t.seconds:.0f}", t.rc if t.rc is not None else "-")
    if t.note:
        table.notes.append(t.note)
    if t.failures:
        shown = t.failures[:30]
        table.notes += [cell_text(f"`{ln}`") for ln in shown]
        if len(t.failures) > len(shown):
            table.notes.append(f"... and {len(t.failures) - len(shown)} more")
    return table


# ---------------------------------------------------------------------------------------------
# 2. Search on one shape


@dataclass
class CellOut:
    """One (m, k) cell: per system, per-call seconds, queries a call, checked rows, or an error."""

    m: int
    k: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)
    rows: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    floor_hbm: float = float("nan")
    floor_gemm: float = float("nan")
    same: tuple[int, int, str] = (0, 0, "")  # iqdb gpu against iqdb cpu: equal, compared, details
    recall: dict[str, float] = field(default_factory=dict)
    overlap: dict[str, float] = field(default_factory=dict)

    def per_query(self, name: str) -> float:
        s = self.samples.get(name)
        return float(np.median(s)) / self.queries[name] if s else float("nan")

    @property
    def floor(self) -> float:
        known = [x for x in (self.floor_hbm, self.floor_gemm) if np.isfinite(x)]
        return max(known, default=float("nan"))


class ShapeRun:
    """The systems and floors over one ``n x d`` matrix, and its cells."""

    def __init__(
        self,
        args: argparse.Namespace,
        n: int,
        d: int,
        accel: Accel | None,
        budget: Budget,
        skipped: dict[str, str],
    ) -> None:
        self.args, self.n, self.d, self.accel, self.budget = args, n, d, accel, budget
        t0 = time.perf_counter()
        self.X = make_data(n, d, args.seed)
        self.Q = make_data(max(max(args.batches), args.single_runs, args.check), d, args.seed + 1)
        log(f"data {n:,} x {d} ({self.X.nbytes / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        self.systems, self.skipped = make_systems(args)
        skipped.update(self.skipped)
        self.build_s: dict[str, float] = {}
        self.broken: dict[str, str] = {}  # build failures: every cell of the system says so
        self.infos: list[str] = []
        for s in self.systems:
            self._build(s)
        self.names = [s.name for s in self.systems]
        self.peer = next((s.name for s in self.systems if s.name in ("faiss gpu", "torch")), None)
        self.floors: Floors | None = None
        self.floor_error = "no GPU library: " + "; ".join(args.accel_reasons) if accel is None else ""
        if accel is not None:
            try:
                self.floors = Floors(accel, self.X)
                log(f"  HBM: device copy {self.floors.copy_bw / 1e12:.2f} TB/s (read + write)")
            except Exception as exc:
                self.floor_error = describe(exc)
                log(f"  floors failed: {self.floor_error}")
                traceback.print_exc()
        t0 = time.perf_counter()
        self.ref = Reference(self.X, "l2")
        nchk = min(args.check, self.Q.shape[0])
        self.D = self.ref.distances(self.Q[:nchk])
        log(f"  float64 reference for {nchk} queries in {time.perf_counter() - t0:.1f} s")
        self.cells: list[CellOut] = []
        self.history: dict[tuple[str, int], tuple[int, float]] = {}

    def _build(self, s: System) -> None:
        t0 = time.perf_counter()
        try:
            s.available()
            s.build(self.X)
            if self.accel is not None and s.gpu:
                self.accel.sync()
        except Exception as exc:
            self.broken[s.name] = f"error: {describe(exc)}"
            log(f"  {s.name}: build failed: {self.broken[s.name]}")
            traceback.print_exc()
            return
        self.build_s[s.name] = time.perf_counter() - t0
        info = s.info()
        if info:
            self.infos.append(f"{s.name}: {info}")
        log(f"  built {s.name} in {self.build_s[s.name]:.1f} s {info}")

    def label(self) -> str:
        return f"{self.n:,} x {self.d}"

    def sync(self) -> None:
        if self.accel is not None:
            self.accel.sync()

    def m_for(self, s: System, m: int) -> int:
        return m if s.gpu else min(m, self.args.cpu_queries)

    def predicted(self, s: System, m: int, k: int) -> float | None:
        """Seconds one call should take, from the same system's last cell at this k (linear in m)."""
        prev = self.history.get((s.name, k))
        if prev is None:
            return None
        pm, secs = prev
        return secs * max(1.0, self.m_for(s, m) / pm)

    def cell(self, m: int, k: int) -> CellOut:
        args, out = self.args, CellOut(m, k)
        live: list[System] = []
        for s in self.systems:
            if s.name in self.broken:
                out.errors[s.name] = "build failed (see the notes)"
                continue
            est = self.predicted(s, m, k)
            if est is not None and (est > args.max_call or not self.budget.allows(2 * est)):
                out.errors[s.name] = (
                    f"skipped: a call would take about {est:.0f} s (limit {args.max_call:.0f} s or the budget)"
                )
                continue
            out.queries[s.name] = self.m_for(s, m)
            live.append(s)
        log(f"cell m = {m:,}, k = {k:,} ({self.label()}): {', '.join(s.name for s in live) or 'no system'}")
        for s in live:  # warm-up: kernels compiled, pools filled, caches warm
            self.timed(s, self.Q[: out.queries[s.name]], out)
        live = [s for s in live if s.name not in out.errors]
        tasks: dict[str, Callable[[int], list[float]]] = {s.name: self._task(s, out) for s in live}
        if self.floors is not None:
            try:
                self.floors.prepare(self.Q, m)
                out.floor_hbm = self.floors.hbm
                tasks["floor"] = self._floor_task(out)
            except Exception as exc:
                out.errors["floor"] = f"error: {describe(exc)}"
                log(f"  floor: {out.errors['floor']}")
        rounds = args.single_runs if m == 1 else args.runs
        samples = interleave(tasks, rounds, args.cell_budget, pause_s=0.0)
        if self.floors is not None:
            self.floors.release()
        for name, s in samples.items():
            if name == "floor":
                if s:
                    out.floor_gemm = float(np.median(s))
            elif s:
                out.samples[name] = s
                self.history[(name, k)] = (out.queries[name], float(np.median(s)))
        free_device_memory()
        out.same = self.same_as_cpu(out)
        for name, rows in out.rows.items():
            if rows:
                out.recall[name] = self.recall(rows, k)
                if self.peer and name != self.peer and out.rows.get(self.peer):
                    out.overlap[name] = self.overlap(rows, out.rows[self.peer], k)
        self.cells.append(out)
        return out

    def timed(self, s: System, q: np.ndarray, out: CellOut) -> tuple[float, np.ndarray, np.ndarray] | None:
        """One call, the device synchronised before and after; None (and the error noted) if it raised."""
        try:
            self.sync()
            t0 = time.perf_counter()
            ids, scores = s.search(q, out.k)
            self.sync()
            return time.perf_counter() - t0, ids, scores
        except Exception as exc:
            out.errors[s.name] = f"error: {describe(exc)}"
            log(f"  {s.name}: {out.errors[s.name]}")
            traceback.print_exc()
            return None

    def _task(self, s: System, out: CellOut) -> Callable[[int], list[float]]:
        m, nq, chk = out.m, self.Q.shape[0], self.args.check
        rows = out.rows.setdefault(s.name, {})

        def task(r: int) -> list[float]:
            if s.name in out.errors or (r > 0 and not self.budget.allows(0)):
                return []
            q = self.Q[r % nq : r % nq + 1] if m == 1 else self.Q[: out.queries[s.name]]
            res = self.timed(s, q, out)
            if res is None:
                return []
            dt, ids, scores = res
            if m == 1 and r < chk:
                rows[r % nq] = (ids[0], scores[0])
            elif m > 1 and r == 0:
                for i in range(min(chk, ids.shape[0])):
                    rows[i] = (ids[i], scores[i])
            return [dt]

        return task

    def _floor_task(self, out: CellOut) -> Callable[[int], list[float]]:
        assert self.floors is not None
        floors = self.floors

        def task(r: int) -> list[float]:
            if "floor" in out.errors:
                return []
            try:
                return [floors.gemm_once()]
            except Exception as exc:
                out.errors["floor"] = f"error: {describe(exc)}"
                return []

        return task

    # -- checks --------------------------------------------------------------------------------
    def recall(self, rows: dict[int, tuple[np.ndarray, np.ndarray]], k: int) -> float:
        """Mean tie-aware recall against the float64 brute force (a hit within a tie of the k-th)."""
        kk = min(k, self.n)
        vals = []
        for qi, (ids, _) in rows.items():
            if qi >= self.D.shape[0]:
                continue
            d = self.D[qi]
            kth = float(np.partition(d, kk - 1)[kk - 1])
            got = ids.astype(np.int64)
            got = got[(got >= 0) & (got < self.n)]
            vals.append(np.count_nonzero(d[got] <= kth + self.ref.tolerance(self.Q[qi])) / kk)
        return float(np.mean(vals)) if vals else float("nan")

    def overlap(
        self,
        rows: dict[int, tuple[np.ndarray, np.ndarray]],
        peer: dict[int, tuple[np.ndarray, np.ndarray]],
        k: int,
    ) -> float:
        vals = [
            len(set(ids.astype(np.int64).tolist()) & set(peer[qi][0].astype(np.int64).tolist()))
            / min(k, self.n)
            for qi, (ids, _) in rows.items()
            if qi in peer
        ]
        return float(np.mean(vals)) if vals else float("nan")

    def same_as_cpu(self, out: CellOut) -> tuple[int, int, str]:
        """(equal, compared, details): iqdb gpu rows whose ids and scores equal iqdb cpu's bit for bit."""
        gpu, cpu = out.rows.get("iqdb gpu", {}), out.rows.get("iqdb cpu", {})
        common = sorted(set(gpu) & set(cpu))
        equal = bad_ids = bad_scores = 0
        worst = 0.0
        for qi in common:
            (gi, gs), (ci, cs) = gpu[qi], cpu[qi]
            ids_ok = gi.shape == ci.shape and np.array_equal(gi.astype(np.uint64), ci.astype(np.uint64))
            g64, c64 = gs.astype(np.float64), cs.astype(np.float64)
            scores_ok = g64.shape == c64.shape and np.array_equal(g64.view(np.uint64), c64.view(np.uint64))
            equal += ids_ok and scores_ok
            bad_ids += not ids_ok
            bad_scores += not scores_ok
            if not scores_ok and g64.shape == c64.shape:
                worst = max(worst, float(np.nanmax(np.abs(g64 - c64), initial=0.0)))
            if not (ids_ok and scores_ok) and bad_ids + bad_scores <= 6:
                log(
                    f"  MISMATCH gpu vs cpu, m = {out.m}, k = {out.k}, query {qi}: ids equal {ids_ok}, scores equal {scores_ok}"
                )
                print(
                    f"    gpu ids {gi[:6]} scores {gs[:3]}\n    cpu ids {ci[:6]} scores {cs[:3]}", flush=True
                )
        details = ""
        if equal < len(common):
            details = f" (ids differ: {bad_ids}, scores differ: {bad_scores}, max abs diff {worst:.3g})"
        return equal, len(common), details

    # -- the table -------------------------------------------------------------------------------
    def table(self) -> Table:
        t = Table(
            f"Search, {self.label()}, L2: time per call and per query",
            [
                "m",
                "k",
                "system",
                "queries/call",
                "runs",
                "median ms",
                "best ms",
                "q/s",
                "x floor",
                f"x {self.peer or 'peer'}",
                "recall@k",
                f"overlap {self.peer or 'peer'}",
                "= cpu",
            ],
        )
        for c in self.cells:
            peer_q = c.per_query(self.peer) if self.peer else float("nan")
            for name in self.names:
                if name in c.errors:
                    t.add(f"{c.m:,}", f"{c.k:,}", name, cell_text(c.errors[name]), *["-"] * 9)
                    continue
                s = c.samples.get(name)
                if not s:
                    t.add(f"{c.m:,}", f"{c.k:,}", name, "no sample (time budget)", *["-"] * 9)
                    continue
                st = Stats(tuple(s))
                pq = st.median / c.queries[name]
                eq, n_cmp, details = c.same
                same = f"{eq}/{n_cmp}{details}" if name == "iqdb gpu" and n_cmp else "-"
                capped = " (capped)" if c.queries[name] < c.m else ""
                t.add(
                    f"{c.m:,}",
                    f"{c.k:,}",
                    name,
                    f"{c.queries[name]:,}{capped}",
                    st.count,
                    fmt_ms(st.median),
                    fmt_ms(st.best),
                    fmt_rate(1 / pq),
                    fmt_ratio(pq / (c.floor / c.m)) if np.isfinite(c.floor) else "-",
                    fmt_ratio(pq / peer_q) if np.isfinite(peer_q) else "-",
                    f"{c.recall[name]:.4f}" if name in c.recall else "-",
                    f"{c.overlap[name]:.4f}" if name in c.overlap else "-",
                    same,
                )
            if np.isfinite(c.floor):
                bound = "HBM" if c.floor_hbm >= c.floor_gemm or not np.isfinite(c.floor_gemm) else "SGEMM"
                tflops = (
                    2 * c.m * self.n * self.d / c.floor_gemm / 1e12
                    if np.isfinite(c.floor_gemm)
                    else float("nan")
                )
                t.add(
                    f"{c.m:,}",
                    f"{c.k:,}",
                    f"*floor: {bound}-bound (SGEMM {tflops:.1f} TFLOP/s)*",
                    f"{c.m:,}",
                    "-",
                    fmt_ms(c.floor),
                    "-",
                    fmt_rate(c.m / c.floor),
                    "1.00",
                    *["-"] * 4,
                )
            elif "floor" in c.errors:
                t.add(f"{c.m:,}", f"{c.k:,}", "*floor*", cell_text(c.errors["floor"]), *["-"] * 9)
        a = self.args
        t.notes += [
            "median / best ms: one call (m queries, or queries/call where capped), host queries in and host "
            "arrays out, with the device synchronised before and after; warm-up call first; systems "
            f"interleaved; runs = timed calls (at most {a.single_runs} at m = 1, each a different query, "
            f"{a.runs} otherwise, fewer once a system's timed calls add up to {a.cell_budget:g} s).",
            "q/s, x floor and x peer compare time per query, so capped rows compare on the same footing; "
            "x floor = time per query / (floor / m); above 1: slower than the floor.",
            f"iqdb cpu is capped at {a.cpu_queries} queries a call (budget): its per-query time at a "
            f"large m is that of a {a.cpu_queries}-query call, and its checks cover those queries.",
        ]
        if self.floors is not None:
            f = self.floors
            t.notes.append(
                f"floor = max(HBM, SGEMM). HBM: X's {f.nbytes / 1e9:.2f} GB over the device-to-device copy "
                f"bandwidth {f.copy_bw / 1e12:.2f} TB/s (read + write bytes, median of 10 copies of "
                f"{min(max(256 << 20, f.nbytes), 2 * GIB) / GIB:.2f} GiB) = {fmt_ms(f.hbm)} ms. SGEMM: the bare "
                f"fp32 product of the first min(m, 1,024) queries with X into a preallocated (qb, n) output, "
                f"no selection, scaled by m / qb, timed with CUDA events ({self.accel.lib if self.accel else ''}: "
                f"{self.accel.precision if self.accel else ''})."
            )
        else:
            t.notes.append(f"no floors: {self.floor_error}")
        t.notes.append(
            f"recall@k: the first {min(a.check, self.Q.shape[0])} queries (at m = 1: one per run) against a "
            "float64 brute force, ties within float32 rounding of the k-th distance counted as hits; "
            "overlap: the mean share of the peer's ids also returned; = cpu: queries whose ids and scores "
            "equal iqdb cpu's bit for bit (of those both ran)."
        )
        builds = ", ".join(f"{k} {v:.1f} s" for k, v in self.build_s.items())
        t.notes.append(f"build: {builds or '-'}.")
        t.notes += [cell_text(f"{k}: build failed: {v}") for k, v in self.broken.items()]
        t.notes += self.infos
        if self.skipped:
            t.notes.append("not run: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items()))
        return t

    def close(self) -> None:
        for s in self.systems:
            close_quietly(s)
        if self.floors is not None:
            self.floors.close()
            self.floors = None
        self.systems = []
        # the tables and targets need only the cells from here on; the caller keeps X if it wants it
        self.X = self.Q = self.D = self.ref = None  # type: ignore[assignment]
        free_device_memory()


# ---------------------------------------------------------------------------------------------
# 3. Open a durable snapshot onto the device


@dataclass
class OpenOut:
    n: int
    d: int
    nbytes: int
    build_s: float
    samples: dict[str, list[float]] = field(default_factory=dict)
    with_query: dict[str, list[float]] = field(default_factory=dict)
    ok: dict[str, list[bool]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def ratio(self, name: str) -> float:
        if not self.samples.get(name) or not self.samples.get("read"):
            return float("nan")
        return float(np.median(self.samples[name]) / np.median(self.samples["read"]))


def run_open(args: argparse.Namespace, X: np.ndarray, accel: Accel | None, root: Path) -> OpenOut:
    import iqdb

    n, d = X.shape
    path = root / f"open_{n}x{d}"
    log(f"open: building a durable {n:,} x {d} database in {path}")
    t0 = time.perf_counter()
    db = iqdb.open(path, device="cpu", wal_limit=1 << 40)
    for a in range(0, n, CHUNK):
        db.upsert_many(np.arange(a, min(n, a + CHUNK), dtype=np.uint64), X[a : a + CHUNK])
    db.close()  # compacts: the snapshot holds every row, the WAL is empty
    files = [p for p in (path / "snap", path / "wal") if p.exists() and p.stat().st_size]
    out = OpenOut(n, d, sum(p.stat().st_size for p in files), time.perf_counter() - t0)
    log(
        f"  built in {out.build_s:.1f} s: {', '.join(f'{p.name} {p.stat().st_size / 1e9:.2f} GB' for p in files)}"
    )
    q_row = min(123, n - 1)

    def read(r: int) -> list[float]:
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                data = fh.read()
            del data
        return [time.perf_counter() - t0]

    def opener(device: str) -> Callable[[int], list[float]]:
        name = f"iqdb {device}"

        def task(r: int) -> list[float]:
            if name in out.errors:
                return []
            try:
                t0 = time.perf_counter()
                # read-only: the same snapshot load, and close() does not compact (rewrite) it
                db = iqdb.open(path, device=device, readonly=True)
                if accel is not None and device != "cpu":
                    accel.sync()
                t1 = time.perf_counter()
                ids, _ = db.search_arrays(X[q_row : q_row + 1], 10, "l2")
                if accel is not None and device != "cpu":
                    accel.sync()
                t2 = time.perf_counter()
                db.close()
            except Exception as exc:
                out.errors[name] = f"error: {describe(exc)}"
                log(f"  {name}: {out.errors[name]}")
                traceback.print_exc()
                return []
            finally:
                free_device_memory()
            if r >= 0:
                out.with_query.setdefault(name, []).append(t2 - t0)
                out.ok.setdefault(name, []).append(int(to_host(ids)[0][0]) == q_row)
            return [t1 - t0]

        return task

    devices = ["cpu"] if args.cpu_smoke else [args.device, "cpu"]
    tasks = {"read": read, **{f"iqdb {dv}": opener(dv) for dv in devices}}
    for fn in tasks.values():  # warm-up: the page cache, CUDA and iqdb's first-use work
        fn(-1)
    log(f"open: {args.opens} interleaved rounds of {', '.join(tasks)}")
    out.samples.update(interleave(tasks, args.opens, float("inf"), pause_s=0.0))
    if args.cpu_smoke:
        out.errors[f"iqdb {args.device}"] = "skipped: --cpu-smoke"
    shutil.rmtree(path, ignore_errors=True)
    return out


def open_table(o: OpenOut, device: str) -> Table:
    t = Table(
        f"Open a {o.n:,} x {o.d} durable snapshot ({o.nbytes / 1e9:.2f} GB), warm page cache",
        [
            "what",
            "runs",
            "median s",
            "best s",
            "x read",
            "open + first query s",
            "(open + query) x read",
            "query ok",
        ],
    )
    read = o.samples.get("read", [])
    read_med = float(np.median(read)) if read else float("nan")
    t.add(
        "read the bytes",
        len(read),
        *(f"{x:.3f}" for x in (read_med, min(read, default=float("nan")))),
        "1.00",
        *["-"] * 3,
    )
    for name in (f"iqdb {device}", "iqdb cpu"):
        if name in o.errors:
            t.add(name, cell_text(o.errors[name]), *["-"] * 6)
            continue
        s = o.samples.get(name, [])
        if not s:
            continue
        wq = float(np.median(o.with_query[name]))
        t.add(
            name,
            len(s),
            f"{np.median(s):.3f}",
            f"{min(s):.3f}",
            fmt_ratio(o.ratio(name)),
            f"{wq:.3f}",
            fmt_ratio(wq / read_med),
            f"{sum(o.ok[name])}/{len(o.ok[name])}",
        )
    t.notes += [
        f'built with `iqdb.open(path, device="cpu")`, `upsert_many` in chunks, `close()` (compaction), '
        f'in {o.build_s:.1f} s; read = `open(f, "rb").read()` of every file, after a warm-up read.',
        '`iqdb X` = `iqdb.open(path, device="X", readonly=True)`: read-only is the same snapshot load, '
        "and its close does not compact (rewrite) the snapshot; "
        "timed to the device synchronised; then one top-10 query of a stored row (query ok: it "
        "comes first). Device memory is released between opens. Interleaved rounds after one "
        f"warm-up round; target: open within {TARGET_OPEN:g}x of reading the bytes.",
    ]
    return t


def device_used() -> tuple[int, int] | None:
    """(bytes in use on device 0 not counting CuPy's cached free blocks, total), or ``None``."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return None
    free, total = cupy.cuda.runtime.memGetInfo()
    return int(total - free - cupy.get_default_memory_pool().free_bytes()), int(total)


def run_growth(args: argparse.Namespace, accel: Accel | None) -> Table:
    """An in-memory database grown from empty in 100 writes, a top-10 query after each: the time,
    and on the device the mirror's size and the most device memory in use after a write's query
    (growth backs the mirror with more memory in place: kernels/_vmm.py)."""
    import iqdb

    n, d = min(args.n, 1_000_000), 128
    step = max(1, n // 100)
    X = make_data(n, d, seed=4)
    matrix = X.nbytes
    t = Table(
        f"Grow a database from empty to {n:,} x {d} in writes of {step:,} rows, a query after each",
        [
            "device",
            "s in all",
            "ms per write + query",
            "peak in use / matrix",
            "mirror / matrix",
            "grows in place",
        ],
    )
    devices = ["cpu"] if args.cpu_smoke else [args.device, "cpu"]
    for device in devices:
        free_device_memory()
        try:
            base = device_used() if device != "cpu" else None
            db = iqdb.open_in_memory(device=device)
            peak = 0
            t0 = time.perf_counter()
            for a in range(0, n, step):
                db.upsert_many(np.arange(a, min(n, a + step), dtype=np.uint64), X[a : a + step])
                ids, _ = db.search_arrays(X[a : a + 1], 10, "l2")
                if accel is not None and device != "cpu":
                    accel.sync()
                    now = device_used()
                    if now is not None and base is not None:
                        peak = max(peak, now[0] - base[0])
                if int(to_host(ids)[0][0]) != a:
                    raise AssertionError(
                        f"after {a + step:,} rows the query of row {a} did not find it first"
                    )
            took = time.perf_counter() - t0
            mirror = db.memory_usage()["device"]
            layout = db._store.version.layout
            grows = "-" if layout.mirror is None else ("yes" if layout.mirror.buffers is not None else "no")
            db.close()
        except Exception as exc:
            t.add(f"iqdb {device}", cell_text(f"error: {describe(exc)}"), *["-"] * 4)
            traceback.print_exc()
            continue
        on_device = device != "cpu"
        t.add(
            f"iqdb {device}",
            f"{took:.2f}",
            f"{1e3 * took / math.ceil(n / step):.2f}",
            f"{peak / matrix:.2f}" if on_device and accel is not None else "-",
            f"{mirror / matrix:.2f}" if on_device else "-",
            grows,
        )
    t.notes += [
        "peak in use: device memory in use (cudaMemGetInfo, less CuPy's cached free blocks) after each "
        "write's query, over the vectors' bytes; mirror: `db.memory_usage()['device']` at the end (vectors, "
        "norms and ids: about (4d + 24) / 4d of the matrix at the capacity, 1.2x growth steps). Target: "
        "near 1x plus the growth step; a copy into a bigger allocation would peak at 2.2x. Each query "
        "checks that the last write's first row comes first.",
    ]
    return t


# ---------------------------------------------------------------------------------------------
# Targets, machine, result file


def targets_table(
    args: argparse.Namespace, tests: TestRun | None, shapes: list[ShapeRun], opened: OpenOut | None
) -> Table:
    t = Table("Targets (issue 10)", ["target", "case", "measured", "verdict"])

    def verdict(x: float, goal: float) -> str:
        return "-" if not np.isfinite(x) else ("PASS" if x <= goal else "FAIL")

    if tests is not None:
        t.add("GPU tests pass", "`pytest -m gpu`", cell_text(tests.text()), tests.verdict())
    equal = compared = cells = 0
    failed: list[str] = []
    for sh in shapes:
        for c in sh.cells:
            cells += "iqdb gpu" in sh.names
            if c.errors.get("iqdb gpu", "").startswith(("error", "build")):
                failed.append(f"{sh.label()} m = {c.m:,} k = {c.k:,}")
            if "iqdb gpu" in c.errors or "iqdb gpu" not in c.samples:
                continue
            if c.m == 1 and np.isfinite(c.floor_hbm):
                x = c.per_query("iqdb gpu") / c.floor_hbm
                t.add(
                    f"single query <= {TARGET_SINGLE:g}x HBM floor",
                    f"{sh.label()}, k = {c.k:,}",
                    f"{fmt_ratio(x)}x ({fmt_ms(c.per_query('iqdb gpu'))} ms vs {fmt_ms(c.floor_hbm)} ms)",
                    verdict(x, TARGET_SINGLE),
                )
            if c.m >= 1024 and sh.peer and sh.peer in c.samples:
                x = c.per_query("iqdb gpu") / c.per_query(sh.peer)
                v = verdict(x, TARGET_BATCH)
                if sh.peer != "faiss gpu":
                    v += " (vs torch: FAISS GPU absent)"
                t.add(
                    f"batch <= {TARGET_BATCH:g}x FAISS GPU",
                    f"{sh.label()}, m = {c.m:,}, k = {c.k:,}",
                    f"{fmt_ratio(x)}x",
                    v,
                )
            eq, n_cmp, _ = c.same
            equal += eq
            compared += n_cmp
    if cells:
        t.add(
            "iqdb gpu runs every cell",
            f"{cells} cells",
            cell_text(
                f"{len(failed)} failed"
                + (f" ({', '.join(failed[:4])}{', ...' if len(failed) > 4 else ''})" if failed else "")
            ),
            "FAIL" if failed else "PASS",
        )
    if compared:
        t.add(
            "same ids and scores as the CPU",
            "every cell's checked queries",
            f"{equal}/{compared}",
            "PASS" if equal == compared else "FAIL",
        )
    if opened is not None:
        name = f"iqdb {args.device}"
        x = opened.ratio(name)
        t.add(
            f"open <= {TARGET_OPEN:g}x reading the bytes",
            f"{opened.n:,} x {opened.d}",
            f"{fmt_ratio(x)}x" if np.isfinite(x) else cell_text(opened.errors.get(name, "-")),
            "FAIL" if opened.errors.get(name, "").startswith("error") else verdict(x, TARGET_OPEN),
        )
    if not t.rows:
        t.add("-", "-", "nothing measured on a GPU", "-")
    return t


def gpu_rows(accel: Accel | None) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    smi = ""
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,pcie.link.gen.max",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        smi = f"nvidia-smi unavailable ({describe(exc)})"
    rows.append(("GPU (nvidia-smi: name, driver, memory, max SM / memory clock, PCIe gen)", smi or "-"))
    if accel is not None:
        rows.append(("GPU (CUDA device 0)", accel.name()))
        if accel.lib == "torch":
            torch = accel.mod
            p = torch.cuda.get_device_properties(0)
            rows.append(
                (
                    "CUDA (torch)",
                    f"{torch.version.cuda}; {p.multi_processor_count} SMs, {p.total_memory / GIB:.0f} GiB",
                )
            )
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            rt = cupy.cuda.runtime
            ver = f"{cupy.__version__}; CUDA runtime {rt.runtimeGetVersion()}, driver API {rt.driverGetVersion()}"
            try:
                from cupy_backends.cuda.libs import cublas

                ver += f", cuBLAS {cublas.getVersion(cupy.cuda.device.get_cublas_handle())}"
            except Exception:
                pass
            rows.append(("cupy", ver))
        except Exception as exc:
            rows.append(("cupy", f"{cupy.__version__} ({describe(exc)})"))
    else:
        found = importlib.util.find_spec("cupy") is not None
        rows.append(("cupy", "not imported" if found else "not installed"))
    for mod in ("torch", "faiss"):
        m = sys.modules.get(mod)
        if m is not None:
            rows.append((mod, str(getattr(m, "__version__", "?"))))
        else:
            rows.append((mod, "not imported" if importlib.util.find_spec(mod) else "not installed"))
    if accel is not None:
        rows.append(("floors' fp32 setting", accel.precision))
    env = [
        f"{k}={os.environ[k]}"
        for k in ("CUPY_TF32", "NVIDIA_TF32_OVERRIDE", "CUDA_VISIBLE_DEVICES", "IQDB_DEVICE")
        if k in os.environ
    ]
    rows.append(
        (
            "GPU environment",
            ", ".join(env)
            or "none of CUPY_TF32, NVIDIA_TF32_OVERRIDE, CUDA_VISIBLE_DEVICES, IQDB_DEVICE set",
        )
    )
    try:
        import iqdb

        rows.append(("iqdb", f"{iqdb.__version__} from {Path(iqdb.__file__).parent}"))
    except Exception as exc:
        rows.append(("iqdb", f"not importable: {describe(exc)}"))
    return rows


def gpu_tag(accel: Accel | None) -> str:
    name = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        name = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.splitlines()[0]
    if not name and accel is not None:
        name = accel.name()
    words = [
        w for w in re.findall(r"[A-Za-z0-9]+", name) if w.lower() not in ("nvidia", "tesla", "geforce", "rtx")
    ]
    return words[0].lower() if words else "gpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    num = lambda s: int(float(s))  # noqa: E731 (accepts 1e6)
    ints = lambda s: [int(float(x)) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--quick", action="store_true", help="smoke run: 20,000 x 64, one run, no tests")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="--quick with every GPU system skipped (runs anywhere)"
    )
    p.add_argument("--n", type=num, default=None, help="stored vectors (default 1e6; quick 2e4)")
    p.add_argument(
        "--dims", type=ints, default=None, help="dimensions, comma-separated (default 768,128; quick 64)"
    )
    p.add_argument("--batches", type=ints, default=[1, 64, 1024, 10000], help="queries per call")
    p.add_argument("--ks", type=ints, default=[10, 1000])
    p.add_argument(
        "--runs", type=int, default=None, help="timed calls per system and cell (default 5; quick 1)"
    )
    p.add_argument("--single-runs", type=int, default=None, help="timed calls at m = 1 (default 20; quick 1)")
    p.add_argument("--cpu-queries", type=int, default=16, help="most queries a call for iqdb cpu")
    p.add_argument("--check", type=int, default=None, help="queries checked (default 8; quick 4)")
    p.add_argument(
        "--cell-budget", type=float, default=4.0, help="seconds of timed calls per system and cell"
    )
    p.add_argument(
        "--max-call", type=float, default=60.0, help="skip a cell where one call is predicted longer"
    )
    p.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole run (default 450; quick 300)"
    )
    p.add_argument("--bench-min", type=float, default=240.0, help="seconds the tests leave for the benchmark")
    p.add_argument("--test-timeout", type=float, default=180.0)
    p.add_argument(
        "--tests",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the GPU tests first (default: yes, except --quick)",
    )
    p.add_argument(
        "--open-dim",
        default=None,
        help="d of the open case, one of --dims (default 768 if there, else the first; 'none' skips it)",
    )
    p.add_argument("--opens", type=int, default=None, help="interleaved open rounds (default 3; quick 1)")
    p.add_argument(
        "--peer",
        choices=["auto", "faiss", "torch", "both", "none"],
        default="auto",
        help="auto: FAISS GPU, else torch",
    )
    p.add_argument("--device", default="cuda:0", help="iqdb's GPU device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tag", default=None, help="result file bench/results/gpu_<tag>.md (default: the GPU, e.g. h200)"
    )
    p.add_argument("--out", type=Path, default=None, help="result file path (overrides --tag)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the durable database goes (default: a temp dir)"
    )
    args = p.parse_args(argv)
    small = args.quick or args.cpu_smoke
    pick = lambda v, full, quick: v if v is not None else (quick if small else full)  # noqa: E731
    args.n = pick(args.n, 1_000_000, 20_000)
    args.dims = pick(args.dims, [768, 128], [64])
    args.runs = pick(args.runs, 5, 1)
    args.single_runs = pick(args.single_runs, 20, 1)
    args.check = pick(args.check, 8, 4)
    args.budget = pick(args.budget, 450.0, 300.0)
    args.opens = pick(args.opens, 3, 1)
    open_dim = args.open_dim or ("768" if 768 in args.dims else str(args.dims[0]))
    args.open_dim = None if str(open_dim).lower() == "none" else int(open_dim)
    args.tests = args.tests if args.tests is not None else (args.cpu_smoke or not args.quick)
    if small:
        args.bench_min = min(args.bench_min, 60.0)
    return args


@dataclass
class Run:
    """Everything measured so far, and how to write it."""

    args: argparse.Namespace
    accel: Accel | None
    budget: Budget
    path: Path
    tests: TestRun | None = None
    shapes: list[ShapeRun] = field(default_factory=list)
    tables: list[tuple[str, Table]] = field(default_factory=list)
    opened: OpenOut | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    load_start: str = field(default_factory=loadavg)
    data: np.ndarray | None = None  # the last shape's X, for the open case

    def section(self, what: str, fn: Callable[[], object]) -> None:
        """Run one section; a failure is reported and the run goes on (SIGTERM stops it)."""
        try:
            fn()
        except Stop:
            raise
        except Exception as exc:
            self.problems.append(f"{what}: {describe(exc)}")
            log(f"SECTION FAILED {what}: {describe(exc)}")
            traceback.print_exc()

    def problem(self, text: str) -> None:
        self.problems.append(text)
        log(text)

    def emit(self) -> None:
        """(Re)write the result file with everything measured so far; a failure here is only logged."""
        if self.args.no_write:
            return
        try:
            self._write()
        except Exception as exc:
            log(f"writing {self.path} failed: {describe(exc)}")
            traceback.print_exc()

    def _write(self) -> None:
        args = self.args
        machine_rows = machine([]) + gpu_rows(self.accel)  # again each time: the peers import late
        sections = [targets_table(args, self.tests, self.shapes, self.opened).markdown()]
        sections += [f"## {head}\n\n{tab.markdown()}" for head, tab in self.tables]
        every = (IqdbSystem(args.device), IqdbSystem("cpu"), FaissGpuSystem(), TorchSystem())
        sections.append("\n".join(["## Systems", "", *(f"- `{s.name}`: {s.note}" for s in every)]))
        intro = [
            "iqdb on the GPU against its CPU path and FAISS GPU's flat index (torch when faiss has no GPU "
            "support), on seeded standard-normal float32 data, L2; floors measured in the same run. "
            "Compare ratios within this file only.",
            "",
            f"Load average at the start: {self.load_start}; at this write: {loadavg()}. Peak RSS "
            f"{peak_rss_gib():.1f} GiB. Wall time {time.perf_counter() - T0:.0f} s of a {args.budget:.0f} s budget.",
        ]
        if self.skipped:
            intro += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())]
        if self.problems:
            intro += ["", "Cut short or failed: " + "; ".join(self.problems)]
        write_result(
            self.path, "iqdb GPU benchmark: search and open on the device", intro, machine_rows, sections
        )

    def do_tests(self) -> None:
        self.tests = run_tests(self.args, self.budget)
        self.tables.append(("GPU tests", tests_table(self.tests)))

    def do_shape(self, d: int) -> None:
        """The search cells on ``n x d``; keeps the data in ``self.data`` for the open case."""
        args = self.args
        need = 10 + args.n * d * 4 / 1e8
        if not self.budget.allows(need):
            self.problem(
                f"{args.n:,} x {d}: skipped, {self.budget.left():.0f} s left (needs about {need:.0f} s)"
            )
            return
        sh = ShapeRun(args, args.n, d, self.accel, self.budget, self.skipped)
        self.shapes.append(sh)
        self.data = sh.X
        try:
            for m in args.batches:
                for k in args.ks:
                    if not self.budget.allows(5):
                        self.problem(
                            f"{sh.label()}: the cells from m = {m:,}, k = {k:,} on were skipped (time budget)"
                        )
                        return
                    if k <= args.n:
                        sh.cell(m, k)
        finally:
            t = sh.table()
            print("\n" + t.text() + "\n", flush=True)
            self.tables.append((sh.label(), t))
            sh.close()

    def do_growth(self) -> None:
        need = 10 + min(self.args.n, 1_000_000) * 128 * 4 / 0.05e9
        if not self.budget.allows(need):
            self.problem(f"growth: skipped, {self.budget.left():.0f} s left (needs about {need:.0f} s)")
            return
        t = run_growth(self.args, self.accel)
        print("\n" + t.text() + "\n", flush=True)
        self.tables.append(("Growth", t))

    def do_open(self, root: Path) -> None:
        args, X = self.args, self.data
        assert X is not None
        need = 15 + X.nbytes / 0.08e9
        if not self.budget.allows(need):
            self.problem(f"open: skipped, {self.budget.left():.0f} s left (needs about {need:.0f} s)")
            return
        self.opened = run_open(args, X, self.accel, root)
        t = open_table(self.opened, args.device)
        print("\n" + t.text() + "\n", flush=True)
        self.tables.append(("Open", t))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    log(
        f"bench_gpu: n = {args.n:,}, d = {args.dims}, m = {args.batches}, k = {args.ks}, budget {args.budget:.0f} s"
    )
    try:
        import iqdb  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))  # a checkout without an install: iqdb adopts kernels/ itself
    accel: Accel | None = None
    args.accel_reasons = ["--cpu-smoke: no GPU library is used"]
    if not args.cpu_smoke:
        accel, args.accel_reasons = Accel.find()
    log(
        "device timing and floors: "
        + (accel.lib if accel else "none (" + "; ".join(args.accel_reasons) + ")")
    )
    tag = args.tag or ("cpu_smoke" if args.cpu_smoke else gpu_tag(accel) + ("_quick" if args.quick else ""))
    if args.out is not None:
        path = args.out
    elif args.cpu_smoke and args.tag is None:  # a smoke run leaves no file in the repository
        path = Path(tempfile.gettempdir()) / "iqdb_bench_gpu_cpu_smoke.md"
    else:
        path = RESULTS / f"gpu_{tag}.md"
    run = Run(args, accel, Budget(args.budget, reserve=10.0), path)
    root = Path(tempfile.mkdtemp(prefix="iqdb_bench_gpu_", dir=args.workdir))
    try:
        if args.tests:
            run.section("GPU tests", run.do_tests)
            run.emit()
        for d in args.dims:
            run.section(f"search {args.n:,} x {d}", lambda d=d: run.do_shape(d))
            run.emit()
            if run.data is not None and d == args.open_dim and run.opened is None:
                run.section("open", lambda: run.do_open(root))
                run.emit()
            run.data = None
            gc.collect()
        run.section("growth", run.do_growth)
        run.emit()
        if args.open_dim is not None and args.open_dim not in args.dims:
            run.problem(f"open: d = {args.open_dim} is not among --dims, so it did not run")
    except Stop as exc:
        run.problem(f"stopped by {exc}; what was measured before is kept")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    run.emit()
    if run.skipped:
        log("not run: " + "; ".join(f"{k}: {v}" for k, v in run.skipped.items()))
    print("\n" + targets_table(args, run.tests, run.shapes, run.opened).text() + "\n", flush=True)
    log(
        f"done in {time.perf_counter() - T0:.0f} s"
        + (f"; {len(run.problems)} problem(s)" if run.problems else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
