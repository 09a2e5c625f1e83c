"""Per-row select-k: the ``k`` smallest scores of each row, in order, ties by column, NaN last.

>>> import numpy as np
>>> from iqdb.kernels._select import select_k
>>> scores = np.array([[0.5, -1.0, 0.5, 2.0], [3.0, 1.0, 2.0, 0.0]], dtype=np.float32)
>>> vals, idx = select_k(np, scores, 2)
>>> idx.tolist(), vals.tolist()
([[1, 0], [3, 1]], [[-1.0, 0.5], [0.0, 1.0]])

On the GPU (``xp`` is CuPy) :func:`select_k` runs the CUDA kernel in ``cuda/select_k.cu``;
elsewhere it runs :func:`select_k_twin`, the NumPy "contract twin" that defines the kernel's
answer exactly, bit for bit (tests compare the two, and the kernel's source on the CPU through a
block emulator). The contract:

* each row is ordered by (value, column), ascending; ``-0.0`` equals ``+0.0`` (IEEE), so the two
  tie and the smaller column comes first; every NaN ranks after ``+inf``, NaNs by column;
* a column whose bit in ``allowed`` is 0 (column ``c`` is bit ``c & 31`` of word ``c >> 5``), or
  whose ``index`` entry is negative, never appears;
* returned values are the scores' own bits (``-0.0`` stays ``-0.0``, NaN payloads are kept);
  returned indices are columns, or ``index[row, column]`` when ``index`` is given (ties are still
  broken by column *position*: pass candidates in the order their ties should resolve);
* a row with fewer than ``k`` eligible columns is padded at the end with value NaN (bits
  ``0x7fc00000``) and index ``-1``; the values then stay in the contract's order (NaN last), and
  the index ``-1`` tells padding from a real NaN score.

Any ``1 <= k`` works (``k > n`` pads). The kernel has buckets up to ``k = 2,048``
(:data:`KERNEL_MAX_K`); above that the GPU path runs the twin itself on the device (one sort of
``(value, column)`` keys per row, in row groups of bounded memory): slower, same answer.

Nothing here imports CuPy until a CuPy namespace is passed in.
"""

from __future__ import annotations

import functools
import importlib.resources
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["KERNEL_MAX_K", "PAD_INDEX", "PAD_VALUE_BITS", "select_k", "select_k_twin"]

Array = Any  # an xp.ndarray

#: The kernel's buckets: ``select_k_<KC>`` handles ``k <= KC`` (shared memory grows with KC).
BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
#: The largest ``k`` the kernel handles; above it the device sorts (:func:`select_k`).
KERNEL_MAX_K = BUCKETS[-1]
#: Padding for rows with fewer than ``k`` eligible columns: index -1, value this quiet NaN.
PAD_INDEX = -1
PAD_VALUE_BITS = 0x7FC00000

# Threads per block: the kernel's kThreads (its __launch_bounds__); change both together.
_THREADS = 256
# _MIN_CHUNK and _SORT_KEYS below are tuning, not contract (they move no answer), yet they stay
# here rather than in a backend's Profile (kernels/_profile.py): they size this kernel's own launches
# and its sort path's memory, only CuPy ever runs them, and the twin ignores them.

# Columns one block reads at least. Each pass shrinks a row's width at least 8-fold (a chunk is at
# least 8 * KC columns, and it leaves k <= KC candidates): one query over 1M columns on 132 SMs
# takes two launches for k = 10, four for k = 1,000; 512 queries over 262,144 columns, two.
_MIN_CHUNK = 4096
# Keys per row group of the sort path (k > KERNEL_MAX_K on the device): 8 bytes each, plus the
# sort's own temporaries.
_SORT_KEYS = 32 << 20
_MAX_COLUMNS = 2**31 - 1  # the kernel's columns are int; the twin packs them into 32 bits

# launch(kc, blocks, scores, score_stride, n, allowed, allowed_stride, index, index_stride, k,
#        chunk, chunks, out_vals, out_idx, out_stride): runs select_k_<kc> (strides in elements).
Launch = Callable[..., None]

_EMPTY = 0xFFFF_FFFF_FFFF_FFFF  # the key of an excluded column: above every real key


