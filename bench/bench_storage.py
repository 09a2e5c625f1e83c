r"""iqdb against its peers: durable storage -- ingest, open, compaction (issue 3).

Run everything at the issue sizes (about 6 minutes on 2 cores, < 4 GB of memory, ~5 GB of disk):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/bench_storage.py

A quick smoke run (under a minute):

    .venv-bench/bin/python bench/bench_storage.py --n 20000 --wal-n 2000 --ingest 1:200,100:2000,10000:20000 \
        --bulk 20000 --rounds 2 --opens 3 --compactions 2 --tag quick

Three groups, each comparing iqdb with sqlite-vec and lancedb on the same seeded float32 data (ids
0.., vectors only, no payloads, d = 128), interleaved (A B C ... then C B A ...):

1. ingest: single-record writes with a durability point every N writes (iqdb: ``upsert`` and
   ``flush()`` every N; sqlite-vec: a transaction committed every N, WAL journal with
   ``synchronous=FULL`` and ``NORMAL``; lancedb: ``table.add`` of N rows per call, since it has no
   per-record write or fsync), plus bulk ingest (one call with everything, then the durability
   point). A floor row writes iqdb's frame size with ``os.write`` and ``os.fsync`` every N.
2. open: a 1,000,000 x 128 database from its snapshot only, and with 100,000 more records to replay
   (iqdb: written after the snapshot, then the process "crashes"; sqlite-vec: a WAL left by a child
   process that exits without a checkpoint; lancedb: 100 appended fragments), warm page cache, plus
   the first query after open, against reading the same files with ``open(f, "rb").read()``.
3. compaction: iqdb's ``compact()`` of the 1,000,000-row database against ``os.write`` + ``os.fsync``
   of the same number of bytes; sqlite-vec's ``VACUUM`` and WAL checkpoint and lancedb's
   ``optimize()`` where they correspond.

Setup: ``python3 -m venv .venv-bench && .venv-bench/bin/pip install -e ".[bench]"``. Compare only
within one run. Results: ``bench/results/storage_<tag>.md``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    Stats,
    Table,
    connect_sqlite_vec,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    interleave,
    loadavg,
    machine,
    make_peers,
    make_vectors,
    peak_rss_gib,
    write_result,
)

K = 10
SQL_INSERT = "INSERT INTO v(rowid, embedding) VALUES (?, ?)"
SQL_KNN = "SELECT rowid, distance FROM v WHERE embedding MATCH ? AND k = ? ORDER BY distance"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_ingest(text: str) -> list[tuple[int, int]]:
    """``"1:2000,100:20000"`` -> [(every, records), ...]."""
    out = []
    for part in text.split(","):
        every, _, count = part.partition(":")
        out.append((int(float(every)), int(float(count))))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n", type=lambda s: int(float(s)), default=1_000_000, help="rows of the open/compact db")
    p.add_argument("--wal-n", type=lambda s: int(float(s)), default=100_000, help="rows written after it")
    p.add_argument("--wal-batch", type=int, default=1000, help="rows per frame/commit/add, batched cases")
    p.add_argument(
        "--ingest",
        default="1:2000,100:20000,10000:100000",
        help="EVERY:RECORDS,... single-record writes with a durability point every EVERY writes",
    )
    p.add_argument("--bulk", type=lambda s: int(float(s)), default=100_000, help="records, bulk ingest")
    p.add_argument("--rounds", type=int, default=4, help="interleaved runs per ingest cell")
    p.add_argument("--cell-budget", type=float, default=4.0, help="s per ingest run (stops at a sync point)")
    p.add_argument("--opens", type=int, default=7, help="interleaved opens per case")
    p.add_argument("--open-budget", type=float, default=15.0, help="s of opening per case before it sits out")
    p.add_argument("--compactions", type=int, default=5, help="interleaved compactions")
    p.add_argument("--systems", default="iqdb,sqlite_vec,lancedb", help="iqdb and any of sqlite_vec,lancedb")
    p.add_argument("--groups", default="ingest,open,compact")
    p.add_argument("--workdir", default=None, help="where the databases go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="cpu", help="result file: bench/results/storage_<tag>.md")
    p.add_argument("--no-write", action="store_true", help="print only; write no result file")
    args = p.parse_args(argv)
    args.groups = set(args.groups.split(","))
    args.systems = [s for s in args.systems.split(",") if s]
    if "iqdb" not in args.systems:
        args.systems.insert(0, "iqdb")
    args.ingest_cells = parse_ingest(args.ingest)
    return args


def frame_bytes(d: int) -> int:
    """Bytes of one iqdb WAL frame holding one record of dimension ``d`` and no payload."""
    from iqdb._backend import UpsertOp
    from iqdb._wal import encode_frame

    op = UpsertOp(np.zeros(1, np.uint64), np.zeros((1, d), np.float32), [None])
    return len(encode_frame(op, 1, 0, 0))


def crash(db: Any) -> None:
    """Drop an iqdb handle the way a killed process would: no compaction, files just closed."""
    db._backend._release()
    db._closed = True


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def nbytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def read_files(files: list[Path]) -> float:
    """Seconds to read every file whole, ``open(f, "rb").read()``, dropping each buffer after."""
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        del data
    return time.perf_counter() - t0


def write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


# ---------------------------------------------------------------------------------------------
# 1. Ingest


class Ingest:
    """One system's write path: ``write(a, b)`` = single-record writes of rows a..b-1, then one
    durability point; ``write_bulk(a, b)`` = one bulk call, then the durability point."""

    name = ""
    durable = ""  # what a durability point guarantees

    def open(self, path: Path, X: np.ndarray) -> None:
        raise NotImplementedError

    def write(self, a: int, b: int) -> None:
        raise NotImplementedError

    def write_bulk(self, a: int, b: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class IqdbIngest(Ingest):
    def __init__(self, sync: str = "flush") -> None:
        self.sync = sync
        self.name = "iqdb" if sync == "flush" else f"iqdb sync={sync}"
        self.durable = "`flush()`: fsync" if sync == "flush" else "fsync inside each `upsert`"

    def open(self, path: Path, X: np.ndarray) -> None:
        import iqdb

        self.iqdb = iqdb
        self.X = X
        self.db = iqdb.open(path / "iqdb", sync=self.sync)

    def write(self, a: int, b: int) -> None:
        upsert, Record, X = self.db.upsert, self.iqdb.Record, self.X
        for i in range(a, b):
            upsert(Record(i, X[i]))
        self.db.flush()

    def write_bulk(self, a: int, b: int) -> None:
        self.db.upsert_many(np.arange(a, b, dtype=np.uint64), self.X[a:b])
        self.db.flush()

    def close(self) -> None:
        self.db.close()  # compacts: not timed


class SqliteIngest(Ingest):
    def __init__(self, synchronous: str) -> None:
        self.synchronous = synchronous
        self.name = f"sqlite_vec {synchronous}"
        self.durable = "COMMIT: fsync" if synchronous == "FULL" else "COMMIT: no fsync (see notes)"

    def open(self, path: Path, X: np.ndarray) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.X = X
        self.conn = connect_sqlite_vec(str(path / "db.sqlite"), isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={self.synchronous}")
        self.conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{X.shape[1]}])")
        self.cur = self.conn.cursor()

    def write(self, a: int, b: int) -> None:
        cur, X = self.cur, self.X
        cur.execute("BEGIN")
        for i in range(a, b):
            cur.execute(SQL_INSERT, (i, X[i].tobytes()))
        cur.execute("COMMIT")

    def write_bulk(self, a: int, b: int) -> None:
        X = self.X
        self.cur.execute("BEGIN")
        self.cur.executemany(SQL_INSERT, ((i, X[i].tobytes()) for i in range(a, b)))
        self.cur.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def lance_table(X: np.ndarray, a: int, b: int) -> Any:
    import pyarrow as pa

    vec = pa.FixedSizeListArray.from_arrays(pa.array(X[a:b].reshape(-1)), X.shape[1])
    return pa.table({"id": pa.array(np.arange(a, b, dtype=np.int64)), "vector": vec})


def lance_query(table: Any, q: np.ndarray, k: int) -> Any:
    return (
        table.search(q)
        .distance_type("l2")
        .limit(k)
        .bypass_vector_index()
        .select(["id", "_distance"])
        .to_arrow()
    )


class LanceIngest(Ingest):
    name = "lancedb"
    durable = "`table.add` of N rows: no fsync"

    def open(self, path: Path, X: np.ndarray) -> None:
        import lancedb
        import pyarrow as pa

        self.X = X
        schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), X.shape[1]))])
        self.table = lancedb.connect(str(path / "lance")).create_table("v", schema=schema)

    def write(self, a: int, b: int) -> None:
        self.table.add(lance_table(self.X, a, b))

    write_bulk = write

    def close(self) -> None:
        del self.table


class FloorIngest(Ingest):
    """What the disk allows: iqdb's frame size per record with ``os.write``, ``os.fsync`` per point."""

    def __init__(self, frame: int) -> None:
        self.frame = b"\x01" * frame
        self.name = "floor"
        self.durable = "`os.fsync`"
        self.note = (
            f"floor: `os.write` of {frame} B per record (iqdb's WAL frame at this d), `os.fsync` per point."
        )

    def open(self, path: Path, X: np.ndarray) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, a: int, b: int) -> None:
        fd, frame = self.fd, self.frame
        for _ in range(a, b):
            os.write(fd, frame)
        os.fsync(fd)

    def write_bulk(self, a: int, b: int) -> None:
        write_all(self.fd, memoryview(self.frame * (b - a)))
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Cell:
    """Runs of one system in one ingest case: records written and seconds, per run."""

    records: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def stats(self) -> Stats:  # seconds per record
        return Stats(tuple(s / r for s, r in zip(self.seconds, self.records)))

    def records_text(self) -> str:
        lo, hi = min(self.records), max(self.records)
        return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def run_ingest_case(
    args: argparse.Namespace, root: Path, X: np.ndarray, systems: list[Ingest], every: int | None, count: int
) -> dict[str, Cell]:
    cells = {s.name: Cell() for s in systems}
    label = "bulk" if every is None else f"every{every}"

    def task_for(sys_: Ingest) -> Callable[[int], list[float]]:
        def task(r: int) -> list[float]:
            path = root / f"{label}-{sys_.name.replace(' ', '_').replace('=', '')}-{r}"
            sys_.open(path, X)
            done = 0
            t0 = time.perf_counter()
            if every is None:
                sys_.write_bulk(0, count)
                done = count
            else:
                while done < count:
                    end = min(count, done + every)
                    sys_.write(done, end)
                    done = end
                    if time.perf_counter() - t0 >= args.cell_budget:
                        break
            elapsed = time.perf_counter() - t0
            sys_.close()
            shutil.rmtree(path, ignore_errors=True)
            gc.collect()
            cells[sys_.name].records.append(done)
            cells[sys_.name].seconds.append(elapsed)
            return [elapsed]

        return task

    interleave({s.name: task_for(s) for s in systems}, args.rounds, float("inf"))
    return cells


