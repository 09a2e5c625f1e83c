"""The ``iqdb`` command line (needs the ``cli`` extra: ``pip install "iqdb[cli]"``, for click and tqdm).

::

    iqdb demo                                   random data: ingest, search, exactness, speed
    iqdb info PATH [--json]                     count, dimension, file sizes, generation, check
    iqdb check PATH [--json]                    integrity of the snapshot and the WAL
    iqdb import PATH FILE [--id-column id] [--vector-column vector] [--payload-column C ...]
    iqdb export PATH FILE                       Parquet or Arrow IPC, by FILE's suffix
    iqdb search PATH --vector 0.1,0.2,... [-k 10] [--metric cosine] [--filter JSON] [--json]
    iqdb search PATH --query-file Q.npy ...     many queries (.npy, or text: one vector a line)
    iqdb compact PATH                           fresh snapshot, empty WAL
    iqdb bench [--n 200000] [--device auto]     the headline search benchmark against NumPy

``import`` reads Parquet, Arrow IPC (``.arrow``, ``.feather``, ``.ipc``), ``.npy`` (an ``(n, d)``
float array; ids 0..n-1) and CSV (the vector column as text, ``"[0.1, 0.2]"``) one batch at a time,
with a progress bar on a terminal. Every command that reports takes ``--json``.

Exit codes:

    0  success
    1  the check found problems (check, info), or the demo's exactness check failed
    2  bad arguments or data (usage, an invalid vector, filter, column, dimension)
    3  not found: no database at PATH, or no such input file
    4  the database is corrupt
    5  the database is locked by another writer
    6  the operating system refused (I/O error, permission, disk full)
    7  the requested device is unavailable
    130  interrupted (Ctrl-C)

Expected failures print one line ``iqdb: <what went wrong>`` on stderr, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._db import Iqdb
from ._errors import (
    Corrupt,
    DeviceUnavailable,
    DimensionMismatch,
    InvalidArgument,
    InvalidConfig,
    InvalidVector,
    IqdbError,
    Locked,
    StorageError,
)

__all__ = ["main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
EXIT_CORRUPT, EXIT_LOCKED, EXIT_OS, EXIT_DEVICE, EXIT_INTERRUPTED = 4, 5, 6, 7, 130

_EPILOG = """Exit codes: 0 success; 1 check found problems; 2 bad arguments or data; 3 no database or
file at the path; 4 corrupt database; 5 locked by another writer; 6 operating-system error;
7 device unavailable; 130 interrupted."""

_MISSING_CLI = 'iqdb: the command line needs click and tqdm; install them with: pip install "iqdb[cli]"'


class _Fail(Exception):
    """An expected failure: one line on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, (InvalidArgument, InvalidVector, DimensionMismatch, InvalidConfig)):
        return EXIT_USAGE
    if isinstance(exc, Corrupt):
        return EXIT_CORRUPT
    if isinstance(exc, Locked):
        return EXIT_LOCKED
    if isinstance(exc, DeviceUnavailable):
        return EXIT_DEVICE
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno == 2
    ):
        return EXIT_NOT_FOUND
    if isinstance(exc, (StorageError, OSError)):
        return EXIT_OS
    return EXIT_USAGE


def _describe(exc: BaseException) -> str:
    """One line: the error's class for iqdb's own errors (``Corrupt: ...``), then its message."""
    if isinstance(exc, FileNotFoundError) and exc.filename and not isinstance(exc, IqdbError):
        return f"no such file: {exc.filename}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if isinstance(exc, IqdbError) else text or type(exc).__name__


def _existing_database(path: str) -> str:
    """``path`` when it is a database directory; a not-found failure otherwise (read-only
    commands must never create one)."""
    if not os.path.isdir(path) or not (
        os.path.exists(os.path.join(path, "snap")) or os.path.exists(os.path.join(path, "wal"))
    ):
        raise _Fail(f"no iqdb database at {path}", EXIT_NOT_FOUND)
    return path


def _emit(data: Any, as_json: bool, text: Callable[[], str]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, allow_nan=False, default=str))
    else:
        print(text())


