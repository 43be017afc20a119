"""Scoring: from view embeddings to per-image similarities, probabilities, scores and top tags.

Pure tensor functions, device-agnostic. Similarity is one matrix product against the label
classifier. Two readings of it per image: `probabilities`, a softmax over the labels of
logit_scale x similarity ("which one of these labels"; a per-label sigmoid with the model's
bias for SigLIP), and `label_scores` ("does this label apply"), where each label's score depends
on that label alone, so adding or removing a label never moves another label's score:

- CLIP: the evidence the image gives for the label over a content-free image (flat greys,
  `labels.neutral_pixels`), in the model's own units: logit_scale x (similarity - baseline) is
  the log-odds by which the model, as trained contrastively, prefers the image to a blank one
  for that label's prompts. The score is sigmoid(that - SCORE_GAIN): 0.5 where the image is
  e^10 (about 22,000) times likelier than a blank image. Using the model's learned temperature
  makes one threshold mean the same on models whose cosines live on other scales (a hub CLIP's
  matches sit near 0.3, a tiny test model's near 0.9); the label's own baseline makes labels
  whose prompts sit closer to everything comparable with the others.
- SigLIP (a learned logit bias): the model's own sigmoid(logit_scale x similarity + bias).

The views of a tiled image (tiling.py: whole-image views, then a grid of tiles) are combined
label by label by `combine_views`, from the images alone, so that the choice never depends on
which labels are asked for. The image's typical tile is the mean of its largest group of alike
tiles: the background, when objects are small. Tiles like it are background; the others are
object tiles, and each 8-connected group of them holds one object or a few. A group
that fits in a tile (it spans no more tiles along either axis than an object one tile wide
can touch: 2 / (1 - overlap)) is read from its most distinctive tiles, those least like the
background, which see its objects whole; a tile next to a more distinctive one that is read
sees part of the same object and is skipped (non-maximum suppression), since a part is often
confidently something else. Larger objects are read from the whole-image views: tiles see only
parts of them (a corner of a square looks like a triangle); so are those of an image without
object tiles, and of a busy one, whose unlike tiles form one large group. Each label then takes
its best similarity over the views read.
"""

from __future__ import annotations

import math

import torch

# Two tiles whose embeddings have at least this cosine show the same thing; a tile this close to
# its image's typical tile shows background. With the fixture model, background tiles of one
# image sit at 0.98-1.0 from each other, tiles that show a part of a shape below 0.9.
TILE_ALIKE = 0.9
# Log-odds over a blank image at which a CLIP label's score is 0.5 (benchmarks/scores.py: the
# F1 of top_labels on two-object canvases peaked at 10 on the fixture model, and at 10 too on
# tiny-clip-b, trained independently and never used to choose it).
SCORE_GAIN = 10.0


