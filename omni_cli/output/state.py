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

The previous output is read once, before the model loads, into a few bytes a row
(`compare.Survey`); every decision here is made from that and from the listing, so memory
grows with neither the output's size nor its labels. `unchanged` answers the nightly question
cheaply, from `stat` and that survey alone: if every file is as it was and the run is asked
for the same way, there is nothing to do, not even a model to load. Error rows of unchanged
files count as done then; any run with other work to do tries them again.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
from .compare import KEY_COLUMNS, Lookup, Survey
from .identity import ENCODING, IDENTITY, SCORING, TOPS, differences, fingerprint
from .layout import row_keys
from .sink import partial_dir
from .sink import schema as output_schema


@dataclass(frozen=True)
class Plan:
    """What a run does, decided once before any tagging: built by `plan_work`, then read only."""

    todo: Files  # the files to tag, as a table: indexing one makes its FileEntry
    schema: pa.Schema
    accept: pa.Array  # keys (root, path, bytes, mtime_ns) of the rows this run may add
    previous: tuple[Path, ...] = ()  # the previous output's files whose unchanged rows stay
    stays: dict[str, np.ndarray] = field(default_factory=dict)  # per file name: rows that stay
    version: Path | None = None  # the archive version they belong to
    parts: tuple[Part, ...] = ()  # ... its parts (archive layout)
    part_carried: tuple[int, ...] = ()  # rows of each part that stay
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
            for table in archive.kept_rows(path, self.stays[path.name]):
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
        return archive.Previous(self.version, self.parts, self.part_carried, self.stays, how)

    def matches(self, batch: pa.RecordBatch | pa.Table) -> pa.Array:
        """Which of the rows this run flushed describe a file exactly as it is now."""
        return pc.is_in(row_keys(batch), value_set=self.accept)


def columns(labels: int, embeddings: bool) -> list[str]:
    """The columns this version writes."""
    return output_schema(labels, embeddings=embeddings, metadata={}).names


def unchanged(cfg: TagConfig, files: Files, survey: Survey | None, request: dict):
    """The previous output's error rows if this run has nothing to do, else None.

    Nothing to do: no interrupted run, the previous output was asked for exactly as this run
    is (`request`: model and revision, options, labels and prompts), and it holds one row per
    file found now, each with the file's current size and mtime.
    """
    if cfg.full or partial_dir(cfg.output).exists() or survey is None or survey.error:
        return None
    meta = survey.meta
    if meta is None or meta.get("request") != request:
        return None
    if survey.names != columns(len(request["labels"]), cfg.save_embeddings):
        return None  # written by another version of omni: its columns differ
    if survey.rows != len(files) or not survey.described(len(files)).all():
        return None  # as many rows as files, each file described: one row per file
    return [(root, path, error) for _, root, path, error in survey.errors]


def plan_work(
    cfg: TagConfig,
    files: Files,
    lookup: Lookup,
    survey: Survey | None,
    schema: pa.Schema,
    held: int | None = None,
    force: np.ndarray | None = None,
) -> Plan:
    """Split `files` into work to do and rows to keep; refuse what would lose results.

    The one place a run's plan is made; the result is frozen. `held`: files from that index on
    are the previous output's rows under folders that could not be listed; they are kept as
    they are, whatever their status. `force`: indices of files whose content changed although
    their size and mtime did not (`--verify`): their previous rows are not carried. An
    interrupted run's rows are resumed also under `--full` (it ignores only the previous
    output), unless they were made differently.
    """
    want = fingerprint(layout.schema_metadata(schema))
    done = np.zeros(len(files), bool)
    fields: dict = {}
    errors: list = []
    notes = []
    partial = partial_dir(cfg.output)
    resumed = np.zeros(0, np.int64)
    if partial.exists():
        got = _resume(partial, want, lookup, cfg) if cfg.resume else None
        if got is None:
            shutil.rmtree(partial, ignore_errors=True)
            why = "--no-resume" if not cfg.resume else "made differently, and --full"
            notes.append(f"an interrupted run's rows were discarded ({why})")
        else:
            resumed, errors = got
            done[resumed] = True
            fields.update(resumed=int(done.sum()))
            if len(resumed):
                notes.append(f"resuming: {int(done.sum()):,} rows from an interrupted run")
    if survey is not None and not cfg.full:
        skip = done.copy()
        if force is not None:
            skip[force] = True
        note, carried = _previous(cfg, want, schema, survey, skip, held)
        errors += carried.pop("carried_errors", [])
        notes += [note] if note else []
        done[carried.pop("carry", np.zeros(0, np.int64))] = True
        fields.update(carried)
    fields.update(carried_errors=tuple(errors))
    todo = np.flatnonzero(~done)
    # The archive's new rows are merged into its parts in key order: tag them in that order.
    todo_files = files.take(todo, sort=layout.is_archive(cfg.output))
    accept = pa.concat_arrays([todo_files.keys(), files.take(np.unique(resumed)).keys()])
    return Plan(todo_files, schema, accept, message="; ".join(notes), **fields)


