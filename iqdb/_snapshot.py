"""The snapshot: an Arrow IPC *file* with checksums Arrow itself does not have.

>>> import numpy as np, tempfile, os
>>> from iqdb._fs import OsFileSystem
>>> from iqdb._snapshot import SnapshotData, write_snapshot, read_snapshot
>>> d = tempfile.mkdtemp()
>>> data = SnapshotData(np.array([3], dtype=np.uint64), np.ones((1, 2), np.float32), [None], 2, 1, 5)
>>> write_snapshot(OsFileSystem(), os.path.join(d, "snap"), data)
>>> read_snapshot(OsFileSystem(), os.path.join(d, "snap")).last_seq
5

Columns: ``id`` (uint64), ``vector`` (``fixed_size_list<float32>[dim]``), ``norm_sq`` (float64,
so open need not recompute norms), ``payload`` (large_binary in iqdb's tagged payload encoding;
null = no payload, distinct from an empty payload). One record batch, so on open the vectors
come out of the memory map as one ``(n, dim)`` block.

Schema metadata (``iqdb.*`` keys): format version, dim, generation, last sequence number, row
count, null count, and CRC32s of every column's buffers; ``iqdb.meta_crc`` covers all the
others. On open, after Arrow's own full validation, every buffer's CRC is recomputed: any
flipped bit that changes meaning fails a check and raises :class:`Corrupt`; a flip in bytes that
carry no meaning (padding) opens with exactly the original data.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import Corrupt
from ._fs import FileSystem
from ._payload import Payload, decode_payload, encode_payload

__all__ = ["SnapshotData", "read_snapshot", "write_snapshot"]

FORMAT_VERSION = "1"
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
_KEYS = (
    "version",
    "dim",
    "generation",
    "last_seq",
    "rows",
    "payload_nulls",
    "crc_ids",
    "crc_vectors",
    "crc_norms",
    "crc_payload_offsets",
    "crc_payload_data",
    "crc_payload_validity",
)


@dataclass
class SnapshotData:
    """The contents of a snapshot (on read, ``vectors`` is a read-only view of the map)."""

    ids: npt.NDArray[np.uint64]
    vectors: npt.NDArray[np.float32]
    payloads: list[Payload | None]
    dim: int | None
    generation: int
    last_seq: int
    norms: npt.NDArray[np.float64] | None = None
    # Read with ``defer_vectors``: the CRC-32 the vectors must have, for the loader to check while
    # it copies them (one pass over them instead of two); ``None`` once checked.
    vectors_crc: str | None = None


def _crc(buf: Any) -> str:
    if buf is None:
        return "0"
    raw = buf.reshape(-1).view(np.uint8) if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    return str(zlib.crc32(raw.data))


def _buffers(payload_col: Any) -> tuple[Any, Any, Any]:
    """(validity, offsets, data) buffers of a large_binary array, sliced to the array."""
    validity, offsets, data = payload_col.buffers()
    n = len(payload_col)
    offs = np.frombuffer(offsets, dtype="<i8", count=n + 1) if offsets is not None else np.zeros(1, "<i8")
    raw = np.frombuffer(data, dtype=np.uint8)[: int(offs[-1])] if data is not None else np.zeros(0, np.uint8)
    bits = np.frombuffer(validity, dtype=np.uint8)[: (n + 7) // 8] if validity is not None else None
    if bits is not None and n % 8:
        bits = bits.copy()
        bits[-1] &= (1 << (n % 8)) - 1  # bits past the end carry no meaning
    return bits, offs, raw


def _column_crcs(ids: Any, vectors: Any, norms: Any, payload_col: Any) -> dict[str, str]:
    """CRC32 of every buffer that carries meaning, as the metadata stores them."""
    bits, offs, raw = _buffers(payload_col)
    return {
        "crc_ids": _crc(ids),
        "crc_vectors": _crc(vectors),
        "crc_norms": _crc(norms),
        "crc_payload_offsets": _crc(offs),
        "crc_payload_data": _crc(raw),
        "crc_payload_validity": _crc(bits),
    }


def _meta_crc(meta: dict[str, str]) -> str:
    blob = "\n".join(f"{k}={meta[k]}" for k in _KEYS).encode()
    return str(zlib.crc32(blob))


def write_snapshot(fs: FileSystem, path: str, data: SnapshotData) -> None:
    """Write ``data`` to ``path`` (which the caller then fsyncs and renames; see the durable store).

    Streams through the file-system seam; the file is fsynced before this returns.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    n = int(data.ids.shape[0])
    dim = data.dim or 1
    ids = np.ascontiguousarray(data.ids, dtype=np.uint64)
    vectors = (
        np.ascontiguousarray(data.vectors, dtype=np.float32).reshape(n, dim)
        if n
        else np.zeros((0, dim), np.float32)
    )
    norms = np.ascontiguousarray(data.norms if data.norms is not None else np.zeros(n), dtype=np.float64)
    if data.payloads.count(None) == n:
        payload_col = pa.nulls(n, type=pa.large_binary())  # no per-record work without payloads
    else:
        payload_col = pa.array([encode_payload(p) for p in data.payloads], type=pa.large_binary())
    meta = {
        "version": FORMAT_VERSION,
        "dim": "none" if data.dim is None else str(data.dim),
        "generation": str(data.generation),
        "last_seq": str(data.last_seq),
        "rows": str(n),
        "payload_nulls": str(payload_col.null_count),
        **_column_crcs(ids, vectors, norms, payload_col),
    }
    meta["meta_crc"] = _meta_crc(meta)
    schema = _schema(dim).with_metadata({f"iqdb.{k}": v for k, v in meta.items()})
    batch = pa.record_batch(
        [
            pa.array(ids, type=pa.uint64()),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim),
            pa.array(norms, type=pa.float64()),
            payload_col,
        ],
        schema=schema,
    )
    fd = fs.open(path, _WRITE_FLAGS, 0o644)
    try:
        sink = _FsSink(fs, fd)
        with ipc.new_file(pa.PythonFile(sink, mode="w"), schema) as writer:
            writer.write_batch(batch)
        fs.fsync(fd)
    finally:
        fs.close(fd)


