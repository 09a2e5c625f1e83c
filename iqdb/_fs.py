"""The file-system seam: every file-system call the durable engine makes goes through one object.

>>> from iqdb._fs import OsFileSystem
>>> fs = OsFileSystem()
>>> fs.exists("/")
True

Production code uses :class:`OsFileSystem`. Tests substitute a subclass that counts calls,
injects errors (ENOSPC, EIO), simulates a crash after the N-th call, or keeps a model of what
an fsync has made durable (power-loss model). Keeping the seam this narrow is what makes those
tests cover every ordering, fsync and rename the engine relies on.

Platform notes live here too: ``fsync`` is ``F_FULLFSYNC`` on macOS (plain ``fsync`` there
only reaches the drive's cache) and ``FlushFileBuffers`` (what ``os.fsync`` calls) on Windows;
directory fsync is a no-op where the OS cannot do it.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

__all__ = ["FileSystem", "OsFileSystem"]


class FileSystem:
    """The calls the engine makes. Paths are ``str``; descriptors are ``int``.

    Every method may raise :class:`OSError`; the engine translates those into
    :class:`~iqdb.StorageError` at its boundary.
    """

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """``os.open``."""
        return os.open(path, flags | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0), mode)

    def close(self, fd: int) -> None:
        """``os.close``."""
        os.close(fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        """One ``os.write`` (may write fewer bytes than given)."""
        return os.write(fd, data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` (``os.pread``, or seek+read on Windows)."""
        if hasattr(os, "pread"):
            return os.pread(fd, size, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)

    def fsync(self, fd: int) -> None:
        """Force the file's data and size to stable storage."""
        if sys.platform == "darwin":
            import fcntl

            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        else:
            os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        """``os.ftruncate``."""
        os.ftruncate(fd, length)

    def fsize(self, fd: int) -> int:
        """Size of an open file."""
        return os.fstat(fd).st_size

    def replace(self, src: str, dst: str) -> None:
        """Atomic rename over ``dst`` (``os.replace``)."""
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        """``os.unlink``."""
        os.unlink(path)

    def exists(self, path: str) -> bool:
        """``os.path.exists``."""
        return os.path.exists(path)

    def stat_key(self, path: str) -> tuple[int, int, int] | None:
        """(inode, size, mtime in ns) of ``path``, or ``None`` if absent: tells whether it changed."""
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def isdir(self, path: str) -> bool:
        """``os.path.isdir``."""
        return os.path.isdir(path)

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents."""
        os.makedirs(path, exist_ok=True)

    def fsync_dir(self, path: str) -> None:
        """Make renames and creations in directory ``path`` durable.

        Windows cannot open a directory for fsync from Python (NTFS journals renames), and some
        file systems answer EINVAL: both are treated as nothing to do.
        """
        if sys.platform == "win32":
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
        finally:
            os.close(fd)

    def lock(self, fd: int) -> None:
        """Take an exclusive, non-blocking lock on an open file; ``BlockingIOError`` if held.

        ``flock`` (not ``fcntl`` record locks, which close() of any other descriptor of the
        same file in this process would silently drop) conflicts across processes and across
        separate opens in one process, which is what one-writer-per-directory needs.
        """
        if sys.platform == "win32":
            import msvcrt

            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError as exc:
                raise BlockingIOError(errno.EAGAIN, "locked") from exc
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def map(self, path: str) -> Any:
        """A read-only ``pyarrow`` buffer over the whole file (memory-mapped)."""
        import pyarrow as pa

        with pa.memory_map(path, "r") as source:
            return source.read_buffer()


class OsFileSystem(FileSystem):
    """The real operating system."""
