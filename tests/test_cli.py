"""The ``iqdb`` command line, run as a subprocess (``python -m iqdb``) as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("click", reason="the CLI needs the cli extra (click), in the test extra")
pytest.importorskip("tqdm", reason="the CLI needs the cli extra (tqdm), in the test extra")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import iqdb  # noqa: E402


def run(*args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "iqdb", *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def run_json(*args: str) -> Any:
    return json.loads(run(*args, "--json").stdout)


def fail(code: int, *args: str) -> str:
    """Run a command that must fail with ``code`` and one line on stderr; that line."""
    done = run(*args, ok=None)
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(("iqdb: ", "Error: ")), done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Parquet file of 300 records of dimension 4 with payloads of several types."""
    path = tmp_path_factory.mktemp("src") / "data.parquet"
    rng = np.random.default_rng(0)
    n = 300
    X = rng.standard_normal((n, 4)).astype(np.float32)
    table = pa.table(
        {
            "id": pa.array(np.arange(n) + 1000, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), 4),
            "title": [f"doc {i}" for i in range(n)],
            "year": [2000 + i % 25 for i in range(n)],
            "raw": [bytes([i % 256]) if i % 3 else None for i in range(n)],
        }
    )
    pq.write_table(table, path, row_group_size=64)
    return path


@pytest.fixture
def db_path(tmp_path: Path, source: Path) -> Path:
    path = tmp_path / "db"
    run("import", str(path), str(source), "--no-progress")
    return path


def test_help_everywhere_and_the_exit_codes() -> None:
    top = run("--help").stdout
    for command in ("demo", "info", "check", "import", "export", "search", "compact", "bench"):
        assert command in top
        text = run(command, "--help").stdout
        assert "Exit codes" in text and "--help" in text
    assert "4 corrupt database" in top and "5 locked" in top
    assert run("--version").stdout.startswith("iqdb ")


def test_bad_arguments_exit_2_without_traceback(db_path: Path) -> None:
    done = run(ok=None)  # no command: the usage
    assert done.returncode == 2 and "Usage" in done.stdout + done.stderr
    fail(2, "frobnicate")
    fail(2, "search", str(db_path), "-k", "-1", "--vector", "1,2,3,4")
    fail(2, "search", str(db_path), "--metric", "manhattan", "--vector", "1,2,3,4")
    assert "exactly one" in fail(2, "search", str(db_path))
    assert "numbers" in fail(2, "search", str(db_path), "--vector", "1,x")
    assert "DimensionMismatch" in fail(2, "search", str(db_path), "--vector", "1,2")
    assert "JSON" in fail(2, "search", str(db_path), "--vector", "1,2,3,4", "--filter", "{oops")
    assert "suffix" in fail(2, "export", str(db_path), str(db_path.parent / "out.txt"))
    assert "InvalidConfig" in fail(2, "demo", "--n", "10", "--device", "tpu")
    fail(2, "demo", "--n", "0")


