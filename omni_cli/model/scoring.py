"""Scoring: from view embeddings to per-image similarities, probabilities, scores and top tags.

Pure tensor functions, device-agnostic. Similarity is one matrix product against the label
classifier. Two readings of it per image: `probabilities`, a softmax over the labels of
logit_scale x similarity ("which one of these labels"; a per-label sigmoid with the model's
bias for SigLIP), and `label_scores` ("does this label apply"), where each label's score depends
on that label alone, so adding or removing a label never moves another label's score:

- The score is sigmoid(logit_scale x (similarity - baseline)), the baseline calibrated per model
  and label at load time, without labelled data: the label's mean similarity to a set of
  content-free images (greys, grey noise, grey ramps: `labels.content_free_pixels`) plus
  SCORE_SPREAD times the largest spread of those images' similarity along any direction. So a
  label applies where the image matches it clearly better than things with no content do, in
  units of how much such things already vary on this model: on a model that reads greys as half
  a shape the bar sits higher. The model's learned temperature gives the slope. SigLIP gets
  the same calibration: its own sigmoid (kept in `probs`) tagged fewer objects of multi-object
  canvases than a softmax. `top_k` lists the labels that pass in order of similarity, so the
  first tag is the label the image is most like (the argmax of `similarity`) whenever it
  passes.

The views of a tiled image (tiling.py: whole-image views, then a grid of tiles) are combined
label by label by `combine_views`, from the images alone, so that the choice never depends on
which labels are asked for. The image's typical tile is the mean of its largest group of alike
tiles: the background, when objects are small. Tiles like it are background; the others are
object tiles, and each 8-connected group of them holds one object or a few. A group that fits
in a tile (it spans fewer tiles along each axis than an object one tile wide can touch:
2/(1 - overlap)) is read: its tiles see its objects whole, but for those much less unlike the
background than an object tile next to them, which see a sliver at their edge. Tiles of a
larger group see only parts of something larger (a corner of a square looks like a triangle),
so they are not read, however sure they are. The same holds for the whole-image views (global
view and squares): a large group's extent along the long axis is known from its tiles, and a
whole-image view that cuts it is not read when another whole-image view sees all of it; the
image's reading is then that of the views that see its large object whole (with no large group,
or none that one view contains, every whole-image view is read). Each label then takes its best
similarity over the views read. All of it runs on the batch at once on the device.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

# Two tiles whose embeddings have at least this cosine show the same thing; a tile this close to
# its image's typical tile shows background. With the fixture model, background tiles of one
# image sit at 0.98-1.0 from each other, tiles that show a part of a shape below 0.9.
TILE_ALIKE = 0.9
# Of a small group, a tile is read when it is at least this share as unlike the background as
# the most unlike object tile next to it (3 x 3): one far below sees a sliver of that tile's
# object at its edge (the arc of a circle reads as a corner, a triangle). Next to it, not in
# the whole group, so that a group of two objects keeps both. Chosen on tiny-clip, -b, -c and
# tiny-siglip (stored embeddings of 4K sets like benchmarks/tiling.py's, 36 images each):
# small shapes' top-1 0.89/0.92/0.86/0.92 reading every tile of the group, 1.00/0.92/0.92/0.94
# at 0.6 and at 0.8, no set lower at 0.6; against the group's most unlike tile instead, 0.6
# cost tiny-clip-c's tiled 1080p scenes F1 0.58 -> 0.52 (benchmarks/scores.py).
GROUP_SHARE = 0.6
# A label's score is 0.5 this many times the content-free images' largest spread above its mean
# similarity to them (`score_baseline`). Chosen on tiny-clip, -b, -c and tiny-siglip with
# benchmarks/score_sweep.py: the best mean F1 among the bars whose untiled multi-object F1 beats
# the softmax reading on all four (0.4 and 0.5 do; at 0.6 tiny-clip-b's falls below it);
# reported on held-out tiny-clip-d, -e, -f and tiny-siglip-b in the README.
SCORE_SPREAD = 0.5
# ... and for a tiled image (more than one view read), whose similarity is the best over many
# views and so sits higher by chance: this many spreads. Chosen on the same four models
# (benchmarks/score_sweep.py: 1080p scenes with --tiles auto, mean F1 0.62 at 0.5, 0.68 at
# 0.75, 0.62 at 1.0); held out, 0.58 at 0.5 and 0.64 at 0.75.
TILED_SPREAD = 0.75


def similarity(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(views, dim) x (dim, labels) -> (views, labels) cosine similarity."""
    return embeddings @ classifier


def probabilities(sim: torch.Tensor, logit_scale: float, logit_bias: float | None = None):
    """Softmax over labels (CLIP), or per-label sigmoid when the model has a logit bias."""
    logits = sim * logit_scale
    if logit_bias is not None:
        return torch.sigmoid(logits + logit_bias)
    return torch.softmax(logits, dim=-1)


