"""Crash and fault matrix of the durable store: every file-system call of a scripted workload is a
crash point (process kill, power loss) and a fault point (ENOSPC, EIO); the WAL is cut at every
byte of its last frames; bits are flipped in the WAL and the snapshot; writer processes are killed
with SIGKILL; a Hypothesis state machine crashes and reopens against a dict model.

Run ``pytest tests/test_crash.py -s`` to see the figures each family prints (crash points tried,
faults injected, bit flips tried, records lost, records silently wrong). Every family asserts that
records lost and records wrong are 0.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faultfs import CountingFs, CrashFs, ErrorFs, PowerLossFs, SimulatedCrash, canon, db_state
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import iqdb
from iqdb._wal import FRAME_HEADER_SIZE, decode_header, scan

# These tests model a process that dies: the handles it leaves behind are dropped unclosed on
# purpose, so the ResourceWarning that an unclosed handle gives is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:unclosed iqdb database:ResourceWarning")

DIM = 4
# Written by a setup session that closed cleanly (the directory's entries are durable before a
# crash model starts; the "new directory" case starts from nothing) and never deleted.
BASE_IDS = (40, 41, 42)
PROBE = 999  # written after recovery to check that later writes survive
UNIVERSE = (*range(64), PROBE)
WAL_LIMIT = 2500  # small enough for the workload to compact automatically

State = dict[int, tuple[bytes, Any]]
Step = tuple[Any, ...]


# -- the scripted workload ----------------------------------------------------------------------
def _vec(rng: np.random.Generator) -> np.ndarray:
    # Small integers: every distance is exact in float32, so search results compare exactly.
    return rng.integers(-4, 5, DIM).astype(np.float32)


RICH = {
    "bytes": b"\x00\xff\x00",
    "nan": math.nan,
    "inf": -math.inf,
    "nested": {"list": [1, "x", None, [True, -0.0]], "empty": {}},
    "min": -(2**63),
    "text": "ünïcode",
}


def make_workload(seed: int = 11) -> list[Step]:
    """About 50 operations: upserts, batches (one with a repeated id), deletes (one of an absent
    id), flushes (one with nothing to flush), an explicit compact, a close/reopen, enough bytes to
    pass ``WAL_LIMIT`` (automatic compaction) and a final close."""
    rng = np.random.default_rng(seed)

    def many(ids: Sequence[int], payloads: Sequence[Any] | None = None) -> Step:
        return ("many", list(ids), np.stack([_vec(rng) for _ in ids]), payloads)

    steps: list[Step] = [
        ("upsert", 0, _vec(rng), RICH),
        ("upsert", 1, _vec(rng), None),
        many([2, 3, 4], [{"i": 2}, None, {}]),
        ("flush",),
        ("upsert", 5, _vec(rng), {}),
        ("delete", 1),
        ("upsert", 0, _vec(rng), {"v": 2}),
        ("delete", 1),  # absent: no write
        ("flush",),
        many(range(6, 12), [{"i": i, "b": bytes([i]) * i} for i in range(6, 12)]),
        ("delete", 3),
        ("compact",),
        ("upsert", 12, _vec(rng), {"x": [1.5, math.inf]}),
        ("delete", 12),
        many([1, 13, 2, 13], [None, {"first": 1}, {"two": 2}, {"last": 1}]),  # 13: the last row wins
        ("flush",),
        ("reopen",),
        ("upsert", 14, _vec(rng), None),
        many([15, 16, 17]),
        ("delete", 0),
        ("flush",),
        ("flush",),  # nothing new: no fsync
    ]
    for i in range(18, 30):  # enough WAL bytes to pass WAL_LIMIT
        steps.append(("upsert", i, _vec(rng), {"pad": "p" * 120, "i": i}))
    steps += [
        ("delete", 5),
        many(range(30, 34), [{"k": k} for k in range(4)]),
        ("upsert", 4, _vec(rng), RICH),
        ("flush",),
        ("upsert", 34, _vec(rng), None),
        ("delete", 2),
        many([35, 36]),
        ("close",),
    ]
    return steps


WORKLOAD = make_workload()
DATA_KINDS = ("upsert", "many", "delete")


def apply_steps(base: State, steps: Sequence[Step]) -> State:
    """The model: ``base`` after the data operations in ``steps``."""
    state = dict(base)
    for step in steps:
        kind = step[0]
        if kind == "upsert":
            state[step[1]] = (np.asarray(step[2], np.float32).tobytes(), canon(step[3]))
        elif kind == "many":
            payloads = step[3] or [None] * len(step[1])
            for rid, v, p in zip(step[1], step[2], payloads):
                state[rid] = (np.asarray(v, np.float32).tobytes(), canon(p))
        elif kind == "delete":
            state.pop(step[1], None)
    return state


@dataclass
class Run:
    """What a workload run did, as its caller saw it."""

    issued: list[int] = field(default_factory=list)  # step indices of the data operations issued
    failed: set[int] = field(default_factory=set)  # data ops that raised a storage error
    inflight: int | None = None  # the data op a simulated crash interrupted
    durable: int = 0  # len(issued) when the last flush/compact/close completed
    crashed: bool = False
    errors: list[tuple[int, BaseException]] = field(default_factory=list)
    poisoned: bool = False
    db: iqdb.Iqdb | None = None

    def acked(self) -> list[int]:
        return [i for i in self.issued if i not in self.failed and i != self.inflight]


def run_workload(
    path: Path,
    fs: Any,
    steps: Sequence[Step] = WORKLOAD,
    *,
    sync: str = "flush",
    steps_after_error: int | None = None,
) -> Run:
    """Run ``steps`` on a database opened at ``path`` through ``fs``.

    A :class:`SimulatedCrash` ends the run (the process is dead). An error is recorded and the run
    goes on with the next step; it stops (leaving the handle open in ``run.db``) when the handle is
    poisoned, or ``steps_after_error`` steps after the first error.
    """
    run = Run()

    def open_db() -> iqdb.Iqdb | None:
        try:
            return iqdb.open(path, fs=fs, sync=sync, wal_limit=WAL_LIMIT)
        except SimulatedCrash:
            run.crashed = True
        except Exception as exc:  # a typed error is checked by the caller
            run.errors.append((-1, exc))
        return None

    db = open_db()
    if db is None:
        return run
    for i, step in enumerate(steps):
        if run.errors and steps_after_error is not None and i > run.errors[0][0] + steps_after_error:
            break
        kind = step[0]
        if kind in DATA_KINDS:
            run.issued.append(i)
        try:
            if kind == "upsert":
                db.upsert(iqdb.Record(step[1], step[2], step[3]))
            elif kind == "many":
                db.upsert_many(step[1], step[2], step[3])
            elif kind == "delete":
                db.delete(step[1])
            elif kind == "flush":
                db.flush()
            elif kind == "compact":
                db.compact()
            elif kind in ("close", "reopen"):
                db.close()
            if kind in ("flush", "compact", "close", "reopen") or sync == "always":
                run.durable = len(run.issued)
            if kind == "reopen":
                db = open_db()
                if db is None:
                    return run
        except SimulatedCrash:
            run.crashed = True
            if kind in DATA_KINDS:
                run.inflight = i
            return run
        except Exception as exc:  # a typed error is checked by the caller
            run.errors.append((i, exc))
            if kind in DATA_KINDS:
                run.failed.add(i)
            if isinstance(exc, iqdb.Poisoned):
                run.poisoned = True
                break
            if kind == "reopen":  # the close failed; it still released the directory
                db = open_db()
                if db is None:
                    return run
    run.db = None if db._closed else db
    return run


def diff(actual: State, expected: State) -> tuple[int, int]:
    """(records lost, records wrong) of ``actual`` against ``expected``."""
    lost = sum(1 for rid in expected if rid not in actual)
    wrong = sum(1 for rid, value in actual.items() if rid not in expected or expected[rid] != value)
    return lost, wrong


def judge(actual: State, candidates: list[State]) -> tuple[int, int]:
    """(0, 0) when ``actual`` is one of the candidate states, else the figures against the closest."""
    if any(actual == c for c in candidates):
        return 0, 0
    return min((diff(actual, c) for c in candidates), key=sum)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database holding ``BASE_IDS``, closed cleanly: its snap and wal entries are durable."""
    path = tmp_path_factory.mktemp("base") / "db"
    with iqdb.open(path) as db:
        for rid in BASE_IDS:
            db.upsert(iqdb.Record(rid, np.full(DIM, rid, np.float32), {"base": rid}))
    return path


