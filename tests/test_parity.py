"""Parity: omni's scores equal transformers' own reference path to 1e-4 at fp32.

The reference is what a user would write by hand: PIL opens the file, the model's image
processor (its PIL backend: with torchvision installed, transformers 5 would otherwise pick the
torchvision one, which differs by ~1e-4) and tokenizer prepare images and prompts, CLIPModel's
full forward returns logits_per_image; cosine similarity is logits / logit_scale and
probabilities are their softmax.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
import transformers
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from omni_cli.config import DecodeConfig, ModelConfig, TagConfig
from omni_cli.pipeline import tag

from .conftest import LABELS, MODEL, shape_image


def reference_rgb(path) -> Image.Image:
    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode == "I;16":
        arr = np.rint(np.asarray(img) / 257.0).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, "white")
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def reference_scores(paths):
    model = CLIPModel.from_pretrained(MODEL).eval()
    images = pil_image_processor(MODEL)([reference_rgb(p) for p in paths], return_tensors="pt")
    prompts = [f"a photo of a {label}." for label in LABELS]
    inputs = dict(AutoTokenizer.from_pretrained(MODEL)(prompts, padding=True, return_tensors="pt"))
    inputs["pixel_values"] = images["pixel_values"]
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
        return (logits / model.logit_scale.exp()).numpy(), logits.softmax(-1).numpy()


def pil_image_processor(model):
    """CLIP's image processor with transformers' PIL backend, whatever else is installed."""
    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil is not None:
        return pil.from_pretrained(model)
    return AutoImageProcessor.from_pretrained(model, use_fast=False)  # before backends existed


def every_format(folder):
    """Each supported format and awkward mode, at odd sizes and orientations."""
    folder.mkdir()
    for i, label in enumerate(LABELS):
        shape_image(label, seed=100 + i, size=(331 + 17 * i, 257)).save(folder / f"{i}.png")
    base = [Image.open(folder / f"{i}.png") for i in range(len(LABELS))]
    base[0].save(folder / "a.jpg", quality=90)
    base[1].save(folder / "b.webp", quality=90)
    base[2].quantize(colors=50).save(folder / "c.gif")
    base[3].save(folder / "d.tiff")
    base[4].save(folder / "e.bmp")
    rgba = base[5].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "f_alpha.png")
    deep = np.asarray(base[6].convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(folder / "g_16bit.png")
    base[7].convert("CMYK").save(folder / "h_cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 8
    base[8].rotate(-90, expand=True).save(folder / "i_exif.jpg", exif=exif, quality=90)
    base[0].convert("L").save(folder / "j_gray.jpg", quality=90)
    base[1].convert("P").save(folder / "k_palette.png")
    shape_image(LABELS[2], seed=7, size=(1600, 1200)).save(folder / "l_large.jpg", quality=90)


def test_scores_match_transformers_reference(tmp_path, labels_file):
    folder = tmp_path / "formats"
    every_format(folder)
    out = tmp_path / "tags.parquet"
    cfg = TagConfig(
        inputs=(folder,),
        labels_file=labels_file,
        output=out,
        workers=0,
        model=ModelConfig(model=str(MODEL), device="cpu", precision="fp32", batch=4),
        decode=DecodeConfig(exact=True),
    )
    result = tag(cfg)
    assert result.exit_code == 0 and result.files == 21
    rows = pq.read_table(out).to_pylist()
    sim_ref, probs_ref = reference_scores([folder / r["path"] for r in rows])
    sim = np.array([r["similarity"] for r in rows])
    probs = np.array([r["probs"] for r in rows])
    assert np.abs(sim - sim_ref).max() < 1e-4
    assert np.abs(probs - probs_ref).max() < 1e-4