@contextmanager
def _bar(total: int | None, enabled: bool, unit: str) -> Iterator[Callable[[int, int | None], None]]:
    """A tqdm bar (on stderr, only on a terminal) fed by the library's progress callback."""
    from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

    with tqdm(total=total, unit=unit, unit_scale=True, disable=None if enabled else True) as bar:

        def update(done: int, total_now: int | None) -> None:
            if total_now is not None and bar.total != total_now:
                bar.total = total_now
            bar.update(done - bar.n)

        yield update


# -- commands ------------------------------------------------------------------------------------


def _demo(n: int, dim: int, queries: int, single: int, k: int, metric: str, device: str, seed: int) -> int:
    rng = np.random.default_rng(seed)
    m = queries
    print(f"iqdb demo: {n:,} random vectors of dimension {dim}, k={k}, metric={metric}")
    data = rng.standard_normal((n, dim), dtype=np.float32)
    qs = rng.standard_normal((m, dim), dtype=np.float32)
    with Iqdb.open_in_memory(device=device) as db:
        t0 = time.perf_counter()
        db.upsert_many(np.arange(n, dtype=np.uint64), data, None)
        t_ingest = time.perf_counter() - t0
        print(f"device: {db.device}")
        print(f"ingest: {n / t_ingest:,.0f} records/s ({t_ingest:.2f} s)")
        db.search(qs[0], k, metric)  # warm-up
        lat = []
        for q in qs[:single]:
            t0 = time.perf_counter()
            db.search(q, k, metric)
            lat.append(time.perf_counter() - t0)
        lat_ms = sorted(x * 1e3 for x in lat) or [math.nan]
        p99 = lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))]
        print(
            f"single query: median {statistics.median(lat_ms):.2f} ms, p99 {p99:.2f} ms ({len(lat)} queries)"
        )
        t0 = time.perf_counter()
        batch = db.search_batch(qs, k, metric)
        t_batch = time.perf_counter() - t0
        print(f"batch of {m:,}: {m / t_batch:,.0f} queries/s ({t_batch:.2f} s)")
        ok = _exact(data, qs[:5], [[int(r.id) for r in hits] for hits in batch[:5]], k, metric)
        print(f"exactness check against NumPy float64 brute force: {'ok' if ok else 'MISMATCH'}")
        top = batch[0][:3]
        print("first query's top 3:", ", ".join(f"id {int(r.id)} (score {r.score:.4f})" for r in top))
    return EXIT_OK if ok else EXIT_PROBLEMS


def _exact(data: np.ndarray, qs: np.ndarray, got: list[list[int]], k: int, metric: str) -> bool:
    """Whether ``got`` are the brute-force top-k ids (float64, ties by smaller id)."""
    X = data.astype(np.float64)
    for q, ids in zip(qs.astype(np.float64), got):
        if metric == "l2":
            dist = np.sqrt(((X - q) ** 2).sum(1))
        elif metric == "dot":
            dist = -(X @ q)
        else:
            dist = 1 - (X @ q) / np.sqrt((X * X).sum(1) * (q @ q))
        if ids != np.argsort(dist, kind="stable")[:k].tolist():
            return False
    return True


def _sizes(path: str) -> dict[str, int]:
    out = {}
    for name in ("snap", "wal"):
        f = os.path.join(path, name)
        out[f"{name}_bytes"] = os.path.getsize(f) if os.path.exists(f) else 0
    return out


def _info(path: str, as_json: bool, device: str) -> int:
    where = _existing_database(path)
    with Iqdb.open(where, readonly=True, device=device) as db:
        check = db.check()
        report: dict[str, Any] = {
            "path": os.path.abspath(where),
            "count": len(db),
            "dim": db.dim,
            "device": db.device,
            **_sizes(where),
            "generation": _generation(check),
            "wal_frames": (check.get("wal") or {}).get("frames"),
            "ok": bool(check.get("ok")),
            "problems": list(check.get("problems", [])),
        }
    _emit(
        report,
        as_json,
        lambda: "\n".join(
            f"{key}: {'; '.join(v) if isinstance(v, list) else v}"
            for key, v in report.items()
            if not (key == "problems" and not v)
        ),
    )
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def _generation(check: dict[str, Any]) -> int | None:
    snap = check.get("snapshot") or {}
    wal = check.get("wal") or {}
    gen = wal.get("generation", snap.get("generation"))
    return None if gen is None else int(gen)


