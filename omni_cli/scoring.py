"""Scoring: from view embeddings to per-image similarities, probabilities and top tags.

Pure tensor functions, device-agnostic. Similarity is one matrix product against the label
classifier; the views of a tiled image are combined into one row by `combine_views`;
probabilities are a softmax over labels of logit_scale x similarity (CLIP) or a per-label
sigmoid with the model's bias (SigLIP).
"""

from __future__ import annotations

import torch

# The tiling rule (benchmarks/tiling.py): a tile is "sure" when its top probability reaches
# TILE_SURE; an object that makes at most SMALL_SHARE of the tiles sure is small.
TILE_SURE = 0.9
SMALL_SHARE = 0.1


def similarity(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(views, dim) x (dim, labels) -> (views, labels) cosine similarity."""
    return embeddings @ classifier


def probabilities(sim: torch.Tensor, logit_scale: float, logit_bias: float | None = None):
    """Softmax over labels (CLIP), or per-label sigmoid when the model has a logit bias."""
    logits = sim * logit_scale
    if logit_bias is not None:
        return torch.sigmoid(logits + logit_bias)
    return torch.softmax(logits, dim=-1)


def combine_views(
    sim: torch.Tensor,
    views: list[int],
    whole: list[int],
    logit_scale: float,
    logit_bias: float | None = None,
) -> torch.Tensor:
    """(total views, labels) -> (images, labels): each image's scores are those of one view.

    Per image, `views` counts its views and `whole` how many of them come first and see the
    whole image (the global view and the whole-image squares); the rest are tiles. A small
    object is seen clearly by a few tiles, a large one by many tiles, each of which sees only a
    part of it and is often confidently wrong about it. So: if between one tile and
    SMALL_SHARE of the tiles are sure (top probability >= TILE_SURE), the image takes the
    scores of its surest tile; otherwise those of its surest whole-image view. Untiled images
    pass through. No device synchronisation: the choice stays on the device.
    """
    if all(v == 1 for v in views):
        return sim
    rows, start = [], 0
    for count, n_whole in zip(views, whole, strict=True):
        group = sim[start : start + count]  # (count, labels)
        start += count
        if count == 1 or n_whole >= count:
            rows.append(group[0])
            continue
        sure = probabilities(group, logit_scale, logit_bias).max(dim=-1).values  # (count,)
        tiles = sure[n_whole:]
        n_sure = (tiles >= TILE_SURE).sum()
        small = (n_sure >= 1) & (n_sure <= max(1.0, SMALL_SHARE * len(tiles)))
        pick = torch.where(small, n_whole + tiles.argmax(), sure[:n_whole].argmax())
        rows.append(group[pick])
    return torch.stack(rows)


def top_k(
    probs: torch.Tensor, k: int, threshold: float | None = None
) -> tuple[list[list[int]], list[list[float]]]:
    """Per image, the indices and scores of the k most probable labels (at least `threshold`)."""
    k = min(k, probs.shape[-1])
    if k == 0 or len(probs) == 0:
        return [[] for _ in range(len(probs))], [[] for _ in range(len(probs))]
    scores, idx = torch.topk(probs, k, dim=-1)
    scores, idx = scores.cpu().tolist(), idx.cpu().tolist()
    if threshold is None:
        return idx, scores
    keep = [[j for j, s in enumerate(row) if s >= threshold] for row in scores]
    return (
        [[r[j] for j in kept] for r, kept in zip(idx, keep, strict=True)],
        [[r[j] for j in kept] for r, kept in zip(scores, keep, strict=True)],
    )