def ingest_table(title: str, systems: list[Ingest], cells: dict[str, Cell], notes: list[str]) -> Table:
    t = Table(
        title,
        [
            "system",
            "a durability point is",
            "records/run",
            "runs",
            "records/s median",
            "best",
            "worst",
            "time x iqdb",
            "time x floor",
        ],
    )
    base = cells["iqdb"].stats().median
    floor = cells["floor"].stats().median if "floor" in cells else float("nan")
    for s in systems:
        st = cells[s.name].stats()
        t.add(
            s.name,
            s.durable,
            cells[s.name].records_text(),
            st.count,
            fmt_rate(1 / st.median),
            fmt_rate(1 / st.best),
            fmt_rate(1 / st.worst),
            fmt_ratio(st.median / base),
            fmt_ratio(st.median / floor),
        )
    t.notes = notes
    return t


def run_ingest(args: argparse.Namespace, root: Path, X: np.ndarray) -> list[Table]:
    frame = frame_bytes(args.dim)
    base: list[Ingest] = [IqdbIngest()]
    if "sqlite_vec" in args.systems:
        base += [SqliteIngest("FULL"), SqliteIngest("NORMAL")]
    if "lancedb" in args.systems:
        base.append(LanceIngest())
    floor = FloorIngest(frame)
    tables = []
    common_notes = [
        "records/s = records written / seconds of the run, from the first write to the last durability "
        "point; a run stops at the first durability point after "
        f"{args.cell_budget:g} s, so slow systems write fewer records (records/run).",
        "`time x iqdb`, `time x floor`: median seconds per record over iqdb's / the floor's, same run; "
        "above 1 = slower.",
        "Durability: iqdb `flush()` and sqlite-vec COMMIT with `journal_mode=WAL, synchronous=FULL` fsync "
        "the log: the writes survive power loss. sqlite-vec `synchronous=NORMAL` does not fsync at "
        "COMMIT (only at checkpoints): committed writes survive a process crash, not power loss. "
        "lancedb makes no fsync call at all (strace of `table.add`, lancedb 0.40.0).",
        floor.note,
    ]
    for every, count in args.ingest_cells:
        systems = list(base)
        if every == 1:
            systems.insert(1, IqdbIngest("always"))
        systems.append(floor)
        log(f"ingest: {count:,} single-record writes, a durability point every {every:,}")
        cells = run_ingest_case(args, root, X, systems, every, count)
        notes = list(common_notes)
        if every == 1:
            notes.append("`iqdb sync=always`: `iqdb.open(path, sync='always')`, no `flush()` calls.")
        if "lancedb" in args.systems:
            notes.append(
                "lancedb has no single-record write: each durability point is one `table.add` of the N "
                "rows (a new data file and manifest version)."
            )
        if "sqlite_vec" in args.systems:
            notes.append(
                "sqlite-vec: a `vec0` table, `INSERT INTO v(rowid, embedding)` per record, BEGIN ... "
                "COMMIT around every N; automatic checkpoints at the default 1,000 WAL pages."
            )
        tables.append(
            ingest_table(
                f"Ingest: single-record writes, a durability point every {every:,} (d = {args.dim})",
                systems,
                cells,
                notes,
            )
        )
        print(tables[-1].text(), flush=True)
    systems = [*base, floor]
    log(f"ingest: bulk, {args.bulk:,} records in one call")
    cells = run_ingest_case(args, root, X, systems, None, args.bulk)
    notes = [
        "One call with every record, then the durability point: iqdb `upsert_many` + `flush()` (one "
        "WAL frame); sqlite-vec `executemany` in one transaction + COMMIT; lancedb one `table.add`; "
        "floor: one `os.write` of records x frame bytes + `os.fsync`.",
        common_notes[1],
    ]
    tables.append(ingest_table(f"Ingest: bulk, {args.bulk:,} records in one call", systems, cells, notes))
    print(tables[-1].text(), flush=True)
    return tables


