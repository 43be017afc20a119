"""Report: one self-contained HTML page to look at the results of `omni tag`.

The page opens from disk with no server and no network: thumbnails are small JPEGs inside the
page (data: URIs), charts are inline SVG made here, styles are inline, there is no JavaScript.
It shows the run's metadata and counts, per label a gallery of the images that score highest
and a histogram of that label's scores, the images that got no tag, the error rows with their
reasons, and which labels are given together (or, without a threshold, which are confused).

It scales with the output, not with memory: the needed columns are read file by file, row
group by row group, in record batches sized to the number of labels, and reduced with numpy
(running top-k per label, histogram bins, counts), so a million rows cost a few seconds and the
same memory as a thousand; only the images shown are opened, in threads, and each is drafted
down to a thumbnail. A file that is gone or unreadable gets a placeholder, never an error, and
the result says which input folders were not found and where they were looked for. Paths and
labels are user data: the jinja2 template escapes everything, and shows control characters as
escapes. An existing page is replaced only if omni wrote it (or with `force`).
"""

from __future__ import annotations

import base64
import io
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UsageError
from ..text import plural, printable
from .reader import Output, Roots, open_output

BATCH_ROWS = 65_536
BATCH_CELLS = 2_000_000  # rows x labels per batch: ~8 MB per float32 matrix, whatever the labels
MAX_REASONS = 1_000  # distinct error reasons counted; the others are lumped together
GENERATOR = '<meta name="generator" content="omni report">'  # how an omni page is recognised
MAX_THUMBNAILS = 2_400  # 100 labels x 24: the page stays under ~20 MB with real photos
MAX_ERROR_ROWS = 200
MAX_THUMB_PIXELS = 200_000_000  # as `tag --max-pixels`: a bigger file gets a placeholder
HIST_BINS = 40
PAIRS_MAX_LABELS = 40  # more would make an unreadable table

Progress = Callable[[int, int], None]  # (thumbnails done, thumbnails to make)


@dataclass(frozen=True)
class ReportConfig:
    """One `omni report` run."""

    source: Path  # an `omni tag` output
    output: Path = Path("report.html")
    per_label: int = 24
    labels: tuple[str, ...] | None = None  # None: every label in the file
    thumb_size: int = 160  # pixels, longest side
    workers: int | None = None  # threads making thumbnails (None: one per core, at most 8)
    force: bool = False  # overwrite `output` even if it is not an omni report

    def __post_init__(self) -> None:
        if not 1 <= self.per_label <= 1000:
            raise UsageError("--per-label must be between 1 and 1000")
        if not 32 <= self.thumb_size <= 512:
            raise UsageError("thumbnail size must be between 32 and 512 pixels")
        if self.labels is not None and not self.labels:
            raise UsageError("--labels names no label")


@dataclass
class ReportResult:
    output: Path
    rows: int
    thumbnails: int  # images shown
    missing: int  # of those, files not found (placeholders)
    bytes: int  # size of the page
    seconds: float
    unreadable: int = 0  # of those, files found that could not be read (placeholders)
    replaced: bool = False  # an earlier omni report was at `output`
    notes: list[str] = field(default_factory=list)


