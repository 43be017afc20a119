"""Per-label scores benchmark: do `top_labels` name every object of a multi-object image?

Generates canvases with two shapes of different labels at random non-overlapping positions
(synthetic.draw_scene) and canvases with one shape, light and textured backgrounds alternating,
and tags them with each `--model` at the default threshold. Prints precision, recall and F1 of
`top_labels` (micro-averaged over images) for the per-label `scores` of this version, beside
baselines rescored from the same runs' stored embeddings:

- softmax >= 0.5: `probs` (softmax over the labels file) with a threshold, the only reading
  omni had before `scores`, both untiled and with the earlier tiling rule (surest tile if 1 tile
  to 10% of tiles have a top probability >= 0.9, else surest whole-image view);
- neutral >= 0.5: sigmoid(logit_scale x (similarity - the label's similarity to flat greys)),
  a per-label baseline with the model's own slope;
- cosine >= c: the raw cosine at the threshold that suits that model best (an oracle, for
  reference: it needs the answers to choose c).

Two canvas sizes: 1920x1080 (a photo; `--tiles auto` makes 22 views) and 448x448 (one view,
where no per-label reading can separate two objects that the single embedding blends).

    python benchmarks/scores.py --model tests/fixtures/tiny-clip --model path/to/tiny-clip-b
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from omni_cli.config import DEFAULT_THRESHOLD, DecodeConfig, ModelConfig, TagConfig  # noqa: E402
from omni_cli.output.sink import META_KEY  # noqa: E402
from omni_cli.pipeline import tag  # noqa: E402
from omni_cli.tools import synthetic  # noqa: E402

LABELS = synthetic.LABELS
FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny-clip"


def make_scenes(folder: Path, n_two: int, n_one: int, size, seed: int) -> dict[str, list[str]]:
    """`n_two` canvases with two shapes of different labels, then `n_one` with one."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n_two + n_one):
        labels = [str(x) for x in rng.choice(LABELS, 2 if i < n_two else 1, replace=False)]
        background = synthetic.BACKGROUNDS[i % 2]
        img = synthetic.draw_scene(labels, size, rng=rng, background=background)
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


def earlier_rule(sim: torch.Tensor, whole: int, scale: float) -> torch.Tensor:
    """The tiling rule before this version: one view per image, chosen by softmax sureness."""
    sure = torch.softmax(sim * scale, -1).max(-1).values
    tiles = sure[whole:]
    n_sure = int((tiles >= 0.9).sum())
    if 1 <= n_sure <= max(1.0, 0.1 * len(tiles)):
        return sim[whole + int(tiles.argmax())]
    return sim[int(sure[:whole].argmax())]


def readings(out: Path, tiled: bool) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """Per image: this version's tags, and the matrices the baselines threshold."""
    from omni_cli.inputs import tiling
    from omni_cli.model import labels as labels_mod

    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[META_KEY])
    rows = sorted(table.to_pylist(), key=lambda r: r["path"])
    scale, baseline = meta["logit_scale"], meta["score_baseline"]
    sim = np.array([r["similarity"] for r in rows], np.float32)
    mats = {"scores": np.array([r["scores"] for r in rows], np.float32)}
    if baseline is not None:
        mats["neutral"] = 1 / (1 + np.exp(-scale * (sim - np.array(baseline, np.float32))))
    mats["cosine"] = sim
    if tiled:  # the earlier rule needs every view: rebuild each label's view similarity
        matrix = _label_matrix(meta, labels_mod)
        earlier = []
        for r in rows:
            emb = torch.tensor(np.asarray(r["embedding"], np.float32)).view(r["views"], -1)
            emb = torch.nn.functional.normalize(emb, dim=-1)
            whole = tiling.whole_view_count(r["width"], r["height"]) if r["views"] > 1 else 1
            earlier.append(earlier_rule(emb @ matrix, whole, scale).numpy())
        mats["softmax"] = torch.softmax(torch.tensor(np.array(earlier)) * scale, -1).numpy()
    else:  # `probs` is the softmax for CLIP; computed here for SigLIP too
        mats["softmax"] = torch.softmax(torch.from_numpy(sim) * scale, -1).numpy()
    return [r["path"] for r in rows], mats, meta


_MATRICES: dict[str, torch.Tensor] = {}


def _label_matrix(meta: dict, labels_mod) -> torch.Tensor:
    """The run's (dim, labels) label classifier, computed again from its model and prompts."""
    from omni_cli.model.loading import load_encoder

    if meta["model"] not in _MATRICES:
        enc = load_encoder(ModelConfig(model=meta["model"], device="cpu", precision="fp32"))
        prompts = [tuple(p) for p in meta["prompts"]]
        _MATRICES[meta["model"]] = labels_mod.classifier(enc.encode_texts, prompts)
    return _MATRICES[meta["model"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model folder or hub id (repeatable)")
    parser.add_argument("--two", type=int, default=60, help="canvases with two shapes")
    parser.add_argument("--one", type=int, default=30, help="canvases with one shape")
    args = parser.parse_args()
    models = args.model or [str(FIXTURE)]
    print(f"machine: {describe()}")
    print(f"{args.two} canvases with two shapes + {args.one} with one, per size; threshold "
          f"{DEFAULT_THRESHOLD} (default) for scores; micro P/R/F1 of top_labels")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels_file = tmp / "labels.txt"
        labels_file.write_text("\n".join(LABELS) + "\n")
        sets = {
            "1920x1080": (tmp / "photo", (1920, 1080), ("auto", "off")),
            "448x448": (tmp / "square", (448, 448), ("off",)),
        }
        truths = {k: make_scenes(f, args.two, args.one, size, seed=12) for k, (f, size, _) in
                  sets.items()}  # fmt: skip
        for model in models:
            print(f"\nmodel: {model}")
            print(f"{'canvas':>10} {'--tiles':>7} {'reading':>28} {'P':>5} {'R':>5} {'F1':>5}")
            for name, (folder, _, grids) in sets.items():
                for tiles in grids:
                    out = tmp / f"{Path(model).name}-{name}-{tiles}.parquet"
                    run(model, folder, labels_file, out, tiles)
                    paths, mats, meta = readings(out, tiled=tiles != "off")
                    truth = [truths[name][p] for p in paths]
                    lines = [("scores (this version)", mats["scores"], DEFAULT_THRESHOLD)]
                    rule = "softmax, earlier tiling" if tiles != "off" else "softmax"
                    lines.append((f"{rule} >= 0.5", mats["softmax"], 0.5))
                    if "neutral" in mats:
                        lines.append(("neutral sigmoid >= 0.5", mats["neutral"], 0.5))
                    best = max(
                        (prf(above(mats["cosine"], c), truth)[2], c)
                        for c in np.arange(0.0, 1.0, 0.02)
                    )
                    for label, matrix, threshold in lines:
                        p, r, f = prf(above(matrix, threshold), truth)
                        print(f"{name:>10} {tiles:>7} {label:>28} {p:>5.2f} {r:>5.2f} {f:>5.2f}")
                    oracle = f"cosine >= {best[1]:.2f} (oracle)"
                    print(f"{name:>10} {tiles:>7} {oracle:>28} {'':>5} {'':>5} {best[0]:>5.2f}")


if __name__ == "__main__":
    main()