@pytest.fixture(scope="module")
def base_state(base_dir: Path) -> State:
    with iqdb.open(base_dir, readonly=True) as db:
        return db_state(db, UNIVERSE)


def fresh_copy(base_dir: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(base_dir, dest)
    return dest


_COUNTS: dict[str, CountingFs] = {}


def count_calls(base_dir: Path | None, tmp: Path, sync: str = "flush") -> CountingFs:
    """The workload run once through a CountingFs: the list of its file-system calls
    (``base_dir=None``: starting from a directory that does not exist yet)."""
    key = f"sync={sync}, {'new' if base_dir is None else 'existing'} directory"
    if key not in _COUNTS:
        tmp = tmp / f"count{len(_COUNTS)}"
        path = tmp / "db" if base_dir is None else fresh_copy(base_dir, tmp)
        fs = CountingFs(real_sync=False)
        run = run_workload(path, fs, sync=sync)
        assert not run.errors and not run.crashed
        ops = fs.ops()
        assert ops.count("replace") >= 4, "the workload should compact (explicitly, automatically, on close)"
        print(f"\nworkload ({key}): {len(WORKLOAD)} steps, {len(ops)} file-system calls: {_histogram(ops)}")
        _COUNTS[key] = fs
    return _COUNTS[key]


@pytest.fixture(scope="module")
def workload_calls(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CountingFs:
    return count_calls(base_dir, tmp_path_factory.mktemp("count"))


def _histogram(ops: list[str]) -> str:
    return ", ".join(f"{op}={ops.count(op)}" for op in sorted(set(ops)))


def quick_fs() -> CountingFs:
    """The real file system minus the real fsyncs: for checking opens (nothing here models a
    power loss, and 3 ms per fsync times thousands of opens adds up)."""
    return CountingFs(real_sync=False)


def reopen_dropped(path: Path) -> State:
    """Open ``path``, read its state, and drop the handle without closing (no compaction)."""
    db = iqdb.open(path, fs=quick_fs())
    try:
        return db_state(db, UNIVERSE)
    finally:
        db._backend._release()
        db._closed = True


def verify_after_recovery(path: Path, expected: State, failures: list[str], tag: str) -> None:
    """After a recovered open, a new write + flush survives a power loss (strict) and a reopen."""
    fs = PowerLossFs(path)
    db = iqdb.open(path, fs=fs)
    db.upsert(iqdb.Record(PROBE, np.ones(DIM, np.float32), {"probe": True}))
    db.flush()
    fs.crash("strict")
    db = iqdb.open(path, fs=quick_fs())
    try:
        state = db_state(db, UNIVERSE)
    finally:
        db.close()
    want = dict(expected)
    want[PROBE] = (np.ones(DIM, np.float32).tobytes(), canon({"probe": True}))
    if state != want:
        failures.append(f"{tag}: the write after recovery did not survive: lost/wrong={diff(state, want)}")


# -- process-kill model -------------------------------------------------------------------------
@pytest.mark.slow
def test_crash_at_every_call_process_kill(
    base_dir: Path, base_state: State, workload_calls: CountingFs, tmp_path: Path
) -> None:
    """A crash before each file-system call; the page cache survives (kill -9). The reopened state
    is exactly the acknowledged operations, plus the interrupted one wholly or not at all."""
    total = workload_calls.count()
    failures: list[str] = []
    lost = wrong = tried = 0
    for point in range(total + 1):
        path = fresh_copy(base_dir, tmp_path / "db")
        fs = CrashFs(point)
        run = run_workload(path, fs)
        assert run.crashed == (point < total), f"crash point {point}: the run did not stop there"
        assert not run.errors, f"crash point {point}: {run.errors}"
        fs.kill()
        acked = [WORKLOAD[i] for i in run.acked()]
        candidates = [apply_steps(base_state, acked)]
        if run.inflight is not None:
            candidates.append(apply_steps(base_state, [*acked, WORKLOAD[run.inflight]]))
        try:
            state = reopen_dropped(path)
        except iqdb.IqdbError as exc:
            failures.append(f"point {point} ({fs.calls[point].op}): open raised {exc!r}")
            continue
        tried += 1
        dl, dw = judge(state, candidates)
        lost, wrong = lost + dl, wrong + dw
        if dl or dw:
            failures.append(f"point {point} ({fs.calls[point].op}): lost={dl} wrong={dw}")
            continue
        verify_after_recovery(path, state, failures, f"point {point}")
    print(f"\nprocess kill: {tried} crash points tried, {lost} records lost, {wrong} records wrong")
    assert not failures, "\n".join(failures[:20])
    assert tried == total + 1


# -- power-loss model ---------------------------------------------------------------------------
def power_loss_matrix(
    base_dir: Path | None, base_state: State, total: int, tmp_path: Path, mode: str, sync: str
) -> tuple[int, int, int, list[str]]:
    """``base_dir=None``: every run creates the database in a new directory."""
    failures: list[str] = []
    lost = wrong = tried = 0
    for point in range(total + 1):
        path = tmp_path / f"new{point}" / "db" if base_dir is None else fresh_copy(base_dir, tmp_path / "db")
        fs = PowerLossFs(path, crash_at=point)
        run = run_workload(path, fs, sync=sync)
        assert not run.errors, f"crash point {point}: {run.errors}"
        fs.crash(mode, random.Random(point))
        issued = [WORKLOAD[i] for i in run.issued]
        # Never less than what the last flush/compact/close confirmed, never a non-prefix mix.
        candidates = [apply_steps(base_state, issued[:k]) for k in range(run.durable, len(issued) + 1)]
        try:
            state = reopen_dropped(path)
        except iqdb.IqdbError as exc:
            failures.append(f"point {point}: open raised {exc!r}")
            continue
        tried += 1
        dl, dw = judge(state, candidates)
        lost, wrong = lost + dl, wrong + dw
        if dl or dw:
            failures.append(f"point {point} ({mode}, sync={sync}): lost={dl} wrong={dw}")
            continue
        verify_after_recovery(path, state, failures, f"point {point} ({mode})")
    return tried, lost, wrong, failures


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "sync", "start"),
    [
        ("strict", "flush", "existing"),
        ("strict", "flush", "new"),
        ("strict", "always", "existing"),
        ("torn", "flush", "existing"),
        ("zeros", "flush", "existing"),
    ],
)
def test_crash_at_every_call_power_loss(
    base_dir: Path, base_state: State, tmp_path: Path, mode: str, sync: str, start: str
) -> None:
    """A power loss before each file-system call: only fsynced bytes and fsynced directory entries
    survive (``torn``: plus a random prefix of unsynced appends; ``zeros``: their size, zero-filled).
    ``new``: the workload creates the database, so its directory entries start out not durable.
    The state is a prefix of the issued operations, at least up to the last completed flush, and a
    write + flush after recovery survives another power loss."""
    base = base_dir if start == "existing" else None
    total = count_calls(base, tmp_path, sync).count()
    tried, lost, wrong, failures = power_loss_matrix(
        base, base_state if base else {}, total, tmp_path, mode, sync
    )
    print(
        f"\npower loss ({mode}, sync={sync}, {start} directory): {tried} crash points tried, "
        f"{lost} records lost, {wrong} records wrong"
    )
    assert not failures, "\n".join(failures[:20])


