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
from ._payload import Payload, coerce_payload, from_json_value, to_json_value, values_equal
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
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
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
    """Validate ``data`` as one vector and return it as a 1-D float32 array (no copy when possible).

    Raises
    ------
    InvalidVector
        Empty, non-finite, not 1-D or not numeric.
    """
    arr = _to_numpy(data)
    if arr.ndim != 1:
        raise InvalidVector(f"vector must be 1-D, got an array of shape {arr.shape}")
    arr = _check_numeric(arr)
    if arr.shape[0] == 0:
        raise InvalidVector("vector is empty")
    if not np.isfinite(arr).all():
        raise InvalidVector("vector contains a non-finite value")
    return arr


def as_matrix(data: object, what: str = "vectors") -> npt.NDArray[np.float32]:
    """Validate ``data`` as an ``(m, d)`` stack of vectors; a C-contiguous float32 array.

    Accepts an ``(m, d)`` array or a sequence of vectors (``Vector``s, lists or arrays).

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
    arr = _to_numpy(data)
    if arr.ndim != 2:
        raise InvalidVector(f"{what} must be 2-D (one vector per row), got an array of shape {arr.shape}")
    arr = np.ascontiguousarray(_check_numeric(arr))
    if arr.shape[1] == 0 and arr.shape[0] > 0:
        raise InvalidVector("vector is empty")
    if not all(np.isfinite(arr[r0 : r0 + 65536]).all() for r0 in range(0, arr.shape[0], 65536)):
        row = int(np.argmin(np.isfinite(arr).all(axis=1)))
        raise InvalidVector(f"vector contains a non-finite value (row {row})")
    return arr


def _to_numpy(data: object) -> np.ndarray[Any, Any]:
    if isinstance(data, Vector):
        return data._data
    if isinstance(data, np.ndarray):
        return data
    if isinstance(data, (str, bytes, bytearray, Mapping)):
        raise InvalidVector(f"vector data must be numeric, got {type(data).__name__}")
    if not hasattr(data, "__array__") and hasattr(data, "__dlpack__"):
        try:
            return np.from_dlpack(data)
        except (TypeError, RuntimeError, BufferError):
            pass
    if hasattr(data, "get") and type(data).__module__.startswith("cupy"):
        return np.asarray(data.get())
    try:
        return np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise InvalidVector(f"vector data is not a regular numeric array ({exc})") from None


def _check_numeric(arr: np.ndarray[Any, Any]) -> npt.NDArray[np.float32]:
    if arr.dtype.kind not in "iuf":
        raise InvalidVector(f"vector data must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):
        return arr.astype(np.float32, copy=False)


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
            arr = as_vector_array(data)
            arr = np.array(arr, dtype=np.float32, copy=True)
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


class DistanceMetric(str, enum.Enum):
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

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"DistanceMetric.{self.name}"


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
    raise InvalidArgument(f"unknown metric {metric!r}; expected one of 'l2', 'cosine', 'dot'")


def _float_from_json(x: Any) -> float:
    value = from_json_value(x)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidArgument("expected a number")
    return float(value)


def _payload_from_json(data: Any) -> Payload | None:
    if data is None:
        return None
    value = from_json_value(data)
    if not isinstance(value, dict):
        raise InvalidArgument("payload must be a JSON object")
    return Payload._trusted(value)


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
            if isinstance(score, (bool, np.bool_)) or not real:
                raise InvalidArgument(f"score must be a real number, got {type(score).__name__}")
            object.__setattr__(self, "score", float(score))
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
        try:
            return cls(
                RecordId(data["id"]), _float_from_json(data["score"]), _payload_from_json(data.get("payload"))
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