def select_k_twin(
    xp: Any, scores: Array, k: int, allowed: Array | None = None, *, index: Array | None = None
) -> tuple[Array, Array]:
    """The ``k`` smallest scores of each row and their columns: the kernel's contract, in ``xp``.

    Each score becomes one unsigned 64-bit key, its order-preserving value bits (``-0.0`` as
    ``+0.0``, every NaN above ``+inf``) over its column; a row's answer is its ``k`` smallest keys,
    which one sort finds. The keys are unique, so the answer is unique too. Written against
    ``xp`` so that it also runs on the device (the GPU path for ``k`` above the kernel's buckets).

    Parameters
    ----------
    xp
        The array namespace (``numpy``, or ``cupy``).
    scores
        ``(m, n)`` float32; smaller is better.
    k
        How many to keep per row, ``k >= 1``; rows with fewer eligible columns are padded.
    allowed
        Optional bitset over the columns, uint32 words: shape ``(words,)`` for one bitset shared
        by every row, or ``(m, words)``, with ``words >= ceil(n / 32)``. Column ``c`` is bit
        ``c & 31`` of word ``c >> 5``; bits past ``n`` are ignored.
    index
        Optional int64 ``(n,)`` or ``(m, n)``: what to return for each column instead of the
        column; a negative entry excludes its column.

    Returns
    -------
    tuple
        ``(vals, idx)``: float32 ``(m, k)`` (the scores' own bits) and int64 ``(m, k)``, sorted by
        (value, column); padding is value NaN (bits :data:`PAD_VALUE_BITS`), index ``-1``.

    Raises
    ------
    TypeError
        ``scores`` is not float32, ``allowed`` not uint32 or ``index`` not int64.
    ValueError
        Wrong shapes, ``k < 1``, or ``n >= 2**31``.

    Examples
    --------
    >>> import numpy as np
    >>> s = np.array([[1.0, np.nan, -0.0, 0.0, np.inf, 1.0]], dtype=np.float32)
    >>> vals, idx = select_k_twin(np, s, 5)
    >>> idx.tolist(), vals.tolist()
    ([[2, 3, 0, 5, 4]], [[-0.0, 0.0, 1.0, 1.0, inf]])
    >>> allowed = np.array([0b101010], dtype=np.uint32)  # columns 1, 3 and 5
    >>> vals, idx = select_k_twin(np, s, 4, allowed)
    >>> idx.tolist(), vals.tolist()
    ([[3, 5, 1, -1]], [[0.0, 1.0, nan, nan]])
    """
    k = _check(scores, k, allowed, index)
    m = int(scores.shape[0])
    keys = xp.sort(_keys(xp, scores, allowed, index), axis=1)[:, :k]
    if keys.shape[1] < k:
        empty = xp.full((m, k - keys.shape[1]), xp.uint64(_EMPTY), dtype=xp.uint64)
        keys = xp.concatenate([keys, empty], axis=1)
    pad = keys == xp.uint64(_EMPTY)
    pad_vals = xp.full((m, k), xp.uint32(PAD_VALUE_BITS), dtype=xp.uint32).view(xp.float32)
    pad_idx = xp.full((m, k), PAD_INDEX, dtype=xp.int64)
    if int(scores.shape[1]) == 0:
        return pad_vals, pad_idx
    col = xp.where(pad, xp.uint64(0), keys & xp.uint64(0xFFFF_FFFF)).astype(xp.int64)
    vals = xp.where(pad, pad_vals, xp.take_along_axis(scores, col, axis=1))
    if index is None:
        idx = col
    elif index.ndim == 1:
        idx = index[col]
    else:
        idx = xp.take_along_axis(index, col, axis=1)
    return vals, xp.where(pad, pad_idx, idx)


