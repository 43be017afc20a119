"""Listing: the files a run found, held as one Arrow table rather than one object per file.

A nightly run over a million files keeps their list for the whole run (to plan the work and
to compare with the previous output); as `FileEntry` objects that is ~400 bytes a file, as
Arrow columns about the length of the names. `Files` is that table, and also the list of
files a run tags (`Plan.todo`): a loader's workers index it, and each `FileEntry` is made
when its file is decoded, so no list of objects is held or inherited by every worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .sources import FileEntry

COLUMNS = pa.schema(
    [
        ("root", pa.string()),
        ("rel", pa.string()),
        ("path", pa.binary()),  # os.fsencode: a name need not be UTF-8
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("error", pa.string()),
    ]
)
CHUNK = 65_536  # entries gathered as Python objects before they become Arrow columns


class Files:
    """The files found, in listing order: an Arrow table with the columns of `COLUMNS`."""

    def __init__(self, table: pa.Table):
        self.table = table

    @classmethod
    def of(cls, entries: Iterable[FileEntry]) -> Files:
        chunks, pending = [], []
        for entry in entries:
            pending.append(entry)
            if len(pending) == CHUNK:
                chunks.append(_batch(pending))
                pending = []
        if pending or not chunks:
            chunks.append(_batch(pending))
        return cls(pa.Table.from_batches(chunks, schema=COLUMNS).combine_chunks())

    def plus(self, entries: Sequence[FileEntry]) -> Files:
        """These files and `entries` after them."""
        if not entries:
            return self
        return Files(pa.concat_tables([self.table, Files.of(entries).table]))

    def __len__(self) -> int:
        return self.table.num_rows

    def keys(self) -> pa.Array:
        """root, path, bytes, mtime_ns joined as the output's rows are (`layout.row_keys`)."""
        t = self.table
        parts = [t["root"], t["rel"], pc.cast(t["bytes"], pa.string()),
                 pc.cast(t["mtime_ns"], pa.string())]  # fmt: skip
        keys = pc.binary_join_element_wise(*parts, "\x00")
        return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys

    def entries(self, rows: Sequence[int] | np.ndarray | None = None, *,
                sort: bool = False) -> list[FileEntry]:  # fmt: skip
        """`FileEntry` objects for some rows (all if None), optionally sorted by (root, rel)."""
        table = self.table if rows is None else self.table.take(pa.array(rows, pa.int64()))
        if sort:
            table = table.sort_by([("root", "ascending"), ("rel", "ascending")])
        columns = [table[name].to_pylist() for name in COLUMNS.names]
        columns[2] = [os.fsdecode(p) for p in columns[2]]
        return [FileEntry(*values) for values in zip(*columns, strict=True)]

    def __getitem__(self, index: int) -> FileEntry:
        """One file, made into a `FileEntry` when asked for (what a loader's worker decodes)."""
        row = self.table.slice(index, 1).to_pylist()[0]
        row["path"] = os.fsdecode(row["path"])
        return FileEntry(**row)

    def take(self, rows, *, sort: bool = False) -> Files:
        """Some rows (in order, or sorted by (root, rel)), still as a table."""
        table = self.table.take(pa.array(rows, pa.int64()))
        if sort:
            table = table.sort_by([("root", "ascending"), ("rel", "ascending")])
        return Files(table.combine_chunks())

    def __iter__(self):
        for start in range(0, len(self), CHUNK):  # a chunk of objects at a time
            yield from Files(self.table.slice(start, CHUNK)).entries()


def _batch(entries: list[FileEntry]) -> pa.RecordBatch:
    columns = [[getattr(e, name) for e in entries] for name in COLUMNS.names]
    columns[2] = [os.fsencode(p) for p in columns[2]]
    return pa.RecordBatch.from_arrays(
        [pa.array(c, f.type) for c, f in zip(columns, COLUMNS, strict=True)], schema=COLUMNS
    )
