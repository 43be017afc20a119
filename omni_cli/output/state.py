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

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import TagConfig
from ..errors import InputUnreadable, OutputError, UsageError
from ..inputs.sources import FileEntry, Unlisted, printable
from ..model import hub, identity
from .sink import META_KEY, partial_dir, read_parts
from .sink import schema as output_schema

# Metadata that decides whether a stored embedding is still the one this run would compute.
ENCODING = ("model", "revision", "precision", "preprocess", "tiles", "tile_overlap")
# ... whether its similarity and scores are those this run would compute from that embedding
# (rows of an output written by another scoring or tiling rule, or before the `scores` column
# existed, are rescored from their stored embeddings, or tagged again without them) ...
SCORING = ("labels", "prompts", "scores", "tile_rule")
# ... whether its top tags are (else they are picked again from its stored scores) ...
TOPS = ("top_k", "threshold")
# ... and whether a stored row can be used as it is.
FINGERPRINT = (*ENCODING, *SCORING, "embedding", *TOPS)
# Error rows that stay until their file changes (inputs.loader writes them): retrying them
# would meet the same crash or hang every night.
STICKY_ERRORS = ("crashed the decoder", "decoder timed out")


@dataclass
class Plan:
    todo: list[FileEntry]
    schema: pa.Schema
    keep: pa.Array  # keys (root, path, bytes, mtime_ns) of rows that belong in the output
    previous: Path | None = None  # the output whose unchanged ok rows are carried over
    carry: pa.Array | None = None  # keys of those rows
    relabel: bool = False  # labels changed: rescore carried rows from their embeddings
    rescore: bool = False  # scores or top tags differ: recompute them for carried rows
    resumed: int = 0  # rows picked up from an interrupted run
    carried_errors: list[tuple[str, str, str]] = field(default_factory=list)
    message: str = ""

    def carried(self, rescore: Callable | None = None) -> Iterator[pa.RecordBatch]:
        """The previous output's rows for unchanged files, in the new schema.

        Copied as Arrow data when they score as this run would; else through `rescore(rows,
        relabel=...)`, from stored embeddings when the labels changed.
        """
        if self.previous is None:
            return
        for batch in pq.ParquetFile(self.previous).iter_batches(batch_size=4096):
            rows = batch.filter(pc.is_in(row_keys(batch), value_set=self.carry))
            if not rows.num_rows:
                continue
            if self.rescore and rescore is not None:
                yield rescore(rows, relabel=self.relabel)
            else:
                yield pa.RecordBatch.from_arrays(rows.columns, schema=self.schema)

    def matches(self, batch: pa.RecordBatch | pa.Table) -> pa.Array:
        """Which rows describe a file exactly as it is now."""
        return pc.is_in(row_keys(batch), value_set=self.keep)


def row_keys(batch) -> pa.Array:
    parts = [
        batch["root"],
        batch["path"],
        pc.cast(batch["bytes"], pa.string()),
        pc.cast(batch["mtime_ns"], pa.string()),
    ]
    return pc.binary_join_element_wise(*parts, "\x00")


def entry_key(e: FileEntry) -> str:
    return f"{e.root}\x00{e.rel}\x00{e.bytes}\x00{e.mtime_ns}"


def metadata(schema: pa.Schema) -> dict:
    return json.loads((schema.metadata or {}).get(META_KEY, b"{}"))


def fingerprint(schema: pa.Schema) -> dict:
    meta = metadata(schema)
    return {k: meta.get(k) for k in FINGERPRINT}


def columns(labels: int, embeddings: bool) -> list[str]:
    """The columns this version writes."""
    return output_schema(labels, embeddings=embeddings, metadata={}).names


