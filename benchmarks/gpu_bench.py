"""GPU throughput (an H100 or H200 with ~16 cores): every stage side by side, in one run.

Self-contained: synthesises photo-like JPEGs (in parallel on every core), then runs
`omni bench` (omni_cli.tools.bench.run_bench) on CUDA, with default options (`--batch auto`,
default workers, `--decode auto`, i.e. hybrid, with the default device decoder: nvImageCodec
where installed, else torchvision's nvJPEG), for random-weight models that time exactly like
the real ones:

  1. ViT-L/14 bf16 on 1080p JPEGs: decode only (cpu, gpu, hybrid), encoder only (eager, and
     every other installed runtime: torch.compile, TensorRT...), end-to-end `tag` in each decode
     mode, and the naive loop of design.md section 6;
  2. ViT-B/32 bf16 on the same JPEGs, the same stages;
  3. ViT-L/14 bf16 on 4K JPEGs with `--tiles auto` (~95 views each): views/s and host RSS;
  4. decoder candidates: ViT-L/14 `tag` with each other device decoder (--decode gpu, auto);
  5. ViT-L/14 `tag` with `--runtime compile` (and tensorrt where installed).

Then prints issue 19's targets, each with ok or SHORT:

  ViT-L/14: tag >= 75% of eager encoder-only (>= 1,900/s)
  ViT-B/32: tag >= 2,500 images/s
  4K tiles: tag views/s >= 70% of encoder-only views/s; host RSS stays bounded

About four minutes on one H200 with 16 cores (benchmarks/gpu_check.sh allows 270 s; each run
prints as it finishes). No network, no weights needed.

    python benchmarks/gpu_bench.py [--images 2048] [--images-4k 64] [--json gpu.json]
        [--device cpu --images 16 --images-4k 2]   # a dry run of the script on a CPU
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

RUNS = (  # (name, model, folder, tiles, naive-loop baseline, encoder runtimes timed)
    ("vit-l-14 1080p", "random:vit-l-14", "1080p", "off", True, "all"),
    ("vit-b-32 1080p", "random:vit-b-32", "1080p", "off", True, "auto"),
    ("vit-l-14 4k tiles", "random:vit-l-14", "4k", "auto", False, "auto"),
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


def probe_decoders(folder: Path, console: Console, device: torch.device) -> None:
    """Each device decoder alone on files already in memory, and with the views cut after it."""
    from omni_cli.inputs.decode import Preprocess
    from omni_cli.inputs.devdecode import BACKENDS, device_decoder, device_views

    files = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
             for p in sorted((folder / "0").rglob("*.jpg"))[:1024]]  # fmt: skip
    for backend in BACKENDS:
        decoder = device_decoder(device, backend)
        if decoder is None:
            console.print(f"  {backend}: not available")
            continue
        decoder(files[:8], device)
        for batch in (64, 256):
            for views in (False, True):
                _sync(device)
                t0 = time.perf_counter()
                for i in range(0, len(files), batch):
                    images = [im for im in decoder(files[i : i + batch], device) if im is not None]
                    if views:
                        device_views(images, Preprocess())
                _sync(device)
                rate = len(files) / (time.perf_counter() - t0)
                what = "decode + views" if views else "decode"
                console.print(f"  {backend} alone, in-memory, batch {batch}: {what} {rate:,.0f}/s")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048, help="1080p JPEGs")
    ap.add_argument("--images-4k", type=int, default=64, help="4K JPEGs for the tiling run")
    ap.add_argument("--workers", type=int, default=None, help="default: as `omni tag`")
    ap.add_argument("--batch", type=int, default=None, help="views per forward; default auto")
    ap.add_argument("--baseline-images", type=int, default=64, help="images for the naive loop")
    ap.add_argument("--copies", type=int, default=2, help="hard-linked copies of the 1080p set")
    ap.add_argument("--only", default=None, help="run only the runs whose name contains this")
    ap.add_argument("--probe", action="store_true", help="also time each decoder alone, in memory")
    ap.add_argument("--no-candidates", action="store_true", help="skip runs 4 and 5")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    ap.add_argument("--model", default=None, help="replace every run's model (a dry run's)")
    ap.add_argument(
        "--ab-thread",
        action="store_true",
        help="also time ViT-L/14 tag (gpu) with the feeding thread and without it",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds: start no further run after this (gpu_check.sh's budget)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    console = Console(highlight=False, width=150)
    begun = time.perf_counter()

    def late(name: str) -> bool:
        if args.deadline is None or time.perf_counter() - begun < args.deadline:
            return False
        console.print(f"\n{name}: skipped, past --deadline {args.deadline:.0f} s")
        return True

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA GPU (or --device cpu for a dry run)")
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
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (dry run)"
        console.print(f"GPU: {gpu}, torch {torch.__version__}")
        if args.probe:
            probe_decoders(folders["1080p"], console, device)
        precision = "bf16" if device.type == "cuda" else "auto"
        for name, model, folder, tiles, baseline, runtimes in RUNS:
            if (args.only and args.only not in name) or late(name):
                continue
            cfg = BenchConfig(
                model=ModelConfig(model=args.model or model, device=args.device,
                                  precision=precision, batch=args.batch),
                images=folders[folder], workers=args.workers, baseline=baseline,
                baseline_images=args.baseline_images, tiles=tiles, decode="all",
                runtimes=runtimes,
            )  # fmt: skip
            report = _run(console, name, cfg)
            if report is not None:
                reports[name] = report
                save(args.json, reports)
        targets(console, reports)  # now, in case the candidates outlast the time allowed
        if not args.no_candidates:
            candidates(console, folders, args, precision, reports, late)
        if args.ab_thread:
            ab_thread(console, folders, args)
    targets(console, reports)
    save(args.json, reports)


def save(path: Path | None, reports: dict) -> None:
    """The reports so far as JSON (after every run: a run cut short keeps the others')."""
    if path is not None:
        path.write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))


