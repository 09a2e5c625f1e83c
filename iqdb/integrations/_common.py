"""What the LangChain and LlamaIndex adapters share: string ids, scores, filters, enumeration.

>>> from iqdb.integrations._common import string_id, prefixed
>>> string_id("foo") == string_id("foo") < 2**63
True
>>> prefixed({"year": {"$gte": 2020}, "$or": [{"kind": "doc"}]}, "metadata.")
{'metadata.year': {'$gte': 2020}, '$or': [{'metadata.kind': 'doc'}]}

Both frameworks name records by strings; iqdb by integers below ``2**64``. A string maps to the
first 63 bits of its blake2b digest, and the string itself is kept in the record's payload and
compared on every read, so two strings that share an integer raise :class:`IdCollision` instead
of one silently replacing the other. (63 bits, not 64: the ids stay clear of ``iqdb.NO_ID`` and
fit a signed 64-bit column wherever one is exported.)

None of this module imports LangChain or LlamaIndex.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

import iqdb
from iqdb._errors import InvalidArgument, IqdbError

__all__ = [
    "IdCollision",
    "relevance_fn",
    "similarity_fn",
    "string_id",
    "payload_of",
    "prefixed",
    "to_iqdb_filter",
    "user_filter_dict",
    "matching",
]

_LOGICAL = ("$and", "$or")


class IdCollision(IqdbError, ValueError):
    """Two different string ids map to the same iqdb integer id.

    Parameters
    ----------
    key
        The string id asked for.
    rid
        The integer id it maps to.
    """

    def __init__(self, key: str, rid: int) -> None:
        super().__init__(
            f"string id {key!r} maps to iqdb id {rid}, which already holds another string id "
            "(a 63-bit hash collision); refusing to overwrite it"
        )
        self.key = key
        self.rid = rid

    def __reduce__(self) -> tuple[type[IdCollision], tuple[str, int]]:
        return (type(self), (self.key, self.rid))


def string_id(key: object) -> int:
    """The iqdb id of the string id ``key``: the first 63 bits of its blake2b digest.

    Raises
    ------
    InvalidArgument
        ``key`` is not a string, or cannot be encoded as UTF-8.
    """
    if not isinstance(key, str):
        raise InvalidArgument(f"ids must be strings, got {type(key).__name__}")
    try:
        data = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"id {key!r} cannot be encoded as UTF-8") from None
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1


def payload_of(item: iqdb.Record | iqdb.SearchResult) -> Mapping[str, Any]:
    """The payload of a record or result, ``{}`` for none."""
    return {} if item.payload is None else item.payload


def check_key(key: str, rid: int, stored: object) -> None:
    """Raise :class:`IdCollision` when the record at ``rid`` holds a string id other than ``key``."""
    if stored != key:
        raise IdCollision(key, rid)


# -- scores ---------------------------------------------------------------------------------
def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def relevance_fn(metric: iqdb.DistanceMetric) -> Callable[[float], float]:
    """A function from an iqdb distance to a relevance in [0, 1], higher is closer.

    ``COSINE`` (distance in [0, 2]): ``1 - d/2``. ``L2`` (distance in [0, inf)): ``1/(1 + d)``.
    ``DOT`` (the negated inner product, any real): the logistic ``1/(1 + exp(d))``. Each is
    monotone, so the ranking is the distance ranking; a NaN distance (cosine against a zero
    vector) is relevance 0.
    """
    if metric is iqdb.DistanceMetric.COSINE:
        return lambda d: min(1.0, max(0.0, _finite_or(1.0 - d / 2.0, 0.0)))
    if metric is iqdb.DistanceMetric.L2:
        return lambda d: _finite_or(1.0 / (1.0 + d), 0.0)
    # exp(d) overflows for d > ~709: that is relevance 0, as the limit says.
    return lambda d: 0.0 if not d < 709.0 else 1.0 / (1.0 + math.exp(d))


def similarity_fn(metric: iqdb.DistanceMetric) -> Callable[[float], float]:
    """LlamaIndex's similarities (higher is better): cosine similarity ``1 - d`` and the inner
    product ``-d`` as LlamaIndex's own store gives them; ``1/(1 + d)`` for L2. NaN becomes 0."""
    if metric is iqdb.DistanceMetric.COSINE:
        return lambda d: _finite_or(1.0 - d, 0.0)
    if metric is iqdb.DistanceMetric.DOT:
        return lambda d: _finite_or(-d, 0.0)
    return lambda d: _finite_or(1.0 / (1.0 + d), 0.0)


# -- filters --------------------------------------------------------------------------------
def prefixed(node: object, prefix: str) -> dict[str, Any]:
    """The Mongo-style filter ``node`` with every field path moved under ``prefix``.

    Keys that do not start with ``$`` are field paths (their values, operators or literals, are
    left alone); ``$and``/``$or`` hold lists of filters and ``$not`` one filter, rewritten in turn.
    Other ``$`` keys pass through for iqdb's compiler to judge.

    Raises
    ------
    InvalidArgument
        ``node`` is not a mapping, or ``$and``/``$or`` does not hold a list.
    """
    if not isinstance(node, Mapping):
        raise InvalidArgument(f"a filter must be a mapping, got {type(node).__name__}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if not isinstance(key, str):
            raise InvalidArgument(f"filter keys must be strings, got {type(key).__name__}")
        if key in _LOGICAL:
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                raise InvalidArgument(f"filter {key} takes a list of filters, got {type(value).__name__}")
            out[key] = [prefixed(item, prefix) for item in value]
        elif key == "$not":
            out[key] = prefixed(value, prefix)
        elif key.startswith("$"):
            out[key] = value
        else:
            out[prefix + key] = value
    return out


def user_filter_dict(user_filter: object, prefix: str) -> dict[str, Any]:
    """A user's filter (an :class:`iqdb.Filter` or its dict form, on metadata fields) as the
    dict form of a filter on the payload, where the metadata lives under ``prefix``.

    Raises
    ------
    InvalidArgument
        ``user_filter`` is neither a filter nor a mapping, or is malformed.
    """
    if isinstance(user_filter, iqdb.Filter):
        user_filter = user_filter.to_dict()
    return prefixed(user_filter, prefix)


def to_iqdb_filter(user_filter: object, prefix: str) -> iqdb.Filter | None:
    """:func:`user_filter_dict` parsed by iqdb (so a malformed filter fails here, naming the bad
    part); ``None`` stays ``None``.

    Raises
    ------
    InvalidArgument
        A malformed filter.
    """
    if user_filter is None:
        return None
    return iqdb.Filter.from_dict(user_filter_dict(user_filter, prefix))


# -- enumerating ------------------------------------------------------------------------------
def matching(db: iqdb.Iqdb, flt: iqdb.Filter | None) -> list[iqdb.SearchResult]:
    """Every record that ``flt`` matches (all of them for ``None``), with payloads.

    iqdb has no scan, so this is an exact search for a zero query under L2 with ``k`` = the
    database's size: every live record that passes comes back.
    """
    dim = db.dim
    size = len(db)
    if dim is None or size == 0:
        return []
    return db.search(np.zeros(dim, dtype=np.float32), size, iqdb.DistanceMetric.L2, filter=flt)
