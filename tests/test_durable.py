"""The durable store: persistence cases of the upstream crate, the directory layout, locking,
read-only opening, what a rejected or failed call leaves on disk, compaction, ``check()`` and the
``sync`` option. The crash and fault matrix lives in ``test_crash.py``.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faultfs import CountingFs, CrashFs, ErrorFs, PowerLossFs, SimulatedCrash, canon, db_state

import iqdb
from iqdb import Corrupt, InvalidConfig, Locked, Poisoned, Record, StorageError
from iqdb._wal import FRAME_HEADER_SIZE, decode_header, scan

# These tests model a process that dies: the handles it leaves behind are dropped unclosed on
# purpose, so the ResourceWarning that an unclosed handle gives is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:unclosed iqdb database:ResourceWarning")

IDS = range(64)

RICH = {
    "bytes": b"\x00\xff\x80",
    "empty_bytes": b"",
    "nan": math.nan,
    "inf": math.inf,
    "ninf": -math.inf,
    "negzero": -0.0,
    "nested": {"list": [1, "two", None, [True, False, 2.5]], "empty": {}, "none": None},
    "max": 2**63 - 1,
    "min": -(2**63),
    "text": "héllo ✓",
}


def vec(i: int, dim: int = 4) -> np.ndarray:
    return np.arange(dim, dtype=np.float32) + i


def drop(db: iqdb.Iqdb) -> None:
    """The process dies without flush or close: files are released as the kernel would."""
    db._backend._release()
    db._closed = True


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def snapshot_of_files(path: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification times (ns) of every file."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- persistence: the upstream crate's cases ------------------------------------------------------
@pytest.mark.parametrize("ending", ["close", "flush-then-drop"])
def test_reopen_after_flush_or_close(tmp_path: Path, ending: str) -> None:
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, vec(1), {"a": 1}))
    db.upsert_many([2, 3], np.stack([vec(2), vec(3)]))
    db.flush()
    if ending == "close":
        db.close()
    else:
        drop(db)
    with iqdb.open(tmp_path) as db:
        assert len(db) == 3
        assert db.get(1) == Record(1, vec(1), {"a": 1})
        assert db.get(3) == Record(3, vec(3))
        assert db.dim == 4


def test_process_exit_without_flush_or_close_loses_nothing(tmp_path: Path) -> None:
    """A real process writes, then exits with os._exit(0): no flush, no close, no atexit."""
    proc = run_python(
        """
        import os, sys
        import numpy as np
        import iqdb
        db = iqdb.open(sys.argv[1])
        for i in range(50):
            db.upsert(iqdb.Record(i, np.full(3, i, np.float32), {"i": i}))
        db.upsert_many([100, 101], np.ones((2, 3)), [None, {}])
        db.delete(7)
        os._exit(0)
        """,
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    with iqdb.open(tmp_path) as db:
        assert len(db) == 51
        assert 7 not in db
        assert db.get(49) == Record(49, np.full(3, 49, np.float32), {"i": 49})
        assert db.get(100).payload is None  # type: ignore[union-attr]
        assert db.get(101).payload == {}  # type: ignore[union-attr]
        assert db._backend.recovery["replayed"] == 52


@pytest.mark.parametrize("ending", ["close", "drop"])
def test_delete_persists(tmp_path: Path, ending: str) -> None:
    db = iqdb.open(tmp_path)
    db.upsert_many([1, 2, 3], np.stack([vec(1), vec(2), vec(3)]))
    db.close()
    db = iqdb.open(tmp_path)
    assert db.delete(2) is True
    assert db.delete(2) is False
    db.close() if ending == "close" else drop(db)
    with iqdb.open(tmp_path) as db:
        assert sorted(r for r in IDS if r in db) == [1, 3]
        assert db.get(2) is None


def test_close_leaves_an_empty_wal_and_a_snapshot(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, vec(1)))
    assert (tmp_path / "wal").stat().st_size > 0
    db.close()
    assert (tmp_path / "wal").stat().st_size == 0
    assert (tmp_path / "snap").stat().st_size > 0
    with iqdb.open(tmp_path) as db:
        assert db._backend.recovery["replayed"] == 0
        assert db._backend.recovery["snapshot_rows"] == 1


@pytest.mark.parametrize("path_taken", ["snapshot", "wal-replay"])
def test_payloads_round_trip_exactly(tmp_path: Path, path_taken: str) -> None:
    """bytes, NaN/inf, -0.0, nested lists and dicts, 64-bit extremes; None distinct from {}."""
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, vec(1), RICH))
    db.upsert_many([2, 3, 4], np.stack([vec(2), vec(3), vec(4)]), [None, {}, {"k": None}])
    db.close() if path_taken == "snapshot" else drop(db)
    with iqdb.open(tmp_path) as db:
        assert db._backend.recovery["replayed"] == (0 if path_taken == "snapshot" else 2)
        got = db.get(1)
        assert got is not None and got.payload is not None
        assert canon(got.payload) == canon(RICH)
        assert math.copysign(1.0, got.payload["negzero"]) == -1.0  # type: ignore[arg-type]
        assert type(got.payload["max"]) is int
        assert db.get(2).payload is None  # type: ignore[union-attr]
        assert db.get(3).payload == {} and db.get(3).payload is not None  # type: ignore[union-attr]
        assert db.get(4).payload == {"k": None}  # type: ignore[union-attr]
        assert got.vector.to_numpy().tobytes() == vec(1).tobytes()


def test_empty_database(tmp_path: Path) -> None:
    with iqdb.open(tmp_path) as db:
        assert len(db) == 0 and db.dim is None
    with iqdb.open(tmp_path) as db:
        assert len(db) == 0 and db.dim is None
        assert db.search([1.0, 2.0], 3) == []
        assert db.check()["ok"]
        db.upsert(Record(1, [1.0, 2.0]))
        db.delete(1)
    with iqdb.open(tmp_path) as db:  # every record deleted: the dimension stays
        assert len(db) == 0 and db.dim == 2


def test_many_sessions_accumulate(tmp_path: Path) -> None:
    for session in range(10):
        db = iqdb.open(tmp_path)
        assert len(db) == 3 * session
        db.upsert(Record(3 * session, vec(session), {"s": session}))
        db.upsert_many([3 * session + 1, 3 * session + 2], np.stack([vec(-session), vec(session)]))
        if session % 3 == 0:
            db.close()
        elif session % 3 == 1:
            db.flush()
            drop(db)
        else:
            drop(db)
    with iqdb.open(tmp_path) as db:
        assert len(db) == 30
        for session in range(10):
            assert db.get(3 * session) == Record(3 * session, vec(session), {"s": session})


@pytest.mark.parametrize("where", ["leading", "trailing"])
def test_wrong_magic_in_snap_is_corrupt(tmp_path: Path, where: str) -> None:
    with iqdb.open(tmp_path) as db:
        db.upsert(Record(1, vec(1)))
    snap = bytearray((tmp_path / "snap").read_bytes())
    if where == "leading":
        snap[:6] = b"ARROW2"
    else:
        snap[-6:] = b"XRROW1"
    (tmp_path / "snap").write_bytes(bytes(snap))
    with pytest.raises(Corrupt):
        iqdb.open(tmp_path)
    with pytest.raises(Corrupt):
        iqdb.open(tmp_path, readonly=True)


def test_failed_open_releases_the_lock(tmp_path: Path) -> None:
    with iqdb.open(tmp_path) as db:
        db.upsert(Record(1, vec(1)))
    good = (tmp_path / "snap").read_bytes()
    (tmp_path / "snap").write_bytes(b"garbage")
    with pytest.raises(Corrupt):
        iqdb.open(tmp_path)
    (tmp_path / "snap").write_bytes(good)
    with iqdb.open(tmp_path) as db:  # not Locked
        assert len(db) == 1


def test_junk_appended_to_the_wal_is_truncated_and_later_writes_survive(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, vec(1)))
    db.flush()
    drop(db)
    clean = (tmp_path / "wal").stat().st_size
    with open(tmp_path / "wal", "ab") as f:
        f.write(b"\x17junk that is not a frame" * 5)
    db = iqdb.open(tmp_path)
    assert db._backend.recovery["truncated_bytes"] == 125
    assert (tmp_path / "wal").stat().st_size == clean
    assert len(db) == 1
    db.upsert(Record(2, vec(2)))
    db.flush()
    drop(db)
    with iqdb.open(tmp_path) as db:
        assert db._backend.recovery["truncated_bytes"] == 0
        assert sorted(r for r in IDS if r in db) == [1, 2]


def test_cut_inside_padding_then_write_survives(tmp_path: Path) -> None:
    """A torn write that kept a frame's body but not all of its zero padding: the frame is kept,
    and a frame written after recovery is found by the next open (it starts aligned)."""
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, [1.0, 2.0, 3.0], {"k": 1}))
    drop(db)
    wal = (tmp_path / "wal").read_bytes()
    frame = scan(memoryview(wal), decode_header(wal)).frames[-1]
    body_end = frame.offset + FRAME_HEADER_SIZE + struct.unpack_from("<Q", wal, frame.offset + 16)[0]
    assert body_end < frame.end, "the frame needs padding for this test"
    (tmp_path / "wal").write_bytes(wal[: body_end + 1])
    db = iqdb.open(tmp_path)
    assert 1 in db
    db.upsert(Record(2, [3.0, 2.0, 1.0]))
    db.flush()
    drop(db)
    with iqdb.open(tmp_path) as db:
        assert 1 in db and 2 in db


# -- layout -----------------------------------------------------------------------------------
def test_layout(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b"  # created with its parents
    with iqdb.open(path) as db:
        db.upsert(Record(1, vec(1)))
        assert {"wal", "LOCK"} <= set(os.listdir(path))
        db.compact()
        assert "snap.tmp" not in os.listdir(path)
    names = set(os.listdir(path))
    assert {"snap", "wal"} <= names
    assert "snap.tmp" not in names
    assert names <= {"snap", "wal", "LOCK"}


def test_a_leftover_snap_tmp_is_removed_on_open(tmp_path: Path) -> None:
    with iqdb.open(tmp_path) as db:
        db.upsert(Record(1, vec(1)))
    (tmp_path / "snap.tmp").write_bytes(b"half a snapshot")
    with iqdb.open(tmp_path, readonly=True) as ro:  # readonly changes nothing
        assert len(ro) == 1
    assert (tmp_path / "snap.tmp").exists()
    with iqdb.open(tmp_path) as db:
        assert not (tmp_path / "snap.tmp").exists()
        assert db.get(1) == Record(1, vec(1))


@pytest.mark.parametrize("readonly", [False, True])
def test_a_path_that_is_a_file_raises_invalid_config(tmp_path: Path, readonly: bool) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"not a database")
    with pytest.raises(InvalidConfig):
        iqdb.open(target, readonly=readonly)
    assert target.read_bytes() == b"not a database"


def test_readonly_on_a_missing_directory_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        iqdb.open(tmp_path / "missing", readonly=True)
    assert info.value.errno == errno.ENOENT
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "options", [{"sync": "sometimes"}, {"wal_limit": 0}, {"wal_limit": True}, {"wal_limt": 5}]
)
def test_bad_options_raise_invalid_config(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfig):
        iqdb.open(tmp_path, **options)
    with iqdb.open(tmp_path):  # and nothing stays locked
        pass


# -- one writer per directory -------------------------------------------------------------------
def test_second_handle_in_this_process_is_locked(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    with pytest.raises(Locked) as info:
        iqdb.open(tmp_path)
    assert str(os.getpid()) in str(info.value)
    db.upsert(Record(1, vec(1)))  # the first handle is unaffected
    db.close()
    with iqdb.open(tmp_path) as again:
        assert len(again) == 1


def test_second_process_is_locked(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, vec(1)))
    proc = run_python(
        """
        import sys, time, iqdb
        start = time.monotonic()
        try:
            iqdb.open(sys.argv[1])
            print("opened")
        except iqdb.Locked as exc:
            print("Locked", round(time.monotonic() - start, 3), exc)
        """,
        str(tmp_path),
    )
    assert proc.stdout.startswith("Locked"), proc.stdout + proc.stderr
    assert float(proc.stdout.split()[1]) < 1.0  # at once, not after waiting
    assert str(os.getpid()) in proc.stdout  # names the holder
    db.close()


def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    """A process holding the directory is killed with SIGKILL: the kernel drops its lock."""
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, iqdb; db = iqdb.open(sys.argv[1]); db.upsert(iqdb.Record(1, [1.0]));"
            "print('ready', flush=True); sys.stdin.read()",
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(Locked) as info:
            iqdb.open(tmp_path)
        assert str(child.pid) in str(info.value)
        child.send_signal(signal.SIGKILL)
        child.wait()
    with iqdb.open(tmp_path) as db:
        assert db.get(1) == Record(1, [1.0])


# -- readonly ---------------------------------------------------------------------------------
def test_readonly_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    writer = iqdb.open(tmp_path)
    writer.upsert_many([1, 2], np.stack([vec(1), vec(2)]), [{"a": 1}, None])
    writer.compact()
    writer.upsert(Record(3, vec(3), {}))
    writer.delete(1)
    writer.flush()
    before = snapshot_of_files(tmp_path)
    ro = iqdb.open(tmp_path, readonly=True)
    assert db_state(ro, IDS) == db_state(writer, IDS)
    assert sorted(r for r in IDS if r in ro) == [2, 3]
    assert ro.search(vec(2), 1, metric="l2")[0].id == 2
    for write in (
        lambda: ro.upsert(Record(9, vec(9))),
        lambda: ro.upsert_many([9], [vec(9)]),
        lambda: ro.upsert_many([], np.zeros((0, 4))),
        lambda: ro.delete(2),
        lambda: ro.delete(99),
        ro.compact,
    ):
        with pytest.raises(InvalidConfig):
            write()
    ro.flush()  # nothing to make durable
    assert ro.check()["ok"]
    ro.close()
    assert snapshot_of_files(tmp_path) == before  # bytes and mtimes
    writer.upsert(Record(4, vec(4)))  # the writer is unaffected
    writer.close()


def test_readonly_does_not_cut_a_torn_tail(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, vec(1)))
    drop(db)
    with open(tmp_path / "wal", "ab") as f:
        f.write(b"\x01" * 30)
    before = snapshot_of_files(tmp_path)
    with iqdb.open(tmp_path, readonly=True) as ro:
        assert db_state(ro, IDS).keys() == {1}
        assert ro._backend.recovery["truncated_bytes"] == 30
    assert snapshot_of_files(tmp_path) == before


def test_readonly_views_of_a_writing_process_are_prefixes(tmp_path: Path) -> None:
    """Read-only opens while another process writes (and flushes): each view is a prefix of the
    writer's records, and the files end up as the writer left them.

    Paced by progress, not by counts: the writer goes on until the reader has seen five
    different sizes (a slow disk makes each flush slow, so a fixed number of writes or of reads
    need not overlap), and then stops at a record of its choosing."""
    path, stop = tmp_path / "db", tmp_path / "stop"
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os, sys, numpy as np, iqdb
                db = iqdb.open(sys.argv[1])
                print("ready", flush=True)
                i = 0
                while not os.path.exists(sys.argv[2]) and i < 100_000:
                    db.upsert(iqdb.Record(i, np.full(4, i, np.float32), {"i": i}))
                    if i % 2 == 0:
                        db.flush()
                    i += 1
                db.close()
                print(i, flush=True)
                """
            ),
            str(path),
            str(stop),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as writer:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        sizes: list[int] = []
        deadline = time.monotonic() + 120
        try:
            while len(set(sizes)) < 5 and writer.poll() is None and time.monotonic() < deadline:
                with iqdb.open(path, readonly=True) as ro:
                    n = len(ro)
                    assert all(ro.get(i) == Record(i, np.full(4, i, np.float32), {"i": i}) for i in range(n))
                    assert ro.get(n) is None
                sizes.append(n)
        finally:
            stop.touch()
        written = int(writer.stdout.readline())
        assert writer.wait() == 0
    assert sizes == sorted(sizes)
    assert len(set(sizes)) >= 5, f"the reads did not overlap the writes: {sizes}"
    assert sizes[-1] <= written
    with iqdb.open(path) as db:
        assert len(db) == written
        assert db.get(written - 1) == Record(
            written - 1, np.full(4, written - 1, np.float32), {"i": written - 1}
        )


