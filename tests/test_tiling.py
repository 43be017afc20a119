"""Tiling geometry: square tiles that cover the whole image with the requested overlap."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from omni_cli.inputs.tiling import grid_for, tile_side, whole_boxes


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
    if max(width, height) < 1120 or min(width, height) < 560:
        assert boxes == [] and tile_side(width, height, "auto", 0.2, 224) is None
    else:
        check_cover(width, height, boxes, 0.2)


def test_4k_auto_grid_and_strips():
    boxes = grid_for(3840, 2160, "auto", 0.3, 224)
    assert len(boxes) == 60 and boxes[0][2] - boxes[0][0] == 527  # 6 x 10 tiles, <= 560 px
    assert whole_boxes(3840, 2160) == [(0, 0, 2160, 2160), (840, 0, 3000, 2160),
                                       (1680, 0, 3840, 2160)]  # fmt: skip
    assert whole_boxes(1000, 1020) == []
    assert [b[1] for b in whole_boxes(1000, 3000)] == [0, 667, 1333, 2000]
    strip = grid_for(10000, 1000, "1x3", 0.2, 224)  # a panorama: tiles capped at the height
    assert {b[3] - b[1] for b in strip} == {1000} and len(strip) >= 12
    assert grid_for(3840, 2160, "off", 0.2, 224) == []
    assert len(grid_for(1, 1, "3x3", 0.2, 224)) == 1


def test_small_corner_shape_is_found_with_tiles_and_missed_without(tmp_path, labels_file):
    import numpy as np
    import pyarrow.parquet as pq

    from omni_cli.config import DecodeConfig, ModelConfig, TagConfig
    from omni_cli.pipeline import tag
    from omni_cli.tools import synthetic

    from .conftest import LABELS, MODEL

    folder = tmp_path / "4k"
    folder.mkdir()
    rng = np.random.default_rng(3)
    small = synthetic.draw("red circle", (3840, 2160), rng=rng, shape_frac=0.05,
                           center=(0.06, 0.9), background="textured")  # fmt: skip
    small.save(folder / "corner.jpg", quality=90)
    big = synthetic.draw("blue square", (3840, 2160), rng=rng, shape_frac=0.3,
                         center=(0.5, 0.5), background="textured")  # fmt: skip
    big.save(folder / "big.jpg", quality=90)
    frame = synthetic.draw("green triangle", (3840, 2160), rng=rng, shape_frac=0.45,
                           center=(0.4, 0.55), background="textured")  # fmt: skip
    frame.save(folder / "frame.jpg", quality=90)  # fills 90% of the height, off-centre
    edge = synthetic.draw("red square", (3840, 2160), rng=rng, shape_frac=0.3,
                          center=(0.18, 0.5), background="light")  # fmt: skip
    edge.save(folder / "edge.jpg", quality=90)  # 53% of the height, cut by the centre crop
    top, best = {}, {}
    for tiles in ("off", "auto"):
        out = tmp_path / f"{tiles}.parquet"
        cfg = TagConfig(
            inputs=(folder,), labels_file=labels_file, output=out, workers=0,
            model=ModelConfig(model=str(MODEL), device="cpu", precision="fp32"),
            decode=DecodeConfig(tiles=tiles), save_embeddings=True,
        )  # fmt: skip
        tag(cfg)
        rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
        top[tiles] = {k: (r["top_labels"] or [None])[0] for k, r in rows.items()}  # None: no tag
        best[tiles] = {k: LABELS[int(np.argmax(r["similarity"]))] for k, r in rows.items()}
        dim = 64
        for r in rows.values():
            assert r["views"] == (95 if tiles == "auto" else 1)  # 1 + 3 squares + 7 x 13 tiles
            assert len(r["embedding"]) == r["views"] * dim  # every view is stored
    assert top["off"]["corner.jpg"] != "red circle"
    assert top["auto"]["corner.jpg"] == "red circle"
    assert top["off"]["big.jpg"] == top["auto"]["big.jpg"] == "blue square"
    # parts of a frame-filling shape, seen by tiles, do not outvote the views that see it whole
    assert top["off"]["frame.jpg"] == top["auto"]["frame.jpg"] == "green triangle"
    # an off-centre shape that the centre crop cuts keeps its label under auto
    assert top["auto"]["edge.jpg"] == "red square"
    for tiles in ("off", "auto"):  # the README's SQL reads the argmax of similarity
        assert best[tiles] == top[tiles] | {"corner.jpg": best[tiles]["corner.jpg"]}
    assert best["auto"]["corner.jpg"] == "red circle"
