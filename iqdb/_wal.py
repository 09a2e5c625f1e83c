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

Opening reads the log twice through a bounded window (:class:`WalReader`), never whole:
:func:`scan_reader` validates every frame and counts what a replay adds, then
:func:`replay_ops` decodes the valid frames again one at a time, as views into the bytes read,
for the caller to apply and drop.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import numpy.typing as npt

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
    "WalReader",
    "decode_header",
    "encode_frame",
    "encode_frame_parts",
    "encode_header",
    "encode_sync",
    "later_frame_watermarks",
    "replay_ops",
    "scan",
    "scan_reader",
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
_READ_BLOCK = 1 << 20  # bytes a WalReader reads at a time for small frames
_LITTLE = sys.byteorder == "little"  # frame arrays are then usable in place, without a copy


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


_CHECK, _BUILD = 1, 2  # what reading a frame does with its body: validate it, decode its operation


def _decode_body(kind: int, body: memoryview, mode: int = _CHECK | _BUILD) -> Op | None:
    """The operation in a frame body (``None`` without ``_BUILD``). Its arrays are read-only
    views into ``body`` (no copy on little-endian machines): the store copies them in, so a
    replay holds one frame, not two. Without ``_CHECK`` the vectors are not checked for
    non-finite values (the frame was validated before and its checksum still matches).

    Raises
    ------
    Corrupt, ValueError, struct.error
        The body is malformed.
    """
    count, dim = _COUNTS.unpack_from(body, 0)
    pos = _COUNTS.size
    if mode & _BUILD:
        ids = np.frombuffer(body, dtype="<u8", count=count, offset=pos)
        if not _LITTLE:
            ids = ids.astype(np.uint64)
    elif 8 * count > len(body) - pos:
        raise ValueError("buffer is smaller than requested size")  # as np.frombuffer says it
    pos += 8 * count
    if kind == T_DELETE:
        if pos != len(body):
            raise Corrupt("DELETE frame has trailing bytes")
        return DeleteOp(ids) if mode & _BUILD else None
    flat = np.frombuffer(body, dtype="<f4", count=count * dim, offset=pos)
    if not _LITTLE:
        flat = flat.astype(np.float32)
    pos += 4 * count * dim
    payloads: list[Payload | None]
    if body[pos : pos + 4 * count] == b"\xff" * (4 * count):  # the common case: no payloads
        pos += 4 * count
        payloads = [None] * count
    else:
        lengths = np.frombuffer(body, dtype="<u4", count=count, offset=pos).tolist()
        pos += 4 * count
        payloads = []
        for n in lengths:
            if n == _NO_PAYLOAD:
                payloads.append(None)
                continue
            if pos + n > len(body):
                raise Corrupt("UPSERT frame payload runs past the body")
            payloads.append(decode_payload(body[pos : pos + n]))
            pos += n
    if pos != len(body) or (count and dim == 0) or (mode & _CHECK and not _all_finite(flat)):
        raise Corrupt("UPSERT frame body is malformed")
    return UpsertOp(ids, flat.reshape(count, dim), payloads) if mode & _BUILD else None


def _all_finite(flat: npt.NDArray[np.float32]) -> bool:
    """No NaN or infinity, without a mask as big as a big frame: min and max propagate NaN and
    reach any infinity (for a few rows, one small mask is quicker)."""
    if flat.shape[0] <= 1 << 14:
        return bool(np.logical_and.reduce(np.isfinite(flat)))
    return math.isfinite(np.minimum.reduce(flat)) and math.isfinite(np.maximum.reduce(flat))


