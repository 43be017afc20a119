"""Tiling benchmark: does `--tiles` find small things in 4K images without hurting large ones?

Generates 3840x2160 JPEGs with the synthetic shapes, light and textured backgrounds alternating,
anywhere in the frame (off-centre): "small" (one shape 3-6% of the frame's width), "medium"
(one shape 10-35% of the height), "large" (one shape 40-90% of the height: frame-filling) and
"scenes" (two or three shapes of different labels, 8-30% of the height each). Tags each set
with every model under `--tiles off`, `auto` and any other grids asked for (a grid may carry
its overlap: `auto@0.3`), and prints, per model, the views per image and two readings of the
image's best label: top-1 (the argmax of `similarity`, as the README's SQL reads it) and tag
(`top_labels[0]` at the default threshold; an image may get no tag), right when it is one of the
image's shapes. Models given with `--model` are those the rule was chosen on, with `--held-out`
those it never saw; the table says which. Then it rescores the `auto` runs from their stored
embeddings under other view-combination rules.

    python benchmarks/tiling.py --model tests/fixtures/tiny-clip --held-out path/to/tiny-clip-d
    python benchmarks/tiling.py --n 18     # quicker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from omni_cli.config import DecodeConfig, ModelConfig, TagConfig  # noqa: E402
from omni_cli.inputs import tiling  # noqa: E402
from omni_cli.model import scoring  # noqa: E402
from omni_cli.model.labels import classifier  # noqa: E402
from omni_cli.model.loading import load_encoder  # noqa: E402
from omni_cli.output.layout import metadata  # noqa: E402
from omni_cli.pipeline import tag  # noqa: E402
from omni_cli.tools import synthetic  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny-clip"
LABELS = synthetic.LABELS


SETS = {  # name: (shapes per image, size range, as a fraction of the frame's width or height)
    "small": ((1,), (0.03, 0.06), "width"),
    "medium": ((1,), (0.10, 0.35), "height"),
    "large": ((1,), (0.40, 0.90), "height"),
    "scenes": ((2, 3), (0.08, 0.30), "height"),
}


def make_set(folder: Path, n: int, name: str, seed: int) -> dict[str, list[str]]:
    """`n` 3840x2160 JPEGs of set `name`; returns file name -> the labels it shows."""
    counts, (lo, hi), axis = SETS[name]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    w, h = 3840, 2160
    truth = {}
    for i in range(n):
        background = synthetic.BACKGROUNDS[i % 2]
        k = counts[i % len(counts)]
        if k == 1:
            labels = [LABELS[i % len(LABELS)]]
            frac = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            width = frac if axis == "width" else frac * h / w
            img = synthetic.draw(
                labels[0], (w, h), rng=rng, shape_frac=width, background=background
            )
        else:
            labels = [str(x) for x in rng.choice(LABELS, k, replace=False)]
            img = synthetic.draw_scene(
                labels, (w, h), rng=rng, shape_frac=(lo, hi), background=background
            )
        name_ = f"{i:03d}.jpg"
        img.save(folder / name_, quality=90)
        truth[name_] = labels
    return truth


def run(model, folder, labels_file, out, tiles, workers, overlap):
    cfg = TagConfig(
        inputs=(folder,),
        labels_file=labels_file,
        output=out,
        workers=workers,
        model=ModelConfig(model=str(model), device="cpu", precision="fp32", batch=32),
        decode=DecodeConfig(tiles=tiles, tile_overlap=overlap),
        save_embeddings=True,
        full=True,
    )
    start = time.perf_counter()
    result = tag(cfg)
    return result, time.perf_counter() - start


def accuracy(out: Path, truth: dict[str, list[str]]) -> tuple[float, float]:
    """(top-1 by similarity, share of images whose first tag is one of their labels)."""
    rows = pq.read_table(out, columns=["path", "similarity", "top_labels"]).to_pylist()
    best = np.mean([LABELS[int(np.argmax(r["similarity"]))] in truth[r["path"]] for r in rows])
    tagged = np.mean([r["top_labels"][:1] != [] and r["top_labels"][0] in truth[r["path"]]
                      for r in rows])  # fmt: skip
    return float(best), float(tagged)


def earlier_rule(sim, probs, whole: int) -> torch.Tensor:
    """The rule before per-label scores: surest tile if 1 tile to 10% are sure, else whole."""
    sure = probs.max(-1).values
    tiles = sure[whole:]
    n_sure = int((tiles >= 0.9).sum())
    if 1 <= n_sure <= max(1.0, 0.1 * len(tiles)):
        return sim[whole + int(tiles.argmax())]
    return sim[int(sure[:whole].argmax())]


def rule_accuracies(out: Path, truth, matrix, size: int) -> dict[str, float]:
    """Top-1 under other ways of combining a tiled image's views, and the shipped rule."""
    meta = metadata(out)
    scale, overlap = meta["logit_scale"], meta["tile_overlap"]
    rows = pq.read_table(out, columns=["path", "views", "width", "height", "embedding"]).to_pylist()
    hits: dict[str, list[bool]] = {}
    for row in rows:
        emb = torch.tensor(np.asarray(row["embedding"], np.float32)).view(row["views"], -1)
        emb = torch.nn.functional.normalize(emb, dim=-1)
        w, h = row["width"], row["height"]
        whole = tiling.whole_view_count(w, h)
        grid = tiling.grid_shape(w, h, meta["tiles"], overlap, size)
        sim = emb @ matrix  # (views, labels)
        probs = torch.softmax(sim * scale, -1)  # per view
        distinct = scoring.tile_distinctness(emb, [row["views"]], [whole])
        read = scoring.read_views(distinct, [row["views"]], [whole], [grid], overlap)
        rules = {
            "global view only": sim[0],
            "best whole-image view per label": sim[:whole].max(0).values,
            "max similarity over all views": sim.max(0).values,
            "earlier rule (softmax-sure tiles)": earlier_rule(sim, probs, whole),
            "previous rule (every whole view)": torch.cat([sim[:whole], sim[whole:][read[whole:]]])
            .max(0)
            .values,
            "this rule": scoring.combine_views(
                sim, distinct, [row["views"]], [whole], [grid], overlap
            )[0],
        }
        for name, scores in rules.items():
            hits.setdefault(name, []).append(LABELS[int(scores.argmax())] in truth[row["path"]])
    return {name: float(np.mean(h)) for name, h in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="chosen-on model (repeatable)")
    parser.add_argument(
        "--held-out", action="append", default=[], help="held-out model (repeatable)"
    )
    parser.add_argument("--n", type=int, default=36, help="images per set")
    parser.add_argument("--grids", default="off,auto", help="comma-separated --tiles[@overlap]")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--overlap", type=float, default=DecodeConfig.tile_overlap)
    parser.add_argument("--rules", action="store_true", help="also compare other view rules")
    args = parser.parse_args()
    models = [(m, "chosen-on") for m in args.model or ([] if args.held_out else [str(FIXTURE)])]
    models += [(m, "held-out") for m in args.held_out]
    print(f"machine: {describe()}")
    print(f"{args.n} images of 3840x2160 per set, fp32, CPU; top-1: argmax of similarity; "
          "tag: top_labels[0] at the default threshold; right: one of its shapes")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels_file = tmp / "labels.txt"
        labels_file.write_text("\n".join(LABELS) + "\n")
        sets = {name: (tmp / name, make_set(tmp / name, args.n, name, seed=i + 1))
                for i, name in enumerate(SETS)}  # fmt: skip
        for model, role in models:
            print(f"\nmodel: {model} ({role})")
            head = " ".join(f"{name + ' top-1':>13} {'tag':>5}" for name in SETS)
            print(f"{'--tiles':>9} {'views':>6} {head} {'images/s':>9}")
            auto_outs = {}
            for spec in args.grids.split(","):
                grid, _, over = spec.partition("@")
                overlap = float(over) if over else args.overlap
                cells, rate, views = [], [], 0
                for name, (folder, truth) in sets.items():
                    out = tmp / f"{Path(model).name}-{name}-{spec}.parquet"
                    result, seconds = run(
                        model, folder, labels_file, out, grid, args.workers, overlap
                    )
                    top1, tag1 = accuracy(out, truth)
                    cells.append(f"{top1:>13.1%} {tag1:>5.0%}")
                    rate.append(result.files / seconds)
                    views = max(views, pq.read_table(out, columns=["views"])["views"][0].as_py())
                    if spec == "auto":
                        auto_outs[name] = (out, truth)
                print(f"{spec:>9} {views:>6} {' '.join(cells)} {np.mean(rate):>9.2f}")
            if auto_outs and args.rules:
                enc = load_encoder(ModelConfig(model=str(model), device="cpu", precision="fp32"))
                prompts = [(f"a photo of a {x}.",) for x in LABELS]
                matrix = classifier(enc.encode_texts, prompts)
                print("view-combination rules on the --tiles auto runs (top-1):")
                print(f"{'rule':>36} " + " ".join(f"{name:>7}" for name in SETS))
                size = enc.preprocess.size
                by_set = {k: rule_accuracies(o, t, matrix, size) for k, (o, t) in auto_outs.items()}
                for rule in by_set["small"]:
                    print(f"{rule:>36} " + " ".join(f"{by_set[k][rule]:>7.1%}" for k in SETS))


if __name__ == "__main__":
    main()
