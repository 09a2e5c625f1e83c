"""The durable backend: a directory holding an Arrow snapshot and a write-ahead log.

>>> import iqdb, tempfile
>>> path = tempfile.mkdtemp()
>>> with iqdb.open(path) as db:
...     db.upsert(iqdb.Record(1, [0.5, 0.5]))
>>> with iqdb.open(path) as db:
...     len(db)
1

Directory layout::

    path/snap       Arrow IPC file (see iqdb._snapshot), written only by compaction
    path/snap.tmp   exists only while a compaction writes it
    path/wal        write-ahead log (see iqdb._wal); 0 bytes right after a compaction
    path/LOCK       flock-ed by the one writer; holds its pid for error messages

Promises and how they are kept:

* *Every write reaches the OS before the call returns.* ``log`` appends the whole frame with
  ``os.write`` (looping over short writes) under the I/O lock, before the handle applies the
  operation in memory. A failed append is truncated away, so no later frame is built on
  garbage; if even the truncate fails, the handle is poisoned.
* *``flush()`` makes it survive power loss.* fsync of the WAL. A failed fsync poisons the
  handle: Linux may have dropped the dirty pages and marked them clean, so a retry could
  falsely succeed ("fsyncgate").
* *Compaction is atomic.* ``snap.tmp`` is written and fsynced, renamed over ``snap``, and the
  directory fsynced: that is the commit point. Only then is the WAL truncated and fsynced. The
  snapshot records its generation and last sequence number, so a crash between the commit and
  the truncate leaves a WAL whose frames the snapshot already covers: open discards them
  instead of applying them twice.
* *Open recovers exactly.* Frames after the snapshot's sequence number are replayed in order;
  the first frame that fails to validate ends the log. If a later frame's durable watermark
  shows the damaged one had been fsynced, that is corruption and open raises ``Corrupt``;
  otherwise it is a torn tail from the unsynced window and is truncated (and logged).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any, Literal, Optional

from ._backend import Op, UpsertOp, apply_op, merge_upserts
from ._errors import Corrupt, InvalidConfig, Locked, Poisoned, StorageError
from ._fs import FileSystem, OsFileSystem
from ._snapshot import SnapshotData, read_snapshot, write_snapshot
from ._store import ColumnStore
from ._wal import (
    HEADER_SIZE,
    Parts,
    decode_header,
    encode_frame_parts,
    encode_header,
    encode_sync,
    later_frame_watermarks,
    scan,
)

__all__ = ["DurableBackend", "open_durable"]

log = logging.getLogger("iqdb")

DEFAULT_WAL_LIMIT = 256 << 20
_JOIN_BELOW = 1 << 20
SyncMode = Literal["flush", "always"]
# (generation, WAL end offset) of a logged write, or None when nothing was logged.
Ticket = Optional[tuple[int, int]]  # noqa: UP045


def _storage_error(exc: OSError, what: str) -> StorageError:
    err = StorageError(f"{what}: {exc.strerror or exc}", exc.errno, exc.filename)
    err.__cause__ = exc
    return err


class DurableBackend:
    """Snapshot + WAL persistence behind the :class:`~iqdb._backend.Backend` protocol."""

    def __init__(self, fs: FileSystem, path: str, readonly: bool, sync: SyncMode, wal_limit: int) -> None:
        self.fs = fs
        self.path = path
        self.readonly = readonly
        self.sync = sync
        self.wal_limit = wal_limit
        self.snap_path = os.path.join(path, "snap")
        self.tmp_path = os.path.join(path, "snap.tmp")
        self.wal_path = os.path.join(path, "wal")
        self.lock_path = os.path.join(path, "LOCK")
        self._io = threading.Lock()  # the WAL's offsets and appends
        self._sync_mutex = threading.Lock()  # one fsync at a time (group commit leader)
        self._lock_fd: int | None = None
        self._wal_fd: int | None = None
        self.generation = 0  # of the snapshot, and of the WAL frames being written
        self.last_seq = 0  # sequence number of the last logged write
        self._wal_size = 0  # bytes in the WAL (the append offset)
        self._durable = 0  # WAL bytes confirmed by fsync: the watermark put in frames
        self._data_end = 0  # end of the last data frame (SYNC frames need no flush)
        self.poisoned: str | None = None
        self.recovery: dict[str, Any] = {}

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "readwrite"
        return f"durable {self.path!r} ({mode}, generation {self.generation})"

    # -- the write path -------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.poisoned is not None:
            raise Poisoned(f"writes refused until the database is reopened: {self.poisoned}")
        if self.readonly:
            raise InvalidConfig("the database was opened readonly; writes are refused")

    def _poison(self, why: str) -> None:
        self.poisoned = why
        log.error("iqdb: %s is poisoned: %s", self.path, why)

    def _append(self, data: bytes | Parts) -> None:
        """Append all of ``data`` (bytes, or pieces written in order) to the WAL, or leave the
        file as it was (else poison)."""
        assert self._wal_fd is not None
        start = self._wal_size
        if isinstance(data, bytes):
            pieces: Parts = [data]
        elif sum(len(p) for p in data) <= _JOIN_BELOW:
            pieces = [b"".join(data)]  # one system call for a small frame
        else:
            pieces = data  # a big frame: no copy of its vectors
        written = 0
        try:
            for piece in pieces:
                view = memoryview(piece)
                done = 0
                while done < len(view):
                    n = self.fs.write(self._wal_fd, view[done:])
                    if n <= 0:
                        raise OSError(errno.EIO, "write made no progress", self.wal_path)
                    done += n
                written += done
        except BaseException as exc:
            # Cut off the partial frame now: a later append after it would turn a torn tail
            # into corruption in the middle of the log.
            try:
                self.fs.ftruncate(self._wal_fd, start)
                if self.fs.fsize(self._wal_fd) != start:
                    raise OSError(errno.EIO, "truncate did not take", self.wal_path)
            except BaseException as undo:
                self._poison(f"could not roll back a failed WAL append ({undo})")
            if isinstance(exc, OSError):
                raise _storage_error(exc, "appending to the WAL failed") from exc
            raise
        self._wal_size = start + written

    def log(self, op: Op) -> Ticket:
        """Append ``op`` as one frame (all encoding before any I/O); a ticket for :meth:`commit`."""
        with self._io:
            self._check_writable()
            frame = encode_frame_parts(op, self.last_seq + 1, self.generation, self._durable)
            if self._wal_size == 0:
                self._start_wal()
            self._append(frame)
            self.last_seq += 1
            self._data_end = self._wal_size
            return (self.generation, self._wal_size)

    def commit(self, ticket: Ticket) -> None:
        """With ``sync="always"``, return once the write that got ``ticket`` is durable.

        Called after the handle released its writer lock, so other writers keep appending
        while this fsync runs, and one fsync covers every frame appended before it started
        (group commit): a writer whose frame is already covered returns without an fsync.
        """
        if self.sync == "always" and ticket is not None:
            self._sync_to(ticket)

    def _sync_to(self, ticket: tuple[int, int]) -> None:
        generation, end = ticket
        with self._sync_mutex:
            with self._io:
                if self.poisoned is not None:
                    raise Poisoned(f"writes refused until the database is reopened: {self.poisoned}")
                # A compaction since then put the write in an fsynced snapshot.
                if generation != self.generation or self._durable >= end:
                    return
                target, fd = self._wal_size, self._wal_fd
            assert fd is not None
            try:
                self.fs.fsync(fd)
            except OSError as exc:
                with self._io:
                    # Never retry: after a failed fsync the kernel may have marked the lost
                    # pages clean, so a second fsync could succeed without writing them.
                    self._poison(f"fsync of the WAL failed ({exc})")
                raise _storage_error(exc, "fsync of the WAL failed") from exc
            with self._io:
                if self.generation == generation:
                    self._durable = max(self._durable, target)

    def _start_wal(self) -> None:
        """Write and fsync the header of an empty WAL before its first frame: afterwards a bad
        header can only be damage, never a torn write, so open can refuse it safely."""
        assert self._wal_fd is not None
        self._append(encode_header(self.generation))
        try:
            self.fs.fsync(self._wal_fd)
        except OSError as exc:
            self._poison(f"fsync of the new WAL header failed ({exc})")
            raise _storage_error(exc, "fsync of the WAL failed") from exc
        self._durable = self._wal_size

    def flush(self) -> None:
        """fsync the WAL (a failure poisons the handle), then record the watermark in it."""
        with self._io:
            if self.poisoned is not None:
                raise Poisoned(f"flush refused until the database is reopened: {self.poisoned}")
            if self.readonly or self._durable >= self._data_end:
                return
            ticket = (self.generation, self._wal_size)
        self._sync_to(ticket)
        with self._io:
            if self.poisoned is not None or self.generation != ticket[0]:
                return
            # The watermark goes into the log itself, unsynced: it only needs to exist if later
            # damage must be told apart from a torn tail.
            try:
                self._append(encode_sync(self.last_seq, self.generation, self._durable))
            except StorageError:
                if self.poisoned is not None:
                    raise
                log.warning("iqdb: could not append a SYNC frame to %s; data is durable", self.wal_path)

    def wants_compaction(self) -> bool:
        """The WAL has grown past ``wal_limit``."""
        return not self.readonly and self.poisoned is None and self._wal_size > self.wal_limit

    def compact(self, store: ColumnStore) -> None:
        """Write a new snapshot from ``store`` and empty the WAL (see the module notes)."""
        with self._io:
            self._check_writable()
            assert self._wal_fd is not None
            data = SnapshotData(
                ids=store.ids,
                vectors=store.backend.to_host(store.matrix),
                payloads=store.payloads,
                dim=store.dim,
                generation=self.generation + 1,
                last_seq=self.last_seq,
                norms=store.backend.to_host(store.norms),
            )
            try:
                write_snapshot(self.fs, self.tmp_path, data)  # written and fsynced
                self.fs.replace(self.tmp_path, self.snap_path)
            except BaseException as exc:
                self._discard_tmp()
                if isinstance(exc, OSError):
                    raise _storage_error(exc, "writing the snapshot failed") from exc
                raise
            try:
                # The commit point: once the rename is durable, the new snapshot is the truth.
                self.fs.fsync_dir(self.path)
            except OSError as exc:
                self._poison(f"fsync of the directory failed after renaming the snapshot ({exc})")
                raise _storage_error(exc, "fsync of the database directory failed") from exc
            self.generation += 1
            try:
                # The snapshot covers every frame: empty the WAL. A crash before this is safe
                # (open discards frames of the previous generation the snapshot covers).
                self.fs.ftruncate(self._wal_fd, 0)
                self.fs.fsync(self._wal_fd)
            except OSError as exc:
                self._poison(f"could not reset the WAL after compaction ({exc})")
                raise _storage_error(exc, "resetting the WAL failed") from exc
            self._wal_size = self._durable = self._data_end = 0

    def _discard_tmp(self) -> None:
        try:
            if self.fs.exists(self.tmp_path):
                self.fs.unlink(self.tmp_path)
        except OSError:
            log.warning("iqdb: could not remove %s; the next open removes it", self.tmp_path)

    def close(self, store: ColumnStore) -> None:
        """Compact (unless readonly or poisoned), then release the files and the lock."""
        try:
            if not self.readonly and self.poisoned is None:
                self.compact(store)
        finally:
            self._release()

    def _release(self) -> None:
        for fd in (self._wal_fd, self._lock_fd):
            if fd is not None:
                try:
                    self.fs.close(fd)
                except OSError:
                    log.warning("iqdb: closing a file of %s failed", self.path)
        self._wal_fd = self._lock_fd = None

    # -- checking -------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Verify the snapshot and the WAL as they are on disk now; changes nothing."""
        report: dict[str, Any] = {"ok": True, "path": self.path, "problems": []}
        snap_gen, snap_seq = 0, 0
        if self.fs.exists(self.snap_path):
            try:
                snap = read_snapshot(self.fs, self.snap_path)
                snap_gen, snap_seq = snap.generation, snap.last_seq
                report["snapshot"] = {
                    "rows": int(snap.ids.shape[0]),
                    "dim": snap.dim,
                    "generation": snap_gen,
                    "last_seq": snap_seq,
                }
            except (Corrupt, OSError) as exc:
                report["problems"].append(f"snapshot: {exc}")
        else:
            report["snapshot"] = None
        try:
            report["wal"] = _inspect_wal(self.fs, self.wal_path, snap_gen, snap_seq)
        except (Corrupt, OSError) as exc:
            report["problems"].append(f"wal: {exc}")
        if report.get("wal", {}).get("torn_tail_bytes"):
            report["problems"].append(f"wal: torn tail of {report['wal']['torn_tail_bytes']} bytes")
        report["ok"] = not report["problems"]
        report["poisoned"] = self.poisoned
        return report


