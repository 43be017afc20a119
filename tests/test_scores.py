"""Per-label scores: each label's score depends on that label alone, and tags name every object."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from omni_cli.config import DEFAULT_THRESHOLD, DecodeConfig, ModelConfig, TagConfig
from omni_cli.model import scoring
from omni_cli.output.layout import META_KEY, metadata
from omni_cli.pipeline import tag
from omni_cli.tools import synthetic

from .conftest import LABELS, MODEL, shape_image


def config(folder, labels_file, out, tiles="off", **kw):
    return TagConfig(
        inputs=(folder,),
        labels_file=labels_file,
        output=out,
        workers=0,
        model=ModelConfig(model=str(MODEL), device="cpu", precision="fp32", batch=16),
        decode=DecodeConfig(tiles=tiles),
        **kw,
    )


def rows_by_path(out):
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def write_labels(path, labels):
    path.write_text("\n".join(labels) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def photos(tmp_path):
    """Frame-filling shapes, two scenes with two shapes apart and a 4K frame with a small one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, label in enumerate(LABELS):
        shape_image(label, seed=i).save(folder / f"{label.replace(' ', '_')}.png")
    rng = np.random.default_rng(5)
    for pair in (("red circle", "blue square"), ("green triangle", "red square")):
        scene = synthetic.draw_scene(pair, (1920, 1080), rng=rng, background="textured", gap=0.3)
        scene.save(folder / f"{'+'.join(pair).replace(' ', '_')}.jpg", quality=90)
    small = synthetic.draw("blue circle", (3840, 2160), rng=rng, shape_frac=0.05,
                           center=(0.8, 0.2), background="textured")  # fmt: skip
    small.save(folder / "4k_blue_circle.jpg", quality=90)
    return folder


@pytest.mark.parametrize("tiles", ["off", "auto"])
def test_adding_or_removing_a_label_moves_no_other_score(tmp_path, photos, tiles):
    base = ["red circle", "green square", "blue triangle", "blue circle"]
    outs = {}
    for name, labels in {
        "base": base,
        "more": [*base, "red square", "green triangle: a picture of a green triangle."],
        "fewer": base[1:],
    }.items():
        out = tmp_path / f"{name}.parquet"
        tag(config(photos, write_labels(tmp_path / f"{name}.txt", labels), out, tiles=tiles))
        outs[name] = (labels, rows_by_path(out))
    labels, rows = outs["base"]
    for other in ("more", "fewer"):
        other_labels, other_rows = outs[other]
        for path, row in rows.items():
            for i, label in enumerate(labels):
                if label in other_labels:
                    j = other_labels.index(label)
                    assert abs(row["scores"][i] - other_rows[path]["scores"][j]) <= 1e-6
                    assert abs(row["similarity"][i] - other_rows[path]["similarity"][j]) <= 1e-6
    # ... whereas the softmax does move (the reason `scores` exists)
    labels, more = outs["more"]
    assert any(abs(row["probs"][0] - more[p]["probs"][0]) > 1e-3 for p, row in rows.items())


def test_one_label_file_tags_only_what_it_names(tmp_path, photos):
    out = tmp_path / "one.parquet"
    tag(config(photos, write_labels(tmp_path / "one.txt", ["red circle"]), out))
    rows = rows_by_path(out)
    assert rows["green_square.png"]["top_labels"] == []  # the softmax alone said 1.0
    assert rows["green_square.png"]["probs"] == [pytest.approx(1.0)]
    assert rows["green_square.png"]["scores"][0] < 0.2
    assert rows["red_circle.png"]["top_labels"] == ["red circle"]
    tagged = {
        p[:-4].replace("_", " ") for p, r in rows.items() if r["top_labels"] and p.endswith(".png")
    }
    # The tiny model reads a frame-filling red triangle as half a red circle; nothing that shares
    # neither colour nor shape with it is tagged.
    assert "red circle" in tagged and all("red" in t or "circle" in t for t in tagged)
    assert len(tagged) <= 3


