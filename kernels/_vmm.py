"""Device buffers that grow in place: CUDA virtual memory, reserved once and backed step by step.

The device mirror of the stored rows grows with the store. A plain device allocation cannot
grow: a bigger one plus a device-to-device copy peaks at old + new (about 2.2x the matrix at a
1.2 growth step), and freeing the old one first means uploading every row again. CUDA's virtual
memory management does what ``realloc`` cannot: ``cuMemAddressReserve`` reserves an address range
as large as the device could ever fill (address space, no memory), and each growth backs only the
new part with physical memory (``cuMemCreate`` + ``cuMemMap``). The start of the range never
moves, so the arrays over it stay valid while it grows, the rows already on the device stay where
they are, and the device holds the matrix once plus the growth step.

CuPy wraps none of these calls, so they go through :mod:`ctypes` into the driver library
(``libcuda``), which every machine with an NVIDIA driver has. Where the library or a call is
missing or refuses (a driver older than CUDA 10.2, a device without the
``VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED`` attribute, a virtualised GPU that forbids it),
:func:`cuda_growable_columns` answers ``None`` once and says why in the log, and the store falls
back to a plain allocation per layout (filled from the host after each growth).

How the store uses it (on a GPU; ``backend = gpu_backend(0)``)::

    cols = backend.growable_columns([128 * 4, 8])  # bytes per row of each column, or None
    cols[0].ensure(1000 * 128 * 4)                  # back 1,000 rows with device memory
    X = cols[0].array(np.float32, (1000, 128))      # a CuPy array over them
    cols[0].ensure(1200 * 128 * 4)                  # grow: X stays valid, its rows stay put

The structures below follow ``cuda.h`` (CUDA 12 and 13 agree); ``tests/test_vmm.py`` compiles a
program against the installed ``cuda.h`` and checks their sizes and offsets against these:

>>> import ctypes
>>> ctypes.sizeof(CUmemAllocationProp), ctypes.sizeof(CUmemAccessDesc)
(32, 12)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["Growable", "cuda_growable_columns"]

log = logging.getLogger("iqdb.kernels")


class Growable(Protocol):
    """A device buffer whose first ``committed`` bytes are usable and never move."""

    committed: int
    reserved: int

    def ensure(self, nbytes: int) -> None:
        """Back at least the first ``nbytes`` bytes with device memory (rounded up to the
        device's granularity); what was there stays. Raises ``MemoryError`` past ``reserved`` or
        when the device has no memory left."""

    def array(self, dtype: Any, shape: tuple[int, ...]) -> Any:
        """A C-contiguous device array over the buffer's start (within ``committed``)."""


# -- the driver API's types (cuda.h) ------------------------------------------------------------------

CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2
CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", CUmemAllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


_u64, _size, _pu64 = ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64)

# name: argument types (every function returns a CUresult, an int)
_SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuMemGetAllocationGranularity": [
        ctypes.POINTER(_size),
        ctypes.POINTER(CUmemAllocationProp),
        ctypes.c_int,
    ],
    "cuMemAddressReserve": [_pu64, _size, _size, _u64, ctypes.c_ulonglong],
    "cuMemAddressFree": [_u64, _size],
    "cuMemCreate": [_pu64, _size, ctypes.POINTER(CUmemAllocationProp), ctypes.c_ulonglong],
    "cuMemRelease": [_u64],
    "cuMemMap": [_u64, _size, _size, _u64, ctypes.c_ulonglong],
    "cuMemUnmap": [_u64, _size],
    "cuMemSetAccess": [_u64, _size, ctypes.POINTER(CUmemAccessDesc), _size],
}


class CudaError(RuntimeError):
    """A driver call failed (its name and CUresult in the message)."""


class _Driver:
    """The VMM entry points of ``libcuda``, with argument types (loaded once per process)."""

    cuInit: Callable[..., int]
    cuDeviceGet: Callable[..., int]
    cuDeviceGetAttribute: Callable[..., int]
    cuMemGetAllocationGranularity: Callable[..., int]
    cuMemAddressReserve: Callable[..., int]
    cuMemAddressFree: Callable[..., int]
    cuMemCreate: Callable[..., int]
    cuMemRelease: Callable[..., int]
    cuMemMap: Callable[..., int]
    cuMemUnmap: Callable[..., int]
    cuMemSetAccess: Callable[..., int]

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)  # AttributeError: a driver without VMM
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
            setattr(self, name, fn)

    def check(self, rc: int, what: str) -> None:
        if rc == CUDA_SUCCESS:
            return
        name = ctypes.c_char_p()
        self.lib.cuGetErrorName(rc, ctypes.byref(name))
        text = f"{what} failed: {(name.value or b'CUresult').decode()} ({rc})"
        raise MemoryError(text) if rc == CUDA_ERROR_OUT_OF_MEMORY else CudaError(text)


@functools.cache
def _driver() -> _Driver | None:
    try:
        return _Driver(ctypes.CDLL("libcuda.so.1"))
    except (OSError, AttributeError) as exc:
        log.info("iqdb: the CUDA driver library offers no virtual memory management (%s)", exc)
        return None


