"""GPU throughput (an H100 or H200 with ~16 cores): every stage side by side, in one run.

Self-contained: synthesises photo-like JPEGs (in parallel on every core), then runs
`omni bench` (omni_cli.tools.bench.run_bench) on CUDA, with default options (`--batch auto`,
default workers, `--decode auto`, i.e. hybrid), for random-weight models that time exactly like
the real ones:

  1. ViT-L/14 bf16 on 1080p JPEGs: decode only (cpu, gpu, hybrid), encoder only, end-to-end
     `tag` in each decode mode, and the naive loop of design.md section 6;
  2. ViT-B/32 bf16 on the same JPEGs, the same stages;
  3. ViT-L/14 bf16 on 4K JPEGs with `--tiles auto` (~95 views each): views/s and host RSS.

Then prints issue 10's targets, each with ok or SHORT:

  ViT-L/14: tag >= 75% of eager encoder-only, and >= 10x the naive loop
  ViT-B/32: tag >= 2,500 images/s, and >= 80% of the best decode-only rate beside it
  4K tiles: tag views/s >= 70% of encoder-only views/s; host RSS stays bounded

About three minutes on one H200 with 16 cores. No network, no weights needed.

    python benchmarks/gpu_bench.py [--images 2048] [--images-4k 64] [--json gpu.json]
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

from omni_cli.config import ModelConfig  # noqa: E402
from omni_cli.tools.bench import BenchConfig, render, run_bench, synthesise  # noqa: E402

RUNS = (  # (name, model, folder, tiles, naive-loop baseline)
    ("vit-l-14 1080p", "random:vit-l-14", "1080p", "off", True),
    ("vit-b-32 1080p", "random:vit-b-32", "1080p", "off", True),
    ("vit-l-14 4k tiles", "random:vit-l-14", "4k", "auto", False),
)
SIZES = {"1080p": (1920, 1080), "4k": (3840, 2160)}


def _chunk(args: tuple[str, int, int, int, int, int]) -> int:
    folder, start, count, seed, width, height = args
    sub = Path(folder) / f"part{start:06d}"  # run_bench walks the folder recursively
    synthesise(sub, count, (width, height), seed=seed)
    return count


def make_images(folder: Path, n: int, size: tuple[int, int], copies: int = 1) -> None:
    """`n` distinct JPEGs under folder/0, and `copies - 1` hard-linked copies of them beside.

    Copies make a run long enough to time the steady state (worker start-up and the first
    forward's fill are fixed costs) without synthesising every file; each is decoded anew.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per = -(-n // cores)
    jobs = [(str(folder / "0"), s, min(per, n - s), s, *size) for s in range(0, n, per)]
    with ProcessPoolExecutor(cores) as pool:
        assert sum(pool.map(_chunk, jobs)) == n
    for copy in range(1, copies):
        for path in (folder / "0").rglob("*.jpg"):
            target = folder / str(copy) / path.relative_to(folder / "0")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def probe_nvjpeg(folder: Path, console: Console) -> None:
    """The device decoder alone on files already in memory, and with the views cut after it."""
    from omni_cli.inputs.decode import Preprocess
    from omni_cli.inputs.devdecode import device_views, nvjpeg_decoder

    decoder = nvjpeg_decoder()
    if decoder is None:
        console.print("nvJPEG: not available (torchvision)")
        return
    device = torch.device("cuda")
    files = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
             for p in sorted((folder / "0").rglob("*.jpg"))[:1024]]  # fmt: skip
    decoder(files[:8], device)
    for batch in (64, 256, 512):
        for views in (False, True):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, len(files), batch):
                images = decoder(files[i : i + batch], device)
                if views:
                    device_views(images, Preprocess())
            torch.cuda.synchronize()
            rate = len(files) / (time.perf_counter() - t0)
            what = "decode + views" if views else "decode"
            console.print(f"  nvJPEG alone, in-memory 1080p, batch {batch}: {what} {rate:,.0f}/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048, help="1080p JPEGs")
    ap.add_argument("--images-4k", type=int, default=64, help="4K JPEGs for the tiling run")
    ap.add_argument("--workers", type=int, default=None, help="default: as `omni tag`")
    ap.add_argument("--batch", type=int, default=None, help="views per forward; default auto")
    ap.add_argument("--baseline-images", type=int, default=256, help="images for the naive loop")
    ap.add_argument("--copies", type=int, default=4, help="hard-linked copies of the 1080p set")
    ap.add_argument("--only", default=None, help="run only the runs whose name contains this")
    ap.add_argument("--probe", action="store_true", help="also time nvJPEG alone, in memory")
    ap.add_argument(
        "--ab-thread",
        action="store_true",
        help="also time ViT-L/14 tag (gpu) without the feeding thread",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    console = Console(highlight=False, width=150)
    reports = {}
    with tempfile.TemporaryDirectory(prefix="omni-gpu-") as tmp:
        folders = {"1080p": Path(tmp) / "1080p", "4k": Path(tmp) / "4k"}
        started = time.perf_counter()
        make_images(folders["1080p"], args.images, SIZES["1080p"], args.copies)  # before CUDA
        make_images(folders["4k"], args.images_4k, SIZES["4k"])
        console.print(
            f"synthesised {args.images} 1920x1080 JPEGs (x{args.copies} hard links) "
            f"and {args.images_4k} 3840x2160 in {time.perf_counter() - started:.0f} s"
        )
        if args.probe and torch.cuda.is_available():
            probe_nvjpeg(folders["1080p"], console)
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bench.py needs a CUDA GPU; see benchmarks/throughput_cpu.py")
        console.print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        for name, model, folder, tiles, baseline in RUNS:
            if args.only and args.only not in name:
                continue
            console.print(f"\n[bold]{name}[/bold]")
            cfg = BenchConfig(
                model=ModelConfig(model=model, device="cuda", precision="bf16", batch=args.batch),
                images=folders[folder],
                workers=args.workers,
                baseline=baseline,
                baseline_images=args.baseline_images,
                tiles=tiles,
                decode="all",
            )
            t0 = time.perf_counter()
            try:
                report = run_bench(cfg, lambda m: console.print(f"  {m}", style="dim"))
            except Exception:  # report it, and still run the others
                console.print_exception(max_frames=8)
                continue
            finally:
                torch.cuda.empty_cache()
            render(report, console)
            console.print(f"  ({time.perf_counter() - t0:.0f} s)")
            reports[name] = report
        if args.ab_thread:
            ab_thread(console, folders, args)
    targets(console, reports)
    if args.json:
        args.json.write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))