def test_multi_object_scenes_get_both_tags_with_tiles(tmp_path, photos, labels_file):
    tops = {}
    for tiles in ("off", "auto"):
        out = tmp_path / f"{tiles}.parquet"
        tag(config(photos, labels_file, out, tiles=tiles))
        tops[tiles] = {p: r["top_labels"] for p, r in rows_by_path(out).items()}
    for scene in ("red_circle+blue_square.jpg", "green_triangle+red_square.jpg"):
        truth = set(scene[:-4].replace("_", " ").split("+"))
        assert truth <= set(tops["auto"][scene]), scene
    assert tops["auto"]["4k_blue_circle.jpg"][0] == "blue circle"  # found, and read first
    for label in LABELS:  # a frame-filling shape is read first
        assert tops["off"][f"{label.replace(' ', '_')}.png"][0] == label


@pytest.mark.parametrize("tiles", ["off", "auto"])
def test_metadata_says_how_scores_are_computed(tmp_path, photos, labels_file, tiles):
    out = tmp_path / "tags.parquet"
    tag(config(photos, labels_file, out, tiles=tiles))
    schema = pq.read_schema(out)
    names = schema.names
    assert names.index("scores") == names.index("probs") + 1
    assert schema.field("scores").type == pa.list_(pa.float32(), len(LABELS))
    meta = metadata(out)
    assert "score_baseline" in meta["scores"] and meta["threshold"] == DEFAULT_THRESHOLD
    baseline = np.array(meta["score_baseline"])
    assert "score_tiled_lift" in meta["scores"] and meta["score_tiled_lift"] > 0
    tiled = 0
    for row in pq.read_table(out).to_pylist():  # the file alone recomputes the scores
        sim = np.array(row["similarity"])
        bar = baseline + (meta["score_tiled_lift"] if row["views"] > 1 else 0.0)
        tiled += row["views"] > 1
        gain = meta["logit_scale"] * (sim - bar)
        expected = 1 / (1 + np.exp(-gain))
        assert np.allclose(row["scores"], expected, atol=1e-5)
        assert (
            row["top_labels"]
            == [  # those that pass, most similar first
                LABELS[i] for i in np.argsort(-sim) if expected[i] >= DEFAULT_THRESHOLD
            ][:5]
        )
    assert (tiled > 0) == (tiles == "auto")


def test_rows_written_before_scores_are_rescored_or_retagged(tmp_path, labels_file):
    from .test_cron import make_folder

    folder = tmp_path / "photos"
    make_folder(folder, 4)
    for embeddings in (True, False):
        out = tmp_path / f"old-{embeddings}.parquet"
        tag(config(folder, labels_file, out, save_embeddings=embeddings))
        fresh = rows_by_path(out)
        table = pq.read_table(out)  # as the previous version wrote it: no scores, no rule
        meta = metadata(out)
        for key in ("scores", "score_baseline", "tile_rule", "request"):
            meta.pop(key)
        table = table.drop_columns(["scores"])
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta)})
        pq.write_table(table, out)
        result = tag(config(folder, labels_file, out, save_embeddings=embeddings))
        assert (result.carried, result.tagged) == ((4, 0) if embeddings else (0, 4))
        again = rows_by_path(out)
        for path, row in fresh.items():
            assert np.allclose(again[path]["scores"], row["scores"], atol=2e-3)
            assert again[path]["top_labels"] == row["top_labels"]


def test_tiled_rows_of_another_tile_rule_are_rescored_from_their_embeddings(
    tmp_path, photos, labels_file
):
    out = tmp_path / "tags.parquet"
    tag(config(photos, labels_file, out, tiles="auto", save_embeddings=True))
    fresh = rows_by_path(out)
    assert any(r["views"] > 1 for r in fresh.values())
    table = pq.read_table(out)  # as a version with another tiling rule wrote it
    meta = metadata(out)
    meta["tile_rule"] = "every view, each label its largest similarity"
    meta.pop("request")  # the version that wrote it: the rerun's fast path does not apply
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta)})
    pq.write_table(table, out)
    result = tag(config(photos, labels_file, out, tiles="auto", save_embeddings=True))
    assert (result.carried, result.tagged) == (len(fresh), 0)  # nothing encoded again
    assert metadata(out)["tile_rule"] != meta["tile_rule"]
    for path, row in rows_by_path(out).items():
        assert np.allclose(row["similarity"], fresh[path]["similarity"], atol=2e-3), path
        assert np.allclose(row["scores"], fresh[path]["scores"], atol=2e-3), path
        assert row["top_labels"] == fresh[path]["top_labels"], path


