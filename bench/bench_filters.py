r"""Filtered exact search (issue 11): iqdb's compiled filters against its own callable predicate
and the peers that filter, on the same data in the same run.

    .venv-bench/bin/python bench/bench_filters.py                       # 1,000,000 x 128, k = 10
    .venv-bench/bin/python bench/bench_filters.py --n 100000 --tag quick --peers lancedb,sqlite_vec,qdrant,chroma

Every record has the payload ``{"sel": i * 7919 % 1000, "kind": "a"|"b"}``; a filter of
selectivity s is ``Field("sel") < 1000 s`` (exactly s of the rows). Single queries: the median
per query over ``--queries`` queries, systems interleaved (A B C ... then C B A ...). "iqdb cold"
clears the mask cache before each query (the filter is compiled each time), "iqdb" keeps it
(a server that sees the same filter again). ``search_with`` calls Python once per record, so it
runs on two queries only. Batches: ``--batch`` queries with one shared 50 % filter, against the
same queries each with its own filter (``sel`` within a window of 500 values starting at
``i % 500``, and ``id != i``: 50 % each, all different). Peers: lancedb (``where(...,
prefilter=True)``, no vector index), sqlite-vec (a ``vec0`` metadata column), qdrant-client in
local mode, chroma (``where`` on its HNSW index: approximate, its recall is printed). A peer
that does not import, or that would take longer than ``--peer-build-s`` to load ``n`` rows at
its measured rate, is skipped with the reason. Results: ``bench/results/filters_<tag>.md``.
Setup: ``python3 -m venv .venv-bench && .venv-bench/bin/pip install -e ".[bench]" qdrant-client
chromadb``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    Table,
    fmt_ms,
    fmt_ratio,
    interleave,
    machine,
    make_vectors,
    write_result,
)

SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)


def payloads(n: int) -> list[dict[str, Any]]:
    sel = (np.arange(n, dtype=np.int64) * 7919) % 1000
    return [{"sel": s, "kind": "a" if s % 2 else "b"} for s in sel.tolist()]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples)


# -- peers ---------------------------------------------------------------------------------
class FilterPeer:
    name = ""
    note = ""
    exact = True

    def build(self, X: np.ndarray, sel: np.ndarray) -> None:
        raise NotImplementedError

    def search(self, q: np.ndarray, k: int, limit: int | None) -> list[int]:
        """Ids of the top k among rows with sel < limit (None: unfiltered)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LancePeer(FilterPeer):
    name = "lancedb"
    note = "`search(q).where('sel < t', prefilter=True).bypass_vector_index()` (exact, flat)"

    def build(self, X: np.ndarray, sel: np.ndarray) -> None:
        import lancedb
        import pyarrow as pa

        self.tmp = tempfile.TemporaryDirectory(prefix="iqdb-bench-lance-")
        vec = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])
        table = pa.table({"id": np.arange(X.shape[0], dtype=np.int64), "sel": sel, "vector": vec})
        self.table = lancedb.connect(self.tmp.name).create_table("v", data=table)

    def search(self, q: np.ndarray, k: int, limit: int | None) -> list[int]:
        s = self.table.search(q).distance_type("l2").limit(k).bypass_vector_index()
        if limit is not None:
            s = s.where(f"sel < {limit}", prefilter=True)
        return [int(i) for i in s.select(["id"]).to_arrow()["id"].to_pylist()]

    def close(self) -> None:
        del self.table
        self.tmp.cleanup()


class SqliteVecPeer(FilterPeer):
    name = "sqlite_vec"
    note = "`vec0(embedding float[d], sel integer)`, `WHERE embedding MATCH ? AND k = ? AND sel < ?`"

    def build(self, X: np.ndarray, sel: np.ndarray) -> None:
        import sqlite_vec
        from common import _sqlite3_with_extensions

        sqlite3 = _sqlite3_with_extensions()
        self.conn = sqlite3.connect(":memory:")
        self.conn.enable_load_extension(True)
        sqlite_vec.load(self.conn)
        self.conn.enable_load_extension(False)
        self.conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{X.shape[1]}], sel integer)")
        with self.conn:
            self.conn.executemany(
                "INSERT INTO v(rowid, embedding, sel) VALUES (?, ?, ?)",
                zip(range(X.shape[0]), (row.tobytes() for row in X), sel.tolist()),
            )

    def search(self, q: np.ndarray, k: int, limit: int | None) -> list[int]:
        blob = np.ascontiguousarray(q, dtype=np.float32).tobytes()
        if limit is None:
            sql, args = "SELECT rowid FROM v WHERE embedding MATCH ? AND k = ? ORDER BY distance", (blob, k)
        else:
            sql = "SELECT rowid FROM v WHERE embedding MATCH ? AND k = ? AND sel < ? ORDER BY distance"
            args = (blob, k, limit)  # type: ignore[assignment]
        return [r[0] for r in self.conn.execute(sql, args).fetchall()]

    def close(self) -> None:
        self.conn.close()