# -- I/O errors ---------------------------------------------------------------------------------
def check_error_run(
    run: Run, fs: ErrorFs, err: int, path: Path, base_state: State, problems: list[str], tag: str, close: bool
) -> tuple[int, int]:
    """The contract after an injected error; returns (records lost, records wrong) after a reopen.

    A handle left open is closed (``close``: its compaction must cope with the earlier error) or
    dropped as by a process kill (what is on disk, the WAL, must hold every acknowledged write)."""
    if fs.injected == 0:
        problems.append(f"{tag}: the fault never fired")
    for step, exc in run.errors:
        if not isinstance(exc, iqdb.StorageError):
            problems.append(f"{tag}: step {step} raised {exc!r}, not a StorageError")
        elif not isinstance(exc, iqdb.Poisoned):
            if exc.errno != err:
                problems.append(f"{tag}: step {step} raised {exc!r} with errno {exc.errno}, not {err}")
            if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno != err:
                problems.append(f"{tag}: step {step}: the cause {exc.__cause__!r} is not the OSError")
    acked = [WORKLOAD[i] for i in run.acked()]
    candidates = [apply_steps(base_state, acked)]
    for f in sorted(run.failed):  # a failed operation is wholly there or wholly absent
        candidates.append(apply_steps(base_state, [WORKLOAD[i] for i in sorted([*run.acked(), f])]))
    db = run.db
    if db is not None:
        # The handle either still works or is poisoned; either way it reads what was acknowledged
        # (with sync="always", a write whose fsync failed may be visible: it is in the WAL).
        if db_state(db, UNIVERSE) not in candidates:
            problems.append(f"{tag}: the handle's state differs from the acknowledged operations")
        probe = iqdb.Record(PROBE, np.ones(DIM, np.float32))
        run.poisoned = bool(db.check()["poisoned"])
        if run.poisoned:
            for write in (lambda: db.upsert(probe), db.flush, db.compact, lambda: db.delete(BASE_IDS[0])):
                if not _raises(write, iqdb.Poisoned):
                    problems.append(f"{tag}: a write on a poisoned handle did not raise Poisoned")
        if close:
            try:
                db.close()
            except iqdb.StorageError as exc:
                run.errors.append((len(WORKLOAD), exc))
        else:
            db._backend._release()
            db._closed = True
    try:
        state = reopen_dropped(path)
    except iqdb.IqdbError as exc:  # Locked = a leaked lock, Corrupt = a damaged file
        problems.append(f"{tag}: reopen raised {exc!r}")
        return 0, 0
    state.pop(PROBE, None)
    if (path / "snap.tmp").exists():
        problems.append(f"{tag}: snap.tmp survived a reopen")
    lost, wrong = judge(state, candidates)
    if lost or wrong:
        problems.append(f"{tag}: after reopen lost={lost} wrong={wrong}")
    return lost, wrong


