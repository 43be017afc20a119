"""Rows: from fed views, or from rows of a previous output, to output record batches.

`Tagger.stream` encodes views in forwards of exactly the encoder's batch (a file's views may
span two forwards), scores every file whose views are all encoded, combines the views of tiled
images and picks the top tags; files that failed to decode get `error` rows. On CUDA nothing
waits for the device per image or per forward: scores travel back to pinned memory
asynchronously, and a group's rows are built while the device runs the next forward.
`Tagger.rescore` gives rows carried over from a previous output the scores this run would give
them: from their stored embeddings when the labels (or the scoring rule) changed, else from
their stored similarity (so a new --top-k or --threshold applies to every row, and rows written
before the `scores` column existed get it too). The run's tiling (`tiles`, `tile_overlap`) is
read from the schema's metadata, the description of the run that the rows will carry.

Error rows hold a list of nulls in `similarity`, `probs` and `scores` rather than a null list:
a null slot of a fixed-size list does not survive a Parquet round trip in pyarrow before 26
(apache/arrow#35692), and a list of nulls reads the same in every reader.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..inputs import tiling
from ..inputs.feed import Fed
from ..inputs.loader import Item
from ..model import scoring
from ..model.encoder import Encoder
from ..model.labels import Classifier
from .layout import schema_metadata


class _ViewQueue:
    """Files in order, their views not yet encoded, and embeddings of files not yet complete."""

    def __init__(self):
        self.items: deque[Item] = deque()
        self.views: deque[torch.Tensor] = deque()
        self.queued = 0  # views waiting in self.views
        self.embedded: list[torch.Tensor] = []
        self.done = 0  # embedded views of the files in self.items

    def push(self, fed: Fed) -> None:
        self.items.extend(fed.items)
        if len(fed.pixels):
            self.views.append(fed.pixels)
            self.queued += len(fed.pixels)

    def take(self, n: int) -> torch.Tensor:
        """The next `n` views (fewer at the end), splitting a tensor where needed."""
        parts, need = [], n
        while need and self.views:
            head = self.views.popleft()
            if len(head) > need:
                self.views.appendleft(head[need:])
                head = head[:need]
            parts.append(head)
            need -= len(head)
        self.queued -= n - need
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def add(self, embeddings: torch.Tensor) -> None:
        self.embedded.append(embeddings)
        self.done += len(embeddings)

    def complete(self) -> tuple[list[Item], torch.Tensor | None]:
        """The leading files whose views are all encoded, and their embeddings."""
        items, used = [], 0
        while self.items and used + self.items[0].views <= self.done:
            item = self.items.popleft()
            used += item.views
            items.append(item)
        if not used:
            return items, None
        emb = self.embedded[0] if len(self.embedded) == 1 else torch.cat(self.embedded)
        rest = emb[used:]
        self.embedded, self.done = ([rest] if len(rest) else []), len(rest)
        return items, emb[:used]


@dataclass
class _Scored:
    """A group's scores on their way to the host; `event` says when they have arrived."""

    items: list[Item]
    ok: list[int]  # positions in items that have views
    sim: torch.Tensor | None  # (ok, labels)
    probs: torch.Tensor | None
    scores: torch.Tensor | None
    emb: torch.Tensor | None  # (views, dim) float16, with --save-embeddings
    event: object = None


