"""Search index: an output's stored embeddings as memory-mapped float16 matrices, kept beside it.

Decoding the `embedding` column of a big output is slow (1M x 512: ~20 s here), so `omni search`
does it once. The index lives in a folder beside the output (`tags.parquet.index/` for
`tags.parquet`, `tags.index/` for a folder output `tags`; in the cache folder where that cannot
be written) and holds one segment per Parquet file of the output:

    seg-ID.npy    (views, dim) float16, the file's stored view embeddings in row order
    seg-ID.arrow  Arrow IPC: root, path, start, count of each row that has embeddings
    index.json    the segments in use: each file's name, size, mtime_ns and inode, and its ID

A search stats the output's files and rebuilds only the segments whose file changed (a folder
output rewrites only the parts a night touched, and keeps the others' inodes), then scores each
segment chunk by chunk straight from the memory map and hands the pages back after each chunk,
so memory stays flat however big the index. Segments are written to temporary names and renamed
into place, then the manifest; a segment that is missing or does not match is built again, so a
killed or concurrent search costs time, never a wrong answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import OutputError, UsageError
from .reader import Output

VERSION = 1
MANIFEST = "index.json"
HEADER = 128  # bytes of the .npy header: written last, once the shape is known
BUILD_ROWS = 4_096  # rows decoded at a time while building
# Bytes of the matrix scored at a time (262,144 views at dim 512): memory stays bounded, and
# fewer, larger products are faster on a busy CPU (measured here: 1M x 512 in 0.8 s in chunks
# of 64 MiB, 0.3 s in chunks of 256 MiB, with 2 threads on 2 contended cores).
CHUNK_BYTES = 256 * 2**20
KEYS = pa.schema(
    [("root", pa.string()), ("path", pa.string()), ("start", pa.int64()), ("count", pa.int32())]
)

Progress = Callable[[int, int], None]  # (files indexed, files to index)


@dataclass
class Segment:
    """The stored embeddings of one Parquet file of the output."""

    id: str
    matrix: np.ndarray  # (views, dim) float16, memory-mapped (read-only)
    keys: pa.Table  # root, path, start, count: one row per image with embeddings
    starts: np.ndarray  # (images,) int64: first view of each image in `matrix`
    counts: np.ndarray  # (images,) int32
    _map: mmap.mmap | None

    def release(self, start: int, stop: int) -> None:
        """Hand back the pages of views [start, stop): they stay in the page cache, not in RSS."""
        if self._map is None or not hasattr(self._map, "madvise") or stop <= start:
            return
        row = self.matrix.shape[1] * 2
        first = (HEADER + start * row) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(len(self._map), HEADER + stop * row)
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


@dataclass
class Index:
    """Every stored view embedding of one output, segment by segment."""

    source: Path
    meta: dict
    folder: Path  # where the segments are
    segments: list[Segment]
    dim: int
    rebuilt: int  # segments built by this call (0: the index was in step)

    def __len__(self) -> int:
        return sum(len(s.starts) for s in self.segments)

    @property
    def views(self) -> int:
        return sum(len(s.matrix) for s in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.glob("seg-*"))


def index_folder(output: Path) -> Path:
    """The index of `output`, beside it (by the name given: a symlink's, not its target's)."""
    output = Path(os.path.abspath(output))
    return output.parent / f"{output.name}.index"


def open_index(output: Output, progress: Progress | None = None) -> Index:
    """The index of `output`, brought in step with its files first (only changed ones are read)."""
    if "embedding" not in output.names:
        raise UsageError(
            f"{output.path} holds no embeddings: store them with `omni tag PATH... --labels FILE "
            f"-o {output.path} --save-embeddings` (this encodes every image once more)"
        )
    folder = _writable_folder(output.path)
    old = _read_manifest(folder)
    entries, segments, rebuilt = [], [], 0
    for i, file in enumerate(output.files):
        if progress:
            progress(i, len(output.files))
        try:
            handle = open(file, "rb")  # noqa: SIM115 - closed below; stat what is read
            info = os.fstat(handle.fileno())
        except OSError as exc:
            raise UsageError(f"cannot read {file}: {exc.strerror or exc}") from None
        entry = {
            "file": file.name,
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "inode": info.st_ino,
        }
        # The file itself, not its name: an archive's next version hard-links the parts a night
        # did not touch under new names, and their segments stay.
        same = {"device": info.st_dev, **{k: entry[k] for k in ("size", "mtime_ns", "inode")}}
        entry["id"] = hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:20]
        with handle:
            segment = _load(folder, entry["id"]) if entry["id"] in old else None
            if segment is None:
                _build(handle, folder, entry["id"], output.path)
                segment = _load(folder, entry["id"])
                rebuilt += 1
            if segment is None:
                raise OutputError(f"the search index in {folder} could not be read back")
        entries.append(entry)
        segments.append(segment)
    if progress:
        progress(len(output.files), len(output.files))
    dims = {s.matrix.shape[1] for s in segments if len(s.matrix)}
    if not dims:
        raise UsageError(
            f"{output.path} has an embedding column but no stored embedding in any row"
        )
    if len(dims) > 1:
        raise UsageError(
            f"{output.path}: its files store embeddings of different sizes ({sorted(dims)}): "
            "tag it again with one model (--full)"
        )
    if rebuilt or set(old) != {e["id"] for e in entries}:
        _write_manifest(folder, entries)
        _forget(folder, {e["id"] for e in entries})
    return Index(output.path, output.meta, folder, segments, dims.pop(), rebuilt)


def refresh(path: Path, progress: Progress | None = None) -> int | None:
    """Bring an existing index in step with its output (`omni tag` calls this when it has
    written one); the segments built, or None when the output has no index yet."""
    from .reader import open_output

    if not _existing_folder(Path(path)):
        return None
    output = open_output(path)
    if "embedding" not in output.names:
        return None
    return open_index(output, progress).rebuilt


# ---------------------------------------------------------------------------------------------
# Where the index lives, and its manifest.


def _existing_folder(output: Path) -> Path | None:
    """The folder of an index already built for `output` (beside it, or in the cache)."""
    beside = index_folder(output)
    if (beside / MANIFEST).is_file():
        return beside
    folder = _cache_folder(output)
    return folder if (folder / MANIFEST).is_file() else None


def _cache_folder(output: Path) -> Path:
    from ..model.labels import cache_dir

    key = hashlib.sha256(os.fsencode(os.path.abspath(output))).hexdigest()[:20]
    return cache_dir() / "index" / key


def _writable_folder(output: Path) -> Path:
    """Beside the output if that can be written, else in the cache folder (keyed by the path)."""
    beside = index_folder(output)
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    folder = _cache_folder(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot write the search index beside {output} nor in {folder}: {exc.strerror or exc}"
        ) from None
    return folder


def _read_manifest(folder: Path) -> dict[str, dict]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("version") == VERSION:
            return {e["id"]: e for e in manifest["segments"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {}


def _write_manifest(folder: Path, entries: list[dict]) -> None:
    text = json.dumps({"version": VERSION, "segments": entries}, indent=1)
    _atomic(folder / MANIFEST, lambda f: f.write(text.encode("utf-8")))


def _forget(folder: Path, keep: set[str]) -> None:
    """Delete segments no file of the output uses any more, and temporaries left by a killed
    search (an hour old: a younger one may be another search's, still being written)."""
    for path in folder.glob("seg-*"):
        with contextlib.suppress(OSError):
            if ".tmp" in path.name:
                if time.time() - path.stat().st_mtime > 3600:
                    path.unlink()
            elif path.name.split(".")[0].removeprefix("seg-") not in keep:
                path.unlink()


def _atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the search index {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# One segment: built from a Parquet file by streaming, opened as a memory map.


def _build(file, folder: Path, sid: str, source: Path) -> None:
    """Decode `file`'s embeddings batch by batch into seg-ID.npy and its keys into seg-ID.arrow."""
    parquet = pq.ParquetFile(file, pre_buffer=False)
    columns = ["root", "path", "views", "embedding"]
    has_column = "embedding" in parquet.schema_arrow.names
    state = {"dim": 0, "filled": 0}
    keys_path = folder / f"seg-{sid}.arrow"

    def write_matrix(f) -> None:
        f.write(b"\0" * HEADER)
        batches = parquet.iter_batches(BUILD_ROWS, columns=columns) if has_column else []
        with (
            pa.OSFile(str(keys_path) + f".{os.getpid()}.tmp", "wb") as sink,
            pa.ipc.new_file(sink, KEYS) as keys,
        ):
            for batch in batches:
                _add(batch, f, keys, state, source)
        f.seek(0)
        f.write(_header(state["filled"], state["dim"]))

    try:
        _atomic(folder / f"seg-{sid}.npy", write_matrix)
        os.replace(str(keys_path) + f".{os.getpid()}.tmp", keys_path)
    finally:
        parquet.close()


def _add(batch: pa.RecordBatch, f, keys: pa.ipc.RecordBatchFileWriter, state: dict,
         source: Path) -> None:  # fmt: skip
    embedding = batch["embedding"]
    lengths = pc.list_value_length(embedding).fill_null(0).to_numpy(zero_copy_only=False)
    has = lengths > 0
    if not has.any():
        return
    views = batch["views"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if not state["dim"]:
        state["dim"] = int(lengths[has][0] // max(int(views[has][0]), 1))
    dim = state["dim"]
    if np.any(lengths[has] != views[has] * dim):
        raise UsageError(f"{source}: stored embeddings do not split into views of one size")
    values = pc.list_flatten(embedding).to_numpy(zero_copy_only=False)
    f.write(np.ascontiguousarray(values, np.float16).tobytes())
    counts = (lengths[has] // dim).astype(np.int64)
    starts = state["filled"] + np.concatenate([[0], np.cumsum(counts)[:-1]])
    state["filled"] += int(counts.sum())
    rows = pa.array(np.flatnonzero(has))
    keys.write_batch(
        pa.record_batch(
            [
                batch["root"].take(rows).cast(pa.string()),
                batch["path"].take(rows).cast(pa.string()),
                pa.array(starts, pa.int64()),
                pa.array(counts, pa.int32()),
            ],
            schema=KEYS,
        )
    )


def _header(views: int, dim: int) -> bytes:
    """A .npy version 1.0 header for a (views, dim) float16 matrix, padded to HEADER bytes."""
    text = repr({"descr": "<f2", "fortran_order": False, "shape": (views, dim)})
    text = text.ljust(HEADER - 10 - 1) + "\n"
    if len(text) + 10 != HEADER:
        raise ValueError(f"shape {(views, dim)} does not fit the index header")
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def _load(folder: Path, sid: str) -> Segment | None:
    """Open a segment; None if it is missing, cut short or does not match its keys."""
    try:
        with open(folder / f"seg-{sid}.npy", "rb") as f:
            if np.lib.format.read_magic(f) != (1, 0):
                return None
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            if f.tell() != HEADER or fortran or dtype != np.float16 or len(shape) != 2:
                return None
            size = os.fstat(f.fileno()).st_size
            if size != HEADER + shape[0] * shape[1] * 2:
                return None
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if shape[0] else None
        if mapped is None:
            matrix = np.zeros((0, shape[1]), np.float16)
        else:
            matrix = np.frombuffer(mapped, np.float16, shape[0] * shape[1], HEADER)
            matrix = matrix.reshape(shape)
        keys = pa.ipc.open_file(pa.memory_map(str(folder / f"seg-{sid}.arrow"))).read_all()
        starts, counts = _numpy(keys["start"], np.int64), _numpy(keys["count"], np.int32)
        if int(counts.sum()) != shape[0]:
            return None
    except (OSError, ValueError, pa.ArrowException):
        return None
    return Segment(sid, matrix, keys, starts, counts, mapped)


def _numpy(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """A chunked integer column without nulls as one array, read from its buffers (to_numpy
    imports pandas: 0.3 s of a search that takes 0.5)."""
    size = np.dtype(dtype).itemsize
    parts = [np.frombuffer(c.buffers()[1], dtype, len(c), c.offset * size) for c in column.chunks]
    return np.concatenate([np.empty(0, dtype), *parts])


def scores(segment: Segment, query: np.ndarray) -> np.ndarray:
    """(views,) float32 cosine of every view of `segment` with `query` (dim,), L2-normalised.

    The product runs in torch on float16 chunks taken straight from the map: measured ~8x faster
    here than numpy, which has no float16 matrix kernel (benchmarks/search_scale.py).
    """
    import torch

    q = torch.from_numpy(np.ascontiguousarray(query, np.float16))
    out = np.empty(len(segment.matrix), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the map is read-only: it is only read
        chunk = max(1, CHUNK_BYTES // (2 * max(1, segment.matrix.shape[1])))
        for start in range(0, len(out), chunk):
            stop = min(start + chunk, len(out))
            block = torch.from_numpy(segment.matrix[start:stop])  # (chunk, dim), no copy
            out[start:stop] = (block @ q).float().numpy()
            segment.release(start, stop)
    return out
