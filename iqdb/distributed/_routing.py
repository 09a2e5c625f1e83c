"""Which shard holds an id: SplitMix64, then jump consistent hash.

>>> import numpy as np
>>> from iqdb.distributed._routing import shard_of
>>> shard_of(np.array([0, 1, 2, 3], dtype=np.uint64), 4).tolist()
[3, 3, 0, 1]

The mapping is part of the on-disk format (``manifest.json`` names it as :data:`HASH_NAME` and
:data:`HASH_VERSION`): every id must route to the shard that holds it on every platform and in every
later version, so it is built from integer arithmetic modulo 2**64 and one IEEE double division,
never from Python's ``hash()`` (ints hash to themselves, so structured ids such as multiples of the
shard count would all land on one shard) or from anything seeded per process.

SplitMix64's finalizer spreads structured ids over all 64 bits; the jump consistent hash of
Lamping and Veach ("A Fast, Minimal Memory, Consistent Hash Algorithm", 2014) then picks a shard so
that going from ``S`` to ``S + 1`` shards moves only about ``1 / (S + 1)`` of the ids (a future
resharding copies only those).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["HASH_NAME", "HASH_VERSION", "shard_of", "splitmix64"]

HASH_NAME = "splitmix64-jump"
HASH_VERSION = 1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LCG = np.uint64(2862933555777941757)  # the jump hash's linear congruential step
_ONE = np.uint64(1)


def splitmix64(ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's output function applied to each id (wrapping uint64 arithmetic).

    >>> import numpy as np
    >>> hex(int(splitmix64(np.array([0], dtype=np.uint64))[0]))
    '0xe220a8397b1dcdaf'
    """
    # Array arithmetic on uint64 wraps modulo 2**64 without a warning (scalar arithmetic would
    # warn), which is exactly the C semantics the algorithm is defined by.
    z = np.asarray(ids, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    out: npt.NDArray[np.uint64] = z ^ (z >> np.uint64(31))
    return out


def _jump(keys: npt.NDArray[np.uint64], buckets: int) -> npt.NDArray[np.int64]:
    """Jump consistent hash of each key into ``[0, buckets)``, vectorised: every key takes the
    same steps as the reference loop, the keys still jumping are updated together."""
    key = keys.copy()
    b = np.full(key.shape, -1, dtype=np.int64)
    j = np.zeros(key.shape, dtype=np.int64)
    active = np.arange(key.shape[0])
    while active.size:
        b[active] = j[active]
        k = key[active] * _LCG + _ONE
        key[active] = k
        # (b + 1) * (2**31 / ((key >> 33) + 1)) in doubles, truncated: the reference's own
        # expression. (key >> 33) + 1 < 2**31 is exact in a double; the division and the
        # product round the same on every IEEE machine.
        step = (b[active] + 1).astype(np.float64) * (
            float(1 << 31) / ((k >> np.uint64(33)).astype(np.float64) + 1.0)
        )
        # Values at or beyond `buckets` only end the loop, so they are clipped before the cast.
        j[active] = np.minimum(step, float(buckets)).astype(np.int64)
        active = active[j[active] < buckets]
    return b


def shard_of(ids: npt.NDArray[np.uint64], shards: int) -> npt.NDArray[np.int64]:
    """The shard (``0 <= s < shards``) that holds each id.

    Parameters
    ----------
    ids
        A 1-D ``uint64`` array of record ids.
    shards
        The number of shards, at least 1.

    Raises
    ------
    ValueError
        ``shards`` is less than 1 (callers validate it first; this guards the format).
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    keys = splitmix64(np.asarray(ids, dtype=np.uint64).reshape(-1))
    if shards == 1:
        return np.zeros(keys.shape, dtype=np.int64)
    return _jump(keys, shards)
