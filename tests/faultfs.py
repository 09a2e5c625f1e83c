"""Fault-injecting file systems for the durability tests (a helper module, not a test file).

>>> import iqdb, tempfile
>>> fs = CountingFs()
>>> db = iqdb.open(tempfile.mkdtemp(), fs=fs)
>>> db.close()
>>> fs.count("fsync_dir") >= 1
True

Every file-system call iqdb's durable engine makes goes through one :class:`iqdb._fs.FileSystem`
(``iqdb.open(path, fs=...)``). The subclasses here wrap that seam:

* :class:`CountingFs` records each call (index, name, path, descriptor), so a workload's calls
  can be enumerated and a fault placed at every one of them.
* :class:`CrashFs` is the process-kill model: the ``crash_at``-th call raises
  :class:`SimulatedCrash` before it happens, and every later call raises too (the process is
  dead). :meth:`CrashFs.kill` then closes the descriptors the dead process held, as the kernel
  would, which releases its lock; everything written so far stays in the files.
* :class:`PowerLossFs` is the power-loss model: it also tracks what an fsync made durable (a
  file's bytes as of its last ``fsync``; a directory's entries as of its last ``fsync_dir``), and
  :meth:`PowerLossFs.crash` rewrites the real directory to that durable state, optionally keeping
  part of the unsynced appended bytes (a torn write) or their size with zeros in them.
* :class:`ErrorFs` makes the N-th call (of one kind, or of any kind) fail with an ``OSError``
  carrying a chosen errno (ENOSPC, EIO, ...), once or from then on, or makes a write short and
  the next one fail.

The simulated file systems skip the real ``fsync`` by default (``real_sync=False``): what survives
a simulated crash is decided by the model, not by the disk, and real fsyncs would only slow the
tests down.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import math
import os
import random
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from iqdb._fs import FileSystem

__all__ = [
    "Call",
    "CountingFs",
    "CrashFs",
    "ErrorFs",
    "PowerLossFs",
    "SimulatedCrash",
    "canon",
    "db_state",
]


class SimulatedCrash(BaseException):
    """The simulated process died at this file-system call.

    A ``BaseException`` so that the engine's ``except Exception``/``except OSError`` handlers
    cannot swallow it, just as they could not run after a real ``kill -9``.
    """


@dataclass(frozen=True)
class Call:
    """One file-system call: its position, the method name and what it touched."""

    index: int
    op: str
    path: str | None
    fd: int | None = None


class CountingFs(FileSystem):
    """Records every call the engine makes, in order.

    Parameters
    ----------
    real_sync
        Perform real ``fsync``/directory fsyncs (``True``), or skip them (``False``; simulated
        crash models decide durability themselves).
    """

    def __init__(self, *, real_sync: bool = True) -> None:
        self.calls: list[Call] = []
        self.real_sync = real_sync
        self.paths: dict[int, str] = {}  # open descriptor -> path it was opened with

    # -- bookkeeping ----------------------------------------------------------------------
    def _enter(self, op: str, path: str | None = None, fd: int | None = None) -> None:
        """Called before each operation; subclasses raise here to inject faults."""
        if path is None and fd is not None:
            path = self.paths.get(fd)
        self.calls.append(Call(len(self.calls), op, path, fd))

    def count(self, op: str | None = None) -> int:
        """How many calls (of ``op``, or of any kind) were made."""
        return len(self.calls) if op is None else sum(c.op == op for c in self.calls)

    def ops(self) -> list[str]:
        """The names of the calls, in order."""
        return [c.op for c in self.calls]

    # -- the seam ---------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        self._enter("open", path)
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        self._opened(fd, path)
        return fd

    def _opened(self, fd: int, path: str) -> None:
        """Hook after a successful open."""

    def close(self, fd: int) -> None:
        self._enter("close", fd=fd)
        super().close(fd)
        self.paths.pop(fd, None)
        self._closed(fd)

    def _closed(self, fd: int) -> None:
        """Hook after a successful close."""

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._enter("write", fd=fd)
        return self._do_write(fd, data)

    def _do_write(self, fd: int, data: bytes | memoryview) -> int:
        return super().write(fd, data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self._enter("pread", fd=fd)
        return super().pread(fd, size, offset)

    def fsync(self, fd: int) -> None:
        self._enter("fsync", fd=fd)
        if self.real_sync:
            super().fsync(fd)
        self._synced(fd)

    def _synced(self, fd: int) -> None:
        """Hook after a successful fsync."""

    def ftruncate(self, fd: int, length: int) -> None:
        self._enter("ftruncate", fd=fd)
        super().ftruncate(fd, length)

    def fsize(self, fd: int) -> int:
        self._enter("fsize", fd=fd)
        return super().fsize(fd)

    def replace(self, src: str, dst: str) -> None:
        self._enter("replace", src)
        super().replace(src, dst)
        self._replaced(src, dst)

    def _replaced(self, src: str, dst: str) -> None:
        """Hook after a successful rename."""

    def unlink(self, path: str) -> None:
        self._enter("unlink", path)
        super().unlink(path)
        self._unlinked(path)

    def _unlinked(self, path: str) -> None:
        """Hook after a successful unlink."""

    def exists(self, path: str) -> bool:
        self._enter("exists", path)
        return super().exists(path)

    def stat_key(self, path: str) -> Any:
        self._enter("stat_key", path)
        return super().stat_key(path)

    def isdir(self, path: str) -> bool:
        self._enter("isdir", path)
        return super().isdir(path)

    def makedirs(self, path: str) -> None:
        self._enter("makedirs", path)
        super().makedirs(path)

    def fsync_dir(self, path: str) -> None:
        self._enter("fsync_dir", path)
        if self.real_sync:
            super().fsync_dir(path)
        self._dir_synced(path)

    def _dir_synced(self, path: str) -> None:
        """Hook after a successful directory fsync."""

    def lock(self, fd: int) -> None:
        self._enter("lock", fd=fd)
        super().lock(fd)

    def map(self, path: str) -> Any:
        self._enter("map", path)
        return super().map(path)


class CrashFs(CountingFs):
    """Process-kill model: call number ``crash_at`` (0-based) raises :class:`SimulatedCrash`
    before it is performed, and so does every later call.

    After the crash, :meth:`kill` closes every descriptor the dead process still held (the kernel
    does that on a real kill, releasing the ``flock``); file contents stay as they are, since the
    page cache survives a process kill. ``crash_at=None`` never crashes on its own.
    """

    def __init__(self, crash_at: int | None = None, *, real_sync: bool = False) -> None:
        super().__init__(real_sync=real_sync)
        self.crash_at = crash_at
        self.dead = False

    def _enter(self, op: str, path: str | None = None, fd: int | None = None) -> None:
        super()._enter(op, path, fd)
        if self.dead or (self.crash_at is not None and len(self.calls) - 1 >= self.crash_at):
            self.dead = True
            raise SimulatedCrash(f"simulated crash at call {len(self.calls) - 1} ({op})")

    @property
    def crashed(self) -> bool:
        """The simulated process has died."""
        return self.dead

    def kill(self) -> None:
        """The process dies now: every later call raises; its open descriptors are closed."""
        self.dead = True
        for fd in list(self.paths):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.paths.clear()


class _Inode:
    """One file's durable content (as of its last fsync)."""

    __slots__ = ("durable",)

    def __init__(self, durable: bytes) -> None:
        self.durable = durable


