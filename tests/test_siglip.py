"""SigLIP through omni, with the tiny trained SigLIP fixture: tag, parity, vram, bench.

SigLIP differs from CLIP where omni could go wrong: its text tower pools the last position, so
prompts must be padded to max_length as it was trained; images are resized straight to a
square (no centre crop) with mean/std 0.5; probabilities are per-label sigmoids with a learned
bias, not a softmax; its vision tower has no class token and pools with nn.MultiheadAttention,
whose out_proj is a Linear subclass that quantisers must leave alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.config import DecodeConfig, ModelConfig, TagConfig
from omni_cli.model.loading import load_encoder, quantise
from omni_cli.output.layout import metadata
from omni_cli.pipeline import tag
from omni_cli.tools import vram

from .conftest import LABELS, omni_tag
from .test_parity import every_format, reference_rgb

SIGLIP = Path(__file__).parent / "fixtures" / "tiny-siglip"
CPU = torch.device("cpu")
runner = CliRunner()


def reference(paths, padding="max_length"):
    """transformers' own SigLIP path: PIL image processor, tokenizer, SiglipModel.forward.

    Returns cosine similarity ((logits - bias) / scale) and sigmoid(logits_per_image).
    """
    from transformers import AutoTokenizer, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    model = SiglipModel.from_pretrained(SIGLIP, use_safetensors=True).eval()
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessorPil.from_pretrained(SIGLIP),  # pinned: no torchvision
        tokenizer=AutoTokenizer.from_pretrained(SIGLIP),
    )
    prompts = [f"a photo of a {label}." for label in LABELS]
    images = [reference_rgb(p) for p in paths]
    inputs = processor(text=prompts, images=images, padding=padding, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
        sim = (logits - model.logit_bias) / model.logit_scale.exp()
    return sim.numpy(), torch.sigmoid(logits).numpy()


def test_tag_puts_the_true_label_first(tmp_path, images, labels_file):
    out = tmp_path / "tags.parquet"
    result = omni_tag(tmp_path / "photos", "--labels", labels_file, "-o", out,
                      "--model", SIGLIP, "--device", "cpu", "--precision", "fp32")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(images) == 9
    assert {r["path"]: r["top_labels"][0] for r in rows} == images
    meta = metadata(out)
    assert meta["probs"] == "sigmoid(logit_scale * similarity + logit_bias)"
    assert meta["logit_bias"] < 0 < meta["logit_scale"]
    # Per-label sigmoids of the model's own scale and bias, not a softmax over the labels...
    sim = np.array([r["similarity"] for r in rows])
    probs = np.array([r["probs"] for r in rows])
    logits = meta["logit_scale"] * sim + meta["logit_bias"]
    assert np.abs(probs - 1 / (1 + np.exp(-logits))).max() < 1e-5
    # ...so they say "this label applies", each on its own: the true one above one half, the
    # eight others below it.
    truth = np.array([[label == images[r["path"]] for label in LABELS] for r in rows])
    assert (probs[truth] > 0.5).all() and (probs[~truth] < 0.5).all()


def test_scores_match_transformers_siglip(tmp_path, labels_file):
    folder = tmp_path / "formats"
    every_format(folder)  # every format and mode, odd sizes: resize without crop must match
    out = tmp_path / "tags.parquet"
    cfg = TagConfig(
        inputs=(folder,),
        labels_file=labels_file,
        output=out,
        workers=0,
        model=ModelConfig(model=str(SIGLIP), device="cpu", precision="fp32", batch=4),
        decode=DecodeConfig(exact=True),
    )
    result = tag(cfg)
    assert result.exit_code == 0 and result.files == 21
    rows = pq.read_table(out).to_pylist()
    paths = [folder / r["path"] for r in rows]
    sim_ref, probs_ref = reference(paths)
    sim = np.array([r["similarity"] for r in rows])
    probs = np.array([r["probs"] for r in rows])
    assert np.abs(sim - sim_ref).max() < 1e-4
    assert np.abs(probs - probs_ref).max() < 1e-4
    # The comparison can fail: prompts padded only to the longest one (as for CLIP) pool
    # another position and move the scores far beyond the tolerance.
    sim_short, _ = reference(paths[:3], padding="longest")
    assert np.abs(sim[:3] - sim_short).max() > 1e-2


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "nf4"])
def test_weight_memory_is_exact(precision):
    if precision == "nf4":
        pytest.importorskip("bitsandbytes")
    meta = vram.meta_model(vram.model_config(str(SIGLIP)))
    loaded = load_encoder(ModelConfig(model=str(SIGLIP), device="cpu", precision=precision))
    assert vram.weight_bytes(meta, precision, CPU) == vram.model_bytes(loaded.model)


def test_vram_estimate_within_15_percent_of_measured():
    result = runner.invoke(app, ["vram", "--model", str(SIGLIP), "--device", "cpu", "--json",
                                 "--precision", "fp32", "--batch", "16", "--measure"])  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["rows"][0]
    assert 0.85 < row["estimated_peak"]["16"] / row["measured_peak"]["16"] < 1.15


def test_vram_sizes_random_siglip_without_weights():
    cfg = vram.VramConfig(model="random:siglip-b-16", precisions=("fp32", "bf16"), budget=8 << 30,
                          device="cpu", batches=(1,))  # fmt: skip
    rows = {r.precision: r for r in vram.estimate(cfg).rows}
    # google/siglip-base-patch16-224 has 203.2M parameters; counted on the meta device.
    assert 203.0e6 < rows["fp32"].weights / 4 < 203.3e6
    assert 0.49 < rows["bf16"].weights / rows["fp32"].weights < 0.51
    # Measured (`omni vram --measure`, CPU, fp32, batches 2 and 8): 7.84 MB of activations per
    # view. 196 patch tokens, no class token, and a fused GELU keeping two MLP-wide tensors;
    # counting a class token and QuickGELU's three, as for CLIP, made it 10.3 MB.
    assert abs(rows["fp32"].per_view / 7_837_013 - 1) < 0.02


def test_nf4_leaves_the_attention_pooling_head_alone():
    """Swapping the pooling head's out_proj for a 4-bit layer broke its forward."""
    pytest.importorskip("bitsandbytes")
    from transformers import SiglipModel

    model = SiglipModel.from_pretrained(SIGLIP, use_safetensors=True).eval()
    model = quantise(model, "nf4", CPU)
    out_proj = model.vision_model.head.attention.out_proj
    assert type(out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert type(model.vision_model.head.mlp.fc1).__name__ == "Linear4bit"
    with torch.inference_mode():
        feats = model.get_image_features(pixel_values=torch.zeros(2, 3, 224, 224)).pooler_output
    assert feats.shape == (2, 64) and torch.isfinite(feats).all()


def test_bench_runs_every_stage_with_the_naive_loop(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "--model", str(SIGLIP), "--device", "cpu",
                                 "--synthetic", "16", "--resolution", "320x240", "--batch", "8",
                                 "--workers", "0", "--baseline", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    stages = json.loads(out.read_text())["stages"]
    runtimes = {name for name in stages if name.startswith("encoder:")}  # `auto`'s, if not eager
    assert set(stages) - runtimes == {"decode:cpu", "encoder", "tag:cpu", "baseline"}
    assert all(s["images"] == 16 and s["images_per_second"] > 0 for s in stages.values())
    assert all(stages[name]["parity"] < 0.02 for name in runtimes)  # SigLIP's tower exports too
