"""``root/manifest.json``: the layout of a sharded database, and how it is created and checked.

>>> import json, tempfile
>>> from iqdb.distributed._manifest import create_layout, read_manifest
>>> root = tempfile.mkdtemp()
>>> m = create_layout(root, 2)
>>> (m.shards, m.hash_name, m.dim, read_manifest(root) == m)
(2, 'splitmix64-jump', None, True)

The manifest is written last when a database is created (after every shard directory and its
marker), atomically (a temporary file, synced, renamed, the directory synced), so a root either
has a complete layout or no manifest at all. It records what must never change for the life of
the database: the shard count, the id-to-shard hash (name and version), the dimension once the
first vector fixed it, and a format version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from .._errors import Corrupt, InvalidConfig
from ._routing import HASH_NAME, HASH_VERSION
from ._shard import MARKER, _sync_dir, read_marker, write_marker

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "Manifest",
    "create_layout",
    "read_manifest",
    "shard_dir",
    "write_manifest",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_FORMAT = "iqdb-sharded"


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds."""

    uuid: str
    shards: int
    dim: int | None
    hash_name: str = HASH_NAME
    hash_version: int = HASH_VERSION
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": self.format_version,
            "uuid": self.uuid,
            "shards": self.shards,
            "hash": {"name": self.hash_name, "version": self.hash_version},
            "dim": self.dim,
            "shard_dirs": [shard_name(i) for i in range(self.shards)],
        }

    def with_dim(self, dim: int) -> Manifest:
        return dataclasses.replace(self, dim=dim)


def shard_name(index: int) -> str:
    """The directory name of shard ``index``: ``shard-00000``, ``shard-00001``, ..."""
    return f"shard-{index:05d}"


def shard_dir(root: str, index: int) -> str:
    """The directory of shard ``index`` under ``root``."""
    return os.path.join(root, shard_name(index))


def read_manifest(root: str) -> Manifest | None:
    """The manifest in ``root``, or ``None`` when there is none.

    Raises
    ------
    Corrupt
        The file is not valid JSON or lacks a field.
    InvalidConfig
        It was written by a newer format, or names a hash this version does not know.
    """
    path = os.path.join(root, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise InvalidConfig(f"{path!r} is not an iqdb sharded-database manifest")
        version = data["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InvalidConfig(
                f"{path!r} has format version {version!r}; this iqdb reads up to {FORMAT_VERSION}"
            )
        hashing = data["hash"]
        if (hashing["name"], hashing["version"]) != (HASH_NAME, HASH_VERSION):
            raise InvalidConfig(
                f"{path!r} routes ids with {hashing['name']!r} version {hashing['version']!r}; "
                f"this iqdb knows {HASH_NAME!r} version {HASH_VERSION}"
            )
        shards, dim, uuid = data["shards"], data["dim"], data["uuid"]
        if not isinstance(shards, int) or shards < 1 or not (dim is None or isinstance(dim, int)):
            raise Corrupt(f"{path!r} has an invalid shard count or dimension")
        if not isinstance(uuid, str):
            raise Corrupt(f"{path!r} has an invalid uuid")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, InvalidConfig):
            raise
        raise Corrupt(f"{path!r} is not a valid manifest: {exc!r}") from exc
    return Manifest(uuid=uuid, shards=shards, dim=dim, format_version=version)


def write_manifest(root: str, manifest: Manifest) -> None:
    """Replace ``root/manifest.json`` atomically and durably."""
    path = os.path.join(root, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())  # the contents reach the disk before the name does
    os.replace(tmp, path)
    _sync_dir(root)  # and the rename itself survives a machine crash


def _leftover(root: str, entry: str) -> bool:
    """An entry an interrupted creation left: a shard directory holding only its marker."""
    path = os.path.join(root, entry)
    if entry == MANIFEST + ".tmp":
        return True
    if not (entry.startswith("shard-") and os.path.isdir(path)):
        return False
    return set(os.listdir(path)) <= {MARKER, MARKER + ".tmp"}


def create_layout(root: str, shards: int) -> Manifest:
    """Create a sharded database's directories, markers and manifest in ``root``.

    Raises
    ------
    InvalidConfig
        ``root`` holds something other than the remains of an interrupted creation.
    """
    os.makedirs(root, exist_ok=True)
    foreign = sorted(e for e in os.listdir(root) if not _leftover(root, e))
    if foreign:
        raise InvalidConfig(
            f"{root!r} has no {MANIFEST} but is not empty ({', '.join(foreign[:3])}): "
            "not a sharded iqdb database"
        )
    manifest = Manifest(uuid=uuidlib.uuid4().hex, shards=shards, dim=None)
    for i in range(shards):
        write_marker(shard_dir(root, i), manifest.uuid, i, shards)
    _sync_dir(root)
    write_manifest(root, manifest)  # last: its presence means the layout is complete
    return manifest


def check_layout(root: str, manifest: Manifest) -> None:
    """Every shard directory exists with the marker of this database and index.

    Raises
    ------
    InvalidConfig
        A shard directory or its marker is missing, or belongs to another database or shard.
    """
    for i in range(manifest.shards):
        where = shard_dir(root, i)
        marker = read_marker(where) if os.path.isdir(where) else None
        if marker is None:
            raise InvalidConfig(f"shard {i} of {root!r} is missing: no {MARKER} in {where!r}")
        if marker.get("uuid") != manifest.uuid or marker.get("index") != i:
            raise InvalidConfig(
                f"{where!r} belongs to database {marker.get('uuid')!r} shard {marker.get('index')!r}, "
                f"not to {manifest.uuid!r} shard {i}"
            )
