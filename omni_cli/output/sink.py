"""Sink: the Parquet schema, crash-safe partial results, and the atomic finish.

Rows are buffered and flushed as numbered part files inside `OUT.partial/`, each written to a
temporary name, fsync'ed and renamed, so a part either exists whole or not at all: a run
killed at any instant leaves only complete parts, which the next run picks up. `finish()`
streams the rows carried over from the previous output and every part into `OUT.tmp`, fsyncs
it and renames it over `OUT`, so a valid previous or new output exists at every instant.
Writing happens on a background thread, off the encoder's hot path.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError, UsageError
from . import archive
from .layout import (
    META_FILE,
    META_KEY,
    WRITE_OPTIONS,
    fsync,
    fsync_dir,
    is_archive,
    meta_json,
    write_file,
)


def schema(num_labels: int, *, embeddings: bool, metadata: dict) -> pa.Schema:
    """The output schema of design.md section 2, with the run's metadata under key `omni`."""
    fields = [
        pa.field("root", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("views", pa.int16()),
        pa.field("similarity", pa.list_(pa.float32(), num_labels)),
        pa.field("probs", pa.list_(pa.float32(), num_labels)),
        pa.field("scores", pa.list_(pa.float32(), num_labels)),
        pa.field("top_labels", pa.list_(pa.string())),
        pa.field("top_scores", pa.list_(pa.float32())),
    ]
    if embeddings:
        fields.append(pa.field("embedding", pa.list_(pa.float16())))
    return pa.schema(fields, metadata={META_KEY: json.dumps(metadata, ensure_ascii=False)})


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def check_writable(output: Path) -> None:
    """Fail before any work if the output's folder cannot be made or written; makes it."""
    folder = output.parent if str(output.parent) else Path(".")
    if is_archive(output):
        archive.check(output)
    elif output.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file in it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--output {output}: {folder} is a file, not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder}: {exc.strerror}") from None
    probe = folder / f".omni-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}") from None


class Sink:
    """Buffered, crash-safe writer of result rows for one output file."""

    def __init__(
        self, output: Path, schema: pa.Schema, *, part_rows: int = 1024, part_seconds: float = 30.0
    ):
        self.output = Path(output)
        self.schema = schema
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.folder = partial_dir(self.output)
        self.folder.mkdir(exist_ok=True)
        for stale in self.folder.glob(".part-*.tmp"):  # a part a killed run did not finish
            stale.unlink(missing_ok=True)
        meta = self.folder / META_FILE  # the run's metadata, once for all the parts
        if not meta.exists():
            tmp = self.folder / f".{META_FILE}.tmp"
            tmp.write_text(meta_json(schema), encoding="utf-8")
            fsync(tmp)
            os.replace(tmp, meta)
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._next = _next_part_number(self.folder)  # owned by the writer thread
        self.saved = 0  # rows this sink has written to parts
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="omni-sink", daemon=True)
        self._thread.start()

    def write(self, batch: pa.RecordBatch) -> None:
        """Add rows; a part is flushed when enough rows or seconds have gathered."""
        self._raise_if_failed()
        self._buffer.append(batch)
        self._buffered += batch.num_rows
        if self._buffered >= self.part_rows or (
            time.monotonic() - self._last_flush >= self.part_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread as one part.

        The buffer is emptied before the hand-over, so an interrupt (Ctrl-C, SIGTERM) finds the
        rows either still buffered, and `close` flushes them, or gone, and the rerun tags those
        files again: never both, so no row is written twice. The writer thread numbers parts.
        """
        if self._buffer:
            batches, self._buffer = self._buffer, []
            self._buffered = 0
            self._queue.put(batches)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and wait until every part is on disk."""
        self.flush()
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def finish(self, carried: Iterable[pa.RecordBatch] = (), keep=None) -> int:
        """Write OUT from `carried` rows plus every part, atomically; returns the row count.

        `keep(batch)`, if given, masks the parts' rows that still belong (an interrupted run may
        have flushed rows for files that have changed since).
        """
        self.close()
        # An output that is a symlink stays one: the file it points to is replaced.
        target = Path(os.path.realpath(self.output))
        tmp = target.with_name(target.name + ".tmp")
        try:
            parts = read_parts(self.folder, self.schema)
            if keep is not None:
                parts = (b.filter(keep(b)) for b in parts)
            rows, _ = write_file(tmp, itertools.chain(carried, parts), self.schema)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException as exc:  # an interrupt or any error: no OUT.tmp is left behind
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {self.output}: {exc.strerror or exc}") from None
            raise
        shutil.rmtree(self.folder, ignore_errors=True)
        return rows

    def _run(self) -> None:
        while (batches := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                table = pa.Table.from_batches(batches, schema=self.schema)
                _write_part(self.folder, self._next, table)
                self._next += 1
                self.saved += table.num_rows
            except BaseException as exc:  # reported on the caller's thread
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            exc = self._error
            raise OutputError(f"cannot write results to {self.folder}: {exc}") from exc


def read_parts(folder: Path, schema: pa.Schema | None = None) -> Iterator[pa.RecordBatch]:
    """Every complete part in `folder`, in order (temporary files are ignored)."""
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part, schema=schema, pre_buffer=False)
        yield from table.to_batches()


def _write_part(folder: Path, number: int, table: pa.Table) -> None:
    final = folder / f"part-{number:06d}.parquet"
    tmp = folder / f".part-{number:06d}.tmp"
    pq.write_table(table.replace_schema_metadata(None), tmp, **WRITE_OPTIONS)
    fsync(tmp)
    os.replace(tmp, final)


def _next_part_number(folder: Path) -> int:
    numbers = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet")]
    return max(numbers, default=-1) + 1
