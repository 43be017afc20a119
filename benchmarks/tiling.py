"""Tiling benchmark: does `--tiles` find small things in 4K images, and what does it cost?

Generates 3840x2160 JPEGs with the fixture model's shapes on textured backgrounds: a "small"
set (one shape 3-6% of the frame's width, anywhere) and a "big" set (one shape filling the
frame). Tags each set with `--tiles off`, `auto` and fixed grids, and prints top-1 accuracy and
images/s. With --rules it also rescores the auto run under alternative view-combination rules
from the stored embeddings (max over views, global only, ...), the evidence for the shipped rule.

    python benchmarks/tiling.py            # 45 images per set (about 10 minutes on 2 cores)
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

from omni_cli import scoring, synthetic, tiling  # noqa: E402
from omni_cli.config import DecodeConfig, ModelConfig, TagConfig  # noqa: E402
from omni_cli.labels import Label, classifier, prompts_for  # noqa: E402
from omni_cli.loading import load_encoder  # noqa: E402
from omni_cli.pipeline import tag  # noqa: E402

MODEL = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny-clip"
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


def run(folder, labels_file, out, tiles, workers, overlap):
    cfg = TagConfig(
        inputs=(folder,),
        labels_file=labels_file,
        output=out,
        workers=workers,
        model=ModelConfig(model=str(MODEL), device="cpu", precision="fp32", batch=32),
        decode=DecodeConfig(tiles=tiles, tile_overlap=overlap),
        save_embeddings=True,
        full=True,
    )
    start = time.perf_counter()
    result = tag(cfg)
    return result, time.perf_counter() - start


def accuracy(out: Path, truth: dict[str, str]) -> float:
    rows = pq.read_table(out, columns=["path", "top_labels"]).to_pylist()
    return float(np.mean([r["top_labels"][0] == truth[r["path"]] for r in rows]))


def rule_accuracies(out: Path, truth, matrix, scale) -> dict[str, float]:
    """Top-1 under other ways of combining a tiled image's views, and the shipped rule."""
    rows = pq.read_table(out, columns=["path", "views", "width", "height", "embedding"]).to_pylist()
    hits: dict[str, list[bool]] = {}
    for row in rows:
        emb = torch.tensor(np.asarray(row["embedding"], np.float32)).view(row["views"], -1)
        whole = tiling.whole_view_count(row["width"], row["height"])
        sim = emb @ matrix  # (views, labels)
        probs = scoring.probabilities(sim, scale)  # per view
        rules = {
            "global view only": sim[0],
            "surest whole-image view": sim[probs[:whole].max(-1).values.argmax()],
            "max similarity over views": sim.max(0).values,
            "surest view (max prob)": probs.max(0).values,
            "mean over views": sim.mean(0),
            "shipped rule": scoring.combine_views(sim, [row["views"]], [whole], scale)[0],
        }
        for name, scores in rules.items():
            hits.setdefault(name, []).append(LABELS[int(scores.argmax())] == truth[row["path"]])
    return {name: float(np.mean(h)) for name, h in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=45, help="images per set")
    parser.add_argument("--grids", default="off,auto,4x4,3x6", help="comma-separated --tiles")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--overlap", type=float, default=DecodeConfig.tile_overlap)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    print(f"model: {MODEL.name}, {args.n} images of 3840x2160 per set, fp32, CPU, "
          f"--tile-overlap {args.overlap}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels_file = tmp / "labels.txt"
        labels_file.write_text("\n".join(LABELS) + "\n")
        sets = {
            "small": (tmp / "small", make_set(tmp / "small", args.n, True, seed=1)),
            "big": (tmp / "big", make_set(tmp / "big", args.n, False, seed=2)),
        }
        print(f"{'--tiles':>8} {'views':>6} {'small top-1':>12} {'big top-1':>10} {'images/s':>9}")
        auto_outs = {}
        for grid in args.grids.split(","):
            accs, rate, views = {}, [], 0
            for name, (folder, truth) in sets.items():
                out = tmp / f"{name}-{grid}.parquet"
                result, seconds = run(folder, labels_file, out, grid, args.workers, args.overlap)
                accs[name] = accuracy(out, truth)
                rate.append(result.files / seconds)
                views = pq.read_table(out, columns=["views"])["views"][0].as_py()
                if grid == "auto":
                    auto_outs[name] = (out, truth)
            print(
                f"{grid:>8} {views:>6} {accs['small']:>12.1%} {accs['big']:>10.1%} "
                f"{np.mean(rate):>9.2f}"
            )
        if auto_outs:
            enc = load_encoder(ModelConfig(model=str(MODEL), device="cpu", precision="fp32"))
            prompts = prompts_for([Label(x) for x in LABELS], "a photo of a {}.")
            matrix = classifier(enc.encode_texts, prompts)
            print("\nview-combination rules on the --tiles auto runs (top-1):")
            print(f"{'rule':>36} {'small':>7} {'big':>7}")
            by_set = {
                k: rule_accuracies(o, t, matrix, enc.logit_scale) for k, (o, t) in auto_outs.items()
            }
            for rule in by_set["small"]:
                print(f"{rule:>36} {by_set['small'][rule]:>7.1%} {by_set['big'][rule]:>7.1%}")


if __name__ == "__main__":
    main()
