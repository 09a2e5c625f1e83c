"""Backends: an array namespace bound to a device.

>>> import numpy as np
>>> from iqdb.kernels import cpu_backend
>>> be = cpu_backend()
>>> be.name, be.xp.__name__, be.fixed_shape, be.growable_columns
('cpu', 'numpy', False, None)
>>> x = be.asarray(np.arange(3.0))  # no copy on the CPU; on a GPU backend, an upload
>>> be.to_host(x) is x
True

``gpu_backend(N)`` binds CuPy on ``cuda:N`` with the GPU's profile, the fixed-shape driver and
device buffers that grow in place (:mod:`~iqdb.kernels._vmm`); ``iqdb._device`` chooses and
checks the device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._parallel import SERIAL, Parallel, cpu_parallel
from ._profile import CPU_PROFILE, GPU_PROFILE, Profile
from ._tiles import MatVec
from ._vmm import Growable, cuda_growable_columns

__all__ = ["ArrayBackend", "cpu_backend", "cpu_matvec", "gpu_backend"]

log = logging.getLogger("iqdb.kernels")


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
    device_index
        The CUDA device ordinal N of ``"cuda:N"`` (``None`` on the CPU): code that allocates or
        launches on this backend runs under ``xp.cuda.Device(device_index)``.
    fixed_shape
        Whether searches run the fixed-shape driver (:func:`~iqdb.kernels._fixed.fixed_topk`:
        two host syncs per query block; for a GPU) rather than the adaptive one (fewer
        operations, but a data-dependent size, i.e. a sync on a GPU, at every step; for a CPU).
    profile
        The tuning constants searches on this backend run with (tile and block sizes, layout
        and split thresholds): :data:`~iqdb.kernels.CPU_PROFILE` unless given.
    growable_columns
        Device buffers that grow in place (:mod:`~iqdb.kernels._vmm`), for the store's device
        mirror: given each column's bytes per row, one buffer per column, or ``None`` where the
        device cannot grow memory in place. ``None`` (the field) on the CPU, which has no mirror.
    """

    name: str
    xp: Any
    parallel_factory: Callable[[], Parallel] = field(default=lambda: SERIAL, compare=False, repr=False)
    matvec: MatVec | None = field(default=None, compare=False, repr=False)
    device_index: int | None = None
    fixed_shape: bool = False
    profile: Profile = field(default=CPU_PROFILE, compare=False)
    growable_columns: Callable[[Sequence[int]], tuple[Growable, ...] | None] | None = field(
        default=None, compare=False, repr=False
    )

    @property
    def parallel(self) -> Parallel:
        """How a search splits over cores on this device."""
        return self.parallel_factory()

    def device(self) -> AbstractContextManager[Any]:
        """A context in which new arrays are allocated on this backend's device."""
        if self.device_index is None:
            return contextlib.nullcontext()
        return self.xp.cuda.Device(self.device_index)  # type: ignore[no-any-return]

    def tile_bytes(self, working_set: int) -> int:
        """Bytes of score tiles a search may hold, by the profile's rule
        (:meth:`~iqdb.kernels.Profile.tile_bytes`) with this device's free memory: the caller's
        working set on the CPU; on a GPU at least that and up to a share of the free memory, so
        that a search runs few, large tiles (each tile costs kernel launches, not host syncs)."""
        if self.device_index is None or self.profile.free_memory_divisor is None:
            return working_set
        runtime = getattr(getattr(self.xp, "cuda", None), "runtime", None)
        mem_get_info = getattr(runtime, "memGetInfo", None)
        if mem_get_info is None:  # the CPU stand-in of the tests
            return self.profile.tile_bytes(working_set, None)
        with self.device():
            free, _total = mem_get_info()
        return self.profile.tile_bytes(working_set, int(free))

    def asarray(self, host: np.ndarray[Any, Any]) -> Any:
        """Move a host array to this backend's device (no copy on the CPU)."""
        if self.device_index is None:
            return self.xp.asarray(host)
        # CuPy allocates on the *current* device, which is the caller's, not necessarily ours.
        with self.xp.cuda.Device(self.device_index):
            return self.xp.asarray(host)

    def to_host(self, arr: Any) -> np.ndarray[Any, Any]:
        """A host NumPy array with ``arr``'s contents (no copy on the CPU)."""
        if isinstance(arr, np.ndarray):
            return arr
        # CuPy's get() switches to the array's own device for the copy, whatever is current.
        return np.asarray(arr.get())


# Rows that sit in the caches (under about 16 MiB) stream faster through OpenBLAS's sgemv (about
# 2x on the machine iqdb was tuned on). From memory the faster way depends on the CPU: einsum's
# own float32 loop measured 22 against 16 GB/s on one core there (two cores: 37 against 29 GB/s),
# but another 2-vCPU guest ran NumPy's X @ q (sgemv) faster than iqdb's einsum. So the first
# block of this size or more that a process streams is streamed both ways (twice each) and the
# faster way is kept for the process: a rule that holds on any CPU. Either sums each row's d
# products in float32, which the kernel's rounding bound covers whatever the order.
_EINSUM_MIN_BYTES = 16 << 20
_large_matvec: str | None = None  # "einsum" or "sgemv" once measured
_clock = time.perf_counter