def test_readonly_open_racing_a_compaction_sees_a_committed_state(tmp_path: Path) -> None:
    """The reader maps the snapshot; before it reads the WAL, the writer compacts and starts the
    next generation's WAL. The reader must not report corruption: it shows a committed state."""
    writer = iqdb.open(tmp_path)
    writer.upsert(Record(1, vec(1)))
    writer.compact()
    writer.upsert(Record(2, vec(2)))

    class Race(CountingFs):
        raced = False

        def map(self, path: str) -> Any:
            buf = super().map(path)  # the reader has the old snapshot
            if not self.raced:
                self.raced = True
                writer.compact()  # the writer commits a new one and empties the WAL
                writer.upsert(Record(3, vec(3)))  # and starts the next generation's WAL
            return buf

    try:
        with iqdb.open(tmp_path, readonly=True, fs=Race()) as ro:
            assert sorted(r for r in IDS if r in ro) in ([1, 2], [1, 2, 3])
            # The files changed between its reads, so the reader read them again: it sees the
            # newest committed state, record 3 included, exactly as written.
            assert sorted(int(i) for i in ro._store.ids) == [1, 2, 3]
            assert ro.get(3) == Record(3, vec(3))
    finally:
        writer.close()


def test_counting_fs_wraps_every_seam_method() -> None:
    """Every file-system call of the engine goes through the seam; the fault layer must see them
    all, or a new seam method would escape crash and fault injection."""
    from iqdb._fs import FileSystem

    public = {
        name for name in vars(FileSystem) if not name.startswith("_") and callable(getattr(FileSystem, name))
    }
    assert public <= set(vars(CountingFs)), public - set(vars(CountingFs))