def test_import_info_search_export_round_trip(tmp_path: Path, db_path: Path, source: Path) -> None:
    info = run_json("info", str(db_path))
    assert info["count"] == 300 and info["dim"] == 4 and info["device"] == "cpu"
    assert info["snap_bytes"] > 0 and info["wal_bytes"] == 0  # import closes, which compacts
    assert isinstance(info["generation"], int) and info["ok"] is True
    assert "count: 300" in run("info", str(db_path)).stdout

    with iqdb.open(db_path, readonly=True) as db:
        target = db.get(1007)
        assert target is not None and target.payload == {"title": "doc 7", "year": 2007, "raw": b"\x07"}
        q = target.vector.tolist()
        expected = db.search(q, 3, "l2")
    hits = run_json("search", str(db_path), "--vector", ",".join(map(repr, q)), "-k", "3", "--metric", "l2")
    assert [h["id"] for h in hits] == [int(r.id) for r in expected]
    assert hits[0]["id"] == 1007 and hits[0]["score"] == pytest.approx(0.0, abs=1e-6)
    assert hits[0]["payload"]["title"] == "doc 7"
    assert hits[0]["payload"]["raw"] == {"$bytes": "Bw=="}  # bytes, JSON-safe
    text = run("search", str(db_path), "--vector", ",".join(map(repr, q)), "-k", "2").stdout
    assert "id 1007" in text

    # Many queries from a file: .npy and text.
    np.save(tmp_path / "q.npy", np.array([q, q], dtype=np.float32))
    many = run_json("search", str(db_path), "--query-file", str(tmp_path / "q.npy"), "-k", "2")
    assert [h["query"] for h in many] == [0, 0, 1, 1] and many[2]["id"] == many[0]["id"]
    (tmp_path / "q.txt").write_text(",".join(map(repr, q)) + "\n\n" + " ".join(map(repr, q)) + "\n")
    assert (
        run_json("search", str(db_path), "--query-file", str(tmp_path / "q.txt"), "-k", "1")[1]["id"] == 1007
    )

    # Export to both formats, import into a new database: the same records.
    for name in ("out.parquet", "out.arrow"):
        report = run_json("export", str(db_path), str(tmp_path / name))
        assert report["rows"] == 300
        copy = tmp_path / f"copy-{name}"
        assert run_json("import", str(copy), str(tmp_path / name))["count"] == 300
        with iqdb.open(db_path, readonly=True) as a, iqdb.open(copy, readonly=True) as b:
            for rid in (1000, 1001, 1150, 1299):
                assert a.get(rid) == b.get(rid)
                assert b.get(rid).payload == a.get(rid).payload  # type: ignore[union-attr]


def test_search_with_a_filter(db_path: Path) -> None:
    if not hasattr(iqdb, "Filter"):
        message = fail(2, "search", str(db_path), "--vector", "1,2,3,4", "--filter", '{"year": 2001}')
        assert "filters" in message
        return
    hits = run_json(
        "search", str(db_path), "--vector", "1,2,3,4", "-k", "50", "--filter", '{"year": {"$gte": 2020}}'
    )
    assert hits and all(h["payload"]["year"] >= 2020 for h in hits)
    assert "InvalidArgument" in fail(
        2, "search", str(db_path), "--vector", "1,2,3,4", "--filter", '{"year": {"$bogus": 1}}'
    )
    fail(2, "search", str(db_path), "--vector", "1,2,3,4", "--filter", "[1, 2]")


