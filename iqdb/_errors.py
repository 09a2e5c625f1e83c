"""The iqdb exception tree.

>>> import iqdb
>>> try:
...     iqdb.Vector([])
... except iqdb.InvalidVector as exc:
...     print(exc.reason)
vector is empty

Every error iqdb raises is an :class:`IqdbError`; each also inherits the builtin a caller
would naturally catch::

    IqdbError (Exception)
    +-- InvalidVector      (ValueError)   bad vector data: empty, non-finite, not 1-D, not numeric
    +-- DimensionMismatch  (ValueError)   .left / .right dimensions differ
    +-- InvalidArgument    (ValueError)   bad id, k, payload, metric, ...
    +-- InvalidConfig      (ValueError)   bad device string, path that is not a directory, write on readonly
    +-- Corrupt                           a snapshot or WAL failed its integrity checks
    +-- StorageError       (OSError)      the operating system refused; carries errno, filename, __cause__
    |   +-- Poisoned                      an earlier fsync or rollback failed: writes refused until reopen
    +-- Locked                            the directory is already open for writing
    +-- Closed             (RuntimeError) the handle was closed
    +-- DeviceUnavailable  (RuntimeError) a GPU was asked for and none is usable

Messages name the bad value; they never echo payload contents.
"""

from __future__ import annotations

__all__ = [
    "Closed",
    "Corrupt",
    "DeviceUnavailable",
    "DimensionMismatch",
    "InvalidArgument",
    "InvalidConfig",
    "InvalidVector",
    "IqdbError",
    "Locked",
    "Poisoned",
    "StorageError",
]


class IqdbError(Exception):
    """Base class of every error iqdb raises."""


class InvalidVector(IqdbError, ValueError):
    """A vector's data is unusable.

    Parameters
    ----------
    reason
        What is wrong, e.g. ``"vector is empty"`` or ``"vector contains a non-finite value"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid vector: {reason}")
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidVector], tuple[str]]:
        return (type(self), (self.reason,))


class DimensionMismatch(IqdbError, ValueError):
    """Two dimensions that must agree do not.

    Parameters
    ----------
    left
        The dimension of the vector given (the query, or the vector being written).
    right
        The dimension it was compared against (usually the database's).
    """

    def __init__(self, left: int, right: int) -> None:
        super().__init__(f"dimension mismatch: got {left}, expected {right}")
        self.left = left
        self.right = right

    def __reduce__(self) -> tuple[type[DimensionMismatch], tuple[int, int]]:
        return (type(self), (self.left, self.right))


class InvalidArgument(IqdbError, ValueError):
    """An argument other than a vector is invalid (id, k, payload, metric, ...)."""


class InvalidConfig(IqdbError, ValueError):
    """A configuration value is invalid (device string, path, option, write on a read-only handle)."""


class Corrupt(IqdbError):
    """A file failed its integrity checks; iqdb refuses to return possibly wrong data."""


class StorageError(IqdbError, OSError):
    """The operating system refused a file operation.

    ``errno`` and ``filename`` are those of the original :class:`OSError`, which is also the
    ``__cause__`` of this exception.
    """

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None) -> None:
        if errno is None:
            OSError.__init__(self, message)
        else:
            OSError.__init__(self, errno, message, filename)

    def __str__(self) -> str:
        if self.errno is None:
            return str(self.args[0]) if self.args else ""
        where = f": {self.filename!r}" if self.filename else ""
        return f"{self.strerror} [errno {self.errno}]{where}"

    def __reduce__(self) -> tuple[type[StorageError], tuple[str, int | None, str | None]]:
        message = self.strerror if self.errno is not None else (str(self.args[0]) if self.args else "")
        return (type(self), (str(message), self.errno, self.filename))


class Poisoned(StorageError):
    """An fsync or a rollback failed earlier; the handle refuses writes until it is reopened.

    Reads still work. Reopening the directory recovers from what is on disk.
    """


class Locked(IqdbError):
    """The directory is already open for writing by another process or handle."""


class Closed(IqdbError, RuntimeError):
    """The handle was closed; every call but ``close()`` raises this."""


class DeviceUnavailable(IqdbError, RuntimeError):
    """A GPU was requested explicitly and none is usable (no CuPy, no driver, no device)."""
