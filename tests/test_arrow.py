"""Arrow in and out: ``upsert_arrow``, ``to_arrow``, ``results_to_arrow`` and the file readers."""

from __future__ import annotations

import decimal
import math
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import iqdb  # noqa: E402
from iqdb import _arrow  # noqa: E402


def same(a: Any, b: Any) -> bool:
    """Payload equality that also compares types: True is not 1, 1 is not 1.0, NaN is NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    return bool(a == b)


def payload_of(db: iqdb.Iqdb, rid: int) -> Any:
    rec = db.get(rid)
    assert rec is not None, rid
    return None if rec.payload is None else rec.payload.to_dict()


def assert_same_records(a: iqdb.Iqdb, b: iqdb.Iqdb) -> None:
    ta, tb = a.to_arrow(), b.to_arrow()
    ids_a = sorted(ta.column("id").to_pylist())
    assert ids_a == sorted(tb.column("id").to_pylist())
    for rid in ids_a:
        ra, rb = a.get(rid), b.get(rid)
        assert ra is not None and rb is not None
        assert np.array_equal(ra.vector.to_numpy(), rb.vector.to_numpy()), rid
        assert same(payload_of(a, rid), payload_of(b, rid)), (rid, payload_of(a, rid), payload_of(b, rid))


# Every PayloadValue type, and the cases an Arrow column could blur: None vs {} vs a missing key,
# None stored as a value, bool vs int, int vs float, NaN/inf/-0.0, int64 extremes, bytes, nested
# values, struct-like dicts with different keys, and keys that collide with the table's columns.
PAYLOADS: list[Any] = [
    None,
    {},
    {"n": 1, "f": 1.5, "b": True, "s": "text", "raw": b"\x00\xff", "mixed": 1, "maybe": None},
    {"n": -(2**63), "f": float("nan"), "b": False, "s": "", "raw": b"", "mixed": "1", "nest": {"a": [1, 2]}},
    {
        "n": 2**63 - 1,
        "f": float("inf"),
        "mixed": 1.0,
        "list": [1, [2, None], {"k": b"v"}],
        "nest": {"b": None},
    },
    {"f": float("-inf"), "mixed": True, "list": [], "ints": [1, 2, 3], "deep": {"x": {"y": [{"z": 1}]}}},
    {"f": -0.0, "mixed": [True, 1], "ints": [4], "deep": {"x": {"y": []}}, "unicode": "snö ☃ 𝄞"},
    {"id": 7, "vector": [0.5], "iqdb:empty_payload": "reserved", "payload.id": "taken"},
    {"maybe": 3, "emptydict": {}, "emptylist": [[]], "tuple_like": [1, "a", None, 2.5, b"x", False]},
]


def build(db: iqdb.Iqdb, payloads: list[Any] = PAYLOADS, d: int = 3, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    db.upsert_many(np.arange(len(payloads)) * 10, rng.standard_normal((len(payloads), d)), payloads)


@pytest.fixture
def mem() -> Iterator[iqdb.Iqdb]:
    with iqdb.open_in_memory(device="cpu") as db:
        yield db


def test_round_trip_every_payload_type(make_db: Any) -> None:
    src, dst = make_db(), make_db()
    build(src)
    table = src.to_arrow()
    assert dst.upsert_arrow(table) == len(PAYLOADS)
    assert_same_records(src, dst)
    assert len(dst) == len(src)


@pytest.mark.parametrize("fmt", ["parquet", "ipc"])
def test_round_trip_through_files(mem: iqdb.Iqdb, tmp_path: Path, fmt: str) -> None:
    build(mem)
    table = mem.to_arrow()
    path = tmp_path / f"out.{'parquet' if fmt == 'parquet' else 'arrow'}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    reader, total = _arrow.open_file(path)
    assert total == len(PAYLOADS)
    with iqdb.open_in_memory(device="cpu") as other:
        other.upsert_arrow(reader)
        assert_same_records(mem, other)


def test_to_arrow_schema(mem: iqdb.Iqdb) -> None:
    build(mem)
    t = mem.to_arrow()
    assert t.schema.field("id").type == pa.uint64()
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 3)
    assert t.column_names[:2] == ["id", "vector"]
    # Homogeneous keys get plain Arrow types; the blurry ones fall back to iqdb's encoding.
    assert pa.types.is_integer(t.schema.field("n").type)
    assert pa.types.is_floating(t.schema.field("f").type)
    assert pa.types.is_boolean(t.schema.field("b").type)
    assert pa.types.is_large_string(t.schema.field("s").type)
    assert pa.types.is_large_binary(t.schema.field("raw").type)
    assert t.schema.field("raw").metadata is None
    assert t.schema.field("ints").type == pa.list_(pa.int64())
    for encoded in ("mixed", "maybe", "nest", "list"):
        assert t.schema.field(encoded).metadata == {b"iqdb.encoding": b"payload"}, encoded
    # A key that collides with a column keeps its name in the field metadata.
    colliding = {
        f.metadata[b"iqdb.key"]: f.name for f in t.schema if f.metadata and b"iqdb.key" in f.metadata
    }
    assert set(colliding) == {b"id", b"vector", b"iqdb:empty_payload"}
    assert colliding[b"id"] == "payload.payload.id"  # "payload.id" is a key of its own
    assert t.column("payload.id").to_pylist()[7] == "taken"
    assert len(set(t.column_names)) == len(t.column_names)
    # Empty payloads are told from None by the reserved column, only.
    assert t.column("iqdb:empty_payload").to_pylist() == [p == {} for p in PAYLOADS]
    # Absent keys are nulls.
    assert t.column("n").to_pylist() == [None, None, 1, -(2**63), 2**63 - 1, None, None, None, None]


def test_to_arrow_vectors_and_ids(mem: iqdb.Iqdb) -> None:
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    mem.upsert_many([5, 1, 2**64 - 2, 0], X)
    t = mem.to_arrow()
    assert t.column("id").to_pylist() == [5, 1, 2**64 - 2, 0]
    got = np.asarray(t.column("vector").combine_chunks().flatten()).reshape(-1, 3)
    assert np.array_equal(got, X)
    assert t.column_names == ["id", "vector"]


def test_to_arrow_is_a_snapshot(mem: iqdb.Iqdb) -> None:
    """The table is a view of one version: later writes (even in place of rows it shows)
    never show through, with or without deletions."""
    mem.upsert_many([1, 2, 3], np.eye(3), [{"a": 1}, None, {"a": 3}])
    first = mem.to_arrow()
    mem.upsert_many([1, 4], np.full((2, 3), 9.0), [{"a": 100}, None])
    mem.delete(2)
    second = mem.to_arrow()
    mem.upsert_many(np.arange(10, 3000), np.ones((2990, 3)))  # growth: a new layout
    assert first.column("id").to_pylist() == [1, 2, 3]
    assert np.array_equal(
        np.asarray(first.column("vector").combine_chunks().flatten()).reshape(-1, 3), np.eye(3)
    )
    assert first.column("a").to_pylist() == [1, None, 3]
    assert sorted(second.column("id").to_pylist()) == [1, 3, 4]
    by_id = dict(zip(second.column("id").to_pylist(), second.column("a").to_pylist()))
    assert by_id == {1: 100, 3: 3, 4: None}


def test_to_arrow_of_an_empty_database(mem: iqdb.Iqdb) -> None:
    t = mem.to_arrow()
    assert t.num_rows == 0 and t.column_names == ["id", "vector"]
    assert t.schema.field("vector").type == pa.list_(pa.float32())  # no dimension yet
    mem.upsert_many([1], [[1.0, 2.0]])
    mem.delete(1)
    t = mem.to_arrow()
    assert t.num_rows == 0 and t.schema.field("vector").type == pa.list_(pa.float32(), 2)
    with iqdb.open_in_memory() as other:
        assert other.upsert_arrow(t) == 0
        assert len(other) == 0


def test_pandas_and_polars_frames(mem: iqdb.Iqdb) -> None:
    pd = pytest.importorskip("pandas", reason="pandas is in the test extra")
    pl = pytest.importorskip("polars", reason="polars is in the test extra")
    build(mem)
    table = mem.to_arrow()
    frame = table.to_pandas()
    assert list(frame["id"]) == table.column("id").to_pylist()
    polars_frame = pl.from_arrow(table)
    assert polars_frame.shape == (table.num_rows, table.num_columns)

    df = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "vector": [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 1.0])],
            "title": ["a", None, "c"],
            "year": [2020, 2021, 2022],
        }
    )
    with iqdb.open_in_memory() as db:
        assert db.upsert_arrow(df) == 3
        assert payload_of(db, 1) == {"title": "a", "year": 2020}
        assert payload_of(db, 2) == {"year": 2021}
        assert np.array_equal(db.get(3).vector.to_numpy(), [1.0, 1.0])
    pf = pl.DataFrame(
        {"key": [10, 11], "emb": [[0.5, 0.5], [1.0, 2.0]], "tags": [["x"], []], "flag": [True, None]},
        schema_overrides={"emb": pl.Array(pl.Float32, 2)},
    )
    with iqdb.open_in_memory() as db:
        assert db.upsert_arrow(pf, id_column="key", vector_column="emb") == 2
        assert payload_of(db, 10) == {"tags": ["x"], "flag": True}
        assert payload_of(db, 11) == {"tags": []}
        # polars (list column) back in, polars out
        back = pl.from_arrow(db.to_arrow())
        assert sorted(back["id"].to_list()) == [10, 11]


@pytest.mark.parametrize(
    "vtype",
    [
        pa.list_(pa.float32(), 2),
        pa.list_(pa.float64(), 2),
        pa.list_(pa.float16(), 2),
        pa.list_(pa.float64()),
        pa.large_list(pa.float32()),
    ],
    ids=str,
)
def test_vector_column_types(vtype: Any) -> None:
    vectors = pa.array([[1.0, 2.0], [3.0, 4.5], [0.0, -1.0]], type=vtype)
    table = pa.table({"id": pa.array([3, 4, 5], pa.uint8()), "vector": vectors})
    with iqdb.open_in_memory() as db:
        db.upsert_arrow(table.slice(1))  # slice offsets respected
        assert len(db) == 2 and 3 not in db
        assert db.get(4).vector.tolist() == [3.0, 4.5]
        assert db.get(5).vector.tolist() == [0.0, -1.0]


def test_fixed_shape_tensor_column() -> None:
    tensor_type = pa.fixed_shape_tensor(pa.float32(), (3,))
    X = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensors = pa.ExtensionArray.from_storage(
        tensor_type, pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), 3)
    )
    with iqdb.open_in_memory() as db:
        db.upsert_arrow(pa.table({"id": [1, 2], "vector": tensors}))
        assert db.get(2).vector.tolist() == [3.0, 4.0, 5.0]
    matrix_type = pa.fixed_shape_tensor(pa.float32(), (2, 2))
    bad = pa.ExtensionArray.from_storage(
        matrix_type, pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4, np.float32)), 4)
    )
    with iqdb.open_in_memory() as db, pytest.raises(iqdb.InvalidArgument, match="shape"):
        db.upsert_arrow(pa.table({"id": [1], "vector": bad}))


def test_arrow_types_map_onto_payload_values(mem: iqdb.Iqdb) -> None:
    table = pa.table(
        {
            "id": [1, 2],
            "vector": pa.array([[1.0], [2.0]], pa.list_(pa.float32(), 1)),
            "i8": pa.array([-5, None], pa.int8()),
            "u32": pa.array([7, 8], pa.uint32()),
            "f32": pa.array([0.5, float("nan")], pa.float32()),
            "s": pa.array(["x", "y"], pa.string()),
            "ls": pa.array(["big", None], pa.large_string()),
            "fsb": pa.array([b"ab", b"cd"], pa.binary(2)),
            "null": pa.array([None, None], pa.null()),
            "cat": pa.array(["u", "v"]).dictionary_encode(),
            "st": pa.array([{"a": 1, "b": [1.5]}, {"a": None, "b": []}]),
            "fsl": pa.array([[1, 2], [3, 4]], pa.list_(pa.int16(), 2)),
        }
    )
    mem.upsert_arrow(table)
    p1, p2 = payload_of(mem, 1), payload_of(mem, 2)
    assert same(
        p1,
        {
            "i8": -5,
            "u32": 7,
            "f32": 0.5,
            "s": "x",
            "ls": "big",
            "fsb": b"ab",
            "cat": "u",
            "st": {"a": 1, "b": [1.5]},
            "fsl": [1, 2],
        },
    )
    assert math.isnan(p2.pop("f32"))
    # Nulls at the top level: no key. Nulls inside a struct or list: None values.
    assert same(p2, {"u32": 8, "s": "y", "fsb": b"cd", "cat": "v", "st": {"a": None, "b": []}, "fsl": [3, 4]})


def test_payload_columns_and_the_none_rule(mem: iqdb.Iqdb) -> None:
    table = pa.table(
        {
            "id": [1, 2, 3],
            "vector": pa.array([[1.0], [2.0], [3.0]], pa.list_(pa.float32(), 1)),
            "a": [1, None, None],
            "b": ["x", "y", None],
            _arrow.EMPTY_PAYLOAD_COLUMN: [False, False, True],
        }
    )
    mem.upsert_arrow(table, payload_columns=["a"])
    assert payload_of(mem, 1) == {"a": 1}
    assert payload_of(mem, 2) is None  # no non-null payload field: None
    assert payload_of(mem, 3) == {}  # ... unless the reserved column says empty
    mem.upsert_arrow(table, payload_columns=[])
    assert payload_of(mem, 1) is None and payload_of(mem, 3) == {}
    with iqdb.open_in_memory() as db:
        db.upsert_arrow(table.drop_columns([_arrow.EMPTY_PAYLOAD_COLUMN]).select(["id", "vector"]))
        assert payload_of(db, 1) is None
    with pytest.raises(iqdb.InvalidArgument, match="'nope'"):
        mem.upsert_arrow(table, payload_columns=["nope"])
    with pytest.raises(iqdb.InvalidArgument, match="payload_columns"):
        mem.upsert_arrow(table, payload_columns="a")


@pytest.mark.parametrize(
    ("column", "words"),
    [
        (pa.array([0, 1], pa.timestamp("ms")), "timestamp"),
        (pa.array([0, 1], pa.date32()), "date32"),
        (pa.array([0, 1], pa.duration("s")), "duration"),
        (pa.array([decimal.Decimal("1.5"), decimal.Decimal("2")], pa.decimal128(10, 2)), "decimal"),
        (pa.array([[("k", 1)], []], pa.map_(pa.string(), pa.int64())), "map"),
        (pa.array([{"when": 0}, {"when": 1}], pa.struct([("when", pa.time32("s"))])), "time32"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_refused_payload_types_name_the_column_and_write_nothing(column: Any, words: str) -> None:
    table = pa.table(
        {"id": [1, 2], "vector": pa.array([[1.0], [2.0]], pa.list_(pa.float32(), 1)), "when": column}
    )
    with iqdb.open_in_memory() as db:
        with pytest.raises(iqdb.InvalidArgument, match=rf"'when'.*{words}"):
            db.upsert_arrow(table)
        assert len(db) == 0
        # Cast first, and it goes in.
        if words in ("map", "time32"):
            db.upsert_arrow(table.drop_columns(["when"]))
        else:
            db.upsert_arrow(table.set_column(2, "when", pc.cast(column, pa.string())))
        assert len(db) == 2


def test_bad_ids_and_vectors(mem: iqdb.Iqdb) -> None:
    vec = pa.array([[1.0], [2.0]], pa.list_(pa.float32(), 1))
    with pytest.raises(iqdb.InvalidArgument, match=r"record id -3 .*row 1"):
        mem.upsert_arrow(pa.table({"id": [4, -3], "vector": vec}))
    with pytest.raises(iqdb.InvalidArgument, match="null at row 0"):
        mem.upsert_arrow(pa.table({"id": pa.array([None, 1], pa.int64()), "vector": vec}))
    with pytest.raises(iqdb.InvalidArgument, match="ids must be integers"):
        mem.upsert_arrow(pa.table({"id": ["a", "b"], "vector": vec}))
    with pytest.raises(iqdb.InvalidArgument, match="no id column 'key'"):
        mem.upsert_arrow(pa.table({"id": [1, 2], "vector": vec}), id_column="key")
    with pytest.raises(iqdb.InvalidArgument, match="no vector column 'emb'"):
        mem.upsert_arrow(pa.table({"id": [1, 2], "vector": vec}), vector_column="emb")
    with pytest.raises(iqdb.InvalidArgument, match="not floats"):
        mem.upsert_arrow(pa.table({"id": [1], "vector": pa.array([[1, 2]], pa.list_(pa.int32(), 2))}))
    with pytest.raises(iqdb.InvalidArgument, match="expected a fixed_size_list"):
        mem.upsert_arrow(pa.table({"id": [1], "vector": [1.0]}))
    with pytest.raises(iqdb.InvalidVector, match=r"lengths 1 and 2 \(row 1\)"):
        mem.upsert_arrow(pa.table({"id": [1, 2], "vector": [[1.0], [1.0, 2.0]]}))
    with pytest.raises(iqdb.InvalidArgument, match="vector column 'vector' is null at row 1"):
        mem.upsert_arrow(
            pa.table({"id": [1, 2], "vector": pa.array([[1.0], None], pa.list_(pa.float32(), 1))})
        )
    with pytest.raises(iqdb.InvalidVector, match="null value at row 1"):
        mem.upsert_arrow(
            pa.table({"id": [1, 2], "vector": pa.array([[1.0], [None]], pa.list_(pa.float32(), 1))})
        )
    with pytest.raises(iqdb.InvalidVector, match="non-finite"):
        mem.upsert_arrow(
            pa.table({"id": [1, 2], "vector": pa.array([[1.0], [math.nan]], pa.list_(pa.float32(), 1))})
        )
    with pytest.raises(iqdb.InvalidArgument, match="got list"):
        mem.upsert_arrow([{"id": 1, "vector": [1.0]}])
    bad = pa.table({"id": [1], "vector": vec.slice(0, 1), "p": pa.array([b"\xff"], pa.large_binary())})
    bad = bad.replace_schema_metadata(None).cast(
        pa.schema(
            [
                bad.schema.field(0),
                bad.schema.field(1),
                pa.field("p", pa.large_binary(), metadata={b"iqdb.encoding": b"payload"}),
            ]
        )
    )
    with pytest.raises(iqdb.InvalidArgument, match=r"'p' .*does not decode"):
        mem.upsert_arrow(bad)
    assert len(mem) == 0
    mem.upsert_arrow(pa.table({"id": [1], "vector": [[1.0, 2.0]]}))
    with pytest.raises(iqdb.DimensionMismatch):
        mem.upsert_arrow(pa.table({"id": [2], "vector": [[1.0, 2.0, 3.0]]}))


def _batches(rows_per_batch: list[int], d: int = 4, start: int = 0) -> Iterator[Any]:
    lo = start
    for n in rows_per_batch:
        X = np.random.default_rng(lo).standard_normal((n, d)).astype(np.float32)
        yield pa.record_batch(
            {
                "id": pa.array(np.arange(lo, lo + n), pa.int64()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), d),
                "tag": pa.array([f"r{i}" for i in range(lo, lo + n)]),
            }
        )
        lo += n


def test_one_wal_frame_per_batch_and_a_failed_batch_writes_nothing(tmp_path: Path) -> None:
    good = list(_batches([50, 30]))
    broken = good[1].to_pydict()
    broken["id"][7] = -1  # the second batch has one bad row
    bad_batch = pa.record_batch(broken, schema=good[1].schema)
    with iqdb.open(tmp_path / "db") as db:
        db.upsert_arrow(pa.RecordBatchReader.from_batches(good[0].schema, good[:1]))
        frames = db.check()["wal"]["frames"]
        assert frames == 1
        wal_size = os.path.getsize(tmp_path / "db" / "wal")
        with pytest.raises(iqdb.InvalidArgument, match=r"record id -1 .*row 57"):
            db.upsert_arrow(pa.RecordBatchReader.from_batches(good[0].schema, [good[0], bad_batch]))
        # The first batch of that stream went in (one frame), the bad one not at all.
        assert len(db) == 50
        assert db.check()["wal"]["frames"] == 2
        size_after_first = os.path.getsize(tmp_path / "db" / "wal")
        assert size_after_first > wal_size
        # A stream whose first batch is bad leaves the WAL as it was, byte for byte.
        with pytest.raises(iqdb.InvalidArgument):
            db.upsert_arrow(pa.RecordBatchReader.from_batches(good[0].schema, [bad_batch]))
        assert os.path.getsize(tmp_path / "db" / "wal") == size_after_first
        assert len(db) == 50 and 57 not in db
        # A non-finite vector or a dimension mismatch: the same.
        nan = good[1].to_pydict()
        nan["vector"][3] = [math.nan] * 4
        with pytest.raises(iqdb.InvalidVector):
            db.upsert_arrow(pa.Table.from_pydict(nan, schema=good[1].schema))
        assert os.path.getsize(tmp_path / "db" / "wal") == size_after_first and len(db) == 50
    with iqdb.open(tmp_path / "db") as db:
        assert len(db) == 50 and db.get(49).payload == {"tag": "r49"}


def test_large_batches_are_cut_into_bounded_chunks(mem: iqdb.Iqdb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_arrow, "CHUNK_ROWS", 16)
    calls: list[int] = []
    real = iqdb.Iqdb._upsert_canonical  # upsert_many, minus the checks Arrow's types make moot

    def spy(self: iqdb.Iqdb, ids: Any, vectors: Any, payloads: Any = None, columns: Any = None) -> None:
        calls.append(len(ids))
        real(self, ids, vectors, payloads, columns)

    monkeypatch.setattr(iqdb.Iqdb, "_upsert_canonical", spy)
    seen: list[tuple[int, int | None]] = []
    table = pa.Table.from_batches(list(_batches([40, 8])))
    assert mem.upsert_arrow(table, progress=lambda done, total: seen.append((done, total))) == 48
    assert calls == [16, 16, 8, 8]
    assert seen == [(0, 48), (16, 48), (32, 48), (40, 48), (48, 48)]
    assert len(mem) == 48 and payload_of(mem, 47) == {"tag": "r47"}


def test_progress_from_a_stream_and_a_bad_callback(mem: iqdb.Iqdb) -> None:
    seen: list[tuple[int, int | None]] = []
    reader = pa.RecordBatchReader.from_batches(next(_batches([1])).schema, _batches([5, 7]))
    mem.upsert_arrow(reader, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, None), (5, None), (12, None)]
    with pytest.raises(iqdb.InvalidArgument, match="progress must be callable"):
        mem.upsert_arrow(pa.Table.from_batches(list(_batches([1]))), progress=3)

    def stop(done: int, total: int | None) -> None:
        if done >= 5:
            raise KeyboardInterrupt

    with iqdb.open_in_memory() as db:
        with pytest.raises(KeyboardInterrupt):
            db.upsert_arrow(pa.Table.from_batches(list(_batches([5, 7]))), progress=stop)
        assert len(db) == 5  # a cancelled import keeps the chunks before it


def test_closed_handle() -> None:
    db = iqdb.open_in_memory()
    db.close()
    with pytest.raises(iqdb.Closed):
        db.to_arrow()
    with pytest.raises(iqdb.Closed):
        db.upsert_arrow(object())


def test_results_to_arrow(mem: iqdb.Iqdb) -> None:
    mem.upsert_many([7, 8, 9], np.eye(3))
    ids, scores = mem.search_arrays([[1, 0, 0], [0, 0, 1]], 2, "l2")
    t = iqdb.results_to_arrow(ids, scores)
    assert t.schema == pa.schema(
        [("query", pa.int64()), ("rank", pa.int32()), ("id", pa.uint64()), ("score", pa.float64())]
    )
    assert t.column("query").to_pylist() == [0, 0, 1, 1]
    assert t.column("id").to_pylist() == [7, 8, 9, 7]
    assert t.column("score").to_pylist() == pytest.approx([0, math.sqrt(2), 0, math.sqrt(2)])
    # Padding (NO_ID, NaN) is left out.
    pad_ids = np.array([[1, iqdb.NO_ID], [iqdb.NO_ID, iqdb.NO_ID], [3, 4]], dtype=np.uint64)
    pad_scores = np.array([[0.5, np.nan], [np.nan, np.nan], [0.1, 0.2]])
    t = iqdb.results_to_arrow(pad_ids, pad_scores)
    assert t.column("query").to_pylist() == [0, 2, 2]
    assert t.column("rank").to_pylist() == [0, 0, 1]
    assert t.column("id").to_pylist() == [1, 3, 4]
    assert t.to_pandas().groupby("query").size().to_dict() == {0: 1, 2: 2}
    empty = iqdb.results_to_arrow(np.empty((2, 0), np.uint64), np.empty((2, 0)))
    assert empty.num_rows == 0
    with pytest.raises(iqdb.InvalidArgument, match="one shape"):
        iqdb.results_to_arrow(np.zeros((2, 2), np.uint64), np.zeros((2, 3)))
    with pytest.raises(iqdb.InvalidArgument, match="integer"):
        iqdb.results_to_arrow(np.zeros((2, 2)), np.zeros((2, 2)))


def test_results_to_arrow_with_filters(mem: iqdb.Iqdb) -> None:
    if not hasattr(iqdb, "Filter"):
        pytest.skip("declarative filters are not in this build")
    mem.upsert_many([1, 2, 3], np.eye(3), [{"k": "a"}, {"k": "b"}, {"k": "a"}])
    ids, scores = mem.search_arrays(np.eye(3), 3, "l2", filter=[{"k": "a"}, {"k": "b"}, {"k": "zzz"}])
    t = iqdb.results_to_arrow(ids, scores)
    assert t.column("query").to_pylist() == [0, 0, 1]
    assert t.column("id").to_pylist() == [1, 3, 2]


# -- files ------------------------------------------------------------------------------------


def test_open_file_formats(tmp_path: Path) -> None:
    X = np.random.default_rng(1).standard_normal((70_000, 2)).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    reader, total = _arrow.open_file(tmp_path / "v.npy")
    assert total == 70_000
    with iqdb.open_in_memory() as db:
        db.upsert_arrow(reader)
        assert len(db) == 70_000 and np.array_equal(db.get(69_999).vector.to_numpy(), X[-1])
    (tmp_path / "v.csv").write_text(
        'id,vector,when,label\n1,"[0.5, 1.5]",2024-05-01,x\n2,"2 3",2024-05-02 10:00:00,\n3,4;5,,z\n'
    )
    reader, total = _arrow.open_file(tmp_path / "v.csv")
    assert total is None
    with iqdb.open_in_memory() as db:
        db.upsert_arrow(reader)
        assert db.get(2).vector.tolist() == [2.0, 3.0]
        assert db.get(3).vector.tolist() == [4.0, 5.0]
        # CSV has no types: dates stay text.
        assert payload_of(db, 1) == {"when": "2024-05-01", "label": "x"}
    (tmp_path / "bad.csv").write_text('id,vector\n1,"[0.5, x]"\n')
    with iqdb.open_in_memory() as db, pytest.raises(iqdb.InvalidArgument, match="not numbers"):
        db.upsert_arrow(_arrow.open_file(tmp_path / "bad.csv")[0])
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(iqdb.InvalidArgument, match="suffix"):
        _arrow.open_file(tmp_path / "x.txt")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(iqdb.InvalidArgument, match=r"fake\.parquet"):
        _arrow.open_file(tmp_path / "fake.parquet")
    with pytest.raises(FileNotFoundError):
        _arrow.open_file(tmp_path / "missing.arrow")
    np.save(tmp_path / "ints.npy", np.zeros((3, 2), np.int32))
    with pytest.raises(iqdb.InvalidArgument, match="expected"):
        _arrow.open_file(tmp_path / "ints.npy")


@pytest.mark.slow
def test_streaming_import_of_a_file_larger_than_the_working_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Parquet file is imported chunk by chunk: Arrow's memory and Python's extra memory
    (beyond what the database itself keeps) stay far below the file's size. The chunks are made
    small (2,048 rows) so that a file of a test's size holds many of them."""
    monkeypatch.setattr(_arrow, "CHUNK_ROWS", 2048)
    n, d, groups = 24_000, 8, 12
    path = tmp_path / "big.parquet"
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(
        path,
        pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), d)), ("text", pa.string())]),
        compression="none",
    ) as w:
        per = n // groups
        for g in range(groups):
            X = rng.standard_normal((per, d)).astype(np.float32)
            text = pa.array([os.urandom(1000).hex() for _ in range(per)])  # 2,000 bytes a row
            w.write_batch(
                pa.record_batch(
                    [
                        pa.array(np.arange(g * per, (g + 1) * per)),
                        pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), d),
                        text,
                    ],
                    names=["id", "vector", "text"],
                ),
                row_group_size=per,
            )
    size = path.stat().st_size
    assert size > 40_000_000
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        with iqdb.open(tmp_path / "db", device="cpu") as db:
            reader, total = _arrow.open_file(path)
            assert total == n
            db.upsert_arrow(reader)
            current, peak = tracemalloc.get_traced_memory()
            assert len(db) == n
            arrow_peak = pool.max_memory()
            del reader
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    # What the database keeps (vectors, payload strings) is in `current`; the import's own
    # working memory is the rest of the peak, and Arrow's batches never pile up.
    assert peak - current < size / 4, (peak - current, size)
    assert arrow_peak < size / 4, (arrow_peak, size)