def _read_all(fs: FileSystem, fd: int) -> memoryview:
    size = fs.fsize(fd)
    chunks = []
    pos = 0
    while pos < size:
        chunk = fs.pread(fd, min(size - pos, 64 << 20), pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return memoryview(b"".join(chunks))


def _inspect_wal(fs: FileSystem, path: str, snap_gen: int, snap_seq: int) -> dict[str, Any]:
    if not fs.exists(path):
        return {"bytes": 0, "frames": 0}
    fd = fs.open(path, os.O_RDONLY)
    try:
        buf = _read_all(fs, fd)
    finally:
        fs.close(fd)
    info: dict[str, Any] = {"bytes": len(buf), "frames": 0, "torn_tail_bytes": 0}
    if len(buf) < HEADER_SIZE:
        info["torn_tail_bytes"] = len(buf)
        return info
    gen = decode_header(buf)
    if gen not in (snap_gen, snap_gen - 1):
        raise Corrupt(f"WAL generation {gen} does not match the snapshot's {snap_gen}")
    result = scan(buf, gen, snap_seq + 1 if gen == snap_gen else None)
    if result.bad_offset is not None and result.confirmed_after:
        raise Corrupt(
            f"WAL damaged at offset {result.bad_offset} ({result.reason}) below a durable watermark"
        )
    info.update(
        generation=gen,
        frames=sum(f.op is not None for f in result.frames),
        torn_tail_bytes=len(buf) - result.end if result.bad_offset is not None else 0,
    )
    return info


def open_durable(
    path: str,
    store: ColumnStore,
    *,
    readonly: bool = False,
    sync: SyncMode = "flush",
    wal_limit: int = DEFAULT_WAL_LIMIT,
    fs: FileSystem | None = None,
) -> DurableBackend:
    """Open (or create) the directory ``path``, load it into ``store`` and return the backend.

    Parameters
    ----------
    sync
        ``"flush"`` (default: fsync on ``flush()``/``close()``) or ``"always"`` (fsync every write).
    wal_limit
        Compact automatically once the WAL exceeds this many bytes.
    fs
        The file-system seam (tests pass a fault-injecting one).

    Raises
    ------
    InvalidConfig, Locked, Corrupt, StorageError
        See :meth:`iqdb.Iqdb.open`.
    """
    if sync not in ("flush", "always"):
        raise InvalidConfig(f"sync must be 'flush' or 'always', got {sync!r}")
    if isinstance(wal_limit, bool) or not isinstance(wal_limit, int) or wal_limit <= 0:
        raise InvalidConfig(f"wal_limit must be a positive int, got {wal_limit!r}")
    fs = fs or OsFileSystem()
    path = os.path.abspath(path)
    backend = DurableBackend(fs, path, readonly, sync, wal_limit)
    try:
        for attempt in range(_READONLY_RETRIES):
            before = _fingerprint(fs, backend) if readonly else ()
            try:
                _open(backend, store)
                break
            except Corrupt:
                # A read-only reader takes no lock, so a writer may compact between its reads
                # of `snap` and `wal` (a new snapshot with an old log, or the reverse). If the
                # files changed meanwhile, read them again; damage that stays put is reported.
                if not readonly or attempt == _READONLY_RETRIES - 1 or _fingerprint(fs, backend) == before:
                    raise
                store.clear()
    except OSError as exc:
        backend._release()
        raise _storage_error(exc, f"opening {path!r} failed") from exc
    except BaseException:
        backend._release()
        raise
    return backend


_READONLY_RETRIES = 5


def _fingerprint(fs: FileSystem, b: DurableBackend) -> tuple[object, ...]:
    return tuple(fs.stat_key(p) for p in (b.snap_path, b.wal_path))


def _open(b: DurableBackend, store: ColumnStore) -> None:
    fs = b.fs
    if fs.exists(b.path) and not fs.isdir(b.path):
        raise InvalidConfig(f"{b.path!r} exists and is not a directory")
    if b.readonly:
        if not fs.isdir(b.path):
            raise FileNotFoundError(errno.ENOENT, "no database directory", b.path)
    else:
        if not fs.isdir(b.path):
            fs.makedirs(b.path)
            # The new directory's own entry must be durable before anything in it can be.
            fs.fsync_dir(os.path.dirname(b.path))
        _take_lock(b)
        if fs.exists(b.tmp_path):
            fs.unlink(b.tmp_path)  # a compaction died before its commit point
    snap = read_snapshot(fs, b.snap_path) if fs.exists(b.snap_path) else None
    if snap is not None:
        b.generation, b.last_seq = snap.generation, snap.last_seq
    b.recovery = {
        "snapshot_rows": 0 if snap is None else int(snap.ids.shape[0]),
        "generation": b.generation,
        "replayed": 0,
        "truncated_bytes": 0,
        "stale_wal_discarded": False,
    }
    ops: list[Op] = []
    if b.readonly:
        if fs.exists(b.wal_path):
            fd = fs.open(b.wal_path, os.O_RDONLY)
            try:
                ops = _recover_wal(b, _read_all(fs, fd), None)
            finally:
                fs.close(fd)
    else:
        created = not fs.exists(b.wal_path)
        b._wal_fd = fs.open(b.wal_path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        if created:
            # A new file's directory entry is durable only after an fsync of the directory;
            # without it a flush() before the first compaction would fsync a file that may vanish.
            fs.fsync_dir(b.path)
        ops = _recover_wal(b, _read_all(fs, b._wal_fd), b._wal_fd)
    if snap is not None:
        # Room for what the replay may add, so it never reallocates the loaded matrix.
        extra = sum(int(op.ids.shape[0]) for op in ops if isinstance(op, UpsertOp))
        store.load(snap.ids, snap.vectors, snap.payloads, snap.dim, snap.norms, extra=extra)
    _replay(store, ops)
    b.recovery["replayed"] = len(ops)
    if b._wal_fd is not None:
        b._wal_size = fs.fsize(b._wal_fd)
        # Whatever the last process left in the page cache is made durable now, so the
        # watermark this process writes into frames is true from the first one on.
        fs.fsync(b._wal_fd)
        b._durable = b._data_end = b._wal_size


def _replay(store: ColumnStore, ops: list[Op]) -> None:
    """Apply logged operations in order; runs of upserts go in as one bulk upsert."""
    run: list[UpsertOp] = []
    for op in [*ops, None]:
        if isinstance(op, UpsertOp):
            if store.dim not in (None, op.vectors.shape[1]) or (
                run and run[0].vectors.shape[1] != op.vectors.shape[1]
            ):
                raise Corrupt(f"WAL holds a vector of dimension {op.vectors.shape[1]}, not {store.dim}")
            run.append(op)
            continue
        if run:
            apply_op(store, merge_upserts(run))
            run = []
        if op is not None:
            apply_op(store, op)


def _take_lock(b: DurableBackend) -> None:
    fs = b.fs
    fd = fs.open(b.lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fs.lock(fd)
    except BlockingIOError:
        holder = fs.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        fs.close(fd)
        raise Locked(f"{b.path!r} is already open for writing (by process {holder})") from None
    except BaseException:
        fs.close(fd)
        raise
    b._lock_fd = fd
    fs.ftruncate(fd, 0)
    fs.write(fd, f"{os.getpid()}\n".encode())


def _recover_wal(b: DurableBackend, buf: memoryview, fd: int | None) -> list[Op]:
    """The operations in the WAL (``buf``) that the snapshot does not cover, in order; cuts a
    torn tail and resets a stale log when ``fd`` is writable."""
    fs = b.fs
    if len(buf) == 0:
        return []
    if len(buf) < HEADER_SIZE:
        # The header is written and fsynced alone before any frame: a short file is a header
        # whose creation was cut off, with nothing acknowledged after it.
        _cut(b, fd, 0, len(buf), "incomplete WAL header")
        return []
    try:
        gen = decode_header(buf)
    except Corrupt:
        # Damage to a header with frames after it is corruption. With no frame of this or the
        # previous generation anywhere after it, it is junk in an empty log: nothing
        # acknowledged can be lost by cutting it.
        if any(later_frame_watermarks(buf, HEADER_SIZE - 8, g) for g in (b.generation, b.generation - 1)):
            raise
        _cut(b, fd, 0, len(buf), "WAL header invalid and no frame follows")
        return []
    if gen == b.generation:
        stale = False
    elif gen == b.generation - 1:
        stale = True  # crash after a compaction's commit point, before the WAL reset
    else:
        raise Corrupt(f"WAL generation {gen} does not match the snapshot's generation {b.generation}")
    result = scan(buf, gen, None if stale else b.last_seq + 1)
    if result.bad_offset is not None:
        if result.confirmed_after:
            raise Corrupt(
                f"WAL {b.wal_path!r} is damaged at offset {result.bad_offset} ({result.reason}), "
                "and later frames show it had been made durable"
            )
        _cut(b, fd, result.end, len(buf) - result.end, result.reason, result.later_frames)
    if fd is not None and result.end > len(buf):
        # The last frame is whole but its zero padding was cut off: restore the padding, so the
        # next frame starts at the aligned offset the next scan will look at.
        fs.ftruncate(fd, result.end)
        fs.fsync(fd)
    data_frames = [f for f in result.frames if f.op is not None]
    if stale:
        if any(f.seq > b.last_seq for f in data_frames):
            raise Corrupt("WAL of the previous generation holds writes the snapshot does not cover")
        b.recovery["stale_wal_discarded"] = True
        if fd is not None:
            fs.ftruncate(fd, 0)
            fs.fsync(fd)
        return []
    if data_frames:
        b.last_seq = data_frames[-1].seq
    return [f.op for f in data_frames if f.op is not None]


def _cut(b: DurableBackend, fd: int | None, at: int, dropped: int, reason: str, later: int = 0) -> None:
    b.recovery["truncated_bytes"] = dropped
    b.recovery["truncated_reason"] = reason
    log.warning(
        "iqdb: %s: dropping a torn tail of %d bytes at offset %d (%s; %d later frame headers)",
        b.wal_path,
        dropped,
        at,
        reason,
        later,
    )
    if fd is not None:
        b.fs.ftruncate(fd, at)
        b.fs.fsync(fd)
