"""Bench: time every stage of the tagging pipeline side by side, on one machine, in one run.

`run_bench` measures, over the same images: decode-only (the DataLoader alone, as `tag` builds
it), encoder-only (ready uint8 tensors, already on the device, through `Encoder.encode_images`:
the ceiling), end-to-end `omni tag` to a temporary Parquet file, and optionally the naive loop
of design.md section 6 (the model's image processor per batch of 8, the full model forward with
the label texts every batch, fp32). Each stage reports images/s, its share of the encoder-only
ceiling and its peak memory: the CUDA allocator's peak on a GPU, else the RSS of this process
plus its decode workers, sampled every few milliseconds. Images come from a folder or are
synthesised as JPEGs. The report is plain data (`BenchReport.to_dict()` is the JSON); `render`
draws it for people.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import BenchConfig, DecodeConfig, TagConfig, parse_resolution
from ..errors import UsageError

NAIVE_BATCH = 8  # the guide's loop
ENCODER_POOL = 256  # encoder-only cycles over at most this many decoded images


@dataclass
class StageResult:
    name: str  # decode:MODE | encoder | tag:MODE | baseline (MODE: cpu, gpu or hybrid)
    description: str
    images: int
    seconds: float
    peak_memory: int  # bytes: CUDA allocator peak, or RSS of this process plus workers
    precision: str = ""
    batch: int = 0  # views per forward
    workers: int | None = None
    share: float | None = None  # of the encoder-only ceiling
    peak_host: int = 0  # bytes: RSS of this process plus workers, on any device
    decode: str | None = None  # where JPEGs were decoded: cpu, gpu or hybrid
    cpu_share: float | None = None  # hybrid: the share of batches CPU workers decoded at the end
    times: dict = field(default_factory=dict)  # seconds per activity (decode and tag stages)
    runtime: str | None = None  # what ran the image encoder (encoder and tag stages)
    parity: float | None = None  # encoder:RUNTIME: max |Δ similarity| to eager, same views

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["images_per_second"] = round(self.images_per_second, 3)
        out["seconds"] = round(self.seconds, 4)
        return out


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    stages: list[StageResult]
    memory_kind: str  # "cuda allocator peak" | "cpu rss (process + workers' unique)"

    def stage(self, name: str) -> StageResult | None:
        """A stage by name; `decode` and `tag` alone mean the mode `omni tag` uses by default."""
        if name in ("decode", "tag") and self.settings.get("decode"):
            name = f"{name}:{self.settings['decode']}"
        return next((s for s in self.stages if s.name == name), None)

    def to_dict(self) -> dict:
        return {
            "omni_version": __version__,
            "machine": self.machine,
            "settings": self.settings,
            "memory_kind": self.memory_kind,
            "stages": {s.name: s.to_dict() for s in self.stages},
        }


def machine_info() -> dict:
    """CPU model and cores, torch threads, GPU name: what a figure needs beside it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    return info