def similarity(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(views, dim) x (dim, labels) -> (views, labels) cosine similarity."""
    return embeddings @ classifier


def probabilities(sim: torch.Tensor, logit_scale: float, logit_bias: float | None = None):
    """Softmax over labels (CLIP), or per-label sigmoid when the model has a logit bias."""
    logits = sim * logit_scale
    if logit_bias is not None:
        return torch.sigmoid(logits + logit_bias)
    return torch.softmax(logits, dim=-1)


def label_scores(
    sim: torch.Tensor,
    baseline: torch.Tensor | None,
    logit_scale: float,
    logit_bias: float | None = None,
) -> torch.Tensor:
    """(images, labels) similarity -> per-label scores in [0, 1], each from its label alone.

    `baseline` (labels,) is each label's similarity to a content-free image (CLIP); models with
    a logit bias (SigLIP) use their own sigmoid and need none.
    """
    if logit_bias is not None:
        return torch.sigmoid(sim * logit_scale + logit_bias)
    if baseline is None:
        raise ValueError("CLIP scores need the labels' content-free baseline")
    baseline = baseline.to(sim.device, sim.dtype)
    return torch.sigmoid(logit_scale * (sim - baseline) - SCORE_GAIN)


def tile_distinctness(emb: torch.Tensor, views: list[int], whole: list[int]) -> torch.Tensor:
    """(total views, dim) -> (total views,): how unlike its image's typical tile each tile is.

    1 - cosine with the typical tile: the mean of the largest group of alike tiles (those with
    cosine >= TILE_ALIKE with one tile, the one with most such), which is the background when
    objects are small. Whole-image views and untiled images get 0. No device synchronisation.
    """
    out = torch.zeros(len(emb), device=emb.device, dtype=torch.float32)
    start = 0
    for count, n_whole in zip(views, whole, strict=True):
        if count > n_whole + 1:
            tiles = emb[start + n_whole : start + count].float()  # (tiles, dim)
            alike = (tiles @ tiles.T >= TILE_ALIKE).float()  # (tiles, tiles)
            group = alike[alike.sum(dim=1).argmax()]  # (tiles,): the largest group of alike tiles
            typical = torch.nn.functional.normalize(group @ tiles, dim=0)
            out[start + n_whole : start + count] = 1 - tiles @ typical
        start += count
    return out


def combine_views(
    sim: torch.Tensor,
    distinct: torch.Tensor,
    views: list[int],
    whole: list[int],
    grids: list[tuple[int, int] | None],
    overlap: float,
) -> torch.Tensor:
    """(total views, labels) -> (images, labels) by the tiling rule of the module docstring.

    Per image, `views` counts its views, `whole` how many of them come first and see the whole
    image, and `grids` gives its tiles' (rows, cols), row-major, or None when untiled;
    `distinct` is `tile_distinctness`. Untiled batches stay on the device; a batch with tiled
    images is moved to the CPU once (a few numbers per view) to find the objects.
    """
    if all(v == 1 for v in views):
        return sim
    sim, distinct = sim.float().cpu(), distinct.float().cpu().tolist()
    reach = math.ceil(2 / (1 - overlap) - 1e-9)
    rows, start = [], 0
    for count, n_whole, grid in zip(views, whole, grids, strict=True):
        group, dist = sim[start : start + count], distinct[start + n_whole : start + count]
        start += count
        n_tiles = count - n_whole
        if grid is None or n_tiles < 1 or grid[0] * grid[1] != n_tiles:
            rows.append(group[0] if count == 1 else group[:n_whole].max(dim=0).values)
            continue
        picks, read_whole = object_tiles(dist, grid, reach)
        read = (list(range(n_whole)) if read_whole else []) + [n_whole + i for i in picks]
        rows.append(group[read].max(dim=0).values)
    return torch.stack(rows)


def object_tiles(dist: list[float], grid: tuple[int, int], reach: int) -> tuple[list[int], bool]:
    """Which tiles to read for one image, and whether to read its whole-image views too.

    In each object group that fits in a tile, its most distinctive tiles by non-maximum
    suppression: the most distinctive first, then each next one that does not touch (overlap)
    a tile already read, as a neighbour of a more distinctive tile sees part of the same
    object. Two objects in one group each keep a tile. The whole-image views are read when
    there is no object tile or a group spans more than `reach` tiles along an axis (a large
    object, or a busy image where most tiles are unlike each other).
    """
    n_cols = grid[1]
    picks, large = [], False
    for cells in _objects(dist, grid):
        ys, xs = [c // n_cols for c in cells], [c % n_cols for c in cells]
        if max(ys) - min(ys) >= reach or max(xs) - min(xs) >= reach:
            large = True
            continue
        read: list[int] = []
        for c in sorted(cells, key=lambda c: -dist[c]):
            y, x = divmod(c, n_cols)
            if all(abs(r // n_cols - y) > 1 or abs(r % n_cols - x) > 1 for r in read):
                read.append(c)
        picks += read
    return picks, large or not picks


def _objects(dist: list[float], grid: tuple[int, int]):
    """8-connected groups of object tiles (tiles unlike the typical one), as tile indices."""
    n_rows, n_cols = grid
    is_object = [d > 1 - TILE_ALIKE for d in dist]
    seen = [False] * len(is_object)
    for first, obj in enumerate(is_object):
        if not obj or seen[first]:
            continue
        seen[first], stack, cells = True, [first], []
        while stack:
            cell = stack.pop()
            cells.append(cell)
            y, x = divmod(cell, n_cols)
            for ny in range(max(0, y - 1), min(n_rows, y + 2)):
                for nx in range(max(0, x - 1), min(n_cols, x + 2)):
                    near = ny * n_cols + nx
                    if is_object[near] and not seen[near]:
                        seen[near] = True
                        stack.append(near)
        yield cells


def top_k(
    scores: torch.Tensor, k: int, threshold: float | None = None
) -> tuple[list[list[int]], list[list[float]]]:
    """Per image, the indices and scores of the k best labels (only those >= `threshold`)."""
    k = min(k, scores.shape[-1])
    if k == 0 or len(scores) == 0:
        return [[] for _ in range(len(scores))], [[] for _ in range(len(scores))]
    values, idx = torch.topk(scores, k, dim=-1)
    values, idx = values.cpu().tolist(), idx.cpu().tolist()
    if threshold is None:
        return idx, values
    keep = [[j for j, s in enumerate(row) if s >= threshold] for row in values]
    return (
        [[r[j] for j in kept] for r, kept in zip(idx, keep, strict=True)],
        [[r[j] for j in kept] for r, kept in zip(values, keep, strict=True)],
    )
