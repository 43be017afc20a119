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
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import DecodeConfig, ModelConfig, TagConfig
from .errors import UsageError

RESOLUTIONS = {"1080p": (1920, 1080), "4k": (3840, 2160), "720p": (1280, 720)}
_WXH = re.compile(r"^(\d+)x(\d+)$")
NAIVE_BATCH = 8  # the guide's loop
ENCODER_POOL = 256  # encoder-only cycles over at most this many decoded images


def parse_resolution(value: str) -> tuple[int, int]:
    """`1080p`, `4k`, `720p` or `WxH` -> (width, height)."""
    key = value.lower()
    if key in RESOLUTIONS:
        return RESOLUTIONS[key]
    match = _WXH.match(key)
    if not match or min(int(match[1]), int(match[2])) < 16:
        raise UsageError(f"--resolution must be 1080p, 4k, 720p or WxH (1024x768), not {value}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class BenchConfig:
    """One `omni bench` run. `images` None means synthesise `synthetic` JPEGs at `resolution`."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(model="random:vit-b-32"))
    images: Path | None = None
    synthetic: int = 128
    resolution: str = "1024x768"
    workers: int | None = None  # None = the pipeline's default
    baseline: bool = False
    exact: bool = False
    tiles: str = "off"  # as `tag --tiles`: the encoder stage then encodes every view
    tile_overlap: float = DecodeConfig.tile_overlap
    stages: tuple[str, ...] = ("decode", "encoder", "tag")
    repeat: int = 1  # rounds; each stage reports its fastest (a shared machine is noisy)
    seed: int = 0

    def __post_init__(self) -> None:
        parse_resolution(self.resolution)
        if self.images is None and self.synthetic < 1:
            raise UsageError("--synthetic must be a positive number of images")
        if self.images is not None and not self.images.is_dir():
            raise UsageError(f"--images must be a folder: {self.images}")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must be >= 0")
        if self.repeat < 1:
            raise UsageError("--repeat must be >= 1")
        unknown = set(self.stages) - {"decode", "encoder", "tag"}
        if unknown:
            raise UsageError(f"unknown bench stages: {', '.join(sorted(unknown))}")


@dataclass
class StageResult:
    name: str  # decode | encoder | tag | baseline
    description: str
    images: int
    seconds: float
    peak_memory: int  # bytes: CUDA allocator peak, or RSS of this process plus workers
    precision: str = ""
    batch: int = 0
    workers: int | None = None
    share: float | None = None  # of the encoder-only ceiling

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
    memory_kind: str  # "cuda allocator peak" | "cpu rss (process + workers)"

    def stage(self, name: str) -> StageResult | None:
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
    """Peak memory over a `with` block: CUDA allocator peak, else sampled RSS (+ children)."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a worker that just exited
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)
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


def _run(cfg: BenchConfig, folder: Path, tmpdir: Path, note) -> BenchReport:
    from .encoder import load_encoder
    from .loader import default_workers
    from .sources import discover

    entries = [e for e in discover([folder]) if not e.error]
    if not entries:
        raise UsageError(f"no images found under {folder}")
    stages: dict[str, StageResult] = {}
    device = precision = batch = workers = None
    for round_ in range(cfg.repeat):  # rounds interleave the stages; each keeps its best
        note(f"round {round_ + 1} of {cfg.repeat}: loading {cfg.model.model}")
        encoder = load_encoder(cfg.model, exact=cfg.exact)
        device, precision, batch = encoder.device, encoder.precision, encoder.batch
        workers = default_workers(device.type) if cfg.workers is None else cfg.workers
        found: list[StageResult] = []
        if "decode" in cfg.stages or "encoder" in cfg.stages:
            note(f"decode-only: {len(entries)} images, {workers} workers")
            spec = dataclasses.replace(
                encoder.preprocess, tiles=cfg.tiles, tile_overlap=cfg.tile_overlap
            )
            stage, pool, views = _decode_stage(entries, spec, batch, workers, device)
            if "decode" in cfg.stages:
                found.append(stage)
            if "encoder" in cfg.stages:
                note(f"encoder-only: {len(entries)} images at {precision}, batch {batch}")
                found.append(_encoder_stage(encoder, pool, len(entries), views))
            del pool
        del encoder
        _release(device)
        if "tag" in cfg.stages:
            note("end-to-end: omni tag")
            found.append(_tag_stage(cfg, folder, tmpdir, workers, device))
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
        "repeat": cfg.repeat,
    }
    kind = "cuda allocator peak" if device.type == "cuda" else "cpu rss (process + workers)"
    return BenchReport(machine_info(), settings, stages, kind)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _decode_stage(entries, spec, batch, workers, device):
    """The loader alone; keeps up to ENCODER_POOL decoded images for the encoder stage."""
    from .loader import make_loader

    pool, kept, count, views = [], 0, 0, 0
    with PeakMemory(device) as mem:
        started = time.perf_counter()
        loader = make_loader(entries, spec, batch=batch, workers=workers,
                             pin=device.type == "cuda")  # fmt: skip
        for b in loader:
            count += len(b.ok)
            views += len(b.pixels)
            if kept < ENCODER_POOL and len(b.pixels):
                pool.append(b.pixels)
                kept += len(b.pixels)
        seconds = time.perf_counter() - started
    stage = StageResult("decode", "decode only", count, seconds,
                        mem.peak, batch=batch, workers=workers)  # fmt: skip
    return stage, pool, views / max(count, 1)


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
    precision, batch = encoder.precision, encoder.batch
    return StageResult("encoder", "encoder only", n, seconds, mem.peak, precision, batch)