def _check(path: str, as_json: bool) -> int:
    where = _existing_database(path)
    try:
        with Iqdb.open(where, readonly=True, device="cpu") as db:
            report = db.check()
    except Corrupt as exc:
        report = {"ok": False, "path": where, "problems": [f"corrupt: {exc}"]}
    ok = bool(report.get("ok"))
    problems = list(report.get("problems", []))
    if as_json:
        _emit({"ok": ok, "path": os.path.abspath(where), "problems": problems}, True, str)
    elif ok:
        print(f"ok: {where}")
    else:
        print(f"iqdb: check failed: {'; '.join(problems)}", file=sys.stderr)
    return (
        EXIT_OK if ok else (EXIT_CORRUPT if any(p.startswith("corrupt") for p in problems) else EXIT_PROBLEMS)
    )


def _import(
    path: str,
    file: str,
    id_column: str,
    vector_column: str,
    payload_columns: Sequence[str] | None,
    device: str,
    progress: bool,
    as_json: bool,
) -> int:
    import pyarrow as pa

    from ._arrow import _Plan, open_file

    reader, total = open_file(file, vector_column=vector_column)
    # The columns are checked before the database is opened: a wrong --id-column creates nothing.
    _Plan(reader.schema, id_column, vector_column, payload_columns)
    t0 = time.perf_counter()
    done = 0
    with Iqdb.open(path, device=device) as db, _bar(total, progress, "rows") as bar:

        def report(rows: int, total_now: int | None) -> None:
            nonlocal done
            done = rows
            bar(rows, total if total_now is None else total_now)

        try:
            db.upsert_arrow(
                reader,
                id_column=id_column,
                vector_column=vector_column,
                payload_columns=payload_columns,
                progress=report,
            )
        except (IqdbError, pa.ArrowException) as exc:
            code = _exit_code(exc) if isinstance(exc, IqdbError) else EXIT_USAGE
            kept = f" (the first {done:,} rows were imported)" if done else ""
            raise _Fail(f"{_describe(exc)}{kept}", code) from None
        count_after, dim = len(db), db.dim
    seconds = time.perf_counter() - t0
    summary = {"path": path, "file": file, "rows": done, "count": count_after, "dim": dim, "seconds": seconds}
    _emit(
        summary,
        as_json,
        lambda: (
            f"imported {done:,} rows from {file} in {seconds:.2f} s; {path} holds {count_after:,} records"
        ),
    )
    return EXIT_OK


def _export(path: str, file: str, as_json: bool) -> int:
    import pyarrow as pa

    where = _existing_database(path)
    lower = file.lower()
    if not lower.endswith((".parquet", ".pq", ".arrow", ".feather", ".ipc")):
        raise _Fail(
            f"cannot tell the format of {file} from its suffix (.parquet, .arrow, .feather, .ipc)",
            EXIT_USAGE,
        )
    with Iqdb.open(where, readonly=True, device="cpu") as db:
        table = db.to_arrow()
    tmp = f"{file}.tmp-{os.getpid()}"
    try:
        if lower.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        else:
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=65_536)
        os.replace(tmp, file)  # a reader of FILE never sees half an export
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report = {"path": where, "file": file, "rows": table.num_rows, "bytes": os.path.getsize(file)}
    _emit(report, as_json, lambda: f"exported {table.num_rows:,} records to {file}")
    return EXIT_OK