# ---------------------------------------------------------------------------------------------
# 2. Open


@dataclass
class OpenCase:
    """One database to open: what opens it, the files it reads, what the first query must find."""

    case: str  # "snapshot" or "log"
    system: str
    what: str
    path: Path
    files: list[Path]
    q_row: int
    rows: int
    opener: Callable[[OpenCase], dict[str, Any]]
    build_s: float = 0.0
    open_s: list[float] = field(default_factory=list)
    query_s: list[float] = field(default_factory=list)
    read_s: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def open_iqdb(case: OpenCase, X: np.ndarray) -> dict[str, Any]:
    import iqdb

    q = X[case.q_row]
    t0 = time.perf_counter()
    db = iqdb.open(case.path)
    t1 = time.perf_counter()
    res = db.search(q, K, "l2")
    t2 = time.perf_counter()
    out = {"open": t1 - t0, "query": t2 - t1, "top": int(res[0].id), "rows": len(db)}
    out["replayed"] = db._backend.recovery.get("replayed")
    crash(db)
    del db, res
    gc.collect()
    return out


def open_lance(case: OpenCase, X: np.ndarray) -> dict[str, Any]:
    import lancedb

    q = X[case.q_row]
    t0 = time.perf_counter()
    table = lancedb.connect(str(case.path)).open_table("v")
    t1 = time.perf_counter()
    res = lance_query(table, q, K)
    t2 = time.perf_counter()
    out = {"open": t1 - t0, "query": t2 - t1, "top": int(res["id"][0].as_py()), "rows": table.count_rows()}
    del table, res
    gc.collect()
    return out


