"""Shared harness for iqdb's benchmarks: data, timing, interleaving, floors, peers, tables.

Not a test module and not part of the installed package: ``bench/bench_search.py`` imports it
from its own directory. Every peer library is imported lazily inside its adapter, so ruff, mypy
and pytest never need faiss, hnswlib, usearch, sqlite-vec or lancedb installed.

>>> import numpy as np
>>> X = make_vectors(1000, 16, seed=0, normalize=False)
>>> peer = NumpyPeer()
>>> peer.build(X, "l2")
>>> int(peer.ids(peer.search(X[3], 2), 2)[0])
3
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import hashlib
import importlib
import importlib.metadata
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PAUSE_S = 0.25  # between interleaved blocks: lets spinning BLAS/OpenMP workers of one library go idle
METRICS = ("l2", "ip")  # "ip": rows and queries L2-normalised, inner product (= cosine ranking)

# ---------------------------------------------------------------------------------------------
# Data


def make_vectors(n: int, d: int, seed: int, normalize: bool) -> np.ndarray:
    """Seeded standard-normal float32 ``(n, d)``, generated directly in float32 (no float64 copy)."""
    X = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    if normalize:
        for r0 in range(0, n, 1 << 16):
            blk = X[r0 : r0 + (1 << 16)]
            blk /= np.linalg.norm(blk, axis=1, keepdims=True)
    return X


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Stats:
    """Summary of timing samples in seconds (each sample: one call, or one query)."""

    samples: tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.samples, 99))

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def worst(self) -> float:
        return max(self.samples)


def seconds_per_call(fn: Callable[[], object], min_time: float = 0.05, max_calls: int = 1000) -> float:
    """Average seconds of ``fn()`` over as many back-to-back calls as fill ``min_time`` (short calls)."""
    calls = 0
    t0 = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or calls >= max_calls:
            return elapsed / calls


def interleave(
    tasks: dict[str, Callable[[int], list[float]]],
    rounds: int,
    budget_s: float,
    pause_s: float = PAUSE_S,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Run ``tasks`` in blocks, A B C ... then C B A ..., sleeping ``pause_s`` between blocks.

    ``tasks[name](round_index)`` runs one block and returns its timing samples (seconds). A task
    whose samples already add up to ``budget_s`` sits out the remaining rounds (it always gets
    the first). Interleaving spreads the machine's slow minutes over every system instead of
    charging them to whichever ran then; the pause matters because OpenBLAS and OpenMP worker
    threads keep spinning after a call and, on 2 cores, slow the next library down (§7 of the
    performance notes).
    """
    out: dict[str, list[float]] = {name: [] for name in tasks}
    names = list(tasks)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            if out[name] and sum(out[name]) >= budget_s:
                continue
            out[name].extend(tasks[name](r))
            if log is not None:
                log(f"  round {r + 1}/{rounds} {name}: {len(out[name])} samples")
            time.sleep(pause_s)
    return out


# ---------------------------------------------------------------------------------------------
# Floors: what the hardware allows, measured in the same run


class ReadFloor:
    """Time for NumPy to read the whole matrix once: the bandwidth floor of one query.

    Each sample is the faster of a one-thread ``X.max()`` and the same reduction split over
    ``threads`` threads (NumPy releases the GIL in reductions); bytes / time is the read rate.
    """

    def __init__(self, X: np.ndarray, threads: int | None = None) -> None:
        self.flat = X.reshape(-1)
        self.nbytes = X.nbytes
        self.threads = threads or os.cpu_count() or 1
        self.parts = np.array_split(self.flat, self.threads)
        self.pool = ThreadPoolExecutor(self.threads)

    def once(self) -> float:
        t0 = time.perf_counter()
        self.flat.max()
        t1 = time.perf_counter()
        list(self.pool.map(np.max, self.parts))
        t2 = time.perf_counter()
        return min(t1 - t0, t2 - t1)

    def close(self) -> None:
        self.pool.shutdown()