class WalReader:
    """Reads a WAL front to back through a bounded window, so no more than one frame (or one
    block of small frames) is in memory at a time.

    ``pread(size, offset)`` returns up to ``size`` bytes at ``offset``; ``size`` is the file
    length when the reader was made. :meth:`over` wraps bytes already in memory.
    """

    def __init__(
        self, pread: Callable[[int, int], bytes] | None, size: int, block: int = _READ_BLOCK
    ) -> None:
        self._pread = pread
        self.size = size
        self.block = block
        self._buf = memoryview(b"")
        self._start = 0

    @classmethod
    def over(cls, buf: bytes | memoryview) -> WalReader:
        """A reader of bytes already in memory (never reads)."""
        reader = cls(None, len(buf))
        reader._buf = memoryview(buf)
        return reader

    def view(self, pos: int, n: int) -> memoryview:
        """Up to ``n`` bytes at ``pos``: fewer at the end of the file, or if it shrank meanwhile.

        A view stays valid after later calls (it keeps its window alive), so callers drop the
        views they are done with before asking for the next piece.
        """
        off = pos - self._start
        if 0 <= off and off + n <= len(self._buf):
            return self._buf[off : off + n]  # the window never reaches past the end of the file
        n = max(0, min(n, self.size - pos))
        if off < 0 or off + n > len(self._buf):
            if self._pread is None:
                return memoryview(b"")
            self._buf = memoryview(b"")  # let the old window go before reading the next
            self._buf, self._start, off = self._read(pos, max(n, min(self.block, self.size - pos))), pos, 0
        return self._buf[off : off + n]

    def _read(self, pos: int, n: int) -> memoryview:
        assert self._pread is not None
        data = self._pread(n, pos)
        if len(data) >= n or not data:
            return memoryview(data)
        # A short read (over 2 GiB in one call on Linux, or a file that shrank): gather the
        # rest into one buffer, a block at a time.
        out = bytearray(n)
        got = len(data)
        out[:got] = data
        del data
        while got < n:
            piece = self._pread(min(n - got, self.block), pos + got)
            if not piece:
                break
            out[got : got + len(piece)] = piece
            got += len(piece)
        return memoryview(out)[:got]


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

    frames: list[Frame] = field(default_factory=list)  # only when the scan keeps them
    end: int = HEADER_SIZE  # end of the valid prefix: where a torn tail would be cut
    bad_offset: int | None = None  # first frame that failed to validate
    reason: str = ""
    confirmed_after: bool = False  # a later valid frame's watermark covers bad_offset
    later_frames: int = 0  # valid-looking frame headers found after bad_offset
    data_frames: int = 0  # valid UPSERT and DELETE frames
    last_seq: int | None = None  # sequence number of the last of them
    rows: int = 0  # rows in the valid UPSERT frames (room a replay may need)
    dim: int | None = None  # dimension of the first valid UPSERT frame with rows


# (end, seq, synced_upto, kind, body, operation) of a frame that validated
_Read = tuple[int, int, int, int, memoryview, Union[Op, None]]  # noqa: UP007


def _read_frame(src: WalReader, pos: int, generation: int, mode: int) -> _Read | str:
    """The frame at ``pos`` (its body decoded as ``mode`` says), or why it does not validate."""
    past_header = "frame header runs past the end of the file"
    if pos + FRAME_HEADER_SIZE > src.size:
        return past_header
    head = src.view(pos, FRAME_HEADER_SIZE)
    if len(head) < FRAME_HEADER_SIZE:
        return past_header
    crc, kind, f1, f2, gen_lo, body_crc, body_len, seq, synced = _FRAME.unpack(head)
    head_ok = crc == _crc(head[4:], generation)
    del head  # the body's read may replace the window
    if not head_ok:
        return "frame header checksum mismatch"
    if gen_lo != generation & 0xFFFFFFFF or kind not in (T_UPSERT, T_DELETE, T_SYNC) or f1 or f2:
        return "frame header fields invalid"
    start = pos + FRAME_HEADER_SIZE
    if body_len > src.size - start:
        return "frame body runs past the end of the file"
    # The header and the body in one view: a small frame then comes from one window read.
    body = src.view(pos, FRAME_HEADER_SIZE + body_len)[FRAME_HEADER_SIZE:]
    if len(body) < body_len:
        return "frame body runs past the end of the file"
    if body_crc != _crc(body, generation):
        return "frame body checksum mismatch"
    end = start + body_len + (-(FRAME_HEADER_SIZE + body_len)) % 8
    if kind == T_SYNC:
        return end, seq, synced, kind, body, None
    try:
        op = _decode_body(kind, body, mode)
    except (ValueError, struct.error) as exc:
        return f"frame body malformed: {exc}"
    except Corrupt as exc:
        return str(exc)
    return end, seq, synced, kind, body, op


_WATERMARK_CHUNK = 1 << 20  # bytes searched at a time after a damaged frame


