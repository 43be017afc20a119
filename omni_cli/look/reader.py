"""Reading an `omni tag` output to look at it: its Parquet files, metadata, where its images are.

An output has two shapes: one `.parquet` file, or a folder (often a symlink to a version folder)
of `part-*.parquet` files with the metadata in `_omni.json` beside them. Report and search see
both as `Output`: the list of its Parquet files in order (hidden and `_`-prefixed names are
skipped, as Parquet readers do), the metadata, and record batches read file by file and row
group by row group with no pre-buffering, so memory stays flat in the size of the output.

Rows store the PATH given to `tag` as their root. A relative root is resolved against the folder
`tag` ran in (metadata key `cwd`), then the output's folder, then the current folder: the first
where it exists. `Roots` remembers where it looked, so that a page or a search can say why a
file was not found.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UsageError
from ..output import layout

META_FILE = "_omni.json"  # a folder output's metadata


@dataclass(frozen=True)
class Output:
    """An `omni tag` output as report and search read it."""

    path: Path  # as given: a file, or a folder (or a symlink to one)
    files: tuple[Path, ...]  # its Parquet files, in order
    meta: dict
    schema: pa.Schema  # of its first file

    @property
    def names(self) -> list[str]:
        return self.schema.names

    def parquet(self, file: Path) -> pq.ParquetFile:
        # No pre-buffering: it keeps every row group read so far, so memory would grow with
        # the file (measured: 1M rows, 992 MiB peak with it, see benchmarks/report_scale.py).
        try:
            return pq.ParquetFile(file, pre_buffer=False)
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"{file} is not a Parquet file ({_first_line(exc)})") from None

    def batches(self, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        """Record batches of at most `rows` rows over every file, in order."""
        for file in self.files:
            parquet = self.parquet(file)
            try:
                for group in range(parquet.num_row_groups):
                    yield from parquet.iter_batches(rows, row_groups=[group], columns=columns)
            finally:
                parquet.close()


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files that make up an output: the one file, or those of the folder."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    real = path.resolve()  # one version of a folder behind a symlink, even if it is swapped now
    return [f for f in sorted(real.glob("*.parquet")) if not f.name.startswith((".", "_"))]


def read_meta(path: Path) -> dict | None:
    """The `omni` metadata (`output.layout.metadata`: one file's footer, old files' schema, or
    `_omni.json` in a folder, else of its first part); None if there is none or it does not
    parse."""
    path = Path(path)
    meta = layout.metadata(path)
    if meta is None and path.is_dir():
        parts = parquet_files(path)
        meta = layout.metadata(parts[0]) if parts else None
    return meta if isinstance(meta, dict) and isinstance(meta.get("labels"), list) else None


def open_output(path: Path) -> Output:
    """An `omni tag` output and its metadata; UsageError if it is missing or not one."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"no such file: {path}")
    files = parquet_files(path)
    if not files:
        raise UsageError(f"{path} is a folder with no Parquet file: not an `omni tag` output")
    try:
        schema = pq.read_schema(files[0])
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{files[0]} is not a Parquet file ({_first_line(exc)})") from None
    meta = read_meta(path)
    if meta is None:
        where = f"{META_FILE} or its parts" if path.is_dir() else "its schema"
        raise UsageError(f"{path} is not an `omni tag` output (no omni metadata in {where})")
    return Output(path, tuple(files), meta, schema)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


@dataclass
class Roots:
    """Where the rows' roots are on this machine, resolved once per root."""

    bases: list[tuple[Path, str]]  # (folder, what it is), in the order tried
    found: dict[str, Path] = field(default_factory=dict)
    lost: dict[str, list[Path]] = field(default_factory=dict)  # root -> where it was looked for

    @classmethod
    def of(cls, output: Output) -> Roots:
        bases = []
        cwd = output.meta.get("cwd")
        if isinstance(cwd, str) and cwd:
            bases.append((Path(cwd), "the folder `omni tag` ran in"))
        bases.append((Path(os.path.abspath(output.path)).parent, "the output's folder"))
        with contextlib.suppress(OSError):  # a current folder deleted under us
            bases.append((Path.cwd(), "the current folder"))
        return cls(bases)

    def resolve(self, root: str) -> Path:
        """The folder of `root` here: itself if absolute, else the first base it exists under."""
        if root in self.found:
            return self.found[root]
        if root in self.lost:
            return self.lost[root][0]
        given = Path(root)
        if given.is_absolute():
            where = [given]
        else:
            where = list(dict.fromkeys(base / given for base, _ in self.bases))
        for candidate in where:
            if candidate.exists():
                self.found[root] = candidate
                return candidate
        self.lost[root] = where
        return where[0]

    def file(self, root: str, path: str) -> Path:
        return self.resolve(root) / path

    def missing_notes(self) -> list[str]:
        """One line per root that was not found, saying where it was looked for."""
        notes = []
        for root in self.lost:
            if Path(root).is_absolute():
                notes.append(f"input folder {root} does not exist (moved, or not mounted?)")
            else:
                named = {}  # folder -> what it is, each folder once
                for base, what in self.bases:
                    named.setdefault(base, what)
                tried = ", ".join(f"{base} ({what})" for base, what in named.items())
                notes.append(f"input folder {root!r} (a relative path) was not found under {tried}")
        return notes