# -- a rejected call writes nothing -----------------------------------------------------------
REJECTED = {
    "nan row in a batch": lambda db: db.upsert_many([5, 6], [[1.0] * 4, [math.nan] * 4]),
    "inf row in a batch": lambda db: db.upsert_many([5], [[1.0, 2.0, math.inf, 0.0]]),
    "wrong dim (upsert)": lambda db: db.upsert(Record(5, [1.0, 2.0])),
    "wrong dim (batch)": lambda db: db.upsert_many([5, 6], np.ones((2, 5))),
    "ragged batch": lambda db: db.upsert_many([5, 6], [[1.0] * 4, [1.0] * 3]),
    "bad payload (object)": lambda db: db.upsert_many([5, 6], np.ones((2, 4)), [{}, {"x": object()}]),
    "bad payload (surrogate)": lambda db: db.upsert_many([5], np.ones((1, 4)), [{"\ud800": 1}]),
    "bad payload (int too big)": lambda db: db.upsert_many([5], np.ones((1, 4)), [{"n": 2**64}]),
    "negative id": lambda db: db.upsert_many([5, -1], np.ones((2, 4))),
    "id too big": lambda db: db.upsert_many([5, 2**64], np.ones((2, 4))),
    "bool id": lambda db: db.upsert_many([5, True], np.ones((2, 4))),
    "float id": lambda db: db.upsert_many([5, 1.5], np.ones((2, 4))),
    "more ids than rows": lambda db: db.upsert_many([5, 6, 7], np.ones((2, 4))),
    "more payloads than rows": lambda db: db.upsert_many([5], np.ones((1, 4)), [None, None]),
    "not a record": lambda db: db.upsert((5, [1.0] * 4)),
    "bad id to delete": lambda db: db.delete(-3),
}