def _parse_vector(text: str) -> list[float]:
    parts = [p for p in re.split(r"[,;\s]+", text.strip().strip("[]()")) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise _Fail(f"--vector must be numbers separated by commas, got {text!r}", EXIT_USAGE) from None
    if not values:
        raise _Fail("--vector is empty", EXIT_USAGE)
    return values


def _read_queries(file: str) -> np.ndarray[Any, Any]:
    if not os.path.exists(file):
        raise _Fail(f"no such file: {file}", EXIT_NOT_FOUND)
    if file.lower().endswith(".npy"):
        try:
            Q: np.ndarray[Any, Any] = np.asarray(np.load(file, allow_pickle=False))
        except ValueError as exc:
            raise _Fail(f"cannot read {file}: {exc}", EXIT_USAGE) from None
    else:
        with open(file, encoding="utf-8") as f:
            rows = [_parse_vector(line) for line in f if line.strip()]
        if len({len(r) for r in rows}) > 1:
            raise _Fail(f"the queries in {file} have different lengths", EXIT_USAGE)
        Q = np.asarray(rows, dtype=np.float32)
    if Q.ndim == 1:
        Q = Q[None, :]
    if Q.ndim != 2:
        raise _Fail(f"{file} holds an array of shape {Q.shape}; expected (m, d)", EXIT_USAGE)
    return Q


def _search(
    path: str,
    vector: str | None,
    query_file: str | None,
    k: int,
    metric: str,
    filter_json: str | None,
    device: str,
    as_json: bool,
) -> int:
    if (vector is None) == (query_file is None):
        raise _Fail("give exactly one of --vector and --query-file", EXIT_USAGE)
    Q = (
        np.asarray([_parse_vector(vector)], dtype=np.float32)
        if vector is not None
        else _read_queries(query_file or "")
    )
    extra: dict[str, Any] = {}
    if filter_json is not None:
        try:
            extra["filter"] = json.loads(filter_json)
        except json.JSONDecodeError as exc:
            raise _Fail(f"--filter is not valid JSON: {exc}", EXIT_USAGE) from None
        if not isinstance(extra["filter"], dict):
            raise _Fail('--filter must be a JSON object, such as \'{"year": {"$gte": 2020}}\'', EXIT_USAGE)
    where = _existing_database(path)
    with Iqdb.open(where, readonly=True, device=device) as db:
        try:
            batches = db.search_batch(Q, k, metric, **extra)
        except TypeError:
            if extra:  # this build's search has no filter= yet (issue 11)
                raise _Fail(
                    "--filter needs declarative filters, which this build of iqdb lacks", EXIT_USAGE
                ) from None
            raise
    hits = [{"query": qi, **r.to_dict()} for qi, results in enumerate(batches) for r in results]
    if as_json:
        print(json.dumps(hits, indent=2))
        return EXIT_OK
    for qi, results in enumerate(batches):
        if len(batches) > 1:
            print(f"query {qi}:")
        if not results:
            print("  (no results)")
        for rank, r in enumerate(results):
            payload = "" if r.payload is None else json.dumps(r.to_dict()["payload"])
            print(f"{rank:>4}  id {int(r.id):<20} score {r.score:<12.6g} {payload}")
    return EXIT_OK


def _compact(path: str, device: str, as_json: bool) -> int:
    where = _existing_database(path)
    before = _sizes(where)
    t0 = time.perf_counter()
    with Iqdb.open(where, device=device) as db:
        db.compact()
        count = len(db)
    seconds = time.perf_counter() - t0
    after = _sizes(where)
    report = {"path": where, "count": count, "seconds": seconds, "before": before, "after": after}
    _emit(
        report,
        as_json,
        lambda: (
            f"compacted {where}: {count:,} records; snapshot {after['snap_bytes']:,} bytes, "
            f"WAL {before['wal_bytes']:,} -> {after['wal_bytes']:,} bytes ({seconds:.2f} s)"
        ),
    )
    return EXIT_OK


def _bench(n: int, dim: int, queries: int, k: int, metric: str, device: str, seed: int, as_json: bool) -> int:
    """Exact top-k: iqdb's batch search and single queries against plain NumPy, same data."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim), dtype=np.float32)
    Q = rng.standard_normal((queries, dim), dtype=np.float32)
    with Iqdb.open_in_memory(device=device) as db:
        db.upsert_many(np.arange(n, dtype=np.uint64), X)
        dev = db.device
        db.search_arrays(Q[:1], k, metric)  # warm-up (and the GPU upload)

        def iqdb_batch() -> None:
            db.search_arrays(Q, k, metric)

        def iqdb_single() -> None:
            for q in Q[:20]:
                db.search(q, k, metric)

        def numpy_batch() -> None:
            _numpy_topk(X, Q, k, metric)

        def numpy_single() -> None:
            for q in Q[:20]:
                _numpy_topk(X, q[None, :], k, metric)

        rows = []
        for case, ours, theirs, count in (
            (f"batch of {queries:,}", iqdb_batch, numpy_batch, queries),
            ("single query", iqdb_single, numpy_single, min(20, queries)),
        ):
            t_ours = _median_time(ours)
            t_theirs = _median_time(theirs)
            rows.append(
                {
                    "case": case,
                    "iqdb_qps": count / t_ours,
                    "numpy_qps": count / t_theirs,
                    "speedup": t_theirs / t_ours,
                }
            )
    report = {"n": n, "dim": dim, "k": k, "metric": metric, "device": dev, "rows": rows}

    def table() -> str:
        lines = [
            f"iqdb bench: {n:,} x {dim}, k={k}, metric={metric}, device={dev} (median of 3)",
            f"{'case':<20} {'iqdb q/s':>12} {'numpy q/s':>12} {'iqdb/numpy':>11}",
        ]
        lines += [
            f"{r['case']:<20} {r['iqdb_qps']:>12,.0f} {r['numpy_qps']:>12,.0f} {r['speedup']:>10.2f}x"
            for r in rows
        ]
        return "\n".join(lines)

    _emit(report, as_json, table)
    return EXIT_OK


def _median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _numpy_topk(X: np.ndarray, Q: np.ndarray, k: int, metric: str) -> np.ndarray:
    """The plain NumPy baseline: scores by matrix product, argpartition, sort of the k."""
    S = Q @ X.T
    if metric == "l2":
        S = (X * X).sum(1)[None, :] - 2 * S
    elif metric == "cosine":
        S = -S / np.linalg.norm(X, axis=1)[None, :]
    else:
        S = -S
    kk = min(k, X.shape[0])
    part = np.argpartition(S, kk - 1, axis=1)[:, :kk]
    order = np.take_along_axis(S, part, 1).argsort(1)
    return np.take_along_axis(part, order, 1)


# -- the click application ------------------------------------------------------------------------


def _build() -> Any:
    import click

    metric_choice = click.Choice(["l2", "cosine", "dot"])
    json_option = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    device_option = click.option(
        "--device", default="auto", show_default=True, help="auto, cpu, gpu, cuda or cuda:N."
    )

    @click.group(
        help="iqdb: an embedded exact vector database (CPU or GPU).",
        epilog=_EPILOG,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    @click.version_option(package_name="iqdb", message="iqdb %(version)s")
    def cli() -> None:
        pass

    @cli.command(epilog=_EPILOG)
    @click.option("--n", default=200_000, show_default=True, type=click.IntRange(1), help="Vectors.")
    @click.option("--dim", default=128, show_default=True, type=click.IntRange(1), help="Dimension.")
    @click.option("--queries", default=1000, show_default=True, type=click.IntRange(1), help="Batch size.")
    @click.option(
        "--single", default=50, show_default=True, type=click.IntRange(1), help="Single queries timed."
    )
    @click.option("--k", "-k", default=10, show_default=True, type=click.IntRange(1))
    @click.option("--metric", default="l2", show_default=True, type=metric_choice)
    @device_option
    @click.option("--seed", default=0, show_default=True, type=int)
    def demo(n: int, dim: int, queries: int, single: int, k: int, metric: str, device: str, seed: int) -> int:
        """Build a random in-memory database, search it, check exactness, print device and speed."""
        return _demo(n, dim, queries, single, k, metric, device, seed)

    @cli.command(epilog=_EPILOG)
    @click.argument("path")
    @device_option
    @json_option
    def info(path: str, device: str, as_json: bool) -> int:
        """Count, dimension, device, snapshot and WAL sizes, generation and integrity of PATH.

        Opens read-only: works while another process writes.
        """
        return _info(path, as_json, device)

    @cli.command(epilog=_EPILOG)
    @click.argument("path")
    @json_option
    def check(path: str, as_json: bool) -> int:
        """Verify the snapshot's checksums and the WAL's frames; exit 0 when sound."""
        return _check(path, as_json)

    @cli.command("import", epilog=_EPILOG)
    @click.argument("path")
    @click.argument("file")
    @click.option("--id-column", default="id", show_default=True, help="Integer column of record ids.")
    @click.option("--vector-column", default="vector", show_default=True, help="Column of vectors.")
    @click.option(
        "--payload-column",
        "payload_columns",
        multiple=True,
        help="Import only these columns as payload fields (repeat it); default: every other column.",
    )
    @device_option
    @click.option(
        "--progress/--no-progress", default=True, show_default=True, help="Progress bar on a terminal."
    )
    @json_option
    def import_(
        path: str,
        file: str,
        id_column: str,
        vector_column: str,
        payload_columns: tuple[str, ...],
        device: str,
        progress: bool,
        as_json: bool,
    ) -> int:
        """Stream FILE into the database at PATH (created if missing), one batch at a time.

        FILE is Parquet, Arrow IPC (.arrow, .feather, .ipc), .npy (an (n, d) float array; ids
        0..n-1) or CSV (the vector column as text, "[0.1, 0.2]"). A null payload value means the
        record lacks that key. Each batch is all or nothing; on an error the batches before it
        stay imported.
        """
        return _import(
            path, file, id_column, vector_column, list(payload_columns) or None, device, progress, as_json
        )

    @cli.command(epilog=_EPILOG)
    @click.argument("path")
    @click.argument("file")
    @json_option
    def export(path: str, file: str, as_json: bool) -> int:
        """Write every record to FILE: Parquet (.parquet) or Arrow IPC (.arrow, .feather, .ipc).

        Columns id, vector and one per payload key; `iqdb import` of the file reproduces the
        database exactly.
        """
        return _export(path, file, as_json)

    @cli.command(epilog=_EPILOG)
    @click.argument("path")
    @click.option("--vector", help="The query: numbers separated by commas, e.g. 0.1,0.2,0.3.")
    @click.option(
        "--query-file",
        type=click.Path(dir_okay=False),
        help="Many queries: .npy (m, d), or text with one vector a line.",
    )
    @click.option(
        "-k", "--k", default=10, show_default=True, type=click.IntRange(0), help="Results per query."
    )
    @click.option("--metric", default="cosine", show_default=True, type=metric_choice)
    @click.option("--filter", "filter_json", help='A filter as JSON, e.g. \'{"year": {"$gte": 2020}}\'.')
    @device_option
    @json_option
    def search(
        path: str,
        vector: str | None,
        query_file: str | None,
        k: int,
        metric: str,
        filter_json: str | None,
        device: str,
        as_json: bool,
    ) -> int:
        """Exact top-k search of PATH. With --json: a list of hits {query, id, score, payload}."""
        return _search(path, vector, query_file, k, metric, filter_json, device, as_json)

    @cli.command(epilog=_EPILOG)
    @click.argument("path")
    @device_option
    @json_option
    def compact(path: str, device: str, as_json: bool) -> int:
        """Write a fresh snapshot of PATH and empty its WAL (needs the write lock)."""
        return _compact(path, device, as_json)

    @cli.command(epilog=_EPILOG)
    @click.option("--n", default=200_000, show_default=True, type=click.IntRange(1), help="Vectors.")
    @click.option("--dim", default=128, show_default=True, type=click.IntRange(1), help="Dimension.")
    @click.option("--queries", default=1000, show_default=True, type=click.IntRange(1), help="Batch size.")
    @click.option("-k", "--k", default=10, show_default=True, type=click.IntRange(1))
    @click.option("--metric", default="l2", show_default=True, type=metric_choice)
    @device_option
    @click.option("--seed", default=0, show_default=True, type=int)
    @json_option
    def bench(
        n: int, dim: int, queries: int, k: int, metric: str, device: str, seed: int, as_json: bool
    ) -> int:
        """The headline benchmark on generated data: iqdb against plain NumPy, a table of rates."""
        return _bench(n, dim, queries, k, metric, device, seed, as_json)

    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iqdb`` command; returns the exit code (see the module docstring)."""
    try:
        import click
        import tqdm  # noqa: F401 (checked here so a missing one is one clear line)
    except ImportError:
        print(_MISSING_CLI, file=sys.stderr)
        return EXIT_USAGE
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _build().main(args=args, prog_name="iqdb", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.exceptions.Abort:
        print("iqdb: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("iqdb: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Fail as exc:
        print(f"iqdb: {exc}", file=sys.stderr)
        return exc.code
    except (IqdbError, OSError) as exc:
        print(f"iqdb: {_describe(exc)}", file=sys.stderr)
        return _exit_code(exc)
    return int(code or 0)
