"""State: what earlier runs already did, and so what this run must still do.

Two sources of finished rows: `OUT.partial/`, the parts flushed by a run that was interrupted
(kill -9, power loss, Ctrl-C), and the previous `OUT` of an incremental run. A file counts as
done when its row's size and mtime equal what stat says now; rows of deleted or changed files
are dropped.

Nothing is thrown away behind the user's back: an interrupted run's rows or a previous output
made another way (another model or revision, precision, preprocessing or tiling) make the run
refuse, naming the difference, unless `--full` says to start over (or `--no-resume`, for an
interrupted run's rows). A part that cannot be read stops the run and stays where it is. Only
new labels or prompts (or a new scoring rule) are absorbed: rows are rescored from stored
embeddings, or everything is tagged again, and the message says which; a new --top-k or
--threshold picks the top tags again from the stored scores.

What the listing did not see is not taken as gone: rows under a sub-folder that could not be
listed are kept as they are (`held`), and a run that would drop more than half of the previous
output's rows, or every row of one input (an unmounted share lists as an empty folder), is
refused unless `--allow-shrink` (`check_shrink`, before the model loads). Error rows of files
that crashed or hung the decoder (`STICKY_ERRORS`) are kept like finished rows until the file
changes, so that one poisonous file is not met again every night; other error rows are retried
by any run with other work to do.

`unchanged` answers the nightly question cheaply, from `stat` and the previous output's keys
and metadata alone: if every file is as it was and the run is asked for the same way, there is
nothing to do, not even a model to load. Error rows of unchanged files count as done then;
any run with other work to do tries them again.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import TagConfig
from ..errors import InputUnreadable, OutputError, UsageError
from ..inputs.listing import Files
from ..inputs.sources import FileEntry, Unlisted, printable
from ..model import hub, identity
from . import archive, layout
from .archive import Part
from .identity import ENCODING, IDENTITY, SCORING, TOPS, differences, fingerprint
from .layout import META_KEY, row_keys
from .sink import partial_dir
from .sink import schema as output_schema

# Error rows that stay until their file changes (inputs.loader writes them): retrying them
# would meet the same crash or hang every night.
STICKY_ERRORS = ("crashed the decoder", "decoder timed out")


@dataclass(frozen=True)
class Plan:
    """What a run does, decided once before any tagging: built by `plan_work`, then read only."""

    todo: Files  # the files to tag, as a table: indexing one makes its FileEntry
    schema: pa.Schema
    keep: pa.Array  # keys (root, path, bytes, mtime_ns) of rows that belong in the output
    previous: tuple[Path, ...] = ()  # the previous output's files whose unchanged rows stay
    version: Path | None = None  # the archive version they belong to
    parts: tuple[Part, ...] = ()  # ... its parts (archive layout)
    part_carried: tuple[int, ...] = ()  # rows of each part that stay
    drop: pa.Array | None = None  # keys of the previous output's rows that do not stay
    carried_rows: int = 0
    relabel: bool = False  # labels changed: rescore carried rows from their embeddings
    rescore: bool = False  # scores or top tags differ: recompute them for carried rows
    resumed: int = 0  # rows picked up from an interrupted run
    carried_errors: tuple[tuple[str, str, str], ...] = ()
    message: str = ""

    def carried(self, rescore: Callable | None = None) -> Iterator[pa.RecordBatch]:
        """The previous output's rows for unchanged files, in the new schema, streamed.

        Copied as Arrow data when they score as this run would; else through `rescore(rows,
        relabel=...)`, from stored embeddings when the labels changed. Read row group by row
        group without pre-buffering, so memory does not grow with the output.
        """
        for path in self.previous if self.carried_rows else ():
            file = pq.ParquetFile(path, pre_buffer=False)
            for g in range(file.num_row_groups):
                table = file.read_row_group(g)
                table = table.filter(pc.invert(pc.is_in(row_keys(table), value_set=self.drop)))
                for rows in table.to_batches(max_chunksize=4096):
                    if not rows.num_rows:
                        continue
                    if self.rescore and rescore is not None:
                        yield rescore(rows, relabel=self.relabel)
                    else:
                        yield pa.RecordBatch.from_arrays(rows.columns, schema=self.schema)

    def carried_from(self, rescore: Callable | None = None) -> archive.Previous | None:
        """The previous archive version and what stays of it, for `archive.publish`."""
        if self.version is None:
            return None
        how = None
        if self.rescore and rescore is not None:
            how = functools.partial(rescore, relabel=self.relabel)
        drop = self.drop if self.drop is not None else pa.array([], pa.string())
        return archive.Previous(self.version, self.parts, self.part_carried, drop, how)

    def matches(self, batch: pa.RecordBatch | pa.Table) -> pa.Array:
        """Which rows describe a file exactly as it is now."""
        return pc.is_in(row_keys(batch), value_set=self.keep)


def entry_key(e: FileEntry) -> str:
    return f"{e.root}\x00{e.rel}\x00{e.bytes}\x00{e.mtime_ns}"


def file_keys(entries: Files | Sequence[FileEntry]) -> pa.Array:
    """The keys of the files found now, as `row_keys` makes them of rows."""
    if isinstance(entries, Files):
        return entries.keys()
    return pa.array([entry_key(e) for e in entries], pa.string())


def metadata(schema: pa.Schema) -> dict:
    """The run's metadata an in-memory output schema carries."""
    return json.loads((schema.metadata or {}).get(META_KEY, b"{}"))


