"""`omni vram`'s estimates against measured peaks: estimate, measurement and ratio per row.

Rows: the fixture model and random ViT-B/32 and ViT-L/14 at fp32 and bf16 (and on a GPU also
fp16, int8 and nf4), at a few batch sizes. The peak is weights + activations of one encoder
forward: `max_memory_allocated` on CUDA, peak RSS growth of a fresh process on the CPU (see
`omni_cli.tools.vram`). Target: every ratio within 0.85-1.15.

    python benchmarks/vram_check.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from omni_cli import vram  # noqa: E402

FIXTURE = str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-clip")


def main() -> None:
    quick = "--quick" in sys.argv
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precisions = ["fp32", "bf16"] + (["fp16", "int8", "nf4"] if cuda else [])
    plan = [(FIXTURE, (1, 32, 128)), ("random:vit-b-32", (1, 16, 64)),
            ("random:vit-l-14", (1, 8) if quick or not cuda else (1, 16, 64))]  # fmt: skip
    table = Table(title=f"vram estimate vs measured peak ({device})")
    for col in ("model", "precision", "batch", "estimate", "measured", "ratio"):
        table.add_column(col, justify="left" if col in ("model", "precision") else "right")
    worst = 1.0
    for model, batches in plan:
        meta = vram.meta_model(vram.model_config(model))
        vision = meta.config.vision_config
        for precision in precisions:
            weights = vram.weight_bytes(meta, precision, device)
            per_view = vram.activation_bytes(vision, precision, device)
            fixed = vram.CUDA_WORKSPACE if cuda else 0
            for batch in batches:
                est = weights + fixed + batch * per_view
                got = vram.measure_peak(model, precision, device, batch)
                ratio = est / got
                worst = max(worst, ratio, 1 / ratio)
                name = "tiny-clip (fixture)" if model == FIXTURE else model
                table.add_row(name, precision, str(batch), vram.human(est), vram.human(got),
                              f"{ratio:.3f}")  # fmt: skip
    console = Console()
    console.print(describe())
    console.print(table)
    console.print(f"worst ratio {worst:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
