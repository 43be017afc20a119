"""Compare: the files found now against the previous output's rows, which are read once.

A run asks of every previous row whether its file is still there as it was, and of every file
whether a row already describes it. Built from string keys and Arrow hash sets, that cost a
nightly run over a million files several hundred MB, several times over. Here the files are
found by a 64-bit hash of their (root, path), sorted once (16 bytes a file, `Lookup`), and the
previous output is read part by part, its key columns only, into a few bytes a row (`Survey`):
which file it describes, whether that file's size and mtime are still the row's, and whether
the row is one that may be carried. Every later decision (nothing to do, a share that is not
mounted, which rows stay) is made from that, without reading the output again.

A hash match is checked against the names themselves, so a collision can only make a row look
like a file that is gone: its file is then tagged again, never given another file's row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..inputs.listing import Files
from . import layout

KEY_COLUMNS = ["root", "path", "status", "error", "bytes", "mtime_ns"]
# Error rows that stay until their file changes (inputs.loader writes them): retrying them
# would meet the same crash or hang every night.
STICKY_ERRORS = ("crashed the decoder", "decoder timed out")
_CHUNK = 65_536  # names hashed at a time: bounds the temporary arrays
_rng = np.random.default_rng(0x6F6D6E69)
_MULTIPLIERS = _rng.integers(1, 2**63, size=1024, dtype=np.uint64) * 2 + 1  # odd


def name_hashes(roots: pa.Array | pa.ChunkedArray, paths: pa.Array | pa.ChunkedArray):
    """(rows,) uint64: a hash of root + NUL + path per row, a chunk of rows at a time."""
    n = len(roots)
    out = np.empty(n, np.uint64)
    for start in range(0, n, _CHUNK):
        r, p = roots.slice(start, _CHUNK), paths.slice(start, _CHUNK)
        joined = pc.binary_join_element_wise(pc.cast(r, pa.binary()), pc.cast(p, pa.binary()),
                                             b"\x00")  # fmt: skip
        if isinstance(joined, pa.ChunkedArray):
            joined = joined.combine_chunks()
        out[start : start + len(joined)] = _hash(joined)
    return out


def _hash(names: pa.BinaryArray) -> np.ndarray:
    """A multilinear hash of each name: sum of (byte + 1) x an odd random multiplier per
    position, modulo 2**64, mixed with the length."""
    global _MULTIPLIERS
    n = len(names)
    offsets = np.frombuffer(names.buffers()[1], np.int32, n + 1, names.offset * 4)
    data = names.buffers()[2]
    start, lengths = offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64)
    out = np.zeros(n, np.uint64)
    if data is None or not lengths.any():
        return out
    first = int(start[0])
    raw = np.frombuffer(data, np.uint8, int(offsets[-1]) - first, first)
    longest = int(lengths.max())
    if longest > len(_MULTIPLIERS):
        more = _rng.integers(1, 2**63, size=longest, dtype=np.uint64) * 2 + 1
        _MULTIPLIERS = np.concatenate([_MULTIPLIERS, more])
    position = np.arange(len(raw)) - np.repeat(start - first, lengths)
    with np.errstate(over="ignore"):
        terms = (raw.astype(np.uint64) + 1) * _MULTIPLIERS[position]
        filled = lengths > 0
        out[filled] = np.add.reduceat(terms, (start - first)[filled])
        out ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return out


class Lookup:
    """Which listed file has this (root, path): the files' name hashes, sorted once."""

    def __init__(self, files: Files):
        self.files = files
        hashes = name_hashes(files.table["root"], files.table["rel"])
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]

    def find(self, roots: pa.Array, paths: pa.Array) -> np.ndarray:
        """(rows,) int64: the index of the listed file with each (root, path), or -1."""
        if not len(self.sorted) or not len(roots):
            return np.full(len(roots), -1, np.int64)
        wanted = name_hashes(roots, paths)
        i = np.minimum(np.searchsorted(self.sorted, wanted), len(self.sorted) - 1)
        found = np.where(self.sorted[i] == wanted, self.order[i], -1)
        hit = np.flatnonzero(found >= 0)
        if len(hit):  # the names themselves, where the hashes agree
            at = pa.array(found[hit])
            same = pc.and_(
                pc.equal(self.files.table["root"].take(at), roots.take(pa.array(hit))),
                pc.equal(self.files.table["rel"].take(at), paths.take(pa.array(hit))),
            )
            same = same.to_numpy(zero_copy_only=False) if len(same) else np.zeros(0, bool)
            found[hit[~same]] = -1
        return found

    def same(self, table: pa.Table, at: np.ndarray) -> np.ndarray:
        """(rows,) bool: the row's size and mtime are those of file `at` (found by `find`)."""
        same = at >= 0
        known = np.flatnonzero(same)
        if len(known):
            now = self.files.table.select(["bytes", "mtime_ns"]).take(pa.array(at[known]))
            rows = table.select(["bytes", "mtime_ns"]).take(pa.array(known))
            for name in ("bytes", "mtime_ns"):
                was = pc.fill_null(rows[name], -1).to_numpy()
                same[known] &= was == now[name].to_numpy()
        return same


