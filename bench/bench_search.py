r"""iqdb against its peers: exact (flat) top-k search on the CPU (issues 2 and 4).

Run the whole comparison (every case at the issue sizes; about 40 min on 2 cores, < 6 GB):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/bench_search.py

The committed results (bench/results/) came from these three runs (the same cases, split so each
result file gets its own tag), on a shared machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/bench_search.py \
        --n 1000000 --dim 128 --wide none --queries 1000,10000 --single 50 --cases single,batch --tag cpu
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/bench_search.py \
        --n 200000 --dim 768 --wide none --queries 1000 --single 40 --cases single,batch --tag cpu_768
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/bench_search.py \
        --cases sweep,scaling --dim 128 --sweep-n 100000 --scaling-max 1e7 --tag cpu

A quick smoke run (about a minute):

    .venv-bench/bin/python bench/bench_search.py --n 20000 --wide none --queries 200 --single 20 \
        --cases single,batch,sweep,scaling --sweep-n 20000 --scaling-max 100000 --tag quick

Setup: ``python3 -m venv .venv-bench && .venv-bench/bin/pip install -e ".[bench]"``. Peers that fail
to import are skipped with the reason printed. Each case interleaves the systems (A B C ... then
C B A ...) and measures the hardware floors in the same rounds; compare only within one run.
Results: ``bench/results/{search,sweep,scaling}_<tag>.md`` (+ PNG charts); see bench/README.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PEER_ORDER,
    GemmFloor,
    PeakMemory,
    Peer,
    ReadFloor,
    Reference,
    Stats,
    Table,
    build_peers,
    check_ids,
    close_peers,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    fmt_us,
    interleave,
    loadavg,
    machine,
    make_peers,
    make_vectors,
    peak_rss_gib,
    seconds_per_call,
    write_result,
)

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def parse_shape(text: str) -> tuple[int, int]:
    n, _, d = text.lower().partition("x")
    return int(float(n)), int(d)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=lambda s: int(float(s)), default=1_000_000, help="stored vectors (main shape)")
    p.add_argument("--dim", type=int, default=128, help="dimension (main shape)")
    p.add_argument("--wide", default="200000x768", help="second shape NxD for single+batch, or 'none'")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", default="1000,10000", help="batch sizes, comma-separated")
    p.add_argument("--single", type=int, default=50, help="single queries per system")
    p.add_argument("--check", type=int, default=20, help="queries checked against float64 (per path)")
    p.add_argument("--metric", choices=["l2", "ip"], default="l2", help="ip: normalised data, inner product")
    p.add_argument("--systems", default=",".join(PEER_ORDER), help=f"subset of {','.join(PEER_ORDER)}")
    p.add_argument("--cases", default="single,batch,sweep,scaling", help="groups to run")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds for single queries")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (timed calls) per batch")
    p.add_argument(
        "--budget", type=float, default=40.0, help="seconds per system per case before it sits out"
    )
    p.add_argument("--batch-cap", type=int, default=None, help="override every peer's batch query cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-n", type=lambda s: int(float(s)), default=100_000)
    p.add_argument("--sweep-k", default="1,10,100,1000")
    p.add_argument("--sweep-m", default="1,10,100,1000,10000")
    p.add_argument("--sweep-systems", default="iqdb,iqdb_lists,faiss,faiss_1t")
    p.add_argument("--sweep-reps", type=int, default=3)
    p.add_argument(
        "--sweep-max-results",
        type=lambda s: int(float(s)),
        default=1_000_000,
        help="skip cells with m*k above this for systems returning a Python object per hit (iqdb)",
    )
    p.add_argument(
        "--scaling-max", type=lambda s: int(float(s)), default=1_000_000, help="largest n (1e7: ~16 GB)"
    )
    p.add_argument("--scaling-systems", default="iqdb,numpy,faiss,faiss_1t")
    p.add_argument(
        "--scaling-big-systems",
        default="iqdb,faiss_1t",
        help="the systems kept for n above 1e6 (each holds its own copy of the vectors)",
    )
    p.add_argument("--scaling-m", type=int, default=1000, help="batch size in the scaling sweep")
    p.add_argument("--scaling-single", type=int, default=20, help="single queries per system and n")
    p.add_argument("--tag", default="cpu", help="result files: bench/results/<case>_<tag>.md")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.cases = {c for c in args.cases.split(",") if c}
    bad = args.cases - {"single", "batch", "sweep", "scaling"}
    if bad:
        p.error(f"unknown cases {sorted(bad)}")
    args.queries = [int(float(x)) for x in args.queries.split(",") if x]
    return args


# ---------------------------------------------------------------------------------------------
# Single query and batch on one shape


class ShapeRun:
    """All peers built over one ``n x d`` matrix; runs the single-query and batch cases on it."""

    def __init__(self, args: argparse.Namespace, n: int, d: int, peers: list[Peer], skipped: dict[str, str]):
        self.args, self.n, self.d, self.k = args, n, d, args.k
        log(f"data {n:,} x {d} ({args.metric}), {n * d * 4 / 1e6:,.0f} MB")
        normalize = args.metric == "ip"
        self.X = make_vectors(n, d, args.seed, normalize)
        m_max = max([args.single + 1, *args.queries]) if "batch" in args.cases else args.single + 1
        self.Q = make_vectors(m_max, d, args.seed + 1, normalize)
        self.ref = Reference(self.X, args.metric)
        self.peers, self.build_s, failed = build_peers(peers, self.X, args.metric, log)
        self.skipped = {**skipped, **failed}
        self.names = [p.name for p in self.peers]

    def label(self) -> str:
        return f"{self.n:,} x {self.d}, k = {self.k}, {self.args.metric}"

    def single(self) -> Table:
        args, k, Q = self.args, self.k, self.Q
        nq = args.single
        for peer in self.peers:  # warm-up: page faults, lazy initialisation, thread pools
            peer.search(Q[nq], k)
        floor = ReadFloor(self.X)
        floor.once()
        native: dict[str, dict[int, Any]] = {p.name: {} for p in self.peers}

        def task_for(peer: Peer) -> Any:
            cap = min(nq, peer.single_cap or nq)
            per = math.ceil(cap / args.rounds)

            def task(r: int) -> list[float]:
                out = []
                for i in range(r * per, min(cap, (r + 1) * per)):
                    q = Q[i]
                    t0 = time.perf_counter()
                    res = peer.search(q, k)
                    out.append(time.perf_counter() - t0)
                    if i < args.check:
                        native[peer.name][i] = res
                return out

            return task

        per_floor = math.ceil(nq / args.rounds)
        tasks = {p.name: task_for(p) for p in self.peers}
        tasks["floor"] = lambda r: [floor.once() for _ in range(per_floor)]
        log(f"single query, {self.label()}: {nq} queries per system in {args.rounds} interleaved rounds")
        samples = interleave(tasks, args.rounds, args.budget, log=None)
        floor.close()
        found = {}
        for peer in self.peers:
            rows = [peer.ids(native[peer.name][i], k) for i in sorted(native[peer.name])]
            found[peer.name] = _stack(rows, k)
        checks = check_ids(self.ref, Q[: args.check], k, found)
        st = {name: Stats(tuple(s)) for name, s in samples.items() if s}
        fl = st["floor"]
        gbs = self.X.nbytes / fl.median / 1e9
        base = st.get("iqdb")
        t = Table(
            f"Single query, {self.label()}: latency in ms",
            [
                "system",
                "queries",
                "median",
                "p99",
                "best",
                "worst",
                "x iqdb",
                "x floor",
                f"recall@{k}",
                "ids = iqdb",
                "build s",
            ],
        )
        for name in [*self.names, "floor"]:
            s = st.get(name)
            if s is None:
                continue
            c = checks.get(name)
            t.add(
                name if name != "floor" else f"*floor: read X once ({gbs:.1f} GB/s)*",
                s.count,
                fmt_ms(s.median),
                fmt_ms(s.p99),
                fmt_ms(s.best),
                fmt_ms(s.worst),
                fmt_ratio(s.median / base.median) if base else "-",
                fmt_ratio(s.median / fl.median),
                f"{c.recall:.4f}" if c else "-",
                c.iqdb_text() if c else "-",
                f"{self.build_s[name]:.2f}" if name in self.build_s else "-",
            )
        t.notes += [
            "x iqdb = median / iqdb's median (above 1: slower than iqdb); "
            "x floor = median / the floor's median.",
            f"floor = bytes of X ({self.X.nbytes / 1e6:,.0f} MB) / NumPy's read rate, "
            "measured in the same rounds.",
            f"recall@{k}: the first {args.check} queries against a float64 brute force, ties (within "
            "float32 rounding of the k-th distance) counted as hits; ids = iqdb: queries with the same "
            "id set as iqdb.",
        ]
        capped = [
            f"{p.name} {min(nq, p.single_cap)}" for p in self.peers if p.single_cap and p.single_cap < nq
        ]
        if capped:
            t.notes.append(f"capped (slow): {', '.join(capped)} queries instead of {nq}.")
        budget = [n for n in self.names if st[n].count < min(nq, _peer(self.peers, n).single_cap or nq)]
        if budget:
            t.notes.append(f"stopped by the {args.budget:.0f} s time budget: {', '.join(budget)}.")
        return t

    def batch(self, m: int) -> Table:
        args, k = self.args, self.k
        Qm = self.Q[:m]
        caps = {p.name: min(m, args.batch_cap or p.batch_cap or m) for p in self.peers}
        for peer in self.peers:
            peer.search_batch(Qm[: min(8, m)], k)
        gemm = GemmFloor(self.X, m)
        gemm.run(Qm[: min(m, gemm.qb)])
        native: dict[str, Any] = {}
        mem: dict[str, float] = {}
        peak = PeakMemory()

        def task_for(peer: Peer) -> Any:
            def task(r: int) -> list[float]:
                peak.start()
                t0 = time.perf_counter()
                res = peer.search_batch(Qm[: caps[peer.name]], k)
                dt = time.perf_counter() - t0
                mem[peer.name] = max(mem.get(peer.name, 0.0), peak.extra_gib())
                if peer.name not in native:
                    native[peer.name] = res
                return [dt]

            return task

        def floor_task(r: int) -> list[float]:
            return [gemm.run(Qm)]

        tasks = {p.name: task_for(p) for p in self.peers}
        tasks["floor"] = floor_task
        log(f"batch of {m:,}, {self.label()}: {args.repeats} interleaved rounds")
        samples = interleave(tasks, args.repeats, args.budget, log=log)
        gemm.close()
        nchk = min(args.check, m)
        found = {}
        for peer in self.peers:
            found[peer.name] = peer.batch_ids(native[peer.name], k)[:nchk]
        checks = check_ids(self.ref, Qm[:nchk], k, found)
        caps["floor"] = m
        # per-query seconds, so capped systems compare on the same footing
        st = {name: Stats(tuple(x / caps[name] for x in s)) for name, s in samples.items() if s}
        fl = st["floor"]
        gflops = 2 * self.n * self.d / fl.median / 1e9
        base = st.get("iqdb")
        t = Table(
            f"Batch of {m:,} queries, {self.label()}: throughput in queries/s",
            [
                "system",
                "queries timed",
                "runs",
                "q/s median",
                "q/s best",
                "q/s worst",
                "time x iqdb",
                "time x floor",
                f"recall@{k}",
                "ids = iqdb",
                "peak extra GiB",
            ],
        )
        for name in [*self.names, "floor"]:
            s = st.get(name)
            if s is None:
                continue
            c = checks.get(name)
            t.add(
                name if name != "floor" else f"*floor: bare blocked GEMM ({gflops:.0f} GFLOP/s)*",
                f"{caps[name]:,}" + (" (capped)" if caps[name] < m else ""),
                s.count,
                fmt_rate(1 / s.median),
                fmt_rate(1 / s.best),
                fmt_rate(1 / s.worst),
                fmt_ratio(s.median / base.median) if base else "-",
                fmt_ratio(s.median / fl.median),
                f"{c.recall:.4f}" if c else "-",
                c.iqdb_text() if c else "-",
                f"{mem[name]:.2f}" if name in mem else "-",
            )
        t.notes += [
            "q/s = queries timed / seconds of one call (median, best and worst of the runs); ratios compare "
            "time per query, so capped systems (a subset of the batch, timed the same way) compare fairly.",
            f"floor = the bare blocked matrix product Q @ X.T of the whole batch ({m:,} x {self.d} by "
            f"{self.d} x {self.n:,}), no selection: per round the faster of the BLAS threading it "
            "(16 MiB tiles) and the rows split over the cores with a one-thread BLAS (8 MiB tiles each).",
            f"recall@{k} and ids = iqdb: the first {nchk} queries of the batch path.",
            "peak extra GiB = the process's peak RSS during the call minus its RSS before it "
            "(largest over the runs): the working memory of the search.",
        ]
        short = [n for n in self.names if st[n].count < args.repeats]
        if short:
            t.notes.append(f"fewer runs (the {args.budget:.0f} s time budget): {', '.join(short)}.")
        return t

    def close(self) -> None:
        close_peers(self.peers)
        del self.X, self.Q, self.ref


def _peer(peers: list[Peer], name: str) -> Peer:
    return next(p for p in peers if p.name == name)


def _stack(rows: list[np.ndarray], k: int) -> np.ndarray:
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : min(k, r.size)] = r[:k]
    return out


def run_search(args: argparse.Namespace, machine_rows: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    shapes = [(args.n, args.dim)]
    if args.wide.lower() != "none":
        shapes.append(parse_shape(args.wide))
    sections: list[str] = []
    skipped_all: dict[str, str] = {}
    load_start = loadavg()
    for n, d in shapes:
        peers, skipped = make_peers(args.systems, log)
        skipped_all.update(skipped)
        run = ShapeRun(args, n, d, peers, skipped)
        skipped_all.update(run.skipped)
        if machine_rows is None:
            machine_rows = machine(run.peers)
        sections.append(f"## {n:,} x {d}")
        if "single" in args.cases:
            t = run.single()
            print("\n" + t.text() + "\n", flush=True)
            sections.append(t.markdown())
        if "batch" in args.cases:
            for m in args.queries:
                t = run.batch(m)
                print("\n" + t.text() + "\n", flush=True)
                sections.append(t.markdown())
        run.close()
    intro = [
        "Exact top-k, iqdb against its peers on the same seeded standard-normal float32 data "
        f"({'L2-normalised, inner product' if args.metric == 'ip' else 'raw vectors, L2'}). Systems are "
        "interleaved (A B C ... then C B A ...) with a 0.25 s pause between blocks; the floors are "
        "measured in the same rounds. Compare ratios within this file only: the machine is a shared "
        "2-vCPU guest.",
        "",
        f"Load average (1, 5, 15 min) at the start: {load_start}; at the end: {loadavg()}. "
        f"Peak RSS of the process: {peak_rss_gib():.1f} GiB.",
    ]
    if skipped_all:
        intro += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped_all.items())]
    notes = ["## Systems", ""]
    notes += [f"- `{p.name}`: {p.note}" for p in make_peers(args.systems, lambda _: None)[0]]
    if not args.no_write and machine_rows is not None:
        write_result(
            RESULTS / f"search_{args.tag}.md",
            "iqdb search benchmark: single query and batch",
            intro,
            machine_rows,
            ["\n".join(notes), *sections],
        )
    return machine_rows or []


# ---------------------------------------------------------------------------------------------
# Sweep of k and m


def run_sweep(args: argparse.Namespace, machine_rows: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    n, d = args.sweep_n, args.dim
    ks = [int(x) for x in args.sweep_k.split(",")]
    ms = [int(x) for x in args.sweep_m.split(",")]
    peers, skipped = make_peers(args.sweep_systems.split(","), log)
    load_start = loadavg()
    log(f"sweep: {n:,} x {d}, k in {ks}, m in {ms}")
    normalize = args.metric == "ip"
    X = make_vectors(n, d, args.seed, normalize)
    Q = make_vectors(max(ms), d, args.seed + 1, normalize)
    peers, _, failed = build_peers(peers, X, args.metric, log)
    skipped.update(failed)
    if machine_rows is None:
        machine_rows = machine(peers)
    read = ReadFloor(X)
    names = [p.name for p in peers]
    per_query: dict[tuple[str, int, int], Stats] = {}
    ref = Reference(X, args.metric)
    recall: dict[str, list[float]] = {nm: [] for nm in names}
    guarded: list[str] = []
    for m in ms:
        Qm = Q[:m]
        gemm = GemmFloor(X, m)
        for k in ks:
            if k > n:
                continue
            first: dict[str, Any] = {}

            def task_for(peer: Peer, Qm: np.ndarray = Qm, k: int = k, first: dict[str, Any] = first) -> Any:
                def task(r: int) -> list[float]:
                    if peer.name not in first:
                        first[peer.name] = peer.search_batch(Qm, k)
                    return [seconds_per_call(lambda: peer.search_batch(Qm, k), min_time=0.2)]

                return task

            def floor_task(r: int, Qm: np.ndarray = Qm, gemm: GemmFloor = gemm) -> list[float]:
                t_read = seconds_per_call(read.once, 0.05)
                if Qm.shape[0] == 1:  # one query: the read is the floor (a 1-row GEMM is just slow BLAS)
                    return [t_read]
                return [max(t_read, min(gemm.run(Qm) for _ in range(3)))]

            run_peers = [p for p in peers if not (p.object_results and m * k > args.sweep_max_results)]
            for p in peers:
                if p not in run_peers:
                    guarded.append(f"{p.name} k={k} m={m:,}")
            tasks = {p.name: task_for(p) for p in run_peers}
            tasks["floor"] = floor_task
            samples = interleave(tasks, args.sweep_reps, args.budget / 4)
            for name, s in samples.items():
                per_query[(name, k, m)] = Stats(tuple(x / m for x in s))
            nchk = min(m, 5)
            found = {p.name: p.batch_ids(first[p.name], k)[:nchk] for p in run_peers}
            for name, c in check_ids(ref, Qm[:nchk], k, found).items():
                recall[name].append(c.recall)
            line = ", ".join(f"{nm} {fmt_us(per_query[(nm, k, m)].median)}" for nm in [*samples])
            log(f"  k={k} m={m}: us/query {line}")
        gemm.close()
    read.close()
    close_peers(peers)
    del X, Q, ref

    t = Table(
        f"Time per query in microseconds (median), {n:,} x {d}, {args.metric}",
        ["k", "m", *names, "floor", *[f"{nm} x iqdb" for nm in names if nm != "iqdb"], "iqdb x floor"],
    )
    for k in ks:
        for m in ms:
            if ("floor", k, m) not in per_query:
                continue
            nan = float("nan")
            med = {
                nm: per_query[(nm, k, m)].median if (nm, k, m) in per_query else nan
                for nm in [*names, "floor"]
            }
            base = med.get("iqdb", nan)
            t.add(
                k,
                f"{m:,}",
                *[fmt_us(med[nm]) if (nm, k, m) in per_query else "skipped" for nm in names],
                fmt_us(med["floor"]),
                *[fmt_ratio(med[nm] / base) for nm in names if nm != "iqdb"],
                fmt_ratio(base / med["floor"]),
            )
    t.notes += [
        "Each sample = the mean of back-to-back `search_batch(Q[:m], k)` calls filling 0.2 s, divided by m; "
        f"median of up to {args.sweep_reps} interleaved samples.",
        "floor = max(read X once, bare blocked GEMM of the m x n scores) per query; m = 1: read X once.",
        "recall@k (tie-aware, first 5 queries of every cell): "
        + ", ".join(f"{nm} min {min(v):.4f}" for nm, v in recall.items() if v),
    ]
    if guarded:
        t.notes.append(
            f"skipped (m*k > {args.sweep_max_results:,} results as Python objects; memory guard, "
            f"--sweep-max-results): {', '.join(guarded)}."
        )
    print("\n" + t.text() + "\n", flush=True)
    png = RESULTS / f"sweep_{args.tag}.png"
    chart = (
        _sweep_chart(png, names, ks, ms, per_query, f"{n:,} x {d}, {args.metric}")
        if not args.no_write
        else ""
    )
    intro = [
        f"Time per query against the batch size m and k, {n:,} x {d} (smaller n than the main run to "
        "keep the sweep short; the shape of the curves is what matters: no cliff in k or m).",
        "",
        f"Load average at the start: {load_start}; at the end: {loadavg()}.",
    ]
    if skipped:
        intro += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    if not args.no_write:
        write_result(
            RESULTS / f"sweep_{args.tag}.md",
            "iqdb sweep of k and batch size",
            intro,
            machine_rows,
            [chart, t.markdown()],
        )
    return machine_rows


def _sweep_chart(
    path: Path,
    names: list[str],
    ks: list[int],
    ms: list[int],
    pq: dict[tuple[str, int, int], Stats],
    title: str,
) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no chart: {exc}")
        return f"(no chart: {exc})"
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for k in ks:
            xs = [m for m in ms if (name, k, m) in pq]
            ax.plot(xs, [pq[(name, k, m)].median * 1e6 for m in xs], marker="o", label=f"k={k}")
        xs = [m for m in ms if ("floor", ks[0], m) in pq]
        ax.plot(xs, [pq[("floor", ks[0], m)].median * 1e6 for m in xs], "k--", label="floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("batch size m (queries)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time per query (µs)")
    axes[0][-1].legend()
    fig.suptitle(f"Exact top-k: time per query vs batch size and k ({title})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return f"![time per query against m and k]({path.name})"


# ---------------------------------------------------------------------------------------------
# Scaling in n


def run_scaling(
    args: argparse.Namespace, machine_rows: list[tuple[str, str]] | None
) -> list[tuple[str, str]]:
    d, m = args.dim, args.scaling_m
    ns = [
        n
        for n in (10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)
        if n <= args.scaling_max
    ]
    load_start = loadavg()
    normalize = args.metric == "ip"
    Q = make_vectors(max(m, args.scaling_single), d, args.seed + 1, normalize)
    single: dict[tuple[str, int], Stats] = {}
    batch: dict[tuple[str, int], Stats] = {}
    names: list[str] = []
    skipped: dict[str, str] = {}
    for n in ns:
        systems = args.scaling_systems if n <= 1_000_000 else args.scaling_big_systems
        for nm in _scaling_point(args, n, systems, Q, single, batch, skipped):
            if nm not in names:
                names.append(nm)
        if machine_rows is None:
            machine_rows = machine(make_peers(names, lambda _: None)[0])

    allnames = [*names, "floor"]
    t1 = Table(
        f"Single-query latency (median ms) against n, d = {d}, k = {args.k}, {args.metric}",
        ["n", *allnames, "iqdb x floor"],
    )
    t2 = Table(
        f"Batch of {m:,}: seconds per call (median) against n, d = {d}, k = {args.k}, {args.metric}",
        ["n", *allnames, "iqdb x floor"],
    )
    for n in ns:
        t1.add(
            f"{n:,}",
            *[fmt_ms(single[(nm, n)].median) if (nm, n) in single else "-" for nm in allnames],
            fmt_ratio(single[("iqdb", n)].median / single[("floor", n)].median) if "iqdb" in names else "-",
        )
        t2.add(
            f"{n:,}",
            *[f"{batch[(nm, n)].median:.4f}" if (nm, n) in batch else "-" for nm in allnames],
            fmt_ratio(batch[("iqdb", n)].median / batch[("floor", n)].median) if "iqdb" in names else "-",
        )
    for t, data in ((t1, single), (t2, batch)):
        slopes = []
        for nm in allnames:
            have = [n for n in ns if (nm, n) in data]
            big = [n for n in have if n >= 100_000]
            big = big if len(big) >= 2 else have
            if len(big) >= 2:
                sl = np.polyfit(
                    np.log([float(n) for n in big]), np.log([data[(nm, n)].median for n in big]), 1
                )[0]
                slopes.append(f"{nm} {sl:.2f} ({big[0]:,}-{big[-1]:,})")
        t.notes.append("log-log slope of time against n for n >= 100,000 (1 = linear): " + ", ".join(slopes))
    t1.notes.append(
        f"{args.scaling_single} queries per system and n, 2 interleaved rounds; floor = read X once."
    )
    t2.notes.append("2 interleaved calls per system and n; floor = bare blocked GEMM of the batch.")
    for t in (t1, t2):
        print("\n" + t.text() + "\n", flush=True)
    png = RESULTS / f"scaling_{args.tag}.png"
    chart = "" if args.no_write else _scaling_chart(png, allnames, ns, single, batch, m, d, args.metric)
    intro = [
        f"Time against the number of stored vectors n (d = {d}), single query and a batch of {m:,}. "
        f"n up to {ns[-1]:,}"
        + ("" if ns[-1] >= 10_000_000 else " (10^7 is optional: --scaling-max 1e7, ~16 GB with faiss)")
        + f"; above 1,000,000 only {args.scaling_big_systems} run (each system holds its own copy).",
        "",
        f"Load average at the start: {load_start}; at the end: {loadavg()}.",
    ]
    if skipped:
        intro += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    if not args.no_write and machine_rows is not None:
        write_result(
            RESULTS / f"scaling_{args.tag}.md",
            "iqdb scaling in n",
            intro,
            machine_rows,
            [chart, t1.markdown(), t2.markdown()],
        )
    return machine_rows or []


def _scaling_point(
    args: argparse.Namespace,
    n: int,
    systems: str,
    Q: np.ndarray,
    single: dict[tuple[str, int], Stats],
    batch: dict[tuple[str, int], Stats],
    skipped: dict[str, str],
) -> list[str]:
    """Build the scaling systems over ``n`` vectors, time them into ``single``/``batch``, free them."""
    d, m, k, nq = args.dim, args.scaling_m, args.k, args.scaling_single
    log(f"scaling: n = {n:,} x {d}")
    peers, sk = make_peers(systems.split(","), log)
    X = make_vectors(n, d, args.seed, args.metric == "ip")
    peers, _, failed = build_peers(peers, X, args.metric, log)
    skipped.update(sk)
    skipped.update(failed)
    names = [p.name for p in peers]
    read, gemm = ReadFloor(X), GemmFloor(X, m)
    for p in peers:
        p.search(Q[0], k)

    def single_task(peer: Peer) -> Any:
        def task(r: int) -> list[float]:
            return [_timed(lambda q=Q[i]: peer.search(q, k)) for i in range(r * nq // 2, (r + 1) * nq // 2)]

        return task

    def batch_task(peer: Peer) -> Any:
        return lambda r: [_timed(lambda: peer.search_batch(Q[:m], k))]

    tasks = {p.name: single_task(p) for p in peers}
    tasks["floor"] = lambda r: [read.once() for _ in range(nq // 2)]
    for name, s in interleave(tasks, 2, args.budget).items():
        single[(name, n)] = Stats(tuple(s))
    btasks = {p.name: batch_task(p) for p in peers}
    btasks["floor"] = lambda r: [gemm.run(Q[:m])]
    for name, s in interleave(btasks, 2, args.budget).items():
        batch[(name, n)] = Stats(tuple(s))
    log("  single ms: " + ", ".join(f"{nm} {fmt_ms(single[(nm, n)].median)}" for nm in [*names, "floor"]))
    log("  batch s: " + ", ".join(f"{nm} {batch[(nm, n)].median:.3f}" for nm in [*names, "floor"]))
    read.close()
    gemm.close()
    close_peers(peers)
    return names


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _scaling_chart(
    path: Path,
    names: list[str],
    ns: list[int],
    single: dict[tuple[str, int], Stats],
    batch: dict[tuple[str, int], Stats],
    m: int,
    d: int,
    metric: str,
) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no chart: {exc}")
        return f"(no chart: {exc})"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, data, title in ((axes[0], single, "single query"), (axes[1], batch, f"batch of {m:,}")):
        for nm in names:
            style = "k--" if nm == "floor" else "-o"
            have = [n for n in ns if (nm, n) in data]
            ax.plot(have, [data[(nm, n)].median for n in have], style, label=nm)
        ref = data[(names[0], ns[-1])].median
        ax.plot(ns, [ref * n / ns[-1] for n in ns], ":", color="grey", label="linear")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (stored vectors)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Exact top-k time against n (d = {d}, {metric})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return f"![time against n, log-log]({path.name})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"cases {sorted(args.cases)}, systems {args.systems}, load average {loadavg()}")
    machine_rows: list[tuple[str, str]] | None = None
    if args.cases & {"single", "batch"}:
        machine_rows = run_search(args, machine_rows)
    if "sweep" in args.cases:
        machine_rows = run_sweep(args, machine_rows)
    if "scaling" in args.cases:
        machine_rows = run_scaling(args, machine_rows)
    log(f"done; peak RSS {peak_rss_gib():.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
