"""Backends: an array namespace bound to a device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._parallel import SERIAL, Parallel, cpu_parallel

__all__ = ["ArrayBackend", "cpu_backend"]


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
    """

    name: str
    xp: Any
    parallel_factory: Callable[[], Parallel] = field(default=lambda: SERIAL, compare=False, repr=False)

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


def cpu_backend() -> ArrayBackend:
    """The NumPy backend."""
    return ArrayBackend("cpu", np, cpu_parallel)
