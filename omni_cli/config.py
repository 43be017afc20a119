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
DEFAULT_MAX_PIXELS = 200_000_000
# top_labels keep the labels whose score (scoring.label_scores) reaches this: for CLIP, three
# quarters of the way from a blank image's similarity to a perfect match (benchmarks/scores.py).
DEFAULT_THRESHOLD = 0.75
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_TILES = re.compile(r"^(off|auto|\d+x\d+)$")


@dataclass(frozen=True)
class ModelConfig:
    """Which model, on which device, at which precision, in batches of how many views."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    precision: str = "auto"
    batch: int | None = None  # None = auto
    max_gpu_memory: int | None = None  # bytes on the GPU; the rest of the model goes to the CPU

    def __post_init__(self) -> None:
        if not _DEVICE.match(self.device):
            raise UsageError(
                f"--device must be auto, cpu, cuda, cuda:N or mps, not '{self.device}'"
            )
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.batch is not None and self.batch < 1:
            raise UsageError("--batch must be a positive integer or 'auto'")


@dataclass(frozen=True)
class DecodeConfig:
    """How files become pixels: draft decoding, tiling and the pixel cap."""

    exact: bool = False  # no JPEG draft decoding: matches the reference preprocessing
    tiles: str = "off"  # off | auto | RxC
    tile_overlap: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not _TILES.match(self.tiles):
            raise UsageError(f"--tiles must be off, auto or RxC (e.g. 3x4), not '{self.tiles}'")
        if self.tiles not in ("off", "auto"):
            rows, cols = (int(n) for n in self.tiles.split("x"))
            if not (1 <= rows <= 16 and 1 <= cols <= 16):
                raise UsageError("--tiles RxC needs 1 <= R, C <= 16")
        if not 0.0 <= self.tile_overlap < 0.9:
            raise UsageError("--tile-overlap must be in [0, 0.9)")
        if self.max_pixels < 1:
            raise UsageError("--max-pixels must be positive")


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
        if self.output.suffix != ".parquet":
            raise UsageError(f"output must end in .parquet: {self.output}")