def synthesise(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """`n` photo-like JPEGs (textured background, one coloured shape) at `size`, quality 90."""
    from .synthetic import LABELS, draw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        path = folder / f"{i:05d}_{label.replace(' ', '_')}.jpg"
        draw(label, size, rng=rng, background="textured").save(path, quality=90)
        paths.append(path)
    return paths


class PeakMemory:
    """Peaks over a `with` block: host memory of this process and its workers (sampled every
    few milliseconds) and, on CUDA, the allocator's peak on the device."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        self.host = self.device_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def peak(self) -> int:
        """The figure a stage reports: device memory on CUDA, host memory elsewhere."""
        return self.device_peak if self.device.type == "cuda" else self.host

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_peak = torch.cuda.max_memory_allocated(self.device)
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        """This process's RSS plus its workers' unique memory: forked workers share most of
        their pages with it, and their RSS would count those once per worker."""
        import psutil

        me, children, tick = psutil.Process(), 0, 0
        while True:
            if tick % 5 == 0:  # unique set sizes read /proc/PID/smaps_rollup: every 50 ms
                children = 0
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):  # a worker that just exited
                        children += child.memory_full_info().uss
            self.host = max(self.host, me.memory_info().rss + children)
            tick += 1
            if self._stop.wait(self.interval):
                return


def run_bench(cfg: BenchConfig, on_note: Callable[[str], None] | None = None) -> BenchReport:
    """Measure every configured stage over the same images; see the module docstring."""
    note = on_note or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        tmpdir = Path(tmp)
        if cfg.images is None:
            note(f"synthesising {cfg.synthetic} JPEGs at {cfg.resolution}")
            synthesise(tmpdir / "images", cfg.synthetic, parse_resolution(cfg.resolution), cfg.seed)
            folder = tmpdir / "images"
        else:
            folder = cfg.images
        return _run(cfg, folder, tmpdir, note)


def decode_modes(decode: str, device: torch.device, exact: bool) -> list[str]:
    """The decode modes to time: `all` on a CUDA machine with a device JPEG decoder (nvImageCodec
    or torchvision's nvJPEG) is cpu, gpu and hybrid."""
    if exact or device.type != "cuda":
        return ["cpu"]
    if decode == "all":
        from ..inputs.devdecode import device_decoder

        return ["cpu", "gpu", "hybrid"] if device_decoder(device) else ["cpu"]
    return [{"auto": "hybrid"}.get(decode, decode)]


def _run(cfg: BenchConfig, folder: Path, tmpdir: Path, note) -> BenchReport:
    from ..inputs.loader import default_workers
    from ..inputs.sources import discover
    from ..model.loading import load_encoder, use_runtime

    entries = [e for e in discover([folder]) if not e.error]
    if not entries:
        raise UsageError(f"no images found under {folder}")
    stages: dict[str, StageResult] = {}
    device = precision = batch = workers = None
    modes: list[str] = []
    for round_ in range(cfg.repeat):  # rounds interleave the stages; each keeps its best
        note(f"round {round_ + 1} of {cfg.repeat}: loading {cfg.model.model}")
        eager = dataclasses.replace(cfg.model, runtime="eager")  # the ceiling is eager's
        encoder = load_encoder(eager, exact=cfg.exact)
        device, precision, batch = encoder.device, encoder.precision, encoder.batch
        workers = default_workers(device.type) if cfg.workers is None else cfg.workers
        modes = decode_modes(cfg.decode, device, cfg.exact)
        spec = dataclasses.replace(encoder.preprocess, tiles=cfg.tiles,
                                   tile_overlap=cfg.tile_overlap)  # fmt: skip
        found: list[StageResult] = []
        pool, views = [], 1.0
        for mode in modes if "decode" in cfg.stages or "encoder" in cfg.stages else []:
            note(f"decode only ({mode}): {len(entries)} images, {workers} workers")
            stage, got, views = _decode_stage(entries, spec, encoder, workers, mode,
                                              helper=cfg.workers is None)  # fmt: skip
            pool = pool or got
            if "decode" in cfg.stages:
                found.append(stage)
        if "encoder" in cfg.stages:
            note(f"encoder only: {len(entries)} images at {precision}, {batch} views per forward")
            found.append(_encoder_stage(encoder, pool, len(entries), views))
            reference = _similarities(encoder, pool)
            for name in bench_runtimes(cfg.runtimes, device, precision):
                note(f"encoder only ({name}): preparing and timing")
                use_runtime(encoder, name)
                stage = _encoder_stage(encoder, pool, len(entries), views)
                stage.parity = float((_similarities(encoder, pool) - reference).abs().max())
                found.append(stage)
        del pool, encoder
        _release(device)
        for mode in modes if "tag" in cfg.stages else []:
            note(f"end to end ({mode}): omni tag")
            found.append(_tag_stage(cfg, folder, tmpdir, workers, device, mode))
        for st in found:
            if st.name not in stages or st.seconds < stages[st.name].seconds:
                stages[st.name] = st
    if cfg.baseline:
        note("naive loop: image processor per batch of 8 + full forward, fp32")
        stages["baseline"] = _baseline_stage(cfg, entries, device)
        _release(device)
    stages = list(stages.values())
    ceiling = next((s.images_per_second for s in stages if s.name == "encoder"), None)
    for s in stages:
        s.share = s.images_per_second / ceiling if ceiling else None
    settings = {
        "model": cfg.model.model,
        "device": str(device),
        "precision": precision,
        "batch": batch,
        "workers": workers,
        "images": len(entries),
        "source": str(cfg.images) if cfg.images else f"synthetic {cfg.resolution} JPEG",
        "preprocess": "exact" if cfg.exact else "draft",
        "tiles": cfg.tiles,
        "decode": modes[-1] if modes else None,  # what `omni tag` uses by default
        "runtime": cfg.model.runtime,  # what `tag` stages asked for (see tag stages' runtime)
        "repeat": cfg.repeat,
    }
    kind = "cuda allocator peak" if device.type == "cuda" else "rss (process + workers' unique)"
    return BenchReport(machine_info(), settings, stages, kind)


def bench_runtimes(runtimes: str, device: torch.device, precision: str) -> list[str]:
    """The encoder runtimes to time beside eager: every installed one (`all`), or the one
    `tag --runtime RUNTIMES` would use, unless that is eager."""
    from ..model import runtimes as rt

    if runtimes == "all":
        quantised = precision in ("int8", "nf4")
        return [] if quantised else [n for n in rt.installed(device) if n != "eager"]
    name = rt.resolve(runtimes, device, precision)
    return [] if name == "eager" else [name]


def _similarities(encoder, pool: list[torch.Tensor], n: int = 64) -> torch.Tensor:
    """(views, labels) cosine similarities of the first `n` views to the synthetic labels."""
    from .synthetic import LABELS

    texts = encoder.encode_texts([f"a photo of a {label}." for label in LABELS])
    views = torch.cat(pool)[:n] if pool else torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    return (encoder.encode_images(views) @ texts.T).float().cpu()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _decode_stage(entries, spec, encoder, workers, mode, helper=False):
    """The loader and feeder alone, as `tag` builds them for `mode`; no encoder.

    Returns the stage, up to ENCODER_POOL views for the encoder stage, and views per image.
    """
    from ..inputs.feed import Feeder, choose_decoder
    from ..inputs.loader import files_per_batch, make_loader

    device = encoder.device
    decoder, split, adapt = choose_decoder(_DECODER[mode], device, False)
    files = files_per_batch(encoder.batch, spec, workers)
    pool, kept, count, views = [], 0, 0, 0
    with PeakMemory(device) as mem:
        started = time.perf_counter()
        loader = make_loader(entries, spec, files=files, workers=workers,
                             pin=device.type == "cuda", split=split, helper=helper)  # fmt: skip
        feeder = Feeder(loader, spec, device, encoder.batch, decoder=decoder, split=split,
                        adapt=adapt)  # fmt: skip
        for fed in feeder:
            count += sum(item.error is None for item in fed.items)
            views += len(fed.pixels)
            if kept < ENCODER_POOL and len(fed.pixels):
                pool.append(fed.pixels[: ENCODER_POOL - kept])
                kept += len(pool[-1])
        _sync(device)
        seconds = time.perf_counter() - started
    stage = StageResult(f"decode:{mode}", f"decode only ({mode})", count, seconds, mem.peak,
                        batch=encoder.batch, workers=workers, peak_host=mem.host, decode=mode,
                        cpu_share=_share(feeder), times=_round(feeder.times))  # fmt: skip
    return stage, pool, views / max(count, 1)


_DECODER = {"cpu": "cpu", "gpu": "gpu", "hybrid": "auto"}


def _round(times: dict) -> dict:
    return {k: round(v, 3) for k, v in times.items()}


def _share(feeder) -> float | None:
    return round(feeder.control.split.share, 3) if feeder.control is not None else None


def _encoder_stage(encoder, pool: list[torch.Tensor], n: int, views: float) -> StageResult:
    """Ready uint8 tensors, on the device already, through encode_images: the ceiling.

    `views` per image (more than 1 with tiles): n images cost n x views encoded views.
    """
    device = encoder.device
    pixels = torch.cat(pool).to(device)  # (views, 3, size, size) uint8
    chunks = [pixels[i : i + encoder.batch] for i in range(0, len(pixels), encoder.batch)]
    encoder.encode_images(chunks[0])  # warm-up: kernels, allocator, oneDNN primitives
    _sync(device)
    with PeakMemory(device) as mem:
        started, done, i = time.perf_counter(), 0, 0
        total = round(n * views)
        while done < total:
            chunk = chunks[i % len(chunks)][: total - done]
            encoder.encode_images(chunk)
            done += len(chunk)
            i += 1
        _sync(device)
        seconds = time.perf_counter() - started
    precision, batch, runtime = encoder.precision, encoder.batch, encoder.runtime
    name = "encoder" if runtime == "eager" else f"encoder:{runtime}"
    what = "encoder only" if runtime == "eager" else f"encoder only ({runtime})"
    return StageResult(name, what, n, seconds, mem.peak, precision, batch, peak_host=mem.host,
                       runtime=runtime)  # fmt: skip


def _tag_stage(cfg: BenchConfig, folder: Path, tmpdir: Path, workers, device, mode: str):
    """`omni tag` through the public pipeline, to a temporary Parquet file."""
    from ..pipeline import tag
    from .synthetic import LABELS

    labels = tmpdir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    out = tmpdir / "bench.parquet"
    decode = DecodeConfig(decoder=_DECODER[mode], exact=cfg.exact, tiles=cfg.tiles,
                          tile_overlap=cfg.tile_overlap)  # fmt: skip
    tag_cfg = TagConfig(inputs=(folder,), labels_file=labels, output=out, model=cfg.model,
                        decode=decode, workers=cfg.workers, resume=False, full=True)  # fmt: skip
    with PeakMemory(device) as mem:
        result = tag(tag_cfg)
    out.unlink(missing_ok=True)
    _release(device)
    return StageResult(f"tag:{mode}", f"end to end, tag ({mode})", result.tagged, result.seconds,
                       mem.peak, result.precision, result.batch, workers, peak_host=mem.host,
                       decode=mode, cpu_share=result.cpu_share, times=_round(result.times),
                       runtime=result.runtime)  # fmt: skip


def _baseline_stage(cfg: BenchConfig, entries, device) -> StageResult:
    """design.md section 6: the model's processor per batch of 8, full forward with texts, fp32.

    CLIP scores with a softmax; SigLIP pads its prompts to max_length and scores with a sigmoid.
    """
    from PIL import Image

    from .synthetic import LABELS

    model, processor, tokenizer = _naive_model(cfg.model.model, device, cfg.model.revision)
    siglip = model.config.model_type.startswith("siglip")
    texts = [f"a photo of a {label}." for label in LABELS]
    paths = [e.path for e in entries[: cfg.baseline_images]]

    def step(batch_paths):
        images = [Image.open(p).convert("RGB") for p in batch_paths]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = tokenizer(texts, padding="max_length" if siglip else True, return_tensors="pt")
        with torch.no_grad():
            out = model(pixel_values=pixel_values.to(device), **tokens.to(device))
            logits = out.logits_per_image
            return (logits.sigmoid() if siglip else logits.softmax(dim=-1)).cpu()

    step(paths[:NAIVE_BATCH])  # warm-up, as for the encoder
    with PeakMemory(device) as mem:
        started = time.perf_counter()
        for i in range(0, len(paths), NAIVE_BATCH):
            step(paths[i : i + NAIVE_BATCH])
        seconds = time.perf_counter() - started
    return StageResult("baseline", "naive loop", len(paths), seconds, mem.peak, "fp32", NAIVE_BATCH)


def _naive_model(model_id: str, device: torch.device, revision: str | None = None):
    """(model fp32, image processor, tokenizer) the way the guide loads them, for any
    CLIP-style model (`AutoModel`: CLIP, SigLIP, ...).

    The image processor is always the PIL one, as in the guide: with torchvision installed,
    transformers 5 would otherwise pick its torchvision backend, a different baseline.
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from ..model import archs
    from ..model.hub import resolve
    from ..model.loading import pretrained_kwargs, quiet

    if archs.is_random(model_id):  # no files exist for these: the family's hub defaults
        model = archs.build(model_id, torch.float32, device).eval()
        return model, archs.processor(model_id), archs.tokenizer(model_id)
    source = resolve(model_id, revision)
    common = pretrained_kwargs(source)
    with quiet():
        model = AutoModel.from_pretrained(
            source.name, dtype=torch.float32, use_safetensors=True, **common
        )
        processor = AutoImageProcessor.from_pretrained(source.name, backend="pil", **common)
        tokenizer = AutoTokenizer.from_pretrained(source.name, **common)
    return model.eval().to(device), processor, tokenizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def render(report: BenchReport, console) -> None:
    """A Rich table: one row per stage, the machine and settings underneath."""
    from rich.table import Table

    s = report.settings
    title = f"omni bench: {s['model']} on {s['device']}, {s['images']} images ({s['source']})"
    table = Table(title=title, title_justify="left")
    cuda = report.memory_kind.startswith("cuda")
    columns = ["stage", "images/s", "of encoder", "GPU peak" if cuda else "peak memory"]
    columns += ["host peak"] if cuda else []
    columns += ["precision", "views/forward", "workers"]
    for col in columns:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for st in report.stages:
        share = f"{st.share:.0%}" if st.share is not None else "-"
        mode = f" cpu share {st.cpu_share:.2f}" if st.cpu_share is not None else ""
        mode += f" max|Δsim| {st.parity:.1e}" if st.parity is not None else ""
        mode += f" [{st.runtime}]" if st.name.startswith("tag") and st.runtime else ""
        cells = [st.description + mode, f"{st.images_per_second:,.1f}", share, _gib(st.peak_memory)]
        cells += [_gib(st.peak_host)] if cuda else []
        cells += [st.precision or "-", str(st.batch or "-"),
                  "-" if st.workers is None else str(st.workers)]  # fmt: skip
        table.add_row(*cells)
    console.print(table)
    names = {st.name.split(":")[0] for st in report.stages}
    meaning = {
        "decode": "decode only: loader and feeder alone, views on the device (cpu: PIL in "
        "workers; gpu: the device decoder; hybrid: both, the CPU share tuned as it runs)",
        "encoder": "encoder only: uint8 views already on the device (eager: the ceiling; "
        "other runtimes with their max |Δ similarity| to eager on the same views)",
        "tag": "end to end: omni tag to Parquet",
        "baseline": "naive loop: the model's image processor (PIL) per batch of 8 + full "
        "forward with texts, fp32",
    }
    console.print("; ".join(text for key, text in meaning.items() if key in names) + ".")
    for st in report.stages:
        if st.times:
            spent = ", ".join(f"{k} {v:.2f}" for k, v in st.times.items())
            console.print(f"where the time goes, {st.description} ({st.seconds:.2f} s): {spent}")
    m = report.machine
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    console.print(f"machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']})"
                  f"{gpu}; torch {m['torch']}; memory = {report.memory_kind}")  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"