class PowerLossFs(CrashFs):
    """Power-loss model of the files directly inside directory ``root``.

    Durable state: each file's bytes as of its last ``fsync``, and the directory's entries
    (creates, renames, unlinks) as of its last ``fsync_dir``. Whatever exists in ``root`` when
    this object is made counts as durable. The directory itself is taken as durable (its own
    entry in the parent is outside the model).

    ``crash_at`` works as in :class:`CrashFs`; call :meth:`crash` afterwards (or at any time) to
    turn the real directory into what a machine crash would have left.
    """

    MODES = ("strict", "torn", "zeros")

    def __init__(self, root: str | os.PathLike[str], crash_at: int | None = None) -> None:
        super().__init__(crash_at)
        self.root = os.path.abspath(os.fspath(root))
        self.volatile: dict[str, _Inode] = {}  # entries as the running process sees them
        self.fd_inode: dict[int, _Inode] = {}
        if os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                full = os.path.join(self.root, name)
                if os.path.isfile(full):
                    with open(full, "rb") as f:
                        self.volatile[name] = _Inode(f.read())
        self.durable_dir: dict[str, _Inode] = dict(self.volatile)

    def _name(self, path: str) -> str | None:
        full = os.path.abspath(path)
        return os.path.basename(full) if os.path.dirname(full) == self.root else None

    def _opened(self, fd: int, path: str) -> None:
        name = self._name(path)
        if name is None:
            return
        inode = self.volatile.get(name)
        if inode is None:  # created by this open: nothing of it is durable yet
            inode = self.volatile[name] = _Inode(b"")
        self.fd_inode[fd] = inode

    def _closed(self, fd: int) -> None:
        self.fd_inode.pop(fd, None)

    def _synced(self, fd: int) -> None:
        inode = self.fd_inode.get(fd)
        if inode is not None:
            inode.durable = _read_fd(fd)

    def _replaced(self, src: str, dst: str) -> None:
        s, d = self._name(src), self._name(dst)
        if s is not None and d is not None and s in self.volatile:
            self.volatile[d] = self.volatile.pop(s)

    def _unlinked(self, path: str) -> None:
        name = self._name(path)
        if name is not None:
            self.volatile.pop(name, None)

    def _dir_synced(self, path: str) -> None:
        if os.path.abspath(path) == self.root:
            self.durable_dir = dict(self.volatile)

    def unsynced(self) -> dict[str, int]:
        """Per file: how many bytes its current content differs in length from its durable one,
        and entries that are not durable (for reports)."""
        out: dict[str, int] = {}
        for name, inode in self.volatile.items():
            current = _read_path(os.path.join(self.root, name))
            if current != inode.durable or self.durable_dir.get(name) is not inode:
                out[name] = len(current) - len(inode.durable)
        return out

    def crash(self, mode: str = "strict", rng: random.Random | None = None) -> dict[str, Any]:
        """Power is lost now: rewrite ``root`` to the durable state; a report of what was dropped.

        Parameters
        ----------
        mode
            ``"strict"``: only fsynced bytes and fsynced directory entries survive.
            ``"torn"``: as strict, plus a random prefix of each surviving file's unsynced appended
            bytes (any byte boundary). ``"zeros"``: as strict, plus a random prefix length of the
            unsynced appended bytes whose content is zeros (size persisted, data did not).
        rng
            Randomness for ``"torn"`` and ``"zeros"``.
        """
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}")
        rng = rng or random.Random(0)
        self.kill()
        if not os.path.isdir(self.root):  # never created: nothing to lose
            return {"files": {}, "dropped_entries": [], "kept_unsynced_bytes": 0}
        current = {name: _read_path(os.path.join(self.root, name)) for name in self.volatile}
        linked = {id(inode): name for name, inode in self.volatile.items()}
        final: dict[str, bytes] = {}
        kept_unsynced = 0
        for name, inode in sorted(self.durable_dir.items()):
            content = inode.durable
            now_name = linked.get(id(inode))
            if mode != "strict" and now_name is not None:
                now = current[now_name]
                if len(now) > len(content) and now.startswith(content):
                    keep = rng.randint(0, len(now) - len(content))
                    extra = now[len(content) : len(content) + keep]
                    content += extra if mode == "torn" else bytes(keep)
                    kept_unsynced += keep
            final[name] = content
        dropped_entries = sorted(set(self.volatile) - set(final))
        for name in os.listdir(self.root):
            full = os.path.join(self.root, name)
            if os.path.isfile(full):
                os.unlink(full)
        for name, content in final.items():
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(content)
        self.volatile = {name: _Inode(content) for name, content in final.items()}
        self.durable_dir = dict(self.volatile)
        return {
            "files": {name: len(content) for name, content in final.items()},
            "dropped_entries": dropped_entries,
            "kept_unsynced_bytes": kept_unsynced,
        }