def score_baseline(blank: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(images, dim) content-free embeddings, (dim, labels) classifier -> (labels,) midpoints.

    Each label's mean similarity to the content-free images plus SCORE_SPREAD times the
    largest standard deviation those images' similarity can have along any direction (the
    square root of their covariance's top eigenvalue): one spread per model, whatever the
    labels, so it moves no label against another.
    """
    blank = blank.double().cpu()
    mean = (blank @ classifier.double().cpu()).mean(dim=0)
    return (mean + SCORE_SPREAD * content_spread(blank)).float()


def content_spread(blank: torch.Tensor) -> float:
    """The content-free embeddings' largest standard deviation along any direction."""
    blank = blank.double().cpu()
    centred = blank - blank.mean(dim=0)
    return float(torch.linalg.eigvalsh(centred.T @ centred / len(blank))[-1].clamp(min=0).sqrt())


def tiled_lift(blank: torch.Tensor) -> float:
    """How much higher a tiled image's bar sits than an untiled one's (`TILED_SPREAD`)."""
    return (TILED_SPREAD - SCORE_SPREAD) * content_spread(blank)


def label_scores(
    sim: torch.Tensor,
    baseline: torch.Tensor | None,
    logit_scale: float,
    logit_bias: float | None = None,
    lift: torch.Tensor | None = None,
) -> torch.Tensor:
    """(images, labels) similarity -> per-label scores in [0, 1], each from its label alone.

    sigmoid(logit_scale x (sim - baseline)), `baseline` (labels,) from `score_baseline`. Without
    a baseline (rows of a model whose baseline was never measured), a model with a logit bias
    (SigLIP) falls back to its own sigmoid.
    """
    if baseline is None:
        if logit_bias is not None:
            return torch.sigmoid(sim * logit_scale + logit_bias)
        raise ValueError("CLIP scores need the labels' content-free baseline")
    baseline = baseline.to(sim.device, sim.dtype)
    if lift is not None:  # (images,): tiled images' bar sits `tiled_lift` higher
        baseline = baseline + lift.to(sim.device, sim.dtype).view(-1, 1)
    return torch.sigmoid(logit_scale * (sim - baseline))


def tile_distinctness(emb: torch.Tensor, views: list[int], whole: list[int]) -> torch.Tensor:
    """(total views, dim) -> (total views,): how unlike its image's typical tile each tile is.

    1 - cosine with the typical tile: the mean of the largest group of alike tiles (those with
    cosine >= TILE_ALIKE with one tile, the first with most such), which is the background when
    objects are small. Whole-image views and untiled images get 0. All tiled images of the batch
    at once, padded to the most tiles; no device synchronisation.
    """
    out = torch.zeros(len(emb) + 1, device=emb.device, dtype=torch.float32)  # last: padding
    rows = [(s + w, c - w) for s, c, w in zip(_starts(views), views, whole, strict=True)
            if c > w + 1]  # fmt: skip
    if not rows:
        return out[:-1]
    width = max(n for _, n in rows)
    index = torch.full((len(rows), width), len(emb), dtype=torch.long)
    for i, (first, n) in enumerate(rows):
        index[i, :n] = torch.arange(first, first + n)
    index = index.to(emb.device, non_blocking=True)
    padded = torch.cat([emb.float(), emb.new_zeros(1, emb.shape[1], dtype=torch.float32)])
    tiles = padded[index]  # (images, tiles, dim); padding rows are zero, alike with nothing
    alike = (tiles @ tiles.transpose(1, 2) >= TILE_ALIKE).float()  # (images, tiles, tiles)
    best = alike.sum(dim=2).argmax(dim=1)  # (images,): the tile with most alike tiles
    group = alike.gather(1, best.view(-1, 1, 1).expand(-1, 1, width)).squeeze(1)
    typical = torch.nn.functional.normalize(torch.einsum("it,itd->id", group, tiles), dim=-1)
    distinct = 1 - torch.einsum("itd,id->it", tiles, typical)  # (images, tiles)
    out.index_put_((index.view(-1),), distinct.view(-1))  # padding lands on the last slot
    return out[:-1]


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
    `distinct` is `tile_distinctness`. Each label takes its largest similarity over the views
    `read_views` keeps. The whole batch at once on its device: no per-image synchronisation.
    """
    if all(v == 1 for v in views):
        return sim.float()
    read = read_views(distinct, views, whole, grids, overlap)  # (total views,)
    image = torch.repeat_interleave(torch.arange(len(views)), torch.tensor(views))
    image = image.to(sim.device, non_blocking=True).view(-1, 1).expand(-1, sim.shape[1])
    values = sim.float().masked_fill(~read.view(-1, 1), float("-inf"))
    out = torch.full((len(views), sim.shape[1]), float("-inf"), device=sim.device)
    return out.scatter_reduce(0, image, values, "amax")


def read_views(
    distinct: torch.Tensor,
    views: list[int],
    whole: list[int],
    grids: list[tuple[int, int] | None],
    overlap: float,
) -> torch.Tensor:
    """(total views,) bool: the views each image is read from.

    The object tiles (distinctness > 1 - TILE_ALIKE) whose 8-connected group of object tiles
    fits in one tile: it spans fewer than `reach` = ceil(2 / (1 - overlap)) tiles along each
    axis (an object one tile wide touches at most that many), and of these the tiles at least
    GROUP_SHARE as distinct as the most distinct object tile next to them. And the
    whole-image views that see every larger group whole (`_whole_seeing`); every whole-image
    view when none does or there is no larger group. A group's extent is found by passing each
    tile's bounding box of object tiles to its object neighbours until nothing changes, for
    all images at once.
    """
    device, total = distinct.device, sum(views)
    read = torch.zeros(total + 1, dtype=torch.bool)  # last: padding
    tiled = []
    for start, count, n_whole, grid in zip(_starts(views), views, whole, grids, strict=True):
        n_tiles = count - n_whole
        if grid is None or n_tiles < 1 or grid[0] * grid[1] != n_tiles:
            read[start : start + (count if count == 1 else n_whole)] = True
        else:
            tiled.append((start, n_whole, grid))
    read = read.to(device, non_blocking=True)
    if not tiled:
        return read[:-1]
    n_rows, n_cols = max(g[0] for *_, g in tiled), max(g[1] for *_, g in tiled)
    index = torch.full((len(tiled), n_rows, n_cols), total, dtype=torch.long)
    for i, (first, n_whole, (r, c)) in enumerate(tiled):
        index[i, :r, :c] = torch.arange(first + n_whole, first + n_whole + r * c).view(r, c)
    index = index.to(device, non_blocking=True)
    padded = torch.cat([distinct.float(), distinct.new_zeros(1, dtype=torch.float32)])
    distinct = padded[index]  # (images, rows, cols)
    obj = (distinct > 1 - TILE_ALIKE) & (index < total)
    reach = math.ceil(2 / (1 - overlap) - 1e-9)
    large = _large_groups(obj, reach, n_rows * n_cols)
    # the most distinct object tile around each (3 x 3): a tile far below it sees a sliver
    peak = torch.nn.functional.max_pool2d(distinct.masked_fill(~obj, 0).unsqueeze(1), 3, 1, 1)
    whole_seen = obj & ~large & (distinct >= GROUP_SHARE * peak.squeeze(1))
    read.index_put_((index.view(-1),), whole_seen.view(-1))
    seen, whole_index = _whole_seeing(large, tiled, overlap, total)
    read.index_put_((whole_index.view(-1),), seen.view(-1))
    read[-1] = False
    return read[:-1]


def _whole_seeing(
    large: torch.Tensor, tiled: list[tuple[int, int, tuple[int, int]]], overlap: float, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which whole-image views of each tiled image to read: ((images, most whole views) bool,
    the same shape of view indices, padding at `total`).

    Along the image's long axis, the large groups' extent is the span of their tiles' middles
    (each tile's centre +- half the distance between neighbouring tiles). A whole-image view
    that cuts it sees part of a large object, whose reading can look like another label (a
    corner of a square is a triangle), so it is read only when no whole-image view contains the
    extent. Where the views lie comes from the `tiling.Grid`; a plain (rows, cols) is taken as
    tiles `1 - overlap` of a side apart, the grid's own cover (`_approximate`). The global view
    is the centre square (CLIP's centre crop; a squashing processor sees more, so this only
    ever drops it where a square sees as much). All images at once; no device synchronisation.
    """
    device = large.device
    n, h, w = large.shape
    n_whole = max(count for _, count, _ in tiled)
    bounds = torch.zeros(n, n_whole, 2)  # (images, whole views, start/end) along the long axis
    bounds[..., 0], bounds[..., 1] = 1e18, -1e18  # padding contains nothing
    centres = torch.zeros(n, max(h, w))  # (images, tiles along the long axis)
    half = torch.zeros(n)
    index = torch.full((n, n_whole), total, dtype=torch.long)
    across = torch.zeros(n, dtype=torch.bool)  # the long axis is the columns
    for i, (first, count, grid) in enumerate(tiled):
        geometry = _approximate(grid, overlap, count) if not hasattr(grid, "spans") else grid
        across[i] = geometry.across
        centres[i, : len(geometry.centres)] = torch.tensor(geometry.centres)
        half[i] = geometry.half
        bounds[i, :count] = torch.tensor(geometry.spans[:count])
        index[i, :count] = torch.arange(first, first + count)
    bounds, index, centres, half, across = (
        t.to(device, non_blocking=True) for t in (bounds, index, centres, half, across)
    )
    along = torch.where(
        across.view(-1, 1, 1),
        torch.arange(w, device=device).view(1, 1, w).expand(n, h, w),
        torch.arange(h, device=device).view(1, h, 1).expand(n, h, w),
    )  # (images, rows, cols): each tile's index along the long axis
    pos, mask = centres.gather(1, along.reshape(n, -1)), large.view(n, -1)
    lo = pos.masked_fill(~mask, float("inf")).min(dim=1).values - half  # (images,)
    hi = pos.masked_fill(~mask, float("-inf")).max(dim=1).values + half
    slack = 1e-3 * half.view(-1, 1)
    inside = (bounds[..., 0] <= lo.view(-1, 1) + slack) & (hi.view(-1, 1) <= bounds[..., 1] + slack)
    seen = inside | ~inside.any(dim=1, keepdim=True)  # none sees it whole, or no large group
    return seen & (index < total), index


def _approximate(grid: tuple[int, int], overlap: float, n_whole: int) -> SimpleNamespace:
    """A plain (rows, cols) grid's geometry in tile sides: tiles 1 - overlap apart, so the long
    side is (n - 1)(1 - overlap) + 1 and the short side likewise; squares evenly spread."""
    rows, cols = grid
    step = 1 - overlap
    n, m = (cols, rows) if cols >= rows else (rows, cols)
    length, short = (n - 1) * step + 1, (m - 1) * step + 1
    squares = n_whole - 1
    starts = [j * (length - short) / max(squares - 1, 1) for j in range(squares)]
    if squares == 1:
        starts = [(length - short) / 2]
    spans = [((length - short) / 2, (length + short) / 2)] + [(a, a + short) for a in starts]
    return SimpleNamespace(
        across=cols >= rows,
        centres=[i * step + 0.5 for i in range(n)],
        half=step / 2,
        spans=spans,
    )


def _large_groups(obj: torch.Tensor, reach: int, steps: int) -> torch.Tensor:
    """(images, rows, cols) object mask -> True where the tile's 8-connected group of object
    tiles spans `reach` or more tiles along an axis.

    Each object tile starts with its own (row, col) as a bounding box and takes the union with
    its object neighbours' boxes; after as many rounds as the longest path in a group, every
    tile holds its group's box. Rounds run in blocks of 8 between checks, so the device is
    waited on once per block, not per image.
    """
    n, h, w = obj.shape
    ys = torch.arange(h, device=obj.device).view(1, h, 1).expand(n, h, w).float()
    xs = torch.arange(w, device=obj.device).view(1, 1, w).expand(n, h, w).float()
    big = float(h + w + 1)
    # channels: -ymin, ymax, -xmin, xmax, each maximised; non-object tiles hold -big (neutral)
    box = torch.stack([-ys, ys, -xs, xs], dim=1).masked_fill(~obj.unsqueeze(1), -big)
    keep = obj.unsqueeze(1)
    for step in range(steps):
        grown = torch.nn.functional.max_pool2d(box, 3, stride=1, padding=1)
        grown = torch.where(keep, torch.maximum(box, grown), box)
        if step % 8 == 7 and torch.equal(grown, box):
            break
        box = grown
    return obj & ((box[:, 0] + box[:, 1] >= reach) | (box[:, 2] + box[:, 3] >= reach))


def _starts(views: list[int]) -> list[int]:
    """Each image's first view in the concatenated views."""
    starts, at = [], 0
    for v in views:
        starts.append(at)
        at += v
    return starts


def top_k(
    scores: torch.Tensor,
    k: int,
    threshold: float | None = None,
    order: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Per image, the indices and scores of the k best labels (only those >= `threshold`).

    "Best" is by `order` (the similarity) when given, else by score.
    """
    k = min(k, scores.shape[-1])
    if k == 0 or len(scores) == 0:
        return [[] for _ in range(len(scores))], [[] for _ in range(len(scores))]
    rank = scores if order is None else order.to(scores.dtype)
    if threshold is not None:
        rank = rank.masked_fill(scores < threshold, float("-inf"))
    _, idx = torch.topk(rank, k, dim=-1)
    values = scores.gather(-1, idx).cpu().tolist()
    idx = idx.cpu().tolist()
    if threshold is None:
        return idx, values
    keep = [[j for j, s in enumerate(row) if s >= threshold] for row in values]
    return (
        [[r[j] for j in kept] for r, kept in zip(idx, keep, strict=True)],
        [[r[j] for j in kept] for r, kept in zip(values, keep, strict=True)],
    )
