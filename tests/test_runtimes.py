"""Encoder runtimes (model/runtimes.py): parity with eager, the exported graph, the cache, `auto`.

Each runtime installed here is held to the fast path's tolerance against PyTorch eager on the
tiny trained CLIP: max |Δ similarity| 1e-4 at fp32 (as the parity test with transformers),
0.02 and the same top label at bf16 (as device decoding). TensorRT needs CUDA (test_cuda.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.config import ModelConfig, TagConfig
from omni_cli.errors import UsageError
from omni_cli.model import runtimes
from omni_cli.model.labels import cache_dir
from omni_cli.model.loading import load_encoder
from omni_cli.output.layout import metadata
from omni_cli.pipeline import tag

from .conftest import LABELS, MODEL, shape_image

CPU = torch.device("cpu")
HERE = runtimes.installed(CPU)
FAST = [name for name in ("onnx", "openvino", "compile") if name in HERE]
TOLERANCE = {"fp32": 1e-4, "bf16": 0.02}


def views() -> torch.Tensor:
    """Two frame-filling pictures of every label, as (18, 3, 224, 224) uint8 views."""
    pics = [shape_image(label, seed=s, size=(224, 224)) for s in (1, 2) for label in LABELS]
    return torch.from_numpy(np.stack([np.asarray(p) for p in pics])).permute(0, 3, 1, 2)


def similarities(runtime: str, precision: str) -> tuple[torch.Tensor, str]:
    enc = load_encoder(ModelConfig(model=str(MODEL), device="cpu", precision=precision,
                                   batch=8, runtime=runtime))  # fmt: skip
    texts = enc.encode_texts([f"a photo of a {label}." for label in LABELS])
    return enc.encode_images(views()) @ texts.T, enc.runtime


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("runtime", FAST or [pytest.param("onnx", marks=pytest.mark.skip)])
def test_runtime_agrees_with_eager(runtime, precision):
    eager, _ = similarities("eager", precision)
    fast, used = similarities(runtime, precision)
    assert used == runtime
    assert (fast - eager).abs().max() < TOLERANCE[precision]
    assert torch.equal(fast.argmax(-1), eager.argmax(-1))
    truth = torch.arange(len(LABELS)).repeat(2)
    assert (fast.argmax(-1) == truth).float().mean() >= 0.9  # and it still recognises them


@pytest.mark.skipif("onnx" not in HERE, reason="needs onnxruntime")
def test_exported_graph_is_the_vision_tower_at_the_models_size_and_cached(tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path / "cache"))
    enc = load_encoder(ModelConfig(model=str(MODEL), device="cpu", precision="fp32",
                                   runtime="onnx"))  # fmt: skip
    exported = sorted((cache_dir() / "runtimes").glob("*/vision.onnx"))
    assert len(exported) == 1
    session = onnxruntime.InferenceSession(str(exported[-1]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    size = enc.model.config.vision_config.image_size
    assert inp.shape[1:] == [3, size, size] and not isinstance(inp.shape[0], int)  # any batch
    assert out.shape[-1] == enc.model.config.projection_dim
    # Only the vision tower's weights: the text side is not in the file.
    vision = sum(p.numel() for n, p in enc.model.named_parameters()
                 if n.startswith(("vision_model.", "visual_projection.")))  # fmt: skip
    total = sum(p.numel() for p in enc.model.parameters())
    size_bytes = exported[-1].stat().st_size
    assert vision * 4 <= size_bytes < vision * 4 * 1.1 < total * 4
    # Loaded again: the cached export is reused; another precision is another entry.
    stamp = exported[-1].stat().st_mtime_ns
    load_encoder(ModelConfig(model=str(MODEL), device="cpu", precision="fp32", runtime="onnx"))
    assert exported[-1].stat().st_mtime_ns == stamp
    load_encoder(ModelConfig(model=str(MODEL), device="cpu", precision="bf16", runtime="onnx"))
    assert len(list((cache_dir() / "runtimes").glob("*/vision.onnx"))) == 2


def test_auto_follows_the_rule_and_a_missing_runtime_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(runtimes, "installed", lambda device: ["eager", "onnx", "openvino"])
    assert runtimes.resolve("auto", CPU, "bf16") == "openvino"
    assert runtimes.resolve("auto", CPU, "fp32") == "openvino"
    assert runtimes.resolve("auto", CPU, "fp16") == "eager"  # emulated on CPUs: not exported
    assert runtimes.resolve("auto", CPU, "int8") == "eager"
    monkeypatch.setattr(runtimes, "installed", lambda device: ["eager"])
    assert runtimes.resolve("auto", CPU, "bf16") == "eager"
    with pytest.raises(UsageError, match="--runtime openvino cannot run on cpu here: needs"):
        runtimes.resolve("openvino", CPU, "bf16")
    with pytest.raises(UsageError, match="not int8"):
        runtimes.resolve("onnx", CPU, "int8")


def test_cli_rejects_a_runtime_before_any_work(tmp_path, labels_file):
    runner = CliRunner()
    bad = runner.invoke(app, ["tag", str(tmp_path), "--labels", str(labels_file),
                              "--runtime", "fast"])  # fmt: skip
    assert bad.exit_code == 2 and "--runtime must be one of auto, eager" in bad.output
    trt = runner.invoke(app, ["tag", str(tmp_path), "--labels", str(labels_file), "--model",
                              str(MODEL), "--device", "cpu", "--runtime", "tensorrt",
                              "-o", str(tmp_path / "t.parquet")])  # fmt: skip
    assert trt.exit_code == 2 and "--runtime tensorrt cannot run on cpu" in trt.output
    assert not (tmp_path / "t.parquet").exists()


@pytest.mark.skipif(not FAST, reason="needs onnxruntime or openvino")
def test_tag_records_its_runtime_and_bench_times_them_side_by_side(tmp_path, labels_file):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, label in enumerate(LABELS):
        shape_image(label, seed=i).save(folder / f"{i}.jpg")
    runtime = FAST[0] if FAST[0] != "compile" else "eager"
    cfg = TagConfig(inputs=(folder,), labels_file=labels_file, output=tmp_path / "t.parquet",
                    workers=0, model=ModelConfig(model=str(MODEL), device="cpu",
                                                 precision="fp32", runtime=runtime))  # fmt: skip
    result = tag(cfg)
    meta = metadata(result.output)
    assert result.runtime == meta["runtime"] == runtime
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(MODEL), "--device", "cpu", "--precision", "fp32",
            "--synthetic", "8", "--resolution", "320x240", "--batch", "8", "--workers", "0",
            "--runtime", FAST[0], "--json", str(out)]  # fmt: skip
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    stages = json.loads(out.read_text())["stages"]
    assert stages["encoder"]["runtime"] == "eager" and stages["encoder"]["share"] == 1.0
    timed = stages[f"encoder:{FAST[0]}"]
    assert timed["images_per_second"] > 0 and timed["parity"] < 1e-4
    assert stages["tag:cpu"]["runtime"] == FAST[0]