def unchanged(cfg: TagConfig, entries: Sequence[FileEntry], request: dict):
    """The previous output's error rows if this run has nothing to do, else None.

    Nothing to do: no interrupted run, the previous output was asked for exactly as this run
    is (`request`: model and revision, options, labels and prompts), and it holds one row per
    file found now, each with the file's current size and mtime.
    """
    if cfg.full or partial_dir(cfg.output).exists() or not cfg.output.is_file():
        return None
    schema = _schema(cfg.output)
    if schema is None or metadata(schema).get("request") != request:
        return None
    if schema.names != columns(len(request["labels"]), cfg.save_embeddings):
        return None  # written by another version of omni: its columns differ
    table = pq.read_table(cfg.output, columns=["root", "path", "status", "error", "bytes",
                                               "mtime_ns"])  # fmt: skip
    if table.num_rows != len(entries):
        return None
    now = pa.array([entry_key(e) for e in entries], pa.string())
    if not pc.all(pc.is_in(now, value_set=row_keys(table))).as_py():
        return None
    if pc.count_distinct(now).as_py() != len(entries):
        return None
    errors = table.filter(pc.equal(table["status"], "error"))
    return list(zip(*(errors[c].to_pylist() for c in ("root", "path", "error")), strict=True))


def plan_work(
    cfg: TagConfig,
    entries: Sequence[FileEntry],
    schema: pa.Schema,
    held: frozenset = frozenset(),
    force: frozenset = frozenset(),
) -> Plan:
    """Split `entries` into work to do and rows to keep; refuse what would lose results.

    `held`: keys of the previous output's rows under folders that could not be listed; they
    are kept as they are, whatever their status. `force`: keys of files whose content changed
    although their size and mtime did not (`--verify`): their previous rows are not carried.
    An interrupted run's rows are resumed also under `--full` (it ignores only the previous
    output), unless they were made differently.
    """
    want = fingerprint(schema)
    keys = {entry_key(e): e for e in entries}
    plan = Plan([], schema, pa.array(list(keys), pa.string()))
    done: set[str] = set()
    notes = []
    partial = partial_dir(cfg.output)
    if partial.exists():
        resumed = _resume(partial, want, plan, cfg) if cfg.resume else None
        if resumed is None:
            shutil.rmtree(partial, ignore_errors=True)
            why = "--no-resume" if not cfg.resume else "made differently, and --full"
            notes.append(f"an interrupted run's rows were discarded ({why})")
        else:
            done |= resumed
            plan.resumed = len(resumed)
            if resumed:
                notes.append(f"resuming: {len(resumed):,} rows from an interrupted run")
    if cfg.output.exists() and not cfg.full:
        note, carried = _previous(cfg, want, plan, done | force, held)
        notes += [note] if note else []
        done |= carried
    plan.todo = [e for k, e in keys.items() if k not in done]
    plan.message = "; ".join(notes)
    return plan


def differences(have: dict, want: dict, keys: Sequence[str]) -> list[str]:
    """`name: was -> now` for every key that differs."""
    return [f"{k} {_show(have.get(k))} -> {_show(want.get(k))}" for k in keys
            if have.get(k) != want.get(k)]  # fmt: skip


def _show(value) -> str:
    return "none" if value is None else str(value)