def _raises(call: Callable[[], object], kind: type[BaseException]) -> bool:
    try:
        call()
    except kind:
        return True
    return False


FAULT_OPS = ["write", "fsync", "ftruncate", "replace", "fsync_dir", "open", "map"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("op", "variant", "sync"),
    [
        *((op, "once", "flush") for op in FAULT_OPS),
        ("write", "short", "flush"),
        ("write", "persistent", "flush"),
        ("write", "once", "always"),
        ("fsync", "once", "always"),
    ],
)
def test_io_error_at_every_call(
    base_dir: Path, base_state: State, tmp_path: Path, op: str, variant: str, sync: str
) -> None:
    """ENOSPC and EIO at every call of ``op`` in the workload (``short``: a short write, then the
    error; ``persistent``: every later call fails too). The failing call raises StorageError with
    the errno (or Poisoned); the handle stays consistent or is poisoned (writes raise Poisoned,
    reads work); a reopen with a clean file system shows every acknowledged operation and the
    failed one wholly or not at all, both after a close and after the process dies."""
    n_calls = count_calls(base_dir, tmp_path, sync).count(op)
    assert n_calls > 0
    problems: list[str] = []
    injected = poisoned = lost = wrong = 0
    for err in (errno.ENOSPC, errno.EIO):
        for index in range(n_calls):
            path = fresh_copy(base_dir, tmp_path / "db")
            fs = ErrorFs(index, err, op, persistent=variant == "persistent", short=variant == "short")
            # Half of the runs stop 3 steps after the error and die (the WAL is checked); the
            # others go on to the final close (compaction after an error is checked).
            drop = (index + (err == errno.EIO)) % 2 == 0
            run = run_workload(path, fs, sync=sync, steps_after_error=3 if drop else None)
            tag = f"{errno.errorcode[err]} on {op} #{index} ({variant}, sync={sync}, {'drop' if drop else 'close'})"
            dl, dw = check_error_run(run, fs, err, path, base_state, problems, tag, close=not drop)
            injected += fs.injected
            poisoned += run.poisoned
            lost, wrong = lost + dl, wrong + dw
    print(
        f"\nI/O errors on {op} ({variant}, sync={sync}): {injected} faults injected at {2 * n_calls} call points, "
        f"{poisoned} handles poisoned, {lost} records lost, {wrong} records wrong"
    )
    assert not problems, "\n".join(problems[:20])


# -- a crash during recovery -------------------------------------------------------------------
def _recovery_case(case: str, path: Path) -> State:
    """A directory whose next open has repairs to make; the state that open must show."""
    r1, r2, r3 = (np.full(DIM, i, np.float32) for i in (1, 2, 3))

    def writes(db: iqdb.Iqdb) -> None:
        db.upsert(iqdb.Record(1, r1, {"a": 1}))
        db.upsert_many([2, 3], np.stack([r2, r3]), [None, {}])
        db.delete(3)

    expected = {1: (r1.tobytes(), canon({"a": 1})), 2: (r2.tobytes(), None)}
    if case == "stale-wal":
        # Crash after the compaction's commit point (directory fsynced), before the WAL reset.
        count = CountingFs(real_sync=False)
        db = iqdb.open(path.with_name("count"), fs=count)
        writes(db)
        db.close()
        reset = next(c.index for c in count.calls if c.op == "ftruncate" and str(c.path).endswith("wal"))
        fs = CrashFs(reset)
        db = iqdb.open(path, fs=fs)
        writes(db)
        with pytest.raises(SimulatedCrash):
            db.close()
        fs.kill()
        (path / "snap.tmp").write_bytes(b"an interrupted compaction")
        return expected
    db = iqdb.open(path, fs=quick_fs())
    writes(db)
    db.flush()
    db.upsert(iqdb.Record(4, r1, RICH))
    db._backend._release()
    db._closed = True
    wal = (path / "wal").read_bytes()
    if case == "torn-tail":
        (path / "wal").write_bytes(wal[:-17])  # the last frame loses its end
        (path / "snap.tmp").write_bytes(b"an interrupted compaction")
    else:  # "cut-padding": the last frame keeps its body, not all of its zero padding
        (_, body_end, end) = _frame_bounds(wal)[-1]
        assert body_end < end
        (path / "wal").write_bytes(wal[: body_end + 1])
        expected[4] = (r1.tobytes(), canon(RICH))
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("case", ["torn-tail", "stale-wal", "cut-padding"])
def test_crash_during_recovery(case: str, tmp_path: Path) -> None:
    """An open that repairs (cuts a torn tail, discards a stale WAL, restores padding, removes
    snap.tmp) crashes at each of its own file-system calls, under the process-kill and the
    power-loss model: the next open still shows exactly the expected state, and the one after
    that has nothing left to repair."""
    src = tmp_path / "src"
    expected = _recovery_case(case, src)
    count = CountingFs(real_sync=False)
    db = iqdb.open(fresh_copy(src, tmp_path / "probe"), fs=count)
    assert db_state(db, UNIVERSE) == expected
    repairs = db._backend.recovery
    db._backend._release()
    db._closed = True
    assert repairs["truncated_bytes"] or repairs["stale_wal_discarded"] or case == "cut-padding"
    failures, tried = [], 0
    for point in range(count.count()):
        for model in ("kill", "power"):
            path = fresh_copy(src, tmp_path / "db")
            fs = CrashFs(point) if model == "kill" else PowerLossFs(path, crash_at=point)
            try:
                db = iqdb.open(path, fs=fs)
                db._backend._release()
                db._closed = True
            except SimulatedCrash:
                pass
            if isinstance(fs, PowerLossFs):
                fs.crash("strict")
            else:
                fs.kill()
            tried += 1
            try:
                if reopen_dropped(path) != expected:
                    failures.append(f"{model} at call {point} ({count.calls[point].op}): wrong state")
                db = iqdb.open(path, fs=quick_fs())
                if db._backend.recovery["truncated_bytes"] or db._backend.recovery["stale_wal_discarded"]:
                    failures.append(f"{model} at call {point}: the second open repaired again")
                db.close()
            except iqdb.IqdbError as exc:
                failures.append(f"{model} at call {point} ({count.calls[point].op}): {exc!r}")
    print(f"\ncrash during recovery ({case}): {tried} crash points tried, {len(failures)} violations")
    assert not failures, "\n".join(failures[:20])


