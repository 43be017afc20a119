"""Archive: an output of many Parquet parts, where a night's run rewrites only what changed.

`tags` is a symlink to a version folder `tags.d/v000042/` holding `part-000042-NNNNN.parquet`
files, each a contiguous range of rows sorted by (root, path), `_omni.json` (the run's metadata)
and `_parts.json` (each part's key range, rows and bytes). A run writes a new version folder: a part
whose range holds no change is hard-linked from the previous version; the parts that hold a
change are rewritten, streaming the old part row group by row group, dropping the rows of
deleted or changed files and merging the new rows in key order. Then a temporary symlink is
renamed over `tags`: readers see the old version or the new one, never a mix (part names carry
the version, so a reader that listed the old one and opens a part after the switch gets an
error, not rows of another range; one that resolves the symlink first reads its version
whole). A crash at any instant leaves the previous version visible; the next run removes
half-written versions. The version a run replaces is kept until the next run, so that a reader
that listed it can finish.

Compaction keeps parts bounded: a rewritten range is cut into parts of about `TARGET_BYTES` of
uncompressed data (equal row counts), and a rewritten range smaller than half the target
absorbs its neighbour, so small parts do not pile up. The target is in bytes, so 1,000 labels
and 20,000 labels both give parts of a sensible size.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import OutputError, UsageError
from .layout import (
    INDEX_FILE,
    META_FILE,
    PART_GLOB,
    fsync,
    fsync_dir,
    meta_json,
    versions_dir,
    write_file,
)

TARGET_BYTES = 32 << 20  # uncompressed bytes a part aims for
ROW_GROUP_BYTES = 8 << 20  # Arrow bytes per row group: what a streaming reader holds at once
CHUNK_ROWS = 2048  # new rows merged at a time


@dataclass(frozen=True)
class Part:
    """One part of a version: its file name, size and the sort keys of its first and last row."""

    name: str
    rows: int
    bytes: int  # on disk
    raw: int  # uncompressed, as Parquet counts it
    first: str  # root + "\0" + path
    last: str


def sort_keys(batch) -> pa.Array:
    """root + "\\0" + path: sorts as (root, path) do, since no name holds a NUL."""
    return pc.binary_join_element_wise(batch["root"], batch["path"], "\x00")


def current(output: Path) -> Path | None:
    """The version folder an archive's symlink points at, or None if there is none yet."""
    output = Path(output)
    if not output.is_symlink():
        return None
    target = output.parent / os.readlink(output)
    return target if target.is_dir() else None


def check(output: Path) -> None:
    """Refuse an `-o NAME` that is something other than an archive (or nothing yet)."""
    output = Path(output)
    if output.is_symlink():
        target = os.readlink(output)
        if Path(target).parent.name != versions_dir(output).name:
            raise UsageError(f"--output {output} is a symlink that is not an omni archive")
        return
    if output.is_file():
        raise UsageError(
            f"--output {output} is one file, and a name without .parquet means the archive "
            f"layout: give -o {output.name}.parquet, or move it away (see README: one file or "
            "an archive); nothing was touched"
        )
    if output.is_dir() and any(output.iterdir()):
        raise UsageError(
            f"--output {output} is a folder that is not an omni archive; nothing was touched"
        )


def recover(output: Path) -> None:
    """Remove what a killed run left: half-written versions, older versions, temporary links.

    Called under the output's lock. Only the version the symlink points at stays; the one it
    replaced has had a whole run's time for its readers to finish.
    """
    output = Path(output)
    keep = current(output)
    for stale in output.parent.glob(f".{output.name}.link-*"):
        stale.unlink(missing_ok=True)
    root = versions_dir(output)
    if not root.is_dir():
        return
    for version in root.iterdir():
        if keep is None or version.resolve() != keep.resolve():
            shutil.rmtree(version, ignore_errors=True)