@dataclass
class Survey:
    """The previous output, a few bytes a row, read once before the model loads.

    Rows are numbered across its files in order (`starts[i]` is file i's first row).
    """

    files: tuple[Path, ...]
    names: list[str] | None  # its columns (None: not Parquet)
    meta: dict | None  # its run's metadata
    error: str | None = None  # why its rows could not be read
    at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # file (name) or -1
    same: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # size, mtime as now
    keepable: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # ok, or sticky
    starts: tuple[int, ...] = ()
    errors: list[tuple[int, str, str, str]] = field(default_factory=list)  # row, root, path, error
    root_rows: Counter = field(default_factory=Counter)  # rows per root
    gone_rows: Counter = field(default_factory=Counter)  # rows per root whose file is gone

    @property
    def rows(self) -> int:
        return len(self.at)

    def described(self, n_files: int) -> np.ndarray:
        """(files,) bool: the listed files that a row describes as they are now."""
        seen = np.zeros(n_files, bool)
        seen[self.at[self.same]] = True
        return seen


def survey(output: Path, lookup: Lookup) -> Survey | None:
    """Read the previous output's key columns once, part by part; None when there is none."""
    files = tuple(layout.parts(output))
    if not files:
        return None
    try:
        names = pq.read_schema(files[0]).names
    except (OSError, pa.ArrowException):
        names = None
    result = Survey(files, names, layout.metadata(output))
    if names is None or result.meta is None or not set(KEY_COLUMNS) <= set(names):
        return result
    at, same, keepable, starts, rows = [], [], [], [], 0
    try:
        for path in files:
            starts.append(rows)
            file = pq.ParquetFile(path, pre_buffer=False)
            for batch in file.iter_batches(batch_size=_CHUNK, columns=KEY_COLUMNS):
                table = pa.Table.from_batches([batch])
                found = lookup.find(table["root"], table["path"])
                at.append(found)
                same.append(lookup.same(table, found))
                ok = pc.equal(table["status"], "ok")
                keepable.append(pc.fill_null(pc.or_(ok, sticky(table["error"])), False)
                                .to_numpy(zero_copy_only=False))  # fmt: skip
                result.root_rows.update(_counts(table["root"]))
                result.gone_rows.update(_counts(table["root"].filter(pa.array(found < 0))))
                failed = np.flatnonzero(~pc.fill_null(ok, False).to_numpy(zero_copy_only=False))
                if len(failed):
                    picked = table.take(pa.array(failed))
                    cols = (picked[c].to_pylist() for c in ("root", "path", "error"))
                    result.errors += zip((rows + failed).tolist(), *cols, strict=True)
                rows += table.num_rows
    except (OSError, pa.ArrowException) as exc:
        result.error = str(exc)
        return result
    result.at = np.concatenate(at) if at else result.at
    result.same = np.concatenate(same) if same else result.same
    result.keepable = np.concatenate(keepable) if keepable else result.keepable
    result.starts = tuple(starts)
    return result


def sticky(errors: pa.Array) -> pa.Array:
    """Which error texts mark a file that is kept as it is until it changes."""
    marks = [pc.starts_with(errors, prefix) for prefix in STICKY_ERRORS]
    out = marks[0]
    for mark in marks[1:]:
        out = pc.or_(out, mark)
    return pc.fill_null(out, False)


def _counts(values: pa.Array) -> dict[str, int]:
    if not len(values):
        return {}
    counts = pc.value_counts(values)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(),
                    strict=True))  # fmt: skip
