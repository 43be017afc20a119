"""Configuration as frozen dataclasses: defaults in one place, validated once.

The CLI builds a `TagConfig` from its options; library users build one directly. Everything
the pipeline needs is passed explicitly from here, so a config printed is a run described.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8", "nf4")
DECODERS = ("auto", "cpu", "gpu")
RUNTIMES = ("auto", "eager", "compile", "onnx", "openvino", "tensorrt")  # model/runtimes.py
DEFAULT_MAX_PIXELS = 200_000_000
MAX_GRID = 16  # tiles per side of a fixed RxC grid
# top_labels keep the labels whose score (scoring.label_scores) reaches this: a similarity
# clearly above the label's mean over content-free images (scoring.score_baseline).
DEFAULT_THRESHOLD = 0.5
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_GRID = re.compile(r"^(\d+)x(\d+)$")
_BYTES = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40,
          "tb": 1000**4, "tib": 1 << 40}  # fmt: skip


# One parser per option that several commands share: the CLI runs them before any work, and the
# configs below run them again for library users, so every command says the same thing.


def parse_batch(value: str | int | None, option: str = "--batch") -> int | None:
    """`auto` (None) or a positive whole number of views per forward."""
    if value is None or value == "auto":
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{option} must be a positive whole number or 'auto', not '{value}'")
    return int(text)


def parse_tiles(value: str, option: str = "--tiles") -> str:
    """`off`, `auto` or an RxC grid with 1 <= R, C <= 16."""
    match = _GRID.match(value)
    if value not in ("off", "auto") and not match:
        raise UsageError(f"{option} must be off, auto or RxC (e.g. 3x4), not '{value}'")
    if match and not all(1 <= int(n) <= MAX_GRID for n in match.groups()):
        raise UsageError(f"{option} RxC needs 1 <= R, C <= {MAX_GRID}, not '{value}'")
    return value


def parse_overlap(value: float, option: str = "--tile-overlap") -> float:
    if not 0.0 <= value < 0.9:
        raise UsageError(f"{option} must be in [0, 0.9), not {value}")
    return value


def parse_device(value: str, option: str = "--device") -> str:
    if not _DEVICE.match(value):
        raise UsageError(f"{option} must be auto, cpu, cuda, cuda:N or mps, not '{value}'")
    return value


def parse_precision(value: str, option: str = "--precision") -> str:
    if value not in PRECISIONS:
        raise UsageError(f"{option} must be one of {', '.join(PRECISIONS)}, not '{value}'")
    return value


def parse_runtime(value: str, option: str = "--runtime") -> str:
    if value not in RUNTIMES:
        raise UsageError(f"{option} must be one of {', '.join(RUNTIMES)}, not '{value}'")
    return value


def parse_bytes(value: str, option: str = "--budget") -> int:
    """`8GiB`, `8GB`, `8G` (binary), `512MiB`, `1e9` -> bytes."""
    match = _BYTES.fullmatch(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UsageError(f"{option} must be a size such as 8GiB, 8GB or 512MiB, not '{value}'")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_size(value: str, option: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` in pixels."""
    match = _GRID.match(value.lower())
    if not match or min(int(n) for n in match.groups()) < 1:
        raise UsageError(f"{option} must be WIDTHxHEIGHT in pixels (e.g. 3840x2160), not '{value}'")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class ModelConfig:
    """Which model, on which device, at which precision, and how many views per forward."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    precision: str = "auto"
    batch: int | None = None  # views per encoder forward; None = auto
    max_gpu_memory: int | None = None  # bytes on the GPU; the rest of the model goes to the CPU
    revision: str | None = None  # a hub model's branch, tag or commit; None: its default branch
    runtime: str = "auto"  # what runs the image encoder (model/runtimes.py)

    def __post_init__(self) -> None:
        parse_device(self.device)
        parse_runtime(self.runtime)
        parse_precision(self.precision)
        parse_batch(self.batch)
        if self.revision is not None and not self.revision.strip():
            raise UsageError("--revision must be a hub branch, tag or commit, not empty")


@dataclass(frozen=True)
class DecodeConfig:
    """How files become pixels: where JPEGs are decoded, draft decoding, tiling, the pixel cap."""

    decoder: str = "auto"  # auto | cpu | gpu: where JPEGs are decoded (feed.choose_decoder)
    exact: bool = False  # no JPEG draft decoding: matches the reference preprocessing
    tiles: str = "off"  # off | auto | RxC
    tile_overlap: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = 60.0  # seconds per file in a decode worker; longer: an error row

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise UsageError(f"--decode must be auto, cpu or gpu, not '{self.decoder}'")
        if self.exact and self.decoder == "gpu":
            raise UsageError(
                "--exact decodes on the CPU, as transformers does: not with --decode gpu"
            )
        parse_tiles(self.tiles)
        parse_overlap(self.tile_overlap)
        if self.max_pixels < 1:
            raise UsageError("--max-pixels must be positive")
        if not self.decode_timeout > 0:
            raise UsageError("--decode-timeout must be a positive number of seconds")


@dataclass(frozen=True)
class TagConfig:
    """One `omni tag` run."""

    inputs: tuple[Path, ...]
    labels_file: Path
    output: Path = Path("tags.parquet")
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    workers: int | None = None  # None = loader.default_workers(device)
    template: str = "a photo of a {}."
    top_k: int = 5
    threshold: float = DEFAULT_THRESHOLD
    recursive: bool = True
    save_embeddings: bool = False
    resume: bool = True
    full: bool = False
    allow_shrink: bool = False  # let a run drop most rows, or every row of an input
    verify: bool = False  # compare content hashes too, not only size and mtime
    flush_rows: int = 1024  # rows per crash-safe part in OUT.partial/

    def __post_init__(self) -> None:
        if not self.inputs:
            raise UsageError("give at least one PATH to tag")
        if self.top_k < 0:
            raise UsageError("--top-k must be >= 0")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError("--threshold must be between 0 and 1 (0 keeps the top-k labels)")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must be >= 0")
        if self.flush_rows < 1:
            raise UsageError("--flush-rows must be positive")
        out = self.output
        if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
            raise UsageError(
                f"--output {out} is a folder that is not an omni archive; give a file in it "
                f"(e.g. {out / 'tags.parquet'}) or a new name for an archive"
            )
        if out.suffix.lower() in NOT_OUTPUTS:
            raise UsageError(
                f"--output must end in .parquet (one file) or have no extension (an archive "
                f"folder), not '{out}'"
            )


# Names that are surely a mistake for --output: a name ending in .parquet is one file, any
# other an archive (a folder of parts), but `tags.csv` is not meant as a folder.
NOT_OUTPUTS = frozenset(
    {".csv", ".tsv", ".json", ".jsonl", ".txt", ".html", ".arrow", ".feather", ".xlsx", ".db"}
)

RESOLUTIONS = {"1080p": (1920, 1080), "4k": (3840, 2160), "720p": (1280, 720)}


def parse_resolution(value: str) -> tuple[int, int]:
    """`1080p`, `4k`, `720p` or `WxH` -> (width, height)."""
    key = value.lower()
    if key in RESOLUTIONS:
        return RESOLUTIONS[key]
    match = _GRID.match(key)
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
    baseline_images: int = 256  # the naive loop is slow: it times at most this many images
    exact: bool = False
    tiles: str = "off"  # as `tag --tiles`: the encoder stage then encodes every view
    tile_overlap: float = DecodeConfig.tile_overlap
    decode: str = "all"  # all | auto | cpu | gpu: which decode modes to time (decode_modes)
    runtimes: str = "auto"  # encoder runtimes timed beside eager: all, or one of RUNTIMES
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
        if self.decode not in ("all", "auto", "cpu", "gpu"):
            raise UsageError(f"--decode must be all, auto, cpu or gpu, not '{self.decode}'")
        DecodeConfig(tiles=self.tiles, tile_overlap=self.tile_overlap)  # the same checks as tag
        if self.runtimes != "all":
            parse_runtime(self.runtimes)
        unknown = set(self.stages) - {"decode", "encoder", "tag"}
        if unknown:
            raise UsageError(f"unknown bench stages: {', '.join(sorted(unknown))}")


ALL_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4")


@dataclass(frozen=True)
class VramConfig:
    """One `omni vram` question: which model, precisions, batches, image size and budget."""

    model: str = DEFAULT_MODEL
    precisions: tuple[str, ...] = ALL_PRECISIONS
    batches: tuple[int, ...] = (1, 16, 64, 256)  # views per forward, as `tag --batch`
    tiles: str = "off"
    image: tuple[int, int] = (3840, 2160)  # width, height the tiles are counted for
    tile_overlap: float = 0.5
    budget: int | None = None  # bytes; None = free GPU memory, or available RAM on the CPU
    device: str = "auto"
    measure: bool = False
    revision: str | None = None  # as ModelConfig.revision

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in ALL_PRECISIONS]
        if bad or not self.precisions:
            raise UsageError(
                f"--precision must be all or some of {', '.join(ALL_PRECISIONS)}, "
                f"not '{','.join(self.precisions)}'"
            )
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError("--batch must be positive whole numbers of views, e.g. 1,16,256")
        parse_tiles(self.tiles)
        parse_overlap(self.tile_overlap)
        if min(self.image) < 1:
            raise UsageError("--image must be WIDTHxHEIGHT in pixels, e.g. 3840x2160")
        if parse_device(self.device) == "mps":
            raise UsageError("--device mps: omni vram sizes CUDA GPUs and the CPU")
