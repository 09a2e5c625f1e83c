"""Backends: an array namespace bound to a device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._flat import MatVec
from ._parallel import SERIAL, Parallel, cpu_parallel

__all__ = ["ArrayBackend", "cpu_backend", "cpu_matvec"]


@dataclass(frozen=True)
class ArrayBackend:
    """An array namespace (``xp``) and the device its arrays live on.

    Attributes
    ----------
    name
        ``"cpu"`` or ``"cuda:N"``.
    xp
        The namespace: ``numpy`` or ``cupy``.
    parallel_factory
        Gives the runner that splits a search over cores (made on first use, so importing
        iqdb starts no threads and loads no thread-control library).
    matvec
        How a single query streams the stored rows (``matvec(A, v, out)``; ``None``: the
        namespace's ``matmul``).
    """

    name: str
    xp: Any
    parallel_factory: Callable[[], Parallel] = field(default=lambda: SERIAL, compare=False, repr=False)
    matvec: MatVec | None = field(default=None, compare=False, repr=False)

    @property
    def parallel(self) -> Parallel:
        """How a search splits over cores on this device."""
        return self.parallel_factory()

    def asarray(self, host: np.ndarray[Any, Any]) -> Any:
        """Move a host array to this backend's device (no copy on the CPU)."""
        return self.xp.asarray(host)

    def to_host(self, arr: Any) -> np.ndarray[Any, Any]:
        """A host NumPy array with ``arr``'s contents (no copy on the CPU)."""
        if isinstance(arr, np.ndarray):
            return arr
        return np.asarray(arr.get())


# From this many bytes of rows, a single query streams them with einsum's own float32 loop rather
# than OpenBLAS's sgemv: measured on one core, 22 against 16 GB/s at 200,000 x 768 from memory
# (two cores: 37 against 29 GB/s, at or above the read floor), while sgemv is about 2x faster on
# rows that sit in the caches (crossing over at about 16 MiB). Either sums each row's d products
# in float32, which the kernel's rounding bound covers whatever the order.
_EINSUM_MIN_BYTES = 16 << 20


def cpu_matvec(A: np.ndarray[Any, Any], v: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    """``out[:] = A @ v``, streaming ``A`` the faster way on this CPU (see ``_EINSUM_MIN_BYTES``)."""
    if A.nbytes >= _EINSUM_MIN_BYTES:
        np.einsum("ij,j->i", A, v, out=out)
    else:
        np.matmul(A, v, out=out)


def cpu_backend() -> ArrayBackend:
    """The NumPy backend."""
    return ArrayBackend("cpu", np, cpu_parallel, cpu_matvec)
