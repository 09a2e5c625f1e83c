"""A read-only open racing a writer's compaction sees a consistent state, never a false Corrupt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import iqdb
from iqdb._fs import OsFileSystem


class CompactAfterSnapshotRead(OsFileSystem):
    """Runs ``hook`` once, right after the reader has mapped the snapshot and before the WAL."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def map(self, path: str) -> Any:
        buf = super().map(path)
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return buf


def test_readonly_open_retries_when_a_compaction_lands_between_its_reads(tmp_path: Path) -> None:
    path = tmp_path / "db"
    writer = iqdb.open(path)
    writer.upsert_many([1, 2], [[1.0, 0.0], [0.0, 1.0]])
    writer.compact()
    writer.upsert(iqdb.Record(3, [1.0, 1.0]))

    def compact_and_write() -> None:
        # The reader now holds the old snapshot; the WAL it is about to read is of a newer
        # generation than that snapshot.
        writer.compact()
        writer.upsert(iqdb.Record(4, [2.0, 2.0]))
        writer.flush()

    reader = iqdb.open(path, readonly=True, fs=CompactAfterSnapshotRead(compact_and_write))
    try:
        assert sorted(int(i) for i in reader._store.ids) == [1, 2, 3, 4]
        assert reader.get(4) == iqdb.Record(4, [2.0, 2.0])
    finally:
        reader.close()
        writer.close()
