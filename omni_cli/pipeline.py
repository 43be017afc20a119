"""Pipeline: wires sources -> loader -> encoder -> scoring -> sink for one `omni tag` run.

It knows nothing about terminals: progress goes to a callback as `Progress` events, and the
result comes back as a `TagResult`. Before any work it validates the labels, the inputs and the
output, takes the output's lock and lists the files. If the previous output already holds
every file as it is now, asked for the same way, the run ends there: the output is left as it
was, and neither torch nor transformers is imported (this module imports them only past that
point). Otherwise it loads the model, works out what is already done (rows flushed by an
interrupted run, rows of the previous output whose files are unchanged) and tags the rest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, memory
from .config import TagConfig
from .errors import Interrupted, OmniError, Terminated
from .inputs.listing import Files
from .inputs.sources import Unlisted, check_inputs, discover
from .model import hub
from .model.labels import Label, long_labels, prompts_for, read_labels
from .output import verify
from .output.compare import Lookup, Survey, survey
from .output.finish import finish, recover
from .output.identity import request
from .output.lock import OutputLock
from .output.sink import Sink, check_writable, partial_dir, schema
from .output.state import Plan, check_shrink, held_rows, plan_work, unchanged
from .text import utf8_or_none

if TYPE_CHECKING:
    from .inputs.decode import Preprocess
    from .inputs.devdecode import JpegDecoder
    from .inputs.feed import Feeder
    from .model.encoder import Encoder
    from .model.labels import Classifier
    from .output.rows import Tagger


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
    tagged: int  # files tagged in this run
    failed: int  # files this run could not read (error rows written now)
    carried: int  # rows kept from the previous output or an interrupted run
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # every error row
    seconds: float = 0.0
    precision: str = ""
    batch: int = 0  # views per forward
    device_decoded: int = 0  # files whose JPEG the device decoded
    cpu_share: float | None = None  # final share of batches the CPU workers decoded (hybrid)
    times: dict[str, float] = field(default_factory=dict)  # seconds per activity: where it went
    runtime: str = ""  # what ran the image encoder (model/runtimes.py)
    unchanged: bool = False  # nothing to do: the output was left as it was
    unlisted: list[tuple[str, str, str]] = field(default_factory=list)  # folders not listed
    retopped: int = 0  # carried rows whose top tags were picked again (new --top-k/--threshold)

    @property
    def exit_code(self) -> int:
        return 3 if self.errors or self.unlisted else 0

    @property
    def images_per_second(self) -> float:
        done = self.tagged + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0


def tag(
    cfg: TagConfig,
    on_progress: Callable[[Progress], None] | None = None,
    *,
    jpeg_decoder: JpegDecoder | None = None,
) -> TagResult:
    """Run one `omni tag` job as configured; raise an OmniError for anything fatal.

    `jpeg_decoder` replaces the device JPEG decoder (see devdecode.JpegDecoder), on any device.
    """
    emit = on_progress or (lambda event: None)
    labels, prompts = prepare(cfg)
    with OutputLock(cfg.output):
        listing = list_inputs(cfg, labels, prompts, emit)
        if listing.result is not None:
            return listing.result
        total = len(listing.entries)
        emit(Progress("model", total=total, message=f"loading {cfg.model.model}"))
        encoder, classifier = load_model(cfg, prompts, emit)
        plan, tagger = plan_run(cfg, listing, encoder, classifier, labels, prompts, emit)
        listing = listing.planned(cfg)
        feeder = make_feeder(cfg, encoder, plan.todo, jpeg_decoder)
        result = write_rows(cfg, plan, encoder, tagger.stream(feeder), emit, feeder, tagger)
        result.times = {**feeder.times, **tagger.times}
        result.unlisted = listing.unlisted
        listing.done(cfg)
        result.runtime = encoder.runtime
        return result


@dataclass(frozen=True)
class Listing:
    """What the inputs hold now, and what the previous output holds of them, as both engines
    start from it (under the output's lock)."""

    entries: Files  # files found, plus the rows held under folders not listed
    lookup: Lookup | None  # finds a file by (root, path)
    survey: Survey | None  # the previous output, read once (None: there is none)
    held: int | None  # entries from this index on are rows held under folders not listed
    unlisted: list[tuple[str, str, str]]  # (root, folder, reason) of folders not listed
    result: TagResult | None  # set when nothing changed: the run ends here
    force: np.ndarray | None = None  # indices of files whose content changed (--verify)
    digests: tuple = ()  # --verify: the content hash of each entry, recorded when the run ends

    def planned(self, cfg: TagConfig) -> Listing:
        """What the run still needs once its plan is made: the whole list of files and the
        survey of the previous output only served the plan (the plan keeps the files to tag),
        so they are given back before tagging, where a run's memory peaks."""
        keep = self.entries if cfg.verify else Files.of([])
        done = dataclasses.replace(self, entries=keep, lookup=None, survey=None)
        memory.release()
        return done

    def done(self, cfg: TagConfig) -> None:
        """The run succeeded: record the content hashes it verified against."""
        if cfg.verify:
            verify.record(cfg.output, self.entries, self.digests)


def list_inputs(cfg: TagConfig, labels, prompts, emit: Callable[[Progress], None]) -> Listing:
    """List the inputs and read the previous output's keys once; end the run if nothing
    changed; refuse a run that would empty the output (an unmounted share) before any model
    is loaded."""
    recover(cfg.output)
    emit(Progress("scan", message="listing files"))
    problems: list[Unlisted] = []
    entries = Files.of(discover(cfg.inputs, recursive=cfg.recursive, unlisted=problems))
    unlisted = [(u.root, u.rel, u.reason) for u in problems]
    for root, folder, reason in unlisted:
        emit(Progress("note", message=f"{Path(root) / folder}: {reason}; its rows are kept"))
    held = held_rows(cfg.output, problems)
    if not entries:
        where = ", ".join(map(str, cfg.inputs))
        emit(Progress("note", message=f"no image files found under {where}"))
    listed = len(entries)
    entries = entries.plus(held)
    force, digests = None, ()
    if cfg.verify:
        force, digests = _verify(cfg, entries, emit)
    lookup = Lookup(entries)
    previous = survey(cfg.output, lookup)
    kept = None if force is not None else unchanged(cfg, entries, previous,
                                                     request(cfg, labels, prompts))  # fmt: skip
    done = None
    if kept is not None:
        n = len(entries)
        done = TagResult(cfg.output, n, 0, 0, n, kept, unchanged=True, unlisted=unlisted)
    else:
        check_shrink(cfg, entries, previous, cfg.allow_shrink)
    listing = Listing(entries, lookup, previous, listed if held else None, unlisted, done,
                      force, digests)  # fmt: skip
    if done is not None:
        listing.done(cfg)
    memory.release()  # what listing and comparing left: the model starts from what is held
    return listing


def _verify(cfg: TagConfig, entries: Files, emit) -> tuple[np.ndarray | None, tuple]:
    """Hash every file; the indices of those whose content differs from the recorded hash."""
    total = len(entries)
    emit(Progress("scan", 0, total, message="verifying content hashes"))
    digests = verify.hash_entries(
        entries, lambda n: emit(Progress("scan", n, total, message="verifying content hashes"))
    )
    moved = verify.changed(cfg.output, entries, digests)
    if moved:
        emit(Progress("note", message=f"--verify: {len(moved):,} files changed in content "
                      "although their size and mtime did not: tagging them again"))  # fmt: skip
    force = [i for i, e in enumerate(entries) if (e.root, e.rel) in moved]
    return (np.array(force, np.int64) if force else None), tuple(digests)


def make_feeder(cfg: TagConfig, encoder: Encoder, todo: Files, jpeg_decoder=None) -> Feeder:
    """Loader and feeder for the files to tag: workers, files per batch, where JPEGs decode."""
    from .inputs.feed import Feeder, choose_decoder
    from .inputs.loader import default_workers, files_per_batch, make_loader

    spec = decode_spec(cfg, encoder)
    device = encoder.device
    decoder, split, adapt = choose_decoder(cfg.decode.decoder, device, cfg.decode.exact,
                                           jpeg_decoder)  # fmt: skip
    workers = default_workers(device.type) if cfg.workers is None else cfg.workers
    loader = make_loader(todo, spec, files=files_per_batch(encoder.batch, spec, workers),
                         workers=workers, pin=device.type == "cuda", split=split,
                         timeout=cfg.decode.decode_timeout,
                         helper=cfg.workers is None)  # fmt: skip
    return Feeder(loader, spec, device, encoder.batch, decoder=decoder, split=split, adapt=adapt)


def write_rows(
    cfg: TagConfig,
    plan: Plan,
    encoder: Encoder,
    rows: Iterable[pa.RecordBatch],
    emit: Callable[[Progress], None],
    feeder: Feeder | None = None,
    tagger: Tagger | None = None,
) -> TagResult:
    """Stream an engine's output rows into the sink, then finish the output atomically.

    Whatever finished is flushed when anything goes wrong, so a rerun resumes; an interrupt
    becomes `Interrupted`, saying how many rows are saved.
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
            memory.trim()
    except (KeyboardInterrupt, Terminated) as exc:
        sink.close()
        raise _interrupted(exc, sink.saved + plan.resumed, cfg.output) from None
    except BaseException:
        sink.close()
        raise
    seconds = time.perf_counter() - started
    emit(Progress("finish", done, len(plan.todo), len(errors), "writing output"))
    memory.release()
    rescore = tagger.rescore if tagger is not None else None
    try:
        total = finish(cfg.output, plan, sink, rescore)
    except (KeyboardInterrupt, Terminated) as exc:
        raise _interrupted(exc, sink.saved + plan.resumed, cfg.output, finishing=True) from None
    if cfg.save_embeddings:
        refresh_index(cfg.output, emit)
    result = TagResult(
        cfg.output,
        total,
        done - len(errors),
        len(errors),
        total - done,
        [*plan.carried_errors, *errors],
        seconds,
        encoder.precision,
        encoder.batch,
        feeder.device_decoded if feeder else 0,
        feeder.control.split.share if feeder and feeder.control else None,
    )
    if plan.carried_rows and plan.rescore:
        result.retopped = total - done
    return result


def refresh_index(output: Path, emit: Callable[[Progress], None]) -> None:
    """Keep the output's search index in step, where `omni search` has built one: only the
    segments of files this run wrote are built. A failure costs the next search, not this run."""
    from .look import index

    try:
        built = index.refresh(output)
    except (OmniError, OSError) as exc:
        emit(Progress("note", message=f"search index not updated ({exc}): the next "
                      "`omni search` brings it in step"))  # fmt: skip
        return
    if built is not None:
        emit(Progress("note", message=f"search index kept in step: {built} of its segments "
                      "built"))  # fmt: skip


def _interrupted(
    exc: BaseException, saved: int, output: Path, *, finishing: bool = False
) -> Interrupted:
    what, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    if finishing:  # the rows are all in OUT.partial/; OUT is still the previous output
        saved_in = (
            f"; its {saved:,} row{'' if saved == 1 else 's'} are saved in {partial_dir(output)}"
            if saved
            else ""
        )
        return Interrupted(
            f"{what} while writing {output}, which is left as it was{saved_in}: rerun the "
            "same command to finish",
            code,
        )
    if not saved:
        return Interrupted(f"{what} before any row was finished; nothing was saved", code)
    return Interrupted(
        f"{what}: {saved:,} finished rows are saved in {partial_dir(output)}; "
        "rerun the same command to resume",
        code,
    )


def prepare(cfg: TagConfig) -> tuple[list[Label], list[tuple[str, ...]]]:
    """Check the labels, inputs and output before any work; returns (labels, prompts)."""
    labels = read_labels(cfg.labels_file)
    prompts = prompts_for(labels, cfg.template)
    hub.check(cfg.model.model, cfg.model.revision)
    check_inputs(cfg.inputs)
    check_writable(cfg.output)
    return labels, prompts


def load_model(
    cfg: TagConfig, prompts, emit: Callable[[Progress], None] | None = None
) -> tuple[Encoder, Classifier]:
    """The encoder and the label classifier (matrix and per-label baselines) on its device."""
    from .model import scoring
    from .model.labels import Classifier, cached_classifier, cached_content_free
    from .model.loading import load_encoder
    from .model.precision import explain

    encoder = load_encoder(cfg.model, exact=cfg.decode.exact)
    if emit is not None:
        encoder.on_backoff = lambda b: emit(Progress("note", message=f"out of memory: batch {b}"))
        why = explain(cfg.model.precision, encoder.precision, encoder.device)
        if why:
            emit(Progress("note", message=why))
    matrix, _ = cached_classifier(encoder.encode_texts, prompts, encoder.cache_key)
    size = encoder.preprocess.size  # scores: each label's baseline over content-free images
    blank, _ = cached_content_free(encoder.encode_images, size, encoder.cache_key)
    baseline = scoring.score_baseline(blank, matrix)  # (labels,)
    lift = scoring.tiled_lift(blank)
    return encoder, Classifier(matrix, baseline, lift).to(encoder.device)


def plan_run(
    cfg: TagConfig,
    listing: Listing,
    encoder: Encoder,
    classifier: Classifier,
    labels: list[Label],
    prompts,
    emit: Callable[[Progress], None],
) -> tuple[Plan, Tagger]:
    """The output schema, what is left to do (`plan.schema`, `plan.todo`) and the row builder."""
    from .output.rows import Tagger

    names = [lab.name for lab in labels]
    meta = run_metadata(cfg, encoder, labels=labels, prompts=prompts, classifier=classifier)
    out_schema = schema(len(labels), embeddings=cfg.save_embeddings, metadata=meta)
    plan = plan_work(
        cfg,
        listing.entries,
        listing.lookup,
        listing.survey,
        out_schema,
        held=listing.held,
        force=listing.force,
    )
    if plan.message:
        emit(Progress("note", message=plan.message))
    cut = long_labels(names, prompts, encoder.too_long)
    if cut:
        emit(Progress("note", message=f"prompts longer than the model's {encoder.text_length} "
                      f"tokens were cut to fit, for labels: {', '.join(cut)}"))  # fmt: skip
    tagger = Tagger(
        encoder, classifier, names, out_schema, top_k=cfg.top_k, threshold=cfg.threshold
    )
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
    cfg: TagConfig, encoder: Encoder, *, labels: list[Label], prompts, classifier=None
) -> dict:
    """Everything a reader needs to interpret the columns, stored in the file's schema."""
    from .model import scoring

    clip = encoder.logit_bias is None
    baseline = getattr(classifier, "baseline", None)
    return {
        "labels": [lab.name for lab in labels],
        "prompts": [list(p) for p in prompts],
        "template": cfg.template,
        "model": encoder.model_id,
        "revision": encoder.revision,
        "precision": encoder.precision,
        "runtime": encoder.runtime,
        "preprocess": "exact" if cfg.decode.exact else "draft",
        "tiles": cfg.decode.tiles,
        "tile_overlap": cfg.decode.tile_overlap,
        "tile_rule": "views: global, whole-image squares, tiles. Tiles whose embedding has "
        f"cosine < {scoring.TILE_ALIKE} with the image's typical tile (the mean of its largest "
        "group of tiles alike at that cosine) show objects; those whose 8-connected group spans "
        "fewer than ceil(2 / (1 - tile_overlap)) tiles along each axis are read, those of "
        f"them whose 1 - cosine is at least {scoring.GROUP_SHARE} x the largest of the object "
        "tiles next to them (3 x 3; larger "
        "groups are parts of something the whole-image views see); "
        "of the whole-image views, only those containing every larger group's extent along the "
        "long axis (tile middles, the global view as the centre square) when at least one does. "
        "Each label takes its largest similarity over the views read",
        "similarity": "cosine(image embedding, label embedding)",
        "probs": "softmax(logit_scale * similarity)"
        if clip
        else "sigmoid(logit_scale * similarity + logit_bias)",
        "scores": "sigmoid(logit_scale * (similarity - score_baseline)); score_baseline: each "
        "label's mean similarity to content-free images (greys, grey noise, grey ramps) plus "
        f"{scoring.SCORE_SPREAD:g} x the largest standard deviation of their embeddings along "
        "any direction (sqrt of their covariance's top eigenvalue); a tiled image (views > 1) "
        f"uses score_baseline + score_tiled_lift ({scoring.TILED_SPREAD:g} such deviations)",
        "score_baseline": baseline.float().cpu().tolist() if baseline is not None else None,
        "score_tiled_lift": getattr(classifier, "tiled_lift", 0.0),
        "logit_scale": encoder.logit_scale,
        "logit_bias": encoder.logit_bias,
        "top_k": cfg.top_k,
        "threshold": cfg.threshold,
        "top_labels": "labels with scores >= threshold, most similar first, at most top_k",
        "embedding": "float16, every view (global, squares, tiles): views x dim, flattened"
        if cfg.save_embeddings
        else None,
        "request": request(cfg, labels, prompts),
        "omni_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cwd": utf8_or_none(os.getcwd()),  # what relative roots are relative to (look.reader)
    }