def _read_fd(fd: int) -> bytes:
    try:
        return _pread_all(fd)
    except OSError as exc:
        if exc.errno != errno_mod.EBADF:
            raise
    # Opened write-only: read the same file through a second descriptor (Linux: /proc/self/fd).
    other = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        return _pread_all(other)
    finally:
        os.close(other)


def _pread_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, pos = [], 0
    while pos < size:
        chunk = os.pread(fd, size - pos, pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


def _read_path(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


class ErrorFs(CountingFs):
    """Makes a call fail with ``OSError(errno)``.

    Parameters
    ----------
    fail_at
        Which matching call fails (0-based, counting only calls of ``op`` when it is given).
        ``None``: never.
    errno
        The errno of the injected error (``errno.ENOSPC``, ``errno.EIO``, ...).
    op
        Only calls of this method count and fail (``"write"``, ``"fsync"``, ``"ftruncate"``,
        ``"replace"``, ``"fsync_dir"``, ...); ``None``: any call.
    persistent
        Every matching call from ``fail_at`` on fails (a disk that stays full), not only one.
    short
        Only for ``op="write"``: the failing write writes half of its bytes and returns that count
        (a short write); the next write then fails with ``errno``, as a real device does when it
        fills up in the middle of a write. A write of one byte fails at once instead.
    """

    def __init__(
        self,
        fail_at: int | None,
        errno: int = errno_mod.EIO,
        op: str | None = None,
        *,
        persistent: bool = False,
        short: bool = False,
        real_sync: bool = False,
    ) -> None:
        super().__init__(real_sync=real_sync)
        if short and op != "write":
            raise ValueError("short writes need op='write'")
        self.fail_at = fail_at
        self.errno = errno
        self.op = op
        self.persistent = persistent
        self.short = short
        self.matched = 0  # matching calls seen
        self.injected = 0  # errors raised (short writes count too)
        self._short_pending = False
        self._short_now = False

    def _enter(self, op: str, path: str | None = None, fd: int | None = None) -> None:
        super()._enter(op, path, fd)
        if self.op is not None and op != self.op:
            return
        index = self.matched
        self.matched += 1
        if self._short_pending:
            self._short_pending = False
            self._fail(op, path, fd)
        if self.fail_at is None or index < self.fail_at:
            return
        if index == self.fail_at or self.persistent:
            if self.short and index == self.fail_at:
                self._short_now = True
                return
            self._fail(op, path, fd)

    def _fail(self, op: str, path: str | None, fd: int | None) -> None:
        self.injected += 1
        where = path if path is not None else self.paths.get(fd) if fd is not None else None
        raise OSError(self.errno, f"injected {os.strerror(self.errno)} in {op}", where)

    def _do_write(self, fd: int, data: bytes | memoryview) -> int:
        if self._short_now:
            self._short_now = False
            view = memoryview(data).cast("B")
            if len(view) <= 1:  # cannot be short: fail instead
                self._fail("write", None, fd)
            self.injected += 1
            self._short_pending = True
            return super()._do_write(fd, view[: len(view) // 2])
        return super()._do_write(fd, data)


# -- state helpers shared by the durability tests ------------------------------------------------
def canon(value: object) -> Any:
    """A hashable, exact form of a payload (or payload value): NaN equals NaN, ``-0.0`` differs
    from ``0.0``, ``1`` differs from ``True`` and ``1.0``, ``None`` (no payload) differs from ``{}``."""
    if value is None:
        return None
    if value is True or value is False:
        return ("bool", value)
    if isinstance(value, int):
        return ("int", int(value))
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else struct.pack("<d", value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, bytes):
        return ("bytes", value)
    if isinstance(value, list):
        return ("list", tuple(_nested(v) for v in value))
    if isinstance(value, Mapping):
        return ("dict", tuple(sorted((k, _nested(v)) for k, v in value.items())))
    raise TypeError(f"not a payload value: {type(value).__name__}")


def _nested(value: object) -> Any:
    return ("none",) if value is None else canon(value)


def db_state(db: Any, ids: Iterable[int]) -> dict[int, tuple[bytes, Any]]:
    """``{id: (float32 vector bytes, canon(payload))}`` of the records among ``ids``, read through the
    public API; asserts that the database holds no record outside ``ids``."""
    out: dict[int, tuple[bytes, Any]] = {}
    for rid in ids:
        rec = db.get(rid)
        if rec is not None:
            out[int(rid)] = (rec.vector.to_numpy().tobytes(), canon(rec.payload))
    assert len(db) == len(out), f"database holds {len(db)} records, {len(out)} of them among the known ids"
    return out