def test_untiled_rows_do_not_pay_for_a_new_tile_rule(tmp_path, photos, labels_file):
    """A new tiling rule changes no untiled row: they are carried, not tagged again, even
    without stored embeddings to rescore from."""
    out = tmp_path / "tags.parquet"
    tag(config(photos, labels_file, out))
    fresh = rows_by_path(out)
    table = pq.read_table(out)  # as a version with another tiling rule wrote it
    meta = metadata(out)
    meta["tile_rule"] = "every view, each label its largest similarity"
    meta.pop("request")
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta)}), out)
    result = tag(config(photos, labels_file, out))
    assert (result.carried, result.tagged) == (len(fresh), 0)
    assert rows_by_path(out) == fresh


def test_label_scores_are_the_models_log_odds_over_the_calibrated_midpoint():
    baseline = torch.tensor([0.2, -0.1])
    sim = torch.tensor([[0.2, 0.0], [0.3, -0.1], [0.7, 0.4]])
    scores = scoring.label_scores(sim, baseline, logit_scale=100.0)
    assert torch.allclose(scores, torch.sigmoid(100.0 * (sim - baseline)))
    assert abs(scores[0, 0] - 0.5) < 1e-6 and scores[1, 0] > 0.999 and scores[0, 1] > 0.999
    # The same cosines under a model with another temperature mean other evidence.
    assert scoring.label_scores(sim, baseline, logit_scale=5.0)[1, 0] < 0.65
    # SigLIP rows without a measured midpoint keep the model's own sigmoid.
    siglip = scoring.label_scores(sim, None, logit_scale=10.0, logit_bias=-5.0)
    assert torch.allclose(siglip, torch.sigmoid(sim * 10.0 - 5.0))


def test_score_midpoints_come_from_content_free_images_one_label_at_a_time():
    g = torch.Generator().manual_seed(0)
    blank = torch.nn.functional.normalize(torch.randn(13, 6, generator=g), dim=-1)
    labels = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=0)
    base = scoring.score_baseline(blank, labels)
    assert torch.allclose(scoring.score_baseline(blank, labels[:, [2, 0]]), base[[2, 0]])
    spread = base - (blank @ labels).mean(dim=0)  # one spread for every label of the model
    assert torch.allclose(spread, spread[0].expand(4), atol=1e-6) and spread[0] > 0
    worst = (blank @ labels).std(dim=0, unbiased=False).max()  # no label varies more
    assert spread[0] >= scoring.SCORE_SPREAD * worst - 1e-6