@pytest.mark.parametrize("call", REJECTED.values(), ids=REJECTED.keys())
def test_a_rejected_call_writes_no_wal_byte(tmp_path: Path, call: Any) -> None:
    db = iqdb.open(tmp_path)
    db.upsert_many([1, 2], np.stack([vec(1), vec(2)]), [{"a": 1}, None])
    before, state = files(tmp_path), db_state(db, IDS)
    with pytest.raises(iqdb.IqdbError):
        call(db)
    assert files(tmp_path) == before
    assert db_state(db, IDS) == state
    db.upsert(Record(3, vec(3)))  # and the handle goes on
    drop(db)
    with iqdb.open(tmp_path) as db:
        assert sorted(r for r in IDS if r in db) == [1, 2, 3]


def test_upsert_many_is_one_frame_all_or_nothing(tmp_path: Path) -> None:
    """Cut the WAL at every byte of a batch's frame: after reopening the batch is wholly there (its
    frame is complete) or wholly absent, never in part."""
    src = tmp_path / "src"
    db = iqdb.open(src)
    db.upsert(Record(1, vec(1)))
    db.flush()
    db.upsert_many(
        [2, 3, 4, 1], np.stack([vec(20), vec(30), vec(40), vec(10)]), [{"b": 2}, None, {}, {"r": 1}]
    )
    drop(db)
    wal = (src / "wal").read_bytes()
    frames = scan(memoryview(wal), decode_header(wal)).frames
    batch = frames[-1]
    assert batch.op is not None and len(batch.op.ids) == 4 and batch.end == len(wal)
    body_end = batch.offset + FRAME_HEADER_SIZE + struct.unpack_from("<Q", wal, batch.offset + 16)[0]
    before = {1: (vec(1).tobytes(), None)}
    after = {
        1: (vec(10).tobytes(), canon({"r": 1})),
        2: (vec(20).tobytes(), canon({"b": 2})),
        3: (vec(30).tobytes(), None),
        4: (vec(40).tobytes(), canon({})),
    }
    seen = {"absent": 0, "present": 0}
    for cut in range(batch.offset, len(wal) + 1):
        path = tmp_path / "cut"
        path.mkdir(exist_ok=True)
        (path / "wal").write_bytes(wal[:cut])
        db = iqdb.open(path, fs=CountingFs(real_sync=False))
        state = db_state(db, IDS)
        drop(db)
        assert state == (after if cut >= body_end else before), f"cut at {cut}"
        seen["present" if state == after else "absent"] += 1
    assert seen["absent"] == body_end - batch.offset and seen["present"] == len(wal) + 1 - body_end