def _previous(cfg: TagConfig, want: dict, schema: pa.Schema, survey: Survey, skip: np.ndarray,
              held: int | None) -> tuple[str, dict]:  # fmt: skip
    """Decide what the previous output can give this run; returns (note, Plan fields)."""
    output = cfg.output
    meta, names = survey.meta, survey.names
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
    if want["tiles"] == "off":  # an untiled row has one view: no tiling rule touched it
        rescore = [k for k in rescore if k != "tile_rule"]
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
    if survey.error:
        raise OutputError(f"cannot read {output} ({survey.error}); nothing was touched")
    at = survey.at
    keep = survey.keepable.copy()
    if held is not None:
        keep |= at >= held  # rows under folders that could not be listed stay as they are
    stays = keep & survey.same
    stays[stays] = ~skip[at[stays]]
    # One row per file: a second row of the same file (an old omni's duplicate) is dropped.
    rows = np.flatnonzero(stays)
    unique_at, first_row = np.unique(at[rows], return_index=True)
    stays[:] = False
    stays[rows[first_row]] = True
    starts = [*survey.starts, survey.rows]
    per_file = {path.name: stays[starts[i] : starts[i + 1]]
                for i, path in enumerate(survey.files)}  # fmt: skip
    kept_errors = [(root, path, error) for row, root, path, error in survey.errors if stays[row]]
    fields = {
        "previous": survey.files,
        "stays": per_file,
        "carried_rows": len(unique_at),
        "carry": unique_at,
        "carried_errors": kept_errors,
    }
    if layout.is_archive(output):
        version = archive.current(output)
        parts = archive.index(version)
        counts = tuple(int(per_file[p.name].sum()) if p.name in per_file else 0 for p in parts)
        fields.update(version=version, parts=tuple(parts), part_carried=counts)
    if not len(unique_at):
        return "", fields
    tops = any(have[k] != want[k] for k in TOPS)
    fields.update(relabel=relabel, rescore=relabel or tops or names != schema.names)
    how = "rescored from stored embeddings" if relabel else "carried over"
    return f"incremental: {len(unique_at):,} unchanged files {how}", fields


def _resume(partial: Path, want: dict, lookup: Lookup, cfg: TagConfig) -> tuple | None:
    """Indices of the files whose interrupted run's rows still hold, and their error rows.

    None when they were made differently and `--full` says to discard them."""
    parts = sorted(partial.glob("part-*.parquet"))
    if not parts:
        return np.zeros(0, np.int64), []
    found, errors = [], []
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
            batch = pq.read_table(part, columns=KEY_COLUMNS)
            at = lookup.find(batch["root"], batch["path"])
            same = lookup.same(batch, at)
            found.append(at[same])
            kept = batch.filter(pa.array(same))
            failed = kept.filter(pc.equal(kept["status"], "error"))
            errors += zip(*(failed[c].to_pylist() for c in ("root", "path", "error")), strict=True)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(
            f"cannot read an interrupted run's rows in {partial} ({exc}); nothing was touched: "
            "move the folder away, or rerun with --no-resume to discard it"
        ) from None
    return (np.concatenate(found) if found else np.zeros(0, np.int64)), errors


def held_rows(output: Path, unlisted: Sequence[Unlisted]) -> list[FileEntry]:
    """The previous output's rows under folders that could not be listed, as entries whose
    size and mtime are those stored: they are kept as they are (see `plan_work(held=...)`)."""
    files = layout.parts(output) if unlisted else []
    entries: list[FileEntry] = []
    try:
        for path in files:
            file = pq.ParquetFile(path, pre_buffer=False)
            cols = ["root", "path", "bytes", "mtime_ns"]
            for batch in file.iter_batches(batch_size=65_536, columns=cols):
                under = None
                for u in unlisted:
                    mask = pc.and_(pc.equal(batch["root"], u.root),
                                   pc.starts_with(batch["path"], u.rel))  # fmt: skip
                    under = mask if under is None else pc.or_(under, mask)
                for r in batch.filter(under).to_pylist():
                    entries.append(FileEntry(r["root"], r["path"], "", r["bytes"] or 0,
                                             r["mtime_ns"] or 0))  # fmt: skip
    except (OSError, pa.ArrowException):
        return []
    return entries


def check_shrink(cfg: TagConfig, files: Files, survey: Survey | None, allow: bool) -> None:
    """Refuse a run that would drop every row of an input, or more than half of the previous
    output's rows, unless `allow`: an unmounted share lists as an empty folder."""
    if allow or survey is None or not survey.rows:
        return
    gone = sum(survey.gone_rows.values())
    if not gone:
        return
    found = set(pc.unique(files.table["root"]).to_pylist())
    given = {printable(str(p)) for p in cfg.inputs}
    for root, held in survey.root_rows.items():
        if root in found or not survey.gone_rows.get(root):
            continue
        why = "holds no image files now" if root in given else "is not among this run's inputs"
        raise InputUnreadable(
            f"{root} {why}, but {cfg.output} has {_rows(held)} from it (a share that is not "
            "mounted?): nothing was touched. Rerun with --allow-shrink if they really are gone"
        )
    if 2 * gone > survey.rows:
        raise InputUnreadable(
            f"this run would drop {gone:,} of the {_rows(survey.rows)} in "
            f"{cfg.output} (their files are gone): nothing was touched. Check that the inputs "
            "are all there, or rerun with --allow-shrink if they really are gone"
        )


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")