def ab_thread(console: Console, folders: dict, args) -> None:
    """ViT-L/14 `tag --decode gpu` with the feeding thread and without it, side by side."""
    import omni_cli.inputs.feed

    for thread in (True, False):
        omni_cli.inputs.feed.THREAD = thread
        cfg = BenchConfig(
            model=ModelConfig(model="random:vit-l-14", device="cuda", precision="bf16"),
            images=folders["1080p"], workers=args.workers, decode="gpu", stages=("tag",),
        )  # fmt: skip
        stage = run_bench(cfg).stage("tag")
        spent = ", ".join(f"{k} {v:.2f}" for k, v in stage.times.items())
        console.print(
            f"  feeding thread {'on ' if thread else 'off'}: tag (gpu) "
            f"{stage.images_per_second:,.0f}/s in {stage.seconds:.2f} s ({spent})"
        )
    omni_cli.inputs.feed.THREAD = True


def targets(console: Console, reports: dict) -> None:
    console.print("\nissue 10 targets (GPU):")
    if "vit-l-14 1080p" in reports:
        r = reports["vit-l-14 1080p"]
        tag, naive = r.stage("tag"), r.stage("baseline")
        ratio = tag.images_per_second / naive.images_per_second
        console.print(f"  ViT-L/14 bf16: tag {tag.images_per_second:,.0f}/s = {tag.share:.0%} of "
                      f"encoder-only {r.stage('encoder').images_per_second:,.0f}/s (target >= 75%) "
                      f"{_ok(tag.share >= 0.75)}; {ratio:.1f}x the naive loop (target >= 10x) "
                      f"{_ok(ratio >= 10)}")  # fmt: skip
    if "vit-b-32 1080p" in reports:
        r = reports["vit-b-32 1080p"]
        tag = r.stage("tag")
        decodes = [s for s in r.stages if s.name.startswith("decode:")]
        best = max(decodes, key=lambda s: s.images_per_second)
        of = tag.images_per_second / best.images_per_second
        console.print(f"  ViT-B/32 bf16: tag {tag.images_per_second:,.0f}/s (target >= 2,500) "
                      f"{_ok(tag.images_per_second >= 2500)}; {of:.0%} of the best decode-only "
                      f"({best.decode}) {best.images_per_second:,.0f}/s (target >= 80%) "
                      f"{_ok(of >= 0.8)}")  # fmt: skip
    if "vit-l-14 4k tiles" in reports:
        r = reports["vit-l-14 4k tiles"]
        tag, enc = r.stage("tag"), r.stage("encoder")
        console.print(f"  4K --tiles auto, ViT-L/14: tag {tag.share:.0%} of encoder-only views/s "
                      f"(target >= 70%) {_ok(tag.share >= 0.7)}; host RSS peak "
                      f"{tag.peak_host / 2**30:.2f} GiB (encoder-only stage "
                      f"{enc.peak_host / 2**30:.2f} GiB)")  # fmt: skip


def _ok(flag: bool) -> str:
    return "ok" if flag else "SHORT"


if __name__ == "__main__":
    main()
