"""State: what earlier runs already did, and so what this run must still do.

Two sources of finished rows: `OUT.partial/`, the parts flushed by a run that was interrupted
(kill -9, power loss, Ctrl-C), and the previous `OUT` of an incremental run. Either is used only
when it was made the same way (model and revision, precision, preprocessing, tiling, labels and
prompts); otherwise it is set aside and the message says why. A file counts as done when its
row's size and mtime equal what stat says now; rows of deleted or changed files are dropped.
Previous error rows are retried; error rows of an interrupted run are kept.
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

from .config import TagConfig
from .sink import META_KEY, partial_dir, read_parts
from .sources import FileEntry

# Metadata that decides whether a stored embedding is still the one this run would compute.
ENCODING = ("model", "revision", "precision", "preprocess", "tiles", "tile_overlap")
# ... whether its similarity and scores are those this run would compute from that embedding
# (rows of an output written by another scoring or tiling rule, or before the `scores` column
# existed, are rescored from their stored embeddings, or tagged again without them) ...
SCORING = ("labels", "prompts", "scores", "tile_rule")
# ... and whether a stored row can be used as it is.
FINGERPRINT = (*ENCODING, *SCORING, "embedding", "top_k", "threshold")


@dataclass
class Plan:
    todo: list[FileEntry]
    schema: pa.Schema
    keep: pa.Array  # keys (root, path, bytes, mtime_ns) of rows that belong in the output
    previous: Path | None = None  # the output whose unchanged ok rows are carried over
    carry: pa.Array | None = None  # keys of those rows
    relabel: bool = False  # labels changed: rescore carried rows from their embeddings
    rescore: Callable[[pa.RecordBatch], pa.RecordBatch] | None = None  # set by the pipeline
    carried_errors: list[tuple[str, str, str]] = field(default_factory=list)
    message: str = ""

    def carried(self) -> Iterator[pa.RecordBatch]:
        """The previous output's rows for unchanged files, in the new schema.

        Rows are rescored (`rescore`) when the labels changed, and always get their top tags
        recomputed, since --top-k and --threshold may differ from the previous run's.
        """
        if self.previous is None:
            return
        for batch in pq.ParquetFile(self.previous).iter_batches(batch_size=4096):
            rows = batch.filter(pc.is_in(row_keys(batch), value_set=self.carry))
            if rows.num_rows:
                yield self.rescore(rows) if self.rescore else rows

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


def fingerprint(schema: pa.Schema) -> dict:
    meta = json.loads((schema.metadata or {}).get(META_KEY, b"{}"))
    return {k: meta.get(k) for k in FINGERPRINT}


def plan_work(cfg: TagConfig, entries: Sequence[FileEntry], schema: pa.Schema) -> Plan:
    """Split `entries` into work to do and rows to keep, from the partial and previous output."""
    want = fingerprint(schema)
    keys = {entry_key(e): e for e in entries}
    keep = pa.array(list(keys), pa.string())
    done: set[str] = set()
    notes = []
    partial = partial_dir(cfg.output)
    plan = Plan([], schema, keep)
    if partial.exists():
        resumed = _resume(partial, want, plan) if cfg.resume else None
        if resumed is None:
            shutil.rmtree(partial, ignore_errors=True)
            if cfg.resume:
                notes.append("an interrupted run's rows were made differently: discarded")
        else:
            done |= resumed
            if resumed:
                notes.append(f"resuming: {len(resumed):,} rows from an interrupted run")
    if cfg.output.exists() and not cfg.full:
        note, carried = _previous(cfg.output, want, plan, done)
        notes += [note] if note else []
        done |= carried
    plan.todo = [e for k, e in keys.items() if k not in done]
    plan.message = "; ".join(notes)
    return plan


def _previous(output: Path, want: dict, plan: Plan, done: set[str]) -> tuple[str, set[str]]:
    """Decide what the previous output can give this run; returns (note, carried keys)."""
    previous = _schema(output)
    if previous is None:
        return f"{output} is not a readable omni output: tagging everything", set()
    have = fingerprint(previous)
    changed = [k for k in ENCODING if have[k] != want[k]]
    if want["embedding"] and "embedding" not in previous.names:
        changed.append("embeddings")
    rescore = [k for k in SCORING if have[k] != want[k]]
    relabel = bool(rescore)
    if relabel and "embedding" not in previous.names:
        what = "labels" if {"labels", "prompts"} & set(rescore) else "the scoring rule"
        changed.append(f"{what} (no stored embeddings to rescore from: see --save-embeddings)")
    if changed:
        return f"previous output differs in {', '.join(changed)}: tagging everything", set()
    table = pq.read_table(output, columns=["root", "path", "status", "bytes", "mtime_ns"])
    ok = table.filter(pc.equal(table["status"], "ok"))
    carried = set(row_keys(ok.filter(plan.matches(ok))).to_pylist()) - done
    if not carried:
        return "", carried
    plan.previous = output
    plan.carry = pa.array(sorted(carried), pa.string())
    plan.relabel = relabel
    how = "rescored from stored embeddings" if relabel else "carried over"
    return f"incremental: {len(carried):,} unchanged files {how}", carried


def _resume(partial: Path, want: dict, plan: Plan) -> set[str] | None:
    """Keys of the interrupted run's rows that still hold; its error rows go to the plan."""
    parts = sorted(partial.glob("part-*.parquet"))
    if not parts:
        return set()
    keys: set[str] = set()
    try:
        if fingerprint(pq.read_schema(parts[0])) != want:
            return None
        for batch in read_parts(partial):
            batch = batch.filter(plan.matches(batch))
            keys |= set(row_keys(batch).to_pylist())
            errors = batch.filter(pc.equal(batch["status"], "error"))
            columns = (errors[c].to_pylist() for c in ("root", "path", "error"))
            plan.carried_errors += zip(*columns, strict=True)
    except (OSError, pa.ArrowException):
        return None
    return keys


def _schema(path: Path) -> pa.Schema | None:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return None
