"""CPU throughput, all in one run: naive loop, decode-only, encoder-only and end-to-end `tag`.

Random ViT-B/32 over a folder of synthetic 1024x768 JPEGs (photo-like textured backgrounds),
on the CPU: once at `--precision auto` with the naive loop beside it, once at fp32. Prints each
stage's images/s and its share of the encoder-only ceiling at the same precision, and the two
targets of issue 4: `tag` >= 85% of encoder-only, and `tag --precision auto` >= 2x the naive
loop. Each stage keeps its fastest of `--repeat` interleaved rounds (the build machines are
shared and noisy).

    python benchmarks/throughput_cpu.py [--images 192] [--repeat 2] [--model random:vit-b-32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console

from omni_cli.config import ModelConfig
from omni_cli.tools.bench import BenchConfig, render, run_bench, synthesise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default="random:vit-b-32")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    console = Console(highlight=False)
    with tempfile.TemporaryDirectory(prefix="omni-cpu-") as tmp:
        folder = Path(tmp) / "images"
        synthesise(folder, args.images, (1024, 768))
        reports = {}
        for precision, baseline in (("auto", True), ("fp32", False)):
            cfg = BenchConfig(
                model=ModelConfig(model=args.model, device="cpu", precision=precision),
                images=folder,
                baseline=baseline,
                repeat=args.repeat,
            )
            report = run_bench(cfg, lambda m: console.print(f"  {m}", style="dim"))
            render(report, console)
            reports[precision] = report
    auto, fp32 = reports["auto"], reports["fp32"]
    naive = auto.stage("baseline").images_per_second
    console.print("\nissue 4 targets (CPU):")
    for r in (auto, fp32):
        share = r.stage("tag").share
        ok = "ok" if share >= 0.85 else "SHORT"
        console.print(f"  tag at {r.settings['precision']}: {share:.0%} of encoder-only "
                      f"(target >= 85%) {ok}")  # fmt: skip
    ratio = auto.stage("tag").images_per_second / naive
    console.print(f"  tag --precision auto ({auto.settings['precision']}) vs naive loop: "
                  f"{ratio:.2f}x (target >= 2x) {'ok' if ratio >= 2 else 'SHORT'}")  # fmt: skip
    if args.json:
        data = {k: r.to_dict() for k, r in reports.items()}
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