# -- the WAL cut at every byte of its last frames -----------------------------------------------
def _frame_bounds(wal: bytes, data_only: bool = True) -> list[tuple[int, int, int]]:
    """(offset, end of body, padded end) of each (data) frame in ``wal``."""
    result = scan(memoryview(wal), decode_header(wal))
    out = []
    for frame in result.frames:
        if frame.op is not None or not data_only:
            body_len = struct.unpack_from("<Q", wal, frame.offset + 16)[0]
            out.append((frame.offset, frame.offset + FRAME_HEADER_SIZE + body_len, frame.end))
    return out


@pytest.fixture(scope="module")
def cut_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, list[State]]:
    """A database whose WAL ends with three data frames (an upsert with a payload, a batch, a
    delete) after flushed ones; the model state after each WAL frame."""
    path = tmp_path_factory.mktemp("cut") / "db"
    rng = np.random.default_rng(5)
    steps: list[Step] = [
        ("upsert", 1, _vec(rng), {"a": 1}),
        ("many", [2, 3], np.stack([_vec(rng), _vec(rng)]), None),
        ("upsert", 4, _vec(rng), RICH),  # the last three frames
        ("many", [5, 6, 1], np.stack([_vec(rng) for _ in range(3)]), [{"b": b"xy"}, None, {}]),
        ("delete", 2),
    ]
    db = iqdb.open(path, fs=quick_fs())
    for i, step in enumerate(steps):
        if step[0] == "upsert":
            db.upsert(iqdb.Record(step[1], step[2], step[3]))
        elif step[0] == "many":
            db.upsert_many(step[1], step[2], step[3])
        else:
            db.delete(step[1])
        if i == 1:
            db.flush()
    db._backend._release()  # the process dies: no compaction
    db._closed = True
    wal = (path / "wal").read_bytes()
    (path / "wal").unlink()
    states = [apply_steps({}, steps[:k]) for k in range(len(steps) + 1)]
    return path, wal, states


def _open_cut(base: Path, wal: bytes, dest: Path) -> Path:
    fresh_copy(base, dest)
    (dest / "wal").write_bytes(wal)
    return dest


@pytest.mark.slow
def test_wal_cut_at_every_byte_of_last_frames(
    cut_case: tuple[Path, bytes, list[State]], tmp_path: Path
) -> None:
    """Cut the WAL at every byte offset of its last three frames: open succeeds and shows exactly
    the frames before the cut (a frame whose body is complete but whose zero padding is cut may
    count as present), truncates the rest, a second open finds nothing more to cut, and a write +
    flush after recovery survives another reopen."""
    base, wal, states = cut_case
    frames = _frame_bounds(wal)
    assert len(frames) == 5, "expected a frame per write"
    assert any(body_end != end for _, body_end, end in frames[-3:]), "no padded frame among the last 3"
    start = frames[-3][0]
    every_frame = _frame_bounds(wal, data_only=False)  # SYNC frames too
    failures: list[str] = []
    cuts = 0
    for cut in range(start, len(wal) + 1):
        path = _open_cut(base, wal[:cut], tmp_path / "db")
        k_min = sum(end <= cut for _, _, end in frames)
        k_max = sum(body_end <= cut for _, body_end, _ in frames)
        valid_end = max([end for _, _, end in every_frame if end <= cut], default=32)
        try:
            db = iqdb.open(path, fs=quick_fs())
        except iqdb.IqdbError as exc:
            failures.append(f"cut {cut}: open raised {exc!r}")
            continue
        cuts += 1
        report = dict(db._backend.recovery)
        state = db_state(db, UNIVERSE)
        db._backend._release()
        db._closed = True
        if state not in [states[k] for k in range(k_min, k_max + 1)]:
            failures.append(f"cut {cut}: not the state after {k_min}..{k_max} frames")
        if k_min == k_max and report["truncated_bytes"] != cut - valid_end:
            failures.append(f"cut {cut}: truncated_bytes {report['truncated_bytes']} != {cut - valid_end}")
        db = iqdb.open(path, fs=quick_fs())  # recovery is idempotent
        again = db_state(db, UNIVERSE), db._backend.recovery["truncated_bytes"]
        if again != (state, 0):
            failures.append(f"cut {cut}: a second open differs or truncates again")
        db.upsert(iqdb.Record(PROBE, np.ones(DIM, np.float32)))
        db.flush()
        db._backend._release()
        db._closed = True
        after = reopen_dropped(path)
        if after.pop(PROBE, None) is None or after != state:
            failures.append(f"cut {cut}: the write after recovery did not survive")
    print(f"\nWAL cuts: {cuts} cut offsets over the last 3 frames, {len(failures)} violations")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.slow