def select_k(
    xp: Any, scores: Array, k: int, allowed: Array | None = None, *, index: Array | None = None
) -> tuple[Array, Array]:
    """The ``k`` smallest scores of each row and their columns, on ``xp``'s device.

    Same arguments, result and errors as :func:`select_k_twin`, which defines the answer; with
    CuPy this runs the CUDA kernel (compiled once per process and device, on first use) for
    ``k <= KERNEL_MAX_K`` and the twin on the device above that; otherwise it is the twin.

    Parameters
    ----------
    xp
        The array namespace (``numpy`` or ``cupy``); the arrays live on its device.
    scores, k, allowed, index
        As in :func:`select_k_twin`.

    Returns
    -------
    tuple
        ``(vals, idx)`` as in :func:`select_k_twin`, on ``xp``'s device.

    Raises
    ------
    TypeError
        As :func:`select_k_twin`.
    ValueError
        As :func:`select_k_twin`.

    Examples
    --------
    >>> import numpy as np
    >>> s = np.array([[2.0, 1.0, 1.0, 0.0]], dtype=np.float32)
    >>> select_k(np, s, 3)[1].tolist()
    [[3, 1, 2]]
    """
    if getattr(xp, "__name__", "") != "cupy":
        return select_k_twin(xp, scores, k, allowed, index=index)
    k = _check(scores, k, allowed, index)
    with scores.device:
        if k > KERNEL_MAX_K:
            return _sort_in_groups(xp, scores, k, allowed, index)
        blocks_wanted = 4 * _multiprocessors(xp, scores.device.id)
        return _device_passes(xp, _cupy_launch, scores, k, allowed, index, blocks_wanted)


