"""Sweep the per-label score's bar (scoring.SCORE_SPREAD) on chosen-on models, report held-out.

A label applies where its similarity reaches mean + SCORE_SPREAD x spread (its mean over the
content-free images, and the model's spread there), so the images' similarities are computed
once per model and canvas set, and every candidate bar is read offline from them. Prints, per
model and candidate, micro P/R/F1 of the labels read (at most top-k 5, most similar first) on
the canvases of benchmarks/scores.py (1-3 shapes), untiled 448x448, untiled 1920x1080 and
1920x1080 with --tiles auto, beside softmax >= 0.5. The choice is made on `--model` only:
the largest mean F1 (over the three sets) among the candidates whose untiled F1 is not below
softmax's on any chosen-on model.

    python benchmarks/score_sweep.py --model tests/fixtures/tiny-clip --held-out DIR/tiny-clip-d
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
from scores import LABELS, above, make_scenes, prf, run  # noqa: E402

from omni_cli.config import ModelConfig, TagConfig  # noqa: E402
from omni_cli.model import scoring  # noqa: E402

CANDIDATES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0]


def read(out: Path):
    table = pq.read_table(out)
    rows = sorted(table.to_pylist(), key=lambda r: r["path"])
    sim = np.array([r["similarity"] for r in rows], np.float32)
    return [r["path"] for r in rows], sim


def bar_parts(model: str, labels_file: Path) -> tuple[np.ndarray, float, float]:
    """(labels,) mean content-free similarity, the model's spread, and its logit scale."""
    from omni_cli.model.labels import prompts_for, read_labels
    from omni_cli.pipeline import load_model

    cfg = TagConfig(inputs=(Path("."),), labels_file=labels_file,
                    model=ModelConfig(model=model, device="cpu", precision="fp32"))  # fmt: skip
    prompts = prompts_for(read_labels(labels_file), cfg.template)
    saved = scoring.SCORE_SPREAD
    try:
        scoring.SCORE_SPREAD = 0.0
        enc, cls0 = load_model(cfg, prompts)
        scoring.SCORE_SPREAD = 1.0
        _, cls1 = load_model(cfg, prompts)
    finally:
        scoring.SCORE_SPREAD = saved
    mean = cls0.baseline.cpu().numpy()
    spread = float((cls1.baseline - cls0.baseline).mean())
    return mean, spread, enc.logit_scale


def reading(sim: np.ndarray, bar: np.ndarray, k: int = 5) -> list[list[str]]:
    out = []
    for row in sim:
        order = np.argsort(-row)[:k]
        out.append([LABELS[i] for i in order if row[i] >= bar[i]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--held-out", action="append", default=[])
    parser.add_argument("--n", type=int, default=48)
    args = parser.parse_args()
    models = [(m, "chosen-on") for m in args.model] + [(m, "held-out") for m in args.held_out]
    results = {}  # model -> set -> candidate -> (p, r, f); plus softmax
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels_file = tmp / "labels.txt"
        labels_file.write_text("\n".join(LABELS) + "\n")
        sets = {"448 off": (tmp / "square", (448, 448), "off"),
                "1080 off": (tmp / "photo", (1920, 1080), "off"),
                "1080 auto": (tmp / "photo", (1920, 1080), "auto")}  # fmt: skip
        truths = {}
        for folder, size, _ in sets.values():
            if folder not in truths:
                truths[folder] = make_scenes(folder, args.n, size, seed=12)
        for model, role in models:
            mean, spread, scale = bar_parts(model, labels_file)
            res = results[model] = {"role": role, "spread": spread}
            for name, (folder, _, tiles) in sets.items():
                out = tmp / f"{Path(model).name}-{name.replace(' ', '-')}.parquet"
                run(model, folder, labels_file, out, tiles)
                paths, sim = read(out)
                truth = [truths[folder][p] for p in paths]
                soft = torch.softmax(torch.from_numpy(sim) * scale, -1).numpy()
                res[name] = {"softmax": prf(above(soft, 0.5), truth)}
                for c in CANDIDATES:
                    res[name][c] = prf(reading(sim, mean + c * spread), truth)
            print(json.dumps({model: res}, default=str), flush=True)
    chosen = [m for m, r in results.items() if r["role"] == "chosen-on"]

    def ok(c):
        return all(results[m][s][c][2] >= results[m][s]["softmax"][2]
                   for m in chosen for s in ("448 off", "1080 off"))  # fmt: skip

    def mean_f1(c, ms):
        return float(np.mean([results[m][s][c][2] for m in ms for s in sets]))

    allowed = [c for c in CANDIDATES if ok(c)] or CANDIDATES
    best = max(allowed, key=lambda c: mean_f1(c, chosen))
    print(f"\nchosen on {len(chosen)} models: SCORE_SPREAD = {best} "
          f"(allowed: {allowed}; current {scoring.SCORE_SPREAD})")  # fmt: skip
    print(f"{'model':>16} {'role':>9} {'set':>9} {'softmax P/R/F1':>16} "
          f"{'chosen P/R/F1':>16} {'current P/R/F1':>16}")  # fmt: skip
    for m, r in results.items():
        for s in sets:
            row = [r[s]["softmax"], r[s][best], r[s][scoring.SCORE_SPREAD]]
            cells = " ".join(f"{p:.2f}/{rr:.2f}/{f:.2f}".rjust(16) for p, rr, f in row)
            print(f"{Path(m).name:>16} {r['role']:>9} {s:>9} {cells}")
    print("\nmean F1 per candidate (chosen-on / held-out):")
    held = [m for m, r in results.items() if r["role"] == "held-out"]
    for c in CANDIDATES:
        h = f"{mean_f1(c, held):.3f}" if held else "-"
        print(f"  {c:>4}: {mean_f1(c, chosen):.3f} / {h}{'  (allowed)' if c in allowed else ''}")


if __name__ == "__main__":
    main()