def test_small_objects_add_their_tile_parts_of_large_ones_add_nothing():
    # A 4 x 6 grid behind 2 whole-image views; labels: (a, b). Background tiles are all alike.
    rows, cols, whole = 4, 6, 2
    emb = torch.zeros(whole + rows * cols, 3)
    emb[:, 0] = 1.0  # background
    sim = torch.zeros(len(emb), 2)
    sim[:whole] = torch.tensor([0.9, 0.2])  # the whole image looks like `a`

    def combined(object_tiles, b_tile):
        e, s = emb.clone(), sim.clone()
        for t in object_tiles:
            e[whole + t] = torch.tensor([0.0, 1.0, 0.0])  # unlike the background
            s[whole + t] = torch.tensor([0.3, 0.6])
        e[whole + b_tile] = torch.tensor([-1.0, 0.0, 1.0])  # the most distinctive tile
        s[whole + b_tile] = torch.tensor([0.1, 0.95])  # sees `b` whole
        e = torch.nn.functional.normalize(e, dim=-1)
        distinct = scoring.tile_distinctness(e, [len(e)], [whole])
        return scoring.combine_views(s, distinct, [len(e)], [whole], [(rows, cols)], 0.5)[0]

    small = combined([0, 1, 6], b_tile=7)  # a 2 x 2 group: an object that fits in a tile
    # the whole image's reading stays, and the tile that sees `b` whole adds it
    assert torch.allclose(small, torch.tensor([0.9, 0.95]))
    large = combined([c for c in range(12) if c % cols < 5], b_tile=7)  # spans 5 columns
    assert torch.allclose(large, torch.tensor([0.9, 0.2]))  # the whole-image views
    busy = torch.zeros(whole + rows * cols, 1 + rows * cols)
    busy[:whole, 0] = 1.0
    busy[whole:, 1:] = torch.eye(rows * cols)  # no two tiles alike
    distinct = scoring.tile_distinctness(busy, [len(busy)], [whole])
    mixed = scoring.combine_views(sim, distinct, [len(busy)], [whole], [(rows, cols)], 0.5)[0]
    assert mixed[0] == 0.9  # no background to stand out from: one large group, the whole image


def test_tiles_that_see_a_sliver_of_a_small_object_do_not_outvote_the_one_that_sees_it():
    # A 4 x 6 grid behind one whole-image view; labels (circle, triangle). A small circle sits
    # in tile 7; its neighbours 1 and 8 see a sliver of its edge, an arc that reads as a corner.
    rows, cols, whole = 4, 6, 1
    emb = torch.zeros(whole + rows * cols, 3)
    emb[:, 0] = 1.0  # background
    sim = torch.zeros(len(emb), 2)
    sim[0] = torch.tensor([0.2, 0.1])  # the whole image: mostly background
    emb[whole + 7] = torch.tensor([0.0, 1.0, 0.0])  # the circle, whole: most unlike background
    sim[whole + 7] = torch.tensor([0.8, 0.3])
    for sliver in (1, 8):  # a little unlike the background
        emb[whole + sliver] = torch.tensor([1.0, 0.55, 0.0])
        sim[whole + sliver] = torch.tensor([0.1, 0.9])
    emb = torch.nn.functional.normalize(emb, dim=-1)
    distinct = scoring.tile_distinctness(emb, [len(emb)], [whole])
    assert 1 - scoring.TILE_ALIKE < distinct[whole + 1] < scoring.GROUP_SHARE * distinct[whole + 7]
    out = scoring.combine_views(sim, distinct, [len(emb)], [whole], [(rows, cols)], 0.5)[0]
    assert torch.allclose(out, torch.tensor([0.8, 0.3]))  # circle first; the corners not read


