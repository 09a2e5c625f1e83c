"""Scale-out on Ray (issue 14): ShardedIqdb with 1, 2 and 4 shards on this machine, and the
driver's merge cost against the shards' search cost.

    .venv/bin/pip install -e ".[ray]"
    .venv/bin/python bench/bench_distributed.py --n 100000 --d 128 --out bench/results/distributed_cpu.md

Three parts:
1. The exact merge alone (``iqdb.distributed._merge.merge_topk``): microseconds per query for
   S shards x k candidates, the figures the capacity model in docs/scaleout.md uses.
2. One ``Iqdb`` in this process against ``ShardedIqdb`` over Ray actors (shards reserve no CPU,
   so they share this machine's cores with each other and the driver): single-query latency
   (p50, p99) and batch throughput (queries/s) for 1, 2 and 4 shards.
3. For the batch searches, the share of the time the driver spends merging.

On a machine with fewer cores than shards, more shards cannot search faster: the point of the
table is the overhead of the fan-out and the merge, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import numpy as np


def merge_cost(shards: int, k: int, m: int = 64, reps: int = 5) -> float:
    """Microseconds per query to merge ``shards`` sorted lists of ``k`` candidates."""
    from iqdb.distributed._merge import merge_topk

    rng = np.random.default_rng(0)
    parts = []
    for _ in range(shards):
        scores = np.sort(rng.random((m, k)), axis=1)
        ids = rng.integers(0, 2**63, size=(m, k), dtype=np.uint64)
        parts.append((ids, scores))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        merge_topk(parts, [None] * shards, k)
        best = min(best, time.perf_counter() - t)
    return best / m * 1e6


def timed(fn: Any, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--single", type=int, default=100, help="single queries timed per configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import ray

    import iqdb
    from iqdb.distributed import ShardedIqdb
    from iqdb.distributed._merge import merge_topk

    lines = [
        "# ShardedIqdb on Ray: latency, throughput and merge cost",
        "",
        f"Command: `python bench/bench_distributed.py --n {args.n} --d {args.d} --k {args.k} "
        f"--batch {args.batch} --single {args.single}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, Ray {ray.__version__}, "
        f"iqdb {iqdb.__version__}. Shared with other jobs while measured: absolute figures are noisy.",
        "",
        "## 1. Exact merge on the driver (one core), microseconds per query",
        "",
        "| shards | k=10 | k=100 | k=1000 |",
        "|---|---|---|---|",
    ]
    for s in (8, 32, 128):
        row = [f"{merge_cost(s, k):.1f}" for k in (10, 100, 1000)]
        lines.append(f"| {s} | " + " | ".join(row) + " |")
        print(lines[-1], flush=True)

    rng = np.random.default_rng(1)
    X = rng.normal(size=(args.n, args.d)).astype(np.float32)
    ids = np.arange(args.n, dtype=np.uint64)
    Q = rng.normal(size=(args.batch, args.d)).astype(np.float32)
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    lines += [
        "",
        f"## 2. Search, n = {args.n:,} x {args.d}, k = {args.k}, L2",
        "",
        "| configuration | single query p50 (ms) | p99 (ms) | batch of "
        f"{args.batch}: queries/s | merge share of the batch |",
        "|---|---|---|---|---|",
    ]

    def report(name: str, db: Any, merge_share: str) -> None:
        db.search(Q[0], args.k, "l2")  # warm up
        single = sorted(timed(lambda: db.search(Q[1], args.k, "l2"), args.single))
        batch = min(timed(lambda: db.search_arrays(Q, args.k, "l2"), 3))
        p50, p99 = single[len(single) // 2], single[min(len(single) - 1, int(0.99 * len(single)))]
        lines.append(
            f"| {name} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | {args.batch / batch:,.0f} | {merge_share} |"
        )
        print(lines[-1], flush=True)

    with iqdb.open_in_memory(device="cpu") as single_db:
        single_db.upsert_many(ids, X)
        report("one Iqdb, in process", single_db, "-")
    for shards in (1, 2, 4):
        db = ShardedIqdb.open_in_memory(shards=shards, actor_options={"num_cpus": 0}, timeout=600)
        try:
            for start in range(0, args.n, 50_000):
                db.upsert_many(ids[start : start + 50_000], X[start : start + 50_000])
            # The merge's share: the per-shard answers merged alone, against the whole call.
            shard_parts = [
                ray.get(s.handle.search_arrays.remote(Q, args.k, "l2", None, {})) for s in db._shards
            ]
            whole = min(timed(lambda db=db: db.search_arrays(Q, args.k, "l2"), 3))
            merge = min(timed(lambda p=shard_parts, s=shards: merge_topk(p, [None] * s, args.k), 5))
            report(f"ShardedIqdb, Ray, {shards} shard(s)", db, f"{merge / whole:.1%}")
        finally:
            db.close()
    ray.shutdown()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
