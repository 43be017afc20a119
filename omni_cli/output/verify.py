"""Verify: content hashes for archives where size and mtime are not enough.

The incremental test is a file's size and mtime: a tool that rewrites a file and restores both
(some sync and metadata tools do) leaves its old row in place. `omni tag --verify` reads every
file, hashes its content (BLAKE2b, 128 bits) and keeps the hashes beside the output in
`OUT.hashes` (a Parquet file, named so that readers of a folder of outputs do not take it for
one). A file whose hash differs from the one recorded is tagged again although its size and
mtime say unchanged. The first `--verify` run records the hashes of the files as they are,
trusting the rows it finds; runs without `--verify` neither read nor change the hashes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..inputs.sources import FileEntry

CHUNK = 1 << 20


def hashes_path(output: Path) -> Path:
    return output.with_name(output.name + ".hashes")


def content_hash(path: str) -> str | None:
    """BLAKE2b-128 of the file's bytes, or None if it cannot be read."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def hash_entries(
    entries: Sequence[FileEntry], on_done: Callable[[int], None] | None = None
) -> list[str | None]:
    """Hashes of the entries' files (None where unreadable), read by a few threads: on a
    network share the reads wait on the wire, not on the CPU."""
    readable = [e.path if e.path and not e.error else None for e in entries]
    out: list[str | None] = []
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for i, digest in enumerate(pool.map(lambda p: p and content_hash(p), readable)):
            out.append(digest)
            if on_done is not None and (i + 1) % 256 == 0:
                on_done(i + 1)
    return out


def changed(output: Path, entries: Sequence[FileEntry], digests: Sequence[str | None]) -> set:
    """(root, path) of the files whose content differs from the hash recorded for them."""
    try:
        table = pq.read_table(hashes_path(output))
    except (OSError, pa.ArrowException):
        return set()  # none recorded yet (or unreadable: recorded afresh)
    was = dict(zip(_keys(table), table["hash"].to_pylist(), strict=True))
    out = set()
    for e, digest in zip(entries, digests, strict=True):
        old = was.get((e.root, e.rel))
        if old is not None and digest is not None and old != digest:
            out.add((e.root, e.rel))
    return out


def record(output: Path, entries: Sequence[FileEntry], digests: Sequence[str | None]) -> None:
    """Write the hashes of this run's files beside the output, atomically."""
    table = pa.table(
        {
            "root": [e.root for e in entries],
            "path": [e.rel for e in entries],
            "hash": list(digests),
        }
    )
    table = table.filter(pc.is_valid(table["hash"]))
    final = hashes_path(output)
    tmp = final.with_name(final.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)


def _keys(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["root"].to_pylist(), table["path"].to_pylist(), strict=True))
