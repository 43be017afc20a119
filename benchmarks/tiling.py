"""Tiling benchmark: does `--tiles` find small things in 4K images, and what does it cost?

Generates 3840x2160 JPEGs with the synthetic shapes on textured backgrounds: a "small" set (one
shape 3-6% of the frame's width, anywhere) and a "big" set (one shape filling the frame). Tags
each set with every `--model` under `--tiles off`, `auto` and any other grids asked for (a
grid may carry its overlap: `auto@0.3`), and prints, per model, the views per image, top-1
accuracy (the label with the best score), the share of images whose first tag is right (at the
default threshold; an image may get no tag) and images/s. Then it rescores the `auto` runs from
their stored embeddings under other view-combination rules: the evidence for the shipped one.

    python benchmarks/tiling.py --model tests/fixtures/tiny-clip --model path/to/tiny-clip-b
    python benchmarks/tiling.py --n 18     # quicker
"""

from __future__ import annotations

import argparse
import json
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
from omni_cli.output.sink import META_KEY  # noqa: E402
from omni_cli.pipeline import tag  # noqa: E402
from omni_cli.tools import synthetic  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny-clip"
LABELS = synthetic.LABELS


def make_set(folder: Path, n: int, small: bool, seed: int) -> dict[str, str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        frac = float(rng.uniform(0.03, 0.06)) if small else None
        img = synthetic.draw(label, (3840, 2160), rng=rng, shape_frac=frac, background="textured")
        name = f"{i:03d}.jpg"
        img.save(folder / name, quality=90)
        truth[name] = label
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


def accuracy(out: Path, truth: dict[str, str]) -> tuple[float, float]:
    """(top-1 by the best score, share of images whose first tag is the right label)."""
    rows = pq.read_table(out, columns=["path", "scores", "top_labels"]).to_pylist()
    best = np.mean([LABELS[int(np.argmax(r["scores"]))] == truth[r["path"]] for r in rows])
    tagged = np.mean([r["top_labels"][:1] == [truth[r["path"]]] for r in rows])
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
    meta = json.loads(pq.read_schema(out).metadata[META_KEY])
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
        rules = {
            "global view only": sim[0],
            "best whole-image view per label": sim[:whole].max(0).values,
            "max similarity over all views": sim.max(0).values,
            "earlier rule (softmax-sure tiles)": earlier_rule(sim, probs, whole),
            "this rule": scoring.combine_views(
                sim, distinct, [row["views"]], [whole], [grid], overlap
            )[0],
        }
        for name, scores in rules.items():
            hits.setdefault(name, []).append(LABELS[int(scores.argmax())] == truth[row["path"]])
    return {name: float(np.mean(h)) for name, h in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model folder or hub id (repeatable)")
    parser.add_argument("--n", type=int, default=45, help="images per set")
    parser.add_argument("--grids", default="off,auto", help="comma-separated --tiles[@overlap]")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--overlap", type=float, default=DecodeConfig.tile_overlap)
    args = parser.parse_args()
    models = args.model or [str(FIXTURE)]
    print(f"machine: {describe()}")
    print(f"{args.n} images of 3840x2160 per set, fp32, CPU; top-1: best score; "
          "tag: first tag right at the default threshold")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels_file = tmp / "labels.txt"
        labels_file.write_text("\n".join(LABELS) + "\n")
        sets = {
            "small": (tmp / "small", make_set(tmp / "small", args.n, True, seed=1)),
            "big": (tmp / "big", make_set(tmp / "big", args.n, False, seed=2)),
        }
        for model in models:
            print(f"\nmodel: {model}")
            print(f"{'--tiles':>9} {'views':>6} {'small top-1':>12} {'tag':>6} "
                  f"{'big top-1':>10} {'tag':>6} {'images/s':>9}")  # fmt: skip
            auto_outs = {}
            for spec in args.grids.split(","):
                grid, _, over = spec.partition("@")
                overlap = float(over) if over else args.overlap
                accs, rate, views = {}, [], 0
                for name, (folder, truth) in sets.items():
                    out = tmp / f"{Path(model).name}-{name}-{spec}.parquet"
                    result, seconds = run(
                        model, folder, labels_file, out, grid, args.workers, overlap
                    )
                    accs[name] = accuracy(out, truth)
                    rate.append(result.files / seconds)
                    views = pq.read_table(out, columns=["views"])["views"][0].as_py()
                    if spec == "auto":
                        auto_outs[name] = (out, truth)
                (st, sg), (bt, bg) = accs["small"], accs["big"]
                print(f"{spec:>9} {views:>6} {st:>12.1%} {sg:>6.1%} {bt:>10.1%} {bg:>6.1%} "
                      f"{np.mean(rate):>9.2f}")  # fmt: skip
            if auto_outs:
                enc = load_encoder(ModelConfig(model=str(model), device="cpu", precision="fp32"))
                prompts = [(f"a photo of a {x}.",) for x in LABELS]
                matrix = classifier(enc.encode_texts, prompts)
                print("view-combination rules on the --tiles auto runs (top-1):")
                print(f"{'rule':>36} {'small':>7} {'big':>7}")
                size = enc.preprocess.size
                by_set = {k: rule_accuracies(o, t, matrix, size) for k, (o, t) in auto_outs.items()}
                for rule in by_set["small"]:
                    print(f"{rule:>36} {by_set['small'][rule]:>7.1%} {by_set['big'][rule]:>7.1%}")


if __name__ == "__main__":
    main()