def columns(labels: int, embeddings: bool) -> list[str]:
    """The columns this version writes."""
    return output_schema(labels, embeddings=embeddings, metadata={}).names


def unchanged(cfg: TagConfig, entries: Files | Sequence[FileEntry], request: dict):
    """The previous output's error rows if this run has nothing to do, else None.

    Nothing to do: no interrupted run, the previous output was asked for exactly as this run
    is (`request`: model and revision, options, labels and prompts), and it holds one row per
    file found now, each with the file's current size and mtime.
    """
    if cfg.full or partial_dir(cfg.output).exists():
        return None
    files = layout.parts(cfg.output)
    meta = layout.metadata(cfg.output)
    if not files or meta is None or meta.get("request") != request:
        return None
    if _names(files) != columns(len(request["labels"]), cfg.save_embeddings):
        return None  # written by another version of omni: its columns differ
    try:
        table = _keys(files, ["root", "path", "status", "error", "bytes", "mtime_ns"])
    except (OSError, pa.ArrowException):
        return None
    if table.num_rows != len(entries):
        return None
    now = file_keys(entries)
    if not pc.all(pc.is_in(now, value_set=row_keys(table))).as_py():
        return None
    if pc.count_distinct(now).as_py() != len(entries):
        return None
    errors = table.filter(pc.equal(table["status"], "error"))
    return list(zip(*(errors[c].to_pylist() for c in ("root", "path", "error")), strict=True))


def plan_work(
    cfg: TagConfig,
    entries: Files | Sequence[FileEntry],
    schema: pa.Schema,
    held: frozenset = frozenset(),
    force: frozenset = frozenset(),
) -> Plan:
    """Split `entries` into work to do and rows to keep; refuse what would lose results.

    The one place a run's plan is made; the result is frozen. `held`: keys of the previous
    output's rows under folders that could not be listed; they are kept as they are, whatever
    their status. `force`: keys of files whose content changed although their size and mtime
    did not (`--verify`): their previous rows are not carried. An interrupted run's rows are
    resumed also under `--full` (it ignores only the previous output), unless they were made
    differently.
    """
    want = fingerprint(metadata(schema))
    now = file_keys(entries)
    done = pa.array([], pa.string())
    fields: dict = {}
    errors: list = []
    notes = []
    partial = partial_dir(cfg.output)
    if partial.exists():
        resumed = _resume(partial, want, now, cfg) if cfg.resume else None
        if resumed is None:
            shutil.rmtree(partial, ignore_errors=True)
            why = "--no-resume" if not cfg.resume else "made differently, and --full"
            notes.append(f"an interrupted run's rows were discarded ({why})")
        else:
            done, errors = resumed
            fields.update(resumed=len(done))
            if len(done):
                notes.append(f"resuming: {len(done):,} rows from an interrupted run")
    if layout.parts(cfg.output) and not cfg.full:
        skip = pa.concat_arrays([done, pa.array(sorted(force), pa.string())])
        note, carried = _previous(cfg, want, schema, now, skip, held)
        errors += carried.pop("carried_errors", [])
        notes += [note] if note else []
        fields.update(carried)
        done = pa.concat_arrays([done, carried.get("carry", pa.array([], pa.string()))])
    fields.update(carried_errors=tuple(errors))
    todo = np.flatnonzero(~pc.is_in(now, value_set=done).to_numpy(zero_copy_only=False))
    # The archive's new rows are merged into its parts in key order: tag them in that order.
    files = entries if isinstance(entries, Files) else Files.of(entries)
    todo_entries = files.take(todo, sort=layout.is_archive(cfg.output))
    fields.pop("carry", None)
    return Plan(todo_entries, schema, now, message="; ".join(notes), **fields)


