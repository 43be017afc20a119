"""Scoring: from view embeddings to per-image similarities, probabilities and top tags.

Pure tensor functions, device-agnostic. Similarity is one matrix product against the label
classifier; the views of a tiled image are combined into one row by `combine_views`;
probabilities are a softmax over labels of logit_scale x similarity (CLIP) or a per-label
sigmoid with the model's bias (SigLIP).
"""

from __future__ import annotations

import torch

# A tiled image's global view wins when its own softmax is at least this sure of its top label.
GLOBAL_CONFIDENCE = 0.5


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
    sim: torch.Tensor, views: list[int], logit_scale: float, logit_bias: float | None = None
) -> torch.Tensor:
    """(total views, labels) -> (images, labels); the first view of each image is the global one.

    Untiled images pass through. For a tiled image: if the global view is confident (its top
    probability >= GLOBAL_CONFIDENCE) its similarities stand, since tiles that cut through a
    large object are confidently wrong; otherwise each label takes its maximum over all views,
    so a small object seen clearly by one tile is found.
    """
    if all(v == 1 for v in views):
        return sim
    rows, start = [], 0
    for count in views:
        group = sim[start : start + count]  # (count, labels)
        start += count
        if count == 1:
            rows.append(group[0])
            continue
        confident = probabilities(group[:1], logit_scale, logit_bias).max() >= GLOBAL_CONFIDENCE
        rows.append(group[0] if confident else group.max(dim=0).values)
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