class QdrantPeer(FilterPeer):
    name = "qdrant"
    note = "qdrant-client local mode (`QdrantClient(':memory:')`), `query_points` with a `Range` filter"

    def build(self, X: np.ndarray, sel: np.ndarray) -> None:
        from qdrant_client import QdrantClient, models

        self.models = models
        self.client = QdrantClient(":memory:")
        self.client.create_collection(
            "v", vectors_config=models.VectorParams(size=X.shape[1], distance=models.Distance.EUCLID)
        )
        step = 10_000
        for r0 in range(0, X.shape[0], step):
            self.client.upload_collection(
                "v",
                vectors=X[r0 : r0 + step],
                payload=[{"sel": int(s)} for s in sel[r0 : r0 + step]],
                ids=list(range(r0, min(X.shape[0], r0 + step))),
            )

    def search(self, q: np.ndarray, k: int, limit: int | None) -> list[int]:
        m = self.models
        flt = None
        if limit is not None:
            flt = m.Filter(must=[m.FieldCondition(key="sel", range=m.Range(lt=limit))])
        res = self.client.query_points("v", query=q.tolist(), limit=k, query_filter=flt)
        return [int(p.id) for p in res.points]

    def close(self) -> None:
        self.client.close()


class ChromaPeer(FilterPeer):
    name = "chroma"
    note = "chromadb `EphemeralClient`, HNSW (l2), `where={'sel': {'$lt': t}}`: approximate"
    exact = False

    def build(self, X: np.ndarray, sel: np.ndarray) -> None:
        import chromadb

        self.client = chromadb.EphemeralClient()
        # Ephemeral clients share one in-process store: a fresh name per build.
        self.name = f"vectors-{time.monotonic_ns()}"
        self.col = self.client.create_collection(self.name, metadata={"hnsw:space": "l2"})
        step = 5000
        for r0 in range(0, X.shape[0], step):
            r1 = min(X.shape[0], r0 + step)
            self.col.add(
                ids=[str(i) for i in range(r0, r1)],
                embeddings=X[r0:r1],
                metadatas=[{"sel": int(s)} for s in sel[r0:r1]],
            )

    def search(self, q: np.ndarray, k: int, limit: int | None) -> list[int]:
        where = None if limit is None else {"sel": {"$lt": limit}}
        res = self.col.query(query_embeddings=[q], n_results=k, where=where)
        return [int(i) for i in res["ids"][0]]

    def close(self) -> None:
        self.client.delete_collection(self.name)


PEERS: dict[str, Callable[[], FilterPeer]] = {
    "lancedb": LancePeer,
    "sqlite_vec": SqliteVecPeer,
    "qdrant": QdrantPeer,
    "chroma": ChromaPeer,
}