class Tagger:
    def __init__(self, encoder: Encoder, classifier: Classifier, labels: list[str],
                 schema: pa.Schema, *, top_k: int, threshold: float | None):  # fmt: skip
        self.encoder, self.classifier = encoder, classifier
        self.labels, self.schema = labels, schema
        self.top_k, self.threshold = top_k, threshold
        self.embeddings = "embedding" in schema.names
        self.times = {"encode": 0.0, "wait for device": 0.0, "build rows": 0.0}
        meta = schema_metadata(schema)
        self.tiles, self.overlap = meta.get("tiles", "off"), meta.get("tile_overlap", 0.5)

    def stream(self, groups: Iterable[Fed]) -> Iterator[pa.RecordBatch]:
        """Rows for every file of every group, in order, one record batch per scored group."""
        queue, pending = _ViewQueue(), deque()
        for fed in groups:
            queue.push(fed)
            while queue.queued >= self.encoder.batch:
                self._encode(queue)
                scored = self._score(*queue.complete())
                if scored.items:
                    pending.append(scored)
                while len(pending) > 1:  # the newest is still on the device: build the others
                    yield self._build(pending.popleft())
            if queue.items and queue.items[0].views == 0:  # leading error rows: no views to wait
                pending.append(self._score(*queue.complete()))
        while queue.queued:
            self._encode(queue)
        pending.append(self._score(*queue.complete()))
        for scored in pending:
            if scored.items:
                yield self._build(scored)

    def _encode(self, queue: _ViewQueue) -> None:
        started = time.perf_counter()
        queue.add(self.encoder.encode_images(queue.take(self.encoder.batch)))
        self.times["encode"] += time.perf_counter() - started

    def rows(self, fed: Fed) -> pa.RecordBatch:
        """One group's rows, as one record batch (for engines that bring their own batches)."""
        batches = list(self.stream([fed]))
        return batches[0] if len(batches) == 1 else _concat(batches, self.schema)

    def score(
        self, emb: torch.Tensor, views: list[int], sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total views, dim) embeddings -> (images, labels) similarity, probabilities, scores."""
        enc, size = self.encoder, self.encoder.preprocess.size
        whole, grids = [], []
        for v, (w, h) in zip(views, sizes, strict=True):
            whole.append(tiling.whole_view_count(w, h) if v > 1 else 1)
            grids.append(tiling.grid_shape(w, h, self.tiles, self.overlap, size) if v > 1 else None)
        sim_views = scoring.similarity(emb, self.classifier.matrix)  # (views, labels)
        distinct = scoring.tile_distinctness(emb, views, whole)  # (views,)
        sim = scoring.combine_views(sim_views, distinct, views, whole, grids, self.overlap)
        probs = scoring.probabilities(sim, enc.logit_scale, enc.logit_bias)
        return sim, probs, self._scores(sim, views)

    def _scores(self, sim: torch.Tensor, views: list[int]) -> torch.Tensor:
        enc, lift = self.encoder, self.classifier.tiled_lift
        tiled = torch.tensor([v > 1 for v in views], dtype=torch.float32) * lift  # (images,)
        return scoring.label_scores(sim, self.classifier.baseline, enc.logit_scale,
                                    enc.logit_bias, tiled)  # fmt: skip

    def _score(self, items: list[Item], emb: torch.Tensor | None) -> _Scored:
        """Launch a group's scoring on the device and the copy of its results to the host."""
        ok = [i for i, item in enumerate(items) if item.error is None]
        if emb is None or not ok:
            return _Scored(items, [], None, None, None, None)
        views = [items[i].views for i in ok]
        sizes = [(items[i].width, items[i].height) for i in ok]
        sim, probs, scores = self.score(emb, views, sizes)
        saved = emb.half() if self.embeddings else None
        scored = _Scored(items, ok, *(_to_host(t) for t in (sim, probs, scores, saved)))
        if emb.device.type == "cuda":
            scored.event = torch.cuda.Event()
            scored.event.record()
        return scored

    def _build(self, scored: _Scored) -> pa.RecordBatch:
        started = time.perf_counter()
        if scored.event is not None:
            scored.event.synchronize()
        arrived = time.perf_counter()
        self.times["wait for device"] += arrived - started
        batch = self._columns(scored)
        self.times["build rows"] += time.perf_counter() - arrived
        return batch

    def _columns(self, scored: _Scored) -> pa.RecordBatch:
        items, n = scored.items, len(scored.items)
        valid = np.zeros(n, bool)
        valid[scored.ok] = True
        sim = np.zeros((n, len(self.labels)), np.float32)
        probs, scores = np.zeros_like(sim), np.zeros_like(sim)
        if scored.ok:
            sim[scored.ok] = scored.sim.float().numpy()
            probs[scored.ok] = scored.probs.float().numpy()
            scores[scored.ok] = scored.scores.float().numpy()
        columns = {
            "root": [it.entry.root for it in items],
            "path": [it.entry.rel for it in items],
            "status": ["ok" if ok else "error" for ok in valid],
            "error": [it.error for it in items],
            "bytes": [it.entry.bytes for it in items],
            "mtime_ns": [it.entry.mtime_ns for it in items],
            "width": [it.width if ok else None for it, ok in zip(items, valid, strict=True)],
            "height": [it.height if ok else None for it, ok in zip(items, valid, strict=True)],
            "views": [it.views if ok else None for it, ok in zip(items, valid, strict=True)],
        }
        if self.embeddings:
            views = np.array([it.views if ok else 0 for it, ok in zip(items, valid, strict=True)])
            flat = scored.emb.numpy().reshape(-1) if scored.ok else np.empty(0, np.float16)
            columns["embedding"] = _lists(flat, views * self.classifier.matrix.shape[0], valid)
        return self._finish(columns, sim, probs, scores, valid)

    def rescore(self, rows: pa.RecordBatch, *, relabel: bool) -> pa.RecordBatch:
        """Carried rows in this run's schema, with this run's scores and top tags (error rows
        kept as they are, e.g. a file that crashed the decoder, get none)."""
        valid = pc.fill_null(pc.equal(rows["status"], "ok"), False)
        ok = valid.to_numpy(zero_copy_only=False)
        good = rows.filter(valid)
        sim = np.zeros((rows.num_rows, len(self.labels)), np.float32)
        probs, scores = sim.copy(), sim.copy()
        if good.num_rows and relabel:
            views = good["views"].to_numpy().astype(int).tolist()
            flat = good["embedding"].flatten().to_numpy().astype(np.float32)
            emb = torch.from_numpy(flat).view(sum(views), -1).to(self.encoder.device)
            sizes = list(zip(good["width"].to_pylist(), good["height"].to_pylist(), strict=True))
            scored = (t.float().cpu().numpy() for t in self.score(emb, views, sizes))
            sim[ok], probs[ok], scores[ok] = scored
        elif good.num_rows:
            sim[ok], probs[ok] = _matrix(good["similarity"]), _matrix(good["probs"])
            views = good["views"].to_numpy(zero_copy_only=False).astype(int).tolist()
            scores[ok] = self._scores(torch.from_numpy(sim[ok]), views).float().cpu().numpy()
        names = ["root", "path", "status", "error", "bytes", "mtime_ns", "width", "height", "views"]
        columns = {name: rows[name] for name in names}
        if self.embeddings:
            columns["embedding"] = rows["embedding"]
        return self._finish(columns, sim, probs, scores, ok)

    def _finish(self, columns: dict, sim, probs, scores, valid) -> pa.RecordBatch:
        """Add similarity, probs, scores and top tags, and order the columns as the schema does."""
        top_idx, top_scores = scoring.top_k(
            torch.from_numpy(scores), self.top_k, self.threshold, order=torch.from_numpy(sim)
        )
        columns["similarity"] = _fixed(sim, valid)
        columns["probs"] = _fixed(probs, valid)
        columns["scores"] = _fixed(scores, valid)
        columns["top_labels"] = [
            [self.labels[i] for i in idx] if ok else []
            for idx, ok in zip(top_idx, valid, strict=True)
        ]
        columns["top_scores"] = [s if ok else [] for s, ok in zip(top_scores, valid, strict=True)]
        arrays = []
        for field in self.schema:
            column = columns[field.name]
            arrays.append(column if isinstance(column, pa.Array) else pa.array(column, field.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A device tensor copied to pinned host memory without waiting; host tensors as they are."""
    if t is None or t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def _fixed(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(rows, labels) float32 -> fixed_size_list<float32>[labels]; invalid rows hold nulls."""
    width = values.shape[1]
    mask = np.repeat(~valid, width) if not valid.all() else None
    flat = pa.array(values.reshape(-1), type=pa.float32(), mask=mask)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _lists(flat: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> pa.Array:
    """Concatenated values and per-row lengths -> list<float16>, null where not valid."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    mask = pa.array(~valid) if not valid.all() else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float16()), mask=mask)


def _matrix(column: pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[L] without nulls -> (rows, L) float32."""
    return column.flatten().to_numpy().reshape(len(column), -1).astype(np.float32)


def _concat(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    table = pa.Table.from_batches(batches, schema=schema).combine_chunks()
    return table.to_batches()[0] if table.num_rows else schema.empty_table().to_batches()[0]
