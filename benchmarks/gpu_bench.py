"""GPU throughput (an H100 or H200): naive loop vs encoder-only vs end-to-end, 1080p JPEGs.

Self-contained: synthesises photo-like 1920x1080 JPEGs (in parallel on every core), then runs
`omni bench` (omni_cli.bench.run_bench) on CUDA for random ViT-L/14 in bf16 and random ViT-B/32
in bf16, each with decode-only, encoder-only (uint8 tensors already on the GPU), end-to-end
`omni tag` and the naive loop of design.md section 6. Prints the tables, the machine and the
issue 4 targets:

  ViT-L/14 bf16: tag >= 75% of eager encoder-only, and >= 10x the naive loop
  ViT-B/32:      tag >= 80% of the decode-only ceiling measured beside it (decode bounds it)

A few minutes on one GPU with 16 cores. No network, no weights needed.

    python benchmarks/gpu_bench.py [--images 2048] [--workers N] [--json gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a bare checkout

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from omni_cli.bench import BenchConfig, render, run_bench, synthesise  # noqa: E402
from omni_cli.config import ModelConfig  # noqa: E402

MODELS = (("random:vit-l-14", "bf16"), ("random:vit-b-32", "bf16"))


def _chunk(args: tuple[str, int, int, int]) -> int:
    folder, start, count, seed = args
    sub = Path(folder) / f"part{start:06d}"  # run_bench walks the folder recursively
    synthesise(sub, count, (1920, 1080), seed=seed)
    return count


def make_images(folder: Path, n: int) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per = -(-n // cores)
    jobs = [(str(folder), s, min(per, n - s), s) for s in range(0, n, per)]
    with ProcessPoolExecutor(cores) as pool:
        assert sum(pool.map(_chunk, jobs)) == n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=None, help="default: as `omni tag`")
    ap.add_argument("--batch", type=int, default=None, help="default: as `omni tag`")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    console = Console(highlight=False, width=140)
    reports = {}
    with tempfile.TemporaryDirectory(prefix="omni-gpu-") as tmp:
        folder = Path(tmp) / "images"
        started = time.perf_counter()
        make_images(folder, args.images)  # forks: before this process touches CUDA
        console.print(f"synthesised {args.images} 1920x1080 JPEGs in "
                      f"{time.perf_counter() - started:.0f} s")  # fmt: skip
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bench.py needs a CUDA GPU; see benchmarks/throughput_cpu.py")
        console.print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        for model, precision in MODELS:
            cfg = BenchConfig(
                model=ModelConfig(
                    model=model, device="cuda", precision=precision, batch=args.batch
                ),
                images=folder,
                workers=args.workers,
                baseline=True,
                repeat=args.repeat,
            )
            report = run_bench(cfg, lambda m: console.print(f"  {m}", style="dim"))
            render(report, console)
            reports[model] = report
            torch.cuda.empty_cache()
    console.print("\nissue 4 targets (GPU):")
    large = reports["random:vit-l-14"]
    tag_l = large.stage("tag")
    ratio = tag_l.images_per_second / large.stage("baseline").images_per_second
    console.print(f"  ViT-L/14 bf16: tag {tag_l.images_per_second:,.0f}/s = {tag_l.share:.0%} "
                  f"of encoder-only (target >= 75%) {_ok(tag_l.share >= 0.75)}; "
                  f"{ratio:.1f}x the naive loop (target >= 10x) {_ok(ratio >= 10)}")  # fmt: skip
    base = reports["random:vit-b-32"]
    tag_b, dec_b, enc_b = base.stage("tag"), base.stage("decode"), base.stage("encoder")
    of_decode = tag_b.images_per_second / dec_b.images_per_second
    bound = "decode" if dec_b.images_per_second < enc_b.images_per_second else "encoder"
    console.print(f"  ViT-B/32 bf16: tag {tag_b.images_per_second:,.0f}/s = {of_decode:.0%} of "
                  f"decode-only {dec_b.images_per_second:,.0f}/s (target >= 80%) "
                  f"{_ok(of_decode >= 0.8)}; bound by {bound} "
                  f"(encoder-only {enc_b.images_per_second:,.0f}/s)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))


def _ok(flag: bool) -> str:
    return "ok" if flag else "SHORT"


if __name__ == "__main__":
    main()