def open_sqlite(case: OpenCase, X: np.ndarray) -> dict[str, Any]:
    """In a child process: a crash-left WAL must be recovered by every open, and a clean close
    here would checkpoint it away. The child exits without closing (see ``child_sqlite_open``)."""
    qfile = case.path.parent / f"query-{case.q_row}.npy"
    if not qfile.exists():
        np.save(qfile, X[case.q_row])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-sqlite-open", str(case.path), str(qfile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"sqlite child failed: {proc.stderr.strip()[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def child_sqlite_open(db_path: str, qfile: str) -> None:
    """Child mode: connect, first query, row count, print JSON, exit without closing."""
    q = np.load(qfile)
    t0 = time.perf_counter()
    conn = connect_sqlite_vec(db_path, isolation_level=None)
    t1 = time.perf_counter()
    res = conn.execute(SQL_KNN, (q.tobytes(), K)).fetchall()
    t2 = time.perf_counter()
    rows = conn.execute("SELECT count(*) FROM v").fetchone()[0]
    print(json.dumps({"open": t1 - t0, "query": t2 - t1, "top": int(res[0][0]), "rows": int(rows)}))
    sys.stdout.flush()
    os._exit(0)  # like a crash: no checkpoint, the WAL stays for the next open


def child_sqlite_append(db_path: str, vfile: str, start: str, batch: str) -> None:
    """Child mode: append the rows of ``vfile`` in commits of ``batch``, then exit without a
    checkpoint, leaving them in the WAL (what a crashed writer leaves)."""
    V = np.load(vfile)
    first, step = int(start), int(batch)
    conn = connect_sqlite_vec(db_path, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("PRAGMA synchronous=FULL")
    for a in range(0, V.shape[0], step):
        conn.execute("BEGIN")
        conn.executemany(SQL_INSERT, ((first + i, V[i].tobytes()) for i in range(a, min(a + step, len(V)))))
        conn.execute("COMMIT")
    print(json.dumps({"wal_bytes": os.path.getsize(db_path + "-wal")}))
    sys.stdout.flush()
    os._exit(0)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_open_cases(args: argparse.Namespace, root: Path, X: np.ndarray) -> list[OpenCase]:
    import iqdb

    n, w, batch = args.n, args.wal_n, args.wal_batch
    root.mkdir(parents=True, exist_ok=True)
    cases: list[OpenCase] = []

    def iq(path: Path) -> list[Path]:
        return [p for p in (path / "snap", path / "wal") if p.exists() and p.stat().st_size]

    def opener_iqdb(c: OpenCase) -> dict[str, Any]:
        return open_iqdb(c, X)

    # iqdb: the snapshot (bulk load in 100k-row calls, then close = compaction)
    snap = root / "iqdb_snap"
    t0 = time.perf_counter()
    db = iqdb.open(snap, wal_limit=1 << 40)
    for a in range(0, n, 100_000):
        db.upsert_many(np.arange(a, min(n, a + 100_000), dtype=np.uint64), X[a : min(n, a + 100_000)])
    db.close()
    build = time.perf_counter() - t0
    cases.append(OpenCase("snapshot", "iqdb", "snapshot only", snap, iq(snap), 123, n, opener_iqdb, build))
    log(f"  iqdb snapshot: {n:,} rows, {mb(nbytes(iq(snap)))} MB, built in {build:.1f} s")

    # iqdb: the snapshot plus a WAL, single-record frames and batched frames; then a "crash"
    for kind in ("single", "batched"):
        path = root / f"iqdb_wal_{kind}"
        shutil.copytree(snap, path)
        db = iqdb.open(path, wal_limit=1 << 40)
        t0 = time.perf_counter()
        if kind == "single":
            upsert, Record = db.upsert, iqdb.Record
            for i in range(n, n + w):
                upsert(Record(i, X[i]))
            what = f"snapshot + WAL of {w:,} single-record frames"
        else:
            for a in range(n, n + w, batch):
                b = min(n + w, a + batch)
                db.upsert_many(np.arange(a, b, dtype=np.uint64), X[a:b])
            what = f"snapshot + WAL of {-(-w // batch):,} frames of {batch:,} rows"
        db.flush()
        build = time.perf_counter() - t0
        crash(db)
        del db
        gc.collect()
        cases.append(OpenCase("log", "iqdb", what, path, iq(path), n + 77, n + w, opener_iqdb, build))
        log(f"  iqdb {what}: WAL {mb(nbytes([path / 'wal']))} MB, written in {build:.1f} s")

    if "lancedb" in args.systems:
        import lancedb

        def opener_lance(c: OpenCase) -> dict[str, Any]:
            return open_lance(c, X)

        lpath = root / "lance_snap"
        t0 = time.perf_counter()
        lancedb.connect(str(lpath)).create_table("v", data=lance_table(X, 0, n))
        build = time.perf_counter() - t0
        cases.append(
            OpenCase(
                "snapshot", "lancedb", "one table", lpath, files_under(lpath), 123, n, opener_lance, build
            )
        )
        log(f"  lancedb: {mb(nbytes(files_under(lpath)))} MB, built in {build:.1f} s")
        lpath2 = root / "lance_appended"
        shutil.copytree(lpath, lpath2)
        table = lancedb.connect(str(lpath2)).open_table("v")
        t0 = time.perf_counter()
        for a in range(n, n + w, batch):
            table.add(lance_table(X, a, min(n + w, a + batch)))
        build = time.perf_counter() - t0
        del table
        what = f"table + {-(-w // batch):,} appends of {batch:,} rows (no log: new fragments)"
        files = files_under(lpath2)
        cases.append(OpenCase("log", "lancedb", what, lpath2, files, n + 77, n + w, opener_lance, build))
        log(f"  lancedb {what}: {mb(nbytes(files))} MB, appended in {build:.1f} s")

    if "sqlite_vec" in args.systems:

        def opener_sqlite(c: OpenCase) -> dict[str, Any]:
            return open_sqlite(c, X)

        spath = root / "sqlite_snap.db"
        t0 = time.perf_counter()
        conn = connect_sqlite_vec(str(spath), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{args.dim}])")
        for a in range(0, n, 100_000):
            conn.execute("BEGIN")
            conn.executemany(SQL_INSERT, ((i, X[i].tobytes()) for i in range(a, min(n, a + 100_000))))
            conn.execute("COMMIT")
        conn.close()  # checkpoints: everything is in the main file, no WAL
        build = time.perf_counter() - t0
        cases.append(
            OpenCase("snapshot", "sqlite_vec", "database file", spath, [spath], 123, n, opener_sqlite, build)
        )
        log(f"  sqlite_vec: {mb(spath.stat().st_size)} MB, built in {build:.1f} s")
        spath2 = root / "sqlite_wal.db"
        shutil.copyfile(spath, spath2)
        vfile = root / "appended.npy"
        np.save(vfile, X[n : n + w])
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-sqlite-append", str(spath2)]
        proc = subprocess.run(
            [*cmd, str(vfile), str(n), str(batch)], capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sqlite append child failed: {proc.stderr.strip()[-2000:]}")
        build = time.perf_counter() - t0
        vfile.unlink()
        wal = Path(str(spath2) + "-wal")
        what = f"database file + WAL of {-(-w // batch):,} commits of {batch:,} rows, not checkpointed"
        cases.append(
            OpenCase("log", "sqlite_vec", what, spath2, [spath2, wal], n + 77, n + w, opener_sqlite, build)
        )
        log(f"  sqlite_vec {what}: WAL {mb(wal.stat().st_size)} MB, written in {build:.1f} s")
    return cases


def run_open(args: argparse.Namespace, root: Path, X: np.ndarray) -> tuple[list[Table], list[OpenCase]]:
    log(f"open: building the {args.n:,} x {args.dim} databases")
    cases = build_open_cases(args, root, X)
    os.sync()  # the builds' writeback must not overlap the timings
    time.sleep(1.0)
    if "open" not in args.groups:
        return [], cases  # the compaction group only needs the databases

    def open_task(c: OpenCase) -> Callable[[int], list[float]]:
        def task(r: int) -> list[float]:
            out = c.opener(c)
            c.open_s.append(out["open"])
            c.query_s.append(out["query"])
            expect_rows = c.rows
            if out["top"] != c.q_row or out["rows"] != expect_rows:
                c.wrong.append(f"top {out['top']} (want {c.q_row}), rows {out['rows']} (want {expect_rows})")
            if out.get("replayed") is not None:
                c.info["replayed"] = out["replayed"]
            return [out["open"] + out["query"]]

        return task

    def read_task(c: OpenCase) -> Callable[[int], list[float]]:
        def task(r: int) -> list[float]:
            c.read_s.append(read_files(c.files))
            return [c.read_s[-1]]

        return task

    tasks: dict[str, Callable[[int], list[float]]] = {}
    for c in cases:
        tasks[f"{c.system}: {c.what}"] = open_task(c)
        tasks[f"read: {c.system}: {c.what}"] = read_task(c)
    log(f"open: {len(cases)} databases, {args.opens} interleaved rounds")
    interleave(tasks, args.opens, args.open_budget, log=None)
    return open_tables(args, cases), cases


def open_tables(args: argparse.Namespace, cases: list[OpenCase]) -> list[Table]:
    tables = []
    headers = [
        "system",
        "what is opened",
        "opens",
        "open ms median",
        "best",
        "worst",
        "first query ms",
        "MB on disk",
        "read ms",
        "open / read",
        "(open + query) / read",
        "open x iqdb",
        "wrong",
    ]
    for kind, title in (
        ("snapshot", f"Open a {args.n:,} x {args.dim} database from its snapshot only (warm page cache)"),
        ("log", f"Open with {args.wal_n:,} more records to replay (warm page cache)"),
    ):
        t = Table(title, headers)
        group = [c for c in cases if c.case == kind]
        base = next(
            (c for c in reversed(group) if c.system == "iqdb" and c.open_s), None
        )  # the batched-frame WAL: the same write batches as the peers
        for c in group:
            if not c.open_s:
                continue
            st = Stats(tuple(c.open_s))
            q = float(np.median(c.query_s))
            rd = float(np.median(c.read_s))
            t.add(
                c.system,
                c.what,
                st.count,
                fmt_ms(st.median),
                fmt_ms(st.best),
                fmt_ms(st.worst),
                fmt_ms(q),
                mb(nbytes(c.files)),
                fmt_ms(rd),
                fmt_ratio(st.median / rd),
                fmt_ratio((st.median + q) / rd),
                fmt_ratio(st.median / Stats(tuple(base.open_s)).median) if base else "-",
                str(len(c.wrong)) if c.wrong else "0",
            )
        notes = [
            "open: iqdb `iqdb.open(path)` (read-write: lock, snapshot map + checksums + copy into the "
            "search buffers, WAL replay); lancedb `lancedb.connect(path).open_table('v')`; sqlite-vec "
            "`connect` + loading the extension, in a child process (connect is lazy: sqlite reads "
            "pages, and recovers a WAL, during the first query, so compare `open + query` for it).",
            "first query: one exact top-10 L2 query right after the open (iqdb `search`, lancedb "
            "`bypass_vector_index()`, sqlite-vec `vec0` KNN), checked: it must return the queried "
            "row's id (a row from the replayed records in the replay case) and the row count must "
            "match; `wrong` counts opens that failed the check.",
            "read ms: `open(f, 'rb').read()` of each of the system's files (the same bytes open "
            "reads), median, measured interleaved with the opens. `open / read`: the issue's target "
            "is open from snapshot within 2x of reading the bytes.",
        ]
        if kind == "log":
            notes.append(
                "iqdb and sqlite-vec crash before replaying: iqdb drops its handle without "
                "compacting; sqlite-vec's writer is a child process that exits without a checkpoint "
                "(`wal_autocheckpoint=0`), and every open runs in a child that exits the same way, so "
                "each one recovers the WAL. lancedb has no log: appends are new fragments, opened like "
                "any table. `open x iqdb` compares with iqdb's batched-frame WAL (same batches as "
                "the peers)."
            )
        else:
            notes.append("`open x iqdb`: median open time over iqdb's, same run.")
        t.notes = notes
        tables.append(t)
        print(t.text(), flush=True)
    return tables


# ---------------------------------------------------------------------------------------------
# 3. Compaction


def run_compact(args: argparse.Namespace, root: Path, X: np.ndarray, cases: list[OpenCase]) -> Table:
    import iqdb

    snap_case = next(c for c in cases if c.system == "iqdb" and c.case == "snapshot")
    os.sync()
    db = iqdb.open(snap_case.path)
    size = (snap_case.path / "snap").stat().st_size
    flat = X.reshape(-1).view(np.uint8)
    buf = memoryview(flat[:size] if flat.shape[0] >= size else np.resize(flat, size))
    target = root / "plain.bin"
    samples: dict[str, list[float]] = {}

    def compact(r: int, fn: Callable[[], None] = db.compact) -> list[float]:
        return [_timed(fn)]

    def plain(sync: bool) -> Callable[[int], list[float]]:
        def task(r: int) -> list[float]:
            target.unlink(missing_ok=True)
            t0 = time.perf_counter()
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            write_all(fd, buf)
            if sync:
                os.fsync(fd)
            elapsed = time.perf_counter() - t0
            if not sync:
                os.fsync(fd)  # not timed: its writeback must not slow the next task down
            os.close(fd)
            return [elapsed]

        return task

    log(f"compact: iqdb compact() of {len(db):,} rows ({mb(size)} MB), {args.compactions} rounds")
    tasks = {"iqdb": compact, "write+fsync": plain(True), "write": plain(False)}
    samples.update(interleave(tasks, args.compactions, float("inf")))
    written = (snap_case.path / "snap").stat().st_size
    crash(db)
    del db, tasks, compact
    gc.collect()
    target.unlink(missing_ok=True)
    floor_rate = size / float(np.median(samples["write+fsync"]))

    rows: list[tuple[str, str, list[float], int]] = [
        (
            "iqdb",
            f"`compact()` of {args.n:,} rows (snapshot written, fsynced, renamed)",
            samples["iqdb"],
            written,
        ),
        ("floor", "`os.write` + `os.fsync` of the same bytes, new file", samples["write+fsync"], size),
        ("floor", "`os.write` only (page cache), same bytes", samples["write"], size),
    ]
    if "sqlite_vec" in args.systems:
        spath = next(c.path for c in cases if c.system == "sqlite_vec" and c.case == "snapshot")
        conn = connect_sqlite_vec(str(spath), isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
        log("compact: sqlite_vec VACUUM (+ checkpoint) of the database file")
        t = _timed(lambda: (conn.execute("VACUUM"), conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")))
        conn.close()
        rows.append(
            (
                "sqlite_vec",
                f"`VACUUM` + `wal_checkpoint(TRUNCATE)` of {args.n:,} rows",
                [t],
                spath.stat().st_size,
            )
        )
        wpath = next(c.path for c in cases if c.system == "sqlite_vec" and c.case == "log")
        wal_bytes = Path(str(wpath) + "-wal").stat().st_size
        conn = connect_sqlite_vec(str(wpath), isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # WAL recovery: not timed
        log("compact: sqlite_vec checkpoint of the crash-left WAL")
        t = _timed(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        conn.close()
        rows.append(
            ("sqlite_vec", f"`wal_checkpoint(TRUNCATE)` of the {args.wal_n:,}-row WAL", [t], wal_bytes)
        )
    if "lancedb" in args.systems:
        import lancedb

        lpath = next(c.path for c in cases if c.system == "lancedb" and c.case == "log")
        table = lancedb.connect(str(lpath)).open_table("v")
        before = nbytes(files_under(lpath))
        log("compact: lancedb optimize() of the appended table")
        t = _timed(table.optimize)
        written_l = max(0, nbytes(files_under(lpath)) - before)
        del table
        rows.append(
            (
                "lancedb",
                f"`optimize()` of the table + {-(-args.wal_n // args.wal_batch)} appended fragments",
                [t],
                written_l,
            )
        )

    t = Table(
        f"Compaction of the {args.n:,} x {args.dim} database",
        [
            "system",
            "operation",
            "runs",
            "s median",
            "best",
            "worst",
            "MB written",
            "GB/s",
            "time x write+fsync",
        ],
    )
    for system, what, s, nb in rows:
        st = Stats(tuple(s))
        t.add(
            system,
            what,
            st.count,
            f"{st.median:.3f}",
            f"{st.best:.3f}",
            f"{st.worst:.3f}",
            mb(nb),
            f"{nb / st.median / 1e9:.2f}",
            fmt_ratio(st.median / (nb / floor_rate)) if nb else "-",
        )
    t.notes = [
        "`time x write+fsync`: the operation's median time over the time the plain `os.write` + "
        f"`os.fsync` floor needs for the same number of bytes (its rate, {floor_rate / 1e9:.2f} GB/s, "
        "measured in the same rounds as iqdb's compactions).",
        "iqdb's compactions are interleaved with the floors; the peers' operations run once each, "
        "after them (they change the database, so they cannot repeat on the same data). lancedb's "
        "`MB written` is the growth of its directory (old versions are kept).",
    ]
    print(t.text(), flush=True)
    return t


# ---------------------------------------------------------------------------------------------


def storage_row(path: Path) -> tuple[str, str]:
    best = ("?", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    return ("storage", f"{path} on {best[0]} ({best[2]}, mounted at {best[1]})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-sqlite-open":
        child_sqlite_open(*argv[1:3])
    if argv and argv[0] == "--child-sqlite-append":
        child_sqlite_append(*argv[1:5])
    args = parse_args(argv)
    log(f"groups {sorted(args.groups)}, systems {args.systems}, load average {loadavg()}")
    load0 = loadavg()
    peers, skipped = make_peers(args.systems)
    args.systems = [p.name for p in peers]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="iqdb-bench-storage-"))
    root.mkdir(parents=True, exist_ok=True)
    need = max([c for _, c in args.ingest_cells] + [args.bulk, args.n + args.wal_n])
    X = make_vectors(need, args.dim, args.seed, normalize=False)
    tables: list[Table] = []
    cases: list[OpenCase] = []
    try:
        if "ingest" in args.groups:
            tables += run_ingest(args, root / "ingest", X)
        if args.groups & {"open", "compact"}:
            open_tables_, cases = run_open(args, root / "open", X)
            tables += open_tables_
        if "compact" in args.groups:
            tables.append(run_compact(args, root / "open", X, cases))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    log(f"done; peak RSS {peak_rss_gib():.1f} GiB")
    if args.no_write:
        return 0
    rows = machine(peers)
    rows.append(storage_row(root.parent if not args.keep else root))
    rows.append(("load average", f"{load0} at the start, {loadavg()} at the end"))
    rows.append(("peak RSS", f"{peak_rss_gib():.1f} GiB (this process)"))
    intro = [
        f"iqdb, sqlite-vec and lancedb on the same seeded standard-normal float32 data (d = {args.dim}, "
        "ids 0.., no payloads), interleaved. Compare only within this file.",
    ]
    snap = next((c for c in cases if c.system == "iqdb" and c.case == "snapshot" and c.open_s), None)
    if snap is not None and "open" in args.groups:
        o, r = float(np.median(snap.open_s)), float(np.median(snap.read_s))
        verdict = "met" if o <= 2 * r else "missed"
        intro += [
            "",
            f"Issue 3's target, open from snapshot within 2x of reading the bytes: iqdb opens in "
            f"{fmt_ms(o)} ms, reading the same bytes takes {fmt_ms(r)} ms: {o / r:.2f}x ({verdict}).",
        ]
    if skipped:
        intro += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    builds = [
        f"- {c.system}, {c.what}: {c.build_s:.1f} s"
        + (f" ({c.info['replayed']:,} frames replayed per open)" if c.info.get("replayed") else "")
        for c in cases
    ]
    if builds:
        intro += ["", "Building the open/compact databases (not part of any ratio):", "", *builds]
    wrong = [f"- {c.system}, {c.what}: {w}" for c in cases for w in c.wrong]
    if wrong:
        intro += ["", "**Wrong results after open:**", "", *wrong]
    write_result(
        REPO / "bench" / "results" / f"storage_{args.tag}.md",
        f"Storage: ingest, open, compaction ({args.tag})",
        intro,
        rows,
        [t.markdown() for t in tables],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
