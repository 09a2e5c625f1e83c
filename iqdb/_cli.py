"""The ``iqdb`` command line.

    iqdb demo [--n 200000] [--dim 128] [--queries 1000] [--k 10] [--device auto]
    iqdb info PATH        (counts and integrity report of a durable database)

``demo`` builds an in-memory database of random vectors, runs single and batched searches,
checks a sample against a brute-force NumPy answer, and prints the device and the throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from ._db import Iqdb
from ._errors import IqdbError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    n, d, m, k = args.n, args.dim, args.queries, args.k
    print(f"iqdb demo: {n:,} random vectors of dimension {d}, k={k}, metric={args.metric}")
    data = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((m, d), dtype=np.float32)
    with Iqdb.open_in_memory(device=args.device) as db:
        t0 = time.perf_counter()
        db.upsert_many(np.arange(n, dtype=np.uint64), data, None)
        t_ingest = time.perf_counter() - t0
        print(f"device: {db.device}")
        print(f"ingest: {n / t_ingest:,.0f} records/s ({t_ingest:.2f} s)")
        db.search(queries[0], k, args.metric)  # warm-up
        lat = []
        for q in queries[: args.single]:
            t0 = time.perf_counter()
            db.search(q, k, args.metric)
            lat.append(time.perf_counter() - t0)
        lat_ms = sorted(x * 1e3 for x in lat)
        p99 = lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))]
        print(
            f"single query: median {statistics.median(lat_ms):.2f} ms, p99 {p99:.2f} ms "
            f"({len(lat_ms)} queries)"
        )
        t0 = time.perf_counter()
        batch = db.search_batch(queries, k, args.metric)
        t_batch = time.perf_counter() - t0
        print(f"batch of {m:,}: {m / t_batch:,.0f} queries/s ({t_batch:.2f} s)")
        # Check a few answers against brute force.
        sample = queries[:5].astype(np.float64)
        ok = True
        X = data.astype(np.float64)
        for i, q in enumerate(sample):
            if args.metric == "l2":
                dist = np.sqrt(((X - q) ** 2).sum(1))
            elif args.metric == "dot":
                dist = -(X @ q)
            else:
                dist = 1 - (X @ q) / np.sqrt((X * X).sum(1) * (q @ q))
            ref = np.argsort(dist, kind="stable")[:k]
            ok &= [int(r.id) for r in batch[i]] == ref.tolist()
        print(f"exactness check against NumPy float64 brute force: {'ok' if ok else 'MISMATCH'}")
        top = batch[0][:3]
        print("first query's top 3:", ", ".join(f"id {int(r.id)} (score {r.score:.4f})" for r in top))
    return 0 if ok else 1


def _info(args: argparse.Namespace) -> int:
    with Iqdb.open(args.path, readonly=True) as db:
        check = db.check()
        report = {"records": len(db), "dim": db.dim, "device": db.device, "check": check}
    print(json.dumps(report, indent=2, default=str))
    return 0 if check.get("ok") else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iqdb`` command."""
    parser = argparse.ArgumentParser(prog="iqdb", description="iqdb: exact vector search, CPU or GPU")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a random database, search it, print device and speed")
    demo.add_argument("--n", type=int, default=200_000)
    demo.add_argument("--dim", type=int, default=128)
    demo.add_argument("--queries", type=int, default=1000)
    demo.add_argument("--single", type=int, default=50, help="single queries to time")
    demo.add_argument("--k", type=int, default=10)
    demo.add_argument("--metric", default="l2", choices=["l2", "cosine", "dot"])
    demo.add_argument("--device", default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="open a durable database read-only and check it")
    info.add_argument("path")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except IqdbError as exc:
        print(f"iqdb: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
