"""Backends: an array namespace bound to a device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

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
    """

    name: str
    xp: Any

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
    return ArrayBackend("cpu", np)