# -- compaction -------------------------------------------------------------------------------
def test_compact_empties_the_wal_and_keeps_the_handle(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    db.upsert_many(list(range(10)), np.stack([vec(i) for i in range(10)]))
    db.delete(4)
    old_snap = (tmp_path / "snap").read_bytes() if (tmp_path / "snap").exists() else b""
    db.compact()
    assert (tmp_path / "wal").stat().st_size == 0
    assert (tmp_path / "snap").read_bytes() != old_snap
    db.upsert(Record(4, vec(44)))  # later writes go to the new WAL
    assert (tmp_path / "wal").stat().st_size > 0
    drop(db)
    with iqdb.open(tmp_path) as db:
        assert db._backend.recovery["snapshot_rows"] == 9
        assert db._backend.recovery["replayed"] == 1
        assert db.get(4) == Record(4, vec(44))
        assert len(db) == 10


def test_automatic_compaction_when_the_wal_passes_its_limit(tmp_path: Path) -> None:
    limit = 4096
    fs = CountingFs(real_sync=False)
    db = iqdb.open(tmp_path, wal_limit=limit, fs=fs)
    largest = 0
    for i in range(300):
        db.upsert(Record(i, vec(i, 8), {"i": i}))
        largest = max(largest, (tmp_path / "wal").stat().st_size)
    compactions = fs.count("replace")
    assert compactions >= 5
    assert largest <= limit + 128  # at most one frame past the limit
    drop(db)
    with iqdb.open(tmp_path) as db:
        assert db._backend.recovery["generation"] == compactions
        assert db._backend.recovery["snapshot_rows"] > 250
        assert len(db) == 300
        assert db.get(299) == Record(299, vec(299, 8), {"i": 299})


def test_crash_between_the_snapshot_commit_and_the_wal_reset(tmp_path: Path) -> None:
    """The renamed snapshot is durable, the WAL still holds the frames it covers: open discards
    them instead of applying them twice."""
    count = CountingFs(real_sync=False)
    db = iqdb.open(tmp_path / "count", fs=count)
    db.upsert(Record(1, vec(1)))
    db.close()
    reset = next(c.index for c in count.calls if c.op == "ftruncate" and c.path and c.path.endswith("wal"))
    assert count.calls[reset - 1].op == "fsync_dir"
    fs = CrashFs(reset)
    db = iqdb.open(tmp_path / "db", fs=fs)
    db.upsert(Record(1, vec(1)))
    with pytest.raises(SimulatedCrash):
        db.close()
    fs.kill()
    assert (tmp_path / "db" / "wal").stat().st_size > 0
    with iqdb.open(tmp_path / "db") as db:
        assert db._backend.recovery["stale_wal_discarded"] is True
        assert db._backend.recovery["replayed"] == 0
        assert db_state(db, IDS) == {1: (vec(1).tobytes(), None)}
        db.upsert(Record(2, vec(2)))
    with iqdb.open(tmp_path / "db") as db:
        assert len(db) == 2


# -- flush, sync and the file-system protocol -------------------------------------------------
def test_flush_fsyncs_the_wal_only_when_there_is_something_to_sync(tmp_path: Path) -> None:
    fs = CountingFs(real_sync=False)
    db = iqdb.open(tmp_path, fs=fs)
    db.upsert(Record(1, vec(1)))
    n = len(fs.calls)
    db.flush()
    assert [c.op for c in fs.calls[n:]].count("fsync") == 1
    assert all(c.path.endswith("wal") for c in fs.calls[n:] if c.op == "fsync")  # type: ignore[union-attr]
    n = len(fs.calls)
    db.flush()
    assert "fsync" not in [c.op for c in fs.calls[n:]]
    db.close()


def test_compaction_order_of_operations(tmp_path: Path) -> None:
    """snap.tmp written and fsynced, renamed over snap, the directory fsynced (the commit point),
    then the WAL truncated and fsynced."""
    fs = CountingFs(real_sync=False)
    db = iqdb.open(tmp_path, fs=fs)
    db.upsert(Record(1, vec(1)))
    n = len(fs.calls)
    db.compact()
    trace = [(c.op, os.path.basename(c.path or "")) for c in fs.calls[n:] if c.op not in ("exists",)]
    steps = [
        ("open", "snap.tmp"),
        ("fsync", "snap.tmp"),
        ("replace", "snap.tmp"),
        ("fsync_dir", os.path.basename(str(tmp_path))),
        ("ftruncate", "wal"),
        ("fsync", "wal"),
    ]
    positions = [trace.index(s) for s in steps]
    assert positions == sorted(positions), trace
    writes = [i for i, t in enumerate(trace) if t == ("write", "snap.tmp")]
    assert writes and positions[0] < min(writes) and max(writes) < positions[1]
    db.close()


def test_sync_always_fsyncs_every_write(tmp_path: Path) -> None:
    fs = CountingFs(real_sync=False)
    db = iqdb.open(tmp_path, sync="always", fs=fs)
    db.upsert(Record(0, vec(0)))  # the first write also syncs the new WAL header
    n = fs.count("fsync")
    db.upsert(Record(1, vec(1)))
    db.upsert_many([2, 3], np.stack([vec(2), vec(3)]))
    db.delete(2)
    assert fs.count("fsync") == n + 3
    db.close()


@pytest.mark.parametrize("sync", ["flush", "always"])
def test_power_loss_keeps_what_was_synced(tmp_path: Path, sync: str) -> None:
    """Power loss (only fsynced data survives) after an unflushed write: sync="always" keeps it,
    sync="flush" keeps what the last flush covered."""
    with iqdb.open(tmp_path) as db:
        db.upsert(Record(1, vec(1)))
    fs = PowerLossFs(tmp_path)
    db = iqdb.open(tmp_path, sync=sync, fs=fs)
    db.upsert(Record(2, vec(2)))
    db.flush()
    db.upsert(Record(3, vec(3)))
    fs.crash("strict")
    with iqdb.open(tmp_path) as db:
        assert sorted(r for r in IDS if r in db) == ([1, 2, 3] if sync == "always" else [1, 2])


def test_new_database_flush_survives_power_loss(tmp_path: Path) -> None:
    """The files a new database creates are made durable in their directory before a flush()
    relies on them (the directory is fsynced after creating the WAL)."""
    path = tmp_path / "new"
    fs = PowerLossFs(path)  # the directory does not exist yet
    db = iqdb.open(path, fs=fs)
    db.upsert(Record(1, vec(1)))
    db.flush()
    fs.crash("strict")
    with iqdb.open(path) as db:
        assert 1 in db


# -- failures ---------------------------------------------------------------------------------
def test_failed_fsync_poisons_the_handle(tmp_path: Path) -> None:
    fs = ErrorFs(None, errno.EIO, "fsync")
    db = iqdb.open(tmp_path, fs=fs)
    db.upsert_many([1, 2], np.stack([vec(1), vec(2)]))
    fs.fail_at = fs.matched  # the next fsync: flush's
    with pytest.raises(StorageError) as info:
        db.flush()
    assert not isinstance(info.value, Poisoned)
    assert info.value.errno == errno.EIO
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EIO
    for write in (lambda: db.upsert(Record(3, vec(3))), db.flush, db.compact, lambda: db.delete(1)):
        with pytest.raises(Poisoned):
            write()
    assert db.get(1) == Record(1, vec(1)) and len(db) == 2  # reads still work
    assert db.search(vec(2), 1, metric="l2")[0].id == 2
    assert db.check()["poisoned"]
    wal = (tmp_path / "wal").read_bytes()
    db.close()  # no compaction on a poisoned handle
    assert (tmp_path / "wal").read_bytes() == wal
    with iqdb.open(tmp_path) as db:  # reopening recovers from what is on disk
        assert len(db) == 2
        db.upsert(Record(3, vec(3)))
        db.flush()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("short", [False, True])
def test_failed_write_is_rolled_back(tmp_path: Path, err: int, short: bool) -> None:
    fs = ErrorFs(None, err, "write", short=short)
    db = iqdb.open(tmp_path, fs=fs)
    db.upsert(Record(1, vec(1)))
    size = (tmp_path / "wal").stat().st_size
    fs.fail_at = fs.matched
    with pytest.raises(StorageError) as info:
        db.upsert_many([2, 3], np.stack([vec(2), vec(3)]), [{"big": "x" * 100}, None])
    assert info.value.errno == err and not isinstance(info.value, Poisoned)
    assert (tmp_path / "wal").stat().st_size == size  # the partial frame is gone
    assert 2 not in db and len(db) == 1
    db.upsert(Record(4, vec(4)))  # the handle still works
    db.flush()
    drop(db)
    with iqdb.open(tmp_path) as db:
        assert sorted(r for r in IDS if r in db) == [1, 4]


def test_failed_open_leaks_no_lock(tmp_path: Path) -> None:
    with iqdb.open(tmp_path) as db:
        db.upsert(Record(1, vec(1)))
    for op in ("open", "fsync", "map", "write", "ftruncate"):
        fs = ErrorFs(0, errno.EIO, op)
        with pytest.raises(StorageError):
            iqdb.open(tmp_path, fs=fs)
        assert fs.injected == 1
    with iqdb.open(tmp_path) as db:
        assert len(db) == 1


def test_failed_compaction_keeps_the_data(tmp_path: Path) -> None:
    """ENOSPC while writing the snapshot: compact raises, snap.tmp is gone, nothing is lost and the
    handle still works."""
    fs = ErrorFs(None, errno.ENOSPC, "write", persistent=True)
    db = iqdb.open(tmp_path, fs=fs)
    db.upsert_many([1, 2], np.stack([vec(1), vec(2)]))
    fs.fail_at = fs.matched + 1  # part of the snapshot gets written
    with pytest.raises(StorageError) as info:
        db.compact()
    assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / "snap.tmp").exists()
    fs.fail_at = None
    fs.persistent = False
    db.upsert(Record(3, vec(3)))
    db.close()
    with iqdb.open(tmp_path) as db:
        assert len(db) == 3