def _tag_stage(cfg: BenchConfig, folder: Path, tmpdir: Path, workers, device) -> StageResult:
    """`omni tag` through the public pipeline, to a temporary Parquet file."""
    from .pipeline import tag
    from .synthetic import LABELS

    labels = tmpdir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    out = tmpdir / "bench.parquet"
    tag_cfg = TagConfig(inputs=(folder,), labels_file=labels, output=out, model=cfg.model,
                        decode=DecodeConfig(exact=cfg.exact, tiles=cfg.tiles,
                                            tile_overlap=cfg.tile_overlap), workers=workers,
                        resume=False, full=True)  # fmt: skip
    with PeakMemory(device) as mem:
        result = tag(tag_cfg)
    out.unlink(missing_ok=True)
    _release(device)
    return StageResult("tag", "end to end (tag)", result.tagged, result.seconds,
                       mem.peak, result.precision, result.batch, workers)  # fmt: skip


def _baseline_stage(cfg: BenchConfig, entries, device) -> StageResult:
    """design.md section 6: the model's processor per batch of 8, full forward with texts, fp32.

    CLIP scores with a softmax; SigLIP pads its prompts to max_length and scores with a sigmoid.
    """
    from PIL import Image

    from .synthetic import LABELS

    model, processor, tokenizer = _naive_model(cfg.model.model, device)
    siglip = model.config.model_type.startswith("siglip")
    texts = [f"a photo of a {label}." for label in LABELS]
    paths = [e.path for e in entries]

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


def _naive_model(model_id: str, device: torch.device):
    """(model fp32, image processor, tokenizer) the way the guide loads them, for any
    CLIP-style model (`AutoModel`: CLIP, SigLIP, ...).

    The image processor is always the PIL one, as in the guide: with torchvision installed,
    transformers 5 would otherwise pick its torchvision backend, a different baseline.
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from . import archs
    from .encoder import _check_source, _quiet

    if archs.is_random(model_id):  # no files exist for these: the family's hub defaults
        model = archs.build(model_id, torch.float32).eval().to(device)
        return model, archs.processor(model_id), archs.tokenizer(model_id)
    source = _check_source(model_id)
    with _quiet():
        model = AutoModel.from_pretrained(
            source, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
        processor = AutoImageProcessor.from_pretrained(
            source, backend="pil", trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
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
    for col in ("stage", "images/s", "of encoder", "peak memory", "precision", "batch", "workers"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for st in report.stages:
        share = f"{st.share:.0%}" if st.share is not None else "-"
        table.add_row(st.description, f"{st.images_per_second:,.1f}", share,
                      _gib(st.peak_memory), st.precision or "-", str(st.batch or "-"),
                      "-" if st.workers is None else str(st.workers))  # fmt: skip
    console.print(table)
    console.print(
        "decode only: the DataLoader alone, uint8 batches; encoder only: uint8 tensors already "
        "on the device through Encoder.encode_images (the ceiling); end to end: omni tag to "
        "Parquet; naive loop: the model's image processor (PIL) per batch of 8 + full forward "
        "with texts, fp32."
    )
    m = report.machine
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    console.print(f"machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']})"
                  f"{gpu}; torch {m['torch']}; memory = {report.memory_kind}")  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"