def index(version: Path) -> list[Part]:
    """The parts of a version, in key order (from `_parts.json`, else from the files)."""
    try:
        raw = json.loads((version / INDEX_FILE).read_text(encoding="utf-8"))
        return [Part(**p) for p in raw["parts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return [describe(p) for p in sorted(version.glob(PART_GLOB))]


def describe(path: Path) -> Part:
    meta = pq.read_metadata(path)
    raw = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    keys = sort_keys(pq.read_table(path, columns=["root", "path"]))
    first, last = (keys[0].as_py(), keys[-1].as_py()) if len(keys) else ("", "")
    return Part(path.name, meta.num_rows, path.stat().st_size, raw, first, last)


class NewRows:
    """The rows a run tagged (the parts in `OUT.partial/` that still hold), in key order.

    Only their keys are held; rows are fetched by key range, a row group at a time, the last two
    cached (the rows of a range come from few of them: files are tagged in key order).
    """

    def __init__(self, source: Path | list[Path], schema: pa.Schema,
                 keep: Callable[[pa.Table], pa.Array]):  # fmt: skip
        """`source`: a folder of flushed parts, or a list of Parquet files."""
        self.schema = schema
        if isinstance(source, list):
            files = source
        else:
            files = sorted(source.glob(PART_GLOB)) if source.is_dir() else []
        self.units: list[tuple[Path, int]] = []  # (file, row group): what is read at once
        tables, raw = [], 0
        for path in files:
            file = pq.ParquetFile(path, pre_buffer=False)
            for g in range(file.num_row_groups):
                raw += file.metadata.row_group(g).total_byte_size
                t = file.read_row_group(g, columns=["root", "path", "bytes", "mtime_ns"])
                number = np.full(t.num_rows, len(self.units), np.int32)
                t = t.append_column("file", pa.array(number))
                tables.append(t.append_column("row", pa.array(np.arange(t.num_rows))))
                self.units.append((path, g))
        rows = sum(t.num_rows for t in tables)
        self.row_bytes = raw / rows if rows else 0.0
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        if not tables:
            self.keys, self.file, self.row = pa.array([], pa.string()), np.zeros(0), np.zeros(0)
            return
        table = pa.concat_tables(tables)
        table = table.filter(keep(table))
        table = table.append_column("key", sort_keys(table)).sort_by("key")
        self.keys = table["key"].combine_chunks()
        self.file = table["file"].to_numpy()
        self.row = table["row"].to_numpy()

    def __len__(self) -> int:
        return len(self.keys)

    def position(self, key: str) -> int:
        """How many new rows sort before `key`."""
        return bisect.bisect_left(_Keys(self.keys), key)

    def fetch(self, lo: int, hi: int) -> pa.Table:
        """New rows lo..hi (in key order) in the output schema."""
        pieces = []
        files, rows = self.file[lo:hi], self.row[lo:hi]
        for number in np.unique(files):
            table = self._read(int(number))
            pieces.append(table.take(pa.array(rows[files == number])))
        table = pa.concat_tables(pieces) if pieces else self.schema.empty_table()
        return table.take(pc.sort_indices(sort_keys(table)))

    def _read(self, number: int) -> pa.Table:
        if number not in self._cache:
            path, group = self.units[number]
            table = pq.ParquetFile(path, pre_buffer=False).read_row_group(group)
            self._cache[number] = pa.Table.from_batches(table.to_batches(), schema=self.schema)
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[number]


class _Keys:
    """A sorted Arrow string array seen as a sequence, for `bisect`."""

    def __init__(self, array: pa.Array):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> str:
        return self.array[i].as_py()


@dataclass(frozen=True)
class Previous:
    """What a run carries from the version it replaces."""

    version: Path
    parts: tuple[Part, ...]
    carried: tuple[int, ...]  # rows of each part that stay
    stays: dict[str, np.ndarray]  # per part name: which of its rows stay, in file order
    rescore: Callable[[pa.RecordBatch], pa.RecordBatch] | None = None  # None: rows stay as are


def publish(
    output: Path,
    schema: pa.Schema,
    previous: Previous | None,
    new: NewRows,
    *,
    target_bytes: int | None = None,
    before_switch: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Write the next version of the archive and make it the visible one; (rows, bytes written).

    `before_switch` is called between writing the new version and switching to it (tests use
    it to crash there).
    """
    output = Path(output)
    target_bytes = target_bytes or TARGET_BYTES
    root = versions_dir(output)
    root.mkdir(exist_ok=True)
    numbers = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    version = root / f"v{max(numbers, default=0) + 1:06d}"
    version.mkdir()
    writer = _Writer(version, schema)
    parts = list(previous.parts) if previous else []
    # New rows that sort before part i+1's first row belong to part i.
    starts = [0] + [new.position(p.first) for p in parts[1:]]
    ends = starts[1:] + [len(new)]
    if not parts:
        writer.region(_merge(None, new, 0, len(new), schema), len(new), target_bytes)
    else:
        for lo, hi, dirty in _regions(parts, previous, starts, ends, new.row_bytes, target_bytes):
            if not dirty:
                for part in parts[lo:hi]:
                    writer.link(previous.version / part.name, part)
                continue
            rows = sum(previous.carried[lo:hi]) + ends[hi - 1] - starts[lo]

            def stream(lo=lo, hi=hi):
                for i in range(lo, hi):
                    old = _old_rows(previous.version / parts[i].name, previous)
                    yield from _merge(old, new, starts[i], ends[i], schema)

            writer.region(stream(), rows, target_bytes)
    if not writer.parts:  # no rows: one empty part, so that readers still find the columns
        writer.empty()
    (version / META_FILE).write_text(meta_json(schema), encoding="utf-8")
    index = {"format": 1, "parts": [asdict(p) for p in writer.parts]}
    (version / INDEX_FILE).write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
    for name in (META_FILE, INDEX_FILE):
        fsync(version / name)
    fsync_dir(version)
    fsync_dir(root)
    if before_switch is not None:
        before_switch()
    switch(output, version)
    return sum(p.rows for p in writer.parts), writer.written


def switch(output: Path, version: Path) -> None:
    """Point `output` at `version` atomically (a new symlink renamed over the old one)."""
    link = output.with_name(f".{output.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    os.symlink(os.path.relpath(version, output.parent), link)
    if output.is_dir() and not output.is_symlink():
        output.rmdir()  # an empty folder given as -o NAME/ (check() refuses any other)
    os.replace(link, output)
    fsync_dir(output.parent)


def _regions(parts, previous: Previous, starts, ends, new_row_bytes, target):
    """(lo, hi, dirty): runs of parts to hard-link (clean) or to rewrite together (dirty).

    A part is dirty when it loses rows, gains rows or every row is rescored. A dirty run smaller
    than half the target takes in its next neighbour (then the run after it, if dirty too).
    """
    n = len(parts)
    dirty = [
        previous.rescore is not None or previous.carried[i] < parts[i].rows or ends[i] > starts[i]
        for i in range(n)
    ]

    def size(i: int) -> float:
        p = parts[i]
        return previous.carried[i] * (p.raw / max(p.rows, 1)) + (ends[i] - starts[i]) * (
            new_row_bytes or p.raw / max(p.rows, 1)
        )

    i = 0
    while i < n:
        if not dirty[i]:
            j = i
            while j < n and not dirty[j]:
                j += 1
            yield i, j, False
            i = j
            continue
        j = i + 1
        while j < n and dirty[j]:
            j += 1
        while j < n and sum(size(k) for k in range(i, j)) < target / 2:
            j += 1
            while j < n and dirty[j]:
                j += 1
        yield i, j, True
        i = j


def _old_rows(path: Path, previous: Previous) -> Iterator[pa.RecordBatch]:
    """A previous part's rows that stay, row group by row group, rescored if asked."""
    stays = previous.stays.get(path.name)
    if stays is None:  # listed in _parts.json but not among the files this run read
        raise OutputError(f"{path} is not a part this run read; the archive was not changed")
    try:
        for table in kept_rows(path, stays):
            for batch in table.to_batches():
                if batch.num_rows:
                    yield previous.rescore(batch) if previous.rescore else batch
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read {path} ({exc}); the archive was not changed") from None


def kept_rows(path: Path, stays: np.ndarray) -> Iterator[pa.Table]:
    """A Parquet file's rows where `stays` (a flag a row, in file order), a row group at a time.

    The flags come from reading the same file earlier under the same lock (`compare.survey`);
    files are never rewritten in place, so the rows line up.
    """
    file = pq.ParquetFile(path, pre_buffer=False)
    if file.metadata.num_rows != len(stays):
        raise OutputError(f"{path} changed while this run held its lock; nothing was touched")
    at = 0
    for g in range(file.num_row_groups):
        table = file.read_row_group(g)
        keep = stays[at : at + table.num_rows]
        at += table.num_rows
        yield table if keep.all() else table.filter(pa.array(keep))


def _merge(old, new: NewRows, lo: int, hi: int, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Old rows (sorted batches, or None) merged with new rows lo..hi, in key order."""
    at = lo
    for batch in old or ():
        batch = pa.RecordBatch.from_arrays(batch.columns, schema=schema)
        upto = max(at, min(hi, new.position(sort_keys(batch)[-1].as_py())))
        table = pa.Table.from_batches([batch])
        if upto > at:
            table = pa.concat_tables([table, new.fetch(at, upto)])
            table = table.take(pc.sort_indices(sort_keys(table)))
        at = upto
        yield from table.to_batches()
    while at < hi:
        upto = min(hi, at + CHUNK_ROWS)
        yield from new.fetch(at, upto).to_batches()
        at = upto


class _Writer:
    """Writes a version's parts in key order: hard links of clean parts, rewritten regions."""

    def __init__(self, version: Path, schema: pa.Schema):
        self.version, self.schema = version, schema
        self.parts: list[Part] = []
        self.written = 0  # bytes of new files (hard links cost nothing)

    def _name(self) -> Path:
        # The version in the name: a reader that listed the old version through the symlink
        # and opens a part after the switch finds no such file, rather than another range.
        return self.version / f"part-{self.version.name[1:]}-{len(self.parts):05d}.parquet"

    def link(self, source: Path, part: Part) -> None:
        path = self._name()
        try:
            os.link(source, path)
        except OSError:  # a filesystem without hard links: copy (correct, but not free)
            shutil.copyfile(source, path)
            fsync(path)
            self.written += part.bytes
        self.parts.append(Part(path.name, part.rows, part.bytes, part.raw, part.first, part.last))

    def region(self, batches: Iterator[pa.RecordBatch], rows: int, target: int) -> None:
        """Write `rows` rows from `batches` as parts of equal row counts near `target` bytes."""
        if rows <= 0:
            for _ in batches:  # nothing stays; still read, so a bad part is reported
                pass
            return
        per = None
        pending: list[pa.RecordBatch] = []
        count = 0
        for batch in batches:
            if per is None:  # bytes per row, from the first batch
                size = batch.nbytes / max(batch.num_rows, 1) * rows
                per = math.ceil(rows / max(1, round(size / target)))
            while batch.num_rows:
                take = min(batch.num_rows, per - count)
                pending.append(batch.slice(0, take))
                batch = batch.slice(take)
                count += take
                if count == per:
                    self._write(pending)
                    pending, count = [], 0
        if pending:
            self._write(pending)

    def empty(self) -> None:
        path = self._name()
        rows, size = write_file(path, iter(()), self.schema, meta=False)
        self.parts.append(Part(path.name, 0, size, 0, "", ""))
        self.written += size

    def _write(self, batches: list[pa.RecordBatch]) -> None:
        path = self._name()
        first = sort_keys(batches[0])[0].as_py()
        last = sort_keys(batches[-1])[-1].as_py()
        rows, size = write_file(
            path, iter(batches), self.schema, meta=False, row_group_bytes=ROW_GROUP_BYTES
        )
        meta = pq.read_metadata(path)
        raw = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        self.parts.append(Part(path.name, rows, size, raw, first, last))
        self.written += size


def convert(source: Path, target: Path) -> int:
    """Write the rows and metadata of one output (either layout) as another; returns its rows.

    `target` ending in `.parquet` becomes one file, any other name an archive. Streams: one
    row group at a time (one file into an archive is fastest when its rows are nearly in
    (root, path) order, as `omni tag` writes them).
    """
    from .layout import META_KEY, is_archive, metadata, parts
    from .lock import OutputLock

    source, target = Path(source), Path(target)
    files, meta = parts(source), metadata(source)
    if not files or meta is None:
        raise UsageError(f"{source} is not an omni output")
    schema = pq.read_schema(files[0]).with_metadata({META_KEY: json.dumps(meta)})
    with OutputLock(target):
        if is_archive(target):
            check(target)
            recover(target)
            new = NewRows(files, schema, lambda t: pa.array(np.ones(t.num_rows, bool)))
            rows, _ = publish(target, schema, None, new)
            return rows

        def batches():
            for path in files:
                file = pq.ParquetFile(path, pre_buffer=False)
                for g in range(file.num_row_groups):
                    table = file.read_row_group(g)
                    yield from pa.Table.from_batches(table.to_batches(), schema=schema).to_batches()

        tmp = target.with_name(target.name + ".tmp")
        rows, _ = write_file(tmp, batches(), schema)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        return rows