# -- check() ----------------------------------------------------------------------------------
def test_check_reports_ok_and_changes_nothing(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    db.upsert_many([1, 2], np.stack([vec(1), vec(2)]))
    db.compact()
    db.upsert(Record(3, vec(3)))
    db.flush()
    before = snapshot_of_files(tmp_path)
    report = db.check()
    assert report["ok"] is True and report["problems"] == []
    assert report["snapshot"]["rows"] == 2
    assert report["wal"]["frames"] == 1 and report["wal"]["torn_tail_bytes"] == 0
    assert snapshot_of_files(tmp_path) == before
    db.close()


def test_check_reports_a_torn_tail(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    db.upsert(Record(1, vec(1)))
    db.flush()
    with open(tmp_path / "wal", "ab") as f:
        f.write(b"\x02" * 21)
    report = db.check()
    assert report["ok"] is False
    assert report["wal"]["torn_tail_bytes"] == 21
    assert any("torn tail" in p for p in report["problems"])
    drop(db)


def test_check_reports_corruption(tmp_path: Path) -> None:
    db = iqdb.open(tmp_path)
    db.upsert_many([1, 2], np.stack([vec(1), vec(2)]))
    db.compact()
    db.upsert(Record(3, vec(3)))
    db.flush()  # frame 3 is below the durable watermark now
    snap = bytearray((tmp_path / "snap").read_bytes())
    wal = bytearray((tmp_path / "wal").read_bytes())
    frame = scan(memoryview(bytes(wal)), decode_header(bytes(wal))).frames[0]
    wal[frame.offset + FRAME_HEADER_SIZE + 12] ^= 0x10  # inside the vector
    (tmp_path / "wal").write_bytes(bytes(wal))
    report = db.check()
    assert report["ok"] is False
    assert any(p.startswith("wal:") for p in report["problems"])
    snap[snap.find(vec(2).tobytes()) + 5] ^= 0x01  # inside the vector column
    (tmp_path / "snap").write_bytes(bytes(snap))
    report = db.check()
    assert any(p.startswith("snapshot:") for p in report["problems"])
    drop(db)
    with pytest.raises(Corrupt):
        iqdb.open(tmp_path)


def test_closing_after_reads_only_does_not_rewrite_the_snapshot(tmp_path: Path) -> None:
    """A handle that wrote nothing since the last compaction (its WAL is empty) closes without
    rewriting the snapshot: open, search, close costs no snapshot write. A write since then
    compacts as before."""
    path = tmp_path / "db"
    X = np.random.default_rng(2).standard_normal((300, 4)).astype(np.float32)
    with iqdb.open(path) as db:
        db.upsert_many(np.arange(300), X)
    snap = path / "snap"
    first = (snap.stat().st_ino, snap.stat().st_mtime_ns)
    with iqdb.open(path, readonly=True) as ro:
        gen = ro.check()["snapshot"]["generation"]
    with iqdb.open(path) as db:
        assert db.search(X[3], 1, "l2")[0].id == 3
        db.compact()  # an explicit compaction still writes one
        second = (snap.stat().st_ino, snap.stat().st_mtime_ns)
        assert second != first
    assert (snap.stat().st_ino, snap.stat().st_mtime_ns) == second  # the close wrote nothing
    with iqdb.open(path) as db:
        db.delete(7)
    with iqdb.open(path, readonly=True) as db:
        assert db.check()["snapshot"]["generation"] == gen + 2 and len(db) == 299
        assert os.path.getsize(path / "wal") == 0