def build_report(cfg: ReportConfig, progress: Progress | None = None) -> ReportResult:
    """Read `cfg.source`, write the page to `cfg.output`, and say what it holds."""
    start = time.perf_counter()
    output = open_output(cfg.source)
    meta = output.meta
    replaced = _check_target(Path(cfg.output), cfg.force)
    all_labels = [str(label) for label in meta["labels"]]
    shown = _pick_labels(all_labels, cfg.labels)
    notes = []
    per_label = min(cfg.per_label, max(4, MAX_THUMBNAILS // max(1, len(shown))))
    if per_label < cfg.per_label:
        notes.append(
            f"{len(shown)} labels: showing {per_label} images per label to keep the page small "
            "(--labels picks fewer labels to see more of each)"
        )
    stats = _scan(output, all_labels, shown, per_label, _threshold(meta))
    files = _gallery_files(stats)
    roots = Roots.of(output)
    thumbs = _thumbnails(files, roots, cfg, progress)
    missing = sum(1 for f, t in thumbs.items() if t is None and not roots.file(*f).exists())
    notes += roots.missing_notes()
    context = _context(cfg, meta, all_labels, shown, stats, thumbs, notes)
    page = _render(context)
    _write_atomic(cfg.output, page)
    return ReportResult(
        output=cfg.output,
        rows=stats.rows,
        thumbnails=len(files),
        missing=missing,
        unreadable=sum(1 for t in thumbs.values() if t is None) - missing,
        bytes=len(page.encode("utf-8")),
        seconds=time.perf_counter() - start,
        replaced=replaced,
        notes=notes,
    )


def _threshold(meta: dict) -> float | None:
    """The run's threshold if it filters anything: with 0 every top-k label passes, as without."""
    value = meta.get("threshold")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _check_target(output: Path, force: bool) -> bool:
    """True if `output` holds an earlier omni report (replaced); UsageError if it holds
    something else, unless `force`."""
    if output.is_dir():
        raise UsageError(f"{output} is a folder; give the name of the page to write (-o)")
    if not output.exists():
        return False
    try:
        with open(output, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        head = ""
    if GENERATOR in head:
        return True
    if not force:
        raise UsageError(
            f"{output} exists and is not an omni report: not overwritten (another name with -o, "
            "or --force to overwrite it)"
        )
    return False


def _pick_labels(all_labels: list[str], wanted: tuple[str, ...] | None) -> list[int]:
    if wanted is None:
        return list(range(len(all_labels)))
    index = {label: i for i, label in enumerate(all_labels)}
    unknown = [w for w in wanted if w not in index]
    if unknown:
        raise UsageError(
            f"--labels: not in this file: {', '.join(unknown)} (it has: {', '.join(all_labels)})"
        )
    return list(dict.fromkeys(index[w] for w in wanted))


# ---------------------------------------------------------------------------------------------
# One pass over the file: running top-k per label, histograms, counts, errors.


class _Best:
    """The k rows with the highest key in each column, over a stream of (rows, columns) keys.

    Kept as two (k, columns) matrices and merged with whole-matrix sorts, so that a batch costs
    the same few numpy calls with 10 labels or 10,000.
    """

    def __init__(self, k: int, columns: int):
        self.k = k
        self.keys = np.full((0, columns), -np.inf, np.float32)  # (<= k, columns), best first
        self.rows = np.zeros((0, columns), np.int64)

    def add(self, keys: np.ndarray, first_row: int) -> None:
        """keys: (n, columns), -inf where a row does not count; rows are numbered from first_row."""
        n = len(keys)
        if n == 0:
            return
        k = min(self.k, n)
        if k < n:
            top = np.argpartition(-keys, k - 1, axis=0)[:k]  # (k, columns)
        else:
            top = np.broadcast_to(np.arange(n)[:, None], keys.shape)
        all_keys = np.concatenate([self.keys, np.take_along_axis(keys, top, axis=0)])
        all_rows = np.concatenate([self.rows, top.astype(np.int64) + first_row])
        order = np.argsort(all_rows, axis=0, kind="stable")  # file order, then ...
        all_keys = np.take_along_axis(all_keys, order, axis=0)
        all_rows = np.take_along_axis(all_rows, order, axis=0)
        order = np.argsort(-all_keys, axis=0, kind="stable")[: self.k]  # ... best first
        self.keys = np.take_along_axis(all_keys, order, axis=0)
        self.rows = np.take_along_axis(all_rows, order, axis=0)

    def column(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of column j, best first, only the rows that count."""
        keep = np.isfinite(self.keys[:, j])
        return self.keys[keep, j], self.rows[keep, j]

    def wanted(self) -> np.ndarray:
        """Every row in some column's best, once, in file order."""
        return np.unique(self.rows[np.isfinite(self.keys)])


@dataclass
class _Stats:
    score_column: str
    rows: int = 0
    ok: int = 0
    errors: int = 0
    untagged: int = 0
    histograms: np.ndarray | None = None  # (shown labels, HIST_BINS) counts
    tagged: np.ndarray | None = None  # (all labels,) rows with the label in top_labels
    threshold: float | None = None  # the run's: top_labels hold the labels that pass it
    together: np.ndarray | None = None  # (shown, shown) rows with both labels in top_labels
    close_calls: np.ndarray | None = None  # (shown, shown) rows by best and runner-up label
    best: _Best | None = None  # per shown label
    no_tag: _Best | None = None  # untagged rows, least sure first
    files: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (root, path)
    reasons: Counter = field(default_factory=Counter)
    error_rows: list[tuple[str, str, str]] = field(default_factory=list)


def _scan(
    output: Output, all_labels: list[str], shown: list[int], k: int, threshold: float | None
) -> _Stats:
    names = output.names
    score_column = "scores" if "scores" in names else "probs"
    columns = ["root", "path", "status", "error", score_column]
    has_top = "top_labels" in names
    if has_top:
        columns.append("top_labels")
    n_all, n_shown = len(all_labels), len(shown)
    stats = _Stats(score_column=score_column, threshold=threshold)
    stats.histograms = np.zeros((n_shown, HIST_BINS), np.int64)
    stats.tagged = np.zeros(n_all, np.int64)
    pairs = 2 <= n_shown <= PAIRS_MAX_LABELS
    together = pairs and threshold is not None and has_top
    if together:
        stats.together = np.zeros((n_shown, n_shown), np.int64)
    elif pairs:
        stats.close_calls = np.zeros((n_shown, n_shown), np.int64)
        position = np.full(n_all, -1)
        position[shown] = np.arange(n_shown)
    stats.best, stats.no_tag = _Best(k, n_shown), _Best(k, 1)
    label_set = pa.array(all_labels, pa.string())
    base = 0
    rows = max(1, min(BATCH_ROWS, BATCH_CELLS // max(1, n_all)))
    for batch in output.batches(columns, rows):
        n = batch.num_rows
        status = batch["status"]
        is_error = pc.equal(status, "error").fill_null(False)
        ok = pc.equal(status, "ok").fill_null(False).to_numpy(zero_copy_only=False)
        stats.rows += n
        stats.ok += int(ok.sum())
        _errors(stats, batch, is_error)
        scores = _matrix(batch[score_column], n_all)  # (n, all labels), NaN where null
        scores[~ok] = np.nan
        valid = ~np.isnan(scores)
        sub = scores[:, shown]
        stats.best.add(np.where(np.isnan(sub), -np.inf, sub).astype(np.float32), base)
        bins = np.clip((np.nan_to_num(sub, nan=0.0) * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
        flat = (bins + np.arange(n_shown) * HIST_BINS)[valid[:, shown]]
        stats.histograms += np.bincount(flat, minlength=n_shown * HIST_BINS).reshape(
            n_shown, HIST_BINS
        )
        if has_top:
            applied = _applied(batch["top_labels"], label_set, n, n_all)  # (n, all labels) bool
            count = applied.sum(axis=1)
            stats.tagged += applied.sum(axis=0)
            if together:
                a = applied[:, shown].astype(np.float32)
                stats.together += np.rint(a.T @ a).astype(np.int64)
            untagged = ok & (count == 0)
            stats.untagged += int(untagged.sum())
            top = np.where(valid, scores, -np.inf).max(axis=1, initial=-np.inf)
            least_sure = np.where(untagged, -np.nan_to_num(top, neginf=-1.0), -np.inf)
            stats.no_tag.add(least_sure[:, None].astype(np.float32), base)
        if stats.close_calls is not None and n_all >= 2:
            stats.close_calls += _close_calls(scores, position, n_shown)
        _remember(stats, batch, base)
        base += n
    return stats


def _close_calls(scores: np.ndarray, position: np.ndarray, n_shown: int) -> np.ndarray:
    """(shown, shown) counts of rows whose runner-up scored at least half their best."""
    filled = np.nan_to_num(scores, nan=-np.inf)
    two = np.argpartition(-filled, 1, axis=1)[:, :2]  # (rows, 2): the two best, either order
    pair = np.take_along_axis(filled, two, axis=1)
    swap = pair[:, 1] > pair[:, 0]
    best = np.where(swap, two[:, 1], two[:, 0])
    second = np.where(swap, two[:, 0], two[:, 1])
    high, low = pair.max(axis=1), pair.min(axis=1)
    close = np.isfinite(low) & (high > 0) & (low >= 0.5 * high)
    a, b = position[best[close]], position[second[close]]
    both = (a >= 0) & (b >= 0)
    flat = np.bincount(a[both] * n_shown + b[both], minlength=n_shown * n_shown)
    return flat.reshape(n_shown, n_shown)


def _errors(stats: _Stats, batch: pa.RecordBatch, is_error: pa.Array) -> None:
    errors = batch.filter(is_error)
    stats.errors += errors.num_rows
    if not errors.num_rows:
        return
    reasons = errors["error"].fill_null("(no reason given)")
    for item in pc.value_counts(reasons).to_pylist():
        reason = item["values"]
        if reason not in stats.reasons and len(stats.reasons) >= MAX_REASONS:
            reason = "(other reasons)"
        stats.reasons[reason] += item["counts"]
    room = MAX_ERROR_ROWS - len(stats.error_rows)
    if room > 0:
        head = errors.slice(0, room)
        stats.error_rows += zip(
            head["root"].to_pylist(),
            head["path"].to_pylist(),
            reasons.slice(0, room).to_pylist(),
            strict=True,
        )


def _matrix(column: pa.Array, width: int) -> np.ndarray:
    """fixed_size_list<float32>[L] -> (rows, L) float32 with NaN for null lists and null items."""
    n = len(column)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.values.slice(column.offset * width, n * width)
    out = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, width)
    if column.null_count:
        out[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out


def _applied(top_labels: pa.Array, label_set: pa.Array, n: int, n_all: int) -> np.ndarray:
    """list<string> top_labels -> (rows, labels) bool: which labels each row was given."""
    lengths = pc.list_value_length(top_labels).fill_null(0).to_numpy(zero_copy_only=False)
    which = pc.index_in(pc.list_flatten(top_labels), value_set=label_set)
    which = which.fill_null(-1).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(n), lengths)
    known = which >= 0
    out = np.zeros((n, n_all), bool)
    out[rows[known], which[known]] = True
    return out


def _remember(stats: _Stats, batch: pa.RecordBatch, base: int) -> None:
    """Keep root and path of the rows of this batch that entered a gallery; now and then forget
    those that left (so the dict stays near the size of the galleries)."""
    n = batch.num_rows
    wanted = np.concatenate([stats.best.wanted(), stats.no_tag.wanted()])
    new = np.unique(wanted[(wanted >= base) & (wanted < base + n)]) - base
    if len(new):
        taken = batch.select(["root", "path"]).take(pa.array(new, pa.int64()))
        pairs = zip(taken["root"].to_pylist(), taken["path"].to_pylist(), strict=True)
        for row, pair in zip(new.tolist(), pairs, strict=True):
            stats.files[base + row] = pair
    if len(stats.files) > 2 * len(wanted) + 4096:
        keep = set(wanted.tolist())
        stats.files = {row: f for row, f in stats.files.items() if row in keep}


# ---------------------------------------------------------------------------------------------
# Thumbnails: only the images shown are opened.


def _gallery_files(stats: _Stats) -> list[tuple[str, str]]:
    rows = np.union1d(stats.best.wanted(), stats.no_tag.wanted()).tolist()
    return list(dict.fromkeys(stats.files[r] for r in rows))


def _thumbnails(
    files: list[tuple[str, str]], roots: Roots, cfg: ReportConfig, progress: Progress | None
) -> dict[tuple[str, str], str | None]:
    """(root, path) -> a JPEG data URI, or None where the file is gone or unreadable."""
    workers = cfg.workers or min(8, os.cpu_count() or 1)
    out: dict[tuple[str, str], str | None] = {}
    if progress:
        progress(0, len(files))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        for f in files:
            roots.resolve(f[0])  # once per root, here: the threads only read
        jobs = pool.map(lambda f: thumbnail(roots.file(*f), cfg.thumb_size), files)
        for i, (f, uri) in enumerate(zip(files, jobs, strict=True), 1):
            out[f] = uri
            if progress:
                progress(i, len(files))
    return out


def thumbnail(file: Path | None, side: int) -> str | None:
    """A small JPEG of `file` as a data URI; None if it cannot be read, for whatever reason."""
    from PIL import Image, ImageOps

    from ..inputs.decode import open_to_look, to_rgb

    if file is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_to_look(file) as img:
                if img.width * img.height > MAX_THUMB_PIXELS:
                    return None
                if img.format in ("JPEG", "MPO", "HEIF"):
                    img.draft("RGB", (side, side))  # decode at 1/2..1/8 scale: far less work
                small = to_rgb(ImageOps.exif_transpose(img))
            small.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
            buffer = io.BytesIO()
            small.save(buffer, "JPEG", quality=70, optimize=True)
    except Exception:  # a missing, truncated or hostile file only costs its picture
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# The page.


def _context(cfg, meta, all_labels, shown, stats: _Stats, thumbs, notes) -> dict:
    def card(row: int, score: float) -> dict:
        root, path = stats.files[row]
        return {
            "root": root,
            "path": path,
            "full": str(Path(root) / path),
            "score": f"{score:.3f}",
            "value": float(score),
            "thumb": thumbs.get((root, path)),
        }

    sections = []
    for j, i in enumerate(shown):
        keys, rows = stats.best.column(j)
        count = int(stats.histograms[j].sum())
        sections.append(
            {
                "anchor": f"label-{i}",
                "label": all_labels[i],
                "tagged": int(stats.tagged[i]),
                "scored": count,
                "histogram": _histogram(stats.histograms[j]),
                "images": [card(r, s) for r, s in zip(rows, keys, strict=True)],
            }
        )
    least_sure, rows = stats.no_tag.column(0)
    no_tag = [card(int(r), -float(s)) for r, s in zip(rows, least_sure, strict=True)]
    tiles = meta.get("tiles", "off")
    if tiles not in (None, "off") and meta.get("tile_overlap") is not None:
        tiles = f"{tiles} (overlap {meta['tile_overlap']})"
    threshold, given = _threshold(meta), meta.get("threshold")
    if given is None:
        given = "none"
    elif threshold is None:
        given = f"{given} (every top-k label passes)"
    facts = [
        ("file", str(cfg.source)),
        ("model", f"{meta.get('model', '?')}" + _revision(meta.get("revision"))),
        ("precision", meta.get("precision", "?")),
        ("tiles", tiles or "off"),
        ("preprocessing", meta.get("preprocess", "?")),
        ("template", meta.get("template", "?")),
        ("top-k, threshold", f"{meta.get('top_k', '?')}, {given}"),
        ("tagged on", meta.get("created", "?")),
        ("omni", meta.get("omni_version", "?")),
        ("galleries ranked by", _score_meaning(stats.score_column, meta)),
    ]
    counts = [
        ("rows", stats.rows),
        ("tagged", stats.ok),
        ("errors", stats.errors),
        ("no tag", stats.untagged),
        ("labels", len(all_labels)),
    ]
    return {
        "title": f"omni report: {Path(cfg.source).name}",
        "facts": facts,
        "counts": [(name, f"{value:,}") for name, value in counts],
        "notes": notes,
        "sections": sections,
        "no_tag": no_tag,
        "untagged": stats.untagged,
        "threshold": threshold,
        "top_k": meta.get("top_k", "k"),
        "errors": stats.errors,
        "reasons": stats.reasons.most_common(50),
        "error_rows": [{"full": str(Path(r) / p), "reason": e} for r, p, e in stats.error_rows],
        "pairs": _pairs(stats, all_labels, shown),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _revision(revision) -> str:
    if not revision or revision in ("unknown", "random"):
        return ""
    shown = str(revision)
    return f" @ {shown[:19] if shown.startswith('sha256:') else shown[:12]}"  # weights or commit


def _score_meaning(column: str, meta: dict) -> str:
    how = meta.get(column)
    return f"{column}" + (f": {how}" if isinstance(how, str) else "")


def _histogram(counts: np.ndarray, width: int = 320, height: int = 72) -> dict:
    """Bars of an SVG histogram over [0, 1], heights on a log scale (most scores are near 0)."""
    top = math.log1p(int(counts.max())) if counts.max() else 1.0
    bar = width / len(counts)
    bars = []
    for b, count in enumerate(counts.tolist()):
        h = 0.0 if count == 0 else max(1.5, (height - 2) * math.log1p(count) / top)
        lo, hi = b / len(counts), (b + 1) / len(counts)
        bars.append(
            {
                "x": round(b * bar, 2),
                "y": round(height - h, 2),
                "w": round(bar - 1, 2),
                "h": round(h, 2),
                "title": f"{lo:.3f}-{hi:.3f}: {_count(count)}",
            }
        )
    return {"width": width, "height": height, "bars": bars}


def _pairs(stats: _Stats, all_labels: list[str], shown: list[int]) -> dict | None:
    """Label pairs as a table, or None when it would say nothing.

    With a threshold, top_labels hold the labels that apply: count images given both labels.
    Without one every image has exactly top-k labels, so instead count close calls: images
    whose runner-up label scored at least half their best (row: best, column: runner-up).
    """
    with_threshold = stats.together is not None  # else close calls, or nothing
    together = stats.together if with_threshold else stats.close_calls
    if together is None:
        return None
    off = together.copy()
    np.fill_diagonal(off, 0)
    if not off.any():
        return None
    peak = int(off.max())
    rows = []
    for a, i in enumerate(shown):
        cells = []
        for b, j in enumerate(shown):
            value = int(together[a, b])
            if a == b:
                title = f"{all_labels[i]}: {_count(value)}"
            elif with_threshold:
                title = f"{all_labels[i]} and {all_labels[j]}: {_count(value)}"
            else:
                title = f"best {all_labels[i]}, runner-up {all_labels[j]}: {_count(value)}"
            cells.append(
                {
                    "value": "" if a == b and not with_threshold else f"{value:,}",
                    "alpha": 0.0 if a == b or not value else round(0.1 + 0.9 * value / peak, 3),
                    "diagonal": a == b,
                    "title": title,
                }
            )
        rows.append({"label": all_labels[i], "cells": cells})
    return {
        "together": with_threshold,
        "labels": [all_labels[i] for i in shown],
        "rows": rows,
    }


def _render(context: dict) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("omni_cli.look", "templates"),
        autoescape=select_autoescape(["html", "j2"], default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["images"] = _count
    # Every value shown: control characters as escapes (markup, such as a macro's, is ours).
    env.finalize = lambda v: (
        printable(v) if isinstance(v, str) and not hasattr(v, "__html__") else v
    )
    return env.get_template("report.html.j2").render(**context)


def _count(n: int, one: str = "image", many: str = "images") -> str:
    return plural(n, one, many)


def _write_atomic(output: Path, text: str) -> None:
    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder does not exist: {folder}")
    tmp = output.with_name(output.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        from ..errors import OutputError

        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
