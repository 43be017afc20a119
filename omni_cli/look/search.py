"""Search: rank the images of an output by similarity to a text or an image, without re-encoding.

`omni tag --save-embeddings` stores every view's embedding (float16, views x dim, flattened) in
the `embedding` column. The first search decodes that column once into a memory-mapped index
beside the output (`index.py`: one segment per Parquet file, rebuilt only for files that
changed); later searches read only the index. A query is encoded by the model named in the
output's metadata (only the query: a text through the text encoder, or one image's global view
through the image encoder), and scored against every view, chunk by chunk, with float16 matrix
products (measured fastest here: `benchmarks/search_scale.py`). An image's score is the cosine
similarity of its best view, so with tiles a small object that one tile sees is found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import ModelConfig

if TYPE_CHECKING:  # torch is imported once a search runs, not to check its options
    import torch
from ..errors import ModelError, UsageError
from ..model.hub import check
from ..model.identity import is_identity
from .index import Index, Progress, open_index, scores
from .reader import Roots, open_output


@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity of the image's best view
    root: str  # as stored
    path: str
    view: int  # which view scored it: 0 the global view, then squares and tiles
    file: str = ""  # root/path on this machine (relative roots resolved: see reader.Roots)


@dataclass
class Found:
    """What `search` returns: the hits, notes for the user, and how the index stood."""

    hits: list[Hit]
    notes: list[str] = field(default_factory=list)
    index: Index | None = None


def load_index(source: Path, progress: Progress | None = None) -> Index:
    """The output's search index, in step with its files; UsageError naming the command that
    stores embeddings if it has none."""
    return open_index(open_output(source), progress)


def rank(index: Index, query: torch.Tensor, k: int) -> list[Hit]:
    """The k images whose best view is most similar to `query` (dim,), best first."""
    if query.shape[-1] != index.dim:
        raise UsageError(
            f"the query embedding has {query.shape[-1]} dimensions but the stored ones have "
            f"{index.dim}: search with the model that tagged the file (--model)"
        )
    q = query.detach().float().reshape(-1).cpu().numpy()
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    found = []  # (score, segment, image, view) of each segment's k best
    for n, segment in enumerate(index.segments):
        if not len(segment.starts):
            continue
        per_view = scores(segment, q)  # (views,)
        if len(per_view) == len(segment.starts):  # one view per image: no reduction
            per_image = per_view
        else:
            per_image = np.maximum.reduceat(per_view, segment.starts)  # best view of each image
        m = min(k, len(per_image))
        top = np.argpartition(-per_image, m - 1)[:m] if m < len(per_image) else np.arange(m)
        for row in top.tolist():
            start, count = int(segment.starts[row]), int(segment.counts[row])
            view = int(np.argmax(per_view[start : start + count]))
            found.append((float(per_image[row]), n, row, view))
    found.sort(key=lambda f: (-f[0], f[1], f[2]))  # best first, then file order
    hits = []
    for i, (score, n, row, view) in enumerate(found[:k], 1):
        keys = index.segments[n].keys
        root, path = keys["root"][row].as_py(), keys["path"][row].as_py()
        hits.append(Hit(i, score, root, path, view))
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
    progress: Progress | None = None,
) -> Found:
    """Bring the index in step, encode the query, rank: the library form of `omni search`."""
    if k < 1:
        raise UsageError("-k must be at least 1")
    if (text is None) == (image is None):
        raise UsageError("give a text query or --image, not both and not neither")
    if text is not None and not text.strip():
        raise UsageError("the query is empty")
    ModelConfig(device=device)  # a bad --device fails before any work
    output = open_output(source)
    index = open_index(output, progress)
    query, notes = encode_query(index.meta, text=text, image=image, model=model, device=device,
                                revision=revision)  # fmt: skip
    hits = rank(index, query, k)
    roots = Roots.of(output)
    for hit in hits:
        hit.file = str(roots.file(hit.root, hit.path))
    return Found(hits, notes + roots.missing_notes(), index)