class CudaGrowable:
    """One reserved address range on device ``device``, backed from its start as it grows.

    Each growth maps one more physical allocation after the last; none is ever unmapped before
    the whole buffer goes (with the last array over it: the arrays hold the buffer).
    """

    def __init__(self, drv: _Driver, cupy: Any, device: int, granularity: int, reserve: int) -> None:
        self._drv, self._cupy, self.device = drv, cupy, device
        self.granularity = granularity
        self.reserved = -(-max(reserve, 1) // granularity) * granularity
        self.committed = 0
        self._maps: list[tuple[int, int, int]] = []  # (offset, size, physical handle)
        self._lock = threading.Lock()
        self._prop = _prop(device)
        self._access = CUmemAccessDesc(
            CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device), CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        )
        ptr = _u64()
        drv.check(drv.cuMemAddressReserve(ctypes.byref(ptr), self.reserved, 0, 0, 0), "cuMemAddressReserve")
        self.ptr = int(ptr.value)

    def ensure(self, nbytes: int) -> None:
        with self._lock:
            if nbytes <= self.committed:
                return
            if nbytes > self.reserved:
                raise MemoryError(
                    f"{nbytes:,} bytes asked of a device buffer that reserved {self.reserved:,}"
                )
            drv, at = self._drv, self.ptr + self.committed
            size = -(-(nbytes - self.committed) // self.granularity) * self.granularity
            handle = _u64()
            drv.check(drv.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(self._prop), 0), "cuMemCreate")
            try:
                drv.check(drv.cuMemMap(at, size, 0, handle.value, 0), "cuMemMap")
                try:
                    drv.check(drv.cuMemSetAccess(at, size, ctypes.byref(self._access), 1), "cuMemSetAccess")
                except BaseException:
                    drv.cuMemUnmap(at, size)
                    raise
            except BaseException:
                drv.cuMemRelease(handle.value)
                raise
            self._maps.append((self.committed, size, int(handle.value)))
            self.committed += size

    def array(self, dtype: Any, shape: tuple[int, ...]) -> Any:
        cp = self._cupy
        mem = cp.cuda.UnownedMemory(self.ptr, self.committed, self, self.device)
        return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))

    def __del__(self) -> None:
        try:
            with self._cupy.cuda.Device(self.device):
                self._cupy.cuda.runtime.deviceSynchronize()  # no kernel still reads it
                for offset, size, handle in reversed(self._maps):
                    self._drv.cuMemUnmap(self.ptr + offset, size)
                    self._drv.cuMemRelease(handle)
                self._drv.cuMemAddressFree(self.ptr, self.reserved)
        except Exception:  # pragma: no cover - interpreter shutdown, a lost device
            pass


def _prop(device: int) -> CUmemAllocationProp:
    prop = CUmemAllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location = CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device)
    return prop


def cuda_growable_columns(cupy: Any, device: int) -> Callable[[Sequence[int]], tuple[Growable, ...] | None]:
    """The :attr:`~iqdb.kernels.ArrayBackend.growable_columns` of CuPy device ``device``.

    Given each column's bytes per row, it answers one :class:`Growable` per column, each
    reserving room for as many rows as the device's memory could hold with all the columns
    together; or ``None`` (once logged) where the driver cannot grow memory in place.
    """

    @functools.cache
    def setup() -> tuple[_Driver, int] | None:
        drv = _driver()
        if drv is None:
            return None
        try:
            with cupy.cuda.Device(device):
                cupy.cuda.runtime.free(0)  # the device's context exists and is current
                drv.check(drv.cuInit(0), "cuInit")
                dev, flag = ctypes.c_int(), ctypes.c_int()
                drv.check(drv.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
                attr = CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
                drv.check(
                    drv.cuDeviceGetAttribute(ctypes.byref(flag), attr, dev.value), "cuDeviceGetAttribute"
                )
                if not flag.value:
                    raise CudaError("the device does not support virtual memory management")
                gran = _size()
                prop = _prop(device)
                flags = CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
                rc = drv.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), flags)
                drv.check(rc, "cuMemGetAllocationGranularity")
                return drv, int(gran.value)
        except Exception as exc:
            log.info("iqdb: cuda:%d: device memory cannot grow in place (%s); growth re-uploads", device, exc)
            return None

    def growable_columns(widths: Sequence[int]) -> tuple[Growable, ...] | None:
        ready = setup()
        if ready is None:
            return None
        drv, gran = ready
        with cupy.cuda.Device(device):
            _free, total = cupy.cuda.runtime.memGetInfo()
            rows = int(total) // max(1, sum(widths))
            try:
                return tuple(CudaGrowable(drv, cupy, device, gran, rows * w) for w in widths)
            except CudaError as exc:  # no address space left, say: a plain allocation will do
                log.info("iqdb: cuda:%d: no growable device buffer (%s); growth re-uploads", device, exc)
                return None

    return growable_columns
