"""Pipeline: wires sources -> loader -> encoder -> scoring -> sink for one `omni tag` run.

It knows nothing about terminals: progress goes to a callback as `Progress` events, and the
result comes back as a `TagResult`. Before any work it validates the labels, the inputs and the
output, takes the output's lock, and works out what is already done: rows flushed by an
interrupted run (`OUT.partial/`) and, for an incremental run, rows of the previous output whose
files are unchanged. Only the rest is decoded and encoded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from . import __version__, scoring
from .config import TagConfig
from .encoder import Encoder, load_encoder
from .labels import cached_classifier, prompts_for, read_labels
from .loader import Batch, default_workers, make_loader
from .lock import OutputLock
from .sink import Sink, check_writable, schema
from .sources import check_inputs, discover
from .state import plan_work


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
    labels = read_labels(cfg.labels_file)
    prompts = prompts_for(labels, cfg.template)
    check_inputs(cfg.inputs)
    check_writable(cfg.output)
    with OutputLock(cfg.output):
        emit(Progress("scan", message="listing files"))
        entries = list(discover(cfg.inputs, recursive=cfg.recursive))
        emit(Progress("model", total=len(entries), message=f"loading {cfg.model.model}"))
        encoder = load_encoder(cfg.model, exact=cfg.decode.exact)
        encoder.on_backoff = lambda b: emit(Progress("note", message=f"out of memory: batch {b}"))
        classifier, _ = cached_classifier(encoder.encode_texts, prompts, encoder.cache_key)
        classifier = classifier.to(encoder.device)
        meta = run_metadata(cfg, encoder, labels=[lab.name for lab in labels], prompts=prompts)
        out_schema = schema(len(labels), embeddings=cfg.save_embeddings, metadata=meta)
        plan = plan_work(cfg, entries, out_schema)
        if plan.message:
            emit(Progress("note", message=plan.message))
        sink = Sink(cfg.output, out_schema)
        started = time.perf_counter()
        tagger = _Tagger(cfg, encoder, classifier, [lab.name for lab in labels], out_schema)
        errors, done = [], 0
        emit(Progress("tag", 0, len(plan.todo), 0, "tagging"))
        try:
            spec = dataclasses.replace(
                encoder.preprocess,
                tiles=cfg.decode.tiles,
                tile_overlap=cfg.decode.tile_overlap,
                max_pixels=cfg.decode.max_pixels,
            )
            loader = make_loader(
                plan.todo,
                spec,
                batch=encoder.batch,
                workers=default_workers() if cfg.workers is None else cfg.workers,
                pin=encoder.device.type == "cuda",
            )
            for batch in loader:
                sink.write(tagger.rows(batch))
                errors += [(e.root, e.rel, batch.errors[i]) for i, e in enumerate(batch.entries)
                           if i in batch.errors]  # fmt: skip
                done += len(batch.entries)
                emit(Progress("tag", done, len(plan.todo), len(errors), "tagging"))
        except BaseException:
            sink.close()  # whatever finished is flushed, so a rerun resumes from it
            raise
        seconds = time.perf_counter() - started
        emit(Progress("finish", done, len(plan.todo), len(errors), "writing output"))
        rows = sink.finish(plan.carried(), keep=plan.matches)
    errors = plan.carried_errors + errors
    return TagResult(
        cfg.output, rows, done, rows - done, errors, seconds, encoder.precision, encoder.batch
    )


class _Tagger:
    """Turns a decoded batch into output rows: encode, score, combine views, top-k."""

    def __init__(self, cfg: TagConfig, encoder: Encoder, classifier, labels, out_schema):
        self.cfg, self.encoder, self.classifier = cfg, encoder, classifier
        self.labels, self.schema = labels, out_schema

    def rows(self, batch: Batch) -> pa.RecordBatch:
        enc, n, n_labels = self.encoder, len(batch.entries), len(self.labels)
        full_sim = np.zeros((n, n_labels), np.float32)
        full_probs = np.zeros((n, n_labels), np.float32)
        valid = np.zeros(n, bool)
        valid[batch.ok] = True
        top_idx, top_scores, emb = [], [], None
        if batch.ok:
            emb = enc.encode_images(batch.pixels)  # (views, dim)
            sim_views = scoring.similarity(emb, self.classifier)  # (views, labels)
            sim = scoring.combine_views(sim_views, batch.views, enc.logit_scale, enc.logit_bias)
            probs = scoring.probabilities(sim, enc.logit_scale, enc.logit_bias)
            top_idx, top_scores = scoring.top_k(probs, self.cfg.top_k, self.cfg.threshold)
            full_sim[batch.ok] = sim.float().cpu().numpy()
            full_probs[batch.ok] = probs.float().cpu().numpy()
        width, height, views = [None] * n, [None] * n, [None] * n
        top_labels, top_vals = [[] for _ in range(n)], [[] for _ in range(n)]
        for j, pos in enumerate(batch.ok):
            width[pos], height[pos] = batch.sizes[j]
            views[pos] = batch.views[j]
            top_labels[pos] = [self.labels[i] for i in top_idx[j]]
            top_vals[pos] = top_scores[j]
        entries = batch.entries
        columns = {
            "root": [e.root for e in entries],
            "path": [e.rel for e in entries],
            "status": ["error" if i in batch.errors else "ok" for i in range(n)],
            "error": [batch.errors.get(i) for i in range(n)],
            "bytes": [e.bytes for e in entries],
            "mtime_ns": [e.mtime_ns for e in entries],
            "width": width,
            "height": height,
            "views": views,
            "similarity": _fixed(full_sim, valid),
            "probs": _fixed(full_probs, valid),
            "top_labels": top_labels,
            "top_scores": top_vals,
        }
        if self.cfg.save_embeddings:
            columns["embedding"] = _embeddings(emb, batch, n)
        arrays = [
            c if isinstance(c, pa.Array) else pa.array(c, type=f.type)
            for c, f in zip(columns.values(), self.schema, strict=True)
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _fixed(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(rows, labels) float32 -> fixed_size_list<float32>[labels], null where not valid."""
    flat = pa.array(values.reshape(-1), type=pa.float32())
    mask = pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=mask)


def _embeddings(emb: torch.Tensor | None, batch: Batch, n: int) -> list:
    """Every view's embedding of each image, flattened (views x dim), as float16."""
    out: list = [None] * n
    if emb is None:
        return out
    views = emb.half().cpu().numpy()
    start = 0
    for j, pos in enumerate(batch.ok):
        count = batch.views[j]
        out[pos] = views[start : start + count].reshape(-1)
        start += count
    return out


def run_metadata(cfg: TagConfig, encoder: Encoder, *, labels: list[str], prompts) -> dict:
    """Everything a reader needs to interpret the columns, stored in the file's schema."""
    clip = encoder.logit_bias is None
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
        "tile_rule": f"global view if its top prob >= {scoring.GLOBAL_CONFIDENCE}, "
        "else per-label max over all views",
        "similarity": "cosine(image embedding, label embedding)",
        "probs": "softmax(logit_scale * similarity)"
        if clip
        else "sigmoid(logit_scale * similarity + logit_bias)",
        "logit_scale": encoder.logit_scale,
        "logit_bias": encoder.logit_bias,
        "top_k": cfg.top_k,
        "threshold": cfg.threshold,
        "embedding": "float16, every view (global first), flattened views x dim"
        if cfg.save_embeddings
        else None,
        "omni_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
