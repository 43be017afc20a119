"""Encoder-only images/s per precision for random ViT-B/32 and ViT-L/14 (224 px).

    python benchmarks/precision_speed.py [--quick]

Each cell: a warm-up batch, then the median of timed batches of blank uint8 views through
`Encoder.encode_images` (normalisation on the device included). On the CPU the ViT-L/14 runs
are kept short (batch 8, two timed batches); fp16 is skipped there (no fast CPU kernels).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from omni_cli.config import ModelConfig  # noqa: E402
from omni_cli.model.loading import load_encoder  # noqa: E402


def rate(model: str, precision: str, device: str, batch: int, repeats: int) -> float:
    enc = load_encoder(ModelConfig(model=model, device=device, precision=precision, batch=batch))
    pixels = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    enc.encode_images(pixels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        enc.encode_images(pixels)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    quick = "--quick" in sys.argv
    plan = {"random:vit-b-32": (256, 10) if cuda else (32, 2 if quick else 4),
            "random:vit-l-14": (256, 10) if cuda else (8, 2)}  # fmt: skip
    table = Table(title=f"encoder images/s, {device}")
    table.add_column("precision")
    for model, (batch, _) in plan.items():
        table.add_column(f"{model[7:]} (batch {batch})", justify="right")
    for precision in ("fp32", "fp16", "bf16", "int8", "nf4"):
        if precision == "fp16" and not cuda:
            continue
        cells = [f"{rate(model, precision, device, batch, n):,.1f}"
                 for model, (batch, n) in plan.items()]  # fmt: skip
        table.add_row(precision, *cells)
    console = Console()
    console.print(describe())
    console.print(table)


if __name__ == "__main__":
    main()