def _previous(cfg: TagConfig, want: dict, schema: pa.Schema, now: pa.Array, done: pa.Array,
              held: frozenset = frozenset()) -> tuple[str, dict]:  # fmt: skip
    """Decide what the previous output can give this run; returns (note, Plan fields)."""
    output = cfg.output
    files = layout.parts(output)
    meta = layout.metadata(output)
    names = _names(files)
    if meta is None or names is None:
        raise UsageError(
            f"{output} exists but is not an omni output; nothing was touched "
            "(use another --output, or --full to replace it)"
        )
    have = identity.reconcile(fingerprint(meta), want, hub.snapshot)  # weights changed?
    changed = differences(have, want, ENCODING)
    if changed:
        raise UsageError(
            f"{output} was made differently ({'; '.join(changed)}): nothing was touched. "
            "Rerun with its options to update it, or with --full to tag everything again "
            "and replace it"
        )
    rescore = [k for k in SCORING if have[k] != want[k]]
    relabel = bool(rescore)
    if "embedding" in names and not want["embedding"]:
        raise UsageError(
            f"{output} holds stored embeddings and this run would drop them: nothing was "
            "touched. Rerun with --save-embeddings to keep them, or with --full to tag "
            "everything again without them"
        )
    if want["embedding"] and "embedding" not in names:
        return "previous output has no embeddings (--save-embeddings): tagging everything", {}
    if relabel and "embedding" not in names:
        what = "labels changed" if {"labels", "prompts"} & set(rescore) else "scoring rule changed"
        return (
            f"{what} and the previous output has no embeddings to rescore from "
            "(see --save-embeddings): tagging everything"
        ), {}
    try:
        table = _keys(files, ["root", "path", "status", "error", "bytes", "mtime_ns"],
                      numbered=True)  # fmt: skip
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read {output} ({exc}); nothing was touched") from None
    keys = row_keys(table)
    keep = pc.or_(pc.equal(table["status"], "ok"), sticky(table["error"]))
    if held:
        keep = pc.or_(keep, pc.is_in(keys, value_set=pa.array(list(held), pa.string())))
    stays = pc.and_(
        pc.and_(keep, pc.is_in(keys, value_set=now)),
        pc.invert(pc.is_in(keys, value_set=done)),
    )
    stays = stays.combine_chunks() if isinstance(stays, pa.ChunkedArray) else stays
    carry = keys.filter(stays)
    kept_errors = table.filter(stays).filter(pc.equal(table.filter(stays)["status"], "error"))
    fields = {
        "previous": tuple(files),
        "drop": keys.filter(pc.invert(stays)),
        "carried_rows": len(carry),
        "carry": carry,
        "carried_errors": list(zip(*(kept_errors[c].to_pylist()
                                     for c in ("root", "path", "error")), strict=True)),
    }  # fmt: skip
    if layout.is_archive(output):
        version = archive.current(output)
        parts = archive.index(version)
        counts = np.bincount(table["part"].to_numpy()[stays.to_numpy(zero_copy_only=False)],
                             minlength=len(files))  # fmt: skip
        fields.update(version=version, parts=tuple(parts), part_carried=tuple(counts.tolist()))
    if not len(carry):
        return "", fields
    tops = any(have[k] != want[k] for k in TOPS)
    fields.update(relabel=relabel, rescore=relabel or tops or names != schema.names)
    how = "rescored from stored embeddings" if relabel else "carried over"
    return f"incremental: {len(carry):,} unchanged files {how}", fields


def _resume(partial: Path, want: dict, now: pa.Array, cfg: TagConfig) -> tuple | None:
    """Keys of the interrupted run's rows that still hold, and their error rows.

    None when they were made differently and `--full` says to discard them."""
    parts = sorted(partial.glob("part-*.parquet"))
    if not parts:
        return pa.array([], pa.string()), []
    keys, errors = [], []
    try:
        if (partial / layout.META_FILE).exists():
            meta = layout.metadata(partial)
        else:  # flushed by an omni that kept the metadata in every part
            meta = layout.file_metadata(pq.read_metadata(parts[0]))
        have = identity.reconcile(fingerprint(meta or {}), want, hub.snapshot)
        changed = differences(have, want, IDENTITY)
        if changed and cfg.full:
            return None
        if changed:
            raise UsageError(
                f"an interrupted run's rows in {partial} were made differently "
                f"({'; '.join(changed)}): rerun with its options to resume it, or with "
                "--full (or --no-resume) to discard them"
            )
        for part in parts:
            batch = pq.read_table(part, columns=["root", "path", "status", "error", "bytes",
                                                 "mtime_ns"])  # fmt: skip
            batch = batch.filter(pc.is_in(row_keys(batch), value_set=now))
            keys.append(row_keys(batch))
            failed = batch.filter(pc.equal(batch["status"], "error"))
            errors += zip(*(failed[c].to_pylist() for c in ("root", "path", "error")), strict=True)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(
            f"cannot read an interrupted run's rows in {partial} ({exc}); nothing was touched: "
            "move the folder away, or rerun with --no-resume to discard it"
        ) from None
    return pa.concat_arrays(keys) if keys else pa.array([], pa.string()), errors


