"""Runtimes: what runs the image encoder's forward. PyTorch eager, or a faster engine beside it.

`tag` is encoder-bound on a CPU and close to it on a fed GPU, so the vision tower (the vision
transformer plus its projection, nothing of the text side) can run on another engine:

  eager     PyTorch as loaded (the reference every other runtime is held against)
  compile   torch.compile of the vision tower (inductor)
  onnx      ONNX Runtime: CPU, or CUDA with onnxruntime-gpu (extra `omni-cli[onnx]`)
  openvino  OpenVINO on the CPU, bf16 where the CPU has native bf16 (extra `omni-cli[openvino]`)
  tensorrt  CUDA: torch-tensorrt, else ONNX Runtime's TensorRT execution provider

The exported graph takes normalised pixels at the model's own image size (from its config)
with a dynamic batch and returns the projected embedding; it is exported once, in fp32 from
the loaded weights (so a bf16 model exports its bf16 values), and cached under the omni cache
dir keyed by the model's identity, precision and image size. Every runtime must agree with
eager within the fast path's tolerance (tests/test_runtimes.py: max |Δ similarity| 1e-4 at
fp32, 0.02 and the same top label at bf16, as device decoding is held to).

`auto` follows a rule from figures measured side by side (benchmarks/runtimes_cpu.py, README):
on the CPU at fp32 or bf16, OpenVINO where installed (on the 2-core EPYC that builds omni it ran
the ViT-B/32 tower 1.5-2.1x torch bf16 and 3.0-3.4x torch fp32 in three runs; issue 19 measured
1.1-1.6x torch bf16 on an AMX Xeon); otherwise eager. ONNX Runtime was no faster than OpenVINO
at fp32 and only 1.1-1.2x torch bf16 (it runs the fp32 graph), and torch.compile's gain on an
H200 (2,895/s against 2,550/s, ViT-L/14) is paid for with a compile at start-up: both are
asked for by name. Quantised precisions (int8, nf4) run eager only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import parse_runtime
from ..errors import UsageError
from .labels import cache_dir

EXTRAS = {"onnx": "omni-cli[onnx] (onnxruntime)", "openvino": "omni-cli[openvino] (openvino)",
          "tensorrt": "torch-tensorrt, or onnxruntime-gpu with TensorRT"}  # fmt: skip
OPSET = 17

# (n, 3, S, S) normalised pixels in the encoder's dtype -> (n, dim) projected embeddings
Vision = Callable[[torch.Tensor], torch.Tensor]


class VisionTower(torch.nn.Module):
    """The image side of a CLIP-style model: pixels -> projected embedding, nothing else."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values)
        # transformers 5 returns a model output whose pooler_output is the projected embedding
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def installed(device: torch.device) -> list[str]:
    """The runtimes that can run on `device` here, eager first."""
    found = ["eager"]
    if (device.type == "cpu" and shutil.which("cc")) or device.type == "cuda":
        found.append("compile")  # inductor compiles C++ on the CPU
    if _has("onnxruntime") and (device.type == "cpu" or "CUDAExecutionProvider" in _providers()):
        found.append("onnx")
    if device.type == "cpu" and _has("openvino"):
        found.append("openvino")
    if device.type == "cuda" and (_has("torch_tensorrt") or "TensorrtExecutionProvider" in
                                  _providers()):  # fmt: skip
        found.append("tensorrt")
    return found


def resolve(requested: str, device: torch.device, precision: str) -> str:
    """The runtime a run uses: `auto` by the rule in the module docstring; a named one that
    cannot run here is a usage error naming what to install."""
    parse_runtime(requested)
    here = installed(device)
    if requested == "auto":
        if precision in ("int8", "nf4"):
            return "eager"
        if device.type == "cpu" and precision in ("fp32", "bf16") and "openvino" in here:
            return "openvino"
        return "eager"
    if requested != "eager" and precision in ("int8", "nf4"):
        raise UsageError(f"--runtime {requested} runs fp32, fp16 or bf16 weights, not {precision}")
    if requested not in here:
        need = EXTRAS.get(requested, "a C compiler (cc) for torch.compile on the CPU")
        raise UsageError(f"--runtime {requested} cannot run on {device.type} here: needs {need}")
    return requested


def build(
    name: str, model: torch.nn.Module, *, size: int, precision: str, device: torch.device,
    identity: str,
) -> Vision | None:  # fmt: skip
    """The forward of runtime `name` for `model`'s vision tower; None for eager."""
    if name == "eager":
        return None
    tower = VisionTower(model).eval()
    if name == "compile":
        return torch.compile(tower, dynamic=True)
    key = _key(identity, precision, size, device)
    if name == "tensorrt" and _has("torch_tensorrt"):
        return _torch_tensorrt(tower, size, precision, device)
    onnx = export_onnx(tower, size, key)
    if name == "openvino":
        return _openvino(onnx, precision)
    return _onnxruntime(onnx, device, precision, tensorrt=name == "tensorrt")


