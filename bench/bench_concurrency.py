r"""iqdb under concurrent load: search threads while one thread writes single records.

Run it (memory and durable stores, four phases of 10 s each per store: about 2 minutes):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/bench_concurrency.py

A smoke run (about 30 s, prints only; it needs only iqdb and NumPy, so the test venv works too):

    .venv/bin/python bench/bench_concurrency.py --seconds 3 --no-write

The target (searches never wait for writers): one thread writes single records as fast as it can
while 8 search threads run on 100,000 x 128 (float32, k = 10, L2). With the writer running, the
searches keep at least half their throughput and their p99 latency stays within 5x of their p99
without the writer; the writer keeps at least half its rate without the searches; and the report
says how much of the p99 is spent waiting for the GIL.

For each store (``iqdb.open_in_memory()``; ``iqdb.open(tmpdir)`` with the default sync), one
database of seeded random data goes through these phases, each ``--seconds`` long:

0. one search thread alone: a reference, no other thread of this process competing;
a. ``--threads`` search threads alone;
b. the writer alone;
c. the search threads and the writer together.

Search threads call ``db.search(q, k, "l2")`` over a pool of seeded queries. The writer calls
``db.upsert(iqdb.Record(id, vec))`` in a loop (``--writer-mix``: replacing a random existing id,
inserting a fresh one, deleting with ``db.delete``). Every call records its wall time
(``time.perf_counter``), its thread's CPU time (``time.thread_time``) and, on Linux, its thread's
run-queue delay (``/proc/thread-self/schedstat``): wall - CPU is time the thread was not running,
split into waiting for a core (runnable) and blocked (the GIL, iqdb's locks, iqdb's own helper
threads). Every phase ends at its deadline: threads are daemons that start no call after it.
Throughput counts the calls completed by the deadline; latencies include the calls in flight at
the deadline, which get ``--grace`` seconds to end; one still running then (starvation) enters
with its age so far, a lower bound, and its thread is reported, not waited for (later phases of
that store are skipped).

Only iqdb's public API is used. Needs iqdb and NumPy (threadpoolctl for the BLAS rows of the
machine table). Results: ``bench/results/concurrency_<tag>.md``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_storage import storage_row
from common import (
    PAUSE_S,
    REPO,
    IqdbPeer,
    Table,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    fmt_us,
    loadavg,
    machine,
    make_vectors,
    peak_rss_gib,
    write_result,
)

METRIC = "l2"
QUERIES = 1024  # the pool of seeded queries the search threads cycle through
WRITES = 1 << 16  # the writer's precomputed cycle of operations
KINDS = ("replace", "insert", "delete")
SEARCH_TARGET = 0.5  # searches/s with the writer over alone, at least
P99_TARGET = 5.0  # search p99 with the writer over alone, at most
WRITE_TARGET = 0.5  # writes/s with the searches over alone, at least


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_mix(text: str) -> dict[str, float]:
    """``"replace"``, ``"replace,insert"`` (equal weights) or ``"replace=0.8,delete=0.2"``."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        kind, _, weight = part.strip().partition("=")
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown write kind {kind!r}; choose from {', '.join(KINDS)}")
        mix[kind] = float(weight) if weight else 1.0
    total = sum(mix.values())
    if total <= 0 or min(mix.values()) < 0:
        raise argparse.ArgumentTypeError(f"bad weights in {text!r}")
    return {k: w / total for k, w in mix.items() if w > 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--n", type=lambda s: int(float(s)), default=100_000, help="records in the database")
    p.add_argument("--d", type=int, default=128, help="dimension")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=8, help="search threads")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument(
        "--reference-seconds",
        type=float,
        default=None,
        help="length of the one-search-thread reference phase (default: --seconds; 0 skips it)",
    )
    p.add_argument(
        "--writer-mix",
        type=parse_mix,
        default="replace",
        help="what the writer does, e.g. replace | replace,insert | replace=0.6,insert=0.2,delete=0.2 "
        "(replace: upsert of a random existing id; insert: upsert of a fresh id; delete: a random id "
        "below --n)",
    )
    p.add_argument("--stores", default="memory,durable", help="memory, durable or both")
    p.add_argument("--memory", dest="stores", action="store_const", const="memory", help="memory only")
    p.add_argument("--durable", dest="stores", action="store_const", const="durable", help="durable only")
    p.add_argument("--device", default="cpu", help="passed to open_in_memory / open")
    p.add_argument("--grace", type=float, default=5.0, help="s to wait for threads after a deadline")
    p.add_argument("--workdir", default=None, help="where the durable database goes (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="cpu", help="result file: bench/results/concurrency_<tag>.md")
    p.add_argument("--no-write", action="store_true", help="print only; write no result file")
    args = p.parse_args(argv)
    args.stores = [s for s in args.stores.split(",") if s]
    if not set(args.stores) <= {"memory", "durable"} or not args.stores:
        p.error(f"--stores: choose from memory,durable, got {args.stores}")
    if args.threads < 1 or args.seconds <= 0 or args.n < 1 or args.k < 1:
        p.error("--threads, --seconds, --n and --k must be positive")
    if args.reference_seconds is None:
        args.reference_seconds = args.seconds
    return args


# ---------------------------------------------------------------------------------------------
# Timed threads


class RunQueue:
    """This thread's run-queue delay so far, in seconds (Linux schedstat); NaN where unavailable.

    Open it in the thread it measures: ``/proc/thread-self`` names the opening thread.
    """

    def __init__(self) -> None:
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = -1

    def read(self) -> float:
        if self.fd < 0:
            return float("nan")
        try:
            return int(os.pread(self.fd, 128, 0).split()[1]) / 1e9  # fields: run ns, wait ns, slices
        except (OSError, IndexError, ValueError):
            return float("nan")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def machine_busy() -> float:
    """CPU seconds every process on the machine has run so far (``/proc/stat``); NaN elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait, steal
    # included (a vCPU the hypervisor gave to someone else is not free for this process either)
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Lane:
    """What one thread did in one phase: a sample per call started before the deadline and ended."""

    role: str  # "search" or "write"
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    runq: list[float] = field(default_factory=list)
    late: list[bool] = field(default_factory=list)  # ended after the deadline: not in the throughput
    age_at_deadline: list[float] = field(default_factory=list)  # of the late calls
    errors: list[str] = field(default_factory=list)
    started: float | None = None  # perf_counter at the start of the call in progress


@dataclass
class Clock:
    go: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")


def _loop(lane: Lane, op: Callable[[int], object], clock: Clock) -> None:
    clock.go.wait()
    deadline = clock.deadline
    rq = RunQueue()
    i = 0
    try:
        while not clock.stop.is_set():
            r0 = rq.read()
            c0 = time.thread_time()
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            lane.started = t0
            try:
                op(i)
            except Exception as exc:  # reported in the tables; the thread stops
                lane.started = None
                lane.errors.append(f"{type(exc).__name__}: {exc}")
                break
            t1 = time.perf_counter()
            c1 = time.thread_time()
            r1 = rq.read()
            lane.started = None
            lane.wall.append(t1 - t0)
            lane.cpu.append(c1 - c0)
            lane.runq.append(r1 - r0)
            lane.late.append(t1 > deadline)
            if t1 > deadline:
                lane.age_at_deadline.append(deadline - t0)
            i += 1
    finally:
        rq.close()


@dataclass
class Phase:
    """One phase's lanes and what the main thread saw of it."""

    name: str
    seconds: float
    lanes: list[Lane]
    cores_busy: float  # process CPU seconds / wall seconds (every thread, iqdb's helpers included)
    cores_other: float  # the rest of the machine's busy CPU seconds / wall seconds (other processes)
    # lane index -> (age at the deadline, age after the grace period) of a call running after the grace
    in_flight: dict[int, tuple[float, float]]
    stuck: int  # threads alive after the grace period


def run_phase(
    name: str, ops: list[tuple[str, Callable[[int], object]]], seconds: float, grace: float
) -> tuple[Phase, list[threading.Thread]]:
    """Run ``ops`` (role, callable) on one daemon thread each for ``seconds``; never waits longer
    than ``seconds + grace``. Returns the phase and its threads (those still alive are stuck)."""
    clock = Clock()
    lanes = [Lane(role) for role, _ in ops]
    threads = [
        threading.Thread(target=_loop, args=(lane, op, clock), name=f"bench-{role}-{i}", daemon=True)
        for i, (lane, (role, op)) in enumerate(zip(lanes, ops))
    ]
    for t in threads:
        t.start()
    gc.collect()
    busy0 = machine_busy()
    cpu0 = time.process_time()
    t_start = time.perf_counter()
    clock.deadline = t_start + seconds
    clock.go.set()
    while (left := clock.deadline - time.perf_counter()) > 0:
        time.sleep(min(left, 0.5))
    clock.stop.set()
    wall = time.perf_counter() - t_start
    own = time.process_time() - cpu0
    cores, other = own / wall, (machine_busy() - busy0 - own) / wall
    end = time.perf_counter() + grace
    for t in threads:
        t.join(max(0.0, end - time.perf_counter()))
    now = time.perf_counter()
    in_flight: dict[int, tuple[float, float]] = {}
    for i, lane in enumerate(lanes):
        started = lane.started
        if threads[i].is_alive() and started is not None and started < clock.deadline:
            in_flight[i] = (clock.deadline - started, now - started)
    stuck = sum(t.is_alive() for t in threads)
    return Phase(name, seconds, lanes, cores, max(0.0, other), in_flight, stuck), threads


# ---------------------------------------------------------------------------------------------
# Workloads


class Searches:
    """Search thread ``j``'s calls: ``db.search`` over the query pool, each thread from its own offset."""

    def __init__(self, db: Any, Q: np.ndarray, k: int) -> None:
        self.db = db
        self.queries = list(Q)
        self.k = k

    def op(self, j: int) -> Callable[[int], object]:
        queries, m, k, search = self.queries, len(self.queries), self.k, self.db.search
        offset = (j * 7919) % m

        def call(i: int) -> object:
            return search(queries[(offset + i) % m], k, METRIC)

        return call


class Writer:
    """The writer's calls: a precomputed seeded cycle of single-record upserts and deletes."""

    def __init__(self, db: Any, mix: dict[str, float], n: int, d: int, seed: int) -> None:
        import iqdb

        rng = np.random.default_rng(seed)
        names = list(mix)
        codes = rng.choice(len(names), size=WRITES, p=[mix[k] for k in names])
        self.kinds = [names[c] for c in codes.tolist()]
        self.ids = rng.integers(0, n, size=WRITES).tolist()
        self.vectors = list(make_vectors(4096, d, seed + 1, normalize=False))
        self.next_id = n  # fresh ids for inserts, unique across phases
        self.counts = dict.fromkeys(KINDS, 0)
        self.absent = 0  # deletes of an id that was not there (no write happened)
        self.db = db
        self.Record = iqdb.Record

    def __call__(self, i: int) -> None:
        j = i % WRITES
        kind = self.kinds[j]
        vec = self.vectors[j % len(self.vectors)]
        if kind == "replace":
            self.db.upsert(self.Record(self.ids[j], vec))
        elif kind == "insert":
            self.db.upsert(self.Record(self.next_id, vec))
            self.next_id += 1
        elif not self.db.delete(self.ids[j]):
            self.absent += 1
        self.counts[kind] += 1


def open_store(store: str, args: argparse.Namespace, X: np.ndarray, root: Path) -> tuple[Any, float]:
    """The database for ``store`` holding ids 0..n-1 = rows of ``X``; and the seconds to build it."""
    import iqdb

    t0 = time.perf_counter()
    ids = np.arange(X.shape[0], dtype=np.uint64)
    if store == "memory":
        db = iqdb.open_in_memory(device=args.device)
        db.upsert_many(ids, X)
    else:
        path = root / "db"
        shutil.rmtree(path, ignore_errors=True)
        db = iqdb.open(path, device=args.device)
        db.upsert_many(ids, X)
        db.close()  # compacts: the phases start from a snapshot and an empty log
        db = iqdb.open(path, device=args.device)
    return db, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Summaries


@dataclass
class Summary:
    """One role in one phase."""

    threads: int
    seconds: float
    count: int = 0  # calls completed by the deadline
    least: int = 0  # of those, by the slowest thread of the role
    in_flight: int = 0  # calls running at the deadline (ended later, or still running after the grace)
    oldest: float = 0.0  # age at the deadline of the oldest of those
    stuck: int = 0  # calls still running after the grace period: their latencies are lower bounds
    p50: float = float("nan")  # latencies: every call started before the deadline
    p99: float = float("nan")
    worst: float = float("nan")
    not_running: float = float("nan")  # median (wall - cpu) / wall over all ended calls
    tail: int = 0  # ended calls at or above their p99
    tail_not_running: float = float("nan")  # the same median over the tail
    tail_runq: float = float("nan")  # median run-queue delay / wall over the tail
    tail_blocked: float = float("nan")  # median (wall - cpu - run-queue delay) / wall over the tail
    errors: list[str] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.count / self.seconds


def summarize(phase: Phase, role: str) -> Summary | None:
    idx = [i for i, lane in enumerate(phase.lanes) if lane.role == role]
    if not idx:
        return None
    lanes = [phase.lanes[i] for i in idx]
    s = Summary(threads=len(lanes), seconds=phase.seconds)
    wall = np.array([w for lane in lanes for w in lane.wall])
    cpu = np.array([c for lane in lanes for c in lane.cpu])
    runq = np.array([r for lane in lanes for r in lane.runq])
    stuck = [phase.in_flight[i] for i in idx if i in phase.in_flight]
    at_deadline = [a for lane in lanes for a in lane.age_at_deadline] + [a for a, _ in stuck]
    s.count = sum(lane.late.count(False) for lane in lanes)
    s.least = min(lane.late.count(False) for lane in lanes)
    s.in_flight = len(at_deadline)
    s.oldest = max(at_deadline, default=0.0)
    s.stuck = len(stuck)
    s.errors = [e for lane in lanes for e in lane.errors]
    every = np.concatenate([wall, np.array([a for _, a in stuck])])
    if every.shape[0]:
        s.p50 = float(np.percentile(every, 50))
        s.p99 = float(np.percentile(every, 99))
        s.worst = float(every.max())
    if wall.shape[0]:
        idle = np.clip(wall - cpu, 0.0, None) / wall
        s.not_running = float(np.median(idle))
        tail = wall >= np.percentile(wall, 99)
        s.tail = int(tail.sum())
        s.tail_not_running = float(np.median(idle[tail]))
        if np.isfinite(runq).all():
            s.tail_runq = float(np.median(runq[tail] / wall[tail]))
            s.tail_blocked = float(np.median(np.clip(wall - cpu - runq, 0.0, None)[tail] / wall[tail]))
    return s


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def pct(x: float) -> str:
    return f"{100 * x:.0f}%" if np.isfinite(x) else "-"


def ms(s: Summary, value: float) -> str:
    if not np.isfinite(value):
        return "-"
    return ("≥ " if s.stuck else "") + fmt_ms(value)


def verdict(ok: bool, lower_bound: bool = False) -> str:
    if lower_bound and ok:
        return "? (p99 is a lower bound)"
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------
# One store


@dataclass
class StoreRun:
    store: str
    build_s: float
    phases: dict[str, Phase] = field(default_factory=dict)
    writer: Writer | None = None
    skipped: list[str] = field(default_factory=list)


PHASES = ("0", "a", "b", "c")


def phase_title(key: str, threads: int) -> str:
    return {
        "0": "(0) 1 search thread alone (reference)",
        "a": f"(a) {plural(threads, 'search thread')} alone",
        "b": "(b) the writer alone",
        "c": f"(c) {plural(threads, 'search thread')} + the writer",
    }[key]


def run_store(store: str, args: argparse.Namespace, X: np.ndarray, Q: np.ndarray, root: Path) -> StoreRun:
    log(f"{store}: building {args.n:,} x {args.d}")
    db, build_s = open_store(store, args, X, root)
    run = StoreRun(store, build_s)
    log(f"{store}: built in {build_s:.1f} s")
    searches = Searches(db, Q, args.k)
    writer = run.writer = Writer(db, args.writer_mix, args.n, args.d, args.seed + 2)
    for i in range(20):  # warm-up, not timed: first calls start iqdb's helper threads, fault pages in
        searches.op(0)(i)
    for i in range(200):
        writer(WRITES - 1 - i)
    writer.counts = dict.fromkeys(KINDS, 0)
    writer.absent = 0
    plan: dict[str, list[tuple[str, Callable[[int], object]]]] = {
        "0": [("search", searches.op(0))],
        "a": [("search", searches.op(j)) for j in range(args.threads)],
        "b": [("write", writer)],
        "c": [("write", writer)] + [("search", searches.op(j)) for j in range(args.threads)],
    }
    alive: list[threading.Thread] = []
    for key in PHASES:
        seconds = args.reference_seconds if key == "0" else args.seconds
        if seconds <= 0:
            continue
        title = phase_title(key, args.threads)
        if alive:
            for t in alive:
                t.join(args.grace)
            alive = [t for t in alive if t.is_alive()]
            if alive:
                run.skipped.append(f"{title}: {len(alive)} threads of the previous phase still running")
                log(f"{store}: SKIPPED {title}: {len(alive)} threads of the previous phase still running")
                continue
        time.sleep(PAUSE_S)
        phase, threads = run_phase(title, plan[key], seconds, args.grace)
        run.phases[key] = phase
        alive = [t for t in threads if t.is_alive()]
        parts = []
        for role in ("search", "write"):
            s = summarize(phase, role)
            if s is not None:
                parts.append(
                    f"{s.count:,} {role}es ({fmt_rate(s.per_s)}/s, p99 {ms(s, s.p99)} ms, "
                    f"{s.in_flight} in flight at the deadline)"
                    if role == "search"
                    else f"{s.count:,} writes ({fmt_rate(s.per_s)}/s, p99 {fmt_us(s.p99)} µs)"
                )
                if s.errors:
                    parts.append(f"{len(s.errors)} {role} errors, first: {s.errors[0]}")
        stuck = (
            f"; {phase.stuck} threads STILL RUNNING after {args.grace:g} s of grace" if phase.stuck else ""
        )
        log(
            f"{store} {title}: {'; '.join(parts)}; {phase.cores_busy:.2f} cores busy "
            f"(other processes {phase.cores_other:.2f}){stuck}"
        )
    if alive:
        log(f"{store}: not closing the database: {len(alive)} threads still inside iqdb calls")
    else:
        db.close()
    return run


# ---------------------------------------------------------------------------------------------
# Tables


def target_table(runs: list[StoreRun], args: argparse.Namespace) -> tuple[Table, list[str]]:
    t = Table(
        f"Targets: {plural(args.threads, 'search thread')} and 1 writer on {args.n:,} x {args.d} (k = {args.k}, L2)",
        ["store", "measure", "alone", "together", "ratio", "target", "result"],
    )
    verdicts: list[str] = []
    for run in runs:
        a, b, c = (run.phases.get(key) for key in ("a", "b", "c"))
        if a is None or b is None or c is None:
            t.add(run.store, "phases missing", "-", "-", "-", "-", "not run")
            verdicts.append(f"{run.store}: not measured (phases skipped)")
            continue
        sa, sc = summarize(a, "search"), summarize(c, "search")
        wb, wc = summarize(b, "write"), summarize(c, "write")
        assert sa and sc and wb and wc
        r = sc.per_s / sa.per_s if sa.per_s else float("nan")
        res = verdict(r >= SEARCH_TARGET)
        t.add(
            run.store,
            f"searches/s ({plural(args.threads, 'thread')})",
            fmt_rate(sa.per_s),
            fmt_rate(sc.per_s),
            fmt_ratio(r),
            f">= {SEARCH_TARGET}",
            res,
        )
        verdicts.append(
            f"{run.store}: searches keep {r:.2f} of their throughput with the writer (target >= {SEARCH_TARGET}): {res}"
        )
        r = sc.p99 / sa.p99 if sa.p99 else float("nan")
        lower = sc.stuck > 0
        res = "? (p99 alone is a lower bound)" if sa.stuck else verdict(r <= P99_TARGET, lower)
        t.add(
            run.store,
            "search p99 ms",
            ms(sa, sa.p99),
            ms(sc, sc.p99),
            ("≥ " if lower else "") + fmt_ratio(r),
            f"<= {P99_TARGET:g}x",
            res,
        )
        verdicts.append(
            f"{run.store}: search p99 with the writer is {'≥ ' if lower else ''}{r:.2f}x alone (target <= {P99_TARGET:g}x): {res}"
        )
        r = wc.per_s / wb.per_s if wb.per_s else float("nan")
        res = verdict(r >= WRITE_TARGET)
        t.add(
            run.store,
            "writes/s (1 thread)",
            fmt_rate(wb.per_s),
            fmt_rate(wc.per_s),
            fmt_ratio(r),
            f">= {WRITE_TARGET}",
            res,
        )
        verdicts.append(
            f"{run.store}: the writer keeps {r:.2f} of its rate with the searches (target >= {WRITE_TARGET}): {res}"
        )
        for label, x, y in (
            ("p99 searches: share not running", sa.tail_not_running, sc.tail_not_running),
            ("... waiting for a core", sa.tail_runq, sc.tail_runq),
            ("... blocked (GIL, locks, helpers)", sa.tail_blocked, sc.tail_blocked),
        ):
            diff = f"{round(100 * (y - x)):+d} pts" if np.isfinite(x) and np.isfinite(y) else "-"
            t.add(run.store, label, pct(x), pct(y), diff, "report", "-")
        verdicts.append(
            f"{run.store}: the p99 searches spent {pct(sc.tail_not_running)} of their time not running with the "
            f"writer ({pct(sc.tail_blocked)} blocked), {pct(sa.tail_not_running)} without it "
            f"({pct(sa.tail_blocked)} blocked); the writer's share is the difference"
        )
    t.notes = [
        "alone: phase (a) for the searches, (b) for the writer; together: phase (c). Ratio: together / "
        "alone (the share rows: the difference in percentage points).",
        "p99 searches: the completed searches at or above the p99 latency of their phase; share not "
        "running: the median over them of (wall - CPU time of the search's own thread) / wall. Waiting for "
        "a core: the thread was runnable (its run-queue delay); blocked: the rest of the time not running "
        "(the GIL, iqdb's locks, iqdb's own helper threads). Medians, so the parts need not add up.",
        f"This machine has {os.cpu_count()} CPUs for {plural(args.threads, 'search thread')} (+ the writer and "
        "iqdb's own helper threads): core contention exists even without the writer, so phase (a)'s shares "
        "are not zero; the writer's contribution is (c) minus (a). The one-thread reference row in the phase "
        "table shows the shares with no other thread of this process competing.",
        "How much of the p99 is waiting for the GIL: the blocked share in (c) minus (a). With a store whose "
        "searches wait for the writer on a lock, that difference includes the lock wait; with searches that "
        "never wait for writers, it is the writer's GIL cost (plus any change in waiting for helper threads).",
        "≥: a search was still running the grace period after the deadline (starvation); its age then "
        "entered the percentiles, so they and a ratio marked ≥ are lower bounds.",
    ]
    return t, verdicts


def search_table(runs: list[StoreRun], args: argparse.Namespace) -> Table:
    t = Table(
        "Searches per phase",
        [
            "store",
            "phase",
            "searches",
            "per s",
            "least / thread",
            "in flight at end",
            "oldest ms",
            "p50 ms",
            "p99 ms",
            "max ms",
            "cores busy",
            "others' cores",
            "all: not running",
            "p99 tail",
            "tail: not running",
            "waiting for a core",
            "blocked",
        ],
    )
    for run in runs:
        for phase in run.phases.values():
            s = summarize(phase, "search")
            if s is None:
                continue
            t.add(
                run.store,
                phase.name,
                f"{s.count:,}",
                fmt_rate(s.per_s),
                f"{s.least:,}",
                s.in_flight,
                fmt_ms(s.oldest) if s.in_flight else "-",
                ms(s, s.p50),
                ms(s, s.p99),
                ms(s, s.worst),
                f"{phase.cores_busy:.2f}",
                f"{phase.cores_other:.2f}",
                pct(s.not_running),
                s.tail,
                pct(s.tail_not_running),
                pct(s.tail_runq),
                pct(s.tail_blocked),
            )
    t.notes = [
        f"Each phase {args.seconds:g} s (the reference {args.reference_seconds:g} s); searches and per s count "
        "searches completed by the deadline; least / thread: the slowest search thread's count (fairness).",
        "in flight at end: searches running at the deadline; oldest ms: the age of the oldest then. They are "
        "not in the throughput; their latencies are in the percentiles (they end after the deadline, with "
        "no new calls starting, so under a little less load than the rest).",
        "cores busy: the process's CPU time over the phase's wall time (every thread, iqdb's helpers included); "
        "others' cores: the rest of the machine's busy time (/proc/stat, steal included) over the same wall "
        "time. Above ~0.1 other processes shared the CPUs during the phase: its numbers are noisy.",
        "not running: (wall - the search thread's CPU time) / wall, median over all searches and over the p99 "
        "tail; waiting for a core and blocked split it for the tail (run-queue delay from schedstat). iqdb may "
        "split one search's scan over its own helper threads; their CPU is not on the search thread's clock, "
        "so a search waiting for its helper counts as blocked: the reference row shows that share.",
    ]
    return t


def writer_table(runs: list[StoreRun], args: argparse.Namespace) -> Table:
    t = Table(
        "Writer per phase",
        [
            "store",
            "phase",
            "writes",
            "per s",
            "p50 µs",
            "p99 µs",
            "max ms",
            "in flight at end",
            "tail: not running",
            "blocked",
            "errors",
        ],
    )
    for run in runs:
        for phase in run.phases.values():
            s = summarize(phase, "write")
            if s is None:
                continue
            t.add(
                run.store,
                phase.name,
                f"{s.count:,}",
                fmt_rate(s.per_s),
                fmt_us(s.p50),
                fmt_us(s.p99),
                fmt_ms(s.worst),
                s.in_flight,
                pct(s.tail_not_running),
                pct(s.tail_blocked),
                len(s.errors),
            )
    mix = ", ".join(f"{k} {w:.0%}" for k, w in args.writer_mix.items())
    t.notes = [
        f"The writer's mix: {mix}. replace: `upsert(Record(id, v))` of a random id below {args.n:,}; insert: "
        "of a fresh id; delete: `delete(id)` of a random id below n (a delete of an absent id writes nothing).",
        "max ms includes anything a single write may trigger, e.g. a durable store's automatic compaction.",
    ]
    for run in runs:
        if run.writer is not None:
            w = run.writer
            done = ", ".join(f"{k} {v:,}" for k, v in w.counts.items() if v)
            absent = f" ({w.absent:,} deletes found nothing)" if w.counts["delete"] else ""
            t.notes.append(f"{run.store}: all phases, {done or 'nothing'}{absent}.")
    return t


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = loadavg()
    log(
        f"stores {args.stores}, {args.n:,} x {args.d}, k = {args.k}, {plural(args.threads, 'search thread')} + 1 writer, "
        f"{args.seconds:g} s per phase, {os.cpu_count()} CPUs, load average {load0}"
    )
    if (os.cpu_count() or 1) < args.threads + 1:
        log(
            f"note: {os.cpu_count()} CPUs for {args.threads} search threads (+ the writer): core contention "
            "exists even without the writer; compare (c) with (a), not with zero"
        )
    X = make_vectors(args.n, args.d, args.seed, normalize=False)
    Q = make_vectors(QUERIES, args.d, args.seed + 1, normalize=False)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="iqdb-bench-concurrency-"))
    root.mkdir(parents=True, exist_ok=True)
    runs: list[StoreRun] = []
    try:
        for store in args.stores:
            runs.append(run_store(store, args, X, Q, root))
            gc.collect()
    finally:
        # a --workdir given by the user keeps everything but the database this script made
        shutil.rmtree(root / "db" if args.workdir else root, ignore_errors=True)
    targets, verdicts = target_table(runs, args)
    tables = [targets, search_table(runs, args), writer_table(runs, args)]
    for t in tables:
        print()
        print(t.text(), flush=True)
    print()
    for line in verdicts:
        print(line)
    for run in runs:
        for line in run.skipped:
            print(f"{run.store}: skipped {line}")
    if args.no_write:
        return 0
    import iqdb

    rows = machine([IqdbPeer()])
    rows.append(("iqdb imported from", str(Path(iqdb.__file__).parent)))
    rows.append(("GIL switch interval", f"{sys.getswitchinterval() * 1e3:g} ms"))
    rows.append(
        (
            "threads",
            f"{plural(args.threads, 'search thread')} + 1 writer (+ iqdb's own) on {os.cpu_count()} CPUs",
        )
    )
    if "durable" in args.stores:
        rows.append(storage_row(root.parent))
    rows.append(("load average", f"{load0} at the start, {loadavg()} at the end"))
    rows.append(("peak RSS", f"{peak_rss_gib():.1f} GiB (this process)"))
    intro = [
        f"{plural(args.threads, 'search thread')} (`search(q, {args.k}, 'l2')`) and one writer thread (single-record "
        f"`upsert` / `delete`) on {args.n:,} x {args.d} seeded standard-normal float32 rows; phases of "
        f"{args.seconds:g} s on the same database, per store (memory: `open_in_memory()`; durable: "
        "`open(dir)`, default sync). Compare only within this file.",
        "",
        *[f"- {line}" for line in verdicts],
        "",
        "Building (not timed in any phase): "
        + ", ".join(f"{run.store} {run.build_s:.1f} s" for run in runs)
        + ".",
    ]
    skipped = [f"- {run.store}: {line}" for run in runs for line in run.skipped]
    if skipped:
        intro += ["", "**Skipped phases:**", "", *skipped]
    write_result(
        REPO / "bench" / "results" / f"concurrency_{args.tag}.md",
        f"Concurrency: searches while one thread writes ({args.tag})",
        intro,
        rows,
        [t.markdown() for t in tables],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
