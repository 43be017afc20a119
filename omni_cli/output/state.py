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
from ..errors import OutputError, UsageError
from ..inputs.sources import FileEntry
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


def plan_work(cfg: TagConfig, entries: Sequence[FileEntry], schema: pa.Schema) -> Plan:
    """Split `entries` into work to do and rows to keep; refuse what would lose results."""
    want = fingerprint(schema)
    keys = {entry_key(e): e for e in entries}
    plan = Plan([], schema, pa.array(list(keys), pa.string()))
    done: set[str] = set()
    notes = []
    partial = partial_dir(cfg.output)
    if partial.exists():
        if cfg.resume and not cfg.full:
            resumed = _resume(partial, want, plan, cfg)
            done |= resumed
            plan.resumed = len(resumed)
            if resumed:
                notes.append(f"resuming: {len(resumed):,} rows from an interrupted run")
        else:
            shutil.rmtree(partial, ignore_errors=True)
            notes.append("an interrupted run's rows were discarded (--full or --no-resume)")
    if cfg.output.exists() and not cfg.full:
        note, carried = _previous(cfg, want, plan, done)
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


def _previous(cfg: TagConfig, want: dict, plan: Plan, done: set[str]) -> tuple[str, set[str]]:
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
    if want["embedding"] and "embedding" not in previous.names:
        return "previous output has no embeddings (--save-embeddings): tagging everything", set()
    if relabel and "embedding" not in previous.names:
        what = "labels changed" if {"labels", "prompts"} & set(rescore) else "scoring rule changed"
        return (
            f"{what} and the previous output has no embeddings to rescore from "
            "(see --save-embeddings): tagging everything"
        ), set()
    table = pq.read_table(output, columns=["root", "path", "status", "bytes", "mtime_ns"])
    ok = table.filter(pc.equal(table["status"], "ok"))
    carried = set(row_keys(ok.filter(plan.matches(ok))).to_pylist()) - done
    if not carried:
        return "", carried
    plan.previous = output
    plan.carry = pa.array(sorted(carried), pa.string())
    plan.relabel = relabel
    tops = any(have[k] != want[k] for k in TOPS)
    plan.rescore = relabel or tops or previous.names != plan.schema.names
    how = "rescored from stored embeddings" if relabel else "carried over"
    return f"incremental: {len(carried):,} unchanged files {how}", carried


def _resume(partial: Path, want: dict, plan: Plan, cfg: TagConfig) -> set[str]:
    """Keys of the interrupted run's rows that still hold; its error rows go to the plan."""
    parts = sorted(partial.glob("part-*.parquet"))
    if not parts:
        return set()
    keys: set[str] = set()
    try:
        have = identity.reconcile(fingerprint(pq.read_schema(parts[0])), want, hub.snapshot)
        changed = differences(have, want, FINGERPRINT)
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


def _schema(path: Path) -> pa.Schema | None:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return None