class GemmFloor:
    """The bare blocked matrix product of a batch's shape, no selection: the floor of a batch.

    Scores go into preallocated tiles (queries in blocks of at most 1,024, stored rows in tiles),
    i.e. ``2 m n d`` flops at the BLAS's rate for ``K = d``, computed two ways and timed both:
    (a) the BLAS threads each product, 16 MiB tiles; (b) the rows are split over the cores,
    each thread running its own products with the BLAS on one thread (how iqdb runs), 8 MiB
    tiles per thread. :meth:`run` returns the faster: the floor is the best this machine's BLAS
    does for the shape. Tile widths are not powers of two (those alias in the caches and slow
    the product by up to 15 %).
    """

    def __init__(self, X: np.ndarray, m: int, threads: int | None = None) -> None:
        self.X = X
        self.qb = max(1, min(m, 1024))
        self.threads = threads or len(os.sched_getaffinity(0))
        self.tile_a = self._width(16 << 20)
        self.tile_b = self._width(8 << 20)
        self.buf = np.empty(self.qb * self.tile_a, dtype=np.float32)
        self.bufs = [np.empty(self.qb * self.tile_b, dtype=np.float32) for _ in range(self.threads)]
        self.pool = ThreadPoolExecutor(self.threads)
        from threadpoolctl import ThreadpoolController

        self.blas = ThreadpoolController().select(user_api="blas")

    def _width(self, nbytes: int) -> int:
        w = max(64, nbytes // (4 * self.qb)) // 64 * 64
        w -= 64 if w & (w - 1) == 0 else 0
        return min(self.X.shape[0], w)

    def _tiles(self, Qb: np.ndarray, buf: np.ndarray, lo: int, hi: int, tile: int) -> None:
        for r0 in range(lo, hi, tile):
            r1 = min(hi, r0 + tile)
            # a C-contiguous view of the buffer for every tile shape: BLAS writes in place
            out = buf[: Qb.shape[0] * (r1 - r0)].reshape(Qb.shape[0], r1 - r0)
            np.matmul(Qb, self.X[r0:r1].T, out=out)

    def run_threaded_blas(self, Q: np.ndarray) -> None:
        for q0 in range(0, Q.shape[0], self.qb):
            self._tiles(Q[q0 : q0 + self.qb], self.buf, 0, self.X.shape[0], self.tile_a)

    def run_split(self, Q: np.ndarray) -> None:
        n, w = self.X.shape[0], self.threads
        with self.blas.limit(limits=1):
            for q0 in range(0, Q.shape[0], self.qb):
                Qb = Q[q0 : q0 + self.qb]
                parts = [(n * i // w, n * (i + 1) // w) for i in range(w)]
                run = functools.partial(self._split_task, Qb, parts)
                list(self.pool.map(run, range(w)))

    def _split_task(self, Qb: np.ndarray, parts: list[tuple[int, int]], i: int) -> None:
        self._tiles(Qb, self.bufs[i], *parts[i], self.tile_b)

    def run(self, Q: np.ndarray) -> float:
        """Seconds of the faster of the two ways (each timed once, back to back)."""
        t0 = time.perf_counter()
        self.run_threaded_blas(Q)
        t1 = time.perf_counter()
        self.run_split(Q)
        t2 = time.perf_counter()
        return min(t1 - t0, t2 - t1)

    def close(self) -> None:
        self.pool.shutdown()


# ---------------------------------------------------------------------------------------------
# Exact reference and result checks


class Reference:
    """Exact top-k in float64 for a few queries, with a tolerance that defines a tie."""

    def __init__(self, X: np.ndarray, metric: str) -> None:
        self.X = X
        self.metric = metric
        self.max_norm_sq = float(np.max(np.einsum("ij,ij->i", X, X, dtype=np.float64)))

    def distances(self, Q: np.ndarray) -> np.ndarray:
        """``(m, n)`` float64 distances (squared L2, or negated inner product), in row chunks."""
        Q64 = Q.astype(np.float64)
        out = np.empty((Q.shape[0], self.X.shape[0]), dtype=np.float64)
        for r0 in range(0, self.X.shape[0], 1 << 16):
            blk = self.X[r0 : r0 + (1 << 16)].astype(np.float64)
            s = Q64 @ blk.T
            if self.metric == "l2":
                s = (
                    np.einsum("ij,ij->i", blk, blk)[None, :]
                    - 2 * s
                    + np.einsum("ij,ij->i", Q64, Q64)[:, None]
                )
            else:
                s = -s
            out[:, r0 : r0 + blk.shape[0]] = s
        return out

    def tolerance(self, q: np.ndarray) -> float:
        """Distances closer than this are a tie: float32 scoring may order them either way."""
        qn = float(np.dot(q.astype(np.float64), q))
        if self.metric == "l2":
            return 2e-5 * (qn + self.max_norm_sq)
        return 2e-5 * np.sqrt(qn * self.max_norm_sq)


@dataclass
class Check:
    """Result quality over the checked queries of one system in one case."""

    queries: int = 0
    recall_sum: float = 0.0  # tie-aware: a returned id counts if it is within a tie of the k-th
    strict_sum: float = 0.0  # plain set intersection with the float64 top-k
    same_as_iqdb: int = 0  # queries whose id set equals iqdb's
    ties_only: int = 0  # of the others: those that differ from iqdb only by ties
    compared: int = 0

    @property
    def recall(self) -> float:
        return self.recall_sum / self.queries if self.queries else float("nan")

    @property
    def strict(self) -> float:
        return self.strict_sum / self.queries if self.queries else float("nan")

    def iqdb_text(self) -> str:
        if not self.compared:
            return "-"
        text = f"{self.same_as_iqdb}/{self.compared}"
        if self.ties_only:
            text += f" (+{self.ties_only} ties)"
        return text


def check_ids(
    ref: Reference, Q: np.ndarray, k: int, found: dict[str, np.ndarray], baseline: str = "iqdb"
) -> dict[str, Check]:
    """Compare each system's ``(m, k)`` ids for queries ``Q`` with the float64 top-k and with iqdb.

    A system's row may cover fewer queries than ``Q`` (capped systems): only its rows are checked.
    """
    checks = {name: Check() for name in found}
    if Q.shape[0] == 0:
        return checks
    D = ref.distances(Q)
    kk = min(k, D.shape[1])
    for i in range(Q.shape[0]):
        d = D[i]
        part = np.argpartition(d, kk - 1)[:kk]
        kth = float(d[part].max())
        tol = ref.tolerance(Q[i])
        truth = set(part.tolist())
        base = found.get(baseline)
        base_set = set(base[i].tolist()) if base is not None and i < base.shape[0] else None
        for name, ids in found.items():
            if i >= ids.shape[0]:
                continue
            row = ids[i][ids[i] >= 0]
            c = checks[name]
            c.queries += 1
            c.strict_sum += len(truth.intersection(row.tolist())) / kk
            c.recall_sum += float(np.count_nonzero(d[row] <= kth + tol)) / kk
            if base_set is not None and name != baseline:
                c.compared += 1
                got = set(row.tolist())
                if got == base_set:
                    c.same_as_iqdb += 1
                elif all(d[j] >= kth - tol and d[j] <= kth + tol for j in got.symmetric_difference(base_set)):
                    c.ties_only += 1
    return checks


# ---------------------------------------------------------------------------------------------
# Peers: one small adapter per system, all with the same interface


class Peer:
    """A system under test. ``search``/``search_batch`` return the system's native result (what is
    timed); ``ids``/``batch_ids`` convert it to int64 row ids afterwards, outside the timing."""

    name = "peer"
    #: most queries one timed batch call gets (slow systems); throughput is per query either way
    batch_cap: int | None = None
    #: most single queries (slow systems)
    single_cap: int | None = None
    note = ""
    #: results are Python objects per hit (memory and time grow with m * k; the sweep guards them)
    object_results = False

    def __init__(self) -> None:
        self.metric = "l2"
        self.dim = 0

    def available(self) -> None:
        """Import what the peer needs; raises (ImportError, ...) with the reason if it cannot run."""

    def version(self) -> str:
        return ""

    def build(self, X: np.ndarray, metric: str) -> None:
        raise NotImplementedError

    def search(self, q: np.ndarray, k: int) -> Any:
        raise NotImplementedError

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        raise NotImplementedError

    def ids(self, result: Any, k: int) -> np.ndarray:
        return np.asarray(result, dtype=np.int64).reshape(-1)

    def batch_ids(self, result: Any, k: int) -> np.ndarray:
        return np.asarray(result, dtype=np.int64)

    def close(self) -> None:
        """Free the index."""


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class IqdbPeer(Peer):
    name = "iqdb"
    note = (
        "`iqdb.open_in_memory()`; `search` (a list of SearchResult) with metric l2 (ip: dot); batches "
        "with `search_arrays` (ids and scores as NumPy arrays, as faiss returns them)"
    )

    def available(self) -> None:
        importlib.import_module("iqdb")

    def version(self) -> str:
        import iqdb

        return str(iqdb.__version__)

    def build(self, X: np.ndarray, metric: str) -> None:
        import iqdb

        self.metric = metric
        self.iq_metric = "l2" if metric == "l2" else "dot"
        self.db = iqdb.open_in_memory(device="cpu")
        self.db.upsert_many(np.arange(X.shape[0], dtype=np.uint64), X)

    def search(self, q: np.ndarray, k: int) -> Any:
        return self.db.search(q, k, self.iq_metric)

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        return self.db.search_arrays(Q, k, self.iq_metric)

    def ids(self, result: Any, k: int) -> np.ndarray:
        return np.array([int(r.id) for r in result], dtype=np.int64)

    def batch_ids(self, result: Any, k: int) -> np.ndarray:
        ids, _scores = result
        out = np.full((ids.shape[0], k), -1, dtype=np.int64)
        out[:, : ids.shape[1]] = ids.astype(np.int64)
        return out

    def close(self) -> None:
        self.db.close()
        del self.db


class IqdbListsPeer(IqdbPeer):
    """iqdb's batch as lists of SearchResult objects (``search_batch``): the cost of the objects."""

    name = "iqdb_lists"
    note = "the same database; batches with `search_batch` (a list of SearchResult per query)"
    object_results = True

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        return self.db.search_batch(Q, k, self.iq_metric)

    def batch_ids(self, result: Any, k: int) -> np.ndarray:
        out = np.full((len(result), k), -1, dtype=np.int64)
        for i, row in enumerate(result):
            out[i, : len(row)] = [int(r.id) for r in row]
        return out


class NumpyPeer(Peer):
    """Plain NumPy: ``X @ q`` + ``argpartition``; batches in query chunks of <= 256 MB of scores."""

    name = "numpy"
    note = "`X @ q` + `argpartition` + sort of k; batch: `Q @ X.T` in query chunks (256 MB of scores)"

    def version(self) -> str:
        return np.__version__

    def build(self, X: np.ndarray, metric: str) -> None:
        self.X = X  # shares the caller's matrix: no copy
        self.metric = metric
        self.norms = np.einsum("ij,ij->i", X, X) if metric == "l2" else None

    def _scores(self, S: np.ndarray) -> np.ndarray:
        # Smaller is better: ||x||^2 - 2 x.q (L2 up to the constant ||q||^2), or -x.q.
        if self.norms is not None:
            S *= -2
            S += self.norms
        else:
            np.negative(S, out=S)
        return S

    def search(self, q: np.ndarray, k: int) -> Any:
        s = self._scores(self.X @ q)
        kk = min(k, s.shape[0])
        idx = np.argpartition(s, kk - 1)[:kk]
        return idx[np.argsort(s[idx], kind="stable")]

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        n = self.X.shape[0]
        kk = min(k, n)
        chunk = max(1, (256 << 20) // (4 * n))
        out = np.empty((Q.shape[0], kk), dtype=np.int64)
        for q0 in range(0, Q.shape[0], chunk):
            S = self._scores(Q[q0 : q0 + chunk] @ self.X.T)
            idx = np.argpartition(S, kk - 1, axis=1)[:, :kk]
            top = np.take_along_axis(S, idx, axis=1)
            out[q0 : q0 + chunk] = np.take_along_axis(idx, np.argsort(top, axis=1, kind="stable"), axis=1)
        return out

    def close(self) -> None:
        del self.X, self.norms


class FaissPeer(Peer):
    """faiss-cpu ``IndexFlatL2``/``IndexFlatIP``; ``threads=1`` pins its OpenMP pool for each call."""

    def __init__(self, threads: int | None = None, share: FaissPeer | None = None) -> None:
        super().__init__()
        self.threads = threads
        self.share = share
        self.name = "faiss" if threads is None else f"faiss_{threads}t"
        self.note = (
            f"`IndexFlat{{L2,IP}}`, {'default OpenMP threads' if threads is None else f'{threads} thread'}"
        )

    def available(self) -> None:
        importlib.import_module("faiss")

    def version(self) -> str:
        import faiss

        return str(faiss.__version__)

    def build(self, X: np.ndarray, metric: str) -> None:
        import faiss

        self.faiss = faiss
        self.default_threads = faiss.omp_get_max_threads()
        if self.share is not None and getattr(self.share, "index", None) is not None:
            self.index = self.share.index  # same index, other thread setting: no second copy
            return
        self.index = faiss.IndexFlatL2(X.shape[1]) if metric == "l2" else faiss.IndexFlatIP(X.shape[1])
        self.index.add(X)

    def _call(self, Q: np.ndarray, k: int) -> np.ndarray:
        self.faiss.omp_set_num_threads(self.threads or self.default_threads)
        try:
            return self.index.search(Q, k)[1]
        finally:
            self.faiss.omp_set_num_threads(self.default_threads)

    def search(self, q: np.ndarray, k: int) -> Any:
        return self._call(q[None, :], k)

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        return self._call(Q, k)

    def close(self) -> None:
        del self.index


class HnswlibPeer(Peer):
    name = "hnswlib"
    note = "`hnswlib.BFIndex` (brute force), `knn_query(num_threads=-1)`"
    batch_cap = 1000

    def available(self) -> None:
        importlib.import_module("hnswlib")

    def version(self) -> str:
        return _dist_version("hnswlib")

    def build(self, X: np.ndarray, metric: str) -> None:
        import hnswlib

        self.index = hnswlib.BFIndex(space="l2" if metric == "l2" else "ip", dim=X.shape[1])
        self.index.init_index(max_elements=X.shape[0])
        self.index.add_items(X, np.arange(X.shape[0]))

    def search(self, q: np.ndarray, k: int) -> Any:
        return self.index.knn_query(q[None, :], k=k, num_threads=-1)[0]

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        return self.index.knn_query(Q, k=k, num_threads=-1)[0]

    def close(self) -> None:
        del self.index


class UsearchPeer(Peer):
    name = "usearch"
    note = (
        "`usearch.index.search(X, q, k, L2sq|IP, exact=True)`, all threads; batches in query chunks of "
        "1e8 / n (its exact search allocates ~15 bytes per query and stored row: 15 GB for 1,000 x 1M)"
    )
    batch_cap = 1000

    def available(self) -> None:
        importlib.import_module("usearch.index")

    def version(self) -> str:
        return _dist_version("usearch")

    def build(self, X: np.ndarray, metric: str) -> None:
        from usearch.index import MetricKind

        self.X = X  # exact search runs over the caller's matrix: no index, no copy
        self.kind = MetricKind.L2sq if metric == "l2" else MetricKind.IP

    def search(self, q: np.ndarray, k: int) -> Any:
        from usearch.index import search

        return search(self.X, q, k, self.kind, exact=True).keys

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        from usearch.index import search

        chunk = max(1, 100_000_000 // self.X.shape[0])
        if Q.shape[0] <= chunk:
            return search(self.X, Q, k, self.kind, exact=True).keys
        return np.concatenate(
            [
                search(self.X, Q[i : i + chunk], k, self.kind, exact=True).keys
                for i in range(0, Q.shape[0], chunk)
            ]
        )

    def close(self) -> None:
        del self.X


def _sqlite3_with_extensions() -> Any:
    """A ``sqlite3`` module that can load extensions: the stdlib's if it can, else pysqlite3."""
    import sqlite3

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        return importlib.import_module("pysqlite3.dbapi2")
    except ImportError as exc:
        raise ImportError(
            "this Python's sqlite3 cannot load extensions and pysqlite3 (pip pysqlite3-binary) is missing"
        ) from exc


def connect_sqlite_vec(database: str, **kwargs: Any) -> Any:
    """A connection to ``database`` (a file or ``":memory:"``) with sqlite-vec loaded."""
    import sqlite_vec

    conn = _sqlite3_with_extensions().connect(database, **kwargs)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.enable_load_extension(False)
    return conn


class SqliteVecPeer(Peer):
    name = "sqlite_vec"
    note = (
        "in-memory `vec0` table, `WHERE embedding MATCH ? AND k = ?` (ip: distance_metric=cosine); "
        "no batch form: batch = a loop of single queries"
    )
    batch_cap = 50
    single_cap = 50
    object_results = True

    def available(self) -> None:
        importlib.import_module("sqlite_vec")
        _sqlite3_with_extensions()

    def version(self) -> str:
        sqlite3 = _sqlite3_with_extensions()
        return f"{_dist_version('sqlite-vec')} (SQLite {sqlite3.sqlite_version})"

    def build(self, X: np.ndarray, metric: str) -> None:
        import sqlite_vec

        sqlite3 = _sqlite3_with_extensions()
        self.conn = sqlite3.connect(":memory:")
        self.conn.enable_load_extension(True)
        sqlite_vec.load(self.conn)
        self.conn.enable_load_extension(False)
        dist = "l2" if metric == "l2" else "cosine"
        self.conn.execute(
            f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{X.shape[1]}] distance_metric={dist})"
        )
        with self.conn:
            for r0 in range(0, X.shape[0], 1 << 14):
                blk = X[r0 : r0 + (1 << 14)]
                self.conn.executemany(
                    "INSERT INTO v(rowid, embedding) VALUES (?, ?)",
                    zip(range(r0, r0 + blk.shape[0]), (row.tobytes() for row in blk)),
                )

    def search(self, q: np.ndarray, k: int) -> Any:
        sql = "SELECT rowid FROM v WHERE embedding MATCH ? AND k = ? ORDER BY distance"
        return self.conn.execute(sql, (np.ascontiguousarray(q, dtype=np.float32).tobytes(), k)).fetchall()

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        return [self.search(q, k) for q in Q]

    def ids(self, result: Any, k: int) -> np.ndarray:
        return np.array([r[0] for r in result], dtype=np.int64)

    def batch_ids(self, result: Any, k: int) -> np.ndarray:
        out = np.full((len(result), k), -1, dtype=np.int64)
        for i, rows in enumerate(result):
            out[i, : len(rows)] = [r[0] for r in rows]
        return out

    def close(self) -> None:
        self.conn.close()


class LanceDbPeer(Peer):
    name = "lancedb"
    note = (
        "table in a temp dir, no vector index: "
        "`search().distance_type(l2|dot).bypass_vector_index()`, selects id"
    )
    batch_cap = 100
    single_cap = 20

    def available(self) -> None:
        importlib.import_module("lancedb")

    def version(self) -> str:
        return _dist_version("lancedb")

    def build(self, X: np.ndarray, metric: str) -> None:
        import lancedb
        import pyarrow as pa

        self.tmp = tempfile.TemporaryDirectory(prefix="iqdb-bench-lance-")
        self.dist = "l2" if metric == "l2" else "dot"
        vec = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])
        table = pa.table({"id": pa.array(np.arange(X.shape[0], dtype=np.int64)), "vector": vec})
        self.table = lancedb.connect(self.tmp.name).create_table("v", data=table)

    def _query(self, q: np.ndarray, k: int) -> Any:
        return (
            self.table.search(q)
            .distance_type(self.dist)
            .limit(k)
            .bypass_vector_index()
            .select(["id", "_distance"])
            .to_arrow()
        )

    def search(self, q: np.ndarray, k: int) -> Any:
        return self._query(q, k)

    def search_batch(self, Q: np.ndarray, k: int) -> Any:
        return self._query(Q, k)

    def ids(self, result: Any, k: int) -> np.ndarray:
        return np.asarray(result["id"].to_numpy(), dtype=np.int64)

    def batch_ids(self, result: Any, k: int) -> np.ndarray:
        qi = result["query_index"].to_numpy()
        ids = result["id"].to_numpy()
        dist = result["_distance"].to_numpy()
        m = int(qi.max()) + 1 if qi.size else 0
        out = np.full((m, k), -1, dtype=np.int64)
        order = np.lexsort((dist, qi))
        for i in range(m):
            sel = order[qi[order] == i][:k]
            out[i, : sel.size] = ids[sel]
        return out

    def close(self) -> None:
        del self.table
        self.tmp.cleanup()


PEER_ORDER = (
    "iqdb",
    "iqdb_lists",
    "numpy",
    "faiss",
    "faiss_1t",
    "hnswlib",
    "usearch",
    "sqlite_vec",
    "lancedb",
)


def make_peers(names: Sequence[str], log: Callable[[str], None] = print) -> tuple[list[Peer], dict[str, str]]:
    """Adapters for ``names`` (in PEER_ORDER) and, for those that cannot run, the reason why."""
    unknown = set(names) - set(PEER_ORDER)
    if unknown:
        raise SystemExit(f"unknown systems: {sorted(unknown)}; choose from {', '.join(PEER_ORDER)}")
    peers: list[Peer] = []
    skipped: dict[str, str] = {}
    faiss_default: FaissPeer | None = None
    for name in PEER_ORDER:
        if name not in names:
            continue
        peer: Peer
        if name == "iqdb":
            peer = IqdbPeer()
        elif name == "iqdb_lists":
            peer = IqdbListsPeer()
        elif name == "numpy":
            peer = NumpyPeer()
        elif name == "faiss":
            peer = faiss_default = FaissPeer()
        elif name == "faiss_1t":
            peer = FaissPeer(threads=1, share=faiss_default)
        elif name == "hnswlib":
            peer = HnswlibPeer()
        elif name == "usearch":
            peer = UsearchPeer()
        elif name == "sqlite_vec":
            peer = SqliteVecPeer()
        else:
            peer = LanceDbPeer()
        try:
            peer.available()
        except Exception as exc:  # any import failure means: skip it, loudly
            skipped[name] = f"{type(exc).__name__}: {exc}"
            log(f"SKIPPED {name}: {skipped[name]}")
            continue
        peers.append(peer)
    return peers, skipped


def build_peers(
    peers: list[Peer], X: np.ndarray, metric: str, log: Callable[[str], None] = print
) -> tuple[list[Peer], dict[str, float], dict[str, str]]:
    """Build every peer over ``X``; returns those that built, build seconds, and failures."""
    built: list[Peer] = []
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    for peer in peers:
        t0 = time.perf_counter()
        try:
            peer.build(X, metric)
        except Exception as exc:  # a peer that cannot index this data is reported, not fatal
            failed[peer.name] = f"build failed: {type(exc).__name__}: {exc}"
            log(f"SKIPPED {peer.name}: {failed[peer.name]}")
            continue
        seconds[peer.name] = time.perf_counter() - t0
        log(f"  built {peer.name} in {seconds[peer.name]:.2f} s")
        built.append(peer)
    return built, seconds, failed


def close_peers(peers: list[Peer]) -> None:
    for peer in peers:
        _close_one(peer)
    gc.collect()


def _close_one(peer: Peer) -> None:
    try:
        peer.close()
    except Exception as exc:  # closing is best effort; say so
        print(f"warning: closing {peer.name}: {exc!r}")


# ---------------------------------------------------------------------------------------------
# Machine description


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


class PeakMemory:
    """Extra resident memory during a call: the process's peak RSS (VmHWM, reset through
    ``/proc/self/clear_refs``) minus its RSS before the call. Linux only; NaN elsewhere."""

    _status = Path("/proc/self/status")

    def _kib(self, key: str) -> float:
        try:
            for line in self._status.read_text().splitlines():
                if line.startswith(key):
                    return float(line.split()[1])
        except OSError:
            pass
        return float("nan")

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            self.base = self._kib("VmRSS:")
        except OSError:
            self.base = float("nan")

    def extra_gib(self) -> float:
        return (self._kib("VmHWM:") - self.base) / (1 << 20)


def machine(peers: Sequence[Peer]) -> list[tuple[str, str]]:
    """(label, value) rows: CPU, memory, Python, BLAS (threadpoolctl, after the peers' imports), versions."""
    rows: list[tuple[str, str]] = []
    lscpu = {}
    for line in _run(["lscpu"]).splitlines():
        if ":" in line:
            key, _, val = line.partition(":")
            lscpu[key.strip()] = val.strip()
    flags = lscpu.get("Flags", "").split()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    rows.append(
        (
            "CPU",
            f"{lscpu.get('Model name', platform.processor())} (family {lscpu.get('CPU family', '?')} "
            f"model {lscpu.get('Model', '?')}), {os.cpu_count()} logical CPUs, "
            f"{lscpu.get('Thread(s) per core', '?')} thread/core, "
            f"hypervisor {lscpu.get('Hypervisor vendor', 'none')}",
        )
    )
    rows.append(
        (
            "caches",
            f"L1d {lscpu.get('L1d cache', '?')}, L2 {lscpu.get('L2 cache', '?')}, "
            f"L3 {lscpu.get('L3 cache', '?')}",
        )
    )
    rows.append(("SIMD", ", ".join(simd) or "?"))
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        rows.append(("memory", f"{int(mem) / (1 << 20):.1f} GiB"))
    except (OSError, IndexError, ValueError):
        pass
    rows.append(("OS", f"{platform.system()} {platform.release()}"))
    rows.append(("Python", f"{platform.python_version()} ({sys.executable})"))
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_", "GOTO"))}
    rows.append(("BLAS/OpenMP env", ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "none set"))
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            lib = Path(str(info.get("filepath", "?")))
            desc = f"{lib.parent.name}/{lib.name}: {info.get('internal_api')}"
            if info.get("version"):
                desc += f" {info['version']}"
            desc += f", {info.get('num_threads')} threads"
            if info.get("architecture"):
                desc += f", kernel {info['architecture']}"
            if info.get("threading_layer"):
                desc += f", {info['threading_layer']}"
            rows.append((f"threadpool {info.get('user_api')}", desc))
    except ImportError:
        rows.append(("threadpool", "threadpoolctl not installed"))
    rows.append(("numpy", np.__version__))
    for peer in peers:
        if peer.name in ("numpy", "faiss_1t"):
            continue
        try:
            rows.append((peer.name, peer.version()))
        except Exception as exc:  # a version lookup must not stop a run
            rows.append((peer.name, f"? ({exc!r})"))
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    diff = _run(["git", "-C", str(REPO), "diff", "HEAD", "--", "iqdb", "kernels"])
    source = f"git {commit or '?'}"
    if diff:
        digest = hashlib.sha1(diff.encode()).hexdigest()[:10]
        source += (
            f" + uncommitted changes in iqdb/ or kernels/ (sha1 of `git diff HEAD -- iqdb kernels`: {digest})"
        )
    rows.append(("iqdb source", source))
    return rows


def command_line() -> str:
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("OPENBLAS")]
    argv0 = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    exe = Path(sys.executable)
    python = os.path.relpath(exe, REPO) if exe.is_relative_to(REPO) else "python"
    return " ".join([*env, python, argv0, *map(shlex.quote, sys.argv[1:])])


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass
class Table:
    """A table printed as aligned text on stdout and as Markdown in the result file."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        widths = [
            max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
            for i, h in enumerate(self.headers)
        ]

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        lines = [self.title, fmt(self.headers), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in self.rows]
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |"]
        lines.append("|" + "|".join(["---", *["---:"] * (len(self.headers) - 1)]) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def fmt_rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"


def fmt_ratio(x: float) -> str:
    if not np.isfinite(x):
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def write_result(
    path: Path,
    title: str,
    intro: list[str],
    machine_rows: list[tuple[str, str]],
    sections: list[str],
) -> None:
    """The Markdown result file: title, command, machine, then the sections (tables, charts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {title}", "", f"Run {now} with:", "", "```", command_line(), "```", ""]
    lines += intro
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine_rows]
    lines.append("")
    for sec in sections:
        lines += [sec, ""]
    path.write_text("\n".join(lines))
    print(f"wrote {os.path.relpath(path, Path.cwd())}")