def _previous(
    cfg: TagConfig, want: dict, plan: Plan, done: set[str], held: frozenset = frozenset()
) -> tuple[str, set[str]]:
    """Decide what the previous output can give this run; returns (note, carried keys)."""
    output = cfg.output
    previous = _schema(output)
    if previous is None or META_KEY not in (previous.metadata or {}):
        raise UsageError(
            f"{output} exists but is not an omni output; nothing was touched "
            "(use another --output, or --full to replace it)"
        )
    have = identity.reconcile(fingerprint(previous), want, hub.snapshot)  # weights changed?
    changed = differences(have, want, ENCODING)
    if changed:
        raise UsageError(
            f"{output} was made differently ({'; '.join(changed)}): nothing was touched. "
            "Rerun with its options to update it, or with --full to tag everything again "
            "and replace it"
        )
    rescore = [k for k in SCORING if have[k] != want[k]]
    relabel = bool(rescore)
    if "embedding" in previous.names and not want["embedding"]:
        raise UsageError(
            f"{output} holds stored embeddings and this run would drop them: nothing was "
            "touched. Rerun with --save-embeddings to keep them, or with --full to tag "
            "everything again without them"
        )
    if want["embedding"] and "embedding" not in previous.names:
        return "previous output has no embeddings (--save-embeddings): tagging everything", set()
    if relabel and "embedding" not in previous.names:
        what = "labels changed" if {"labels", "prompts"} & set(rescore) else "scoring rule changed"
        return (
            f"{what} and the previous output has no embeddings to rescore from "
            "(see --save-embeddings): tagging everything"
        ), set()
    table = pq.read_table(output, columns=["root", "path", "status", "error", "bytes", "mtime_ns"])
    keep = pc.or_(pc.equal(table["status"], "ok"), sticky(table["error"]))
    if held:
        keep = pc.or_(keep, pc.is_in(row_keys(table), value_set=pa.array(list(held), pa.string())))
    kept = table.filter(keep)
    kept = kept.filter(plan.matches(kept))
    carried = set(row_keys(kept).to_pylist()) - done
    errors = kept.filter(pc.equal(kept["status"], "error"))
    errors = errors.filter(
        pc.invert(pc.is_in(row_keys(errors), value_set=pa.array(list(done), pa.string())))
    )
    plan.carried_errors += zip(
        *(errors[c].to_pylist() for c in ("root", "path", "error")), strict=True
    )
    if not carried:
        return "", carried
    plan.previous = output
    plan.carry = pa.array(sorted(carried), pa.string())
    plan.relabel = relabel
    tops = any(have[k] != want[k] for k in TOPS)
    plan.rescore = relabel or tops or previous.names != plan.schema.names
    how = "rescored from stored embeddings" if relabel else "carried over"
    return f"incremental: {len(carried):,} unchanged files {how}", carried


def _resume(partial: Path, want: dict, plan: Plan, cfg: TagConfig) -> set[str] | None:
    """Keys of the interrupted run's rows that still hold; its error rows go to the plan.

    None when they were made differently and `--full` says to discard them."""
    parts = sorted(partial.glob("part-*.parquet"))
    if not parts:
        return set()
    keys: set[str] = set()
    try:
        have = identity.reconcile(fingerprint(pq.read_schema(parts[0])), want, hub.snapshot)
        changed = differences(have, want, FINGERPRINT)
        if changed and cfg.full:
            return None
        if changed:
            raise UsageError(
                f"an interrupted run's rows in {partial} were made differently "
                f"({'; '.join(changed)}): rerun with its options to resume it, or with "
                "--full (or --no-resume) to discard them"
            )
        for batch in read_parts(partial):
            batch = batch.filter(plan.matches(batch))
            keys |= set(row_keys(batch).to_pylist())
            errors = batch.filter(pc.equal(batch["status"], "error"))
            columns = (errors[c].to_pylist() for c in ("root", "path", "error"))
            plan.carried_errors += zip(*columns, strict=True)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(
            f"cannot read an interrupted run's rows in {partial} ({exc}); nothing was touched: "
            "move the folder away, or rerun with --no-resume to discard it"
        ) from None
    return keys


def sticky(errors: pa.Array) -> pa.Array:
    """Which error texts mark a file that is kept as it is until it changes."""
    marks = [pc.starts_with(errors, prefix) for prefix in STICKY_ERRORS]
    out = marks[0]
    for mark in marks[1:]:
        out = pc.or_(out, mark)
    return pc.fill_null(out, False)


def previous_rows(output: Path, columns: Sequence[str]) -> pa.Table | None:
    """These columns of the previous output, or None where there is none to read."""
    if not output.is_file() or _schema(output) is None:
        return None
    return pq.read_table(output, columns=list(columns))


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


def check_shrink(cfg: TagConfig, entries: Sequence[FileEntry], allow: bool) -> None:
    """Refuse a run that would drop every row of an input, or more than half of the previous
    output's rows, unless `allow`: an unmounted share lists as an empty folder."""
    if allow:
        return
    table = previous_rows(cfg.output, ["root", "path"])
    if table is None or not table.num_rows:
        return
    now = pa.array(sorted({f"{e.root}\x00{e.rel}" for e in entries}), pa.string())
    was = pc.binary_join_element_wise(table["root"], table["path"], "\x00")
    gone = table.filter(pc.invert(pc.is_in(was, value_set=now)))
    if not gone.num_rows:
        return
    found = {e.root for e in entries}
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


def _schema(path: Path) -> pa.Schema | None:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return None