def test_wal_junk_extensions(cut_case: tuple[Path, bytes, list[State]], tmp_path: Path) -> None:
    """Zero bytes (1-64, 512, 4096) and random garbage (100 tails) after the last frame: open shows
    exactly the original data and cuts the junk; a later write survives a reopen."""
    base, wal, states = cut_case
    rng = random.Random(3)
    tails = [bytes(n) for n in (*range(1, 65), 512, 4096)]
    tails += [rng.randbytes(rng.randint(1, 600)) for _ in range(100)]
    failures = []
    for i, tail in enumerate(tails):
        path = _open_cut(base, wal + tail, tmp_path / "db")
        db = iqdb.open(path, fs=quick_fs())
        if db_state(db, UNIVERSE) != states[-1] or db._backend.recovery["truncated_bytes"] != len(tail):
            failures.append(f"tail {i} ({len(tail)} bytes): wrong state or truncation report")
        db.upsert(iqdb.Record(PROBE, np.ones(DIM, np.float32)))
        db.flush()
        db._backend._release()
        db._closed = True
        if PROBE not in reopen_dropped(path):
            failures.append(f"tail {i}: the later write was lost")
    print(f"\nWAL junk tails: {len(tails)} tails, {len(failures)} violations")
    assert not failures, "\n".join(failures[:20])


# -- bit flips ---------------------------------------------------------------------------------
# Each trial opens a damaged copy in a worker process, so a crash of the Arrow reader shows up as
# a failed trial instead of taking the test run down.
FLIP_WORKER = textwrap.dedent(
    """
    import json, os, shutil, sys
    sys.path.insert(0, sys.argv[1])
    import iqdb
    from faultfs import CountingFs, db_state
    base, work, universe = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    files = {name: open(os.path.join(base, name), "rb").read() for name in os.listdir(base)}

    def state():
        db = iqdb.open(work, fs=CountingFs(real_sync=False))
        try:
            return db_state(db, universe)
        finally:
            db._backend._release()
            db._closed = True

    def load(target=None, byte=0, bit=0):
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        for name, data in files.items():
            if name == target:
                data = bytearray(data)
                data[byte] ^= 1 << bit
            with open(os.path.join(work, name), "wb") as f:
                f.write(data)

    load()
    original = state()
    for line in sys.stdin:
        target, byte, bit = json.loads(line)
        load(target, byte, bit)
        try:
            outcome = "same" if state() == original else "WRONG"
        except iqdb.Corrupt:
            outcome = "corrupt"
        except Exception as exc:
            outcome = f"ERROR {type(exc).__name__}: {exc}"
        print(json.dumps([target, byte, bit, outcome]), flush=True)
    """
)


def run_flips(base: Path, tmp_path: Path, flips: list[tuple[str, int, int]]) -> dict[str, int]:
    """Apply each flip to a copy of ``base`` and open it in a worker; counts per outcome."""
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FLIP_WORKER,
            tests_dir,
            str(base),
            str(tmp_path / "work"),
            json.dumps(UNIVERSE),
        ],
        input="".join(json.dumps(f) + "\n" for f in flips),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(results) == len(flips), (
        f"worker died (rc={proc.returncode}) after {len(results)}/{len(flips)} flips; "
        f"next flip {flips[len(results)] if len(results) < len(flips) else None}: {proc.stderr[-2000:]}"
    )
    counts: dict[str, int] = {}
    bad = []
    for target, byte, bit, outcome in results:
        key = outcome if outcome in ("same", "corrupt") else "wrong" if outcome == "WRONG" else "error"
        counts[key] = counts.get(key, 0) + 1
        if key in ("wrong", "error"):
            bad.append(f"{target} byte {byte} bit {bit}: {outcome}")
    assert not bad, "\n".join(bad[:20])
    return counts


@pytest.fixture(scope="module")
def flip_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of 12 records (payloads: rich, none, empty) and a flushed WAL of 6 more frames."""
    path = tmp_path_factory.mktemp("flip") / "db"
    rng = np.random.default_rng(9)
    with iqdb.open(path, fs=quick_fs()) as db:
        db.upsert_many(
            list(range(12)),
            np.stack([_vec(rng) for _ in range(12)]),
            [RICH, None, {}, *({"i": i, "s": "x" * i} for i in range(9))],
        )
    db = iqdb.open(path, fs=quick_fs())
    db.upsert(iqdb.Record(20, _vec(rng), RICH))
    db.upsert_many([21, 22, 0], np.stack([_vec(rng) for _ in range(3)]), [None, {}, {"n": 1}])
    db.delete(3)
    db.upsert(iqdb.Record(23, _vec(rng)))
    db.flush()  # a flip in a frame written before the last flush must be detected
    db._backend._release()
    db._closed = True
    return path


@pytest.mark.slow
def test_bit_flips_in_wal(flip_base: Path, tmp_path: Path) -> None:
    """300 random single-bit flips anywhere in a flushed WAL, plus every bit of its last two data
    frame headers: each open raises Corrupt or gives exactly the original data."""
    wal = (flip_base / "wal").read_bytes()
    rng = random.Random(1)
    flips = [("wal", rng.randrange(len(wal)), rng.randrange(8)) for _ in range(300)]
    for offset, _, _ in _frame_bounds(wal)[-2:]:
        flips += [("wal", offset + b, bit) for b in range(FRAME_HEADER_SIZE) for bit in range(8)]
    counts = run_flips(flip_base, tmp_path, flips)
    print(
        f"\nbit flips in the WAL: {len(flips)} tried: {counts.get('corrupt', 0)} refused (Corrupt), "
        f"{counts.get('same', 0)} opened with the original data, 0 silently wrong"
    )


@pytest.mark.slow
def test_bit_flips_in_snapshot(flip_base: Path, tmp_path: Path) -> None:
    """300 random single-bit flips anywhere in the snapshot, plus every bit of its last 64 bytes
    (Arrow footer and magic): each open raises Corrupt or gives exactly the original data."""
    snap = (flip_base / "snap").read_bytes()
    rng = random.Random(2)
    flips = [("snap", rng.randrange(len(snap)), rng.randrange(8)) for _ in range(300)]
    flips += [("snap", b, bit) for b in range(len(snap) - 64, len(snap)) for bit in range(8)]
    counts = run_flips(flip_base, tmp_path, flips)
    print(
        f"\nbit flips in the snapshot ({len(snap)} bytes): {len(flips)} tried: "
        f"{counts.get('corrupt', 0)} refused (Corrupt), {counts.get('same', 0)} opened with the "
        f"original data, 0 silently wrong"
    )


# -- real kill -9 of writing processes ----------------------------------------------------------
# A zygote process imports iqdb once and forks one writer per trial, so a trial costs a fork
# instead of an interpreter start-up. Each writer is a real process, killed with SIGKILL by the
# test; it reports "ack N" on the shared pipe after operation N returned.
KILL_ZYGOTE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import iqdb

    def out(text):
        os.write(1, (text + "\\n").encode())

    def op_ids(op):
        first = (op // 3) * 6 + (0, 1, 3)[op % 3]  # batch sizes 1, 2, 3, 1, 2, 3, ...
        return list(range(first, first + 1 + op % 3))

    def vec(rid):
        return np.array([rid, rid % 7, -rid, 1.5], np.float32)

    def writer(path, start, mode):
        db = iqdb.open(path, sync="always" if mode == "always" else "flush")
        out("ready")
        op = start
        while True:
            ids = op_ids(op)
            if len(ids) == 1:
                db.upsert(iqdb.Record(ids[0], vec(ids[0]), {"op": op}))
            else:
                db.upsert_many(ids, np.stack([vec(r) for r in ids]), [{"op": op}] * len(ids))
            if mode == "flush":
                db.flush()
            out(f"ack {op}")
            op += 1
            if op % 25 == 0:
                db.compact()

    for line in sys.stdin:
        path, start, mode = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                writer(path, int(start), mode)
            finally:
                os._exit(3)
        out(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        out(f"exit {status}")
    """
)


