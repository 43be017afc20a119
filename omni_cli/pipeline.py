"""Pipeline: wires sources -> loader -> encoder -> scoring -> sink for one `omni tag` run.

It knows nothing about terminals: progress goes to a callback as `Progress` events, and the
result comes back as a `TagResult`. Before any work it validates the labels, the inputs and the
output, takes the output's lock, and works out what is already done: rows flushed by an
interrupted run (`OUT.partial/`) and, for an incremental run, rows of the previous output whose
files are unchanged. Only the rest is decoded and encoded.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, scoring
from .config import TagConfig
from .decode import Preprocess
from .encoder import Encoder, load_encoder
from .labels import (
    NEUTRAL_LEVELS,
    Classifier,
    Label,
    cached_classifier,
    cached_neutral,
    prompts_for,
    read_labels,
)
from .loader import default_workers, make_loader
from .lock import OutputLock
from .rows import Tagger
from .sink import Sink, check_writable, schema
from .sources import FileEntry, check_inputs, discover
from .state import Plan, plan_work


@dataclass
class Progress:
    """One progress event. `stage`: scan, model, tag, finish, or note (a message for the log)."""

    stage: str
    done: int = 0
    total: int = 0
    errors: int = 0
    message: str = ""


@dataclass
class TagResult:
    output: Path
    files: int  # rows in the output
    tagged: int  # files decoded and encoded in this run
    carried: int  # rows kept from the previous output or a partial run
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (root, path, reason)
    seconds: float = 0.0
    precision: str = ""
    batch: int = 0

    @property
    def exit_code(self) -> int:
        return 3 if self.errors else 0

    @property
    def images_per_second(self) -> float:
        return self.tagged / self.seconds if self.seconds > 0 else 0.0


def tag(cfg: TagConfig, on_progress: Callable[[Progress], None] | None = None) -> TagResult:
    """Run one `omni tag` job as configured; raise an OmniError for anything fatal."""
    emit = on_progress or (lambda event: None)
    labels, prompts = prepare(cfg)
    with OutputLock(cfg.output):
        emit(Progress("scan", message="listing files"))
        entries = list(discover(cfg.inputs, recursive=cfg.recursive))
        emit(Progress("model", total=len(entries), message=f"loading {cfg.model.model}"))
        encoder, classifier = load_model(cfg, prompts, emit)
        plan, tagger = plan_run(cfg, entries, encoder, classifier, labels, prompts, emit)
        loader = make_loader(
            plan.todo,
            decode_spec(cfg, encoder),
            batch=encoder.batch,
            workers=default_workers(encoder.device.type) if cfg.workers is None else cfg.workers,
            pin=encoder.device.type == "cuda",
        )
        return write_rows(cfg, plan, encoder, (tagger.rows(b) for b in loader), emit)


def write_rows(
    cfg: TagConfig,
    plan: Plan,
    encoder: Encoder,
    rows: Iterable[pa.RecordBatch],
    emit: Callable[[Progress], None],
) -> TagResult:
    """Stream an engine's output rows into the sink, then finish the output atomically.

    Whatever finished is flushed when anything goes wrong, Ctrl-C included, so a rerun resumes.
    """
    sink = Sink(cfg.output, plan.schema, part_rows=cfg.flush_rows)
    started = time.perf_counter()
    errors: list[tuple[str, str, str]] = []
    done = 0
    emit(Progress("tag", 0, len(plan.todo), 0, "tagging"))
    try:
        for batch in rows:
            sink.write(batch)
            failed = batch.filter(pc.equal(batch["status"], "error"))
            columns = (failed[c].to_pylist() for c in ("root", "path", "error"))
            errors += zip(*columns, strict=True)
            done += batch.num_rows
            emit(Progress("tag", done, len(plan.todo), len(errors), "tagging"))
    except BaseException:
        sink.close()
        raise
    seconds = time.perf_counter() - started
    emit(Progress("finish", done, len(plan.todo), len(errors), "writing output"))
    total = sink.finish(plan.carried(), keep=plan.matches)
    return TagResult(
        cfg.output,
        total,
        done,
        total - done,
        plan.carried_errors + errors,
        seconds,
        encoder.precision,
        encoder.batch,
    )


def prepare(cfg: TagConfig) -> tuple[list[Label], list[tuple[str, ...]]]:
    """Check the labels, inputs and output before any work; returns (labels, prompts)."""
    labels = read_labels(cfg.labels_file)
    prompts = prompts_for(labels, cfg.template)
    check_inputs(cfg.inputs)
    check_writable(cfg.output)
    return labels, prompts


def load_model(
    cfg: TagConfig, prompts, emit: Callable[[Progress], None] | None = None
) -> tuple[Encoder, Classifier]:
    """The encoder and the label classifier (matrix and per-label baselines) on its device."""
    encoder = load_encoder(cfg.model, exact=cfg.decode.exact)
    if emit is not None:
        encoder.on_backoff = lambda b: emit(Progress("note", message=f"out of memory: batch {b}"))
    matrix, _ = cached_classifier(encoder.encode_texts, prompts, encoder.cache_key)
    baseline = None
    if encoder.logit_bias is None:  # CLIP: scores need each label's content-free baseline
        size = encoder.preprocess.size
        neutral, _ = cached_neutral(encoder.encode_images, size, encoder.cache_key)
        baseline = neutral @ matrix  # (labels,)
    return encoder, Classifier(matrix, baseline).to(encoder.device)


def plan_run(
    cfg: TagConfig,
    entries: list[FileEntry],
    encoder: Encoder,
    classifier: Classifier,
    labels: list[Label],
    prompts,
    emit: Callable[[Progress], None],
) -> tuple[Plan, Tagger]:
    """The output schema, what is left to do (`plan.schema`, `plan.todo`) and the row builder."""
    names = [lab.name for lab in labels]
    meta = run_metadata(cfg, encoder, labels=names, prompts=prompts, classifier=classifier)
    out_schema = schema(len(labels), embeddings=cfg.save_embeddings, metadata=meta)
    plan = plan_work(cfg, entries, out_schema)
    if not entries:
        where = ", ".join(map(str, cfg.inputs))
        emit(Progress("note", message=f"no image files found under {where}"))
    if plan.message:
        emit(Progress("note", message=plan.message))
    tagger = Tagger(
        encoder, classifier, names, out_schema, top_k=cfg.top_k, threshold=cfg.threshold
    )
    plan.rescore = functools.partial(tagger.rescore, relabel=plan.relabel)
    return plan, tagger


def decode_spec(cfg: TagConfig, encoder: Encoder) -> Preprocess:
    """The model's preprocessing plus this run's tiling and pixel cap."""
    return dataclasses.replace(
        encoder.preprocess,
        tiles=cfg.decode.tiles,
        tile_overlap=cfg.decode.tile_overlap,
        max_pixels=cfg.decode.max_pixels,
    )


def run_metadata(
    cfg: TagConfig, encoder: Encoder, *, labels: list[str], prompts, classifier=None
) -> dict:
    """Everything a reader needs to interpret the columns, stored in the file's schema."""
    clip = encoder.logit_bias is None
    baseline = getattr(classifier, "baseline", None)
    return {
        "labels": labels,
        "prompts": [list(p) for p in prompts],
        "template": cfg.template,
        "model": encoder.model_id,
        "revision": encoder.revision,
        "precision": encoder.precision,
        "preprocess": "exact" if cfg.decode.exact else "draft",
        "tiles": cfg.decode.tiles,
        "tile_overlap": cfg.decode.tile_overlap,
        "tile_rule": "views: global, whole-image squares, tiles. Tiles whose embedding has cosine "
        f"< {scoring.TILE_ALIKE} with the image's typical tile (the mean of its largest group "
        "of tiles alike at that cosine) show objects; an 8-connected group of them spanning "
        "at most 2 / (1 - tile_overlap) tiles along each axis is read from its most "
        "distinctive tiles (least like the typical tile; non-maximum "
        "suppression over touching tiles); the whole-image views are read when there is no "
        "object tile or a group is larger. Each label takes its largest similarity over the "
        "views read",
        "similarity": "cosine(image embedding, label embedding)",
        "probs": "softmax(logit_scale * similarity)"
        if clip
        else "sigmoid(logit_scale * similarity + logit_bias)",
        "scores": "clip((similarity - score_baseline) / (1 - score_baseline), 0, 1); "
        "score_baseline: each label's similarity to content-free images (flat greys "
        f"{list(NEUTRAL_LEVELS)}), so 0 = no closer than a blank image, 1 = a perfect match"
        if clip
        else "sigmoid(logit_scale * similarity + logit_bias)",
        "score_baseline": baseline.float().cpu().tolist() if baseline is not None else None,
        "logit_scale": encoder.logit_scale,
        "logit_bias": encoder.logit_bias,
        "top_k": cfg.top_k,
        "threshold": cfg.threshold,
        "top_labels": "labels with scores >= threshold, best first, at most top_k",
        "embedding": "float16, every view (global, squares, tiles): views x dim, flattened"
        if cfg.save_embeddings
        else None,
        "omni_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
