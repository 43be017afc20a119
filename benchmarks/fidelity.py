"""Fidelity of the fast path: does draft decoding change what the model says?

On a generated set (the 9 colour-shape labels of omni_cli.tools.synthetic, textured and light
backgrounds, several photo sizes, JPEG), with the trained fixture model tests/fixtures/tiny-clip,
compares three preprocessing paths through the same weights:

  fast       omni's default: JPEG draft decoding + resize with reducing_gap (decode.py)
  exact      omni --exact: full decode, the image processor's resize (DecodeConfig(exact=True))
  reference  transformers itself: CLIPProcessor + CLIPModel.get_image_features

and prints top-1 agreement and the mean / max absolute difference in cosine similarity between
each pair, and each path's accuracy against the true labels. Target (issue 4): fast vs exact and
fast vs reference >= 99.5% top-1 agreement; exact vs reference within 1e-4.

    python benchmarks/fidelity.py [--per-label 30] [--model tests/fixtures/tiny-clip]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omni_cli.config import ModelConfig
from omni_cli.inputs import decode
from omni_cli.model.loading import load_encoder
from omni_cli.tools.bench import machine_info
from omni_cli.tools.synthetic import LABELS, draw

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-clip"
SIZES = ((1024, 768), (1920, 1080), (768, 1024), (3840, 2160), (640, 480))


def generate(folder: Path, per_label: int, seed: int = 0) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(per_label * len(LABELS)):
        label = i % len(LABELS)
        size = SIZES[(i // len(LABELS)) % len(SIZES)]
        background = "textured" if i % 2 else "light"
        path = folder / f"{i:05d}.jpg"
        draw(LABELS[label], size, rng=rng, background=background).save(path, quality=90)
        items.append((path, label))
    return items


def omni_path(model: str, paths: list[Path], exact: bool) -> tuple[torch.Tensor, float]:
    """(images, labels) cosine similarity through omni's decode + encoder; and decode seconds."""
    enc = load_encoder(ModelConfig(model=model, device="cpu", precision="fp32"), exact=exact)
    text = enc.encode_texts([f"a photo of a {label}." for label in LABELS])  # (labels, dim)
    started = time.perf_counter()
    pixels = torch.from_numpy(np.concatenate([decode.load(str(p), enc.preprocess).pixels
                                              for p in paths]))  # fmt: skip
    seconds = time.perf_counter() - started
    return enc.encode_images(pixels) @ text.T, seconds


@torch.inference_mode()
def reference_path(model: str, paths: list[Path]) -> torch.Tensor:
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging

    logging.disable_progress_bar()
    clip = CLIPModel.from_pretrained(model).eval()
    proc = CLIPProcessor.from_pretrained(model)
    texts = proc.tokenizer([f"a photo of a {label}." for label in LABELS], padding=True,
                           return_tensors="pt")  # fmt: skip
    t = torch.nn.functional.normalize(_pooled(clip.get_text_features(**texts)), dim=-1)
    sims = []
    for i in range(0, len(paths), 16):
        images = [Image.open(p).convert("RGB") for p in paths[i : i + 16]]
        pv = proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
        v = torch.nn.functional.normalize(_pooled(clip.get_image_features(pixel_values=pv)), dim=-1)
        sims.append(v @ t.T)
    return torch.cat(sims)


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
    diff = (a - b).abs()
    print(f"  {name:<22} top-1 agreement {agree:8.2%}   |sim diff| mean {diff.mean():.2e}"
          f"  max {diff.max():.2e}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-label", type=int, default=30)
    ap.add_argument("--model", default=str(FIXTURE))
    args = ap.parse_args()
    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}")
    with tempfile.TemporaryDirectory(prefix="omni-fidelity-") as tmp:
        items = generate(Path(tmp), args.per_label)
        paths, truth = [p for p, _ in items], torch.tensor([t for _, t in items])
        print(f"{len(paths)} JPEGs (q90), sizes {', '.join(f'{w}x{h}' for w, h in SIZES)}; "
              f"model {args.model}")  # fmt: skip
        fast, fast_s = omni_path(args.model, paths, exact=False)
        exact, exact_s = omni_path(args.model, paths, exact=True)
        ref = reference_path(args.model, paths)
    print(f"decode + resize, one core: fast {len(paths) / fast_s:.1f} images/s, "
          f"exact {len(paths) / exact_s:.1f} images/s")  # fmt: skip
    compare("fast vs exact", fast, exact)
    compare("fast vs reference", fast, ref)
    compare("exact vs reference", exact, ref)
    for name, sims in (("fast", fast), ("exact", exact), ("reference", ref)):
        acc = (sims.argmax(1) == truth).float().mean().item()
        print(f"  accuracy vs true label, {name:<10} {acc:8.2%}")


if __name__ == "__main__":
    main()
