"""Payloads: the JSON-like metadata stored next to each vector.

>>> from iqdb import Payload
>>> p = Payload({"b": 2, "a": (1, 2.5, b"raw")})
>>> list(p), p["a"]
(['a', 'b'], [1, 2.5, b'raw'])

Values are ``None``, ``bool``, signed 64-bit ``int``, ``float`` (NaN and +-inf allowed), ``str``,
``bytes``, ``list`` and ``dict[str, ...]``. On the way in NumPy scalars become Python scalars,
tuples become lists and ``bytearray``/``memoryview`` become ``bytes``. Anything else raises
:class:`InvalidArgument` naming the key, never the value.

This module also holds the two encodings a payload travels in: a compact tagged binary form
(WAL and snapshot) and a JSON-compatible form (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Union

import numpy as np

from ._errors import Corrupt, InvalidArgument

__all__ = ["Payload", "PayloadValue"]

PayloadValue = Union[None, bool, int, float, str, bytes, list["PayloadValue"], dict[str, "PayloadValue"]]  # noqa: UP007
"""The type of a payload value (recursive)."""

PayloadColumns = dict[str, list[Any]]
"""A batch's payloads as columns of scalar values: payload ``i`` is ``{key: column[i]}``."""

_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1
_MAX_DEPTH = 64


def _where(path: str) -> str:
    return f"payload key {path!r}" if path else "payload"