def _check(scores: Array, k: int, allowed: Array | None, index: Array | None) -> int:
    """Validates the arguments (dtypes and shapes only: nothing is read); returns ``k``."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (m, n), got shape {tuple(scores.shape)}")
    if scores.dtype != np.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    m, n = (int(d) for d in scores.shape)
    if n > _MAX_COLUMNS:
        raise ValueError(f"at most {_MAX_COLUMNS} columns per call, got {n}")
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if allowed is not None:
        if allowed.dtype != np.uint32:
            raise TypeError(f"allowed must be a uint32 bitset, got {allowed.dtype}")
        words = (n + 31) // 32
        ok_rows = allowed.ndim == 1 or (allowed.ndim == 2 and int(allowed.shape[0]) == m)
        if not ok_rows or int(allowed.shape[-1]) < words:
            raise ValueError(
                f"allowed must have shape ({words},) or ({m}, {words}) (or more words), "
                f"got {tuple(allowed.shape)}"
            )
    if index is not None:
        if index.dtype != np.int64:
            raise TypeError(f"index must be int64, got {index.dtype}")
        if tuple(index.shape) not in ((n,), (m, n)):
            raise ValueError(f"index must have shape ({n},) or ({m}, {n}), got {tuple(index.shape)}")
    return k


def _keys(xp: Any, scores: Array, allowed: Array | None, index: Array | None) -> Array:
    """``(m, n)`` uint64 keys, (order bits of the value) << 32 | column; excluded columns get the
    empty key, above every real one."""
    m, n = (int(d) for d in scores.shape)
    u32, u64 = xp.uint32, xp.uint64
    bits = scores.view(u32)
    bits = xp.where(bits == u32(0x8000_0000), u32(0), bits)  # -0.0 ties with +0.0
    negative = (bits >> u32(31)) == u32(1)
    order = xp.where(negative, ~bits, bits | u32(0x8000_0000))  # negatives reversed, below positives
    order = xp.where((bits & u32(0x7FFF_FFFF)) > u32(0x7F80_0000), u32(0xFFFF_FFFF), order)  # NaN last
    cols = xp.arange(n, dtype=u64)
    keys = (order.astype(u64) << u64(32)) | cols
    excluded = xp.zeros((m, n), dtype=bool)
    if allowed is not None:
        word = allowed[..., (cols >> u64(5)).astype(xp.int64)]
        excluded |= ((word >> (cols & u64(31)).astype(u32)) & u32(1)) == u32(0)
    if index is not None:
        excluded |= index < 0
    return xp.where(excluded, u64(_EMPTY), keys)


def _bucket(k: int) -> int:
    return next(b for b in BUCKETS if b >= k)


def _chunk_width(width: int, rows: int, kc: int, blocks_wanted: int, min_chunk: int) -> int:
    """Columns per block: enough blocks to fill the device, and at least ``8 * kc`` columns so
    that each pass shrinks the candidates at least 8-fold."""
    per_row = max(1, -(-blocks_wanted // max(rows, 1)))
    return max(min_chunk, 8 * kc, -(-width // per_row))


def _row_stride(a: Array) -> int:
    """Row stride in elements (0 for a 1-D array, shared by every row)."""
    return 0 if a.ndim == 1 else int(a.strides[0]) // int(a.itemsize)


def _rows_contiguous(xp: Any, a: Array) -> Array:
    """``a`` with unit stride along its last axis (what the kernel indexes), copied only if not."""
    if a.strides[-1] != a.itemsize or any(s % a.itemsize for s in a.strides):
        return xp.ascontiguousarray(a)
    return a


def _device_passes(
    xp: Any,
    launch: Launch,
    scores: Array,
    k: int,
    allowed: Array | None,
    index: Array | None,
    blocks_wanted: int,
    min_chunk: int = _MIN_CHUNK,
) -> tuple[Array, Array]:
    """Runs the kernel until one block per row is left: each pass splits every row into chunks,
    keeps each chunk's ``k`` best, and hands the next pass those candidates with their indices
    (padding carries index -1 and is skipped; ties resolve by position, which is column order
    among equal values, as the kernel's header explains). ``launch`` runs the kernel: CuPy's on a
    GPU, the CPU block emulator in tests."""
    m = int(scores.shape[0])
    kc = _bucket(k)
    vals = _rows_contiguous(xp, scores)
    bits = None if allowed is None else _rows_contiguous(xp, allowed)
    ids = None if index is None else _rows_contiguous(xp, index)
    while True:
        width = int(vals.shape[1])
        chunk = _chunk_width(width, m, kc, blocks_wanted, min_chunk)
        chunks = max(1, -(-width // chunk))
        out_vals = xp.empty((m, chunks * k), dtype=xp.float32)
        out_idx = xp.empty((m, chunks * k), dtype=xp.int64)
        if m:
            launch(
                kc,
                m * chunks,
                vals,
                _row_stride(vals),
                width,
                bits,
                0 if bits is None else _row_stride(bits),
                ids,
                0 if ids is None else _row_stride(ids),
                k,
                chunk,
                chunks,
                out_vals,
                out_idx,
                chunks * k,
            )
        if chunks == 1:
            return out_vals, out_idx
        vals, bits, ids = out_vals, None, out_idx


def _sort_in_groups(
    xp: Any, scores: Array, k: int, allowed: Array | None, index: Array | None
) -> tuple[Array, Array]:
    """The twin on the device, a group of rows at a time so that its keys stay bounded."""
    m, n = (int(d) for d in scores.shape)
    step = max(1, _SORT_KEYS // max(n, 1))
    if m <= step:
        return select_k_twin(xp, scores, k, allowed, index=index)
    parts = []
    for r0 in range(0, m, step):
        rows = slice(r0, r0 + step)
        part_allowed = allowed if allowed is None or allowed.ndim == 1 else allowed[rows]
        part_index = index if index is None or index.ndim == 1 else index[rows]
        parts.append(select_k_twin(xp, scores[rows], k, part_allowed, index=part_index))
    return xp.concatenate([p[0] for p in parts]), xp.concatenate([p[1] for p in parts])


@functools.cache
def _module() -> Any:
    """The compiled kernels (CuPy compiles per device on first launch and caches on disk)."""
    import cupy

    source = (importlib.resources.files("iqdb.kernels") / "cuda" / "select_k.cu").read_text()
    return cupy.RawModule(code=source, options=("-std=c++17",))


@functools.cache
def _multiprocessors(xp: Any, device_id: int) -> int:
    return int(xp.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _cupy_launch(
    kc: int,
    blocks: int,
    scores: Array,
    score_stride: int,
    n: int,
    allowed: Array | None,
    allowed_stride: int,
    index: Array | None,
    index_stride: int,
    k: int,
    chunk: int,
    chunks: int,
    out_vals: Array,
    out_idx: Array,
    out_stride: int,
) -> None:
    # Scalars go in as NumPy scalars of the kernel's parameter types (int is 32-bit there, long
    # long 64-bit); an absent array is a null pointer, a 64-bit zero.
    null = np.uint64(0)
    kernel = _module().get_function(f"select_k_{kc}")
    kernel(
        (blocks,),
        (_THREADS,),
        (
            scores,
            np.int64(score_stride),
            np.int32(n),
            null if allowed is None else allowed,
            np.int64(allowed_stride),
            null if index is None else index,
            np.int64(index_stride),
            np.int32(k),
            np.int32(chunk),
            np.int32(chunks),
            out_vals,
            out_idx,
            np.int64(out_stride),
        ),
    )
