"""Rows: from a decoded batch, or from rows of a previous output, to output record batches.

`Tagger.rows` encodes a batch's views, scores them against the label classifier, combines the
views of tiled images and picks the top tags; files that failed to decode get `error` rows in
the same batch. `Tagger.rescore` gives rows carried over from a previous output the scores this
run would give them: from their stored embeddings when the labels changed, else from their
stored similarity and probabilities (so a new --top-k or --threshold applies to every row; the
per-label scores are recomputed from the similarity, so rows written before the `scores` column
existed get it too). The run's tiling (`tiles`, `tile_overlap`) is read from the schema's
metadata, the description of the run that the rows will carry.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from . import scoring, tiling
from .encoder import Encoder
from .labels import Classifier
from .loader import Batch
from .sink import META_KEY


class Tagger:
    def __init__(self, encoder: Encoder, classifier: Classifier, labels: list[str],
                 schema: pa.Schema, *, top_k: int, threshold: float | None):  # fmt: skip
        self.encoder, self.classifier, self.labels, self.schema = (
            encoder,
            classifier,
            labels,
            schema,
        )
        self.top_k, self.threshold = top_k, threshold
        self.embeddings = "embedding" in schema.names
        meta = json.loads((schema.metadata or {}).get(META_KEY, b"{}"))
        self.tiles, self.overlap = meta.get("tiles", "off"), meta.get("tile_overlap", 0.5)

    def score(
        self, emb: torch.Tensor, views: list[int], sizes: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        scores = self._scores(sim)
        return tuple(x.float().cpu().numpy() for x in (sim, probs, scores))

    def _scores(self, sim: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        return scoring.label_scores(sim, self.classifier.baseline, enc.logit_scale, enc.logit_bias)

    def rows(self, batch: Batch) -> pa.RecordBatch:
        n, n_labels = len(batch.entries), len(self.labels)
        sim = np.zeros((n, n_labels), np.float32)
        probs, scores = sim.copy(), sim.copy()
        emb = None
        if batch.ok:
            emb = self.encoder.encode_images(batch.pixels)  # (views, dim)
            sim[batch.ok], probs[batch.ok], scores[batch.ok] = self.score(
                emb, batch.views, batch.sizes
            )
        width, height, views = [None] * n, [None] * n, [None] * n
        for j, pos in enumerate(batch.ok):
            width[pos], height[pos] = batch.sizes[j]
            views[pos] = batch.views[j]
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
        }
        valid = np.zeros(n, bool)
        valid[batch.ok] = True
        if self.embeddings:
            columns["embedding"] = _per_image(emb, batch, n)
        return self._finish(columns, sim, probs, scores, valid)

    def rescore(self, rows: pa.RecordBatch, *, relabel: bool) -> pa.RecordBatch:
        """Carried `ok` rows in this run's schema, with this run's scores and top tags."""
        views = rows["views"].to_numpy().astype(int).tolist()
        if relabel:
            flat = np.concatenate(rows["embedding"].to_numpy(zero_copy_only=False))
            emb = torch.from_numpy(flat.astype(np.float32)).view(sum(views), -1)
            sizes = list(zip(rows["width"].to_pylist(), rows["height"].to_pylist(), strict=True))
            sim, probs, scores = self.score(emb.to(self.encoder.device), views, sizes)
        else:
            sim, probs = _matrix(rows["similarity"]), _matrix(rows["probs"])
            scores = self._scores(torch.from_numpy(sim)).float().cpu().numpy()
        names = ["root", "path", "status", "error", "bytes", "mtime_ns", "width", "height", "views"]
        columns = {name: rows[name] for name in names}
        if self.embeddings:
            columns["embedding"] = rows["embedding"]
        return self._finish(columns, sim, probs, scores, np.ones(rows.num_rows, bool))

    def _finish(self, columns: dict, sim, probs, scores, valid) -> pa.RecordBatch:
        """Add similarity, probs, scores and top tags, and order the columns as the schema does."""
        top_idx, top_scores = scoring.top_k(torch.from_numpy(scores), self.top_k, self.threshold)
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


def _fixed(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(rows, labels) float32 -> fixed_size_list<float32>[labels], null where not valid."""
    flat = pa.array(values.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(~valid))


def _matrix(column: pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[L] without nulls -> (rows, L) float32."""
    return column.flatten().to_numpy().reshape(len(column), -1).astype(np.float32)


def _per_image(emb: torch.Tensor | None, batch: Batch, n: int) -> list:
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
