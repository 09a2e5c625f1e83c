"""The handle's arguments checked and converted: ids, rows (ids, vectors, payloads), ``k``, the
working set and paths. Each check raises a typed error naming the bad value and its position, and
changes nothing.

>>> from iqdb._coerce import coerce_ids
>>> coerce_ids([3, 2**64 - 1]).tolist()
[3, 18446744073709551615]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import InvalidArgument, InvalidConfig
from ._payload import Payload, coerce_payload
from ._values import RecordId, as_matrix

__all__ = ["Rows", "coerce_ids", "coerce_rows"]

_BOOL_TYPES = frozenset({bool, np.bool_})
_MIN_WORKING_SET = 64 << 10


def _check_working_set(working_set: object) -> int:
    # np.timedelta64 is an np.integer subclass, but no integer.
    if (
        type(working_set) in _BOOL_TYPES
        or not isinstance(working_set, (int, np.integer))
        or isinstance(working_set, np.timedelta64)
    ):
        raise InvalidConfig(f"working_set must be an integer number of bytes, got {working_set!r}")
    if working_set < _MIN_WORKING_SET:
        raise InvalidConfig(f"working_set must be at least {_MIN_WORKING_SET} bytes, got {working_set}")
    return int(working_set)


def _check_path(path: object) -> str:
    """``path`` as a ``str`` the file system can take, or :class:`InvalidConfig`: a ``str``,
    ``bytes`` or ``os.PathLike``, not empty (which would mean the current directory), without
    NUL, and valid UTF-8: Arrow opens the snapshot by a UTF-8 path, so a database in a
    directory whose name is not (bytes decoded with surrogate escapes, lone surrogates) could
    be created but never opened again."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InvalidConfig(f"path must be a str, bytes or os.PathLike, got {type(path).__name__}")
    try:
        text = os.fsdecode(path)
        os.fsencode(text)
        text.encode("utf-8")
    except (TypeError, UnicodeError) as exc:
        raise InvalidConfig(f"path cannot be used as a file name ({type(exc).__name__})") from None
    if not text:
        raise InvalidConfig("path is empty")
    if "\0" in text:
        raise InvalidConfig("path contains a NUL character")
    return text


def _check_k(k: object) -> int:
    if isinstance(k, (bool, np.bool_, np.timedelta64)) or not isinstance(k, (int, np.integer)):
        raise InvalidArgument(f"k must be a non-negative integer, got {type(k).__name__}")
    if k < 0:
        raise InvalidArgument(f"k must be a non-negative integer, got {int(k)}")
    return int(k)


def coerce_ids(ids: object) -> npt.NDArray[np.uint64]:
    """Validate a sequence or integer array of ids; a uint64 array.

    Raises
    ------
    InvalidArgument
        A bool, a non-integer or an out-of-range id (the message names it and its position).
    """
    if isinstance(ids, (str, bytes, Mapping)) or not hasattr(ids, "__len__"):
        raise InvalidArgument(f"ids must be a sequence or array of integers, got {type(ids).__name__}")
    arr = ids if isinstance(ids, np.ndarray) else None
    if arr is None:
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError, OverflowError):
            return _coerce_ids_slowly(ids)
    if arr.ndim != 1:
        raise InvalidArgument(f"ids must be 1-D, got an array of shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if not isinstance(ids, np.ndarray) and not _BOOL_TYPES.isdisjoint(map(type, ids)):  # type: ignore[call-overload]
            return _coerce_ids_slowly(ids)  # NumPy turns True into 1; the slow path names it
        if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
            pos = int(np.argmin(arr))
            raise InvalidArgument(f"record id {int(arr[pos])} at position {pos} is outside [0, 2**64)")
        return arr.astype(np.uint64, copy=False)
    return _coerce_ids_slowly(ids)


def _coerce_ids_slowly(ids: Any) -> npt.NDArray[np.uint64]:
    """Element by element, for mixed inputs (Python ints beyond int64, RecordIds) and errors."""
    out = np.empty(len(ids), dtype=np.uint64)
    pos = 0
    try:
        for pos, value in enumerate(ids):
            out[pos] = RecordId(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc} (position {pos})") from None
    return out


Rows = tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32], list[Payload | None]]


def coerce_rows(
    ids: object, vectors: object, payloads: Sequence[Any] | None, *, adopt: bool = False
) -> Rows | None:
    """:meth:`Iqdb.upsert_many`'s arguments checked and converted: ids, the ``(n, d)`` float32
    matrix and n payloads; ``None`` when there is nothing to write (no ids, and no vectors or
    payloads either). ``adopt``: the payloads are fresh dicts of canonical values (iqdb's Arrow
    import builds them), wrapped as they are instead of checked and copied.

    Raises
    ------
    InvalidArgument, InvalidVector
        As :meth:`Iqdb.upsert_many`.
    """
    id_arr = coerce_ids(ids)
    n = int(id_arr.shape[0])
    if n == 0:
        if _length(vectors) not in (0, None):
            raise InvalidArgument(f"got 0 ids but {_length(vectors)} vectors")
        if payloads is not None and _length(payloads) != 0:
            raise InvalidArgument(f"got 0 ids but {_length(payloads)} payloads")
        return None
    matrix = as_matrix(vectors)
    if matrix.shape[0] != n:
        raise InvalidArgument(f"got {n} ids but {matrix.shape[0]} vectors")
    if payloads is None:
        return id_arr, matrix, [None] * n
    if isinstance(payloads, (str, bytes, Mapping)) or not hasattr(payloads, "__len__"):
        raise InvalidArgument(f"payloads must be a sequence, got {type(payloads).__name__}")
    if len(payloads) != n:
        raise InvalidArgument(f"got {n} ids but {len(payloads)} payloads")
    if adopt:
        trusted = Payload._trusted
        return id_arr, matrix, [None if p is None else trusted(p) for p in payloads]
    return id_arr, matrix, _coerce_payloads(payloads)


def _coerce_payloads(payloads: Sequence[object]) -> list[Payload | None]:
    out: list[Payload | None] = []
    try:
        for p in payloads:
            out.append(coerce_payload(p))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc} (row {len(out)})") from None
    return out


def _length(data: object) -> int | None:
    if isinstance(data, np.ndarray):
        return int(data.shape[0]) if data.ndim else None
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