def _key(identity: str, precision: str, size: int, device: torch.device) -> str:
    """Cache key: the weights (model id and revision), their precision, the input size, and the
    device kind (random weights are drawn on the device they are built on)."""
    text = json.dumps([identity, precision, size, device.type, OPSET, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def export_onnx(tower: VisionTower, size: int, key: str) -> Path:
    """The tower as ONNX (fp32, dynamic batch), exported once into the cache and reused."""
    path = cache_dir() / "runtimes" / key / "vision.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"vision.{os.getpid()}.tmp.onnx")
    param = next(tower.parameters())
    copy = VisionTower(tower.model).float() if param.dtype == torch.float32 else None
    if copy is None:  # export fp32 values of lower-precision weights, leaving the model as it is
        import copy as copying

        copy = copying.deepcopy(tower).float()
    dummy = torch.zeros(2, 3, size, size, device=param.device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        batch = {0: "batch"}
        kwargs = dict(input_names=["pixel_values"], output_names=["embeds"], opset_version=OPSET,
                      dynamic_axes={"pixel_values": batch, "embeds": batch})  # fmt: skip
        try:
            torch.onnx.export(copy, (dummy,), str(tmp), dynamo=False, **kwargs)
        except TypeError:  # a PyTorch without the `dynamo` switch: its only exporter
            torch.onnx.export(copy, (dummy,), str(tmp), **kwargs)
    os.replace(tmp, path)
    return path


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _openvino(onnx: Path, precision: str) -> Vision:
    """OpenVINO on the CPU: bf16 inference where asked for (native on AVX512-BF16/AMX)."""
    import openvino as ov

    core = ov.Core()
    xml = onnx.with_name("vision.xml")
    if not xml.exists():
        tmp = onnx.with_name(f"vision.{os.getpid()}.tmp.xml")
        ov.save_model(core.read_model(str(onnx)), str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    hint = "bf16" if precision == "bf16" else "f32"
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": _threads(),
              "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: x.float().contiguous().numpy()})
        return torch.from_numpy(out[0].copy())

    return run


def _providers() -> list[str]:
    try:
        import onnxruntime

        return onnxruntime.get_available_providers()
    except Exception:
        return []


def _onnxruntime(onnx: Path, device: torch.device, precision: str, *, tensorrt: bool) -> Vision:
    """ONNX Runtime: the CPU provider, CUDA's, or TensorRT's (its engines cached beside)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads() if device.type == "cpu" else 0
    options.log_severity_level = 3
    if device.type == "cpu":
        session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.float().numpy()})[0])
    index = device.index if device.index is not None else torch.cuda.current_device()
    providers: list = [("CUDAExecutionProvider", {"device_id": index})]
    if tensorrt:
        trt = {"device_id": index, "trt_fp16_enable": precision in ("fp16", "bf16"),
               "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(onnx.parent / "trt")}  # fmt: skip
        providers.insert(0, ("TensorrtExecutionProvider", trt))
    session = ort.InferenceSession(str(onnx), options, providers=providers)
    dim = session.get_outputs()[0].shape[-1]

    def run(x: torch.Tensor) -> torch.Tensor:
        """Device tensors bound in place: no copy through the host."""
        x = x.float().contiguous()
        out = torch.empty(len(x), dim, device=x.device, dtype=torch.float32)
        binding = session.io_binding()
        binding.bind_input("pixel_values", "cuda", index, _np_float32(), tuple(x.shape),
                           x.data_ptr())  # fmt: skip
        binding.bind_output("embeds", "cuda", index, _np_float32(), tuple(out.shape),
                            out.data_ptr())  # fmt: skip
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # `out` is complete before torch reads it
        return out

    return run


def _np_float32():
    import numpy as np

    return np.float32


def _torch_tensorrt(tower: VisionTower, size: int, precision: str, device: torch.device) -> Vision:
    """torch-tensorrt's dynamo path, batch 1 to 512 (the largest `--batch auto` probes)."""
    import torch_tensorrt

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    spec = torch_tensorrt.Input(min_shape=(1, 3, size, size), opt_shape=(128, 3, size, size),
                                max_shape=(512, 3, size, size), dtype=dtype)  # fmt: skip
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    return torch_tensorrt.compile(tower, ir="dynamo", inputs=[spec], enabled_precisions={dtype})


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
