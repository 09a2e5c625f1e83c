"""Value types: vectors, ids, records, metrics and search results.

>>> from iqdb import Vector, Record, DistanceMetric
>>> v = Vector([3, 4])
>>> v.norm(), DistanceMetric.L2.distance(v, Vector([0, 0]))
(5.0, 5.0)
>>> Record(7, [1.0, 2.0], {"tag": "a"}).to_dict()["id"]
7

All values compare by value, have a readable ``repr`` and pickle.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import DimensionMismatch, InvalidArgument, InvalidVector
from ._payload import Payload, coerce_payload, payload_from_json, to_json_value, values_equal
from .kernels import exact_scores

__all__ = ["DistanceMetric", "Record", "RecordId", "SearchResult", "Vector", "as_matrix", "as_vector_array"]

_ID_MAX = 2**64


class RecordId(int):
    """A record id: an ``int`` in ``[0, 2**64)``.

    Raises
    ------
    InvalidArgument
        For a ``bool``, a non-integer, or a value out of range.
    """

    __slots__ = ()

    def __new__(cls, n: object) -> RecordId:
        if isinstance(n, RecordId):
            return n
        # np.timedelta64 is an np.integer to NumPy, but a duration is no id (and int() of one
        # in days, or of NaT, raises TypeError).
        if isinstance(n, (bool, np.bool_, np.timedelta64)) or not isinstance(n, (int, np.integer)):
            raise InvalidArgument(f"record id must be an integer, got {type(n).__name__}")
        value = int(n)
        if not 0 <= value < _ID_MAX:
            raise InvalidArgument(f"record id {value} is outside [0, 2**64)")
        return super().__new__(cls, value)

    @classmethod
    def _trusted(cls, n: int) -> RecordId:
        """An id known to be in range (internal: ids read back from the store)."""
        return int.__new__(cls, n)

    def __repr__(self) -> str:
        return f"RecordId({int(self)})"

    def __str__(self) -> str:
        return str(int(self))

    def __reduce__(self) -> tuple[type[RecordId], tuple[int]]:
        return (RecordId, (int(self),))


def as_vector_array(data: object) -> npt.NDArray[np.float32]:
    """Validate ``data`` as one vector; a 1-D float32 array no caller can write to.

    The array is a private copy (a :class:`Vector`'s own read-only buffer for a ``Vector``),
    made before the checks: a thread that changes the caller's array meanwhile cannot slip a
    NaN past them.

    Raises
    ------
    InvalidVector
        Empty, non-finite, not 1-D or not numeric.
    """
    arr, private = _to_numpy(data)
    if arr.ndim != 1:
        raise InvalidVector(f"vector must be 1-D, got an array of shape {arr.shape}")
    arr = _private_float32(arr, private)
    if arr.shape[0] == 0:
        raise InvalidVector("vector is empty")
    if not np.isfinite(arr).all():
        raise InvalidVector("vector contains a non-finite value")
    return arr


def as_matrix(data: object, what: str = "vectors") -> npt.NDArray[np.float32]:
    """Validate ``data`` as an ``(m, d)`` stack of vectors; a private C-contiguous float32 array.

    Accepts an ``(m, d)`` array or a sequence of vectors (``Vector``s, lists or arrays). The
    result never shares memory with the caller's data, and the checks run on it, not on the
    caller's buffer (see :func:`as_vector_array`).

    Raises
    ------
    InvalidVector
        A row is empty or non-finite, the rows are ragged, or the data is not numeric.
    """
    if isinstance(data, Vector):
        raise InvalidVector(f"{what} must be 2-D (one vector per row), got a single Vector")
    if isinstance(data, (list, tuple)) and data and all(isinstance(v, Vector) for v in data):
        dims = {v.dim for v in data}
        if len(dims) != 1:
            raise InvalidVector(f"{what} have different dimensions: {sorted(dims)}")
        return np.stack([v._data for v in data])
    arr, private = _to_numpy(data)
    if arr.ndim != 2:
        raise InvalidVector(f"{what} must be 2-D (one vector per row), got an array of shape {arr.shape}")
    arr = _private_float32(arr, private)
    if arr.shape[1] == 0 and arr.shape[0] > 0:
        raise InvalidVector("vector is empty")
    if not all(np.isfinite(arr[r0 : r0 + 65536]).all() for r0 in range(0, arr.shape[0], 65536)):
        row = int(np.argmin(np.isfinite(arr).all(axis=1)))
        raise InvalidVector(f"vector contains a non-finite value (row {row})")
    return arr


def _to_numpy(data: object) -> tuple[np.ndarray[Any, Any], bool]:
    """``data`` as a NumPy array, and whether that array is private: built here from a list or
    tuple, or fetched from a device, or a Vector's immutable buffer (so no caller writes to it)."""
    if isinstance(data, Vector):
        return data._data, True
    if isinstance(data, np.ndarray):
        return data, False
    if isinstance(data, (str, bytes, bytearray, Mapping)):
        raise InvalidVector(f"vector data must be numeric, got {type(data).__name__}")
    if not hasattr(data, "__array__") and hasattr(data, "__dlpack__"):
        try:
            return np.from_dlpack(data), False
        except (TypeError, RuntimeError, BufferError):
            pass
    if hasattr(data, "get") and type(data).__module__.startswith("cupy"):
        return np.asarray(data.get()), True
    try:
        # np.asarray builds a new array from a list or tuple, but may view anything else.
        return np.asarray(data), isinstance(data, (list, tuple))
    except (ValueError, TypeError) as exc:
        raise InvalidVector(f"vector data is not a regular numeric array ({exc})") from None


def _private_float32(arr: np.ndarray[Any, Any], private: bool) -> npt.NDArray[np.float32]:
    """A C-contiguous float32 array with ``arr``'s values that no caller holds: the conversion
    itself when the dtype differs, else one copy, unless ``arr`` is ``private`` already."""
    if arr.dtype.kind not in "iuf":
        raise InvalidVector(f"vector data must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):
        # subok=False: a plain ndarray, whatever subclass came in.
        return arr.astype(np.float32, order="C", subok=False, copy=not private)


class Vector:
    """An immutable float32 vector.

    Parameters
    ----------
    data
        Any 1-D sequence of real numbers or array (NumPy, CuPy, anything with ``__array__`` or
        DLPack). Copied and stored as float32.

    Raises
    ------
    InvalidVector
        ``"vector is empty"``, ``"vector contains a non-finite value"``, or a reason naming the
        problem for input that is not 1-D or not numeric.
    """

    __slots__ = ("_data", "_hash")

    _data: npt.NDArray[np.float32]

    def __init__(self, data: object) -> None:
        if isinstance(data, Vector):
            self._data = data._data
        else:
            arr = as_vector_array(data)  # a private copy, checked
            arr.flags.writeable = False
            self._data = arr
        self._hash: int | None = None

    @classmethod
    def _trusted(cls, arr: npt.NDArray[np.float32]) -> Vector:
        """Adopt an already-validated float32 array the caller will not mutate (internal)."""
        v = cls.__new__(cls)
        arr.flags.writeable = False
        v._data = arr
        v._hash = None
        return v

    @property
    def dim(self) -> int:
        """Number of elements."""
        return int(self._data.shape[0])

    def __len__(self) -> int:
        return self.dim

    def norm_squared(self) -> float:
        """Squared Euclidean norm (computed in float64)."""
        d = self._data.astype(np.float64)
        return float(np.dot(d, d))

    def norm(self) -> float:
        """Euclidean norm (computed in float64)."""
        return math.sqrt(self.norm_squared())

    def to_numpy(self) -> npt.NDArray[np.float32]:
        """A read-only float32 view of the data."""
        # A view, not the buffer itself: a view of a read-only base cannot be made writeable again.
        return self._data.view()

    def tolist(self) -> list[float]:
        """The elements as Python floats."""
        return [float(x) for x in self._data.tolist()]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        if copy:
            return np.array(self._data, dtype=dtype, copy=True)
        if dtype is None or np.dtype(dtype) == self._data.dtype:
            return self._data.view()
        return self._data.astype(dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vector):
            return NotImplemented
        return bool(self._data.shape == other._data.shape and np.array_equal(self._data, other._data))

    def __hash__(self) -> int:
        if self._hash is None:
            # +0.0 and -0.0 compare equal, so they must hash alike.
            self._hash = hash(((self._data + np.float32(0.0)).tobytes(), self.dim))
        return self._hash

    def __repr__(self) -> str:
        if self.dim <= 8:
            body = ", ".join(repr(x) for x in self.tolist())
        else:
            head = ", ".join(repr(x) for x in self._data[:3].tolist())
            tail = ", ".join(repr(x) for x in self._data[-2:].tolist())
            body = f"{head}, ..., {tail}; dim={self.dim}"
        return f"Vector([{body}])"

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (_vector_from_bytes, (self._data.astype("<f4").tobytes(),))


def _vector_from_bytes(raw: bytes) -> Vector:
    return Vector._trusted(np.frombuffer(raw, dtype="<f4").astype(np.float32))


class _MetricType(enum.EnumMeta):
    def __call__(cls, value: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        # Enum's lookup compares an unhashable value with each member's value, and an object
        # whose == is elementwise (a NumPy array) then raises ValueError; no member is anything
        # but a str, so refuse the rest before the lookup.
        if not args and not kwargs and not isinstance(value, str):
            raise _unknown_metric(value)
        return super().__call__(value, *args, **kwargs)


class DistanceMetric(str, enum.Enum, metaclass=_MetricType):
    """Distance metrics. Scores are distances: smaller is closer.

    ``L2`` is the Euclidean distance; ``COSINE`` is ``1 - cos(a, b)`` (NaN when either vector is
    zero); ``DOT`` is the negated inner product.
    """

    L2 = "l2"
    COSINE = "cosine"
    DOT = "dot"

    def distance(self, a: Vector | object, b: Vector | object) -> float:
        """The distance between ``a`` and ``b`` under this metric, as used by search.

        Raises
        ------
        DimensionMismatch
            ``a.dim != b.dim`` (``left=a.dim``, ``right=b.dim``).
        InvalidVector
            Either argument is not a valid vector.
        """
        va = as_vector_array(a)
        vb = as_vector_array(b)
        if va.shape[0] != vb.shape[0]:
            raise DimensionMismatch(left=int(va.shape[0]), right=int(vb.shape[0]))
        return float(exact_scores(np, self.value, va, vb))

    @classmethod
    def _missing_(cls, value: object) -> DistanceMetric:
        # DistanceMetric("bogus") raises InvalidArgument (still a ValueError), as the API does.
        raise _unknown_metric(value)

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"DistanceMetric.{self.name}"


def _unknown_metric(metric: object) -> InvalidArgument:
    # Only a string is echoed: the repr of anything else may be huge, or recurse without end.
    given = repr(metric[:40]) if isinstance(metric, str) else f"of type {type(metric).__name__}"
    return InvalidArgument(f"unknown metric {given}; expected one of 'l2', 'cosine', 'dot'")


def coerce_metric(metric: object) -> DistanceMetric:
    """A :class:`DistanceMetric` from itself or its string value.

    Raises
    ------
    InvalidArgument
        An unknown metric.
    """
    if isinstance(metric, DistanceMetric):
        return metric
    if isinstance(metric, str):
        try:
            return DistanceMetric(metric.lower())
        except ValueError:
            pass
    raise _unknown_metric(metric)


def _score_from_json(x: Any) -> Any:
    """A score from JSON: a ``{"$float": ...}`` tag decoded, anything else as it is (the
    result's constructor checks it)."""
    if isinstance(x, dict) and len(x) == 1 and "$float" in x:
        tag = x["$float"]
        if not isinstance(tag, str) or tag not in ("nan", "inf", "-inf"):
            raise InvalidArgument("score: bad $float tag")
        return float(tag)
    return x


def _payload_from_json(data: Any) -> Payload | None:
    return None if data is None else Payload._trusted(payload_from_json(data))


def _check_mapping(data: object, what: str) -> None:
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{what} data must be a mapping, got {type(data).__name__}")


@dataclass(frozen=True, slots=True, eq=False, init=False)
class Record:
    """A stored record: an id, a vector and an optional payload.

    Parameters
    ----------
    id
        A :class:`RecordId` or any integer in ``[0, 2**64)``.
    vector
        A :class:`Vector` or anything ``Vector`` accepts.
    payload
        A mapping, or ``None`` (distinct from an empty payload).

    Raises
    ------
    InvalidArgument, InvalidVector
        For a bad id, payload or vector.
    """

    id: RecordId
    vector: Vector
    payload: Payload | None

    def __init__(self, id: object, vector: object, payload: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "id", RecordId(id))
        object.__setattr__(self, "vector", vector if isinstance(vector, Vector) else Vector(vector))
        object.__setattr__(self, "payload", coerce_payload(payload))

    @classmethod
    def with_payload(cls, id: object, vector: object, payload: Mapping[str, Any] | None) -> Record:
        """A record with a payload (the Rust crate's constructor)."""
        return cls(id, vector, payload)

    @classmethod
    def _trusted(cls, id: RecordId, vector: Vector, payload: Payload | None) -> Record:
        rec = cls.__new__(cls)
        object.__setattr__(rec, "id", id)
        object.__setattr__(rec, "vector", vector)
        object.__setattr__(rec, "payload", payload)
        return rec

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return (
            self.id == other.id
            and self.vector == other.vector
            and (self.payload is None) == (other.payload is None)
            and (self.payload is None or values_equal(self.payload, other.payload))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Record(id={int(self.id)}, vector={self.vector!r}, payload={self.payload!r})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Record._trusted, (self.id, self.vector, self.payload))

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible data (``json.dumps`` accepts it); inverse of :meth:`from_dict`."""
        return {
            "id": int(self.id),
            "vector": self.vector.tolist(),
            "payload": None if self.payload is None else to_json_value(self.payload.to_dict()),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """Rebuild a record from :meth:`to_dict`'s output.

        Raises
        ------
        InvalidArgument
            Missing keys or malformed values.
        """
        _check_mapping(data, "record")
        try:
            return cls(data["id"], data["vector"], _payload_from_json(data.get("payload")))
        except KeyError as exc:
            raise InvalidArgument(f"record data lacks key {exc.args[0]!r}") from None


@dataclass(frozen=True, slots=True, eq=False)
class SearchResult:
    """One search hit: ``id``, ``score`` (a distance, smaller is closer) and a copy of the payload."""

    id: RecordId
    score: float
    payload: Payload | None = None

    @staticmethod
    def _trusted(id: RecordId, score: float, payload: Payload | None) -> SearchResult:
        """A result from canonical parts, without the checks (internal: search builds many)."""
        result: SearchResult = _new_object(SearchResult)
        _set_id(result, id)
        _set_score(result, score)
        _set_payload(result, payload)
        return result

    def __post_init__(self) -> None:
        # Search builds canonical values already; a result built by hand is normalised here.
        if type(self.id) is not RecordId:
            object.__setattr__(self, "id", RecordId(self.id))
        if type(self.score) is not float:
            score: Any = self.score
            real = isinstance(score, (int, float, np.integer, np.floating))
            if isinstance(score, (bool, np.bool_, np.timedelta64)) or not real:
                raise InvalidArgument(f"score must be a real number, got {type(score).__name__}")
            try:
                object.__setattr__(self, "score", float(score))
            except OverflowError:  # an int beyond the float range
                raise InvalidArgument("score is an integer too large for a float") from None
        if self.payload is not None and type(self.payload) is not Payload:
            object.__setattr__(self, "payload", coerce_payload(self.payload))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SearchResult):
            return NotImplemented
        return (
            self.id == other.id
            and values_equal(self.score, other.score)
            and (self.payload is None) == (other.payload is None)
            and (self.payload is None or values_equal(self.payload, other.payload))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SearchResult(id={int(self.id)}, score={self.score!r}, payload={self.payload!r})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible data; inverse of :meth:`from_dict`."""
        return {
            "id": int(self.id),
            "score": to_json_value(self.score),
            "payload": None if self.payload is None else to_json_value(self.payload.to_dict()),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchResult:
        """Rebuild a result from :meth:`to_dict`'s output.

        Raises
        ------
        InvalidArgument
            Missing keys or malformed values.
        """
        _check_mapping(data, "result")
        try:
            return cls(
                RecordId(data["id"]), _score_from_json(data["score"]), _payload_from_json(data.get("payload"))
            )
        except KeyError as exc:
            raise InvalidArgument(f"result data lacks key {exc.args[0]!r}") from None


# Slot setters of the frozen SearchResult, for its trusted constructor (a search may build a
# million results; the dataclass __init__ and its checks would cost twice as much).
_new_object = object.__new__
_slots: dict[str, Any] = dict(vars(SearchResult))
_set_id = _slots["id"].__set__
_set_score = _slots["score"].__set__
_set_payload = _slots["payload"].__set__
