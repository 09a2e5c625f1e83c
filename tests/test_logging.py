"""Logging: device choice, recovery on open and compaction are told on the ``iqdb`` logger, and
the library never prints."""

from __future__ import annotations

import ast
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import iqdb
from iqdb import _device

PACKAGE = Path(iqdb.__file__).resolve().parent  # the source tree, or the installed package


def iqdb_messages(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if (r.name == "iqdb" or r.name.startswith("iqdb.")) and r.levelno >= level
    ]


def make_db(path: Path, n: int = 10) -> None:
    with iqdb.open(path, device="cpu") as db:
        db.upsert_many(range(n), np.random.default_rng(0).random((n, 4)), [{"i": i} for i in range(n)])


def snapshot_of_open(db: iqdb.Iqdb, src: Path, dst: Path) -> None:
    """What a process that died now would leave: the files as they are (the handle stays open)."""
    db.flush()
    shutil.copytree(src, dst)


# -- device choice ----------------------------------------------------------------------------
def test_an_explicit_device_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="iqdb")
    with iqdb.open_in_memory(device="cpu"):
        pass
    assert any("device='cpu': cpu" in m for m in iqdb_messages(caplog))


def test_the_automatic_choice_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IQDB_DEVICE", raising=False)
    caplog.set_level(logging.INFO, logger="iqdb")
    _device._reset_probe()
    try:
        with iqdb.open_in_memory(device="auto") as db:
            chosen = db.device
        with iqdb.open_in_memory(device="auto"):
            pass
    finally:
        _device._reset_probe()
    told = [m for m in iqdb_messages(caplog, logging.INFO) if "device='auto' chose" in m]
    assert len(told) == 1
    assert ("the CPU" in told[0]) == (chosen == "cpu")


# -- recovery on open -------------------------------------------------------------------------
def test_a_wal_replay_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with iqdb.open(tmp_path / "db", device="cpu") as db:
        db.upsert_many([1, 2, 3], np.eye(3))
        db.delete(2)
        snapshot_of_open(db, tmp_path / "db", tmp_path / "crashed")
    caplog.set_level(logging.INFO, logger="iqdb")
    with iqdb.open(tmp_path / "crashed", device="cpu") as db:
        assert len(db) == 2
    assert any("replayed 2 WAL frame(s)" in m for m in iqdb_messages(caplog, logging.INFO))
    caplog.clear()
    with iqdb.open(tmp_path / "crashed", device="cpu"):  # compacted by the close: nothing to replay
        pass
    assert not any("replayed" in m for m in iqdb_messages(caplog))


def test_a_torn_tail_cut_is_logged_as_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with iqdb.open(tmp_path / "db", device="cpu") as db:
        db.upsert_many([1, 2], np.eye(2))
        snapshot_of_open(db, tmp_path / "db", tmp_path / "crashed")
    with open(tmp_path / "crashed" / "wal", "ab") as wal:
        wal.write(b"\x01half a frame")
    caplog.set_level(logging.INFO, logger="iqdb")
    with iqdb.open(tmp_path / "crashed", device="cpu") as db:
        assert len(db) == 2
    warnings = iqdb_messages(caplog, logging.WARNING)
    assert any("dropping a torn tail of 13 bytes" in m for m in warnings), warnings


def test_removing_an_unfinished_snapshot_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_db(tmp_path / "db")
    (tmp_path / "db" / "snap.tmp").write_bytes(b"a compaction died here")
    caplog.set_level(logging.INFO, logger="iqdb")
    with iqdb.open(tmp_path / "db", device="cpu") as db:
        assert len(db) == 10
    assert not (tmp_path / "db" / "snap.tmp").exists()
    assert any("removed snap.tmp" in m for m in iqdb_messages(caplog, logging.INFO))


def test_discarding_a_wal_the_snapshot_covers_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A crash after a compaction's commit point, before it emptied the WAL: a new snapshot next
    # to the old generation's log.
    with iqdb.open(tmp_path / "db", device="cpu") as db:
        db.upsert_many([1, 2], np.eye(2))
        snapshot_of_open(db, tmp_path / "db", tmp_path / "before")
        db.compact()
        db.flush()
        shutil.copy(tmp_path / "db" / "snap", tmp_path / "before" / "snap")
    caplog.set_level(logging.INFO, logger="iqdb")
    with iqdb.open(tmp_path / "before", device="cpu") as db:
        assert len(db) == 2
    assert any("discarded a WAL of generation 0" in m for m in iqdb_messages(caplog, logging.INFO))


# -- compaction -------------------------------------------------------------------------------
def test_compactions_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iqdb")
    with iqdb.open(tmp_path / "db", device="cpu") as db:
        db.upsert_many([1, 2, 3], np.eye(3))
        db.compact()
        told = [m for m in iqdb_messages(caplog, logging.INFO) if "compacted" in m]
        assert len(told) == 1 and "generation 1 (3 records" in told[0]
    told = [m for m in iqdb_messages(caplog, logging.INFO) if "compacted" in m]
    assert len(told) == 1  # the close: nothing written since the snapshot, nothing to compact
    with iqdb.open(tmp_path / "db", device="cpu") as db:
        db.delete(2)
    told = [m for m in iqdb_messages(caplog, logging.INFO) if "compacted" in m]
    assert len(told) == 2 and "generation 2 (2 records" in told[1]  # this close compacted


def test_an_automatic_compaction_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iqdb")
    with iqdb.open(tmp_path / "db", device="cpu", wal_limit=4096) as db:
        for i in range(40):
            db.upsert(iqdb.Record(i, np.full(32, float(i))))
        told = [m for m in iqdb_messages(caplog, logging.INFO) if "compacted" in m]
        assert told, "the WAL passed wal_limit but no compaction was logged"


# -- no prints --------------------------------------------------------------------------------
def test_the_library_never_prints(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with iqdb.open(tmp_path / "db", device="auto") as db:
        db.upsert_many(range(100), np.random.default_rng(1).random((100, 8)))
        db.search(np.ones(8), 5)
        db.compact()
    with iqdb.open(tmp_path / "db", device="auto") as db:
        db.check()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_no_print_call_outside_the_command_line() -> None:
    # The command line prints by design; everything else logs.
    kernels = Path(iqdb.kernels.__file__).resolve().parent
    sources = sorted(PACKAGE.rglob("*.py")) + sorted(kernels.rglob("*.py"))
    assert PACKAGE / "_db.py" in sources
    offenders = []
    for path in sources:
        if path == PACKAGE / "_cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path}:{node.lineno}")
    assert offenders == []