# -- the run -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=30, help="single queries per system and selectivity")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peers", default="lancedb,sqlite_vec,qdrant,chroma")
    ap.add_argument("--peer-build-s", type=float, default=300.0)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()

    import iqdb
    from iqdb import Field
    from iqdb._filters._compile import evaluate
    from iqdb._payload import encode_payload

    n, d, k = args.n, args.dim, args.k
    X = make_vectors(n, d, seed=1, normalize=False)
    Q = make_vectors(max(args.queries, args.batch), d, seed=2, normalize=False)
    P = payloads(n)
    sel = np.array([p["sel"] for p in P], dtype=np.int64)
    print(f"data: {n:,} x {d}, k = {k}")

    db = iqdb.open_in_memory(device="cpu")
    t0 = time.perf_counter()
    db.upsert_many(np.arange(n, dtype=np.uint64), X, P)
    t_ingest = time.perf_counter() - t0
    print(f"iqdb ingest with payload indexes: {t_ingest:.1f} s")
    filters = {s: Field("sel") < int(1000 * s) for s in SELECTIVITIES}

    def clear_caches() -> None:
        v = db._store.version
        v.layout.masks._entries.clear()
        v.plans.clear()

    # correctness first: every filter against NumPy brute force on a few queries
    for s, f in filters.items():
        keep = np.flatnonzero(sel < int(1000 * s))
        for q in Q[:3]:
            dist = ((X[keep].astype(np.float64) - q) ** 2).sum(1)
            want = keep[np.lexsort((keep, dist))[:k]].tolist()
            got = [int(r.id) for r in db.search(q, k, "l2", filter=f)]
            assert got == want, (s, got, want)

    qs = Q[: args.queries]

    def per_query(fn: Callable[[np.ndarray], object]) -> Callable[[int], list[float]]:
        def block(_round: int) -> list[float]:
            out = []
            for q in qs:
                t = time.perf_counter()
                fn(q)
                out.append(time.perf_counter() - t)
            return out

        return block

    tasks: dict[str, Callable[[int], list[float]]] = {
        "unfiltered": per_query(lambda q: db.search(q, k, "l2")),
    }
    for s, f in filters.items():
        tasks[f"iqdb {s:g}"] = per_query(lambda q, f=f: db.search(q, k, "l2", filter=f))

        def cold(q: np.ndarray, f: Any = f) -> object:
            clear_caches()
            return db.search(q, k, "l2", filter=f)

        tasks[f"iqdb cold {s:g}"] = per_query(cold)
    print("single queries (iqdb) ...")
    res = interleave(tasks, rounds=args.rounds, budget_s=60.0, log=None)
    unf = median_ms(res["unfiltered"])

    # compile: one filter's mask over all n rows, no cache
    v = db._store.version
    L = v.layout
    compile_s = {}
    for s, f in filters.items():
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            evaluate(f, L.fields, L.ids, L.payloads, 0, v.n)
            ts.append(time.perf_counter() - t)
        compile_s[s] = statistics.median(ts)

    # search_with: Python once per record
    with_s = {}
    for s in (0.5, 0.001):
        lim = int(1000 * s)
        ts = []
        for q in qs[:2]:
            t = time.perf_counter()
            db.search_with(q, k, "l2", lambda r, lim=lim: r.payload["sel"] < lim)
            ts.append(time.perf_counter() - t)
        with_s[s] = statistics.median(ts)

    single = Table(
        f"Single query, n = {n:,}, d = {d}, k = {k}: median ms per query (ratio to iqdb unfiltered)",
        ["selectivity", "iqdb", "ratio", "iqdb cold", "ratio", "mask compile", "search_with"],
    )
    single.add("none", fmt_ms(unf), "1.00", "", "", "", "")
    for s in SELECTIVITIES:
        warm, cold_ = median_ms(res[f"iqdb {s:g}"]), median_ms(res[f"iqdb cold {s:g}"])
        single.add(
            f"{s:.1%}",
            fmt_ms(warm),
            fmt_ratio(warm / unf),
            fmt_ms(cold_),
            fmt_ratio(cold_ / unf),
            fmt_ms(compile_s[s]),
            fmt_ms(with_s[s]) if s in with_s else "",
        )
    single.notes.append(
        "targets: 50 % filter <= 1.3x unfiltered; 0.1 % filter >= 10x faster than unfiltered; "
        "mask compile over all rows < one unfiltered search"
    )
    print(single.text())

    # batches: one shared filter against one filter per query
    B = Q[: args.batch]
    shared = Field("sel") < 500
    distinct = [Field("sel").between(i % 500, i % 500 + 499) & (Field.id != i) for i in range(B.shape[0])]
    btasks = {
        "batch unfiltered": lambda _r: [_timed(lambda: db.search_arrays(B, k, "l2"))],
        "batch shared 50%": lambda _r: [_timed(lambda: db.search_arrays(B, k, "l2", filter=shared))],
        "batch distinct 50%": lambda _r: [_timed(lambda: db.search_arrays(B, k, "l2", filter=distinct))],
    }
    # check the per-query answers against single searches on a few queries
    ids, _ = db.search_arrays(B, k, "l2", filter=distinct)
    for i in (0, 1, B.shape[0] - 1):
        assert ids[i].tolist() == [int(r.id) for r in db.search(B[i], k, "l2", filter=distinct[i])]
    print("batches ...")
    bres = interleave(btasks, rounds=args.rounds, budget_s=120.0, log=None)
    bu = median_ms(bres["batch unfiltered"])
    bs = median_ms(bres["batch shared 50%"])
    bd = median_ms(bres["batch distinct 50%"])
    batch = Table(
        f"Batch of {B.shape[0]:,} queries: median ms per batch",
        ["case", "ms", "ratio to unfiltered", "ratio to shared"],
    )
    batch.add("unfiltered", fmt_ms(bu), "1.00", "")
    batch.add("one shared 50 % filter", fmt_ms(bs), fmt_ratio(bs / bu), "1.00")
    batch.add(f"{B.shape[0]:,} different 50 % filters", fmt_ms(bd), fmt_ratio(bd / bu), fmt_ratio(bd / bs))
    batch.notes.append("target: 1,000 different filters <= 2x the same batch with one shared filter")
    print(batch.text())

    # memory: the payload indexes against the payloads
    index_b = L.fields.nbytes()
    encoded_b = sum(len(encode_payload(p) or b"") for p in L.payloads[: v.n])
    mem = Table("Memory of the payload indexes", ["what", "bytes", "per record", "ratio to payload"])
    mem.add("payloads, iqdb's binary encoding", f"{encoded_b:,}", f"{encoded_b / n:.1f}", "1.00")
    mem.add(
        "payload indexes (columns + dictionaries)",
        f"{index_b:,}",
        f"{index_b / n:.1f}",
        fmt_ratio(index_b / encoded_b),
    )
    mem.notes.append("target: indexes <= 1.5x the payload bytes")
    print(mem.text())

    # peers
    peer_rows = Table(
        f"Peers, single query: median ms per query (ratio to iqdb at the same selectivity), n = {n:,}",
        ["system", "load s", "none", *[f"{s:.1%}" for s in SELECTIVITIES], "recall@k"],
    )
    iq = {None: unf, **{s: median_ms(res[f"iqdb {s:g}"]) for s in SELECTIVITIES}}
    peer_rows.add("iqdb", f"{t_ingest:.1f}", *[fmt_ms(iq[s]) for s in (None, *SELECTIVITIES)], "1.00")
    skipped: list[str] = []
    for name in [p for p in args.peers.split(",") if p]:
        peer = PEERS[name]()
        try:
            t = time.perf_counter()
            peer.build(X[: min(n, 20_000)], sel[: min(n, 20_000)])
            rate = min(n, 20_000) / (time.perf_counter() - t)
            peer.close()
            if n / rate > args.peer_build_s:
                skipped.append(
                    f"{name}: loading {n:,} rows would take ~{n / rate:,.0f} s at {rate:,.0f} rows/s"
                )
                continue
            gc.collect()
            peer = PEERS[name]()
            t = time.perf_counter()
            peer.build(X, sel)
            load = time.perf_counter() - t
        except Exception as exc:
            skipped.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
            continue
        cells, hits, total = [], 0, 0
        for s in (None, *SELECTIVITIES):
            lim = None if s is None else int(1000 * s)
            ts = []
            for q in qs[: max(3, len(qs) // 3)]:
                t = time.perf_counter()
                got = peer.search(q, k, lim)
                ts.append(time.perf_counter() - t)
                want = [
                    int(r.id)
                    for r in db.search(q, k, "l2", filter=None if lim is None else Field("sel") < lim)
                ]
                hits += len(set(got) & set(want))
                total += len(want)
            m_ = statistics.median(ts)
            cells.append(f"{fmt_ms(m_)} ({fmt_ratio(m_ / iq[s])})")
        peer_rows.add(name, f"{load:.1f}", *cells, f"{hits / max(1, total):.2f}")
        peer.close()
        print(peer_rows.text())
    for line in skipped:
        peer_rows.notes.append(f"skipped {line}")
    for name in args.peers.split(","):
        if name in PEERS:
            peer_rows.notes.append(f"{name}: {PEERS[name].note}")
    print(peer_rows.text())

    out = REPO / "bench" / "results" / f"filters_{args.tag}.md"
    write_result(
        out,
        "Filtered exact search: iqdb against search_with and the peers that filter",
        [
            "Payload `{sel: i * 7919 % 1000, kind}`; filter `Field('sel') < 1000 s`; L2; one process, "
            "systems interleaved. Compare ratios within this run only (a shared, noisy machine)."
        ],
        machine([]),
        [single.markdown(), batch.markdown(), mem.markdown(), peer_rows.markdown()],
    )
    print(f"wrote {out.relative_to(REPO)}")


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