def _einsum(A: np.ndarray[Any, Any], v: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    np.einsum("ij,j->i", A, v, out=out)


def _sgemv(A: np.ndarray[Any, Any], v: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    # OpenBLAS's sgemv scales the output by beta = 0 before adding A @ v: an uninitialised or
    # reused buffer holding a signalling NaN then raises the invalid flag (NumPy warns, seen
    # once in CI) although the result is right. A zeroed buffer never does.
    out.fill(0.0)
    np.matmul(A, v, out=out)


def _calibrate(A: np.ndarray[Any, Any], v: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> str:
    """Stream ``A`` both ways, alternating, twice each; the faster way's name (``out`` holds
    ``A @ v`` afterwards, as both compute it)."""
    best = {"einsum": math.inf, "sgemv": math.inf}
    for _ in range(2):
        for name, fn in (("einsum", _einsum), ("sgemv", _sgemv)):
            t0 = _clock()
            fn(A, v, out)
            best[name] = min(best[name], _clock() - t0)
    choice = min(best, key=best.__getitem__)
    log.debug("iqdb: large single-query products use %s on this CPU (%s)", choice, best)
    return choice


def cpu_matvec(A: np.ndarray[Any, Any], v: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    """``out[:] = A @ v``, streaming ``A`` the faster way on this CPU (see ``_EINSUM_MIN_BYTES``)."""
    global _large_matvec
    if A.nbytes < _EINSUM_MIN_BYTES:
        _sgemv(A, v, out)
    elif _large_matvec is None:
        _large_matvec = _calibrate(A, v, out)  # a race only measures twice
    else:
        (_einsum if _large_matvec == "einsum" else _sgemv)(A, v, out)


def cpu_backend() -> ArrayBackend:
    """The NumPy backend."""
    return ArrayBackend("cpu", np, cpu_parallel, cpu_matvec, profile=CPU_PROFILE)


def _tf32_requested(value: str) -> bool:
    """Whether CuPy would read ``CUPY_TF32=value`` as "use TF32" (it tests ``int(value) > 0``)."""
    try:
        return int(value) > 0
    except ValueError:
        return bool(value.strip())  # CuPy fails on it at the first product: worth a word too


@functools.cache
def _warn_tf32(value: str) -> None:
    """Log once per process (and value) that iqdb overrides ``CUPY_TF32``."""
    log.warning(
        "CUPY_TF32=%r is set: iqdb sets CuPy's float32 matmul back to full float32 in this process "
        "(its exact search's rounding bound assumes it; TF32 keeps 10 mantissa bits)",
        value,
    )


# CuPy's compute type for float32 products when CUPY_TF32 is unset: full float32
# (cupy/_core/_routines_linalg.pyx, COMPUTE_TYPE_DEFAULT).
_COMPUTE_TYPE_DEFAULT = 1


def _force_fp32(cupy: Any) -> None:
    """Make CuPy's float32 ``matmul`` run in full float32 whatever ``CUPY_TF32`` says.

    CuPy reads the variable once, at the first float32 product, into a process-wide compute
    type; setting that type first wins. Process-wide is the only scope CuPy offers.
    """
    from cupy._core import _routines_linalg as linalg

    linalg.set_compute_type(cupy.float32, getattr(linalg, "COMPUTE_TYPE_DEFAULT", _COMPUTE_TYPE_DEFAULT))


def gpu_backend(index: int) -> ArrayBackend:
    """The CuPy backend on CUDA device ``index`` (imports CuPy; checks nothing about the device).

    Choosing and checking the device (CuPy 14+, the index in range, the device answering) is the
    caller's job (``iqdb._device``). Searches run serially on the host side (the device is the
    parallelism); ``matvec`` is ``None`` because :func:`cpu_matvec` passes ``out=`` to
    ``einsum``, which CuPy rejects.

    Precision: CuPy's ``matmul`` runs float32 in TF32 when ``CUPY_TF32`` is a positive integer
    (read once per process, at the first float32 product), which breaks the kernels' fp32
    rounding bound. When the variable asks for TF32, this function sets CuPy's float32 compute
    type back to full float32 (for the whole process: CuPy has no narrower scope) and logs a
    warning once.

    Raises
    ------
    ImportError
        CuPy is not installed.
    """
    import cupy

    tf32 = os.environ.get("CUPY_TF32", "")
    if _tf32_requested(tf32):
        _force_fp32(cupy)
        _warn_tf32(tf32)
    return ArrayBackend(
        f"cuda:{index}",
        cupy,
        lambda: SERIAL,
        None,
        device_index=index,
        fixed_shape=True,
        profile=GPU_PROFILE,
        growable_columns=cuda_growable_columns(cupy, index),
    )