def _reference_rule(emb, sim, views, whole, grids, overlap):
    """The tiling rule one image at a time, in plain Python loops (what the batch must equal)."""
    reach = math.ceil(2 / (1 - overlap) - 1e-9)
    out, start = [], 0
    for count, n_whole, grid in zip(views, whole, grids, strict=True):
        e, s = emb[start : start + count], sim[start : start + count]
        start += count
        read = list(range(n_whole if count > 1 else 1))
        if grid is not None and grid[0] * grid[1] == count - n_whole and count > n_whole:
            read, large = [], []
            tiles = e[n_whole:]
            alike = (tiles @ tiles.T >= scoring.TILE_ALIKE).float()
            group = alike[int(alike.sum(dim=1).argmax())]
            typical = torch.nn.functional.normalize(group @ tiles, dim=0)
            distinct = [float(1 - t @ typical) for t in tiles]
            obj = [d > 1 - scoring.TILE_ALIKE for d in distinct]
            seen = [False] * len(obj)
            for first in range(len(obj)):
                if not obj[first] or seen[first]:
                    continue
                seen[first], stack, cells = True, [first], []
                while stack:
                    c = stack.pop()
                    cells.append(c)
                    y, x = divmod(c, grid[1])
                    for ny in range(max(0, y - 1), min(grid[0], y + 2)):
                        for nx in range(max(0, x - 1), min(grid[1], x + 2)):
                            n = ny * grid[1] + nx
                            if obj[n] and not seen[n]:
                                seen[n] = True
                                stack.append(n)
                ys, xs = [c // grid[1] for c in cells], [c % grid[1] for c in cells]
                if max(ys) - min(ys) < reach and max(xs) - min(xs) < reach:
                    share = scoring.GROUP_SHARE  # not the tiles that see a sliver
                    read += [n_whole + c for c in cells
                             if distinct[c] >= share * _peak(c, cells, distinct, grid)]  # fmt: skip
                else:
                    large += cells
            read += _whole_views_read(large, n_whole, grid, overlap)
        out.append(s[read].max(dim=0).values)
    return torch.stack(out)


def _peak(cell, cells, distinct, grid):
    """The largest distinctness among the object tiles next to `cell` (3 x 3, itself too)."""
    y, x = divmod(cell, grid[1])
    return max(
        distinct[c] for c in cells if abs(c // grid[1] - y) <= 1 and abs(c % grid[1] - x) <= 1
    )


def _whole_views_read(large, n_whole, grid, overlap):
    """The whole-image views that contain every large group's cells along the long axis (all
    when there is none or no view contains them), in tile sides, one view at a time."""
    rows, cols = grid
    step = 1 - overlap
    n, m = (cols, rows) if cols >= rows else (rows, cols)
    length, short = (n - 1) * step + 1, (m - 1) * step + 1
    if not large:
        return list(range(n_whole))
    along = [c % cols if cols >= rows else c // cols for c in large]
    lo, hi = min(along) * step + 0.5 - step / 2, max(along) * step + 0.5 + step / 2
    squares = n_whole - 1
    starts = [(length - short) / 2]  # the global view: the centre square
    starts += [j * (length - short) / (squares - 1) if squares > 1 else (length - short) / 2
               for j in range(squares)]  # fmt: skip
    inside = [v for v, a in enumerate(starts) if a <= lo + 1e-6 and hi <= a + short + 1e-6]
    return inside or list(range(n_whole))


def test_whole_views_that_cut_a_large_object_give_way_to_the_one_that_sees_it():
    # A 4K-like 7 x 13 grid behind the global view and three squares (left, middle, right);
    # labels (a, b). A large object fills columns 0-5: only the left square sees it whole.
    rows, cols, whole = 7, 13, 4
    emb = torch.zeros(whole + rows * cols, 3)
    emb[:, 0] = 1.0  # background
    sim = torch.zeros(len(emb), 2)
    sim[:whole] = torch.tensor([[0.3, 0.9], [0.8, 0.2], [0.3, 0.95], [0.1, 0.5]])
    # the global view and the middle square cut the object and read its part as `b`

    def combined(columns):
        e = emb.clone()
        for r in range(1, 6):
            for c in columns:
                e[whole + r * cols + c] = torch.tensor([0.0, 1.0, 0.0])
        e = torch.nn.functional.normalize(e, dim=-1)
        distinct = scoring.tile_distinctness(e, [len(e)], [whole])
        return scoring.combine_views(sim, distinct, [len(e)], [whole], [(rows, cols)], 0.5)[0]

    assert torch.allclose(combined(range(6)), torch.tensor([0.8, 0.2]))  # the left square
    centred = combined(range(4, 10))  # the global view and the middle square see it whole
    assert torch.allclose(centred, torch.tensor([0.3, 0.95]))
    assert torch.allclose(combined(range(13)), sim[:whole].max(dim=0).values)  # none does
    assert torch.allclose(combined([]), sim[:whole].max(dim=0).values)  # nothing large


def test_batched_rule_equals_the_one_image_reference():
    whole_read = [x for seed in range(8) for x in _batched_equals_reference(seed)]
    assert not all(whole_read) and any(whole_read)  # the whole-view rule was exercised


def _batched_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    views, whole, grids, parts = [], [], [], []
    for i in range(9):  # untiled, tiled with grids of several shapes, one with a wrong grid
        if i % 4 == 0:
            views.append(1), whole.append(1), grids.append(None)
            parts.append(torch.randn(1, 8, generator=g))
            continue
        r, c, w = (
            int(torch.randint(2, 8, (), generator=g)),
            int(torch.randint(2, 14, (), generator=g)),
            1 + i % 4,
        )
        background = torch.randn(8, generator=g)
        tiles = background + 0.05 * torch.randn(r * c, 8, generator=g)
        blobs = torch.rand(r, c, generator=g) < 0.2  # object tiles, in random groups ...
        a, b = sorted(torch.randint(0, max(r, c), (2,), generator=g).tolist())
        blobs[a : b + 1, a : b + 1] = True  # ... and a large one somewhere along the diagonal
        blobs = blobs.view(-1)
        tiles[blobs] = torch.randn(int(blobs.sum()), 8, generator=g)
        parts.append(torch.cat([torch.randn(w, 8, generator=g), tiles]))
        views.append(w + r * c), whole.append(w)
        grids.append((r, c) if i != 5 else (r + 1, c))
    emb = torch.nn.functional.normalize(torch.cat(parts), dim=-1)
    sim = emb @ torch.nn.functional.normalize(torch.randn(8, 5, generator=g), dim=0)
    distinct = scoring.tile_distinctness(emb, views, whole)
    batched = scoring.combine_views(sim, distinct, views, whole, grids, 0.5)
    reference = _reference_rule(emb, sim, views, whole, grids, 0.5)
    assert torch.allclose(batched, reference, atol=1e-6)
    read = scoring.read_views(distinct, views, whole, grids, 0.5)
    firsts = torch.tensor([0, *views[:-1]]).cumsum(0)
    whole_read = [bool(read[f : f + n].all()) for f, n in zip(firsts, whole, strict=True)]
    assert read.sum() > sum(whole) - whole_read.count(False)  # tiles read
    return whole_read


@pytest.mark.parametrize(
    ("width", "height", "tiles"),
    [(3840, 2160, "auto"), (2160, 3840, "auto"), (3840, 2160, "6x12"), (5000, 1800, "auto")],
)
def test_whole_views_read_are_those_whose_pixels_contain_the_large_object(width, height, tiles):
    from omni_cli.inputs import tiling

    grid = tiling.grid_shape(width, height, tiles, 0.5, 224)
    boxes = tiling.grid_for(width, height, tiles, 0.5, 224)
    rows, cols = grid
    across = width >= height
    axis, length, short = (0, width, height) if across else (1, height, width)
    starts = sorted({b[axis] for b in boxes})
    side, half = boxes[0][2] - boxes[0][0], (starts[1] - starts[0]) / 2
    views = [(length / 2 - short / 2, length / 2 + short / 2)]  # the centre crop, then squares
    views += [(b[axis], b[axis + 2]) for b in tiling.whole_boxes(width, height)]
    whole = len(views)
    n_along = cols if across else rows
    checked = set()
    for first in range(n_along):
        for last in range(first + 4, min(first + 9, n_along)):  # spans >= 4 tiles: large
            distinct = torch.zeros(whole + rows * cols)
            for r in range(1, 3) if across else range(first, last + 1):
                for c in range(first, last + 1) if across else range(1, 3):
                    distinct[whole + r * cols + c] = 1.0
            read = scoring.read_views(distinct, [len(distinct)], [whole], [grid], 0.5)
            lo, hi = starts[first] + side / 2 - half, starts[last] + side / 2 + half
            inside = [a <= lo + 1e-6 and hi <= b + 1e-6 for a, b in views]
            expected = inside if any(inside) else [True] * whole
            assert read[:whole].tolist() == expected, (first, last)
            assert not read[whole:].any()  # a large group's tiles are never read
            checked.add(tuple(expected))
    assert len(checked) > 1  # some spans are seen whole by some views only
