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
import time
from collections.abc import Iterator
from typing import Any, Literal, Optional

import numpy as np

from ._backend import Op, UpsertOp, apply_op, merge_upserts
from ._errors import Corrupt, InvalidConfig, Locked, Poisoned, StorageError
from ._fs import FileSystem, OsFileSystem
from ._snapshot import SnapshotData, read_snapshot, write_snapshot
from ._store import ColumnStore
from ._wal import (
    HEADER_SIZE,
    Parts,
    ScanResult,
    WalReader,
    decode_header,
    encode_frame_parts,
    encode_header,
    encode_sync,
    later_frame_watermarks,
    replay_ops,
    scan_reader,
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
        self._poison_cause: BaseException | None = None
        self._last_frame: tuple[int, int, int, int] | None = None  # (start, end, seq before, data end)
        self.recovery: dict[str, Any] = {}

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "readwrite"
        return f"durable {self.path!r} ({mode}, generation {self.generation})"

    # -- the write path -------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.poisoned is not None:
            raise self._poisoned_error("writes refused")
        if self.readonly:
            raise InvalidConfig("the database was opened readonly; writes are refused")

    def _poison(self, why: str, cause: BaseException | None = None) -> None:
        self.poisoned = why
        self._poison_cause = cause
        log.error("iqdb: %s is poisoned: %s", self.path, why)

    def _poisoned_error(self, what: str) -> Poisoned:
        """The error for a refused call: the ``errno``, ``filename`` and ``__cause__`` are those of
        the failure that poisoned the handle."""
        cause = self._poison_cause
        message = f"{what} until the database is reopened: {self.poisoned}"
        if isinstance(cause, OSError) and cause.errno is not None:
            err = Poisoned(message, cause.errno, cause.filename or self.wal_path)
        else:
            err = Poisoned(message)
        err.__cause__ = cause
        return err

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
                self._poison(f"could not roll back a failed WAL append ({undo})", undo)
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
            start, data_end = self._wal_size, self._data_end
            self._append(frame)
            self.last_seq += 1
            self._data_end = self._wal_size
            self._last_frame = (start, self._wal_size, self.last_seq - 1, data_end)
            return (self.generation, self._wal_size)

    def unlog(self, ticket: Ticket) -> None:
        """Cut the frame :meth:`log` just appended (its write could not be applied in memory).

        The cut is fsynced: a machine crash must not bring back a write that was refused. A
        SYNC frame appended after it by a flush goes too (it only restated a watermark). If the
        cut fails, the handle is poisoned and the error raised.
        """
        with self._io:
            if ticket is None or self._last_frame is None or self._last_frame[1] != ticket[1]:
                return
            start, _end, seq_before, data_end = self._last_frame
            self._last_frame = None
            assert self._wal_fd is not None
            try:
                self.fs.ftruncate(self._wal_fd, start)
                self.fs.fsync(self._wal_fd)
            except OSError as exc:
                self._poison(f"could not take a failed write back out of the WAL ({exc})", exc)
                raise _storage_error(exc, "truncating the WAL failed") from exc
            self._wal_size = start
            self._durable = min(self._durable, start)
            self._data_end = data_end
            self.last_seq = seq_before

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
                    raise self._poisoned_error("writes refused")
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
                    self._poison(f"fsync of the WAL failed ({exc})", exc)
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
            self._poison(f"fsync of the new WAL header failed ({exc})", exc)
            raise _storage_error(exc, "fsync of the WAL failed") from exc
        self._durable = self._wal_size

    def flush(self) -> None:
        """fsync the WAL (a failure poisons the handle), then record the watermark in it."""
        with self._io:
            if self.poisoned is not None:
                raise self._poisoned_error("flush refused")
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
        """Write a new snapshot from ``store``'s live rows and empty the WAL (see the module notes).

        Called with the handle's writer mutex held, so ``store`` does not change meanwhile;
        searches go on reading their versions.
        """
        with self._io:
            self._check_writable()
            assert self._wal_fd is not None
            started, emptied = time.perf_counter(), self._wal_size
            ids, vectors, payloads, norms = store.live_columns()
            data = SnapshotData(
                ids=ids,
                vectors=vectors,
                payloads=payloads,
                dim=store.dim,
                generation=self.generation + 1,
                last_seq=self.last_seq,
                norms=norms,
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
                self._poison(f"fsync of the directory failed after renaming the snapshot ({exc})", exc)
                raise _storage_error(exc, "fsync of the database directory failed") from exc
            self.generation += 1
            try:
                # The snapshot covers every frame: empty the WAL. A crash before this is safe
                # (open discards frames of the previous generation the snapshot covers).
                self.fs.ftruncate(self._wal_fd, 0)
                self.fs.fsync(self._wal_fd)
            except OSError as exc:
                self._poison(f"could not reset the WAL after compaction ({exc})", exc)
                raise _storage_error(exc, "resetting the WAL failed") from exc
            self._wal_size = self._durable = self._data_end = 0
        log.info(
            "iqdb: %s: compacted to snapshot generation %d (%d records, %d WAL bytes emptied) in %.3f s",
            self.path,
            self.generation,
            int(ids.shape[0]),
            emptied,
            time.perf_counter() - started,
        )

    def _discard_tmp(self) -> None:
        try:
            if self.fs.exists(self.tmp_path):
                self.fs.unlink(self.tmp_path)
        except OSError:
            log.warning("iqdb: could not remove %s; the next open removes it", self.tmp_path)

    def close(self, store: ColumnStore) -> None:
        """Compact (unless readonly or poisoned, or nothing was logged since the snapshot: an
        empty WAL and a snapshot on disk), then release the files and the lock."""
        try:
            current = self._wal_size == 0 and self.fs.exists(self.snap_path)
            if not self.readonly and self.poisoned is None and not current:
                self.compact(store)
        finally:
            self._release()

    def abandon(self) -> bool:
        """Release the files and the lock without compacting: every write is already in the WAL."""
        held = self._wal_fd is not None or self._lock_fd is not None
        self._release()
        return held

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


def _wal_reader(fs: FileSystem, fd: int) -> WalReader:
    """The WAL open at ``fd``, read in bounded pieces: opening never holds the whole log (it
    can be larger than the data it adds), only the frame being validated or applied."""
    return WalReader(lambda size, offset: fs.pread(fd, size, offset), fs.fsize(fd))


def _inspect_wal(fs: FileSystem, path: str, snap_gen: int, snap_seq: int) -> dict[str, Any]:
    if not fs.exists(path):
        return {"bytes": 0, "frames": 0}
    fd = fs.open(path, os.O_RDONLY)
    try:
        src = _wal_reader(fs, fd)
        info: dict[str, Any] = {"bytes": src.size, "frames": 0, "torn_tail_bytes": 0}
        if src.size < HEADER_SIZE:
            info["torn_tail_bytes"] = src.size
            return info
        gen = decode_header(src.view(0, HEADER_SIZE))
        if gen not in (snap_gen, snap_gen - 1):
            raise Corrupt(f"WAL generation {gen} does not match the snapshot's {snap_gen}")
        result = scan_reader(src, gen, snap_seq + 1 if gen == snap_gen else None)
    finally:
        fs.close(fd)
    if result.bad_offset is not None and result.confirmed_after:
        raise Corrupt(
            f"WAL damaged at offset {result.bad_offset} ({result.reason}) below a durable watermark"
        )
    info.update(
        generation=gen,
        frames=result.data_frames,
        torn_tail_bytes=src.size - result.end if result.bad_offset is not None else 0,
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
    if not (isinstance(sync, str) and sync in ("flush", "always")):
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
            log.info("iqdb: %s: removed snap.tmp, left by a compaction that did not finish", b.path)
    # The vectors' checksum is checked while the store copies them (a single pass over the map).
    snap = read_snapshot(fs, b.snap_path, defer_vectors=True) if fs.exists(b.snap_path) else None
    if snap is not None:
        b.generation, b.last_seq = snap.generation, snap.last_seq
    b.recovery = {
        "snapshot_rows": 0 if snap is None else int(snap.ids.shape[0]),
        "generation": b.generation,
        "replayed": 0,
        "truncated_bytes": 0,
        "stale_wal_discarded": False,
    }
    fd: int | None = None
    if b.readonly:
        if fs.exists(b.wal_path):
            fd = fs.open(b.wal_path, os.O_RDONLY)
    else:
        created = not fs.exists(b.wal_path)
        fd = b._wal_fd = fs.open(b.wal_path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        if created:
            # A new file's directory entry is durable only after an fsync of the directory;
            # without it a flush() before the first compaction would fsync a file that may vanish.
            fs.fsync_dir(b.path)
    try:
        # Two passes over the log, neither holding more than a frame: the first validates it
        # (and repairs it) and counts its rows, the second decodes and applies it frame by frame.
        src = None if fd is None else _wal_reader(fs, fd)
        plan = None if src is None else _recover_wal(b, src, None if b.readonly else fd)
        # Room for what the replay may add, so it never grows (and copies) the matrix. Without
        # a snapshot, or with one that has no rows, the log gives the dimension.
        extra = 0 if plan is None else plan.rows
        if snap is not None and snap.dim is not None:
            store.load(snap.ids, snap.vectors, snap.payloads, snap.dim, snap.norms, extra, snap.vectors_crc)
        elif plan is not None and plan.dim is not None:
            empty = np.empty((0, plan.dim), dtype=np.float32)
            store.load(np.empty(0, dtype=np.uint64), empty, [], plan.dim, extra=extra)
        elif snap is not None:
            store.load(snap.ids, snap.vectors, snap.payloads, snap.dim, snap.norms, 0, snap.vectors_crc)
        snap = None  # the replay needs only the store
        if src is not None and plan is not None:
            _replay(store, replay_ops(src, b.generation, plan))
            b.recovery["replayed"] = plan.data_frames
            if plan.data_frames:
                log.info(
                    "iqdb: %s: replayed %d WAL frame(s) after snapshot generation %d",
                    b.path,
                    plan.data_frames,
                    b.generation,
                )
    finally:
        if b.readonly and fd is not None:
            fs.close(fd)
    if b._wal_fd is not None:
        b._wal_size = fs.fsize(b._wal_fd)
        # Whatever the last process left in the page cache is made durable now, so the
        # watermark this process writes into frames is true from the first one on.
        fs.fsync(b._wal_fd)
        b._durable = b._data_end = b._wal_size


_REPLAY_BATCH = 1 << 20  # bytes of logged vectors a replay merges into one bulk upsert


def _replay(store: ColumnStore, ops: Iterator[Op]) -> None:
    """Apply logged operations in order as they are decoded. Runs of small upserts go in as one
    bulk upsert of up to ``_REPLAY_BATCH`` bytes (a store call per record costs more than the
    copy); a bigger frame goes in alone, from the bytes it was read into."""
    run: list[UpsertOp] = []
    size = 0
    for op in ops:
        if isinstance(op, UpsertOp):
            if store.dim not in (None, op.vectors.shape[1]) or (
                run and run[0].vectors.shape[1] != op.vectors.shape[1]
            ):
                raise Corrupt(f"WAL holds a vector of dimension {op.vectors.shape[1]}, not {store.dim}")
            if run and size + op.vectors.nbytes > _REPLAY_BATCH:
                apply_op(store, merge_upserts(run))
                run, size = [], 0
            run.append(op)
            size += op.vectors.nbytes
            if size >= _REPLAY_BATCH:  # a big frame goes in before the next one is read
                apply_op(store, merge_upserts(run))
                run, size = [], 0
        else:
            if run:
                apply_op(store, merge_upserts(run))
                run, size = [], 0
            apply_op(store, op)
        del op  # before the next frame is read: its bytes go unless the run holds them
    if run:
        apply_op(store, merge_upserts(run))


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


def _recover_wal(b: DurableBackend, src: WalReader, fd: int | None) -> ScanResult | None:
    """Validate the WAL that ``src`` reads: the scan of the frames the snapshot does not cover
    (their operations come from :func:`replay_ops`), or ``None`` when it has none. Cuts a torn
    tail and resets a stale log when ``fd`` is writable."""
    fs = b.fs
    size = src.size
    if size == 0:
        return None
    if size < HEADER_SIZE:
        # The header is written and fsynced alone before any frame: a short file is a header
        # whose creation was cut off, with nothing acknowledged after it.
        _cut(b, fd, 0, size, "incomplete WAL header")
        return None
    try:
        gen = decode_header(src.view(0, HEADER_SIZE))
    except Corrupt:
        # Damage to a header with frames after it is corruption. With no frame of this or the
        # previous generation anywhere after it, it is junk in an empty log: nothing
        # acknowledged can be lost by cutting it.
        if any(later_frame_watermarks(src, HEADER_SIZE - 8, g) for g in (b.generation, b.generation - 1)):
            raise
        _cut(b, fd, 0, size, "WAL header invalid and no frame follows")
        return None
    if gen == b.generation:
        stale = False
    elif gen == b.generation - 1:
        stale = True  # crash after a compaction's commit point, before the WAL reset
    else:
        raise Corrupt(f"WAL generation {gen} does not match the snapshot's generation {b.generation}")
    result = scan_reader(src, gen, None if stale else b.last_seq + 1)
    if result.bad_offset is not None:
        if result.confirmed_after:
            raise Corrupt(
                f"WAL {b.wal_path!r} is damaged at offset {result.bad_offset} ({result.reason}), "
                "and later frames show it had been made durable"
            )
        _cut(b, fd, result.end, size - result.end, result.reason, result.later_frames)
    if fd is not None and result.end > size:
        # The last frame is whole but its zero padding was cut off: restore the padding, so the
        # next frame starts at the aligned offset the next scan will look at.
        fs.ftruncate(fd, result.end)
        fs.fsync(fd)
    if stale:
        # Data frames are consecutive, so the last one has the highest sequence number.
        if result.last_seq is not None and result.last_seq > b.last_seq:
            raise Corrupt("WAL of the previous generation holds writes the snapshot does not cover")
        b.recovery["stale_wal_discarded"] = True
        log.info(
            "iqdb: %s: discarded a WAL of generation %d that the snapshot already covers "
            "(a compaction stopped before emptying it)",
            b.wal_path,
            gen,
        )
        if fd is not None:
            fs.ftruncate(fd, 0)
            fs.fsync(fd)
        return None
    if result.last_seq is not None:
        b.last_seq = result.last_seq
    return result


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