def _schema(dim: int) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.uint64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("norm_sq", pa.float64(), nullable=False),
            pa.field("payload", pa.large_binary(), nullable=True),
        ]
    )


class _FsSink:
    """A minimal writable file object over the seam, for ``pyarrow.PythonFile``."""

    def __init__(self, fs: FileSystem, fd: int) -> None:
        self.fs, self.fd, self.pos, self.closed = fs, fd, 0, False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self.fs.write(self.fd, view[done:])
        self.pos += done
        return done

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True


def _int(meta: dict[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise Corrupt(f"snapshot metadata {key!r} is missing or malformed") from None


def read_snapshot(fs: FileSystem, path: str, *, defer_vectors: bool = False) -> SnapshotData:
    """Map, verify and decode the snapshot at ``path``.

    With ``defer_vectors``, every check but the vectors' checksum is made here, and the expected
    checksum is handed on in :attr:`SnapshotData.vectors_crc` for the caller to check while it
    copies the vectors (:meth:`~iqdb._store.ColumnStore.load`): the map is then read once.

    Raises
    ------
    Corrupt
        Any integrity check fails (Arrow structure, metadata, a buffer checksum, payload bytes).
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    buf = fs.map(path)
    try:
        # The Arrow reader only looks at the trailing magic; the leading one is checked here.
        if buf.size < 12 or buf[:6].to_pybytes() != b"ARROW1" or buf[-6:].to_pybytes() != b"ARROW1":
            raise Corrupt(f"snapshot {path!r} does not carry the Arrow file magic")
        reader = ipc.open_file(buf)
        raw_meta = reader.schema.metadata or {}
        meta = {k.decode()[5:]: v.decode() for k, v in raw_meta.items() if k.startswith(b"iqdb.")}
        if meta.get("version") != FORMAT_VERSION:
            raise Corrupt(f"snapshot format version {meta.get('version')!r} is not supported")
        if meta.get("meta_crc") != _meta_crc({k: meta.get(k, "") for k in _KEYS}):
            raise Corrupt("snapshot metadata checksum mismatch")
        dim = None if meta["dim"] == "none" else _int(meta, "dim")
        rows = _int(meta, "rows")
        if not reader.schema.remove_metadata().equals(_schema(dim or 1)):
            raise Corrupt("snapshot schema is not iqdb's")
        if reader.num_record_batches != 1:
            raise Corrupt(f"snapshot has {reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        batch.validate(full=True)
    except Corrupt:
        raise
    except (pa.ArrowException, ValueError, KeyError, UnicodeDecodeError, OSError) as exc:
        # The bytes are already mapped: anything pyarrow raises now (it reports some parse
        # failures as OSError) is about their content, not about I/O.
        raise Corrupt(f"snapshot {path!r} is not a valid iqdb Arrow file: {exc}") from exc
    if batch.num_rows != rows:
        raise Corrupt(f"snapshot holds {batch.num_rows} rows, its metadata says {rows}")
    id_col, vec_col, norm_col, payload_col = batch.columns
    if id_col.null_count or vec_col.null_count or norm_col.null_count or vec_col.values.null_count:
        raise Corrupt("snapshot has nulls where none are allowed")
    ids = np.frombuffer(id_col.buffers()[1], dtype="<u8", count=rows, offset=8 * id_col.offset)
    width = dim or 1
    vbuf = vec_col.values.buffers()[1]
    voff = 4 * (vec_col.values.offset + width * vec_col.offset)
    vectors = np.frombuffer(vbuf, dtype="<f4", count=rows * width, offset=voff).reshape(rows, width)
    norms = np.frombuffer(norm_col.buffers()[1], dtype="<f8", count=rows, offset=8 * norm_col.offset)
    crcs = _column_crcs(ids, None if defer_vectors else vectors, norms, payload_col)
    if defer_vectors:
        del crcs["crc_vectors"]  # the loader checks it during its copy
    for key, value in crcs.items():
        if meta.get(key) != value:
            raise Corrupt(f"snapshot {key[4:]} checksum mismatch")
    if str(payload_col.null_count) != meta.get("payload_nulls"):
        raise Corrupt("snapshot payload null count mismatch")
    if payload_col.null_count == rows:
        payloads: list[Payload | None] = [None] * rows
    else:
        payloads = [None if p is None else decode_payload(p) for p in payload_col.to_pylist()]
    return SnapshotData(
        ids=ids,
        vectors=vectors,
        payloads=payloads,
        dim=dim,
        generation=_int(meta, "generation"),
        last_seq=_int(meta, "last_seq"),
        norms=norms,
        vectors_crc=meta.get("crc_vectors", "") if defer_vectors else None,
    )
