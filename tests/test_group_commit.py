"""sync="always": every acknowledged write survives a power loss, and concurrent writers share
fsyncs (group commit) instead of paying one each."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from faultfs import PowerLossFs

import iqdb

THREADS, PER_THREAD = 8, 40


class SlowDiskFs(PowerLossFs):
    """A disk whose fsync takes 5 ms: long enough for other writers to queue behind it."""

    def fsync(self, fd: int) -> None:
        time.sleep(0.005)
        super().fsync(fd)


def _write_concurrently(db: iqdb.Iqdb) -> list[int]:
    done: list[int] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        for i in range(PER_THREAD):
            rid = t * 1000 + i
            db.upsert(iqdb.Record(rid, np.full(3, rid, np.float32)))
            with lock:
                done.append(rid)  # acknowledged: upsert returned

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return done


def test_sync_always_survives_power_loss_and_groups_fsyncs(tmp_path: Path) -> None:
    path = tmp_path / "db"
    path.mkdir()
    fs = SlowDiskFs(path)
    db = iqdb.open(path, sync="always", fs=fs)
    acknowledged = _write_concurrently(db)
    wal_fsyncs = sum(1 for c in fs.calls if c.op == "fsync" and c.path and c.path.endswith("wal"))
    fs.crash("strict")  # no flush, no close: only what each write's own fsync made durable
    db._closed = True
    with iqdb.open(path) as again:
        assert sorted(int(i) for i in again._store.ids) == sorted(acknowledged)
        for rid in acknowledged[:: max(1, len(acknowledged) // 20)]:
            assert again.get(rid) == iqdb.Record(rid, np.full(3, rid, np.float32))
    writes = THREADS * PER_THREAD
    # While one writer's fsync runs, the others append; the next fsync covers all of them, so
    # far fewer fsyncs than writes (one per write without group commit).
    assert 1 <= wal_fsyncs <= writes // 2, f"{wal_fsyncs} fsyncs for {writes} writes"


def test_sync_flush_does_not_fsync_per_write(tmp_path: Path) -> None:
    path = tmp_path / "db"
    path.mkdir()
    fs = PowerLossFs(path)
    db = iqdb.open(path, fs=fs)
    for i in range(50):
        db.upsert(iqdb.Record(i, [1.0, float(i)]))
    wal_fsyncs = sum(1 for c in fs.calls if c.op == "fsync" and c.path and c.path.endswith("wal"))
    assert wal_fsyncs <= 2  # at open and for the new WAL's header, none per write
    db.flush()
    fs.crash("strict")
    db._closed = True
    with iqdb.open(path) as again:
        assert len(again) == 50