def test_import_formats_and_options(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.eye(3, dtype=np.float32))
    report = run_json("import", str(tmp_path / "a"), str(tmp_path / "v.npy"))
    assert report["rows"] == 3 and report["count"] == 3 and report["dim"] == 3
    (tmp_path / "v.csv").write_text('key,emb,note,skip\n5,"[1, 0]",hello,x\n6,"0 1",,y\n')
    args = ("import", str(tmp_path / "b"), str(tmp_path / "v.csv"), "--id-column", "key")
    run(*args, "--vector-column", "emb", "--payload-column", "note")
    with iqdb.open(tmp_path / "b", readonly=True) as db:
        assert db.get(5).payload == {"note": "hello"}  # type: ignore[union-attr]
        assert db.get(6).payload is None  # type: ignore[union-attr]
    # A bad column names it; a bad row after good batches says what was kept.
    assert "'nope'" in fail(
        2,
        "import",
        str(tmp_path / "c"),
        str(tmp_path / "v.csv"),
        "--id-column",
        "key",
        "--vector-column",
        "nope",
    )
    assert not (tmp_path / "c").exists()  # the columns are checked before anything is created
    rows = pa.table({"id": pa.array([1, 2, -5, 4], pa.int64()), "vector": [[1.0], [2.0], [3.0], [4.0]]})
    with pa.OSFile(str(tmp_path / "bad.arrow"), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as w:
        w.write_batch(rows.to_batches()[0].slice(0, 2))
        w.write_batch(rows.to_batches()[0].slice(2))
    message = fail(2, "import", str(tmp_path / "d"), str(tmp_path / "bad.arrow"))
    assert "record id -5" in message and "first 2 rows were imported" in message
    with iqdb.open(tmp_path / "d", readonly=True) as db:
        assert len(db) == 2
    # Timestamps are refused, naming the column.
    ts = pa.table({"id": [1], "vector": [[1.0]], "at": pa.array([0], pa.timestamp("s"))})
    pq.write_table(ts, tmp_path / "ts.parquet")
    assert "'at'" in fail(2, "import", str(tmp_path / "e"), str(tmp_path / "ts.parquet"))


def test_missing_database_and_missing_files(tmp_path: Path, db_path: Path) -> None:
    nowhere = str(tmp_path / "nowhere")
    for command in (
        ("info", nowhere),
        ("check", nowhere),
        ("compact", nowhere),
        ("export", nowhere, "x.parquet"),
    ):
        assert "no iqdb database" in fail(3, *command)
    assert "no iqdb database" in fail(3, "search", nowhere, "--vector", "1")
    assert not (tmp_path / "nowhere").exists()  # reading commands never create one
    assert "no such file" in fail(3, "import", str(tmp_path / "new"), str(tmp_path / "absent.parquet"))
    assert "no such file" in fail(3, "search", str(db_path), "--query-file", str(tmp_path / "absent.npy"))


def test_check_and_a_corrupt_database(db_path: Path) -> None:
    assert run("check", str(db_path)).stdout.startswith("ok")
    assert run_json("check", str(db_path)) == {"ok": True, "path": str(db_path.resolve()), "problems": []}
    snap = db_path / "snap"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x40  # flip one bit in the middle of the snapshot
    snap.write_bytes(bytes(data))
    message = fail(4, "check", str(db_path))
    assert len(message.strip().splitlines()) == 1 and "corrupt" in message
    report = json.loads(run("check", str(db_path), "--json", ok=None).stdout)
    assert report["ok"] is False and report["problems"]
    assert fail(4, "info", str(db_path)).startswith("iqdb: Corrupt:")
    fail(4, "search", str(db_path), "--vector", "1,2,3,4")
    fail(4, "compact", str(db_path))


def test_check_reports_a_damaged_wal(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = iqdb.open(path)
    db.upsert_many([1, 2], np.eye(2), [{"a": 1}, None])
    db.flush()
    db.upsert_many([3], [[1.0, 1.0]])
    db.flush()
    # Damage the first frame, below a later durable watermark.
    wal = path / "wal"
    data = bytearray(wal.read_bytes())
    data[40] ^= 0xFF
    wal.write_bytes(bytes(data))
    try:
        done = run("check", str(path), ok=None)
        assert done.returncode in (1, 4), done
        assert len(done.stderr.strip().splitlines()) == 1
    finally:
        db._backend.abandon()  # type: ignore[attr-defined]
        db._closed = True  # the damaged log must not be compacted away by close()


def test_a_locked_database(db_path: Path) -> None:
    with iqdb.open(db_path) as writer:  # this process holds the write lock
        assert len(writer) == 300
        message = fail(5, "compact", str(db_path))
        assert "Locked" in message and "already open for writing" in message
        # Reading commands open without the lock and work meanwhile.
        assert run_json("info", str(db_path))["count"] == 300
        assert run("check", str(db_path)).returncode == 0


def test_import_into_a_locked_database(db_path: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.ones((2, 4), dtype=np.float32))
    with iqdb.open(db_path):
        assert "Locked" in fail(5, "import", str(db_path), str(tmp_path / "v.npy"))


def test_compact(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = iqdb.open(path)
    db.upsert_many(range(100), np.random.default_rng(0).standard_normal((100, 8)))
    db._backend.abandon()  # type: ignore[attr-defined]  (exit without compacting: the WAL holds it)
    db._closed = True
    report = run_json("compact", str(path))
    assert report["count"] == 100 and report["before"]["wal_bytes"] > 0 and report["after"]["wal_bytes"] == 0
    assert run_json("info", str(path))["wal_bytes"] == 0


def test_demo_and_bench() -> None:
    out = run("demo", "--n", "3000", "--queries", "20", "--single", "3", "--dim", "16").stdout
    assert "brute force: ok" in out and "device: cpu" in out
    report = run_json("bench", "--n", "3000", "--queries", "20", "--dim", "16", "--device", "cpu")
    assert report["device"] == "cpu" and report["n"] == 3000
    assert {r["case"] for r in report["rows"]} == {"batch of 20", "single query"}
    assert all(r["iqdb_qps"] > 0 and r["numpy_qps"] > 0 for r in report["rows"])
    table = run("bench", "--n", "2000", "--queries", "10", "--dim", "8").stdout
    assert "iqdb/numpy" in table