def _record(db: iqdb.Iqdb, rid: int) -> tuple[bytes, Any] | None:
    rec = db.get(rid)
    return None if rec is None else (rec.vector.to_numpy().tobytes(), canon(rec.payload))


def _kill_op_ids(op: int) -> list[int]:
    first = (op // 3) * 6 + (0, 1, 3)[op % 3]
    return list(range(first, first + 1 + op % 3))


def _kill_state(ops: int, first_op: int = 0) -> State:
    """The records written by operations ``first_op .. ops-1``."""
    state: State = {}
    for op in range(first_op, ops):
        for rid in _kill_op_ids(op):
            vec = np.array([rid, rid % 7, -rid, 1.5], np.float32)
            state[rid] = (vec.tobytes(), canon({"op": op}))
    return state


@pytest.mark.slow
def test_kill_9_writers(tmp_path: Path) -> None:
    """120 writer processes killed with SIGKILL at random moments (sync="always", a flush after
    every write, or neither: a process kill loses nothing either way); 30 trials share a directory,
    so each also recovers from the kills before it. After each kill every acknowledged operation is
    there, and the state is a prefix of the operations (the one in flight wholly or not at all)."""
    trials, per_dir = 120, 30
    rng = random.Random(4)
    done = 0  # operations in the database so far
    acked_total = lost = wrong = 0
    failures: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", KILL_ZYGOTE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    ) as zygote:
        assert zygote.stdin is not None and zygote.stdout is not None
        for trial in range(trials):
            if trial % per_dir == 0:  # a new directory now and then keeps the opens fast
                path, done = tmp_path / f"db{trial // per_dir}", 0
            mode = ("always", "flush", "none")[trial % 3]
            zygote.stdin.write(f"{path} {done} {mode}\n")
            lines: list[str] = []
            while not ("ready" in lines and any(x.startswith("pid ") for x in lines)):
                line = zygote.stdout.readline().strip()
                assert line, f"zygote died: {zygote.stderr.read() if zygote.poll() is not None else ''}"
                lines.append(line)
                assert not line.startswith("exit"), f"trial {trial}: the writer exited early: {lines}"
            pid = int(next(x for x in lines if x.startswith("pid "))[4:])
            time.sleep(rng.uniform(0, 0.06))
            os.kill(pid, signal.SIGKILL)
            while not lines[-1].startswith("exit"):
                lines.append(zygote.stdout.readline().strip())
            status = int(lines[-1][5:])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, lines[-5:]
            acks = [int(x[4:]) for x in lines if x.startswith("ack ")]
            assert acks == list(range(done, done + len(acks)))
            acked_total += len(acks)
            low = done + len(acks)  # every acknowledged operation
            # The last trial of a directory reads every record; the others the records of the
            # last operations (older ones were checked already) and the count.
            first_op = 0 if trial % per_dir == per_dir - 1 else max(done - 5, 0)
            ids = range(_kill_op_ids(first_op)[0], _kill_op_ids(low + 1)[-1] + 4)
            with iqdb.open(path, readonly=True) as db:  # never changes a file
                state = {rid: v for rid in ids if (v := _record(db, rid)) is not None}
                count = len(db)
            match = [
                k for k in (low, low + 1) if count == _kill_op_ids(k)[0] and state == _kill_state(k, first_op)
            ]
            if not match:
                dl, dw = diff(state, _kill_state(low, first_op))
                lost, wrong = lost + dl, wrong + dw
                failures.append(
                    f"trial {trial} ({mode}): {len(acks)} acked, {count} records, lost={dl} wrong={dw}"
                )
                break
            done = match[0]
        zygote.stdin.close()
        zygote.wait(timeout=30)
    print(
        f"\nkill -9: {trials} writers killed, {acked_total} acknowledged operations checked, "
        f"{lost} records lost, {wrong} records wrong"
    )
    assert not failures, "\n".join(failures)
    with iqdb.open(path) as db:
        assert db.check()["ok"]
        assert db_state(db, range(_kill_op_ids(done)[0] + 4)) == _kill_state(done)


# -- Hypothesis state machine -------------------------------------------------------------------
SM_IDS = st.integers(0, 11)
SM_VECTORS = st.lists(st.integers(-3, 3), min_size=DIM, max_size=DIM).map(lambda v: np.array(v, np.float32))
SM_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=4),
)
SM_PAYLOADS = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=3), st.one_of(SM_VALUES, st.lists(SM_VALUES, max_size=2)), max_size=3),
)
SENTINEL = 100  # written before the machine starts: the directory's entries are durable


