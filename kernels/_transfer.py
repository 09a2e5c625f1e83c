"""Stored rows to the search device in bounded chunks, through a small pinned double buffer.

>>> import numpy as np
>>> from iqdb.kernels import cpu_backend
>>> src = np.arange(12, dtype=np.float32).reshape(4, 3)
>>> host = np.empty_like(src)
>>> crc = copy_rows(cpu_backend(), src, host=host, crc=0)  # the CPU has no device: host copy only
>>> host.tolist() == src.tolist(), crc == zlib.crc32(src.data)
(True, True)

Why not ``cupy.asarray(rows)``: for host memory that is not pinned, CuPy stages the whole array
through a pinned block of the same size, which then stays in its pinned pool (research note
``gpu.md`` section 3.5): for a 3 GB snapshot, a 3 GB page-locked allocation. Here the rows go in
chunks of at most :data:`STAGE_BYTES` through two pinned buffers, so the host copies a chunk into
one buffer while the device's copy engine reads the other. A snapshot is read once: each chunk
is copied from the map into the host columns (the truth the WAL and the snapshot describe),
checksummed there while it is in the caches, and copied on to the device from them.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import numpy as np

from ._backend import ArrayBackend

__all__ = ["STAGE_BYTES", "Stage", "copy_rows", "stage_for"]

STAGE_BYTES = 16 << 20  # bytes per pinned buffer (two of them): a copy's extra host memory


class Stage:
    """Two page-locked buffers of ``nbytes`` and a copy stream, for the copies of one upload
    (the columns of a catch-up share them: one allocation, one stream and one wait in all).

    :meth:`send` stages a chunk in the buffer the device finished reading longest ago and
    queues its copy; :meth:`finish` waits for every queued copy (the host arrays a copy read
    may change only after it).
    """

    def __init__(self, backend: ArrayBackend, nbytes: int) -> None:
        xp = backend.xp
        self.nbytes = max(1, int(nbytes))
        with backend.device():
            self.stream = xp.cuda.Stream(non_blocking=True)
            # Two buffers in one page-locked block (from CuPy's pinned pool, returned to it after).
            ring = np.frombuffer(xp.cuda.alloc_pinned_memory(2 * self.nbytes), np.uint8, 2 * self.nbytes)
        self._buffers = (ring[: self.nbytes], ring[self.nbytes :])
        self._copied: list[Any] = [None, None]  # per buffer: the event its last device copy recorded
        self._turn = 0

    def send(self, part: np.ndarray[Any, Any], device: Any) -> None:
        """Queue the copy of host rows ``part`` (at most ``nbytes``) into ``device``."""
        slot = self._turn % 2
        self._turn += 1
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the device has read this buffer's last chunk
        staged = self._buffers[slot][: part.nbytes].view(part.dtype).reshape(part.shape)
        np.copyto(staged, part)
        device.set(staged, stream=self.stream)
        self._copied[slot] = self.stream.record()

    def finish(self) -> None:
        """Wait until every queued copy is done."""
        self.stream.synchronize()


def stage_for(backend: ArrayBackend, sources: list[np.ndarray[Any, Any]]) -> Stage | None:
    """A :class:`Stage` big enough for a chunk of any of ``sources`` (at most
    :data:`STAGE_BYTES`), or ``None`` when there is no device or nothing to copy."""
    if backend.device_index is None:
        return None
    need = max((int(a.nbytes) for a in sources), default=0)
    return Stage(backend, min(need, STAGE_BYTES)) if need else None


def copy_rows(
    backend: ArrayBackend,
    src: np.ndarray[Any, Any],
    *,
    host: np.ndarray[Any, Any] | None = None,
    device: Any = None,
    crc: int | None = None,
    stage_bytes: int | None = None,
    stage: Stage | None = None,
) -> int | None:
    """Copy the rows of ``src`` into ``host`` and/or ``device`` (same shape), chunk by chunk.

    Parameters
    ----------
    backend
        The device ``device`` lives on (``device`` must be ``None`` on the CPU).
    src
        Host rows (a memory map, say): read once.
    host
        Optional host array that receives the rows; the device copy is then made from it.
    device
        Optional C-contiguous device array that receives the rows (through the pinned buffers;
        ignored on the CPU, which has no device).
    crc
        When given, the running CRC-32 to continue over ``src``'s bytes (in the order
        ``zlib.crc32`` of the whole C-contiguous array would read them); ``None``: none computed.
    stage_bytes
        Bytes per pinned buffer (a chunk is at least one row); default :data:`STAGE_BYTES`.
    stage
        The buffers and stream to copy through, shared with other copies (see :func:`stage_for`);
        the caller then waits with :meth:`Stage.finish`. ``None``: the copy makes its own and
        waits for itself before it returns.

    Returns
    -------
    int or None
        The CRC-32 when ``crc`` was given, else ``None``.
    """
    n = int(src.shape[0])
    if n == 0:
        return crc
    row_bytes = max(1, src.nbytes // n)
    to_device = device is not None and backend.device_index is not None
    own = to_device and (stage is None or stage.nbytes < row_bytes)
    if own:
        budget = STAGE_BYTES if stage_bytes is None else stage_bytes
        stage = Stage(backend, min(max(1, budget // row_bytes) * row_bytes, src.nbytes))
    step = max(1, (STAGE_BYTES if stage_bytes is None else stage_bytes) // row_bytes)
    if stage is not None and to_device:
        step = max(1, min(step, stage.nbytes // row_bytes))
    with backend.device() if to_device else contextlib.nullcontext():
        for lo in range(0, n, step):
            part = src[lo : lo + step]
            if host is not None:
                host[lo : lo + step] = part
                part = host[lo : lo + step]  # read on from the copy, while it is in the caches
            if crc is not None:
                crc = zlib.crc32(np.ascontiguousarray(part).reshape(-1).view(np.uint8).data, crc)
            if to_device:
                assert stage is not None
                stage.send(part, device[lo : lo + part.shape[0]])
        if own:
            assert stage is not None
            stage.finish()
    return crc
