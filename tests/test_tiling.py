"""Tiling geometry: square tiles that cover the whole image with the requested overlap."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from omni_cli.tiling import grid_for, tile_side


def check_cover(width, height, boxes, overlap):
    side = boxes[0][2] - boxes[0][0]
    assert side >= 1
    for left, top, right, bottom in boxes:
        assert right - left == bottom - top == side  # square
        assert left >= 0 and right <= width and top >= 0 and bottom <= height  # inside
    xs = sorted({b[0] for b in boxes})
    ys = sorted({b[1] for b in boxes})
    assert xs[0] == 0 and xs[-1] + side == width or (len(xs) == 1 and side <= width)
    assert ys[0] == 0 and ys[-1] + side == height or (len(ys) == 1 and side <= height)
    for starts, length in ((xs, width), (ys, height)):
        if len(starts) == 1:
            assert side >= length or (length - side) <= 1  # one tile must span the axis
        for a, b in zip(starts, starts[1:], strict=False):
            assert b - a <= side * (1 - overlap) + 1  # neighbours overlap by >= overlap (1 px)
    assert len(boxes) == len(xs) * len(ys)  # a full grid, no duplicates


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 12000),
    height=st.integers(1, 12000),
    rows=st.integers(1, 8),
    cols=st.integers(1, 8),
    overlap=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
)
def test_fixed_grids_cover_the_image(width, height, rows, cols, overlap):
    boxes = grid_for(width, height, f"{rows}x{cols}", overlap, 224)
    check_cover(width, height, boxes, overlap)
    side = boxes[0][2] - boxes[0][0]
    # Where the side is not capped and there is room for distinct starts, the grid is as asked.
    if side < min(width, height) and width - side >= cols and height - side >= rows:
        assert len({b[0] for b in boxes}) >= cols
        assert len({b[1] for b in boxes}) >= rows


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 20000), height=st.integers(1, 20000))
def test_auto_grid_covers_large_images_and_skips_small_ones(width, height):
    boxes = grid_for(width, height, "auto", 0.2, 224)
    if max(width, height) < 1440 or min(width, height) < 720:
        assert boxes == [] and tile_side(width, height, "auto", 0.2, 224) is None
    else:
        check_cover(width, height, boxes, 0.2)


def test_4k_auto_grid_and_strips():
    boxes = grid_for(3840, 2160, "auto", 0.2, 224)
    assert len(boxes) == 28 and boxes[0][2] - boxes[0][0] <= 720
    strip = grid_for(10000, 1000, "1x3", 0.2, 224)  # a panorama: tiles capped at the height
    assert {b[3] - b[1] for b in strip} == {1000} and len(strip) >= 12
    assert grid_for(3840, 2160, "off", 0.2, 224) == []
    assert len(grid_for(1, 1, "3x3", 0.2, 224)) == 1
