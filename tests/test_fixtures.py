"""The second tiny CLIP: it loads as a hub model does, knows its labels, and is its own model.

Rules tuned on `tiny-clip` are validated on `tiny-clip-b`, so it must work through omni like
the first one while sharing none of its weights or architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from safetensors.torch import load_file

from .conftest import MODEL, omni_tag

MODEL_B = Path(__file__).parent / "fixtures" / "tiny-clip-b"


def test_second_clip_puts_the_true_label_first(tmp_path, images, labels_file):
    out = tmp_path / "tags.parquet"
    result = omni_tag(tmp_path / "photos", "--labels", labels_file, "-o", out,
                      "--model", MODEL_B, "--device", "cpu", "--precision", "fp32")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert {r["path"]: r["top_labels"][0] for r in rows} == images


def test_second_clip_is_an_independent_model():
    a = json.loads((MODEL / "config.json").read_text())
    b = json.loads((MODEL_B / "config.json").read_text())
    assert a["model_type"] == b["model_type"] == "clip"
    shape = [
        (c["vision_config"]["hidden_size"], c["vision_config"]["num_hidden_layers"]) for c in (a, b)
    ]
    assert shape[0] != shape[1] and b["vision_config"]["image_size"] == 224
    wa, wb = load_file(MODEL / "model.safetensors"), load_file(MODEL_B / "model.safetensors")
    assert not any(k in wb and wa[k].shape == wb[k].shape and (wa[k] == wb[k]).all()
                   for k in wa if wa[k].numel() > 1 and "position_ids" not in k)  # fmt: skip
    summary = json.loads((MODEL_B / "training_summary.json").read_text())
    assert summary["recipe"] == "b"
    top1 = summary["heldout_top1"]
    assert min(top1["a_frame_filling_light"], top1["b_frame_filling_textured"]) >= 0.95