def test_uint64_payloads_beyond_int64_are_refused(mem: iqdb.Iqdb) -> None:
    vec = pa.array([[1.0], [2.0]], pa.list_(pa.float32(), 1))
    ok = pa.table({"id": [1, 2], "vector": vec, "u": pa.array([1, 2**63 - 1], pa.uint64())})
    mem.upsert_arrow(ok)
    assert payload_of(mem, 2) == {"u": 2**63 - 1}
    big = pa.table({"id": [3, 4], "vector": vec, "u": pa.array([None, 2**63], pa.uint64())})
    with pytest.raises(iqdb.InvalidArgument, match=r"'u' .*64-bit .*row 1"):
        mem.upsert_arrow(big)
    nested = pa.table({"id": [3, 4], "vector": vec, "u": pa.array([[1], [2**64 - 1]], pa.list_(pa.uint64()))})
    with pytest.raises(iqdb.InvalidArgument, match="'u"):
        mem.upsert_arrow(nested)
    assert len(mem) == 2
    mem.upsert_arrow(nested.slice(0, 1))
    assert payload_of(mem, 3) == {"u": [1]}


def test_an_import_of_known_size_grows_the_store_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table (its length known) makes the store grow once, to hold it all, instead of 1.2x at a
    time (each growth copies the whole matrix); a stream of unknown length grows as usual. The
    records are the same either way."""
    from iqdb._store import ColumnStore

    monkeypatch.setattr(_arrow, "CHUNK_ROWS", 1000)
    n, d = 5_321, 4
    rng = np.random.default_rng(3)
    X = rng.standard_normal((n, d)).astype(np.float32)
    table = pa.table({"id": np.arange(n, dtype=np.uint64), "vector": list(X), "year": np.arange(n) % 7})
    growths: list[int] = []
    real = ColumnStore._relayout

    def spy(self: ColumnStore, cap: int, dim: int) -> None:
        growths.append(cap)
        real(self, cap, dim)

    monkeypatch.setattr(ColumnStore, "_relayout", spy)
    with iqdb.open_in_memory() as db:
        db.upsert_many([10**9], np.ones((1, d), dtype=np.float32))  # a record already there
        growths.clear()
        assert db.upsert_arrow(table) == n
        assert len(growths) == 1 and growths[0] >= n + 1, growths
        assert db._store._expected == 0  # the hint is used up
        with iqdb.open_in_memory() as streamed:
            growths.clear()
            streamed.upsert_arrow(pa.RecordBatchReader.from_batches(table.schema, table.to_batches()))
            assert len(growths) > 2  # no length known: the usual steps
            streamed.upsert_many([10**9], np.ones((1, d), dtype=np.float32))
            assert_same_records(db, streamed)


def test_a_failed_import_withdraws_its_size_hint() -> None:
    """A bad chunk stops the import (nothing of it written) and the hint is withdrawn, so a later
    write does not reserve room for rows that never came."""
    n = 3
    table = pa.table({"id": pa.array([1, None, 3], type=pa.int64()), "vector": [[1.0, 0.0]] * n})
    with iqdb.open_in_memory() as db:
        with pytest.raises(iqdb.InvalidArgument, match="row 1"):
            db.upsert_arrow(table)
        assert len(db) == 0 and db._store._expected == 0


def test_scalar_columns_index_as_the_payloads_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk of scalar columns without nulls reaches the filter index as columns (no pass over
    the payloads); the index it builds is the one the payloads build, array for array, and
    filtered searches answer the same. A chunk with nulls, lists or duplicate ids takes the
    payloads' path."""
    from iqdb._filters import _columns

    monkeypatch.setattr(_arrow, "CHUNK_ROWS", 700)
    n, d = 2_000, 3
    rng = np.random.default_rng(8)
    X = rng.standard_normal((n, d)).astype(np.float32)
    table = pa.table(
        {
            "id": np.arange(n, dtype=np.int64),
            "vector": list(X),
            "year": pa.array(rng.integers(1990, 2030, n), type=pa.int32()),
            "score": rng.standard_normal(n),
            "flag": rng.random(n) < 0.3,
            "kind": pa.array([f"k{i % 13}" for i in range(n)], type=pa.large_string()),
            "raw": [bytes([i % 5]) for i in range(n)],
            "a.b": np.arange(n),  # not reachable by a dotted path: indexed by neither
            "big": pa.array(np.arange(n, dtype=np.uint64) + 2**62, type=pa.uint64()),
        }
    )
    used: list[bool] = []
    real = _columns.PayloadIndex.append

    def spy(self: Any, start: int, payloads: Any, columns: Any = None) -> None:
        used.append(columns is not None)
        real(self, start, payloads, columns)

    monkeypatch.setattr(_columns.PayloadIndex, "append", spy)
    with iqdb.open_in_memory() as db, iqdb.open_in_memory() as ref:
        db.upsert_arrow(table)
        assert used == [True, True, True]
        rows = table.to_pylist()
        ref.upsert_many(
            [r["id"] for r in rows],
            X,
            [{k: v for k, v in r.items() if k not in ("id", "vector")} for r in rows],
        )
        assert used[3:] == [False]
        got, want = db._store._layout.fields, ref._store._layout.fields
        assert got.n == want.n == n and sorted(got.columns) == sorted(want.columns)
        for path, col in want.columns.items():
            mine = got.columns[path]
            for name in ("tags", "ints", "floats", "codes"):
                np.testing.assert_array_equal(getattr(mine, name).view(0, n), getattr(col, name).view(0, n))
            assert mine.values == col.values
        for f in (
            iqdb.Field("year") >= 2020,
            (iqdb.Field("kind") == "k3") | (iqdb.Field("flag") == True),  # noqa: E712
            iqdb.Field("raw") == b"\x02",
            iqdb.Field("big") > 2**62 + 1500,
            iqdb.Field("score").between(-0.5, 0.5),
        ):
            assert db.count(f) == ref.count(f) > 0, f
            assert db.search(X[0], 20, "l2", filter=f) == ref.search(X[0], 20, "l2", filter=f)
        # nulls in a chunk: the payloads' path
        used.clear()
        db.upsert_arrow(
            pa.table({"id": [n + 1, n + 2], "vector": [X[0], X[1]], "year": pa.array([None, 7], pa.int64())})
        )
        assert used == [False] and db.count(iqdb.Field("year") == 7) == 1


