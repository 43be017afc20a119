"""Tiling geometry: which views of a large image are encoded, and where they lie.

A tiled image is seen three ways, in this order: the global view (the model's own resize and
centre crop), the whole-image squares (squares of the short side spanning the long side, so
that a large object near an edge, which the centre crop cuts, is seen whole), and a grid of
R x C square tiles for small objects. The grid covers the whole image, neighbours overlapping by
at least the requested fraction of a tile. Its tile side is the smallest that covers the image
with that grid, but never more than the image's short side; where that cap binds, the count
along the long side grows until the tiles cover it again. `auto` aims at tiles of
`AUTO_TILE_FACTOR` times the model's input (560 px for a 224 px model: a shape 3% of a 4K
frame's width then fills a fifth of a tile, which the benchmark found the model needs) and tiles
nothing smaller than two such tiles. Pure arithmetic: no pixels, no PIL.
"""

from __future__ import annotations

import math

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels

# benchmarks/tiling.py: tiles of 720 px found 86% of 3-6%-wide shapes in 4K frames, 560 px 92%.
AUTO_TILE_FACTOR = 2.5


def parse(tiles: str) -> tuple[int, int] | None:
    """`off` -> None; `RxC` -> (R, C); `auto` is resolved per image by `grid_for`."""
    if tiles in ("off", "auto"):
        return None
    rows, cols = tiles.split("x")
    return int(rows), int(cols)


def tile_side(width: int, height: int, tiles: str, overlap: float, input_size: int) -> int | None:
    """The side of this image's tiles in pixels, or None when it gets no tiles."""
    shape = _shape(width, height, tiles, overlap, input_size)
    return shape[2] if shape else None


def grid_for(width: int, height: int, tiles: str, overlap: float, input_size: int) -> list[Box]:
    """The tile boxes for one image (row-major); empty when it gets no tiles."""
    shape = _shape(width, height, tiles, overlap, input_size)
    if not shape:
        return []
    rows, cols, s = shape
    xs, ys = _starts(width, s, cols), _starts(height, s, rows)
    return [(x, y, x + s, y + s) for y in ys for x in xs]


class Grid(tuple):
    """(rows, cols) of a tiled image's tiles, which also says where its tiles and whole-image
    views lie along the image's long axis (x when width >= height), in pixels, for the tiling
    rule (scoring.read_views): `centres` of the tiles by their index along that axis, `half`
    half the distance between neighbouring tiles' starts, `spans` (start, end) of the global
    view (taken as the centre square of the short side) and of each whole-image square."""

    across: bool
    centres: tuple[float, ...]
    half: float
    spans: tuple[tuple[float, float], ...]

    def __new__(cls, rows: int, cols: int, width: int, height: int, boxes: list[Box]) -> Grid:
        grid = super().__new__(cls, (rows, cols))
        grid.across = width >= height
        axis, length, short = (0, width, height) if grid.across else (1, height, width)
        starts = sorted({b[axis] for b in boxes})
        side = boxes[0][2] - boxes[0][0]
        grid.centres = tuple(x + side / 2 for x in starts)
        grid.half = (starts[1] - starts[0]) / 2 if len(starts) > 1 else side / 2
        squares = [(b[axis], b[axis + 2]) for b in whole_boxes(width, height)]
        grid.spans = (((length - short) / 2, (length + short) / 2), *squares)
        return grid


def grid_shape(width: int, height: int, tiles: str, overlap: float, input_size: int) -> Grid | None:
    """(rows, cols) of this image's tiles as `grid_for` lays them out (a `Grid`, which also
    says where they lie), or None when untiled."""
    boxes = grid_for(width, height, tiles, overlap, input_size)
    if not boxes:
        return None
    return Grid(len({b[1] for b in boxes}), len({b[0] for b in boxes}), width, height, boxes)


def whole_boxes(width: int, height: int, overlap: float = 0.3) -> list[Box]:
    """Squares of the short side spanning the long side; none for a near-square image."""
    short, long = min(width, height), max(width, height)
    if long <= 1.05 * short:
        return []
    starts = _starts(long, short, _count(long, short, overlap))
    if width >= height:
        return [(x, 0, x + short, short) for x in starts]
    return [(0, y, short, y + short) for y in starts]


def view_count(width: int, height: int, tiles: str, overlap: float, input_size: int) -> int:
    """Views encoded for one image: 1 untiled, else global + whole-image squares + tiles."""
    grid = grid_for(width, height, tiles, overlap, input_size)
    return whole_view_count(width, height) + len(grid) if grid else 1


def whole_view_count(width: int, height: int) -> int:
    """How many of a tiled image's views see the whole image: the global one and the squares."""
    return 1 + len(whole_boxes(width, height))


def _shape(width: int, height: int, tiles: str, overlap: float, input_size: int):
    if tiles == "off" or width < 1 or height < 1:
        return None
    if tiles == "auto":
        target = AUTO_TILE_FACTOR * input_size
        if max(width, height) < 2 * target or min(width, height) < target:
            return None
        rows, cols = _count(height, target, overlap), _count(width, target, overlap)
    else:
        rows, cols = parse(tiles)
    side = math.ceil(max(_cover(width, cols, overlap), _cover(height, rows, overlap)) - 1e-9)
    side = min(side, width, height)
    rows = 1 if side >= height else max(rows, _count(height, side, overlap))
    cols = 1 if side >= width else max(cols, _count(width, side, overlap))
    return rows, cols, side


def _cover(length: int, n: int, overlap: float) -> float:
    """Side of n tiles that span `length` with neighbours overlapping by `overlap` of a side."""
    return length / (n - overlap * (n - 1))


def _count(length: int, side: float, overlap: float) -> int:
    """Fewest tiles of `side` that span `length` with at least `overlap` between neighbours."""
    if side >= length:
        return 1
    step = side * (1 - overlap)
    return 1 + math.ceil((length - side) / step - 1e-9)


def _starts(length: int, side: int, n: int) -> list[int]:
    if n == 1:
        return [max(0, (length - side) // 2)]
    return sorted({round(i * (length - side) / (n - 1)) for i in range(n)})  # tiny images: dedupe
