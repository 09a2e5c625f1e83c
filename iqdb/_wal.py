"""The write-ahead log format: a header, then checksummed frames, one per write call.

>>> import numpy as np
>>> from iqdb._backend import DeleteOp
>>> from iqdb._wal import encode_frame, scan, encode_header, HEADER_SIZE
>>> log = encode_header(0) + encode_frame(DeleteOp(np.array([7], dtype=np.uint64)), 1, 0, 0)
>>> result = scan(memoryview(log), 0)
>>> [(f.seq, f.op.ids.tolist()) for f in result.frames], result.end == len(log)
([(1, [7])], True)

Layout (little-endian)::

    header (32 bytes): magic "IQDBWAL\\0" | version u32 | header size u32 | generation u64
                       | reserved u32 | crc u32 (over bytes 0..28)
    frame:  header_crc u32 | type u8 | 0 u8 | 0 u16 | gen_lo u32 | body_crc u32
            | body_len u64 | seq u64 | synced_upto u64 | body | zero padding to 8 bytes

``header_crc`` covers bytes 4..40 of the frame header, ``body_crc`` the body; both are masked
CRC32s seeded with the generation, so zero-filled space and stale frames of an earlier
generation never validate. Frame types: 1 UPSERT (``count u32 | dim u32 | ids u64[count] |
vectors f32[count*dim] | payload lengths u32[count] (0xFFFFFFFF = no payload) | payload bytes``),
2 DELETE (``count u32 | 0 u32 | ids u64[count]``), 3 SYNC (no body). An ``upsert_many`` call is
one frame, so after a crash it is wholly there or wholly absent.

``synced_upto`` is the durable watermark: the WAL offset an fsync had confirmed when the frame
was built. A damaged frame *below* a later frame's watermark was confirmed durable, so it is
corruption (refuse to open); a damaged frame above every watermark is a torn tail from the
unsynced window (truncate it). SYNC frames, appended (unsynced) after each fsync, make the
watermark visible even when no write follows a flush.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from ._backend import DeleteOp, Op, UpsertOp
from ._errors import Corrupt
from ._payload import Payload, decode_payload, encode_payload

__all__ = [
    "FRAME_HEADER_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "Frame",
    "Parts",
    "ScanResult",
    "decode_header",
    "encode_frame",
    "encode_frame_parts",
    "encode_header",
    "encode_sync",
    "later_frame_watermarks",
    "scan",
]

MAGIC = b"IQDBWAL\0"
VERSION = 1
HEADER_SIZE = 32
FRAME_HEADER_SIZE = 40
T_UPSERT, T_DELETE, T_SYNC = 1, 2, 3
_NO_PAYLOAD = 0xFFFFFFFF

_HEADER = struct.Struct("<8sIIQI")  # magic, version, header size, generation, reserved (28 bytes)
_FRAME = struct.Struct("<IBBHIIQQQ")  # header_crc .. synced_upto (40 bytes)
_COUNTS = struct.Struct("<II")


def _crc(data: bytes | memoryview, seed: int) -> int:
    """CRC32 seeded by the generation and masked (LevelDB's rotate-and-add), so a CRC stored
    inside checksummed data, zero-filled space or a frame of another generation never matches."""
    return _mask(zlib.crc32(data, seed & 0xFFFFFFFF))


def _mask(c: int) -> int:
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def encode_header(generation: int) -> bytes:
    """The 32-byte WAL header for ``generation``."""
    head = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, generation, 0)
    return head + struct.pack("<I", zlib.crc32(head))


def decode_header(data: bytes | memoryview) -> int:
    """The generation in a WAL header.

    Raises
    ------
    Corrupt
        Wrong magic, version, size or checksum.
    """
    if len(data) < HEADER_SIZE:
        raise Corrupt(f"WAL header is {len(data)} bytes, expected {HEADER_SIZE}")
    head = bytes(data[: HEADER_SIZE - 4])
    magic, version, size, generation, _ = _HEADER.unpack(head)
    if magic != MAGIC:
        raise Corrupt(f"WAL has wrong magic {magic!r}")
    (crc,) = struct.unpack_from("<I", data, HEADER_SIZE - 4)
    if crc != zlib.crc32(head):
        raise Corrupt("WAL header checksum mismatch")
    if version != VERSION or size != HEADER_SIZE:
        raise Corrupt(f"WAL format version {version} (header size {size}) is not supported by this iqdb")
    return int(generation)


Parts = list[Union[bytes, memoryview]]  # noqa: UP007


def _frame(kind: int, body: Parts, seq: int, generation: int, synced_upto: int) -> Parts:
    """Frame the body pieces without joining them (a bulk upsert's vectors are not copied)."""
    running = generation & 0xFFFFFFFF
    length = 0
    for piece in body:
        running = zlib.crc32(piece, running)
        length += len(piece)
    rest = _FRAME.pack(0, kind, 0, 0, generation & 0xFFFFFFFF, _mask(running), length, seq, synced_upto)[4:]
    pad = (-(FRAME_HEADER_SIZE + length)) % 8
    return [struct.pack("<I", _crc(rest, generation)) + rest, *body, b"\0" * pad]


def encode_frame_parts(op: Op, seq: int, generation: int, synced_upto: int) -> Parts:
    """One frame holding ``op``, as buffers to write in order. Pure: no I/O."""
    if isinstance(op, DeleteOp):
        ids = np.ascontiguousarray(op.ids, dtype="<u8")
        return _frame(T_DELETE, [_COUNTS.pack(len(ids), 0), ids.data.cast("B")], seq, generation, synced_upto)
    count, dim = op.vectors.shape
    encoded = [encode_payload(p) for p in op.payloads]
    lengths = np.array([_NO_PAYLOAD if e is None else len(e) for e in encoded], dtype="<u4")
    ids = np.ascontiguousarray(op.ids, dtype="<u8")
    vectors = np.ascontiguousarray(op.vectors, dtype="<f4")
    body: Parts = [
        _COUNTS.pack(count, dim),
        ids.data.cast("B"),
        vectors.reshape(-1).data.cast("B"),
        lengths.tobytes(),
        b"".join(e for e in encoded if e is not None),
    ]
    return _frame(T_UPSERT, body, seq, generation, synced_upto)


def encode_frame(op: Op, seq: int, generation: int, synced_upto: int) -> bytes:
    """One frame holding ``op``, as one ``bytes``."""
    return b"".join(encode_frame_parts(op, seq, generation, synced_upto))


def encode_sync(seq: int, generation: int, synced_upto: int) -> bytes:
    """A SYNC frame: records that ``[0, synced_upto)`` is durable."""
    return b"".join(_frame(T_SYNC, [], seq, generation, synced_upto))


def _decode_body(kind: int, body: memoryview) -> Op:
    count, dim = _COUNTS.unpack_from(body, 0)
    pos = _COUNTS.size
    ids = np.frombuffer(body, dtype="<u8", count=count, offset=pos).astype(np.uint64)
    pos += 8 * count
    if kind == T_DELETE:
        if pos != len(body):
            raise Corrupt("DELETE frame has trailing bytes")
        return DeleteOp(ids)
    vectors = np.frombuffer(body, dtype="<f4", count=count * dim, offset=pos).astype(np.float32)
    vectors = vectors.reshape(count, dim)
    pos += 4 * count * dim
    lengths = np.frombuffer(body, dtype="<u4", count=count, offset=pos)
    pos += 4 * count
    payloads: list[Payload | None] = []
    for n in lengths.tolist():
        if n == _NO_PAYLOAD:
            payloads.append(None)
            continue
        if pos + n > len(body):
            raise Corrupt("UPSERT frame payload runs past the body")
        payloads.append(decode_payload(body[pos : pos + n]))
        pos += n
    if pos != len(body) or (count and dim == 0) or not np.isfinite(vectors).all():
        raise Corrupt("UPSERT frame body is malformed")
    return UpsertOp(ids, vectors, payloads)


@dataclass(frozen=True)
class Frame:
    """A decoded frame and where it lies in the file."""

    offset: int
    end: int
    seq: int
    synced_upto: int
    op: Op | None  # None for SYNC frames


@dataclass
class ScanResult:
    """What a scan found: the valid prefix, and about the first bad frame if any."""

    frames: list[Frame] = field(default_factory=list)
    end: int = HEADER_SIZE  # end of the valid prefix: where a torn tail would be cut
    bad_offset: int | None = None  # first frame that failed to validate
    reason: str = ""
    confirmed_after: bool = False  # a later valid frame's watermark covers bad_offset
    later_frames: int = 0  # valid-looking frame headers found after bad_offset


def _read_frame(buf: memoryview, pos: int, generation: int) -> tuple[Frame | None, str]:
    """Decode the frame at ``pos``; ``(None, reason)`` if it does not validate."""
    if pos + FRAME_HEADER_SIZE > len(buf):
        return None, "frame header runs past the end of the file"
    head = buf[pos : pos + FRAME_HEADER_SIZE]
    crc, kind, f1, f2, gen_lo, body_crc, body_len, seq, synced = _FRAME.unpack(head)
    if crc != _crc(head[4:], generation):
        return None, "frame header checksum mismatch"
    if gen_lo != generation & 0xFFFFFFFF or kind not in (T_UPSERT, T_DELETE, T_SYNC) or f1 or f2:
        return None, "frame header fields invalid"
    start = pos + FRAME_HEADER_SIZE
    if body_len > len(buf) - start:
        return None, "frame body runs past the end of the file"
    body = buf[start : start + body_len]
    if body_crc != _crc(body, generation):
        return None, "frame body checksum mismatch"
    end = start + body_len + (-(FRAME_HEADER_SIZE + body_len)) % 8
    if kind == T_SYNC:
        return Frame(pos, end, seq, synced, None), ""
    try:
        op = _decode_body(kind, body)
    except (ValueError, struct.error) as exc:
        return None, f"frame body malformed: {exc}"
    except Corrupt as exc:
        return None, str(exc)
    return Frame(pos, end, seq, synced, op), ""


def later_frame_watermarks(buf: memoryview, start: int, generation: int) -> list[int]:
    """Watermarks of valid frame headers at 8-byte-aligned offsets after ``start``.

    Frames start 8-byte aligned, so after a damaged frame (whose length cannot be trusted) the
    rest of the file is searched at aligned offsets; a NumPy pre-filter on the type and
    generation fields keeps the CRC checks to a handful.
    """
    first = start + 8
    n = (len(buf) - first - FRAME_HEADER_SIZE) // 8 + 1
    if n <= 0:
        return []
    words = np.frombuffer(buf, dtype="<u4", count=(len(buf) - first) // 4, offset=first)
    idx = np.arange(n) * 2
    kinds = words[idx + 1] & 0xFF
    candidates = np.flatnonzero(
        ((kinds >= T_UPSERT) & (kinds <= T_SYNC)) & (words[idx + 2] == generation & 0xFFFFFFFF)
    )
    out = []
    for c in candidates.tolist():
        pos = first + 8 * c
        head = buf[pos : pos + FRAME_HEADER_SIZE]
        if _FRAME.unpack(head)[0] == _crc(head[4:], generation):
            out.append(int(_FRAME.unpack(head)[8]))
    return out


def scan(buf: memoryview, generation: int, first_seq: int | None = None) -> ScanResult:
    """Read frames after the header until the end or the first frame that fails to validate.

    ``first_seq``: the sequence number the first data frame must carry (``None``: any). Data
    frames must then be consecutive. When a bad frame is found, the rest of the file is
    searched for frames whose watermark proves the bad one had been made durable.
    """
    result = ScanResult()
    pos = HEADER_SIZE
    expected = first_seq
    while pos < len(buf):
        frame, reason = _read_frame(buf, pos, generation)
        if frame is not None and frame.op is not None and expected is not None and frame.seq != expected:
            reason = f"sequence number {frame.seq} where {expected} was expected"
            frame = None
        if frame is None:
            result.bad_offset = pos
            result.reason = reason
            marks = later_frame_watermarks(buf, pos, generation)
            result.later_frames = len(marks)
            result.confirmed_after = any(m > pos for m in marks)
            break
        if frame.op is not None:
            expected = frame.seq + 1
        result.frames.append(frame)
        pos = result.end = frame.end
    return result