def test_a_durable_import_compacts_once_at_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Automatic compaction waits for the end of an import: one snapshot, not one per
    ``wal_limit`` of imported bytes (each rewriting the whole database); a stream of unknown
    length too. The records are all there after a reopen, and a failing import still compacts
    what it wrote."""
    from iqdb._durable import DurableBackend

    monkeypatch.setattr(_arrow, "CHUNK_ROWS", 500)
    n, d = 5_000, 8
    rng = np.random.default_rng(5)
    X = rng.standard_normal((n, d)).astype(np.float32)
    table = pa.table({"id": np.arange(n, dtype=np.uint64), "vector": list(X), "year": np.arange(n) % 9})
    compactions: list[int] = []
    real = DurableBackend.compact

    def spy(self: Any, store: Any) -> None:
        compactions.append(len(store))
        real(self, store)

    monkeypatch.setattr(DurableBackend, "compact", spy)
    with iqdb.open(tmp_path / "a", wal_limit=64 << 10) as db:
        db.upsert_arrow(table)
        assert compactions == [n]  # the WAL passed its limit many times over: one compaction
        compactions.clear()
        for lo in range(0, n, 500):  # the same writes one by one: a compaction per limit
            db.upsert_many(np.arange(lo, lo + 500) + n, X[lo : lo + 500])
        assert len(compactions) >= 3
    with iqdb.open(tmp_path / "b", wal_limit=64 << 10) as db:
        compactions.clear()
        db.upsert_arrow(pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=700)))
        assert compactions == [n]
        # A null id in the third chunk: the first two are written (and durable), the rest not.
        bad = pa.table({"id": pa.array([*range(n, n + 1200), None], pa.int64()), "vector": list(X[:1201])})
        with pytest.raises(iqdb.InvalidArgument, match="row 1200"):
            db.upsert_arrow(bad)
        assert db._bulk_depth == 0 and db._store._expected == 0
    with iqdb.open(tmp_path / "b") as db:
        assert len(db) == n + 1000 and db.get(n + 999) is not None and db.get(n + 1000) is None
