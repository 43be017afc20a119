"""Per-label scores benchmark: do `top_labels` name every object of a multi-object image?

Generates canvases with one, two or three shapes of different labels at random
non-overlapping positions (synthetic.draw_scene; a quarter with one, half with two, a quarter
with three), light and textured backgrounds alternating, and tags them with each model at the
default threshold. Prints precision, recall and F1 of `top_labels` (micro-averaged over
images) for the per-label `scores` of this version, beside readings rescored from the same
runs:

- softmax >= 0.5: `probs` (softmax over the labels file) with a threshold, untiled; with tiles,
  the softmax of the combined similarity;
- cosine >= c: the raw cosine at the threshold that suits that model best (an oracle, for
  reference: it needs the answers to choose c).

Two canvas sizes: 1920x1080 (a photo; `--tiles auto` makes 22 views) and 448x448 (one view,
where the single embedding blends the objects). Models given with `--model` are those the
calibration was chosen on, with `--held-out` those it never saw.

    python benchmarks/scores.py --model tests/fixtures/tiny-clip --held-out path/to/tiny-clip-d
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from omni_cli.config import DEFAULT_THRESHOLD, DecodeConfig, ModelConfig, TagConfig  # noqa: E402
from omni_cli.output.layout import metadata  # noqa: E402
from omni_cli.pipeline import tag  # noqa: E402
from omni_cli.tools import synthetic  # noqa: E402

LABELS = synthetic.LABELS
FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny-clip"


def make_scenes(folder: Path, n: int, size, seed: int) -> dict[str, list[str]]:
    """`n` canvases with 1, 2, 2, 3, 1, 2, 2, 3... shapes of different labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        labels = [str(x) for x in rng.choice(LABELS, (1, 2, 2, 3)[i % 4], replace=False)]
        background = synthetic.BACKGROUNDS[i // 4 % 2]
        img = synthetic.draw_scene(labels, size, rng=rng, shape_frac=(0.12, 0.3),
                                   background=background)  # fmt: skip
        name = f"{i:03d}.jpg"
        img.save(folder / name, quality=90)
        truth[name] = labels
    return truth


def run(model: str, folder: Path, labels_file: Path, out: Path, tiles: str) -> None:
    tag(
        TagConfig(
            inputs=(folder,),
            labels_file=labels_file,
            output=out,
            workers=0,
            model=ModelConfig(model=model, device="cpu", precision="fp32", batch=64),
            decode=DecodeConfig(tiles=tiles),
            save_embeddings=True,
            full=True,
        )
    )


def prf(predicted: list[list[str]], truth: list[list[str]]) -> tuple[float, float, float]:
    tp = fp = fn = 0
    for p, t in zip(predicted, truth, strict=True):
        tp, fp, fn = tp + len(set(p) & set(t)), fp + len(set(p) - set(t)), fn + len(set(t) - set(p))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-9)


def above(matrix: np.ndarray, threshold: float, k: int = 5) -> list[list[str]]:
    """Per row, the labels at or above `threshold`, best first, at most k."""
    out = []
    for row in matrix:
        order = np.argsort(-row)[:k]
        out.append([LABELS[i] for i in order if row[i] >= threshold])
    return out


def readings(out: Path) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """Per image: the matrices the readings threshold."""
    table = pq.read_table(out)
    meta = metadata(out)
    rows = sorted(table.to_pylist(), key=lambda r: r["path"])
    sim = np.array([r["similarity"] for r in rows], np.float32)
    mats = {"scores": np.array([r["scores"] for r in rows], np.float32), "cosine": sim}
    mats["softmax"] = torch.softmax(torch.from_numpy(sim) * meta["logit_scale"], -1).numpy()
    tops = [r["top_labels"] for r in rows]
    return [r["path"] for r in rows], mats, tops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="chosen-on model (repeatable)")
    parser.add_argument(
        "--held-out", action="append", default=[], help="held-out model (repeatable)"
    )
    parser.add_argument("--n", type=int, default=80, help="canvases per size")
    args = parser.parse_args()
    models = [(m, "chosen-on") for m in args.model or ([] if args.held_out else [str(FIXTURE)])]
    models += [(m, "held-out") for m in args.held_out]
    print(f"machine: {describe()}")
    print(f"{args.n} canvases per size (1, 2 or 3 shapes); threshold {DEFAULT_THRESHOLD} (default) "
          "for scores; micro P/R/F1 of the labels read")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels_file = tmp / "labels.txt"
        labels_file.write_text("\n".join(LABELS) + "\n")
        sets = {
            "1920x1080": (tmp / "photo", (1920, 1080), ("auto", "off")),
            "448x448": (tmp / "square", (448, 448), ("off",)),
        }
        truths = {k: make_scenes(f, args.n, size, seed=12) for k, (f, size, _) in sets.items()}
        for model, role in models:
            print(f"\nmodel: {model} ({role})")
            print(f"{'canvas':>10} {'--tiles':>7} {'reading':>28} {'P':>5} {'R':>5} {'F1':>5}")
            for name, (folder, _, grids) in sets.items():
                for tiles in grids:
                    out = tmp / f"{Path(model).name}-{name}-{tiles}.parquet"
                    run(model, folder, labels_file, out, tiles)
                    paths, mats, tops = readings(out)
                    truth = [truths[name][p] for p in paths]
                    lines = [
                        ("top_labels (scores)", tops),
                        ("softmax >= 0.5", above(mats["softmax"], 0.5)),
                    ]
                    best = max(
                        (prf(above(mats["cosine"], c), truth)[2], c)
                        for c in np.arange(-1.0, 1.0, 0.02)
                    )
                    for label, predicted in lines:
                        p, r, f = prf(predicted, truth)
                        print(f"{name:>10} {tiles:>7} {label:>28} {p:>5.2f} {r:>5.2f} {f:>5.2f}")
                    oracle = f"cosine >= {best[1]:.2f} (oracle)"
                    print(f"{name:>10} {tiles:>7} {oracle:>28} {'':>5} {'':>5} {best[0]:>5.2f}")


if __name__ == "__main__":
    main()