def sticky(errors: pa.Array) -> pa.Array:
    """Which error texts mark a file that is kept as it is until it changes."""
    marks = [pc.starts_with(errors, prefix) for prefix in STICKY_ERRORS]
    out = marks[0]
    for mark in marks[1:]:
        out = pc.or_(out, mark)
    return pc.fill_null(out, False)


def previous_rows(output: Path, columns: Sequence[str]) -> pa.Table | None:
    """These columns of the previous output (either layout), or None where there is none."""
    files = layout.parts(output)
    if not files or _names(files) is None:
        return None
    try:
        return _keys(files, list(columns))
    except (OSError, pa.ArrowException):
        return None


def held_rows(output: Path, unlisted: Sequence[Unlisted]) -> list[FileEntry]:
    """The previous output's rows under folders that could not be listed, as entries whose
    size and mtime are those stored: they are kept as they are (see `plan_work(held=...)`)."""
    table = previous_rows(output, ["root", "path", "bytes", "mtime_ns"]) if unlisted else None
    if table is None:
        return []
    under = None
    for u in unlisted:
        mask = pc.and_(pc.equal(table["root"], u.root), pc.starts_with(table["path"], u.rel))
        under = mask if under is None else pc.or_(under, mask)
    rows = table.filter(under).to_pylist()
    return [FileEntry(r["root"], r["path"], "", r["bytes"] or 0, r["mtime_ns"] or 0)
            for r in rows]  # fmt: skip


def check_shrink(cfg: TagConfig, entries: Files | Sequence[FileEntry], allow: bool) -> None:
    """Refuse a run that would drop every row of an input, or more than half of the previous
    output's rows, unless `allow`: an unmounted share lists as an empty folder."""
    if allow:
        return
    table = previous_rows(cfg.output, ["root", "path"])
    if table is None or not table.num_rows:
        return
    files = entries if isinstance(entries, Files) else Files.of(entries)
    now = pc.binary_join_element_wise(files.table["root"], files.table["rel"], "\x00")
    was = pc.binary_join_element_wise(table["root"], table["path"], "\x00")
    gone = table.filter(pc.invert(pc.is_in(was, value_set=now.combine_chunks())))
    if not gone.num_rows:
        return
    found = set(pc.unique(files.table["root"]).to_pylist())
    given = {printable(str(p)) for p in cfg.inputs}
    for root in pc.unique(gone["root"]).to_pylist():
        held = pc.sum(pc.equal(table["root"], root)).as_py()
        if root in found or not held:
            continue
        why = "holds no image files now" if root in given else "is not among this run's inputs"
        raise InputUnreadable(
            f"{root} {why}, but {cfg.output} has {_rows(held)} from it (a share that is not "
            "mounted?): nothing was touched. Rerun with --allow-shrink if they really are gone"
        )
    if 2 * gone.num_rows > table.num_rows:
        raise InputUnreadable(
            f"this run would drop {gone.num_rows:,} of the {_rows(table.num_rows)} in "
            f"{cfg.output} (their files are gone): nothing was touched. Check that the inputs "
            "are all there, or rerun with --allow-shrink if they really are gone"
        )


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def _names(files: Sequence[Path]) -> list[str] | None:
    """The column names of an output's files (its first part), None if it is not Parquet."""
    try:
        return pq.read_schema(files[0]).names if files else None
    except (OSError, pa.ArrowException):
        return None


def _keys(files: Sequence[Path], names: list[str], *, numbered: bool = False) -> pa.Table:
    """Some columns of every file, one after another; `part`: which file a row is in."""
    tables = []
    for number, path in enumerate(files):
        table = pq.ParquetFile(path, pre_buffer=False).read(columns=names)
        if numbered:
            table = table.append_column("part", pa.array(np.full(table.num_rows, number, np.int32)))
        tables.append(table)
    return pa.concat_tables(tables).combine_chunks()
