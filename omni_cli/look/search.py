"""Search: rank the images of an output by similarity to a text or an image, without re-encoding.

`omni tag --save-embeddings` stores every view's embedding (float16, views x dim, flattened) in
the `embedding` column. `load_index` reads that column once, a batch of rows at a time, into one
(total views, dim) float16 matrix with no per-row Python, and notes which image each view
belongs to. A query is encoded by the model named in the file's metadata (only the query: a
text through the text encoder, or one image's global view through the image encoder), and
scored against every view with one float16 matrix-vector product (measured fastest here:
`benchmarks/search_scale.py`). An image's score is the cosine similarity of its best view, so
with tiles a small object that one tile sees is found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import ModelConfig

if TYPE_CHECKING:  # torch is imported once a search runs, not to check its options
    import torch
from ..errors import ModelError, UsageError
from ..model.hub import check
from ..model.identity import is_identity
from .report import open_output


@dataclass
class Index:
    """Every stored view embedding of one output, and which row each belongs to."""

    source: Path
    meta: dict
    roots: pa.Array  # (images,) string, rows that have embeddings
    paths: pa.Array
    matrix: torch.Tensor  # (views, dim) float16, L2-normalised (as stored)
    starts: np.ndarray  # (images,) first view of each image in `matrix`
    counts: np.ndarray  # (images,) views of each image

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.starts)


@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity of the image's best view
    root: str
    path: str
    view: int  # which view scored it: 0 the global view, then squares and tiles


def load_index(source: Path) -> Index:
    """Read the stored embeddings; UsageError naming the command that stores them if absent."""
    file, meta = open_output(source)
    if "embedding" not in file.schema_arrow.names:
        raise UsageError(
            f"{source} holds no embeddings: store them with `omni tag PATH... --labels FILE "
            f"-o {source} --save-embeddings` (this encodes every image once more)"
        )
    names = file.read(columns=["root", "path", "views"])  # small and fast
    upper = int(pc.sum(names["views"]).as_py() or 0)  # views of all rows: room enough
    matrix, counts, filled, dim = None, [], 0, 0
    # Row batch by row batch into one preallocated matrix: decoding Parquet float16 is slow
    # (~35M values/s here) and reading the column whole would need ~4x its size in memory.
    for batch in file.iter_batches(batch_size=65_536, columns=["views", "embedding"]):
        embedding = batch["embedding"]
        lengths = pc.list_value_length(embedding).fill_null(0).to_numpy(zero_copy_only=False)
        views = batch["views"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        has = lengths > 0
        if not dim and has.any():
            dim = int(lengths[has][0] // max(int(views[has][0]), 1))
            matrix = np.empty((upper, dim), np.float16)
        if has.any():
            if np.any(lengths[has] != views[has] * dim):
                raise UsageError(f"{source}: stored embeddings do not split into views of one size")
            values = pc.list_flatten(embedding).to_numpy(zero_copy_only=False)
            n = len(values) // dim
            matrix[filled : filled + n] = values.reshape(n, dim)
            filled += n
        counts.append(lengths // dim if dim else np.zeros(len(lengths), np.int64))
    if not dim:
        raise UsageError(f"{source} has an embedding column but no stored embedding in any row")
    counts = np.concatenate(counts)
    has = counts > 0
    keep = pa.array(np.flatnonzero(has))
    counts = counts[has]
    import torch

    return Index(
        source=Path(source),
        meta=meta,
        roots=names["root"].combine_chunks().take(keep),
        paths=names["path"].combine_chunks().take(keep),
        matrix=torch.from_numpy(matrix[:filled]),  # a view: no copy
        starts=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
        counts=counts,
    )


def rank(index: Index, query: torch.Tensor, k: int) -> list[Hit]:
    """The k images whose best view is most similar to `query` (dim,), best first."""
    if query.shape[-1] != index.dim:
        raise UsageError(
            f"the query embedding has {query.shape[-1]} dimensions but the stored ones have "
            f"{index.dim}: search with the model that tagged the file (--model)"
        )
    import torch

    q = torch.nn.functional.normalize(query.float().reshape(-1), dim=0)
    per_view = (index.matrix @ q.to(index.matrix.dtype)).float().numpy()  # (views,)
    if len(per_view) == len(index):  # one view per image: no reduction
        per_image = per_view
    else:
        per_image = np.maximum.reduceat(per_view, index.starts)  # best view of each image
    k = min(k, len(per_image))
    top = np.argpartition(-per_image, k - 1)[:k] if k < len(per_image) else np.arange(k)
    top = top[np.lexsort((top, -per_image[top]))]  # best first, then file order
    roots, paths = index.roots.take(pa.array(top)), index.paths.take(pa.array(top))
    hits = []
    for i, (row, root, path) in enumerate(
        zip(top.tolist(), roots.to_pylist(), paths.to_pylist(), strict=True), 1
    ):
        start, count = int(index.starts[row]), int(index.counts[row])
        view = int(np.argmax(per_view[start : start + count]))
        hits.append(Hit(i, float(per_image[row]), root, path, view))
    return hits


def query_model(meta: dict, model: str | None, device: str,
                revision: str | None = None) -> ModelConfig:  # fmt: skip
    """The model that made the embeddings (at its pinned revision), at the stored precision
    (fp32 on the CPU)."""
    from ..model.precision import resolve_device

    if model is None and revision is None:
        revision = (meta.get("request") or {}).get("model_revision")
    name = model or meta.get("model")
    if not name:
        raise UsageError("the file's metadata names no model; give one with --model")
    if model is None:  # the model that made the file is gone: not a usage mistake (exit 1)
        try:
            check(name, revision)
        except UsageError as exc:
            raise ModelError(f"{exc} (the model the file names); give one with --model") from None
    stored = meta.get("precision")
    where = resolve_device(device)
    if where.type == "cpu":
        precision = "fp32"  # one query: fp32 is cheap and needs no bf16 support
    else:
        precision = stored if stored in ("fp32", "fp16", "bf16") else "auto"
    return ModelConfig(model=name, device=device, precision=precision, batch=1, revision=revision)


def encode_query(meta: dict, *, text: str | None, image: Path | None, model: str | None = None,
                 device: str = "auto",
                 revision: str | None = None) -> tuple[torch.Tensor, list[str]]:  # fmt: skip
    """Encode a text or one image's global view; returns (dim,) float32 on the CPU and notes."""
    from ..errors import DecodeError
    from ..inputs.decode import load
    from ..model.loading import load_encoder

    if (text is None) == (image is None):
        raise UsageError("give a text query or --image, not both and not neither")
    if image is not None and not Path(image).is_file():
        raise UsageError(f"--image: no such file: {image}")
    cfg = query_model(meta, model, device, revision)
    enc = load_encoder(cfg, exact=meta.get("preprocess") == "exact")
    notes = []
    stored = meta.get("revision")  # the weights' identity (older outputs: a hub commit)
    if is_identity(stored) and enc.revision != stored:
        notes.append(
            f"model {enc.model_id} is {enc.revision}, the embeddings were made by {stored} "
            "(other weights or preprocessing): scores may be off"
        )
    if text is not None:
        return enc.encode_texts([text])[0].cpu(), notes
    try:
        decoded = load(str(image), enc.preprocess)  # tiles off: the global view only
    except DecodeError as exc:
        raise UsageError(f"--image {image}: {exc.reason}") from None
    import torch

    pixels = torch.from_numpy(decoded.pixels[:1])  # (1, 3, size, size) uint8
    return enc.encode_images(pixels)[0].cpu(), notes


def search(
    source: Path,
    *,
    text: str | None = None,
    image: Path | None = None,
    k: int = 20,
    model: str | None = None,
    device: str = "auto",
    revision: str | None = None,
) -> tuple[list[Hit], list[str]]:
    """Load the index, encode the query, rank: the library form of `omni search`."""
    if k < 1:
        raise UsageError("-k must be at least 1")
    if (text is None) == (image is None):
        raise UsageError("give a text query or --image, not both and not neither")
    if text is not None and not text.strip():
        raise UsageError("the query is empty")
    ModelConfig(device=device)  # a bad --device fails before any work
    index = load_index(source)
    query, notes = encode_query(index.meta, text=text, image=image, model=model, device=device,
                                revision=revision)  # fmt: skip
    return rank(index, query, k), notes