def normalize_value(value: object, path: str, depth: int = 0) -> PayloadValue:
    """Return ``value`` as a canonical :data:`PayloadValue`, or raise naming ``path``."""
    if depth > _MAX_DEPTH:
        raise InvalidArgument(f"{_where(path)} is nested deeper than {_MAX_DEPTH} levels")
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidArgument(f"{_where(path)} holds an int outside the signed 64-bit range")
        return value
    if type(value) is float or type(value) is str:
        if type(value) is str:
            _check_utf8(value, path)
        return value
    if isinstance(value, np.generic):
        item = value.item()
        if isinstance(item, np.generic):  # longdouble, clongdouble: no matching Python scalar
            raise InvalidArgument(f"{_where(path)} has unsupported type {type(value).__name__}")
        return normalize_value(item, path, depth)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return normalize_value(int(value), path, depth)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        _check_utf8(value, path)
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return [normalize_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return _normalize_mapping(value, path, depth + 1)
    raise InvalidArgument(f"{_where(path)} has unsupported type {type(value).__name__}")


def _check_utf8(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{_where(path)} holds a string that cannot be encoded as UTF-8") from None


def _check_key(key: object, path: str) -> str:
    """``key`` as a payload key (a ``str`` that UTF-8 can encode), or raise naming ``path``."""
    if not isinstance(key, str):
        raise InvalidArgument(f"{_where(path)} has a key of type {type(key).__name__}; keys must be str")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{_where(path)} has a key that cannot be encoded as UTF-8") from None
    return str(key)


def _normalize_mapping(
    mapping: Mapping[Any, Any],
    path: str,
    depth: int,
    value: Callable[[Any, str, int], PayloadValue] | None = None,
) -> dict[str, PayloadValue]:
    """Checked keys, each value through ``value`` (default: :func:`normalize_value`)."""
    convert = normalize_value if value is None else value
    out: dict[str, PayloadValue] = {}
    for key, val in mapping.items():
        # The common case first, without a call: an ASCII key (valid UTF-8) and a scalar value
        # that is already canonical. Bulk writes spend most of their payload time here.
        k = key if type(key) is str and key.isascii() else _check_key(key, path)
        t = type(val)
        if value is None and (
            (t is str and val.isascii())
            or t is float
            or val is None
            or t is bool
            or (t is int and _INT_MIN <= val <= _INT_MAX)
        ):
            out[k] = val
        else:
            out[k] = convert(val, f"{path}.{k}" if path else k, depth)
    return out


def values_equal(a: object, b: object) -> bool:
    """Structural equality where NaN equals NaN (payloads are values, and must equal their copies)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return len(a) == len(b) and all(k in b and values_equal(v, b[k]) for k, v in a.items())
    return bool(a == b)


def copy_value(value: PayloadValue) -> PayloadValue:
    """A deep copy of a canonical payload value (only lists and dicts are mutable)."""
    if isinstance(value, list):
        return [copy_value(v) for v in value]
    if isinstance(value, dict):
        return {k: copy_value(v) for k, v in value.items()}
    return value


class Payload(MutableMapping[str, PayloadValue]):
    """A mutable mapping ``str -> PayloadValue`` that iterates in key order.

    Parameters
    ----------
    mapping
        Initial items (any mapping); ``None`` for an empty payload.

    Raises
    ------
    InvalidArgument
        A key is not a ``str`` or a value is not a :data:`PayloadValue` (the message names the key).
    """

    __slots__ = ("_items",)

    def __init__(self, mapping: Mapping[str, object] | None = None) -> None:
        self._items: dict[str, PayloadValue] = {}
        if mapping is not None:
            if not isinstance(mapping, Mapping):
                raise InvalidArgument(f"payload must be a mapping, got {type(mapping).__name__}")
            self._items = _normalize_mapping(mapping, "", 0)

    @classmethod
    def _trusted(cls, items: dict[str, PayloadValue]) -> Payload:
        """Wrap already-canonical items without copying or checking (internal)."""
        p = cls.__new__(cls)
        p._items = items
        return p

    def __getitem__(self, key: str) -> PayloadValue:
        return self._items[key]

    def __setitem__(self, key: str, value: object) -> None:
        k = _check_key(key, "")
        self._items[k] = normalize_value(value, k, 1)

    def __delitem__(self, key: str) -> None:
        del self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def insert(self, key: str, value: object) -> PayloadValue:
        """Set ``key`` to ``value``; return the previous value or ``None``.

        Raises
        ------
        InvalidArgument
            ``key`` is not a ``str`` or ``value`` is not a :data:`PayloadValue`.
        """
        k = _check_key(key, "")  # first: an unhashable key would fail the lookup with TypeError
        previous = self._items.get(k)
        self._items[k] = normalize_value(value, k, 1)
        return previous

    def remove(self, key: str) -> PayloadValue:
        """Remove ``key``; return its value, or ``None`` when it was absent."""
        return self._items.pop(key, None)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return values_equal(self._items, other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {self._items[k]!r}" for k in self)
        return f"Payload({{{inner}}})"

    def __reduce__(self) -> tuple[type[Payload], tuple[dict[str, PayloadValue]]]:
        return (Payload, (self._items,))

    def copy(self) -> Payload:
        """A deep copy."""
        return Payload._trusted({k: copy_value(v) for k, v in self._items.items()})

    def to_dict(self) -> dict[str, PayloadValue]:
        """A deep copy as a plain ``dict`` (key order)."""
        return {k: copy_value(self._items[k]) for k in self}


def coerce_payload(payload: object) -> Payload | None:
    """``None`` stays ``None``; a :class:`Payload` is deep-copied; any other mapping is normalised."""
    if payload is None:
        return None
    if isinstance(payload, Payload):
        return payload.copy()
    if isinstance(payload, Mapping):
        return Payload(payload)
    raise InvalidArgument(f"payload must be a mapping or None, got {type(payload).__name__}")


# --- JSON-compatible form ------------------------------------------------------------------
# Plain JSON has no bytes and no non-finite floats, so those become one-key tagged objects.
# A user dict whose keys start with "$" is wrapped as {"$dict": {...}} so tags stay unambiguous.


def to_json_value(value: PayloadValue) -> Any:
    """Encode a canonical payload value as JSON-compatible data (see module notes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [to_json_value(v) for v in value]
    if isinstance(value, dict):
        inner = {k: to_json_value(v) for k, v in value.items()}
        if any(k.startswith("$") for k in value):
            return {"$dict": inner}
        return inner
    return value


def payload_from_json(data: Any) -> dict[str, PayloadValue]:
    """Decode a payload (a mapping) from :func:`to_json_value`'s output, checked as
    :class:`Payload` checks its items (key types, UTF-8, int range, nesting depth).

    Raises
    ------
    InvalidArgument
        Data that :func:`to_json_value` cannot have produced, or a value that is not a
        :data:`PayloadValue`; the message names the key, never the value.
    """
    if isinstance(data, dict) and len(data) == 1:
        ((tag, body),) = data.items()
        if isinstance(tag, str) and tag in _TAGS:
            data = body if tag == "$dict" else None
    if not isinstance(data, dict):
        raise InvalidArgument("payload must be a JSON object")
    return _mapping_from_json(data, "", 0)


_TAGS = ("$float", "$bytes", "$dict")


def from_json_value(data: Any, path: str = "", depth: int = 0) -> PayloadValue:
    """Decode :func:`to_json_value`'s output (a value at ``depth``, as in :func:`normalize_value`).

    Raises
    ------
    InvalidArgument
        As :func:`payload_from_json`.
    """
    if depth > _MAX_DEPTH:
        raise InvalidArgument(f"{_where(path)} is nested deeper than {_MAX_DEPTH} levels")
    if isinstance(data, dict):
        if len(data) == 1:
            ((tag, body),) = data.items()
            if isinstance(tag, str) and tag in _TAGS:
                return _tagged_from_json(tag, body, path, depth)
        return _mapping_from_json(data, path, depth + 1)
    if isinstance(data, list):
        return [from_json_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(data)]
    return normalize_value(data, path, depth)


def _tagged_from_json(tag: str, body: Any, path: str, depth: int) -> PayloadValue:
    if tag == "$float":
        if not isinstance(body, str) or body not in ("nan", "inf", "-inf"):
            raise InvalidArgument(f"{_where(path)}: bad $float tag")
        return float(body)
    if tag == "$bytes":
        if isinstance(body, str):
            try:
                return base64.b64decode(body.encode("ascii"), validate=True)
            except ValueError:  # not ASCII (UnicodeEncodeError), not base64 (binascii.Error)
                pass
        raise InvalidArgument(f"{_where(path)}: bad $bytes tag (not a base64 string)")
    if not isinstance(body, dict):
        raise InvalidArgument(f"{_where(path)}: bad $dict tag")
    return _mapping_from_json(body, path, depth + 1)


def _mapping_from_json(data: dict[Any, Any], path: str, depth: int) -> dict[str, PayloadValue]:
    return _normalize_mapping(data, path, depth, from_json_value)


# --- binary form ---------------------------------------------------------------------------
# One tag byte per value; little-endian fixed-width numbers; lengths as uint32.
# Used inside the WAL and the snapshot, both of which checksum the bytes around it.

_NONE, _FALSE, _TRUE, _INT, _FLOAT, _STR, _BYTES, _LIST, _DICT = range(9)
_Q = struct.Struct("<q")
_D = struct.Struct("<d")
_I = struct.Struct("<I")


_PACK_I, _PACK_Q, _PACK_D = _I.pack, _Q.pack, _D.pack
_TAG_INT, _TAG_FLOAT, _TAG_STR = bytes([_INT]), bytes([_FLOAT]), bytes([_STR])
_KEY_HEADS: dict[str, bytes] = {}  # a key's length and UTF-8 bytes, for the keys seen most
_KEY_HEADS_MAX = 4096


def _key_head(key: str) -> bytes:
    raw = key.encode("utf-8")
    head = _PACK_I(len(raw)) + raw
    if len(_KEY_HEADS) < _KEY_HEADS_MAX:
        _KEY_HEADS[key] = head  # a race only computes a head twice
    return head


def encode_payload(payload: Payload | None) -> bytes | None:
    """The binary form of a payload; ``None`` stays ``None`` (distinct from an empty payload).

    The bytes are :func:`_encode_into`'s, which defines the form; the top level is written here
    without its per-value dispatch (strings, ints and floats inline, keys' heads cached), as a
    bulk write or a compaction encodes every record."""
    if payload is None:
        return None
    items = payload._items
    out = [bytes([_DICT]), _PACK_I(len(items))]
    add = out.append
    heads = _KEY_HEADS
    for key, value in items.items():
        add(heads.get(key) or _key_head(key))
        t = type(value)
        if t is str:
            raw = value.encode("utf-8")  # type: ignore[union-attr]
            add(_TAG_STR)
            add(_PACK_I(len(raw)))
            add(raw)
        elif t is int:
            add(_TAG_INT)
            add(_PACK_Q(value))
        elif t is float:
            add(_TAG_FLOAT)
            add(_PACK_D(value))
        else:
            rest = bytearray()
            _encode_into(value, rest)
            add(bytes(rest))
    return b"".join(out)


def _encode_into(value: PayloadValue, out: bytearray) -> None:
    if value is None:
        out.append(_NONE)
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif isinstance(value, int):
        out.append(_INT)
        out += _Q.pack(value)
    elif isinstance(value, float):
        out.append(_FLOAT)
        out += _D.pack(value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(_STR)
        out += _I.pack(len(raw))
        out += raw
    elif isinstance(value, bytes):
        out.append(_BYTES)
        out += _I.pack(len(value))
        out += value
    elif isinstance(value, list):
        out.append(_LIST)
        out += _I.pack(len(value))
        for v in value:
            _encode_into(v, out)
    else:
        out.append(_DICT)
        out += _I.pack(len(value))
        for k, v in value.items():
            raw = k.encode("utf-8")
            out += _I.pack(len(raw))
            out += raw
            _encode_into(v, out)


def decode_payload(data: bytes | memoryview | None) -> Payload | None:
    """Inverse of :func:`encode_payload`; raises :class:`Corrupt` on malformed bytes.

    The top level is read inline (strings, ints, floats, bools and None; key strings cached),
    as an open decodes every record of a snapshot; anything else, and any bytes that do not
    read cleanly that way, take the defining recursive reader (:func:`_decode_at`), which also
    gives the errors."""
    if data is None:
        return None
    raw = data if type(data) is bytes else bytes(data)
    try:
        items = _decode_top(raw)
    except (struct.error, IndexError, UnicodeDecodeError, RecursionError, Corrupt):
        items = None
    if items is not None:
        return Payload._trusted(items)
    return _decode_checked(raw)


_UNPACK_I, _UNPACK_Q, _UNPACK_D = _I.unpack_from, _Q.unpack_from, _D.unpack_from
_KEY_STRS: dict[bytes, str] = {}  # a key's UTF-8 bytes -> the key, for the keys seen most


def _key_str(raw: bytes) -> str:
    key = raw.decode("utf-8")
    if len(_KEY_STRS) < _KEY_HEADS_MAX:
        _KEY_STRS[raw] = key
    return key


def _decode_top(buf: bytes) -> dict[str, PayloadValue] | None:
    """:func:`decode_payload`'s fast path: the top-level mapping, or ``None`` when the bytes are
    not one that reads cleanly (the caller then takes the recursive reader)."""
    end = len(buf)
    if end < 5 or buf[0] != _DICT:
        return None
    (count,) = _UNPACK_I(buf, 1)
    pos = 5
    out: dict[str, PayloadValue] = {}
    keys = _KEY_STRS
    for _ in range(count):
        (klen,) = _UNPACK_I(buf, pos)
        pos += 4
        if pos + klen >= end:
            return None
        kraw = buf[pos : pos + klen]
        key = keys.get(kraw) or _key_str(kraw)
        pos += klen
        tag = buf[pos]
        if tag == _STR:
            (slen,) = _UNPACK_I(buf, pos + 1)
            pos += 5
            if pos + slen > end:
                return None
            out[key] = buf[pos : pos + slen].decode("utf-8")
            pos += slen
        elif tag == _INT:
            out[key] = _UNPACK_Q(buf, pos + 1)[0]
            pos += 9
        elif tag == _FLOAT:
            out[key] = _UNPACK_D(buf, pos + 1)[0]
            pos += 9
        elif tag in (_TRUE, _FALSE, _NONE):
            out[key] = True if tag == _TRUE else False if tag == _FALSE else None
            pos += 1
        else:
            out[key], pos = _decode_at(memoryview(buf), pos, 1)
    return out if pos == end else None


def _decode_checked(data: bytes) -> Payload:
    """The recursive reader over a whole payload, with its errors as :class:`Corrupt`."""
    view = memoryview(data)
    try:
        value, end = _decode_at(view, 0, 0)
    except UnicodeDecodeError:
        # Not `from exc`: its message quotes the offending byte, and messages never echo payloads.
        raise Corrupt("malformed payload bytes: a string or key is not valid UTF-8") from None
    except (struct.error, IndexError, RecursionError) as exc:
        raise Corrupt(f"malformed payload bytes: {exc}") from exc
    if end != len(view) or not isinstance(value, dict):
        raise Corrupt("malformed payload bytes: trailing data or not a mapping")
    return Payload._trusted(value)


def _decode_at(buf: memoryview, pos: int, depth: int) -> tuple[PayloadValue, int]:
    if depth > _MAX_DEPTH + 1:
        raise Corrupt("malformed payload bytes: nesting too deep")
    tag = buf[pos]
    pos += 1
    if tag == _NONE:
        return None, pos
    if tag == _FALSE:
        return False, pos
    if tag == _TRUE:
        return True, pos
    if tag == _INT:
        return _Q.unpack_from(buf, pos)[0], pos + 8
    if tag == _FLOAT:
        return _D.unpack_from(buf, pos)[0], pos + 8
    if tag in (_STR, _BYTES):
        (n,) = _I.unpack_from(buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise Corrupt("malformed payload bytes: length past the end")
        raw = bytes(buf[pos : pos + n])
        return (raw.decode("utf-8") if tag == _STR else raw), pos + n
    if tag == _LIST:
        (n,) = _I.unpack_from(buf, pos)
        pos += 4
        items: list[PayloadValue] = []
        for _ in range(n):
            item, pos = _decode_at(buf, pos, depth + 1)
            items.append(item)
        return items, pos
    if tag == _DICT:
        (n,) = _I.unpack_from(buf, pos)
        pos += 4
        mapping: dict[str, PayloadValue] = {}
        for _ in range(n):
            (klen,) = _I.unpack_from(buf, pos)
            pos += 4
            if pos + klen > len(buf):
                raise Corrupt("malformed payload bytes: length past the end")
            key = bytes(buf[pos : pos + klen]).decode("utf-8")
            pos += klen
            mapping[key], pos = _decode_at(buf, pos, depth + 1)
        return mapping, pos
    raise Corrupt(f"malformed payload bytes: unknown tag {tag}")