def _run(console: Console, name: str, cfg: BenchConfig):
    """One `omni bench` run, rendered as it finishes; None (and the error shown) if it fails."""
    console.print(f"\n[bold]{name}[/bold]")
    t0 = time.perf_counter()
    try:
        report = run_bench(cfg, lambda m: console.print(f"  {m}", style="dim"))
    except Exception:  # report it, and still run the others
        console.print_exception(max_frames=8)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    render(report, console)
    console.print(f"  ({time.perf_counter() - t0:.0f} s)")
    return report


def candidates(console: Console, folders: dict, args, precision: str, reports: dict,
               late) -> None:  # fmt: skip
    """Runs 4 and 5: ViT-L/14 `tag` with each device decoder other than the default, and with
    each encoder runtime other than eager (the default decode)."""
    from omni_cli.inputs.devdecode import BACKENDS, device_decoder
    from omni_cli.model.runtimes import installed

    device = torch.device(args.device)
    model = args.model or "random:vit-l-14"
    default = device_decoder(device)
    for backend in BACKENDS:
        if device.type != "cuda" or default is None or backend == default.name:
            continue
        if device_decoder(device, backend) is None:
            console.print(f"\n{backend}: not available")
            continue
        if late(f"decoder {backend}"):
            continue
        os.environ["OMNI_JPEG_DECODER"] = backend
        try:
            for mode in ("gpu", "auto"):
                cfg = BenchConfig(
                    model=ModelConfig(model=model, device=args.device, precision=precision,
                                      batch=args.batch, runtime="eager"),
                    images=folders["1080p"], workers=args.workers, decode=mode,
                    stages=("decode", "tag") if mode == "gpu" else ("tag",),
                )  # fmt: skip
                report = _run(console, f"vit-l-14 1080p, decoder {backend}, --decode {mode}", cfg)
                if report is not None:
                    reports[f"vit-l-14 1080p {backend} {mode}"] = report
                    save(args.json, reports)
        finally:
            del os.environ["OMNI_JPEG_DECODER"]
    for runtime in installed(device):
        if runtime == "eager" or (device.type == "cpu" and runtime == "compile"):
            continue  # compiling on a CPU takes minutes: not for a dry run
        if late(f"runtime {runtime}"):
            continue
        cfg = BenchConfig(
            model=ModelConfig(model=model, device=args.device, precision=precision,
                              batch=args.batch, runtime=runtime),
            images=folders["1080p"], workers=args.workers, decode="auto", stages=("tag",),
        )  # fmt: skip
        report = _run(console, f"vit-l-14 1080p, --runtime {runtime}", cfg)
        if report is not None:
            reports[f"vit-l-14 1080p runtime {runtime}"] = report
            save(args.json, reports)


def ab_thread(console: Console, folders: dict, args) -> None:
    """ViT-L/14 `tag --decode gpu` with the feeding thread and without it, side by side."""
    import omni_cli.inputs.feed

    for thread in (True, False):
        omni_cli.inputs.feed.THREAD = thread
        cfg = BenchConfig(
            model=ModelConfig(model=args.model or "random:vit-l-14", device=args.device,
                              precision="bf16"),
            images=folders["1080p"], workers=args.workers, decode="gpu", stages=("tag",),
        )  # fmt: skip
        stage = run_bench(cfg).stage("tag")
        spent = ", ".join(f"{k} {v:.2f}" for k, v in stage.times.items())
        console.print(
            f"  feeding thread {'on ' if thread else 'off'}: tag (gpu) "
            f"{stage.images_per_second:,.0f}/s in {stage.seconds:.2f} s ({spent})"
        )
    omni_cli.inputs.feed.THREAD = None


def targets(console: Console, reports: dict) -> None:
    console.print("\nissue 19 targets (GPU, defaults):")
    if "vit-l-14 1080p" in reports:
        r = reports["vit-l-14 1080p"]
        tag, enc = r.stage("tag"), r.stage("encoder")
        console.print(
            f"  ViT-L/14 bf16: tag {tag.images_per_second:,.0f}/s = {tag.share:.0%} of "
            f"eager encoder-only {enc.images_per_second:,.0f}/s (target >= 75%, "
            f">= 1,900/s) {_ok(tag.share >= 0.75 and tag.images_per_second >= 1900)}"
        )
        for st in r.stages:  # the other runtimes' encoders, against eager's
            if st.name.startswith("encoder:"):
                console.print(
                    f"    encoder {st.runtime}: {st.images_per_second:,.0f}/s = "
                    f"{st.share:.2f}x eager, max |Δ similarity| {st.parity:.1e}"
                )
        for key, other in reports.items():
            if key.startswith("vit-l-14 1080p ") and (st := other.stage("tag")) is not None:
                share = st.images_per_second / enc.images_per_second
                console.print(f"    {key[15:]}: tag ({st.decode}) {st.images_per_second:,.0f}/s "
                              f"= {share:.0%} of eager encoder-only")  # fmt: skip
    if "vit-b-32 1080p" in reports:
        r = reports["vit-b-32 1080p"]
        tag = r.stage("tag")
        decodes = [s for s in r.stages if s.name.startswith("decode:")]
        best = max(decodes, key=lambda s: s.images_per_second)
        of = tag.images_per_second / best.images_per_second
        console.print(f"  ViT-B/32 bf16: tag {tag.images_per_second:,.0f}/s (target >= 2,500) "
                      f"{_ok(tag.images_per_second >= 2500)}; {of:.0%} of the best decode-only "
                      f"({best.decode}) {best.images_per_second:,.0f}/s")  # fmt: skip
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