def later_frame_watermarks(buf: memoryview | WalReader, start: int, generation: int) -> list[int]:
    """Watermarks of valid frame headers at 8-byte-aligned offsets after ``start``.

    Frames start 8-byte aligned, so after a damaged frame (whose length cannot be trusted) the
    rest of the file is searched at aligned offsets, a chunk at a time; a NumPy pre-filter on
    the type and generation fields keeps the CRC checks to a handful.
    """
    src = buf if isinstance(buf, WalReader) else WalReader.over(buf)
    out: list[int] = []
    first = start + 8
    while first + FRAME_HEADER_SIZE <= src.size:
        # Headers starting in [first, first + chunk), whole: chunks overlap by a header less 8.
        chunk = src.view(first, _WATERMARK_CHUNK + FRAME_HEADER_SIZE - 8)
        out += _watermarks_in(chunk, generation)
        del chunk
        first += _WATERMARK_CHUNK
    return out


def _watermarks_in(buf: memoryview, generation: int) -> list[int]:
    """Watermarks of the valid frame headers starting at offsets 0, 8, ... of ``buf``."""
    n = (len(buf) - FRAME_HEADER_SIZE) // 8 + 1
    if n <= 0:
        return []
    words = np.frombuffer(buf, dtype="<u4", count=len(buf) // 4)
    idx = np.arange(n) * 2
    kinds = words[idx + 1] & 0xFF
    candidates = np.flatnonzero(
        ((kinds >= T_UPSERT) & (kinds <= T_SYNC)) & (words[idx + 2] == generation & 0xFFFFFFFF)
    )
    out = []
    for c in candidates.tolist():
        head = buf[8 * c : 8 * c + FRAME_HEADER_SIZE]
        if _FRAME.unpack(head)[0] == _crc(head[4:], generation):
            out.append(int(_FRAME.unpack(head)[8]))
    return out


def scan(buf: memoryview, generation: int, first_seq: int | None = None) -> ScanResult:
    """Read frames after the header until the end or the first frame that fails to validate,
    keeping every decoded frame (``ScanResult.frames``): for logs already in memory."""
    return scan_reader(WalReader.over(buf), generation, first_seq, keep=True)


def scan_reader(
    src: WalReader, generation: int, first_seq: int | None = None, *, keep: bool = False
) -> ScanResult:
    """Validate frames after the header until the end or the first frame that fails to validate.

    Every frame is checked whole (a frame is valid only if its body decodes) and then dropped
    unless ``keep``: the counts in the result size the replay (:func:`replay_ops`) that follows.
    ``first_seq``: the sequence number the first data frame must carry (``None``: any). Data
    frames must then be consecutive. When a bad frame is found, the rest of the file is
    searched for frames whose watermark proves the bad one had been made durable.
    """
    result = ScanResult()
    pos = HEADER_SIZE
    expected = first_seq
    mode = _CHECK | _BUILD if keep else _CHECK
    while pos < src.size:
        read = _read_frame(src, pos, generation, mode)
        if not isinstance(read, str) and read[3] != T_SYNC and expected is not None and read[1] != expected:
            read = f"sequence number {read[1]} where {expected} was expected"
        if isinstance(read, str):
            result.bad_offset = pos
            result.reason = read
            marks = later_frame_watermarks(src, pos, generation)
            result.later_frames = len(marks)
            result.confirmed_after = any(m > pos for m in marks)
            break
        end, seq, synced, kind, body, op = read
        if kind != T_SYNC:
            expected = seq + 1
            result.data_frames += 1
            result.last_seq = seq
            count, dim = _COUNTS.unpack_from(body, 0)
            if kind == T_UPSERT and count:
                result.rows += count
                if result.dim is None:
                    result.dim = dim
        if keep:
            result.frames.append(Frame(pos, end, seq, synced, op))
        pos = result.end = end
        del read, body, op
    return result


def replay_ops(src: WalReader, generation: int, scanned: ScanResult) -> Iterator[Op]:
    """The operations of the frames :func:`scan_reader` validated, decoded again one at a time.

    Raises
    ------
    Corrupt
        A frame no longer validates: the file changed since the scan (a read-only reader
        racing a writer's compaction), so the caller reads everything again.
    """
    pos = HEADER_SIZE
    expected = (scanned.last_seq or 0) - scanned.data_frames + 1  # data frames are consecutive
    left = scanned.data_frames
    while left:
        read = _read_frame(src, pos, generation, _BUILD)
        if isinstance(read, str) or pos >= scanned.end:
            reason = read if isinstance(read, str) else "it grew"
            raise Corrupt(f"WAL changed while it was read ({reason} at offset {pos})")
        pos, seq, op = read[0], read[1], read[5]
        del read  # the caller decides how long the frame's bytes live
        if op is not None:
            if seq != expected:
                raise Corrupt(f"WAL changed while it was read (sequence number {seq})")
            expected += 1
            left -= 1
            yield op
        del op
