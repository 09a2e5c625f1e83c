r"""Arrow import: iqdb's ``upsert_arrow`` against lancedb's ``add`` and ``pandas.to_parquet`` (issue 12).

Run at the issue size (1,000,000 x 128 with payloads; about 6 GB of memory, 2 GB of disk):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/bench_import.py

A quick run (about a minute on 2 cores):

    .venv-bench/bin/python bench/bench_import.py --n 200000 --rounds 3

The same seeded data for every system: ``id`` (int64), ``vector`` (``fixed_size_list<float32>[128]``)
and three payload columns (``title`` a short string, ``year`` int64, ``score`` float64), one
``pyarrow.Table`` in memory built before any timing. Each round times each system once,
interleaved (A B C D then D C B A), and the tables give the medians:

* ``iqdb memory``: ``Iqdb.open_in_memory(device="cpu").upsert_arrow(table)``.
* ``iqdb durable``: ``iqdb.open(dir).upsert_arrow(table)`` then ``flush()`` (the WAL fsynced: the
  records survive a power cut). Compaction (``close()``) is timed apart.
* ``lancedb add``: ``table.add(arrow_table)`` into an empty table created beforehand (lance
  files written; lancedb has no fsync knob).
* ``pandas to_parquet``: ``DataFrame.to_parquet(path)`` of the same data as a DataFrame (built
  before the timing; the vector column holds one NumPy array per row, as pandas holds it).
* ``pyarrow write_table`` (a floor, not a peer): ``pyarrow.parquet.write_table`` of the table.
* ``iqdb memory, vectors only`` (not a peer): ``upsert_arrow(table, payload_columns=[])``, to show
  what the payload columns cost.

Setup: ``python3 -m venv .venv-bench && .venv-bench/bin/pip install -e ".[bench]"`` (lancedb,
pandas through it). Results: ``bench/results/import_<tag>.md``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import iqdb


def make_table(n: int, d: int, seed: int) -> Any:
    import pyarrow as pa

    X = common.make_vectors(n, d, seed=seed, normalize=False)
    rng = np.random.default_rng(seed + 1)
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), d),
            "title": pa.array([f"document {i}" for i in range(n)]),
            "year": pa.array(rng.integers(1950, 2025, n)),
            "score": pa.array(rng.random(n)),
        }
    )


class System:
    name = ""

    def setup(self, work: Path) -> None:
        """Untimed preparation of one run (an empty table, a fresh directory)."""

    def run(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        """Untimed cleanup of one run."""


class IqdbMemory(System):
    name = "iqdb memory"

    def __init__(self, table: Any) -> None:
        self.table = table

    def setup(self, work: Path) -> None:
        self.db = iqdb.open_in_memory(device="cpu")

    def run(self) -> None:
        self.db.upsert_arrow(self.table)

    def teardown(self) -> None:
        assert len(self.db) == self.table.num_rows
        self.db.close()


class IqdbVectorsOnly(IqdbMemory):
    """Not a peer: the same import with ``payload_columns=[]``, to show what the payloads cost."""

    name = "iqdb memory, vectors only"

    def run(self) -> None:
        self.db.upsert_arrow(self.table, payload_columns=[])


class IqdbDurable(System):
    name = "iqdb durable (+ flush)"

    def __init__(self, table: Any, close_times: list[float]) -> None:
        self.table = table
        self.close_times = close_times

    def setup(self, work: Path) -> None:
        self.db = iqdb.open(work / "iqdb", device="cpu")

    def run(self) -> None:
        self.db.upsert_arrow(self.table)
        self.db.flush()

    def teardown(self) -> None:
        assert len(self.db) == self.table.num_rows
        t0 = time.perf_counter()
        self.db.close()  # compaction: snapshot written, WAL emptied
        self.close_times.append(time.perf_counter() - t0)


class LanceAdd(System):
    name = "lancedb add"

    def __init__(self, table: Any) -> None:
        import lancedb

        self.lancedb = lancedb
        self.table = table

    def setup(self, work: Path) -> None:
        self.conn = self.lancedb.connect(str(work / "lance"))
        self.tbl = self.conn.create_table("t", schema=self.table.schema)

    def run(self) -> None:
        self.tbl.add(self.table)

    def teardown(self) -> None:
        assert self.tbl.count_rows() == self.table.num_rows
        del self.tbl, self.conn


class PandasParquet(System):
    name = "pandas to_parquet"

    def __init__(self, table: Any) -> None:
        self.frame = table.to_pandas()

    def setup(self, work: Path) -> None:
        self.path = work / "pandas.parquet"

    def run(self) -> None:
        self.frame.to_parquet(self.path)


class ArrowParquet(System):
    name = "pyarrow write_table (floor)"

    def __init__(self, table: Any) -> None:
        self.table = table

    def setup(self, work: Path) -> None:
        self.path = work / "arrow.parquet"

    def run(self) -> None:
        import pyarrow.parquet as pq

        pq.write_table(self.table, self.path)


def measure(system: System, root: Path, memory: common.PeakMemory) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp(dir=root))
    try:
        system.setup(work)
        gc.collect()
        memory.start()
        t0 = time.perf_counter()
        system.run()
        seconds = time.perf_counter() - t0
        extra = memory.extra_gib()
        system.teardown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return seconds, extra


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _make(maker: Callable[[], System], key: str, skipped: list[str]) -> System | None:
    """The system, or ``None`` (noted in ``skipped``) when its library does not import."""
    try:
        return maker()
    except ImportError as exc:
        skipped.append(f"{key}: {exc}")
        print(f"skipping {key}: {exc}", flush=True)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each system (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="iqdb_memory,iqdb_durable,lancedb,pandas,arrow,iqdb_vectors")
    ap.add_argument("--dir", default=None, help="where the files go (default: a temporary directory)")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    print(f"building {args.n:,} x {args.dim} with payloads ...", flush=True)
    table = make_table(args.n, args.dim, args.seed)
    close_times: list[float] = []
    makers: dict[str, Callable[[], System]] = {
        "iqdb_memory": lambda: IqdbMemory(table),
        "iqdb_durable": lambda: IqdbDurable(table, close_times),
        "iqdb_vectors": lambda: IqdbVectorsOnly(table),
        "lancedb": lambda: LanceAdd(table),
        "pandas": lambda: PandasParquet(table),
        "arrow": lambda: ArrowParquet(table),
    }
    systems: list[System] = []
    skipped: list[str] = []
    for key in args.systems.split(","):
        system = _make(makers[key], key, skipped)
        if system is not None:
            systems.append(system)

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="iqdb-bench-import-"))
    times: dict[str, list[float]] = {s.name: [] for s in systems}
    extra: dict[str, list[float]] = {s.name: [] for s in systems}
    memory = common.PeakMemory()
    try:
        for r in range(args.rounds):
            order = systems if r % 2 == 0 else systems[::-1]
            for s in order:
                seconds, gib = measure(s, root, memory)
                times[s.name].append(seconds)
                extra[s.name].append(gib)
                print(
                    f"round {r + 1}: {s.name:<28} {seconds:7.2f} s  {args.n / seconds:>12,.0f} rows/s",
                    flush=True,
                )
                time.sleep(common.PAUSE_S)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    lance = med.get(LanceAdd.name)
    result = common.Table(
        f"Arrow import of {args.n:,} x {args.dim} with 3 payload columns (median of {args.rounds})",
        ["system", "median s", "rows/s", "rate vs lancedb", "extra RSS GiB", "runs (s)"],
    )
    for name, m in med.items():
        ratio = lance / m if lance else float("nan")
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        result.add(
            name,
            f"{m:.2f}",
            common.fmt_rate(args.n / m),
            common.fmt_ratio(ratio),
            f"{max(extra[name]):.2f}",
            runs,
        )
    if close_times:
        result.notes.append(
            f"iqdb durable: close() (compaction to a snapshot) took a median {statistics.median(close_times):.2f} s more"
        )
    result.notes.append("rate vs lancedb: the system's rows/s over lancedb add's (above 1: faster)")
    for name in (IqdbMemory.name, IqdbDurable.name):
        if lance and name in med:
            verdict = "met" if med[name] <= lance else "missed"
            result.notes.append(
                f"target (at least lancedb's rate) {verdict} by {name}: {lance / med[name]:.2f}x"
            )
    result.notes.append(f"load average at the end: {common.loadavg()}")
    result.notes += [f"skipped {s}" for s in skipped]
    print()
    print(result.text())
    if not args.no_write:
        rows = common.machine([])
        rows += [(dist, _version(dist)) for dist in ("pyarrow", "lancedb", "pylance", "pandas")]
        common.write_result(
            common.REPO / "bench" / "results" / f"import_{args.tag}.md",
            "iqdb Arrow import against lancedb and pandas",
            [
                f"{args.n:,} records of dimension {args.dim} with payloads (title: str, year: int, "
                "score: float), one in-memory Arrow table; see the docstring of bench/bench_import.py "
                "for what each system does. Medians of interleaved rounds on a shared machine."
            ],
            rows,
            [result.markdown()],
        )


if __name__ == "__main__":
    main()
