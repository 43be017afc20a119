"""Layout: what an output is on disk, and the one way to read its metadata and list its parts.

An output is either one Parquet file (`-o tags.parquet`: a name ending in `.parquet`) or an
archive (`-o tags`: any other name): `tags` is then a symlink to a version folder
`tags.d/vNNNNNN/` holding `part-NNNNNN-NNNNN.parquet` files (each a contiguous range of rows
sorted by root and path) and `_omni.json`, the run's metadata. Readers skip names that start
with `_`, so `pd.read_parquet("tags")`, `pq.read_table("tags")`, DuckDB's
`read_parquet('tags/*.parquet')` and polars' `pl.read_parquet("tags/*.parquet")` read exactly
the rows.

The metadata (labels, prompts, model, options) is stored once: in `_omni.json` for an archive,
and for one file in the Parquet footer's key-value metadata under `omni` only, not again inside
the base64 `ARROW:schema` (files are written with a schema stripped of metadata). Files written
before that hold it in both places; `metadata()` reads every form, and everything that reads an
output's metadata goes through it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

META_KEY = b"omni"
META_FILE = "_omni.json"  # an archive's metadata, in its version folder
INDEX_FILE = "_parts.json"  # an archive's parts: key range, rows and bytes of each
PART_GLOB = "part-*.parquet"
# Columns worth dictionary-encoding. Not the float lists: a dictionary of random-looking floats
# fills up and is thrown away, which costs a third of the write time and of the read time.
DICTIONARY = ["root", "path", "status", "error", "top_labels.list.element"]
WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": DICTIONARY}


def is_archive(output: Path) -> bool:
    """True when `output` names the archive layout: any name not ending in `.parquet`."""
    return not Path(output).name.lower().endswith(".parquet")


def versions_dir(output: Path) -> Path:
    """`tags.d`, the folder that holds an archive's versions."""
    output = Path(output)
    return output.with_name(output.name + ".d")


def parts(output: Path) -> list[Path]:
    """The Parquet files that hold an output's rows: the one file, or the archive's parts."""
    output = Path(output)
    if output.is_dir():
        return sorted(output.glob(PART_GLOB))
    return [output] if output.is_file() else []


def metadata(output: Path) -> dict | None:
    """The run's metadata of an output (either layout, old files included); None if absent."""
    output = Path(output)
    try:
        if output.is_dir():
            return json.loads((output / META_FILE).read_text(encoding="utf-8"))
        return file_metadata(pq.read_metadata(output))
    except (OSError, ValueError, pa.ArrowException):
        return None


def file_metadata(meta: pq.FileMetaData) -> dict | None:
    """The `omni` key of one Parquet file's footer (new files: only there; old: there too)."""
    raw = (meta.metadata or {}).get(META_KEY)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def row_keys(batch) -> pa.Array:
    """root, path, bytes, mtime_ns joined: one string that names a file as it was."""
    parts = [
        batch["root"],
        batch["path"],
        pc.cast(batch["bytes"], pa.string()),
        pc.cast(batch["mtime_ns"], pa.string()),
    ]
    keys = pc.binary_join_element_wise(*parts, "\x00")
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def bare(schema: pa.Schema) -> pa.Schema:
    """`schema` without metadata: what the Parquet files are written with."""
    return schema.remove_metadata()


def meta_json(schema: pa.Schema) -> str:
    """The run's metadata carried by an in-memory output schema, as JSON text."""
    return (schema.metadata or {}).get(META_KEY, b"{}").decode("utf-8")


def schema_metadata(schema: pa.Schema) -> dict:
    """The run's metadata carried by an in-memory output schema."""
    return json.loads(meta_json(schema))


def write_file(
    path: Path,
    batches: Iterable[pa.RecordBatch],
    schema: pa.Schema,
    *,
    meta: bool = True,
    row_group_bytes: int = 16 << 20,
) -> tuple[int, int]:
    """Write `batches` to `path` (fsync'ed), metadata in the footer only; (rows, bytes).

    Batches are gathered into row groups of about `row_group_bytes` of Arrow data, so a reader
    streaming one row group at a time holds about that much.
    """
    rows = 0
    pending: list[pa.RecordBatch] = []
    pending_bytes = 0
    with pq.ParquetWriter(path, bare(schema), **WRITE_OPTIONS) as writer:
        for batch in _bounded(batches, row_group_bytes):
            pending.append(batch)
            pending_bytes += batch.nbytes
            rows += batch.num_rows
            if pending_bytes >= row_group_bytes:
                _write_group(writer, pending, schema)
                pending, pending_bytes = [], 0
        if pending:
            _write_group(writer, pending, schema)
        if meta:
            writer.add_key_value_metadata({META_KEY.decode(): meta_json(schema)})
    fsync(path)
    return rows, path.stat().st_size


def _bounded(batches: Iterable[pa.RecordBatch], limit: int):
    """The batches, those over `limit` bytes cut into slices of about `limit` (with 20,000
    labels a flushed part of 1,024 rows is 240 MB: one row group of it would be read whole)."""
    for batch in batches:
        if not batch.num_rows:
            continue
        rows = max(1, limit * batch.num_rows // max(batch.nbytes, 1))
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)


def _write_group(writer: pq.ParquetWriter, batches: list[pa.RecordBatch], schema) -> None:
    table = pa.Table.from_batches(batches, schema=schema).replace_schema_metadata(None)
    batch = table.combine_chunks().to_batches()[0]  # one row group of these rows
    writer.write_batch(batch, row_group_size=batch.num_rows)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsync'ed
        fsync(folder if str(folder) else Path("."))
