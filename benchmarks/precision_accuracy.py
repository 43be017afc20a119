"""Top-1 agreement with fp32, per precision, on the fixture model over generated images.

    python benchmarks/precision_accuracy.py [N]

Runs what this machine can: fp16 needs a GPU (skipped on the CPU), bf16/int8/nf4 run on both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from omni_cli import synthetic  # noqa: E402
from omni_cli.config import ModelConfig  # noqa: E402
from omni_cli.model.loading import load_encoder  # noqa: E402

FIXTURE = str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-clip")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 450
    device = "cuda" if torch.cuda.is_available() else "cpu"
    truth = torch.tensor([i % len(synthetic.LABELS) for i in range(n)])
    views = []
    for i in range(n):
        rng = np.random.default_rng(10_000 + i)
        img = synthetic.draw(synthetic.LABELS[i % 9], (224, 224), rng=rng)
        views.append(torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1))
    pixels = torch.stack(views)
    prompts = [f"a photo of a {label}." for label in synthetic.LABELS]
    table = Table(title=f"fixture model, {n} generated images, {device}")
    for col in ("precision", "top-1 accuracy", "agreement with fp32"):
        table.add_column(col, justify="right")
    ref = None
    for precision in ("fp32", "fp16", "bf16", "int8", "nf4"):
        if precision == "fp16" and device == "cpu":
            table.add_row(precision, "-", "needs a GPU")
            continue
        enc = load_encoder(ModelConfig(model=FIXTURE, device=device, precision=precision, batch=64))
        top = (enc.encode_images(pixels) @ enc.encode_texts(prompts).T).argmax(1).cpu()
        ref = top if ref is None else ref
        table.add_row(precision, f"{(top == truth).float().mean():.1%}",
                      f"{(top == ref).float().mean():.1%}")  # fmt: skip
    console = Console()
    console.print(describe())
    console.print(table)


if __name__ == "__main__":
    main()