class DurableMachine(RuleBasedStateMachine):
    """A durable database against a dict model, through crashes.

    ``states`` holds the model after each acknowledged write since the last durable point
    (flush, compact, close); a process kill must keep ``states[-1]``, a power loss any of them.
    """

    def __init__(self) -> None:
        super().__init__()
        MACHINE["examples"] += 1
        self.dir = Path(tempfile.mkdtemp(prefix="iqdb-machine-"))
        self.path = self.dir / "db"
        vec = np.full(DIM, 1, np.float32)
        with iqdb.open(self.path, fs=quick_fs()) as db:
            db.upsert(iqdb.Record(SENTINEL, vec))
        self.states: list[State] = [{SENTINEL: (vec.tobytes(), None)}]
        self.fs = PowerLossFs(self.path)
        self.db = iqdb.open(self.path, fs=self.fs)

    @property
    def model(self) -> State:
        return self.states[-1]

    def teardown(self) -> None:
        self.fs.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _acked(self, state: State) -> None:
        self.states.append(state)

    def _durable(self) -> None:
        self.states = [self.model]

    def _reopen(self, candidates: list[State]) -> None:
        MACHINE["reopens"] += 1
        self.fs = PowerLossFs(self.path)
        self.db = iqdb.open(self.path, fs=self.fs)
        state = db_state(self.db, (*range(12), SENTINEL))
        assert state in candidates, f"after recovery: lost/wrong = {judge(state, candidates)}"
        self.states = [state]

    @rule(rid=SM_IDS, vec=SM_VECTORS, payload=SM_PAYLOADS)
    def upsert(self, rid: int, vec: np.ndarray, payload: Any) -> None:
        self.db.upsert(iqdb.Record(rid, vec, payload))
        self._acked(apply_steps(self.model, [("upsert", rid, vec, payload)]))

    @rule(rows=st.lists(st.tuples(SM_IDS, SM_VECTORS, SM_PAYLOADS), min_size=1, max_size=5))
    def upsert_many(self, rows: list[tuple[int, np.ndarray, Any]]) -> None:
        step = ("many", [r[0] for r in rows], np.stack([r[1] for r in rows]), [r[2] for r in rows])
        self.db.upsert_many(step[1], step[2], step[3])
        self._acked(apply_steps(self.model, [step]))

    @rule(rid=SM_IDS)
    def delete(self, rid: int) -> None:
        assert self.db.delete(rid) == (rid in self.model)
        self._acked(apply_steps(self.model, [("delete", rid)]))

    @rule()
    def flush(self) -> None:
        self.db.flush()
        self._durable()

    @rule()
    def compact(self) -> None:
        self.db.compact()
        self._durable()

    @rule()
    def close_reopen(self) -> None:
        self.db.close()
        self._durable()
        self._reopen([self.model])

    @rule()
    def kill_reopen(self) -> None:
        """The process dies (kill -9): everything acknowledged is still there."""
        self.fs.kill()
        MACHINE["process kills"] += 1
        self._reopen([self.model])

    @rule(mode=st.sampled_from(["strict", "torn", "zeros"]), seed=st.integers(0, 2**16))
    def power_loss_reopen(self, mode: str, seed: int) -> None:
        """The machine loses power: at least the last durable state, at most everything."""
        self.fs.crash(mode, random.Random(seed))
        MACHINE["power losses"] += 1
        self._reopen(self.states)

    @rule(
        rows=st.lists(st.tuples(SM_IDS, SM_VECTORS), min_size=1, max_size=4),
        after=st.integers(0, 30),
        power=st.booleans(),
        then_close=st.booleans(),
    )
    def crash_during_write(
        self, rows: list[tuple[int, np.ndarray]], after: int, power: bool, then_close: bool
    ) -> None:
        """A crash ``after`` file-system calls into a batch write (and a close, which compacts)."""
        self.fs.crash_at = len(self.fs.calls) + after
        step = ("many", [r[0] for r in rows], np.stack([r[1] for r in rows]), None)
        with_op = apply_steps(self.model, [step])
        try:
            self.db.upsert_many(step[1], step[2])
            self._acked(with_op)
            if then_close:
                self.db.close()
                self._durable()
        except SimulatedCrash:
            MACHINE["crashes inside a call"] += 1
        MACHINE["power losses" if power else "process kills"] += 1
        if power:
            self.fs.crash("strict")
            self._reopen([*self.states, with_op])
        else:
            self.fs.kill()
            self._reopen([self.model, with_op])

    @rule(query=SM_VECTORS, k=st.integers(0, 14), metric=st.sampled_from(["l2", "dot"]))
    def search(self, query: np.ndarray, k: int, metric: str) -> None:
        MACHINE["searches"] += 1
        ids = sorted(self.model)
        got = [(int(r.id), r.score) for r in self.db.search(query, k, metric=metric)]
        if not ids:
            assert got == []
            return
        matrix = np.stack([np.frombuffer(self.model[i][0], np.float32) for i in ids]).astype(np.float64)
        q = query.astype(np.float64)
        scores = np.sqrt(((matrix - q) ** 2).sum(axis=1)) if metric == "l2" else -(matrix @ q)
        want = sorted(zip(scores.tolist(), ids))[:k]  # integer vectors: exact, ties by id
        assert [rid for rid, _ in got] == [rid for _, rid in want]
        assert np.allclose([s for _, s in got], [s for s, _ in want], rtol=1e-6, atol=1e-6)

    @invariant()
    def matches_model(self) -> None:
        MACHINE["steps"] += 1
        assert db_state(self.db, (*range(12), SENTINEL)) == self.model


MACHINE: Counter[str] = Counter()


@pytest.mark.slow
def test_durable_state_machine() -> None:
    """Random programs of writes, flushes, compactions, closes, process kills and power losses
    (also in the middle of a write or a close) against a dict model; searches checked exactly."""
    MACHINE.clear()
    run_state_machine_as_test(
        DurableMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    print("\nstate machine: " + ", ".join(f"{n} {k}" for k, n in MACHINE.items()) + ", 0 failures")
